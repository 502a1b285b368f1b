"""Decode-attention benchmark (issue 5): one decode step's attention over a bf16 KV cache, the op alone.

At batch 1024 a decode step is bound by reading the KV cache, so every contender is timed at the same cache
and filled length and reported as GB/s of K/V it must read (the filled slots only) against the device:
  sdpa-bucket   what `nfgen generate` does by default: F.scaled_dot_product_attention under a position mask
                over the whole 128-slot bucket that holds the filled prefix (one CUDA graph per bucket)
  sdpa-exact    the same over exactly the filled slots (what an eager loop slicing the cache would do)
  triton        nfkernels.decode_attention (split-K Triton kernel, kv_len read on the device), its defaults
  triton[...]   with --sweep: its tile choices (tensor-core dots or not, BLOCK_N, warps)
Shapes are the default model's (8 query heads, head dim 48; --n-kv-head for grouped-query caches) over a
1186-slot cache, filled to --kv-lens (its mean over a 1185-token field is ≈ 594). Times are medians of
--repeats runs of --iters launches each, with CUDA events. CUDA only: under the CPU interpreter a Triton
kernel's time means nothing.

    python -m benchmarks.bench_decode_attention --device cuda [--sweep] [--out benchmarks/results/decode_attention-<device>.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks._env import environment, write_result
from nfgen.generate import GRAPH_BUCKET
from nfgen.model import cached_attention
from nfkernels.decode_attention import decode_attention_reference

S_MAX, N_HEAD, HEAD_DIM = 1186, 8, 48


def time_ms(fn, iters: int, repeats: int) -> float:
    fn()  # compile / autotune / allocate
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def contenders(q, k, v, kv_len: int, sweep: bool):
    """name → a zero-argument callable computing the step's attention output [B, H, 1, d]."""
    from nfkernels.decode_attention_triton import decode_attention_triton

    device = q.device
    bucket = min(S_MAX, -(-kv_len // GRAPH_BUCKET) * GRAPH_BUCKET)
    pos = torch.tensor([kv_len - 1], device=device)
    mask = torch.arange(bucket, device=device)[None, :] <= pos[:, None]
    kv = torch.tensor([kv_len], dtype=torch.int64, device=device)
    out = {
        "sdpa-bucket": lambda: cached_attention(q, k[:, :, :bucket], v[:, :, :bucket], mask),
        "sdpa-exact": lambda: cached_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], mask[:, :kv_len]),
        "triton": lambda: decode_attention_triton(q, k, v, kv),
    }
    if sweep:
        for use_dot in (True, False):
            for block_n in (32, 64, 128):
                for warps in (2, 4, 8):
                    out[f"triton[dot={int(use_dot)},n={block_n},w={warps}]"] = (
                        lambda u=use_dot, b=block_n, w=warps: decode_attention_triton(q, k, v, kv, use_dot=u,
                                                                                     block_n=b, num_warps=w))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--kv-lens", default="64,594,1186", help="filled slots to time at")
    ap.add_argument("--n-kv-head", type=int, default=N_HEAD)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernel's tile choices")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        ap.error("it times CUDA kernels: pass --device cuda on a GPU machine")
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    print(f"{'contender':<34}{'batch':>6}{'kv_len':>7}{'ms':>9}{'GB/s':>9}  max |err| vs reference")
    for batch in map(int, args.batches.split(",")):
        q = torch.randn(batch, N_HEAD, 1, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(batch, args.n_kv_head, S_MAX, HEAD_DIM, generator=g, device=device,
                            dtype=torch.bfloat16) for _ in range(2))
        for kv_len in map(int, args.kv_lens.split(",")):
            needed = 2 * batch * args.n_kv_head * kv_len * HEAD_DIM * k.element_size()  # K and V, filled slots
            want = decode_attention_reference(q, k, v, torch.tensor([kv_len], device=device)).float()
            best = None
            for name, fn in contenders(q, k, v, kv_len, args.sweep).items():
                try:
                    err = (fn().float() - want).abs().max().item()
                    ms = time_ms(fn, args.iters, args.repeats)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: a row that says so
                    rows.append({"contender": name, "batch": batch, "kv_len": kv_len, "error": str(exc)[:200]})
                    print(f"{name:<34}{batch:>6}{kv_len:>7}  failed: {str(exc).splitlines()[0][:80]}")
                    continue
                row = {"contender": name, "batch": batch, "kv_len": kv_len, "n_kv_head": args.n_kv_head, "ms": ms,
                       "kv_gb_per_s": needed / ms / 1e6, "max_abs_err": err}
                rows.append(row)
                print(f"{name:<34}{batch:>6}{kv_len:>7}{ms:>9.4f}{row['kv_gb_per_s']:>9.0f}  {err:.1e}")
                if name.startswith("triton") and (best is None or ms < best["ms"]):
                    best = row
            base = next(r["ms"] for r in rows if r["contender"] == "sdpa-bucket" and r["batch"] == batch
                        and r["kv_len"] == kv_len and "ms" in r)
            if best is not None:
                print(f"  fastest triton: {best['contender']}, {base / best['ms']:.2f}x sdpa-bucket")
    if args.out:
        write_result(args.out, {"benchmark": "decode_attention", **environment("benchmarks.bench_decode_attention",
                                                                                device),
                                "shape": {"s_max": S_MAX, "n_head": N_HEAD, "head_dim": HEAD_DIM}, "rows": rows})


if __name__ == "__main__":
    main()
