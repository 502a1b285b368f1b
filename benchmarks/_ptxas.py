"""Resource usage of a Triton kernel built for a CUDA target, no GPU needed (ptxas via triton.compile, then
the cuobjdump that ships with Triton)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for(kernel_fn, signature: dict, constexprs: dict, arch: int = 90, **options):
    """`kernel_fn` compiled for sm_<arch> with `options` (num_warps, num_stages): .asm holds "ttgir", "cubin"…"""
    if not hasattr(kernel_fn, "cache_key"):  # under TRITON_INTERPRET=1 (the tests) @jit made an interpreter wrapper
        kernel_fn = triton.runtime.jit.JITFunction(kernel_fn.fn)
    src = ASTSource(kernel_fn, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def dot_shapes(ttgir: str) -> list[tuple[int, int, int]]:
    """(M, K, N) of every tt.dot in a TTGIR listing, including those Triton made from a sum of a broadcast product."""
    pattern = r"tt\.dot %\S+, %\S+, %\S+ : tensor<(\d+)x(\d+)x\w+, [^*]*\* tensor<\d+x(\d+)x"
    return [(int(m), int(k), int(n)) for m, k, n in re.findall(pattern, ttgir)]


def cubin_usage(kernel_fn, signature: dict, constexprs: dict, arch: int = 90, **options) -> dict:
    """{"registers", "stack_bytes", "shared_bytes"} of `kernel_fn` compiled for sm_<arch> with `options`
    (num_warps, num_stages). Spills show as stack bytes > 0."""
    kernel = compile_for(kernel_fn, signature, constexprs, arch, **options)
    cuobjdump = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))[0]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":") for item in next(ln for ln in out.splitlines() if "REG:" in ln).split())
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "shared_bytes": kernel.metadata.shared}


def has_tools() -> bool:
    """Whether this Triton ships the ptxas and cuobjdump that cubin_usage needs."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    return bool(glob.glob(os.path.join(tools, "ptxas*")) and glob.glob(os.path.join(tools, "cuobjdump*")))
