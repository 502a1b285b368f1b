"""Pairwise SSIM against skimage, and every backend against the reference.

Tolerances: the float64 reference vs skimage (float64) < 1e-7 (the reference returns float32); every fast
backend (fp32 accumulation) vs skimage < 1e-5, the pinned requirement. Fused reductions are compared with
reductions of the same backend's full matrix: values to 1e-6, indices exactly wherever the best is unique.
"""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from nfkernels._ext import HAS_TRITON, has_op, triton_interpret
from nfkernels.ssim import (gaussian_window, nearest_from_matrix, pairwise_ssim, pairwise_ssim_reference,
                            ssim_nearest, ssim_nearest_both)

BACKENDS = ["torch"]
if has_op("ssim_pairwise"):
    BACKENDS.append("cpp")
if HAS_TRITON and (torch.cuda.is_available() or triton_interpret()):
    BACKENDS.append("triton")


def skimage_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    if x.dim() == 4:
        kw["channel_axis"] = -1
    xs, ys = x.double().cpu().numpy(), y.double().cpu().numpy()
    return torch.tensor([[structural_similarity(a, b, **kw) for b in ys] for a in xs], dtype=torch.float64)


@pytest.fixture
def device(backend):
    """Where `backend` runs: the C++ op on CPU, the others on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() and backend != "cpp" else "cpu")


def on(dev, *ts):
    return [t.to(dev) for t in ts]


@pytest.fixture(scope="module")
def mnist(data_root):
    from nfgen.data import load_split

    return load_split("mnist:test[:64]", data_root=data_root).images


def test_window_matches_scipy():
    from scipy.ndimage import _filters

    ref = _filters._gaussian_kernel1d(1.5, 0, 5)[::-1]
    assert gaussian_window().numel() == 11
    assert np.allclose(gaussian_window().numpy(), ref, atol=1e-15)


def test_reference_matches_skimage_random_and_rgb():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 13, 17, generator=g), torch.rand(4, 13, 17, generator=g)
    assert (pairwise_ssim_reference(x, y).double() - skimage_matrix(x, y)).abs().max() < 1e-7
    x, y = torch.rand(2, 12, 15, 3, generator=g), torch.rand(3, 12, 15, 3, generator=g)
    assert (pairwise_ssim_reference(x, y).double() - skimage_matrix(x, y)).abs().max() < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_pairs_match_skimage(backend, device):
    g = torch.Generator().manual_seed(1)
    # odd N, M (not multiples of the C++ lane count 8 or Triton tiles), odd image sizes, and correlated pairs
    x = torch.rand(5, 28, 28, generator=g)
    y = torch.cat([torch.rand(6, 28, 28, generator=g), (x[:3] + 0.1 * torch.rand(3, 28, 28, generator=g)).clamp(0, 1)])
    want = skimage_matrix(x, y)
    got = pairwise_ssim(*on(device, x, y), backend=backend).cpu()
    assert got.dtype == torch.float32 and got.shape == (5, 9)
    assert (got.double() - want).abs().max() < 1e-5
    x, y = torch.rand(3, 19, 13, generator=g), torch.rand(11, 19, 13, generator=g)
    assert (pairwise_ssim(*on(device, x, y), backend=backend).cpu().double() - skimage_matrix(x, y)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgb_matches_skimage(backend, device):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 14, 16, 3, generator=g), torch.rand(5, 14, 16, 3, generator=g)
    got = pairwise_ssim(*on(device, x, y), backend=backend).cpu()
    assert (got.double() - skimage_matrix(x, y)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_pairs_match_skimage(backend, mnist, device):
    x, y = mnist[:7], mnist[7:20]
    want = skimage_matrix(x, y)
    got = pairwise_ssim(*on(device, x, y), backend=backend).cpu()
    assert (got.double() - want).abs().max() < 1e-5
    assert want.std() > 0.05  # real digits: a spread of similarities, not all ~0


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_set_is_symmetric_with_unit_diagonal(backend, mnist, device):
    x = mnist[:13].to(device)
    s = pairwise_ssim(x, x, backend=backend).cpu()
    assert torch.allclose(s, s.T, atol=1e-6)
    assert (s.diagonal() - 1).abs().max() < 1e-5
    assert (s - pairwise_ssim_reference(x, x).cpu()).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_fused_reductions_equal_matrix_reductions(backend, exclude_self, mnist, device):
    g = torch.Generator().manual_seed(3)
    x = mnist[20:29]
    # y holds duplicates of each other and of x: ties must go to the lowest index
    y = torch.cat([mnist[40:43], x[2:4], mnist[40:41], torch.rand(3, 28, 28, generator=g)])
    x, y = on(device, x, y)
    full = pairwise_ssim(x, y, backend=backend)
    want = nearest_from_matrix(full, exclude_self=exclude_self)
    got = ssim_nearest_both(x, y, exclude_self=exclude_self, backend=backend)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape
    for gv, gi, wv, wi, sim in ((got[0], got[1], want[0], want[1], full), (got[2], got[3], want[2], want[3], full.T)):
        assert (gv - wv).abs().max() < 1e-6
        # the index found must be a maximiser of the same backend's matrix, and the lowest one on exact ties
        s = sim.clone()
        if exclude_self:
            s.fill_diagonal_(float("-inf"))
        picked = s.gather(1, gi.view(-1, 1)).squeeze(1)
        assert (picked - wv).abs().max() < 1e-6
        unique = (s >= wv.view(-1, 1) - 1e-6).sum(1) == 1
        assert torch.equal(gi[unique], wi[unique])
    assert torch.equal(ssim_nearest(x, y, exclude_self=exclude_self, backend=backend)[1], got[1])
    if exclude_self:
        assert (got[1] != torch.arange(9, device=device)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_nearest_leave_one_out(backend, mnist, device):
    x = torch.cat([mnist[:9], mnist[3:4]]).to(device)  # image 9 is a copy of image 3
    v, i = ssim_nearest(x, x, exclude_self=True, backend=backend)
    assert i[3].item() == 9 and i[9].item() == 3 and (v[[3, 9]] - 1).abs().max() < 1e-5
    v, i = ssim_nearest(x, x, backend=backend)
    assert torch.equal(i.cpu()[:9], torch.arange(9))  # itself, and 9's copy ties to the lower index 3
    assert i[9].item() == 3
    # x is y: the C++ op computes each unordered pair once; both directions must still match the matrix
    got = ssim_nearest_both(x, x, exclude_self=True, backend=backend)
    want = nearest_from_matrix(pairwise_ssim(x, x, backend=backend), exclude_self=True)
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_.float(), w_.float(), atol=1e-6)


def test_bad_input():
    x = torch.rand(2, 28, 28)
    with pytest.raises(ValueError, match="differ in shape"):
        pairwise_ssim(x, torch.rand(2, 27, 28))
    with pytest.raises(ValueError, match="smaller than"):
        pairwise_ssim(torch.rand(2, 9, 9), torch.rand(2, 9, 9))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        pairwise_ssim(torch.rand(28, 28), torch.rand(28, 28))
    with pytest.raises(ValueError, match="same length"):
        ssim_nearest(x, torch.rand(3, 28, 28), exclude_self=True)
    with pytest.raises(TypeError):
        pairwise_ssim(x.to(torch.uint8), x.to(torch.uint8))
    with pytest.raises(ValueError, match="unknown backend"):
        pairwise_ssim(x, x, backend="fast")
