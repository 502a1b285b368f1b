"""How much pooled covariance class-pca tokens need (TokenizerConfig.shrinkage), measured without a GPT.

With `--basis class-pca` a field's tokens are its class's principal components, each in units of its std, so a
generator that knows nothing but "every component is standard normal" already draws from a Gaussian per class.
Each class's covariance is mixed with `shrinkage` of the pooled within-class one first: a class's few fields
span only part of weight space, and a held-out field outside that part cannot be encoded. For each shrinkage this
fits the tokenizer on the quality run's training fields and measures
- de-tokenized PSNR of the training fields (first 1000) and of the held-out fields (encoded by the same tokenizer);
- standard normal components decoded through each class's basis (the class-blind generator above), scored like
  the quality harness's rows (main protocol classes, nfgen's classifier, SSIM MMD / COV / 1-NNA against the
  held-out images; one seed). Shrinkage 1 is one basis for all classes: a Gaussian with the pooled covariance.
- with --expected-from K1,K2,…: the same draws with every component from K on at its expected value, 0 (what
  `generate --weights expected --expected-from K` does with a GPT's means), scored alike.
- with --modes M1,M2,…: the same for tokenizers that split each class into M modes (TokenizerConfig.modes), each
  sample's mode drawn from its class's training frequencies first: a mixture of M Gaussians per class.
- --draws D scores D seeds of draws per row and reports their mean (and each seed's numbers).

    python -m benchmarks.class_pca_shrinkage [--config small] [--run-dir /tmp/q/run] [--shrinkage 0,0.05,0.2,0.5,1]
        [--expected-from 16,32,64] [--modes 1,4,8] [--draws 10]
        [--results benchmarks/results/class-pca-shrinkage-cpu.json]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks._env import environment, write_result
from benchmarks.quality import CONFIGS, Harness, Recipe, mean_std, split_rows
from nfgen.baselines import modes_as_classes
from nfgen.common import make_generator, pick_device
from nfgen.fields import load_fields, psnr, render_fields
from nfgen.tokenizer import TokenizerConfig, WeightTokenizer

DETOK_TRAIN = 1000  # training fields whose de-tokenized PSNR is measured (all would only take longer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--run-dir", default=None, help="the quality run directory (its fields are reused or built)")
    ap.add_argument("--shrinkage", default="0,0.05,0.2,0.5,1", help="comma list of TokenizerConfig.shrinkage")
    ap.add_argument("--expected-from", default="", help="comma list of K: also score the draws with components "
                    "≥ K at 0")
    ap.add_argument("--modes", default="1", help="comma list of TokenizerConfig.modes")
    ap.add_argument("--draws", type=int, default=1, help="seeds of draws scored per row (their mean is reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    cfg, dev = CONFIGS[args.config], pick_device(args.device)
    h = Harness(cfg, Path(args.run_dir or f"runs/quality-{args.config}"), dev, data_root=args.data_root)
    main_recipe = Recipe(init=cfg.main_init)
    fields = load_fields(h.fields(main_recipe))
    held = load_fields(h.fields(main_recipe, split="heldout"))
    held_images = h.heldout.images[split_rows(h.heldout, held)]
    refs = h.heldout.labels.sort().values
    classes = torch.cat([refs, torch.full_like(refs, -1)])  # the main protocol's: |Sr| per class + as many uncond.
    base = {**cfg.tokenize, "basis": "class-pca", "center": "class"}
    expected_from = [int(k) for k in args.expected_from.split(",") if k.strip()]
    rows = []
    for shrinkage in (float(s) for s in args.shrinkage.split(",")):
        for modes in (int(m) for m in args.modes.split(",")):
            rows.append(score_tokenizer(h, fields, held, held_images, classes, dev, shrinkage, modes,
                                        {**base, "shrinkage": shrinkage, "modes": modes}, expected_from, args.draws))
    if args.results:
        write_result(args.results, {**environment("benchmarks.class_pca_shrinkage", dev), "config": args.config,
                                    "tokenizer": base, "fields_psnr_train": float(fields.psnr.mean()),
                                    "fields_psnr_heldout": float(held.psnr.mean()), "n_classes_drawn": len(classes),
                                    "rows": rows})
    return 0


def score_tokenizer(h: Harness, fields, held, held_images, classes, dev, shrinkage: float, modes: int, tok_cfg: dict,
                    expected_from: list[int], n_draws: int) -> dict:
    """One row: the tokenizer's de-tokenized PSNR, and its standard normal components decoded and scored."""
    tok = WeightTokenizer.fit(fields.weights.to(dev), fields.spec, TokenizerConfig(**tok_cfg, quiet=True),
                              labels=fields.labels)
    first = slice(0, DETOK_TRAIN)
    detok_train = tok.decode(tok.encode(fields.weights[first].to(dev), fields.labels[first]), fields.labels[first])
    detok_held = tok.decode(tok.encode(held.weights.to(dev), held.labels), held.labels)
    train_psnr = psnr(render_fields(detok_train, fields.spec, fields.image_shape, device=dev).cpu(),
                      h.train_split.images[split_rows(h.train_split, fields)][first])
    held_psnr = psnr(render_fields(detok_held, held.spec, held.image_shape, device=dev).cpu(), held_images)
    train_modes = tok.assign_modes(fields.weights.to(dev), fields.labels)
    per_draw = {"all": []} | {str(k): [] for k in expected_from}
    for seed in range(n_draws):
        gen = make_generator(seed)
        drawn = tok.draw_classes(classes, gen)
        mode = None
        if train_modes is not None:  # each sample's mode from its class's training frequencies
            _, groups = modes_as_classes(tok, train_modes[:, None].cpu(), fields.labels, drawn, seed)
            mode = groups % modes
        z = torch.randn(len(drawn), tok.tokens_per_field, 1, generator=gen)  # a mode's position is not read

        def score(components):
            draws = tok.decode_vectors(components.to(dev), drawn, mode).cpu()
            images = render_fields(draws, fields.spec, fields.image_shape, device=dev)
            sub = replace(fields, weights=draws, labels=classes, psnr=torch.zeros(len(classes)), meta={})
            return {k: v for k, v in h.headline(h._evaluate(sub, images, seed)).items() if k != "cross_entropy"}

        per_draw["all"].append(score(z))
        for k in expected_from:
            coarse = z.clone()
            coarse[:, tok.lead + k:] = 0.0
            per_draw[str(k)].append(score(coarse))
    row = {"shrinkage": shrinkage, "modes": modes, "draws": n_draws,
           "detok_train_psnr": float(train_psnr.mean()), "detok_heldout_psnr": float(held_psnr.mean()),
           "detok_heldout_psnr_min": float(held_psnr.min()), "standard_components": mean_of(per_draw["all"])}
    print(f"shrinkage {shrinkage:g}, {modes} mode(s): de-tokenized {row['detok_train_psnr']:.2f} dB (train) / "
          f"{row['detok_heldout_psnr']:.2f} dB (held-out, min {row['detok_heldout_psnr_min']:.2f}); standard "
          f"components (mean of {n_draws} draw(s)): {brief(row['standard_components'])}", flush=True)
    for k in expected_from:
        row.setdefault("expected_from", {})[str(k)] = metrics = mean_of(per_draw[str(k)])
        print(f"  components from {k} on at 0: {brief(metrics)}", flush=True)
    if n_draws > 1:
        row["per_draw"] = per_draw
    return row


def mean_of(per_draw: list[dict]) -> dict:
    """Headline dicts of several draws → one of the same layout holding their means."""
    return {name: {part: mean_std([d[name][part] for d in per_draw])["mean"] for part in ("samples", "oracle")}
            for name in per_draw[0]}


def brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v['samples']:.3f}" for k, v in metrics.items()
                     if isinstance(v, dict) and v["samples"] is not None)


if __name__ == "__main__":
    raise SystemExit(main())
