"""Resource usage of a Triton kernel built for a CUDA target, no GPU needed (ptxas via triton.compile, then
the cuobjdump that ships with Triton)."""
from __future__ import annotations

import base64
import collections
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for(kernel_fn, signature: dict, constexprs: dict, arch: int = 90, **options):
    """`kernel_fn` compiled for sm_<arch> with `options` (num_warps, num_stages): .asm holds "ttgir", "cubin"…

    Every pointer argument is taken as 16-byte aligned, as a launch with torch's allocations specialises it:
    without that Triton cannot vectorise loads, and the code would not be the code a GPU runs."""
    if not hasattr(kernel_fn, "cache_key"):  # under TRITON_INTERPRET=1 (the CPU tests) @jit made an interpreter wrapper
        return _compile_without_interpreter(kernel_fn.fn, signature, constexprs, arch, options)
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    src = ASTSource(kernel_fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_COMPILE_ELSEWHERE = """
import base64, importlib, json, sys
from benchmarks._ptxas import compile_for
a = json.load(sys.stdin)
k = compile_for(getattr(importlib.import_module(a["module"]), a["name"]), a["signature"], a["constexprs"], a["arch"],
                **a["options"])
json.dump({"cubin": base64.b64encode(k.asm["cubin"]).decode(), "ttgir": k.asm["ttgir"], "shared": k.metadata.shared},
          sys.stdout)
"""


def _compile_without_interpreter(fn, signature: dict, constexprs: dict, arch: int, options: dict):
    """compile_for in a fresh process without TRITON_INTERPRET: under the interpreter, triton.language's own @jit
    helpers (tl.min, ...) are interpreter wrappers, and compiling a kernel that calls them patches the language
    for the interpreter for good, so the compile fails (it passed only while Triton's cache held the kernel).
    Returns what the tools read: .asm["cubin"], .asm["ttgir"] and .metadata.shared."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    args = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "arch": arch, "options": options}
    run = subprocess.run([sys.executable, "-c", _COMPILE_ELSEWHERE], input=json.dumps(args), capture_output=True,
                         text=True, env=env, cwd=root)
    if run.returncode != 0:
        raise RuntimeError(f"compiling {fn.__name__} for sm_{arch} failed:\n{run.stderr[-2000:]}")
    out = json.loads(run.stdout)
    return SimpleNamespace(asm={"cubin": base64.b64decode(out["cubin"]), "ttgir": out["ttgir"]},
                           metadata=SimpleNamespace(shared=out["shared"]))


def dot_shapes(ttgir: str) -> list[tuple[int, int, int]]:
    """(M, K, N) of every tt.dot in a TTGIR listing, including those Triton made from a sum of a broadcast product."""
    pattern = r"tt\.dot %\S+, %\S+, %\S+ : tensor<(\d+)x(\d+)x\w+, [^*]*\* tensor<\d+x(\d+)x"
    return [(int(m), int(k), int(n)) for m, k, n in re.findall(pattern, ttgir)]


def _cuobjdump(kernel, flag: str) -> str:
    cuobjdump = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))[0]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout


H100_ISSUE_PER_S = 132 * 128 * 1.98e9  # thread-instructions a second an H100 SXM issues at its boost clock
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")


def inner_loops(kernel) -> list[dict]:
    """The innermost loops of a compiled kernel's SASS: for each backward branch that encloses no other, the
    instructions from its target to the branch, {"start", "end", "instructions", "ops": {opcode: count}}.

    A static count, not a timing: it says how much work one trip of the loop issues per thread, so an inner
    loop can be held to its arithmetic (a test can catch a shuffle or a spill creeping into it)."""
    code = [(int(a, 16), op, line) for line in _cuobjdump(kernel, "-sass").splitlines()
            for a, op in SASS_LINE.findall(line)]
    branches = []
    for addr, op, line in code:
        target = re.search(r"BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", line) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            branches.append((int(target.group(1), 16), addr))
    loops = []
    for start, end in branches:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in branches):
            continue  # encloses another loop
        ops = collections.Counter(op for a, op, _ in code if start <= a <= end)
        loops.append({"start": start, "end": end, "instructions": sum(ops.values()), "ops": dict(ops)})
    return loops


def the_inner_loop(kernel) -> dict:
    """inner_loops' only entry, for kernels with a single innermost loop."""
    loops = inner_loops(kernel)
    if len(loops) != 1:
        raise RuntimeError(f"expected one innermost loop in {kernel.name}, found {len(loops)}")
    return loops[0]


def usage(kernel) -> dict:
    """{"registers", "stack_bytes", "shared_bytes"} of a compiled kernel. Spills show as stack bytes > 0."""
    out = _cuobjdump(kernel, "-res-usage")
    fields = dict(item.split(":") for item in next(ln for ln in out.splitlines() if "REG:" in ln).split())
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "shared_bytes": kernel.metadata.shared}


def cubin_usage(kernel_fn, signature: dict, constexprs: dict, arch: int = 90, **options) -> dict:
    """usage() of `kernel_fn` compiled for sm_<arch> with `options` (num_warps, num_stages)."""
    return usage(compile_for(kernel_fn, signature, constexprs, arch, **options))


def module_at(commit: str | None, path: str, current):
    """The module in file `path` (relative to the repository) as of git `commit`, so a tool can compile an older
    kernel the same way as today's; `current` (the imported module) when commit is None."""
    if commit is None:
        return current
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, check=True,
                            cwd=root).stdout
    folder = tempfile.mkdtemp(prefix="nfgen-ptxas-")
    file = os.path.join(folder, os.path.basename(path))
    with open(file, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"{current.__name__}_at_{commit}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_tools() -> bool:
    """Whether this Triton ships the ptxas and cuobjdump that cubin_usage needs."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    return bool(glob.glob(os.path.join(tools, "ptxas*")) and glob.glob(os.path.join(tools, "cuobjdump*")))
