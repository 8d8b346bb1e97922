"""Localisation of saliency maps against expert annotations (paper 000 §5.1).

All functions take maps (N, *spatial) and binary annotations (N, *spatial) and return
per-sample values, so callers choose which samples (e.g. annotated ones) to average. A
singleton channel axis on either, (N, 1, *spatial), is accepted. Other shape differences
and non-finite map values raise `InputError`: broadcasting would silently score every map
against the first annotation, and a NaN pixel would silently score 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


def _check_pair(maps: Tensor, annotation: Tensor) -> tuple[Tensor, Tensor]:
    """(maps, annotation) with the same shape, or one clear error."""
    if not isinstance(maps, Tensor) or not isinstance(annotation, Tensor):
        raise InputError("maps and annotation must be tensors (N, *spatial)")

    def squeeze(t: Tensor) -> Tensor:  # (N, 1, *spatial) → (N, *spatial)
        return t[:, 0] if t.dim() > 2 and t.shape[1] == 1 else t

    if maps.shape != annotation.shape:
        maps, annotation = squeeze(maps), squeeze(annotation)
    if maps.shape != annotation.shape or maps.dim() < 2:
        # the hint only for maps (N, C, *spatial) of the annotation's N and spatial shape:
        # read off the annotation's trailing axes, a batch-size or spatial mismatch of
        # (N, H, W) maps was blamed on "H-channel attributions"
        same_n = maps.dim() == annotation.dim() + 1 and maps.shape[:1] == annotation.shape[:1]
        hint = channel_hint(maps, tuple(annotation.shape[1:])) if same_n else ""
        raise InputError(f"maps {tuple(maps.shape)} and annotation {tuple(annotation.shape)} "
                         f"must have the same shape (N, *spatial){hint}")
    if annotation.is_floating_point():
        n_bad = int((~torch.isfinite(annotation)).sum())
        if n_bad:  # NaN > 0 is False: a NaN mask silently counted as "not annotated"
            raise InputError(f"annotation holds {n_bad} NaN/inf value(s); it must be a "
                             f"binary mask")
    # the maps' device: maps computed on the GPU against masks from the (CPU) dataset
    # failed with "Expected all tensors to be on the same device"
    return _check_maps(maps), annotation.to(maps.device)


def channel_hint(maps: Tensor, spatial: tuple[int, ...]) -> str:
    """A hint for maps (N, C > 1, *spatial): an explainer's attribution of a multi-channel
    (RGB) input, whose channels must be reduced to one map per sample first."""
    if maps.dim() >= 3 and maps.shape[1] > 1 and tuple(maps.shape[2:]) == tuple(spatial):
        return (f"; these are {maps.shape[1]}-channel attributions: reduce them to one map "
                f"per sample first (causalign.explain.saliency_map sums the channels)")
    return ""


def _check_maps(maps: Tensor) -> Tensor:
    """Maps (N, *spatial) with at least one pixel and finite values (bool ones as float), or
    one clear error: a NaN pixel made every normalised value NaN, and maps without pixels
    failed in Tensor.min with "Expected reduction dim 1 to have non-zero size"."""
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        raise InputError(f"maps must be a tensor (N, *spatial), got "
                         f"{tuple(getattr(maps, 'shape', ())) or type(maps).__name__}")
    if maps.shape[0] and maps[0].numel() == 0:
        raise InputError(f"maps {tuple(maps.shape)} have no pixels")
    if maps.dtype == torch.bool:  # a binary (e.g. thresholded) map: torch has no bool − bool
        maps = maps.float()
    if maps.is_floating_point():
        n_bad = int((~torch.isfinite(maps)).sum())
        if n_bad:
            raise InputError(f"maps hold {n_bad} NaN/inf value(s); localisation of a "
                             f"non-finite map is undefined")
    return maps


def _check_threshold(threshold: float) -> None:
    """A binarisation threshold on maps normalised to [0, 1]: a NaN one (every comparison
    False) or one above 1 selected no pixel and silently scored every map 0."""
    if not 0 <= threshold <= 1:
        raise InputError(f"threshold must lie in [0, 1] (maps are normalised to [0, 1]), "
                         f"got {threshold}")


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Per-sample min–max normalisation to [0, 1]; also returns which maps are empty
    (constant, e.g. an all-zero Grad-CAM). `eps` is relative to the map's largest magnitude,
    so whether a map is empty does not depend on its scale (an absolute 1e-12 called every
    map with values ~1e-14 empty and scored it 0). Non-finite maps raise `InputError`.
    Floating-point maps keep their dtype (computed in at least float32)."""
    maps = _check_maps(maps)
    norm, empty = _normalize(maps, eps)
    return (norm.to(maps.dtype) if maps.is_floating_point() else norm), empty


def _normalize(maps: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """`normalize_maps` of maps already checked (`_check_maps`), in at least float32: in
    half precision hi − lo overflowed to inf for maps spanning more than ±32752 (every value
    normalised to 0 or NaN), and the rounding of (m − lo) / (hi − lo) moved pixels across the
    0.5 threshold (12 of 200 random 16x16 maps scored differently than the same values in
    float32)."""
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
    # Each map divided by the power of two at or just below its largest magnitude first
    # (2^(e−1): 2^128 is no float32; exact but for values 2^126 below the peak, which are 0
    # once normalised anyway): hi − lo overflowed to inf for a float32 map spanning more
    # than ±1.7e38, and every normalised value came out NaN or 0 (cam_precision silently 0).
    peak = maps.detach().flatten(1).abs().amax(dim=1)
    ok = torch.isfinite(peak) & (peak > 0)
    _, exp = torch.frexp(torch.where(ok, peak, torch.ones_like(peak)))
    pow2 = torch.ldexp(torch.ones_like(peak), exp - 1)
    maps = maps / pow2.view((-1,) + (1,) * (maps.dim() - 1))
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values
    hi = flat.max(dim=1).values
    empty = (hi - lo) <= eps * torch.maximum(hi.abs(), lo.abs())
    scale = torch.where(empty, torch.ones_like(hi), hi - lo)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    out = (maps - lo.view(shape)) / scale.view(shape)
    out = torch.where(empty.view(shape), torch.zeros_like(out), out)
    return out, empty


def cam_precision(maps: Tensor, annotation: Tensor, threshold: float = 0.5) -> Tensor:
    """|{map ≥ threshold} ∩ A| / |{map ≥ threshold}| after normalisation to [0, 1].

    An empty (constant) map selects no area and scores 0: it points at nothing annotated.
    """
    maps, annotation = _check_pair(maps, annotation)
    _check_threshold(threshold)
    norm, empty = _normalize(maps)
    # float64 maps keep float64; at least float32 (a half count overflows at 65504 pixels)
    dtype = torch.promote_types(norm.dtype, torch.float32)
    sel = (norm >= threshold).flatten(1).to(dtype)
    ann = (annotation > 0).flatten(1).to(dtype)
    inter = (sel * ann).sum(1)
    area = sel.sum(1)
    prec = inter / area.clamp_min(1.0)
    return torch.where(empty, torch.zeros_like(prec), prec)


def mass_in_mask(maps: Tensor, annotation: Tensor) -> Tensor:
    """Threshold-free share of saliency mass inside the annotation: Σ s·M / Σ s (s ≥ 0)."""
    maps, annotation = _check_pair(maps, annotation)
    s = maps.clamp_min(0).flatten(1)
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # integer maps: float shares
    # each map divided by its own peak first, so the share does not depend on the map's
    # scale: the sums of float32 values ~1e36 overflowed to a NaN share, and the old
    # clamp_min(1e-30) of the total shrank the share of a map with values ~1e-33 (×0.03)
    peak = s.amax(1, keepdim=True)
    s = s / torch.where(peak > 0, peak, torch.ones_like(peak))
    total = s.sum(1)
    inside = (s * (annotation > 0).flatten(1).to(s.dtype)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1.0), torch.zeros_like(total))


def rank_accuracy(maps: Tensor, annotation: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al., 2022, CLEVR-XAI): of the |A| highest-valued
    pixels, with |A| the annotation's own size, the share inside A. Area-matched, so a map
    that is random scores about |A| / N whatever its density, and one confined to A scores 1.
    NaN where the annotation is empty.

    Pixels tied with the |A|-th largest value share the remaining places: each counts with
    the fraction of those places it would get under a uniformly random tie order (the
    expected score). ``argsort`` order made a constant map score 0 or 1 depending on where A
    lies, and a quantised map depend on the sort's implementation."""
    maps, annotation = _check_pair(maps, annotation)
    flat = maps.flatten(1)
    ann = (annotation > 0).flatten(1)
    k = ann.sum(1)
    # float32 at least, as the other scores: an integer map's dtype cannot hold the NaN of an
    # empty annotation (it raised "value cannot be converted to type int64_t"), and half
    # precision would round the shares
    dtype = torch.promote_types(flat.dtype, torch.float32)
    ranked = flat.sort(dim=1, descending=True).values
    kth = ranked.gather(1, (k - 1).clamp_min(0).unsqueeze(1))  # the |A|-th largest value
    above, tied = flat > kth, flat == kth
    n_above = above.sum(1).to(dtype)
    n_tied = tied.sum(1).to(dtype)
    hits = ((above & ann).sum(1).to(dtype)
            + (k.to(dtype) - n_above) * (tied & ann).sum(1).to(dtype) / n_tied)
    return torch.where(k > 0, hits / k.clamp_min(1).to(dtype),
                       torch.full_like(hits, float("nan")))


def iou_dice(maps: Tensor, annotation: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """IoU and Dice between the binarised normalised map and the annotation."""
    maps, annotation = _check_pair(maps, annotation)
    _check_threshold(threshold)
    norm, empty = _normalize(maps)
    sel = ((norm >= threshold) & ~empty.view((-1,) + (1,) * (maps.dim() - 1))).flatten(1)
    ann = (annotation > 0).flatten(1)
    dtype = torch.promote_types(norm.dtype, torch.float32)  # as cam_precision
    inter = (sel & ann).sum(1).to(dtype)
    union = (sel | ann).sum(1).to(dtype)
    size = sel.sum(1).to(dtype) + ann.sum(1).to(dtype)
    iou = inter / union.clamp_min(1.0)
    dice = 2 * inter / size.clamp_min(1.0)
    return iou, dice
