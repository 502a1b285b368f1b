"""Pairwise SSIM benchmark (issue 6): all N x M SSIMs of MNIST images, nfgen against torch peers.

Every contender computes the pinned SSIM (skimage gaussian_weights=True, sigma 1.5, 5-pixel crop) of every
image of x against every image of y, x = MNIST test[:N], y = MNIST test[-M:] (random images if MNIST is absent):
  nefgpt-loop      NeF-GPT's way: a torchmetrics-style SSIM (one conv2d over [x, y, x², y², xy] with reflect
                   padding, then the crop) called once per generated image against all references
  conv2d-batched   all pairs in batched chunks: per-image statistics once, the cross term filter(x*y) of every
                   pair with one conv2d per chunk ([x]+tf32: cuDNN's TF32, the CUDA default, less accurate)
  matmul-batched   the same with the separable filter as batched matmuls, Gh @ (x*y) @ Gw^T (a stronger peer)
  skimage          structural_similarity on a sample of pairs, extrapolated (CPU only)
  nfgen[...]       nfkernels.pairwise_ssim (cpp on CPU, triton on CUDA) and the fused nearest-neighbour
                   reduction ssim_nearest (no N x M matrix); on CUDA also each Triton kernel (tile, gemm over
                   laid-out patches, gemm-images over windows gathered from the images) at its precisions,
                   and with --sweep the GEMM kernels' tile choices
Slow peers run a subset of rows and are extrapolated to N x M; their rows say so. Times are medians over
repeats; "nfgen x" is nfgen's pairs/s over the row's.

    python -m benchmarks.bench_ssim [--device cuda] [--quick] [--sweep] [--out benchmarks/results/ssim-<device>.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks._env import device_name, environment, write_result
from nfkernels.ssim import (
    gaussian_window,
    image_stats,
    pairwise_ssim,
    ssim_formula,
    ssim_nearest,
)

# ---------------------------------------------------------------------------------------------------------------
# Peers


def torchmetrics_style_ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of preds[i] vs target[i], [B, 1, H, W] each → [B]; torchmetrics 1.4's gaussian path in plain torch."""
    g = gaussian_window(dtype=preds.dtype).to(preds.device)
    kernel = (g[:, None] * g[None, :]).expand(1, 1, -1, -1)
    pad = g.numel() // 2
    preds = F.pad(preds, (pad, pad, pad, pad), mode="reflect")
    target = F.pad(target, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(torch.cat([preds, target, preds * preds, target * target, preds * target]), kernel)
    mu_p, mu_t, e_pp, e_tt, e_pt = out.split(preds.shape[0])
    s = ssim_formula(mu_p, e_pp - mu_p ** 2, mu_t, e_tt - mu_t ** 2, e_pt)
    return s[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


def nefgpt_loop(x, y, rows):
    """One batched SSIM call per generated image against all references."""
    yp = y.unsqueeze(1)
    return torch.stack([torchmetrics_style_ssim(x[i].expand(y.shape[0], 1, -1, -1).contiguous(), yp)
                        for i in range(rows)])


def conv2d_batched(x, y, rows, chunk_pairs=1 << 18):
    """All pairs of x[:rows] and y: statistics once per image, one conv2d over the products of a chunk of pairs."""
    g = gaussian_window(dtype=torch.float32).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(1, 1, -1, -1)
    xp, yp = x[:rows].unsqueeze(1), y.unsqueeze(1)
    mx, vx = (t.float() for t in image_stats(xp, dtype=torch.float32))
    my, vy = (t.float() for t in image_stats(yp, dtype=torch.float32))
    m = y.shape[0]
    step = max(1, chunk_pairs // m)
    out = []
    for i in range(0, rows, step):
        prod = (xp[i:i + step, None] * yp[None]).flatten(0, 1)  # [r * M, 1, H, W]
        cross = F.conv2d(prod, kernel).view(-1, m, *mx.shape[-2:])
        s = ssim_formula(mx[i:i + step], vx[i:i + step], my[:, 0][None], vy[:, 0][None], cross)
        out.append(s.mean(dim=(-2, -1)))
    return torch.cat(out)


def banded(window: torch.Tensor, size: int) -> torch.Tensor:
    """[size - K + 1, size] matrix G with G @ v = 'valid' filtering of v by the window."""
    k = window.numel()
    g = torch.zeros(size - k + 1, size, dtype=window.dtype, device=window.device)
    for i in range(size - k + 1):
        g[i, i:i + k] = window
    return g


def matmul_batched(x, y, rows, chunk_pairs=1 << 16):
    """Like conv2d-batched, but the cross term as Gh @ (x*y) @ Gw^T with batched matmuls (separable filter)."""
    g = gaussian_window(dtype=torch.float32).to(x.device)
    gh, gw = banded(g, x.shape[1]), banded(g, x.shape[2])
    xp, yp = x[:rows].unsqueeze(1), y.unsqueeze(1)
    mx, vx = image_stats(xp, dtype=torch.float32)
    my, vy = image_stats(yp, dtype=torch.float32)
    m = y.shape[0]
    step = max(1, chunk_pairs // m)
    out = []
    for i in range(0, rows, step):
        prod = x[i:min(rows, i + step), None] * y[None]  # [r, M, H, W]
        cross = gh @ prod @ gw.T
        s = ssim_formula(mx[i:i + step], vx[i:i + step], my[:, 0][None], vy[:, 0][None], cross)
        out.append(s.mean(dim=(-2, -1)))
    return torch.cat(out)


def skimage_pairs(x, y, pairs):
    from skimage.metrics import structural_similarity

    xs, ys = x.double().cpu().numpy(), y.double().cpu().numpy()
    for k in range(pairs):
        structural_similarity(xs[k % len(xs)], ys[(k * 7) % len(ys)], gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Harness

# the CUDA-only nfgen rows besides the default backend: (kernel, precision) of nfkernels.ssim_triton
# the GEMM kernels' (BN, BM, num_warps, num_stages) that --sweep times, per layout and precision; the first is
# the default
GEMM_SWEEP = (("patches", "fp16x3", [(128, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 3), (32, 64, 4, 2),
                                     (64, 64, 4, 2), (128, 32, 8, 2), (128, 128, 8, 2)]),
              ("patches", "tf32x3", [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)]),
              ("images", "fp16x3", [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2),
                                    (128, 32, 8, 2), (128, 128, 8, 2)]))
# beside the default (KERNEL "auto": the tile kernel at 1k x 1k, the patches GEMM kernel at 10k x 10k)
TRITON_VARIANTS = [("tile", "tf32x3"), ("tile", "ieee"), ("gemm", "fp16x3"), ("gemm", "tf32x3"),
                   ("gemm-images", "fp16x3")]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=True):
    if warmup:
        fn()  # Triton compile, cuDNN autotune, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def load_images(n, m, device):
    try:
        from nfgen.data import load_split

        images = load_split("mnist:test").images
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs, on random images
        print(f"note: MNIST not loaded ({str(exc).splitlines()[0]}); using random images", file=sys.stderr)
        images = torch.rand(max(n, m), 28, 28, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(max(n, m))
    x = images[idx[:n] % len(images)]
    y = images[(len(images) - 1 - idx[:m]) % len(images)]
    return x.to(device).contiguous(), y.to(device).contiguous()


def bench_size(n, m, device, repeats, quick):
    x, y = load_images(n, m, device)
    pairs = n * m
    rows = []

    def add(name, seconds, done_pairs, times, note=""):
        scale = pairs / done_pairs
        rows.append({"contender": name, "n": n, "m": m, "seconds": seconds * scale, "pairs_per_s": done_pairs / seconds,
                     "measured_pairs": done_pairs, "repeat_seconds": times,
                     "note": note or ("" if scale == 1 else f"extrapolated from {done_pairs} pairs")})

    failed = {}  # CUDA variants that failed to compile or launch: recorded, not the end of the benchmark

    def add_variant(name, fn):
        try:
            sec, ts = timed(fn, device, repeats)
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory under another Triton version
            failed[name] = str(exc)[:200]
            print(f"{name}: failed ({str(exc).splitlines()[0][:100]})")
            return
        add(name, sec, pairs, ts)

    on_cuda = device.type == "cuda"
    nf_backend = "triton" if on_cuda else "auto"
    sec, ts = timed(lambda: pairwise_ssim(x, y, backend=nf_backend), device, repeats)
    add(f"nfgen pairwise_ssim[{nf_backend}]", sec, pairs, ts)
    if on_cuda:
        from nfkernels.ssim_triton import pairwise_ssim_triton, ssim_nearest_triton

        xp, yp = x.unsqueeze(1), y.unsqueeze(1)
        for kernel, precision in TRITON_VARIANTS:
            add_variant(f"nfgen pairwise_ssim[triton-{kernel}, {precision}]",
                        lambda: pairwise_ssim_triton(xp, yp, kernel=kernel, precision=precision))
    sec, ts = timed(lambda: ssim_nearest(x, y, backend=nf_backend), device, repeats)
    add(f"nfgen ssim_nearest[{nf_backend}] (fused reduction)", sec, pairs, ts)
    if on_cuda:
        for kernel in ("gemm", "gemm-images"):
            add_variant(f"nfgen ssim_nearest[triton-{kernel}, fp16x3] (fused reduction)",
                        lambda: ssim_nearest_triton(xp, yp, kernel=kernel))

    # peers, on as many rows as the budget allows
    peer_rows = min(n, 16 if not on_cuda else (200 if quick else 1000))
    sec, ts = timed(lambda: nefgpt_loop(x, y, peer_rows), device, 1 if quick or not on_cuda else repeats,
                    warmup=on_cuda)
    add("nefgpt-loop (torchmetrics-style, per image)", sec, peer_rows * m, ts)
    conv_rows = min(n, (64 if quick else 128) if not on_cuda else (1000 if quick else 2000))
    cpu_peer_repeats = 1  # the slow CPU peers run once: their spread is far below the ratios measured
    if on_cuda:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        sec, ts = timed(lambda: conv2d_batched(x, y, conv_rows), device, repeats)
        add("conv2d-batched (fp32)", sec, conv_rows * m, ts)
        torch.backends.cudnn.allow_tf32 = True
        sec, ts = timed(lambda: conv2d_batched(x, y, conv_rows), device, repeats)
        add("conv2d-batched+tf32", sec, conv_rows * m, ts)
        torch.backends.cudnn.allow_tf32 = old
    else:
        sec, ts = timed(lambda: conv2d_batched(x, y, conv_rows), device, cpu_peer_repeats, warmup=False)
        add("conv2d-batched", sec, conv_rows * m, ts)
    sec, ts = timed(lambda: matmul_batched(x, y, conv_rows), device, repeats if on_cuda else cpu_peer_repeats,
                    warmup=on_cuda)
    add("matmul-batched (separable, torch)", sec, conv_rows * m, ts)
    if not on_cuda:
        sk_pairs = 100 if quick else 400
        sec, ts = timed(lambda: skimage_pairs(x, y, sk_pairs), device, 1, warmup=False)
        add("skimage structural_similarity", sec, sk_pairs, ts)

    # accuracy of nfgen against the fp32 conv2d peer on a few rows (sanity: both are the pinned SSIM)
    k = min(n, 32)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # an fp32 yardstick
    err = {"nfgen": (pairwise_ssim(x[:k], y, backend=nf_backend) - conv2d_batched(x, y, k)).abs().max().item()}
    if on_cuda:
        for kernel, precision in TRITON_VARIANTS:
            if f"nfgen pairwise_ssim[triton-{kernel}, {precision}]" in failed:
                continue
            err[f"triton-{kernel} {precision}"] = (pairwise_ssim_triton(xp[:k], yp, kernel=kernel, precision=precision)
                                                   - conv2d_batched(x, y, k)).abs().max().item()
    torch.backends.cudnn.allow_tf32 = tf32
    nf = rows[0]["pairs_per_s"]
    for r in rows:
        r["nfgen_x"] = nf / r["pairs_per_s"]
    return rows, err, failed


def summary(rows) -> str:
    """The fastest nfgen contender that writes the whole matrix, against each peer of the same run."""
    best = max((r for r in rows if r["contender"].startswith("nfgen pairwise_ssim")), key=lambda r: r["pairs_per_s"])
    peers = [r for r in rows if not r["contender"].startswith("nfgen")]
    return f"fastest nfgen: {best['contender']}: " + ", ".join(
        f"{best['pairs_per_s'] / r['pairs_per_s']:.1f}x {r['contender'].split(' (')[0]}" for r in peers)


def sweep_gemm_tiles(n, device, repeats):
    """Time the GEMM kernels' (BN, BM, num_warps, num_stages) choices at N = M = n (CUDA): rows for the JSON."""
    from nfkernels.ssim_gemm_triton import pairwise_ssim_gemm

    x, y = load_images(n, n, device)
    xp, yp = x.unsqueeze(1), y.unsqueeze(1)
    rows = []
    for layout, precision, configs in GEMM_SWEEP:
        for tiles in configs:
            key = {"sweep": "gemm", "layout": layout, "precision": precision, "tiles": tiles}
            try:
                sec, ts = timed(lambda: pairwise_ssim_gemm(xp, yp, precision=precision, layout=layout, tiles=tiles),
                                device, repeats)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: a row that says so
                rows.append({**key, "error": str(exc)[:200]})
                print(f"gemm {layout} {precision} tiles {tiles}: failed ({str(exc).splitlines()[0][:100]})")
                continue
            rows.append({**key, "n": n, "m": n, "seconds": sec, "pairs_per_s": n * n / sec, "repeat_seconds": ts})
            print(f"gemm {layout} {precision} tiles (BN, BM, warps, stages) {tiles}: {sec:.4f} s, "
                  f"{n * n / sec:.4g} pairs/s")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--sweep", action="store_true", help="also time the GEMM kernel's tile choices (CUDA)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        sizes = [1000] if args.quick else [1000, 10000]
    else:
        sizes = [200] if args.quick else [1000]
    repeats = 1 if args.quick else args.repeats
    all_rows, errors, failures = [], {}, {}
    print(f"device: {device_name(device)}  torch {torch.__version__}")
    print(f"{'contender':<48} {'N=M':>6} {'seconds':>10} {'pairs/s':>12} {'nfgen x':>8}  note")
    for n in sizes:
        rows, err, failed = bench_size(n, n, device, repeats, args.quick)
        errors[str(n)] = err
        if failed:
            failures[str(n)] = failed
        for r in rows:
            print(f"{r['contender']:<48} {n:>6} {r['seconds']:>10.3f} {r['pairs_per_s']:>12.4g} {r['nfgen_x']:>8.1f}  "
                  f"{r['note']}")
        print(f"max |SSIM - conv2d-batched fp32| at N={n}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
        print(summary(rows))
        all_rows += rows
    if args.sweep and device.type == "cuda":
        all_rows += sweep_gemm_tiles(sizes[-1], device, repeats)
    if args.out:
        write_result(args.out, {"benchmark": "pairwise_ssim", **environment("benchmarks.bench_ssim", device),
                                "max_abs_diff_vs_conv2d": errors, "failed_variants": failures, "rows": all_rows})


# pytest-benchmark entries (`python -m pytest benchmarks/bench_ssim.py`): 64 x 64 MNIST pairs on the CPU, nfgen's
# fused all-pairs op against the batched conv2d peer
def _small_pairs():
    return load_images(64, 64, torch.device("cpu"))


def test_bench_nfgen_pairwise_ssim_small(benchmark):
    x, y = _small_pairs()
    out = benchmark(pairwise_ssim, x, y)
    assert torch.allclose(out, conv2d_batched(x, y, len(x)), atol=1e-5)


def test_bench_conv2d_pairwise_ssim_small(benchmark):
    x, y = _small_pairs()
    assert benchmark(conv2d_batched, x, y, len(x)).shape == (64, 64)


if __name__ == "__main__":
    main()
