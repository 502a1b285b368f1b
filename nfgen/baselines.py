"""Reference generators that need no training: what a generative model of fields has to beat.

`gaussian_samples` draws from a Gaussian per class (its sample mean and covariance) over any vectors: fitted
weights (rendered afterwards) or pixels. A weight-space GPT that scores no better than the weight-space
Gaussian has learned little beyond the weights' means and correlations; the pixel-space Gaussian is the
same trivial model where no field stands between it and the image.

`nfgen baseline` (`run_baseline`) samples the weight-space Gaussian of a run's fitted fields into a samples
file laid out like `nfgen generate`'s, so `nfgen evaluate` scores it with the same metrics:

    nfgen baseline --run R --per-class 200                       # R/baseline/samples.safetensors, samples.png
    nfgen evaluate --run R/baseline --classifier R/classifier.safetensors
"""
from __future__ import annotations

import math
import time

import torch

from nfgen.common import make_generator
from nfgen.io import NfgenError


def gaussian_samples(x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """One draw per entry of `classes` [M] from the Gaussian of the rows of x [N, D] with that label → [M, D].

    Class c's Gaussian has the sample mean and covariance (ddof 1) of the rows with labels == c; class -1
    (unconditional) uses every row. A draw is mean + zᵀ(x_c − mean) / √(n_c − 1) with z ~ N(0, I_{n_c}):
    the exact covariance without forming the D×D matrix. Classes are drawn in ascending order, each as one
    block of normals from `generator`, so the result depends only on the inputs and the generator's state.
    Computed in float64, returned in x's dtype.
    """
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise NfgenError(f"gaussian_samples wants x [N, D] and labels [N], got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    labels, classes = labels.cpu(), classes.cpu()
    out = torch.empty(len(classes), x.shape[1], dtype=torch.float64)
    for c in classes.unique().tolist():  # sorted
        rows = x if c == -1 else x[labels == c]
        if rows.shape[0] < 2:
            raise NfgenError(f"class {c} has {rows.shape[0]} example(s); a Gaussian needs at least 2: use a larger "
                             f"training split")
        rows = rows.double().cpu()
        mean = rows.mean(0)
        want = classes == c
        z = torch.randn(int(want.sum()), rows.shape[0], generator=generator, dtype=torch.float64)
        out[want] = mean + z @ (rows - mean) / math.sqrt(rows.shape[0] - 1)
    return out.to(x.dtype)


def run_baseline(fields_path, out_dir, *, per_class: int = 10, unconditional: int = 0, seed: int = 0) -> dict:
    """Sample the per-class Gaussian over a fields file's weights → OUT/samples.safetensors and OUT/samples.png."""
    from nfgen.fields import load_fields
    from nfgen.generate import check_sample_counts, classes_to_sample, save_samples

    check_sample_counts(per_class, unconditional)  # before loading anything
    fields = load_fields(fields_path)
    if fields.meta.get("generated") or (fields.labels < 0).any():
        raise NfgenError(f"{fields_path} holds {'generated' if fields.meta.get('generated') else 'unlabelled'} "
                         f"fields; pass the fitted training fields (`nfgen fit`'s fields.safetensors)")
    n_classes = int(fields.labels.max()) + 1
    classes = classes_to_sample(n_classes, per_class, unconditional)
    t0 = time.perf_counter()
    weights = gaussian_samples(fields.weights, fields.labels, classes, make_generator(seed))
    seconds = time.perf_counter() - t0
    samples, png = save_samples(out_dir, weights, classes, fields.spec, fields.image_shape, n_classes,
                                {"baseline": "per-class Gaussian over the weights", "fields": str(fields_path),
                                 "seed": seed})
    return {"n_fields": len(classes), "samples": str(samples), "png": str(png), "fitted_fields": len(fields),
            "seconds": round(seconds, 3)}
