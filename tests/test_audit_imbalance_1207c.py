"""Audit: class imbalance and partial annotation (few masks, rare classes, one-class splits).

* history.csv's train_rrr / train_cdep / train_cf / train_factual were weighted by the batch
  size, and RRR and CDEP logged 0 on steps without an annotated sample: with masks on 2 % of
  the training split, train_rrr read 0.093 and train_cdep 0.270 where their mean over the
  annotated samples was 0.166 and 0.482 (diluted by the 6 of 13 steps with none).
"""

from __future__ import annotations

import pytest
import torch

from causalign.data.format import LesionDataset
from causalign.engine.trainer import _accumulate, _epoch_means
from causalign.methods import build_method
from causalign.models.cnn import SevenLayerCNN


def _annotate_only(batch: dict, keep: list[int]) -> dict:
    """The batch with every annotation removed except the samples ``keep``."""
    on = torch.zeros(len(batch["label"]), dtype=torch.bool)
    on[keep] = True
    out = dict(batch)
    out["has_annotation"] = batch["has_annotation"].bool() & on
    out["has_mask"] = batch["has_mask"].bool() & on
    shape = (-1, *[1] * (batch["mask"].dim() - 1))
    out["mask"] = batch["mask"] * on.view(shape)
    out["box_mask"] = batch["box_mask"] * on.view(shape)
    return out


@pytest.mark.parametrize("name,parts,kwargs", [
    ("rrr", ("rrr",), {}),
    ("cdep", ("cdep",), {}),
    ("chang", ("cf", "factual"), {}),
])
def test_subset_parts_are_means_over_the_annotated_samples(tiny_data, name, parts, kwargs):
    """The epoch's history value of an annotation term is its mean over the epoch's
    annotated samples: steps without one add nothing, a step with 4 weighs twice one with 2."""
    torch.manual_seed(0)
    ds = LesionDataset(tiny_data, "train")
    model = SevenLayerCNN(1, 2, width=4)
    method = build_method(name, kwargs)
    if hasattr(method, "generator"):
        method.generator.manual_seed(0)
    steps = [(torch.arange(0, 8), []), (torch.arange(8, 16), [0, 1]),
             (torch.arange(16, 24), []), (torch.arange(24, 32), [0, 1, 2, 3])]
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    seen: dict[str, list[tuple[float, int]]] = {p: [] for p in parts}
    for idx, keep in steps:
        batch = _annotate_only(ds.batch(idx), keep)
        out = method(model, batch)
        _accumulate(sums, weights, out.total, out.parts, len(idx), out.part_weights)
        for p in parts:
            if keep and p in out.parts:
                seen[p].append((out.parts[p], len(keep)))
    epoch = _epoch_means(sums, weights)
    for p in parts:
        assert len(seen[p]) == 2, (p, seen[p])
        want = sum(v * k for v, k in seen[p]) / sum(k for _, k in seen[p])
        assert epoch[f"train_{p}"] == pytest.approx(want, rel=1e-6), (p, seen[p], epoch)

