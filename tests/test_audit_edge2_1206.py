"""Boundary-value leftovers of the edge audit (edge2): settings that silently zeroed or
dropped the alignment term, or hints that named the wrong key."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from causalign.cli import _low_flip_warning
from causalign.engine.bench import bench_step
from causalign.engine.config import TrainConfig
from causalign.engine.trainer import numerical_trouble
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.base import DataInfo

INFO = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32), attributes=[])


def _batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 32, 32)
    mask[:, :, 10:22, 10:22] = 1
    return {
        "image": torch.rand(n, 1, 32, 32, generator=g),
        "label": torch.tensor([0, 1] * (n // 2)),
        "mask": mask, "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
        "has_annotation": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


def _parts(settings: dict) -> dict[str, float]:
    torch.manual_seed(0)
    method = build_method("causal-align", {"steps": 3, "cg_iters": 3, **settings})
    model = method.build_model(TrainConfig(width=4), INFO)
    return method.loss(model, _batch()).parts


def test_an_overshooting_ista_step_is_counted_as_stuck_and_warned() -> None:
    """inner_lr=1e20 under ista: every iterate is worse than x, the best-iterate rule returned
    x* = x, so L_align was 0 on every step, nothing diverged and no counter said so."""
    stuck = _parts({"inner_optimizer": "ista", "inner_lr": 1e20})
    assert stuck["align"] == 0.0 and stuck["cf_diverged"] == 0.0
    assert stuck["cf_stuck"] >= 0.5
    assert stuck["cf_stuck"] + stuck["flip_rate"] == 1.0  # the rest started at the target
    lines = numerical_trouble([{"epoch": 1, "train_cf_stuck": stuck["cf_stuck"]}])
    assert len(lines) == 1 and "method.inner_lr" in lines[0]
    # sane steps move every counterfactual: no false alarm
    for settings in ({"inner_optimizer": "ista"}, {}):
        assert _parts(settings)["cf_stuck"] == 0.0


def _setup_warnings(settings: dict, method_name: str = "causal-align",
                    info: DataInfo | None = INFO) -> list[str]:
    method = build_method(method_name, settings)
    info = info or DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32),
                            attributes=["a0", "a1"])
    model = method.build_model(TrainConfig(width=4), info)
    split = SimpleNamespace(attributes=torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                            labels=torch.tensor([0, 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method.setup(split, model)
    return [str(w.message) for w in caught]


def test_a_damping_that_silences_the_alignment_gradient_warns() -> None:
    """method.damping=1e30 was accepted: the adjoint ∇L/δ made the alignment gradient exactly
    0 (1.5e-5 of its norm at 1e4) while train_align, cg_converged and the rest looked fine."""
    assert any("method.damping=1e+30" in m and "1/damping" in m
               for m in _setup_warnings({"damping": 1e30}))
    for sane in (0.0, 0.01, 10.0):
        assert not any("method.damping" in m for m in _setup_warnings({"damping": sane}))


def _summary(distance: float) -> dict:
    sample = {"flipped": False, "diverged": False, "distance": distance}
    return {"n_generated": 4, "flip_rate": 0.0, "n_diverged": 0, "mean_target_prob": 0.4,
            "valid_range": [0.0, 1.0], "samples": [dict(sample) for _ in range(4)]}


def test_the_low_flip_hint_names_an_overshooting_step_size() -> None:
    """counterfactual --optimizer ista --lr 1e20: every search returned x (distance 0), and
    the warning told the user to lower --alpha or raise --steps, never --lr."""
    def line(lr: float, distance: float) -> str:
        settings = SimpleNamespace(alpha=0.01, steps=100, lr=lr, optimizer="ista",
                                   space="pixel")
        return _low_flip_warning(_summary(distance), settings, None, None) or ""

    assert "smaller --lr" in line(1e20, 0.0) and "never left x" in line(1e20, 0.0)
    # a sane step whose searches stay put (α too large) keeps the α hint; so do moved ones
    assert "--lr" not in line(0.01, 0.0) and "smaller --alpha" in line(0.01, 0.0)
    assert "--lr" not in line(1e20, 3.5)


def test_cache_settings_without_a_warm_start_warn_naming_both_keys() -> None:
    """method.cache_dtype / cache_device with warm_start=false were accepted and recorded, but
    no search reads the warm-start cache: a silent no-op."""
    for name in ("causal-align", "hier-align"):
        info = INFO if name == "causal-align" else None
        lines = _setup_warnings({"warm_start": False, "cache_dtype": "float16",
                                 "cache_device": "cpu"}, name, info)
        assert any("method.cache_device=cpu" in m and "method.cache_dtype=float16" in m
                   and "method.warm_start=false" in m for m in lines), name
    for settings in ({"warm_start": False}, {"cache_dtype": "float16"}):
        assert not any("cache" in m for m in _setup_warnings(settings))


def test_bench_step_refuses_a_dilation_over_the_whole_image() -> None:
    """bench step skips the method's setup(), so method.dilate=100 at 16 px (the region grows
    over every image: L_align 0) was timed as if it were causal-align; train refuses it."""
    with pytest.raises(ConfigError, match=r"method.dilate=100 grows the region over the whole "
                                          r"16×16 image"):
        bench_step("causal-align", size=16, batch_size=2, steps=1, warmup=0, device="cpu",
                   method_args={"dilate": 100, "steps": 1, "cg_iters": 1})
