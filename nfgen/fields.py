"""The fit stage: one SIREN per image, fitted in chunks of stacked [N, P] weight tensors.

Every field of a chunk is trained at once by nfkernels.siren_fit_steps (Adam on the per-field MSE summed
over fields, so a field's trajectory does not depend on which chunk it is in). The lr is held constant
within each call of `steps_per_call` fused steps; `lr_final_ratio` < 1 gives a cosine decay across calls.

Tuning (2→32→32→1, ω0 30, shared init, 2-core CPU, measured without a clamp margin, which came later and
is measured in docs/quality.md): PSNR of the rendered, clamped fields, and of the same
fields after scalar VQ of the raw weights with 256 codes (the tokenizer before mean-centring, `--center none`).
With raw codes a higher lr fits tighter but costs VQ PSNR:

    steps  lr      schedule  fit mean/min dB  VQ mean/min dB   (128 images: mnist:test[:128])
    100    4e-3    cosine      49.4 / 41.9      31.8 / 28.4
    100    8e-3    cosine      57.3 / 48.2      30.5 / 27.2
    100    1.2e-2  cosine      58.6 / 49.5      27.9 / 25.1
    200    4e-3    cosine      68.0 / 51.9      31.5 / 28.6
    200    8e-3    cosine      89.4 / 68.5      30.1 / 26.8
    200    1.2e-2  cosine      95.9 / 69.5      28.6 / 24.5
    300    4e-3    cosine      85.7 / 60.8      31.8 / 28.2
    100    2e-3    cosine      40.0 / 33.8      33.2 / 30.0
    200    3e-3    cosine      59.0 / 47.0      32.1 / 29.1
    150    2e-3    constant    56.2 / 45.3      33.1 / 30.4
    200    2e-3    constant    65.3 / 49.8      33.5 / 30.5
    200    1e-3    constant    48.8 / 38.7      34.2 / 31.7
    200    1.5e-3  constant    57.0 / 46.5      34.0 / 30.6   <- default: ≥ 40 dB fits with margin, near-best VQ
    300    1.5e-3  constant    70.9 / 53.2      33.8 / 31.0

With the tokenizer's mean-centring (`--center mean`) the de-tokenized PSNR follows the fit instead: on 1000
images, fits of 100 steps at 1e-3 / 200 at 1e-3 / 200 at 1.5e-3 / 300 at 3e-3 give 37.7 / 48.5 / 56.9 / 66.2 dB
fitted and 37.6 / 46.8 / 50.4 / 50.9 dB de-tokenized (`python -m benchmarks.tokenize_quality`,
benchmarks/results/tokenize-quality-cpu.json). The default stays at 200 steps, 1.5e-3.

steps_per_call barely matters for quality (200 steps, 4e-3 cosine, 64 images: 10 → 65.7, 25 → 68.2,
50 → 72.3 dB mean: coarser cosine steps hold the lr higher) and 25 amortises the per-call overhead.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nfgen import __version__, distributed
from nfgen.common import make_generator, pick_device, progress
from nfgen.io import NfgenError, check_finite, load_artifact, read_header, save_artifact
from nfkernels import SirenSpec, coord_grid, siren_fit_steps, siren_forward, siren_init

FIT_HINT = "run `nfgen fit` first"
PSNR_CAP_MSE = 1e-10  # an exact fit would give inf dB; cap at 100 dB so summaries stay finite
COLLAPSE_DB = 10.0  # a field ending this far below its best PSNR during the fit counts as diverged


@dataclass
class FitConfig:
    hidden: int = 32
    hidden_layers: int = 2
    omega0: float = 30.0
    steps: int = 200
    lr: float = 1.5e-3  # see the tables above
    lr_final_ratio: float = 1.0  # cosine decay from lr to lr * lr_final_ratio; 1.0 (default) is a constant lr
    chunk: int = 1024  # fields fitted together
    init: str = "shared"  # "shared": every field starts from one template; "independent": own draw each
    template: str | None = None  # "PATH[:INDEX]" of a fields file (`nfgen template`'s) whose field starts every fit
    seed: int = 0
    target_psnr: float | None = None  # freeze a field once it reaches this PSNR (dB; of the fit targets, see below)
    # Pixels at exactly 0 (1) are fitted to -clamp_margin (1 + clamp_margin); the renderer's clamp to [0, 1] maps
    # them back, so a field renders its image unchanged while any weight error (tokenizing, a GPT's sampling) that
    # moves such a pixel by less than the margin stays invisible. MNIST's test set is 81 % exact zeros, where those
    # errors showed as grey speckle. None: the margin the template was learned with (`nfgen template` uses 0.3), 0
    # without a template: from the random draw the margin made the demo's samples worse (docs/quality.md,
    # "Clamp margin").
    clamp_margin: float | None = None
    steps_per_call: int = 25  # fused steps per siren_fit_steps call (progress and early stop run between)
    backend: str = "auto"
    # the Triton kernel's hidden×hidden products: on tensor cores ("tf32", "tf32x3") or exact fp32 ("ieee"); the
    # torch and C++ backends are always exact fp32. tf32 halves the quality recipe's fit on the H100 for 0.04 dB
    # (benchmarks/results/fit-precision-h100.json), inside the 0.1 dB issue 3 allows a mixed-precision fit
    dot_precision: str = "tf32"
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be positive (got {self.lr})")
        if not 0.0 <= self.lr_final_ratio <= 1.0:
            problems.append(f"lr_final_ratio must be in [0, 1] (got {self.lr_final_ratio})")
        if self.chunk < 1:
            problems.append(f"chunk must be >= 1 (got {self.chunk})")
        if self.steps_per_call < 1:
            problems.append(f"steps_per_call must be >= 1 (got {self.steps_per_call})")
        if self.init not in ("shared", "independent"):
            problems.append(f"init must be 'shared' or 'independent' (got {self.init!r})")
        if self.dot_precision not in ("ieee", "tf32", "tf32x3"):
            problems.append(f"dot_precision must be ieee, tf32 or tf32x3 (got {self.dot_precision!r})")
        if self.clamp_margin is not None and not (0.0 <= self.clamp_margin <= 1.0):
            problems.append(f"clamp_margin must be in [0, 1] (got {self.clamp_margin})")
        if self.target_psnr is not None and not (self.target_psnr > 0 and math.isfinite(self.target_psnr)):
            problems.append(f"target_psnr must be a positive number of dB (got {self.target_psnr})")
        if self.template is not None and self.init != "shared":
            problems.append("a template only makes sense with init='shared'")
        if self.hidden < 1 or self.hidden_layers < 1 or not (self.omega0 > 0 and math.isfinite(self.omega0)):
            problems.append(f"invalid SIREN shape hidden={self.hidden} hidden_layers={self.hidden_layers} "
                            f"omega0={self.omega0}")
        if problems:
            raise NfgenError(f"bad fit config: {'; '.join(problems)}; fix the option(s)")


@dataclass
class FitResult:
    weights: torch.Tensor  # [N, P] float32, on CPU
    psnr: torch.Tensor  # [N] float32 of the rendered (clamped) field vs the image
    spec: SirenSpec
    retried: list[int] = field(default_factory=list)  # fields that diverged once and were refitted
    failed: list[int] = field(default_factory=list)  # fields that diverged again: never write these
    seconds: float = 0.0


@dataclass
class Fields:
    weights: torch.Tensor  # [N, P] float32
    labels: torch.Tensor  # [N] int64
    psnr: torch.Tensor  # [N] float32
    spec: SirenSpec
    image_shape: tuple
    meta: dict

    def __len__(self) -> int:
        return self.weights.shape[0]


# ----------------------------------------------------------------------------- shapes and metrics

def spec_for_images(image_shape: tuple, hidden: int, hidden_layers: int, omega0: float) -> SirenSpec:
    """[H, W] → 2-D coords, 1 output; [H, W, C] → 2-D coords, C outputs."""
    out_dim = 1 if len(image_shape) == 2 else image_shape[2]
    return SirenSpec(in_dim=2, hidden=hidden, hidden_layers=hidden_layers, out_dim=out_dim, omega0=omega0)


def stored_image_shape(value, path, fix: str) -> tuple[int, ...]:
    """An artifact's "image_shape" metadata as (H, W) or (H, W, C) of positive ints, or NfgenError naming `path`."""
    ok = isinstance(value, list) and len(value) in (2, 3) and all(type(v) is int and v > 0 for v in value)
    if not ok:
        raise NfgenError(f"{path} has an invalid image_shape {value!r} in its metadata (want [H, W] or [H, W, C]); "
                         f"recreate it{fix}")
    return tuple(value)


def _check_image_shape(spec: SirenSpec, image_shape: tuple, where: str) -> None:
    ok = len(image_shape) in (2, 3) and spec.in_dim == 2 and spec.out_dim == (
        1 if len(image_shape) == 2 else image_shape[2])
    if not ok:
        raise NfgenError(f"{where}: image shape {tuple(image_shape)} does not match the SIREN "
                         f"{spec.in_dim}→{spec.out_dim}; recreate the fields file")


def fit_targets(images: torch.Tensor, clamp_margin: float) -> torch.Tensor:
    """What a field is fitted to: the image, with exact 0 and 1 pushed out to -margin and 1 + margin.

    clamp(fit_targets(y, m), 0, 1) == y for every y in [0, 1], so the rendered (clamped) field still shows the
    image; the margin is room for weight errors that the clamp then hides.
    """
    if clamp_margin == 0.0:
        return images
    return torch.where(images <= 0.0, -clamp_margin, torch.where(images >= 1.0, 1.0 + clamp_margin, images))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with data range 1: [N, ...] × [N, ...] → [N] float32."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(PSNR_CAP_MSE))


def render_fields(weights: torch.Tensor, spec: SirenSpec, image_shape: tuple, backend: str = "auto",
                  device=None, batch: int = 4096) -> torch.Tensor:
    """Evaluate fields on the pixel grid: [N, P] → images [N, *image_shape] in [0, 1] on `device`."""
    image_shape = tuple(int(s) for s in image_shape)
    _check_image_shape(spec, image_shape, "render_fields")
    device = torch.device(device) if device is not None else weights.device
    coords = coord_grid(image_shape[:2], device=device)
    out = []
    with torch.no_grad():
        for start in range(0, weights.shape[0], batch):
            w = weights[start:start + batch].to(device=device, dtype=torch.float32)
            out.append(siren_forward(w, coords, spec, backend=backend).clamp_(0.0, 1.0))
    if not out:
        return torch.zeros((0, *image_shape), device=device)
    return torch.cat(out).reshape(-1, *image_shape)


# ----------------------------------------------------------------------------- init

def parse_template(template: str) -> tuple[Path, int]:
    """"PATH" or "PATH:INDEX" → (path, index); the index defaults to 0."""
    m = re.fullmatch(r"(.+):(\d+)", template)
    if m and not Path(template).exists():
        return Path(m.group(1)), int(m.group(2))
    return Path(template), 0


def template_weights(cfg: FitConfig, spec: SirenSpec) -> torch.Tensor:
    """The [1, P] weights every field starts from under shared init."""
    if cfg.template is None:
        return siren_init(spec, 1, make_generator(cfg.seed))
    path, index = parse_template(cfg.template)
    fields = load_fields(path, hint="pass a fields file made by `nfgen fit` as --template PATH[:INDEX]")
    if fields.spec != spec:
        raise NfgenError(f"template {path} has architecture {fields.spec.to_dict()} but this fit uses "
                         f"{spec.to_dict()}; pick a template with the same architecture or drop --template")
    if not 0 <= index < len(fields):
        raise NfgenError(f"template index {index} is out of range: {path} holds {len(fields)} fields; "
                         f"use PATH:INDEX with 0 <= INDEX < {len(fields)}")
    return fields.weights[index:index + 1].clone()


def independent_init(spec: SirenSpec, seed: int, indices: list[int], attempt: int = 0) -> torch.Tensor:
    """Each field its own siren_init draw, seeded by (seed, field index, attempt): the same whatever the chunking."""
    draws = [siren_init(spec, 1, make_generator((seed * 0x9E3779B1 + 2 * i + attempt) % 2**63)) for i in indices]
    return torch.cat(draws) if draws else torch.zeros(0, spec.num_params)


# ----------------------------------------------------------------------------- fitting

def lr_at(cfg: FitConfig, step: int) -> float:
    """Cosine decay from cfg.lr to cfg.lr * cfg.lr_final_ratio over cfg.steps."""
    floor = cfg.lr * cfg.lr_final_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))


def _fit_batch(start: torch.Tensor, target: torch.Tensor, coords: torch.Tensor, spec: SirenSpec,
               cfg: FitConfig, lr_scale: float = 1.0, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one stacked batch from `start` weights; returns (weights, diverged mask [n])."""
    params = start.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
    n = params.shape[0]
    active = torch.ones(n, dtype=torch.bool, device=params.device)
    diverged = torch.zeros_like(active)
    best_db = torch.full((n,), -math.inf, device=params.device)
    done = 0
    while done < cfg.steps and bool(active.any()):
        k = min(cfg.steps_per_call, cfg.steps - done)
        mse = siren_fit_steps(params, exp_avg, exp_avg_sq, done, coords, target, spec,
                              lr=lr_at(cfg, done) * lr_scale, n_steps=k, active=active, backend=cfg.backend,
                              dot_precision=cfg.dot_precision)
        done += k
        # A NaN/inf field is frozen at once (its weights are garbage; it gets re-initialised later).
        bad = ~torch.isfinite(mse) | ~torch.isfinite(params).all(dim=1)
        diverged |= bad & active
        active &= ~bad
        db = -10.0 * torch.log10(mse.clamp_min(PSNR_CAP_MSE))
        best_db = torch.where(active, torch.maximum(best_db, db), best_db)
        if cfg.target_psnr is not None:
            active &= ~(db >= cfg.target_psnr)
        if bar is not None:
            bar.update(k)
            ok = ~diverged
            bar.set_postfix(psnr=f"{float(db[ok].mean()) if ok.any() else float('nan'):.1f}",
                            active=int(active.sum()))
    final_db = psnr(siren_forward(params, coords, spec, backend=cfg.backend).detach(), target)
    diverged |= ~torch.isfinite(final_db) | (final_db < best_db - COLLAPSE_DB)
    return params, diverged


def with_clamp_margin(cfg: FitConfig) -> FitConfig:
    """`cfg` with clamp_margin resolved: a given one stays; None takes the template's (0 for a template that was
    not learned with one, or without a template)."""
    if cfg.clamp_margin is not None:
        return cfg
    margin = 0.0
    if cfg.template is not None and cfg.init == "shared":
        path, _ = parse_template(cfg.template)
        meta = load_fields(path, hint="pass a fields file made by `nfgen fit` as --template PATH[:INDEX]").meta
        margin = float(meta.get("template_recipe", {}).get("clamp_margin", 0.0))
    return replace(cfg, clamp_margin=margin)


def fit_fields(images: torch.Tensor, cfg: FitConfig, *, first_index: int = 0) -> FitResult:
    """Fit one SIREN to each image ([N, H, W] or [N, H, W, C] in [0, 1]), `cfg.chunk` at a time.

    `first_index` is the split position of images[0] (a shard of a bigger split): independent init seeds
    each field by its split position, so a shard's fields equal those of a whole-split fit.

    Fields that diverge (NaN/inf loss, or a PSNR collapse) are re-initialised and refitted once at half
    the lr; those that fail again are listed in `failed` (their weights are not usable).
    """
    cfg.validate()
    cfg = with_clamp_margin(cfg)
    if images.dim() not in (3, 4) or images.shape[0] == 0:
        raise NfgenError(f"fit_fields wants images [N, H, W] or [N, H, W, C] with N >= 1, got "
                         f"{tuple(images.shape)}; pass a non-empty image split")
    check_finite("images", images, "pass images in [0, 1]")
    device = pick_device(cfg.device)
    image_shape = tuple(images.shape[1:])
    spec = spec_for_images(image_shape, cfg.hidden, cfg.hidden_layers, cfg.omega0)
    coords = coord_grid(image_shape[:2], device=device)
    shared = template_weights(cfg, spec).to(device) if cfg.init == "shared" else None

    def start_weights(idx: list[int], attempt: int) -> torch.Tensor:
        if shared is not None:
            return shared.expand(len(idx), -1).clone()
        return independent_init(spec, cfg.seed, [first_index + i for i in idx], attempt).to(device)

    n = images.shape[0]
    weights = torch.empty(n, spec.num_params)
    retried, failed = [], []
    t0 = time.perf_counter()
    n_chunks = math.ceil(n / cfg.chunk)
    for ci, lo in enumerate(range(0, n, cfg.chunk)):
        idx = list(range(lo, min(lo + cfg.chunk, n)))
        target = images[lo:idx[-1] + 1].to(device=device, dtype=torch.float32).reshape(len(idx), -1, spec.out_dim)
        target = fit_targets(target, cfg.clamp_margin)
        with progress(total=cfg.steps, desc=f"fit chunk {ci + 1}/{n_chunks}", quiet=cfg.quiet, leave=False) as bar:
            params, diverged = _fit_batch(start_weights(idx, 0), target, coords, spec, cfg, bar=bar)
        bad = diverged.nonzero().flatten().tolist()
        if bad:
            # Retry once from a fresh start at half the lr: the same start and lr would diverge again.
            again, diverged2 = _fit_batch(start_weights([idx[i] for i in bad], 1), target[bad], coords, spec,
                                          cfg, lr_scale=0.5)
            params[bad] = again
            retried += [idx[i] for i in bad]
            failed += [idx[i] for i, d in zip(bad, diverged2.tolist()) if d]
        weights[lo:lo + len(idx)] = params.detach().cpu()
    seconds = time.perf_counter() - t0
    rendered = render_fields(weights, spec, image_shape, backend=cfg.backend, device=device).cpu()
    return FitResult(weights=weights, psnr=psnr(rendered, images.cpu()), spec=spec, retried=retried,
                     failed=failed, seconds=seconds)


# ----------------------------------------------------------------------------- fields files

def save_fields(path, weights: torch.Tensor, labels: torch.Tensor, psnr: torch.Tensor, spec: SirenSpec,
                image_shape: tuple, meta: dict) -> Path:
    """Write a "fields" artifact; architecture, flattening order and image shape are added to `meta`."""
    n = weights.shape[0]
    if weights.shape != (n, spec.num_params) or labels.shape != (n,) or psnr.shape != (n,):
        raise NfgenError(f"save_fields: inconsistent shapes weights {tuple(weights.shape)}, labels "
                         f"{tuple(labels.shape)}, psnr {tuple(psnr.shape)} for P={spec.num_params}; this is a bug")
    check_finite("weights", weights, "refusing to write diverged fields; refit them")
    _check_image_shape(spec, tuple(image_shape), "save_fields")
    meta = {**meta, "architecture": spec.to_dict(), "param_layout": spec.param_layout(),
            "image_shape": list(image_shape), "nfgen_version": __version__}
    tensors = {"weights": weights.float(), "labels": labels.long(), "psnr": psnr.float()}
    return save_artifact(path, "fields", tensors, meta)


def load_fields(path, hint: str = FIT_HINT) -> Fields:
    """Read and check a fields file: every tensor present, shapes match the stored spec, weights finite."""
    tensors, meta = load_artifact(path, "fields", hint)
    fix = f"; {hint}" if hint else ""
    missing = [k for k in ("weights", "labels", "psnr") if k not in tensors]
    if missing or "architecture" not in meta or "image_shape" not in meta:
        raise NfgenError(f"{path} is an incomplete fields file (missing {missing or 'metadata'}); recreate it{fix}")
    try:
        spec = SirenSpec.from_dict(meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NfgenError(f"{path} has an invalid architecture ({exc}); recreate it{fix}") from None
    image_shape = stored_image_shape(meta["image_shape"], path, fix)
    w, labels, ps = tensors["weights"], tensors["labels"], tensors["psnr"]
    n = w.shape[0] if w.dim() == 2 else -1
    if w.dim() != 2 or w.shape[1] != spec.num_params or labels.shape != (n,) or ps.shape != (n,):
        raise NfgenError(f"{path}: weights {tuple(w.shape)}, labels {tuple(labels.shape)}, psnr {tuple(ps.shape)} "
                         f"do not match the stored architecture (P={spec.num_params}); recreate it{fix}")
    _check_image_shape(spec, image_shape, str(path))
    check_finite(f"{path}: weights", w, f"the file is corrupt or holds diverged fields; recreate it{fix}")
    return Fields(weights=w.float(), labels=labels.long(), psnr=ps.float(), spec=spec, image_shape=image_shape,
                  meta=meta)


def training_split(meta: dict) -> str | None:
    """The split a fields or tokens file's fields were fitted to, or the one generated fields were trained on
    (`training_split`, written by generate and baseline) → its spec, or None when the file does not say."""
    source = meta.get("source")
    split = source.get("split") if isinstance(source, dict) else meta.get("training_split")
    return split if isinstance(split, str) else None


# ----------------------------------------------------------------------------- the stage: sharded, resumable

# Options that do not change what a fit computes: a resumed run may change them freely.
_RECIPE_FREE = {"quiet"}


def shard_dir(out_path) -> Path:
    """Where the shards of `out_path` live until they are merged: `<out>.shards/`."""
    return Path(f"{out_path}.shards")


def shard_path(out_path, i: int) -> Path:
    return shard_dir(out_path) / f"shard-{i}.safetensors"


def fit_fingerprint(split, cfg: FitConfig) -> str:
    """A hash of what decides the fitted weights: the split's spec, indices and pixels, and the recipe."""
    h = hashlib.sha256()
    recipe = {k: v for k, v in asdict(cfg).items() if k not in _RECIPE_FREE}
    h.update(json.dumps({"split": split.spec, "shape": list(split.images.shape), "recipe": recipe},
                        sort_keys=True, default=str).encode())
    h.update(split.indices.numpy().astype("<i8").tobytes())
    h.update(split.images.float().contiguous().numpy().tobytes())
    if cfg.template is not None:  # the template's weights, not just its path: a rewritten file is another fit
        spec = spec_for_images(tuple(split.images.shape[1:]), cfg.hidden, cfg.hidden_layers, cfg.omega0)
        h.update(template_weights(cfg, spec).numpy().tobytes())
    return h.hexdigest()[:32]


def _shard_meta(path: Path) -> dict:
    """A shard's metadata, from the safetensors header alone (no tensors are read)."""
    header, meta = read_header(path)
    if header.get("nfgen_kind") != "fields_shard" or "fingerprint" not in meta:
        raise NfgenError(f"{path} is not a readable fields shard; delete it (or its folder) and rerun the fit")
    return meta


def _check_shards(folder: Path, fingerprint: str, split, cfg: FitConfig) -> None:
    """Refuse finished shards from a run with other options or data: mixing them would be silently wrong."""
    for path in sorted(folder.glob("shard-*.safetensors")):
        meta = _shard_meta(path)
        if meta["fingerprint"] == fingerprint:
            continue
        old, now = meta.get("recipe", {}), asdict(cfg)
        diff = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in now.items() if k not in _RECIPE_FREE and old.get(k) != v]
        if meta.get("split") != split.spec:
            diff.append(f"split: {meta.get('split')!r} → {split.spec!r}")
        what = ", ".join(diff) if diff else "the same options but different images"
        raise NfgenError(f"{folder} holds shards of an unfinished fit with other inputs ({what}); rerun with the "
                         f"original options to finish it, or delete {folder} to start over")


def _merge_shards(out_path, n: int, chunk: int, fingerprint: str):
    """Concatenate every shard in order → (weights [n, P], psnr [n], retried, fit seconds)."""
    weights, psnrs, retried, seconds = [], [], [], 0.0
    for i in range(math.ceil(n / chunk)):
        path = shard_path(out_path, i)
        if not path.is_file():
            # Every rank has passed the barrier with its shards written, so under torchrun a missing one most
            # likely sits where rank 0 cannot see it: on another machine's disk.
            shared = "; with several machines, put --out on a filesystem they all share" \
                if distributed.world_size() > 1 else ""
            raise NfgenError(f"shard {i} of {math.ceil(n / chunk)} is missing from {shard_dir(out_path)}; "
                             f"rerun the same fit command to refit it{shared}")
        tensors, meta = load_artifact(path, "fields_shard", "rerun the same fit command")
        lo, hi = i * chunk, min(n, (i + 1) * chunk)
        if meta.get("fingerprint") != fingerprint or (meta.get("lo"), meta.get("hi")) != (lo, hi):
            raise NfgenError(f"{path} does not belong to this fit; delete {shard_dir(out_path)} and rerun")
        weights.append(tensors["weights"])
        psnrs.append(tensors["psnr"])
        retried += meta.get("retried", [])
        seconds += float(meta.get("seconds", 0.0))
    return torch.cat(weights), torch.cat(psnrs), retried, seconds


def _fit_shard(split, cfg: FitConfig, i: int, out_path, fingerprint: str) -> None:
    """Fit shard i (split positions [i·chunk, (i+1)·chunk)) and write it atomically."""
    n = len(split.labels)
    lo, hi = i * cfg.chunk, min(n, (i + 1) * cfg.chunk)
    result = fit_fields(split.images[lo:hi], cfg, first_index=lo)
    if result.failed:
        raise NfgenError(f"{len(result.failed)} field(s) diverged twice (split indices "
                         f"{[int(split.indices[lo + j]) for j in result.failed][:20]}); nothing written; "
                         f"lower --lr or raise --steps")
    meta = {"fingerprint": fingerprint, "shard": i, "lo": lo, "hi": hi, "split": split.spec,
            "recipe": asdict(cfg), "retried": [lo + j for j in result.retried], "seconds": result.seconds}
    save_artifact(shard_path(out_path, i), "fields_shard", {"weights": result.weights, "psnr": result.psnr}, meta)


def run_fit(split_spec: str, out_path, cfg: FitConfig, data_root=None, download: bool = False) -> dict:
    """Fit every image of `split_spec` and write the fields file; returns a summary (mean / min PSNR, time).

    The split is cut into shards of `cfg.chunk` fields (shard i = positions [i·chunk, (i+1)·chunk)), which
    do not depend on the number of processes. Under torchrun rank r fits the shards i ≡ r (mod world);
    each finished shard is written atomically to `<out>.shards/shard-<i>.safetensors`, so a killed run,
    restarted with the same command (any world size), skips them. When every shard exists rank 0 merges
    them into `out_path` and removes the folder. Fields are independent and each starts from the seeded
    template (or its own per-index draw), so the result equals a one-process run bit for bit on CPU.
    """
    from nfgen.data import load_split

    cfg.validate()
    cfg = with_clamp_margin(cfg)  # recorded as a number in the fields' recipe
    distributed.init_from_env(cfg.device)
    split = load_split(split_spec, data_root=data_root, download=download)
    n = len(split.labels)
    if n == 0:
        raise NfgenError(f"split {split.spec} is empty; pass a non-empty image split")
    fingerprint = fit_fingerprint(split, cfg)
    folder, n_shards = shard_dir(out_path), math.ceil(n / cfg.chunk)
    _check_shards(folder, fingerprint, split, cfg)
    rank, world = distributed.rank(), distributed.world_size()
    t0 = time.perf_counter()
    fitted = []
    for i in range(rank, n_shards, world):
        if shard_path(out_path, i).is_file():
            continue  # finished by an earlier run (its fingerprint was checked above)
        _fit_shard(split, cfg, i, out_path, fingerprint)
        fitted.append(i)
    distributed.barrier()
    wall = time.perf_counter() - t0
    summary = {"split": split.spec, "n_fields": n, "rank": rank, "world_size": world, "n_shards": n_shards,
               "shards_fitted": fitted, "wall_seconds": round(wall, 3), "out": str(out_path), "template": cfg.template,
               "clamp_margin": cfg.clamp_margin}
    if distributed.is_main():
        summary.update(_write_merged(split, out_path, cfg, fingerprint))
    distributed.barrier()  # nobody returns before the fields file exists
    return summary


def _write_merged(split, out_path, cfg: FitConfig, fingerprint: str) -> dict:
    weights, field_psnr, retried, seconds = _merge_shards(out_path, len(split.labels), cfg.chunk, fingerprint)
    spec = spec_for_images(tuple(split.images.shape[1:]), cfg.hidden, cfg.hidden_layers, cfg.omega0)
    n = weights.shape[0]
    # seconds: fitting time summed over shards (all ranks, all runs), so fields_per_s is per-process throughput.
    summary = {"num_params": spec.num_params, "mean_psnr": float(field_psnr.mean()),
               "min_psnr": float(field_psnr.min()), "seconds": round(seconds, 3),
               "fields_per_s": round(n / max(seconds, 1e-9), 2), "retried": retried, "failed": []}
    meta = {"source": {"split": split.spec, "indices": split.indices.tolist()}, "recipe": asdict(cfg),
            "timing": {"seconds": summary["seconds"], "fields_per_s": summary["fields_per_s"],
                       "device": str(pick_device(cfg.device)), "world_size": distributed.world_size()},
            "mean_psnr": summary["mean_psnr"], "min_psnr": summary["min_psnr"], "retried": retried}
    save_fields(out_path, weights, split.labels, field_psnr, spec, tuple(split.images.shape[1:]), meta)
    shutil.rmtree(shard_dir(out_path), ignore_errors=True)
    if not cfg.quiet:
        print(f"fit {n} fields of {split.spec}: PSNR mean {summary['mean_psnr']:.2f} dB, min "
              f"{summary['min_psnr']:.2f} dB, {summary['seconds']:.1f} s ({summary['fields_per_s']:.1f} fields/s)"
              f"{f', {len(retried)} retried' if retried else ''} → {out_path}")
    return summary
