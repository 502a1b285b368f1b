"""Small shared helpers: device choice, progress bars, seeding."""
from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from nfgen.io import NfgenError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise NfgenError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NfgenError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu")
    return dev


def progress(iterable=None, *, quiet: bool = False, **kw):
    """tqdm on stderr, off with --quiet."""
    return tqdm(iterable, disable=quiet, file=sys.stderr, dynamic_ncols=True, **kw)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
