"""Decode-attention benchmark (issue 5): one decode step's attention over the KV cache, the op alone.

At the batch sizes generation runs at a decode step is bound by reading the KV cache, so every contender is
timed at the same cache and filled length and reported as GB/s of K/V it must read (the filled slots only).
On CUDA (a bf16 cache):
  sdpa-bucket   what `nfgen generate` does by default: F.scaled_dot_product_attention under a position mask
                over the whole 128-slot bucket that holds the filled prefix (one CUDA graph per bucket)
  sdpa-exact    the same over exactly the filled slots (what an eager loop slicing the cache would do)
  triton        nfkernels.decode_attention (split-K Triton kernel, kv_len read on the device), its defaults
  triton[...]   with --sweep: its tile choices (tensor-core dots or not, BLOCK_N, warps)
On CPU (a float32 cache, as CPU generation runs): sdpa-exact (what CPU generation did before the C++ op:
its eager loop slices the cache to the filled prefix) against cpp, nfkernels.decode_attention's C++ op
(csrc/decode_attention_cpu.cpp), the CPU default since. The Triton kernel is not timed on CPU: under the
interpreter its time means nothing.
Shapes are the default model's (8 query heads, head dim 48; --n-kv-head for grouped-query caches, --n-head
and --head-dim for others) over a 1186-slot cache, filled to --kv-lens (its mean over a 1185-token field is
≈ 594). Times are medians of --repeats runs of --iters calls each (CUDA events on CUDA, perf_counter on CPU).

    python -m benchmarks.bench_decode_attention --device cuda [--sweep] [--out benchmarks/results/decode_attention-<device>.json]
    python -m benchmarks.bench_decode_attention --device cpu --batches 1,16,64 [--out ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._env import environment, write_result
from nfgen.generate import GRAPH_BUCKET
from nfgen.model import cached_attention
from nfkernels._ext import has_op
from nfkernels.decode_attention import decode_attention_reference

S_MAX, N_HEAD, HEAD_DIM = 1186, 8, 48


def time_ms(fns: dict, iters: int, repeats: int) -> dict[str, float]:
    """name → median ms per call. The contenders take turns within each repeat, so a slow spell of a shared
    machine lands on all of them rather than on whichever ran then."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for fn in fns.values():
        fn()  # compile / autotune / allocate
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3 / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def contenders(q, k, v, kv_len: int, sweep: bool):
    """name → a zero-argument callable computing the step's attention output [B, H, 1, d]."""
    device = q.device
    kv = torch.tensor([kv_len], dtype=torch.int64, device=device)
    filled = torch.ones(1, kv_len, dtype=torch.bool, device=device)  # the decode step's mask over the filled slots
    exact = {"sdpa-exact": lambda: cached_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], filled)}
    if device.type == "cpu":
        return {**exact, "cpp": lambda: torch.ops.nfkernels.decode_attention(q, k, v, kv)}
    from nfkernels.decode_attention_triton import decode_attention_triton

    bucket = min(S_MAX, -(-kv_len // GRAPH_BUCKET) * GRAPH_BUCKET)
    pos = torch.tensor([kv_len - 1], device=device)
    mask = torch.arange(bucket, device=device)[None, :] <= pos[:, None]
    out = {
        "sdpa-bucket": lambda: cached_attention(q, k[:, :, :bucket], v[:, :, :bucket], mask),
        **exact,
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
    ap.add_argument("--batches", help="default: 1,64,1024 on CUDA, 1,16,64 on CPU")
    ap.add_argument("--kv-lens", default="64,594,1186", help="filled slots to time at")
    ap.add_argument("--n-head", type=int, default=N_HEAD)
    ap.add_argument("--n-kv-head", type=int, help="default: --n-head")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernel's tile choices (CUDA)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        ap.error("no CUDA device here: pass --device cpu to time the C++ op")
    if not on_cuda and not has_op("decode_attention"):
        ap.error("nfkernels._C is not built: install the project (README) to time the C++ op")
    H, d = args.n_head, args.head_dim
    H_kv = args.n_kv_head or H
    if H % H_kv:
        ap.error(f"--n-head {H} must be a multiple of --n-kv-head {H_kv}")
    dtype, base_name = (torch.bfloat16, "sdpa-bucket") if on_cuda else (torch.float32, "sdpa-exact")
    batches = args.batches or ("1,64,1024" if on_cuda else "1,16,64")
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    print(f"{device} {dtype}, H={H} H_kv={H_kv} d={d}, {torch.get_num_threads()} threads")
    print(f"{'contender':<34}{'batch':>6}{'kv_len':>7}{'ms':>9}{'GB/s':>9}  max |err| vs reference")
    for batch in map(int, batches.split(",")):
        q = torch.randn(batch, H, 1, d, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(batch, H_kv, S_MAX, d, generator=g, device=device, dtype=dtype) for _ in range(2))
        for kv_len in map(int, args.kv_lens.split(",")):
            needed = 2 * batch * H_kv * kv_len * d * k.element_size()  # K and V, filled slots
            want = decode_attention_reference(q, k, v, torch.tensor([kv_len], device=device)).float()
            ok, errs = {}, {}
            for name, fn in contenders(q, k, v, kv_len, args.sweep).items():
                try:
                    errs[name] = (fn().float() - want).abs().max().item()
                    ok[name] = fn
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: a row that says so
                    rows.append({"contender": name, "batch": batch, "kv_len": kv_len, "error": str(exc)[:200]})
                    print(f"{name:<34}{batch:>6}{kv_len:>7}  failed: {str(exc).splitlines()[0][:80]}")
            timed = [{"contender": name, "batch": batch, "kv_len": kv_len, "n_head": H, "n_kv_head": H_kv,
                      "head_dim": d, "ms": ms, "kv_gb_per_s": needed / ms / 1e6, "max_abs_err": errs[name]}
                     for name, ms in time_ms(ok, args.iters, args.repeats).items()]
            for row in timed:
                print(f"{row['contender']:<34}{batch:>6}{kv_len:>7}{row['ms']:>9.4f}{row['kv_gb_per_s']:>9.1f}  "
                      f"{row['max_abs_err']:.1e}")
            rows += timed
            mine = [r for r in timed if r["contender"].startswith(("triton", "cpp"))]
            base = next((r for r in timed if r["contender"] == base_name), None)
            if mine and base:
                best = min(mine, key=lambda r: r["ms"])
                best["speedup_vs_" + base_name] = base["ms"] / best["ms"]
                print(f"  fastest: {best['contender']}, {base['ms'] / best['ms']:.2f}x {base_name}")
    if args.out:
        write_result(args.out, {"benchmark": "decode_attention", **environment("benchmarks.bench_decode_attention",
                                                                                device),
                                "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                                "shape": {"s_max": S_MAX, "n_head": H, "n_kv_head": H_kv, "head_dim": d},
                                "rows": rows})


# pytest-benchmark entries (`python -m pytest benchmarks/bench_decode_attention.py`): one decode step's attention
# on the CPU at the default model's shape, batch 16, 594 of 1186 slots filled: the C++ op against SDPA over the
# cache sliced to the filled slots
def _small_step(name):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, N_HEAD, 1, HEAD_DIM, generator=g)
    k, v = (torch.randn(16, N_HEAD, S_MAX, HEAD_DIM, generator=g) for _ in range(2))
    return contenders(q, k, v, 594, sweep=False)[name]


def test_bench_cpp_decode_attention_small(benchmark):
    import pytest

    if not has_op("decode_attention"):
        pytest.skip("nfkernels._C not built")
    out = benchmark(_small_step("cpp"))
    torch.testing.assert_close(out, _small_step("sdpa-exact")(), rtol=1e-5, atol=1e-5)


def test_bench_sdpa_decode_attention_small(benchmark):
    assert benchmark(_small_step("sdpa-exact")).shape == (16, N_HEAD, 1, HEAD_DIM)


if __name__ == "__main__":
    main()
