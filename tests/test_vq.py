"""vq_assign backends against torch.cdist + argmin, tie-breaking, k-means invariants.

Tolerance: fast paths sum (x_j - c_j)^2 in fp32, possibly in another order than the reference, so a row
may pick a different code only when the two codes are within fp32 rounding of each other: we require
the chosen code's float64 distance to be within 1e-5 relative (+1e-7 absolute) of the true minimum.
Engines run on the CPU must pick the float64 argmin exactly on every row that is not a near-tie (runner-up
within a few fp32 roundings of the sum, see _near_ties); on the GPU at least 99% of rows must (see
_check_nearest). Returned distances: rtol 1e-5, atol 1e-6 vs float64. Exact ties (duplicate codes) must go
to the lowest index on every engine and device.
"""
import pytest
import torch

from nfkernels import _ext
from nfkernels.vq import MAX_DIM, _kmeanspp_init, kmeans, vq_assign, vq_assign_reference

ENGINES = [("torch", "brute"), ("cpp", "brute"), ("triton", "brute"), ("torch", "sorted"), ("cpp", "sorted")]


def _available(backend):
    return backend == "torch" or (backend == "cpp" and _ext.has_op("vq_assign")) or \
        (backend == "triton" and _ext.HAS_TRITON and (_ext.triton_interpret() or torch.cuda.is_available()))


def _on_gpu(backend):
    """Whether `backend` runs on the GPU here: the Triton kernel when there is one (else the interpreter on CPU)."""
    return backend == "triton" and torch.cuda.is_available()


def _on(backend, *tensors):
    """The tensors where `backend` runs them."""
    dev = "cuda" if _on_gpu(backend) else "cpu"
    return [t.to(dev) for t in tensors]


def _assign(x, codebook, backend, **kw):
    """vq_assign on `backend`'s device, results back on the CPU."""
    out = vq_assign(*_on(backend, x, codebook), backend=backend, **kw)
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def _near_ties(d64, d):
    """Rows whose runner-up code is within fp32 rounding of the nearest. An fp32 sum of d squared differences
    is within (d + 2) * 2^-24 relative of the exact value in any order, with or without FMA contraction, so only
    these rows may resolve differently from float64 (factor 4 for margin). Exact ties (duplicate codes) fall in
    here too: the tie tests check them against the reference."""
    if d64.shape[1] < 2:
        return torch.zeros(d64.shape[0], dtype=torch.bool)
    two = d64.topk(2, dim=1, largest=False).values
    return two[:, 1] <= two[:, 0] * (1 + 4 * (d + 2) * 2.0**-24)


def _d64(x, codebook):
    """Squared distances in float64 from direct differences (cdist's matmul path would add ~1e-16 |x|^2 of noise)."""
    return torch.cdist(x.double(), codebook.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _check_nearest(x, codebook, idx, dist=None, *, backend):
    d64 = _d64(x, codebook)
    ref = d64.argmin(dim=1)
    true_min = d64.gather(1, ref[:, None])[:, 0]
    chosen = d64.gather(1, idx[:, None])[:, 0]
    assert idx.dtype == torch.int64 and idx.shape == (x.shape[0],)
    assert (chosen <= true_min * (1 + 1e-5) + 1e-7).all()
    if _on_gpu(backend):
        # The compiled Triton kernel (FMA contraction, its own summation order) has not been measured against
        # the exact rule below; keep the bound above plus the old allowance of 1% of rows off the argmin.
        assert (idx == ref).double().mean() >= 0.99
    else:
        # Measured: every engine and d here matches the argmin on every row; only near-ties may differ.
        free = ~_near_ties(d64, x.shape[1])
        assert torch.equal(idx[free], ref[free]), (idx != ref).nonzero()[:, 0].tolist()
    if dist is not None:
        torch.testing.assert_close(dist.double(), chosen, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,method,d", [(b, m, d) for b, m in ENGINES for d in (1, 2, 3, 4, 8, 16)
                                               if m == "brute" or d == 1])
def test_matches_cdist_argmin(backend, method, d):
    if not _available(backend):
        pytest.skip(f"{backend} not available")
    g = torch.Generator().manual_seed(d)
    x = torch.randn(257, d, generator=g)
    codebook = torch.randn(131, d, generator=g)
    # 64 rows just off the midpoint of a code and its nearest other code: runner-up ~8e-6 relative behind, a
    # gap fp32 resolves but inside the 1e-5 distance tolerance, so only the exact rule decides these rows.
    near = torch.cdist(codebook[:64], codebook).fill_diagonal_(float("inf")).argmin(1)
    x = torch.cat([x, codebook[:64] + (0.5 - 1e-6) * (codebook[near] - codebook[:64])])
    d64 = _d64(x, codebook)
    two = d64.topk(2, dim=1, largest=False).values
    decided = (two[:, 1] <= two[:, 0] * (1 + 1e-5)) & ~_near_ties(d64, d)
    assert decided.sum() >= (60 if d > 1 else 8)  # d = 1: rounding x to fp32 spreads the gaps, 10 stay in the window
    idx, dist = _assign(x, codebook, backend, return_distance=True, method=method)
    _check_nearest(x, codebook, idx, dist, backend=backend)
    assert torch.equal(_assign(x, codebook, backend, method=method), idx)


@pytest.mark.parametrize("backend,method", ENGINES)
def test_duplicate_codes_go_to_lowest_index(backend, method):
    if not _available(backend):
        pytest.skip(f"{backend} not available")
    d = 1 if method == "sorted" else 3
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(37, d, generator=g)
    codebook[[9, 21, 30]] = codebook[4].clone()  # four copies of one code, lowest index 4
    codebook[33] = codebook[17].clone()
    x = torch.cat([codebook[[4, 9, 21, 30, 17, 33]], torch.randn(50, d, generator=g)])
    idx = _assign(x, codebook, backend, method=method)
    assert idx[:6].tolist() == [4, 4, 4, 4, 17, 17]
    assert torch.equal(idx, vq_assign_reference(x, codebook))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_no_cancellation_near_large_codes(backend):
    # Codes 1e-3 apart around 1000: |x|^2 + |c|^2 - 2x.c in fp32 has ~0.1 of cancellation noise and
    # would pick essentially random codes; direct differences resolve them exactly.
    if not _available(backend):
        pytest.skip(f"{backend} not available")
    K, d = 41, 4
    codebook = 1000.0 + 1e-3 * torch.arange(K, dtype=torch.float32)[:, None].repeat(1, d)
    target = torch.arange(K).repeat(3)
    x = codebook[target] + 1e-4
    assert torch.equal(_assign(x, codebook, backend), target)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_many_tiles_large_k(backend):
    if not _available(backend):
        pytest.skip(f"{backend} not available")
    g = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(67, 2, generator=g), torch.randn(1001, 2, generator=g)
    codebook[1000] = x[5]  # the exact match sits in the last, partial tile
    idx = _assign(x, codebook, backend)
    _check_nearest(x, codebook, idx, backend=backend)
    assert idx[5] == 1000


@pytest.mark.parametrize("block_k", [16, 32])
def test_triton_ties_across_tiles_and_slots(block_k):
    """The Triton kernel keeps a best per (row, tile column) and reduces at the end: equal codes in other
    tiles, in the same or another column slot, must still resolve to the lowest index; NaN rows give 0, inf."""
    if not _available("triton"):
        pytest.skip("triton not available")
    from nfkernels.vq_triton import vq_assign_triton

    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(70, 3, generator=g)
    codebook[[20, 36, 53, 69]] = codebook[5].clone()  # lowest copy at 5, later copies in other tiles and slots
    codebook[[3, 19]] = codebook[40].clone()  # the lowest copy sits in an earlier tile than the original
    x = torch.cat([codebook[[53, 36, 40, 19]], torch.randn(45, 3, generator=g), torch.full((1, 3), float("nan"))])
    idx, dist = (t.cpu() for t in vq_assign_triton(*_on("triton", x, codebook), block_m=16, block_k=block_k))
    assert idx[:4].tolist() == [5, 5, 3, 3]
    assert torch.equal(idx[:-1], vq_assign_reference(x[:-1], codebook))
    assert idx[-1] == 0 and dist[-1] == float("inf")
    _check_nearest(x[:-1], codebook, idx[:-1], dist[:-1], backend="triton")


@pytest.mark.parametrize("backend,method,d", [(b, m, d) for b, m in ENGINES for d in (1, 2, 4)
                                               if m == "brute" or d == 1])
def test_ties_across_code_tiles(backend, method, d):
    """The C++ op walks the codebook in tiles of 256 codes (kCodeTile) keeping a running best per row, and takes
    a tile's minimum only when strictly smaller: copies of a code in tile 0, 1 and 2 of K = 601 (the last one
    ragged) and twice inside one tile must all resolve to the lowest index, as the reference's argmin does. Odd
    M = 131 spans three 64-row blocks. Run for every engine (the Triton kernel at its default tiles)."""
    if not _available(backend):
        pytest.skip(f"{backend} not available")
    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(601, d, generator=g)
    groups = {7: [200, 300, 515, 600],  # tile 0 (twice), 1, 2 and the last code
              255: [512],  # last of tile 0, first of tile 2, nothing between
              260: [511, 513, 590]}  # lowest copy in tile 1: its tile's last code and two in tile 2
    for low, copies in groups.items():
        codebook[copies] = codebook[low].clone()
    copies = [c for low, cs in groups.items() for c in [low, *cs]]  # 11 codes, each group's lowest first
    lowest = [low for low, cs in groups.items() for _ in [low, *cs]]
    x = torch.randn(131, d, generator=g)
    on_code = [0, 5, 63, 64, 70, 100, 127, 128, 129, 130, 2]  # rows in all three row blocks
    off_code = [66, 90, 117]
    x[on_code] = codebook[copies]
    # just off a copy: the same non-zero distance to every copy, still nearer than any other code
    x[off_code] = codebook[[600, 512, 590]] + 1e-5
    idx, dist = _assign(x, codebook, backend, return_distance=True, method=method)
    assert idx[on_code].tolist() == lowest and (dist[on_code] == 0).all()
    assert idx[off_code].tolist() == [7, 255, 260]
    assert torch.equal(idx, vq_assign_reference(x, codebook))
    if backend == "cpp" and method == "brute":  # the op's contract: a row holding NaN gets index 0, distance inf
        nan_idx, nan_dist = torch.ops.nfkernels.vq_assign(torch.full((3, d), float("nan")), codebook)
        assert nan_idx.tolist() == [0, 0, 0] and (nan_dist == float("inf")).all()


@pytest.mark.parametrize("d", [1, 8, 16])
def test_triton_default_tiles_do_not_spill_on_sm90(d):
    """The default tiles compile for an H100 without register spills (ptxas via triton.compile, no GPU)."""
    if not _ext.HAS_TRITON:
        pytest.skip("triton not available")
    from benchmarks._ptxas import has_tools

    if not has_tools():
        pytest.skip("this Triton ships no ptxas/cuobjdump")
    from benchmarks.ptxas_vq import resource_usage
    from nfkernels.vq_triton import default_tiles

    use = resource_usage(d, *default_tiles(d, 4096), arch=90)
    assert use["stack_bytes"] == 0 and 0 < use["registers"] <= 255, use


@pytest.mark.parametrize("d", [1, 4, 8, 16])
def test_triton_inner_loop_is_arithmetic_on_sm90(d):
    """The codebook-tile loop compiled for an H100 holds the distance arithmetic and little else: no shuffles or
    barriers (a reduction across threads per tile, which made the first kernel slow at d = 4-8), no spills, and
    at most 1.5x the 2d + 3 instructions a distance needs."""
    if not _ext.HAS_TRITON:
        pytest.skip("triton not available")
    from benchmarks._ptxas import has_tools

    if not has_tools():
        pytest.skip("this Triton ships no ptxas/cuobjdump")
    from benchmarks.ptxas_vq import inner_loop
    from nfkernels.vq_triton import default_tiles

    loop = inner_loop(d, *default_tiles(d, 4096), arch=90)
    assert not {"SHFL", "BAR", "LDL", "STL"} & set(loop["ops"]), loop["ops"]
    assert loop["ops"].get("FFMA", 0) + loop["ops"].get("FMUL", 0) >= d  # the loop found is the distance loop
    assert loop["per_distance"] <= 1.5 * (2 * d + 3), loop


@pytest.mark.parametrize("d", [1, 4])
def test_real_mnist_pixels(data_root, d):
    # MNIST pixels have huge exact-tie populations (zeros, 1.0) and a codebook drawn from the data holds
    # duplicates: every engine must agree with the reference exactly, not just within tolerance.
    from nfgen.data import load_split

    pixels = load_split("mnist:test[:8]", data_root=data_root).images.reshape(-1, d)
    codebook = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))[:97]]
    ref = vq_assign_reference(pixels, codebook)
    for backend, method in ENGINES:
        if _available(backend) and not (method == "sorted" and d != 1):
            rows = pixels if backend != "triton" else pixels[:1500]  # interpreter: keep it small
            assert torch.equal(_assign(rows, codebook, backend, method=method), ref[:len(rows)]), backend


def test_bad_inputs():
    x, codebook = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="d=3"):
        vq_assign(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="empty"):
        vq_assign(x, codebook[:0])
    with pytest.raises(ValueError, match="sorted"):
        vq_assign(x, codebook, method="sorted")
    with pytest.raises(ValueError, match="backend"):
        vq_assign(x, codebook, backend="fortran")
    with pytest.raises(ValueError, match="at least"):
        kmeans(x, 6)


def test_empty_input():
    for backend in ("torch", "cpp", "triton"):
        if _available(backend):
            assert _assign(torch.zeros(0, 2), torch.randn(3, 2), backend).shape == (0,)


@pytest.mark.parametrize("init", ["kmeans++", "sample"])
def test_kmeans_inertia_never_increases(init):
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(400, 2, generator=g) * 0.1 + torch.randn(1, 2, generator=g) * 3 for _ in range(6)])
    codebook, history = kmeans(x, 16, iters=25, init=init, seed=1, tol=0.0)
    assert 3 <= len(history) <= 26  # stops early only once an iteration improves nothing
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0]
    # the returned codebook is the one whose error was recorded last
    final = vq_assign(x, codebook, return_distance=True)[1].double().mean().item()
    assert final == pytest.approx(history[-1], rel=1e-9)


def kmeanspp_reference(x, k, g):
    """k-means++ written plainly: a fresh tensor for every step."""
    M = x.shape[0]
    codes = [x[torch.randint(M, (1,), generator=g)]]
    d2 = (x - codes[0]).pow(2).sum(1)
    for _ in range(1, k):
        cdf = d2.double().cumsum(0)
        j = torch.searchsorted(cdf, torch.rand(1, generator=g, dtype=torch.float64) * cdf[-1], right=True)
        codes.append(x[j.clamp_(max=M - 1)])
        d2 = torch.minimum(d2, (x - codes[-1]).pow(2).sum(1))
    return torch.cat(codes)


@pytest.mark.parametrize("M,d,k", [(1, 1, 1), (77, 3, 77), (5001, 4, 37), (100_003, 1, 256), (2999, 8, 5)])
def test_kmeanspp_init_draws_what_the_plain_recipe_draws(M, d, k):
    # the init reuses its buffers step to step (no fresh [M] temporaries); the draws must not change
    x = torch.randn(M, d, generator=torch.Generator().manual_seed(M))
    x[: M // 3] = x[0]  # repeated points: a chosen point's d² is 0, so later draws must skip it
    got = _kmeanspp_init(x, k, torch.Generator().manual_seed(9))
    assert torch.equal(got, kmeanspp_reference(x, k, torch.Generator().manual_seed(9)))
    assert got.shape == (k, d) and got.is_contiguous()


def test_kmeans_seed_determinism_and_backends():
    x = torch.randn(3001, 3, generator=torch.Generator().manual_seed(0))
    a, ha = kmeans(x, 24, iters=8, seed=5)
    b, hb = kmeans(x, 24, iters=8, seed=5)
    c, _ = kmeans(x, 24, iters=8, seed=6)
    assert torch.equal(a, b) and ha == hb
    assert not torch.equal(a, c)
    if _available("cpp"):
        p, hp = kmeans(x, 24, iters=8, seed=5, backend="torch")
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-6)


def test_vectors_wider_than_the_kernels_take_the_torch_path():
    g = torch.Generator().manual_seed(24)
    x, codebook = torch.randn(77, MAX_DIM + 3, generator=g), torch.randn(41, MAX_DIM + 3, generator=g)
    idx, dist = vq_assign(x, codebook, return_distance=True)
    assert torch.equal(idx, vq_assign_reference(x, codebook))
    torch.testing.assert_close(dist, (x - codebook[idx]).pow(2).sum(1), rtol=1e-5, atol=1e-6)
    for backend in ("cpp", "triton"):
        with pytest.raises(ValueError, match=f"d ≤ {MAX_DIM}, got d = {MAX_DIM + 3}"):
            vq_assign(x, codebook, backend=backend)


def test_kmeans_on_a_sample_and_its_callback():
    # tokenize fits on at most TokenizerConfig.sample rows: the codebook comes from that many, seeded
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(500, 2, generator=g) * 0.05 + c for c in (-3.0, 0.0, 3.0)])  # 3 tight clusters
    calls = []
    codes, history = kmeans(x, 3, iters=10, seed=2, sample=60, callback=lambda it, mse: calls.append((it, mse)))
    assert calls == list(enumerate(history))  # one call per assignment, with what history records
    # the fit saw only the 60 rows the seed picks (the history is their error), yet the codebook serves all 1500
    picked = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(2))[:60]]
    assert vq_assign(picked, codes, return_distance=True)[1].double().mean().item() == pytest.approx(history[-1])
    assert vq_assign(x, codes, return_distance=True)[1].double().mean().item() != pytest.approx(history[-1])
    assert torch.allclose(codes.sort(dim=0).values.mean(dim=1), torch.tensor([-3.0, 0.0, 3.0]), atol=0.05)
    again, _ = kmeans(x, 3, iters=10, seed=2, sample=60)
    other, _ = kmeans(x, 3, iters=10, seed=3, sample=60)
    assert torch.equal(codes, again) and not torch.equal(codes, other)  # the sample follows the seed
    with pytest.raises(ValueError, match="needs at least 3 points"):
        kmeans(x, 3, sample=2)


def test_kmeans_reseeds_dead_codes():
    # Half the points sit on one value, so a sampled init picks it several times; the duplicates lose
    # every point to the lowest-index copy and must be moved to where the error is.
    g = torch.Generator().manual_seed(2)
    centers = torch.arange(8, dtype=torch.float32)[:, None] * 10.0
    x = torch.cat([torch.zeros(800, 1), centers.repeat_interleave(100, 0) + 0.01 * torch.randn(800, 1, generator=g)])
    codebook, history = kmeans(x, 8, iters=30, init="sample", seed=0)
    idx = vq_assign(x, codebook)
    assert torch.bincount(idx, minlength=8).min() > 0
    assert len(torch.unique(codebook)) == 8
    assert history[-1] < 0.5 * history[0]
