"""What every benchmark result records about where and how it ran."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def git_commit(repo: str | None = None) -> str | None:
    """HEAD of the checkout, "+dirty" when tracked files differ from it (the numbers are then not HEAD's);
    NFGEN_COMMIT where the tree was copied without .git (the GPU machine)."""
    if os.environ.get("NFGEN_COMMIT"):
        return os.environ["NFGEN_COMMIT"]
    here = repo or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(module: str, device: torch.device | str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
            "triton": triton_version, "commit": git_commit(),
            "command": " ".join(["python", "-m", module, *sys.argv[1:]])}


def write_result(path: str, result: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
