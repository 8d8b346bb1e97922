"""Warm starts with many classes: the multi-class y* ("other": the most likely class other
than y) changes as the model trains, so a cached x* may have been solved for another class.
It must not seed the search for the new one (`WarmStartCache` keeps each row's y*)."""

from __future__ import annotations

import torch
from torch import nn

from causalign.engine.distributed import merge_method_states, touched_only
from causalign.explain.counterfactual import CounterfactualGenerator, WarmStartCache


def _model(classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).eval()


def test_a_cached_counterfactual_towards_another_class_is_no_warm_start():
    gen = CounterfactualGenerator(_model(5), steps=3, lr=0.05, warm_start=True)
    x, ids = torch.rand(4, 1, 4, 4), torch.arange(4)
    first = gen.generate(x, target=torch.tensor([1, 2, 3, 4]), ids=ids)
    assert not first.warm.any()
    # y* changed for samples 0 and 2 since their x* was solved
    again = gen.generate(x, target=torch.tensor([0, 2, 4, 4]), ids=ids)
    assert again.warm.tolist() == [False, True, False, True]
    # the changed samples now hold offsets for their new class
    assert gen.generate(x, target=torch.tensor([0, 2, 4, 4]), ids=ids).warm.all()


def test_binary_other_targets_keep_warm_starting():
    """Binary y* = 1 − y never changes: every revisit is warm, as before."""
    gen = CounterfactualGenerator(_model(2), steps=3, lr=0.05, warm_start=True)
    x, ids, y = torch.rand(4, 1, 4, 4), torch.arange(4), torch.tensor([0, 1, 1, 0])
    gen.generate(x, labels=y, ids=ids)
    assert gen.generate(x, labels=y, ids=ids).warm.all()


def test_targets_survive_a_checkpoint_and_old_checkpoints_hit_any_target():
    cache = WarmStartCache()
    off = torch.randn(3, 1, 2, 2)
    cache.put(torch.tensor([5, 7, 9]), off, torch.ones(3, dtype=torch.bool),
              target=torch.tensor([1, 2, 3]))
    state = cache.state_dict()
    again = WarmStartCache()
    again.load_state_dict(state)
    _, hit = again.get(torch.tensor([5, 7, 9]), off, target=torch.tensor([1, 0, 3]))
    assert hit.tolist() == [True, False, True]
    old = WarmStartCache()  # a checkpoint written before rows kept their y*
    old.load_state_dict({"ids": state["ids"], "offsets": state["offsets"]})
    assert old.get(torch.tensor([5, 7, 9]), off, target=torch.tensor([0, 0, 0]))[1].all()


def test_data_parallel_merge_keeps_the_targets():
    a, b = WarmStartCache(), WarmStartCache()
    off = torch.randn(2, 1, 2, 2)
    a.put(torch.tensor([0, 1]), off, torch.ones(2, dtype=torch.bool), target=torch.tensor([3, 4]))
    b.put(torch.tensor([0, 1]), off, torch.ones(2, dtype=torch.bool), target=torch.tensor([5, 6]))
    touched = [torch.tensor([0]), torch.tensor([1])]
    states = [touched_only({"cache": c.state_dict()}, t)
              for c, t in zip((a, b), touched, strict=True)]
    merged = merge_method_states(states, touched, own={"cache": a.state_dict()})["cache"]
    got = dict(zip(merged["ids"].tolist(), merged["targets"].tolist(), strict=True))
    assert got == {0: 3, 1: 6}
