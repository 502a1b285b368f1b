"""Triton pairwise SSIM as one small GEMM per output pixel, on tensor cores at about fp32 accuracy.

The cross term of a pair at output pixel p is a dot product over the pixel's 11 x 11 window,
cross[i, j, p] = sum_q w[q] x_i[p + q] y_j[p + q]. With each image's windows laid out once as rows
("im2col": patches[p, image, 0:121], padded to 128), a tile of BN x images against BM y images is, for
every p, the matrix product (w * Xp) @ Yp^T of [BN, 128] by [128, BM], followed at once by the SSIM
formula on the [BN, BM] result (the per-image mean and variance maps are computed once, outside) and a
running sum over p. That is 121 multiply-adds per pair and pixel instead of the separable filter's 22,
but as dense tensor-core GEMMs with large tiles rather than the tile kernel's 4 pairs per program
(ssim_triton.py). The lead measures which wins (benchmarks/bench_ssim.py).

Precision. The cross term needs fp32 accuracy: in flat regions the SSIM map's slope in it is 2 / C2 ≈ 2200,
so tf32's 2^-11 relative error alone would cost 1e-2. ``precision``:
  "fp16x3"  each operand split into fp16 hi + lo parts, lo scaled by 2^12 so it stays normal; three fp16
            tensor-core dots (hi·hi + hi·lo + lo·hi, fp32 accumulate) keep about 22 bits — the fp16 rate
            is twice tf32's, so this is the fastest candidate. Needs |image values| <= 256.
  "tf32x3"  fp32 operands, Triton's three-pass tf32 dot.
  "ieee"    fp32 operands, plain fp32 FMAs (slow; for comparison).

The patches take 128 values per image, channel and output pixel (4 bytes each in every mode): 166 KB for a
28x28 image, so large sets are processed in chunks that fit ``chunk_bytes``.

Import only when nfkernels._ext.HAS_TRITON; on CPU tensors it runs under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nfkernels.ssim import C1, C2, gaussian_window, image_stats
from nfkernels.ssim_triton import running_nearest

# tl.fdiv's approx flag (div.approx.f32) is new in Triton 3.9; older versions (3.6 beside torch 2.11 on the GPU
# machine, where the flag failed to compile) get a plain `/`, whatever division they lower it to
APPROX_DIV = "approx" in inspect.signature(tl.fdiv).parameters

PRECISIONS = ("fp16x3", "tf32x3", "ieee")
LO_SCALE = 4096.0  # 2^12: lifts the fp16 residuals out of the subnormal range
A_SCALE = 16.0  # 2^4: the weighted windows (w <= 0.071) nearer fp16's normal range; undone exactly at the end
FP16X3_MAX_ABS = 256.0
KP = 128  # 11 * 11 = 121 window values, padded
# "patches" (windows laid out once per image, _ssim_gemm_kernel; timed on the H100) or "images" (windows gathered
# from the images, _ssim_gather_kernel; opt-in until a GPU has timed it)
LAYOUTS = ("patches", "images")
LAYOUT = "patches"
TILES_IMAGES = (128, 64, 8, 2)  # (BN, BM, num_warps, num_stages) of the gather kernel on CUDA; see _tiles


@triton.jit
def _ssim_from_cross(acc, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr, p, NP, MP, n, m, c1, c2, inv_scale,
                     APPROX: tl.constexpr):
    """The SSIM map at output pixel p of a [BN, BM] tile of pairs, from its cross term acc / inv_scale.

    The formula with its constants folded into per-row / per-column terms, so that a pair costs 9 operations
    and the division:
      ((2 mx my + c1) (2 cxy - 2 mx my + c2)) / ((mx² + c1 + my²) (vx + c2 + vy))
    The division is div.approx (2 ulp; the denominator is at least c1 * c2 ≈ 1e-7, far inside its range),
    which skips the operand range checks full-range division runs on every pair and pixel."""
    mx = tl.load(xmu_ptr + p * NP + n)
    my = tl.load(ymu_ptr + p * MP + m)[None, :]
    mx2_c1 = (mx * mx + c1)[:, None]
    vx_c2 = (tl.load(xvar_ptr + p * NP + n) + c2)[:, None]
    my2 = my * my
    vy = tl.load(yvar_ptr + p * MP + m)[None, :]
    mxy = mx[:, None] * my
    num = (2.0 * mxy + c1) * (acc * (2.0 * inv_scale) + c2 - 2.0 * mxy)
    den = (mx2_c1 + my2) * (vx_c2 + vy)
    if APPROX:
        return tl.fdiv(num, den, approx=True)
    return num / den


@triton.jit
def _finish_tile(sim, n, m, n_ok, m_ok, best, arg, out_ptr, out_stride, row0, col0,
                 REDUCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """Store a [BN, BM] tile of similarities, or fold it into the rows' running (max, argmax) over y."""
    if REDUCE:
        ok = m_ok[None, :] & n_ok[:, None]
        if EXCLUDE_SELF:  # global indices: the launch may cover a chunk of x and of y
            ok = ok & (n[:, None] + row0 != m[None, :] + col0)
        best, arg = running_nearest(sim, ok, m.to(tl.int64) + col0, best, arg)
    else:
        tl.store(out_ptr + n.to(tl.int64)[:, None] * out_stride + m.to(tl.int64)[None, :], sim,
                 mask=n_ok[:, None] & m_ok[None, :])
    return best, arg


@triton.jit
def _ssim_gemm_kernel(ah_ptr, al_ptr, bh_ptr, bl_ptr, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr,
                      out_ptr, out_stride, best_ptr, arg_ptr,
                      N, M, NP, MP, P, row0, col0, m_step, splits, c1, c2, inv_scale, lo_inv,
                      KP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr,
                      PRECISION: tl.constexpr, REDUCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                      APPROX: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    n64 = n.to(tl.int64)
    k = tl.arange(0, KP)
    tile_a = tl.arange(0, BN)[:, None] * KP + k[None, :]
    tile_b = tl.arange(0, BM)[:, None] * KP + k[None, :]
    best = tl.full((BN,), float("-inf"), tl.float32)
    arg = tl.zeros((BN,), tl.int64)
    m_start = pid_m * m_step
    m_end = tl.minimum(M, m_start + m_step)
    for m0 in range(m_start, m_end, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < m_end
        total = tl.zeros((BN, BM), tl.float32)
        for p in range(P):
            # one pixel's windows: rows p * NP + n of the [P * NP, KP] patches (NP: N padded with zero images to
            # a whole number of tiles, so no load needs a mask). A scalar base plus compile-time-constant
            # offsets: offsets built from n or m (runtime values), or masks on them, stayed live as [BN, KP]
            # tensors across the loop (sm_90 compile: 255 registers and 1-2 KB of spills).
            a_row = (p * NP + pid_n * BN) * KP  # int32: launch_gemm keeps each operand below 2^31 elements
            b_row = (p * MP + m0) * KP
            a_hi = tl.load(ah_ptr + a_row + tile_a)
            b_hi = tl.load(bh_ptr + b_row + tile_b)
            if SPLIT:
                a_lo = tl.load(al_ptr + a_row + tile_a)
                b_lo = tl.load(bl_ptr + b_row + tile_b)
                acc = tl.dot(a_hi, tl.trans(b_lo))
                acc = tl.dot(a_lo, tl.trans(b_hi), acc)
                acc = tl.dot(a_hi, tl.trans(b_hi), acc * lo_inv)
            else:
                acc = tl.dot(a_hi, tl.trans(b_hi), input_precision=PRECISION)
            total += _ssim_from_cross(acc, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr, p, NP, MP, n, m, c1, c2,
                                      inv_scale, APPROX)
        best, arg = _finish_tile(total / P, n, m, n_ok, m_ok, best, arg, out_ptr, out_stride, row0, col0,
                                 REDUCE, EXCLUDE_SELF)
    if REDUCE:
        tl.store(best_ptr + n64 * splits + pid_m, best, mask=n_ok)
        tl.store(arg_ptr + n64 * splits + pid_m, arg, mask=n_ok)


@triton.jit
def _ssim_gather_kernel(xh_ptr, xl_ptr, y_ptr, wk_ptr, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr,
                        out_ptr, out_stride, best_ptr, arg_ptr,
                        N, M, NP, MP, row0, col0, m_step, splits, c1, c2, inv_scale, lo_inv, lo_scale,
                        C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr,
                        KP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr,
                        PRECISION: tl.constexpr, REDUCE: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                        APPROX: tl.constexpr):
    """The same GEMMs, with every window gathered from the images themselves ([n, C, H, W]) instead of from
    laid-out patches: 10k MNIST images take 31 MB in fp32 where their patches took 1.7 GB, so the windows of
    neighbouring output pixels (110 of 121 values shared) come from L1 or L2 instead of DRAM. The y side is
    weighted by the 2-D Gaussian (and split into fp16 hi + lo) in registers, once a pixel and y tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HO: tl.constexpr = H - K + 1
    WO: tl.constexpr = W - K + 1
    IMG: tl.constexpr = C * H * W
    P: tl.constexpr = C * HO * WO
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    n64 = n.to(tl.int64)
    k = tl.arange(0, KP)
    dy = k // K
    window = tl.where(k < K * K, dy * W + (k - dy * K), 0)  # window value k at image offset dy * W + dx
    tile_a = tl.arange(0, BN)[:, None] * IMG + window[None, :]
    tile_b = tl.arange(0, BM)[:, None] * IMG + window[None, :]
    wk = tl.load(wk_ptr + k)[None, :]  # the 2-D Gaussian, 0 past K * K
    best = tl.full((BN,), float("-inf"), tl.float32)
    arg = tl.zeros((BN,), tl.int64)
    m_start = pid_m * m_step
    m_end = tl.minimum(M, m_start + m_step)
    for m0 in range(m_start, m_end, BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < m_end
        total = tl.zeros((BN, BM), tl.float32)
        for p in range(P):
            c = p // (HO * WO)
            r = (p - c * (HO * WO)) // WO
            corner = c * (H * W) + r * W + (p - c * (HO * WO) - r * WO)  # the window's top-left pixel
            a_at = pid_n * BN * IMG + corner  # int32: launch_gemm keeps each operand below 2^31 elements
            b_at = m0 * IMG + corner
            a_hi = tl.load(xh_ptr + a_at + tile_a)
            b = tl.load(y_ptr + b_at + tile_b) * wk
            if SPLIT:
                a_lo = tl.load(xl_ptr + a_at + tile_a)
                b_hi = b.to(tl.float16)
                b_lo = ((b - b_hi.to(tl.float32)) * lo_scale).to(tl.float16)
                acc = tl.dot(a_hi, tl.trans(b_lo))
                acc = tl.dot(a_lo, tl.trans(b_hi), acc)
                acc = tl.dot(a_hi, tl.trans(b_hi), acc * lo_inv)
            else:
                acc = tl.dot(a_hi, tl.trans(b), input_precision=PRECISION)
            total += _ssim_from_cross(acc, xmu_ptr, xvar_ptr, ymu_ptr, yvar_ptr, p, NP, MP, n, m, c1, c2,
                                      inv_scale, APPROX)
        best, arg = _finish_tile(total / P, n, m, n_ok, m_ok, best, arg, out_ptr, out_stride, row0, col0,
                                 REDUCE, EXCLUDE_SELF)
    if REDUCE:
        tl.store(best_ptr + n64 * splits + pid_m, best, mask=n_ok)
        tl.store(arg_ptr + n64 * splits + pid_m, arg, mask=n_ok)


def _patches(planes: torch.Tensor, k: int) -> torch.Tensor:
    """[n, C, H, W] float32 → every output pixel's k x k window: [C * Ho * Wo, n, KP], zero-padded to KP."""
    n, c, h, w = planes.shape
    pixels = (h - k + 1) * (w - k + 1)
    cols = F.unfold(planes.reshape(n * c, 1, h, w), k)  # [n * C, k * k, Ho * Wo]
    out = planes.new_zeros(c, pixels, n, KP)
    out[..., :k * k] = cols.view(n, c, k * k, pixels).permute(1, 3, 0, 2)
    return out.view(c * pixels, n, KP)


def _padded_stats(planes: torch.Tensor, tile: int):
    """Images padded by zero images to a multiple of ``tile`` (the kernels load whole tiles, unmasked), and
    their mean / variance maps as [P, n] rows."""
    planes = F.pad(planes, (0, 0, 0, 0, 0, 0, 0, -planes.shape[0] % tile))
    mu, var = (t.float().permute(1, 2, 3, 0).reshape(-1, planes.shape[0]).contiguous() for t in image_stats(planes))
    return planes, mu, var


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 → fp16 hi + lo parts, lo scaled by LO_SCALE: hi + lo / LO_SCALE keeps about 22 bits."""
    hi = values.half()
    return hi, ((values - hi.float()) * LO_SCALE).half()


def _operands(planes: torch.Tensor, weight: torch.Tensor | None, split: bool, tile: int, layout: str):
    """The GEMM operands of a set of images and its (mu, var) rows: (hi, lo, mu, var), lo None unless split.

    "patches": the windows, times the 2-D Gaussian ``weight`` on the weighted (x) side, split into fp16
    hi + lo parts when ``split``. "images": the padded images; the side the kernel weights (y, ``weight``
    given) stays fp32, since the kernel weights and splits it in registers."""
    planes, mu, var = _padded_stats(planes, tile)
    if layout == "images":
        if split and weight is None:
            return (*_split(planes), mu, var)
        return planes, None, mu, var
    cols = _patches(planes, gaussian_window().numel())
    if weight is not None:
        cols *= weight * (A_SCALE if split else 1.0)
    return (*_split(cols), mu, var) if split else (cols, None, mu, var)


def _tiles(device: torch.device, layout: str = "patches") -> tuple[int, int, int, int]:
    """(BN, BM, num_warps, num_stages). Off the GPU (the interpreter) the smallest tiles tl.dot allows.

    On CUDA, patches: 128 x 64 pairs, 8 warps, 2 stages, the fastest of `bench_ssim --sweep` on the H100
    (0.436 s for 10k x 10k against 0.517 s for the 64 x 32 tiles it was chosen over by ptxas alone;
    ssim-h100.json, 25e7f50). Compiled for sm_90 it spills 56 B when writing the matrix, outside the pixel
    loop. Images: TILES_IMAGES, not timed yet."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    return (128, 64, 8, 2) if layout == "patches" else TILES_IMAGES


def launch_gemm(xp: torch.Tensor, yp: torch.Tensor, *, reduce: bool, exclude_self: bool = False,
                precision: str = "fp16x3", layout: str | None = None, chunk_bytes: int = 1 << 32,
                tiles: tuple[int, int, int, int] | None = None):
    """xp [N, C, H, W], yp [M, C, H, W] → [N, M], or (best, arg) [N, splits] partials in y order (reduced by
    ssim_triton.ssim_nearest_triton). ``layout``: "patches" or "images" (None: LAYOUT); ``tiles``: (BN, BM,
    num_warps, num_stages), for benchmark sweeps."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    layout = layout or LAYOUT
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    x = xp.to(torch.float32).contiguous()
    y = yp.to(torch.float32).contiguous()
    if precision == "fp16x3" and max(x.abs().max().item() if x.numel() else 0.0,
                                     y.abs().max().item() if y.numel() else 0.0) > FP16X3_MAX_ABS:
        precision = "tf32x3"  # fp16's range; SSIM with data_range 1 expects images in [0, 1] anyway
    split = precision == "fp16x3"
    chunk_bytes = min(chunk_bytes, 1 << 32)  # each operand < 2^31 elements: the kernel's offsets are int32
    N, C, H, W = x.shape
    M = y.shape[0]
    dev = x.device
    k = gaussian_window().numel()
    weight = gaussian_window(dtype=torch.float32)
    weight = F.pad((weight[:, None] * weight[None, :]).flatten(), (0, KP - k * k)).to(dev)
    P = C * (H - k + 1) * (W - k + 1)
    bn, bm, num_warps, num_stages = tiles or _tiles(dev, layout)
    per_image = (P * KP if layout == "patches" else C * H * W) * 4
    x_rows = max(bn, (chunk_bytes // 2 // per_image) // bn * bn)
    y_rows = max(bm, (chunk_bytes // 2 // per_image) // bm * bm)
    if reduce:
        best_parts, arg_parts = [], []
    else:
        out = torch.empty(N, M, dtype=torch.float32, device=dev)
    if N == 0 or M == 0:
        return (torch.empty(N, 0, device=dev), torch.empty(N, 0, dtype=torch.long, device=dev)) if reduce else out
    # patches weight the x side, images the y side (in the kernel)
    x_weight, y_weight = (weight, None) if layout == "patches" else (None, weight)
    y_scaled_weight = weight * (A_SCALE if split else 1.0)  # what the gather kernel multiplies y's windows by
    x_chunks = [(i, min(N, i + x_rows)) for i in range(0, N, x_rows)]
    x_cache = _operands(x, x_weight, split, bn, layout) if len(x_chunks) == 1 else None
    programs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    scale = 1.0 / A_SCALE if split else 1.0
    for j0 in range(0, M, y_rows):
        j1 = min(M, j0 + y_rows)
        bh, bl, ymu, yvar = _operands(y[j0:j1], y_weight, split, bm, layout)
        mc = j1 - j0
        row_best, row_arg = [], []
        for i0, i1 in x_chunks:
            ah, al, xmu, xvar = x_cache or _operands(x[i0:i1], x_weight, split, bn, layout)
            nc = i1 - i0
            n_blocks = triton.cdiv(nc, bn)
            if reduce:
                splits = max(1, min(triton.cdiv(mc, bm), triton.cdiv(programs, n_blocks)))
                m_step = triton.cdiv(triton.cdiv(mc, splits), bm) * bm
                splits = triton.cdiv(mc, m_step)
                best = torch.empty(nc, splits, dtype=torch.float32, device=dev)
                arg = torch.empty(nc, splits, dtype=torch.int64, device=dev)
                target, stride = best, 0
            else:
                splits, m_step = triton.cdiv(mc, bm), bm
                target, stride = out[i0:, j0:], M
                best = arg = target  # unused
            common = dict(KP=KP, BN=bn, BM=bm, SPLIT=split, PRECISION="ieee" if split else precision, REDUCE=reduce,
                          EXCLUDE_SELF=exclude_self, APPROX=APPROX_DIV, num_warps=num_warps, num_stages=num_stages)
            if layout == "patches":
                _ssim_gemm_kernel[(n_blocks, splits)](
                    ah, al if split else ah, bh, bl if split else bh, xmu, xvar, ymu, yvar, target, stride, best,
                    arg, nc, mc, xmu.shape[1], ymu.shape[1], P, i0, j0, m_step, splits, C1, C2, scale,
                    1.0 / LO_SCALE, **common)
            else:
                _ssim_gather_kernel[(n_blocks, splits)](
                    ah, al if split else ah, bh, y_scaled_weight, xmu, xvar, ymu, yvar, target,
                    stride, best, arg, nc, mc, xmu.shape[1], ymu.shape[1], i0, j0, m_step, splits, C1, C2, scale,
                    1.0 / LO_SCALE, LO_SCALE, C=C, H=H, W=W, K=k, **common)
            if reduce:
                row_best.append(best)
                row_arg.append(arg)
        if reduce:
            best_parts.append(torch.cat(row_best))
            arg_parts.append(torch.cat(row_arg))
    if reduce:
        return torch.cat(best_parts, dim=1), torch.cat(arg_parts, dim=1)
    return out


def pairwise_ssim_gemm(xp: torch.Tensor, yp: torch.Tensor, *, precision: str = "fp16x3", **kw) -> torch.Tensor:
    """[N, C, H, W], [M, C, H, W] → float32 [N, M]."""
    return launch_gemm(xp, yp, reduce=False, precision=precision, **kw)
