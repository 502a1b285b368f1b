"""Fit benchmark (issue 3): many SIRENs fitted at once, nfgen's fused kernels against torch peers.

Same fields and recipe for every contender: MNIST 28×28 (test images, repeated when N > 10k; random
images when MNIST is absent), 2→32→32→1 SIREN, ω0 = 30, shared init, Adam lr 1e-4, loss = sum over fields
of each field's MSE. Contenders:
  baddbmm           stacked torch.baddbmm layers + torch.optim.Adam (foreach)
  vmap              torch.func.stack_module_state + vmap(functional_call) + torch.optim.Adam
  *+compile         the same forward/backward under torch.compile (skipped with a note if it fails)
  nfgen[backend]    nfkernels.siren_fit_steps (fused forward + MSE + backward + Adam, several steps per call)
  one-at-a-time     NeF-GPT's way: each field its own nn.Module and torch.optim.Adam, fitted on its own, timed
                    on the first 16 fields (a field's rate does not depend on N); not one of issue 3's peers,
                    so its ratio is printed beside the best peer's instead of competing with them
Prints field-steps/s (median over repeats), the ratio to the best peer, and achieved GFLOP/s as a
fraction of the FP32 FMA peak (matmul FLOPs only: 2·C·(2·Σ fan_in·fan_out + Σ_{l>0} fan_in·fan_out)).

    python -m benchmarks.bench_fit [--device cuda] [--quick] [--out benchmarks/results/fit-<device>.json]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from benchmarks._env import environment, write_result
from nfkernels.siren import (
    SirenSpec,
    coord_grid,
    siren_fit_steps,
    siren_forward_reference,
    siren_init,
)

LR = 1e-4
ONE_AT_A_TIME = "one-at-a-time"
# FP32 non-tensor-core FMA peak, FLOP/s (vendor figures, SXM parts)
GPU_FP32_PEAK = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}


# ---------------------------------------------------------------------------------------------------------------
# Problem and cost model


def make_problem(n: int, device: torch.device, spec: SirenSpec, seed: int = 0):
    images = None
    try:
        from nfgen.data import load_split

        images = load_split("mnist:test").images  # [10000, 28, 28]
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs, on random images
        print(f"note: MNIST not loaded ({str(exc).splitlines()[0]}); using random images", file=sys.stderr)
    if images is None:
        images = torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(seed))
    idx = torch.arange(n) % images.shape[0]
    target = images[idx].reshape(n, -1, 1).to(device)
    coords = coord_grid((28, 28), device=device)
    template = siren_init(spec, 1, generator=torch.Generator().manual_seed(seed)).to(device)
    return coords, target, template


def flops_per_field_step(spec: SirenSpec, pixels: int) -> float:
    macs = [fi * fo for fi, fo in spec.layer_dims]
    return 2.0 * pixels * (2 * sum(macs) + sum(macs[1:]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Contenders: each returns run(steps) that performs `steps` fit steps on all fields


def adam_runner(loss_fn, opt, compile_):
    """run(steps): forward + backward of `loss_fn` (compiled if asked) and `opt.step()`, `steps` times."""
    def fwd_bwd():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        return loss

    step_fn = torch.compile(fwd_bwd) if compile_ else fwd_bwd

    def run(steps):
        for _ in range(steps):
            step_fn()
            opt.step()

    return run


def peer_baddbmm(spec, coords, target, template, compile_=False):
    n = target.shape[0]
    layers = [(w.clone().requires_grad_(True), b.clone().requires_grad_(True))
              for w, b in spec.unflatten(template.expand(n, -1).contiguous())]
    opt = torch.optim.Adam([t for wb in layers for t in wb], lr=LR)
    x = coords.unsqueeze(0).expand(n, -1, -1)

    def loss_fn():
        h = x
        for li, (w, b) in enumerate(layers):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if li < len(layers) - 1:
                h = torch.sin(spec.omega0 * h)
        return (h - target).pow(2).mean(dim=(1, 2)).sum()

    run = adam_runner(loss_fn, opt, compile_)
    run.weights = lambda: flat_weights([t for wb in layers for t in wb])
    return run


def flat_weights(tensors) -> torch.Tensor:
    """Per-field tensors [N, ...] in nfkernels' order → [N, P], to check that every contender fits alike."""
    return torch.cat([t.detach().reshape(t.shape[0], -1) for t in tensors], dim=1)


def siren_module(spec: SirenSpec, flat: torch.Tensor) -> torch.nn.Sequential:
    """One SIREN as a plain nn.Module holding the weights `flat` [P] (nfkernels' flattening order)."""
    mods = []
    for li, (fi, fo) in enumerate(spec.layer_dims):
        mods.append(torch.nn.Linear(fi, fo))
        if li < len(spec.layer_dims) - 1:
            mods.append(Sine(spec.omega0))
    m = torch.nn.Sequential(*mods).to(flat.device)
    torch.nn.utils.vector_to_parameters(flat, m.parameters())
    return m


def peer_vmap(spec, coords, target, template, compile_=False):
    from torch.func import functional_call, stack_module_state, vmap

    n = target.shape[0]
    base = siren_module(spec, template[0]).to("meta")
    params, buffers = stack_module_state([siren_module(spec, template[0]) for _ in range(min(n, 2))])
    # Stacking n modules is what stack_module_state is for; for large n build the same stacked
    # tensors directly (identical layout, shared init) instead of creating n modules.
    params = {k: v[:1].detach().expand(n, *v.shape[1:]).clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=LR)

    def one(p, y):
        out = functional_call(base, (p, buffers), (coords,))
        return (out - y).pow(2).mean()

    batched = vmap(one, in_dims=(0, 0))
    run = adam_runner(lambda: batched(params, target).sum(), opt, compile_)
    run.weights = lambda: flat_weights(params.values())
    return run


def one_at_a_time(spec, coords, target, template, fields=16):
    """NeF-GPT's way: a module and an Adam per field, each fitted on its own (`fields` of them; run.fields says)."""
    k = min(fields, target.shape[0])
    mods = [siren_module(spec, template[0].clone()) for _ in range(k)]
    opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in mods]

    def run(steps):
        for m, opt, y in zip(mods, opts, target[:k]):
            for _ in range(steps):
                opt.zero_grad(set_to_none=False)
                (m(coords) - y).pow(2).mean().backward()
                opt.step()

    run.fields = k
    run.weights = lambda: torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in mods])
    return run


class Sine(torch.nn.Module):
    def __init__(self, omega0):
        super().__init__()
        self.omega0 = omega0

    def forward(self, x):
        return torch.sin(self.omega0 * x)


def nfgen_fit(spec, coords, target, template, backend="auto", steps_per_call=10, **triton_opts):
    """nfgen's fused fit; `triton_opts` (kernel, dot_precision, block_c, num_warps, programs_per_sm) go straight
    to the Triton launcher, past the dispatcher."""
    n = target.shape[0]
    params = template.expand(n, -1).contiguous()
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    state = {"step": 0}

    def run(steps):
        done = 0
        while done < steps:
            k = min(steps_per_call, steps - done)
            if triton_opts:
                from nfkernels import siren_triton

                siren_triton.siren_fit_steps(params, m, v, state["step"], coords, target, spec, lr=LR,
                                             betas=(0.9, 0.999), eps=1e-8, n_steps=k, active=None, **triton_opts)
            else:
                siren_fit_steps(params, m, v, state["step"], coords, target, spec, lr=LR, n_steps=k, backend=backend)
            state["step"] += k
            done += k

    run.params = params
    run.weights = lambda: params
    return run


def sweep_triton(spec, device, n=10000, steps=20, repeats=3, which="all"):
    """Field-steps/s of the Triton fit kernels over launch configurations (which: "launch", "variants" or "all"),
    best first (to choose defaults by)."""
    coords, target, template = make_problem(n, device, spec)
    rows = []
    default = dict(kernel="regs", dot_precision="tf32", block_c=16, num_warps=4, programs_per_sm=8)
    configs = []
    if which in ("launch", "all"):
        configs += [dict(kernel="scratch", dot_precision="ieee", block_c=64, num_warps=4, programs_per_sm=8)]
        configs += [dict(kernel="regs", dot_precision=p, block_c=bc, num_warps=w, programs_per_sm=g)
                    for p in ("ieee", "tf32") for bc in (16, 32, 64) for w in (4, 8) for g in (2, 4, 8, 16)]
    if which in ("variants", "all"):
        # The regs kernel's code variants (benchmarks.ptxas_siren counts what each saves): the default launch
        # without and with each change alone, then all three over the launches their registers make plausible.
        fast = dict(sincos="mufu", defer_sums=True, moments="memory")
        configs += [{**default, **v} for v in ({}, dict(sincos="mufu"), dict(defer_sums=True),
                                               dict(moments="memory"), dict(sincos="mufu", defer_sums=True))]
        configs += [dict(kernel="regs", dot_precision="tf32", block_c=bc, num_warps=w, programs_per_sm=g, **fast)
                    for bc in (16, 32) for w in (2, 4) for g in (4, 8, 16)]
        configs += [dict(kernel="regs", dot_precision="ieee", block_c=bc, num_warps=4, programs_per_sm=8, **fast)
                    for bc in (32, 64)]
    for cfg in configs:
        row = {"n_fields": n, "steps": steps, **cfg}
        try:
            fit = lambda: nfgen_fit(spec, coords, target, template, steps_per_call=steps, **cfg)  # noqa: E731
            sec, _, _ = time_contender(fit, device, steps, repeats)
            row["field_steps_per_s"] = n / sec
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is reported
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
        print("  sweep", " ".join(f"{k}={v}" for k, v in cfg.items()),
              f"{row['field_steps_per_s']:,.0f} field-steps/s" if "field_steps_per_s" in row else row["error"],
              flush=True)
    return sorted(rows, key=lambda r: -r.get("field_steps_per_s", 0))


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_contender(make, device, steps, repeats, warmup_steps=1):
    """(median seconds per step over `repeats` timed rounds of `steps` steps after a warm-up round, setup seconds,
    fields stepped: the runner's `fields`, None for all)."""
    t0 = time.perf_counter()
    run = make()
    run(warmup_steps)
    sync(device)
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        run(steps)
        sync(device)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times), setup_s, getattr(run, "fields", None)


def cpu_peak_flops() -> tuple[float, str]:
    """Nominal FP32 FMA peak of this CPU: cores × GHz × 2 FMA pipes × 8 lanes (AVX2) × 2."""
    ghz = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                ghz = float(line.split(":")[1]) / 1e3
                break
    except OSError:
        pass
    cores = torch.get_num_threads()
    ghz = ghz or 2.5
    return cores * ghz * 1e9 * 2 * 8 * 2, f"nominal: {cores} threads × {ghz:.2f} GHz × 32 FLOP/cycle (AVX2, 2 FMA)"


def measured_sgemm_flops(device) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    reps = 20 if device.type == "cuda" else 5
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small N, fewer repeats, no torch.compile")
    ap.add_argument("--n", type=int, nargs="*", help="field counts (default: 1000 on CPU; 1000 10000 60000 on CUDA)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", help="write every row and the environment as JSON")
    ap.add_argument("--sweep", nargs="?", const="all", choices=("launch", "variants", "all"),
                    help="CUDA: also time the Triton kernels' launch configurations, the regs kernel's code variants, "
                         "or both (the default)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA GPU is available")
    on_gpu = device.type == "cuda"
    spec = SirenSpec()
    sizes = args.n or ([1000, 10000, 60000] if on_gpu else [1000])
    if args.quick:
        sizes = [min(s, 256) for s in sizes[:1]] if not args.n else sizes
    steps, repeats = (20, 5) if on_gpu else ((2, 2) if args.quick else (3, 3))
    use_compile = not (args.quick or args.no_compile)
    pixels = 28 * 28
    flop = flops_per_field_step(spec, pixels)
    if on_gpu:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_FP32_PEAK.items() if k in name), None)
        peak_note = f"{name} FP32 non-tensor peak {peak / 1e12:.0f} TFLOP/s" if peak else "unknown GPU peak"
        device_name = name
    else:
        peak, peak_note = cpu_peak_flops()
        device_name = platform.processor() or platform.machine()
        try:
            device_name = next(l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    sgemm = measured_sgemm_flops(device)
    print(f"device: {device_name} ({device}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"FP32 peak: {peak_note}; measured torch sgemm {sgemm / 1e9:.1f} GFLOP/s; {flop / 1e6:.2f} MFLOP/field-step")

    sweep = sweep_triton(spec, device, which=args.sweep) if on_gpu and args.sweep else []
    best = {k: v for k, v in sweep[0].items() if k in ("kernel", "dot_precision", "block_c", "num_warps",
                                                       "programs_per_sm", "sincos", "defer_sums", "moments")} \
        if sweep else None
    nfgen_variants = [("nfgen[triton]", {}), ("nfgen[triton,regs]", {"kernel": "regs"}),
                      ("nfgen[triton,regs,tf32]", {"kernel": "regs", "dot_precision": "tf32"}),
                      ("nfgen[triton,regs,tf32,mufu+defer+memory]",
                       {"kernel": "regs", "dot_precision": "tf32", "sincos": "mufu", "defer_sums": True,
                        "moments": "memory"})] if on_gpu else [("nfgen[cpp]", {})]
    if best:
        nfgen_variants.append(("nfgen[triton,best-of-sweep]", best))
    rows = []
    for n in sizes:
        coords, target, template = make_problem(n, device, spec)
        contenders = [("baddbmm", lambda: peer_baddbmm(spec, coords, target, template)),
                      ("vmap", lambda: peer_vmap(spec, coords, target, template)),
                      (ONE_AT_A_TIME, lambda: one_at_a_time(spec, coords, target, template))]
        if use_compile:
            contenders += [("baddbmm+compile", lambda: peer_baddbmm(spec, coords, target, template, compile_=True)),
                           ("vmap+compile", lambda: peer_vmap(spec, coords, target, template, compile_=True))]
        for label, opts in nfgen_variants:
            backend = "triton" if on_gpu else "cpp"
            contenders.append((label, lambda b=backend, o=opts: nfgen_fit(spec, coords, target, template, backend=b, **o)))
        for name, make in contenders:
            row = {"contender": name, "n_fields": n, "pixels": pixels, "arch": "2-32-32-1", "steps": steps,
                   "repeats": repeats}
            try:
                sec, setup_s, fields = time_contender(make, device, steps, repeats)
                fps = (fields or n) / sec
                if fields:
                    row["fields_timed"] = fields
                row.update(ms_per_step=sec * 1e3, field_steps_per_s=fps, setup_s=setup_s,
                           gflops=fps * flop / 1e9, frac_peak=fps * flop / peak if peak else None,
                           frac_sgemm=fps * flop / sgemm)
            except Exception as exc:  # noqa: BLE001 - a peer that fails (OOM, compile error) is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if on_gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
            _print_row(row)
        here = {r["contender"]: r for r in rows if r["n_fields"] == n and "field_steps_per_s" in r}
        best_peer = max((r["field_steps_per_s"] for name, r in here.items()
                         if not name.startswith("nfgen") and name != ONE_AT_A_TIME), default=None)
        alone = here.get(ONE_AT_A_TIME, {}).get("field_steps_per_s")
        for r in here.values():
            if best_peer:
                r["ratio_vs_best_peer"] = r["field_steps_per_s"] / best_peer
            if alone:
                r["ratio_vs_one_at_a_time"] = r["field_steps_per_s"] / alone
        for name, r in here.items():
            if name.startswith("nfgen") and "ratio_vs_best_peer" in r:
                beside = f", / one at a time: {r['ratio_vs_one_at_a_time']:.1f}x" if alone else ""
                print(f"  {name} / best peer at N={n}: {r['ratio_vs_best_peer']:.2f}x{beside}")

    if on_gpu and not args.quick:  # the headline: 60k fields × 500 steps, wall time and fitted PSNR per variant
        coords, target, template = make_problem(60000, device, spec)
        for label, opts in nfgen_variants:
            nfgen_fit(spec, coords, target, template, backend="triton", steps_per_call=50, **opts)(1)  # compile
            run = nfgen_fit(spec, coords, target, template, backend="triton", steps_per_call=50, **opts)
            sync(device)
            t = time.perf_counter()
            run(500)
            sync(device)
            wall = time.perf_counter() - t
            psnr = _psnr(run.params, coords, target, spec)
            rows.append({"contender": f"{label} 60k x 500 steps", "n_fields": 60000, "steps": 500, "wall_s": wall,
                         "mean_psnr_db": psnr, **opts})
            print(f"{label}: 60,000 fields × 500 steps in {wall:.2f} s (mean PSNR {psnr:.2f} dB)")

    if args.out:
        write_result(args.out, {**environment("benchmarks.bench_fit", device),
                                "threads": torch.get_num_threads(), "fp32_peak_flops": peak, "peak_note": peak_note,
                               "measured_sgemm_flops": sgemm, "flop_per_field_step": flop, "rows": rows,
                                "sweep": sweep})
    return rows


def _print_row(r):
    if "error" in r:
        print(f"{r['contender']:>18} N={r['n_fields']:>6}: skipped ({r['error']})")
        return
    frac = f"{100 * r['frac_peak']:.1f}% of peak" if r.get("frac_peak") else ""
    print(f"{r['contender']:>18} N={r['n_fields']:>6}: {r['field_steps_per_s']:>12,.0f} field-steps/s "
          f"{r['ms_per_step']:>9.1f} ms/step {r['gflops']:>8.1f} GFLOP/s {frac} (setup {r['setup_s']:.1f} s)")


def _psnr(params, coords, target, spec, chunk=4096):
    vals = []
    with torch.no_grad():
        for i in range(0, params.shape[0], chunk):
            pred = siren_forward_reference(params[i:i + chunk], coords, spec).clamp(0, 1)
            mse = (pred - target[i:i + chunk]).pow(2).mean(dim=(1, 2))
            vals.append(10 * torch.log10(1 / mse))
    return torch.cat(vals).mean().item()


def _bench_small(benchmark, make):
    spec = SirenSpec()
    coords, target, template = make_problem(64, torch.device("cpu"), spec)
    benchmark(make(spec, coords, target, template), 5)


def test_bench_nfgen_fit_small(benchmark):
    _bench_small(benchmark, nfgen_fit)


def test_bench_baddbmm_fit_small(benchmark):
    _bench_small(benchmark, peer_baddbmm)


if __name__ == "__main__":
    main()
