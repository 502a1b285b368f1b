"""Artifacts: safetensors files with JSON metadata in the header, written atomically.

Every artifact records its kind ("fields", "tokens", "model", ...) so that a command handed the
wrong file says so instead of failing somewhere deep inside. Nothing here ever unpickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nfgen import __version__


class NfgenError(Exception):
    """A problem with the user's input: the message names the problem and the fix, on one line."""


def _unwritable(path: Path, exc: OSError) -> NfgenError:
    return NfgenError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); choose a path in a folder "
                      f"you can write to")


def make_dir(path: str | os.PathLike) -> Path:
    """mkdir -p, with a folder that cannot be made reported as one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output path that cannot be written: an existing folder, a file where a folder
    must be, or a nearest existing folder without write permission. Creates nothing; atomic_write still reports
    what only the write itself can find out (a full disk, a read-only file system)."""
    path = Path(path)
    if path.is_dir():
        raise NfgenError(f"{path} is a folder; pass a file path to write to")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NfgenError(f"cannot write {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NfgenError(f"cannot write {path}: no write permission in {parent}; choose a path in a folder you "
                         f"can write to")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would, so a run folder can be shared
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a folder in the way of the rename
            raise _unwritable(path, exc) from None
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_artifact(path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` (made contiguous, moved to CPU) with `meta` as JSON in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"nfgen_kind": kind, "nfgen_version": __version__, "nfgen_meta": json.dumps(meta, default=str)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def load_artifact(path: str | os.PathLike, kind: str, hint: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artifact written by save_artifact, checking that it exists, parses and is a `kind`.

    `hint` says how to make the missing file (e.g. "run `nfgen fit` first").
    """
    path = Path(path)
    fix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise NfgenError(f"{kind} file not found: {path}{fix}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NfgenError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                         f"it may be truncated or corrupt: recreate it{fix}") from None
    found = header.get("nfgen_kind")
    if found != kind:
        what = f"a {found!r} artifact" if found else "not an nfgen artifact"
        raise NfgenError(f"{path} is {what}, expected a {kind!r} file{fix}")
    try:
        meta = json.loads(header.get("nfgen_meta", "{}"))
    except json.JSONDecodeError:
        raise NfgenError(f"{path} has corrupt metadata; recreate it{fix}") from None
    return tensors, meta


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """An artifact's safetensors header and its nfgen metadata, without reading a tensor; ({}, {}) for a file
    that is missing or not readable (callers that need the file load it and say what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        return header, json.loads(header.get("nfgen_meta", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}, {}


def check_finite(name: str, t: torch.Tensor, fix: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NfgenError(f"{name} holds {bad} NaN/inf values; {fix}")
