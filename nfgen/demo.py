"""`nfgen demo`: the whole pipeline, small enough for about 10 minutes on a 2-core CPU.

The sizes are the only thing that differs from a full run: fewer fields, a small GPT, fewer steps.
On a CUDA GPU the same command runs the same sizes, faster.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from nfgen.classifier import run_classifier
from nfgen.common import pick_device
from nfgen.data import load_split
from nfgen.fields import FitConfig, run_fit
from nfgen.generate import SampleConfig, run_generate
from nfgen.io import check_writable, make_dir, write_json
from nfgen.metrics import run_evaluate
from nfgen.tokenizer import TokenizerConfig, run_tokenize
from nfgen.train import TrainConfig, train

TRAIN_SPLIT = "mnist:test[:2000]"
REF_SPLIT = "mnist:test[8000:8500]"
CLASSIFIER_SPLIT = "mnist:test[:8000]"
HELDOUT_SPLIT = "mnist:test[8000:]"
# A 2→16→16→1 SIREN (337 weights, so 339-token sequences) and a 3-layer GPT keep the CPU demo near 10 minutes:
# a training step of the default 1187-token sequences costs several seconds on 2 cores.
# Fewer, gentler fit steps keep every field near the shared template: weights that are easier to model.
FIT = dict(hidden=16, steps=100, lr=1e-3)
TOKENIZE: dict = {}
# Code ids only: at this size embedding the code values lowered accuracy (0.395 against 0.535,
# benchmarks/results/demo-value-embed-cpu.json), unlike at the default GPT size. The class embedding (nfgen
# train's default) raised it to 0.67 (benchmarks/results/demo-class-embed-cpu.json).
TRAIN = dict(n_layer=3, n_head=3, n_embd=96, value_embed=False, steps=1000, batch_size=16, lr=3e-3, warmup=50,
             eval_every=100, checkpoint_every=1000)
SAMPLE = dict(temperature=0.8, top_k=3)  # NeF-GPT's sampling settings: fidelity over coverage
PER_CLASS = 20
UNCONDITIONAL = 100


def run_demo(run: Path, *, data_root=None, device: str = "auto", quiet: bool = False, download: bool = False) -> dict:
    dev = str(pick_device(device))
    for split in (TRAIN_SPLIT, REF_SPLIT):  # missing data is refused before the run folder holds anything
        load_split(split, data_root=data_root, download=download)
    check_writable(run / "demo.config.json")
    make_dir(run)
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 1)
        t = now

    fit_cfg = FitConfig(**FIT, device=dev, quiet=quiet)
    tok_cfg = TokenizerConfig(**TOKENIZE, quiet=quiet)
    train_cfg = TrainConfig(**TRAIN, device=dev, quiet=quiet)
    sample_cfg = SampleConfig(**SAMPLE, quiet=quiet)
    write_json(run / "demo.config.json", {"train_split": TRAIN_SPLIT, "ref_split": REF_SPLIT, "fit": asdict(fit_cfg),
                                          "tokenize": asdict(tok_cfg), "train": asdict(train_cfg),
                                          "sample": asdict(sample_cfg), "per_class": PER_CLASS,
                                          "unconditional": UNCONDITIONAL, "device": dev})

    classifier = run_classifier(CLASSIFIER_SPLIT, HELDOUT_SPLIT, run / "classifier.safetensors", epochs=None, seed=0,
                                device=dev, data_root=data_root, quiet=quiet)
    lap("classifier")
    fit = run_fit(TRAIN_SPLIT, run / "fields.safetensors", fit_cfg, data_root=data_root, download=download)
    lap("fit")
    tok = run_tokenize(run / "fields.safetensors", run / "tokens.safetensors", tok_cfg, data_root=data_root,
                       device=dev, quiet=quiet)
    lap("tokenize")
    trained = train(run / "tokens.safetensors", run, train_cfg)
    lap("train")
    gen = run_generate(run / "model.safetensors", run / "tokens.safetensors", run, per_class=PER_CLASS,
                       unconditional=UNCONDITIONAL, cfg=sample_cfg, device=dev)
    lap("generate")
    metrics = run_evaluate(run / "samples.safetensors", run, ref_split=REF_SPLIT, train_split=TRAIN_SPLIT,
                           classifier_path=run / "classifier.safetensors", data_root=data_root, device=dev, seed=0,
                           quiet=quiet)
    lap("evaluate")
    summary = {"run": str(run), "seconds": times, "total_seconds": round(sum(times.values()), 1),
               "classifier": classifier, "fit": fit, "tokenize": tok, "train": trained, "generate": gen,
               "metrics_file": str(run / "metrics.json"), "samples_png": str(run / "samples.png"),
               "metrics": {"conditional": metrics["groups"]["conditional_all"],
                           "unconditional": metrics["groups"].get("unconditional"),
                           "memorisation": metrics["memorisation"]["memorised_fraction"],
                           "classifier": metrics.get("classifier")}}
    write_json(run / "demo.json", summary)
    print(f"\nnfgen demo finished in {summary['total_seconds']} s on {dev}.\n"
          f"  samples:  {run / 'samples.png'}\n  metrics:  {run / 'metrics.json'}\n"
          f"  nearest:  {run}/*.png\n")
    return summary
