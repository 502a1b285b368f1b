"""Batched SIREN ops: the reference against per-field nn.Linear modules, and every fast backend against the
reference (forward, gradients, fused Adam steps) on random odd shapes and on real MNIST.

Tolerances (float32 throughout): forward |Δ| ≤ 1e-5 (outputs are O(1); the kernels' sin/cos polynomial is
~1e-7 accurate); gradients |Δ| ≤ 1e-4 · max|grad|; after fused Adam steps parameters |Δ| ≤ 2e-5 at lr 1e-3
(Adam normalises updates, so float rounding in near-zero gradients moves a weight by at most ~lr; measured
≤ 6e-6), first moments |Δ| ≤ 1e-4·|m| + 5e-5·max|m| (measured ≤ 9e-6·max|m|), second moments
|Δ| ≤ 5e-5·|v| + 5e-6·max|v| (the C++ op's v runs ~1.3e-5 relative low: it takes 1 - β2 in float32;
beyond that ≤ 1e-6·max|v|), and the per-field losses relative |Δ| ≤ 1e-4. Triton kernels run through
TRITON_INTERPRET=1 at small sizes: every shape below, with fewer fields and pixels where it is large.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfkernels import _ext
from nfkernels.siren import (SirenSpec, coord_grid, siren_fit_steps, siren_fit_steps_reference, siren_forward,
                             siren_forward_reference, siren_init)

_TRITON_RUNS = _ext.HAS_TRITON and (torch.cuda.is_available() or _ext.triton_interpret())
FAST = [b for b, ok in (("cpp", _ext.has_op("siren_forward")), ("triton", _TRITON_RUNS)) if ok]

# (in_dim, hidden, sine layers, out_dim, N, pixels): odd N and pixel counts, not multiples of any tile. The C++
# weight gradient of a hidden×hidden layer works in blocks of 4 outputs (kOB): the last four shapes' widths 18, 37,
# 23 and 127 leave partial blocks of 2, 1, 3 and 3 rows (33 pixels: one past the C++ pixel tile). Not every
# random problem is well conditioned enough for these tolerances: with ω0 = 30 a few instances (e.g. hidden 23
# with N = 7, 33 pixels, or hidden 43) have near-zero gradients whose float32 rounding moves a weight by ~1e-4,
# the float32 reference as much as the kernels (against float64); these are ones that are not.
SHAPES = [(2, 32, 2, 1, 7, 13), (3, 48, 3, 3, 5, 70), (2, 16, 1, 2, 3, 1), (2, 32, 2, 1, 33, 784),
          (1, 20, 2, 1, 2, 40), (3, 16, 4, 3, 3, 29), (3, 48, 2, 3, 2, 19), (2, 128, 4, 3, 3, 50),
          (3, 18, 2, 2, 5, 23), (1, 37, 3, 3, 3, 45), (2, 23, 2, 1, 5, 33), (1, 127, 2, 3, 3, 41)]


def _sized_for(backend, shape):
    """The shape a backend runs: the interpreter is slow, so on CPU Triton takes each large shape's widths, depth
    and in/out dims with N ≤ 3 fields (≤ 2 wider than 64) and 21 pixels (odd, within one pixel tile)."""
    ind, h, layers, out, n, c = shape
    if backend != "triton" or torch.cuda.is_available() or n * c <= 120:
        return shape
    return ind, h, layers, out, min(n, 2 if h > 64 else 3), min(c, 21)


def _device_for(backend):
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


def _problem(shape, device, seed=0):
    ind, h, layers, out, n, c = shape
    spec = SirenSpec(ind, h, layers, out)
    g = torch.Generator().manual_seed(seed)
    params = siren_init(spec, n, generator=g)
    coords = torch.rand(c, ind, generator=g) * 2 - 1
    target = torch.rand(n, c, out, generator=g)
    return spec, params.to(device), coords.to(device), target.to(device)


def test_reference_matches_per_field_linear_modules():
    spec = SirenSpec(in_dim=3, hidden=24, hidden_layers=3, out_dim=2, omega0=30.0)
    params = siren_init(spec, 5, generator=torch.Generator().manual_seed(1))
    coords = torch.rand(17, 3) * 2 - 1
    got = siren_forward_reference(params, coords, spec)
    for i in range(params.shape[0]):
        layers = [torch.nn.Linear(fi, fo) for fi, fo in spec.layer_dims]
        torch.nn.utils.vector_to_parameters(params[i], [t for lin in layers for t in (lin.weight, lin.bias)])
        h = coords
        with torch.no_grad():
            for li, lin in enumerate(layers):
                h = lin(h)
                if li < len(layers) - 1:
                    h = torch.sin(spec.omega0 * h)
        torch.testing.assert_close(got[i], h, rtol=0, atol=1e-6)


def test_fit_reference_matches_torch_optim_adam():
    spec = SirenSpec(hidden=16)
    params = siren_init(spec, 4, generator=torch.Generator().manual_seed(2))
    coords, target = coord_grid((5, 6)), torch.rand(4, 30, 1)
    p_ref, m, v = params.clone(), torch.zeros_like(params), torch.zeros_like(params)
    siren_fit_steps_reference(p_ref, m, v, 0, coords, target, spec, lr=1e-3, n_steps=4)
    p = params.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        (siren_forward_reference(p, coords, spec) - target).pow(2).mean(dim=(1, 2)).sum().backward()
        opt.step()
    torch.testing.assert_close(p_ref, p.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradient_match_reference(backend, shape):
    spec, params, coords, _ = _problem(_sized_for(backend, shape), _device_for(backend))
    ref_p = params.clone().requires_grad_(True)
    fast_p = params.clone().requires_grad_(True)
    ref = siren_forward_reference(ref_p, coords, spec)
    got = siren_forward(fast_p, coords, spec, backend=backend)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(ref.device)
    (g_ref,) = torch.autograd.grad(ref, ref_p, grad_out)
    (g_got,) = torch.autograd.grad(got, fast_p, grad_out)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-4 * g_ref.abs().max().item())


def _assert_adam_state_close(got, want, p_atol=2e-5):
    """(params, m, v) after fused Adam steps against the reference's, each to its own scale (module docstring)."""
    (p, m, v), (p_ref, m_ref, v_ref) = got, want
    torch.testing.assert_close(p, p_ref, rtol=0, atol=p_atol)
    torch.testing.assert_close(m, m_ref, rtol=1e-4, atol=5e-5 * m_ref.abs().max().item())
    torch.testing.assert_close(v, v_ref, rtol=5e-5, atol=5e-6 * v_ref.abs().max().item())


def _fit_both(backend, spec, params, coords, target, n_steps, active=None, step=0, lr=1e-3):
    ref = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
    fast = [t.clone() for t in ref]
    loss_ref = siren_fit_steps_reference(*ref, step, coords, target, spec, lr=lr, n_steps=n_steps, active=active)
    loss = siren_fit_steps(*fast, step, coords, target, spec, lr=lr, n_steps=n_steps, active=active, backend=backend)
    return ref, fast, loss_ref, loss


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_adam_steps_match_reference(backend, shape):
    spec, params, coords, target = _problem(_sized_for(backend, shape), _device_for(backend), seed=4)
    n = params.shape[0]
    active = (torch.arange(n) % 3 != 1).to(params.device)  # some fields stopped early
    ref, fast, loss_ref, loss = _fit_both(backend, spec, params, coords, target, n_steps=3, active=active, step=2)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-7)
    _assert_adam_state_close(fast, ref)
    frozen = ~active
    assert torch.equal(fast[0][frozen], params[frozen]) and not fast[1][frozen].any()
    assert (fast[0][active] != params[active]).any()


@pytest.mark.skipif(not _TRITON_RUNS, reason="Triton cannot run here")
@pytest.mark.parametrize("kernel,block_c,shape,variant", [
    ("regs", 16, (3, 24, 2, 3, 5, 21), {}), ("regs", 64, (3, 24, 2, 3, 5, 21), {}),
    ("regs", 16, (2, 16, 1, 2, 5, 37), {}), ("scratch", 32, (3, 24, 2, 3, 5, 21), {}),
    # the regs kernel's variants: one output (its output-layer sums deferred too), three, one sine layer, 4-D input
    ("regs", 16, (2, 32, 2, 1, 5, 37), {"defer_sums": True, "moments": "memory"}),
    ("regs", 16, (3, 24, 2, 3, 5, 21), {"defer_sums": True}),
    ("regs", 32, (4, 16, 1, 2, 5, 37), {"defer_sums": True, "moments": "memory"}),
    ("regs", 64, (2, 16, 2, 1, 3, 21), {"moments": "memory"})], ids=str)
def test_triton_fit_kernels_match_reference(kernel, block_c, shape, variant):
    # Shapes both Triton kernels take, with pixel tiles that do not divide the pixel count, inactive fields and a
    # nonzero step count.
    from nfkernels import siren_triton

    spec, params, coords, target = _problem(shape, _device_for("triton"), seed=9)
    active = torch.tensor([True, False, True, True, False], device=params.device)[:params.shape[0]]
    ref = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
    fast = [t.clone() for t in ref]
    loss_ref = siren_fit_steps_reference(*ref, 3, coords, target, spec, lr=1e-3, n_steps=3, active=active)
    loss = siren_triton.siren_fit_steps(*fast, 3, coords, target, spec, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                        n_steps=3, active=active, kernel=kernel, block_c=block_c, **variant)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-7)
    _assert_adam_state_close(fast, ref)
    assert torch.equal(fast[0][~active], params[~active])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="many warps per field need a GPU")
@pytest.mark.parametrize("kernel,variant", [("regs", {}), ("scratch", {}),
                                            ("regs", {"sincos": "mufu", "defer_sums": True, "moments": "memory"}),
                                            ("regs", {"sincos": "mufu"})], ids=str)
@pytest.mark.parametrize("shape", [(2, 32, 2, 1, 67, 784), (2, 64, 1, 1, 13, 1024), (3, 48, 2, 3, 9, 4096)], ids=str)
def test_triton_fit_kernels_match_reference_at_full_size(kernel, variant, shape):
    # The launch the fit uses (default tile and warps, 25 steps a call) at MNIST and larger sizes. Two regs
    # kernels passed the interpreter and failed here: one read back what another warp wrote without a barrier
    # (parameters off by about one learning rate), one overcounted in a dot Triton made of a broadcast sum (Adam
    # moments 2-64x too large, parameters nearly right: Adam is scale-invariant).
    from nfkernels import siren_triton

    spec, params, coords, target = _problem(shape, torch.device("cuda"), seed=11)
    n = params.shape[0]
    active = (torch.arange(n, device="cuda") % 5 != 2)
    ref = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
    fast = [t.clone() for t in ref]
    loss_ref = siren_fit_steps_reference(*ref, 0, coords, target, spec, lr=1e-3, n_steps=25, active=active)
    loss = siren_triton.siren_fit_steps(*fast, 0, coords, target, spec, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                        n_steps=25, active=active, kernel=kernel, **variant)
    # sin.approx / cos.approx ("mufu") are off by ~4e-7 on [-pi, pi] (more beyond) where the polynomial is off by
    # ~1e-7: emulated on the CPU as ±1e-6 noise on every sine, that moved the parameters by 2e-6 after 25 steps.
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-6)
    # 25 Adam steps of fp32 gradients summed in another order: the parameters and first moments agree to ~1e-5
    # (the racing kernel missed by ~1e-3), the second moments (squared gradients) to their own scale.
    for got, want, atol in zip(fast, ref, (1e-4, 1e-4, 1e-6)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=atol)
    assert torch.equal(fast[0][~active], params[~active])


def test_regs_kernel_dots_have_a_long_reduction_on_sm90():
    """The register kernel compiled for an H100 (no GPU needed) holds no tt.dot with K < 16. Triton compiles a sum
    over a broadcast product into a dot; with K = 1-4 (the output layer) that dot overcounted on the H100 while the
    interpreter was exact. In a subprocess without TRITON_INTERPRET, which cannot compile the kernel's helpers."""
    if not _ext.HAS_TRITON:
        pytest.skip("triton not available")
    from benchmarks._ptxas import has_tools

    if not has_tools():
        pytest.skip("this Triton ships no ptxas/cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.ptxas_siren", "--json"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    reports = result["specs"]
    assert len(reports) == 5 and any(r["dots_mkn"] for r in reports)  # the two-layer specs keep their hidden dots
    for r in reports + result["pixel_tile_loops"]:
        assert all(k >= 16 for _, k, _ in r["dots_mkn"]), r
    # The code variants do what they are for: with tf32 dots the MUFU sines replace the polynomial (its FRND
    # range reduction) and cut the loop by a third, deferring the sums takes out the cross-warp reductions'
    # shuffles and barriers, and moving the Adam moments to memory frees registers.
    tf32 = {r["variant"]: r for r in result["pixel_tile_loops"] if r["precision"] == "tf32"}
    poly, mufu, defer, fast = tf32["poly"], tf32["mufu"], tf32["mufu+defer"], tf32["mufu+defer+memory"]
    assert poly["tile_ops"].get("FRND", 0) > 0 and "MUFU" not in poly["tile_ops"]
    assert mufu["tile_ops"].get("MUFU", 0) > 0 and "FRND" not in mufu["tile_ops"]
    assert mufu["tile_instructions"] < 0.75 * poly["tile_instructions"]
    assert defer["tile_ops"].get("SHFL", 0) < mufu["tile_ops"].get("SHFL", 0)
    assert defer["tile_ops"].get("BAR", 0) < mufu["tile_ops"].get("BAR", 0)
    assert fast["registers"] < min(defer["registers"], poly["registers"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tensor-core dots need a GPU")
def test_triton_fit_tf32_stays_close_to_fp32():
    spec, params, coords, target = _problem((2, 32, 2, 1, 64, 784), torch.device("cuda"), seed=10)
    losses = {}
    for precision in ("ieee", "tf32", "tf32x3"):
        state = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
        losses[precision] = siren_fit_steps(*state, 0, coords, target, spec, lr=1e-3, n_steps=50, backend="triton",
                                            dot_precision=precision)
    # After 50 steps the tf32 rounding (~1e-3 relative per product) has moved each field's loss by a few percent
    # at most; tf32x3 recovers fp32 to ~1e-5.
    torch.testing.assert_close(losses["tf32"], losses["ieee"], rtol=5e-2, atol=1e-5)
    torch.testing.assert_close(losses["tf32x3"], losses["ieee"], rtol=1e-3, atol=1e-6)


@pytest.mark.skipif(not _ext.HAS_TRITON, reason="no Triton")
def test_triton_fit_options_are_checked():
    from nfkernels import siren_triton

    spec, params, coords, target = _problem((2, 16, 3, 1, 2, 5), torch.device("cpu"), seed=11)
    state = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, n_steps=1, active=None)
    with pytest.raises(ValueError, match="dot_precision"):
        siren_triton.siren_fit_steps(*state, 0, coords, target, spec, dot_precision="fp16", **kw)
    with pytest.raises(ValueError, match="does not take"):  # three sine layers: only the scratch kernel
        siren_triton.siren_fit_steps(*state, 0, coords, target, spec, kernel="regs", **kw)
    with pytest.raises(ValueError, match="sincos must be"):
        siren_triton.siren_fit_steps(*state, 0, coords, target, spec, sincos="sin", **kw)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        siren_triton.siren_fit_steps(*state, 0, coords, target, spec, sincos="mufu", **kw)
    with pytest.raises(ValueError, match="options of the regs kernel"):  # auto picks scratch for three layers
        siren_triton.siren_fit_steps(*state, 0, coords, target, spec, moments="memory", **kw)


@pytest.mark.parametrize("backend", FAST)
def test_fused_fit_accepts_broadcast_target_and_strided_state(backend):
    spec, params, coords, target = _problem((2, 16, 2, 1, 3, 11), _device_for(backend), seed=5)
    target = target[:1].expand(3, -1, -1)  # one image for every field, not contiguous
    state = [torch.zeros(params.shape[1], params.shape[0], device=params.device).t() for _ in range(3)]
    state[0].copy_(params)  # column-major [N, P]: the wrapper must write back into it
    ref = [params.clone(), torch.zeros_like(params), torch.zeros_like(params)]
    loss_ref = siren_fit_steps_reference(*ref, 0, coords, target, spec, lr=1e-3, n_steps=2)
    loss = siren_fit_steps(*state, 0, coords, target, spec, lr=1e-3, n_steps=2, backend=backend)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(state[0], ref[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], (1, 37, 3, 3, 3, 45)], ids=str)
def test_cpp_baseline_isa_copy_matches_reference(shape, monkeypatch):
    # The op carries an AVX2+FMA copy and a baseline (x86-64-v2) copy of its loops; force the baseline one.
    if "cpp" not in FAST:
        pytest.skip("nfkernels._C not built")
    monkeypatch.setenv("NFKERNELS_NO_AVX2", "1")
    spec, params, coords, target = _problem(shape, torch.device("cpu"), seed=8)
    fast_p, ref_p = params.clone().requires_grad_(True), params.clone().requires_grad_(True)
    got, ref_out = siren_forward(fast_p, coords, spec, backend="cpp"), siren_forward_reference(ref_p, coords, spec)
    torch.testing.assert_close(got, ref_out, rtol=0, atol=1e-5)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(3))
    (g_got,), (g_ref,) = torch.autograd.grad(got, fast_p, grad_out), torch.autograd.grad(ref_out, ref_p, grad_out)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-4 * g_ref.abs().max().item())
    ref, fast, loss_ref, loss = _fit_both("cpp", spec, params, coords, target, n_steps=2)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-7)
    _assert_adam_state_close(fast, ref)


def test_cpp_sincos_is_accurate_for_large_arguments():
    if "cpp" not in FAST:
        pytest.skip("nfkernels._C not built")
    spec = SirenSpec(hidden=32, omega0=3000.0)  # pre-activations ×ω0 reach ~1e3
    params = siren_init(SirenSpec(hidden=32), 4, generator=torch.Generator().manual_seed(6))
    coords = coord_grid((9, 7))
    ref = siren_forward_reference(params.double(), coords.double(), spec)
    got = siren_forward(params, coords, spec, backend="cpp")
    assert (got.double() - ref).abs().max() < 2e-3  # float32 rounding of ω0·z itself is ~1e-4 here


def test_dispatch():
    spec = SirenSpec(hidden=16)
    params = siren_init(spec, 2)
    coords = coord_grid((3, 3))
    out64 = siren_forward(params.double(), coords.double(), spec)  # auto: float64 → torch reference
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown backend"):
        siren_forward(params, coords, spec, backend="fast")
    with pytest.raises(ValueError, match="params must be"):
        siren_forward(params[:, :-1], coords, spec)
    with pytest.raises(ValueError, match="coords must be"):
        siren_forward(params, coords[:, :1], spec)
    if "cpp" in FAST:
        with pytest.raises(ValueError, match="float32"):
            siren_forward(params.double(), coords.double(), spec, backend="cpp")
        assert _ext.resolve_backend("auto", torch.device("cpu"), "siren_fit_steps", cpp=True, cuda=False,
                                    triton=True) == "cpp"
    with pytest.raises(ValueError, match="target must be"):
        siren_fit_steps(params.clone(), torch.zeros_like(params), torch.zeros_like(params), 0, coords,
                        torch.zeros(2, 5, 1), spec, lr=1e-3, backend="cpp" if "cpp" in FAST else "auto")


def _psnr(pred, target):
    mse = (pred.clamp(0, 1) - target).pow(2).mean(dim=(1, 2))
    return 10 * torch.log10(1.0 / mse)


@pytest.fixture(scope="module")
def mnist(data_root):
    data = pytest.importorskip("nfgen.data")
    return data.load_split("mnist:test[:64]", data_root=str(data_root)).images


@pytest.mark.parametrize("backend", FAST)
def test_fit_on_mnist_matches_reference(backend, mnist):
    # The fit recipe's shape: 28×28, 2→32→32→1, shared init, Adam. C++: 32 images × 25 steps;
    # Triton (interpreter): 2 images × 2 steps.
    n, steps = (32, 25) if backend == "cpp" or torch.cuda.is_available() else (2, 2)
    device = _device_for(backend)
    spec = SirenSpec()
    images = mnist[:n].to(device)
    target = images.reshape(n, -1, 1)
    coords = coord_grid((28, 28), device=device)
    template = siren_init(spec, 1, generator=torch.Generator().manual_seed(7)).to(device)
    params = template.expand(n, -1).contiguous()
    ref, fast, loss_ref, loss = _fit_both(backend, spec, params, coords, target, n_steps=steps, lr=1e-4)
    if device.type == "cpu":
        # Measured: losses 2.3e-7 relative apart, parameters 1e-6 (C++, 25 steps; Triton interpreted 6e-8, 3e-8),
        # against up to 2.5e-3 moved; the moments as in the module docstring.
        torch.testing.assert_close(loss, loss_ref, rtol=2e-6, atol=0)
        _assert_adam_state_close(fast, ref, p_atol=1e-5)
    else:  # GPU dots may round differently (tf32 where auto picks it): the fit's own bound, PSNR below, rules
        torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-7)
    psnr_ref = _psnr(siren_forward_reference(ref[0], coords, spec), target)
    psnr = _psnr(siren_forward_reference(fast[0], coords, spec), target)
    assert (psnr.mean() - psnr_ref.mean()).abs() < 0.01  # dB; the issue asks for 0.1
    initial = (siren_forward_reference(params, coords, spec) - target).pow(2).mean()
    assert loss.mean() < initial  # it did fit
    out = siren_forward(fast[0], coords, spec, backend=backend)
    torch.testing.assert_close(out, siren_forward_reference(fast[0], coords, spec), rtol=0, atol=1e-5)
    assert math.isfinite(psnr.mean().item())
