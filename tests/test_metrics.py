"""Evaluate stage: metric definitions on hand-made similarity cases, real MNIST, the stage end to end."""
import json
from types import SimpleNamespace

import pytest
import torch

from nfgen.io import NfgenError
from nfgen.data import DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT
from nfgen.metrics import (check_held_out, default_splits, distance_metrics, evaluate, headline, load_images,
                           memorisation, metrics_from_nearest, nearest_from_matrices, run_evaluate)


def line_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Points on a line; closer points are more similar."""
    return -(a[:, None] - b[None, :]).abs()


def metrics_of_points(g: torch.Tensor, r: torch.Tensor) -> dict:
    return metrics_from_nearest(nearest_from_matrices(line_similarity(g, r), line_similarity(g, g),
                                                      line_similarity(r, r)))


def test_identical_sets():
    p = torch.tensor([0.0, 1.0, 3.0, 7.0, 15.0])
    sim = 1 + line_similarity(p, p)  # SSIM-like: 1 on the diagonal
    m = metrics_from_nearest(nearest_from_matrices(sim, sim, sim))
    assert m["cov"] == 1.0 and m["mmd"] == 0.0
    assert m["1nna"] == 0.0  # every point's nearest is its twin in the other set


def test_far_apart_sets_are_told_apart():
    g, r = torch.arange(7.0), 100 + torch.arange(7.0)
    m = metrics_of_points(g, r)
    assert m["1nna"] == 1.0
    assert m["cov"] == pytest.approx(1 / 7)  # every generated point's nearest reference is the first one
    assert m["mmd"] == pytest.approx(49.0)  # reference 100 + j is 94 + j from g = 6: mean of (1 + 94 + j) / 2


def test_same_distribution_gives_half():
    gen = torch.Generator().manual_seed(0)
    m = metrics_of_points(torch.rand(400, generator=gen), torch.rand(400, generator=gen))
    assert abs(m["1nna"] - 0.5) < 0.06  # binomial sd ~ 0.018 for 800 points
    assert 0.4 < m["cov"] < 0.9


def test_mode_collapse_lowers_coverage():
    r = torch.arange(10.0)
    m = metrics_of_points(torch.full((10,), 4.2), r)  # all generated points on one spot
    assert m["cov"] == pytest.approx(0.1)
    assert m["1nna"] == pytest.approx(0.9)  # all 10 generated right; of the references only 2 and 3 are fooled


def test_tie_goes_to_generated_in_union_order():
    # g0 is equidistant to g1 and r0; the union order [Sg; Sr] makes g1 the neighbour (correct for g0).
    g, r = torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 10.0])
    nn = nearest_from_matrices(line_similarity(g, r), line_similarity(g, g), line_similarity(r, r))
    assert nn.g_to_g[0] == nn.g_to_r[0]
    # g0 right (tie), g1 right (g0 at 1 vs r0 at 2), r0 wrong (g0 at 1 vs r1 at 11), r1 wrong (g1 at 9 vs r0 at 11)
    assert metrics_from_nearest(nn)["1nna"] == 0.5


@pytest.fixture(scope="module")
def mnist(data_root):
    from nfgen.data import load_split

    return load_split("mnist:test[:300]", data_root=data_root)


def test_real_identical_sets(mnist):
    x = mnist.images[:40]
    m = distance_metrics(x, x.clone())
    assert m["mmd"] < 1e-6 and m["cov"] == 1.0 and m["1nna"] == 0.0


def test_oracle_beats_noise_on_mnist(mnist):
    ref, oracle = mnist.images[:60], mnist.images[100:160]
    noise = torch.rand(60, 28, 28, generator=torch.Generator().manual_seed(0))
    m_o, m_n = distance_metrics(oracle, ref), distance_metrics(noise, ref)
    assert m_o["mmd"] < m_n["mmd"] - 0.1
    assert m_o["1nna"] < 0.75 and m_n["1nna"] > 0.9
    assert m_o["cov"] > m_n["cov"]


def test_memorisation_finds_copies(mnist):
    train = mnist.images[:200]
    samples = torch.cat([train[[5, 17, 150]], torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(1))])
    mem = memorisation(samples, train)
    assert mem["memorised_fraction"] == pytest.approx(3 / 8)
    assert mem["nearest_index"][:3].tolist() == [5, 17, 150]
    assert (mem["nearest_ssim"][:3] - 1).abs().max() < 1e-5 and (mem["nearest_ssim"][3:] < 0.5).all()


class _Split(SimpleNamespace):
    def __len__(self):
        return self.images.shape[0]


def test_evaluate_groups_and_oracle(mnist):
    ref = _Split(images=mnist.images[200:300], labels=mnist.labels[200:300], spec="ref", n_classes=10,
                 image_shape=(28, 28))
    train = _Split(images=mnist.images[:200], labels=mnist.labels[:200], spec="train", n_classes=10,
                   image_shape=(28, 28))
    # "samples": real held-out digits of classes 0 and 1 with their labels, plus 6 unconditional noise images
    pick = torch.nonzero((ref.labels == 0) | (ref.labels == 1)).flatten()
    noise = torch.rand(6, 28, 28, generator=torch.Generator().manual_seed(2))
    images = torch.cat([ref.images[pick], noise])
    labels = torch.cat([ref.labels[pick], torch.full((6,), -1)])
    res = evaluate(SimpleNamespace(labels=labels), ref, train, sample_images=images, seed=0, quiet=True)
    assert set(res["groups"]) == {"conditional_all", "class_0", "class_1", "unconditional"}
    for name in ("class_0", "class_1"):
        g = res["groups"][name]
        assert g["n"] == min(g["available"].values())
        for k in ("mmd", "cov", "1nna"):
            assert set(g[k]) == {"samples", "oracle"}
    assert res["groups"]["unconditional"]["n"] == 6
    assert res["groups"]["unconditional"]["1nna"]["samples"] > 0.75  # noise is (nearly always) told apart
    assert res["groups"]["unconditional"]["1nna"]["oracle"] < 1.0
    # the "samples" of classes 0/1 are references themselves: nearest-reference distance 0 for the picked ones
    assert res["groups"]["class_0"]["mmd"]["samples"] <= res["groups"]["class_0"]["mmd"]["oracle"]
    mem = res["memorisation"]
    assert mem["memorised_fraction"]["samples"] == memorisation(images, train.images)["memorised_fraction"]
    assert 0.0 <= mem["memorised_fraction"]["oracle"] < 0.5 and mem["n"]["oracle"] == len(labels)
    json.dumps({k: v for k, v in res.items() if not k.startswith("_")})  # serialisable


def _write_fields(path, n, image_shape=(28, 28), labels=None, seed=0):
    from nfgen.fields import save_fields, spec_for_images
    from nfkernels.siren import siren_init

    spec = spec_for_images(image_shape, 16, 2, 30.0)
    w = siren_init(spec, n, generator=torch.Generator().manual_seed(seed))
    w[:, -1] = 0.5  # output bias: mid-grey images with some structure
    labels = torch.arange(n) % 3 if labels is None else labels
    save_fields(path, w, labels, torch.zeros(n), spec, image_shape, {"source": "test"})


def test_default_splits():
    fitted_on = {"source": {"split": "mnist:test[:2000]", "indices": [0, 1]}}  # a fields or tokens file
    generated = {"training_split": "mnist:test[:2000]"}  # generate's samples
    for meta in (fitted_on, generated):
        assert default_splits(meta, None, None) == (DEFAULT_HELDOUT_SPLIT, "mnist:test[:2000]")
    assert default_splits({}, None, None) == (DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT)  # e.g. an images file
    assert default_splits({"source": "hand-edited"}, None, None)[1] == DEFAULT_TRAIN_SPLIT
    named = default_splits(generated, "mnist:test[9000:]", "mnist:test[:100]")  # named splits win
    assert named == ("mnist:test[9000:]", "mnist:test[:100]")
    assert default_splits({"training_split": "cifar10:test[:60]"}, "cifar10:test[60:]", None) == (
        "cifar10:test[60:]", "cifar10:test[:60]")
    with pytest.raises(NfgenError, match=r"come from cifar10:test\[:60\]; name held-out cifar10 images"):
        default_splits({"training_split": "cifar10:test[:60]"}, None, None)


def _split(spec: str, indices) -> SimpleNamespace:
    return SimpleNamespace(spec=spec, indices=torch.tensor(indices))


def test_check_held_out():
    check_held_out(_split("mnist:test[8000:]", range(8000, 10000)), _split("mnist:test[:8000]", range(8000)))
    check_held_out(_split("mnist:test[:100]", range(100)), _split("mnist:train[:100]", range(100)))  # other set
    check_held_out(_split("cifar10:test[:100]", range(100)), _split("mnist:test[:100]", range(100)))  # other data
    with pytest.raises(NfgenError, match=r"mnist:test\[95:\] and mnist:test\[:100\] share 5 images"):
        check_held_out(_split("mnist:test[95:]", range(95, 10000)), _split("mnist:test[:100]", range(100)))
    with pytest.raises(NfgenError, match="share 1 image;"):  # a negative slice resolves to the same positions
        check_held_out(_split("mnist:test[-1:]", [9999]), _split("mnist:test[9999:]", [9999]))


def test_run_evaluate_writes_outputs(tmp_path, data_root):
    _write_fields(tmp_path / "samples.safetensors", 12)
    res = run_evaluate(tmp_path / "samples.safetensors", tmp_path / "eval", ref_split="mnist:test[9000:9120]",
                       train_split="mnist:test[:150]", data_root=data_root, device="cpu", quiet=True)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["groups"].keys() == res["groups"].keys()
    assert written["sizes"]["samples"] == 12 and "timing" in written and "_nearest_train_index" not in written
    assert (tmp_path / "eval" / "nearest.png").stat().st_size > 0
    assert written["groups"]["conditional_all"]["1nna"]["samples"] >= written["groups"]["conditional_all"]["1nna"]["oracle"]


def test_run_evaluate_refuses_a_classifier_of_other_images_before_any_search(tmp_path, data_root, monkeypatch):
    from nfgen import metrics
    from nfgen.classifier import ClassifierConfig, SmallCNN, classify, save_classifier

    colour = SmallCNN(ClassifierConfig(in_channels=3, image_hw=(32, 32)))
    save_classifier(tmp_path / "clf.safetensors", colour, {})
    _write_fields(tmp_path / "s.safetensors", 6)
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: pytest.fail("the searches ran before the check"))
    with pytest.raises(NfgenError, match=r"classifier expects images of shape \(32, 32\) with 3 channel\(s\), got "
                                         r"\(28, 28\); use a classifier trained on this dataset \(`nfgen classifier "
                                         r"--train-split … --heldout-split …`"):
        run_evaluate(tmp_path / "s.safetensors", tmp_path / "eval", ref_split="mnist:test[9000:9060]",
                     train_split="mnist:test[:80]", classifier_path=tmp_path / "clf.safetensors",
                     data_root=data_root, device="cpu", quiet=True)
    assert not (tmp_path / "eval").exists()
    assert classify(colour, torch.rand(2, 32, 32, 3)).shape == (2, 10)  # what it was trained for it takes
    with pytest.raises(NfgenError, match=r"got \(32, 32\); use"):  # one channel of the right size is not enough
        classify(colour, torch.rand(2, 32, 32))


def test_headline_puts_each_number_beside_its_oracle(tmp_path, data_root, capsys):
    _write_fields(tmp_path / "s.safetensors", 6)
    res = run_evaluate(tmp_path / "s.safetensors", tmp_path / "eval", ref_split="mnist:test[9000:9060]",
                       train_split="mnist:test[:80]", data_root=data_root, device="cpu", quiet=False)
    printed = capsys.readouterr().out.splitlines()
    g, mem = res["groups"]["conditional_all"], res["memorisation"]["memorised_fraction"]
    metrics_json = tmp_path / "eval" / "metrics.json"
    assert printed == headline(res, metrics_json).splitlines()
    assert printed[0] == f"evaluate against mnist:test[9000:9060], oracle from mnist:test[:80] → {metrics_json}"
    assert printed[1] == (f"  class-conditional (6): MMD {g['mmd']['samples']:.4f} (oracle {g['mmd']['oracle']:.4f}), "
                          f"COV {g['cov']['samples']:.3f} (oracle {g['cov']['oracle']:.3f}), "
                          f"1-NNA {g['1nna']['samples']:.3f} (oracle {g['1nna']['oracle']:.3f})")
    # no classifier and no unconditional samples: neither line
    assert printed[2] == f"  memorised {mem['samples']:.3f} (oracle {mem['oracle']:.3f})"
    with_classifier = {**res, "classifier": {"accuracy": {"samples": 0.8, "oracle": 0.99}}}
    assert headline(with_classifier, "m.json").splitlines()[-1].startswith(
        "  classifier accuracy 0.800 (oracle 0.990), memorised")


def test_run_evaluate_with_classifier(tmp_path, data_root):
    from nfgen.classifier import ClassifierConfig, SmallCNN, save_classifier

    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.safetensors", SmallCNN(ClassifierConfig()), {})
    _write_fields(tmp_path / "s.safetensors", 6)
    res = run_evaluate(tmp_path / "s.safetensors", tmp_path / "eval", ref_split="mnist:test[9000:9060]",
                       train_split="mnist:test[:80]", classifier_path=tmp_path / "clf.safetensors",
                       data_root=data_root, device="cpu", quiet=True)
    clf = res["classifier"]
    assert clf["n"] == {"samples": 6, "oracle": 60}
    assert set(clf["per_class"]) == {"0", "1", "2"}
    # the same numbers from the classifier itself: the rendered samples against their classes, and the references
    from nfgen.classifier import classify, load_classifier
    from nfgen.data import load_split
    from nfgen.fields import load_fields, render_fields

    model = load_classifier(tmp_path / "clf.safetensors")
    samples = load_fields(tmp_path / "s.safetensors")
    refs = load_split("mnist:test[9000:9060]", data_root=data_root)
    for key, images, labels in (("samples", render_fields(samples.weights, samples.spec, samples.image_shape),
                                 samples.labels), ("oracle", refs.images, refs.labels)):
        logits = classify(model, images).double()
        assert clf["accuracy"][key] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
        assert clf["cross_entropy"][key] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    first = (samples.labels == 0)
    logits = classify(model, render_fields(samples.weights[first], samples.spec, samples.image_shape)).double()
    assert clf["per_class"]["0"]["accuracy"]["samples"] == pytest.approx((logits.argmax(1) == 0).double().mean().item())


def test_bad_input(tmp_path, data_root):
    with pytest.raises(NfgenError, match="not found"):
        run_evaluate(tmp_path / "missing.safetensors", tmp_path / "e", data_root=data_root, quiet=True)
    _write_fields(tmp_path / "small.safetensors", 4, image_shape=(16, 16))
    with pytest.raises(NfgenError, match="16, 16"):
        run_evaluate(tmp_path / "small.safetensors", tmp_path / "e", ref_split="mnist:test[:20]",
                     train_split="mnist:test[20:40]", data_root=data_root, quiet=True)
    _write_fields(tmp_path / "badlab.safetensors", 4, labels=torch.tensor([0, 1, 12, -1]))
    with pytest.raises(NfgenError, match="labels"):
        run_evaluate(tmp_path / "badlab.safetensors", tmp_path / "e", ref_split="mnist:test[:20]",
                     train_split="mnist:test[20:40]", data_root=data_root, quiet=True)
    assert not (tmp_path / "e" / "metrics.json").exists()
    with pytest.raises(NfgenError, match="differ in shape"):
        distance_metrics(torch.rand(3, 28, 28), torch.rand(3, 20, 20))


EVAL_SPLITS = dict(ref_split="mnist:test[9000:9120]", train_split="mnist:test[:150]")


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("groups", "memorisation", "classifier", "sizes") if k in metrics}


def test_images_file_scores_like_the_fields_it_was_rendered_from(tmp_path, data_root):
    from safetensors.torch import save_file

    from nfgen.classifier import ClassifierConfig, SmallCNN, save_classifier
    from nfgen.fields import load_fields, render_fields

    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.safetensors", SmallCNN(ClassifierConfig()), {})
    _write_fields(tmp_path / "s.safetensors", 12, labels=torch.tensor([0, 1, 2, -1] * 3))
    fields = load_fields(tmp_path / "s.safetensors")
    images = render_fields(fields.weights, fields.spec, fields.image_shape)
    save_file({"images": images, "labels": fields.labels}, str(tmp_path / "images.safetensors"))
    common = dict(**EVAL_SPLITS, classifier_path=tmp_path / "clf.safetensors", data_root=data_root, device="cpu",
                  quiet=True)
    from_fields = run_evaluate(tmp_path / "s.safetensors", tmp_path / "a", **common)
    from_images = run_evaluate(None, tmp_path / "b", images_path=tmp_path / "images.safetensors", **common)
    assert _scores(from_images) == _scores(from_fields)
    assert from_images["classifier"]["n"]["samples"] == 9 and from_images["groups"]["unconditional"]["n"] == 3
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["inputs"]["images"] == str(tmp_path / "images.safetensors") and "samples" not in written["inputs"]
    assert (tmp_path / "b" / "nearest.png").read_bytes()[:4] == b"\x89PNG"


def test_images_file_of_uint8_real_digits_without_labels(tmp_path, data_root):
    from safetensors.torch import save_file

    from nfgen.data import load_split

    real = load_split("mnist:test[9500:9620]", data_root=data_root)
    save_file({"images": (real.images * 255).round().to(torch.uint8)}, str(tmp_path / "u8.safetensors"))
    loaded = load_images(tmp_path / "u8.safetensors")
    assert torch.equal(loaded.images, real.images)  # MNIST is uint8 / 255 already
    assert loaded.labels.tolist() == [-1] * 120
    res = run_evaluate(None, tmp_path / "e", images_path=tmp_path / "u8.safetensors", **EVAL_SPLITS,
                       data_root=data_root, device="cpu", quiet=True)
    assert set(res["groups"]) == {"unconditional"} and "classifier" not in res
    g = res["groups"]["unconditional"]
    # real digits are near the references (as near as the oracle's training images); uniform noise is not
    assert abs(g["mmd"]["samples"] - g["mmd"]["oracle"]) < 0.02 and g["1nna"]["samples"] < 0.9
    save_file({"images": torch.rand(120, 28, 28, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "noise.safetensors"))
    noise = run_evaluate(None, tmp_path / "n", images_path=tmp_path / "noise.safetensors", **EVAL_SPLITS,
                         data_root=data_root, device="cpu", quiet=True)["groups"]["unconditional"]
    assert noise["1nna"]["samples"] > 0.95 and noise["mmd"]["samples"] > g["mmd"]["samples"] + 0.1


@pytest.mark.parametrize("tensors, pattern", [
    ({"pics": torch.rand(4, 28, 28)}, "no 'images' tensor \\(found: pics\\)"),
    ({"images": torch.rand(4, 28, 28) * 2}, "clamp \\(or rescale\\) them to \\[0, 1\\]"),
    ({"images": torch.full((4, 28, 28), float("nan"))}, "3136 NaN/inf values"),
    ({"images": torch.zeros(4, 28, 28, dtype=torch.int32)}, "store float in \\[0, 1\\] or uint8"),
    ({"images": torch.rand(4, 784)}, "must be \\[N, H, W\\] or \\[N, H, W, C\\]"),
    ({"images": torch.rand(4, 28, 28), "labels": torch.zeros(3, dtype=torch.long)}, "labels must be integers"),
    ({"images": torch.rand(4, 28, 28), "labels": torch.zeros(4)}, "labels must be integers"),
    ({"images": torch.rand(4, 28, 28), "labels": torch.tensor([0, 1, 10, -1])}, "sample labels must be -1"),
    ({"images": torch.rand(4, 16, 16)}, "holds \\(16, 16\\) images but"),
])
def test_images_file_bad_input(tmp_path, data_root, tensors, pattern):
    from safetensors.torch import save_file

    path = tmp_path / "images.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NfgenError, match=pattern):
        run_evaluate(None, tmp_path / "e", images_path=path, ref_split="mnist:test[:20]",
                     train_split="mnist:test[20:40]", data_root=data_root, device="cpu", quiet=True)
    assert not (tmp_path / "e").exists()


def test_images_file_missing_or_corrupt(tmp_path):
    with pytest.raises(NfgenError, match="images file not found.*safetensors.torch.save_file"):
        load_images(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NfgenError, match="not a readable safetensors file"):
        load_images(tmp_path / "bad.safetensors")
