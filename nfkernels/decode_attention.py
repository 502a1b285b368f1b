"""Attention of one new query per row over a static KV cache, reading only its filled slots (a decode step).

`decode_attention(q [B, H, 1, d], k_cache, v_cache [B, H_kv, S_max, d], kv_len)` → [B, H, 1, d] in q's dtype:
    out[b, h] = softmax_s(q[b, h] · k[b, h // G, s] / sqrt(d)) · v[b, h // G, s]   over slots s < kv_len,
with G = H / H_kv (grouped-query attention: query head h reads KV head h // G), accumulated in float32
whatever the cache dtype. `kv_len` is a one-element int64 tensor on the device, the same for every row:
the caller advances it on the device, so a CUDA graph of a decode step replays at every position with no
host sync and no per-length graphs. Slots >= kv_len are never read (they may hold stale rows or garbage).

Implementations:
- ``torch``: the reference; slices the cache to kv_len on the host (`kv_len.item()`: a sync, so it cannot be
  captured in a CUDA graph) and expands the KV heads. Obviously correct, not fast.
- ``triton``: split-K over the sequence ("flash-decoding"), nfkernels/decode_attention_triton.py. It reads
  kv_len on the device, so it cannot check it: values above S_max are clamped to S_max (never read out of
  bounds), and below 1 the output is undefined. CUDA, or CPU tensors under TRITON_INTERPRET=1.
- ``cpp``: csrc/decode_attention_cpu.cpp, float32 CPU tensors: one task per (row, KV head) reads each filled
  key and value row once for all the KV head's query heads (1.45-4.2x torch's SDPA over the sliced cache on a
  2-core EPYC, benchmarks/results/decode_attention-cpu.json). kv_len outside [1, S_max] is refused.
``auto`` picks triton on CUDA, cpp for float32 CPU tensors (the reference without the C++ build or for other
dtypes).
"""
from __future__ import annotations

import math

import torch

from nfkernels._ext import HAS_TRITON, resolve_backend


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(q, k_cache, v_cache, kv_len) -> None:
    """Shapes, dtypes and devices only: never reads a device value (no host sync)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 4-d floating tensor, got {_shape(t)}")
    B, H, T, d = q.shape
    if T != 1:
        raise ValueError(f"q must be [B, H, 1, d] (one new query per row), got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    Bk, H_kv, S_max, dk = k_cache.shape
    if Bk != B or dk != d:
        raise ValueError(f"the caches must be [B={B}, H_kv, S_max, d={d}] for q {tuple(q.shape)}, "
                         f"got {tuple(k_cache.shape)}")
    if H_kv < 1 or S_max < 1 or H % H_kv:
        raise ValueError(f"q's {H} heads must be a multiple of the caches' {H_kv} KV heads, "
                         f"and the caches must have S_max >= 1 slots (got {S_max})")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if not (isinstance(kv_len, torch.Tensor) and kv_len.dtype == torch.int64 and kv_len.numel() == 1):
        raise ValueError(f"kv_len must be a one-element int64 tensor, got "
                         f"{kv_len.dtype if isinstance(kv_len, torch.Tensor) else type(kv_len).__name__} "
                         f"{_shape(kv_len)}")
    devices = {q.device, k_cache.device, v_cache.device, kv_len.device}
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, v_cache and kv_len must be on one device, got {sorted(map(str, devices))}")


def _check_kv_len_value(kv_len: torch.Tensor, S_max: int) -> None:
    """kv_len's value: a host sync on CUDA, so only the reference and the CPU op check it."""
    n = int(kv_len.item())
    if not 1 <= n <= S_max:
        raise ValueError(f"kv_len must be in [1, S_max = {S_max}], got {n}")


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               kv_len: torch.Tensor) -> torch.Tensor:
    """Obviously-correct decode attention: slice to kv_len, expand the KV heads, softmax, in float32."""
    _check(q, k_cache, v_cache, kv_len)
    _check_kv_len_value(kv_len, k_cache.shape[2])
    n = int(kv_len.item())
    groups = q.shape[1] // k_cache.shape[1]
    k = k_cache[:, :, :n].float().repeat_interleave(groups, dim=1)  # [B, H, n, d]
    v = v_cache[:, :, :n].float().repeat_interleave(groups, dim=1)
    scores = q.float() @ k.transpose(2, 3) / math.sqrt(q.shape[3])  # [B, H, 1, n]
    return (torch.softmax(scores, dim=3) @ v).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor, *,
                     backend: str = "auto") -> torch.Tensor:
    """q [B, H, 1, d] over the first kv_len slots of k_cache, v_cache [B, H_kv, S_max, d] → [B, H, 1, d].

    `kv_len`: one-element int64 tensor on q's device, 1 <= kv_len <= S_max. See the module docstring.
    """
    _check(q, k_cache, v_cache, kv_len)
    fp32 = q.dtype == k_cache.dtype == torch.float32
    impl = resolve_backend(backend, q.device, "decode_attention", cpp=fp32, cuda=False, triton=HAS_TRITON)
    if impl == "cpp":
        _check_kv_len_value(kv_len, k_cache.shape[2])  # the op checks it too, but in a RuntimeError
        return torch.ops.nfkernels.decode_attention(q, k_cache, v_cache, kv_len)
    if impl == "triton":
        from nfkernels.decode_attention_triton import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, kv_len)
    return decode_attention_reference(q, k_cache, v_cache, kv_len)


__all__ = ["decode_attention", "decode_attention_reference"]
