"""Intensity scaling of images deeper than 8 bits: one rule per import (never an image's own
maximum), 12-bit data in 16-bit files spanning [0, 1], 16-bit storage keeping its levels,
and 8-bit sources imported exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalign.data.format import (
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    load_array,
    read_manifest,
    read_meta,
    to_float_image,
)
from causalign.data.importers import run_import
from causalign.data.importers.util import read_image
from causalign.errors import DataError

# all samples in train: the tests look at pixels, not at splits
ALL_TRAIN = {"val_frac": 0.0, "test_frac": 0.0}


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _flat(value: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A 16-bit image: a square of `value` on a background of value // 4."""
    a = np.full(shape, value // 4, np.uint16)
    a[4:12, 4:12] = value
    return a


def _imported(out: Path) -> dict[str, np.ndarray]:
    """id → the stored image as the dataset reader scales it (float, (C, H, W))."""
    return {r.id: to_float_image(load_array(out / r.image), 2, out / r.image)
            for r in read_manifest(out)}


def _dark_and_bright(src: Path) -> Path:
    """Two classes, each a dark (max 200) and a bright (max 4000) 16-bit PNG."""
    for cls in ("a", "b"):
        _png(src / cls / "dark.png", _flat(200))
        _png(src / cls / "bright.png", _flat(4000))
    return src


def test_dark_16bit_image_stays_darker_than_bright_one(tmp_path):
    # a dark 16-bit image (max <= 255) was divided by 255, a bright one by 65535: the dark
    # one came out 13x brighter, a brightness cue a classifier can learn
    src = _dark_and_bright(tmp_path / "src")
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 16, **ALL_TRAIN})
    imgs = _imported(out)
    for cls in ("a", "b"):
        dark, bright = imgs[f"{cls}_dark"], imgs[f"{cls}_bright"]
        assert bright.max() > dark.max()
        assert bright.max() / dark.max() == pytest.approx(4000 / 200, rel=0.01)
    # 12-bit data (max 4000 < 4096): 4000 / 4095, not 4000 / 65535
    assert imgs["a_bright"].max() == pytest.approx(4000 / 4095, abs=1e-4)
    assert "4095" in read_meta(out).info["intensity"]


def test_12bit_data_keeps_more_than_256_levels(tmp_path):
    # 12-bit data in 16-bit PNGs ended in [0, 0.0625], then stored with 8 bits: ~16 levels
    src = tmp_path / "src"
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0 … 4095: 4096 levels
    _png(src / "a" / "ramp.png", ramp)
    _png(src / "b" / "ramp.png", ramp[::-1].copy())
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 64, **ALL_TRAIN})
    img = _imported(out)["a_ramp"]
    assert load_array(out / "images" / "a_ramp.png").dtype == np.uint16
    assert len(np.unique(img)) > 256
    assert img.min() == 0.0 and img.max() == pytest.approx(1.0)
    # stored levels are the source's: value / 4095 within 16-bit rounding
    np.testing.assert_allclose(img[0], ramp / 4095.0, atol=1 / 65535)
    ds = LesionDataset(out, "train")
    assert float(ds.images.max()) == pytest.approx(1.0)


def test_16bit_gray_as_rgb_is_not_saturated(tmp_path):
    # --color rgb converted 16-bit PNGs with PIL, which clips every value above 255 to 255
    src = _dark_and_bright(tmp_path / "src")
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 16, "color": "rgb", **ALL_TRAIN})
    imgs = _imported(out)
    bright, dark = imgs["a_bright"], imgs["a_dark"]
    assert bright.shape[0] == 3
    assert bright.max() == pytest.approx(4000 / 4095, abs=1 / 255)
    assert bright[:, 0, 0].max() == pytest.approx(1000 / 4095, abs=1 / 255)  # not clipped
    assert dark.max() == pytest.approx(200 / 4095, abs=1 / 255)


def test_npy_uint16_and_float_scaled_per_import(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        np.save(src / cls / "u_dark.npy", _flat(300))
        np.save(src / cls / "u_bright.npy", _flat(3000))
        # float data outside [0, 1] (e.g. raw intensities): per-image min-max made both
        # span [0, 1]
        np.save(src / cls / "f_low.npy", _flat(8).astype(np.float32))
        np.save(src / cls / "f_high.npy", _flat(80).astype(np.float32))
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 16, **ALL_TRAIN})
    imgs = _imported(out)
    assert imgs["a_u_bright"].max() == pytest.approx(3000 / 4095, abs=1e-4)
    assert imgs["a_u_dark"].max() == pytest.approx(300 / 4095, abs=1e-4)
    # floats: one range for the import, (x − 2) / (80 − 2)
    assert imgs["a_f_high"].max() == pytest.approx(1.0)
    assert imgs["a_f_low"].max() == pytest.approx((8 - 2) / 78, abs=1e-4)
    assert imgs["a_f_low"].min() == pytest.approx(0.0, abs=1e-6)
    assert imgs["a_f_high"].min() == pytest.approx((20 - 2) / 78, abs=1e-4)


def test_8bit_import_unchanged(tmp_path):
    # 8-bit sources: value / 255, stored as 8-bit PNGs, nothing added to dataset.yaml
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    srcs = {}
    for cls in ("a", "b"):
        for i in range(2):
            a = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            a[0, 0] = 10  # all dark: max far below 255
            a = np.minimum(a, 40).astype(np.uint8)
            _png(src / cls / f"x{i}.png", a)
            srcs[f"{cls}_x{i}"] = a
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 16, **ALL_TRAIN})
    assert "intensity" not in read_meta(out).info
    for sid, a in srcs.items():
        stored = load_array(out / "images" / f"{sid}.png")
        assert stored.dtype == np.uint8
        np.testing.assert_array_equal(stored, a)


def test_scan_reads_only_deep_images(tmp_path):
    from causalign.data.importers.util import scan_intensity

    _png(tmp_path / "u8.png", np.full((8, 8), 255, np.uint8))
    np.save(tmp_path / "u8.npy", np.full((8, 8), 255, np.uint8))
    assert not scan_intensity([tmp_path / "u8.png", tmp_path / "u8.npy"]).high_depth
    _png(tmp_path / "a.png", _flat(5000))  # 13 bits
    np.save(tmp_path / "b.npy", _flat(100))
    s = scan_intensity([tmp_path / "a.png", tmp_path / "b.npy", tmp_path / "missing.png"])
    assert s.high_depth and s.int_max == 8191 and s.float_range is None
    # a file read on its own: the declared depth, never its own maximum
    assert read_image(tmp_path / "b.npy").max() == pytest.approx(100 / 65535)
    _png(tmp_path / "dark.png", _flat(200))
    assert read_image(tmp_path / "dark.png").max() == pytest.approx(200 / 65535)


def test_writer_png_bits(tmp_path):
    meta = DatasetMeta("toy", ["neg", "pos"])
    w = DatasetWriter(tmp_path / "d", meta, png_bits=16)
    ramp = (np.arange(64 * 64, dtype=np.float32) / 4095).reshape(64, 64)
    for i in range(2):
        w.add(ramp, label=i, split="train")
    w.close()
    ds = LesionDataset(tmp_path / "d", "train")
    assert ds.images.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(ds.images[0, 0].numpy(), ramp, atol=1 / 65535)
    assert len(np.unique(ds.images[0].numpy())) == 4096
    with pytest.raises(DataError, match="png_bits"):
        DatasetWriter(tmp_path / "e", meta, png_bits=12)


def test_lidc_16bit_png_patches_one_rule(tmp_path):
    src = tmp_path / "src"
    rows = ["image,patient_id,label,split"]
    for k, value in enumerate((200, 4000, 300, 3000)):
        _png(src / f"p{k}.png", _flat(value))
        rows.append(f"p{k}.png,P{k},{k % 2},train")
    (src / "patches.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run_import("lidc", src, out, {"size": 16, "patches_csv": "patches.csv"})
    imgs = _imported(out)
    assert load_array(out / "images" / "p1.png").dtype == np.uint16
    assert imgs["p1"].max() == pytest.approx(4000 / 4095, abs=1e-4)
    assert imgs["p0"].max() == pytest.approx(200 / 4095, abs=1e-4)  # was 200 / 255


def test_busi_16bit_export_one_rule(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    rng = np.random.default_rng(1)
    for cls, values in (("benign", (200, 3000)), ("malignant", (250, 3500))):
        for k, v in enumerate(values, start=1):
            img = _flat(v) + rng.integers(0, 20, (16, 16)).astype(np.uint16)  # no duplicates
            _png(root / cls / f"{cls} ({k}).png", img)
            _png(root / cls / f"{cls} ({k})_mask.png", mask)
    out = tmp_path / "out"
    run_import("busi", root, out, {"size": 16, **ALL_TRAIN})
    imgs = _imported(out)
    dark, bright = imgs["benign_1"], imgs["benign_2"]
    assert bright.max() > 10 * dark.max()
    assert bright.max() == pytest.approx((3000 + 19) / 4095, abs=20 / 4095)
