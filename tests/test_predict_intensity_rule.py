"""`causalign predict` maps new files' values with the training import's intensity rule.

Before, the rule was taken over the files given: 12-bit images stored in 16-bit PNGs whose
values all stayed under 2048 were divided by 2047 instead of the training import's 4095, and
float (HU) images by the batch's own range, so a file's probabilities differed from those of
its imported copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalign.data.importers.run import run_import
from causalign.data.importers.util import IntensityScale
from causalign.engine import TrainConfig, predict_images, train
from causalign.engine.trainer import read_run_config

CLASSES = ("benign", "malignant")


def _tree(root: Path, kind: str) -> list[Path]:
    """ROOT/<class>/imgK.(png|npy); returns the "dark" files: values in a narrower range
    than the import's, so a rule taken over them alone differs from the import's."""
    rng = np.random.default_rng(0)
    dark = []
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(10):
            low = i < 3
            if kind == "png16":  # 12-bit values in 16-bit PNGs; dark ones under 2048
                a = rng.integers(0, 1500 if low else 3000, size=(36, 36)).astype(np.uint16)
                a[10:20, 10:20] = (1900 if low else 4000) if c == "malignant" else a[10:20, 10:20]
                path = root / c / f"img{i}.png"
                Image.fromarray(a).save(path)
            else:  # float32 NPY in HU; dark ones within -500..300
                a = rng.uniform(-500 if low else -1000, 300 if low else 1000,
                                size=(36, 36)).astype(np.float32)
                if c == "malignant":
                    a[10:20, 10:20] = 250.0 if low else 900.0
                path = root / c / f"img{i}.npy"
                np.save(path, a)
            if low:
                dark.append(path)
    return dark


@pytest.mark.parametrize("kind", ["png16", "npy_hu"])
def test_dark_files_get_their_imported_copies_probabilities(tmp_path, kind):
    raw = tmp_path / "raw"
    dark = _tree(raw, kind)
    data = tmp_path / "data"
    run_import("folder", raw, data, {"size": 32})
    run = tmp_path / "run"
    train(data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    recorded = IntensityScale.from_record(read_run_config(run)["data_intensity_scale"])
    assert recorded is not None
    if kind == "png16":
        assert recorded.int_max == 4095.0
    else:  # the range of all the import's float images
        lo, hi = recorded.float_range
        assert -1000.0 <= lo < -990.0 and 990.0 < hi <= 1000.0
    imported = {}
    for split in ("train", "val", "test"):
        res = predict_images(run, data, split=split, device="cpu")
        imported.update(zip(res.ids, res.probs, strict=True))
    # only the dark files, in the same folder layout (so their ids are the imported ones)
    new = tmp_path / "new"
    for path in dark:
        (new / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, new / path.parent.name / path.name)
    res = predict_images(run, [new], device="cpu")
    assert len(res.ids) == len(dark) and set(res.ids) <= set(imported)
    diff = max(float(np.abs(imported[i] - p).max()) for i, p in zip(res.ids, res.probs,
                                                                    strict=True))
    assert diff <= 1e-5, diff


def test_a_kind_of_source_the_training_import_lacked_follows_its_own_import_rule():
    """A run trained on 8-bit PNGs given 12-bit DICOM: / 4095, as importing them would,
    not the 16-bit container's 65535."""
    from causalign.engine.inference import _intensity_rule

    trained = IntensityScale(int_max=None, float_range=None, has_float=False)
    here = IntensityScale(int_max=4095.0, float_range=(-1000.0, 1000.0), has_float=True)
    rule = _intensity_rule(trained, here, Path("run"))
    assert rule == here
    trained = IntensityScale(int_max=4095.0, float_range=(-1000.0, 2000.0), has_float=True)
    here = IntensityScale(int_max=2047.0, float_range=(-500.0, 300.0), has_float=True)
    assert _intensity_rule(trained, here, Path("run")) == trained


def test_the_record_round_trips_and_refuses_what_it_did_not_write():
    for scale in (IntensityScale(None, None, False), IntensityScale(4095.0, None, False),
                  IntensityScale(None, (-1024.0, 3071.0), True)):
        assert IntensityScale.from_record(scale.to_record()) == scale
    for bad in (None, "x", {"int_max": -1, "float_range": None, "has_float": False},
                {"int_max": None, "float_range": [3, 1], "has_float": True}, {}):
        assert IntensityScale.from_record(bad) is None
