"""`causalign predict` preprocesses plain files as the run's import did, also once the run's
dataset folder has moved: the run keeps a copy of the importer and its options
(config.yaml `data_import`). Before, a moved dataset sent every run down the plain folder
path with the default mask suffix, so a `--mask-suffix _roi` import's masks were predicted
as images."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from causalign.data.importers.run import run_import
from causalign.engine import TrainConfig, predict_images, train
from causalign.engine.trainer import read_run_config


def test_a_moved_dataset_keeps_its_imports_rules(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    for c in ("benign", "malignant"):
        (raw / c).mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 120, size=(36, 36)).astype(np.uint8)
            roi = np.zeros((36, 36), np.uint8)
            roi[10:20, 10:20] = 255
            if c == "malignant":
                a[10:20, 10:20] = 250
            Image.fromarray(a).save(raw / c / f"img{i}.png")
            Image.fromarray(roi).save(raw / c / f"img{i}_roi.png")
    data = tmp_path / "data"
    run_import("folder", raw, data, {"size": 32, "mask_suffix": "_roi"})
    run = tmp_path / "run"
    train(data, TrainConfig(method="erm", epochs=1, batch_size=8, width=4, seed=0), run,
          progress=False)
    record = read_run_config(run)["data_import"]
    assert record["importer"] == "folder" and record["options"]["mask_suffix"] == "_roi"
    before = predict_images(run, [raw], device="cpu")
    assert len(before.ids) == 16  # the 16 _roi masks are left out
    shutil.rmtree(data)  # the dataset has moved away
    after = predict_images(run, [raw], device="cpu")
    assert after.ids == before.ids
    assert np.abs(after.probs - before.probs).max() <= 1e-6


def test_a_synthetic_run_records_no_import(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    assert read_run_config(run)["data_import"] is None
