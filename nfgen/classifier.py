"""A small CNN for the classifier score: trained on the training split only, scored on held-out images.

Three conv blocks (conv-BN-ReLU, max-pool) and a linear head; random shifts of up to `max_shift`
pixels are the only augmentation (8k MNIST images overfit quickly without them). The architecture is
rebuilt from the artifact's metadata, so no code is ever unpickled.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nfgen import __version__
from nfgen.common import make_generator, pick_device, progress
from nfgen.data import DEFAULT_HELDOUT_SPLIT, DEFAULT_TRAIN_SPLIT
from nfgen.io import NfgenError, check_finite, load_artifact, save_artifact

CLASSIFIER_HINT = "run `nfgen classifier` first"
# 3 epochs on mnist:test[:8000]: 99.05 % held-out accuracy on mnist:test[8000:] (CE 0.035) in 26 s on
# one contended core of the 2-core dev box; 4 epochs: 99.2 %. More than enough to score samples.
DEFAULT_EPOCHS = 3


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    n_classes: int = 10
    image_hw: tuple = (28, 28)
    width: int = 16  # channels of the first block; then 2× and 4×
    dropout: float = 0.25


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks (w, 2w, 4w channels) and a linear head: ~2 M MACs per 28×28 image."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.features = nn.Sequential(_block(cfg.in_channels, w), _block(w, 2 * w), _block(2 * w, 4 * w))
        # Pooling to 3×3 keeps coarse layout (which stroke is where) for any input size ≥ 8.
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(cfg.dropout),
                                  nn.Linear(4 * w * 9, cfg.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0, 1] → logits [B, n_classes]."""
        return self.head(self.features((x - 0.5) / 0.5))


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] → [N, C, H, W] float32."""
    if images.dim() == 3:
        return images.float().unsqueeze(1)
    if images.dim() == 4:
        return images.float().permute(0, 3, 1, 2)
    raise NfgenError(f"images must be [N, H, W] or [N, H, W, C], got {tuple(images.shape)}; pass an image split")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels (zero padding), one offset per image."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    wp = w + 2 * max_shift
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(-1, c, -1, wp)
    shifted = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(-1, c, h, -1)
    return shifted.gather(3, cols)


def check_classifier_fits(model: nn.Module, image_shape: tuple) -> None:
    """Refuse images [H, W] or [H, W, C] of another shape than the classifier was trained on."""
    cfg = model.cfg
    channels = image_shape[2] if len(image_shape) == 3 else 1
    if (channels, *image_shape[:2]) != (cfg.in_channels, *cfg.image_hw):
        raise NfgenError(f"classifier expects images of shape {tuple(cfg.image_hw)} with {cfg.in_channels} "
                         f"channel(s), got {tuple(image_shape)}; use a classifier trained on this dataset (`nfgen "
                         "classifier --train-split … --heldout-split …` with two slices of it)")


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits [N, n_classes] (float32, CPU) for images [N, H, W] or [N, H, W, C] in [0, 1]."""
    check_classifier_fits(model, tuple(images.shape[1:]))
    x = to_nchw(images)
    cfg = model.cfg
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch].to(device)).float().cpu() for i in range(0, x.shape[0], batch)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, cfg.n_classes)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = classify(model, images)
    labels = labels.long().cpu()
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()),
            "ce": float(F.cross_entropy(logits, labels))}


def train_classifier(images: torch.Tensor, labels: torch.Tensor, heldout_images: torch.Tensor,
                     heldout_labels: torch.Tensor, *, epochs: int | None = None, seed: int = 0, device="auto",
                     quiet: bool = False, n_classes: int | None = None, batch_size: int = 128, lr: float = 1e-2,
                     max_shift: int = 2) -> tuple[nn.Module, dict]:
    """Train SmallCNN with AdamW + one-cycle cosine lr; returns (model in eval mode, info)."""
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise NfgenError(f"epochs must be >= 1 (got {epochs}); pass --epochs 1 or more")
    if len(images) == 0 or len(images) != len(labels) or len(heldout_images) != len(heldout_labels):
        raise NfgenError(f"classifier data mismatch: {len(images)} images / {len(labels)} labels, held-out "
                         f"{len(heldout_images)} / {len(heldout_labels)}; pass non-empty labelled splits")
    check_finite("classifier images", images, "pass images in [0, 1]")
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    torch.manual_seed(seed)  # weight init and dropout
    gen = make_generator(seed)
    x, y = to_nchw(images).to(device), labels.long().to(device)
    n_classes = n_classes or int(max(int(labels.max()), int(heldout_labels.max()) if len(heldout_labels) else 0) + 1)
    cfg = ClassifierConfig(in_channels=x.shape[1], n_classes=n_classes, image_hw=tuple(x.shape[2:]))
    model = SmallCNN(cfg).to(device)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    t0 = time.perf_counter()
    model.train()
    bar = progress(total=epochs * steps_per_epoch, desc="classifier", quiet=quiet)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    held = evaluate(model, heldout_images, heldout_labels) if len(heldout_images) else {"accuracy": float("nan"),
                                                                                           "ce": float("nan")}
    info = {"heldout_accuracy": held["accuracy"], "heldout_ce": held["ce"], "train_seconds": time.perf_counter() - t0,
            "epochs": epochs, "seed": seed, "n_train": len(x), "n_heldout": len(heldout_images),
            "config": asdict(cfg)}
    return model, info


def save_classifier(path, model: nn.Module, meta: dict):
    meta = {**meta, "config": asdict(model.cfg), "nfgen_version": __version__}
    return save_artifact(path, "classifier", dict(model.state_dict()), meta)


def load_classifier(path, device="cpu", hint: str = CLASSIFIER_HINT) -> nn.Module:
    """Rebuild SmallCNN from the stored config and load its weights; returned in eval mode."""
    tensors, meta = load_artifact(path, "classifier", hint)
    fix = f"; {hint}" if hint else ""
    try:
        c = meta["config"]
        cfg = ClassifierConfig(in_channels=int(c["in_channels"]), n_classes=int(c["n_classes"]),
                               image_hw=tuple(int(s) for s in c["image_hw"]), width=int(c["width"]),
                               dropout=float(c["dropout"]))
        model = SmallCNN(cfg)
        model.load_state_dict(tensors, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise NfgenError(f"{path} does not match the classifier architecture "
                         f"({str(exc).splitlines()[0][:200]}); recreate it{fix}") from None
    for name, t in tensors.items():
        check_finite(f"{path}: {name}", t, f"the file is corrupt; recreate it{fix}")
    return model.to(device).eval()


def run_classifier(train_split: str = DEFAULT_TRAIN_SPLIT, heldout_split: str = DEFAULT_HELDOUT_SPLIT,
                   out_path="classifier.safetensors", *, epochs: int | None = None, seed: int = 0, device="auto",
                   data_root=None, quiet: bool = False, download: bool = False) -> dict:
    """Train on `train_split`, report accuracy on `heldout_split`, write the classifier artifact."""
    from nfgen.data import check_disjoint, load_split

    train = load_split(train_split, data_root=data_root, download=download)
    held = load_split(heldout_split, data_root=data_root, download=download)
    if train.images.shape[1:] != held.images.shape[1:]:
        raise NfgenError(f"train split {train.spec} has images {tuple(train.images.shape[1:])} but held-out "
                         f"{held.spec} has {tuple(held.images.shape[1:])}; use splits of the same dataset")
    check_disjoint(train, held)
    model, info = train_classifier(train.images, train.labels, held.images, held.labels, epochs=epochs, seed=seed,
                                   device=device, quiet=quiet, n_classes=train.n_classes)
    summary = {"train_split": train.spec, "heldout_split": held.spec,
               **{k: v for k, v in info.items() if k != "config"}, "out": str(out_path)}
    save_classifier(out_path, model, {"train_split": train.spec, "heldout_split": held.spec,
                                      "heldout_accuracy": info["heldout_accuracy"], "heldout_ce": info["heldout_ce"],
                                      "class_names": train.class_names})
    if not quiet:
        print(f"classifier: held-out accuracy {100 * info['heldout_accuracy']:.2f} % "
              f"(CE {info['heldout_ce']:.4f}) on {held.spec}, trained on {train.spec} in "
              f"{info['train_seconds']:.1f} s → {out_path}")
    return summary
