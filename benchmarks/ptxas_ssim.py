"""Registers, spills and shared memory of the Triton SSIM GEMM kernel compiled for sm_90 (H100), no GPU needed.

For each precision and the tiles `bench_ssim --sweep` times ((BN, BM, num_warps, num_stages); the first is
the default), in both modes (the N x M matrix, the fused nearest-neighbour reduction).

    python -m benchmarks.ptxas_ssim [--arch 90]
"""
from __future__ import annotations

import argparse

from benchmarks._ptxas import cubin_usage
from benchmarks.bench_ssim import GEMM_SWEEP
from nfkernels.ssim_gemm_triton import KP, _ssim_gemm_kernel

ARGS = {"xmu_ptr": "*fp32", "xvar_ptr": "*fp32", "ymu_ptr": "*fp32", "yvar_ptr": "*fp32", "out_ptr": "*fp32",
        "out_stride": "i32", "best_ptr": "*fp32", "arg_ptr": "*i64", **dict.fromkeys(
            ("N", "M", "NP", "MP", "P", "row0", "col0", "m_step", "splits"), "i32"),
        **dict.fromkeys(("c1", "c2", "inv_scale", "lo_inv"), "fp32"),
        **dict.fromkeys(("KP", "BN", "BM", "SPLIT", "PRECISION", "REDUCE", "EXCLUDE_SELF"), "constexpr")}


def resource_usage(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int) -> dict:
    bn, bm, num_warps, num_stages = tiles
    split = precision == "fp16x3"
    operand = "*fp16" if split else "*fp32"
    signature = {**dict.fromkeys(("ah_ptr", "al_ptr", "bh_ptr", "bl_ptr"), operand), **ARGS}
    constexprs = {"KP": KP, "BN": bn, "BM": bm, "SPLIT": split, "PRECISION": "ieee" if split else precision,
                  "REDUCE": reduce, "EXCLUDE_SELF": reduce}
    return cubin_usage(_ssim_gemm_kernel, signature, constexprs, arch, num_warps=num_warps, num_stages=num_stages)


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
