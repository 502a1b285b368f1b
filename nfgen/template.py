"""Meta-learned templates: one shared init that every field fits from, learned by Reptile over the fit recipe.

Shared init makes weight positions mean the same thing across fields, but from a random SIREN draw each
fit still travels far and nonlinearly, so a field's weights are a poor function of its image: a ridge map
from the image's top 100 pixel PCs explains 25 % of the weight offsets' variance (2000 MNIST fields, 100
Adam steps at 1e-3). A generative model then has to learn much variance that has no visible meaning, and
its mistakes there render as speckle. Reptile (Nichol et al. 2018) moves the template toward the mean of
short fits from it, so every field starts from a "mean digit" and its offset is small and closer to a
function of the image. Measured on 2000 MNIST fields, held-out images mnist:test[8000:8400], with a
per-class Gaussian in weight space as a crude stand-in for the GPT (its samples rendered and scored
against the held-out images), 100 fit steps at 1e-3, no clamp margin (`python -m benchmarks.template_proxy`,
benchmarks/results/template-proxy-cpu.json; with the margin: template-proxy-margin-cpu.json):

    template                   fit PSNR mean/min   R²     Gaussian samples MMD / COV / 1-NNA
    random draw (default)         37.8 / 28.8      0.25        0.359 / 0.43 / 0.998
    field of the mean image       40.5 / 31.2      0.31        0.325 / 0.41 / 0.961
    Reptile (TemplateConfig())    40.5 / 35.8      0.43        0.304 / 0.48 / 0.914
    (the same Gaussian on pixels)                              0.279 / 0.45 / 0.909

The GPT trained on random-template fields scores like that Gaussian (H100 run, T = 1: 0.330 / 0.44 /
0.998, benchmarks/results/quality-h100-random-draw-sampling.json), which is why its samples are noisy.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from nfgen.common import make_generator, pick_device, progress
from nfgen.fields import FitConfig, _fit_batch, fit_targets, psnr, save_fields, spec_for_images
from nfgen.io import NfgenError, check_finite
from nfkernels import coord_grid, siren_forward, siren_init


@dataclass
class TemplateConfig:
    hidden: int = 32  # the architecture: must match the fits that use the template
    hidden_layers: int = 2
    omega0: float = 30.0
    outer: int = 200  # Reptile iterations
    batch: int = 256  # images fitted per iteration
    inner_steps: int = 20  # Adam steps from the template per iteration (fresh Adam state each time)
    lr: float = 1e-3  # inner Adam lr: use the lr of the fits that will start from the template
    clamp_margin: float = 0.3  # the fit's FitConfig.clamp_margin: the template fits the same targets
    meta_lr: float = 0.5  # step from the template toward the batch's mean fit, annealed linearly to 0
    seed: int = 0  # seeds the starting draw (the fit's shared init for the same seed) and the batches
    backend: str = "auto"
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        problems = []
        if self.outer < 1 or self.batch < 1 or self.inner_steps < 1:
            problems.append(f"outer, batch and inner_steps must be >= 1 (got {self.outer}, {self.batch}, "
                            f"{self.inner_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be positive (got {self.lr})")
        if not (0.0 <= self.clamp_margin <= 1.0):
            problems.append(f"clamp_margin must be in [0, 1] (got {self.clamp_margin})")
        if not 0 < self.meta_lr <= 1:
            problems.append(f"meta_lr must be in (0, 1] (got {self.meta_lr})")
        if problems:
            raise NfgenError(f"bad template config: {'; '.join(problems)}; fix the option(s)")

    def fit_config(self) -> FitConfig:
        """The inner fits: the fit stage's own loop, `inner_steps` fused steps in one call."""
        return FitConfig(hidden=self.hidden, hidden_layers=self.hidden_layers, omega0=self.omega0,
                         steps=self.inner_steps, lr=self.lr, steps_per_call=self.inner_steps, seed=self.seed,
                         clamp_margin=self.clamp_margin,
                         backend=self.backend, device=self.device, quiet=True)


def meta_template(images: torch.Tensor, cfg: TemplateConfig) -> tuple[torch.Tensor, list[float]]:
    """Reptile over `images` [N, H, W(, C)] → (template [1, P] on CPU, PSNR after the inner fit per iteration).

    Iteration t fits a random batch for `inner_steps` from the template θ and sets
    θ ← θ + ε_t · (mean of the batch's fits − θ), ε_t = meta_lr · (1 − t / outer). Fields whose inner fit
    diverges are left out of the mean.
    """
    cfg.validate()
    if images.dim() not in (3, 4) or images.shape[0] == 0:
        raise NfgenError(f"meta_template wants images [N, H, W] or [N, H, W, C] with N >= 1, got "
                         f"{tuple(images.shape)}; pass a non-empty image split")
    check_finite("images", images, "pass images in [0, 1]")
    fit_cfg = cfg.fit_config()
    fit_cfg.validate()
    device = pick_device(cfg.device)
    image_shape = tuple(images.shape[1:])
    spec = spec_for_images(image_shape, cfg.hidden, cfg.hidden_layers, cfg.omega0)
    coords = coord_grid(image_shape[:2], device=device)
    theta = siren_init(spec, 1, make_generator(cfg.seed)).to(device)
    pick = make_generator(cfg.seed + 1)
    n, batch = images.shape[0], min(cfg.batch, images.shape[0])
    history = []
    with progress(total=cfg.outer, desc="template", quiet=cfg.quiet) as bar:
        for t in range(cfg.outer):
            idx = torch.randperm(n, generator=pick)[:batch]
            image = images[idx].to(device=device, dtype=torch.float32).reshape(batch, -1, spec.out_dim)
            fitted, diverged = _fit_batch(theta.expand(batch, -1), fit_targets(image, cfg.clamp_margin), coords,
                                          spec, fit_cfg)
            ok = ~diverged
            if not bool(ok.any()):
                raise NfgenError(f"every inner fit of template iteration {t} diverged; lower --lr")
            db = psnr(siren_forward(fitted[ok], coords, spec, backend=cfg.backend).clamp(0, 1), image[ok])
            history.append(float(db.mean()))
            step = cfg.meta_lr * (1.0 - t / cfg.outer)
            theta = theta + step * (fitted[ok].mean(dim=0, keepdim=True) - theta)
            bar.update(1)
            bar.set_postfix(psnr=f"{history[-1]:.1f}")
    return theta.cpu(), history


def run_template(split_spec: str, out_path, cfg: TemplateConfig, data_root=None, download: bool = False) -> dict:
    """Learn a template on `split_spec` and write it as a one-field fields file (label -1) for `fit --template`."""
    from nfgen.data import load_split

    cfg.validate()
    split = load_split(split_spec, data_root=data_root, download=download)
    if len(split.labels) == 0:
        raise NfgenError(f"split {split.spec} is empty; pass a non-empty image split")
    t0 = time.perf_counter()
    theta, history = meta_template(split.images, cfg)
    seconds = time.perf_counter() - t0
    image_shape = tuple(split.images.shape[1:])
    spec = spec_for_images(image_shape, cfg.hidden, cfg.hidden_layers, cfg.omega0)
    inner_db = history[-1]
    meta = {"kind": "template", "source": {"split": split.spec}, "template_recipe": asdict(cfg),
            "inner_psnr_history": [round(h, 3) for h in history], "seconds": round(seconds, 3)}
    save_fields(out_path, theta, torch.tensor([-1]), torch.tensor([inner_db]), spec, image_shape, meta)
    summary = {"split": split.spec, "out": str(out_path), "num_params": spec.num_params, "seconds": round(seconds, 3),
               "inner_psnr_first": round(history[0], 3), "inner_psnr_last": round(inner_db, 3)}
    if not cfg.quiet:
        print(f"template from {split.spec}: PSNR after {cfg.inner_steps} steps {history[0]:.2f} → {inner_db:.2f} dB "
              f"over {cfg.outer} iterations, {seconds:.1f} s → {out_path}; use it with `nfgen fit --template "
              f"{out_path}`")
    return summary
