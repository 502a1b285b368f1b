"""Time `nfgen demo` end to end: the per-stage seconds of README's demo table, with the machine and the command.

Runs the demo in a fresh run folder (every stage from scratch, as a user's first run) and writes the demo's own
summary (per-stage seconds, metrics) beside the wall clock of the whole call and the environment.

    python -m benchmarks.demo_timing [--run-dir /tmp/demo-timing] [--results benchmarks/results/demo-timing-cpu.json]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks._env import environment, write_result
from nfgen.common import pick_device
from nfgen.demo import run_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo-timing", help="emptied first: the demo runs from scratch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_demo(run, data_root=args.data_root, device=args.device, quiet=True)
    wall = time.perf_counter() - t0
    stages = " | ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    print(f"demo: {stages} | stages {summary['total_seconds']:.0f} s, wall {wall:.0f} s (without interpreter start-up)")
    if args.results:
        dev = pick_device(args.device)
        write_result(args.results, {**environment("benchmarks.demo_timing", dev), "wall_seconds": round(wall, 1),
                                    "demo": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
