"""Warning noise and hygiene, part 2 (audit 2026-12-07): the commands the first part did not
walk (causal, demo, volumes, data parallelism, curves, data). Each warning said once, and
said where it is true."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from torch import nn

from causalign.data import LesionDataset
from causalign.data.format import DatasetMeta, DatasetWriter
from causalign.engine.config import TrainConfig
from causalign.methods import build_method
from causalign.methods.base import DataInfo

ATTRS = ["a", "b"]


def _byte_floats(root, n: int = 8) -> LesionDataset:
    """8-bit images saved as float32 (0..255, the model sees them as stored), with masks
    and attributes: what hier-align trains on."""
    rng = np.random.default_rng(0)
    with DatasetWriter(root, DatasetMeta("bytes", ["neg", "pos"], ATTRS),
                       image_format="npy") as w:
        for i in range(n):
            x = np.round(rng.random((1, 16, 16)) * 255).astype(np.float32)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 1
            w.add(x, label=i % 2, split="train", mask=mask,
                  attributes=[float(i % 2), float((i // 2) % 2)])
    with warnings.catch_warnings():  # the split's own 0..255 warning is not under test here
        warnings.simplefilter("ignore")
        return LesionDataset(root, "train")


def _setup_messages(method: str, ds: LesionDataset, match: str = "units of [0, 1] images",
                    **args) -> list[str]:
    m = build_method(method, args)
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 16, 16), attributes=ATTRS)
    model = m.build_model(TrainConfig(width=4), info) if method == "hier-align" else \
        nn.Sequential(nn.Flatten(), nn.Linear(256, 2))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        m.setup(ds, model)
    return [str(w.message) for w in got if match in str(w.message)]


def test_hier_align_warns_that_its_search_settings_are_in_unit_pixels(tmp_path):
    # README: "causal-align's and hier-align's search settings ... their setup warns when
    # the first 64 training images span more than 100 intensity units". hier-align's image
    # level (require_region off) skipped the check: `causalign train` of hier-align on
    # 0..255 float images printed the data warnings and nothing about inner_lr/eps/alpha1,
    # where causal-align on the same data warned "training images span 12..255"
    ds = _byte_floats(tmp_path / "d")
    msgs = _setup_messages("hier-align", ds)
    assert len(msgs) == 1, msgs
    # its own name and settings: hier-align's image-level alpha is method.alpha1
    assert msgs[0].startswith("hier-align: training images span 0..255"), msgs[0]
    assert "method.alpha1=" in msgs[0] and "method.alpha=" not in msgs[0], msgs[0]


def test_causal_align_still_says_it_once_under_its_own_name(tmp_path):
    # guard: the owner/alpha naming did not change causal-align's line
    msgs = _setup_messages("causal-align", _byte_floats(tmp_path / "d"))
    assert len(msgs) == 1 and msgs[0].startswith("causal-align: training images span"), msgs
    assert "method.alpha=0.01" in msgs[0], msgs[0]


def test_hier_align_without_image_level_does_not_warn(tmp_path):
    # lam1 = 0: the image-level search never runs, so its units do not matter
    assert _setup_messages("hier-align", _byte_floats(tmp_path / "d"), lam1=0) == []


@pytest.mark.parametrize("method,args", [("hier-align", {}), ("causal-align", {})])
def test_cache_size_warning_names_the_method(tmp_path, monkeypatch, method, args):
    # the warm-start cache-size warning was gated the same way: hier-align's image level
    # keeps the same image-sized cache (one offset per alignable sample) without the warning
    import causalign.methods.causal_align as CA

    monkeypatch.setattr(CA, "CACHE_WARN_BYTES", 100)  # 8 samples of 16x16 float32 pass it
    hits = _setup_messages(method, _byte_floats(tmp_path / "d"),
                           match="warm-start cache will hold", **args)
    assert len(hits) == 1 and hits[0].startswith(f"{method}: "), hits
