"""Next-token sampling from logits [B, V]: classifier-free guidance, temperature, top-k, top-p, the draw.

Semantics shared by every backend, in this order:
  1. CFG mix (when `uncond_logits` is given):  l = l_u + s * (l_c - l_u)   (l = l_c where both are equal,
     so a token masked to -inf in both stays -inf instead of becoming NaN)
  2. temperature:                              l = l / T
  3. top-k (k > 0):  keep l_i >= the k-th largest value (ties at the threshold are all kept)
  4. top-p (p < 1):  with q = softmax(l), keep l_i >= the value of the first token, in descending order,
     at which the cumulative mass reaches p (ties kept; the most likely token always survives)
  5. draw one token from softmax(l) over the kept tokens.

The reference (`sample_next_reference`) draws with torch's exponential RNG from `generator`. The fast
backends use a counter-based RNG instead (a 64-bit hash in torch/C++, Philox in Triton) keyed by a seed
tensor that is itself drawn *on the device* from `generator`: nothing ever syncs with the host, so a
decode loop (or a CUDA graph replaying it) never waits. The draw is an exponential race:
argmax_i q_i / E_i with E_i ~ Exp(1) picks token i with probability q_i.
"""
from __future__ import annotations

import math

import torch

from nfkernels._ext import HAS_TRITON, resolve_backend

SEED_HIGH = 2**62  # seeds are drawn uniformly from [0, SEED_HIGH)


def _check(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed=None) -> None:
    """Host-side validation of Python numbers and shapes only (never reads device values)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor [B, V], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor) or uncond_logits.shape != logits.shape:
            raise ValueError(f"uncond_logits must have the shape of logits {tuple(logits.shape)}, got "
                             f"{tuple(getattr(uncond_logits, 'shape', ()))}")
        if uncond_logits.device != logits.device:
            raise ValueError(f"uncond_logits is on {uncond_logits.device}, logits on {logits.device}")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != logits.device):
        raise ValueError("seed must be a one-element int64 tensor on the logits' device")


def filtered_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    uncond_logits: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """Steps 1-4 above in float32: the logits whose softmax is the sampling distribution (-inf = removed)."""
    lg = logits.float()
    if uncond_logits is not None:
        lu = uncond_logits.float()
        lg = torch.where(lg == lu, lg, lu + cfg_scale * (lg - lu))
    lg = lg / temperature
    # masked_fill with a Python scalar (not torch.tensor(-inf, device=...)): no host-to-device copy, so this
    # also runs inside a CUDA graph capture
    if 0 < top_k < lg.shape[1]:
        kth = torch.topk(lg, top_k, dim=1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if top_p < 1.0:
        srt = torch.sort(lg, dim=1, descending=True).values
        cum = torch.softmax(srt, dim=1).cumsum(dim=1)
        n_keep = ((cum < top_p).sum(dim=1, keepdim=True) + 1).clamp(max=lg.shape[1])
        thr = srt.gather(1, n_keep - 1)
        lg = lg.masked_fill(lg < thr, float("-inf"))
    return lg


def sample_next_reference(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          generator: torch.Generator | None = None, uncond_logits: torch.Tensor | None = None,
                          cfg_scale: float = 1.0) -> torch.Tensor:
    """Obviously-correct sampler: softmax of the filtered logits, exponential race with torch's RNG. → int64 [B]."""
    _check(logits, temperature, top_k, top_p, uncond_logits, cfg_scale)
    probs = torch.softmax(filtered_logits(logits, temperature, top_k, top_p, uncond_logits, cfg_scale), dim=1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=1)


# --- counter-based RNG shared by the torch and C++ backends ---------------------------------------------
# splitmix64 of (seed + golden * (counter + 1)); counter = row * V + col. Written with int64 tensors,
# whose multiplication wraps modulo 2^64 like the C++ uint64 version; logical shifts are emulated by masking.
def _u64(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN, _MIX1, _MIX2 = _u64(0x9E3779B97F4A7C15), _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB)


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(seed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float64 uniforms in (0, 1) from (seed, flat index); bit-identical to csrc/sampling_cpu.cpp."""
    counter = torch.arange(1, shape[0] * shape[1] + 1, device=seed.device, dtype=torch.int64).view(shape)
    z = seed.view(1, 1) + counter * _GOLDEN
    z = (z ^ _lshr(z, 30)) * _MIX1
    z = (z ^ _lshr(z, 27)) * _MIX2
    z = z ^ _lshr(z, 31)
    return (_lshr(z, 11).double() + 0.5) * 2.0**-53


def _sample_torch(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed) -> torch.Tensor:
    lg = filtered_logits(logits, temperature, top_k, top_p, uncond_logits, cfg_scale)
    weight = torch.exp(lg - lg.max(dim=1, keepdim=True).values).double()  # unnormalised probs; 0 where removed
    race = -torch.log(hash_uniform(seed, tuple(lg.shape)))
    return torch.argmax(weight / race, dim=1)


def _sample_cpp(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed) -> torch.Tensor:
    return torch.ops.nfkernels.sample_next(logits, uncond_logits, float(cfg_scale), float(temperature),
                                           int(top_k), float(top_p), seed)


def _sample_triton(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed) -> torch.Tensor:
    from nfkernels.sampling_triton import sample_next_triton

    return sample_next_triton(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed)


_IMPLS = {"torch": _sample_torch, "cpp": _sample_cpp, "triton": _sample_triton}


def draw_seed(generator: torch.Generator | None, device: torch.device, n: int = 1) -> torch.Tensor:
    """n int64 seeds drawn on `device` from `generator` (no host sync)."""
    return torch.randint(0, SEED_HIGH, (n,), generator=generator, device=device, dtype=torch.int64)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None, *, uncond_logits: torch.Tensor | None = None,
                cfg_scale: float = 1.0, seed: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Sample one token per row of `logits` [B, V] → int64 [B] on the logits' device, without host sync.

    `seed` (one-element int64 tensor on the logits' device) keys the counter-based RNG directly; by default it
    is drawn from `generator` on the device. Passing seeds lets a CUDA graph replay with fresh randomness.
    The same seed gives the same tokens for a given backend and device; `torch` and `cpp` share their RNG.
    """
    _check(logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed)
    if uncond_logits is not None and cfg_scale == 1.0:
        uncond_logits = None  # l_u + 1 * (l_c - l_u) = l_c
    if top_k >= logits.shape[1]:
        top_k = 0
    impl = resolve_backend(backend, logits.device, "sample_next", cpp=True, cuda=False, triton=HAS_TRITON)
    if seed is None:
        seed = draw_seed(generator, logits.device)
    return _IMPLS[impl](logits, temperature, top_k, top_p, uncond_logits, cfg_scale, seed)


__all__ = ["sample_next", "sample_next_reference", "filtered_logits", "draw_seed", "hash_uniform"]
