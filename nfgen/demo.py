"""`nfgen demo`: the whole pipeline, small enough for a few minutes on a 2-core CPU.

The sizes are the only thing that differs from a full run: fewer fields, a small GPT, fewer steps.
On a CUDA GPU the same command runs the same sizes, faster.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from nfgen.classifier import run_classifier
from nfgen.common import pick_device
from nfgen.data import DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT, load_split
from nfgen.fields import FitConfig, run_fit
from nfgen.generate import SampleConfig, run_generate
from nfgen.io import check_writable, make_dir, write_json
from nfgen.metrics import run_evaluate
from nfgen.template import TemplateConfig, run_template
from nfgen.tokenizer import TokenizerConfig, run_tokenize
from nfgen.train import TrainConfig, train

TRAIN_SPLIT = "mnist:test[:2000]"
REF_SPLIT = "mnist:test[8000:8500]"
CLASSIFIER_SPLIT, HELDOUT_SPLIT = DEFAULT_TRAIN_SPLIT, DEFAULT_HELDOUT_SPLIT
# The recipe is the quality runs' (benchmarks.quality's small and full configs) at demo size: every field fitted
# from a Reptile template learned on the same images, tokens that are each class's own principal components
# around its mean field, the coarsest 32 drawn at T 1 and the finer ones the GPT's expected values. Against the
# raw weight codes of the random draw at T 0.8 / top-k 3 (the demo before it) it lifted accuracy from 0.67 to 0.805,
# COV from 0.225 to 0.435 and 1-NNA from 0.998 to 0.83 (oracle 0.982, 0.45, 0.74), in 4:08 against 3:59 wall clock
# on 2 cores, the template taking 43 s of it (benchmarks/results/demo-class-pca-cpu.json).
# A 2→16→16→1 SIREN (337 weights, so 339-token sequences) and a 3-layer GPT keep the CPU demo short: a training
# step of the default 1187-token sequences costs several seconds on 2 cores.
# Fewer, gentler fit steps keep every field near the shared template: weights that are easier to model.
FIT = dict(hidden=16, steps=100, lr=1e-3)
# Reptile's own options; the architecture and inner lr are the fit's, so the template fits the fields that use it
TEMPLATE = dict(outer=200, batch=256, inner_steps=20)
TOKENIZE = dict(basis="class-pca", center="class")
# Code ids only: with the random draw's raw codes, embedding the code values lowered accuracy (0.395 against
# 0.535, benchmarks/results/demo-value-embed-cpu.json); with class-pca tokens they changed nothing measurable
# (0.815 against 0.805, one run each) for 230 s of training against 186 s. The class embedding (nfgen train's
# default) raised raw-code accuracy to 0.67 (benchmarks/results/demo-class-embed-cpu.json).
TRAIN = dict(n_layer=3, n_head=3, n_embd=96, value_embed=False, steps=1000, batch_size=16, lr=3e-3, warmup=50,
             eval_every=100, checkpoint_every=1000)
SAMPLE = dict(temperature=1.0, top_k=0, weights="expected", expected_from=32)
PER_CLASS = 20
UNCONDITIONAL = 100


def template_config(**overrides) -> TemplateConfig:
    """The demo's Reptile template: the fit's architecture and lr, TEMPLATE's iterations."""
    arch = {k: FIT[k] for k in ("hidden", "hidden_layers", "omega0", "lr") if k in FIT}
    return TemplateConfig(**arch, **TEMPLATE, **overrides)


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

    template_cfg = template_config(device=dev, quiet=quiet)
    fit_cfg = FitConfig(**FIT, template=str(run / "template.safetensors"), device=dev, quiet=quiet)
    tok_cfg = TokenizerConfig(**TOKENIZE, quiet=quiet)
    train_cfg = TrainConfig(**TRAIN, device=dev, quiet=quiet)
    sample_cfg = SampleConfig(**SAMPLE, quiet=quiet)
    write_json(run / "demo.config.json", {"train_split": TRAIN_SPLIT, "ref_split": REF_SPLIT,
                                          "template": asdict(template_cfg), "fit": asdict(fit_cfg),
                                          "tokenize": asdict(tok_cfg), "train": asdict(train_cfg),
                                          "sample": asdict(sample_cfg), "per_class": PER_CLASS,
                                          "unconditional": UNCONDITIONAL, "device": dev})

    classifier = run_classifier(CLASSIFIER_SPLIT, HELDOUT_SPLIT, run / "classifier.safetensors", epochs=None, seed=0,
                                device=dev, data_root=data_root, quiet=quiet)
    lap("classifier")
    template = run_template(TRAIN_SPLIT, run / "template.safetensors", template_cfg, data_root=data_root,
                            download=download)
    lap("template")
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
               "classifier": classifier, "template": template, "fit": fit, "tokenize": tok, "train": trained,
               "generate": gen,
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
