"""Pairwise SSIM: every image of x against every image of y, and nearest-neighbour reductions of it.

The SSIM is pinned to skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1.0)``: an 11-tap Gaussian (sigma 1.5, truncated at 3.5 sigma),
K1 = 0.01, K2 = 0.03, the mean of the SSIM map with the 5-pixel border cropped — the same as filtering
'valid' only. Colour images [N, H, W, C] average over channels, like skimage's ``channel_axis=-1``.

Every implementation computes each image's filtered mean and variance maps once; per pair only the
cross term filter(x * y) and the formula are left.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nfkernels._ext import resolve_backend

SIGMA = 1.5
TRUNCATE = 3.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 1.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2

# Chunk sizes, module constants so tests can shrink them and run the multi-chunk paths on small inputs.
_REF_CHUNK_ELEMS = 1 << 23  # float64 elements of x*y products the reference holds at once (64 MiB)
_NEAREST_CHUNK_SIMS = 1 << 22  # similarities of one block of rows in the torch ssim_nearest_both (~4M)


def gaussian_window(sigma: float = SIGMA, truncate: float = TRUNCATE, dtype=torch.float64) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def ssim_distance(ssim: torch.Tensor) -> torch.Tensor:
    """D = (1 - SSIM) / 2, in [0, 1]."""
    return (1.0 - ssim) / 2.0


def as_planes(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] → [N, C, H, W] (a view where possible); checks the shape."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [N, H, W] or [N, H, W, C]")
    if images.dim() == 3:
        planes = images.unsqueeze(1)
    elif images.dim() == 4:
        planes = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{name} must be [N, H, W] or [N, H, W, C], got {tuple(images.shape)}")
    k = gaussian_window().numel()
    if planes.shape[2] < k or planes.shape[3] < k:
        raise ValueError(f"{name}: images of {tuple(planes.shape[2:])} pixels are smaller than the {k}x{k} window")
    return planes


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xp, yp = as_planes(x, "x"), as_planes(y, "y")
    if xp.shape[1:] != yp.shape[1:]:
        raise ValueError(f"x and y images differ in shape: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
    return xp, yp


def filter_valid(planes: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter over the last two dims of [..., H, W] → [..., H-K+1, W-K+1]."""
    lead, (h, w) = planes.shape[:-2], planes.shape[-2:]
    k = window.numel()
    flat = planes.reshape(-1, 1, h, w)
    flat = F.conv2d(flat, window.view(1, 1, 1, k).to(flat))
    flat = F.conv2d(flat, window.view(1, 1, k, 1).to(flat))
    return flat.reshape(*lead, h - k + 1, w - k + 1)


def image_stats(planes: torch.Tensor, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered mean and variance maps of [N, C, H, W], 'valid' region: two [N, C, Ho, Wo]."""
    window = gaussian_window(dtype=dtype).to(planes.device)
    p = planes.to(dtype)
    mu = filter_valid(p, window)
    return mu, filter_valid(p * p, window) - mu * mu


def ssim_formula(mu_x, var_x, mu_y, var_y, cross):
    """The SSIM map from the means, variances and cross term filter(x*y), broadcasting."""
    mxy = mu_x * mu_y
    num = (2 * mxy + C1) * (2 * (cross - mxy) + C2)
    den = (mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2)
    return num / den


def pairwise_ssim_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Obviously-correct all-pairs SSIM in float64, in chunks of rows of x: [N, ...], [M, ...] → float32 [N, M]."""
    xp, yp = _check_pair(x, y)
    window = gaussian_window().to(x.device)
    mu_x, var_x = image_stats(xp)
    mu_y, var_y = image_stats(yp)
    y64 = yp.to(torch.float64)
    n, m = xp.shape[0], yp.shape[0]
    out = torch.empty(n, m, dtype=torch.float64, device=x.device)
    rows = max(1, _REF_CHUNK_ELEMS // max(1, yp[0].numel() * m))
    for i in range(0, n, rows):
        xs = xp[i:i + rows].to(torch.float64)
        cross = filter_valid(xs[:, None] * y64[None], window)  # [rows, M, C, Ho, Wo]
        s = ssim_formula(mu_x[i:i + rows, None], var_x[i:i + rows, None], mu_y[None], var_y[None], cross)
        out[i:i + rows] = s.mean(dim=(2, 3, 4))
    return out.float()


def _cpp_args(x, y):
    xp, yp = _check_pair(x, y)
    return (xp.to(torch.float32).contiguous(), yp.to(torch.float32).contiguous(), gaussian_window(dtype=torch.float32),
            C1, C2)


def _same_set(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.shape == y.shape and x.data_ptr() == y.data_ptr() and x.stride() == y.stride())


def _backend(backend: str, x: torch.Tensor, op: str) -> str:
    return resolve_backend(backend, x.device, op, cpp=True, cuda=False, triton=True)


def pairwise_ssim(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """SSIM of every image of x [N, H, W(, C)] against every image of y [M, H, W(, C)] → float32 [N, M].

    Passing the same tensor as x and y computes each unordered pair once (cpp backend).
    """
    b = _backend(backend, x, "ssim_pairwise")
    if b == "torch":
        return pairwise_ssim_reference(x, y)
    if b == "cpp":
        xp, yp, window, c1, c2 = _cpp_args(x, y)
        return torch.ops.nfkernels.ssim_pairwise(xp, yp, window, c1, c2, _same_set(x, y))
    from nfkernels.ssim_triton import pairwise_ssim_triton

    return pairwise_ssim_triton(*_check_pair(x, y))


def _best(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max along `dim` with ties to the lowest index (torch.argmax returns the first maximum)."""
    idx = values.argmax(dim=dim)
    return values.gather(dim, idx.unsqueeze(dim)).squeeze(dim), idx


def nearest_from_matrix(sim: torch.Tensor, exclude_self: bool = False):
    """Row and column (max, argmax) of a full SSIM matrix: the reference for the fused reductions."""
    if exclude_self:
        sim = sim.clone()
        sim.fill_diagonal_(float("-inf"))
    return (*_best(sim, 1), *_best(sim, 0))


def ssim_nearest_both(x: torch.Tensor, y: torch.Tensor, *, exclude_self: bool = False, backend: str = "auto"):
    """Nearest neighbours in both directions without the N x M matrix.

    Returns (row_max [N], row_argmax [N], col_max [M], col_argmax [M]): for each x its most similar y and
    for each y its most similar x; ties go to the lowest index. ``exclude_self`` skips the pairs (i, i)
    (leave-one-out when x and y are the same set; needs N == M). The cpp backend gets both directions from
    one pass (half a pass when x is y); triton makes a second, transposed pass for the columns unless x is y.
    """
    xp, yp = _check_pair(x, y)
    if exclude_self and xp.shape[0] != yp.shape[0]:
        raise ValueError(f"exclude_self needs x and y of the same length, got {xp.shape[0]} and {yp.shape[0]}")
    b = _backend(backend, x, "ssim_nearest")
    if b == "cpp":
        xp, yp, window, c1, c2 = _cpp_args(x, y)
        return tuple(torch.ops.nfkernels.ssim_nearest(xp, yp, window, c1, c2, exclude_self, _same_set(x, y)))
    if b == "triton":
        from nfkernels.ssim_triton import ssim_nearest_triton

        rows = ssim_nearest_triton(xp, yp, exclude_self=exclude_self)
        cols = rows if _same_set(x, y) else ssim_nearest_triton(yp, xp, exclude_self=exclude_self)
        return (*rows, *cols)
    # torch: the reference matrix in blocks of rows (at most _NEAREST_CHUNK_SIMS similarities at once), reduced
    # as it goes.
    n = xp.shape[0]
    rows = max(1, _NEAREST_CHUNK_SIMS // max(1, yp.shape[0]))
    row_v, row_i = torch.empty(n, device=x.device), torch.empty(n, dtype=torch.long, device=x.device)
    col_v = torch.full((yp.shape[0],), float("-inf"), device=x.device)
    col_i = torch.full((yp.shape[0],), -1, dtype=torch.long, device=x.device)
    for i in range(0, n, rows):
        sim = pairwise_ssim_reference(x[i:i + rows], y)
        if exclude_self:
            r = torch.arange(sim.shape[0], device=x.device)
            sim[r, r + i] = float("-inf")
        row_v[i:i + rows], row_i[i:i + rows] = _best(sim, 1)
        v, j = _best(sim, 0)
        better = v > col_v  # strict: an earlier block already holds the lower index on ties
        col_v, col_i = torch.where(better, v, col_v), torch.where(better, j + i, col_i)
    return row_v, row_i, col_v, col_i


def ssim_nearest(x: torch.Tensor, y: torch.Tensor, *, exclude_self: bool = False, backend: str = "auto"):
    """For each image of x its most similar image of y: (max_ssim float32 [N], argmax int64 [N])."""
    if _backend(backend, x, "ssim_nearest") == "triton":  # rows only: columns would cost a second pass
        from nfkernels.ssim_triton import ssim_nearest_triton

        return ssim_nearest_triton(*_check_pair(x, y), exclude_self=exclude_self)
    row_v, row_i, _, _ = ssim_nearest_both(x, y, exclude_self=exclude_self, backend=backend)
    return row_v, row_i
