"""`--pick balanced` of `explain` and `counterfactual` (`LesionDataset(pick=)`,
`balanced_pick`): ``--limit N`` took the split's first N samples, so a class-sorted manifest
(importers write class folders one after another) showed one class only."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.cli import main
from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset, balanced_pick
from causalign.engine import TrainConfig, train


def test_balanced_pick_takes_the_classes_in_turn_in_the_given_order():
    labels = [0, 0, 0, 0, 1, 1, 2]
    assert balanced_pick(labels, 5) == [0, 4, 6, 1, 5]
    assert balanced_pick(labels, 100) == [0, 4, 6, 1, 5, 2, 3]
    assert balanced_pick(labels, 2, order=[3, 2, 5, 4]) == [3, 5]
    assert balanced_pick(np.array([1, 1, 0]), 1) == [2]  # class 0 first
    assert balanced_pick([], 3) == []


@pytest.fixture(scope="module")
def sorted_run(tmp_path_factory):
    """A 32 px dataset whose test split lists all 6 benign samples, then all 6 malignant
    (as a class-folder import writes them), and a 1-epoch ERM run on it."""
    root = tmp_path_factory.mktemp("sorted")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(root / "data", DatasetMeta("sorted", ["benign", "malignant"]))
    for split, n in (("train", 16), ("val", 6), ("test", 6)):
        for y in (0, 1):
            for _ in range(n):
                img = rng.random((32, 32)) * 0.3
                mask = np.zeros((32, 32), np.uint8)
                mask[10:18, 8 + 12 * y:16 + 12 * y] = 1
                img[mask > 0] += 0.5
                writer.add(img.clip(0, 1), label=y, split=split, mask=mask)
    writer.close()
    run = root / "run"
    train(root / "data", TrainConfig(method="erm", epochs=1, width=4, batch_size=8), run,
          progress=False)
    return root / "data", run


def test_dataset_pick_keeps_manifest_order_and_refuses_unknown(sorted_run):
    data, _ = sorted_run
    first = LesionDataset(data, "test", limit=4)
    balanced = LesionDataset(data, "test", limit=4, pick="balanced")
    assert first.labels.tolist() == [0, 0, 0, 0]
    assert balanced.labels.tolist() == [0, 0, 1, 1]
    everything = LesionDataset(data, "test")
    ids = [r.id for r in everything.records]
    assert [r.id for r in balanced.records] == [ids[0], ids[1], ids[6], ids[7]]
    # the samples' own images, not the first four's
    np.testing.assert_array_equal(balanced.images.numpy(),
                                  everything.images[[0, 1, 6, 7]].numpy())
    assert len(LesionDataset(data, "test", pick="balanced")) == 12  # no limit: all
    with pytest.raises(ValueError, match="pick must be one of first, balanced"):
        LesionDataset(data, "test", limit=4, pick="random")


def _labels_of(data, ids):
    records = {r.id: r.label for r in LesionDataset(data, "test").records}
    return sorted(records[i] for i in ids)


def test_explain_and_counterfactual_pick_balanced(sorted_run, tmp_path, capsys):
    data, run = sorted_run
    for pick, want in (("first", [0, 0, 0, 0]), ("balanced", [0, 0, 1, 1])):
        out = tmp_path / f"ex_{pick}"
        assert main(["explain", str(run), "--saliency", "gradient", "--limit", "4", "--pick",
                     pick, "--out", str(out), "--no-progress"]) in (0, None)
        ids = [p.stem for p in (out / "maps").glob("*.npy")]
        assert _labels_of(data, ids) == want, pick
    out = tmp_path / "cf"
    assert main(["counterfactual", str(run), "--limit", "2", "--pick", "balanced", "--steps",
                 "2", "--out", str(out), "--device", "cpu", "--no-progress"]) in (0, None)
    ids = [p.stem for p in (out / "cf").glob("*.npy")]
    assert _labels_of(data, ids) == [0, 1]
    capsys.readouterr()
    for command in ("explain", "counterfactual"):
        rc = main([command, str(tmp_path / "no-such-run"), "--pick", "balance"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(
            "error: --pick balance: give one of first, balanced"), lines
