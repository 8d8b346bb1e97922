"""Deletion faithfulness (paper 002 §4, Table 2): zero the top-k salient pixels and measure
how much the class score drops. A faithful map finds the pixels the decision rests on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DELETION_FRACTIONS = (0.002, 0.01, 0.02, 0.1, 0.2)


@torch.no_grad()
def deletion_scores(
    model: nn.Module, inputs: Tensor, maps: Tensor, target: Tensor,
    fractions: tuple[float, ...] = DELETION_FRACTIONS, fill: float = 0.0,
) -> dict[float, Tensor]:
    """Per-sample drop p_t(x) − p_t(x with top-k pixels of `maps` set to `fill`).

    maps: (N, *spatial) saliency; inputs (N, C, *spatial); a pixel is removed in all
    channels. Ties are broken by a tiny deterministic jitter so k pixels are removed exactly.
    """
    n = inputs.shape[0]
    flat = maps.flatten(1).float()
    numel = flat.shape[1]
    jitter = torch.arange(numel, device=flat.device, dtype=flat.dtype).flip(0) * 1e-12
    order = (flat + jitter).argsort(dim=1, descending=True)
    base = model(inputs).softmax(1).gather(1, target[:, None]).squeeze(1)
    out = {}
    for frac in fractions:
        k = max(1, int(round(frac * numel)))
        keep = torch.ones(n, numel, device=inputs.device, dtype=inputs.dtype)
        keep.scatter_(1, order[:, :k], 0.0)
        keep = keep.view(n, 1, *inputs.shape[2:])
        deleted = inputs * keep + fill * (1 - keep)
        prob = model(deleted).softmax(1).gather(1, target[:, None]).squeeze(1)
        out[frac] = base - prob
    return out
