"""Deletion faithfulness (paper 002 §4, Table 2): zero the top-k salient pixels and measure
how much the class score drops. A faithful map finds the pixels the decision rests on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..explain.base import check_target_classes, eval_mode

DELETION_FRACTIONS = (0.002, 0.01, 0.02, 0.1, 0.2)


@torch.no_grad()
def deletion_scores(
    model: nn.Module, inputs: Tensor, maps: Tensor, target: Tensor | int | list[int],
    fractions: tuple[float, ...] = DELETION_FRACTIONS, fill: float = 0.0,
) -> dict[float, Tensor]:
    """Per-sample drop p_t(x) − p_t(x with top-k pixels of `maps` set to `fill`).

    maps: (N, *spatial) saliency (or (N, 1, *spatial)); inputs (N, C, *spatial); a pixel is
    removed in all channels; each fraction lies in (0, 1] and removes at least one pixel.
    Ties are broken by pixel index (earlier first, a stable sort) so k pixels are removed
    exactly and the ranking does not depend on the map's scale. `target`
    holds one class per input (an int applies to all). The model runs in eval mode (its
    modules' flags are restored): in train mode BatchNorm would update its running statistics
    on the deleted images and dropout would add noise to the drop.
    """
    n = inputs.shape[0]
    spatial = tuple(inputs.shape[2:])
    if maps.shape[0] != n or maps.shape[1:] not in (spatial, (1, *spatial)):
        raise InputError(f"maps {tuple(maps.shape)} must be (N, *spatial) of the inputs "
                         f"{tuple(inputs.shape)}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise InputError(f"deletion fractions must lie in (0, 1], got {bad}")
    if isinstance(target, int):
        target = torch.full((n,), target, dtype=torch.long)
    target = torch.as_tensor(target).to(inputs.device)
    if target.is_floating_point() or target.shape != (n,):
        raise InputError(f"target must hold one integer class per input ({n}), got "
                         f"{target.dtype} of shape {tuple(target.shape)}")
    target = target.long()
    flat = maps.flatten(1).float()
    n_bad = int((~torch.isfinite(flat)).sum())
    if n_bad:  # NaN sorts arbitrarily: the "top-k" pixels would be meaningless
        raise InputError(f"maps hold {n_bad} NaN/inf value(s); deletion needs finite maps")
    numel = flat.shape[1]
    # A stable sort breaks ties by pixel index whatever the map's scale: an additive jitter
    # (once 1e-12 per index) outranked the map itself when its values were below ~numel·1e-12.
    order = flat.sort(dim=1, descending=True, stable=True).indices
    with eval_mode(model):
        logits = model(inputs)
        if logits.dim() != 2:
            raise InputError(f"deletion needs (N, classes) logits, got {tuple(logits.shape)}")
        check_target_classes(logits, target)
        base = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
        out = {}
        for frac in fractions:
            k = max(1, int(round(frac * numel)))
            keep = torch.ones(n, numel, device=inputs.device, dtype=inputs.dtype)
            keep.scatter_(1, order[:, :k].to(inputs.device), 0.0)
            keep = keep.view(n, 1, *spatial)
            deleted = inputs * keep + fill * (1 - keep)
            prob = model(deleted).softmax(1).gather(1, target[:, None]).squeeze(1)
            out[frac] = base - prob
    return out
