"""Scaling out on CPU/gloo: torchrun-sharded fit equals one process bit for bit, a SIGKILLed fit resumes onto the
same file, and 2-process DDP training follows the 1-process loss curve of the same global batch."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nfgen import distributed
from nfgen.data import load_split
from nfgen.fields import FitConfig, fit_fields, load_fields, run_fit, shard_dir, shard_path
from nfgen.io import NfgenError, load_artifact
from nfgen.train import TrainConfig, train

SPLIT = "mnist:test[:12]"
# shard = chunk = 4 fields → 3 shards, so 2 ranks own unequal numbers of shards (0, 2 and 1).
FIT = dict(hidden=16, hidden_layers=1, steps=40, chunk=4, device="cpu", quiet=True)


def fit_args(cfg: dict) -> list[str]:
    args = ["--split", SPLIT, "--quiet"]
    for k, v in cfg.items():
        if k != "quiet":
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def torchrun(nproc: int, *args, cwd, timeout=240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m nfgen …` (a free local port). (torchrun's own parser mistakes nfgen's --run for
    an abbreviation of its --run-path, so these runs pass --out/--tokens and work in `cwd`.)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "nfgen", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_fields(a, b):
    fa, fb = load_fields(a), load_fields(b)
    assert torch.equal(fa.weights, fb.weights) and torch.equal(fa.psnr, fb.psnr) and torch.equal(fa.labels, fb.labels)
    assert fa.meta["source"] == fb.meta["source"] and fa.meta["recipe"] == fb.meta["recipe"]


def test_shard_range_covers_everything_once():
    for n in (0, 1, 7, 12, 13):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        distributed.shard_range(4, 2, 2)


def test_single_process_helpers_are_noops():
    assert not distributed.init_from_env() or "WORLD_SIZE" in os.environ
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    distributed.barrier()
    x = torch.tensor([1.5])
    assert distributed.all_reduce_mean(x) is x


@pytest.fixture(scope="module")
def reference_fields(tmp_path_factory, data_root):
    """The one-process, uninterrupted fit every other run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "fields.safetensors"
    run_fit(SPLIT, out, FitConfig(**FIT), data_root=data_root)
    assert not shard_dir(out).exists()  # merged, folder removed
    return out


def test_two_process_fit_equals_one_process_bit_for_bit(reference_fields, tmp_path):
    out = tmp_path / "fields.safetensors"
    proc = torchrun(2, "fit", "--out", str(out), *fit_args(FIT), cwd=tmp_path)
    assert '"world_size": 2' in proc.stdout
    assert_same_fields(out, reference_fields)
    assert load_fields(out).meta["timing"]["world_size"] == 2 and not shard_dir(out).exists()


def test_shards_seed_independent_init_by_split_position(tmp_path, data_root):
    # Shard 1 starts at split position 4: its fields must get the draws of positions 4..7, not 0..3.
    cfg = FitConfig(**{**FIT, "init": "independent"})
    out = tmp_path / "fields.safetensors"
    run_fit(SPLIT, out, cfg, data_root=data_root)
    whole = fit_fields(load_split(SPLIT, data_root=data_root).images, cfg)  # same chunks, no shards
    assert torch.equal(load_fields(out).weights, whole.weights)


def test_sigkilled_fit_resumes_onto_the_same_file(tmp_path, data_root):
    # Slower shards (2 fields × 300 steps, 6 shards) so the kill lands mid-run.
    cfg = {**FIT, "steps": 300, "chunk": 2}
    ref = tmp_path / "ref.safetensors"
    run_fit(SPLIT, ref, FitConfig(**cfg), data_root=data_root)

    out = tmp_path / "fields.safetensors"
    cmd = [sys.executable, "-m", "nfgen", "fit", "--out", str(out), *fit_args(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not shard_path(out, 0).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = sorted(shard_dir(out).glob("shard-*.safetensors"))
    assert 1 <= len(done) < 6 and not out.exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}

    # A changed option must not mix with the finished shards.
    with pytest.raises(NfgenError, match=r"other inputs \(steps: 300 → 200\).*delete"):
        run_fit(SPLIT, out, FitConfig(**{**cfg, "steps": 200}), data_root=data_root)

    # The same command again (another world size would do as well): finished shards are reused, not refitted.
    summary = run_fit(SPLIT, out, FitConfig(**cfg), data_root=data_root)
    assert set(summary["shards_fitted"]) == set(range(6)) - {int(n[6:-12]) for n in mtimes}
    assert_same_fields(out, ref)
    assert not shard_dir(out).exists()


def test_merge_refuses_missing_or_foreign_shards(tmp_path, data_root, monkeypatch):
    import nfgen.fields as fields_mod

    out = tmp_path / "fields.safetensors"
    # Pretend another rank owns shard 1: this process fits 0 and 2, then the merge finds 1 missing.
    monkeypatch.setattr(fields_mod.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fields_mod.distributed, "rank", lambda: 0)
    with pytest.raises(NfgenError, match="shard 1 of 3 is missing.*rerun the same fit command"):
        run_fit(SPLIT, out, FitConfig(**FIT), data_root=data_root)
    assert shard_path(out, 0).exists() and shard_path(out, 2).exists() and not out.exists()
    tensors, meta = load_artifact(shard_path(out, 2), "fields_shard")
    assert (meta["lo"], meta["hi"]) == (8, 12) and tensors["weights"].shape == (4, 65)


# ----------------------------------------------------------------------------- DDP training

TRAIN = dict(n_layer=2, n_head=2, n_embd=32, steps=4, batch_size=8, lr=3e-3, warmup=2, eval_every=1,
             checkpoint_every=5, val_fraction=0.1, device="cpu")


@pytest.fixture(scope="module")
def one_process_run(tokens_file, tmp_path_factory):
    """The 1-process reference curve (its checkpoint_every does not change what is computed)."""
    run = tmp_path_factory.mktemp("one")
    train(tokens_file, run, TrainConfig(**TRAIN, quiet=True))
    return run


def test_ddp_two_processes_follow_the_one_process_loss_curve(tokens_file, one_process_run, tmp_path):
    args = ["train", "--tokens", str(tokens_file), "--quiet"]
    for k, v in TRAIN.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    work = tmp_path / "two"
    work.mkdir()
    torchrun(2, *args, cwd=work)
    _, one = load_artifact(one_process_run / "model.safetensors", "model")
    _, two = load_artifact(work / "runs" / "default" / "model.safetensors", "model")
    a = torch.tensor([h["train_loss"] for h in one["history"]], dtype=torch.float64)
    b = torch.tensor([h["train_loss"] for h in two["history"]], dtype=torch.float64)
    assert len(a) == len(b) == TRAIN["steps"] and a[-1] < a[0]
    # Same samples, same init; only the float summation order of the gradient average differs (allreduce of two
    # half-batch means vs one mean), which Adam carries along: 1e-4 relative over 4 steps (seen: 1e-7).
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
    va = torch.tensor([h["val_loss"] for h in one["history"]])
    vb = torch.tensor([h["val_loss"] for h in two["history"]])
    torch.testing.assert_close(vb, va, rtol=1e-4, atol=0)


def test_ddp_refuses_a_global_batch_that_does_not_split(tokens_file, tmp_path, monkeypatch):
    import nfgen.train as train_mod

    monkeypatch.setattr(train_mod.distributed, "world_size", lambda: 3)
    with pytest.raises(NfgenError, match="does not split evenly over 3 processes"):
        train(tokens_file, tmp_path / "r", TrainConfig(**TRAIN, quiet=True))


def test_one_process_checkpoint_resumes_under_two_processes(tokens_file, one_process_run, tmp_path, monkeypatch,
                                                           die_at_step):
    ref = one_process_run
    # One process, killed during step 3 (after the step-2 checkpoint)…
    work = tmp_path / "work"
    run = work / "runs" / "default"  # the CLI's default run directory under cwd=work
    die_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, run, TrainConfig(**{**TRAIN, "checkpoint_every": 2}, quiet=True))
    monkeypatch.undo()
    # …resumed by two: the data position is global, so the curve goes on as if nothing happened.
    args = ["train", "--tokens", str(tokens_file), "--quiet", "--resume"]
    for k, v in {**TRAIN, "checkpoint_every": 2}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    torchrun(2, *args, cwd=work)
    _, a = load_artifact(ref / "model.safetensors", "model")
    _, b = load_artifact(run / "model.safetensors", "model")
    la = torch.tensor([h["train_loss"] for h in a["history"]], dtype=torch.float64)
    lb = torch.tensor([h["train_loss"] for h in b["history"]], dtype=torch.float64)
    assert len(lb) == TRAIN["steps"] and torch.equal(lb[:2], la[:2])  # steps 1-2: the one-process part, exact
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=0)  # steps 3-4 under DDP: as in the test above
