"""PNG grids of images: what a person looks at after each stage."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from nfgen.io import atomic_write


def blank_cells(n: int, image_shape) -> torch.Tensor:
    """`n` images that grid_array leaves empty (all NaN): fillers for short rows, so they are not read as black
    samples."""
    return torch.full((n, *image_shape), float("nan"))


def grid_array(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """[N, H, W] or [N, H, W, 3] in [0, 1] → uint8 [rows·(H+pad), nrow·(W+pad)(, 3)] with `nrow` per row, on a
    white background; an all-NaN image (blank_cells) is an empty cell."""
    imgs = images.detach().float().cpu()
    empty = torch.isnan(imgs).flatten(1).all(1) if len(imgs) else torch.zeros(0, dtype=torch.bool)
    imgs = imgs.clamp(0, 1)
    if imgs.dim() == 3:
        imgs = imgs.unsqueeze(-1)
    n, h, w, c = imgs.shape
    rows = max(1, -(-n // nrow))
    canvas = torch.ones(rows * (h + pad) + pad, nrow * (w + pad) + pad, c)
    for i in range(n):
        if empty[i]:
            continue
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = imgs[i]
    arr = (canvas.numpy() * 255 + 0.5).astype(np.uint8)
    arr = arr.repeat(scale, 0).repeat(scale, 1)
    return arr[..., 0] if c == 1 else arr


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10,
              row_labels: list[str] | None = None, scale: int = 2) -> None:
    """Write a PNG grid (atomically). `row_labels` are drawn in a margin on the left of each row."""
    arr = grid_array(images, nrow, scale=scale)
    img = Image.fromarray(arr).convert("RGB")
    if row_labels:
        h = images.shape[1]
        margin = 8 * max(len(s) for s in row_labels) + 8
        out = Image.new("RGB", (img.width + margin, img.height), "white")
        out.paste(img, (margin, 0))
        draw = ImageDraw.Draw(out)
        step = (h + 2) * scale
        for r, label in enumerate(row_labels):
            draw.text((4, 2 * scale + r * step + step // 2 - 6), label, fill="black")
        img = out
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def save_class_rows(path: str | os.PathLike, groups: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    per_row: int = 8) -> None:
    """PNG comparing sources class by class: for each class (ascending) one row per entry of `groups` (name →
    (images [N, H, W(, 3)], labels [N])), its first `per_row` images of that class; unlabelled (-1) images are left
    out. Rows are labelled "<class> <name>"."""
    labels = sorted({int(c) for _, lab in groups.values() for c in lab.tolist() if c >= 0})
    rows, names = [], []
    for c in labels:
        for name, (images, lab) in groups.items():
            imgs = images[torch.nonzero(lab.cpu() == c).flatten()[:per_row]].cpu().float()
            rows.append(torch.cat([imgs, blank_cells(per_row - imgs.shape[0], images.shape[1:])]))
            names.append(f"{c} {name}")
    save_grid(torch.cat(rows), path, nrow=per_row, row_labels=names)
