"""Stored values that load without error but do not mean what the files suggest are named on
loading: non-binary masks (every pixel > 0 counts as annotated) and 8-bit pixel values
saved unscaled (float or int32 images reach the model as 0..255, uint8 ones as 0..1)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalign.cli import main
from causalign.data.format import DatasetMeta, LesionDataset, SampleRecord, write_manifest


def _dataset(root: Path, image=None, mask=None, n: int = 4, fmt: str = "png") -> Path:
    """`n` train samples of 16 px; sample 0's image/mask replaced by `image`/`mask` (arrays)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k in range(n):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        m = np.zeros((16, 16), np.uint8)
        m[4:9, 4:9] = 255
        if k == 0 and image is not None:
            img = image
        if k == 0 and mask is not None:
            m = mask
        ipath, mpath = f"images/{k}.{fmt}", f"masks/{k}.{fmt}"
        for arr, rel in ((img, ipath), (m, mpath)):
            if fmt == "npy":
                np.save(root / rel, arr)
            else:
                Image.fromarray(arr).save(root / rel)
        rows.append(SampleRecord(id=str(k), split="train", label=k % 2, site="0",
                                 image=ipath, mask=mpath))
    write_manifest(root, DatasetMeta("t", ["a", "b"]), rows)
    return root


def _messages(root: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LesionDataset(root, "train")
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def test_binary_masks_and_uint8_images_load_quietly(tmp_path):
    # {0, 255} PNG masks and {0, 1} NPY masks are binary; uint8 images are scaled
    assert _messages(_dataset(tmp_path / "png")) == []
    one = np.zeros((16, 16), np.float32)
    one[2:5, 2:5] = 1.0
    img = np.random.default_rng(1).random((16, 16)).astype(np.float32)  # float in [0, 1]
    assert _messages(_dataset(tmp_path / "npy", image=img, mask=one, fmt="npy")) == []


def test_soft_mask_is_named(tmp_path):
    soft = np.zeros((16, 16), np.uint8)
    soft[4:9, 4:9] = 200
    soft[3, 3:10] = 3  # JPEG-like ringing around the lesion
    msgs = _messages(_dataset(tmp_path / "d", mask=soft))
    assert len(msgs) == 1
    assert "1 of 4 masks are not binary" in msgs[0]
    assert "0.png: values 0, 3, 200" in msgs[0] and "split 'train'" in msgs[0]
    # the documented reading is unchanged: every pixel > 0 is annotated
    with pytest.warns(UserWarning, match="not binary"):
        ds = LesionDataset(tmp_path / "d", "train")
    assert int(ds[0]["mask"].sum()) == 25 + 7


def test_probability_mask_and_negative_values_are_named(tmp_path):
    prob = np.zeros((16, 16), np.float32)
    prob[4:9, 4:9] = np.linspace(0.1, 1.0, 25).reshape(5, 5)
    msgs = _messages(_dataset(tmp_path / "p", mask=prob, fmt="npy"))
    assert len(msgs) == 1 and "26 distinct values from 0 to 1" in msgs[0]
    signed = np.full((16, 16), -1, np.int16)
    signed[4:9, 4:9] = 1
    msgs = _messages(_dataset(tmp_path / "s", mask=signed, fmt="npy"))
    assert len(msgs) == 1 and "values -1, 1" in msgs[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_8bit_values_stored_unscaled_are_named(tmp_path, dtype):
    img = np.random.default_rng(2).integers(0, 256, (16, 16)).astype(dtype)
    msgs = _messages(_dataset(tmp_path / "d", image=img, fmt="npy"))
    assert len(msgs) == 1, msgs
    assert "1 of 4 images hold whole numbers up to 255" in msgs[0]
    assert f"stored as {np.dtype(dtype)}" in msgs[0]


@pytest.mark.parametrize("values", [
    np.linspace(-1000.0, 2000.0, 256),  # CT in HU: negatives
    np.linspace(0.0, 255.0, 256) + 0.5,  # not whole numbers
    np.linspace(0.0, 4095.0, 256).round(),  # 12-bit range
])
def test_other_unscaled_images_load_quietly(tmp_path, values):
    img = values.reshape(16, 16).astype(np.float32)
    assert _messages(_dataset(tmp_path / "d", image=img, fmt="npy")) == []


def test_data_check_prints_one_warning_line(tmp_path, capsys):
    soft = np.zeros((16, 16), np.uint8)
    soft[4:9, 4:9] = 128
    soft[4, 4] = 255
    root = _dataset(tmp_path / "d", mask=soft)
    # the other splits: copies of train
    import csv
    rows = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))
    for split in ("val", "test"):
        for r in rows[:2]:
            rows.append({**r, "id": f"{split}{r['id']}", "split": split})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["data", "check", str(root)]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [e for e in err if "not binary" in e]
    # train and its copies in val and test each hold the soft mask of sample 0
    assert len(lines) == 3 and all(e.startswith("warning: ") for e in lines)


def test_every_soft_mask_is_counted_and_the_first_named(tmp_path):
    root = _dataset(tmp_path / "d")
    for k in (1, 3):
        soft = np.zeros((16, 16), np.uint8)
        soft[4:9, 4:9] = 100 + k
        soft[5, 5] = 255
        Image.fromarray(soft).save(root / f"masks/{k}.png")
    msgs = _messages(root)
    assert len(msgs) == 1 and "2 of 4 masks are not binary (e.g. 1.png: values 0, 101, 255)" \
        in msgs[0]


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_8bit_values_in_signed_integer_images_are_named(tmp_path, dtype):
    """int8/int16 images are kept unscaled (only uint8/uint16 read as 0..1), as float and
    int32 ones, but the check looked only at images converted to float32: an 8-bit image
    saved as int16 reached the model as 0..255 without a word (review audit)."""
    top = 256 if dtype == np.int16 else 128
    img = np.random.default_rng(2).integers(0, top, (16, 16)).astype(dtype)
    msgs = _messages(_dataset(tmp_path / "d", image=img, fmt="npy"))
    assert len(msgs) == 1, msgs
    assert "1 of 4 images hold whole numbers up to 255" in msgs[0]
    assert f"stored as {np.dtype(dtype)}" in msgs[0]
    # signed CT values (HU) stay quiet, as for float images
    ct = np.linspace(-1000, 2000, 256).reshape(16, 16).astype(np.int16)
    assert _messages(_dataset(tmp_path / "ct", image=ct, fmt="npy")) == []


def test_8bit_values_saved_as_uint16_are_named(tmp_path):
    """uint16 images read as value/65535: a split of 8-bit images saved as 16-bit PNGs reached
    the model as 0..0.004 without a word (review audit). A split with one dark 16-bit image
    among bright ones stays quiet."""
    rng = np.random.default_rng(3)
    root = _dataset(tmp_path / "d", image=rng.integers(0, 256, (16, 16)).astype(np.uint16))
    for k in range(1, 4):  # every image 16-bit, values of 8 bits
        Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint16)).save(
            root / f"images/{k}.png")
    assert np.array(Image.open(root / "images/1.png")).dtype == np.uint16
    msgs = _messages(root)
    assert len(msgs) == 1, msgs
    assert "all 4 images are uint16 with values only up to 255" in msgs[0]
    assert "so the model sees 0..0.0039" in msgs[0]
    Image.fromarray(rng.integers(0, 4096, (16, 16)).astype(np.uint16)).save(root / "images/2.png")
    assert _messages(root) == []  # 12-bit data among them: a 16-bit split
