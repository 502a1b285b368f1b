"""benchmarks.bench_fit: every contender fits the same recipe, and a quick run records every row."""
import pytest
import torch

from benchmarks.bench_fit import ONE_AT_A_TIME, main, make_problem, nfgen_fit, one_at_a_time, peer_baddbmm, peer_vmap
from nfkernels import SirenSpec


@pytest.mark.parametrize("peer", [peer_baddbmm, peer_vmap, one_at_a_time])
def test_every_contender_takes_the_same_steps(peer):
    spec = SirenSpec(hidden=8, hidden_layers=2)
    coords, target, template = make_problem(5, torch.device("cpu"), spec)
    ours = nfgen_fit(spec, coords, target, template, backend="torch", steps_per_call=2)
    ours(3)
    run = peer(spec, coords, target, template)
    run(3)
    got = run.weights()
    assert got.shape == (getattr(run, "fields", 5), spec.num_params)
    assert not torch.equal(got, template.expand_as(got))  # it moved
    torch.testing.assert_close(got, ours.weights()[:got.shape[0]], rtol=0, atol=5e-6)


def test_quick_run_records_every_contender(capsys):
    rows = main(["--quick", "--no-compile", "--n", "20"])
    by_name = {r["contender"]: r for r in rows}
    assert set(by_name) == {"baddbmm", "vmap", ONE_AT_A_TIME, "nfgen[cpp]"}
    alone = by_name[ONE_AT_A_TIME]
    assert alone["fields_timed"] == 16 and alone["field_steps_per_s"] > 0
    best = max(by_name["baddbmm"]["field_steps_per_s"], by_name["vmap"]["field_steps_per_s"])
    ours = by_name["nfgen[cpp]"]
    assert ours["ratio_vs_best_peer"] == pytest.approx(ours["field_steps_per_s"] / best)  # the peers of issue 3
    assert ours["ratio_vs_one_at_a_time"] == pytest.approx(ours["field_steps_per_s"] / alone["field_steps_per_s"])
    assert "/ one at a time:" in capsys.readouterr().out
