"""Audit of causal-align on real-format data (helper): findings' regression tests."""

from __future__ import annotations

import numpy as np
import pytest
from test_importers import _one_error_line, _run  # the CLI's one-error-line check

from causalign.data import DatasetWriter
from causalign.data.format import DatasetMeta


def _write(root, rgb_splits=(), n=(8, 4, 4), size=16):
    """Gray 2D images with a disk lesion (masks on every other sample); the splits named in
    ``rgb_splits`` stored as RGB (H, W, 3) instead."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, DatasetMeta("mix", ["a", "b"], [], ndim=2, channels=1))
    yy, xx = np.mgrid[:size, :size]
    for split, count in zip(("train", "val", "test"), n, strict=True):
        for i in range(count):
            img = (rng.random((size, size)) * 0.3 + 0.3).astype(np.float32)
            m = (yy - 8) ** 2 + (xx - 8) ** 2 <= 9
            img[m] = 0.9 if i % 2 else 0.1
            if split in rgb_splits:
                img = np.stack([img] * 3, -1)
            w.add(img, i % 2, split, mask=m if i % 2 == 0 else None, sample_id=f"{split}{i}")
    w.close()
    return root


@pytest.mark.parametrize("rgb_split", ["val", "test"])
def test_train_refuses_a_split_of_another_channel_count_before_training(tmp_path, capsys,
                                                                       rgb_split):
    # was: a whole epoch of training, then a RuntimeError traceback from F.conv2d (exit 1)
    data = _write(tmp_path / "d", rgb_splits=(rgb_split,))
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "train", data, "--method", "causal-align", "--out", run,
                      "--epochs", "1", "--batch-size", "4", "--set", "width=4",
                      "--set", "threads=1", "--no-progress")
    _one_error_line(rc, err, f"split '{rgb_split}' has 3-channel images")
    assert not run.exists()


def test_evaluate_explain_counterfactual_refuse_a_split_of_another_channel_count(
        tmp_path, capsys):
    gray = _write(tmp_path / "gray")
    mixed = _write(tmp_path / "mixed", rgb_splits=("val",))
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "train", gray, "--method", "causal-align", "--out", run,
                      "--epochs", "1", "--batch-size", "4", "--set", "width=4",
                      "--set", "threads=1", "--no-progress")
    assert rc == 0, err
    for argv in (("evaluate", run),
                 ("explain", run, "--out", tmp_path / "ex", "--no-progress"),
                 ("counterfactual", run, "--out", tmp_path / "cf", "--steps", "2",
                  "--no-progress")):
        rc, _, err = _run(capsys, *argv, "--data", mixed, "--split", "val")
        _one_error_line(rc, err, "split 'val' has 3-channel images, the run's model takes 1")
    # data check names the mismatch too (it said "ok")
    rc, out, err = _run(capsys, "data", "check", mixed)
    _one_error_line(rc, err, "split 'val' has 3-channel images, split 'train' has 1")
