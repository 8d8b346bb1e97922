"""Mutation audit of the data area (dataset format, synthetic benchmark, folder/BUSI
importers and their helpers): behaviours the earlier tests let slip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from causalign.data.format import (
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    read_manifest,
    split_leaks,
)
from causalign.errors import DataError


def _meta(**kw) -> DatasetMeta:
    return DatasetMeta("toy", ["benign", "malignant"], **kw)


def test_writer_refuses_a_label_one_past_the_last_class(tmp_path):
    """Guard: label == number of classes is outside 0..K-1 and refused before any file is
    written (kills `< len(classes)` -> `<= len(classes)` in `DatasetWriter.add`)."""
    w = DatasetWriter(tmp_path / "d", _meta())
    with pytest.raises(DataError, match=r"label 2 outside the declared classes 0\.\.1"):
        w.add(np.zeros((8, 8), np.float32), label=2, split="train", sample_id="x")
    assert not any((tmp_path / "d" / "images").iterdir())


def test_writer_checks_a_box_against_height_on_a_wide_image(tmp_path):
    """Guard: on a 16-high, 32-wide image a box reaching row 20 is outside the image, though
    20 < the width (kills comparing y1 with the width in `_check_shapes`)."""
    w = DatasetWriter(tmp_path / "d", _meta())
    with pytest.raises(DataError, match=r"box \(0, 0, 8, 20\) outside the image \(32x16\)"):
        w.add(np.zeros((16, 32), np.float32), label=0, split="train", box=(0, 0, 8, 20))
    w.add(np.zeros((16, 32), np.float32), label=0, split="train", box=(0, 0, 30, 16))


def _one_sample(root, **add) -> None:
    """A dataset of one gray 16x16 training sample with two attributes."""
    with DatasetWriter(root, _meta(attributes=["a", "b"])) as w:
        w.add(np.zeros((16, 16), np.float32), label=0, split="train", sample_id="s",
              **add)


def _edit_manifest(root, old: str, new: str) -> None:
    path = root / "manifest.csv"
    text = path.read_text()
    assert text.count(old) == 1, text
    path.write_text(text.replace(old, new))


def test_16bit_png_rounds_to_the_nearest_level(tmp_path):
    """Guard: `save_array` with 16 bits stores round(v * 65535), not its truncation (kills
    the dropped ``+ 0.5``: every value 0.6 level above an integer lost a level)."""
    from causalign.data.format import load_array, save_array

    levels = np.array([[0.0, 1000.6, 40000.5, 65534.7]])
    img = (levels / 65535.0).astype(np.float64)
    save_array(tmp_path / "x.png", img, "png", bits=16)
    back = load_array(tmp_path / "x.png")
    assert back.dtype == np.uint16
    assert back.tolist() == np.floor(levels + 0.5).astype(int).tolist()  # 0, 1001, 40001, 65535


def test_reader_refuses_a_zero_width_box(tmp_path):
    """Guard: a manifest box with x1 == x0 covers no pixel and is refused on reading (kills
    `box[2] <= box[0]` -> `<`, which let an empty box through as "annotated")."""
    _one_sample(tmp_path, box=(2, 3, 6, 9), attributes=[0.0, 1.0])
    _edit_manifest(tmp_path, ",2,3,6,9,", ",2,3,2,9,")
    with pytest.raises(DataError, match=r"empty box \(2, 3, 2, 9\)"):
        read_manifest(tmp_path)


def test_reader_refuses_a_negative_attribute(tmp_path):
    """Guard: attributes are binary targets; -1 (a "not rated" code) is refused on reading
    (kills dropping the lower bound of the [0, 1] check)."""
    _one_sample(tmp_path, attributes=[0.0, 1.0])
    _edit_manifest(tmp_path, ",0,1\n", ",-1,1\n")
    with pytest.raises(DataError, match=r"attribute a = '-1' is not in \[0, 1\]"):
        read_manifest(tmp_path)


def test_an_empty_site_cell_reads_as_site_0(tmp_path):
    """Guard: an empty ``site`` cell is site "0", the writer's default, so a hand-edited
    manifest does not invent a second site "" (kills dropping ``or "0"``)."""
    _one_sample(tmp_path, attributes=[0.0, 1.0])
    _edit_manifest(tmp_path, "s,train,0,0,", "s,train,0,,")
    assert read_manifest(tmp_path)[0].site == "0"
    assert LesionDataset(tmp_path, "train").sites == ["0"]


def test_a_four_row_rgb_npy_is_read_as_the_writer_checked_it(tmp_path):
    """Guard: an (H=4, W=6, 3) NPY is channel-first to both the writer's shape check and the
    reader (channel-last needs H > 4): its (6, 3) mask is accepted on writing and read
    without a shape error (kills `shape[0] > 4` -> `>= 4` in `_stored_image`)."""
    img = np.random.default_rng(0).random((4, 6, 3)).astype(np.float32)
    mask = np.zeros((6, 3), np.uint8)
    mask[1:3, 1] = 1
    with DatasetWriter(tmp_path, _meta(channels=4), image_format="npy") as w:
        w.add(img, label=0, split="train", mask=mask, sample_id="s")
    ds = LesionDataset(tmp_path, "train")
    assert ds.image_shape == (4, 6, 3)
    assert np.array_equal(ds.images[0].numpy(), img)
    assert ds.masks[0, 0].numpy().astype(bool).tolist() == mask.astype(bool).tolist()


def test_a_mask_drawn_in_green_is_read_as_annotated(tmp_path):
    """Guard: an RGB mask PNG marks its lesion in any colour: a green-only mask is read by
    the maximum over the colour channels, not the red one (kills reading channel 0 only,
    which found the mask empty and the sample unannotated)."""
    from PIL import Image

    _one_sample(tmp_path, attributes=[0.0, 1.0])
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[5:9, 2:7, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "masks" / "s.png")
    _edit_manifest(tmp_path, "images/s.png,,", "images/s.png,masks/s.png,")
    ds = LesionDataset(tmp_path, "train")
    assert bool(ds.has_mask[0])
    assert ds.masks[0, 0].numpy().astype(bool).tolist() == (rgb[..., 1] > 0).tolist()


def test_identical_images_within_one_split_are_no_leak(tmp_path):
    """Guard: `split_leaks` reports pixels shared ACROSS splits only; two equal images in the
    training split (augmented copies) are no leakage (kills counting every repeated image)."""
    img = np.random.default_rng(1).random((8, 8)).astype(np.float32)
    other = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    with DatasetWriter(tmp_path, _meta()) as w:
        w.add(img, label=0, split="train", sample_id="a")
        w.add(img, label=1, split="train", sample_id="b")
        w.add(other, label=0, split="val", sample_id="c")
    splits = [LesionDataset(tmp_path, s) for s in ("train", "val")]
    assert split_leaks(splits) == []
    with DatasetWriter(tmp_path / "x", _meta()) as w:  # the same image in val: reported
        w.add(img, label=0, split="train", sample_id="a")
        w.add(img, label=1, split="val", sample_id="b")
    lines = split_leaks([LesionDataset(tmp_path / "x", s) for s in ("train", "val")])
    assert lines == ["1 image(s) have pixels identical to an image of another split: "
                     "train/a = val/b"]


@pytest.mark.parametrize("add,needle", [
    ({"box": (2, 3, 2, 9)}, r"sample s: empty box \(2, 3, 2, 9\)"),
    ({"box": (0, 0, 4, 4, 3, 3)}, r"sample s: empty box slice range \(3, 3\)"),
    ({"attributes": [-1.0, 0.0]}, r"sample s: attribute a = -1 is not in \[0, 1\]"),
    ({"attributes": [0.0, float("inf")]}, r"sample s: attribute b = inf is not in \[0, 1\]"),
])
def test_writer_refuses_what_its_reader_would_refuse(tmp_path, add, needle):
    """Regression: `DatasetWriter.add` wrote an empty box or an attribute outside [0, 1]
    (-1, inf) without a word, and the dataset it closed could not be read ("empty box",
    "not in [0, 1]" from `LesionDataset`). Refused now before any file is written (the
    surviving mutants of the reader's box and attribute checks pointed at it)."""
    meta = _meta(attributes=["a", "b"], ndim=3 if len(add.get("box", ())) == 6 else 2)
    w = DatasetWriter(tmp_path, meta)
    shape = (4, 8, 8) if meta.ndim == 3 else (16, 16)
    kw = {"attributes": [0.0, 1.0], **add}
    with pytest.raises(DataError, match=needle):
        w.add(np.zeros(shape, np.float32), label=0, split="train", sample_id="s", **kw)
    assert not any((tmp_path / "images").iterdir()) and not w.rows


def test_negative_indices_in_a_tensor_give_split_positions(tmp_path):
    """Guard: ``ds[[-1, 0]]`` names the last and first samples, and ``index`` holds their
    positions n-1 and 0, not -1 (kills returning the raw negative index tensor)."""
    with DatasetWriter(tmp_path, _meta()) as w:
        for k in range(3):
            w.add(np.full((8, 8), k / 4, np.float32), label=k % 2, split="train")
    ds = LesionDataset(tmp_path, "train")
    batch = ds[[-1, 0]]
    assert batch["index"].tolist() == [2, 0]
    assert torch.equal(batch["image"], ds.images[[2, 0]])
    assert ds[torch.tensor(-2)]["index"].item() == 1


def test_a_restricted_split_remembers_the_size_of_its_source(tmp_path):
    """Guard: `restricted` (twice, as nested Subsets give it) keeps ``source_len`` the
    original split's size and ``source_positions`` its positions, so per-sample tables map
    rows back into the full split (kills ``source_len = len(view)``)."""
    with DatasetWriter(tmp_path, _meta()) as w:
        for k in range(5):
            w.add(np.full((8, 8), k / 8, np.float32), label=k % 2, split="train")
    ds = LesionDataset(tmp_path, "train")
    sub = ds.restricted([4, 1, 3]).restricted([2, 0])
    assert sub.source_len == 5 and len(sub) == 2
    assert sub.source_positions.tolist() == [3, 4]
    assert sub.labels.tolist() == [1, 0]


def test_synth_box_is_the_mask_box_padded_by_two_pixels(tmp_path):
    """Guard: a synthetic lesion's box is its mask's tight box (x1/y1 exclusive) grown by 2
    pixels on every side, clipped to the image (kills dropping the ``+ 1`` of the exclusive
    right/bottom edge in `box_of`, a box one pixel short of the padding on two sides)."""
    from causalign.data.synth import SynthConfig, box_of, generate

    mask = np.zeros((32, 32), bool)
    mask[10:15, 20:31] = True  # rows 10..14, columns 20..30
    assert box_of(mask, pad=2, size=32) == (18, 8, 32, 17)
    generate(tmp_path, SynthConfig(n_train=3, n_val=1, n_test=1, size=32, seed=3))
    for rec in read_manifest(tmp_path):
        m = np.asarray(Image.open(tmp_path / rec.mask)) > 0
        ys, xs = np.nonzero(m)
        want = (max(xs.min() - 2, 0), max(ys.min() - 2, 0),
                min(xs.max() + 3, 32), min(ys.max() + 3, 32))
        assert rec.box == want, rec.id


def test_float_images_reaching_exactly_1_are_kept_as_they_are(tmp_path):
    """Guard: float NPY sources within [0, 1] (max exactly 1.0 included) keep their values;
    only a range outside [0, 1] is rescaled import-wide (kills `hi <= 1.0` -> `< 1.0`,
    which stretched images of 0.2..1.0 to 0..1)."""
    from causalign.data.importers.util import read_image, scan_intensity

    a = np.linspace(0.2, 1.0, 16, dtype=np.float32).reshape(4, 4)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", np.full((4, 4), 0.5, np.float32))
    scale = scan_intensity([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert scale.has_float and scale.float_range is None
    assert np.array_equal(read_image(tmp_path / "a.npy", "L", scale), a)
    np.save(tmp_path / "c.npy", np.full((4, 4), 2.0, np.float32))  # outside: rescaled
    wide = scan_intensity([tmp_path / "a.npy", tmp_path / "c.npy"])
    assert wide.float_range == pytest.approx((0.2, 2.0))
    assert np.allclose(read_image(tmp_path / "a.npy", "L", wide), (a - 0.2) / 1.8, atol=1e-6)


def test_a_gray_import_of_a_channel_first_npy_averages_its_channels(tmp_path):
    """Guard: `read_image(..., "L")` of a (3, H, W) float NPY is the channel mean (kills the
    maximum over channels, which brightened every colour image read as gray)."""
    from causalign.data.importers.util import read_image

    rgb = np.random.default_rng(0).random((3, 5, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", rgb)
    assert np.allclose(read_image(tmp_path / "x.npy", "L"), rgb.mean(axis=0), atol=1e-7)


def test_an_imported_mask_drawn_in_green_is_annotated(tmp_path):
    """Guard: the importers' `read_mask` takes a colour mask's maximum over its channels,
    so a green-only outline counts (kills reading the red channel only, an empty mask)."""
    from causalign.data.importers.util import read_mask

    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[1:4, 2:5, 1] = 200
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == (rgb[..., 1] > 0).tolist()
    np.save(tmp_path / "m.npy", rgb)  # channel-last NPY likewise
    assert read_mask(tmp_path / "m.npy").tolist() == (rgb[..., 1] > 0).tolist()


def _npy_split(root, image: np.ndarray, mask: np.ndarray | None = None) -> None:
    """One training sample stored as NPY, image and mask as given (no writer conversion)."""
    with DatasetWriter(root, _meta(), image_format="npy") as w:
        w.add(np.zeros(image.shape, np.float32), label=0, split="train", sample_id="s",
              mask=None if mask is None else np.ones(mask.shape, np.uint8))
    np.save(root / "images" / "s.npy", image)
    if mask is not None:
        (root / "masks" / "s.png").unlink()
        np.save(root / "masks" / "s.npy", mask)
        _edit_manifest(root, "masks/s.png", "masks/s.npy")


def test_a_binary_0_1_float_image_is_not_taken_for_8bit_values(tmp_path, recwarn):
    """Guard: a float image of whole numbers 0 and 1 is a [0, 1] image, not "8-bit values
    stored as float"; 0..255 floats are (kills `1.0 < top` -> `1.0 <= top`)."""
    img = np.zeros((8, 8), np.float32)
    img[2:5, 2:5] = 1.0
    _npy_split(tmp_path / "a", img)
    LesionDataset(tmp_path / "a", "train")
    assert not [w for w in recwarn if "whole numbers up to 255" in str(w.message)]
    _npy_split(tmp_path / "b", img * 200)
    with pytest.warns(UserWarning, match="1 of 1 images hold whole numbers up to 255"):
        LesionDataset(tmp_path / "b", "train")


def test_a_mask_of_only_negative_labels_is_reported_not_binary(tmp_path):
    """Guard: a mask holding 0 and -1 (an "ignore" code) is not binary and is reported,
    though no pixel is positive (kills dropping the negative-value test of `_not_binary`,
    which found such a mask binary because its maximum is 0)."""
    mask = np.zeros((8, 8), np.int16)
    mask[1:3, 1:3] = -1
    _npy_split(tmp_path, np.zeros((8, 8), np.float32), mask)
    with pytest.warns(UserWarning, match="1 of 1 masks are not binary"):
        ds = LesionDataset(tmp_path, "train")
    assert not bool(ds.has_mask[0])  # nothing positive: no annotation


def test_a_volume_box_without_slice_range_beside_one_with_it(tmp_path):
    """Guard: in a volume dataset where one box has a slice range, a 4-number box is written
    with two empty z cells, so its row keeps the header's cell count and spans every slice
    (kills padding the wrong rows: the manifest became unreadable, "cells" error)."""
    meta = _meta(ndim=3)
    with DatasetWriter(tmp_path, meta, image_format="npy") as w:
        w.add(np.zeros((4, 8, 8), np.float32), label=0, split="train", box=(1, 1, 5, 5, 1, 3))
        w.add(np.zeros((4, 8, 8), np.float32), label=1, split="train", box=(2, 2, 6, 6))
    ds = LesionDataset(tmp_path, "train")
    assert [r.box for r in ds.records] == [(1, 1, 5, 5, 1, 3), (2, 2, 6, 6)]
    boxes = ds.box_masks[:, 0]
    assert boxes[0].sum(dim=(1, 2)).tolist() == [0, 16, 16, 0]
    assert boxes[1].sum(dim=(1, 2)).tolist() == [16, 16, 16, 16]


def test_a_mask_pixel_above_a_quarter_of_the_maximum_is_annotated(tmp_path):
    """Guard: `read_mask` separates JPEG noise at a quarter of the mask's maximum: 100 of 255
    is annotated, 40 is not (kills a threshold of three quarters, which cut antialiased
    lesion edges)."""
    from causalign.data.importers.util import read_mask

    m = np.zeros((4, 5), np.uint8)
    m[1, 1:4] = (40, 100, 255)
    Image.fromarray(m).save(tmp_path / "m.png")
    assert np.argwhere(read_mask(tmp_path / "m.png")).tolist() == [[1, 2], [1, 3]]


def test_a_lesion_too_small_for_the_new_size_keeps_one_pixel(tmp_path):
    """Guard: downsampling a one-pixel lesion keeps the pixel nearest its centre instead of
    losing the annotation (kills dropping `resize_mask`'s fallback)."""
    from causalign.data.importers.util import resize_mask

    mask = np.zeros((64, 64), bool)
    mask[40, 20] = True
    out = resize_mask(mask, (8, 8))
    assert np.argwhere(out).tolist() == [[5, 2]]  # 40 * 8 / 64, 20 * 8 / 64


def test_a_stratum_with_fewer_groups_than_splits_is_assigned_by_deficit():
    """A class of two patients beside a larger one: both go to train (each split's first
    group is seeded only where the stratum has one group per split). Kills U9 (seeding
    while groups remain, which lent one of the two to val)."""
    from causalign.data.importers.util import assign_splits

    groups = ["a0", "a1", "a2", "b0", "b1"]
    strata = [0, 0, 0, 1, 1]
    for seed in range(3):
        out = assign_splits(groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed,
                            strata=strata)
        assert sorted(out[g] for g in ("a0", "a1", "a2")) == ["test", "train", "val"]
        assert out["b0"] == out["b1"] == "train"
