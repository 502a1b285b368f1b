"""Train a decoder-only GPT on token sequences [SOS, CLASS_c | NO_CLASS, t_1 … t_L].

One model samples both conditionally and unconditionally: with probability `class_dropout` a training
sequence carries NO_CLASS instead of its class token. Checkpoints are safetensors: `model.safetensors`
(weights + config, what generate reads: by default the weights of the lowest validation loss so far, see
TrainConfig.keep) and `train_state.safetensors` (the latest model, the kept one, AdamW state, step and RNG
states, what --resume reads). Batches are drawn from a seeded generator whose state is checkpointed, so a
resumed run sees the same batches and, on CPU, reproduces the uninterrupted loss curve exactly.

Under `torchrun --nproc-per-node K -m nfgen train …` the model is wrapped in DistributedDataParallel: the
GPT is ~10M parameters, so a full replica plus AdamW state fits every GPU many times over and FSDP's
sharding would only add communication. Every rank draws the same global batch of `batch_size` sequences
from the same checkpointed generator and trains on its own contiguous slice of it; DDP averages the
gradients, which equals the one-process gradient of the global batch (every sequence has the same number
of targets). The data position is therefore independent of the world size, so a run may resume with
another K. Rank 0 writes the checkpoints.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from nfgen import distributed
from nfgen.common import make_generator, pick_device, progress
from nfgen.io import NfgenError, load_artifact, save_artifact, write_json
from nfgen.model import GPT, GPTConfig, save_model, value_feature_width
from nfgen.tokenizer import load_tokens
from nfgen.vocab import Vocab


@dataclass
class TrainConfig:
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 384
    n_kv_head: int = 0  # key/value heads (grouped-query attention, faster decoding); 0: n_head
    dropout: float = 0.0
    # embed each code token's value too (GPTConfig.value_features): at the default size it won on the H100
    # (accuracy 0.920 against 0.869 at 1000 steps; benchmarks/results/quality-h100-ablations-*.json)
    value_embed: bool = True
    # GPTConfig.class_embed: the class embedding added to every position's input. It won on the CPU quality run
    # (accuracy 0.47 against 0.23, MMD 0.334 against 0.355, COV 0.15 against 0.105; 3 generation seeds, one
    # training run each, benchmarks/results/quality-cpu-small-{class-embed,margin}.json): the GPT no longer has
    # to learn to look back at position 1 before its samples can follow their class
    class_embed: bool = True
    # GPTConfig.role_nodes: embed the network nodes (neurons) each predicted weight joins
    weight_roles: bool = False
    steps: int = 5000
    batch_size: int = 32
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    class_dropout: float = 0.1
    val_fraction: float = 0.05
    eval_every: int = 250
    checkpoint_every: int = 1000
    # which weights model.safetensors holds: "best", those of the validation with the lowest loss so far (model
    # selection against overfitting a few thousand fields over many epochs), or "last", the latest step's.
    # train_state.safetensors always holds the latest (plus the best, for --resume). Without validation
    # fields (--val-fraction 0) "best" keeps the latest.
    keep: str = "best"
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    quiet: bool = False

    def validate(self) -> None:
        """Refuse an out-of-range option before any work, naming it as the CLI spells it and its valid range."""
        def fail(name: str, what: str, fix: str):
            value = getattr(self, name)
            raise NfgenError(f"{_option(name)} {value!r} {what}; {fix}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and not math.isnan(v)

        for name, low, what in [("n_layer", 1, "transformer blocks"), ("n_head", 1, "attention heads"),
                                ("n_embd", 1, "model width"), ("n_kv_head", 0, "key/value heads; 0: --n-head"),
                                ("steps", 1, "optimizer steps"), ("batch_size", 1, "sequences per step"),
                                ("warmup", 0, "warmup steps"), ("eval_every", 1, "steps between validations"),
                                ("checkpoint_every", 1, "steps between checkpoints")]:
            if not is_int(getattr(self, name)) or getattr(self, name) < low:
                fail(name, "is out of range", f"pass an integer ≥ {low} ({what})")
        if not is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            fail("seed", "is out of range", "pass an integer with 0 ≤ seed < 2^63")
        # (name, lowest, lowest allowed itself, highest, highest allowed itself, fix)
        for name, lo, lo_in, hi, hi_in, fix in [
                ("lr", 0.0, False, math.inf, False, "pass a finite learning rate > 0"),
                ("min_lr_ratio", 0.0, True, 1.0, True, "pass a fraction of --lr in [0, 1]"),
                ("weight_decay", 0.0, True, math.inf, False, "pass a finite AdamW weight decay ≥ 0"),
                ("beta1", 0.0, True, 1.0, False, "pass an AdamW beta in [0, 1)"),
                ("beta2", 0.0, True, 1.0, False, "pass an AdamW beta in [0, 1)"),
                ("grad_clip", 0.0, False, math.inf, True, "pass a gradient-norm clip > 0 (inf: no clipping)"),
                ("dropout", 0.0, True, 1.0, False, "pass a probability in [0, 1)"),
                ("class_dropout", 0.0, True, 1.0, True, "pass a probability in [0, 1]"),
                ("val_fraction", 0.0, True, 1.0, False, "pass a fraction in [0, 1)")]:
            v = getattr(self, name)
            if not is_real(v) or not (lo <= v if lo_in else lo < v) or not (v <= hi if hi_in else v < hi):
                fail(name, "is out of range", fix)
        for name in ("value_embed", "class_embed", "weight_roles", "compile", "quiet"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "is not a boolean", "pass True or False")
        if self.keep not in ("best", "last"):
            fail("keep", "is not a choice", "pass best or last")
        if not isinstance(self.device, str):
            fail("device", "is not a device name", "use auto, cpu or cuda[:N]")
        if self.device != "auto":
            pick_device(self.device)  # an unknown device, or CUDA asked for where there is none
        if self.n_embd % self.n_head:
            raise NfgenError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}; pass an --n-embd "
                             f"that is a multiple of --n-head")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise NfgenError(f"--n-kv-head {self.n_kv_head} must divide --n-head {self.n_head}; pass a divisor of "
                             "--n-head, or 0 for as many as --n-head")


def _option(name: str) -> str:
    """A TrainConfig field as the CLI spells it (--n-head); fields without an option keep their name."""
    return name if name in ("min_lr_ratio", "beta1", "beta2") else "--" + name.replace("_", "-")


# Options that may differ between a run and its resumption. None changes the batches or the init; --steps
# (raised to extend a finished run) also stretches the cosine lr schedule from the resumed step on.
_RESUME_FREE = {"steps", "eval_every", "checkpoint_every", "device", "quiet", "compile"}
# Options added with a default other than what runs before them did: a state that lacks one ran with this value.
_BEFORE_OPTION = {"class_embed": False, "weight_roles": False, "keep": "last"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress_ = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))
    return cfg.lr * ratio


def make_sequences(tokens: torch.Tensor, labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """[N, L] codes + [N] labels → [N, L + 2] sequences with the true class token."""
    n = tokens.shape[0]
    head = torch.stack([torch.full((n,), vocab.sos), labels + vocab.n_codes + 2], dim=1)
    return torch.cat([head, tokens], dim=1)


def batch_from(seqs: torch.Tensor, idx: torch.Tensor, drop: torch.Tensor | None, vocab: Vocab):
    """Inputs and targets for sequences `idx`; `drop` marks rows whose class becomes NO_CLASS."""
    seq = seqs[idx]
    if drop is not None:
        seq[:, 1] = torch.where(drop, torch.full_like(seq[:, 1], vocab.no_class), seq[:, 1])
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[:, 0] = -1  # the class token is given, never predicted
    return x, y


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=None)


def _state_tensors(model: GPT, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    out["rng.batches"] = gen.get_state()
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def data_fingerprint(seqs: torch.Tensor) -> str:
    """A hash of the training sequences (codes and class tokens): a resume must see the same data."""
    return hashlib.sha256(seqs.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


class _Unusable(Exception):
    """A train state that is not what nfgen writes (edited or corrupt); _restore names the file."""


def _restore(path: Path, model: GPT, opt: torch.optim.Optimizer, gen: torch.Generator, cfg: TrainConfig, device,
             data: str):
    """Load a train state into model, opt, gen and torch's RNG → (step, history, best). Everything is checked
    before anything is set: a state that is not what nfgen writes is refused as one error naming the file."""
    tensors, meta = load_artifact(path, "train_state", "start without --resume")
    try:
        return _restore_checked(path, tensors, meta, model, opt, gen, cfg, device, data)
    except _Unusable as exc:
        raise NfgenError(f"{path} is not a usable training state ({exc}); delete it, or train without --resume") \
            from None


def _restore_checked(path, tensors, meta, model, opt, gen, cfg, device, data):
    if not isinstance(meta, dict):
        raise _Unusable("its metadata is not a JSON object")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _Unusable("no step count" if step is None else f"step {step!r} is not a whole number ≥ 0")
    history = meta.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _Unusable("history is not a list of records")
    if not isinstance(meta.get("data", data), str):
        raise _Unusable(f"data fingerprint {meta['data']!r} is not a string")
    if meta.get("data", data) != data:  # states written before the fingerprint existed are not checked
        raise NfgenError(f"--resume with other training data than the original run ({meta.get('tokens_path')}); "
                         "pass its --tokens or start a new run directory")
    old = meta.get("train_config", {})
    if not isinstance(old, dict):
        raise _Unusable(f"train_config is a {type(old).__name__}, not a mapping of options")
    known = {**asdict(TrainConfig()), **_BEFORE_OPTION}  # an option newer than the checkpoint: what ran then
    diff = {k: (old.get(k, known[k]), v) for k, v in asdict(cfg).items()
            if k not in _RESUME_FREE and old.get(k, known[k]) != v}
    if diff:
        listed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items())
        raise NfgenError(f"--resume with different options than the original run ({listed}); "
                         "rerun with the original options or start a new run directory")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _Unusable(f"{k} holds {int((~torch.isfinite(t)).sum())} non-finite (NaN/inf) values")

    # the model: its state dict exactly (load_state_dict checks names and shapes)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    if weights.keys() != expected.keys() or any(weights[k].shape != expected[k].shape for k in expected):
        try:
            model.load_state_dict(weights)
            problem = "its model weights do not fit this model"
        except RuntimeError as exc:
            problem = str(exc).splitlines()[-1].strip()
        if "data" not in meta:  # an older state without the data fingerprint, resumed on another vocabulary
            raise NfgenError(f"{path} does not fit this model ({problem}); pass the original run's --tokens or "
                             "start a new run directory")
        raise _Unusable(f"its model weights do not fit this model: {problem}")

    # --keep best: the kept weights (best.<name>, the model's names and shapes) and their validation
    best = None
    kept = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    if kept or "best" in meta:
        record = meta.get("best")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) \
                or isinstance(record.get("step"), bool) or not 0 < record["step"] <= step \
                or not isinstance(record.get("val_loss"), (int, float)) or not math.isfinite(record["val_loss"]):
            raise _Unusable(f"its best-weights record {record!r} is not {{step: 1 … {step}, val_loss: a number}}")
        if kept.keys() != expected.keys() or any(kept[k].shape != expected[k].shape for k in expected):
            raise _Unusable("its best weights (best.*) do not fit this model")
        best = (record["step"], float(record["val_loss"]), kept)

    # AdamW: opt.<i>.{step, exp_avg, exp_avg_sq} for parameter i (in the optimizer's group order)
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise _Unusable(f"optimizer entry {key!r} names no parameter (0 … {len(params) - 1})")
        i, name = int(parts[1]), parts[2]
        if name == "step":
            if v.numel() != 1 or float(v.reshape(())) < 0:
                raise _Unusable(f"{key} is not a step count ≥ 0")
            state.setdefault(i, {})[name] = v.reshape(()).to(torch.float32)
        elif name in ("exp_avg", "exp_avg_sq"):
            if not v.is_floating_point() or v.shape != params[i].shape:
                raise _Unusable(f"{key} has shape {tuple(v.shape)} ({v.dtype}), parameter {i} needs "
                                f"{tuple(params[i].shape)} floats")
            if name == "exp_avg_sq" and (v < 0).any():
                raise _Unusable(f"{key} holds negative values")
            state.setdefault(i, {})[name] = v.to(device)
        else:
            raise _Unusable(f"unknown optimizer entry {key!r}")
    incomplete = [i for i, st in state.items() if st.keys() != {"step", "exp_avg", "exp_avg_sq"}]
    if incomplete:
        raise _Unusable(f"the optimizer state of parameter {incomplete[0]} lacks "
                        f"{sorted({'step', 'exp_avg', 'exp_avg_sq'} - state[incomplete[0]].keys())}")

    # the RNG states: byte tensors of the sizes this torch writes
    rngs = [("rng.batches", gen.get_state()), ("rng.torch", torch.get_rng_state())]
    if "rng.cuda" in tensors and torch.cuda.is_available():
        rngs.append(("rng.cuda", torch.cuda.get_rng_state()))
    for key, want in rngs:
        t = tensors.get(key)
        if t is None:
            raise _Unusable(f"no {key}")
        if t.dtype != torch.uint8 or t.shape != want.shape:
            raise _Unusable(f"{key} is {tuple(t.shape)} {t.dtype}, not a generator state of {tuple(want.shape)} bytes")

    try:  # a generator may still refuse the bytes of its state: try them on a scratch one
        probe = torch.Generator()
        probe.set_state(tensors["rng.batches"])
        probe.set_state(tensors["rng.torch"])
    except RuntimeError as exc:
        raise _Unusable(f"its RNG states are corrupt: {str(exc).splitlines()[0]}") from None

    # everything checked: set it
    model.load_state_dict(weights)
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    gen.set_state(tensors["rng.batches"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step, history, best


@torch.no_grad()
def evaluate_loss(model: GPT, seqs: torch.Tensor, vocab: Vocab, batch_size: int, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, seqs.shape[0], batch_size):
        x, y = batch_from(seqs, torch.arange(i, min(i + batch_size, seqs.shape[0])), None, vocab)
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / max(1, count)


def _cuda_index(device: torch.device) -> int:
    """"cuda" without an index is the current GPU, which init_from_env set to this rank's LOCAL_RANK."""
    return device.index if device.index is not None else torch.cuda.current_device()


def train(tokens_path: str | Path, run_dir: str | Path, cfg: TrainConfig, resume: bool = False) -> dict:
    """Train on a tokens file; write model.safetensors, train_state.safetensors and train_log.json in run_dir."""
    cfg.validate()
    run_dir = Path(run_dir)
    distributed.init_from_env(cfg.device)
    rank, world = distributed.rank(), distributed.world_size()
    device = pick_device(cfg.device)
    ts = load_tokens(tokens_path, hint="run `nfgen tokenize` first")
    if ts.tokens.shape[0] == 0:
        raise NfgenError(f"{tokens_path} holds no fields; tokenize a non-empty fields file")
    n_classes = ts.meta.get("n_classes") if "n_classes" in ts.meta else int(ts.labels.max()) + 1
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 1:
        raise NfgenError(f"{tokens_path} records n_classes {n_classes!r}, not a count ≥ 1; re-tokenize its fields "
                         "file with nfgen tokenize")
    vocab = Vocab(ts.tokenizer.n_codes, n_classes)
    if ts.labels.min() < 0 or ts.labels.max() >= n_classes:
        raise NfgenError(f"{tokens_path} has labels outside [0, {n_classes}); re-tokenize a labelled fields file")
    seqs = make_sequences(ts.tokens.long(), ts.labels.long(), vocab)
    n, seq_len = seqs.shape
    data = data_fingerprint(seqs)

    split_gen = make_generator(cfg.seed)
    perm = torch.randperm(n, generator=split_gen)
    n_val = min(int(round(n * cfg.val_fraction)), n - 1)  # at least one training sequence
    val_seqs, train_seqs = seqs[perm[:n_val]], seqs[perm[n_val:]]
    bs = min(cfg.batch_size, train_seqs.shape[0])
    if bs % world:
        fix = f"resume with a number of processes that divides {bs}" if resume else f"pass a multiple of {world}"
        raise NfgenError(f"--batch-size {bs} (the global batch) does not split evenly over {world} processes; {fix}")
    mine = slice(rank * (bs // world), (rank + 1) * (bs // world))  # this rank's part of the global batch

    torch.manual_seed(cfg.seed)
    gcfg = GPTConfig(vocab_size=vocab.size, block_size=seq_len - 1, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, n_kv_head=cfg.n_kv_head, dropout=cfg.dropout,
                     value_features=value_feature_width(ts.tokenizer.cfg.group) if cfg.value_embed else 0,
                     class_embed=cfg.class_embed,
                     role_nodes=ts.tokenizer.n_role_nodes if cfg.weight_roles else 0)
    model = GPT(gcfg)
    if cfg.value_embed:
        model.set_code_values(ts.tokenizer.codebooks)
    if cfg.weight_roles:
        model.set_roles(ts.tokenizer.token_roles())
    model = model.to(device)
    opt = _optimizer(model, cfg)
    gen = make_generator(cfg.seed + 1)
    step, history = 0, []
    # --keep best: (step, val_loss, weights on the CPU) of the lowest validation loss so far; None before the
    # first validation, or under --keep last
    best = None
    state_path = run_dir / "train_state.safetensors"
    if resume:
        step, history, best = _restore(state_path, model, opt, gen, cfg, device, data)
        if step >= cfg.steps:
            raise NfgenError(f"the run in {run_dir} already finished {step} steps; pass a larger --steps to continue")

    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16) if device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)

    if world > 1:
        # broadcast_buffers off: the GPT's buffers (if any) are constants, identical on every rank.
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[_cuda_index(device)] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        ddp = model
    fwd = torch.compile(ddp) if cfg.compile else ddp
    meta_base = {"config": asdict(gcfg), "n_codes": vocab.n_codes, "n_classes": n_classes,
                 "tokens_per_field": seq_len - 2, "train_config": asdict(cfg), "tokens_path": str(tokens_path),
                 "data": data, "tokenizer": ts.meta.get("tokenizer"), "spec": ts.spec.to_dict(),
                 "image_shape": list(ts.image_shape)}

    def kept(steps_done: int) -> dict:
        """Which weights model.safetensors holds."""
        if best is None:  # the latest weights: their validation loss if this step validated
            val = history[-1]["val_loss"] if history and history[-1]["step"] == steps_done else None
            return {"rule": cfg.keep, "step": steps_done, "val_loss": val if val is not None and math.isfinite(val)
                    else None}
        return {"rule": cfg.keep, "step": best[0], "val_loss": best[1]}

    def checkpoint(steps_done: int, final: bool):
        if not distributed.is_main():
            return
        meta = dict(meta_base, step=steps_done, history=history)
        tensors = _state_tensors(model, opt, gen)
        if best is not None:
            tensors.update({f"best.{k}": v for k, v in best[2].items()})
            meta["best"] = {"step": best[0], "val_loss": best[1]}
        save_artifact(state_path, "train_state", tensors, meta)
        record = kept(steps_done)
        save_model(run_dir / "model.safetensors", model, dict(meta_base, step=steps_done, history=history,
                                                               kept=record),
                   weights=best[2] if best is not None else None)
        write_json(run_dir / "train_log.json", {"step": steps_done, "final": final, "kept": record,
                                                "history": history})

    tokens_per_step = bs * (seq_len - 1)
    bar = progress(range(step, cfg.steps), quiet=cfg.quiet or not distributed.is_main(), desc="train", initial=step, total=cfg.steps)
    t0, last_val = time.perf_counter(), float("nan")
    model.train()
    for step in bar:
        idx = torch.randint(0, train_seqs.shape[0], (bs,), generator=gen)
        drop = torch.rand(bs, generator=gen) < cfg.class_dropout
        x, y = batch_from(train_seqs, idx[mine], drop[mine], vocab)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast():
            _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            train_loss = float(distributed.all_reduce_mean(loss.detach()))  # the global batch's loss
            if not math.isfinite(train_loss):
                raise NfgenError(f"training diverged at step {done} (loss {train_loss}); lower --lr or raise --warmup")
            last_val = evaluate_loss(model, val_seqs, vocab, bs, device, autocast) if n_val else float("nan")
            history.append({"step": done, "train_loss": train_loss, "val_loss": last_val, "lr": lr_at(step, cfg)})
            if cfg.keep == "best" and math.isfinite(last_val) and (best is None or last_val < best[1]):
                # every rank tracks which step is best (kept() reports it); only the writing rank needs the weights
                weights = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                           if distributed.is_main() else {})
                best = (done, last_val, weights)
        if not cfg.quiet and (done % 10 == 0 or done == cfg.steps):
            rate = tokens_per_step * (done - bar.initial) / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val=f"{last_val:.3f}", tok_s=f"{rate:,.0f}")
        if done % cfg.checkpoint_every == 0 and done != cfg.steps:
            checkpoint(done, final=False)
    elapsed = time.perf_counter() - t0
    checkpoint(cfg.steps, final=True)
    distributed.barrier()  # no rank returns before the final checkpoint exists
    last = history[-1] if history else {}
    summary = {"steps": cfg.steps, "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
               "kept": kept(cfg.steps),
               "marginal_val_loss": marginal_loss(train_seqs, val_seqs, vocab.n_codes) if n_val else None,
               "n_train": int(train_seqs.shape[0]), "n_val": n_val,
               "params": sum(p.numel() for p in model.parameters()), "seconds": round(elapsed, 2),
               "model": str(run_dir / "model.safetensors")}
    if not cfg.quiet and distributed.is_main():
        k = summary["kept"]
        val = (f"validation loss {k['val_loss']:.4f} nats a token at step {k['step']} (per-position histograms: "
               f"{summary['marginal_val_loss']:.4f})" if n_val and k["val_loss"] is not None else "no validation")
        print(f"train {cfg.steps} steps on {summary['n_train']} fields, {summary['params']:,} parameters: {val}, "
              f"{elapsed:.1f} s → {summary['model']}")
    return summary


def marginal_loss(train_seqs: torch.Tensor, val_seqs: torch.Tensor, n_codes: int) -> float:
    """Validation loss (nats per code token) of the model that knows only each position's token histogram
    (counts over the training sequences, add-1/2 smoothed): what a GPT scores before it has learned anything
    about how a field's weights depend on each other or on its class."""
    codes_train, codes_val = train_seqs[:, 2:], val_seqs[:, 2:]
    counts = torch.full((codes_train.shape[1], n_codes), 0.5, dtype=torch.float64)
    counts.scatter_add_(1, codes_train.T, torch.ones(codes_train.T.shape, dtype=torch.float64))
    log_p = (counts / counts.sum(dim=1, keepdim=True)).log()
    return float(-log_p.gather(1, codes_val.T).mean())


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


__all__ = ["TrainConfig", "train", "lr_at", "make_sequences", "batch_from", "marginal_loss", "config_from_dict"]
