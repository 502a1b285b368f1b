"""The evaluate stage: SSIM-distance metrics (MMD, COV, 1-NNA), memorisation and classifier score.

Distance D = (1 - SSIM) / 2 with the SSIM pinned in nfkernels.ssim. Definitions follow PointFlow /
HyperDiffusion, with Sg the generated set and Sr the references (|Sg| = |Sr|):
- MMD: mean over references of the distance to their nearest generated sample (lower is better).
- COV: distinct references that are some generated sample's nearest reference, over |Sr| (higher is better).
- 1-NNA: leave-one-out 1-nearest-neighbour accuracy of telling Sg from Sr in their union (0.5 is ideal;
  1.0 means the sets are told apart perfectly). Ties go to the lower index of the union [Sg; Sr].
Every number comes with the real-data oracle beside it: the same count of training-split images in place of
the generated ones, against the same references — what a perfect generator would get.

Nothing here holds an N x M similarity matrix: all nearest-neighbour searches are fused reductions
(nfkernels.ssim.ssim_nearest*), so the stage scales to 10^4 x 10^4 comparisons. Under
`torchrun --nproc-per-node K -m nfgen evaluate …` every search splits its query rows (generated samples,
references, oracle images) into K contiguous ranges: each rank searches its rows against the whole other set,
the rows are all-gathered and the column bests combined; rank 0 writes the metrics. On CPU (cpp and torch
kernels) each pair's SSIM is computed as in one process and the reductions keep its tie rule, so the metrics
equal a one-process run's exactly (tested with 2 gloo processes). The Triton kernels round a pair slightly
differently depending on the rows searched with it (seen: 1e-7 in SSIM), so on GPUs a near-tie may pick
another neighbour.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nfgen import distributed
from nfgen.common import make_generator, pick_device, progress
from nfgen.io import NfgenError, write_json
from nfkernels.ssim import _backend as _ssim_backend  # which kernel a search runs on
from nfkernels.ssim import _same_set, nearest_from_matrix, ssim_distance, ssim_nearest, ssim_nearest_both

MEMORISED_SSIM = 0.95
GENERATE_HINT = "run `nfgen generate` first"
IMAGES_HINT = ("write one with safetensors.torch.save_file({'images': float [N, H, W(, C)] in [0, 1], "
               "'labels': int64 [N] (-1 = unconditional; optional)}, path)")


@dataclass
class ImageSamples:
    """Generated images from any generator, scored like nfgen's own samples (`nfgen evaluate --images`)."""
    images: torch.Tensor  # float32 [N, H, W] or [N, H, W, C] in [0, 1]
    labels: torch.Tensor  # int64 [N]: the class each was generated for, -1 = unconditional


def load_images(path) -> ImageSamples:
    """Read an images file: a plain safetensors file with `images` (float in [0, 1], or uint8 0-255) and
    optionally `labels`; no nfgen metadata needed, so another generator's output scores as it is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NfgenError(f"images file not found: {path}; {IMAGES_HINT}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NfgenError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                         f"{IMAGES_HINT}") from None
    images = tensors.get("images")
    if images is None:
        raise NfgenError(f"{path} holds no 'images' tensor (found: {', '.join(sorted(tensors)) or 'none'}); "
                         f"{IMAGES_HINT}")
    if images.dim() not in (3, 4) or images.shape[0] == 0:
        raise NfgenError(f"{path}: images must be [N, H, W] or [N, H, W, C] with N ≥ 1, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif images.is_floating_point():
        images = images.float()
        if not torch.isfinite(images).all():
            raise NfgenError(f"{path}: images hold {int((~torch.isfinite(images)).sum())} NaN/inf values; "
                             f"fix the generator's output")
        lo, hi = images.min().item(), images.max().item()
        if lo < 0.0 or hi > 1.0:
            raise NfgenError(f"{path}: image values span [{lo:.4g}, {hi:.4g}], SSIM here takes [0, 1] "
                             f"(data_range 1); clamp (or rescale) them to [0, 1] first")
    else:
        raise NfgenError(f"{path}: images are {images.dtype}; store float in [0, 1] or uint8 0-255")
    labels = tensors.get("labels")
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long)
    elif labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or \
            labels.shape != (images.shape[0],):
        raise NfgenError(f"{path}: labels must be integers [N] = [{images.shape[0]}], got {labels.dtype} "
                         f"{list(labels.shape)}")
    return ImageSamples(images=images.contiguous(), labels=labels.long())


# ----------------------------------------------------------------------------- metric definitions

@dataclass
class Nearest:
    """Nearest-neighbour similarities between Sg and Sr, everything the three metrics need."""
    g_to_r: torch.Tensor  # [Ng] SSIM of each generated image to its nearest reference
    g_to_r_index: torch.Tensor  # [Ng] which reference
    r_to_g: torch.Tensor  # [Nr] SSIM of each reference to its nearest generated image
    g_to_g: torch.Tensor  # [Ng] to the nearest *other* generated image (-inf if none)
    r_to_r: torch.Tensor  # [Nr] to the nearest other reference


def _split_nearest(x: torch.Tensor, y: torch.Tensor, *, exclude_self: bool = False, both: bool = False,
                   backend: str = "auto") -> tuple:
    """ssim_nearest (or ssim_nearest_both when `both`) of x against y, x's rows split over the ranks.

    In one process: the nfkernels call itself. Under torchrun each rank searches its contiguous rows [lo, hi)
    of x against y, in three blocks of y ([0, lo), [lo, hi), [hi, M)) when x and y are one set or
    `exclude_self` skips the pairs (i, i); then rows are gathered and column bests combined, ties to the lowest
    index as in one call. The cpp kernel's one-set pass computes each pair once with the lower index as the
    row, and its float rounding is not symmetric, so pairs with an earlier image come from a search of those
    images against this rank's rows: every SSIM value has the bits of the one-process run.
    """
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        if both:
            return ssim_nearest_both(x, y, exclude_self=exclude_self, backend=backend)
        return ssim_nearest(x, y, exclude_self=exclude_self, backend=backend)
    if exclude_self and x.shape[0] != y.shape[0]:
        raise ValueError(f"exclude_self needs x and y of the same length, got {x.shape[0]} and {y.shape[0]}")
    parts = [distributed.shard_range(x.shape[0], r, world) for r in range(world)]
    lo, hi = parts[rank].start, parts[rank].stop
    m, same = y.shape[0], _same_set(x, y)
    lower_as_row = same and _ssim_backend(backend, x, "ssim_nearest") == "cpp"
    row_v = torch.full((hi - lo,), float("-inf"), device=x.device)
    row_i = torch.full((hi - lo,), -1, dtype=torch.long, device=x.device)
    col_v = torch.full((m,), float("-inf"), device=x.device)
    col_i = torch.full((m,), -1, dtype=torch.long, device=x.device)
    blocks = [(0, lo, "before"), (lo, hi, "diagonal"), (hi, m, "after")] if same or exclude_self else [(0, m, "all")]
    for a, b, kind in blocks:
        if hi == lo or b == a:
            continue
        cv, skip_self = None, exclude_self and kind == "diagonal"
        if kind == "before" and lower_as_row:
            cv, ci, v, i = ssim_nearest_both(y[a:b], x[lo:hi], backend=backend)
        elif both:
            v, i, cv, ci = ssim_nearest_both(x[lo:hi], y[a:b], exclude_self=skip_self, backend=backend)
        else:
            v, i = ssim_nearest(x[lo:hi], y[a:b], exclude_self=skip_self, backend=backend)
        if cv is not None:
            col_v[a:b], col_i[a:b] = cv, ci + lo
        better = v > row_v  # strict: an earlier block holds the lower index on ties
        row_v, row_i = torch.where(better, v, row_v), torch.where(better, i + a, row_i)
    counts = [len(p) for p in parts]
    row_v, row_i = distributed.all_gather_rows(row_v, counts), distributed.all_gather_rows(row_i, counts)
    if not both:
        return row_v, row_i
    cv, ci = (distributed.all_gather_rows(t[None], [1] * world) for t in (col_v, col_i))  # [world, M]
    best = cv.argmax(dim=0)  # the first maximum: the lowest rank, so the lowest row index
    return row_v, row_i, cv.gather(0, best[None])[0], ci.gather(0, best[None])[0]


def nearest_sets(sample_images: torch.Tensor, ref_images: torch.Tensor, backend: str = "auto") -> Nearest:
    g_to_r, g_to_r_index, r_to_g, _ = _split_nearest(sample_images, ref_images, both=True, backend=backend)
    g_to_g, _ = _split_nearest(sample_images, sample_images, exclude_self=True, backend=backend)
    r_to_r, _ = _split_nearest(ref_images, ref_images, exclude_self=True, backend=backend)
    return Nearest(*(t.cpu() for t in (g_to_r, g_to_r_index, r_to_g, g_to_g, r_to_r)))


def nearest_from_matrices(sim_gr: torch.Tensor, sim_gg: torch.Tensor, sim_rr: torch.Tensor) -> Nearest:
    """The same from explicit SSIM matrices (hand-made cases in tests, small sets)."""
    g_to_r, g_to_r_index, r_to_g, _ = nearest_from_matrix(sim_gr)
    return Nearest(g_to_r, g_to_r_index, r_to_g, nearest_from_matrix(sim_gg, exclude_self=True)[0],
                   nearest_from_matrix(sim_rr, exclude_self=True)[0])


def metrics_from_nearest(nn: Nearest) -> dict:
    n_refs = nn.r_to_g.numel()
    mmd = ssim_distance(nn.r_to_g.double()).mean().item()
    cov = torch.unique(nn.g_to_r_index).numel() / n_refs
    # A generated image is classified right when its nearest neighbour in the union (itself excluded) is
    # generated; on a tie the generated one wins (it comes first in [Sg; Sr]). A reference is right
    # only when another reference is strictly closer than every generated image.
    right_g = nn.g_to_g >= nn.g_to_r
    right_r = nn.r_to_r > nn.r_to_g
    nna = (right_g.sum() + right_r.sum()).item() / (right_g.numel() + right_r.numel())
    return {"mmd": mmd, "cov": cov, "1nna": nna}


def distance_metrics(sample_images: torch.Tensor, ref_images: torch.Tensor, *, backend: str = "auto") -> dict:
    """{"mmd", "cov", "1nna"} between generated images [N, H, W(, C)] and references [M, H, W(, C)].

    The PointFlow definitions assume |Sg| = |Sr|; evaluate() subsamples to make it so.
    """
    if sample_images.shape[0] < 2 or ref_images.shape[0] < 2:
        raise NfgenError("distance metrics need at least 2 generated and 2 reference images; generate more samples")
    if sample_images.shape[1:] != ref_images.shape[1:]:
        raise NfgenError(f"generated images {tuple(sample_images.shape[1:])} and references "
                         f"{tuple(ref_images.shape[1:])} differ in shape; evaluate against the dataset the "
                         f"fields were fitted on")
    return metrics_from_nearest(nearest_sets(sample_images, ref_images, backend))


def memorisation(sample_images: torch.Tensor, train_images: torch.Tensor, threshold: float = MEMORISED_SSIM, *,
                 exclude_self: bool = False, backend: str = "auto") -> dict:
    """Each generated image's nearest training image; the fraction closer than `threshold` SSIM.

    Returns {"memorised_fraction": float, "nearest_index": int64 [N], "nearest_ssim": float32 [N]}.
    """
    if train_images.shape[0] == 0:
        raise NfgenError("the training split is empty; pass a non-empty --train-split")
    sim, idx = _split_nearest(sample_images, train_images, exclude_self=exclude_self, backend=backend)
    sim, idx = sim.cpu(), idx.cpu()
    frac = (sim > threshold).double().mean().item() if sim.numel() else float("nan")
    return {"memorised_fraction": frac, "nearest_index": idx, "nearest_ssim": sim}


# ----------------------------------------------------------------------------- the stage

def _pick(n_total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct indices of range(n_total), sorted (subsampling without replacement)."""
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def _paired(samples: dict, oracle: dict) -> dict:
    return {k: {"samples": samples[k], "oracle": oracle[k]} for k in samples}


def _group_metrics(name, gen_imgs, ref_imgs, train_imgs, gen, backend) -> dict:
    """Sg vs Sr and the oracle (training images) vs the same Sr, all subsampled to one count."""
    n = min(gen_imgs.shape[0], ref_imgs.shape[0], train_imgs.shape[0])
    out = {"n": n, "available": {"samples": gen_imgs.shape[0], "references": ref_imgs.shape[0],
                                 "oracle": train_imgs.shape[0]}}
    if n < 2:
        out["skipped"] = f"{name}: fewer than 2 images in one of the sets"
        return out
    g, r, o = (imgs[_pick(imgs.shape[0], n, gen).to(imgs.device)] for imgs in (gen_imgs, ref_imgs, train_imgs))
    out.update(_paired(distance_metrics(g, r, backend=backend), distance_metrics(o, r, backend=backend)))
    return out


def _classifier_scores(classifier, images, labels, ref_images, ref_labels, n_classes) -> dict:
    from nfgen.classifier import classify

    def score(imgs, labs):
        logits = classify(classifier, imgs)
        labs = labs.cpu()
        acc = (logits.argmax(1) == labs).double()
        ce = F.cross_entropy(logits.double(), labs, reduction="none")
        per_class = {str(c): {"accuracy": acc[labs == c].mean().item(), "cross_entropy": ce[labs == c].mean().item(),
                              "n": int((labs == c).sum())} for c in range(n_classes) if (labs == c).any()}
        return {"accuracy": acc.mean().item(), "cross_entropy": ce.mean().item(), "n": labs.numel()}, per_class

    s, s_cls = score(images, labels)
    o, o_cls = score(ref_images, ref_labels)
    return {
        "accuracy": {"samples": s["accuracy"], "oracle": o["accuracy"]},
        "cross_entropy": {"samples": s["cross_entropy"], "oracle": o["cross_entropy"]},
        "n": {"samples": s["n"], "oracle": o["n"]},
        "oracle_is": "the classifier on the held-out references (its own held-out accuracy)",
        "per_class": {c: _paired(s_cls[c], o_cls.get(c, {k: None for k in s_cls[c]})) for c in s_cls},
    }


def evaluate(samples, ref, train, classifier=None, *, sample_images: torch.Tensor | None = None, seed: int = 0,
             backend: str = "auto", device="cpu", threshold: float = MEMORISED_SSIM, quiet: bool = False) -> dict:
    """All metrics for generated fields `samples` (nfgen.fields.Fields; label -1 = unconditional) against the
    reference Split `ref`, with the training Split `train` as oracle and memorisation set. With `sample_images`
    given, only `samples.labels` is read (an ImageSamples does)."""
    from nfgen.fields import render_fields

    device = torch.device(device)
    t0 = time.perf_counter()
    if sample_images is None:
        sample_images = render_fields(samples.weights, samples.spec, samples.image_shape, device=device)
    labels = samples.labels.cpu()
    if len(labels) == 0:
        raise NfgenError("no samples to evaluate; generate some first")
    shapes = {"samples": tuple(sample_images.shape[1:]), "references": ref.image_shape, "train": train.image_shape}
    if len(set(shapes.values())) != 1:
        raise NfgenError(f"image shapes differ: {shapes}; evaluate against splits of the dataset the fields "
                         f"were fitted on")
    if labels.min() < -1 or labels.max() >= ref.n_classes:
        raise NfgenError(f"sample labels must be -1 (unconditional) or 0..{ref.n_classes - 1}, found "
                         f"{labels.min().item()}..{labels.max().item()}; is the samples file from this dataset?")
    imgs = sample_images.to(device)
    ref_imgs, train_imgs = ref.images.to(device), train.images.to(device)
    gen = make_generator(seed)
    timing = {"render_s": time.perf_counter() - t0}

    t = time.perf_counter()
    groups = {}
    cond = labels >= 0
    classes = sorted(set(labels[cond].tolist()))
    plan = []
    if cond.any():
        plan.append(("conditional_all", cond, None))
        plan += [(f"class_{c}", labels == c, c) for c in classes]
    if (~cond).any():
        plan.append(("unconditional", ~cond, None))
    for name, mask, c in progress(plan, quiet=quiet, desc="evaluate", unit="group"):
        r_sel = ref.labels == c if c is not None else torch.ones(len(ref), dtype=torch.bool)
        t_sel = train.labels == c if c is not None else torch.ones(len(train), dtype=torch.bool)
        groups[name] = _group_metrics(name, imgs[mask.to(device)], ref_imgs[r_sel.to(device)],
                                      train_imgs[t_sel.to(device)], gen, backend)
    timing["distance_metrics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    mem = memorisation(imgs, train_imgs, threshold, backend=backend)
    # Oracle: as many training images as samples (at most all but one), each against the rest of the split.
    n_o = min(len(labels), len(train) - 1)
    if n_o >= 1:
        o_idx = _pick(len(train), n_o, gen)
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[o_idx] = False
        mem_o = memorisation(train_imgs[o_idx.to(device)], train_imgs[rest.to(device)], threshold, backend=backend)
        o_frac, o_mean = mem_o["memorised_fraction"], mem_o["nearest_ssim"].double().mean().item()
    else:
        o_frac = o_mean = None
    per_class = {}
    for c in classes:
        sel = labels == c
        per_class[str(c)] = {"samples": (mem["nearest_ssim"][sel] > threshold).double().mean().item(),
                             "n": int(sel.sum())}
    memo = {
        "threshold_ssim": threshold,
        "memorised_fraction": {"samples": mem["memorised_fraction"], "oracle": o_frac},
        "mean_nearest_ssim": {"samples": mem["nearest_ssim"].double().mean().item(), "oracle": o_mean},
        "n": {"samples": len(labels), "oracle": n_o, "train": len(train)},
        "oracle_is": "training images, each against the rest of the training split",
        "per_class": per_class,
    }
    timing["memorisation_s"] = time.perf_counter() - t

    result = {
        "ssim": "skimage structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, "
                "data_range=1.0); distance (1 - SSIM) / 2",
        "subsampling": "per group, generated, reference and oracle sets are subsampled without replacement to the "
                       "smallest of the three counts (seeded), so |Sg| = |Sr| = |oracle| = n",
        "seed": seed,
        "sizes": {"samples": len(labels), "conditional": int(cond.sum()), "unconditional": int((~cond).sum()),
                  "references": len(ref), "train": len(train), "image_shape": list(ref.image_shape)},
        "splits": {"references": ref.spec, "train": train.spec},
        "groups": groups,
        "memorisation": memo,
    }
    if classifier is not None and cond.any():
        t = time.perf_counter()
        result["classifier"] = _classifier_scores(classifier, imgs[cond.to(device)], labels[cond], ref.images,
                                                  ref.labels, ref.n_classes)
        timing["classifier_s"] = time.perf_counter() - t
    result["timing"] = timing
    result["_nearest_train_index"] = mem["nearest_index"]  # for the picture; dropped before writing JSON
    return result


def save_nearest_grid(path, sample_images, labels, train_images, nearest_index, per_row: int = 8) -> None:
    """PNG: per group (class or unconditional), a row of samples above a row of their nearest training images."""
    from nfgen.render import blank_cells, save_grid

    rows, names = [], []
    for c in sorted(set(labels.tolist())):
        sel = torch.nonzero(labels == c).flatten()[:per_row]
        name = "uncond" if c < 0 else str(c)
        for imgs, tag in ((sample_images[sel], "gen"), (train_images[nearest_index[sel]], "nn")):
            rows.append(torch.cat([imgs.cpu().float(), blank_cells(per_row - imgs.shape[0], imgs.shape[1:])]))
            names.append(f"{name} {tag}")
    save_grid(torch.cat(rows), path, nrow=per_row, row_labels=names)


def headline(result: dict, path) -> str:
    """The numbers a person looks for first, each beside its oracle, as a few lines of text."""
    def pair(d: dict, fmt: str) -> str:
        return f"{d['samples']:{fmt}} (oracle {d['oracle']:{fmt}})"

    splits = result["splits"]
    lines = [f"evaluate against {splits['references']}, oracle from {splits['train']} → {path}"]
    for name, title in (("conditional_all", "class-conditional"), ("unconditional", "unconditional")):
        g = result["groups"].get(name)
        if g:
            lines.append(f"  {title} ({g['n']}): MMD {pair(g['mmd'], '.4f')}, COV {pair(g['cov'], '.3f')}, "
                         f"1-NNA {pair(g['1nna'], '.3f')}")
    mem = result["memorisation"]["memorised_fraction"]
    scores = [f"memorised {pair(mem, '.3f')}"]
    if result.get("classifier"):
        scores.insert(0, f"classifier accuracy {pair(result['classifier']['accuracy'], '.3f')}")
    lines.append("  " + ", ".join(scores))
    return "\n".join(lines)


def default_splits(samples_meta: dict, ref_split: str | None, train_split: str | None) -> tuple[str, str]:
    """(references, training images) for evaluate: the training split defaults to the one the samples' GPT
    was trained on (recorded by generate / baseline), else DEFAULT_TRAIN_SPLIT; the references default to
    DEFAULT_HELDOUT_SPLIT, for MNIST only: another dataset's held-out images are the caller's to name."""
    from nfgen.data import DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT, parse_split, same_dataset
    from nfgen.fields import training_split

    train_split = train_split or training_split(samples_meta) or DEFAULT_TRAIN_SPLIT
    if ref_split is None:
        if not same_dataset(train_split, DEFAULT_HELDOUT_SPLIT):
            raise NfgenError(f"the samples come from {train_split}; name held-out {parse_split(train_split)[0]} "
                             f"images as references with --ref-split (the default, {DEFAULT_HELDOUT_SPLIT}, is MNIST)")
        ref_split = DEFAULT_HELDOUT_SPLIT
    return ref_split, train_split


def check_held_out(ref, train) -> None:
    """Refuse references that are also training images: the oracle and memorisation would score copies."""
    from nfgen.data import shared_images

    if shared := shared_images(ref, train):
        images = "image" if shared == 1 else "images"
        raise NfgenError(f"{ref.spec} and {train.spec} share {shared} {images}; the references must be held out: "
                         f"pass a --ref-split (or --train-split) that does not overlap the other")


def run_evaluate(samples_path, out_dir, *, ref_split: str | None = None, train_split: str | None = None,
                 classifier_path=None, data_root=None, device: str = "auto", seed: int = 0, backend: str = "auto",
                 quiet: bool = False, images_path=None) -> dict:
    """Load, evaluate, write out_dir/metrics.json and out_dir/nearest.png; returns the metrics.

    The samples are generated fields (`samples_path`, rendered here) or, with `images_path`, an images file
    (load_images) from any generator. Unnamed splits default as `default_splits` says. Under torchrun the
    nearest-neighbour searches are split over the ranks and rank 0 writes the files."""
    from nfgen.data import load_split
    from nfgen.fields import load_fields, render_fields

    t0 = time.perf_counter()
    distributed.init_from_env(device)
    dev = pick_device(device)
    source = images_path if images_path is not None else samples_path
    samples = load_images(images_path) if images_path is not None else load_fields(samples_path, hint=GENERATE_HINT)
    ref_split, train_split = default_splits(getattr(samples, "meta", {}), ref_split, train_split)
    ref = load_split(ref_split, data_root=data_root)
    train = load_split(train_split, data_root=data_root)
    check_held_out(ref, train)
    shape = tuple(samples.images.shape[1:]) if images_path is not None else tuple(samples.image_shape)
    if shape != tuple(ref.image_shape):
        raise NfgenError(f"{source} holds {shape} images but {ref_split} has {tuple(ref.image_shape)}; evaluate "
                         f"against the dataset the {'images' if images_path is not None else 'fields'} come from")
    classifier = None
    if classifier_path is not None:
        from nfgen.classifier import check_classifier_fits, load_classifier

        classifier = load_classifier(classifier_path, dev)
        check_classifier_fits(classifier, shape)  # before the searches, not after them
    if images_path is not None:
        images = samples.images.to(dev)
    else:
        images = render_fields(samples.weights, samples.spec, samples.image_shape, device=dev)
    result = evaluate(samples, ref, train, classifier, sample_images=images, seed=seed, backend=backend, device=dev,
                      quiet=quiet or not distributed.is_main())
    nearest = result.pop("_nearest_train_index")
    out_dir = Path(out_dir)
    result["inputs"] = {"samples" if images_path is None else "images": str(source),
                        "classifier": str(classifier_path) if classifier_path else None,
                        "device": str(dev), "backend": backend, "world_size": distributed.world_size()}
    result["timing"]["total_s"] = time.perf_counter() - t0
    if distributed.is_main():  # every rank holds the same metrics; rank 0 writes them
        save_nearest_grid(out_dir / "nearest.png", images.cpu(), samples.labels, train.images, nearest)
        write_json(out_dir / "metrics.json", result)
        if not quiet:
            print(headline(result, out_dir / "metrics.json"))
    distributed.barrier()  # no rank returns before metrics.json exists
    return result
