"""nfkernels: batched ops for weight-space learning on neural fields.

Each op has a pure-torch reference and fast implementations (C++ CPU, CUDA, Triton) behind one
dispatching function with a ``backend=`` override ("auto", "torch", "cpp", "cuda", "triton").
This package does not depend on nfgen.
"""
from nfkernels._ext import BACKENDS, HAS_EXT, HAS_TRITON
from nfkernels.decode_attention import decode_attention, decode_attention_reference
from nfkernels.sampling import sample_next, sample_next_reference
from nfkernels.siren import (SirenSpec, coord_grid, siren_fit_steps, siren_fit_steps_reference, siren_forward,
                             siren_forward_reference, siren_init)
from nfkernels.ssim import pairwise_ssim, pairwise_ssim_reference, ssim_nearest, ssim_nearest_both
from nfkernels.vq import kmeans, vq_assign, vq_assign_reference

__all__ = [
    "BACKENDS", "HAS_EXT", "HAS_TRITON",
    "SirenSpec", "coord_grid", "siren_init", "siren_forward", "siren_forward_reference",
    "siren_fit_steps", "siren_fit_steps_reference",
    "vq_assign", "vq_assign_reference", "kmeans",
    "sample_next", "sample_next_reference",
    "decode_attention", "decode_attention_reference",
    "pairwise_ssim", "pairwise_ssim_reference", "ssim_nearest", "ssim_nearest_both",
]
