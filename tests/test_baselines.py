"""nfgen.baselines: the per-class Gaussian reference generator."""
import pytest
import torch

from nfgen.baselines import gaussian_samples
from nfgen.common import make_generator
from nfgen.io import NfgenError


def _data(n_per_class=(7, 30), d=5, seed=0):
    g = make_generator(seed)
    xs, labels = [], []
    for c, n in enumerate(n_per_class):
        xs.append(torch.randn(n, d, generator=g, dtype=torch.float64) * (c + 1) + 10 * c)
        labels.append(torch.full((n,), c))
    return torch.cat(xs), torch.cat(labels)


def test_draws_lie_in_the_affine_span_of_their_class():
    # class 0 has 3 rows in 5 dims: their centred span is a plane, and every draw of class 0 must lie in it
    x, labels = _data(n_per_class=(3, 30))
    classes = torch.tensor([0] * 50 + [1] * 4)
    draws = gaussian_samples(x, labels, classes, make_generator(1))
    assert draws.shape == (54, 5) and draws.dtype == torch.float64
    rows = x[labels == 0]
    basis = (rows - rows.mean(0)).T  # [5, 3], rank 2
    coef = torch.linalg.lstsq(basis, (draws[:50] - rows.mean(0)).T).solution
    assert torch.allclose(basis @ coef, (draws[:50] - rows.mean(0)).T, atol=1e-10)
    assert (draws[50:, 0] > 5).all()  # class 1 lives around 10, class 0 around 0


def test_moments_match_the_class_statistics():
    x, labels = _data()
    classes = torch.cat([torch.zeros(40000, dtype=torch.long), torch.full((40000,), -1)])
    draws = gaussian_samples(x, labels, classes, make_generator(2))
    for c, sel, got in ((0, labels == 0, draws[:40000]), (-1, torch.ones_like(labels, dtype=torch.bool), draws[40000:])):
        rows = x[sel]
        scale = rows.std(0).max()
        assert torch.allclose(got.mean(0), rows.mean(0), atol=0.03 * scale), c
        assert torch.allclose(torch.cov(got.T), torch.cov(rows.T), atol=0.05 * scale ** 2), c


def test_seeded_order_independent_and_dtype_kept():
    x, labels = _data()
    x32 = x.float()
    classes = torch.tensor([1, 0, 1, -1, 0])
    a = gaussian_samples(x32, labels, classes, make_generator(3))
    b = gaussian_samples(x32, labels, classes, make_generator(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    # per class, the draws are one block in ascending class order: where the entries sit does not matter
    perm = torch.tensor([1, 4, 0, 2, 3])
    c = gaussian_samples(x32, labels, classes[perm], make_generator(3))
    for cls in (-1, 0, 1):
        assert torch.equal(a[classes == cls], c[classes[perm] == cls])
    assert not torch.equal(a, gaussian_samples(x32, labels, classes, make_generator(4)))


def test_bad_input_is_a_clear_error():
    x, labels = _data(n_per_class=(1, 5))
    with pytest.raises(NfgenError, match="class 0 has 1 example"):
        gaussian_samples(x, labels, torch.tensor([0, 1]), make_generator(0))
    with pytest.raises(NfgenError, match="class 7 has 0 example"):
        gaussian_samples(x, labels, torch.tensor([7]), make_generator(0))
    with pytest.raises(NfgenError, match="x \\[N, D\\] and labels \\[N\\]"):
        gaussian_samples(x, labels[:-1], torch.tensor([1]), make_generator(0))
