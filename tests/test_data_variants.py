"""Colour, non-square and volume data through import, the reader and training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset
from causalign.data.importers import run_import
from causalign.engine import TrainConfig, train
from causalign.errors import DataError
from causalign.methods.base import method_names

SPLITS = ["train"] * 8 + ["val"] * 4 + ["test"] * 4


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_folder_rgb_makes_every_image_three_channels(tmp_path):
    """--color rgb: a channel-first gray NPY (1, H, W) becomes RGB, a 4-channel one is
    skipped with its reason; before, both kept their channel count under channels: 3 and the
    mix made the imported split unreadable."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            channels = 4 if i == 0 else 1 if i % 2 else 3
            np.save(root / c / f"{i}.npy", rng.uniform(0, 1, (channels, 10, 12)).astype(np.float32))
    out = tmp_path / "out"
    s = run_import("folder", root, out, {"size": 16, "color": "rgb", "seed": 0})
    assert s["skipped"]["by_reason"] == {"unsupported image": 2}
    ds = LesionDataset(out, "train")  # every split readable, every image 3 channels
    assert ds.image_shape == (3, 16, 16) and ds.meta.channels == 3
    for split in ("train", "val", "test"):
        d = LesionDataset(out, split)
        for k, r in enumerate(d.records):
            if r.id == "a_1":  # the gray sample: three equal channels
                img = d.images[k]
                assert bool((img[0] == img[1]).all() and (img[1] == img[2]).all())
                assert float(img.mean()) > 0.2  # the gray values, not padding


def test_folder_non_square_is_letterboxed_with_aligned_mask(tmp_path):
    """A 48x64 (H x W) gray image with its lesion mask: square output, zero padding top and
    bottom, the mask over the lesion."""
    root = tmp_path / "src"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            m = _disc(48, 64, 12 + 4 * i, 40 - 6 * i, 6)
            img = np.full((48, 64), 60, np.uint8)
            img[m] = 230
            Image.fromarray(img).save(root / c / f"{i}.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(root / c / f"{i}_mask.png")
    out = tmp_path / "out"
    run_import("folder", root, out, {"size": 32, "val_frac": 0.25, "test_frac": 0.25})
    ds = LesionDataset(out, "train")
    assert ds.image_shape == (1, 32, 32)
    img, mask = ds.images[:, 0], ds.masks[:, 0].bool()
    assert float(img[:, :4].abs().max()) < 0.05 and float(img[:, -4:].abs().max()) < 0.05
    lesion = img > 0.6
    iou = (lesion & mask).sum() / (lesion | mask).sum()
    assert float(iou) > 0.8


def _write(root, shape: tuple[int, ...], ndim: int, channels: int) -> None:
    rng = np.random.default_rng(1)
    meta = DatasetMeta("v", ["b", "m"], ndim=ndim, channels=channels)
    w = DatasetWriter(root, meta, image_format="npy")
    spatial = shape[1:]
    for i, split in enumerate(SPLITS):
        h, wd = spatial[-2:]
        m2 = _disc(h, wd, h // 2, 3 + (i % 3) * 4, 3)
        m = np.broadcast_to(m2, spatial).copy()
        img = rng.uniform(0, 0.3, shape).astype(np.float32)
        img[:, m] = 0.6 + 0.3 * (i % 2)
        w.add(img, i % 2, split, mask=m)
    w.close()


@pytest.fixture(scope="module")
def rgb_non_square(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgbns")
    _write(root, (3, 20, 28), ndim=2, channels=3)
    return root


def _run(data, method, model, out) -> dict:
    cfg = TrainConfig(method=method, model=model, epochs=1, batch_size=8, threads=1, width=4,
                      eval_saliency="gradient", deletion_fractions=[0.1], device="cpu")
    return train(data, cfg, out, progress=False)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "hier-align"])
def test_every_method_trains_on_non_square_rgb(rgb_non_square, tmp_path, method):
    """One epoch on 20x28 RGB images: a finite loss and finite metrics for every 2D method
    that needs no attributes."""
    r = _run(rgb_non_square, method, "cnn7", tmp_path / method)
    assert np.isfinite(r["test"]["loss"]) and np.isfinite(r["test"]["accuracy"])
    with open(tmp_path / method / "history.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[-1]
    assert np.isfinite(float(row["train_loss"]))


def test_reader_names_a_channel_mismatch(tmp_path):
    """A gray image among RGB ones of the same size: the error names the channel counts, not
    a shape mismatch to fix by resizing."""
    w = DatasetWriter(tmp_path, DatasetMeta("mix", ["a", "b"], channels=3), image_format="npy")
    for i in range(4):
        shape = (1, 8, 8) if i == 2 else (3, 8, 8)
        w.add(np.full(shape, 0.5, np.float32), i % 2, "train")
    w.close()
    with pytest.raises(DataError, match=r"1 channel\(s\).* has 3 .*colour mode"):
        LesionDataset(tmp_path, "train")


def test_folder_channel_last_single_channel_npy_images_and_masks(tmp_path):
    # Before: a (H, W, 1) array was read as an H-channel image W pixels wide, so its
    # (H, W, 1) mask never matched ("mask shape mismatch") and every item was skipped.
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            img = (rng.random((20, 30, 1)) * 100).astype(np.uint8)
            img[5:10, 12:20, 0] = 250  # the lesion
            mask = np.zeros((20, 30, 1), np.uint8)
            mask[5:10, 12:20, 0] = 1
            np.save(src / cls / f"{i}.npy", img)
            np.save(src / cls / f"{i}_mask.npy", mask)
    out = tmp_path / "out"
    s = run_import("folder", src, out, {"size": 30})
    assert s["n"] == 8 and not s["skipped"]["by_reason"], s["skipped"]
    ds = LesionDataset(out, "train")
    assert ds.images.shape[1:] == (1, 30, 30)
    m = ds.masks[0, 0] > 0
    assert m.any() and float(ds.images[0, 0][m].mean()) > 0.9  # the mask is on the lesion
