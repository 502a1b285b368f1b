"""Split-K ("flash-decoding") decode attention: one query per row over the first kv_len slots of a KV cache.

At large batch a decode step is bound by reading the KV cache, so the kernel's job is to read each filled
K/V element exactly once and nothing else. Two launches:

1. `_chunk_kernel`, grid (n_chunks, B * H_kv). A program owns one KV head of one row and one chunk of CHUNK
   slots. It loads the G = H / H_kv query heads that read this KV head as one [BLOCK_G, BLOCK_D] tile (each
   K/V element is then read once for all G heads), walks its chunk in tiles of BLOCK_N slots with the online
   softmax (running max m, running sum l, unnormalised output acc) and writes (m, l, acc) to a float32
   workspace. kv_len is read from device memory: a chunk that starts at or past kv_len returns at once and
   the last live chunk stops at kv_len, so the grid depends only on the shapes (n_chunks from S_max) and one
   CUDA graph serves every decode step while kv_len grows on the device. With a single chunk (large batch:
   B * H_kv programs already fill the GPU) the program normalises and writes the output itself.
2. `_combine_kernel`, one program per (row, query head), only when there are several chunks: merges the
   live ones, out = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c with M = max_c m_c.

Scores are kept in base 2 (the scale 1/sqrt(d) * log2(e) is folded into q) so the softmax uses exp2.
The head dim D is a compile-time constant, padded to a power of two >= 16 with masks (the default model has
d = 48): with D known the compiler proves the mask constant over 8-element groups and loads 16 bytes at a
time; with D a runtime value the same loads compiled (sm_90) to one 2-byte load per element.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Defaults, not yet timed on a GPU; from compiling for sm_90 without one (bf16, d = 48, any G): with tl.dot
# the loads become cp.async into shared memory, pipelined 3 deep, at 78 registers and 36 KB of shared memory
# for BLOCK_N = 64 and 4 warps, no spills. The CUDA-core path (use_dot=False) is not pipelined and took 128
# registers at the same tile (71 at BLOCK_N = 32): memory-bound, the tensor-core path keeps more bytes in
# flight even for G = 1, where 15 of the 16 rows of each mma are padding.
BLOCK_N = 64  # cache slots per tile
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # split the sequence until the first launch has this many programs per SM


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, kv_len_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
                  H_kv, G, S_max, n_chunks, qk_scale,
                  stride_qb, stride_qh, stride_qd,
                  stride_kb, stride_kh, stride_ks, stride_kd,
                  stride_vb, stride_vh, stride_vs, stride_vd,
                  stride_ob, stride_oh, stride_od,
                  D: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    b = (tl.program_id(1) // H_kv).to(tl.int64)  # int64: b * stride_kb passes 2^31 for large caches
    kvh = tl.program_id(1) % H_kv
    kv_len = tl.minimum(tl.load(kv_len_ptr), S_max)  # clamped: never read past the cache
    start = chunk * CHUNK
    if start >= kv_len:  # nothing filled in this chunk: the combine skips it
        return
    end = tl.minimum(start + CHUNK, kv_len)

    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    h = kvh * G + g  # the query heads that read KV head kvh
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + dd[None, :] * stride_qd,
                mask=(g[:, None] < G) & (dd[None, :] < D), other=0.0)
    q = q.to(tl.float32) * qk_scale  # [BLOCK_G, BLOCK_D]; padded heads and dims are 0
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_N):
        # offsets recomputed from s0 rather than pointer tensors carried across iterations: the carried
        # [BLOCK_N, BLOCK_D] 64-bit pointers nearly doubled the registers (sm_90 compile)
        live = s0 + n < end
        kv_mask = live[:, None] & (dd[None, :] < D)  # masked lanes are not loaded: slots >= kv_len stay unread
        k = tl.load(k_base + (s0 + n[:, None]) * stride_ks + dd[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + (s0 + n[:, None]) * stride_vs + dd[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if USE_DOT:  # tensor cores need >= 16 rows: BLOCK_G is padded to 16
            scores = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION)
        else:  # few query heads per KV head: multiply-adds on CUDA cores, no padding to 16 rows
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        scores = tl.where(live[None, :], scores, float("-inf"))  # [BLOCK_G, BLOCK_N]
        # s0 < end, so every tile has a live slot and m_new is finite: no inf - inf
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = (g[:, None] < G) & (dd[None, :] < D)
    if SPLIT:  # partials for _combine_kernel
        slot = ((b * H_kv + kvh) * G + g) * n_chunks + chunk  # [b * H + h, chunk]
        tl.store(m_ptr + slot, m_i, mask=g < G)
        tl.store(l_ptr + slot, l_i, mask=g < G)
        tl.store(acc_ptr + slot[:, None] * D + dd[None, :], acc, mask=out_mask)
    else:  # one chunk covers the whole cache: normalise here, no second launch
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + dd[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, kv_len_ptr, out_ptr, H, S_max, n_chunks,
                    stride_ob, stride_oh, stride_od,
                    D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    kv_len = tl.minimum(tl.load(kv_len_ptr), S_max)
    c = tl.arange(0, BLOCK_C)
    dd = tl.arange(0, BLOCK_D)
    live = c < tl.cdiv(kv_len, CHUNK)  # the chunks the first kernel wrote; the rest hold garbage
    m = tl.load(m_ptr + row * n_chunks + c, mask=live, other=float("-inf"))
    l = tl.load(l_ptr + row * n_chunks + c, mask=live, other=0.0)
    acc = tl.load(acc_ptr + (row * n_chunks + c[:, None]) * D + dd[None, :],
                  mask=live[:, None] & (dd[None, :] < D), other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # 0 for dead chunks
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    b, h = row // H, row % H
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dd * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=dd < D)


def default_chunk(batch: int, n_kv_head: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Slots per chunk (a multiple of block_n): the fewest chunks that give PROGRAMS_PER_SM programs per SM.

    Depends on shapes only, so the grid is the same at every decode step. At batch 1024 with 8 KV heads that
    is one chunk; at batch 1 the sequence is split. Under the CPU interpreter, whose cost is per program,
    one chunk per (row, KV head)."""
    tiles = triton.cdiv(s_max, block_n)
    if device.type == "cuda":
        wanted = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        wanted = 1
    splits = max(1, min(tiles, triton.cdiv(wanted, batch * n_kv_head)))
    return triton.cdiv(tiles, splits) * block_n


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor, *,
                            block_n: int | None = None, chunk: int | None = None, use_dot: bool | None = None,
                            num_warps: int | None = None) -> torch.Tensor:
    """Launch the kernels; inputs already validated by nfkernels.decode_attention.decode_attention.

    `block_n` (a power of two >= 16), `chunk` (a multiple of block_n), `use_dot` (tensor-core dots, the
    default, or CUDA-core multiply-adds) and `num_warps` override the defaults, for tests and tuning.
    """
    B, H, _, d = q.shape
    _, H_kv, S_max, _ = k_cache.shape
    G = H // H_kv
    out = torch.empty(B, H, 1, d, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    block_n = block_n or BLOCK_N
    chunk = chunk or default_chunk(B, H_kv, S_max, block_n, q.device)
    if block_n < 16 or block_n & (block_n - 1) or chunk % block_n:
        raise ValueError(f"block_n must be a power of two >= 16 and chunk a multiple of it, got {block_n}, {chunk}")
    if use_dot is None:
        # Triton 3.9's interpreter multiplies bf16 dot operands as their integer bit patterns: on CPU tensors
        # take the multiply-add path for bf16
        use_dot = not (q.device.type == "cpu" and k_cache.dtype == torch.bfloat16)
    block_g = max(16 if use_dot else 1, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(d))
    n_chunks = triton.cdiv(S_max, chunk)
    # float32 workspace of the partials (m, l, acc) [B * H, n_chunks(, d)]; empty with one chunk
    ws = n_chunks if n_chunks > 1 else 0
    m = torch.empty(B * H, ws, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, ws, d, dtype=torch.float32, device=q.device)
    kv_len = kv_len.reshape(1)
    _chunk_kernel[(n_chunks, B * H_kv)](
        q, k_cache, v_cache, kv_len, m, l, acc, out,
        H_kv, G, S_max, n_chunks, math.log2(math.e) / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        D=d, SPLIT=n_chunks > 1, CHUNK=chunk, BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d,
        # float32 caches: exact float32 dots (Triton's default is tf32); 16-bit dots have one precision
        USE_DOT=use_dot, DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else None,
        num_warps=num_warps or NUM_WARPS,
    )
    if n_chunks > 1:
        _combine_kernel[(B * H,)](
            m, l, acc, kv_len, out, H, S_max, n_chunks, out.stride(0), out.stride(1), out.stride(3),
            D=d, CHUNK=chunk, BLOCK_C=triton.next_power_of_2(n_chunks), BLOCK_D=block_d, num_warps=NUM_WARPS,
        )
    return out
