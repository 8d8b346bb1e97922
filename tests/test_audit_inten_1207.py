"""Audit (intensity ranges): causal-align's pixel-unit settings on images outside [0, 1]."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from causalign.data import LesionDataset
from causalign.data.format import DatasetMeta, DatasetWriter
from causalign.methods.causal_align import CausalAlign, CausalAlignParams


def _dataset(root, transform) -> LesionDataset:
    rng = np.random.default_rng(0)
    with DatasetWriter(root, DatasetMeta("toy", ["a", "b"]), image_format="npy") as w:
        for i in range(6):
            x = rng.random((1, 16, 16)).astype(np.float32)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 1
            w.add(transform(x), label=i % 2, split="train", mask=mask)
    return LesionDataset(root, "train")


def _setup_warnings(ds: LesionDataset, **params) -> list[str]:
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 2))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        CausalAlign(CausalAlignParams(**params)).setup(ds, model)
    return [str(w.message) for w in got if "units of [0, 1] images" in str(w.message)]


def test_hounsfield_images_warn_that_search_settings_are_in_unit_pixels(tmp_path):
    # int16 CT in HU: inner_lr 0.01 moved x* by at most 0.004 HU in 10 steps, silently
    ds = _dataset(tmp_path / "hu", lambda x: (x * 2000 - 1000).astype(np.int16))
    msgs = _setup_warnings(ds)
    assert len(msgs) == 1 and "method.inner_lr=0.01" in msgs[0], msgs
    lo, hi = torch.stack(ds.images.aminmax()).tolist()
    assert f"{lo:g}..{hi:g}" in msgs[0]


def test_z_scored_and_unit_images_do_not_warn(tmp_path):
    z = _dataset(tmp_path / "z", lambda x: ((x - x.mean()) / x.std() * 1.5).astype(np.float32))
    assert float(z.images.min()) < -1 and float(z.images.max()) > 1  # really outside [0, 1]
    assert _setup_warnings(z) == []
    unit = _dataset(tmp_path / "unit", lambda x: x)
    assert _setup_warnings(unit) == []


class _MeanModel(nn.Module):
    """Class-1 logit grows with the mean intensity (HU): a deletion's fill value moves it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(1) / 100
        return torch.stack([torch.zeros_like(s), s], 1)


def test_deletion_fill_reaches_the_metric_and_is_checked(tmp_path):
    from causalign.engine.config import TrainConfig, apply_overrides
    from causalign.engine.evaluate import evaluate_split
    from causalign.errors import ConfigError
    from causalign.methods import build_method
    from causalign.metrics import deletion_scores

    # CT in HU: 0 is water, so the fixed fill 0 could not express "air" (-1000)
    ds = _dataset(tmp_path / "hu", lambda x: (x * 2000 - 1000).astype(np.int16))
    model, method = _MeanModel().eval(), build_method("erm")
    water = evaluate_split(model, method, ds, "cpu", saliency="gradient", fractions=(0.5,))
    air = evaluate_split(model, method, ds, "cpu", saliency="gradient", fractions=(0.5,),
                         deletion_fill=-1000.0)
    assert air["deletion"] != water["deletion"]
    batch = ds.batch(torch.arange(len(ds)))
    x = batch["image"]
    maps = torch.rand(x.shape[0], *x.shape[2:])
    direct = deletion_scores(model, x, maps, 1, (0.5,), fill=-1000.0)[0.5]
    assert bool((direct > 0).all())  # air lowers the mean: p(class 1) drops
    cfg = apply_overrides(TrainConfig(), {"deletion_fill": "-1000"})
    assert cfg.deletion_fill == -1000.0
    try:
        TrainConfig(deletion_fill=float("nan")).validate()  # as train() does
    except ConfigError as e:
        assert "deletion_fill must be a finite number" in str(e)
    else:
        raise AssertionError("a NaN deletion_fill was accepted")


def test_the_low_flip_hint_names_the_intensity_scale() -> None:
    """`causalign counterfactual` on HU data flipped none and blamed only α and --steps; the
    searches had moved x* by thousandths of a HU, because --lr is in [0, 1] units."""
    from types import SimpleNamespace

    from causalign.cli import _low_flip_warning

    def line(lo: float, hi: float, space: str = "pixel") -> str:
        summary = {"n_generated": 4, "flip_rate": 0.0, "n_diverged": 0,
                   "mean_target_prob": 0.4, "valid_range": [lo, hi],
                   "samples": [{"flipped": False, "diverged": False, "distance": 0.01}] * 4}
        settings = SimpleNamespace(alpha=0.01, steps=100, lr=0.01, optimizer="adam",
                                   space=space)
        return _low_flip_warning(summary, settings, None, None) or ""

    hu = line(-1000.0, 400.0)
    assert "the images span -1000..400" in hu and "--lr (0.01)" in hu, hu
    assert "smaller --alpha" in hu  # the other remedies stay
    for sane in (line(0.0, 1.0), line(-3.0, 4.0), line(-1000.0, 400.0, "latent")):
        assert sane and "images span" not in sane
