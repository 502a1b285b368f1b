"""Which tokenizer and template a small GPT models best: the demo's pipeline once per variant.

Trains the demo's classifier once and fits the demo's fields once per template (`nfgen.demo`'s sizes: 2000
MNIST digits, a 2→16→16→1 SIREN, a 3-layer GPT trained for 1000 steps of 16): "random" is the fit's seeded
shared draw, "meta" the demo's template, learned by `nfgen template` on the same 2000 digits. Then for each
template × tokenizer it tokenizes, trains, generates and evaluates as the demo does, but samples raw or centred
codes at T 0.8 / top-k 3, the demo's sampling when its rows were measured (the demo has since moved to class-pca
tokens, measured by `nfgen demo` itself: benchmarks/results/demo-class-pca-cpu.json). Reports
fitted and de-tokenized PSNR, the GPT's losses and the class-conditional sample metrics. 7-20 minutes per
variant on a 2-core CPU.

    python -m benchmarks.demo_tokenizers --templates random --variants none:256,mean:256,mean:64 --results FILE
    python -m benchmarks.demo_tokenizers --templates random,meta --variants none:256 --results FILE
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks._env import environment, write_result
from nfgen import demo
from nfgen.classifier import run_classifier
from nfgen.fields import FitConfig, run_fit
from nfgen.generate import SampleConfig, run_generate
from nfgen.metrics import run_evaluate
from nfgen.template import run_template
from nfgen.tokenizer import TokenizerConfig, run_tokenize
from nfgen.train import TrainConfig, train

SAMPLE = dict(temperature=0.8, top_k=3)  # NeF-GPT's sampling settings, as the committed rows were measured


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="none:256,mean:256,mean:64", help="tokenizers center:K, comma-separated")
    ap.add_argument("--templates", default="random", help="shared inits, comma-separated: random (the seeded draw) "
                    "and/or meta (the demo's nfgen template)")
    ap.add_argument("--run-dir", default="runs/demo-tokenizers")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    root = Path(args.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    classifier = root / "classifier.safetensors"
    if not classifier.exists():
        run_classifier(demo.CLASSIFIER_SPLIT, demo.HELDOUT_SPLIT, classifier, epochs=None, seed=0, device="cpu",
                       data_root=args.data_root, quiet=True)
    rows = []
    for template, variant in [(t, v) for t in args.templates.split(",") for v in args.variants.split(",")]:
        if template not in ("random", "meta"):
            raise SystemExit(f"unknown template {template!r}; use random or meta")
        # the random template keeps the names of the runs before templates existed
        fields = root / ("fields.safetensors" if template == "random" else f"fields-{template}.safetensors")
        if not fields.exists():
            fit_cfg = FitConfig(**demo.FIT, device="cpu", quiet=True)
            if template == "meta":
                fit_cfg.template = str(root / "template.safetensors")
                if not Path(fit_cfg.template).exists():
                    run_template(demo.TRAIN_SPLIT, fit_cfg.template, demo.template_config(quiet=True),
                                 data_root=args.data_root)
            run_fit(demo.TRAIN_SPLIT, fields, fit_cfg, data_root=args.data_root)
        center, k = variant.split(":")
        name = f"{center}{k}" if template == "random" else f"{template}-{center}{k}"
        run, t0 = root / name, time.perf_counter()
        tok = run_tokenize(fields, run / "tokens.safetensors", TokenizerConfig(center=center, codebook_size=int(k)),
                           data_root=args.data_root, device="cpu", quiet=True)
        trained = train(run / "tokens.safetensors", run, TrainConfig(**demo.TRAIN, device="cpu", quiet=True))
        run_generate(run / "model.safetensors", run / "tokens.safetensors", run, per_class=demo.PER_CLASS,
                     unconditional=demo.UNCONDITIONAL, cfg=SampleConfig(**SAMPLE, quiet=True), device="cpu")
        metrics = run_evaluate(run / "samples.safetensors", run, ref_split=demo.REF_SPLIT,
                               train_split=demo.TRAIN_SPLIT, classifier_path=classifier, data_root=args.data_root,
                               device="cpu", seed=0, quiet=True)
        cond = metrics["groups"]["conditional_all"]
        row = {"variant": variant, "template": template, "detok_psnr": tok["detok_psnr"],
               "fields_psnr": tok["fields_psnr"],
               "train_loss": trained.get("train_loss"), "val_loss": trained.get("val_loss"),
               "accuracy": metrics["classifier"]["accuracy"]["samples"],
               "accuracy_oracle": metrics["classifier"]["accuracy"]["oracle"],
               **{m: cond[m]["samples"] for m in ("mmd", "cov", "1nna")},
               **{f"{m}_oracle": cond[m]["oracle"] for m in ("mmd", "cov", "1nna")},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{template:>6} {variant:>8}: fit {row['fields_psnr']:.2f} dB, detok {row['detok_psnr']:.2f} dB, "
              f"val loss {row['val_loss']:.3f}, accuracy {row['accuracy']:.3f}, MMD {row['mmd']:.3f}, "
              f"COV {row['cov']:.3f}, 1-NNA {row['1nna']:.3f} ({row['seconds']:.0f} s)", flush=True)
    if args.results:
        write_result(args.results, {**environment("benchmarks.demo_tokenizers", "cpu"), "demo": {
            "train_split": demo.TRAIN_SPLIT, "ref_split": demo.REF_SPLIT, "fit": demo.FIT, "train": demo.TRAIN,
            "sample": SAMPLE, "per_class": demo.PER_CLASS,
            "template": asdict(demo.template_config())}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
