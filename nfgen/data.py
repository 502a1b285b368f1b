"""Datasets as split specs: ``mnist:test[:8000]``, ``mnist:test[8000:]``, ``mnist:train``, ``cifar10:test[:500]``.

MNIST is read from the standard IDX files (optionally gzipped) under a data root: ``--data-root``, else
``$NFGEN_DATA``, else ``~/.cache/nfgen``; both ``<root>/mnist/`` and torchvision's ``<root>/MNIST/raw/`` work.
CIFAR-10 is read from an image folder ``<root>/cifar10/<set>/<class>/<index>_<class>.png``.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nfgen.io import NfgenError, atomic_write

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MD5 = {  # of the .gz files, as published with the dataset
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")

_SPEC = re.compile(r"^(?P<name>[a-z0-9]+):(?P<set>[a-z]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass
class Split:
    images: torch.Tensor  # float32 [N, H, W] (or [N, H, W, 3]) in [0, 1]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N], positions in the source set
    spec: str
    n_classes: int
    class_names: list[str]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    if root:
        return Path(root).expanduser()
    if os.environ.get("NFGEN_DATA"):
        return Path(os.environ["NFGEN_DATA"]).expanduser()
    return Path("~/.cache/nfgen").expanduser()


def parse_split(spec: str) -> tuple[str, str, slice]:
    m = _SPEC.match(spec.strip())
    if not m:
        raise NfgenError(f"bad split spec {spec!r}; write it like mnist:test, mnist:test[:8000] or mnist:test[8000:]")
    name, subset = m["name"], m["set"]
    if name not in _LOADERS:
        raise NfgenError(f"unknown dataset {name!r} in {spec!r}; known: {', '.join(_LOADERS)}")
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return name, subset, slice(start, stop)


def load_split(spec: str, data_root: str | os.PathLike | None = None, download: bool = False) -> Split:
    """Load a split spec such as ``mnist:test[:8000]`` as float images in [0, 1]."""
    name, subset, sl = parse_split(spec)
    root = resolve_data_root(data_root)
    images, labels, class_names = _LOADERS[name](root, subset, download)
    idx = np.arange(len(labels))[sl]
    if len(idx) == 0:
        raise NfgenError(f"split {spec!r} is empty (the {name}:{subset} set has {len(labels)} items); fix the slice")
    imgs = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
    return Split(imgs, torch.from_numpy(labels[idx].astype(np.int64)), torch.from_numpy(idx.astype(np.int64)),
                 spec, len(class_names), class_names)


# --- MNIST -------------------------------------------------------------------------------------------

def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root / "mnist", root / "MNIST" / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise NfgenError(f"cannot read {path} ({exc}); the file is corrupt or truncated: "
                         "delete it and fetch it again (nfgen ... --download)") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise NfgenError(f"{path} is not an IDX file of the expected type; replace it with the original MNIST file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise NfgenError(f"{path} is truncated or corrupt ({len(body)} bytes of data, header says "
                         f"{int(np.prod(dims))}); delete it and fetch it again (--download)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(root: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = MNIST_FILES[subset]
    img_path, lbl_path = _find_idx(Path(root), img_stem), _find_idx(Path(root), lbl_stem)
    images = _read_idx(img_path, 2051)
    labels = _read_idx(lbl_path, 2049)
    if len(images) != len(labels):
        raise NfgenError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels; "
                         "replace them with a matching pair")
    return images, labels


def _load_mnist(root: Path, subset: str, download: bool):
    if subset not in MNIST_FILES:
        raise NfgenError(f"MNIST has the sets train and test, not {subset!r}")
    missing = [s for s in MNIST_FILES[subset] if _find_idx(root, s) is None]
    if missing and download:
        download_mnist(root, subset)
        missing = [s for s in MNIST_FILES[subset] if _find_idx(root, s) is None]
    if missing:
        raise NfgenError(f"MNIST {subset} files not found under {root} (looked in {root / 'mnist'} and "
                         f"{root / 'MNIST' / 'raw'} for {', '.join(m + '[.gz]' for m in missing)}); put them there, "
                         "point --data-root or NFGEN_DATA at their parent, or pass --download")
    images, labels = _load_mnist_cached(str(root), subset)
    return images, labels, [str(i) for i in range(10)]


def download_mnist(root: Path, subset: str) -> None:
    """Fetch the gzipped IDX files, checking MD5: torchvision's downloader (into <root>/MNIST/raw/) if it
    imports, else the usual mirrors (into <root>/mnist/)."""
    try:
        from torchvision.datasets import MNIST  # optional; its PyPI build does not import beside CPU torch

        MNIST(str(root), train=subset == "train", download=True)
        return
    except Exception:  # noqa: BLE001 — any failure there falls back to the mirrors below
        pass
    dest = root / "mnist"
    dest.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES[subset]:
        name = stem + ".gz"
        if (dest / name).is_file():
            continue
        payload, errors = None, []
        for mirror in MNIST_MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=30) as r:
                    payload = r.read()
                break
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
        if payload is None:
            raise NfgenError(f"could not download {name} ({'; '.join(errors)}); offline? copy the MNIST IDX files "
                             f"into {dest} by hand")
        if hashlib.md5(payload).hexdigest() != MNIST_MD5[name]:
            raise NfgenError(f"downloaded {name} fails its MD5 check; try again later or copy the file into {dest}")
        with atomic_write(dest / name) as tmp:
            tmp.write_bytes(payload)


# --- CIFAR-10 (image folder) ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _load_cifar_cached(root: str, subset: str):
    from PIL import Image

    base = Path(root) / "cifar10"
    names_file = base / "labels.txt"
    if not (base / subset).is_dir():
        raise NfgenError(f"CIFAR-10 {subset} folder not found at {base / subset}; put the image folder there "
                         "or point --data-root / NFGEN_DATA at its parent")
    class_names = names_file.read_text().split() if names_file.is_file() else sorted(p.name for p in (base / subset).iterdir())
    entries = []
    for label, cname in enumerate(class_names):
        for p in (base / subset / cname).glob("*.png"):
            entries.append((int(p.stem.split("_")[0]), label, p))
    entries.sort()
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for _, _, p in entries])
    labels = np.array([lab for _, lab, _ in entries], dtype=np.int64)
    return images, labels, class_names


def _load_cifar10(root: Path, subset: str, download: bool):
    images, labels, names = _load_cifar_cached(str(root), subset)
    return images, labels, list(names)


_LOADERS = {"mnist": _load_mnist, "cifar10": _load_cifar10}
