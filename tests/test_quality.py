"""benchmarks.quality: canonical neuron order (exactness), goal checks, and the tiny config end to end."""
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from PIL import Image

from benchmarks import quality
from benchmarks.quality import (CONFIGS, HEADLINE, NEFGPT_METRICS, NEFGPT_SAMPLING, Recipe, ablation_recipes,
                                aggregate, canonical_order, check_goals, mean_std)
from nfgen.data import load_split
from nfgen.io import NfgenError
from nfgen.generate import SampleConfig
from nfkernels import SirenSpec, coord_grid, siren_forward_reference, siren_init


def _random_fields(spec: SirenSpec, n: int, seed: int) -> torch.Tensor:
    # siren_init plus noise, so that neuron norms differ within a field and between fields
    g = torch.Generator().manual_seed(seed)
    w = siren_init(spec, n, generator=g)
    return w * (1 + 0.5 * torch.randn(w.shape, generator=g))


def _hidden_norms(weights, spec):
    return [w.double().pow(2).sum(dim=2) for w, _ in spec.unflatten(weights)[:spec.hidden_layers]]


@pytest.mark.parametrize("spec", [SirenSpec(), SirenSpec(in_dim=2, hidden=7, hidden_layers=3, out_dim=3, omega0=13.0)],
                         ids=["default", "odd"])
def test_canonical_order_keeps_functions_and_sorts(spec):
    w = _random_fields(spec, 5, seed=1)
    c = canonical_order(w, spec)
    assert not torch.equal(c, w)  # something moved
    # Same multiset of weights per field: a permutation, nothing rescaled.
    assert torch.equal(c.sort(dim=1).values, w.sort(dim=1).values)
    # Same functions: in float64 the renders agree to rounding (only the summation order changes), in
    # float32 to 1e-5 (outputs are O(1)).
    coords = coord_grid((11, 9), dtype=torch.float64)
    before = siren_forward_reference(w.double(), coords, spec)
    after = siren_forward_reference(c.double(), coords, spec)
    assert (before - after).abs().max() < 1e-12
    before32 = siren_forward_reference(w, coords.float(), spec)
    assert (before32 - siren_forward_reference(c, coords.float(), spec)).abs().max() < 1e-5
    # Every hidden layer's keys are non-increasing after the permutation.
    for key in _hidden_norms(c, spec):
        assert (key[:, 1:] <= key[:, :-1]).all()
    # Idempotent bit for bit, and the input is not modified.
    assert torch.equal(canonical_order(c, spec), c)
    assert not torch.equal(c, w) and torch.equal(w, _random_fields(spec, 5, seed=1))


def test_canonical_order_on_fitted_mnist_fields(data_root):
    from nfgen.data import load_split
    from nfgen.fields import FitConfig, fit_fields, render_fields

    split = load_split("mnist:test[:12]", data_root=data_root)
    fit = fit_fields(split.images, FitConfig(steps=25, quiet=True, device="cpu"))
    c = canonical_order(fit.weights, fit.spec)
    before = render_fields(fit.weights, fit.spec, split.image_shape, backend="torch")
    after = render_fields(c, fit.spec, split.image_shape, backend="torch")
    assert (before - after).abs().max() < 1e-5  # float32 renders in [0, 1]; see the random-field test
    assert torch.equal(canonical_order(c, fit.spec), c)


def test_mean_std_and_aggregate():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0)}  # ddof 1
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}
    assert mean_std([None]) == {"mean": None, "std": None}
    agg = aggregate([{"m": {"samples": 1.0, "oracle": 2.0}}, {"m": {"samples": 3.0, "oracle": 2.0}}], ["m"])
    assert agg["m"]["mean"] == 2.0 and agg["m"]["oracle"] == {"mean": 2.0, "std": 0.0}
    assert agg["m"]["per_seed"] == [1.0, 3.0]


def test_ablation_rows_follow_the_main_recipe():
    # a main on raw weight codes (the full config's until its H100 run was redone with class-pca tokens)
    raw = replace(CONFIGS["full"], tokenize={}, sample=dict(temperature=0.8, top_k=3))
    rows = ablation_recipes(raw, Recipe(), 1185)
    assert {"vq:group3", "vq:group5", "vq:residual2", "vq:center-mean", "codebook:64", "codebook:1024",
            "init:independent", "init:meta", "order:canonical", "order:independent+canonical"} <= rows.keys()
    assert rows["init:meta"].init == "meta" and "init:shared" not in rows
    assert "codebook:256" not in rows and rows["vq:center-mean"].tokenize == {"center": "mean"}
    assert rows["vq:center-mean-topk10"].sample["top_k"] == 10
    assert rows["vq:center-mean-k64"].tokenize == {"center": "mean", "codebook_size": 64}
    assert "vq:group2" not in rows and "vq:group4" not in rows  # they do not divide 1185
    assert rows["vq:pca"].tokenize == {"basis": "pca"} and rows["vq:pca"].sample == {"temperature": 1.0, "top_k": 0}
    assert rows["vq:pca-cfg3"].sample["cfg_scale"] == 3.0 and "vq:weights" not in rows
    assert rows["vq:pca-class"].tokenize == {"basis": "pca", "center": "class"}
    assert rows["vq:class-pca"].tokenize == {"basis": "class-pca", "center": "class"}
    # drawn coarse components, expected fine ones: another sampling of the same GPT (same fields, tokens, training)
    coarse = rows["vq:class-pca-from32"]
    assert replace(coarse, sample={}) == replace(rows["vq:class-pca"], sample={})
    assert coarse.sample == {"temperature": 1.0, "top_k": 0, "weights": "expected", "expected_from": 32}
    assert rows["vq:center-class"].tokenize == {"center": "class"} and not rows["vq:center-class"].sample
    assert rows["vq:group3"].tokenize["group"] == 3 and rows["order:canonical"].canonical
    # The full config trains ablation GPTs for fewer steps, beside a baseline of the main recipe at that budget;
    # sampling rows reuse the main model (no train override).
    short = raw.ablation_train["steps"]
    assert rows["baseline:main"].train["steps"] == short and rows["vq:group3"].train["steps"] == short
    assert rows["model:8x512"].train["n_embd"] == 512 and rows["model:8x512"].train["steps"] == short
    assert rows["model:kv2"].train == {"n_kv_head": 2, **raw.ablation_train}
    assert rows["model:ids-only"].train == {"value_embed": False, **raw.ablation_train}
    assert rows["model:weight-roles"].train == {"weight_roles": True, **raw.ablation_train}
    assert rows["fit:steps200,lr0.0015"].fit == {"steps": 200, "lr": 1.5e-3}
    assert rows["fit:clamp-margin0.3"].fit == {"clamp_margin": 0.3}  # a random-draw main fits without a margin
    assert all(not r.train for n, r in rows.items() if n.startswith("sampling:"))
    assert "baseline:main" not in ablation_recipes(CONFIGS["tiny"], Recipe(), 105)
    # a meta-template main compares with both other inits
    rows = ablation_recipes(raw, Recipe(init="meta"), 1185)
    assert {"init:shared", "init:independent", "order:independent+canonical"} <= rows.keys()
    assert "init:meta" not in rows and rows["vq:group3"].init == "meta"
    # ... and, fitting with its template's margin, is compared with a fit without one
    assert rows["fit:clamp-margin0"].fit == {"clamp_margin": 0.0} and "fit:clamp-margin0.3" not in rows
    # a main without value embedding is compared with it
    rows = ablation_recipes(raw, Recipe(train={"value_embed": False}), 1185)
    assert rows["model:value-embed"].train["value_embed"] and "model:ids-only" not in rows
    # Relative to the main recipe: a main that already uses 1024 codes is compared with 256.
    rows = ablation_recipes(replace(raw, tokenize={"codebook_size": 1024}), Recipe(), 1185)
    assert "codebook:256" in rows and "codebook:1024" not in rows
    with pytest.raises(quality.NfgenError, match="unknown ablation"):
        quality.choose_ablations(CONFIGS["tiny"], Recipe(), 105, "vq,bogus")
    tiny_raw = replace(CONFIGS["tiny"], tokenize={"codebook_size": 64}, sample={})
    assert set(quality.choose_ablations(tiny_raw, Recipe(), 105, "vq")) == {
        "vq:group3", "vq:group5", "vq:residual2", "vq:center-mean", "vq:center-mean-topk10", "vq:pca", "vq:pca-t0.8",
        "vq:pca-cfg3", "vq:pca-class", "vq:class-pca", "vq:class-pca-from32", "vq:center-class", "vq:center-class-T1"}
    # a main on principal components is compared with weight tokens, and has no centred rows (pca centres)
    rows = ablation_recipes(raw, Recipe(tokenize={"basis": "pca"}), 1185)
    assert rows["vq:weights"].tokenize == {"basis": "weights", "center": "none", "modes": 1}
    assert not any("center" in n for n in rows) and "vq:pca-class" not in rows
    # the class-pca main of the small and full configs: against raw weight codes (every weight drawn at T 0.8 /
    # top-k 3, as the first H100 run sampled them, not the main's coarse-to-fine truncation) and one basis for all
    # classes; no rows that would centre class-pca otherwise
    for cfg in (CONFIGS["small"], CONFIGS["full"]):
        rows = ablation_recipes(cfg, Recipe(init="meta"), 1185)
        assert {"basis": "class-pca", "center": "class", "modes": 8} == cfg.tokenize
        assert rows["vq:weights"].tokenize == {"basis": "weights", "center": "none", "modes": 1}
        assert rows["vq:modes1"].tokenize == {"modes": 1} and "vq:modes8" not in rows  # one mean field per class
        sample = {**asdict(SampleConfig()), **cfg.sample, **rows["vq:weights"].sample}
        assert (sample["temperature"], sample["top_k"], sample["weights"]) == (0.8, 3, "sampled")
        assert rows["vq:pca-class"].tokenize == {"basis": "pca"} and not any("center" in n for n in rows)


@pytest.mark.parametrize("name", ["small", "full"])
def test_main_samples_coarse_components_and_sweeps_around_them(name):
    """The main draws the first 32 class-pca components and takes the GPT's means of the rest; its sweep holds a
    row drawing every component and rows moving the boundary, each a change of the main's sampling."""
    cfg = CONFIGS[name]
    sample = {**asdict(SampleConfig()), **cfg.sample}
    assert sample["weights"] == "expected" and sample["expected_from"] == 32
    rows = ablation_recipes(cfg, Recipe(init=cfg.main_init), 1185)
    merged = {n: {**sample, **r.sample} for n, r in rows.items() if n.startswith("sampling:")}
    assert merged["sampling:sampled"]["weights"] == "sampled" and merged["sampling:sampled"]["expected_from"] == 0
    assert merged["sampling:expected"]["weights"] == "expected" and merged["sampling:expected"]["expected_from"] == 0
    assert [merged[f"sampling:expected-from{k}"]["expected_from"] for k in (16, 64)] == [16, 64]
    assert merged["sampling:T0.8"]["expected_from"] == 32 and merged["sampling:T0.8"]["temperature"] == 0.8
    for m in merged.values():
        SampleConfig(**m).validate()
    # NeF-GPT's own protocol draws every weight, whatever the main does
    assert {**sample, **NEFGPT_SAMPLING}["weights"] == "sampled"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_and_ablation_row_is_a_valid_recipe(name):
    # A typo or an impossible combination (say n_kv_head not dividing n_head) should fail here, not after a
    # 25-minute CPU run or halfway through a GPU session.
    from nfgen.fields import FitConfig, spec_for_images
    from nfgen.generate import SampleConfig
    from nfgen.model import GPTConfig
    from nfgen.template import TemplateConfig
    from nfgen.tokenizer import TokenizerConfig
    from nfgen.train import TrainConfig

    cfg = CONFIGS[name]
    TemplateConfig(**cfg.template).validate()
    main = Recipe(init=cfg.main_init)
    fit = FitConfig(**cfg.fit)
    num_params = spec_for_images((28, 28), fit.hidden, fit.hidden_layers, fit.omega0).num_params
    recipes = {"main": main, **ablation_recipes(cfg, main, num_params)}
    for row, recipe in recipes.items():
        FitConfig(**{**cfg.fit, **recipe.fit}).validate()
        TokenizerConfig(**{**cfg.tokenize, **recipe.tokenize}).validate(num_params)
        train = TrainConfig(**{**cfg.train, **recipe.train})
        train.validate()
        GPTConfig(vocab_size=268, block_size=num_params + 1, n_layer=train.n_layer, n_head=train.n_head,
                  n_embd=train.n_embd, n_kv_head=train.n_kv_head)
        SampleConfig(**{**cfg.sample, **recipe.sample}).validate()
    assert len(recipes) > 5


def _stat(mean, oracle):
    return {"mean": mean, "std": 0.0, "oracle": {"mean": oracle, "std": 0.0}}


def _results(**over):
    m = {"cond_mmd": _stat(0.100, 0.100), "cond_cov": _stat(0.50, 0.52), "cond_1nna": _stat(0.55, 0.53),
         "uncond_mmd": _stat(0.100, 0.100), "uncond_cov": _stat(0.50, 0.52), "uncond_1nna": _stat(0.55, 0.53),
         "memorised": _stat(0.0, 0.01), "accuracy": _stat(0.98, 0.985), "cross_entropy": _stat(0.1, 0.05)}
    m.update(over)
    nef = {k: {"mean": v} for k, v in {"cov": 0.3, "1nna": 0.8, "mmd": 0.2, "accuracy": 0.9}.items()}
    return {"rows": {"main": {"metrics": m}, "nefgpt": {"metrics": nef}},
            "psnr": {"fitted_train": {"mean": 45.0}, "detok_train": {"mean": 36.0}}}


def test_goals_pass_and_fail_from_the_numbers():
    goals = check_goals(_results())
    assert [g["status"] for g in goals] == ["PASS"] * len(goals) and len(goals) == 14
    bad = {g["goal"]: g["status"] for g in check_goals(_results(
        cond_1nna=_stat(0.561, 0.53), uncond_mmd=_stat(0.106, 0.100), memorised=_stat(0.02, 0.01),
        accuracy=_stat(0.97, 0.985)))}
    assert bad["1-NNA ≤ oracle + 0.03 (class-conditional)"] == "FAIL"
    assert bad["MMD ≤ 1.05 × oracle (unconditional)"] == "FAIL"
    assert bad["memorised fraction ≤ oracle's"] == "FAIL"
    assert bad["classifier accuracy ≥ 0.99 × its held-out accuracy"] == "FAIL"
    assert bad["COV ≥ oracle − 0.03 (class-conditional)"] == "PASS"
    skipped = check_goals({"rows": {}})
    assert {g["status"] for g in skipped} == {"SKIP"}


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_tiny_config_end_to_end(tmp_path, data_root, one_thread, capsys):
    results = tmp_path / "quality-cpu-tiny.json"
    common = ["--config", "tiny", "--seeds", "2", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
              "--data-root", str(data_root)]
    assert quality.main(common + ["--results", str(results), "--only", "main,nefgpt,ablations",
                                  "--ablations", "fit,init:meta,order:canonical,vq:group3,vq:weights,model:kv1,"
                                  "sampling:cfg2-expected"]) == 0
    out = capsys.readouterr().out
    r = json.loads(results.read_text())
    for key in ("device", "torch", "triton", "commit", "command", "config", "seconds", "goals", "psnr", "protocol"):
        assert key in r, key
    assert "--config tiny" in r["command"]
    for stage in ("classifier", "fit_train", "fit_heldout", "tokenize", "train", "generate", "evaluate"):
        assert _finite(r["seconds"][stage]), stage
    main = r["rows"]["main"]["metrics"]
    for name in HEADLINE:
        assert _finite(main[name]["mean"]) and _finite(main[name]["std"]) and _finite(main[name]["oracle"]["mean"])
        assert len(main[name]["per_seed"]) == 2
    nef = r["rows"]["nefgpt"]["metrics"]
    for name in NEFGPT_METRICS:
        assert _finite(nef[name]["mean"]) and _finite(nef[name]["oracle"]["mean"])
    # the tiny main, as the full one, draws the first 32 class-pca components at T 1 without top-k and takes the
    # GPT's means of the rest, so the protocol also runs with that, beside NeF-GPT's sampling
    own = r["rows"]["nefgpt_own_sampling"]
    plain = {"top_p": 1.0, "cfg_scale": 1.0}
    assert own["sampling"] == {"top_k": 0, "temperature": 1.0, "weights": "expected", "expected_from": 32, **plain}
    assert r["rows"]["nefgpt"]["sampling"] == {"top_k": 3, "temperature": 0.8, "weights": "sampled",
                                               "expected_from": 0, **plain}
    assert own["metrics"]["mmd"]["oracle"] == nef["mmd"]["oracle"] and _finite(own["metrics"]["cov"]["mean"])
    for row in r["rows"]["reconstruction"].values():
        assert all(_finite(row["metrics"][f"cond_{m}"]["mean"]) for m in ("mmd", "cov", "1nna"))
    assert all(_finite(v) for p in r["psnr"].values() for v in p.values())
    baselines = r["rows"]["baselines"]
    assert set(baselines) == {"gaussian:weights", "gaussian:pixels", "marginals:tokens", "bootstrap:tokens"}
    for row in baselines.values():
        assert all(_finite(row["metrics"][name]["mean"]) for name in HEADLINE)
        # the same protocol as the main row: same seeds, so the same oracle draws
        assert row["metrics"]["cond_mmd"]["oracle_per_seed"] == main["cond_mmd"]["oracle_per_seed"]
    assert "Reference generators without a GPT" in out
    assert _finite(r["rows"]["main"]["train"]["marginal_val_loss"]) and "per-position token histograms" in out
    assert [h["step"] for h in r["rows"]["main"]["train_history"]] == [8]  # eval_every 8 of 8 steps
    assert set(r["rows"]["ablations"]) == {"fit:steps60", "fit:clamp-margin0.3", "init:meta", "order:canonical", "vq:group3",
                                           "vq:weights", "model:kv1", "sampling:cfg2-expected"}
    assert r["rows"]["main"]["recipe"]["tokenize"] == {} and r["config"]["tokenize"]["basis"] == "class-pca"
    assert r["rows"]["ablations"]["vq:weights"]["recipe"]["tokenize"] == {"basis": "weights", "center": "none",
                                                                          "modes": 1}
    # the GPT's kept weights are named (keep best: the lowest validation loss of its one validation)
    assert r["rows"]["main"]["train"]["kept"] == {"rule": "best", "step": 8,
                                                  "val_loss": r["rows"]["main"]["train_history"][0]["val_loss"]}
    # the meta row fits from a template learned on the training split, which is an artifact of its own
    template = [k for k in r["summaries"] if k.startswith("template-")]
    assert len(template) == 1 and r["summaries"][template[0]]["split"] == "mnist:test[:120]"
    assert _finite(r["seconds"]["template"])
    assert r["rows"]["ablations"]["fit:steps60"]["fields_psnr"] > r["rows"]["main"]["fields_psnr"]  # 60 vs 40 steps
    # the tiny main fits from the random draw, so without a margin: the row fits with one
    assert r["rows"]["ablations"]["fit:clamp-margin0.3"]["recipe"]["fit"] == {"clamp_margin": 0.3}
    assert r["rows"]["ablations"]["order:canonical"]["canonical"]["max_abs_render_delta"] < 1e-4
    for row in r["rows"]["ablations"].values():
        assert all(_finite(row["metrics"][name]["mean"]) for name in HEADLINE)
    assert len(r["goals"]) == 14 and {g["status"] for g in r["goals"]} <= {"PASS", "FAIL"}
    # two trainings: the first is the run above (its artifacts reused, its draws the same), the second trains anew
    again = tmp_path / "quality-cpu-tiny-2.json"
    assert quality.main(common + ["--results", str(again), "--only", "main,nefgpt", "--train-seeds", "2"]) == 0
    r2 = json.loads(again.read_text())
    assert r2["train_seeds"] == 2 and "of each of 2 GPT trainings" in capsys.readouterr().out
    m2 = r2["rows"]["main"]
    assert [t["train_seed"] for t in m2["trainings"]] == [0, 1] and len({t["model"] for t in m2["trainings"]}) == 2
    for name in HEADLINE:
        pooled = m2["metrics"][name]["per_seed"]
        assert pooled[:2] == main[name]["per_seed"] and len(pooled) == 4
        assert m2["trainings"][0]["metrics"][name] == main[name]["mean"]
    for row in ("nefgpt", "nefgpt_own_sampling"):
        assert r2["rows"][row]["metrics"]["cov"]["per_seed"][:2] == r["rows"][row]["metrics"]["cov"]["per_seed"]
        assert [t["train_seed"] for t in r2["rows"][row]["trainings"]] == [0, 1]
    png = tmp_path / "quality-cpu-tiny-samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per held-out class a row each from nfgen, the three weight- or token-space references and the real images
    generators = Image.open(r["generators_png"])
    n_rows = 5 * len(set(load_split(r["config"]["heldout_split"], data_root=data_root).labels.tolist()))
    assert generators.height == (n_rows * (28 + 2) + 2) * 2
    assert "| MMD ↓ |" in out and "NeF-GPT" in out and ("PASS" in out or "FAIL" in out)

    # A second run in the same directory reuses every artifact: nothing is fitted, tokenized or trained.
    again = tmp_path / "again.json"
    assert quality.main(common + ["--results", str(again), "--only", "nefgpt"]) == 0
    r2 = json.loads(again.read_text())
    assert not {"fit_train", "tokenize", "train", "classifier"} & r2["seconds"].keys()
    assert r2["rows"]["nefgpt"]["metrics"]["mmd"]["per_seed"] == nef["mmd"]["per_seed"]  # same seeds, same samples
    assert r["complete"] and r2["complete"]

    # A run killed partway (a GPU call's time limit) has written every row it finished.
    killed = tmp_path / "killed.json"
    finished = []
    real_row = quality.Harness.main_row

    def dies_on_second_row(self, recipe, seeds):
        if finished:
            raise KeyboardInterrupt  # what `timeout` amounts to: no chance to write at the end
        finished.append(recipe)
        return real_row(self, recipe, seeds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality.Harness, "main_row", dies_on_second_row)
        with pytest.raises(KeyboardInterrupt):
            quality.main(common + ["--results", str(killed), "--only", "ablations",
                                   "--ablations", "init:meta,vq:group3"])
    partial = json.loads(killed.read_text())
    assert not partial["complete"] and list(partial["rows"]["ablations"]) == ["init:meta"]
    assert partial["rows"]["ablations"]["init:meta"]["metrics"] == r["rows"]["ablations"]["init:meta"]["metrics"]

    # class-pca's shrinkage, measured on the same run's fields: ~12 fields per class span little of the 105
    # weights, so held-out fields encode only with the pooled covariance mixed in
    from benchmarks import class_pca_shrinkage

    shrink = tmp_path / "shrink.json"
    assert class_pca_shrinkage.main(common[:2] + common[4:] + ["--shrinkage", "0,1", "--expected-from", "4",
                                                               "--modes", "1,2", "--draws", "2",
                                                               "--results", str(shrink)]) == 0
    rows = json.loads(shrink.read_text())["rows"]
    assert [(row["shrinkage"], row["modes"]) for row in rows] == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    assert rows[2]["detok_heldout_psnr"] > rows[0]["detok_heldout_psnr"] + 1.0
    for row in rows:
        assert _finite(row["detok_train_psnr"]) and _finite(row["standard_components"]["accuracy"]["samples"])
        # the same draws with all but the first 4 components at 0: other fields, so another MMD
        coarse = row["expected_from"]["4"]
        assert _finite(coarse["cond_mmd"]["samples"])
        assert coarse["cond_mmd"]["samples"] != row["standard_components"]["cond_mmd"]["samples"]
        # the reported numbers are the means of the two draws'
        draws = [d["cond_mmd"]["samples"] for d in row["per_draw"]["all"]]
        assert len(draws) == 2 and draws[0] != draws[1]
        assert row["standard_components"]["cond_mmd"]["samples"] == pytest.approx(sum(draws) / 2)
    # two modes a class: other fields than one class mean, from the same seeds
    assert rows[1]["standard_components"]["cond_mmd"] != rows[0]["standard_components"]["cond_mmd"]


def test_bad_options_exit_2(tmp_path, data_root, capsys):
    base = ["--config", "tiny", "--run-dir", str(tmp_path), "--data-root", str(data_root)]
    assert quality.main(base + ["--only", "main,bogus"]) == 2
    assert quality.main(base + ["--only", "ablations", "--ablations", "nope"]) == 2
    assert quality.main(base + ["--seeds", "0"]) == 2
    assert quality.main(base + ["--train-seeds", "0"]) == 2
    assert quality.main(base + ["--set", "tokenize.nope=1"]) == 2
    assert quality.main(base + ["--set", "model.n_layer=1"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))  # refused before any work


def test_oracle_spread_draws_like_the_main_rows_and_scores_the_goals(data_root, monkeypatch):
    from benchmarks import oracle_spread
    from nfgen.data import load_split

    train, held = load_split("mnist:test[:300]", data_root), load_split("mnist:test[8000:8040]", data_root)
    counts = {int(c): int(k) for c, k in zip(*held.labels.unique(return_counts=True))}
    pick = oracle_spread.stratified(train.labels, counts, torch.Generator().manual_seed(0))
    assert len(set(pick.tolist())) == len(held)  # distinct images, the references' class counts
    assert {c: int((train.labels[pick] == c).sum()) for c in counts} == counts
    # The goals read 3-seed means: calls alternate perfect, oracle; the perfect 1-NNA means 0.74 then 0.72 against
    # the oracle's 0.70 (fail, pass), COV 0.50 against 0.52 (pass) and MMD 0.25 against 0.20 (fail).
    calls = {"n": 0}

    def fake(gen_images, refs):
        assert gen_images.shape == refs.shape  # |Sg| = |Sr|, every reference
        perfect, trial = calls["n"] % 2 == 0, calls["n"] // (2 * oracle_spread.SEEDS)
        calls["n"] += 1
        return {"1nna": (0.74 - 0.02 * trial) if perfect else 0.70, "cov": 0.50 if perfect else 0.52,
                "mmd": 0.25 if perfect else 0.20}

    monkeypatch.setattr(oracle_spread, "distance_metrics", fake)
    row = oracle_spread.spread(train, held, trials=2, device="cpu")
    assert calls["n"] == 2 * 2 * oracle_spread.SEEDS
    assert row["perfect_generator_passes"] == {"1nna": 0.5, "cov": 1.0, "mmd": 0.0}
    assert row["perfect_minus_oracle_3_seed_means"]["1nna"]["mean"] == pytest.approx(0.03)
    monkeypatch.undo()
    real = oracle_spread.spread(train, held, trials=2, device="cpu")  # the real metrics: in range, not constant
    assert 0.5 <= real["single_draw"]["1nna"]["mean"] <= 1.0 and real["single_draw"]["1nna"]["std"] > 0


def test_oracle_spread_scores_perfect_field_generators_on_the_same_draws(data_root, tmp_path):
    from benchmarks import oracle_spread
    from nfgen.cli import main
    from nfgen.data import load_split

    train, held = load_split("mnist:test[:300]", data_root), load_split("mnist:test[8000:8040]", data_root)
    # a "field generator" that renders the images exactly scores what they score, draw for draw; a speckled one worse
    noise = torch.rand(train.images.shape, generator=torch.Generator().manual_seed(0))
    speckled = (train.images + 0.3 * noise).clamp(0, 1)
    row = oracle_spread.spread(train, held, trials=2, device="cpu",
                               fields={"exact": train.images, "speckled": speckled})
    exact, noisy = row["field_generators"]["exact"], row["field_generators"]["speckled"]
    assert all(v == {"mean": 0.0, "std": 0.0} for v in exact["minus_images_same_draw"].values())
    assert exact["passes"] == row["perfect_generator_passes"]
    worse = noisy["minus_images_same_draw"]
    assert worse["mmd"]["mean"] > 0.02 and worse["1nna"]["mean"] > 0.03  # measured: 0.035, 0.079
    assert row == {**oracle_spread.spread(train, held, trials=2, device="cpu"), "field_generators": row[
        "field_generators"], "seconds": row["seconds"]}  # the images' own numbers do not move
    # fields files: fitted to the training split, rendered (a tokens file de-tokenized); any other split refused
    r = ["--run", str(tmp_path), "--quiet"]
    assert main(["fit", *r, "--split", "mnist:test[:300]", "--hidden", "8", "--hidden-layers", "1",
                 "--steps", "30"]) == 0
    assert main(["tokenize", *r, "--codebook-size", "16", "--iters", "3"]) == 0
    for name in ("fields", "tokens"):
        renders = oracle_spread.field_renders(str(tmp_path / f"{name}.safetensors"), train, "cpu")
        assert renders.shape == train.images.shape and (renders - train.images).abs().mean() < 0.2
    with pytest.raises(SystemExit, match="cannot read .*nope.safetensors"):
        oracle_spread.field_renders(str(tmp_path / "nope.safetensors"), train, "cpu")
    with pytest.raises(SystemExit):  # a name that would stand in for the images themselves
        oracle_spread.main(["--fields", f"perfect={tmp_path / 'fields.safetensors'}"])
    with pytest.raises(SystemExit, match="was not fitted to mnist:test\\[:299\\]"):
        oracle_spread.field_renders(str(tmp_path / "fields.safetensors"), load_split("mnist:test[:299]", data_root),
                                    "cpu")


def test_set_changes_the_main_recipe_and_nothing_else():
    small = quality.CONFIGS["small"]
    cfg = quality.with_settings(small, ["tokenize.coarse=32", "sample.weights=sampled", "train.lr=0.001",
                                        "tokenize.basis=pca"])
    assert cfg.tokenize == {**small.tokenize, "coarse": 32, "basis": "pca"}
    assert cfg.sample == {**small.sample, "weights": "sampled"} and cfg.train == {**small.train, "lr": 0.001}
    assert cfg.fit == small.fit and small.tokenize.get("coarse") is None  # the config itself is left alone
    with pytest.raises(NfgenError, match="has no field 'coarser'"):
        quality.with_settings(small, ["tokenize.coarser=1"])
    with pytest.raises(NfgenError, match="SECTION.KEY=VALUE"):
        quality.with_settings(small, ["tokenize=coarse"])
