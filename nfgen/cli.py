"""The command line: ``python -m nfgen {template,fit,tokenize,train,generate,baseline,evaluate,classifier,demo}``.

Every command works inside a run directory (``--run``, default ``runs/default``): it reads the artifacts
the earlier stages left there unless told otherwise, writes its own there, and saves its resolved
options as ``<command>.config.json``. Problems with the input end in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from nfgen import __version__
from nfgen.io import NfgenError, check_writable, write_json

EXIT_USAGE = 2


# --- argument plumbing -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (it prints the whole usage first otherwise)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:  # torch's generators take no more
        raise argparse.ArgumentTypeError(f"seed {value!r} is not an integer in range; use 0 ≤ seed < 2^63")
    return seed


def _outputs(run: Path, command: str, *paths: Path) -> None:
    """Refuse unwritable outputs (the command's files and its RUN/<command>.config.json) before any work."""
    for path in (run / f"{command}.config.json", *paths):
        check_writable(path)


def _opt(p: argparse.ArgumentParser, name: str, cls, help: str, type_=None, **kw):
    """Add --name mapped onto field `name` of dataclass `cls`; the default shown is the dataclass's."""
    dest = name.replace("-", "_")
    field = {f.name: f for f in dataclasses.fields(cls)}[dest]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if type_ is None and isinstance(default, bool):
        p.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=None,
                       help=f"{help} (default: {default})")
        return
    t = type_ or (_seed if name == "seed" else type(default) if default is not None else str)
    p.add_argument(f"--{name}", dest=dest, type=t, default=None, help=f"{help} (default: {default})", **kw)


def _config(cls, args: argparse.Namespace, **overrides):
    """Build dataclass `cls` from the parsed args that were given; the rest keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update({k: v for k, v in overrides.items() if k in names})
    return cls(**values)


def _common(p: argparse.ArgumentParser, data: bool = False) -> None:
    # --run-dir: under torchrun, whose own --run-path swallows an abbreviated --run
    p.add_argument("--run", "--run-dir", dest="run", default="runs/default",
                   help="run directory holding this run's artifacts (default: runs/default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no line for people: the JSON summary alone")
    if data:
        p.add_argument("--data-root", default=None, help="data root (default: $NFGEN_DATA, else ~/.cache/nfgen)")
        p.add_argument("--download", action="store_true", help="download MNIST into the data root if missing")


def _path(value: str | None, run: Path, name: str) -> Path:
    return Path(value) if value else run / name


def _save_config(run: Path, command: str, args: argparse.Namespace, **resolved) -> None:
    from nfgen.distributed import is_main

    if not is_main():  # under torchrun, rank 0 speaks for the run
        return
    cfg = {k: v for k, v in vars(args).items() if k != "func"}
    for k, v in resolved.items():
        cfg[k] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    write_json(run / f"{command}.config.json", {"command": command, "nfgen_version": __version__,
                                                "time": time.strftime("%Y-%m-%d %H:%M:%S"), **cfg})


def _report(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))


# --- commands --------------------------------------------------------------------------------------------

def cmd_fit(args) -> dict:
    from nfgen.fields import FitConfig, run_fit, with_clamp_margin

    run = Path(args.run)
    # Like every stage, fit picks up what an earlier stage left in the run: `nfgen template`'s template.
    implicit = run / "template.safetensors"
    template = args.template or (str(implicit) if implicit.is_file() and (args.init or "shared") == "shared" else None)
    cfg = _config(FitConfig, args, quiet=args.quiet, template=template)
    cfg.validate()
    cfg = with_clamp_margin(cfg)
    out = _path(args.out, run, "fields.safetensors")
    _outputs(run, "fit", out)
    summary = run_fit(args.split, out, cfg, data_root=args.data_root, download=args.download)
    _save_config(run, "fit", args, recipe=cfg, out=str(out))
    return summary


def cmd_template(args) -> dict:
    from nfgen.template import TemplateConfig, run_template

    run = Path(args.run)
    cfg = _config(TemplateConfig, args, quiet=args.quiet)
    out = _path(args.out, run, "template.safetensors")
    _outputs(run, "template", out)
    summary = run_template(args.split, out, cfg, data_root=args.data_root, download=args.download)
    _save_config(run, "template", args, recipe=cfg, out=str(out))
    return summary


def cmd_tokenize(args) -> dict:
    from nfgen.tokenizer import TokenizerConfig, run_tokenize

    run = Path(args.run)
    cfg = _config(TokenizerConfig, args, quiet=args.quiet)
    out = _path(args.out, run, "tokens.safetensors")
    _outputs(run, "tokenize", out)
    summary = run_tokenize(_path(args.fields, run, "fields.safetensors"), out, cfg, data_root=args.data_root,
                           device=args.device, quiet=args.quiet)
    _save_config(run, "tokenize", args, tokenizer=cfg, out=str(out))
    return summary


def cmd_train(args) -> dict:
    from nfgen.train import TrainConfig, train

    run = Path(args.run)
    cfg = _config(TrainConfig, args, quiet=args.quiet)
    _outputs(run, "train", run / "model.safetensors", run / "train_state.safetensors", run / "train_log.json")
    summary = train(_path(args.tokens, run, "tokens.safetensors"), run, cfg, resume=args.resume)
    _save_config(run, "train", args, train_config=cfg)
    return summary


def cmd_generate(args) -> dict:
    from nfgen.generate import SampleConfig, run_generate, sample_paths

    run = Path(args.run)
    if args.top_k is not None and args.top_k < 1:
        raise NfgenError(f"--top-k must be ≥ 1, got {args.top_k}; leave it out to sample from every code")
    cfg = _config(SampleConfig, args, quiet=args.quiet)
    _outputs(run, "generate", *sample_paths(run))
    summary = run_generate(_path(args.model, run, "model.safetensors"), _path(args.tokens, run, "tokens.safetensors"),
                           run, per_class=args.per_class, unconditional=args.unconditional, cfg=cfg,
                           device=args.device)
    _save_config(run, "generate", args, sampling=cfg)
    return summary


def cmd_baseline(args) -> dict:
    from nfgen.baselines import run_baseline
    from nfgen.generate import sample_paths

    run = Path(args.run)
    out = _path(args.out, run, "baseline")
    _outputs(run, "baseline", *sample_paths(out))
    summary = run_baseline(_path(args.fields, run, "fields.safetensors"), out, per_class=args.per_class,
                           unconditional=args.unconditional, seed=args.seed, kind=args.kind,
                           tokens_path=_path(args.tokens, run, "tokens.safetensors"), weights=args.weights,
                           expected_from=args.expected_from, bandwidth=args.bandwidth)
    classifier = run / "classifier.safetensors"
    summary["evaluate_with"] = f"nfgen evaluate --run {out}" + (f" --classifier {classifier}"
                                                                 if classifier.is_file() else "")
    _save_config(run, "baseline", args, out=str(out))
    if not args.quiet:
        print(f"baseline {summary['kind']}: {summary['n_fields']} fields → {summary['samples']}, {summary['png']}; "
              f"score them with `{summary['evaluate_with']}`")
    return summary


def cmd_evaluate(args) -> dict:
    from nfgen.metrics import run_evaluate

    run = Path(args.run)
    classifier = args.classifier
    if classifier is None and (run / "classifier.safetensors").is_file():
        classifier = run / "classifier.safetensors"
    _outputs(run, "evaluate", run / "metrics.json", run / "nearest.png")
    summary = run_evaluate(_path(args.samples, run, "samples.safetensors"), run, ref_split=args.ref_split,
                           train_split=args.train_split, classifier_path=classifier, data_root=args.data_root,
                           device=args.device, seed=args.seed, quiet=args.quiet, images_path=args.images)
    _save_config(run, "evaluate", args, classifier=str(classifier) if classifier else None,
                 ref_split=summary["splits"]["references"], train_split=summary["splits"]["train"])
    return summary


def cmd_classifier(args) -> dict:
    from nfgen.classifier import run_classifier
    from nfgen.data import DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT, parse_split, same_dataset
    from nfgen.fields import training_split
    from nfgen.io import read_header

    run = Path(args.run)
    out = _path(args.out, run, "classifier.safetensors")
    if args.train_split is None or args.heldout_split is None:
        # the defaults are MNIST's: a run of another dataset's fields would get a classifier of the wrong images
        fitted = training_split(read_header(run / "fields.safetensors")[1])
        if fitted and not same_dataset(fitted, DEFAULT_TRAIN_SPLIT):
            raise NfgenError(f"{run / 'fields.safetensors'} holds fields of {fitted}; name the classifier's "
                             f"--train-split and --heldout-split from {parse_split(fitted)[0]} (the defaults are "
                             "MNIST's)")
    train_split = args.train_split or DEFAULT_TRAIN_SPLIT
    heldout_split = args.heldout_split or DEFAULT_HELDOUT_SPLIT
    _outputs(run, "classifier", out)
    summary = run_classifier(train_split, heldout_split, out, epochs=args.epochs, seed=args.seed,
                             device=args.device, data_root=args.data_root, quiet=args.quiet)
    _save_config(run, "classifier", args, out=str(out), train_split=train_split, heldout_split=heldout_split)
    return summary


def cmd_demo(args) -> dict:
    from nfgen.demo import run_demo

    return run_demo(Path(args.run), data_root=args.data_root, device=args.device, quiet=args.quiet,
                    download=args.download)


# --- parser ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from nfgen.fields import FitConfig
    from nfgen.generate import SampleConfig
    from nfgen.template import TemplateConfig
    from nfgen.tokenizer import TokenizerConfig
    from nfgen.train import TrainConfig

    parser = _Parser(prog="nfgen", description="Generate neural fields by predicting their weights "
                                     "with a transformer: fit → tokenize → train → generate → evaluate.")
    parser.add_argument("--version", action="version", version=f"nfgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("template", help="meta-learn the shared init that `fit --template` starts every field from")
    _common(p, data=True)
    p.add_argument("--split", default="mnist:test[:8000]", help="images to learn from (default: mnist:test[:8000])")
    p.add_argument("--out", default=None, help="template file (default: RUN/template.safetensors)")
    for name, h in [("hidden", "hidden width"), ("hidden-layers", "number of sine layers"),
                    ("omega0", "ω0 of every sine layer"), ("outer", "Reptile iterations"),
                    ("batch", "images per iteration"), ("inner-steps", "Adam steps from the template per iteration"),
                    ("lr", "inner Adam learning rate (use the fit's)"),
                    ("clamp-margin", "fit exact 0 / 1 pixels to -m / 1 + m (use the fit's)"),
                    ("meta-lr", "step toward the batch's mean fit, annealed to 0"),
                    ("seed", "seed of the start and batches"),
                    ("backend", "auto, torch, cpp or triton"), ("device", "auto, cpu or cuda")]:
        _opt(p, name, TemplateConfig, h)
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("fit", help="fit one SIREN per image, thousands at once")
    _common(p, data=True)
    p.add_argument("--split", default="mnist:test[:8000]", help="images to fit (default: mnist:test[:8000])")
    p.add_argument("--out", default=None, help="fields file (default: RUN/fields.safetensors)")
    for name, h in [("hidden", "hidden width"), ("hidden-layers", "number of sine layers"), ("omega0", "ω0 of every sine layer"),
                    ("steps", "Adam steps per field"), ("lr", "Adam learning rate"),
                    ("lr-final-ratio", "cosine decay of the lr to lr × this (1: constant)"),
                    ("clamp-margin", "fit exact 0 / 1 pixels to -m / 1 + m, so the render's clamp hides weight "
                     "errors below m there (default: the template's margin, 0 without a template)"),
                    ("chunk", "fields fitted together"),
                    ("steps-per-call", "fused steps per kernel call; progress and --target-psnr are checked between "
                     "calls"),
                    ("init", "shared (one template for all fields) or independent"),
                    ("template", "PATH[:INDEX] of a fitted field to start every field from"),
                    ("target-psnr", "stop a field once it reaches this PSNR (dB), checked every --steps-per-call "
                     "steps"), ("seed", "seed of the init"),
                    ("backend", "auto, torch, cpp or triton"),
                    ("dot-precision", "Triton's hidden×hidden products: ieee (fp32), tf32 or tf32x3"),
                    ("device", "auto, cpu or cuda")]:
        _opt(p, name, FitConfig, h, type_=float if name in ("target-psnr", "clamp-margin") else None)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("tokenize", help="learn a VQ codebook over the weights and write token sequences")
    _common(p, data=True)
    p.add_argument("--fields", default=None, help="fields file (default: RUN/fields.safetensors)")
    p.add_argument("--out", default=None, help="tokens file (default: RUN/tokens.safetensors)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    for name, h in [("codebook-size", "codes per level"), ("group", "weights per token (vector VQ when > 1)"),
                    ("levels", "residual VQ levels"), ("normalize", "layer (per-tensor scale) or none"),
                    ("center", "mean (quantise each weight's offset from the mean field), class (from its class's mean "
                     "field; unconditional samples draw their class from the training frequencies first) or none"),
                    ("basis", "weights (a token per weight), pca (a token per principal component of the "
                     "training fields, largest first) or class-pca (each class's own principal components; with "
                     "--center class)"),
                    ("shrinkage", "class-pca: share of the pooled within-class covariance mixed into each class's"),
                    ("modes", "with --center class: split each class into this many modes (k-means in weight "
                     "space), each centred on (with class-pca: in the basis of) its own fields; the mode is a "
                     "sequence's first token"),
                    ("coarse", "with --basis pca or class-pca: the first this many components each get a coarse "
                     "token (which of --coarse-levels equal-probability bins it falls in) before their code"),
                    ("coarse-levels", "bins of a coarse token"),
                    ("iters", "Lloyd iterations"), ("sample", "points used to learn the codebook"),
                    ("seed", "k-means seed"), ("backend", "auto, torch, cpp or triton")]:
        _opt(p, name, TokenizerConfig, h)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train the GPT on the token sequences")
    _common(p)
    p.add_argument("--tokens", default=None, help="tokens file (default: RUN/tokens.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/train_state.safetensors")
    for name, h in [("n-layer", "transformer blocks"), ("n-head", "attention heads"), ("n-embd", "model width"),
                    ("n-kv-head", "key/value heads, a divisor of --n-head (grouped-query attention; 0: --n-head)"),
                    ("dropout", "dropout"),
                    ("value-embed", "embed each code token's value as well as its id, so the model sees which "
                     "codes are close"),
                    ("class-embed", "add the class (or NO_CLASS) embedding to every position's input"),
                    ("weight-roles", "embed the two network nodes (neurons) that each predicted weight joins"),
                    ("steps", "optimizer steps"), ("batch-size", "sequences per step"),
                    ("lr", "peak learning rate"), ("warmup", "warmup steps"), ("weight-decay", "AdamW weight decay"),
                    ("grad-clip", "gradient-norm clip"), ("class-dropout", "probability of NO_CLASS in training"),
                    ("val-fraction", "fields held out for validation loss"), ("eval-every", "steps between validations"),
                    ("checkpoint-every", "steps between checkpoints"), ("seed", "seed"), ("device", "auto, cpu or cuda"),
                    ("compile", "torch.compile the model")]:
        _opt(p, name, TrainConfig, h)
    _opt(p, "keep", TrainConfig, "the weights RUN/model.safetensors holds: best (the lowest validation loss so far) "
         "or last (the latest step's)", choices=("best", "last"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample new fields with the trained GPT")
    _common(p)
    p.add_argument("--model", default=None, help="model file (default: RUN/model.safetensors)")
    p.add_argument("--tokens", default=None, help="tokens file with the codebook (default: RUN/tokens.safetensors)")
    p.add_argument("--per-class", type=int, default=10, help="class-conditional samples per class (default: 10)")
    p.add_argument("--unconditional", type=int, default=0, help="unconditional samples (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    for name, h in [("temperature", "softmax temperature"), ("top-k", "keep the k most likely tokens (default: all)"),
                    ("top-p", "nucleus sampling mass"), ("cfg-scale", "classifier-free guidance scale (1: off)"),
                    ("seed", "sampling seed"), ("batch-size", "sequences sampled at once (default: from free memory)"),
                    ("backend", "sampling backend: auto, torch, cpp or triton")]:
        _opt(p, name, SampleConfig, h, type_=int if name == "batch-size" else None)
    _opt(p, "attention", SampleConfig, "decode-step attention: auto (sdpa on CUDA, cpp on CPU), sdpa, triton (a "
         "split-K CUDA kernel that reads only the filled KV cache, one CUDA graph) or cpp (the CPU kernel)")
    _opt(p, "weights", SampleConfig, "a field's weights: its drawn tokens' code values (sampled), or each token's "
         "mean code value under the distribution it was drawn from (expected)")
    _opt(p, "expected-from", SampleConfig, "with --weights expected: the first code token whose weight is "
         "expected; earlier ones keep their drawn codes (with --basis class-pca, the coarse components; a mode "
         "token, tokenize --modes, always keeps its draw, and neither it nor coarse tokens are counted)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("baseline", help="sample a reference generator without a GPT (a per-class Gaussian over the "
                       "fitted weights, or the tokens drawn position by position), for `evaluate --run RUN/baseline`")
    _common(p)
    p.add_argument("--kind", default="gaussian", choices=("gaussian", "marginals", "bootstrap"),
                   help="gaussian: each class's weights as a Gaussian; marginals: each token drawn on its own from its "
                   "position's frequencies in the class (the GPT without context); bootstrap: a random training field "
                   "of the class, its code vectors jittered (a kernel density estimate) (default: gaussian)")
    p.add_argument("--fields", default=None, help="fitted fields, for gaussian (default: RUN/fields.safetensors)")
    p.add_argument("--tokens", default=None,
                   help="tokens file, for marginals and bootstrap (default: RUN/tokens.safetensors)")
    p.add_argument("--weights", default="sampled", choices=("sampled", "expected"),
                   help="marginals / bootstrap: a position's weight is its drawn (or copied) code's value, or its "
                   "class's mean code value there (expected), as `generate --weights` (default: sampled)")
    p.add_argument("--expected-from", type=int, default=0,
                   help="with --weights expected: the first position whose weight is expected (default: 0)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="bootstrap: the jitter, in class stds of each position's code value (default: 0.5)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class (default: 10)")
    p.add_argument("--unconditional", type=int, default=0,
                   help="samples drawn without a class: from every training field (default: 0)")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed (default: 0)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/baseline)")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("evaluate", help="MMD / COV / 1-NNA, memorisation and classifier score, with the real-data oracle")
    _common(p, data=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--samples", default=None, help="generated fields (default: RUN/samples.safetensors)")
    source.add_argument("--images", default=None,
                        help="instead, images from any generator: a safetensors file with 'images' (float "
                             "[N, H, W(, C)] in [0, 1], or uint8) and optional 'labels' (int [N], -1 = unconditional)")
    p.add_argument("--ref-split", default=None,
                   help="held-out references (default for MNIST samples: mnist:test[8000:]; needed for others)")
    p.add_argument("--train-split", default=None,
                   help="training images, for memorisation and the oracle (default: the split the samples' GPT was "
                        "trained on, as the samples file records; else mnist:test[:8000])")
    p.add_argument("--classifier", default=None, help="classifier file (default: RUN/classifier.safetensors if present)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the subsampling to |Sg| = |Sr| (default: 0)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("classifier", help="train the CNN behind the classifier score")
    _common(p, data=True)
    p.add_argument("--train-split", default=None, help="training images (default: mnist:test[:8000]; name both "
                   "splits when the run's fields are of another dataset)")
    p.add_argument("--heldout-split", default=None, help="held-out images (default: mnist:test[8000:])")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the classifier's own)")
    p.add_argument("--out", default=None, help="classifier file (default: RUN/classifier.safetensors)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--seed", type=_seed, default=0, help="seed (default: 0)")
    p.set_defaults(func=cmd_classifier)

    p = sub.add_parser("demo", help="the whole pipeline at a size that runs in a few minutes on a 2-core CPU")
    _common(p, data=True)
    p.set_defaults(run="runs/demo")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = args.func(args)
    except (NfgenError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"nfgen {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"nfgen {args.command}: interrupted; finished artifacts are intact, rerun to redo this stage",
              file=sys.stderr)
        return 130
    from nfgen.distributed import is_main

    if is_main():
        _report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
