"""Triton nearest-codebook assignment: a running (min distance, index) per row, codes streamed in tiles.

Each program owns BLOCK_M rows and walks the whole codebook BLOCK_K codes at a time, so nothing of
size M x K is ever written: memory is O(M + K) and the codebook tiles are served from L1/L2. Distances
are direct differences sum_j (x_j - c_j)^2 in fp32 (no |x|^2 + |c|^2 - 2x.c cancellation).

The running best is kept per (row, tile column), elementwise, so a tile costs a compare and two selects
per distance; the reduction across columns (shuffles between threads) runs once per row at the end
instead of twice per tile, which is what dominated at d = 4-8. Ties go to the lowest index: a column
slot replaces its best only on a strictly smaller distance (so it keeps its earliest tile), and the final
reduction takes the smallest index among the slots at the minimum. No atomics: results are deterministic.

Import only when nfkernels._ext.HAS_TRITON; on CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _vq_assign_kernel(x_ptr, codes_t_ptr, idx_ptr, dist_ptr, M, K,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # M * D can exceed 2^31 for M = 1e8-scale inputs
    slot_best = tl.full((BLOCK_M, BLOCK_K), float("inf"), tl.float32)
    slot_idx = tl.zeros((BLOCK_M, BLOCK_K), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        dist = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for j in tl.static_range(D):
            xj = tl.load(x_ptr + rows64 * D + j, mask=row_ok, other=0.0)
            cj = tl.load(codes_t_ptr + j * K + cols, mask=col_ok, other=0.0)  # codebook stored [D, K]
            diff = xj[:, None] - cj[None, :]
            dist += diff * diff
        better = (dist < slot_best) & col_ok[None, :]  # NaN rows never win: they keep inf and index 0
        slot_idx = tl.where(better, cols[None, :], slot_idx)
        slot_best = tl.where(better, dist, slot_best)
    best = tl.min(slot_best, axis=1)
    best_idx = tl.min(tl.where(slot_best == best[:, None], slot_idx, 2147483647), axis=1)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, best, mask=row_ok)


def default_tiles(d: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for vectors of d values and K codes.

    Three [BLOCK_M, BLOCK_K] tiles (distances, slot minima, slot indices) live in registers, and each
    distance also holds its d codebook values: 16 tile elements a thread for d <= 2 and 8 above keep the
    sm_90 build free of spills for d = 1-16 (`python -m benchmarks.ptxas_vq`; 64x64 with 4 warps spills
    from d = 8). Of the shapes so sized, the H100 sweep (benchmarks/results/vq-h100.json, M = 10^7) timed
    64x32 with 4 warps fastest at d = 1 (1.7x 64x64 with 8 at K = 256) and 32x32 with 4 within 13 % of the
    fastest at d = 4 and 8.
    """
    block_k = max(16, min(32, triton.next_power_of_2(K)))
    return (64, block_k, 4) if d <= 2 else (32, block_k, 4)


def vq_assign_triton(x: torch.Tensor, codebook: torch.Tensor, *, block_m: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, d], codebook [K, d] (float32, same device, 1 <= d <= 16) → (int64 [M], float32 [M]).

    Rows holding NaN get index 0 and distance inf.
    """
    M, d = x.shape
    K = codebook.shape[0]
    x = x.contiguous()
    codes_t = codebook.t().contiguous()
    idx = torch.empty(M, dtype=torch.int64, device=x.device)
    dist = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return idx, dist
    tiles = default_tiles(d, K)
    block_m, block_k, num_warps = block_m or tiles[0], block_k or tiles[1], num_warps or tiles[2]
    grid = (triton.cdiv(M, block_m),)
    _vq_assign_kernel[grid](x, codes_t, idx, dist, M, K, D=d, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return idx, dist
