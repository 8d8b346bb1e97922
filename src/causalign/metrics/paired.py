"""Paired comparison of two classifiers on the same samples: DeLong's test of correlated ROC
AUCs and McNemar's test of paired accuracy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import stats

from ..errors import InputError
from .classification import _checked, _numpy

# Discordant pairs below which `mcnemar_test` gives the exact binomial p-value; from 25 on the
# continuity-corrected chi-square (the usual rule: Rosner, Fundamentals of Biostatistics;
# statsmodels' `mcnemar` leaves the choice to its caller)
MCNEMAR_EXACT_BELOW = 25

_Z975 = float(stats.norm.ppf(0.975))  # 1.959963984540054


def delong_test(probs_a: np.ndarray | torch.Tensor, probs_b: np.ndarray | torch.Tensor,
                labels: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """DeLong, DeLong & Clarke-Pearson (1988)'s test of two correlated ROC AUCs (two models
    scored on the same samples), by Sun & Xu (2014)'s fast midrank algorithm: O(N log N),
    ties counted ½ (midranks), so the AUCs are scikit-learn's `roc_auc_score`.

    Binary tasks only. ``probs_a`` / ``probs_b``: each sample's score for class 1, as (N,)
    scores or (N, 2) class probabilities (column 1 is used); ``labels`` (N,) 0/1 (or bool).
    More classes raise `InputError`: a macro AUC's difference has no DeLong variance of its
    own; test each class one-vs-rest with ``delong_test(pa[:, c], pb[:, c], labels == c)``
    (what ``causalign compare`` reports, unadjusted for the multiple tests).

    Returns ``auc_a``, ``auc_b``, ``difference`` (a − b), ``se`` (its standard error),
    ``z``, two-sided ``p_value``, ``ci95`` ([lo, hi] of the difference, normal), the
    ``n_positive`` / ``n_negative`` counts and ``method``. When the difference has zero
    variance (e.g. the same scores twice), ``z`` is 0 and ``p_value`` 1 if the AUCs are equal,
    else both None. Needs at least two samples of each class."""
    score_a = _scores(probs_a, "probs_a")
    score_b = _scores(probs_b, "probs_b")
    y = _binary_labels(labels, len(score_a))
    if len(score_b) != len(score_a):
        raise InputError(f"probs_a and probs_b must score the same samples, got "
                         f"{len(score_a)} and {len(score_b)}")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise InputError(f"DeLong's test needs at least 2 positives and 2 negatives, got "
                         f"{m} and {n}")
    # Sun & Xu: positives first; midranks within the positives (tx), the negatives (ty) and
    # all samples (tz), for both models at once (rows)
    scores = np.stack([score_a, score_b])
    x, z_neg = scores[:, y], scores[:, ~y]
    tx = stats.rankdata(x, axis=1)
    ty = stats.rankdata(z_neg, axis=1)
    tz = stats.rankdata(np.concatenate([x, z_neg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    # placement values: V10 the share of negatives each positive outranks, V01 the share of
    # positives each negative is outranked by (DeLong's structural components)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    se = math.sqrt(max(var, 0.0))  # a rounding −1e-18 is 0
    if se > 0:
        z: float | None = diff / se
        p: float | None = float(2 * stats.norm.sf(abs(z)))
    else:
        z, p = (0.0, 1.0) if diff == 0 else (None, None)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "se": se,
            "z": z, "p_value": p, "ci95": [diff - _Z975 * se, diff + _Z975 * se],
            "n_positive": m, "n_negative": n,
            "method": "DeLong 1988, Sun & Xu 2014 fast midrank algorithm"}


def mcnemar_test(pred_a: np.ndarray | torch.Tensor, pred_b: np.ndarray | torch.Tensor,
                 labels: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """McNemar's test of two classifiers' paired accuracy on the same samples (any number of
    classes): only the discordant samples count, ``a_only_correct`` (b) and ``b_only_correct``
    (c). Fewer than `MCNEMAR_EXACT_BELOW` (25) discordant pairs: the exact two-sided binomial
    p-value, min(1, 2·P[Bin(b+c, ½) ≤ min(b, c)]); else the chi-square statistic with
    continuity correction, (|b − c| − 1)² / (b + c), on 1 degree of freedom. No discordant
    pair: p 1.

    ``pred_a`` / ``pred_b`` (N,) predicted class indices; ``labels`` (N,) the true ones.
    Returns ``accuracy_a``, ``accuracy_b``, ``both_correct``, ``a_only_correct``,
    ``b_only_correct``, ``both_wrong``, ``statistic`` (chi-square; None when exact),
    ``p_value`` and ``method``."""
    a, b, y = (_classes(v, name) for v, name in ((pred_a, "pred_a"), (pred_b, "pred_b"),
                                                  (labels, "labels")))
    if not len(a) == len(b) == len(y):
        raise InputError(f"pred_a, pred_b and labels must have one entry per sample, got "
                         f"{len(a)}, {len(b)} and {len(y)}")
    if len(y) == 0:
        raise InputError("McNemar's test of an empty split is undefined")
    ok_a, ok_b = a == y, b == y
    n01 = int((ok_a & ~ok_b).sum())
    n10 = int((~ok_a & ok_b).sum())
    k = n01 + n10
    statistic: float | None = None
    if k == 0:
        p, method = 1.0, "no discordant pairs"
    elif k < MCNEMAR_EXACT_BELOW:
        p = min(1.0, float(2 * stats.binom.cdf(min(n01, n10), k, 0.5)))
        method = "exact binomial (two-sided)"
    else:
        statistic = (abs(n01 - n10) - 1) ** 2 / k
        p = float(stats.chi2.sf(statistic, 1))
        method = "chi-square with continuity correction"
    return {"accuracy_a": float(ok_a.mean()), "accuracy_b": float(ok_b.mean()),
            "both_correct": int((ok_a & ok_b).sum()), "a_only_correct": n01,
            "b_only_correct": n10, "both_wrong": int((~ok_a & ~ok_b).sum()),
            "statistic": statistic, "p_value": p, "method": method}


def paired_operating_point(probs_a: np.ndarray | torch.Tensor,
                           probs_b: np.ndarray | torch.Tensor,
                           labels: np.ndarray | torch.Tensor, threshold_a: float,
                           threshold_b: float) -> dict[str, Any]:
    """Two two-class models on the same samples, each at its own threshold on class 1's
    probability (class 1 called for p ≥ threshold): ``sensitivity_a/_b``,
    ``specificity_a/_b`` (`operating_point_metrics`; None without positives / negatives),
    ``mcnemar_sensitivity`` (`mcnemar_test` on the positives only: its ``accuracy_a/_b`` are
    the sensitivities) and ``mcnemar_specificity`` (on the negatives). A test a split cannot
    give (no positive, or no negative) is ``{"error": why}``."""
    from .operating_point import _binary, check_probability, operating_point_metrics

    check_probability(threshold_a)
    check_probability(threshold_b)
    rates_a = operating_point_metrics(probs_a, labels, threshold_a)
    rates_b = operating_point_metrics(probs_b, labels, threshold_b)
    score_a, positive = _binary(probs_a, labels, "operating-point comparison")
    score_b, _ = _binary(probs_b, labels, "operating-point comparison")
    if len(score_b) != len(score_a):
        raise InputError(f"probs_a and probs_b must score the same samples, got "
                         f"{len(score_a)} and {len(score_b)}")
    called_a = (score_a >= threshold_a).astype(np.int64)
    called_b = (score_b >= threshold_b).astype(np.int64)
    y = positive.astype(np.int64)

    def among(keep: np.ndarray) -> dict[str, Any]:
        # McNemar within one class: "correct" there is exactly "sensitive" / "specific"
        try:
            return mcnemar_test(called_a[keep], called_b[keep], y[keep])
        except InputError as exc:  # no sample of the class: the other test still stands
            return {"error": str(exc)}

    return {"sensitivity_a": rates_a["sensitivity"], "sensitivity_b": rates_b["sensitivity"],
            "specificity_a": rates_a["specificity"], "specificity_b": rates_b["specificity"],
            "mcnemar_sensitivity": among(positive), "mcnemar_specificity": among(~positive)}


def paired_operating_point_ci(probs_a: np.ndarray | torch.Tensor,
                              probs_b: np.ndarray | torch.Tensor,
                              labels: np.ndarray | torch.Tensor, threshold_a: float,
                              threshold_b: float, n: int = 1000, seed: int = 0
                              ) -> dict[str, Any]:
    """Paired percentile 95 % intervals of ``sensitivity_b − sensitivity_a`` and
    ``specificity_b − specificity_a`` at fixed thresholds (as `paired_operating_point`):
    each of ``n`` stratified resamples (`bootstrap_ci`'s, same seed → same draws) draws one
    set of samples that both models are scored on. Over one resample's positives the
    sensitivity difference is the mean of called_b − called_a, so it is `bootstrap_ci`'s
    per-sample mean of that value (NaN for negatives); the specificity's likewise. Returns
    ``{"ci95": {"sensitivity_b_minus_a", "specificity_b_minus_a": [lo, hi] or None (no
    positive / negative)}, "bootstrap": {"n", "seed", "method"}}``."""
    from .classification import bootstrap_ci
    from .operating_point import _binary, check_probability

    check_probability(threshold_a)
    check_probability(threshold_b)
    score_a, positive = _binary(probs_a, labels, "operating-point comparison")
    score_b, _ = _binary(probs_b, labels, "operating-point comparison")
    if len(score_b) != len(score_a):
        raise InputError(f"probs_a and probs_b must score the same samples, got "
                         f"{len(score_a)} and {len(score_b)}")
    gain = (score_b >= threshold_b).astype(np.float64) - (score_a >= threshold_a)
    names = {"sensitivity_b_minus_a": np.where(positive, gain, np.nan),
             "specificity_b_minus_a": np.where(~positive, -gain, np.nan)}
    resampled = bootstrap_ci(probs_a, labels, n, seed, per_sample=names)
    return {"ci95": {k: resampled["ci95"][k] for k in names},
            "bootstrap": resampled["bootstrap"]}


def holm_adjust(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error rate) of several tests of one
    comparison, e.g. DeLong per class one-vs-rest: the k-th smallest of m becomes
    max over j ≤ k of min(1, (m − j + 1)·p_(j)). ``None`` (a test that could not be made)
    stays None and does not count towards m."""
    given = [(p, i) for i, p in enumerate(p_values) if p is not None]
    for p, _ in given:
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise InputError(f"p-values must lie in [0, 1], got {p}")
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(given)):
        running = max(running, min(1.0, (len(given) - rank) * p))  # monotone step-down
        adjusted[i] = running
    return adjusted


def _scores(probs: object, name: str) -> np.ndarray:
    """Class-1 scores (N,) from (N,) scores or (N, 2) probabilities; `InputError` else."""
    arr = np.asarray(_numpy(probs))
    if arr.ndim == 2:
        if arr.shape[1] != 2:
            raise InputError(f"DeLong's test compares binary AUCs; {name} has {arr.shape[1]} "
                             f"classes: test each one-vs-rest, delong_test(pa[:, c], "
                             f"pb[:, c], labels == c)")
        arr = _checked(arr, np.zeros(len(arr), dtype=np.int64))[0][:, 1]
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise InputError(f"{name} must be (N,) scores or (N, 2) probabilities, got shape "
                         f"{arr.shape} of {arr.dtype}")
    arr = arr.astype(np.float64)
    n_bad = int((~np.isfinite(arr)).sum())
    if n_bad:
        raise InputError(f"{name} holds {n_bad} NaN/inf value(s)")
    return arr


def _binary_labels(labels: object, n: int) -> np.ndarray:
    y = _classes(labels, "labels")
    if y.shape != (n,):
        raise InputError(f"labels must have one entry per sample ({n}), got shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 1):
        raise InputError(f"DeLong's test needs binary labels 0/1, got {y.min()}..{y.max()}: "
                         f"for more classes pass labels == c (one-vs-rest)")
    return y == 1


def _classes(values: object, name: str) -> np.ndarray:
    """(N,) int64 class indices, or `InputError` (floats must be whole numbers)."""
    arr = np.asarray(_numpy(values))
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise InputError(f"{name} must be (N,) class indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and not (
            np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))):
        raise InputError(f"{name} must be integer class indices, got {arr.dtype}")
    return arr.astype(np.int64)
