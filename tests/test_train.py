"""The train stage: learns, checkpoints, and resumes onto the uninterrupted loss curve exactly (CPU)."""
import math

import pytest
import torch

from nfgen.io import NfgenError, load_artifact, save_artifact
from nfgen.model import code_value_features, load_model
from nfgen.tokenizer import TokenizerConfig, TokenSet, WeightTokenizer, load_tokens, save_tokens
from nfgen.train import TrainConfig, batch_from, lr_at, make_sequences, marginal_loss, train
from nfgen.vocab import Vocab
from nfkernels import SirenSpec

SPEC = SirenSpec(hidden=4, hidden_layers=1)  # 2→4→1: 17 weights, so sequences stay short


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, steps=12, batch_size=8, lr=3e-3, warmup=2, eval_every=1,
                checkpoint_every=5, val_fraction=0.1, device="cpu", quiet=True)
    return TrainConfig(**{**base, **kw})


def test_sequences_and_targets():
    vocab = Vocab(n_codes=16, n_classes=2)
    seqs = make_sequences(torch.tensor([[3, 4, 5]]), torch.tensor([1]), vocab)
    assert seqs.tolist() == [[vocab.sos, vocab.class_token(1), 3, 4, 5]]
    x, y = batch_from(seqs, torch.tensor([0]), torch.tensor([True]), vocab)
    assert x.tolist() == [[vocab.sos, vocab.no_class, 3, 4]]  # class dropped to NO_CLASS
    assert y.tolist() == [[-1, 3, 4, 5]]  # the class token itself is never a target


def test_marginal_loss_is_the_smoothed_per_position_histograms_cross_entropy():
    vocab = Vocab(n_codes=4, n_classes=2)
    # position 0 always code 3; position 1 alternates 0 / 1 (the class never matters to this baseline)
    train_seqs = make_sequences(torch.tensor([[3, i % 2] for i in range(10)]), torch.arange(10) % 2, vocab)
    val_seqs = make_sequences(torch.tensor([[3, 0], [3, 2]]), torch.tensor([0, 1]), vocab)
    p0, p1_0, p1_2 = 10.5 / 12, 5.5 / 12, 0.5 / 12  # add-1/2 smoothing over 4 codes and 10 sequences
    want = -(2 * math.log(p0) + math.log(p1_0) + math.log(p1_2)) / 4
    assert marginal_loss(train_seqs, val_seqs, vocab.n_codes) == pytest.approx(want, rel=1e-12)


def test_value_embed_scales_each_residual_level_on_its_own(tmp_path):
    spec = SirenSpec(hidden=4, hidden_layers=1)
    weights = torch.randn(24, spec.num_params, generator=torch.Generator().manual_seed(1))
    tok = WeightTokenizer.fit(weights, spec, TokenizerConfig(codebook_size=8, levels=2, iters=3, quiet=True))
    path = tmp_path / "tokens.safetensors"
    save_tokens(path, TokenSet(tok.encode(weights), torch.arange(24) % 2, tok, spec, (1, 1), {"n_classes": 2}))
    train(path, tmp_path / "run", small(steps=2, batch_size=4, value_embed=True))
    model, _ = load_model(tmp_path / "run" / "model.safetensors")
    want = torch.cat([code_value_features(level) for level in tok.codebooks])  # ids 0-7 level 0, 8-15 level 1
    torch.testing.assert_close(model.code_features[:16], want)
    assert model.code_features[:8, 0].abs().amax() == 1.0 and model.code_features[8:16, 0].abs().amax() == 1.0


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("n_kv_head,value_embed,class_embed,roles", [
    (0, False, False, False), (1, False, False, False), (1, True, False, False), (1, True, True, False),
    (1, True, True, True)])
def test_train_learns_and_writes_loadable_model(tokens_file, tmp_path, n_kv_head, value_embed, class_embed, roles):
    run = tmp_path / "run"
    summary = train(tokens_file, run, small(steps=40, n_kv_head=n_kv_head, value_embed=value_embed,
                                            class_embed=class_embed, weight_roles=roles))
    assert (run / "model.safetensors").is_file() and (run / "train_state.safetensors").is_file()
    model, meta = load_model(run / "model.safetensors")
    assert model.config.n_kv_head == (n_kv_head or 2)
    assert bool(model.config.value_features) == value_embed and model.config.class_embed == class_embed
    if value_embed:  # the features travel with the model: those of the tokens file's codebook
        codebooks = load_tokens(tokens_file).tokenizer.codebooks
        torch.testing.assert_close(model.code_features[:16], code_value_features(codebooks[0]))
    assert meta["n_codes"] == 16 and meta["n_classes"] == 2 and meta["tokens_per_field"] == SPEC.num_params
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"] * 0.7
    assert summary["val_loss"] is not None and summary["n_val"] == 6
    if roles:  # the roles travel with the model: those of the tokens file's SIREN
        assert torch.equal(model.roles[1:], load_tokens(tokens_file).tokenizer.token_roles())
    assert bool(model.config.role_nodes) == roles
    assert 0 < summary["marginal_val_loss"] < math.log(16)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_trains_the_same_model(tokens_file, tmp_path):
    # torch.compile (inductor's C++ backend on the CPU) changes how the steps compute, not what: the same losses and
    # weights as eager up to float rounding, saved without the compiled wrapper's "_orig_mod." prefix
    eager = train(tokens_file, tmp_path / "eager", small(steps=4, eval_every=2, value_embed=True))
    compiled = train(tokens_file, tmp_path / "compiled", small(steps=4, eval_every=2, value_embed=True, compile=True))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)
    a, _ = load_model(tmp_path / "eager" / "model.safetensors")
    b, meta = load_model(tmp_path / "compiled" / "model.safetensors")
    assert meta["train_config"]["compile"] and list(a.state_dict()) == list(b.state_dict())
    for name, x in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], x, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("class_dropout,dropped", [(0.0, 0.0), (0.5, None), (1.0, 1.0)])
def test_class_dropout_is_the_share_of_rows_trained_without_their_class(tokens_file, tmp_path, monkeypatch,
                                                                         class_dropout, dropped):
    # the unconditional model (and CFG) exists only through these rows
    import nfgen.train as train_module

    seen = []

    def spy(seqs, idx, drop, vocab):
        x, y = batch_from(seqs, idx, drop, vocab)
        if drop is None:  # validation batches keep every class
            assert not (x[:, 1] == vocab.no_class).any()
        else:
            seen.append((x[:, 1] == vocab.no_class).float().mean().item())
            assert torch.equal(x[:, 1] == vocab.no_class, drop)  # exactly the marked rows lose their class
        return x, y

    monkeypatch.setattr(train_module, "batch_from", spy)
    train(tokens_file, tmp_path / "run", small(steps=20, eval_every=20, class_dropout=class_dropout))
    share = sum(seen) / len(seen)
    assert len(seen) == 20
    assert share == dropped if dropped is not None else 0.3 < share < 0.7


def test_regularisation_options_reach_the_step(tokens_file, tmp_path, monkeypatch):
    import nfgen.train as train_module

    clips, groups = [], []
    real_clip, real_optimizer = torch.nn.utils.clip_grad_norm_, train_module._optimizer
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clips.append(max_norm) or real_clip(params, max_norm))

    def spy(model, cfg):
        opt = real_optimizer(model, cfg)
        groups.extend(opt.param_groups)
        return opt

    monkeypatch.setattr(train_module, "_optimizer", spy)
    train(tokens_file, tmp_path / "run", small(steps=3, grad_clip=0.25, weight_decay=0.3, dropout=0.2))
    assert clips == [0.25] * 3
    decay, no_decay = groups
    # weight decay on the matrices only: biases, norms and (1-D) gains keep theirs
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    model, _ = load_model(tmp_path / "run" / "model.safetensors")
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert model.config.dropout == 0.2


@pytest.mark.parametrize("value_embed", [False, True])
def test_resume_reproduces_uninterrupted_run_exactly(tokens_file, tmp_path, monkeypatch, die_at_step, value_embed):
    straight = tmp_path / "straight"
    train(tokens_file, straight, small(value_embed=value_embed))
    ref_model, ref_meta = load_model(straight / "model.safetensors")

    # Interrupt the second run after its step-5 checkpoint: the 7th optimizer step raises.
    resumed = tmp_path / "resumed"
    die_at_step(7)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, resumed, small(value_embed=value_embed))
    monkeypatch.undo()
    _, partial = load_model(resumed / "model.safetensors")
    assert partial["step"] == 5

    train(tokens_file, resumed, small(value_embed=value_embed), resume=True)
    model, meta = load_model(resumed / "model.safetensors")
    assert [h["train_loss"] for h in meta["history"]] == [h["train_loss"] for h in ref_meta["history"]]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def _scripted_validation(monkeypatch, losses: dict[int, float], first_step: int = 1) -> dict[int, dict]:
    """Make each validation return losses[step] (steps counted from first_step) and record the weights it saw."""
    import nfgen.train as train_mod

    seen, calls = {}, {"step": first_step - 1}

    def scripted(model, *args):
        calls["step"] += 1
        seen[calls["step"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return losses[calls["step"]]

    monkeypatch.setattr(train_mod, "evaluate_loss", scripted)
    return seen


# the lowest validation comes at step 3, before the step-5 checkpoint; step 6 is the best after it
VAL_LOSSES = {1: 3.0, 2: 2.0, 3: 1.0, 4: 2.5, 5: 4.0, 6: 1.5, 7: 3.0, 8: 1.0, 9: 2.0, 10: 2.0, 11: 1.2, 12: 5.0}


@pytest.mark.parametrize("keep,kept_step", [("best", 3), ("last", 12)])
def test_keep_chooses_the_weights_the_model_file_holds(tokens_file, tmp_path, monkeypatch, keep, kept_step):
    seen = _scripted_validation(monkeypatch, VAL_LOSSES)
    summary = train(tokens_file, tmp_path / "run", small(keep=keep))
    model, meta = load_model(tmp_path / "run" / "model.safetensors")
    for k, v in model.state_dict().items():  # a tie (step 8) keeps the earlier weights
        assert torch.equal(v, seen[kept_step][k]), k
    assert meta["kept"] == summary["kept"] == {"rule": keep, "step": kept_step, "val_loss": VAL_LOSSES[kept_step]}
    assert meta["step"] == 12 and len(meta["history"]) == 12  # the run itself went on to the end
    state, _ = load_artifact(tmp_path / "run" / "train_state.safetensors", "train_state")
    assert torch.equal(state["model.lm_head.weight"], seen[12]["lm_head.weight"])  # --resume goes on from there
    assert ("best.lm_head.weight" in state) == (keep == "best")


def test_keep_best_without_validation_fields_keeps_the_last(tokens_file, tmp_path):
    train(tokens_file, tmp_path / "run", small(val_fraction=0.0, checkpoint_every=100))
    state, _ = load_artifact(tmp_path / "run" / "train_state.safetensors", "train_state")
    model, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["kept"] == {"rule": "best", "step": 12, "val_loss": None}
    assert torch.equal(model.state_dict()["lm_head.weight"], state["model.lm_head.weight"])


def test_resume_keeps_the_best_weights_from_before_the_interruption(tokens_file, tmp_path, monkeypatch,
                                                                   die_at_step):
    _scripted_validation(monkeypatch, VAL_LOSSES)
    train(tokens_file, tmp_path / "straight", small())
    want, want_meta = load_model(tmp_path / "straight" / "model.safetensors")

    run = tmp_path / "run"
    die_at_step(7)  # after the step-5 checkpoint, whose best is step 3's
    _scripted_validation(monkeypatch, VAL_LOSSES)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, run, small())
    monkeypatch.undo()
    _scripted_validation(monkeypatch, VAL_LOSSES, first_step=6)
    train(tokens_file, run, small(), resume=True)
    # a resume that lost step 3's weights or loss would keep step 6's (1.5)
    model, meta = load_model(run / "model.safetensors")
    assert meta["kept"] == want_meta["kept"] == {"rule": "best", "step": 3, "val_loss": 1.0}
    for (k, a), b in zip(want.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_refuses_changed_options(tokens_file, tmp_path):
    run = tmp_path / "run"
    train(tokens_file, run, small(steps=3))
    with pytest.raises(NfgenError, match="different options.*lr"):
        train(tokens_file, run, small(steps=6, lr=1e-2), resume=True)
    with pytest.raises(NfgenError, match="already finished"):
        train(tokens_file, run, small(steps=3), resume=True)
    with pytest.raises(NfgenError, match="not found"):
        train(tokens_file, tmp_path / "elsewhere", small(), resume=True)


def test_bad_inputs(tokens_file, tmp_path):
    with pytest.raises(NfgenError, match="tokens file not found"):
        train(tmp_path / "missing.safetensors", tmp_path / "r", small())
    with pytest.raises(NfgenError, match="divisible"):
        train(tokens_file, tmp_path / "r", small(n_embd=30, n_head=4))
    with pytest.raises(NfgenError, match="--n-kv-head 3 must divide --n-head 2"):
        train(tokens_file, tmp_path / "r", small(n_kv_head=3))


def _older_state(run, *drop):
    """Rewrite run's train state as a version of nfgen before the `drop`ped options (and the data fingerprint)."""
    path = run / "train_state.safetensors"
    tensors, meta = load_artifact(path, "train_state")
    for name in drop:
        del meta["train_config"][name]
    del meta["data"]
    save_artifact(path, "train_state", tensors, meta)


def test_resume_of_an_older_state_takes_its_missing_options_as_defaults(tokens_file, tmp_path, monkeypatch,
                                                                        die_at_step):
    straight = tmp_path / "straight"
    train(tokens_file, straight, small(steps=6, checkpoint_every=3))
    run = tmp_path / "run"
    die_at_step(5)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, run, small(steps=6, checkpoint_every=3))
    monkeypatch.undo()
    _older_state(run, "n_kv_head")  # written before --n-kv-head existed: it had the default, 0 (= n_head)
    # A genuinely different value is still refused, naming the option and the default it had.
    with pytest.raises(NfgenError, match=r"different options than the original run \(n_kv_head: 0 → 1\); rerun"):
        train(tokens_file, run, small(steps=6, checkpoint_every=3, n_kv_head=1), resume=True)
    # The default resumes onto the uninterrupted run exactly.
    train(tokens_file, run, small(steps=6, checkpoint_every=3), resume=True)
    history = [load_model(r / "model.safetensors")[1]["history"] for r in (run, straight)]
    assert history[0] == history[1] and len(history[0]) == 6


def test_resume_of_a_state_from_before_class_embed_ran_without_it(tokens_file, tmp_path, monkeypatch, die_at_step):
    """class_embed came with the default True; states written before it existed ran without it."""
    run = tmp_path / "run"
    die_at_step(5)
    with pytest.raises(KeyboardInterrupt):
        train(tokens_file, run, small(steps=6, checkpoint_every=3, class_embed=False))
    monkeypatch.undo()
    _older_state(run, "class_embed")
    with pytest.raises(NfgenError, match=r"\(class_embed: False → True\)"):
        train(tokens_file, run, small(steps=6, checkpoint_every=3), resume=True)
    train(tokens_file, run, small(steps=6, checkpoint_every=3, class_embed=False), resume=True)
    assert not load_model(run / "model.safetensors")[0].config.class_embed


def test_resume_refuses_other_training_data(tokens_file, tmp_path):
    ts = load_tokens(tokens_file)
    other = tmp_path / "other.safetensors"  # same vocabulary and length, other sequences
    save_tokens(other, TokenSet(ts.tokens.flip(1), ts.labels, ts.tokenizer, ts.spec, ts.image_shape, ts.meta))
    run = tmp_path / "run"
    train(tokens_file, run, small(steps=3))
    with pytest.raises(NfgenError, match="--resume with other training data than the original run"):
        train(other, run, small(steps=6), resume=True)
    # A state from before the fingerprint: another vocabulary is still caught, as a clear error.
    _older_state(run)
    weights = ts.tokenizer.decode(ts.tokens)
    tok8 = WeightTokenizer.fit(weights, ts.spec, TokenizerConfig(codebook_size=8, iters=2, quiet=True))
    save_tokens(other, TokenSet(tok8.encode(weights), ts.labels, tok8, ts.spec, ts.image_shape, ts.meta))
    with pytest.raises(NfgenError, match="does not fit this model .*size mismatch.*pass the original run's --tokens"):
        train(other, run, small(steps=6), resume=True)


@pytest.mark.parametrize("option,message", [
    (dict(n_head=0), "--n-head 0 is out of range; pass an integer ≥ 1"),
    (dict(n_head=-2), "--n-head -2 is out of range; pass an integer ≥ 1"),
    (dict(n_layer=0), "--n-layer 0 is out of range; pass an integer ≥ 1"),
    (dict(n_embd=0), "--n-embd 0 is out of range; pass an integer ≥ 1"),
    (dict(n_kv_head=-1), "--n-kv-head -1 is out of range; pass an integer ≥ 0"),
    (dict(eval_every=0), "--eval-every 0 is out of range; pass an integer ≥ 1"),
    (dict(checkpoint_every=0), "--checkpoint-every 0 is out of range; pass an integer ≥ 1"),
    (dict(steps=0), "--steps 0 is out of range"),
    (dict(batch_size=0), "--batch-size 0 is out of range"),
    (dict(warmup=-1), "--warmup -1 is out of range; pass an integer ≥ 0"),
    (dict(steps=2.5), "--steps 2.5 is out of range; pass an integer"),
    (dict(lr=0.0), r"--lr 0.0 is out of range; pass a finite learning rate > 0"),
    (dict(lr=float("nan")), r"--lr nan is out of range"),
    (dict(grad_clip=-1.0), r"--grad-clip -1.0 is out of range; pass a gradient-norm clip > 0"),
    (dict(weight_decay=-1.0), r"--weight-decay -1.0 is out of range; pass a finite AdamW weight decay ≥ 0"),
    (dict(dropout=2.0), r"--dropout 2.0 is out of range; pass a probability in \[0, 1\)"),
    (dict(dropout=1.0), r"--dropout 1.0 is out of range"),
    (dict(class_dropout=1.5), r"--class-dropout 1.5 is out of range; pass a probability in \[0, 1\]"),
    (dict(val_fraction=1.0), r"--val-fraction 1.0 is out of range; pass a fraction in \[0, 1\)"),
    (dict(beta2=1.0), r"beta2 1.0 is out of range; pass an AdamW beta in \[0, 1\)"),
    (dict(min_lr_ratio=-0.1), r"min_lr_ratio -0.1 is out of range"),
    (dict(seed=-1), r"--seed -1 is out of range"),
    (dict(value_embed="yes"), r"--value-embed 'yes' is not a boolean"),
    (dict(keep="first"), r"--keep 'first' is not a choice; pass best or last"),
    (dict(device="tpu"), r"unknown device 'tpu'"),
    (dict(n_embd=30, n_head=4), r"--n-embd 30 is not divisible by --n-head 4; pass an --n-embd that is a multiple"),
])
def test_every_option_is_checked_before_any_work(tokens_file, tmp_path, option, message):
    with pytest.raises(NfgenError, match=message):
        train(tokens_file, tmp_path / "r", small(**option))
    assert not (tmp_path / "r").exists()  # nothing written


def test_cli_refuses_a_bad_option_in_one_line(tokens_file, tmp_path, capsys):
    from nfgen.cli import main

    code = main(["train", "--tokens", str(tokens_file), "--run", str(tmp_path / "r"), "--quiet", "--n-head", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("nfgen train: error: --n-head 0 is out of range; pass an integer ≥ 1 "
                                         "(attention heads)")
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_resume_refuses_an_unusable_state(tokens_file, tmp_path):
    run = tmp_path / "run"
    train(tokens_file, run, small(steps=3))
    path = run / "train_state.safetensors"
    good_tensors, good_meta = load_artifact(path, "train_state")
    model_before = (run / "model.safetensors").read_bytes()

    def edit_tensors(**kw):
        return lambda t, m: t.update(kw)

    nan = torch.full_like(good_tensors["model.lm_head.weight"], float("nan"))
    cases = [
        (lambda t, m: m.pop("step"), "no step count"),
        (lambda t, m: m.update(step="3"), "step '3' is not a whole number"),
        (lambda t, m: m.update(train_config=[1]), "train_config is a list"),
        (lambda t, m: m.update(history={"a": 1}), "history is not a list"),
        (lambda t, m: t.pop("rng.batches"), "no rng.batches"),
        (edit_tensors(**{"rng.batches": good_tensors["rng.batches"][:7]}), "rng.batches is .*not a generator state"),
        (edit_tensors(**{"opt.0.exp_avg": torch.zeros(3)}), r"opt.0.exp_avg has shape \(3,\)"),
        (edit_tensors(**{"opt.x.exp_avg": torch.zeros(3)}), "optimizer entry 'opt.x.exp_avg' names no parameter"),
        (lambda t, m: t.pop("opt.0.step"), r"parameter 0 lacks \['step'\]"),
        (edit_tensors(**{"opt.0.exp_avg_sq": -good_tensors["opt.0.exp_avg_sq"] - 1}), "negative"),
        (lambda t, m: t.pop("model.lm_head.weight"), "model weights do not fit"),
        (edit_tensors(**{"model.lm_head.weight": nan}), "model.lm_head.weight holds .* non-finite"),
        (lambda t, m: m.update(best={"step": 9, "val_loss": 1.0}), "best-weights record .* is not"),
        (lambda t, m: m.update(best={"step": 2, "val_loss": "low"}), "best-weights record .* is not"),
        (lambda t, m: t.pop("best.lm_head.weight"), r"best weights \(best\.\*\) do not fit"),
    ]
    for edit, what in cases:
        tensors, meta = dict(good_tensors), {**good_meta, "train_config": dict(good_meta["train_config"])}
        edit(tensors, meta)
        save_artifact(path, "train_state", tensors, meta)
        with pytest.raises(NfgenError, match=f"{path} is not a usable training state \\(.*{what}.*\\); delete it, "
                                             "or train without --resume"):
            train(tokens_file, run, small(steps=6), resume=True)
        assert (run / "model.safetensors").read_bytes() == model_before  # nothing half-written
    save_artifact(path, "train_state", good_tensors, good_meta)  # the untouched state still resumes
    train(tokens_file, run, small(steps=4), resume=True)


def test_refuses_a_tokens_file_without_fields(tokens_file, tmp_path):
    ts = load_tokens(tokens_file)
    empty = tmp_path / "empty.safetensors"
    save_tokens(empty, TokenSet(ts.tokens[:0], ts.labels[:0], ts.tokenizer, ts.spec, ts.image_shape, ts.meta))
    with pytest.raises(NfgenError, match=f"{empty} holds no fields; tokenize a non-empty fields file"):
        train(empty, tmp_path / "r", small())
    assert not (tmp_path / "r").exists()
