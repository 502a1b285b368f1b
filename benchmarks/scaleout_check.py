"""Issue 7 on one machine: torchrun at world size 1 joins the process group (NCCL on a GPU, gloo on CPU), a
torchrun fit equals a plain fit, and a torchrun train SIGKILLed after a checkpoint and rerun with --resume
follows the uninterrupted run's loss curve. Records how closely (the GPU tolerance README states).

    python -m benchmarks.scaleout_check --device cuda [--out benchmarks/results/scaleout-<device>.json]

Every run goes through the CLI (`torchrun --standalone --nproc-per-node 1 -m nfgen …`) in a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._env import environment, write_result

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]


def run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def probe() -> None:
    """Under torchrun: join the group as nfgen does, all-reduce once, print what was used."""
    from nfgen import distributed

    assert distributed.init_from_env(), "not under torchrun"
    import torch.distributed as dist

    dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    mean = float(distributed.all_reduce_mean(torch.full((4,), 3.0, device=dev)).sum())
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None
    print(json.dumps({"backend": dist.get_backend(), "world_size": distributed.world_size(),
                      "all_reduce_mean_ok": mean == 12.0, "nccl": nccl}))
    dist.destroy_process_group()


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a unique run directory): torchrun and its worker."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace") and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def killed_then_resumed(train_args: list[str], run_dir: Path, cwd: Path, total_steps: int) -> dict:
    """Start the train, SIGKILL every process of it once the first checkpoint exists, rerun with --resume."""
    state = run_dir / "train_state.safetensors"
    cmd = torchrun("-m", "nfgen", *train_args, "--run-dir", str(run_dir))
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if proc.poll() is not None:
        sys.exit("the train ended before its first checkpoint: " + proc.stderr.read().decode()[-3000:])
    for pid in _pids_mentioning(str(run_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30  # the worker is not our child: wait until /proc no longer lists it
    while _pids_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.01)
    from nfgen.io import load_artifact

    _, meta = load_artifact(state, "train_state")
    killed_at = meta["step"]
    if killed_at >= total_steps:
        sys.exit(f"the kill came too late (step {killed_at} of {total_steps}); raise --steps")
    seconds = run(cmd + ["--resume"], cwd)
    return {"killed_after_checkpoint_step": killed_at, "resume_seconds": round(seconds, 2)}


def history(run_dir: Path) -> list[dict]:
    from nfgen.io import load_artifact

    _, meta = load_artifact(run_dir / "model.safetensors", "model")
    return meta["history"]


def curve_gap(a: list[dict], b: list[dict]) -> dict:
    assert [h["step"] for h in a] == [h["step"] for h in b], "the two runs logged different steps"
    out = {"identical": a == b}
    for key in ("train_loss", "val_loss"):
        x = torch.tensor([h[key] for h in a], dtype=torch.float64)
        y = torch.tensor([h[key] for h in b], dtype=torch.float64)
        out[f"max_abs_{key}_diff"] = float((x - y).abs().max())
        out[f"max_rel_{key}_diff"] = float(((x - y).abs() / x.abs()).max())
    return out


def weights_gap(a: Path, b: Path) -> dict:
    from nfgen.io import load_artifact

    wa, _ = load_artifact(a, "model")
    wb, _ = load_artifact(b, "model")
    return {"weights_identical": all(torch.equal(wa[k], wb[k]) for k in wa),
            "max_abs_weight_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--split", default="mnist:test[:1024]")
    ap.add_argument("--steps", type=int, default=400, help="train steps (the kill lands after the first checkpoint)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return probe()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here; use --device cpu")
    tag = torch.cuda.get_device_name().split()[1].lower() if args.device == "cuda" else "cpu"
    out = args.out or str(ROOT / "benchmarks" / "results" / f"scaleout-{tag}.json")
    result = {**environment("benchmarks.scaleout_check", args.device), "split": args.split}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.device == "cpu":  # gloo, and no GPU touched, even on a GPU machine
            ENV["CUDA_VISIBLE_DEVICES"] = ""
        probe_out = subprocess.run(torchrun(str(Path(__file__).resolve()), "--probe"), cwd=work, env=ENV,
                                   capture_output=True, text=True)
        if probe_out.returncode:
            sys.exit("probe failed:\n" + probe_out.stderr[-3000:])
        result["process_group"] = json.loads(probe_out.stdout.strip().splitlines()[-1])
        print("process group:", result["process_group"])

        # fit: torchrun (4 shards) against one plain process
        fit = ["fit", "--split", args.split, "--steps", str(args.fit_steps), "--lr", "1e-3", "--chunk", "256",
               "--device", args.device, "--quiet"]
        t_plain = run([sys.executable, "-m", "nfgen", *fit, "--out", str(work / "plain.safetensors")], work)
        t_tr = run(torchrun("-m", "nfgen", *fit, "--out", str(work / "torchrun.safetensors")), work)
        from nfgen.fields import load_fields

        fa, fb = load_fields(work / "plain.safetensors"), load_fields(work / "torchrun.safetensors")
        result["fit"] = {"fields": int(fa.weights.shape[0]), "identical": bool(torch.equal(fa.weights, fb.weights)),
                         "max_abs_weight_diff": float((fa.weights - fb.weights).abs().max()),
                         "plain_seconds": round(t_plain, 2), "torchrun_seconds": round(t_tr, 2)}
        print("fit:", result["fit"])

        run([sys.executable, "-m", "nfgen", "tokenize", "--fields", str(work / "plain.safetensors"),
             "--out", str(work / "tokens.safetensors"), "--device", args.device, "--quiet"], work)
        train = ["train", "--tokens", str(work / "tokens.safetensors"), "--n-layer", "2", "--n-head", "4",
                 "--n-embd", "128", "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", "1e-3",
                 "--warmup", str(max(1, args.steps // 20)), "--eval-every", str(max(1, args.steps // 40)),
                 "--checkpoint-every", str(max(1, args.steps // 8)), "--device", args.device, "--quiet"]
        uninterrupted = work / "uninterrupted"
        t_u = run(torchrun("-m", "nfgen", *train, "--run-dir", str(uninterrupted)), work)
        resumed = work / "resumed"
        result["train"] = {"steps": args.steps, "uninterrupted_seconds": round(t_u, 2),
                           **killed_then_resumed(train, resumed, work, args.steps)}
        result["train"]["resumed_vs_uninterrupted"] = {**curve_gap(history(uninterrupted), history(resumed)),
                                                       **weights_gap(uninterrupted / "model.safetensors",
                                                                     resumed / "model.safetensors")}
        plain = work / "plain"
        run([sys.executable, "-m", "nfgen", *train, "--run-dir", str(plain)], work)
        result["train"]["plain_vs_torchrun"] = curve_gap(history(plain), history(uninterrupted))
        print("train:", json.dumps(result["train"], indent=1))
    write_result(out, result)


if __name__ == "__main__":
    main()
