"""How learnable each template's fields are, without training a GPT: a weight-space Gaussian as the stand-in.

For each shared init ("random": the fit's seeded SIREN draw; "mean": a field fitted to the training split's
mean image; "meta": `nfgen template`'s Reptile template) it fits the training images with nfgen's fit
stage, then measures
- fitted PSNR (mean / min) and the rms offset of the weights from the template;
- R²: how much of the offsets' variance a ridge map from the images' top 100 pixel PCs explains (fitted on
  80 % of the fields, scored on the rest): a field's weights as a function of its image;
- a per-class Gaussian in weight space (each class's sample mean and covariance), sampled, rendered and
  scored with nfgen.metrics against held-out images: MMD / COV / 1-NNA. A generative model of weights
  makes the same kind of mistakes as this one where the weights carry variance that does not show in the
  image, so its samples' noise tracks how learnable the fields are.
- the fields themselves after scalar VQ (`TokenizerConfig()`: 256 raw codes): de-tokenized PSNR and the
  same three metrics for as many de-tokenized training fields as there are references.
Reference rows: the same Gaussian on pixels, and real training images (the oracle).
`--clamp-margins` repeats every template at each `FitConfig.clamp_margin` (the template learned with it too).

    python -m benchmarks.template_proxy [--n 2000] [--templates random,mean,meta] [--clamp-margins 0,0.3]
        [--results FILE]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks._env import environment, write_result
from nfgen.baselines import gaussian_samples
from nfgen.common import make_generator
from nfgen.data import load_split
from nfgen.fields import (FitConfig, fit_fields, fit_targets, psnr, render_fields, save_fields, spec_for_images,
                          template_weights)
from nfgen.metrics import distance_metrics
from nfgen.render import save_grid
from nfgen.template import TemplateConfig, meta_template
from nfgen.tokenizer import TokenizerConfig, WeightTokenizer

PIXEL_PCS = 100
MEAN_FIT_STEPS = 500


def linear_r2(offsets: torch.Tensor, images: torch.Tensor, n_pc: int = PIXEL_PCS, ridge: float = 1e-2) -> float:
    """R² on the last 20 % of fields of a ridge map from the top `n_pc` pixel PCs to the offsets (fitted on 80 %)."""
    n = offsets.shape[0]
    cut = int(0.8 * n)
    x = images.reshape(n, -1).double()
    mu = x[:cut].mean(0)
    _, _, v = torch.pca_lowrank(x[:cut] - mu, q=min(n_pc, cut - 1, x.shape[1]), center=False)
    z = torch.cat([(x - mu) @ v, torch.ones(n, 1, dtype=torch.float64)], 1)
    y = offsets.double()
    a = torch.linalg.solve(z[:cut].T @ z[:cut] + ridge * cut * torch.eye(z.shape[1], dtype=torch.float64),
                           z[:cut].T @ y[:cut])
    residual = (y[cut:] - z[cut:] @ a).pow(2).sum()
    total = (y[cut:] - y[:cut].mean(0)).pow(2).sum()
    return float(1 - residual / total)


def make_template(kind: str, images: torch.Tensor, fit: FitConfig, tmpl: TemplateConfig, folder: Path):
    """→ (template file or None for the seeded draw, seconds)."""
    t0 = time.perf_counter()
    if kind == "random":
        return None, 0.0
    if kind == "mean":
        mean_image = fit_targets(images.float(), fit.clamp_margin).mean(0, keepdim=True)
        theta = fit_fields(mean_image, replace(fit, steps=MEAN_FIT_STEPS, clamp_margin=0.0)).weights
    elif kind == "meta":
        theta, _ = meta_template(images, tmpl)
    else:
        raise SystemExit(f"unknown template {kind!r}; use random, mean or meta")
    shape = tuple(images.shape[1:])
    spec = spec_for_images(shape, fit.hidden, fit.hidden_layers, fit.omega0)
    path = save_fields(folder / f"template-{kind}.safetensors", theta, torch.tensor([-1]), torch.zeros(1), spec,
                       shape, {"kind": "template"})
    return path, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="training images mnist:test[:n]")
    ap.add_argument("--refs", default="mnist:test[8000:8400]", help="held-out images the samples are scored against")
    ap.add_argument("--templates", default="random,mean,meta")
    ap.add_argument("--clamp-margins", default="0", help="comma list of FitConfig.clamp_margin values")
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--outer", type=int, default=TemplateConfig.outer)
    ap.add_argument("--inner-steps", type=int, default=TemplateConfig.inner_steps)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None, help="write the rows as JSON here (and the samples as PNG beside)")
    args = ap.parse_args(argv)
    train = load_split(f"mnist:test[:{args.n}]", data_root=args.data_root)
    refs = load_split(args.refs, data_root=args.data_root).images.float()
    images, labels, shape = train.images.float(), train.labels, tuple(train.images.shape[1:])
    per_class = max(2, refs.shape[0] // 10)
    fit = FitConfig(steps=args.fit_steps, lr=args.lr, device="cpu", quiet=True)
    tmpl = TemplateConfig(outer=args.outer, inner_steps=args.inner_steps, lr=args.lr, device="cpu", quiet=True)

    rows = []
    oracle = torch.randperm(args.n, generator=make_generator(2))[:refs.shape[0]]
    classes = labels.unique().repeat_interleave(per_class)
    pixel = gaussian_samples(images.reshape(args.n, -1), labels, classes, make_generator(1)).reshape(-1, *shape)
    for name, sample in (("oracle (real training images)", images[oracle]), ("Gaussian on pixels", pixel.clamp(0, 1))):
        rows.append({"template": name, **{f"gauss_{k}": v for k, v in distance_metrics(sample, refs).items()}})
        print(rows[-1], flush=True)
    grids, grid_labels = [], []
    tokenizer = TokenizerConfig()
    with tempfile.TemporaryDirectory() as tmp:
        for margin in (float(m) for m in args.clamp_margins.split(",")):
            for kind in args.templates.split(","):
                fit_m = replace(fit, clamp_margin=margin)
                path, t_template = make_template(kind, images, fit_m, replace(tmpl, clamp_margin=margin), Path(tmp))
                cfg = replace(fit_m, template=None if path is None else str(path))
                result = fit_fields(images, cfg)
                offsets = result.weights - template_weights(cfg, result.spec)
                draws = gaussian_samples(result.weights, labels, classes, make_generator(1))
                rendered = render_fields(draws, result.spec, shape)
                vq = WeightTokenizer.fit(result.weights, result.spec, tokenizer)
                detok = render_fields(vq.decode(vq.encode(result.weights)), result.spec, shape)
                shown = min(per_class, 8)
                grids.append(rendered.reshape(-1, per_class, *shape)[:, :shown].reshape(-1, *shape))
                grid_labels += [f"{kind} m{margin:g} {c}" for c in labels.unique().tolist()]
                rows.append({"template": kind, "clamp_margin": margin, "template_seconds": round(t_template, 1),
                             "fit_seconds": round(result.seconds, 1), "psnr_mean": float(result.psnr.mean()),
                             "psnr_min": float(result.psnr.min()),
                             "offset_rms": float(offsets.pow(2).mean().sqrt()), "r2": linear_r2(offsets, images),
                             **{f"gauss_{k}": v for k, v in distance_metrics(rendered, refs).items()},
                             "detok_psnr_mean": float(psnr(detok, images).mean()),
                             **{f"detok_{k}": v for k, v in distance_metrics(detok[oracle], refs).items()}})
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    if args.results:
        png = Path(args.results).with_suffix(".png")
        save_grid(torch.cat(grids), png, nrow=shown, row_labels=grid_labels)
        write_result(args.results, {**environment("benchmarks.template_proxy", "cpu"),
                                    "n_train": args.n, "refs": args.refs,
                                    "fit": {"steps": args.fit_steps, "lr": args.lr},
                                    "tokenizer": asdict(tokenizer),
                                    "template": {"outer": args.outer, "inner_steps": args.inner_steps,
                                                 "batch": tmpl.batch, "meta_lr": tmpl.meta_lr},
                                    "per_class": per_class, "pixel_pcs": PIXEL_PCS, "samples_png": str(png),
                                    "samples_png_rows": "per clamp margin, template and class: Gaussian samples",
                                    "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
