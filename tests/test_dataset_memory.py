"""The split cache of `LesionDataset` is compact (images in their stored integer dtype, only
non-empty masks, as bool, boxes as coordinates) and its batches equal, bit for bit, what the
float32 cache it replaced gave: every image converted on reading, float masks, materialised
box masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causalign.data.format import (
    DatasetMeta,
    LesionDataset,
    SampleRecord,
    load_array,
    to_float_image,
    write_manifest,
)
from causalign.errors import DataError


def _old_to_float_image(array: np.ndarray, ndim: int) -> np.ndarray:
    """The reader's conversion before the compact cache, verbatim (less its errors)."""
    if array.dtype == np.uint8:
        out = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        out = array.astype(np.float32) / 65535.0
    else:
        out = array.astype(np.float32)
    if out.ndim == ndim:
        out = out[None]
    elif out.ndim == ndim + 1 and ndim == 2 and out.shape[-1] in (1, 3, 4) and out.shape[0] > 4:
        out = np.moveaxis(out[..., :3], -1, 0)
    return np.ascontiguousarray(out)


def _old_cache(root: Path, split: str = "train") -> dict[str, torch.Tensor]:
    """The whole-split float32 tensors the old `_load_all` built."""
    ds_meta_ndim = 3 if (root / "ndim3").exists() else 2
    from causalign.data.format import read_manifest

    images, masks, boxes = [], [], []
    for r in (r for r in read_manifest(root) if r.split == split):
        img = _old_to_float_image(load_array(root / r.image), ds_meta_ndim)
        spatial = img.shape[1:]
        if r.mask is not None:
            m = load_array(root / r.mask)
            if m.ndim == len(spatial) + 1 and m.shape[-1] in (3, 4):
                m = m[..., :3].max(axis=-1)
            mask = (m > 0).astype(np.float32)[None]
        else:
            mask = np.zeros((1, *spatial), np.float32)
        if r.box is not None:
            x0, y0, x1, y1 = r.box
            box = np.zeros((1, *spatial), np.float32)
            box[..., y0:y1, x0:x1] = 1.0
        else:
            box = mask
        images.append(img)
        masks.append(mask)
        boxes.append(box)
    return {"image": torch.from_numpy(np.stack(images)), "mask": torch.from_numpy(np.stack(masks)),
            "box_mask": torch.from_numpy(np.stack(boxes))}


def _write(root: Path, images: list[np.ndarray], ndim: int = 2, channels: int = 1,
           ext: str = "png") -> Path:
    """A train split of `images` (saved as they are), masks on most, boxes on some."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    if ndim == 3:
        (root / "ndim3").touch()  # tells `_old_cache` the spatial rank
    rng = np.random.default_rng(1)
    rows = []
    for k, img in enumerate(images):
        e = ext if ext != "mixed" else ("png" if k % 2 else "npy")
        rel = f"images/{k}.{e}"
        if e == "png":
            Image.fromarray(img).save(root / rel)
        else:
            np.save(root / rel, img)
        spatial = img.shape[:ndim] if img.ndim > ndim and img.shape[-1] in (1, 3, 4) \
            and ndim == 2 else img.shape[-ndim:]
        mask_rel = None
        if k % 4 != 3:  # every 4th has no mask; every 4th mask is empty (all zero)
            m = (rng.random(spatial) > 0.6).astype(np.uint8) * 255 if k % 4 != 2 \
                else np.zeros(spatial, np.uint8)
            mask_rel = f"masks/{k}.{'png' if ndim == 2 else 'npy'}"
            if ndim == 2:
                Image.fromarray(m).save(root / mask_rel)
            else:
                np.save(root / mask_rel, m)
        box = (1, 2, spatial[-1] - 1, spatial[-2] - 3) if k % 3 == 0 else None
        rows.append(SampleRecord(id=str(k), split="train", label=k % 2, site="0", image=rel,
                                 mask=mask_rel, box=box))
    write_manifest(root, DatasetMeta("t", ["a", "b"], ndim=ndim, channels=channels), rows)
    return root


def _rng_images(kind: str, n: int = 9) -> tuple[list[np.ndarray], dict]:
    rng = np.random.default_rng(0)
    if kind == "gray8":
        # every level once, so all 256 values' conversions are compared
        levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
        return [rng.permutation(levels.ravel()).reshape(16, 16) for _ in range(n)], {}
    if kind == "gray16":
        levels = np.arange(0, 65536, dtype=np.uint32)  # every 16-bit level across the split
        chunks = np.array_split(rng.permutation(levels), n)
        return [np.resize(c, (96, 96)).astype(np.uint16) for c in chunks], {}
    if kind == "rgb":
        return [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(n)], \
            {"channels": 3}
    if kind == "rgba":
        return [rng.integers(0, 256, (12, 10, 4), dtype=np.uint8) for _ in range(n)], \
            {"channels": 3}
    if kind == "volume":  # float NPY volumes (D, H, W)
        return [rng.random((3, 8, 9), dtype=np.float32) * 7 - 2 for _ in range(n)], \
            {"ndim": 3, "ext": "npy"}
    if kind == "volume_int16":  # CT in HU
        return [rng.integers(-1024, 3000, (3, 8, 9)).astype(np.int16) for _ in range(n)], \
            {"ndim": 3, "ext": "npy"}
    if kind == "float_npy":
        return [rng.normal(0.4, 0.3, (10, 10)).astype(np.float64) for _ in range(n)], \
            {"ext": "npy"}
    if kind == "npy_hwc_uint16":
        return [rng.integers(0, 65536, (10, 10, 3)).astype(np.uint16) for _ in range(n)], \
            {"ext": "npy", "channels": 3}
    if kind == "mixed_8_16":  # 8-bit and 16-bit PNGs in one split: a float32 cache
        return [rng.integers(0, 256, (10, 10), dtype=np.uint8) if k % 2 else
                rng.integers(0, 65536, (10, 10)).astype(np.uint16) for k in range(n)], {}
    if kind == "mixed_png_npy":  # uint8 PNGs and float NPYs
        return [rng.integers(0, 256, (10, 10), dtype=np.uint8) if k % 2 else
                rng.random((10, 10), dtype=np.float32) for k in range(n)], {"ext": "mixed"}
    raise AssertionError(kind)


def _bits(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.float32
    return t.contiguous().numpy().view(np.uint32)


KINDS = ["gray8", "gray16", "rgb", "rgba", "volume", "volume_int16", "float_npy",
         "npy_hwc_uint16", "mixed_8_16", "mixed_png_npy"]


@pytest.mark.parametrize("kind", KINDS)
def test_batches_equal_the_old_float_cache_bit_for_bit(tmp_path, kind):
    images, opts = _rng_images(kind)
    root = _write(tmp_path / kind, images, **opts)
    ds = LesionDataset(root, "train")
    old = _old_cache(root)
    n = len(ds)
    assert old["image"].shape[1:] == ds.image_shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    # [0, 3, 6]: all boxed; [0, 1, 4, 5]: all with a non-empty mask (the one-gather paths)
    for idx in (order[:4], order[4:], order, torch.arange(n).flip(0),
                torch.tensor([0, 3, 6]), torch.tensor([0, 1, 4, 5])):
        b = ds.batch(idx)
        for key in ("image", "mask", "box_mask"):
            assert b[key].dtype == torch.float32 and b[key].shape == old[key][idx].shape
            assert np.array_equal(_bits(b[key]), _bits(old[key][idx])), (kind, key)
    for i in (0, 2, n - 1, -1):  # single items: a scalar index
        item = ds[i]
        for key in ("image", "mask", "box_mask"):
            assert item[key].shape == old[key][i].shape
            assert np.array_equal(_bits(item[key]), _bits(old[key][i])), (kind, key, i)
    # the whole-split tensors the few callers that need everything read
    assert np.array_equal(_bits(ds.images), _bits(old["image"]))
    assert np.array_equal(_bits(ds.masks), _bits(old["mask"]))
    assert np.array_equal(_bits(ds.box_masks), _bits(old["box_mask"]))
    # has_mask: a non-empty mask; has_annotation: a non-empty mask or a box
    has = old["mask"].flatten(1).amax(1) > 0
    assert torch.equal(ds.has_mask, has)
    boxed = torch.tensor([k % 3 == 0 for k in range(n)])
    assert torch.equal(ds.has_box_or_mask, has | boxed)


@pytest.mark.parametrize("kind,dtype", [("gray8", torch.uint8), ("rgb", torch.uint8),
                                        ("gray16", torch.int16), ("volume_int16", torch.int16),
                                        ("float_npy", torch.float32),
                                        ("mixed_8_16", torch.float32)])
def test_cache_keeps_the_stored_dtype_and_only_nonempty_masks(tmp_path, kind, dtype):
    images, opts = _rng_images(kind)
    ds = LesionDataset(_write(tmp_path / kind, images, **opts), "train")
    assert ds._images.dtype == dtype  # uint16 kept as its bits in int16
    n = len(ds)
    assert ds._masks.dtype == torch.bool
    # masks on k % 4 in (0, 1); k % 4 == 2 is all zero, 3 has none: neither takes a row
    assert len(ds._masks) == sum(k % 4 in (0, 1) for k in range(n)) == int(ds.has_mask.sum())
    # no box masks are stored: nothing of the split's spatial size besides images and masks
    big = [name for name, v in vars(ds).items() if isinstance(v, torch.Tensor)
           and v.dim() > 2 and name not in ("_images", "_masks")]
    assert big == []


def test_cache_of_an_8bit_rgb_split_is_a_quarter_of_the_float_one(tmp_path):
    images, opts = _rng_images("rgb", n=16)
    ds = LesionDataset(_write(tmp_path / "rgb", images, **opts), "train")
    cached = sum(v.numel() * v.element_size() for v in vars(ds).values()
                 if isinstance(v, torch.Tensor) and v.dim() > 2)
    float_cache = 16 * (3 + 1 + 1) * 12 * 10 * 4  # images + masks + box masks, float32
    assert cached <= float_cache / 4.5  # 3 B images + ≤ 1 B masks per pixel, of 20 B


def test_batch_tensors_do_not_share_memory(tmp_path):
    # box_mask was a separate tensor from mask: editing one in place (a method zeroing a
    # mask) must not change the other, nor the cache the next epoch reads
    images, opts = _rng_images("gray8")
    ds = LesionDataset(_write(tmp_path / "d", images, **opts), "train")
    idx = torch.tensor([1, 4, 5])  # masks, no boxes
    b = ds.batch(idx)
    before = b["box_mask"].clone()
    b["mask"].zero_()
    b["image"].zero_()
    assert torch.equal(b["box_mask"], before)
    again = ds.batch(idx)
    assert float(again["mask"].sum()) > 0 and float(again["image"].sum()) > 0


def test_float_images_do_not_follow_the_default_dtype(tmp_path):
    images, opts = _rng_images("gray8")
    ds = LesionDataset(_write(tmp_path / "d", images, **opts), "train")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        b = ds.batch(torch.arange(3))
    finally:
        torch.set_default_dtype(old)
    assert {b[k].dtype for k in ("image", "mask", "box_mask")} == {torch.float32}


def test_to_float_image_unchanged_and_errors_kept(tmp_path):
    rng = np.random.default_rng(0)
    for arr, ndim in ((rng.integers(0, 256, (7, 6), dtype=np.uint8), 2),
                      (rng.integers(0, 65536, (7, 6, 3)).astype(np.uint16), 2),
                      (rng.integers(-5, 5, (2, 7, 6)).astype(np.int16), 3),
                      (rng.normal(size=(2, 7, 6)), 3)):
        got = to_float_image(arr, ndim, tmp_path / "x")
        want = _old_to_float_image(arr, ndim)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32),
                                                          want.view(np.uint32))
    with pytest.raises(DataError, match="NaN/inf"):
        to_float_image(np.array([[0.0, np.nan]] * 5), 2, tmp_path / "x")
    with pytest.raises(DataError, match="unsupported pixel type bool"):
        to_float_image(np.ones((5, 5), bool), 2, tmp_path / "x")
    with pytest.raises(DataError, match="empty image"):
        to_float_image(np.zeros((0, 5), np.uint8), 2, tmp_path / "x")


def test_write_examples_shows_the_first_items_unchanged(tmp_path, monkeypatch):
    # `data synth` draws its example grid from the first 16 items; it now takes them from
    # `batch` rather than converting the whole split, with the same arrays as before
    import causalign.report.figures as figures
    from causalign.cli import write_examples

    images, opts = _rng_images("gray8", n=20)
    root = _write(tmp_path / "d", images, **opts)
    seen = {}
    monkeypatch.setattr(figures, "example_grid",
                        lambda imgs, masks, titles, path: seen.update(imgs=imgs, masks=masks))
    write_examples(root, tmp_path / "ex.png")
    old = _old_cache(root)
    assert np.array_equal(seen["imgs"], old["image"][:16].numpy())
    assert np.array_equal(seen["masks"], old["mask"][:16].numpy())


def test_split_without_any_mask_file(tmp_path):
    # boxes only (no mask column filled): the mask store is empty, batches are zeros
    # and boxes as before
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    rows = []
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
            root / "images" / f"{k}.png")
        rows.append(SampleRecord(id=str(k), split="train", label=k % 2, site="0",
                                 image=f"images/{k}.png", box=(0, 1, 5, 7) if k % 2 else None))
    write_manifest(root, DatasetMeta("t", ["a", "b"]), rows)
    ds = LesionDataset(root, "train")
    old = _old_cache(root)
    assert len(ds._masks) == 0 and not bool(ds.has_mask.any())
    b = ds.batch(torch.tensor([3, 0, 1]))
    for key in ("image", "mask", "box_mask"):
        assert np.array_equal(_bits(b[key]), _bits(old[key][torch.tensor([3, 0, 1])]))
    assert np.array_equal(_bits(ds[2]["box_mask"]), _bits(old["box_mask"][2]))
