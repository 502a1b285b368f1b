"""The generation and decode-attention benchmarks run end to end at toy sizes and write what the README quotes
(their timings mean nothing here; the point is that a GPU session does not lose a run to a broken path)."""
import json

import pytest

from nfkernels._ext import has_op

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_generate_rows_and_peer_variants(tmp_path):
    from benchmarks import bench_generate

    out = tmp_path / "g.json"
    bench_generate.main(["--quick", "--batches", "2", "--repeats", "1", "--peer-sdpa", "both", "--total-fields", "5",
                         "--total-batches", "3", "--total-attention", "auto,sdpa", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"]
    totals = [r for r in res["rows"] if r["method"] == "nfgen-total"]
    assert [(r["batch_is_default"], r["attention"]) for r in totals] == [(True, "auto"), (True, "sdpa"),
                                                                          (False, "auto")]
    assert {r["fields"] for r in totals} == {5}
    rows = {r["method"]: r for r in res["rows"] if r["method"] != "nfgen-total"}
    assert set(rows) == {"recompute", "recompute[no-cudnn]", "eager-kv", "eager-kv[no-cudnn]", "nfgen", "nfgen-sdpa"}
    nfgen = rows["nfgen"]
    for peer in ("recompute", "eager-kv"):  # the ratio is against the faster variant of the peer
        against = nfgen[f"x_{peer}_against"]
        assert against.split("[")[0] == peer
        slower = {peer, f"{peer}[no-cudnn]"} - {against}
        assert rows[against]["tokens_per_s"] >= rows[slower.pop()]["tokens_per_s"]
        assert nfgen[f"x_{peer}"] == pytest.approx(nfgen["tokens_per_s"] / rows[against]["tokens_per_s"])
    assert rows["nfgen-sdpa"]["x_nfgen"] > 0
    assert all(k for k in res["sdpa_kernels"]["2"].values())  # the profiler saw an SDPA kernel for both shapes


def test_bench_generate_survives_a_failing_profiler(tmp_path, monkeypatch):
    from benchmarks import bench_generate

    def broken(*args, **kwargs):
        raise RuntimeError("kineto is not available\nsecond line")

    monkeypatch.setattr(bench_generate, "sdpa_ops", broken)
    out = tmp_path / "g.json"
    bench_generate.main(["--quick", "--batches", "2", "--repeats", "1", "--peer-sdpa", "default",
                         "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"] and {r["method"] for r in res["rows"]} >= {"recompute", "eager-kv", "nfgen"}
    assert res["sdpa_kernels"] == {"2": {"error": "profiling failed: RuntimeError: kineto is not available"}}


def test_bench_generate_keeps_its_rows_when_an_opt_in_attention_fails(tmp_path, monkeypatch):
    # on CUDA the opt-in variant is Triton's decode attention (nfgen-triton, --total-attention triton); here SDPA
    # stands in for it: it fails, gets a row that says why, and every other row is still measured
    from benchmarks import bench_generate

    real = bench_generate.nfgen_generate

    def generate(model, vocab, batch, length, device, n_batches=1, attention="auto", n_fields=None):
        if attention == "sdpa":
            raise RuntimeError("graph capture failed")
        return real(model, vocab, batch, length, device, n_batches, attention, n_fields)

    monkeypatch.setattr(bench_generate, "nfgen_generate", generate)
    out = tmp_path / "g.json"
    bench_generate.main(["--quick", "--batches", "2", "--repeats", "1", "--peer-sdpa", "default", "--total-fields", "3",
                         "--total-batches", "3", "--total-attention", "auto,sdpa", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["complete"]
    failed = [(r["method"], r["attention"], r["error"]) for r in res["rows"] if "error" in r]
    assert failed == [("nfgen-total", "sdpa", "RuntimeError: graph capture failed"),
                      ("nfgen-sdpa", "sdpa", "RuntimeError: graph capture failed")]
    measured = {(r["method"], r.get("attention")) for r in res["rows"] if "error" not in r}
    assert measured == {("nfgen-total", "auto"), ("recompute", None), ("eager-kv", None), ("nfgen", None)}
    assert all(r["seconds"] > 0 for r in res["rows"] if "error" not in r)


@pytest.mark.skipif(not has_op("decode_attention"), reason="needs nfkernels._C (the C++ build)")
def test_bench_decode_attention_cpu(tmp_path):
    from benchmarks import bench_decode_attention

    out = tmp_path / "d.json"
    bench_decode_attention.main(["--device", "cpu", "--batches", "2", "--kv-lens", "9,40", "--n-head", "4",
                                 "--n-kv-head", "2", "--head-dim", "16", "--iters", "1", "--repeats", "1",
                                 "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["dtype"] == "float32" and res["shape"]["n_kv_head"] == 2
    assert {(r["contender"], r["kv_len"]) for r in res["rows"]} == {(c, n) for c in ("sdpa-exact", "cpp")
                                                                    for n in (9, 40)}
    assert all(r["max_abs_err"] < 1e-5 for r in res["rows"])
    assert sum("speedup_vs_sdpa-exact" in r for r in res["rows"]) == 2
    with pytest.raises(SystemExit):  # a head count that the KV heads do not divide: argparse's one-line error
        bench_decode_attention.main(["--device", "cpu", "--n-head", "4", "--n-kv-head", "3"])
