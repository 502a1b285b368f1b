"""Nearest-codebook assignment (vector quantisation) and k-means on top of it.

`vq_assign(x [M, d], codebook [K, d])` gives, for each row of x, the index of the nearest code in
squared Euclidean distance, ties broken to the lowest index. Implementations:
- ``torch``: the reference, direct differences over row chunks (memory chunk x K x d);
- ``cpp``: nfkernels._C, OpenMP, codebook tiles in L1, no M x K matrix;
- ``triton``: one fused kernel, running (min, index) per row, memory O(M + K);
- for d = 1 a sorted-codebook path (binary search among sorted codes) in C++ or torch.searchsorted.
All fast paths compute distances as sum_j (x_j - c_j)^2 in fp32, never |x|^2 + |c|^2 - 2 x.c, so a
point sitting on a code gets distance ~0 instead of cancellation noise. They agree with the reference
up to fp32 rounding of the distance (a different summation order can flip a near-tie).
"""
from __future__ import annotations

import torch

from nfkernels import _ext

MAX_DIM = 16  # compiled / Triton kernels unroll over d
METHODS = ("auto", "brute", "sorted")


def _check(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"x must be [M, d] and codebook [K, d], got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x has d={x.shape[1]} but the codebook has d={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but the codebook is on {codebook.device}")
    if not (x.is_floating_point() and codebook.is_floating_point()):
        raise ValueError("x and the codebook must be floating point")
    return x.float(), codebook.float()


def _assign_torch(x: torch.Tensor, codebook: torch.Tensor, chunk_elems: int = 1 << 24):
    """(index, squared distance) by direct differences over chunks of rows; argmin takes the first minimum."""
    M, d = x.shape
    K = codebook.shape[0]
    rows = max(1, chunk_elems // (K * d))
    idx = torch.empty(M, dtype=torch.int64, device=x.device)
    dist = torch.empty(M, dtype=torch.float32, device=x.device)
    for s in range(0, M, rows):
        d2 = (x[s:s + rows, None, :] - codebook[None]).pow(2).sum(-1)
        best, arg = d2.min(dim=1)  # documented: the first minimal index on ties
        idx[s:s + rows], dist[s:s + rows] = arg, best
    return idx, dist


def vq_assign_reference(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Obviously-correct nearest code: chunked direct-difference distances + argmin (ties → lowest index)."""
    x, codebook = _check(x, codebook)
    return _assign_torch(x, codebook)[0]


def _sort_codebook_1d(codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted code values and, per sorted position, the lowest original index among equal codes."""
    values, order = torch.sort(codebook[:, 0], stable=True)  # stable: equal codes keep index order
    run_start = torch.ones_like(values, dtype=torch.bool)
    run_start[1:] = values[1:] != values[:-1]
    first_of_run = torch.cummax(torch.where(run_start, torch.arange(len(values), device=values.device), 0), 0)[0]
    return values.contiguous(), order[first_of_run].contiguous()


def _assign_sorted_torch(x: torch.Tensor, values: torch.Tensor, canon: torch.Tensor):
    """d = 1 by binary search; looks at the 4 sorted neighbours so rounding and exact ties are handled."""
    v = x[:, 0].contiguous()
    pos = torch.searchsorted(values, v)  # first position with value >= v
    cand = (pos[:, None] + torch.arange(-2, 2, device=v.device)).clamp_(0, len(values) - 1)
    d2 = (v[:, None] - values[cand]).pow(2)
    # lexicographic min over (distance, original index): among the minima take the lowest index
    best = d2.min(dim=1, keepdim=True).values
    ids = torch.where(d2 == best, canon[cand], torch.iinfo(torch.int64).max).min(dim=1).values
    return ids, best[:, 0]


def _pick_method(method: str, d: int, K: int, backend: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "sorted" and d != 1:
        raise ValueError(f"method='sorted' needs d=1, got d={d}")
    if method != "auto":
        return method
    if d != 1 or backend == "torch":
        return "brute"
    # Measured on 2 CPU cores (benchmarks/bench_vq.py): the sorted C++ path wins from K = 16 up. On the H100
    # (benchmarks/results/vq-h100.json, M = 10^7) the fused brute kernel won at K = 256 (11.6 G against 3.9 G
    # assignments/s for torch.searchsorted) and lost at K = 4096 (1.1 G against 3.8 G); its cost grows with K,
    # so 1024 is where it falls to about sorted's rate (interpolated, not timed).
    return "sorted" if (backend == "cpp" and K >= 16) or K >= 1024 else "brute"


def vq_assign(x: torch.Tensor, codebook: torch.Tensor, *, return_distance: bool = False, backend: str = "auto",
              method: str = "auto"):
    """Nearest code of each row: x [M, d], codebook [K, d] → int64 [M] (and float32 [M] squared distance).

    Ties go to the lowest code index. `backend` picks the engine (auto, torch, cpp, triton), `method` the
    algorithm: "brute" (all codes) or, for d = 1, "sorted" (binary search in the sorted codebook).
    Inputs are computed in float32; rows containing NaN get an unspecified index.
    """
    x, codebook = _check(x, codebook)
    M, d = x.shape
    K = codebook.shape[0]
    fast_ok = d <= MAX_DIM
    if not fast_ok and backend in ("cpp", "triton"):
        raise ValueError(f"vq_assign's {backend} engine takes vectors of d ≤ {MAX_DIM}, got d = {d}; use "
                         "backend 'auto' or 'torch'")
    backend = _ext.resolve_backend(backend, x.device, "vq_assign", cpp=fast_ok, cuda=False, triton=fast_ok)
    method = _pick_method(method, d, K, backend)
    if method == "sorted":
        values, canon = _sort_codebook_1d(codebook)
        if backend == "cpp":
            idx, dist = torch.ops.nfkernels.vq_assign_sorted1d(x[:, 0].contiguous(), values, canon)
        else:
            idx, dist = _assign_sorted_torch(x, values, canon)
    elif backend == "cpp":
        idx, dist = torch.ops.nfkernels.vq_assign(x, codebook)
    elif backend == "triton":
        from nfkernels.vq_triton import vq_assign_triton

        idx, dist = vq_assign_triton(x, codebook)
    else:
        idx, dist = _assign_torch(x, codebook)
    return (idx, dist) if return_distance else idx


def _kmeanspp_init(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++: each next code drawn with probability ∝ squared distance to the nearest code so far.

    Stays on the device without host syncs (cumsum + searchsorted instead of multinomial, which also
    caps the number of categories at 2^24). Every step writes into the same buffers: k rounds of fresh
    [M]-sized temporaries fragmented glibc's heap on CPU until the peak RSS reached ~200 bytes a point.
    """
    M = x.shape[0]
    codes = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    diff, d2, cand = torch.empty_like(x), x.new_empty(M), x.new_empty(M)
    cdf = torch.empty(M, dtype=torch.float64, device=x.device)
    j = torch.randint(M, (1,), generator=g, device=x.device)
    for i in range(k):
        torch.index_select(x, 0, j, out=codes[i:i + 1])
        torch.sub(x, codes[i], out=diff)
        torch.sum(diff.mul_(diff), 1, out=d2 if i == 0 else cand)
        if i:
            torch.minimum(d2, cand, out=d2)
        if i + 1 < k:
            torch.cumsum(d2, 0, dtype=torch.float64, out=cdf)
            r = torch.rand(1, generator=g, device=x.device, dtype=torch.float64) * cdf[-1]
            j = torch.searchsorted(cdf, r, right=True).clamp_(max=M - 1)
    return codes


def kmeans(x: torch.Tensor, k: int, *, iters: int = 30, init: str = "kmeans++", seed: int = 0,
           sample: int | None = None, backend: str = "auto", tol: float = 1e-5, callback=None):
    """Lloyd's k-means on x [M, d] → (codebook float32 [k, d], history: mean squared distance per iteration).

    `sample` fits on that many random rows (all when None or ≥ M). history[i] is the mean squared
    distance to the nearest code after the i-th assignment; it never increases. Codes that lose all
    their points are moved onto the worst-served points. Stops after `iters` updates or when the
    relative improvement drops to `tol`. Same seed and inputs on CPU → the same codebook.
    `callback(iteration, mean_sq_dist)`, if given, is called after every assignment.
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [M, d] tensor, got {x.dtype} {tuple(x.shape)}")
    if init not in ("kmeans++", "sample"):
        raise ValueError(f"unknown init {init!r}; choose 'kmeans++' or 'sample'")
    if k < 1 or iters < 0:
        raise ValueError(f"need k ≥ 1 and iters ≥ 0, got k={k}, iters={iters}")
    x = x.float()
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    if sample is not None and sample < x.shape[0]:
        x = x[torch.randperm(x.shape[0], generator=g, device=x.device)[:sample]]
    M = x.shape[0]
    if M < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {M}")
    if init == "kmeans++":
        codes = _kmeanspp_init(x, k, g)
    else:
        codes = x[torch.randperm(M, generator=g, device=x.device)[:k]].clone()
    x64 = x.double()  # centroid sums in fp64: fp32 sums of 10^6 points would drift the means
    history: list[float] = []
    for it in range(iters + 1):
        idx, dist = vq_assign(x, codes, return_distance=True, backend=backend)
        history.append(float(dist.double().mean()))
        if callback is not None:
            callback(it, history[-1])
        if it == iters or (it > 0 and history[-2] - history[-1] <= tol * history[-2]):
            break
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, idx, x64)
        counts = torch.bincount(idx, minlength=k)
        alive = counts > 0
        codes = torch.where(alive[:, None], (sums / counts.clamp(min=1)[:, None]).float(), codes)
        n_dead = int((~alive).sum())
        if n_dead:
            # a code with no points helps nobody: put it on the points that are served worst
            worst = torch.topk(dist, n_dead).indices
            codes[~alive] = x[worst]
    return codes.contiguous(), history
