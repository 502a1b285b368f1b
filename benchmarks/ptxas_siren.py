"""Registers, spills and dot shapes of the Triton SIREN register fit kernel compiled for sm_90 (H100), no GPU needed.

The dot shapes matter: Triton compiles a sum over a broadcast product into tt.dot, and with a reduction length
K of 1-4 (the output layer's outputs) that dot overcounted on the H100 (the interpreter cannot show it). Every dot
of the kernel should have K >= 16.

    python -m benchmarks.ptxas_siren [--arch 90] [--out FILE]
    python -m benchmarks.ptxas_siren --at 86d514f      # the version fit-h100-sweep.json timed

For the default SIREN it also counts the SASS instructions of the pixel-tile loop (forward and backward of
BLOCK_C pixels) with exact fp32 and with tf32 dots, and prints the issue-bound fit rate on 28 x 28 images on an
H100 SXM (every instruction one issue slot; the Adam update between steps not counted): an upper bound from a
static count, not a measurement. --at compiles the kernel as of an older commit, to compare it with today's.
"""
from __future__ import annotations

import argparse
import inspect
import json

import triton

from benchmarks._env import environment, write_result
from benchmarks._ptxas import H100_ISSUE_PER_S, compile_for, dot_shapes, module_at, the_inner_loop, usage
from nfkernels import siren_triton
from nfkernels.siren import SirenSpec

POINTERS = ("p_ptr", "m_ptr", "v_ptr", "loss_ptr", "x_ptr", "y_ptr", "bc_ptr")
# (in_dim, hidden, sine layers, out_dim): the default SIREN, RGB / 3-D inputs, one layer, the widest
SPECS = [(2, 32, 2, 1), (3, 48, 2, 3), (2, 32, 1, 1), (2, 64, 2, 3), (1, 16, 1, 2)]


def regs_kernel_report(spec: tuple[int, int, int, int], arch: int = 90, num_warps: int = 4, precision: str = "ieee",
                       loops: bool = False, module=siren_triton, block_c: int | None = None, **knobs) -> dict:
    """knobs: further constexprs of the kernel (SINCOS, DEFER, MOMENTS), for the versions that have them."""
    in_dim, hidden, layers, out_dim = spec
    hp, default_block_c = module._launch_shape(SirenSpec(in_dim, hidden, layers, out_dim))
    block_c = block_c or default_block_c
    kernel = module._fit_kernel_regs
    names = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    types = {**dict.fromkeys(POINTERS, "*fp32"), "act_ptr": "*i8", **dict.fromkeys(("N", "C", "P", "n_steps"), "i32"),
             **dict.fromkeys(("lr", "beta1", "beta2", "eps", "omega0", "grad_scale", "inv_count"), "fp32")}
    signature = {n: types.get(n, "constexpr") for n in names}
    constexprs = dict(HAS_ACTIVE=True, IN=in_dim, INP=triton.next_power_of_2(in_dim), H=hidden, HP=hp, NS=layers,
                      OUT=out_dim, OUTP=triton.next_power_of_2(out_dim), BLOCK_C=block_c, PRECISION=precision)
    constexprs.update({n: p.default for n, p in names.items() if p.default is not inspect.Parameter.empty}, **knobs)
    compiled = compile_for(kernel, signature, constexprs, arch, num_warps=num_warps)
    report = {"spec": list(spec), "dots_mkn": dot_shapes(compiled.asm["ttgir"]),
              "shared_bytes": compiled.metadata.shared}
    if loops:  # the innermost loop is the pixel-tile loop: one trip is forward and backward of block_c pixels
        loop = the_inner_loop(compiled)
        resources = usage(compiled)
        report.update(block_c=block_c, num_warps=num_warps, tile_instructions=loop["instructions"],
                      tile_ops=loop["ops"], registers=resources["registers"], stack_bytes=resources["stack_bytes"])
    return report


# The regs kernel's code variants (siren_triton.siren_fit_steps: sincos, defer_sums, moments), one change at a time
VARIANTS = {"poly": dict(SINCOS="poly", DEFER=False, MOMENTS="regs"),
            "mufu": dict(SINCOS="mufu", DEFER=False, MOMENTS="regs"),
            "mufu+defer": dict(SINCOS="mufu", DEFER=True, MOMENTS="regs"),
            "mufu+defer+memory": dict(SINCOS="mufu", DEFER=True, MOMENTS="memory")}


def tile_loops(arch: int = 90, module=siren_triton, variants=VARIANTS) -> list[dict]:
    """The pixel-tile loop of the default SIREN for each dot precision (at the block_c siren_fit_steps launches
    it with) and code variant: SASS instructions a thread, registers, spills, and the issue bound on 28 x 28."""
    pixels, loops = 28 * 28, []
    kernel = module._fit_kernel_regs
    has_knobs = "SINCOS" in inspect.signature(getattr(kernel, "fn", kernel)).parameters  # older versions: no variants
    for precision, block_c in (("ieee", 64), ("tf32", 16)):
        for name, knobs in (variants.items() if has_knobs else [("poly", {})]):
            if precision == "ieee" and name not in ("poly", "mufu+defer+memory"):
                continue
            r = regs_kernel_report(SPECS[0], arch, precision=precision, loops=True, module=module, block_c=block_c,
                                   **knobs)
            trips = -(-pixels // r["block_c"])
            instructions_per_pixel = r["tile_instructions"] * 32 * r["num_warps"] / r["block_c"]
            r.update(precision=precision, variant=name, instructions_per_pixel=instructions_per_pixel,
                     bound_field_steps_per_s=H100_ISSUE_PER_S / (trips * r["tile_instructions"] * 32 * r["num_warps"]))
            loops.append(r)
    return loops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: H100)")
    ap.add_argument("--json", action="store_true", help="one JSON object (dot shapes, tile loops) instead of a table")
    ap.add_argument("--at", default=None, help="compile nfkernels/siren_triton.py as of this git commit")
    ap.add_argument("--out", default=None, help="write every report as JSON here")
    args = ap.parse_args(argv)
    module = module_at(args.at, "nfkernels/siren_triton.py", siren_triton)
    reports = [regs_kernel_report(spec, args.arch, module=module) for spec in SPECS]
    loops = tile_loops(args.arch, module)
    if args.json:
        print(json.dumps({"specs": reports, "pixel_tile_loops": loops}))
        return 0
    for r in reports:
        print(f"spec {r['spec']}: dots (M, K, N) {r['dots_mkn']}, shared {r['shared_bytes']} B")
    for r in loops:
        ops = r["tile_ops"]
        print(f"spec {r['spec']} {r['precision']} {r['variant']}: {r['block_c']}-pixel tile loop "
              f"{r['tile_instructions']} SASS instructions a thread ({r['instructions_per_pixel']:.0f} a pixel; "
              f"{ops.get('FFMA', 0)} FFMA, {ops.get('HMMA', 0)} HMMA, {ops.get('MUFU', 0)} MUFU, {ops.get('SHFL', 0)} "
              f"SHFL, {ops.get('BAR', 0)} BAR), {r['registers']} registers, {r['stack_bytes']} B stack; issue bound "
              f"on 28 x 28 on an H100: {r['bound_field_steps_per_s'] / 1e6:.1f} M field-steps/s")
    if args.out:
        write_result(args.out, {**environment("benchmarks.ptxas_siren", "cpu"), "target": f"sm_{args.arch}",
                                "kernel_at": args.at or "HEAD", "issue_per_s": H100_ISSUE_PER_S, "specs": reports,
                                "pixel_tile_loops": loops})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
