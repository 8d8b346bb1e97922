"""Mutation audit of the 2026-12-06 changes: behaviours the earlier tests let slip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.errors import InputError
from causalign.explain.counterfactual import WarmStartCache, eval_mode
from causalign.methods import build_method

ONE = torch.ones(1, dtype=torch.bool)


def test_a_row_re_solved_without_a_target_warm_starts_any_target():
    """`put(target=None)` means "y* unknown": the row's earlier y* must not stay attached to
    the new offset (it would miss a class it was never checked against)."""
    cache = WarmStartCache()
    ids, like = torch.tensor([4]), torch.zeros(1, 1, 2, 2)
    cache.put(ids, torch.ones(1, 1, 2, 2), ONE, target=torch.tensor([2]))
    assert not cache.get(ids, like, target=torch.tensor([1]))[1].any()
    cache.put(ids, torch.full((1, 1, 2, 2), 3.0), ONE)  # solved again, y* unknown
    off, hit = cache.get(ids, like, target=torch.tensor([1]))
    assert hit.all() and torch.equal(off, torch.full((1, 1, 2, 2), 3.0))


def test_the_cache_grows_no_further_than_the_split_it_serves():
    """``capacity`` (the training split's size) bounds the doubling: 9 rows of a 10-sample
    split held 16 rows of offsets."""
    sample = 1 * 8 * 8 * 4  # bytes of one float32 offset
    cache = WarmStartCache(capacity=10)
    for i in range(10):
        cache.put(torch.tensor([i]), torch.randn(1, 1, 8, 8), ONE)
    assert len(cache) == 10
    assert cache.nbytes < 12 * sample  # 10 rows (+ small index tables), not 16


def test_a_batch_naming_one_sample_twice_stores_one_row():
    """A sampler with replacement puts the same index twice in a batch: one row for it."""
    once, twice = WarmStartCache(), WarmStartCache()
    off = torch.randn(2, 1, 8, 8)
    once.put(torch.tensor([3, 5]), off, torch.ones(2, dtype=torch.bool))
    twice.put(torch.tensor([3, 3, 5]), torch.cat([off[:1], off]),
              torch.ones(3, dtype=torch.bool))
    assert len(twice) == 2 and twice.cached_ids().tolist() == [3, 5]
    assert twice.nbytes == once.nbytes


def test_offsets_of_another_input_shape_replace_the_cached_ones():
    """The same sample ids searched at another image size (another resolution): the old
    offsets cannot seed those searches and must be forgotten, not fail the store."""
    cache = WarmStartCache()
    ids = torch.tensor([0, 1])
    cache.put(ids, torch.randn(2, 1, 4, 4), torch.ones(2, dtype=torch.bool))
    new = torch.randn(2, 1, 6, 6)
    cache.put(ids[:1], new[:1], ONE)
    off, hit = cache.get(ids, torch.zeros(2, 1, 6, 6))
    assert hit.tolist() == [True, False]
    assert torch.equal(off[0], new[0]) and len(cache) == 1


class _PoolUnpool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.head = nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, idx = self.pool(torch.relu(self.conv(x)))
        return self.head(self.unpool(out, idx).flatten(1))


def test_the_search_forward_keeps_a_max_pool_that_returns_indices():
    """The search's channels_last max-pool replaces plain ``nn.MaxPool2d`` forwards; one
    with ``return_indices=True`` (an unpooling model) must still return (values, indices)."""
    torch.manual_seed(0)
    model, x = _PoolUnpool().eval(), torch.rand(3, 1, 8, 8)
    want = model(x)
    with eval_mode(model, fold_bn=True):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _labelled_batch(labels: list[int]) -> dict[str, torch.Tensor]:
    n = len(labels)
    flags = torch.ones(n, dtype=torch.bool)
    mask = torch.zeros(n, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    return {"image": torch.rand(n, 1, 8, 8), "label": torch.tensor(labels), "mask": mask,
            "box_mask": mask.clone(), "has_mask": flags, "has_annotation": flags.clone()}


def test_label_equal_to_the_number_of_classes_is_refused_in_one_line():
    """Classes run 0..C-1: label C (2 for a two-logit model) is the first one out of range."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(InputError, match=r"holds class 2, but Sequential returns 2 logits"):
        build_method("erm")(net, _labelled_batch([0, 1, 2, 1]))
    build_method("erm")(net, _labelled_batch([0, 1, 1, 0]))  # the largest valid label


def test_dataset_indices_of_the_wrong_length_are_refused():
    """A tensor under 'index' that does not name one index per image (a batch's indices cut
    or padded by a custom collate) keys the warm-start cache by the wrong samples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    batch = _labelled_batch([0, 1, 1, 0])
    with pytest.raises(InputError, match=r"batch\['index'\] .* shape \(4,\), got"):
        build_method("erm")(net, dict(batch, index=torch.arange(3)))


def test_hier_align_setup_warns_when_the_annotated_split_has_one_class():
    """`setup` (what the trainer calls) must say so: the run otherwise trains without its
    attribute-level alignment and without a word."""
    from types import SimpleNamespace

    attrs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    split = SimpleNamespace(attributes=attrs, labels=torch.ones(4, dtype=torch.long))
    with pytest.warns(UserWarning, match="every fully annotated training sample has label 1"
                      ) as record:
        build_method("hier-align").setup(split, nn.Linear(2, 2))
    assert sum("attribute-level" in str(w.message) or "label 1" in str(w.message)
               for w in record) == 1  # said once, at setup
