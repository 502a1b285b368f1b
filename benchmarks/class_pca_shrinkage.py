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

    python -m benchmarks.class_pca_shrinkage [--config small] [--run-dir /tmp/q/run] [--shrinkage 0,0.05,0.2,0.5,1]
        [--expected-from 16,32,64] [--results benchmarks/results/class-pca-shrinkage-cpu.json]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks._env import environment, write_result
from benchmarks.quality import CONFIGS, Harness, Recipe, split_rows
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
        tok_cfg = TokenizerConfig(**{**base, "shrinkage": shrinkage}, quiet=True)
        tok = WeightTokenizer.fit(fields.weights.to(dev), fields.spec, tok_cfg, labels=fields.labels)
        first = slice(0, DETOK_TRAIN)
        detok_train = tok.decode(tok.encode(fields.weights[first].to(dev), fields.labels[first]), fields.labels[first])
        detok_held = tok.decode(tok.encode(held.weights.to(dev), held.labels), held.labels)
        train_psnr = psnr(render_fields(detok_train, fields.spec, fields.image_shape, device=dev).cpu(),
                          h.train_split.images[split_rows(h.train_split, fields)][first])
        held_psnr = psnr(render_fields(detok_held, held.spec, held.image_shape, device=dev).cpu(), held_images)
        gen = make_generator(0)
        drawn = tok.draw_classes(classes, gen)
        z = torch.randn(len(drawn), fields.spec.num_params, 1, generator=gen)

        def score(components):
            draws = tok.decode_vectors(components.to(dev), drawn).cpu()
            images = render_fields(draws, fields.spec, fields.image_shape, device=dev)
            sub = replace(fields, weights=draws, labels=classes, psnr=torch.zeros(len(classes)), meta={})
            return {k: v for k, v in h.headline(h._evaluate(sub, images, 0)).items() if k != "cross_entropy"}

        metrics = score(z)
        rows.append({"shrinkage": shrinkage, "detok_train_psnr": float(train_psnr.mean()),
                     "detok_heldout_psnr": float(held_psnr.mean()), "detok_heldout_psnr_min": float(held_psnr.min()),
                     "standard_components": metrics})
        print(f"shrinkage {shrinkage:g}: de-tokenized {rows[-1]['detok_train_psnr']:.2f} dB (train) / "
              f"{rows[-1]['detok_heldout_psnr']:.2f} dB (held-out, min {rows[-1]['detok_heldout_psnr_min']:.2f}); "
              f"standard components: {brief(metrics)}", flush=True)
        for k in expected_from:
            coarse = z.clone()
            coarse[:, k:] = 0.0
            rows[-1].setdefault("expected_from", {})[str(k)] = metrics = score(coarse)
            print(f"  components from {k} on at 0: {brief(metrics)}", flush=True)
    if args.results:
        write_result(args.results, {**environment("benchmarks.class_pca_shrinkage", dev), "config": args.config,
                                    "tokenizer": base, "fields_psnr_train": float(fields.psnr.mean()),
                                    "fields_psnr_heldout": float(held.psnr.mean()), "n_classes_drawn": len(classes),
                                    "rows": rows})
    return 0


def brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v['samples']:.3f}" for k, v in metrics.items()
                     if isinstance(v, dict) and v["samples"] is not None)


if __name__ == "__main__":
    raise SystemExit(main())
