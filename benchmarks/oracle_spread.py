"""How often a perfect generator meets issue 8's distance goals: the seed noise of MMD / COV / 1-NNA.

The goals compare the generated set's mean over 3 seeds with the oracle's (as many training images, drawn
afresh each seed, against the same references): 1-NNA ≤ oracle + 0.03, COV ≥ oracle − 0.03, MMD ≤ 1.05 × oracle.
A perfect class-conditional generator draws real digits with the references' class counts; this stands real
training images in for it (a class-stratified draw, as the main rows' samples are) and, per trial, scores 3 such
draws and 3 oracle draws exactly as `nfgen.metrics.evaluate` does (`distance_metrics` against every reference).
It reports each metric's spread over single draws and the share of trials in which the perfect generator passes
each goal, for each held-out split given: the small config's 200 references and the full config's 2000.

A generator of fields can do no better than reproduce the fitted training fields. `--fields NAME=FILE,…` adds, per
fields file fitted to the training split, that perfect field generator: each draw's images rendered from their
fitted (or, for a tokens file, de-tokenized) fields instead of the images themselves, scored the same way, with
its gap to the real images of the same draw (paired, so the draw's noise cancels) and its pass rates.

    python -m benchmarks.oracle_spread [--heldout mnist:test[8000:8200],mnist:test[8000:]] [--trials 200,30]
        [--fields fitted=RUN/fields.safetensors,tokens=RUN/tokens.safetensors]
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


def field_renders(spec: str, train, device) -> torch.Tensor:
    """The training split's images as a fields file (or a tokens file, de-tokenized) renders them: [N, H, W(, C)]."""
    from nfgen.fields import load_fields, render_fields
    from nfgen.io import read_header
    from nfgen.tokenizer import load_tokens

    header, _ = read_header(spec)
    if not header:  # missing, truncated, not safetensors: one line, as the CLI says it
        raise SystemExit(f"cannot read {spec} as an nfgen artifact; pass a fields or tokens file")
    if header.get("nfgen_kind") == "tokens":
        ts = load_tokens(spec)
        weights, labels, meta, fields_spec, shape = (ts.tokenizer.decode(ts.tokens, ts.labels), ts.labels, ts.meta,
                                                     ts.spec, ts.image_shape)
    else:
        fields = load_fields(spec)
        weights, labels, meta, fields_spec, shape = (fields.weights, fields.labels, fields.meta, fields.spec,
                                                     fields.image_shape)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if source.get("split") != train.spec or source.get("indices") != train.indices.tolist() \
            or not torch.equal(labels, train.labels):
        raise SystemExit(f"{spec} was not fitted to {train.spec} (its source: {source.get('split')}); pass fields "
                         "of the training split")
    return render_fields(weights, fields_spec, shape, device=device)


def spread(train, heldout, trials: int, device, seed: int = 0, fields: dict | None = None) -> dict:
    """`fields`: name → renders of the training split (field_renders), each a perfect field generator."""
    fields = fields or {}
    refs = heldout.images.to(device)
    n = len(heldout)
    counts = {int(c): int(k) for c, k in zip(*heldout.labels.unique(return_counts=True))}
    sources = {"perfect": train.images.to(device), **fields}
    gen = make_generator(seed)
    single = {name: {m: [] for m in GOALS} for name in (*sources, "oracle")}
    passed = {name: {m: 0 for m in GOALS} for name in sources}
    gaps = {name: {m: [] for m in GOALS} for name in sources}
    t0 = time.perf_counter()
    for _ in progress(range(trials), desc=f"{heldout.spec}", unit="trial"):
        got = {name: {m: [] for m in GOALS} for name in single}
        for _ in range(SEEDS):
            perfect = stratified(train.labels, counts, gen).to(device)
            oracle = torch.randperm(len(train), generator=gen)[:n].to(device)
            draws = [(name, images[perfect]) for name, images in sources.items()]
            for name, images in draws + [("oracle", sources["perfect"][oracle])]:
                d = distance_metrics(images, refs)
                for m in GOALS:
                    got[name][m].append(d[m])
                    single[name][m].append(d[m])
        for name in sources:
            for m, ok in GOALS.items():
                s, o = statistics.mean(got[name][m]), statistics.mean(got["oracle"][m])
                passed[name][m] += bool(ok(s, o))
                gaps[name][m].append(s - o)

    def stats(values):
        return {"mean": statistics.mean(values), "std": statistics.stdev(values)}

    row = {
        "heldout_split": heldout.spec, "train_split": train.spec, "n": n, "trials": trials, "seeds_per_trial": SEEDS,
        "single_draw": {m: stats(single["perfect"][m] + single["oracle"][m]) for m in GOALS},
        "perfect_minus_oracle_3_seed_means": {m: stats(v) for m, v in gaps["perfect"].items()},
        "perfect_generator_passes": {m: passed["perfect"][m] / trials for m in GOALS},
    }
    if fields:
        # the same draws as images and as fields: their difference is the rendering's cost, free of the draw's noise
        row["field_generators"] = {name: {
            "single_draw": {m: stats(single[name][m]) for m in GOALS},
            "minus_images_same_draw": {m: stats([a - b for a, b in zip(single[name][m], single["perfect"][m])])
                                       for m in GOALS},
            "minus_oracle_3_seed_means": {m: stats(v) for m, v in gaps[name].items()},
            "passes": {m: passed[name][m] / trials for m in GOALS},
        } for name in fields}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="mnist:test[:8000]")
    ap.add_argument("--heldout", default="mnist:test[8000:8200],mnist:test[8000:]", help="comma list of splits")
    ap.add_argument("--trials", default="200,30", help="trials per held-out split (comma list, same order)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--fields", default="", help="NAME=FILE,…: fields (or tokens) files fitted to --train, each "
                    "scored as a perfect field generator")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    splits = [s for s in args.heldout.split(",") if s]
    trials = [int(t) for t in args.trials.split(",")]
    if len(trials) != len(splits) or min(trials) < 2:
        ap.error(f"--trials needs one count ≥ 2 per held-out split ({len(splits)}), got {args.trials!r}")
    named = [item.split("=", 1) for item in args.fields.split(",") if item]
    if any(len(item) != 2 or not all(item) or item[0] in ("perfect", "oracle") for item in named):
        ap.error(f"--fields takes NAME=FILE pairs (names other than perfect and oracle), got {args.fields!r}")
    train = load_split(args.train, args.data_root)
    fields = {name: field_renders(path, train, device) for name, path in named}
    rows = [spread(train, load_split(s, args.data_root), t, device, fields=fields) for s, t in zip(splits, trials)]
    for r in rows:
        print(f"{r['heldout_split']} (n = {r['n']}, {r['trials']} trials): single draw "
              + ", ".join(f"{m} {v['mean']:.4f} ± {v['std']:.4f}" for m, v in r["single_draw"].items())
              + "; a perfect generator passes "
              + ", ".join(f"{m} {p:.0%}" for m, p in r["perfect_generator_passes"].items()))
        for name, f in r.get("field_generators", {}).items():
            print(f"  {name}: minus the same draw's images "
                  + ", ".join(f"{m} {v['mean']:+.4f} ± {v['std']:.4f}" for m, v in f["minus_images_same_draw"].items())
                  + "; passes " + ", ".join(f"{m} {p:.0%}" for m, p in f["passes"].items()))
    if args.results:
        write_result(args.results, {**environment("benchmarks.oracle_spread", device), "fields": dict(named),
                                    "rows": rows})
    if args.results:
        write_result(args.results, {**environment("benchmarks.oracle_spread", device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
