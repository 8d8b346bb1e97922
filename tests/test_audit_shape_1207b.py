"""Audit (image geometry): non-square, tiny and colour images end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causalign.data.format import LesionDataset
from causalign.errors import DataError

COLS = ["id", "split", "label", "site", "image", "mask", "box_x0", "box_y0", "box_x1", "box_y1"]


def _png_dataset(root: Path, images: list[np.ndarray], mode: str, ndim: int = 2) -> Path:
    """A dataset of PNG files written as they are by PIL (as an importer or a user would)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        Image.fromarray(img, mode).save(root / "images" / f"s{i}.png")
        rows.append([f"s{i}", "train", i % 2, "0", f"images/s{i}.png", "", "", "", "", ""])
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        w.writerows(rows)
    channels = 3 if mode in ("RGB", "RGBA") else 1
    (root / "dataset.yaml").write_text(f"name: t\nclasses: [a, b]\nchannels: {channels}\n"
                                       f"ndim: {ndim}\n")
    return root


@pytest.mark.parametrize("mode, h, w", [("RGB", 4, 6), ("RGB", 2, 9), ("RGBA", 3, 5),
                                        ("RGB", 7, 4)])
def test_short_colour_png_is_read_as_hwc(tmp_path: Path, mode: str, h: int, w: int) -> None:
    # a colour PNG at most 4 rows high was taken for a channel-first array: (4, 6, 3) read
    # as a 4-channel 6x3 image (`data check`: ok), pixels scrambled across channels
    rng = np.random.default_rng(0)
    imgs = [(rng.random((h, w, len(mode))) * 255).astype(np.uint8) for _ in range(2)]
    ds = LesionDataset(_png_dataset(tmp_path / "d", imgs, mode), "train")
    assert ds.image_shape == (3, h, w)
    got = ds.batch(torch.arange(2))["image"].numpy()
    want = np.stack([np.moveaxis(i[..., :3], -1, 0) for i in imgs]).astype(np.float32) / 255
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_colour_png_in_a_volume_dataset_is_refused(tmp_path: Path) -> None:
    # an RGB PNG (H, W, 3) under ndim: 3 was read as a volume of H slices, W x 3 px
    img = np.zeros((8, 10, 3), np.uint8)
    root = _png_dataset(tmp_path / "v", [img, img], "RGB", ndim=3)
    with pytest.raises(DataError, match="volumes"):
        LesionDataset(root, "train")


def _outline_extent(ax) -> np.ndarray | None:
    """(xmin, ymin, xmax, ymax) over the contour lines drawn on ``ax`` (None: none drawn)."""
    verts = [p.vertices for c in ax.collections for p in c.get_paths() if len(p.vertices)]
    if not verts:
        return None
    v = np.concatenate(verts)
    return np.concatenate([v.min(0), v.max(0)])


@pytest.mark.parametrize("where", ["whole", "corner"])
def test_annotation_outline_closes_at_the_image_border(where: str) -> None:
    # a non-square 6x4 panel; a mask covering the image drew no outline at all, one in the
    # top-right corner lost its top and right sides (ends at pixel centres, not the edge)
    from causalign.report.figures import _change_ax, agg_figure

    region = np.zeros((6, 4))
    if where == "whole":
        region[:] = 1
    else:
        region[:3, 2:] = 1
    fig = agg_figure()
    ax = fig.add_subplot()
    _change_ax(ax, np.zeros((1, 6, 4)), region)
    ext = _outline_extent(ax)
    assert ext is not None
    want = [-0.5, -0.5, 3.5, 5.5] if where == "whole" else [1.5, -0.5, 3.5, 2.5]
    np.testing.assert_allclose(ext, want)
    # the panel still shows the image's own extent (the padding is outside it)
    assert ax.get_xlim() == (-0.5, 3.5) and ax.get_ylim() == (5.5, -0.5)
