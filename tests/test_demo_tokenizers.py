"""benchmarks.demo_tokenizers and benchmarks.demo_timing at the tiny demo's sizes: every row runs and is written."""
import json

from benchmarks import demo_tokenizers


def test_rows_for_each_template_and_tokenizer(tiny_demo, data_root, tmp_path):
    results = tmp_path / "rows.json"
    assert demo_tokenizers.main(["--templates", "random,meta", "--variants", "none:16,mean:8", "--run-dir",
                                 str(tmp_path / "runs"), "--data-root", str(data_root),
                                 "--results", str(results)]) == 0
    out = json.loads(results.read_text())
    rows = out["rows"]
    assert [(r["template"], r["variant"]) for r in rows] == [("random", "none:16"), ("random", "mean:8"),
                                                            ("meta", "none:16"), ("meta", "mean:8")]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and all(0 <= r[m] <= 1 for m in ("mmd", "cov", "1nna"))
        assert r["detok_psnr"] <= r["fields_psnr"] + 0.5
    # its rows keep the sampling they were measured with, not the demo's
    assert out["demo"]["sample"] == {"temperature": 0.8, "top_k": 3}
    assert out["demo"]["template"]["hidden"] == 8 and out["demo"]["template"]["outer"] == 3
    # the meta rows fit from the demo's template; the random rows from the seeded draw
    assert (tmp_path / "runs" / "template.safetensors").is_file()


def test_demo_timing_records_every_stage(tiny_demo, data_root, tmp_path):
    from benchmarks import demo_timing

    results = tmp_path / "timing.json"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stale.txt").write_text("from an earlier run")  # the run folder is emptied first
    assert demo_timing.main(["--run-dir", str(tmp_path / "run"), "--data-root", str(data_root),
                             "--results", str(results)]) == 0
    out = json.loads(results.read_text())
    stages = out["demo"]["seconds"]
    assert set(stages) == {"classifier", "template", "fit", "tokenize", "train", "generate", "evaluate"}
    assert all(v >= 0 for v in stages.values()) and out["wall_seconds"] >= sum(stages.values()) - 0.5
    assert out["command"].startswith("python -m benchmarks.demo_timing") and out["device_type"] == "cpu"
    assert not (tmp_path / "run" / "stale.txt").exists()
