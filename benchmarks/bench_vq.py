"""Nearest-codebook assignment: chunked torch.cdist + argmin (the usual peer) vs nfgen's vq_assign.

For M vectors, K in {256, 4096}, d in {1, 4, 8}: assignments/s (median of repeats), peak extra memory,
and the ratio to the peer measured in the same run. Then a full tokenize (k-means fit + encode) of
synthetic fields per backend.

    python -m benchmarks.bench_vq [--device cuda] [--quick] [--out benchmarks/results/vq-<device>.json]

M is 10^7 on CUDA, 10^6 on CPU (10^7 takes minutes per row on 2 cores); --quick divides M by 10.
--sweep (CUDA) also times the Triton kernel at other tile shapes (BLOCK_M x BLOCK_K / warps), one row each.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from benchmarks._env import device_name, environment, write_result
from nfkernels import SirenSpec, _ext, siren_init
from nfkernels.vq import vq_assign

PEER_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}  # distance-matrix chunk the peer may hold


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.stop = self._rss(), False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()


def peer_cdist_argmin(x, codebook):
    rows = max(1, PEER_CHUNK_BYTES[x.device.type] // (codebook.shape[0] * 4))
    return torch.cat([torch.cdist(x[s:s + rows], codebook).argmin(dim=1) for s in range(0, x.shape[0], rows)])


SWEEP_TILES = [(64, 64, 8), (64, 64, 4), (32, 64, 4), (32, 32, 4), (64, 32, 4), (16, 64, 4), (128, 32, 8)]


def contenders(device, d, sweep=False):
    out = {"peer cdist+argmin": peer_cdist_argmin, "nfgen auto": lambda x, c: vq_assign(x, c)}
    if device.type == "cpu" and _ext.has_op("vq_assign"):
        out["nfgen cpp brute"] = lambda x, c: vq_assign(x, c, backend="cpp", method="brute")
        if d == 1:
            out["nfgen cpp sorted"] = lambda x, c: vq_assign(x, c, backend="cpp", method="sorted")
    if device.type == "cuda":
        out["nfgen triton brute"] = lambda x, c: vq_assign(x, c, backend="triton", method="brute")
        if d == 1:
            out["nfgen torch sorted"] = lambda x, c: vq_assign(x, c, backend="triton", method="sorted")
        if sweep:
            from nfkernels.vq_triton import vq_assign_triton

            for bm, bk, nw in SWEEP_TILES:
                out[f"triton {bm}x{bk}/{nw}w"] = \
                    lambda x, c, bm=bm, bk=bk, nw=nw: vq_assign_triton(x, c, block_m=bm, block_k=bk, num_warps=nw)[0]
    return out


def time_call(fn, device, repeats):
    fn()  # warm-up: compiles Triton kernels, faults in memory
    sync(device)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], mem.peak


def bench_assign(device, M, repeats, sweep=False):
    rows = []
    for d in (1, 4, 8):
        for K in (256, 4096):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, d, generator=g).to(device)
            codebook = torch.randn(K, d, generator=g).to(device)
            expect = vq_assign(x[:4096], codebook, backend="torch")
            peer_rate = None
            for name, fn in contenders(device, d, sweep).items():
                agree = (fn(x[:4096], codebook) == expect).double().mean().item()
                assert agree > 0.999 or name.startswith("peer"), (name, agree)  # fp32 near-ties may flip
                sec, peak = time_call(lambda: fn(x, codebook), device, repeats)
                rate = M / sec
                peer_rate = peer_rate or rate
                rows.append({"d": d, "K": K, "M": M, "contender": name, "seconds": sec, "assign_per_s": rate,
                             "peak_extra_mb": peak / 2**20, "ratio_vs_peer": rate / peer_rate})
                print(f"d={d} K={K:5d} M={M:.0e} {name:20s} {rate / 1e6:9.2f} M assign/s  "
                      f"peak {peak / 2**20:8.1f} MiB  x{rate / peer_rate:5.2f} vs peer", flush=True)
    return rows


def bench_tokenize(device, n_fields, repeats):
    from nfgen.tokenizer import TokenizerConfig, WeightTokenizer

    spec = SirenSpec()
    g = torch.Generator().manual_seed(0)
    w = (siren_init(spec, n_fields, generator=g) * (1 + 0.1 * torch.randn(n_fields, spec.num_params, generator=g)))
    w = w.to(device)
    backends = ["torch"] + (["cpp"] if device.type == "cpu" and _ext.has_op("vq_assign") else []) + \
        (["triton"] if device.type == "cuda" else [])
    rows, base = [], None
    for backend in backends:
        cfg = TokenizerConfig(backend=backend, quiet=True)

        def run():
            tok = WeightTokenizer.fit(w, spec, cfg)
            return tok.encode(w)

        sec, peak = time_call(run, device, repeats)
        base = base or sec
        rows.append({"tokenize_fields": n_fields, "backend": backend, "seconds": sec, "peak_extra_mb": peak / 2**20,
                     "speedup_vs_torch": base / sec})
        print(f"tokenize {n_fields} fields (K=256, scalar, {cfg.iters} iters, sample {cfg.sample}) {backend:7s} "
              f"{sec:8.2f} s  x{base / sec:5.2f} vs torch", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="M / 10 and fewer fields")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time the Triton kernel's other tile shapes")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    M = 10**7 if device.type == "cuda" else 10**6
    n_fields = 10_000
    if args.quick:
        M, n_fields = M // 10, 1_000
    name = device_name(device)
    print(f"device: {name}; M = {M:.0e}" + (" (CPU: 10^7 is too slow here)" if device.type == "cpu" else ""))
    rows = bench_assign(device, M, args.repeats, args.sweep)
    rows += bench_tokenize(device, n_fields, max(1, args.repeats - 2))
    if args.out:
        write_result(args.out, {**environment("benchmarks.bench_vq", device), "rows": rows})


# pytest-benchmark entries (`python -m pytest benchmarks/bench_vq.py`): 10^5 scalars against 256 codes on the CPU,
# nfgen's assignment against chunked cdist + argmin
def _small_problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(100_000, 1, generator=g), torch.randn(256, 1, generator=g)


def test_bench_nfgen_vq_assign_small(benchmark):
    x, codebook = _small_problem()
    idx = benchmark(vq_assign, x, codebook)
    assert (idx == peer_cdist_argmin(x, codebook)).double().mean() > 0.999  # fp32 near-ties may flip


def test_bench_cdist_vq_assign_small(benchmark):
    x, codebook = _small_problem()
    assert benchmark(peer_cdist_argmin, x, codebook).shape == (100_000,)


if __name__ == "__main__":
    main()
