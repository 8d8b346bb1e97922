"""Review of the 2026-12-06 changes: scenarios their own tests did not cover."""

from __future__ import annotations

import copy

import pytest
import torch
from test_audit_model_forms import _batch, _grads, _net
from torch import nn


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_compiled_model_inside_a_data_parallel_wrapper_gets_the_plain_gradient(
        wrapper, tmp_path):
    """torch.compile'd models run eagerly in the search and implicit gradient, but one
    inside DataParallel / DDP was not unwrapped: its alignment gradient was off by 6e-2
    (largest entry 0.15), silently."""
    import torch.distributed as dist

    batch = _batch()
    model = _net().train()
    _, ref = _grads(model, batch)
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    started = False
    if wrapper == "DataParallel":
        wrapped = nn.DataParallel(compiled)
    else:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                    rank=0, world_size=1)
            started = True
        wrapped = nn.parallel.DistributedDataParallel(compiled)
    try:
        _, got = _grads(wrapped, batch)
    finally:
        if started:
            dist.destroy_process_group()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["causal-align", "hier-align"])
def test_resume_may_move_the_warm_start_cache_to_the_host(method, tmp_path):
    """method.cache_device only places the cache (same numbers either way), but --resume
    refused it as a changed setting ("method.cache_device 'model' -> 'cpu'"): a run whose
    cache outgrew the GPU could not go on with it in host memory."""
    import yaml

    from causalign.engine import TrainConfig
    from causalign.engine.trainer import settings_diff
    from causalign.methods import build_method
    from causalign.methods.base import resolved_params

    cfg = TrainConfig(method=method)
    stored = {**cfg.to_dict(), "method_params": resolved_params(build_method(method, {}))}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    moved = TrainConfig(method=method, method_args={"cache_device": "cpu"})
    assert settings_diff(tmp_path, moved) == []
    other = TrainConfig(method=method, method_args={"cache_device": "cpu", "eps": 0.5})
    assert settings_diff(tmp_path, other) == ["method.eps 0.01 -> 0.5"]


def test_data_parallel_merge_keeps_targets_when_a_rank_holds_rows_without_them():
    """After resuming a checkpoint written before rows kept their y*, a rank that solved
    nothing in an epoch still holds target-less rows: the merge dropped every rank's
    targets, so x* solved for class 3 warm-started class 1 for the rest of the run."""
    from causalign.engine.distributed import merge_method_states, touched_only
    from causalign.explain.counterfactual import WarmStartCache

    old = {"ids": torch.tensor([0, 1, 2, 3]), "offsets": torch.arange(4.0).view(4, 1)}
    caches = [WarmStartCache() for _ in range(2)]
    for c in caches:
        c.load_state_dict(old)
    caches[0].put(torch.tensor([0, 2]), torch.tensor([[10.0], [12.0]]),
                  torch.ones(2, dtype=torch.bool), target=torch.tensor([3, 3]))
    touched = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    states = [{"cache": c.state_dict()} for c in caches]
    cut = [touched_only(s, t) for s, t in zip(states, touched, strict=True)]
    for own in states:
        merged = WarmStartCache()
        merged.load_state_dict(merge_method_states(cut, touched, own=own)["cache"])
        _, hit = merged.get(torch.tensor([0, 1, 2, 3]), torch.zeros(4, 1),
                            target=torch.tensor([1, 1, 3, 1]))
        assert hit.tolist() == [False, True, True, True]  # 1 and 3: no y*, any target hits
