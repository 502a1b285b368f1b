"""Registers, spills, shared memory and pixel-loop instructions of the Triton SSIM GEMM kernel compiled for sm_90
(H100), no GPU needed.

For each layout ("patches": windows laid out once, _ssim_gemm_kernel; "images": windows gathered from the
images, _ssim_gather_kernel), precision and the tiles `bench_ssim --sweep` times ((BN, BM, num_warps,
num_stages); the first is the default), in both modes (the N x M matrix, the fused nearest-neighbour reduction).

It also counts the SASS instructions of the loop over output pixels (the GEMMs and the SSIM formula for a tile
of pairs) and prints the issue-bound time of a 10k x 10k MNIST matrix on an H100 SXM (every instruction one
issue slot; benchmarks._ptxas.H100_ISSUE_PER_S): an upper bound from a static count, not a measurement.
--at compiles the kernel as of an older commit, to compare it with today's the same way.

    python -m benchmarks.ptxas_ssim [--arch 90] [--out FILE]
    python -m benchmarks.ptxas_ssim --at 0a2f01b      # before the SSIM formula was folded (commit fbfa6dd)
"""
from __future__ import annotations

import argparse

from benchmarks._env import environment, write_result
from benchmarks._ptxas import H100_ISSUE_PER_S, compile_for, module_at, the_inner_loop, usage
from benchmarks.bench_ssim import GEMM_SWEEP
from nfkernels import ssim_gemm_triton
from nfkernels.ssim_gemm_triton import KP

ARGS = {"xmu_ptr": "*fp32", "xvar_ptr": "*fp32", "ymu_ptr": "*fp32", "yvar_ptr": "*fp32", "out_ptr": "*fp32",
        "out_stride": "i32", "best_ptr": "*fp32", "arg_ptr": "*i64", **dict.fromkeys(
            ("N", "M", "NP", "MP", "P", "row0", "col0", "m_step", "splits"), "i32"),
        **dict.fromkeys(("c1", "c2", "inv_scale", "lo_inv"), "fp32"),
        **dict.fromkeys(("KP", "BN", "BM", "SPLIT", "PRECISION", "REDUCE", "EXCLUDE_SELF"), "constexpr")}
MNIST_PIXELS = 18 * 18  # output pixels of a 28 x 28 image: the 11 x 11 window's 5-pixel border is cropped


def _compile(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int, module=ssim_gemm_triton,
             layout: str = "patches"):
    bn, bm, num_warps, num_stages = tiles
    split = precision == "fp16x3"
    operand = "*fp16" if split else "*fp32"
    constexprs = {"KP": KP, "BN": bn, "BM": bm, "SPLIT": split, "PRECISION": "ieee" if split else precision,
                  "REDUCE": reduce, "EXCLUDE_SELF": reduce}
    if layout == "images":  # 28 x 28 MNIST: windows gathered from the images, the y side fp32
        args = {k: v for k, v in ARGS.items() if k != "P"}
        signature = {"xh_ptr": operand, "xl_ptr": operand, "y_ptr": "*fp32", "wk_ptr": "*fp32", **args,
                     "lo_scale": "fp32", **dict.fromkeys(("C", "H", "W", "K"), "constexpr"), "KP": "constexpr"}
        constexprs.update(C=1, H=28, W=28, K=11, APPROX=module.APPROX_DIV)
        signature["APPROX"] = "constexpr"
        return compile_for(module._ssim_gather_kernel, signature, constexprs, arch, num_warps=num_warps,
                           num_stages=num_stages)
    signature = {**dict.fromkeys(("ah_ptr", "al_ptr", "bh_ptr", "bl_ptr"), operand), **ARGS}
    if hasattr(module, "APPROX_DIV"):  # commits before the Triton 3.6 fallback had no APPROX argument
        signature["APPROX"] = "constexpr"
        constexprs["APPROX"] = module.APPROX_DIV
    return compile_for(module._ssim_gemm_kernel, signature, constexprs, arch, num_warps=num_warps,
                       num_stages=num_stages)


def _pixel_loop(kernel, tiles: tuple[int, int, int, int]) -> dict:
    loop = the_inner_loop(kernel)
    bn, bm, num_warps, _ = tiles
    return {**loop, "per_pair_pixel": loop["instructions"] / (bn * bm / (32 * num_warps))}


def resource_usage(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int,
                   layout: str = "patches") -> dict:
    return usage(_compile(precision, tiles, reduce, arch, layout=layout))


def pixel_loop(precision: str, tiles: tuple[int, int, int, int], reduce: bool, arch: int,
               layout: str = "patches") -> dict:
    """The output-pixel loop's SASS: {"instructions" (per thread and trip), "per_pair_pixel", "ops"}."""
    return _pixel_loop(_compile(precision, tiles, reduce, arch, layout=layout), tiles)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    ap.add_argument("--at", default=None, help="compile nfkernels/ssim_gemm_triton.py as of this git commit")
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    args = ap.parse_args(argv)
    module = module_at(args.at, "nfkernels/ssim_gemm_triton.py", ssim_gemm_triton)
    rows = []
    for layout, precision, configs in GEMM_SWEEP:
        if layout == "images" and not hasattr(module, "_ssim_gather_kernel"):
            continue  # an older commit, before the gather kernel
        for tiles in configs:
            for reduce in (False, True):
                kernel = _compile(precision, tiles, reduce, args.arch, module, layout)
                use, loop = usage(kernel), _pixel_loop(kernel, tiles)
                seconds = 1e8 * MNIST_PIXELS * loop["per_pair_pixel"] / H100_ISSUE_PER_S
                rows.append({"layout": layout, "precision": precision, "tiles": list(tiles),
                             "mode": "reduce" if reduce else "matrix", **use, "per_pair_pixel": loop["per_pair_pixel"],
                             "loop_ops": loop["ops"], "bound_10k_s": seconds})
                print(f"{layout} {precision} tiles {tiles} {rows[-1]['mode']:6s}: {use['registers']:3d} registers, "
                      f"{use['stack_bytes']:4d} B stack{'  (spills)' if use['stack_bytes'] else '':10s} "
                      f"{use['shared_bytes'] // 1024:3d} KB shared; pixel loop {loop['per_pair_pixel']:5.1f} SASS "
                      f"instructions a pair and pixel ({loop['ops'].get('HGMMA', 0)} HGMMA a trip), issue bound "
                      f"for 10k x 10k MNIST on an H100 {seconds:.3f} s", flush=True)
    if args.out:
        write_result(args.out, {**environment("benchmarks.ptxas_ssim", "cpu"), "target": f"sm_{args.arch}",
                                "kernel_at": args.at or "HEAD", "issue_per_s": H100_ISSUE_PER_S, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
