"""Localisation of saliency maps against expert annotations (paper 000 §5.1).

All functions take maps (N, *spatial) and binary annotations (N, *spatial) and return
per-sample values, so callers choose which samples (e.g. annotated ones) to average.
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Per-sample min–max normalisation to [0, 1]; also returns which maps are empty
    (constant, e.g. an all-zero Grad-CAM)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values
    hi = flat.max(dim=1).values
    empty = (hi - lo) <= eps
    scale = torch.where(empty, torch.ones_like(hi), hi - lo)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    out = (maps - lo.view(shape)) / scale.view(shape)
    out = torch.where(empty.view(shape), torch.zeros_like(out), out)
    return out, empty


def cam_precision(maps: Tensor, annotation: Tensor, threshold: float = 0.5) -> Tensor:
    """|{map ≥ threshold} ∩ A| / |{map ≥ threshold}| after normalisation to [0, 1].

    An empty (constant) map selects no area and scores 0: it points at nothing annotated.
    """
    norm, empty = normalize_maps(maps)
    sel = (norm >= threshold).flatten(1).float()
    ann = (annotation > 0).flatten(1).float()
    inter = (sel * ann).sum(1)
    area = sel.sum(1)
    prec = inter / area.clamp_min(1.0)
    return torch.where(empty, torch.zeros_like(prec), prec)


def mass_in_mask(maps: Tensor, annotation: Tensor) -> Tensor:
    """Threshold-free share of saliency mass inside the annotation: Σ s·M / Σ s (s ≥ 0)."""
    s = maps.clamp_min(0).flatten(1)
    total = s.sum(1)
    inside = (s * (annotation > 0).flatten(1).float()).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def rank_accuracy(maps: Tensor, annotation: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al., 2022, CLEVR-XAI): of the |A| highest-valued
    pixels, with |A| the annotation's own size, the share inside A. Area-matched, so a map
    that is random scores about |A| / N whatever its density, and one confined to A scores 1.
    NaN where the annotation is empty. Ties are broken in ``torch.argsort`` order."""
    flat = maps.flatten(1)
    ann = (annotation > 0).flatten(1)
    k = ann.sum(1)
    order = flat.argsort(dim=1, descending=True)
    ranks_in = torch.gather(ann, 1, order)  # annotation membership in rank order
    top = torch.arange(flat.shape[1], device=flat.device).unsqueeze(0) < k.unsqueeze(1)
    hits = (ranks_in & top).sum(1).to(flat.dtype)
    return torch.where(k > 0, hits / k.clamp_min(1).to(flat.dtype),
                       torch.full_like(hits, float("nan")))


def iou_dice(maps: Tensor, annotation: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """IoU and Dice between the binarised normalised map and the annotation."""
    norm, empty = normalize_maps(maps)
    sel = ((norm >= threshold) & ~empty.view((-1,) + (1,) * (maps.dim() - 1))).flatten(1)
    ann = (annotation > 0).flatten(1)
    inter = (sel & ann).sum(1).float()
    union = (sel | ann).sum(1).float()
    size = sel.sum(1).float() + ann.sum(1).float()
    iou = inter / union.clamp_min(1.0)
    dice = 2 * inter / size.clamp_min(1.0)
    return iou, dice
