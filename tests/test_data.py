import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from nfgen.data import _load_cifar_cached, _load_mnist_cached, load_split, parse_split
from nfgen.io import NfgenError


def test_mnist_test_split_slices(data_root):
    train = load_split("mnist:test[:8000]")
    held = load_split("mnist:test[8000:]")
    assert train.images.shape == (8000, 28, 28) and held.images.shape == (2000, 28, 28)
    assert train.images.dtype == torch.float32 and 0.0 <= float(train.images.min()) and float(train.images.max()) == 1.0
    assert held.indices[0] == 8000 and train.indices[-1] == 7999
    # every digit present in the held-out set, roughly 200 each
    counts = torch.bincount(held.labels, minlength=10)
    assert counts.min() > 150 and counts.sum() == 2000
    # the first test digit of MNIST is a 7
    assert int(train.labels[0]) == 7


def test_torchvision_layout_and_gzip_free(tmp_path, data_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_root / "mnist" / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    a = load_split("mnist:test[:50]", data_root=tmp_path)
    b = load_split("mnist:test[:50]", data_root=data_root)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("spec", ["mnist", "mnist:test[1:2:3]", "imagenet:test", "mnist:valid", "mnist:test[9000:100]"])
def test_bad_split_specs(spec, data_root):
    with pytest.raises(NfgenError):
        load_split(spec)


def test_missing_root_says_where(tmp_path):
    with pytest.raises(NfgenError, match="not found.*--download"):
        load_split("mnist:test", data_root=tmp_path)


def test_truncated_and_corrupt_files(tmp_path, data_root):
    d = tmp_path / "mnist"
    d.mkdir()
    shutil.copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", d)
    blob = (data_root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(NfgenError, match="corrupt or truncated"):
        load_split("mnist:test[:10]", data_root=tmp_path)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(NfgenError, match="not an IDX file"):
        load_split("mnist:test[:10]", data_root=tmp_path)


def test_parse_split():
    assert parse_split("mnist:test[8000:]") == ("mnist", "test", slice(8000, None))
    assert parse_split("mnist:train") == ("mnist", "train", slice(None, None))


def test_mnist_background_is_mostly_exact_zeros(data_root):
    """The figure README and FitConfig.clamp_margin cite: 81 % of the test set's pixels are exactly 0."""
    images = load_split("mnist:test", data_root=data_root).images.float()
    assert 0.80 < float((images == 0).float().mean()) < 0.82


@pytest.mark.parametrize("spec, message", [
    ("mnist:test[9990:10050]", r"reaches past mnist:test's 10000 images; use a stop ≤ 10000"),
    ("mnist:test[10001:]", r"reaches past mnist:test's 10000 images; use a start < 10000"),
    ("mnist:test[-10001:]", r"starts before the first of mnist:test's 10000 images; use a start ≥ -10000"),
    ("mnist:test[:-10001]", r"use a stop ≥ -10000"),
    ("mnist:test[10000:]", r"is empty .*use a start below the stop"),
    ("mnist:test[5:5]", r"is empty .*use a start below the stop"),
    ("mnist:test[-5:-10]", r"is empty"),
])
def test_slice_out_of_range_or_empty_is_refused(spec, message, data_root):
    with pytest.raises(NfgenError, match=message):
        load_split(spec, data_root=data_root)


def test_slice_bounds_within_the_set(data_root):
    assert load_split("mnist:test[:10000]", data_root=data_root).indices[-1] == 9999
    tail = load_split("mnist:test[-10:]", data_root=data_root)
    assert len(tail) == 10 and tail.indices[0] == 9990
    assert len(load_split("mnist:test[-10000:-9990]", data_root=data_root)) == 10


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


@pytest.fixture
def bad_mnist(tmp_path, data_root):
    """write(blob, gz=True): tmp_path/mnist with the real test labels and ``blob`` as the test images."""
    d = tmp_path / "mnist"
    d.mkdir()
    shutil.copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", d)

    def write(blob: bytes, gz: bool = False):
        for old in d.glob("t10k-images-idx3-ubyte*"):
            old.unlink()
        path = d / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
        path.write_bytes(blob)
        _load_mnist_cached.cache_clear()
        return path

    yield write
    _load_mnist_cached.cache_clear()


@pytest.mark.parametrize("where, error", [(1000, "zlib.error"), ("half", "CRC check"), ("cut", "EOFError")])
def test_gzip_corrupted_mid_stream(bad_mnist, data_root, tmp_path, where, error):
    blob = bytearray((data_root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    if where == "cut":
        blob = blob[:len(blob) // 2]
    else:
        at = len(blob) // 2 if where == "half" else where
        blob[at:at + 64] = b"\xff" * 64
    bad_mnist(bytes(blob), gz=True)
    with pytest.raises(NfgenError, match=r"t10k-images-idx3-ubyte\.gz.*corrupt or truncated: delete it and pass "
                                         r"--download.*9fb629c4189551a2d022fa330f9573f3"):
        load_split("mnist:test[:10]", data_root=tmp_path)


def test_idx_too_short_or_wrong_length(bad_mnist, tmp_path):
    bad_mnist(_idx(2051, (), b"")[:4] + b"\x00\x00\x00\x01")  # 8 bytes: magic, then a cut header
    with pytest.raises(NfgenError, match=r"t10k-images-idx3-ubyte is truncated or corrupt \(8 bytes.*--download"):
        load_split("mnist:test[:10]", data_root=tmp_path)
    bad_mnist(b"\x00\x00")
    with pytest.raises(NfgenError, match="not an IDX file of MNIST images"):
        load_split("mnist:test[:10]", data_root=tmp_path)
    bad_mnist(_idx(2051, (10, 28, 28), bytes(10 * 28 * 28 - 1)))
    with pytest.raises(NfgenError, match=r"7839 bytes of data, its header says 7840.*--download"):
        load_split("mnist:test[:10]", data_root=tmp_path)
    bad_mnist(_idx(2051, (10, 28, 28), bytes(10 * 28 * 28 + 5)))
    with pytest.raises(NfgenError, match="truncated or corrupt"):
        load_split("mnist:test[:10]", data_root=tmp_path)
    bad_mnist(gzip.compress(_idx(2051, (10, 28, 28), bytes(10 * 28 * 28))), gz=True)  # well-formed, wrong count
    with pytest.raises(NfgenError, match="10 images but .* 10000 labels"):
        load_split("mnist:test[:10]", data_root=tmp_path)


# --- CIFAR-10 image folder ------------------------------------------------------------------------------

@pytest.fixture
def cifar_root(tmp_path):
    """tmp_path/cifar10/test with classes cat and dog, three 4x4 images each, and labels.txt."""
    from PIL import Image

    folder = tmp_path / "cifar10" / "test"
    rng = np.random.default_rng(0)
    for label, cname in enumerate(("cat", "dog")):
        (folder / cname).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cname / f"{2 * i + label}_{cname}.png")
    (tmp_path / "cifar10" / "labels.txt").write_text("cat\ndog\n")
    _load_cifar_cached.cache_clear()
    yield tmp_path
    _load_cifar_cached.cache_clear()


def test_cifar_folder_loads(cifar_root):
    split = load_split("cifar10:test", data_root=cifar_root)
    assert split.images.shape == (6, 4, 4, 3) and split.class_names == ["cat", "dog"]
    assert split.labels.tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\nnot really a png", b"no image at all"])
def test_cifar_corrupt_png(cifar_root, content):
    bad = cifar_root / "cifar10" / "test" / "dog" / "3_dog.png"
    bad.write_bytes(content)
    with pytest.raises(NfgenError, match=r"cannot decode .*3_dog\.png.*corrupt: replace it"):
        load_split("cifar10:test", data_root=cifar_root)


def test_cifar_truncated_png(cifar_root):
    bad = cifar_root / "cifar10" / "test" / "cat" / "2_cat.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(NfgenError, match=r"2_cat\.png.*corrupt"):
        load_split("cifar10:test", data_root=cifar_root)


def test_cifar_empty_class_folder(cifar_root):
    for p in (cifar_root / "cifar10" / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(NfgenError, match=r"dog holds no \.png images"):
        load_split("cifar10:test", data_root=cifar_root)


@pytest.mark.parametrize("labels, message", [
    ("cat\nbird\n", r"labels\.txt names classes with no folder .*\(bird\); fix labels\.txt"),
    ("cat\n", r"class folders that .*labels\.txt does not name \(dog\)"),
    ("", r"labels\.txt names no classes"),
    ("cat\ncat\ndog\n", r"names cat more than once"),
])
def test_cifar_wrong_labels_txt(cifar_root, labels, message):
    (cifar_root / "cifar10" / "labels.txt").write_text(labels)
    with pytest.raises(NfgenError, match=message):
        load_split("cifar10:test", data_root=cifar_root)


def test_cifar_no_class_folders(tmp_path):
    (tmp_path / "cifar10" / "test").mkdir(parents=True)
    _load_cifar_cached.cache_clear()
    with pytest.raises(NfgenError, match="has no class folders"):
        load_split("cifar10:test", data_root=tmp_path)


@pytest.mark.parametrize("name", ["extra_cat.png", "7_dog.png", "0_cat.png"])
def test_cifar_stray_or_misnamed_file(cifar_root, name):
    folder = cifar_root / "cifar10" / "test" / "cat"
    if name == "0_cat.png":  # a second image with index 0
        shutil.copy(folder / "0_cat.png", cifar_root / "cifar10" / "test" / "dog" / "0_dog.png")
        match = r"0_dog\.png and .*0_cat\.png both have index 0"
    else:
        shutil.copy(folder / "0_cat.png", folder / name)
        match = rf"cat/{name} is not named <index>_cat\.png.*rename it or move it out"
    with pytest.raises(NfgenError, match=match):
        load_split("cifar10:test", data_root=cifar_root)


def test_cifar_mixed_sizes(cifar_root):
    from PIL import Image

    Image.new("RGB", (8, 6)).save(cifar_root / "cifar10" / "test" / "dog" / "5_dog.png")
    with pytest.raises(NfgenError, match=r"5_dog\.png is 8x6 pixels but .*0_cat\.png is 4x4"):
        load_split("cifar10:test", data_root=cifar_root)


def test_cli_reports_bad_data_in_one_line(capsys, tmp_path, bad_mnist):
    """The CLI's view of these errors: exit code 2 and one `error:` line naming the problem, no traceback."""
    from nfgen.cli import main

    bad_mnist(b"\x00\x00\x08\x03\x00\x00\x00\x01")
    for spec, root, expected in [("mnist:test[9990:10050]", None, "reaches past mnist:test's 10000 images"),
                                 ("mnist:test[:10]", tmp_path, "t10k-images-idx3-ubyte is truncated or corrupt")]:
        capsys.readouterr()
        args = ["fit", "--run", str(tmp_path / "run"), "--split", spec, "--quiet"]
        assert main(args + (["--data-root", str(root)] if root else [])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nfgen fit: error: ") and expected in err[0], err
