"""`train_eval_samples`: train_accuracy measured on a fixed random subset of the training
split (the per-epoch eval pass over a whole large split added ~40 % to an ERM epoch)."""

from __future__ import annotations

import csv

import pytest

from causalign.engine.config import TrainConfig
from causalign.engine.trainer import Trainer
from causalign.errors import ConfigError


def _history(run) -> list[dict]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_subset_gives_train_accuracy_and_leaves_the_model_alone(tiny_data, tmp_path):
    base = dict(epochs=2, batch_size=16, width=4, threads=1, eval_saliency="gradient")
    whole = Trainer(tiny_data, TrainConfig(**base), tmp_path / "whole")
    whole.fit()
    part = Trainer(tiny_data, TrainConfig(**base, train_eval_samples=5), tmp_path / "part")
    part.fit()
    assert len(part._train_eval_set()) == 5 < len(part.train_set)
    # the same 5 samples every epoch, spread over the split (not its first 5)
    positions = part._train_eval_set().source_positions.tolist()
    assert positions == sorted(positions) and positions != list(range(5))
    hw, hp = _history(tmp_path / "whole"), _history(tmp_path / "part")
    for a, b in zip(hw, hp, strict=True):  # only the training accuracy may differ
        for key in a:
            if key not in ("train_accuracy", "seconds"):
                assert a[key] == b[key], key
        assert float(b["train_accuracy"]) * 5 == pytest.approx(
            round(float(b["train_accuracy"]) * 5))  # a share of 5 samples
    # 0, or more samples than the split holds: the whole split, as before
    for n in (0, 10**6):
        t = Trainer(tiny_data, TrainConfig(**{**base, "epochs": 1, "train_eval_samples": n}),
                    tmp_path / f"all{n}")
        t.fit()
        assert t._train_eval_set() is t.train_set


def test_a_negative_count_is_refused():
    with pytest.raises(ConfigError, match="train_eval_samples must be >= 0"):
        TrainConfig(train_eval_samples=-1).validate()
