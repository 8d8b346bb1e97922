"""Performance audit (helper 'perf', 2026-12-06): reading a split does a constant number of
torch calls, not a few per sample (those were ~10 % of opening a split of small PNGs), and
the faster non-binary mask test says what the former one said on every kind of mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import causalign.data.format as fmt
from causalign.data.format import DatasetMeta, LesionDataset, SampleRecord, write_manifest


def _dataset(root: Path, n: int) -> Path:
    """`n` train samples of 16 px, each with a mask and a box (half of the masks empty)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        m = np.zeros((16, 16), np.uint8)
        if k % 2:
            m[4:9, 4:9] = 255
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(
            root / f"images/{k}.png")
        Image.fromarray(m).save(root / f"masks/{k}.png")
        rows.append(SampleRecord(id=str(k), split="train", label=k % 2, site="0",
                                 image=f"images/{k}.png", mask=f"masks/{k}.png",
                                 box=(1, 2, 10, 12)))
    write_manifest(root, DatasetMeta("t", ["a", "b"]), rows)
    return root


class _CountingTorch:
    """`torch` as format.py sees it, counting the tensor-making calls it makes."""

    def __init__(self, torch_module) -> None:
        self._torch, self.calls = torch_module, 0

    def __getattr__(self, name: str):
        attr = getattr(self._torch, name)
        if name in ("tensor", "from_numpy", "zeros", "full"):
            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def _torch_calls(root: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    counting = _CountingTorch(fmt.torch)
    with monkeypatch.context() as mp:
        mp.setattr(fmt, "torch", counting)
        ds = LesionDataset(root, "train")
    assert bool(ds.has_box_or_mask.all()) and int(ds.has_mask.sum()) == len(ds) // 2
    return counting.calls


def test_split_reading_makes_a_constant_number_of_torch_calls(tmp_path, monkeypatch):
    # before: torch.from_numpy per mask and torch.tensor per box (4 + 2n calls)
    few = _torch_calls(_dataset(tmp_path / "few", 4), monkeypatch)
    many = _torch_calls(_dataset(tmp_path / "many", 12), monkeypatch)
    assert few == many


def test_split_cache_is_what_it_was(tmp_path):
    # the numpy-filled bookkeeping gives the tensors the torch-filled one gave
    ds = LesionDataset(_dataset(tmp_path / "d", 6), "train")
    assert ds._mask_row.tolist() == [-1, 0, -1, 1, -1, 2]
    assert ds._mask_row.dtype == fmt.torch.long and ds._boxes.dtype == fmt.torch.long
    assert ds._masks.dtype == fmt.torch.bool and tuple(ds._masks.shape) == (3, 1, 16, 16)
    assert ds._boxes[0].tolist() == [1, 2, 10, 12, 0, 1]
    box = ds.box_masks[0, 0]
    assert int(box.sum()) == 9 * 10 and bool(box[2:12, 1:10].all())
    assert bool(ds.masks[1, 0, 4:9, 4:9].all()) and int(ds.masks[0].sum()) == 0


def _not_binary_before(mask: np.ndarray) -> bool:
    """The former definition, for comparison."""
    positive = mask[mask > 0]
    return bool((mask < 0).any()) or (positive.size > 0 and positive.min() != positive.max())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16, np.int32,
                                   np.float32, np.float64, np.bool_])
def test_not_binary_agrees_with_the_former_definition(dtype):
    rng = np.random.default_rng(3)
    cases = [np.zeros((5, 5)), np.full((5, 5), 7.0), np.full((5, 5), -1.0)]
    for levels in ([0, 1], [0, 255], [0, 3, 255], [-1, 0, 1], [-2, 0], [0, 0.5, 1], [1, 2],
                   [0, 1, 1, 1], [-1, 5]):
        for _ in range(4):
            cases.append(rng.choice(np.array(levels, np.float64), size=(5, 5)))
    checked = 0
    for case in cases:
        if dtype != np.bool_ and (np.iinfo(dtype).min if np.dtype(dtype).kind in "iu"
                                  else -np.inf) > case.min():
            continue  # a negative level in an unsigned type
        m = case.astype(dtype)
        assert fmt._not_binary(m) == _not_binary_before(m), (dtype, m)
        checked += 1
    assert checked >= 20
