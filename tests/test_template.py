"""The template stage: Reptile moves the shared init toward the data, fits from it start closer, files round-trip."""
import json
import math

import pytest
import torch

from nfgen.cli import main
from nfgen.data import load_split
from nfgen.fields import (FitConfig, _fit_batch, fit_fingerprint, load_fields, psnr, render_fields,
                          spec_for_images)
from nfgen.io import NfgenError
from nfgen.template import TemplateConfig, meta_template, run_template
from nfkernels import coord_grid, siren_forward, siren_init

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = "mnist:test[:96]"
SMALL = dict(hidden=16, outer=12, batch=32, inner_steps=10, lr=1e-3, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_split(SPLIT, data_root=data_root)


@pytest.fixture(scope="module")
def learned(mnist):
    return meta_template(mnist.images, TemplateConfig(**SMALL))


def _spec():
    return spec_for_images((28, 28), 16, 2, 30.0)


def _fit_from(start, images, steps):
    """PSNR of every image after `steps` Adam steps from `start` [1, P]."""
    cfg = FitConfig(hidden=16, steps=steps, lr=1e-3, steps_per_call=steps, device="cpu", quiet=True)
    target = images.float().reshape(images.shape[0], -1, 1)
    fitted, _ = _fit_batch(start.expand(images.shape[0], -1), target, coord_grid(images.shape[1:3]), _spec(), cfg)
    return psnr(render_fields(fitted, _spec(), tuple(images.shape[1:])), images)


def test_template_moves_toward_the_data(learned, data_root):
    theta, history = learned
    assert theta.shape == (1, _spec().num_params) and torch.isfinite(theta).all()
    assert len(history) == SMALL["outer"]
    # the inner fits from the template get better as it learns ...
    assert sum(history[-3:]) / 3 > history[0] + 1.0, history
    # ... and short fits of images it never saw start closer than from the random draw it started as
    unseen = load_split("mnist:test[200:264]", data_root=data_root).images
    random_start = siren_init(_spec(), 1, torch.Generator().manual_seed(0))
    assert _fit_from(theta, unseen, 10).mean() > _fit_from(random_start, unseen, 10).mean() + 1.0


def test_template_learns_the_fits_clamp_margin(mnist, learned):
    """With a clamp margin (the default) the template fits the pushed-out targets: its background renders
    further below 0 than without one, while the PSNR it reports is of the clamped render against the image."""
    assert TemplateConfig().clamp_margin > 0
    plain, plain_history = meta_template(mnist.images, TemplateConfig(**SMALL, clamp_margin=0.0))
    background = mnist.images[0] == 0
    raw = {name: siren_forward(t, coord_grid((28, 28)), _spec()).reshape(28, 28)[background].mean()
           for name, t in (("margin", learned[0]), ("plain", plain))}
    assert raw["margin"] < raw["plain"] - 0.1, raw
    assert abs(learned[1][-1] - plain_history[-1]) < 3.0  # dB of the images, comparable across margins
    with pytest.raises(NfgenError, match="clamp_margin"):
        meta_template(mnist.images, TemplateConfig(**SMALL, clamp_margin=1.5))


def test_template_is_deterministic_and_seeded(mnist, learned):
    again, history = meta_template(mnist.images, TemplateConfig(**SMALL))
    assert torch.equal(again, learned[0]) and history == learned[1]
    other, _ = meta_template(mnist.images, TemplateConfig(**{**SMALL, "seed": 1, "outer": 2}))
    assert not torch.equal(other, learned[0])


def test_template_file_feeds_fit(tmp_path, mnist, data_root):
    out = tmp_path / "template.safetensors"
    cfg = TemplateConfig(**{**SMALL, "outer": 3})
    summary = run_template(SPLIT, out, cfg, data_root=data_root)
    t = load_fields(out)
    assert len(t) == 1 and t.labels.tolist() == [-1] and t.meta["kind"] == "template"
    assert t.meta["template_recipe"]["outer"] == 3
    assert summary["inner_psnr_last"] == pytest.approx(float(t.psnr[0]), abs=1e-3)
    theta, _ = meta_template(mnist.images, cfg)
    assert torch.equal(t.weights, theta)
    # a fit's fingerprint covers the template's weights, not just its path
    fit_cfg = FitConfig(hidden=16, template=str(out))
    before = fit_fingerprint(mnist, fit_cfg)
    run_template(SPLIT, out, TemplateConfig(**{**SMALL, "outer": 2}), data_root=data_root)
    assert fit_fingerprint(mnist, fit_cfg) != before


@pytest.mark.parametrize("bad", [dict(outer=0), dict(inner_steps=0), dict(lr=-1.0), dict(meta_lr=0.0),
                                 dict(meta_lr=1.5)])
def test_bad_template_config(bad, mnist):
    with pytest.raises(NfgenError, match="bad template config"):
        meta_template(mnist.images, TemplateConfig(**{**SMALL, **bad}))


def test_cli_template_then_fit_uses_it(tmp_path, capsys):
    def cli(*args):
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    run = str(tmp_path / "run")
    code, _, err = cli("template", "--run", run, "--split", SPLIT, "--outer", "0", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "outer" in err
    assert not (tmp_path / "run" / "template.safetensors").exists()
    code, out, err = cli("template", "--run", run, "--split", SPLIT, "--hidden", "16", "--outer", "2", "--batch", "8",
                         "--inner-steps", "3", "--device", "cpu", "--quiet")
    assert code == 0, err
    path = json.loads(out)["out"]
    # fit in the same run picks the template up, as every stage reads what the earlier ones left
    code, out, err = cli("fit", "--run", run, "--split", "mnist:test[:8]", "--hidden", "16", "--steps", "5",
                         "--device", "cpu", "--quiet")
    assert code == 0, err
    assert json.loads(out)["template"] == path
    config = json.loads((tmp_path / "run" / "fit.config.json").read_text())
    assert config["recipe"]["template"] == path
    # ... and its clamp margin (the template's default), recorded as a number
    assert config["recipe"]["clamp_margin"] == json.loads(out)["clamp_margin"] == TemplateConfig().clamp_margin > 0
    # ... unless the fit asks for independent inits, which cannot use one
    code, out, err = cli("fit", "--run", run, "--split", "mnist:test[:8]", "--hidden", "16", "--steps", "5",
                         "--init", "independent", "--out", str(tmp_path / "ind.safetensors"), "--device", "cpu",
                         "--quiet")
    assert code == 0 and json.loads(out)["template"] is None, err
    assert json.loads(out)["clamp_margin"] == 0.0  # no template, no margin unless asked for


def test_linear_r2_tells_a_function_of_the_image_from_noise():
    from benchmarks.template_proxy import linear_r2

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(200, 6, 6, generator=gen)
    mix = torch.randn(36, 10, generator=gen, dtype=torch.float64)
    linear = images.reshape(200, -1).double() @ mix
    assert linear_r2(linear, images, n_pc=36) > 0.9  # the ridge shrinks it a little
    assert linear_r2(torch.randn(200, 10, generator=gen), images, n_pc=36) < 0.1


def test_template_proxy_benchmark_runs(tmp_path, data_root):
    from benchmarks import template_proxy

    out = tmp_path / "proxy.json"
    assert template_proxy.main(["--n", "60", "--refs", "mnist:test[8000:8020]", "--outer", "2", "--fit-steps", "5",
                                "--templates", "random,meta", "--clamp-margins", "0,0.3", "--data-root",
                                str(data_root), "--results", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["template"], r.get("clamp_margin")) for r in rows][2:] == [
        ("random", 0.0), ("meta", 0.0), ("random", 0.3), ("meta", 0.3)]
    for r in rows:
        assert all(0 <= r[f"gauss_{m}"] <= 1 for m in ("mmd", "cov", "1nna"))
    for r in rows[2:]:
        assert r["psnr_mean"] > 5 and -1 < r["r2"] < 1 and 5 < r["detok_psnr_mean"] <= r["psnr_mean"] + 1
        assert all(0 <= r[f"detok_{m}"] <= 1 for m in ("mmd", "cov", "1nna"))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_tokenize_quality_fits_from_a_template(tmp_path, data_root):
    from benchmarks import tokenize_quality

    out = tmp_path / "tq.json"
    assert tokenize_quality.main(["--n", "24", "--recipes", "10:1e-3,5:2e-3", "--variants", "none:16,mean:8",
                                  "--template", "meta", "--outer", "2", "--data-root", str(data_root),
                                  "--results", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["template"]["kind"] == "meta" and r["template"]["outer"] == 2
    assert [(row["steps"], row["lr"]) for row in r["rows"]] == [(10, 1e-3), (5, 2e-3)]
    for row in r["rows"]:
        for name, k in (("none:16", 16), ("mean:8", 8)):
            t = row["tokenizers"][name]
            assert 5 < t["detok_psnr"] < row["fit_psnr"] + 1 and 0 < t["position_entropy_nats"] <= math.log(k)
