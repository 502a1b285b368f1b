"""Fused sampling kernel: CFG mix, temperature, top-k, top-p and the draw in one launch, BLOCK_B rows per program.

V is small here (a codebook of 256-4096 codes), so a program holds whole rows (BLOCK_B of them) in registers. Top-k and
top-p thresholds are found without sorting: a float's bits, remapped to an order-preserving int32 key,
are bisected (32 steps pin down the exact key) for the largest threshold t with
count(key >= t) >= k, resp. mass(key >= t) >= p * Z. The draw is an exponential race with Philox
(tl.rand) keyed by a seed the caller drew on the device, so nothing syncs with the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _order_key(x):
    """float32 → int32 with the same order (for non-NaN values)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _sample_kernel(logits_ptr, uncond_ptr, seed_ptr, out_ptr, B, V, stride_l, stride_u,
                   cfg_scale, inv_temperature, top_k, top_p,
                   HAS_UNCOND: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_V)
    valid = (rows[:, None] < B) & (cols[None, :] < V)
    lg = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=valid,
                 other=float("-inf")).to(tl.float32)
    if HAS_UNCOND:
        lu = tl.load(uncond_ptr + rows[:, None] * stride_u + cols[None, :], mask=valid,
                     other=float("-inf")).to(tl.float32)
        lg = tl.where(lg == lu, lg, lu + cfg_scale * (lg - lu))
    lg = lg * inv_temperature
    key = _order_key(lg)

    if USE_TOP_K:
        # per row, the largest t with count(key >= t) >= top_k: the k-th largest key
        lo = tl.min(tl.where(valid, key, 2147483647), axis=1).to(tl.int64)
        hi = tl.max(tl.where(valid, key, -2147483648), axis=1).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            ok = tl.sum((valid & (key >= mid[:, None])).to(tl.int32), axis=1) >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        lg = tl.where(key >= lo[:, None], lg, float("-inf"))
        key = _order_key(lg)

    mx = tl.max(lg, axis=1)
    mx = tl.where(mx > float("-inf"), mx, 0.0)  # padding rows are all -inf: keep them NaN-free
    w = tl.exp(lg - mx[:, None])  # unnormalised probabilities, 0 where removed or padding

    if USE_TOP_P:
        # per row, the largest t with mass(key >= t) >= top_p * Z
        target = top_p * tl.sum(w, axis=1)
        kept = lg > float("-inf")
        lo = tl.min(tl.where(kept, key, 2147483647), axis=1).to(tl.int64)
        hi = tl.max(tl.where(kept, key, -2147483648), axis=1).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            ok = tl.sum(tl.where(key >= mid[:, None], w, 0.0), axis=1) >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        w = tl.where(key >= lo[:, None], w, 0.0)

    seed = tl.load(seed_ptr)
    u = tl.rand(seed, (rows[:, None] * V + cols[None, :]).to(tl.int32))  # [0, 1)
    race = -tl.log(1.0 - u)  # Exp(1), > 0 except with probability 2^-24
    score = tl.where(valid, w / race, -1.0)
    tl.store(out_ptr + rows, tl.argmax(score, axis=1).to(tl.int64), mask=rows < B)


def sample_next_triton(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       uncond_logits: torch.Tensor | None, cfg_scale: float, seed: torch.Tensor) -> torch.Tensor:
    """Launch one program per row; inputs already validated by nfkernels.sampling.sample_next."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if uncond_logits is not None and uncond_logits.stride(1) != 1:
        uncond_logits = uncond_logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    block_v = triton.next_power_of_2(V)
    # Rows per program: on a GPU enough to fill ~4K elements of registers; under the CPU interpreter,
    # whose cost is per program and per op, many rows at once.
    if logits.device.type == "cpu":
        block_b = min(1024, triton.next_power_of_2(B))
    else:
        block_b = max(1, min(16, 4096 // block_v))
    uncond = uncond_logits if uncond_logits is not None else logits
    _sample_kernel[(triton.cdiv(B, block_b),)](
        logits, uncond, seed, out, B, V, logits.stride(0), uncond.stride(0),
        float(cfg_scale), 1.0 / float(temperature), int(top_k), float(top_p),
        HAS_UNCOND=uncond_logits is not None, USE_TOP_K=0 < top_k < V, USE_TOP_P=top_p < 1.0,
        BLOCK_B=block_b, BLOCK_V=block_v, num_warps=4 if block_b * block_v <= 2048 else 8,
    )
    return out
