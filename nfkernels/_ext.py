"""Loading the compiled ops and choosing a backend.

Every op in nfkernels has up to four implementations: ``torch`` (the pure-torch reference,
always there), ``cpp`` (nfkernels._C, CPU), ``cuda`` (nfkernels._C, CUDA) and ``triton``.
``resolve_backend`` turns the user's ``backend=`` into one of those for a given device.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    from nfkernels import _C  # noqa: F401  (registers torch.ops.nfkernels.*)

    HAS_EXT = True
except ImportError as exc:  # no compiler at install time, or a stale build
    HAS_EXT = False
    warnings.warn(
        f"nfkernels._C is not built ({exc}); using the pure-torch reference ops. "
        "Reinstall with `pip install -e . --no-build-isolation` to build the fast CPU/CUDA ops.",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_op(name: str) -> bool:
    return HAS_EXT and hasattr(torch.ops.nfkernels, name)


def has_cuda_kernel(name: str) -> bool:
    """Whether the compiled op `name` has a CUDA implementation registered."""
    if not has_op(name) or not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nfkernels::{name}", "CUDA")


def resolve_backend(backend: str, device: torch.device, op: str, *, cpp: bool, cuda: bool, triton: bool,
                    prefer_triton_on_cuda: bool = True) -> str:
    """Pick the implementation of `op` for tensors on `device`.

    `cpp`/`cuda`/`triton` say which implementations this op has. ``auto`` takes the fastest
    available for the device; an explicit choice that cannot run raises ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    avail = {"torch": True}
    avail["cpp"] = cpp and not on_cuda and has_op(op)
    avail["cuda"] = cuda and on_cuda and has_cuda_kernel(op)
    avail["triton"] = triton and HAS_TRITON and (on_cuda or triton_interpret())
    if backend == "auto":
        order = (["triton", "cuda"] if prefer_triton_on_cuda else ["cuda", "triton"]) if on_cuda else ["cpp"]
        for b in order:
            if avail[b]:
                return b
        return "torch"
    if not avail[backend]:
        why = {
            "cpp": "nfkernels._C is not built or this op has no C++ version, or the tensors are on CUDA",
            "cuda": "the tensors are not on a CUDA device or nfkernels._C was built without CUDA",
            "triton": "Triton is not installed, or the tensors are on CPU without TRITON_INTERPRET=1",
        }.get(backend, "")
        raise ValueError(f"backend {backend!r} is not available for {op} on {device.type}: {why}")
    return backend
