"""Triton pairwise SSIM: tiles of (x, y) pairs, both 'valid' filter passes as matmuls on chip.

For a pair, the cross term is Gh (x * y) Gw^T with Gw [Wo, W] and Gh [Ho, H] the banded Gaussian
matrices. A program holds BN x images and BM y images, forms the BN * BM products [BN, BM, H, W] in
registers, filters rows with one dot against Gw^T ([BN*BM*H, W] @ [W, Wo]) and columns with a second
dot after a transpose ([BN*BM*Wo, H] @ [H, Ho]); the SSIM map then needs only the per-image mean and
variance maps, computed once per image outside (float64, then float32). Dims are padded to powers of
two (28 → 32); the padding rows/columns of the filter matrices are zero and masked out of the mean.

Accumulation is fp32. ``precision`` is tl.dot's input_precision: "tf32x3" (tensor cores, about fp32 accuracy;
the default) or "ieee" (exact fp32 FMAs). On the H100 tf32x3 was 2.0-2.2x faster at 1k x 1k and 10k x 10k, at
most 8.5e-7 from conv2d in fp32 where ieee was 5.8e-7 (benchmarks/results/ssim-h100.json; 2629ac1 measured the
same).

Reductions (nearest neighbour per x image) stream over y in the kernel: each program keeps a running
(max, argmax) over its share of y, so only [N, splits] partials are written, never the N x M matrix.

Import only when nfkernels._ext.HAS_TRITON; on CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nfkernels.ssim import C1, C2, gaussian_window, image_stats

PRECISION = "tf32x3"
# "tile" (this file's kernel), "gemm" (ssim_gemm_triton: one tensor-core GEMM per output pixel over laid-out
# patches), "gemm-images" (the same GEMMs, windows gathered from the images; not timed yet), or "auto": the GEMM
# kernel from GEMM_MIN_PAIR_PIXELS pairs x output pixels on, the tile kernel below. On the H100
# (ssim-h100.json, 25e7f50; 324 output pixels a 28x28 pair) the tile kernel in tf32x3 took 0.0088 s at
# 1k x 1k and 0.786 s at 10k x 10k, the GEMM kernel (fp16x3, 128 x 64 tiles) 0.035 s and 0.436 s: a line
# through each pair of points crosses at about 8e6 pairs. An interpolation between two measured sizes, not a
# measured crossover: `bench_ssim` times both kernels beside the default at 1k and 10k.
KERNELS = ("auto", "tile", "gemm", "gemm-images")
KERNEL = "auto"
GEMM_MIN_PAIR_PIXELS = 8_000_000 * 324
_TILE_ELEMS = 4096  # BN * BM * BH * BW products held by one program


@triton.jit
def running_nearest(sim, ok, cols, best, arg):
    """Fold a [BN, BM] tile of similarities into each row's running (max, argmax) over columns `cols`: pairs
    not `ok` never win; ties go to the lowest column in the tile, and strict > across tiles keeps the earlier."""
    sim = tl.where(ok, sim, float("-inf"))
    tile_best = tl.max(sim, axis=1)
    tile_arg = tl.min(tl.where(sim == tile_best[:, None], cols[None, :], 2**62), axis=1)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_arg, arg)


@triton.jit
def _ssim_tile_kernel(x_ptr, y_ptr, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr, win_ptr, out_ptr, best_ptr, arg_ptr,
                      N, M, m_step, splits, c1, c2,
                      C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr,
                      BN: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                      BHO: tl.constexpr, BWO: tl.constexpr, REDUCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HO: tl.constexpr = H - K + 1
    WO: tl.constexpr = W - K + 1
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    n64 = n.to(tl.int64)
    h = tl.arange(0, BH)
    w = tl.arange(0, BW)
    ho = tl.arange(0, BHO)
    wo = tl.arange(0, BWO)
    # Banded filter matrices Gw^T [BW, BWO] and Gh^T [BH, BHO]; zero outside the band and the valid region.
    dw = w[:, None] - wo[None, :]
    gw = tl.load(win_ptr + dw, mask=(dw >= 0) & (dw < K) & (wo[None, :] < WO), other=0.0)
    dh = h[:, None] - ho[None, :]
    gh = tl.load(win_ptr + dh, mask=(dh >= 0) & (dh < K) & (ho[None, :] < HO), other=0.0)
    pix = (h[:, None] * W + w[None, :])[None, :, :]
    pix_ok = ((h[:, None] < H) & (w[None, :] < W))[None, :, :]
    # Statistics are read transposed, [BWO, BHO], matching the second dot's output layout.
    st = (ho[None, :] * WO + wo[:, None])[None, :, :]
    st_ok = ((wo[:, None] < WO) & (ho[None, :] < HO))[None, :, :]

    best = tl.full((BN,), float("-inf"), tl.float32)
    arg = tl.zeros((BN,), tl.int64)
    m_start = pid_m * m_step
    m_end = tl.minimum(M, m_start + m_step)
    for m0 in range(m_start, m_end, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < m_end
        m64 = m.to(tl.int64)
        total = tl.zeros((BN, BM), tl.float32)
        for c in range(C):
            xs = tl.load(x_ptr + ((n64 * C + c) * (H * W))[:, None, None] + pix,
                         mask=n_ok[:, None, None] & pix_ok, other=0.0)
            ys = tl.load(y_ptr + ((m64 * C + c) * (H * W))[:, None, None] + pix,
                         mask=m_ok[:, None, None] & pix_ok, other=0.0)
            z = xs[:, None, :, :] * ys[None, :, :, :]  # [BN, BM, BH, BW]
            r = tl.dot(tl.reshape(z, (BN * BM * BH, BW)), gw, input_precision=PRECISION)
            r = tl.permute(tl.reshape(r, (BN * BM, BH, BWO)), (0, 2, 1))
            cxy = tl.dot(tl.reshape(r, (BN * BM * BWO, BH)), gh, input_precision=PRECISION)
            cxy = tl.reshape(cxy, (BN, BM, BWO, BHO))
            xoff = ((n64 * C + c) * (HO * WO))[:, None, None] + st
            yoff = ((m64 * C + c) * (HO * WO))[:, None, None] + st
            xok = n_ok[:, None, None] & st_ok
            yok = m_ok[:, None, None] & st_ok
            mx = tl.load(xmu_ptr + xoff, mask=xok, other=0.0)[:, None, :, :]
            vx = tl.load(xvar_ptr + xoff, mask=xok, other=0.0)[:, None, :, :]
            my = tl.load(ymu_ptr + yoff, mask=yok, other=0.0)[None, :, :, :]
            vy = tl.load(yvar_ptr + yoff, mask=yok, other=0.0)[None, :, :, :]
            mxy = mx * my
            s = ((2.0 * mxy + c1) * (2.0 * (cxy - mxy) + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
            s = tl.where(st_ok[None, :, :, :], s, 0.0)
            total += tl.sum(tl.sum(s, axis=3), axis=2)
        sim = total / (C * HO * WO)
        if REDUCE:
            ok = m_ok[None, :] & n_ok[:, None]
            if EXCLUDE_SELF:
                ok = ok & (n[:, None] != m[None, :])
            best, arg = running_nearest(sim, ok, m64, best, arg)
        else:
            tl.store(out_ptr + n64[:, None] * M + m64[None, :], sim, mask=n_ok[:, None] & m_ok[None, :])
    if REDUCE:
        tl.store(best_ptr + n64 * splits + pid_m, best, mask=n_ok)
        tl.store(arg_ptr + n64 * splits + pid_m, arg, mask=n_ok)


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))  # tl.dot needs every dim >= 16


def _launch(xp: torch.Tensor, yp: torch.Tensor, *, reduce: bool, exclude_self: bool = False,
            precision: str = PRECISION, num_warps: int | None = None):
    """xp [N, C, H, W], yp [M, C, H, W] on one device → [N, M] matrix, or (best, arg) [N, splits] partials."""
    N, C, H, W = xp.shape
    M = yp.shape[0]
    dev = xp.device
    window = gaussian_window(dtype=torch.float32).to(dev)
    K = window.numel()
    x = xp.to(torch.float32).contiguous()
    y = yp.to(torch.float32).contiguous()
    xmu, xvar = (t.float().contiguous() for t in image_stats(x))
    ymu, yvar = (t.float().contiguous() for t in image_stats(y))
    BH, BW, BHO, BWO = _pow2(H), _pow2(W), _pow2(H - K + 1), _pow2(W - K + 1)
    pairs = max(1, _TILE_ELEMS // (BH * BW))
    BN = 1 << ((pairs.bit_length() - 1) // 2)  # pairs per tile split as evenly as powers of two allow
    BM = pairs // BN
    n_blocks = triton.cdiv(N, BN)
    if num_warps is None:
        # 4096-element tiles: 8 warps keep sm_90 spills small at 28x28 (ptxas: 80 B vs 348 B with 4 warps);
        # 64x64 images need 16 (5 KB of spills with 8)
        num_warps = 16 if BH * BW >= 4096 else 8
    if reduce:
        # enough programs to fill the GPU, each streaming over a contiguous share of y
        splits = max(1, min(triton.cdiv(M, BM), triton.cdiv(2048, n_blocks)))
        if dev.type != "cuda":
            splits = 1
        m_step = triton.cdiv(triton.cdiv(M, splits), BM) * BM
        splits = triton.cdiv(M, m_step) if M else 1
        best = torch.empty(N, splits, dtype=torch.float32, device=dev)
        arg = torch.empty(N, splits, dtype=torch.int64, device=dev)
        out = best  # unused
    else:
        splits, m_step = triton.cdiv(M, BM), BM
        out = torch.empty(N, M, dtype=torch.float32, device=dev)
        best, arg = out, out  # unused
    if N == 0 or M == 0:
        return out if not reduce else (best, arg)
    _ssim_tile_kernel[(n_blocks, splits)](
        x, y, xmu, xvar, ymu, yvar, window, out, best, arg, N, M, m_step, splits, C1, C2,
        C=C, H=H, W=W, K=K, BN=BN, BM=BM, BH=BH, BW=BW, BHO=BHO, BWO=BWO, REDUCE=reduce,
        EXCLUDE_SELF=exclude_self, PRECISION=precision, num_warps=num_warps)
    return (best, arg) if reduce else out


def pairwise_ssim_triton(xp: torch.Tensor, yp: torch.Tensor, *, kernel: str | None = None,
                         precision: str | None = None) -> torch.Tensor:
    """[N, C, H, W], [M, C, H, W] → float32 [N, M]. ``kernel`` / ``precision``: None for the defaults."""
    kernel = pick_kernel(kernel, xp, yp)
    if kernel != "tile":
        from nfkernels.ssim_gemm_triton import pairwise_ssim_gemm

        return pairwise_ssim_gemm(xp, yp, precision=precision or "fp16x3", layout=_GEMM_LAYOUT[kernel])
    return _launch(xp, yp, reduce=False, precision=precision or PRECISION)


_GEMM_LAYOUT = {"gemm": "patches", "gemm-images": "images"}


def pick_kernel(kernel: str | None, xp: torch.Tensor, yp: torch.Tensor) -> str:
    """The kernel that runs for ``kernel`` (None: KERNEL) on [N, C, H, W] x [M, C, H, W]; "auto" by size."""
    kernel = kernel or KERNEL
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        k = gaussian_window().numel()
        _, c, h, w = xp.shape
        pair_pixels = xp.shape[0] * yp.shape[0] * c * max(0, h - k + 1) * max(0, w - k + 1)
        return "gemm" if pair_pixels >= GEMM_MIN_PAIR_PIXELS else "tile"
    return kernel


def ssim_nearest_triton(xp: torch.Tensor, yp: torch.Tensor, *, exclude_self: bool = False,
                        kernel: str | None = None, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each x its most similar y: (float32 [N], int64 [N]); ties to the lowest index, -1 if none."""
    if xp.shape[0] == 0 or yp.shape[0] == 0:
        return (torch.full((xp.shape[0],), float("-inf"), device=xp.device),
                torch.full((xp.shape[0],), -1, dtype=torch.long, device=xp.device))
    kernel = pick_kernel(kernel, xp, yp)
    if kernel != "tile":
        from nfkernels.ssim_gemm_triton import launch_gemm

        best, arg = launch_gemm(xp, yp, reduce=True, exclude_self=exclude_self, precision=precision or "fp16x3",
                                layout=_GEMM_LAYOUT[kernel])
    else:
        best, arg = _launch(xp, yp, reduce=True, exclude_self=exclude_self, precision=precision or PRECISION)
    split = best.argmax(dim=1, keepdim=True)  # partials are in y order: the first maximum has the lowest index
    value, index = best.gather(1, split).squeeze(1), arg.gather(1, split).squeeze(1)
    return value, torch.where(torch.isinf(value), torch.full_like(index, -1), index)
