"""torch.distributed plumbing for `torchrun … -m nfgen …`: process group setup and work splitting.

nfgen launches nothing itself: torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT) starts the processes, and every helper here is a no-op in a plain single process,
so one code path serves both.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nfgen.io import NfgenError


def init_from_env(device: str | torch.device = "auto") -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); False when not under torchrun.

    `device` is the stage's --device: "cpu" runs gloo even where GPUs exist (so a CPU run may start more
    processes than there are GPUs), "auto" and "cuda" take NCCL where CUDA is available. Idempotent: the fit and
    train stages both call it. Under CUDA each process takes the GPU LOCAL_RANK, so `pick_device("auto")` →
    "cuda" means this rank's own GPU.
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and (device == "auto" or torch.device(device).type == "cuda")
    if use_cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise NfgenError(f"torchrun started more processes on this machine than its {gpus} GPU(s) (local rank "
                             f"{local_rank}); pass --nproc-per-node {gpus} or less, or --device cpu")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (a copy); `x` itself when not distributed."""
    if not dist.is_initialized():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def shard_range(n: int, rank_: int, world: int) -> range:
    """The contiguous slice of range(n) that rank `rank_` of `world` owns; sizes differ by at most one."""
    if world < 1 or not 0 <= rank_ < world or n < 0:
        raise ValueError(f"shard_range: need 0 <= rank < world and n >= 0, got n={n} rank={rank_} world={world}")
    base, extra = divmod(n, world)
    lo = rank_ * base + min(rank_, extra)
    return range(lo, lo + base + (rank_ < extra))


def _comm_device() -> torch.device:
    """Where a collective must see its tensors: this rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_min(value: int) -> int:
    """The smallest `value` over ranks (e.g. a batch size every rank can hold); `value` when not distributed."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's `x` [counts[rank], ...] concatenated in rank order, on every rank (on x's device).

    `x` itself when not distributed. Ranks may hold different numbers of rows (the collective pads them to
    the largest count), but every rank must pass the same `counts` and the same trailing shape and dtype.
    """
    if not dist.is_initialized():
        return x
    if x.shape[0] != counts[rank()]:
        raise ValueError(f"all_gather_rows: rank {rank()} holds {x.shape[0]} rows, counts say {counts[rank()]}")
    if max(counts) == 0:
        return x
    dev = _comm_device()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[:x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


__all__ = ["init_from_env", "rank", "world_size", "is_main", "barrier", "all_reduce_mean", "all_reduce_min",
           "all_gather_rows", "shard_range"]
