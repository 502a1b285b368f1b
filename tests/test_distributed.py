"""Scaling out on CPU/gloo: torchrun-sharded fit equals one process bit for bit, a SIGKILLed fit resumes onto the
same file, 2-process DDP training follows the 1-process loss curve of the same global batch and a SIGKILLed DDP
run resumes onto the uninterrupted one exactly; 2-process generate and evaluate equal one process exactly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nfgen import distributed
from nfgen.data import load_split
from nfgen.fields import FitConfig, fit_fields, load_fields, run_fit, shard_dir, shard_path
from nfgen.io import NfgenError, load_artifact
from nfgen.train import TrainConfig, train

SPLIT = "mnist:test[:12]"
# shard = chunk = 4 fields → 3 shards, so 2 ranks own unequal numbers of shards (0, 2 and 1).
FIT = dict(hidden=16, hidden_layers=1, steps=40, chunk=4, device="cpu", quiet=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def fit_args(cfg: dict) -> list[str]:
    args = ["--split", SPLIT, "--quiet"]
    for k, v in cfg.items():
        if k != "quiet":
            args += [f"--{k.replace('_', '-')}", str(v)]
    return args


ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import nfgen from this checkout even where it is not pip-installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def torchrun_cmd(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "nfgen", *args]


def torchrun(nproc: int, *args, cwd, timeout=240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m nfgen …` (a free local port). (torchrun's own parser mistakes nfgen's --run for
    an abbreviation of its --run-path, so these runs pass --out/--tokens and work in `cwd`.)"""
    proc = subprocess.run(torchrun_cmd(nproc, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
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
    assert distributed.all_reduce_min(5) == 5 and distributed.all_gather_rows(x, [1]) is x


@pytest.mark.parametrize("device,gpus,local_rank,joined", [
    ("cpu", 1, 1, ["gloo"]), ("auto", 1, 0, ["cuda:0", "nccl"]), ("auto", 0, 1, ["gloo"]), ("cuda", 1, 1, None)])
def test_the_process_group_follows_the_device(monkeypatch, device, gpus, local_rank, joined):
    # --device cpu joins gloo without touching a GPU, so a 2-process CPU run works on a 1-GPU machine (it
    # failed there with "invalid device ordinal"); a GPU run with more processes than GPUs says what to change.
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(f"cuda:{i}"))
    if joined is None:
        with pytest.raises(NfgenError, match="more processes on this machine than its 1 GPU.*--nproc-per-node 1"):
            distributed.init_from_env(device)
        assert calls == []
    else:
        assert distributed.init_from_env(device) and calls == joined


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
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
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


def test_a_shard_appears_whole_or_not_at_all(reference_fields, tmp_path, data_root):
    from nfgen.io import atomic_write

    # atomic_write: the name appears only when the block finishes; a failed block leaves nothing behind.
    target = tmp_path / "x.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        assert not target.exists()
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "y.bin") as tmp:
        raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    # A SIGKILL mid-write skips that clean-up: a torn temporary file stays in the shard folder. The rerun
    # neither trusts nor trips over it, fits every shard and removes the folder with it.
    out = tmp_path / "fields.safetensors"
    shard_dir(out).mkdir()
    (shard_dir(out) / ".shard-1.safetensors.k1ll3d.tmp").write_bytes(reference_fields.read_bytes()[:300])
    assert run_fit(SPLIT, out, FitConfig(**FIT), data_root=data_root)["shards_fitted"] == [0, 1, 2]
    assert_same_fields(out, reference_fields)
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

# 20 steps: a SIGKILL after the first checkpoint (step 2) still lands well before the end.
TRAIN = dict(n_layer=2, n_head=2, n_embd=32, steps=20, batch_size=8, lr=3e-3, warmup=2, eval_every=1,
             checkpoint_every=5, val_fraction=0.1, device="cpu")


def train_args(tokens, cfg: dict, *extra: str) -> list[str]:
    args = ["train", "--tokens", str(tokens), "--quiet", *extra]
    for k, v in cfg.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def losses(run, key="train_loss") -> torch.Tensor:
    _, meta = load_artifact(run / "model.safetensors", "model")
    return torch.tensor([h[key] for h in meta["history"]], dtype=torch.float64)


@pytest.fixture(scope="module")
def one_process_run(tokens_file, tmp_path_factory):
    """The 1-process reference curve (its checkpoint_every does not change what is computed)."""
    run = tmp_path_factory.mktemp("one")
    train(tokens_file, run, TrainConfig(**TRAIN, quiet=True))
    return run


@pytest.fixture(scope="module")
def two_process_run(tokens_file, tmp_path_factory):
    """The uninterrupted 2-process DDP run (the CLI's default run directory under cwd)."""
    work = tmp_path_factory.mktemp("two")
    torchrun(2, *train_args(tokens_file, TRAIN), cwd=work)
    return work / "runs" / "default"


def test_ddp_two_processes_follow_the_one_process_loss_curve(one_process_run, two_process_run):
    a, b = losses(one_process_run), losses(two_process_run)
    assert len(a) == len(b) == TRAIN["steps"] and a[-1] < a[0]
    # Same samples, same init; only the float summation order of the gradient average differs (allreduce of two
    # half-batch means vs one mean), which Adam carries along: 1e-4 relative over 20 steps (seen: 1e-7 train,
    # 2e-7 val).
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)
    torch.testing.assert_close(losses(two_process_run, "val_loss"), losses(one_process_run, "val_loss"),
                               rtol=1e-4, atol=0)
    # --keep best: the writing rank snapshots the best weights (the other ranks only track the step), and the
    # model file holds the same step's weights as the one-process run's
    (wa, ma), (wb, mb) = (load_artifact(r / "model.safetensors", "model") for r in (one_process_run, two_process_run))
    assert mb["kept"]["rule"] == "best" and mb["kept"]["step"] == ma["kept"]["step"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


def test_ddp_refuses_a_global_batch_that_does_not_split(tokens_file, tmp_path, monkeypatch):
    import nfgen.train as train_mod

    monkeypatch.setattr(train_mod.distributed, "world_size", lambda: 3)
    with pytest.raises(NfgenError, match="does not split evenly over 3 processes"):
        train(tokens_file, tmp_path / "r", TrainConfig(**TRAIN, quiet=True))


def test_one_process_checkpoint_resumes_under_two_processes(tokens_file, one_process_run, tmp_path, monkeypatch,
                                                           die_at_step):
    # One process, killed during step 3 (after the step-2 checkpoint)…
    run = tmp_path / "runs" / "default"  # the CLI's default run directory under cwd=tmp_path
    die_at_step(3)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, run, TrainConfig(**{**TRAIN, "checkpoint_every": 2}, quiet=True))
    monkeypatch.undo()
    # …resumed by two: the data position is global, so the curve goes on as if nothing happened.
    torchrun(2, *train_args(tokens_file, {**TRAIN, "checkpoint_every": 2}, "--resume"), cwd=tmp_path)
    la, lb = losses(one_process_run), losses(run)
    assert len(lb) == TRAIN["steps"] and torch.equal(lb[:2], la[:2])  # steps 1-2: the one-process part, exact
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=0)  # steps 3-20 under DDP: as in the test above


def _children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc: torchrun's workers, which it starts in sessions of their own."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_sigkilled_ddp_train_resumes_onto_the_uninterrupted_run_exactly(tokens_file, two_process_run, tmp_path):
    cfg = {**TRAIN, "checkpoint_every": 2}  # does not change what is computed, only how often it is saved
    run = tmp_path / "runs" / "default"
    state = run / "train_state.safetensors"
    proc = subprocess.Popen(torchrun_cmd(2, *train_args(tokens_file, cfg)), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.stderr.read().decode()[-3000:]
    workers = _children(proc.pid)
    for pid in [proc.pid, *workers]:  # the launcher, then both ranks: the whole job dies at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(workers) == 2 and all(map(_gone, workers))
    _, meta = load_artifact(state, "train_state")
    assert 2 <= meta["step"] < TRAIN["steps"]  # killed mid-run, after at least one checkpoint

    torchrun(2, *train_args(tokens_file, cfg, "--resume"), cwd=tmp_path)
    wa, a = load_artifact(two_process_run / "model.safetensors", "model")
    wb, b = load_artifact(run / "model.safetensors", "model")
    assert b["history"] == a["history"]  # every step's train and val loss, exactly
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- generate and evaluate

EVAL = dict(ref_split="mnist:test[100:130]", train_split="mnist:test[:60]", device="cpu", seed=0, quiet=True)


def _sampling():
    from nfgen.generate import SampleConfig

    # batch 4 over 19 samples: 5 batches, ranks get 3 and 2 (the second one ends with the partial batch)
    return dict(per_class=5, unconditional=4, device="cpu",
                cfg=SampleConfig(temperature=1.2, top_k=5, cfg_scale=1.5, seed=7, batch_size=4, quiet=True))


def test_each_rank_decodes_the_rows_of_its_batches(monkeypatch):
    """Rank r of K (seed draws skipped up to its first batch) decodes exactly its rows of the one-process result,
    also when there are more ranks than batches."""
    import nfgen.generate as G
    from nfgen.model import GPT, GPTConfig
    from nfgen.vocab import Vocab

    vocab, length = Vocab(n_codes=11, n_classes=3), 7
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab.size, block_size=length + 1, n_layer=1, n_head=2, n_embd=16))
    classes = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0])  # batch 2: 5 batches, the last one partial
    cfg = G.SampleConfig(temperature=1.3, seed=5, batch_size=2, quiet=True)
    whole = G.generate_tokens(model, vocab, classes, length, cfg)
    monkeypatch.setattr(G.distributed, "all_gather_rows", lambda x, counts: x)  # each rank's own rows
    for world, sizes in {2: [6, 3], 3: [4, 4, 1], 7: [2, 2, 2, 2, 1, 0, 0]}.items():
        parts = []
        for r in range(world):
            monkeypatch.setattr(G.distributed, "world_size", lambda: world)
            monkeypatch.setattr(G.distributed, "rank", lambda: r)
            parts.append(G.generate_tokens(model, vocab, classes, length, cfg))
        assert [len(p) for p in parts] == sizes
        assert torch.equal(torch.cat(parts), whole)


def _generate_and_evaluate(rank: int, world: int, port: int, model, tokens, out) -> None:
    """One torchrun-like rank (torch.multiprocessing.spawn target): generate, then evaluate what it generated."""
    from nfgen.generate import run_generate
    from nfgen.metrics import run_evaluate

    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS
    try:
        run_generate(model, tokens, out, **_sampling())
        run_evaluate(Path(out) / "samples.safetensors", out, **EVAL)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sampling_model(tmp_path_factory):
    """A small random GPT over a 2-level residual tokenizer of 2→4→1 SIRENs rendered at MNIST's 28×28."""
    from nfgen.model import GPT, GPTConfig, save_model
    from nfgen.tokenizer import TokenizerConfig, TokenSet, WeightTokenizer, save_tokens
    from nfgen.vocab import Vocab
    from nfkernels import SirenSpec

    d = tmp_path_factory.mktemp("sampling")
    spec, g = SirenSpec(hidden=4, hidden_layers=1), torch.Generator().manual_seed(0)
    tok = WeightTokenizer(spec, TokenizerConfig(codebook_size=8, levels=2), torch.randn(2, 8, 1, generator=g) * 0.3,
                          torch.ones(4))
    tokens = torch.randint(0, 8, (6, tok.tokens_per_field), generator=g) + tok.token_ranges()[:, 0]
    save_tokens(d / "tokens.safetensors", TokenSet(tokens, torch.tensor([0, 1, 2] * 2), tok, spec, (28, 28),
                                                   {"n_classes": 3}))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=Vocab(tok.n_codes, 3).size, block_size=tok.tokens_per_field + 1, n_layer=1,
                        n_head=2, n_embd=16))
    save_model(d / "model.safetensors", gpt, {"n_codes": tok.n_codes, "n_classes": 3,
                                              "tokens_per_field": tok.tokens_per_field})
    return d / "model.safetensors", d / "tokens.safetensors"


def test_two_process_generate_and_evaluate_equal_one_process(sampling_model, tmp_path, data_root):
    one, two = tmp_path / "one", tmp_path / "two"
    _generate_and_evaluate(0, 1, 0, *sampling_model, one)
    mp.spawn(_generate_and_evaluate, args=(2, _free_port(), *sampling_model, two), nprocs=2)
    a, b = load_fields(one / "samples.safetensors"), load_fields(two / "samples.safetensors")
    # Bit for bit: each batch decodes with its own seeds whichever rank runs it.
    assert torch.equal(a.weights, b.weights) and torch.equal(a.labels, b.labels) and a.meta == b.meta
    assert (one / "samples.png").read_bytes() == (two / "samples.png").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (ma.pop("inputs")["world_size"], mb.pop("inputs")["world_size"]) == (1, 2)
    ma.pop("timing"), mb.pop("timing")
    # Exactly: every SSIM pair is computed as in one process and the nearest-neighbour ties resolve alike.
    assert mb == ma
    assert ma["groups"]["conditional_all"]["n"] == 15 and "mmd" in ma["groups"]["unconditional"]
    assert (one / "nearest.png").read_bytes() == (two / "nearest.png").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the run's processes through /proc")
def test_scaleout_check_runs_and_is_exact_on_cpu(tmp_path, data_root, monkeypatch):
    # The script behind issue 7's GPU record (benchmarks/results/scaleout-*.json), at a tiny size: on CPU its
    # torchrun fit equals the plain one and its SIGKILLed, resumed train equals the uninterrupted one exactly.
    from benchmarks import scaleout_check

    monkeypatch.setenv("NFGEN_DATA", str(data_root))
    # the script's subprocess environment (it also hides GPUs there for --device cpu): a copy, undone afterwards
    monkeypatch.setattr(scaleout_check, "ENV", {**scaleout_check.ENV, "NFGEN_DATA": str(data_root)})
    out = tmp_path / "scaleout.json"
    scaleout_check.main(["--device", "cpu", "--split", "mnist:test[:12]", "--steps", "8", "--batch-size", "4",
                         "--fit-steps", "10", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["process_group"] == {"backend": "gloo", "world_size": 1, "all_reduce_mean_ok": True, "nccl": None}
    assert result["fit"]["identical"] and result["fit"]["fields"] == 12
    assert 1 <= result["train"]["killed_after_checkpoint_step"] < 8
    assert result["train"]["resumed_vs_uninterrupted"]["identical"]
    assert result["train"]["resumed_vs_uninterrupted"]["weights_identical"]
    assert result["train"]["plain_vs_torchrun"]["identical"]
