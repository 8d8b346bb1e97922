"""`LesionDataset` as a torch Dataset in a researcher's own code: indexing, items that are
not views of the cache, DataLoader with workers, pickling, and a per-item ``transform``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from causalign.data import DatasetMeta, DatasetWriter, LesionDataset


def _write(root: Path, n: int = 6) -> Path:
    """float32 NPY images (the cache keeps them as float32), masks on odd samples, a box on
    sample 2 only, two sites: items differ in every key."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, DatasetMeta("habits", ["a", "b"], ["x"]), image_format="npy")
    for k in range(n):
        m = np.zeros((8, 8), np.uint8)
        m[1:4, 2:5] = 1
        w.add(rng.random((8, 8)).astype(np.float32), label=k % 2, split="train",
              mask=m if k % 2 else None, box=(0, 0, 4, 4) if k == 2 else None,
              attributes=[float("nan") if k == 3 else 1.0], site=str(k % 2))
    w.close()
    return root


def _flip_w(item: dict) -> dict:
    """A MONAI-style dictionary transform (``Flipd(keys=["image", "mask"], spatial_axis=-1)``
    with a key added), editing the item in place as many transforms do."""
    item["image"] = item["image"].flip(-1)
    item["mask"] = item["mask"].flip(-1)
    item["image"].mul_(2.0)
    item["flipped"] = torch.tensor(True)
    return item


def _no_dict(item: dict) -> torch.Tensor:
    return item["image"]


def test_item_edited_in_place_leaves_the_cache_alone(tmp_path: Path) -> None:
    ds = LesionDataset(_write(tmp_path / "d"), "train")
    images, labels, has_mask = ds.images.clone(), ds.labels.clone(), ds.has_mask.clone()
    item = ds[0]  # a 0-d index selected views of the cache (float32 image, label, flags)
    item["image"].mul_(0)
    item["label"].fill_(1)
    item["has_mask"].fill_(True)
    item["site"].fill_(5)
    assert torch.equal(ds.images, images) and torch.equal(ds.labels, labels)
    assert torch.equal(ds.has_mask, has_mask) and int(ds[0]["site"]) == 0
    ds.batch(torch.tensor(1))["image"].add_(1)
    ds.images.sub_(1)  # `.images` of a float32 cache was the cache itself
    assert torch.equal(ds.images, images)


def test_index_forms(tmp_path: Path) -> None:
    ds = LesionDataset(_write(tmp_path / "d"), "train")
    n = len(ds)
    every = ds.batch(torch.arange(n))
    for i in (np.int32(3), np.int64(3), torch.tensor(3, dtype=torch.int32), -3):
        item = ds[i]
        # "index" is the position in the split (methods key warm-start caches by it)
        assert item["index"].dtype == torch.long and int(item["index"]) == 3
        assert torch.equal(item["image"], every["image"][3])
    assert torch.equal(ds[-1]["box_mask"], every["box_mask"][n - 1])
    for bad in (n, -n - 1, [0, n]):
        with pytest.raises(IndexError, match=f"out of range for the 'train' split of {n}"):
            ds[bad]
    for bad in (True, 1.5, "a", None, torch.tensor([0.0])):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[bad]
    part = ds[1:5:2]
    assert part["index"].tolist() == [1, 3]
    assert torch.equal(part["mask"], every["mask"][1:5:2])
    assert ds[[]]["image"].shape == (0, 1, 8, 8)  # [] is a float tensor to torch
    sel = ds[ds.labels == 1]  # a boolean mask over the split
    assert sel["index"].tolist() == [1, 3, 5] and bool(sel["label"].eq(1).all())
    assert sum(1 for _ in ds) == n  # iteration stops at the IndexError


def test_transform_per_item(tmp_path: Path) -> None:
    root = _write(tmp_path / "d")
    plain = LesionDataset(root, "train")
    ds = LesionDataset(root, "train", transform=_flip_w)
    labels = ds.labels.clone()
    for i in range(len(ds)):
        item, ref = ds[i], plain[i]
        assert torch.equal(item["image"], ref["image"].flip(-1) * 2.0)
        assert torch.equal(item["mask"], ref["mask"].flip(-1)) and bool(item["flipped"])
        assert torch.equal(item["box_mask"], ref["box_mask"])  # keys it leaves alone
    assert torch.equal(ds.labels, labels)
    # batch (what evaluation iterates) applies it per sample too, index shape kept
    b = ds.batch(torch.tensor([4, 1]))
    assert b["image"].shape == (2, 1, 8, 8) and b["flipped"].tolist() == [True, True]
    assert torch.equal(b["image"][1], plain[1]["image"].flip(-1) * 2.0)
    assert torch.equal(ds[0]["image"], plain[0]["image"].flip(-1) * 2.0)  # cache unchanged
    # pickled as spawn/forkserver workers receive it
    back = pickle.loads(pickle.dumps(ds))
    assert back.transform is _flip_w and torch.equal(back[2]["image"], ds[2]["image"])
    with pytest.raises(TypeError, match="transform _no_dict returned Tensor, expected the item"):
        LesionDataset(root, "train", transform=_no_dict)[0]
    with pytest.raises(TypeError, match="transform must be a callable"):
        LesionDataset(root, "train", transform="flip")  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_collates_transformed_items(tmp_path: Path, workers: int) -> None:
    root = _write(tmp_path / "d", n=10)
    plain = LesionDataset(root, "train")
    ds = LesionDataset(root, "train", transform=_flip_w)
    loader = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 2
    for b in batches:
        ref = plain.batch(b["index"])
        assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.long
        assert torch.equal(b["image"], ref["image"].flip(-1) * 2.0)
        assert torch.equal(b["has_mask"], ref["has_mask"]) and b["flipped"].all()
        assert torch.equal(b["attributes"], ref["attributes"])
