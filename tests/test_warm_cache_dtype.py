"""`method.cache_dtype`: the warm-start cache (`WarmStartCache`) in float16 / bfloat16."""

from __future__ import annotations

import pytest
import torch

from causalign.errors import ConfigError
from causalign.explain.counterfactual import WarmStartCache
from causalign.methods import build_method

LOW = [torch.float16, torch.bfloat16]
ALL_ROWS = torch.ones(4, dtype=torch.bool)


def _filled(dtype: torch.dtype | None, off: torch.Tensor) -> WarmStartCache:
    cache = WarmStartCache(dtype=dtype)
    cache.put(torch.arange(len(off)), off, torch.ones(len(off), dtype=torch.bool),
              target=torch.zeros(len(off), dtype=torch.long))
    return cache


def test_float32_default_stores_and_hands_back_the_offsets_exactly():
    method = build_method("causal-align", {})
    assert method.params.cache_dtype == "float32" and method.cache.dtype is None
    off = torch.randn(4, 1, 5, 5, dtype=torch.float32)
    cache = _filled(method.cache.dtype, off)
    got, hit = cache.get(torch.arange(4), torch.zeros_like(off))
    assert cache.offsets.dtype == torch.float32 and hit.all() and torch.equal(got, off)
    # the cache keeps the searched dtype as before the setting (a float64 search: float64)
    assert _filled(None, off.double()).offsets.dtype == torch.float64


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_rows_are_stored_in_that_dtype_at_half_the_bytes(dtype):
    off = torch.randn(4, 3, 16, 16)
    full, low = _filled(None, off), _filled(dtype, off)
    assert low.offsets.dtype == dtype
    row = off[0].numel()
    assert full.nbytes - low.nbytes == 4 * row * 2  # only the offsets shrink, 4 → 2 bytes
    assert low.offsets.numel() * low.offsets.element_size() * 2 == \
        full.offsets.numel() * full.offsets.element_size()
    got, hit = low.get(torch.arange(4), off)
    assert hit.all() and got.dtype == torch.float32  # converted back to the search's dtype
    # round trip within the dtype's rounding (half an ulp: 2^-11 float16, 2^-8 bfloat16)
    rel = torch.finfo(dtype).eps / 2
    assert torch.all((got - off).abs() <= rel * off.abs() + torch.finfo(dtype).tiny)
    assert not torch.equal(got, off)  # it did round


@pytest.mark.parametrize("name, dtype", [("float16", torch.float16),
                                         ("bfloat16", torch.bfloat16)])
def test_the_setting_reaches_the_cache_of_causal_align_and_hier_align(name, dtype):
    assert build_method("causal-align", {"cache_dtype": name}).cache.dtype == dtype
    assert build_method("hier-align", {"cache_dtype": name}).pixel.cache.dtype == dtype


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
def test_an_unknown_cache_dtype_is_refused_in_one_line(method):
    with pytest.raises(ConfigError) as err:
        build_method(method, {"cache_dtype": "float8"})
    msg = str(err.value)
    assert msg.startswith("method.cache_dtype must be one of float32, float16, bfloat16, got "
                          "'float8'")
    assert "\n" not in msg


def test_a_row_that_overflows_float16_is_a_miss_and_the_others_still_hit():
    """Offsets of HU-valued CT images may exceed float16's 65504: such a row became ±inf, a
    search started from it diverged. It is not kept (a cold start), and counted."""
    off = torch.randn(4, 1, 3, 3)
    off[1, 0, 0, 0] = 7e4  # beyond float16
    off[2, 0, 1, 1] = -6e4  # within
    cache = _filled(torch.float16, off)
    got, hit = cache.get(torch.arange(4), torch.zeros_like(off))
    assert hit.tolist() == [True, False, True, True] and cache.overflowed == 1
    assert torch.equal(got[1], torch.zeros(1, 3, 3)) and torch.isfinite(got).all()
    assert len(cache) == 3 and cache.state_dict()["ids"].tolist() == [0, 2, 3]
    # bfloat16 has float32's range: the same row is kept
    bf = _filled(torch.bfloat16, off)
    assert bf.get(torch.arange(4), off)[1].all() and bf.overflowed == 0
    # an overflowing row stored again in range hits again
    cache.put(torch.tensor([1]), torch.ones(1, 1, 3, 3), torch.ones(1, dtype=torch.bool),
              target=torch.zeros(1, dtype=torch.long))
    assert cache.get(torch.arange(4), off)[1].all()


@pytest.mark.parametrize("dtype", LOW)
def test_checkpoint_state_keeps_the_dtype_and_loads_the_same_rows(dtype):
    off = torch.randn(4, 1, 4, 4)
    cache = _filled(dtype, off)
    state = cache.state_dict()
    assert state["offsets"].dtype == dtype  # the checkpoint is smaller too
    again = WarmStartCache(dtype=dtype)
    again.load_state_dict(state)
    assert again.offsets.dtype == dtype
    a, ha = cache.get(torch.arange(4), off)
    b, hb = again.get(torch.arange(4), off)
    assert torch.equal(a, b) and torch.equal(ha, hb) and hb.all()
    # a cache without a dtype of its own (float32) loads such rows as float32
    plain = WarmStartCache()
    plain.load_state_dict(state)
    assert plain.offsets.dtype == torch.float32
    assert torch.equal(plain.get(torch.arange(4), off)[0], a)


def test_method_checkpoint_round_trip_keeps_the_dtype():
    method = build_method("causal-align", {"cache_dtype": "bfloat16"})
    method.cache.put(torch.arange(3), torch.randn(3, 1, 4, 4), torch.ones(3, dtype=torch.bool))
    other = build_method("causal-align", {"cache_dtype": "bfloat16"})
    other.load_state_dict(method.state_dict())
    assert other.cache.offsets.dtype == torch.bfloat16
    assert torch.equal(other.cache.offsets[:3], method.cache.offsets[:3])


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
def test_resume_refuses_a_changed_cache_dtype_as_a_numeric_setting(method, tmp_path):
    """Unlike cache_device (placement), the dtype changes the warm starts' numbers: a
    --resume with another one is refused like any other changed setting; a run stored
    before the setting existed (float32) resumes at the default."""
    import yaml

    from causalign.engine import TrainConfig
    from causalign.engine.trainer import settings_diff
    from causalign.methods.base import resolved_params

    cfg = TrainConfig(method=method)
    params = resolved_params(build_method(method, {}))
    stored = {**cfg.to_dict(), "method_params": params}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    assert settings_diff(tmp_path, cfg) == []
    half = TrainConfig(method=method, method_args={"cache_dtype": "float16"})
    assert settings_diff(tmp_path, half) == ["method.cache_dtype 'float32' -> 'float16'"]
    # a run stored before the setting existed
    del params["cache_dtype"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(),
                                                          "method_params": params}))
    assert settings_diff(tmp_path, cfg) == []
    assert settings_diff(tmp_path, half) == ["method.cache_dtype None -> 'float16'"]


@pytest.mark.parametrize("dtype", LOW)
def test_data_parallel_merge_keeps_the_dtype(dtype):
    from causalign.engine.distributed import merge_method_states, touched_only

    caches = [WarmStartCache(dtype=dtype) for _ in range(2)]
    off = torch.randn(4, 1, 2, 2)
    for c in caches:
        c.put(torch.arange(4), off, ALL_ROWS)
    caches[1].put(torch.tensor([1, 3]), off[[1, 3]] + 1, torch.ones(2, dtype=torch.bool))
    touched = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    states = [{"cache": c.state_dict()} for c in caches]
    cut = [touched_only(s, t) for s, t in zip(states, touched, strict=True)]
    merged = merge_method_states(cut, touched, own=states[0])["cache"]
    assert merged["offsets"].dtype == dtype
    target = WarmStartCache(dtype=dtype)
    target.load_state_dict(merged)
    got, hit = target.get(torch.arange(4), off)
    assert hit.all()
    assert torch.equal(got[[1, 3]], (off[[1, 3]] + 1).to(dtype).float())
    assert torch.equal(got[[0, 2]], off[[0, 2]].to(dtype).float())


def _tiny_model_and_batch(n: int = 4) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    batch = {"image": torch.rand(n, 1, 8, 8), "label": torch.tensor([0, 1] * (n // 2)),
             "mask": mask, "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
             "has_annotation": torch.ones(n, dtype=torch.bool), "index": torch.arange(n)}
    return model, batch


def test_a_training_step_runs_with_a_half_precision_cache_and_warm_starts_from_it():
    n = 4
    model, batch = _tiny_model_and_batch(n)
    method = build_method("causal-align", {"cache_dtype": "float16", "steps": 2,
                                           "align_batch": 0})
    for _ in range(2):
        out = method(model, batch)
        assert torch.isfinite(out.total)
    assert method.cache.offsets.dtype == torch.float16 and len(method.cache) == n


def test_offsets_past_float16_are_announced_once_a_run():
    """Rows that overflow float16 are left out of the cache (cold starts); that was counted
    in `cache.overflowed` only, so a user of HU-valued images saw nothing. One warning a run
    now names the count and the dtypes that keep them."""
    import warnings

    model, batch = _tiny_model_and_batch()
    # Adam moves every pixel by about inner_lr a step: offsets ~1e5 > float16's 65504
    method = build_method("causal-align", {"cache_dtype": "float16", "steps": 1,
                                           "inner_lr": 1e5, "align_batch": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            method(model, batch)
    overflow = [str(w.message) for w in caught if "exceeded" in str(w.message)]
    assert method.cache.overflowed > 0
    assert len(overflow) == 1
    assert "method.cache_dtype=float16's range" in overflow[0] and "65504" in overflow[0]
    quiet = build_method("causal-align", {"cache_dtype": "bfloat16", "steps": 1,
                                          "inner_lr": 1e5, "align_batch": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet(model, batch)
    assert quiet.cache.overflowed == 0 and not [w for w in caught if "exceeded" in str(w.message)]
