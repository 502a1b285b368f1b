"""The CLI end to end at a tiny size, and every bad-input case: one line on stderr, exit 2, nothing written."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nfgen.cli import main
from nfgen.fields import load_fields, save_fields
from nfgen.io import load_artifact, save_artifact
from nfgen.tokenizer import load_tokens

TINY_FIT = ["--split", "mnist:test[:40]", "--hidden", "8", "--hidden-layers", "1", "--steps", "60", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root):
    """fit → tokenize → train → classifier → generate → evaluate on 40 images with a 33-weight SIREN."""
    run = tmp_path_factory.mktemp("run")
    r = ["--run", str(run)]
    assert main(["fit", *r, *TINY_FIT]) == 0
    assert main(["tokenize", *r, "--codebook-size", "16", "--iters", "5", "--quiet"]) == 0
    assert main(["train", *r, "--steps", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                 "--batch-size", "8", "--eval-every", "4", "--quiet"]) == 0
    assert main(["classifier", *r, "--train-split", "mnist:test[:300]", "--heldout-split", "mnist:test[9000:9100]",
                 "--epochs", "1", "--quiet"]) == 0
    assert main(["generate", *r, "--per-class", "2", "--unconditional", "4", "--temperature", "0.9",
                 "--top-k", "8", "--quiet"]) == 0
    assert main(["evaluate", *r, "--ref-split", "mnist:test[8000:8060]", "--quiet"]) == 0  # training split: recorded
    return run


def test_pipeline_writes_every_artifact(run_dir):
    for name in ("fields.safetensors", "tokens.safetensors", "model.safetensors", "train_state.safetensors",
                 "classifier.safetensors", "samples.safetensors", "samples.png", "metrics.json", "nearest.png"):
        assert (run_dir / name).is_file(), name
    for command in ("fit", "tokenize", "train", "classifier", "generate", "evaluate"):
        cfg = json.loads((run_dir / f"{command}.config.json").read_text())
        assert cfg["command"] == command
    assert json.loads((run_dir / "fit.config.json").read_text())["recipe"]["hidden"] == 8
    samples = load_fields(run_dir / "samples.safetensors")
    assert samples.weights.shape == (24, 33)
    assert samples.labels.tolist() == sorted([c for c in range(10) for _ in range(2)]) + [-1] * 4
    assert samples.meta["training_split"] == "mnist:test[:40]"  # the fields' split, through the tokens file
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # evaluate took the training split the samples record for memorisation and the oracle, not its MNIST default
    assert metrics["splits"] == {"references": "mnist:test[8000:8060]", "train": "mnist:test[:40]"}
    assert json.loads((run_dir / "evaluate.config.json").read_text())["train_split"] == "mnist:test[:40]"
    group = metrics["groups"]["conditional_all"]
    for key in ("mmd", "cov", "1nna"):
        assert set(group[key]) == {"samples", "oracle"}
        assert all(0 <= v <= 1 for v in group[key].values())
    # evaluate picked RUN/classifier.safetensors up and scored the 20 class-conditional samples with it
    assert metrics["classifier"]["n"]["samples"] == 20 and 0 <= metrics["classifier"]["accuracy"]["samples"] <= 1


def test_fit_summary_and_psnr(run_dir):
    fields = load_fields(run_dir / "fields.safetensors")
    assert fields.weights.shape == (40, 33) and float(fields.psnr.mean()) > 12.0
    assert fields.meta["source"]["indices"] == list(range(40))


def subprocess_cli(*args):
    """A real process: proves the exit code and that no traceback reaches the user."""
    return subprocess.run([sys.executable, "-m", "nfgen", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(capsys):
    """In-process CLI (fast): returns an object with returncode / stdout / stderr like subprocess.run."""
    def run(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def assert_clean_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in lines[0], lines[0]


def test_help(cli):
    proc = cli("--help")
    assert proc.returncode == 0 and "fit" in proc.stdout and "evaluate" in proc.stdout
    for command in ("template", "fit", "tokenize", "train", "generate", "baseline", "evaluate", "classifier", "demo"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "--run" in proc.stdout, command


def test_missing_data_root(tmp_path):
    proc = subprocess_cli("fit", "--run", str(tmp_path / "r"), "--data-root", str(tmp_path / "nowhere"), "--quiet")
    assert_clean_error(proc, "not found")
    assert not (tmp_path / "r" / "fields.safetensors").exists()


def test_unknown_split(cli, tmp_path):
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--split", "mnist:validation"),
                       "MNIST has the sets train and test, not 'validation'; write mnist:train or mnist:test")


def test_missing_and_corrupt_artifacts(cli, tmp_path, run_dir):
    assert_clean_error(cli("tokenize", "--run", str(tmp_path)), "fields file not found")
    blob = (run_dir / "fields.safetensors").read_bytes()
    (tmp_path / "fields.safetensors").write_bytes(blob[: len(blob) // 2])
    assert_clean_error(cli("tokenize", "--run", str(tmp_path)), "truncated or corrupt")
    assert not (tmp_path / "tokens.safetensors").exists()
    # a tokens file handed over where a model is expected
    assert_clean_error(cli("generate", "--run", str(tmp_path), "--model", str(run_dir / "tokens.safetensors"),
                           "--tokens", str(run_dir / "tokens.safetensors")), "expected a 'model'")


def test_nan_weights_refused(cli, tmp_path, run_dir):
    tensors, meta = load_artifact(run_dir / "fields.safetensors", "fields")
    tensors["weights"][3, 5] = float("nan")
    save_artifact(tmp_path / "fields.safetensors", "fields", tensors, meta)
    assert_clean_error(cli("tokenize", "--run", str(tmp_path)), "NaN")
    assert not (tmp_path / "tokens.safetensors").exists()


def test_mismatched_artifacts(cli, tmp_path, run_dir, data_root):
    # tokens of another architecture (hidden 4) than the model was trained on (hidden 8)
    other = tmp_path / "other"
    assert main(["fit", "--run", str(other), *TINY_FIT[:-5], "--hidden", "4", "--steps", "5", "--quiet"]) == 0
    assert main(["tokenize", "--run", str(other), "--codebook-size", "8", "--iters", "2", "--quiet"]) == 0
    proc = cli("generate", "--run", str(tmp_path), "--model", str(run_dir / "model.safetensors"),
               "--tokens", str(other / "tokens.safetensors"))
    assert_clean_error(proc, "use the tokens file the model was trained on")
    assert not (tmp_path / "samples.safetensors").exists()
    # tokens of other images with the same shapes (vocabulary, length): other codebooks, so refused as well
    same = tmp_path / "same-shapes"
    fit = ["--split", "mnist:test[40:80]", *TINY_FIT[2:]]
    assert main(["fit", "--run", str(same), *fit]) == 0
    assert main(["tokenize", "--run", str(same), "--codebook-size", "16", "--iters", "5", "--quiet"]) == 0
    proc = cli("generate", "--run", str(tmp_path), "--model", str(run_dir / "model.safetensors"),
               "--tokens", str(same / "tokens.safetensors"))
    assert_clean_error(proc, "was trained on other tokens")
    assert not (tmp_path / "samples.safetensors").exists()


@pytest.mark.parametrize("args,pattern", [
    (["--top-k", "0"], "--top-k must be ≥ 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--weights", "mean"], "--weights must be one of sampled, expected"),
    (["--attention", "flash"], "--attention must be one of auto, sdpa, triton, cpp"),
    (["--expected-from", "4"], "add --weights expected"),
    (["--weights", "expected", "--expected-from", "100000"], "past the"),
])
def test_impossible_sampling_options(cli, tmp_path, run_dir, args, pattern):
    proc = cli("generate", "--run", str(tmp_path), "--model", str(run_dir / "model.safetensors"),
               "--tokens", str(run_dir / "tokens.safetensors"), *args)
    assert_clean_error(proc, pattern)
    assert not any(tmp_path.iterdir())


def test_generate_expected_weights(tmp_path, run_dir):
    """--weights expected: the same draws (same seed), each weight the mean code of its token's distribution."""
    common = ["--model", str(run_dir / "model.safetensors"), "--tokens", str(run_dir / "tokens.safetensors"),
              "--per-class", "1", "--temperature", "1.5", "--quiet"]
    for weights in ("sampled", "expected"):
        assert main(["generate", "--run", str(tmp_path / weights), *common, "--weights", weights]) == 0
    assert main(["generate", "--run", str(tmp_path / "from"), *common, "--weights", "expected",
                 "--expected-from", "1"]) == 0
    sampled, expected, tail = (load_fields(tmp_path / w / "samples.safetensors")
                               for w in ("sampled", "expected", "from"))
    assert expected.meta["sampling"]["weights"] == "expected" and expected.weights.shape == sampled.weights.shape
    assert torch.isfinite(expected.weights).all() and not torch.equal(expected.weights, sampled.weights)
    # the first weight (scalar codes: the first token) drawn, the rest expected
    assert tail.meta["sampling"]["expected_from"] == 1
    assert torch.equal(tail.weights[:, 0], sampled.weights[:, 0])
    assert torch.equal(tail.weights[:, 1:], expected.weights[:, 1:])


def test_group_must_divide_params(cli, tmp_path, run_dir):
    proc = cli("tokenize", "--run", str(tmp_path), "--fields", str(run_dir / "fields.safetensors"), "--group", "4")
    assert_clean_error(proc, "group")
    assert not any(tmp_path.iterdir())


def test_pca_tokens_train_and_generate(cli, tmp_path, run_dir):
    """--basis pca end to end: tokens for principal components train a GPT whose samples decode to weights."""
    r = ["--run", str(tmp_path), "--quiet"]
    assert main(["tokenize", *r, "--fields", str(run_dir / "fields.safetensors"), "--basis", "pca",
                 "--codebook-size", "16", "--iters", "5"]) == 0
    assert_clean_error(cli("train", "--run", str(tmp_path), "--weight-roles", "--steps", "2"), "principal components")
    assert not (tmp_path / "model.safetensors").exists()
    assert main(["train", *r, "--steps", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "8"]) == 0
    assert main(["generate", *r, "--per-class", "1", "--temperature", "1.0"]) == 0
    samples = load_fields(tmp_path / "samples.safetensors")
    assert samples.weights.shape == (10, 33) and torch.isfinite(samples.weights).all()
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           "--basis", "pca", "--center", "mean"), "--basis pca")
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           "--basis", "svd"), "unknown basis")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.mark.parametrize("basis", ["weights", "class-pca"])
def test_class_centred_tokens_train_and_generate(cli, tmp_path, run_dir, basis):
    """--center class end to end: unconditional samples draw a class, then decode on that class's mean field (with
    class-pca, classes of fewer than 2 of the 40 fields take the pooled basis)."""
    r = ["--run", str(tmp_path), "--quiet"]
    assert main(["tokenize", *r, "--fields", str(run_dir / "fields.safetensors"), "--center", "class",
                 "--basis", basis, "--codebook-size", "16", "--iters", "5"]) == 0
    assert main(["train", *r, "--steps", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "8"]) == 0
    assert main(["generate", *r, "--per-class", "2", "--unconditional", "6", "--weights", "expected"]) == 0
    samples = load_fields(tmp_path / "samples.safetensors")
    assert samples.weights.shape == (26, 33) and torch.isfinite(samples.weights).all()
    assert samples.labels.tolist()[-6:] == [-1] * 6  # they stay unconditional in the samples file
    # class-conditional samples decode on their own class's mean field: most lie nearest it
    from nfgen.tokenizer import load_tokens

    centers = load_tokens(tmp_path / "tokens.safetensors").tokenizer.class_centers
    conditional = samples.weights[:20]
    nearest = torch.cdist(conditional, centers).argmin(dim=1)
    assert (nearest == samples.labels[:20]).float().mean() > 0.5
    bad = ("--center", "median") if basis == "weights" else ("--basis", "class-pca")  # the latter without --center
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           *bad), "unknown centring" if basis == "weights" else "--center class")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def _train_then_generate_every_decoding(run, expected_from):
    """A tiny GPT on RUN's tokens, then generate with drawn codes, expected codes, and expected codes from
    `expected_from`: each a finite [24, 33] samples file."""
    r = ["--run", str(run), "--quiet"]
    assert main(["train", *r, "--steps", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "8"]) == 0
    for extra in (["--weights", "expected"], ["--weights", "expected", "--expected-from", str(expected_from)], []):
        assert main(["generate", *r, "--per-class", "2", "--unconditional", "4", *extra]) == 0
        samples = load_fields(run / "samples.safetensors")
        assert samples.weights.shape == (24, 33) and torch.isfinite(samples.weights).all()

def test_modes_lead_the_tokens_and_decode_every_draw(cli, tmp_path, run_dir):
    """--modes end to end: the mode leads every sequence, the GPT draws it, and every way of decoding a draw (drawn
    codes, expected codes from any position) decodes in the drawn mode's basis (the token baselines: in
    test_baselines; this run has a class without fields, which they refuse)."""
    from nfgen.tokenizer import load_tokens

    r = ["--run", str(tmp_path), "--quiet"]
    assert main(["tokenize", *r, "--fields", str(run_dir / "fields.safetensors"), "--center", "class", "--basis",
                 "class-pca", "--modes", "2", "--codebook-size", "16", "--iters", "5"]) == 0
    ts = load_tokens(tmp_path / "tokens.safetensors")
    assert ts.tokens.shape == (40, 34) and ts.tokenizer.cfg.modes == 2 and set(ts.tokens[:, 0].tolist()) <= {0, 1}
    _train_then_generate_every_decoding(tmp_path, expected_from=5)
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           "--modes", "2"), "--modes splits each class")
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           "--center", "class", "--modes", "30"), "fewer than --modes 30")


def test_coarse_tokens_end_to_end(cli, tmp_path, run_dir):
    """--coarse with modes: tokenize → train → generate with every decoding (the token baselines: test_baselines)."""
    from nfgen.tokenizer import load_tokens

    r = ["--run", str(tmp_path), "--quiet"]
    assert main(["tokenize", *r, "--fields", str(run_dir / "fields.safetensors"), "--center", "class", "--basis",
                 "class-pca", "--modes", "2", "--coarse", "4", "--coarse-levels", "4", "--codebook-size", "16",
                 "--iters", "5"]) == 0
    ts = load_tokens(tmp_path / "tokens.safetensors")
    assert ts.tokens.shape == (40, 1 + 4 + 33) and ts.tokenizer.cfg.coarse == 4
    assert (ts.tokens[:, 1:9:2] < 4).all() and ts.tokens[:, 1:9:2].unique().numel() > 1
    _train_then_generate_every_decoding(tmp_path, expected_from=2)
    assert_clean_error(cli("tokenize", "--run", str(tmp_path / "x"), "--fields", str(run_dir / "fields.safetensors"),
                           "--coarse", "4"), "use it with --basis pca or class-pca")
    assert_clean_error(cli("generate", *r, "--weights", "expected", "--expected-from", "33"),
                       "past the 33 code tokens of a field after its mode token")


def test_impossible_fit_options(cli, tmp_path):
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--steps", "0"), "steps")
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--init", "zeros"), "init")
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--clamp-margin", "2"), "clamp_margin")
    assert_clean_error(cli("template", "--run", str(tmp_path), "--clamp-margin", "-1"), "clamp_margin")
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--template", str(tmp_path / "none.safetensors")),
                       "not found")


def test_bad_device(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    assert_clean_error(cli("train", "--run", str(tmp_path), "--device", "cuda"), "no CUDA GPU")


def test_usage_errors_are_one_line(cli, tmp_path):
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--steps", "abc"),
                       "invalid int value: 'abc'; see nfgen fit --help")
    assert_clean_error(cli("generate", "--run", str(tmp_path), "--seed", "99999999999999999999"),
                       "not an integer in range")
    assert_clean_error(cli("fit", "--run", str(tmp_path), "--seed", "x"), "not an integer in range")
    assert_clean_error(cli("train", "--run", str(tmp_path), "--device", "meta"), "unknown device 'meta'")
    assert_clean_error(cli("evaluate", "--run", str(tmp_path), "--samples", "s.safetensors",
                           "--images", "i.safetensors"), "argument --images: not allowed with argument --samples")
    assert not any(tmp_path.iterdir())


def test_stages_print_a_line_for_people_then_the_json(cli, run_dir, tmp_path):
    tokens = str(run_dir / "tokens.safetensors")
    proc = cli("train", "--run", str(tmp_path), "--tokens", tokens, "--steps", "2", "--n-layer", "1", "--n-head", "2",
               "--n-embd", "16", "--batch-size", "8", "--eval-every", "1")
    first, rest = proc.stdout.split("\n", 1)
    assert proc.returncode == 0 and first.startswith("train 2 steps on ") and " nats a token at step " in first
    assert json.loads(rest)["steps"] == 2
    proc = cli("generate", "--run", str(tmp_path), "--tokens", tokens, "--per-class", "1", "--unconditional", "2")
    first, rest = proc.stdout.split("\n", 1)
    assert first.startswith("generate 12 fields (1 per class, 2 unconditional) in ")
    assert json.loads(rest)["n_fields"] == 12
    proc = cli("evaluate", "--run", str(tmp_path), "--ref-split", "mnist:test[8000:8030]")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("evaluate against mnist:test[8000:8030], oracle from mnist:test[:40] → ")
    assert lines[1].startswith("  class-conditional (10): MMD ") and lines[2].startswith("  unconditional (2): MMD ")
    assert json.loads("\n".join(lines[4:]))["splits"]["train"] == "mnist:test[:40]"
    fitted = load_fields(run_dir / "fields.safetensors")  # relabelled: mnist:test[:40] has no 8
    fields = tmp_path / "fields.safetensors"
    save_fields(fields, fitted.weights, torch.arange(40) % 10, fitted.psnr, fitted.spec, fitted.image_shape, {})
    proc = cli("baseline", "--run", str(run_dir), "--fields", str(fields), "--per-class", "1", "--out",
               str(tmp_path / "gauss"))
    first, rest = proc.stdout.split("\n", 1)
    assert first.startswith("baseline gaussian: 10 fields → ") and first.endswith(
        f"score them with `nfgen evaluate --run {tmp_path / 'gauss'} --classifier "
        f"{run_dir / 'classifier.safetensors'}`")
    assert json.loads(rest)["kind"] == "gaussian"


def test_evaluate_refuses_references_it_cannot_use(cli, run_dir, tmp_path):
    out = ["--run", str(tmp_path), "--samples", str(run_dir / "samples.safetensors"), "--quiet"]
    # references that are training images too: the oracle and memorisation would score copies of themselves
    assert_clean_error(cli("evaluate", *out, "--ref-split", "mnist:test[30:90]"),
                       "mnist:test[30:90] and mnist:test[:40] share 10 images; the references must be held out")
    assert_clean_error(cli("evaluate", *out, "--ref-split", "mnist:test[8000:8060]", "--train-split",
                           "mnist:test[7990:8001]"), "share 1 image;")
    # no default references for a dataset other than MNIST
    assert_clean_error(cli("evaluate", *out, "--train-split", "cifar10:test[:40]"),
                       "the samples come from cifar10:test[:40]; name held-out cifar10 images as references with "
                       "--ref-split")
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_images_from_another_generator(cli, tmp_path, data_root):
    from safetensors.torch import save_file

    from nfgen.data import load_split

    real = load_split("mnist:test[9000:9030]", data_root=data_root)
    save_file({"images": real.images, "labels": real.labels}, str(tmp_path / "mine.safetensors"))
    run = tmp_path / "run"
    splits = ["--ref-split", "mnist:test[8000:8060]", "--train-split", "mnist:test[:40]", "--quiet"]
    proc = cli("evaluate", "--run", str(run), "--images", str(tmp_path / "mine.safetensors"), *splits)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sizes"]["conditional"] == 30 and metrics["inputs"]["images"] == str(tmp_path / "mine.safetensors")
    assert json.loads((run / "evaluate.config.json").read_text())["images"] == str(tmp_path / "mine.safetensors")
    save_file({"images": real.images * 255}, str(tmp_path / "bytes-as-float.safetensors"))
    assert_clean_error(cli("evaluate", "--run", str(tmp_path / "bad"), "--images",
                           str(tmp_path / "bytes-as-float.safetensors"), *splits), "clamp (or rescale) them to [0, 1]")
    assert not (tmp_path / "bad").exists()


def test_demo_without_data_leaves_no_run_folder(cli, tmp_path):
    assert_clean_error(cli("demo", "--run", str(tmp_path / "demo"), "--data-root", str(tmp_path / "nowhere")),
                       "not found")
    assert not (tmp_path / "demo").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no folder can be made")
def test_demo_run_folder_that_cannot_be_made(cli, data_root):
    assert_clean_error(cli("demo", "--run", "/proc/nfgen-demo", "--data-root", str(data_root)), "cannot write")


def test_demo_end_to_end_at_a_tiny_size(cli, data_root, tmp_path, tiny_demo):
    """The demo's own stages and recipe (template → fit from it → class-pca tokens → GPT → expected-from
    sampling → evaluate) with every size shrunk: each artifact, the summary and the fields' start from the
    template."""
    run = tmp_path / "demo"
    proc = cli("demo", "--run", str(run), "--data-root", str(data_root), "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "demo.json").read_text())
    assert list(summary["seconds"]) == ["classifier", "template", "fit", "tokenize", "train", "generate", "evaluate"]
    for name in ("template.safetensors", "fields.safetensors", "tokens.safetensors", "model.safetensors",
                 "samples.safetensors", "samples.png", "metrics.json", "demo.config.json"):
        assert (run / name).is_file(), name
    template = load_fields(run / "template.safetensors")
    fields = load_fields(run / "fields.safetensors")
    assert template.weights.shape == (1, 33) and fields.weights.shape == (120, 33)
    assert fields.meta["recipe"]["template"] == str(run / "template.safetensors")
    tokens = load_tokens(run / "tokens.safetensors")
    assert tokens.meta["tokenizer"]["basis"] == "class-pca" and tokens.meta["tokenizer"]["center"] == "class"
    samples = load_fields(run / "samples.safetensors")
    assert samples.weights.shape == (24, 33) and torch.isfinite(samples.weights).all()
    assert samples.meta["sampling"]["expected_from"] == 32
    metrics = summary["metrics"]
    assert 0 <= metrics["classifier"]["accuracy"]["samples"] <= 1
    assert all(0 <= metrics["conditional"][m]["samples"] <= 1 for m in ("mmd", "cov", "1nna"))


def test_unwritable_outputs_refused_before_any_work(cli, tmp_path, run_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = cli("fit", "--run", str(tmp_path / "r"), *TINY_FIT, "--out", str(blocker / "fields.safetensors"))
    assert_clean_error(proc, "is a file, not a folder")
    (tmp_path / "folder.safetensors").mkdir()
    proc = cli("tokenize", "--run", str(tmp_path / "r"), "--fields", str(run_dir / "fields.safetensors"),
               "--out", str(tmp_path / "folder.safetensors"))
    assert_clean_error(proc, "is a folder")
    # a folder where the picture goes: refused before the samples file is written beside it
    gen = tmp_path / "gen"
    (gen / "samples.png").mkdir(parents=True)
    proc = cli("generate", "--run", str(gen), "--model", str(run_dir / "model.safetensors"),
               "--tokens", str(run_dir / "tokens.safetensors"), "--per-class", "1")
    assert_clean_error(proc, "samples.png is a folder")
    assert_clean_error(cli("evaluate", "--run", str(blocker), "--samples", str(run_dir / "samples.safetensors")),
                       "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "folder.safetensors", "gen", "samples.png"]


def test_atomic_write_turns_os_errors_into_one_line(tmp_path, monkeypatch):
    from nfgen.io import NfgenError, atomic_write, write_json

    (tmp_path / "f").write_text("x")
    with pytest.raises(NfgenError, match="cannot write .*f/out.json"):
        write_json(tmp_path / "f" / "out.json", {})

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nfgen.io.os.replace", disk_full)
    with pytest.raises(NfgenError, match="No space left on device"):
        with atomic_write(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left behind


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path, umask):
    """The temporary file mkstemp makes is private (0600); the artifact must not stay so."""
    from nfgen.io import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_hand_edited_metadata_refused(cli, tmp_path, run_dir):
    tensors, meta = load_artifact(run_dir / "tokens.safetensors", "tokens")
    bad = tmp_path / "nan-codebooks.safetensors"
    save_artifact(bad, "tokens", {**tensors, "codebooks": tensors["codebooks"] * float("nan")}, meta)
    assert_clean_error(cli("train", "--run", str(tmp_path / "t"), "--tokens", str(bad)), "codebooks holds")
    for value in (28, [-28, 28], "28x28"):
        bad = tmp_path / "shape.safetensors"
        save_artifact(bad, "tokens", tensors, {**meta, "image_shape": value})
        assert_clean_error(cli("train", "--run", str(tmp_path / "t"), "--tokens", str(bad)), "invalid image_shape")
    save_artifact(bad, "tokens", tensors, {**meta, "tokenizer": "x"})
    assert_clean_error(cli("train", "--run", str(tmp_path / "t"), "--tokens", str(bad)), "invalid tokenizer")
    tensors, meta = load_artifact(run_dir / "fields.safetensors", "fields")
    save_artifact(tmp_path / "fields.safetensors", "fields", tensors, {**meta, "image_shape": [28]})
    assert_clean_error(cli("tokenize", "--run", str(tmp_path)), "invalid image_shape")
    # a source that is not a split's record: tokenize measures against the fields' own renders
    save_artifact(tmp_path / "fields.safetensors", "fields", tensors, {**meta, "source": "x"})
    assert cli("tokenize", "--run", str(tmp_path), "--codebook-size", "8", "--iters", "2", "--quiet").returncode == 0


# --- resuming: every refusal is one line and exit 2; a world-size change is allowed for fit, handled for train

def test_fit_resume_errors_and_world_size_change(cli, tmp_path, data_root, monkeypatch):
    import nfgen.distributed as dist
    from nfgen.fields import FitConfig, run_fit, shard_path

    out = tmp_path / "fields.safetensors"
    fit = ["fit", "--run", str(tmp_path), "--out", str(out), "--split", "mnist:test[:12]", "--hidden", "16",
           "--hidden-layers", "1", "--chunk", "4", "--device", "cpu", "--quiet"]
    # Rank 0 of 2 fits shards 0 and 2; rank 1 never ran, so the merge finds shard 1 missing.
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    assert_clean_error(cli(*fit, "--steps", "40"), "shard 1 of 3 is missing from")
    assert "; with several machines, put --out on a filesystem they all share" in cli(*fit, "--steps", "40").stderr
    monkeypatch.undo()
    assert shard_path(out, 0).is_file() and shard_path(out, 2).is_file() and not out.exists()
    assert_clean_error(cli(*fit, "--steps", "30"), "shards of an unfinished fit with other inputs (steps: 40 → 30)")
    # The same command in one process finishes shard 1 alone: the file of an uninterrupted one-process run.
    proc = cli(*fit, "--steps", "40")
    assert proc.returncode == 0 and json.loads(proc.stdout)["shards_fitted"] == [1], proc.stderr
    run_fit("mnist:test[:12]", tmp_path / "ref.safetensors", FitConfig(hidden=16, hidden_layers=1, chunk=4,
                                                                       steps=40, device="cpu", quiet=True))
    a, b = load_fields(out), load_fields(tmp_path / "ref.safetensors")
    assert torch.equal(a.weights, b.weights) and torch.equal(a.psnr, b.psnr)


def test_train_resume_errors(cli, tmp_path, tokens_file, monkeypatch):
    import nfgen.distributed as dist

    run = tmp_path / "run"
    train = ["train", "--run", str(run), "--tokens", str(tokens_file), "--n-layer", "1", "--n-head", "2",
             "--n-embd", "16", "--batch-size", "8", "--device", "cpu", "--quiet"]
    assert cli(*train, "--steps", "3").returncode == 0
    assert_clean_error(cli(*train, "--steps", "6", "--lr", "0.01", "--resume"),
                       "--resume with different options than the original run (lr: 0.0006 → 0.01)")
    other = tmp_path / "other.safetensors"
    tensors, meta = load_artifact(tokens_file, "tokens")
    tensors["tokens"] = tensors["tokens"].flip(1)
    save_artifact(other, "tokens", tensors, meta)
    assert_clean_error(cli(*train[:4], str(other), *train[5:], "--steps", "6", "--resume"),
                       "--resume with other training data than the original run")
    assert_clean_error(cli(*train[:2], str(tmp_path / "elsewhere"), *train[3:], "--resume"),
                       "train_state file not found")
    # Another world size resumes (tests/test_distributed.py) unless the global batch cannot split over it.
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    assert_clean_error(cli(*train, "--steps", "6", "--resume"),
                       "does not split evenly over 3 processes; resume with a number of processes that divides 8")


def test_baseline_samples_then_evaluate(cli, run_dir, tmp_path):
    fitted = load_fields(run_dir / "fields.safetensors")
    # mnist:test[:40] has no 8: relabel so every class has 4 fields (the Gaussian's maths is test_baselines')
    fields = tmp_path / "fields.safetensors"
    save_fields(fields, fitted.weights, torch.arange(40) % 10, fitted.psnr, fitted.spec, fitted.image_shape, {})
    out = tmp_path / "gauss"
    proc = cli("baseline", "--run", str(run_dir), "--fields", str(fields), "--per-class", "3", "--unconditional", "2",
               "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["evaluate_with"] == f"nfgen evaluate --run {out} --classifier {run_dir / 'classifier.safetensors'}"
    samples = load_fields(out / "samples.safetensors")
    assert samples.weights.shape == (32, 33) and samples.meta["generated"] and samples.meta["seed"] == 0
    assert samples.labels.tolist() == [c for c in range(10) for _ in range(3)] + [-1, -1]
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again"
    assert cli("baseline", "--run", str(run_dir), "--fields", str(fields), "--per-class", "3", "--unconditional", "2",
               "--out", str(again), "--quiet").returncode == 0
    assert torch.equal(load_fields(again / "samples.safetensors").weights, samples.weights)  # seeded
    gpt_metrics = (run_dir / "metrics.json").read_text()
    proc = cli("evaluate", "--run", str(out), "--classifier", str(run_dir / "classifier.safetensors"),
               "--ref-split", "mnist:test[8000:8060]", "--train-split", "mnist:test[:40]", "--quiet")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["groups"]["conditional_all"]["mmd"]["samples"] <= 1
    assert metrics["classifier"]["n"]["samples"] == 30  # the baseline's 3 per class, scored by --classifier
    assert (run_dir / "metrics.json").read_text() == gpt_metrics  # the GPT's metrics are left alone


def test_token_baselines_draw_position_by_position_or_copy(cli, run_dir, tmp_path):
    # mnist:test[:40] has no 8: relabel so every class has 4 sequences (the draws' maths is test_baselines')
    tensors, meta = load_artifact(run_dir / "tokens.safetensors", "tokens")
    tensors["labels"] = torch.arange(40) % 10
    tokens = tmp_path / "tokens.safetensors"
    save_artifact(tokens, "tokens", tensors, meta)
    ts = load_tokens(tokens)
    base = ["baseline", "--run", str(run_dir), "--kind", "marginals", "--tokens", str(tokens), "--per-class", "3",
            "--unconditional", "2", "--quiet"]
    out = tmp_path / "marginals"
    proc = cli(*base, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "marginals"
    samples = load_fields(out / "samples.safetensors")
    assert samples.weights.shape == (32, 33) and samples.meta["weights"] == "sampled"
    assert samples.labels.tolist() == [c for c in range(10) for _ in range(3)] + [-1, -1]
    assert samples.meta["training_split"] == "mnist:test[:40]"  # from the tokens file: evaluate's default
    # every weight of a class-c draw is a code value some class-c training field has at that position
    drawn = ts.tokenizer.encode(samples.weights[:30], samples.labels[:30])
    for i in range(30):
        seen = ts.tokens[ts.labels == samples.labels[i]]
        assert ((seen == drawn[i]).any(0)).all(), i
    # expected weights everywhere: a class's draws are all its mean de-tokenized field
    out = tmp_path / "expected"
    assert cli(*base, "--weights", "expected", "--out", str(out)).returncode == 0
    expected = load_fields(out / "samples.safetensors")
    detok = ts.tokenizer.decode(ts.tokens, ts.labels)
    for c in range(10):
        torch.testing.assert_close(expected.weights[3 * c:3 * c + 3], detok[ts.labels == c].mean(0).expand(3, -1),
                                   atol=1e-5, rtol=1e-5)
    # the bootstrap at bandwidth 0 copies: every draw is a de-tokenized training field of its class
    out = tmp_path / "copies"
    base_boot = [a if a != "marginals" else "bootstrap" for a in base]
    assert cli(*base_boot, "--bandwidth", "0", "--out", str(out)).returncode == 0
    copies = load_fields(out / "samples.safetensors")
    assert copies.meta["bandwidth"] == 0.0
    for i in range(30):
        c = int(copies.labels[i])
        assert float((detok[ts.labels == c] - copies.weights[i]).abs().max(1).values.min()) < 1e-5, i
    assert_clean_error(cli(*base, "--bandwidth", "0.5", "--out", str(tmp_path / "e")), "it needs --kind bootstrap")
    assert_clean_error(cli(*base_boot, "--bandwidth", "-1", "--out", str(tmp_path / "e")), "--bandwidth must be ≥ 0")
    assert_clean_error(cli(*base, "--expected-from", "4", "--out", str(tmp_path / "e")), "add --weights expected")
    assert_clean_error(cli(*base, "--weights", "expected", "--expected-from", "33", "--out", str(tmp_path / "e")),
                       "--expected-from 33 is past the 33 code tokens")
    assert_clean_error(cli("baseline", "--run", str(run_dir), "--weights", "expected", "--out", str(tmp_path / "e")),
                       "they need --kind marginals")
    # the fixture's own tokens hold no 8
    assert_clean_error(cli("baseline", "--run", str(run_dir), "--kind", "marginals", "--out", str(tmp_path / "e")),
                       "class 8 has no training sequences")
    assert_clean_error(cli("baseline", "--run", str(tmp_path / "nowhere"), "--kind", "marginals",
                           "--out", str(tmp_path / "e")), "nfgen tokenize")
    assert not (tmp_path / "e").exists()


def test_baseline_bad_input(cli, run_dir, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(cli("baseline", "--run", str(tmp_path), "--out", str(out)), "run `nfgen fit` first")
    assert_clean_error(cli("baseline", "--run", str(run_dir), "--per-class", "0", "--out", str(out)),
                       "nothing to generate")
    assert_clean_error(cli("baseline", "--run", str(run_dir), "--fields", str(run_dir / "samples.safetensors"),
                           "--out", str(out)), "holds generated fields")
    # the fixture's 40 images hold no 8: its Gaussian cannot be formed
    assert_clean_error(cli("baseline", "--run", str(run_dir), "--out", str(out)), "class 8 has 0 example(s)")
    assert not out.exists()


def test_rgb_pipeline_end_to_end(tmp_path, cifar_data_root, capsys):
    """CIFAR-10 through every stage: 3-output SIRENs on 32×32 colour images, class-pca tokens, the GPT, sampling
    and the per-channel SSIM metrics."""
    run = ["--run", str(tmp_path), "--quiet"]  # the data comes from NFGEN_DATA, which cifar_data_root checked
    assert main(["fit", *run, "--split", "cifar10:test[:60]", "--hidden", "16", "--steps", "30"]) == 0
    assert main(["tokenize", *run, "--basis", "class-pca", "--center", "class", "--iters", "5"]) == 0
    assert main(["train", *run, "--steps", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                 "--batch-size", "8", "--eval-every", "2"]) == 0
    assert main(["classifier", *run, "--epochs", "1"]) == 2  # MNIST's default splits, for CIFAR-10 fields: refused
    assert "holds fields of cifar10:test[:60]; name the classifier's --train-split and --heldout-split from " \
           "cifar10" in capsys.readouterr().err
    assert main(["classifier", *run, "--train-split", "cifar10:test[:300]", "--epochs", "1"]) == 2  # both, please
    assert not (tmp_path / "classifier.safetensors").exists()
    assert main(["classifier", *run, "--train-split", "cifar10:test[:300]", "--heldout-split",
                 "cifar10:test[9000:9100]", "--epochs", "1"]) == 0
    assert main(["generate", *run, "--per-class", "2", "--unconditional", "4", "--weights", "expected",
                 "--expected-from", "32"]) == 0
    assert main(["evaluate", *run]) == 2  # MNIST's default references do not fit: named in one line, below
    assert not (tmp_path / "metrics.json").exists()
    assert main(["evaluate", *run, "--ref-split", "cifar10:test[8000:8040]"]) == 0
    fields = load_fields(tmp_path / "fields.safetensors")
    assert fields.meta["architecture"]["out_dim"] == 3 and list(fields.meta["image_shape"]) == [32, 32, 3]
    assert fields.weights.shape == (60, 2 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3)
    assert float(fields.psnr.mean()) > 12.0
    samples = load_fields(tmp_path / "samples.safetensors")
    assert samples.weights.shape == (24, fields.weights.shape[1]) and torch.isfinite(samples.weights).all()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sizes"]["image_shape"] == [32, 32, 3]
    assert metrics["splits"] == {"references": "cifar10:test[8000:8040]", "train": "cifar10:test[:60]"}
    assert all(0 <= v <= 1 for m in ("mmd", "cov", "1nna") for v in metrics["groups"]["conditional_all"][m].values())
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "nearest.png").stat().st_size > 0
