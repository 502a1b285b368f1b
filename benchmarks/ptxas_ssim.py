"""Registers, spills and shared memory of the Triton SSIM GEMM kernel compiled for sm_90 (H100), no GPU needed.

For each precision and the tiles `bench_ssim --sweep` times ((BN, BM, num_warps, num_stages); the first is
the default), in both modes (the N x M matrix, the fused nearest-neighbour reduction).

For the default tiles it also counts the SASS instructions of the loop over output pixels (one GEMM and the
SSIM formula for a tile of pairs) and prints the issue-bound time of a 10k x 10k MNIST matrix on an H100 SXM
(every instruction one issue slot; benchmarks._ptxas.H100_ISSUE_PER_S): an upper bound from a static
count, not a measurement.

    python -m benchmarks.ptxas_ssim [--arch 90]
"""
from __future__ import annotations

import argparse

from benchmarks._ptxas import H100_ISSUE_PER_S, compile_for, cubin_usage, the_inner_loop
from benchmarks.bench_ssim import GEMM_SWEEP
from nfkernels.ssim_gemm_triton import KP, _ssim_gemm_kernel

ARGS = {"xmu_ptr": "*fp32", "xvar_ptr": "*fp32", "ymu_ptr": "*fp32", "yvar_ptr": "*fp32", "out_ptr": "*fp32",
        "out_stride": "i32", "best_ptr": "*fp32", "arg_ptr": "*i64", **dict.fromkeys(
            ("N", "M", "NP", "MP", "P", "row0", "col0", "m_step", "splits"), "i32"),
        **dict.fromkeys(("c1", "c2", "inv_scale", "lo_inv"), "fp32"),
        **dict.fromkeys(("KP", "BN", "BM", "SPLIT", "PRECISION", "REDUCE", "EXCLUDE_SELF"), "constexpr")}


MNIST_PIXELS = 18 * 18  # output pixels of a 28 x 28 image: the 11 x 11 window's 5-pixel border is cropped


def _build(precision: str, tiles: tuple[int, int, int, int], reduce: bool):
    bn, bm, num_warps, num_stages = tiles
    split = precision == "fp16x3"
    operand = "*fp16" if split else "*fp32"
    signature = {**dict.fromkeys(("ah_ptr", "al_ptr", "bh_ptr", "bl_ptr"), operand), **ARGS}
    constexprs = {"KP": KP, "BN": bn, "BM": bm, "SPLIT": split, "PRECISION": "ieee" if split else precision,
                  "REDUCE": reduce, "EXCLUDE_SELF": reduce}
    return _ssim_gemm_kernel, signature, constexprs, {"num_warps": num_warps, "num_stages": num_stages}


def resource_usage(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int) -> dict:
    kernel, signature, constexprs, options = _build(precision, tiles, reduce)
    return cubin_usage(kernel, signature, constexprs, arch, **options)


def pixel_loop(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int) -> dict:
    """The output-pixel loop's SASS: {"instructions" (per thread and trip), "per_pair_pixel", "ops"}."""
    kernel, signature, constexprs, options = _build(precision, tiles, reduce)
    loop = the_inner_loop(compile_for(kernel, signature, constexprs, arch, **options))
    bn, bm, num_warps, _ = tiles
    return {**loop, "per_pair_pixel": loop["instructions"] / (bn * bm / (32 * num_warps))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    args = ap.parse_args(argv)
    for precision, configs in GEMM_SWEEP:
        for tiles in configs:
            for reduce in (False, True):
                use = resource_usage(precision, tiles, reduce, args.arch)
                print(f"{precision} tiles {tiles} {'reduce' if reduce else 'matrix':6s}: {use['registers']:3d} registers, "
                      f"{use['stack_bytes']:4d} B stack{'  (spills)' if use['stack_bytes'] else '':10s} "
                      f"{use['shared_bytes'] // 1024:3d} KB shared", flush=True)
        for reduce in (False, True):
            loop = pixel_loop(precision, configs[0], reduce, args.arch)
            seconds = 1e8 * MNIST_PIXELS * loop["per_pair_pixel"] / H100_ISSUE_PER_S
            print(f"{precision} tiles {configs[0]} {'reduce' if reduce else 'matrix':6s}: pixel loop "
                  f"{loop['per_pair_pixel']:.1f} SASS instructions a pair and pixel ({loop['ops'].get('HGMMA', 0)} "
                  f"HGMMA a trip); issue bound for 10k x 10k MNIST on an H100: {seconds:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
