import gzip
import shutil

import pytest
import torch

from nfgen.data import load_split, parse_split
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
