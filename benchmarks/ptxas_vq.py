"""Registers, spills and inner-loop instructions of the Triton VQ kernel compiled for sm_90 (H100), no GPU needed.

Compiles `_vq_assign_kernel` with `triton.compile` for a CUDA target and reads the cubin with the cuobjdump
that ships with Triton: for each d, the default tiles (`default_tiles`) or those given by --tiles and, with
--all, the tile shapes `bench_vq --sweep` times. Spills (STACK > 0) cost local-memory traffic in the inner loop.

It also counts the SASS instructions of the loop over codebook tiles, per distance: the arithmetic floor is
2d + 3 (d subtractions, d multiply-adds, a compare and two selects). From that count it prints the issue-bound
rate on an H100 SXM (132 SMs x 128 instructions a clock x 1.98 GHz, every instruction one issue slot): an
upper bound from a static count, not a measurement. --at compiles the kernel as of an older commit (with
--tiles, the tiles that version launched), to compare it with today's the same way.

    python -m benchmarks.ptxas_vq [--all] [--arch 90] [--out FILE]
    python -m benchmarks.ptxas_vq --at 2629ac1 --tiles 64x128:4     # the kernel the H100 timed in vq-h100.json
"""
from __future__ import annotations

import argparse

from benchmarks._env import environment, write_result
from benchmarks._ptxas import H100_ISSUE_PER_S, compile_for, module_at, the_inner_loop, usage
from benchmarks.bench_vq import SWEEP_TILES
from nfkernels import vq_triton
from nfkernels.vq_triton import default_tiles

SIGNATURE = {"x_ptr": "*fp32", "codes_t_ptr": "*fp32", "idx_ptr": "*i64", "dist_ptr": "*fp32", "M": "i32", "K": "i32",
             "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}


def _compile(d: int, block_m: int, block_k: int, num_warps: int, arch: int, module=vq_triton):
    return compile_for(module._vq_assign_kernel, SIGNATURE, {"D": d, "BLOCK_M": block_m, "BLOCK_K": block_k}, arch,
                       num_warps=num_warps)


def resource_usage(d: int, block_m: int, block_k: int, num_warps: int, arch: int) -> dict:
    return usage(_compile(d, block_m, block_k, num_warps, arch))


def _loop(kernel, block_m: int, block_k: int, num_warps: int) -> dict:
    loop = the_inner_loop(kernel)
    per_thread = block_m * block_k // (32 * num_warps)  # distances a thread computes per trip
    return {**loop, "per_distance": loop["instructions"] / per_thread}


def inner_loop(d: int, block_m: int, block_k: int, num_warps: int, arch: int) -> dict:
    """The codebook-tile loop's SASS: {"instructions" (per thread and trip), "per_distance", "ops"}."""
    return _loop(_compile(d, block_m, block_k, num_warps, arch), block_m, block_k, num_warps)


def parse_tiles(text: str) -> tuple[int, int, int]:
    """"64x128:4" → (BLOCK_M, BLOCK_K, num_warps)."""
    blocks, warps = text.split(":")
    block_m, block_k = blocks.split("x")
    return int(block_m), int(block_k), int(warps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also the tile shapes of bench_vq --sweep")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    ap.add_argument("--at", default=None, help="compile nfkernels/vq_triton.py as of this git commit")
    ap.add_argument("--tiles", type=parse_tiles, default=None, help="BMxBK:WARPS instead of default_tiles")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    args = ap.parse_args(argv)
    module = module_at(args.at, "nfkernels/vq_triton.py", vq_triton)
    rows = []
    for d in (1, 2, 4, 8, 16):
        shapes = [args.tiles or default_tiles(d, 4096)] + (SWEEP_TILES if args.all else [])
        for i, (bm, bk, nw) in enumerate(shapes):
            kernel = _compile(d, bm, bk, nw, args.arch, module)
            row = {"d": d, "tiles": [bm, bk, nw], "default": i == 0, **usage(kernel)}
            tag = "default" if i == 0 else "sweep"
            print(f"d={d:2d} {bm:3d}x{bk:<3d} {nw} warps ({tag:7s}): {row['registers']:3d} registers, "
                  f"{row['stack_bytes']:4d} B stack{'  (spills)' if row['stack_bytes'] else ''}", flush=True)
            if i == 0:
                loop = _loop(kernel, bm, bk, nw)
                bound = H100_ISSUE_PER_S / (loop["per_distance"] * 4096)
                row.update(loop_ops=loop["ops"], per_distance=loop["per_distance"], bound_k4096_per_s=bound)
                print(f"      inner loop: {loop['per_distance']:.1f} SASS instructions a distance (floor {2 * d + 3}); "
                      f"issue bound at K = 4096 on an H100: {bound / 1e9:.2f} G assignments/s", flush=True)
            rows.append(row)
    if args.out:
        write_result(args.out, {**environment("benchmarks.ptxas_vq", "cpu"), "target": f"sm_{args.arch}",
                                "kernel_at": args.at or "HEAD", "issue_per_s": H100_ISSUE_PER_S, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
