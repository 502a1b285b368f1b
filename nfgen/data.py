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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nfgen.io import NfgenError, atomic_write, make_dir

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


# MNIST's split of this project (the only MNIST here is its test set): the defaults of every stage that needs
# training and held-out images
DEFAULT_TRAIN_SPLIT = "mnist:test[:8000]"
DEFAULT_HELDOUT_SPLIT = "mnist:test[8000:]"


def same_dataset(a: str, b: str) -> bool:
    """Whether two split specs name the same dataset (`mnist:test[:10]` and `mnist:train` do)."""
    return parse_split(a)[0] == parse_split(b)[0]


def shared_images(a: Split, b: Split) -> int:
    """How many images two splits have in common (splits of the same set share the positions in both)."""
    if parse_split(a.spec)[:2] != parse_split(b.spec)[:2]:
        return 0
    return len(set(a.indices.tolist()) & set(b.indices.tolist()))


def check_disjoint(train: Split, heldout: Split) -> None:
    """Refuse a held-out split that shares images with the training split."""
    if shared := shared_images(train, heldout):
        raise NfgenError(f"train and held-out splits share {shared} images; use disjoint slices such as "
                         "mnist:test[:8000] and mnist:test[8000:]")


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
        raise NfgenError(f"unknown dataset {name!r} in {spec!r}; use one of {', '.join(_LOADERS)}")
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return name, subset, slice(start, stop)


def load_split(spec: str, data_root: str | os.PathLike | None = None, download: bool = False) -> Split:
    """Load a split spec such as ``mnist:test[:8000]`` as float images in [0, 1]."""
    name, subset, sl = parse_split(spec)
    root = resolve_data_root(data_root)
    images, labels, class_names = _LOADERS[name](root, subset, download)
    idx = np.arange(*_resolve_slice(spec.strip(), f"{name}:{subset}", sl, len(labels)))
    imgs = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
    return Split(imgs, torch.from_numpy(labels[idx].astype(np.int64)), torch.from_numpy(idx.astype(np.int64)),
                 spec, len(class_names), class_names)


def _resolve_slice(spec: str, set_name: str, sl: slice, n: int) -> tuple[int, int]:
    """``sl``'s bounds as 0 <= start < stop <= n; a bound outside the set or an empty slice is an error
    (Python would clip it silently). Negative bounds count from the end, as in Python."""
    bounds = []
    for which, value, default in (("start", sl.start, 0), ("stop", sl.stop, n)):
        pos = default if value is None else value + n if value < 0 else value
        if pos > n:
            limit = f"< {n}" if which == "start" else f"≤ {n}"
            raise NfgenError(f"{spec} reaches past {set_name}'s {n} images; use a {which} {limit}")
        if pos < 0:
            raise NfgenError(f"{spec} starts before the first of {set_name}'s {n} images; "
                             f"use a {which} ≥ -{n}")
        bounds.append(pos)
    start, stop = bounds
    if start >= stop:
        raise NfgenError(f"{spec} is empty (it starts at image {start} and stops at {stop} of {set_name}'s "
                         f"{n}); use a start below the stop")
    return start, stop


# --- MNIST -------------------------------------------------------------------------------------------

def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root / "mnist", root / "MNIST" / "raw", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _mnist_fix(path: Path) -> str:
    """The fix for a bad MNIST file, for the end of an error message."""
    gz = path.name if path.suffix == ".gz" else path.name + ".gz"
    return (f"delete it and pass --download to fetch it again, or put the official MNIST file there "
            f"(the official {gz} has MD5 {MNIST_MD5[gz]})" if gz in MNIST_MD5 else
            "delete it and pass --download to fetch it again, or put the official MNIST file there")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NfgenError(f"cannot read {path} ({exc.strerror or exc}); make it a readable file or "
                         f"{_mnist_fix(path)}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise NfgenError(f"cannot decompress {path} ({exc}); the file is corrupt or truncated: "
                             f"{_mnist_fix(path)}") from None
    kind = "images" if magic == 2051 else "labels"
    if len(raw) < 4 or struct.unpack(">I", raw[:4])[0] != magic:
        raise NfgenError(f"{path} is not an IDX file of MNIST {kind} (its first bytes are not the magic number "
                         f"{magic}); {_mnist_fix(path)}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise NfgenError(f"{path} is truncated or corrupt ({len(raw)} bytes, too short for its own header); "
                         f"{_mnist_fix(path)}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims, dtype=np.int64))
    if len(body) != expected:
        raise NfgenError(f"{path} is truncated or corrupt ({len(body)} bytes of data, its header says {expected} "
                         f"for {' x '.join(map(str, dims))} {kind}); {_mnist_fix(path)}")
    data = np.frombuffer(body, dtype=np.uint8).reshape(dims)
    if kind == "labels" and data.size and int(data.max()) > 9:
        raise NfgenError(f"{path} is corrupt (it holds label {int(data.max())}, MNIST's labels are 0-9); "
                         f"{_mnist_fix(path)}")
    return data


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
        raise NfgenError(f"MNIST has the sets train and test, not {subset!r}; write mnist:train or mnist:test")
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
    make_dir(dest)
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

_CIFAR_NAME = re.compile(r"^(?P<index>\d+)_(?P<cls>.+)\.png$")


@functools.lru_cache(maxsize=2)
def _load_cifar_cached(root: str, subset: str):
    from PIL import Image

    base = Path(root) / "cifar10"
    folder = base / subset
    names_file = base / "labels.txt"
    if not folder.is_dir():
        raise NfgenError(f"CIFAR-10 {subset} folder not found at {folder}; put the image folder there "
                         "or point --data-root / NFGEN_DATA at its parent")
    replace = "replace it with the original image" + (f" ({base / 'MD5SUMS'} lists the checksums)"
                                                      if (base / "MD5SUMS").is_file() else "")
    class_dirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names_file.is_file():
        try:
            class_names = names_file.read_text().split()
        except (OSError, UnicodeDecodeError) as exc:
            raise NfgenError(f"cannot read {names_file} ({exc}); write the class names there, one a line, "
                             "in label order") from None
        if not class_names:
            raise NfgenError(f"{names_file} names no classes; write the class names there, one a line, in label "
                             "order, or delete it to use the folder names in sorted order")
        dup = sorted({c for c in class_names if class_names.count(c) > 1})
        if dup:
            raise NfgenError(f"{names_file} names {', '.join(dup)} more than once; list each class once")
        missing = [c for c in class_names if c not in class_dirs]
        if missing:
            raise NfgenError(f"{names_file} names classes with no folder in {folder} ({', '.join(missing)}); "
                             "fix labels.txt or add the folders")
        extra = [c for c in class_dirs if c not in class_names]
        if extra:
            raise NfgenError(f"{folder} has class folders that {names_file} does not name ({', '.join(extra)}); "
                             "add them to labels.txt or move them out")
    else:
        class_names = class_dirs
        if not class_names:
            raise NfgenError(f"{folder} has no class folders; put the images in {folder}/<class>/<index>_<class>.png")
    entries, seen = [], {}
    for label, cname in enumerate(class_names):
        files = sorted((folder / cname).glob("*.png"))
        if not files:
            raise NfgenError(f"class folder {folder / cname} holds no .png images; put the class's "
                             f"<index>_{cname}.png images there, or drop the class from labels.txt")
        for p in files:
            m = _CIFAR_NAME.match(p.name)
            if not m or m["cls"] != cname:
                raise NfgenError(f"{p} is not named <index>_{cname}.png like the other images of its folder; "
                                 "rename it or move it out of the folder")
            index = int(m["index"])
            if index in seen:
                raise NfgenError(f"{p} and {seen[index]} both have index {index}; remove or renumber one of them")
            seen[index] = p
            entries.append((index, label, p))
    entries.sort()
    images = []
    for _, _, p in entries:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError) as exc:
            raise NfgenError(f"cannot decode {p} ({type(exc).__name__}: {exc}); the image is corrupt: "
                             f"{replace}") from None
        if images and arr.shape != images[0].shape:
            raise NfgenError(f"{p} is {arr.shape[1]}x{arr.shape[0]} pixels but {entries[0][2]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; every image must have one size: {replace}")
        images.append(arr)
    labels = np.array([lab for _, lab, _ in entries], dtype=np.int64)
    return np.stack(images), labels, class_names


def _load_cifar10(root: Path, subset: str, download: bool):
    images, labels, names = _load_cifar_cached(str(root), subset)
    return images, labels, list(names)


_LOADERS = {"mnist": _load_mnist, "cifar10": _load_cifar10}
