"""Deletion faithfulness (paper 002 §4, Table 2): zero the top-k salient pixels and measure
how much the class score drops. A faithful map finds the pixels the decision rests on."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..explain.base import (
    as_target,
    check_logits,
    check_model_dtype,
    check_no_batch_statistics,
    check_target_classes,
    eval_mode,
    input_shape_hint,
    shape_errors,
)
from .localization import channel_hint

DELETION_FRACTIONS = (0.002, 0.01, 0.02, 0.1, 0.2)


@torch.no_grad()
def deletion_scores(
    model: nn.Module, inputs: Tensor, maps: Tensor,
    target: Tensor | int | Sequence[int] | np.ndarray | None,
    fractions: tuple[float, ...] = DELETION_FRACTIONS, fill: float = 0.0,
    logits: Tensor | None = None,
) -> dict[float, Tensor]:
    """Per-sample drop p_t(x) − p_t(x with top-k pixels of `maps` set to `fill`).

    maps: (N, *spatial) saliency (or (N, 1, *spatial)); inputs (N, C, *spatial); a pixel is
    removed in all channels; each fraction lies in (0, 1] and removes at least one pixel.
    Ties are broken in one fixed pseudo-random pixel order (`_tie_order`), so k pixels are
    removed exactly, the ranking does not depend on the map's scale, the result is
    deterministic and the same for a sample in any batch, and no image region is preferred:
    index order removed the top-left pixels of every flat plateau first (a constant map "found"
    the top-left shortcut symbol of the synthetic benchmark). `target`
    holds one class per input (an int applies to all; None: each input's predicted class,
    as the explainers take it). The model runs in eval mode (its
    modules' flags are restored): in train mode BatchNorm would update its running statistics
    on the deleted images and dropout would add noise to the drop.

    `logits`: the model's eval-mode logits of `inputs` when the caller already has them
    (evaluation does), which saves the baseline forward pass. Drops are float32 for
    half/bfloat16/float32 models and float64 for float64 ones, but the probabilities and their
    difference are float64: in a bfloat16 model's own dtype drops were quantised to steps of
    ~0.004, and in float32 a confident model's p = 1 − 1e-12 and 1 − 1e-9 both round to 1.0,
    so that drop of 1e-9 read 0 (on the host for MPS, which has no float64).
    """
    if not isinstance(inputs, Tensor) or not isinstance(maps, Tensor):
        # a NumPy map failed in Tensor.sort with "order must be str, not int"
        raise InputError(f"deletion needs tensors: inputs (N, C, *spatial) and maps "
                         f"(N, *spatial), got {type(inputs).__name__} and "
                         f"{type(maps).__name__}")
    if not inputs.is_floating_point() or inputs.dim() < 3:
        raise InputError(f"inputs must be a floating-point batch (N, C, *spatial), got "
                         f"{inputs.dtype} of shape {tuple(inputs.shape)}")
    if not math.isfinite(fill):
        raise InputError(f"deletion fill value must be finite, got {fill}")
    n_bad = int((~torch.isfinite(inputs)).sum())
    if n_bad:  # NaN pixels gave NaN drops and no error
        raise InputError(f"inputs hold {n_bad} NaN/inf value(s); deletion of a non-finite "
                         f"image is undefined")
    check_model_dtype(model, inputs)
    # batch statistics: each sample's drop depended on its batch-mates' deleted images
    check_no_batch_statistics(model, inputs, "deletion score")
    n = inputs.shape[0]
    spatial = tuple(inputs.shape[2:])
    if maps.shape[0] != n or maps.shape[1:] not in (spatial, (1, *spatial)):
        # inputs that do not fit the model ((N, H, W) without the channel axis) make the
        # right maps look wrong: "these are 32-channel attributions" blamed the maps
        hint = input_shape_hint(model, inputs)
        raise InputError(f"maps {tuple(maps.shape)} must be (N, *spatial) of the inputs "
                         f"{tuple(inputs.shape)}"
                         f"{f'; but {hint}' if hint else channel_hint(maps, spatial)}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise InputError(f"deletion fractions must lie in (0, 1], got {bad}")
    # None: each input's predicted class (eval mode), as the explainers read it; it failed
    # in torch.as_tensor with "Could not infer dtype of NoneType"
    predicted = target is None
    if target is not None:
        target = as_target(target)  # lists, arrays; NumPy integers are ints
        if isinstance(target, int) or (isinstance(target, Tensor) and target.dim() == 0):
            # one class for all inputs, as the explainers take it (a 0-d tensor too)
            target = torch.full((n,), int(target), dtype=torch.long)
        target = torch.as_tensor(target).to(inputs.device)
        if target.is_floating_point() or target.shape != (n,):
            raise InputError(f"target must hold one integer class per input ({n}), got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        target = target.long()
    # float32 at least (half maps sort coarsely), float64 kept: 1 + 1e-10·k are distinct
    # float64 values that all round to 1.0 in float32, where they tie and get ranked by index
    flat = maps.flatten(1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    n_bad = int((~torch.isfinite(flat)).sum())
    if n_bad:  # NaN sorts arbitrarily: the "top-k" pixels would be meaningless
        raise InputError(f"maps hold {n_bad} NaN/inf value(s); deletion needs finite maps")
    numel = flat.shape[1]
    # A stable sort of the map in a fixed shuffled pixel order breaks ties by that order
    # whatever the map's scale: an additive jitter (once 1e-12 per index) outranked the map
    # itself when its values were below ~numel·1e-12, and plain index order favoured the
    # top-left corner. On the inputs' device once (maps may live on the host).
    shuffle = _tie_order(numel).to(flat.device)
    ranked = flat[:, shuffle].sort(dim=1, descending=True, stable=True).indices
    order = shuffle[ranked].to(inputs.device)
    if logits is not None and tuple(logits.shape[:1]) != (n,):
        raise InputError(f"logits {tuple(logits.shape)} must be (N, classes) for the {n} "
                         f"inputs")
    with eval_mode(model), shape_errors(model, inputs, "deletion"):
        logits = check_logits(model(inputs) if logits is None else logits.to(inputs.device),
                              "deletion")
        n_bad = int((~torch.isfinite(logits)).sum())
        if n_bad:  # every drop would be a silent NaN
            raise InputError(f"the model's logits hold {n_bad} NaN/inf value(s); no deletion "
                             f"score from non-finite outputs")
        if predicted:
            target = logits.argmax(1)
        check_target_classes(logits, target)
        base = _target_probs(logits, target)
        drop_dtype = torch.promote_types(logits.dtype, torch.float32)
        out = {}
        for frac in fractions:
            k = max(1, int(round(frac * numel)))
            keep = torch.ones(n, numel, device=inputs.device, dtype=inputs.dtype)
            keep.scatter_(1, order[:, :k], 0.0)
            keep = keep.view(n, 1, *spatial)
            deleted = inputs * keep + fill * (1 - keep)
            prob = _target_probs(model(deleted), target)
            out[frac] = (base - prob).to(inputs.device, drop_dtype)
    return out


def _tie_order(numel: int) -> Tensor:
    """A fixed pseudo-random permutation of ``numel`` pixel indices (its own seeded generator,
    so the global RNG is neither used nor advanced): the order in which equal-valued pixels
    are removed. One order for every sample keeps a sample's drop independent of its batch."""
    return torch.randperm(numel, generator=torch.Generator().manual_seed(0))


def _target_probs(logits: Tensor, target: Tensor) -> Tensor:
    """p_target in float64 (see `deletion_scores`), on the logits' device unless it lacks
    float64 (MPS), then on the host."""
    if logits.device.type == "mps":
        logits = logits.cpu()
    probs = logits.detach().to(torch.float64).softmax(1)
    return probs.gather(1, target.to(probs.device)[:, None]).squeeze(1)
