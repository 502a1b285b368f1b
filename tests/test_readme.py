"""README's Python examples run as written (with a tiny run folder in place of `runs/demo`)."""
import json
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_python_api_example_fits_renders_and_scores(data_root, capsys):  # conftest exports NFGEN_DATA
    first = python_blocks("Python API")[0]
    ns = {}
    exec(compile(first, "README.md", "exec"), ns)
    fit, images = ns["fit"], ns["images"]
    assert fit.weights.shape == (64, 1185) and fit.psnr.mean() > 25
    assert ns["w0"].shape == (64, 32, 2) and ns["b0"].shape == (64, 32) and len(ns["rest"]) == 2
    assert ns["zoomed"].shape == (4, 56, 56)
    assert images.shape == (64, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert ns["ssim"].shape == (8, 8)
    # what the comments claim: the fits are memorised copies of their training images
    assert ns["memorisation"](images, ns["train"].images)["memorised_fraction"] >= 0.9
    assert "'1nna'" in capsys.readouterr().out


def test_python_api_example_loads_a_run(tmp_path, data_root):
    from nfgen.cli import main

    run = tmp_path / "run"
    assert main(["fit", "--run", str(run), "--split", "mnist:test[:20]", "--hidden", "8", "--hidden-layers", "1",
                 "--steps", "20", "--data-root", str(data_root), "--quiet"]) == 0
    assert main(["tokenize", "--run", str(run), "--codebook-size", "16", "--iters", "3", "--quiet"]) == 0
    assert main(["train", "--run", str(run), "--steps", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "8", "--quiet"]) == 0
    second = python_blocks("Python API")[1]
    assert "runs/demo" in second
    ns = {}
    exec(compile(second.replace("runs/demo", str(run)), "README.md", "exec"), ns)
    fields, ts = ns["fields"], ns["ts"]
    assert ns["weights"].shape == (4, fields.spec.num_params) == (4, 33)
    assert torch.allclose(ns["weights"], fields.weights[:4], atol=0.1)  # 16 codes: close, not exact
    assert set(ns["arrays"]) == {"weights", "labels", "psnr"}
    assert (ns["arrays"]["weights"] == fields.weights.numpy()).all()
    assert ns["tokens"].shape == (20, 33) and ns["images"].shape == (20, 28, 28)
    assert ns["gen"].n_classes == 10 and torch.isfinite(ns["drawn"]).all()
    layout = json.loads(ns["layout"])["param_layout"]
    assert [e["shape"] for e in layout] == [[8, 2], [8], [1, 8], [1]]
