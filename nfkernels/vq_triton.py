"""Triton nearest-codebook assignment: a running (min distance, index) per row, codes streamed in tiles.

Each program owns BLOCK_M rows and walks the whole codebook BLOCK_K codes at a time, so nothing of
size M x K is ever written: memory is O(M + K) and the codebook tiles are served from L1/L2. Distances
are direct differences sum_j (x_j - c_j)^2 in fp32 (no |x|^2 + |c|^2 - 2x.c cancellation). Ties go
to the lowest index: within a tile by taking the smallest index among the minima, across tiles by
replacing the running best only on a strictly smaller distance. No atomics, so results are deterministic.

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
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        dist = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for j in tl.static_range(D):
            xj = tl.load(x_ptr + rows64 * D + j, mask=row_ok, other=0.0)
            cj = tl.load(codes_t_ptr + j * K + cols, mask=col_ok, other=0.0)  # codebook stored [D, K]
            diff = xj[:, None] - cj[None, :]
            dist += diff * diff
        dist = tl.where(col_ok[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)
        # lowest column attaining the tile minimum
        tile_idx = tl.min(tl.where(dist == tile_min[:, None], cols[None, :], 2147483647), axis=1)
        better = tile_min < best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_min, best)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, best, mask=row_ok)


def vq_assign_triton(x: torch.Tensor, codebook: torch.Tensor, *, block_m: int | None = None,
                     block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    # The [BLOCK_M, BLOCK_K] distance tile lives in registers: keep it about 8k fp32 values.
    block_m = block_m or 64
    block_k = block_k or max(16, min(128, triton.next_power_of_2(K)))
    grid = (triton.cdiv(M, block_m),)
    _vq_assign_kernel[grid](x, codes_t, idx, dist, M, K, D=d, BLOCK_M=block_m, BLOCK_K=block_k)
    return idx, dist
