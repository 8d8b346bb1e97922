"""Dataset format: round trip and validation errors that name the file and problem."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.data.format import (
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    dataset_summary,
    read_manifest,
)
from causalign.errors import DataError


def _write(root, n=4, with_mask=True, image_format="png", attrs=True, split="train",
           extra=None):
    meta = DatasetMeta("toy", ["benign", "malignant"], ["margin", "texture"] if attrs else [])
    w = DatasetWriter(root, meta, image_format=image_format)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.random((16, 16)).astype(np.float32)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:9, 5:10] = 1
        w.add(img, label=i % 2, split=split if i < n - 1 else "val",
              mask=mask if with_mask else None, box=(5, 4, 10, 9) if with_mask else None,
              attributes=[1.0, float("nan")] if attrs else None)
    if extra:
        extra(w)
    w.close()
    return root


def test_round_trip(tmp_path):
    root = _write(tmp_path / "d")
    ds = LesionDataset(root, "train")
    assert len(ds) == 3
    item = ds[0]
    assert item["image"].shape == (1, 16, 16)
    assert item["mask"].sum() == 25 and bool(item["has_mask"])
    assert item["box_mask"][0, 4:9, 5:10].all() and item["box_mask"].sum() == 25
    assert item["attr_known"].tolist() == [True, False]
    assert item["attributes"].tolist() == [1.0, 0.0]  # NaN reported via attr_known
    summary = dataset_summary(root)
    assert summary["train"]["n"] == 3 and summary["val"]["n"] == 1


def test_pixel_values_survive_png(tmp_path):
    root = _write(tmp_path / "d")
    ds = LesionDataset(root, "train")
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    assert float(ds.images.std()) > 0.2  # not constant after quantisation


def test_samples_without_mask_are_marked(tmp_path):
    root = _write(tmp_path / "d", with_mask=False)
    ds = LesionDataset(root, "train")
    assert not ds.has_mask.any() and not ds.has_box_or_mask.any()
    assert float(ds.masks.sum()) == 0.0


def test_volume_npy(tmp_path):
    meta = DatasetMeta("vol", ["a", "b"], [], ndim=3)
    w = DatasetWriter(tmp_path / "v", meta, image_format="npy")
    for i in range(2):
        w.add(np.random.rand(5, 8, 8).astype(np.float32), label=i, split="train",
              mask=np.ones((5, 8, 8), bool))
    w.close()
    ds = LesionDataset(tmp_path / "v", "train")
    assert ds.image_shape == (1, 5, 8, 8) and ds[0]["mask"].shape == (1, 5, 8, 8)


def test_missing_image_file(tmp_path):
    root = _write(tmp_path / "d")
    rec = read_manifest(root)[0]
    (root / rec.image).unlink()
    with pytest.raises(DataError, match=r"000000\.png: file not found"):
        LesionDataset(root, "train")


def test_mask_shape_mismatch(tmp_path):
    root = _write(tmp_path / "d")
    rec = read_manifest(root)[1]
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / rec.mask)
    with pytest.raises(DataError, match=r"mask shape \(8, 8\) does not match image"):
        LesionDataset(root, "train")


def test_label_outside_classes(tmp_path):
    root = _write(tmp_path / "d")
    text = (root / "manifest.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[2] = "5"
    text[1] = ",".join(cells)
    (root / "manifest.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"manifest.csv:2: label 5 outside the declared classes"):
        LesionDataset(root, "train")


def test_nan_pixels(tmp_path):
    def add_nan(w):
        img = np.ones((16, 16), np.float32)
        img[3, 3] = np.nan
        w.add(img, label=0, split="train", sample_id="bad")

    root = _write(tmp_path / "d", image_format="npy", extra=add_nan)
    with pytest.raises(DataError, match=r"bad\.npy: 1 NaN/inf pixel"):
        LesionDataset(root, "train")


def test_empty_split(tmp_path):
    root = _write(tmp_path / "d")
    with pytest.raises(DataError, match="split 'test' is empty"):
        LesionDataset(root, "test")


def test_corrupt_image(tmp_path):
    root = _write(tmp_path / "d")
    rec = read_manifest(root)[0]
    (root / rec.image).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image"):
        LesionDataset(root, "train")


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        LesionDataset(tmp_path / "nothing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="dataset.yaml: missing"):
        LesionDataset(tmp_path / "empty", "train")


def test_missing_attribute_column(tmp_path):
    root = _write(tmp_path / "d")
    lines = (root / "manifest.csv").read_text().splitlines()
    lines = [",".join(line.split(",")[:-1]) for line in lines]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="missing column.*attr_texture"):
        LesionDataset(root, "train")


def test_box_outside_image(tmp_path):
    def add_bad_box(w):
        w.add(np.zeros((16, 16), np.float32), label=0, split="train", box=(0, 0, 20, 5),
              sample_id="badbox")

    # the writer refuses it before writing anything; a manifest edited by hand, on reading
    with pytest.raises(DataError, match=r"badbox: box \(0, 0, 20, 5\) outside the image"):
        _write(tmp_path / "w", extra=add_bad_box)

    def add_box(w):
        w.add(np.zeros((16, 16), np.float32), label=0, split="train", box=(0, 0, 16, 5),
              sample_id="badbox")

    root = _write(tmp_path / "d", extra=add_box)
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("badbox,train,0,0,images/badbox.png,,0,0,16,5",
                                                     "badbox,train,0,0,images/badbox.png,,0,0,20,5"))
    with pytest.raises(DataError, match=r"badbox: box \(0, 0, 20, 5\) outside the image"):
        LesionDataset(root, "train")


def test_inconsistent_image_sizes(tmp_path):
    def add_big(w):
        w.add(np.zeros((20, 20), np.float32), label=0, split="train", sample_id="big")

    root = _write(tmp_path / "d", extra=add_big)
    with pytest.raises(DataError, match=r"big\.png: image shape .* differs"):
        LesionDataset(root, "train")
