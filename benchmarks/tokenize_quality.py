"""How much of a fitted field survives tokenization: de-tokenized PSNR per fit recipe and tokenizer option.

Fits the same images with each fit recipe, learns each tokenizer on the fitted weights and reports the PSNR of
the rendered de-tokenized fields against the images, beside the fitted fields' own PSNR. Also reports how far
the fields move from their mean field (rms), and the plug-in entropy of each position's token marginal (nats,
averaged over positions): the loss of a model that knows the position only, a rough measure of how much the
GPT has to learn per token (biased low when K approaches the number of fields).

    python -m benchmarks.tokenize_quality                 # 1000 MNIST fields, CPU: ~5 min on 2 cores
    python -m benchmarks.tokenize_quality --n 128 --recipes 100:1e-3 --variants mean:256,none:256
    python -m benchmarks.tokenize_quality --n 2000 --recipes 100:1e-3 --template meta   # fits from a Reptile template

`--template` sets the shared init every fit starts from: the fit's seeded random draw (default), "mean" (a
field fitted to the images' mean) or "meta" (`nfgen template` with its defaults and the first recipe's lr,
learned on the same images; benchmarks.template_proxy's make_template).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks._env import environment, write_result
from benchmarks.template_proxy import make_template
from nfgen.common import pick_device
from nfgen.data import load_split
from nfgen.fields import FitConfig, fit_fields, psnr, render_fields
from nfgen.template import TemplateConfig
from nfgen.tokenizer import TokenizerConfig, WeightTokenizer

RECIPES = "100:1e-3,200:1e-3,200:1.5e-3,300:3e-3"  # steps:lr
# center:K[:group] (group 1 = scalar VQ)
VARIANTS = "none:256,mean:16,mean:64,mean:256,mean:1024,mean:256:3,mean:256:5"


def parse_variant(text: str) -> TokenizerConfig:
    center, k, *group = text.split(":")
    return TokenizerConfig(center=center, codebook_size=int(k), group=int(group[0]) if group else 1, quiet=True)


def position_entropy(tokens: torch.Tensor, n_codes: int) -> float:
    """Mean over positions of the plug-in entropy (nats) of that position's token histogram."""
    n, length = tokens.shape
    counts = torch.zeros(length, n_codes, dtype=torch.float64)
    counts.scatter_add_(1, tokens.t().cpu(), torch.ones(length, n, dtype=torch.float64))
    p = counts / n
    return float(-(p * p.clamp_min(1e-300).log()).sum(1).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default=None, help="images to fit (default: mnist:test[:N])")
    ap.add_argument("--n", type=int, default=1000, help="number of MNIST test images when --split is not given")
    ap.add_argument("--recipes", default=RECIPES, help=f"fit recipes steps:lr, comma-separated ({RECIPES})")
    ap.add_argument("--variants", default=VARIANTS, help=f"tokenizers center:K[:group] ({VARIANTS})")
    ap.add_argument("--template", default="random", choices=("random", "mean", "meta"),
                    help="shared init of the fits (default: random, the fit's seeded draw)")
    ap.add_argument("--outer", type=int, default=TemplateConfig.outer, help="Reptile iterations of --template meta")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    split_spec = args.split or f"mnist:test[:{args.n}]"
    images = load_split(split_spec, data_root=args.data_root).images
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    recipes = [(int(steps), float(lr)) for steps, lr in (r.split(":") for r in args.recipes.split(","))]
    base = FitConfig(steps=recipes[0][0], lr=recipes[0][1], device=str(device), quiet=True)
    tmp = tempfile.TemporaryDirectory()
    template, template_seconds = make_template(args.template, images.float(), base,
                                               TemplateConfig(outer=args.outer, lr=base.lr, device=str(device),
                                                              quiet=True), Path(tmp.name))
    print(f"{'fit':>12} {'fit dB':>7} {'Δrms':>7}  " + " ".join(f"{v:>13}" for v in variants))
    for steps, lr in recipes:
        recipe = f"{steps}:{lr:g}"
        t0 = time.perf_counter()
        fit = fit_fields(images, replace(base, steps=steps, lr=lr, template=str(template) if template else None))
        fit_seconds = time.perf_counter() - t0
        weights = fit.weights.to(device)
        row = {"steps": steps, "lr": lr, "fit_psnr": float(fit.psnr.mean()),
               "fit_psnr_min": float(fit.psnr.min()), "fit_seconds": round(fit_seconds, 2),
               "offset_rms": float((weights - weights.mean(0)).pow(2).mean().sqrt()),
               "weight_rms": float(weights.pow(2).mean().sqrt()), "tokenizers": {}}
        for name in variants:
            cfg = parse_variant(name)
            tok = WeightTokenizer.fit(weights, fit.spec, cfg)
            tokens = tok.encode(weights)
            rendered = render_fields(tok.decode(tokens), fit.spec, tuple(images.shape[1:]), device=device)
            detok = psnr(rendered.cpu(), images)
            row["tokenizers"][name] = {"detok_psnr": float(detok.mean()), "detok_psnr_min": float(detok.min()),
                                       "tokens_per_field": tok.tokens_per_field,
                                       "position_entropy_nats": position_entropy(tokens, tok.n_codes)}
        rows.append(row)
        cells = " ".join(f"{row['tokenizers'][v]['detok_psnr']:13.2f}" for v in variants)
        print(f"{recipe:>12} {row['fit_psnr']:7.2f} {row['offset_rms']:7.4f}  {cells}", flush=True)

    if args.results:
        write_result(args.results, {**environment("benchmarks.tokenize_quality", device), "split": split_spec,
                                    "n_fields": int(images.shape[0]), "variants": variants,
                                    "template": {"kind": args.template, "seconds": round(template_seconds, 1),
                                                 **({"outer": args.outer, "lr": base.lr}
                                                    if args.template == "meta" else {})},
                                    "rows": rows})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
