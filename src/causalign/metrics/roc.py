"""A ROC curve on a grid of false-positive rates and its pointwise bootstrap band (vertical
averaging, Fawcett 2006 §7.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .classification import _checked, _resample_counts, check_bootstrap

# FPR values at which a band gives the TPR's interval: every 0.01
ROC_BAND_GRID = np.linspace(0.0, 1.0, 101)


def roc_band(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
             n: int = 1000, seed: int = 0, positive: int = 1,
             fpr: np.ndarray | None = None) -> dict[str, Any]:
    """Pointwise percentile 95 % band of the ROC curve of class ``positive`` (against the
    rest) from ``n`` stratified bootstrap resamples, the ones `bootstrap_ci` draws for the
    same labels and seed: at each false-positive rate of ``fpr`` (default every 0.01), the
    2.5th and 97.5th percentiles of the resampled curves' sensitivity there.

    A curve's sensitivity at a false-positive rate is read off the polyline through its
    points (scikit-learn's `roc_curve` with ``drop_intermediate=False``: one point per
    distinct score, ties as one diagonal step), at the top of a vertical segment. Returns
    ``{"fpr", "tpr" (the split's own curve there), "lo", "hi", "n", "seed", "positive"}``
    (arrays (G,)). Pointwise, not simultaneous: each rate's interval alone covers 95 %.
    Inputs as `classification_metrics`; the split must hold class ``positive`` and some
    other class."""
    check_bootstrap(n, seed)
    grid, curves, by_class_labels = _grid_curves(probs, labels, positive, fpr, "roc_band")
    own = curves(np.ones((1, len(by_class_labels))))[0]
    resampled = np.concatenate([curves(w) for w in _resample_counts(by_class_labels, n,
                                                                    seed)])
    lo, hi = np.percentile(resampled, [2.5, 97.5], axis=0)
    return {"fpr": grid, "tpr": own, "lo": lo, "hi": hi, "n": int(n), "seed": int(seed),
            "positive": int(positive)}


def roc_at(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
           positive: int = 1, fpr: np.ndarray | None = None) -> np.ndarray:
    """The ROC curve of class ``positive`` (against the rest) at each false-positive rate of
    ``fpr`` (default every 0.01): the split's own curve `roc_band` returns as ``tpr``, read
    off the same polyline, so curves of several runs can be averaged vertically (Fawcett
    2006 §7.1) on one grid. Inputs and checks as `roc_band`'s."""
    grid, curves, by_class_labels = _grid_curves(probs, labels, positive, fpr, "roc_at")
    return curves(np.ones((1, len(by_class_labels))))[0]


def _grid_curves(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 positive: int, fpr: np.ndarray | None, who: str
                 ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """The checked grid, a function giving each row of per-sample weights (samples sorted
    by class, as `_resample_counts` draws them) its curve's sensitivity at the grid, and the
    labels in that order: the one curve-on-a-grid code `roc_band` and `roc_at` share."""
    probs, labels = _checked(probs, labels)
    if not 0 <= positive < probs.shape[1]:
        raise InputError(f"{who}: positive class {positive} is not one of the "
                         f"{probs.shape[1]} classes")
    grid = ROC_BAND_GRID if fpr is None else np.asarray(fpr, dtype=np.float64)
    if grid.ndim != 1 or not len(grid) or not np.all((grid >= 0) & (grid <= 1)):
        raise InputError(f"{who}: fpr must be a non-empty 1-D array of rates in [0, 1]")
    is_pos = labels == positive
    if is_pos.all() or not is_pos.any():
        raise InputError(f"{who}: the split needs class {positive} and another class "
                         f"(a ROC curve needs positives and negatives)")
    # samples sorted by class as `_resample_counts` draws them, then by score (highest
    # first) for the cumulative counts; each tie group ends at one curve point
    by_class = np.argsort(labels, kind="stable")
    score = probs[by_class, positive]
    pos = is_pos[by_class].astype(np.float64)
    by_score = np.argsort(-score, kind="stable")
    ends = np.flatnonzero(np.r_[np.diff(score[by_score]) != 0, True])
    n_pos, n_neg = pos.sum(), len(pos) - pos.sum()

    def curves(w: np.ndarray) -> np.ndarray:
        """Each weight row's sensitivity at the grid's rates."""
        w = w[:, by_score]
        tpr = np.cumsum(w * pos[by_score], axis=1)[:, ends] / n_pos
        fall = np.cumsum(w * (1 - pos[by_score]), axis=1)[:, ends] / n_neg
        zero = np.zeros((len(w), 1))
        return np.stack([_tpr_at(f, t, grid) for f, t in
                         zip(np.hstack([zero, fall]), np.hstack([zero, tpr]), strict=True)])

    return grid, curves, labels[by_class]


def _tpr_at(fall: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The polyline through (fall, tpr) (both non-decreasing, starting at (0, 0)) at each
    rate of ``grid``: the top of a vertical segment at a point's own rate, else linear
    between the last point below and the first point above."""
    last = np.searchsorted(fall, grid, side="right") - 1  # last point at or left of the rate
    nxt = np.minimum(last + 1, len(fall) - 1)
    f0, f1, t0, t1 = fall[last], fall[nxt], tpr[last], tpr[nxt]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = t0 + (grid - f0) * (t1 - t0) / (f1 - f0)
    return np.where((grid == f0) | (f1 == f0), t0, between)
