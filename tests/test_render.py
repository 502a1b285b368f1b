"""nfgen.render: grids place every image where it belongs and leave filler cells empty, not black."""
import numpy as np
import torch
from PIL import Image

from nfgen.render import blank_cells, grid_array, save_class_rows


def test_grid_places_images_and_leaves_blank_cells_white():
    images = torch.cat([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5), blank_cells(1, (4, 4))])
    arr = grid_array(images, nrow=2, pad=2, scale=1)
    assert arr.shape == (2 * 6 + 2, 2 * 6 + 2) and arr.dtype == np.uint8
    assert (arr[2:6, 2:6] == 0).all()  # a black sample stays black
    assert (arr[2:6, 8:12] == 128).all()
    assert (arr[8:12, 2:6] == 255).all() and (arr[8:12, 8:12] == 255).all()  # the filler and the unused cell
    rgb = grid_array(torch.cat([torch.ones(1, 3, 3, 3), blank_cells(1, (3, 3, 3))]), nrow=2, pad=1, scale=2)
    assert rgb.shape == (2 * 5, 2 * 9, 3) and (rgb == 255).all()


def test_class_rows_pad_short_classes_with_empty_cells(tmp_path):
    dark = torch.zeros(5, 4, 4)
    save_class_rows(tmp_path / "rows.png", {"a": (dark, torch.tensor([0, 0, 0, 1, -1]))}, per_row=3)
    img = np.asarray(Image.open(tmp_path / "rows.png").convert("L"))
    grid = img[:, -(3 * 6 + 2) * 2:]  # right of the label margin: 2 rows × 3 cells of 4 + 2 px, at scale 2
    assert grid.shape[0] == (2 * 6 + 2) * 2
    cell = lambda r, c: grid[(2 + 6 * r) * 2:(6 + 6 * r) * 2, (2 + 6 * c) * 2:(6 + 6 * c) * 2]  # noqa: E731
    assert all((cell(0, c) == 0).all() for c in range(3))  # class 0: three dark samples
    assert (cell(1, 0) == 0).all() and (cell(1, 1) == 255).all() and (cell(1, 2) == 255).all()  # class 1: one
