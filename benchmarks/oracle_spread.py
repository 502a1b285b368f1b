"""How often a perfect generator meets issue 8's distance goals: the seed noise of MMD / COV / 1-NNA.

The goals compare the generated set's mean over 3 seeds with the oracle's (as many training images, drawn
afresh each seed, against the same references): 1-NNA ≤ oracle + 0.03, COV ≥ oracle − 0.03, MMD ≤ 1.05 × oracle.
A perfect class-conditional generator draws real digits with the references' class counts; this stands real
training images in for it (a class-stratified draw, as the main rows' samples are) and, per trial, scores 3 such
draws and 3 oracle draws exactly as `nfgen.metrics.evaluate` does (`distance_metrics` against every reference).
It reports each metric's spread over single draws and the share of trials in which the perfect generator passes
each goal, for each held-out split given: the small config's 200 references and the full config's 2000.

    python -m benchmarks.oracle_spread [--heldout mnist:test[8000:8200],mnist:test[8000:]] [--trials 200,30]
        [--results benchmarks/results/oracle-spread-cpu.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._env import environment, write_result
from nfgen.common import make_generator, pick_device, progress
from nfgen.data import load_split
from nfgen.metrics import distance_metrics

SEEDS = 3  # generation seeds per main row (QualityConfig's default)
GOALS = {"1nna": lambda s, o: s <= o + 0.03, "cov": lambda s, o: s >= o - 0.03, "mmd": lambda s, o: s <= 1.05 * o}


def stratified(labels: torch.Tensor, counts: dict[int, int], gen: torch.Generator) -> torch.Tensor:
    """Indices of `counts[c]` distinct images of each class c, drawn at random."""
    picks = []
    for c, n in counts.items():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(picks)


def spread(train, heldout, trials: int, device, seed: int = 0) -> dict:
    refs = heldout.images.to(device)
    n = len(heldout)
    counts = {int(c): int(k) for c, k in zip(*heldout.labels.unique(return_counts=True))}
    images = train.images.to(device)
    gen = make_generator(seed)
    single = {m: [] for m in GOALS}
    passed = {m: 0 for m in GOALS}
    gaps = {m: [] for m in GOALS}
    t0 = time.perf_counter()
    for _ in progress(range(trials), desc=f"{heldout.spec}", unit="trial"):
        got = {"perfect": {m: [] for m in GOALS}, "oracle": {m: [] for m in GOALS}}
        for _ in range(SEEDS):
            perfect = stratified(train.labels, counts, gen)
            oracle = torch.randperm(len(train), generator=gen)[:n]
            for name, idx in (("perfect", perfect), ("oracle", oracle)):
                d = distance_metrics(images[idx.to(device)], refs)
                for m in GOALS:
                    got[name][m].append(d[m])
                    single[m].append(d[m])
        for m, ok in GOALS.items():
            s, o = statistics.mean(got["perfect"][m]), statistics.mean(got["oracle"][m])
            passed[m] += bool(ok(s, o))
            gaps[m].append(s - o)
    return {
        "heldout_split": heldout.spec, "train_split": train.spec, "n": n, "trials": trials, "seeds_per_trial": SEEDS,
        "single_draw": {m: {"mean": statistics.mean(v), "std": statistics.stdev(v)} for m, v in single.items()},
        "perfect_minus_oracle_3_seed_means": {m: {"mean": statistics.mean(v), "std": statistics.stdev(v)}
                                              for m, v in gaps.items()},
        "perfect_generator_passes": {m: passed[m] / trials for m in GOALS},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="mnist:test[:8000]")
    ap.add_argument("--heldout", default="mnist:test[8000:8200],mnist:test[8000:]", help="comma list of splits")
    ap.add_argument("--trials", default="200,30", help="trials per held-out split (comma list, same order)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    splits = [s for s in args.heldout.split(",") if s]
    trials = [int(t) for t in args.trials.split(",")]
    if len(trials) != len(splits) or min(trials) < 2:
        ap.error(f"--trials needs one count ≥ 2 per held-out split ({len(splits)}), got {args.trials!r}")
    train = load_split(args.train, args.data_root)
    rows = [spread(train, load_split(s, args.data_root), t, device) for s, t in zip(splits, trials)]
    for r in rows:
        print(f"{r['heldout_split']} (n = {r['n']}, {r['trials']} trials): single draw "
              + ", ".join(f"{m} {v['mean']:.4f} ± {v['std']:.4f}" for m, v in r["single_draw"].items())
              + "; a perfect generator passes "
              + ", ".join(f"{m} {p:.0%}" for m, p in r["perfect_generator_passes"].items()))
    if args.results:
        write_result(args.results, {**environment("benchmarks.oracle_spread", device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
