"""Pairwise SSIM against skimage, and every backend against the reference.

Tolerances: the float64 reference vs skimage (float64) < 1e-7 (the reference returns float32); every fast
backend (fp32 accumulation) vs skimage < 1e-5, the pinned requirement. Fused reductions are compared with
reductions of the same backend's full matrix: values to 1e-6, indices exactly wherever the best is unique.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from nfkernels._ext import HAS_TRITON, has_op, triton_interpret
from nfkernels.ssim import (gaussian_window, pairwise_ssim, pairwise_ssim_reference,
                            ssim_nearest, ssim_nearest_both)

BACKENDS = ["torch"]
if has_op("ssim_pairwise"):
    BACKENDS.append("cpp")
if HAS_TRITON and (torch.cuda.is_available() or triton_interpret()):
    # triton-gemm(-images): the triton backend with ssim_gemm_triton's kernels (laid-out patches, gathered windows)
    BACKENDS += ["triton", "triton-gemm", "triton-gemm-images"]


def api(backend: str) -> str:
    """The backend name the public functions take ('triton-gemm…' is 'triton' with KERNEL patched)."""
    return "triton" if backend.startswith("triton") else backend


@pytest.fixture(autouse=True)
def triton_kernel(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend", "") if callspec is not None else ""
    if backend.startswith("triton-"):
        import nfkernels.ssim_triton

        monkeypatch.setattr(nfkernels.ssim_triton, "KERNEL", backend[len("triton-"):])


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


@pytest.fixture(scope="module")
def digits(mnist):
    """The central 16x16 of the MNIST digits: real content at a third of the interpreter's time (the GEMM
    kernel loops over output pixels: 36 here, 324 at 28x28)."""
    return mnist[:, 6:22, 6:22].contiguous()


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
    got = pairwise_ssim(*on(device, x, y), backend=api(backend)).cpu()
    assert got.dtype == torch.float32 and got.shape == (5, 9)
    assert (got.double() - want).abs().max() < 1e-5
    x, y = torch.rand(3, 19, 13, generator=g), torch.rand(11, 19, 13, generator=g)
    assert (pairwise_ssim(*on(device, x, y), backend=api(backend)).cpu().double() - skimage_matrix(x, y)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgb_matches_skimage(backend, device):
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 14, 16, 3, generator=g), torch.rand(5, 14, 16, 3, generator=g)
    got = pairwise_ssim(*on(device, x, y), backend=api(backend)).cpu()
    assert (got.double() - skimage_matrix(x, y)).abs().max() < 1e-5


# the GEMM kernels loop over output pixels: ~50 s a shape under the interpreter, so they take it on a GPU only
@pytest.mark.parametrize("backend", [b for b in BACKENDS if torch.cuda.is_available() or not b.startswith("triton-")])
@pytest.mark.parametrize("shape", [(64, 64, 3), (61, 47)])
def test_larger_images_match_skimage(backend, shape, device):
    # issue 6's later sizes: 64x64 colour (per-channel mean), and odd sides of 50 and more pixels
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, *shape, generator=g), torch.rand(3, *shape, generator=g)
    y[0] = 0.6 * x[0] + 0.2  # one similar pair among the random ones
    got = pairwise_ssim(*on(device, x, y), backend=api(backend)).cpu()
    want = skimage_matrix(x, y)
    assert (got.double() - want).abs().max() < 1e-5 and want[0, 0] > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_pairs_match_skimage(backend, mnist, device):
    x, y = mnist[:7], mnist[7:20]
    want = skimage_matrix(x, y)
    got = pairwise_ssim(*on(device, x, y), backend=api(backend)).cpu()
    assert (got.double() - want).abs().max() < 1e-5
    assert want.std() > 0.05  # real digits: a spread of similarities, not all ~0


@pytest.mark.skipif(not has_op("ssim_pairwise"), reason="nfkernels._C not built")
def test_cpp_baseline_isa_copy_matches_skimage(mnist, monkeypatch):
    # The op carries an AVX2+FMA copy and a baseline copy of its pair loop; force the baseline one.
    x, y = mnist[:5], mnist[5:16]
    avx2 = pairwise_ssim(x, y, backend="cpp")
    monkeypatch.setenv("NFKERNELS_NO_AVX2", "1")
    base = pairwise_ssim(x, y, backend="cpp")
    assert (base.double() - skimage_matrix(x, y)).abs().max() < 1e-5
    assert not torch.equal(base, avx2)  # another copy ran (FMA contraction rounds differently)
    assert torch.equal(ssim_nearest(x, y, backend="cpp")[1], base.argmax(dim=1))
    rgb = torch.rand(3, 13, 17, 3, generator=torch.Generator().manual_seed(1))
    assert (pairwise_ssim(rgb, rgb, backend="cpp").double() - skimage_matrix(rgb, rgb)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_set_is_symmetric_with_unit_diagonal(backend, digits, device):
    x = digits[:13].to(device)
    s = pairwise_ssim(x, x, backend=api(backend)).cpu()
    assert torch.allclose(s, s.T, atol=1e-6)
    assert (s.diagonal() - 1).abs().max() < 1e-5
    assert (s - pairwise_ssim_reference(x, x).cpu()).abs().max() < 1e-5


def assert_nearest(value, index, sim):
    """(value, index) is each row's maximum of the same backend's matrix `sim`: values to 1e-6, the index a
    maximiser, and the matrix's own (lowest-index) argmax wherever the best is unique to 1e-6. Exact ties
    between copies of an image are not asserted here: under the interpreter, BLAS may round two identical
    columns of one product differently."""
    want_v, want_i = sim.max(dim=1)
    assert value.shape == want_v.shape and (value - want_v).abs().max() < 1e-6
    picked = sim.gather(1, index.view(-1, 1)).squeeze(1)
    assert (picked - want_v).abs().max() < 1e-6
    unique = (sim >= want_v.view(-1, 1) - 1e-6).sum(1) == 1
    assert torch.equal(index[unique], sim.argmax(dim=1)[unique])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_fused_reductions_equal_matrix_reductions(backend, exclude_self, digits, device):
    g = torch.Generator().manual_seed(3)
    x = digits[20:29]
    # y holds duplicates of each other and of x: the index found must still be a maximiser
    y = torch.cat([digits[40:43], x[2:4], digits[40:41], torch.rand(3, 16, 16, generator=g)])
    x, y = on(device, x, y)
    full = pairwise_ssim(x, y, backend=api(backend))
    got = ssim_nearest_both(x, y, exclude_self=exclude_self, backend=api(backend))
    for gv, gi, sim in ((got[0], got[1], full), (got[2], got[3], full.T)):
        s = sim.clone()
        if exclude_self:
            s.fill_diagonal_(float("-inf"))
        assert_nearest(gv, gi, s)
    assert torch.equal(ssim_nearest(x, y, exclude_self=exclude_self, backend=api(backend))[1], got[1])
    if exclude_self:
        assert (got[1] != torch.arange(9, device=device)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_nearest_leave_one_out(backend, digits, device):
    x = torch.cat([digits[:9], digits[3:4]]).to(device)  # image 9 is a copy of image 3
    v, i = ssim_nearest(x, x, exclude_self=True, backend=api(backend))
    assert i[3].item() == 9 and i[9].item() == 3 and (v[[3, 9]] - 1).abs().max() < 1e-5
    v, i = ssim_nearest(x, x, backend=api(backend))
    assert torch.equal(i.cpu()[:9], torch.arange(9))  # itself, and 9's copy ties to the lower index 3
    assert i[9].item() == 3
    # x is y: the C++ op computes each unordered pair once; both directions must still match the matrix
    got = ssim_nearest_both(x, x, exclude_self=True, backend=api(backend))
    sim = pairwise_ssim(x, x, backend=api(backend)).fill_diagonal_(float("-inf"))
    for value, index in (got[:2], got[2:]):
        assert_nearest(value, index, sim)


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


needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")


@needs_triton
@pytest.mark.parametrize("layout", ["patches", "images"])
@pytest.mark.parametrize("precision", ["fp16x3", "tf32x3", "ieee"])
def test_gemm_precisions_match_skimage(precision, layout):
    # Under the interpreter tf32x3 and ieee are plain fp32 dots (plumbing only); fp16x3 really rounds its
    # operands to fp16, so this checks that the hi + scaled-lo split keeps the pinned 1e-5.
    from nfkernels.ssim_gemm_triton import pairwise_ssim_gemm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(3, 13, 17, 3, generator=g), torch.rand(17, 13, 17, 3, generator=g)  # BM + 1 columns
    got = pairwise_ssim_gemm(*(t.permute(0, 3, 1, 2).to(dev) for t in (x, y)), precision=precision,
                             layout=layout).cpu()
    assert (got.double() - skimage_matrix(x, y)).abs().max() < 1e-5


@needs_triton
@pytest.mark.parametrize("layout", ["patches", "images"])
def test_gemm_fp16x3_split_on_faint_mnist(mnist, layout):
    # Faint digits (/ 64) put many weighted window values below fp16's normal range. Without the A_SCALE /
    # LO_SCALE factors this case measured 2.4e-6 from skimage, with them 3.3e-7 (interpreter, this CPU); the
    # bound sits between, so losing the scaling fails here, while the pinned 1e-5 alone would not notice.
    # Faint images on both sides: the patches layout weights and splits x, the images layout y (in the kernel).
    from nfkernels.ssim_gemm_triton import pairwise_ssim_gemm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = mnist[:5] / 64, torch.cat([mnist[5:9] / 64, mnist[9:11]])
    got = pairwise_ssim_gemm(x[:, None].to(dev), y[:, None].to(dev), precision="fp16x3", layout=layout).cpu()
    assert (got.double() - skimage_matrix(x, y)).abs().max() < 1.5e-6


@needs_triton
@pytest.mark.parametrize("layout", ["patches", "images"])
def test_gemm_chunks_and_fallback(layout):
    from nfkernels.ssim_gemm_triton import launch_gemm, pairwise_ssim_gemm
    from nfkernels.ssim_triton import ssim_nearest_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    x = torch.rand(21, 1, 12, 14, generator=g).to(dev)
    y = torch.cat([torch.rand(14, 1, 12, 14, generator=g).to(dev), x[:5]])
    want = pairwise_ssim_reference(x[:, 0], y[:, 0])
    # the bytes of one 12x14 image's patches or of the image itself: a budget of 16 images splits x and y
    one_image = 4 * 2 * 4 * 128 if layout == "patches" else 12 * 14 * 4
    small = (16, 16, 4, 1)  # 16-row tiles on the GPU too: its default tiles would hold x and y whole
    chunks = dict(chunk_bytes=16 * one_image * 2, tiles=small, layout=layout)
    chunked = launch_gemm(x, y, reduce=False, **chunks)
    assert (chunked.cpu() - want.cpu()).abs().max() < 1e-5
    # the fused reduction over chunks: global indices (exclude_self compares them) and the lowest-index tie rule
    best, arg = launch_gemm(x, x, reduce=True, exclude_self=True, **chunks)
    assert best.shape[0] == 21 and best.shape[1] >= 2
    value, index = ssim_nearest_triton(x, x, exclude_self=True, kernel="gemm" if layout == "patches" else "gemm-images")
    full = pairwise_ssim_reference(x[:, 0], x[:, 0]).fill_diagonal_(float("-inf"))
    assert (value.cpu() - full.max(1).values.cpu()).abs().max() < 1e-5
    split = best.argmax(1, keepdim=True)
    assert torch.equal(arg.gather(1, split).squeeze(1).cpu(), full.argmax(1).cpu())
    # values beyond fp16's safe range fall back to tf32x3 instead of overflowing
    big = pairwise_ssim_gemm(x[:3] * 300, y[:3] * 300, layout=layout)
    assert torch.isfinite(big).all()
    assert (big.cpu() - pairwise_ssim_reference(x[:3, 0] * 300, y[:3, 0] * 300).cpu()).abs().max() < 1e-4
    with pytest.raises(ValueError, match="precision"):
        pairwise_ssim_gemm(x, y, precision="bf16", layout=layout)
    with pytest.raises(ValueError, match="layout"):
        pairwise_ssim_gemm(x, y, layout="windows")
    with pytest.raises(ValueError, match="kernel"):
        ssim_nearest_triton(x, x, kernel="gemm-patches")



def test_auto_kernel_picks_by_size():
    from nfkernels.ssim_triton import GEMM_MIN_PAIR_PIXELS, pick_kernel

    small, mnist_like = torch.zeros(1000, 1, 28, 28), torch.zeros(10_000, 1, 28, 28)
    assert pick_kernel("auto", small, small) == "tile"
    assert pick_kernel("auto", mnist_like, mnist_like) == "gemm"
    assert pick_kernel("auto", small[:800], mnist_like) == "gemm"  # 8e6 pairs: the threshold itself
    assert pick_kernel("auto", small[:799], mnist_like) == "tile"
    assert GEMM_MIN_PAIR_PIXELS == 8_000_000 * 324
    assert pick_kernel("gemm-images", small, small) == "gemm-images"
    with pytest.raises(ValueError, match="kernel"):
        pick_kernel("fast", small, small)


@pytest.mark.parametrize("layout", ["patches", "images"])
def test_gemm_default_tiles_do_not_spill_on_sm90(layout):
    """The GEMM kernels' default tiles (fp16x3, both modes) compile for an H100 with their pixel loop running the
    three GEMMs as warpgroup MMAs and no local-memory traffic (no GPU needed). In a subprocess without
    TRITON_INTERPRET: under the interpreter its jit helper cannot be compiled."""
    if not HAS_TRITON:
        pytest.skip("triton not available")
    from benchmarks._ptxas import has_tools

    if not has_tools():
        pytest.skip("this Triton ships no ptxas/cuobjdump")
    code = ("import json, torch; from benchmarks.ptxas_ssim import pixel_loop, resource_usage; "
            f"from nfkernels.ssim_gemm_triton import _tiles; t = _tiles(torch.device('cuda'), {layout!r}); "
            f"print(json.dumps([[resource_usage('fp16x3', t, r, 90, {layout!r}), "
            f"pixel_loop('fp16x3', t, r, 90, {layout!r})] for r in (False, True)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    for use, loop in json.loads(out.stdout.strip().splitlines()[-1]):
        assert 0 < use["registers"] <= 255, use
        # 3 GEMMs of K = 128 in k-steps of 16
        assert loop["ops"].get("HGMMA", 0) >= 24 and not {"LDL", "STL"} & set(loop["ops"]), loop["ops"]
        # 128 x 64 tiles spill 56-64 B when writing the matrix, outside the loop
        assert use["stack_bytes"] <= 128, use
        # Triton 3.9: 27 instructions a pair and pixel over patches; 44-45 gathering from the images (the
        # gathers, the weighting and the hi / lo split of y)
        assert loop["per_pair_pixel"] <= (35 if layout == "patches" else 55), loop


def _split_rows(monkeypatch, constant, per_row, rows):
    """Shrink nfkernels.ssim's chunk-size `constant` to `rows` rows of `per_row` elements (1: one row a chunk)."""
    import nfkernels.ssim

    monkeypatch.setattr(nfkernels.ssim, constant, rows * per_row if rows > 1 else 1)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_reference_chunks_of_rows(rows, digits, monkeypatch):
    # Every other test fits in one chunk: 3 and 4 rows a chunk split 10 rows of x into 3 + 3 + 3 + 1 / 4 + 4 + 2
    # (ragged last chunk; 7 RGB rows into 3 + 3 + 1 / 4 + 3), a budget of 1 element takes the max(1, ...) floor
    # of one row a chunk. Each pair is the same float64 arithmetic in any chunk: the results must be equal.
    g = torch.Generator().manual_seed(7)
    x = torch.cat([digits[:8], torch.rand(2, 16, 16, generator=g)])
    y = torch.cat([digits[30:35], x[8:9]])
    want = pairwise_ssim_reference(x, y)
    xr, yr = torch.rand(7, 12, 13, 3, generator=g), torch.rand(5, 12, 13, 3, generator=g)  # channels in the budget
    want_rgb = pairwise_ssim_reference(xr, yr)
    _split_rows(monkeypatch, "_REF_CHUNK_ELEMS", 16 * 16 * len(y), rows)
    assert torch.equal(pairwise_ssim_reference(x, y), want)
    _split_rows(monkeypatch, "_REF_CHUNK_ELEMS", 12 * 13 * 3 * len(yr), rows)
    assert torch.equal(pairwise_ssim_reference(xr, yr), want_rgb)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_torch_nearest_blocks_of_rows(rows, exclude_self, digits, monkeypatch):
    """The torch ssim_nearest_both reduces the matrix block by block: its results must be the row and column
    (max, first argmax) of the whole matrix. Copies of one x image in different blocks tie on their columns
    (the earlier block's index must stay), and with exclude_self a block's diagonal sits at an offset."""
    g = torch.Generator().manual_seed(8)
    x = torch.cat([digits[:9], torch.rand(1, 16, 16, generator=g)])  # 10 images: blocks of 1-4 rows, ragged
    x[7] = x[1]  # copies in different blocks for every block size here
    x[5] = x[4]  # copies in one block for 2-4 rows a block
    # 10 images (exclude_self needs N == M): y[4] is x[1] (= x[7]), y[5] repeats y[0], y[6] is x[6]
    y = torch.cat([digits[20:24], x[1:2], digits[20:21], x[6:7], torch.rand(3, 16, 16, generator=g)])
    full = pairwise_ssim_reference(x, y)
    if exclude_self:
        full.fill_diagonal_(float("-inf"))
    want_rv, want_ri = full.max(dim=1)
    want_cv, want_ci = full.max(dim=0)
    assert torch.equal(want_ri, full.argmax(1)) and torch.equal(want_ci, full.argmax(0))  # first maximum
    # the ties the blocks must get right are really there: rows 1 and 7 on column 4, rows 4 and 5 everywhere
    assert full[7, 4] == full[1, 4] == 1 and want_ci[4] == 1 and want_ri[1] == want_ri[7] == 4
    assert torch.equal(full[4, :4], full[5, :4])
    _split_rows(monkeypatch, "_NEAREST_CHUNK_SIMS", len(y), rows)
    _split_rows(monkeypatch, "_REF_CHUNK_ELEMS", 16 * 16 * len(y), max(1, rows - 1))  # the reference chunks too
    rv, ri, cv, ci = ssim_nearest_both(x, y, exclude_self=exclude_self, backend="torch")
    assert torch.equal(ri, want_ri) and torch.equal(ci, want_ci)
    assert torch.equal(rv, want_rv) and torch.equal(cv, want_cv)
    assert torch.equal(ssim_nearest(x, y, exclude_self=exclude_self, backend="torch")[1], want_ri)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_torch_self_nearest_blocks_of_rows(rows, digits, monkeypatch):
    # Leave-one-out within one set, in blocks: each image's nearest other image, never itself; the copies
    # 2 = 8 and 3 = 9 (in other blocks) find each other.
    x = torch.cat([digits[40:48], digits[42:44], digits[50:51]])  # 11 images
    full = pairwise_ssim_reference(x, x).fill_diagonal_(float("-inf"))
    want = (*full.max(dim=1), *full.max(dim=0))
    _split_rows(monkeypatch, "_NEAREST_CHUNK_SIMS", len(x), rows)
    got = ssim_nearest_both(x, x, exclude_self=True, backend="torch")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[1][[2, 3, 8, 9]].tolist() == [8, 9, 2, 3] and got[3][[2, 3, 8, 9]].tolist() == [8, 9, 2, 3]
    assert (got[1] != torch.arange(len(x))).all()
