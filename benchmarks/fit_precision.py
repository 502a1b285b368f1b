"""Does a tensor-core fit keep the fields? The quality run's fit recipe at each Triton dot precision.

Learns the full quality config's Reptile template on mnist:test[:8000] (nfgen.template, fp32), then fits
those 8000 images from it (120 Adam steps, lr 1e-3, the Triton backend) with the hidden×hidden products in
fp32 ("ieee"), "tf32" and "tf32x3", and prints each fit's mean / min PSNR, its seconds and its distance from
the fp32 weights. Issue 3 keeps a mixed-precision fit where the PSNR stays within 0.1 dB of fp32. On a GPU it
also fits in fp32 and tf32 with the register kernel's fast code variant (siren_triton.FAST_VARIANT: MUFU sines,
sums over pixels deferred to once a step, Adam moments in memory), to see that it keeps the fields too.

    python -m benchmarks.fit_precision [--device cuda] [--n 8000] [--out benchmarks/results/fit-precision-<dev>.json]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks._env import environment, write_result
from nfgen.data import load_split
from nfgen.fields import FitConfig, fit_fields
from nfkernels import siren_triton
from nfgen.template import TemplateConfig, run_template

PRECISIONS = ("ieee", "tf32", "tf32x3")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=8000, help="images of mnist:test fitted (default 8000)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--outer", type=int, default=200, help="Reptile iterations of the template (default 200)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    split = f"mnist:test[:{args.n}]"
    images = load_split(split).images
    rows, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "template.safetensors"
        run_template(split, template, TemplateConfig(outer=args.outer, lr=1e-3, device=args.device, quiet=True))
        runs = [(p, "default") for p in PRECISIONS]
        if args.device.startswith("cuda"):
            runs += [(p, "mufu+defer+memory") for p in ("ieee", "tf32")]
        for precision, variant in runs:
            siren_triton.REGS_VARIANT = dict(siren_triton.FAST_VARIANT if variant != "default"
                                             else siren_triton.DEFAULT_VARIANT)
            cfg = FitConfig(steps=args.steps, lr=1e-3, template=str(template), backend="triton",
                            dot_precision=precision, device=args.device, quiet=True)
            fit_fields(images[:64], cfg)  # compiles the kernel outside the timing
            res = fit_fields(images, cfg)
            ref = res if ref is None else ref
            row = {"dot_precision": precision, "variant": variant, "n": args.n, "steps": args.steps,
                   "seconds": res.seconds,
                   "psnr_mean": res.psnr.mean().item(), "psnr_min": res.psnr.min().item(),
                   "psnr_mean_minus_fp32": (res.psnr.mean() - ref.psnr.mean()).item(),
                   "max_abs_weight_diff_vs_fp32": (res.weights - ref.weights).abs().max().item(),
                   "failed": len(res.failed)}
            rows.append(row)
            print(f"{precision:7s} {variant:18s} {row['seconds']:6.2f} s  PSNR mean {row['psnr_mean']:.3f} dB "
                  f"({row['psnr_mean_minus_fp32']:+.3f} vs fp32), min {row['psnr_min']:.2f}, "
                  f"max |Δw| vs fp32 {row['max_abs_weight_diff_vs_fp32']:.2e}", flush=True)
    if args.out:
        write_result(args.out, {**environment("benchmarks.fit_precision", args.device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
