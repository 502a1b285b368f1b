"""Registers and spills of the Triton VQ kernel compiled for sm_90 (H100), no GPU needed.

Compiles `_vq_assign_kernel` with `triton.compile` for a CUDA target and reads the cubin's resource usage
with the cuobjdump that ships with Triton: for each d, the default tiles (`default_tiles`) and, with --all,
the tile shapes `bench_vq --sweep` times. Spills (STACK > 0) cost local-memory traffic in the inner loop.

It also counts the SASS instructions of the loop over codebook tiles, per distance: the arithmetic floor is
2d + 3 (d subtractions, d multiply-adds, a compare and two selects). From that count it prints the issue-bound
rate on an H100 SXM (132 SMs x 128 instructions a clock x 1.98 GHz, every instruction one issue slot): an
upper bound from a static count, not a measurement.

    python -m benchmarks.ptxas_vq [--all] [--arch 90]
"""
from __future__ import annotations

import argparse

from benchmarks._ptxas import H100_ISSUE_PER_S, compile_for, cubin_usage, the_inner_loop
from benchmarks.bench_vq import SWEEP_TILES
from nfkernels.vq_triton import _vq_assign_kernel, default_tiles

SIGNATURE = {"x_ptr": "*fp32", "codes_t_ptr": "*fp32", "idx_ptr": "*i64", "dist_ptr": "*fp32", "M": "i32", "K": "i32",
             "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}


def resource_usage(d: int, block_m: int, block_k: int, num_warps: int, arch: int) -> dict:
    return cubin_usage(_vq_assign_kernel, SIGNATURE, {"D": d, "BLOCK_M": block_m, "BLOCK_K": block_k}, arch,
                       num_warps=num_warps)


def inner_loop(d: int, block_m: int, block_k: int, num_warps: int, arch: int) -> dict:
    """The codebook-tile loop's SASS: {"instructions" (per thread and trip), "per_distance", "ops"}."""
    kernel = compile_for(_vq_assign_kernel, SIGNATURE, {"D": d, "BLOCK_M": block_m, "BLOCK_K": block_k}, arch,
                         num_warps=num_warps)
    loop = the_inner_loop(kernel)
    per_thread = block_m * block_k // (32 * num_warps)  # distances a thread computes per trip
    return {**loop, "per_distance": loop["instructions"] / per_thread}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also the tile shapes of bench_vq --sweep")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    args = ap.parse_args(argv)
    for d in (1, 2, 4, 8, 16):
        shapes = [default_tiles(d, 4096)] + (SWEEP_TILES if args.all else [])
        for i, (bm, bk, nw) in enumerate(shapes):
            use = resource_usage(d, bm, bk, nw, args.arch)
            tag = "default" if i == 0 else "sweep"
            print(f"d={d:2d} {bm:3d}x{bk:<3d} {nw} warps ({tag:7s}): {use['registers']:3d} registers, "
                  f"{use['stack_bytes']:4d} B stack{'  (spills)' if use['stack_bytes'] else ''}", flush=True)
        loop = inner_loop(d, *default_tiles(d, 4096), args.arch)
        bound = H100_ISSUE_PER_S / (loop["per_distance"] * 4096)
        print(f"      inner loop: {loop['per_distance']:.1f} SASS instructions a distance (floor {2 * d + 3}); "
              f"issue bound at K = 4096 on an H100: {bound / 1e9:.2f} G assignments/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
