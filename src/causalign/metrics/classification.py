"""Classification metrics (scikit-learn)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    roc_auc_score,
)

from ..errors import InputError

# Bins of the expected calibration error: Guo et al. 2017's 15 equal-width bins of the
# maximum probability, the number most papers report
ECE_BINS = 15

# Fewest resamples `bootstrap_ci` takes: the 2.5th and 97.5th percentiles of fewer than 100
# values are the 2nd/3rd smallest and largest of them, not an interval
MIN_BOOTSTRAP = 100

# The metrics `bootstrap_ci` gives intervals for, in metrics.json's order
BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
                     "brier", "ece")


def classification_metrics(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                           ece_bins: int = ECE_BINS) -> dict[str, Any]:
    """accuracy, balanced accuracy and AUC (one-vs-rest macro for >2 classes, over the
    classes the split holds; None when the split holds a single class, where AUC is
    undefined), and each class's recall (`recall_per_class`, None for a class the split
    lacks), which for two classes are also given as `sensitivity` (class 1's recall) and
    `specificity` (class 0's); None for more classes. Calibration: `brier` (`brier_score`)
    and `ece` (`expected_calibration_error`, ``ece_bins`` bins, 15 by default).

    ``probs`` (N, C) rows of class probabilities (each in [0, 1], summing to 1) and integer
    (or bool) ``labels`` (N,) in 0..C−1; anything else, an empty split or a NaN/inf
    probability raises `InputError` (a label C would otherwise count as "positive" in the
    binary AUC and give a silently wrong number; so would logits, whose class-1 column ranks
    samples differently from the softmax probability)."""
    check_bins(ece_bins)
    probs, labels = _checked(probs, labels)
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": None,
        "auc": None,
    }
    present = np.unique(labels)
    # what a clinical reader asks first: how many positives (negatives) were found; no
    # threshold but argmax, as accuracy uses
    recall = [float((pred[labels == c] == c).mean()) if (labels == c).any() else None
              for c in range(probs.shape[1])]
    binary = probs.shape[1] == 2
    out["sensitivity"] = recall[1] if binary else None
    out["specificity"] = recall[0] if binary else None
    out["recall_per_class"] = recall
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
        if len(present) == probs.shape[1] == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
        elif probs.shape[1] > 2 and len(present) >= 2:
            # one-vs-rest macro AUC: the mean of each present class's binary AUC on the
            # model's own probabilities (what scikit-learn's "ovr" computes). Not "ovr" on
            # rows renormalised to sum 1: that broke ties (a saturated float32 softmax's
            # many exact 1.0s were ranked by their ~1e-13 tails), so the AUC differed from
            # scikit-learn's on the same probabilities. A class absent from the split has no
            # one-vs-rest AUC and is left out ("ovr" refuses such a split).
            out["auc"] = float(np.mean([roc_auc_score(labels == c, probs[:, c])
                                        for c in present]))
    out["brier"] = _brier(probs, labels)
    out["ece"] = _ece(probs, labels, int(ece_bins))
    return out


def brier_score(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """The Brier score: the mean squared difference between the predicted probabilities and
    the one-hot label. Two classes: scikit-learn's `brier_score_loss` on class 1's
    probability, (p₁ − y)² averaged, in [0, 1]. More classes: Brier's original score, the
    squares summed over the classes and averaged over samples, in [0, 2] (scikit-learn ≥ 1.7's
    multi-class `brier_score_loss`). Lower is better; inputs as `classification_metrics`."""
    return _brier(*_checked(probs, labels))


def check_bins(n_bins: int) -> None:
    """`InputError` unless ``n_bins`` is a positive integer (a calibration bin count)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")


def expected_calibration_error(probs: np.ndarray | torch.Tensor,
                               labels: np.ndarray | torch.Tensor, n_bins: int = ECE_BINS
                               ) -> float:
    """Expected calibration error (Guo et al. 2017): the samples binned by their maximum
    probability (the confidence) into ``n_bins`` equal-width bins (lo, hi] of [0, 1];
    Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)|, with the argmax prediction.
    0 is perfectly calibrated; inputs as `classification_metrics`."""
    check_bins(n_bins)
    return _ece(*_checked(probs, labels), int(n_bins))


def _brier(probs: np.ndarray, labels: np.ndarray) -> float:
    if probs.shape[1] == 2:
        # clipped: rows may stray 1e-3 outside [0, 1] (a half-precision softmax), which
        # scikit-learn refuses
        return float(brier_score_loss(labels, np.clip(probs[:, 1], 0.0, 1.0), pos_label=1))
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def _brier_per_sample(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's Brier term, whose mean is `_brier`."""
    if probs.shape[1] == 2:
        return (np.clip(probs[:, 1], 0.0, 1.0) - labels) ** 2
    return ((probs - np.eye(probs.shape[1])[labels]) ** 2).sum(axis=1)


def _ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    b = _bin_of(conf, n_bins)
    # |B_b|·|acc_b − conf_b| = |Σ_{i∈B_b} (correct_i − conf_i)|: one bincount, no loop
    gap = np.bincount(b, weights=correct - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(conf))


def _bin_of(score: np.ndarray, n_bins: int) -> np.ndarray:
    """Each score's equal-width bin of [0, 1]: bin b holds (b/n, (b+1)/n], as Guo et al.'s
    code (a confidence of exactly 1/15 falls in the first bin); the clip keeps 0 and a
    softmax's 1 + 1e-16 inside."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, score, side="left") - 1, 0, n_bins - 1)


# What `reliability_bins` bins: the predicted class's probability against accuracy (Guo et
# al.'s diagram, whose gaps sum to `expected_calibration_error`), or class 1's probability
# against the share of positives (the binary "calibration curve" of clinical papers)
RELIABILITY_KINDS = ("confidence", "positive")


def reliability_bins(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                     n_bins: int = ECE_BINS, kind: str = "confidence") -> dict[str, Any]:
    """The bins of a reliability diagram: ``n_bins`` equal-width bins (lo, hi] of [0, 1].
    ``kind`` "confidence" bins the maximum probability and observes accuracy (the bins of
    `expected_calibration_error`, so ``ece`` equals it); "positive" (two classes only) bins
    class 1's probability and observes the share of class-1 labels, ``ece`` then being
    Σ |B|/N · |share − mean probability| over those bins. Returns ``kind``, ``edges``
    (n_bins + 1), per bin ``count``, ``mean_predicted`` and ``observed`` (None for an empty
    bin), and ``ece``; inputs as `classification_metrics`."""
    check_bins(n_bins)
    if kind not in RELIABILITY_KINDS:
        raise InputError(f"kind must be one of {', '.join(RELIABILITY_KINDS)}, got {kind!r}")
    probs, labels = _checked(probs, labels)
    if kind == "positive":
        if probs.shape[1] != 2:
            raise InputError(f"a 'positive' reliability diagram needs two classes, got "
                             f"{probs.shape[1]}; use kind='confidence'")
        score, hit = probs[:, 1], (labels == 1).astype(np.float64)
    else:
        score = probs.max(axis=1)
        hit = (probs.argmax(axis=1) == labels).astype(np.float64)
    b = _bin_of(score, int(n_bins))
    count = np.bincount(b, minlength=n_bins)
    total = np.bincount(b, weights=score, minlength=n_bins)
    hits = np.bincount(b, weights=hit, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"kind": kind, "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
            "count": count.tolist(),
            "mean_predicted": [float(t / k) if c else None
                               for t, k, c in zip(total, safe, count, strict=True)],
            "observed": [float(h / k) if c else None
                         for h, k, c in zip(hits, safe, count, strict=True)],
            "ece": float(np.abs(hits - total).sum() / len(score))}


def bootstrap_ci(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 n: int = 1000, seed: int = 0,
                 per_sample: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                 ece_bins: int = ECE_BINS) -> dict[str, Any]:
    """Percentile 95 % intervals of accuracy, balanced accuracy, AUC, sensitivity,
    specificity, Brier score and ECE (as `classification_metrics` defines them) from ``n``
    stratified bootstrap resamples: each resample draws each class's samples with
    replacement from that class alone, so it keeps the split's class counts (every class
    present, AUC always defined, even with a single positive). Returns ``{"ci95": {metric:
    [lo, hi] or None}, "bootstrap": {"n", "seed", "method"}}`` (None where the point
    estimate is None), the same for the same inputs and seed. ``n`` must be at least
    `MIN_BOOTSTRAP` (100); inputs and ``ece_bins`` as `classification_metrics`.

    ``per_sample``: more metrics that are means of a per-sample value, ``{name: (N,) values}``
    with NaN where a sample does not count (CAM precision of an unannotated image); each
    gets the interval of its mean over the counted samples the same resamples draw. A
    resample that draws none of a metric's counted samples has no value for it: it is left
    out, and ``bootstrap["undefined"][name]`` says how many were (absent when none).

    Vectorised: a resample is a row of draw counts per sample, so every metric is a weighted
    sum over the split (the AUC a weighted Mann–Whitney count with ties as ½, which is
    scikit-learn's `roc_auc_score` on the resample; Brier, the ECE's per-bin gaps and the
    per-sample means one matrix product per chunk)."""
    check_bootstrap(n, seed)
    probs, labels = _checked(probs, labels)
    extra = _checked_per_sample(per_sample, len(labels))
    point = classification_metrics(probs, labels, ece_bins)
    # samples sorted by class, so each class's columns of the count matrix are a slice (a
    # view) rather than a fancy-indexed copy; every metric is order-free
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    extra = {name: v[order] for name, v in extra.items()}
    resampled = _resampled_metrics(probs[order], labels, ece_bins, point["auc"] is not None,
                                   extra)
    stats: dict[str, list[np.ndarray]] = {m: [] for m in (*BOOTSTRAP_METRICS, *extra)}
    for w in _resample_counts(labels, n, seed):
        for name, values in resampled(w).items():
            stats[name].append(values)
    ci: dict[str, list[float] | None] = {}
    undefined = {}
    for name, parts in stats.items():
        if (name in point and point[name] is None) or not parts:
            ci[name] = None
            continue
        ci[name], missing = percentile_interval(np.concatenate(parts))
        if missing:
            undefined[name] = missing
    settings: dict[str, Any] = {"n": int(n), "seed": int(seed),
                                "method": "percentile, stratified by class"}
    if undefined:
        settings["undefined"] = undefined
    return {"ci95": ci, "bootstrap": settings}


# The metrics `paired_bootstrap_ci` gives difference intervals for (compare's)
PAIRED_BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "auc", "brier", "ece")


def paired_bootstrap_ci(probs_a: np.ndarray | torch.Tensor, probs_b: np.ndarray | torch.Tensor,
                        labels: np.ndarray | torch.Tensor, n: int = 1000, seed: int = 0,
                        ece_bins: int = ECE_BINS) -> dict[str, Any]:
    """Paired percentile 95 % intervals of metric_b − metric_a for accuracy, balanced
    accuracy, AUC (macro one-vs-rest for more than two classes), Brier score and ECE of two
    models scored on the same samples: each of ``n`` stratified resamples (`bootstrap_ci`'s,
    same seed → same draws) draws one set of samples both models are scored on, so what the
    two share cancels. Returns ``{"difference": {metric: b − a on the split itself},
    "ci95_difference": {metric: [lo, hi] or None (AUC of a single-class split)},
    "bootstrap": {"n", "seed", "method"}}``; inputs as
    `classification_metrics`, both ``probs`` with the same shape."""
    check_bootstrap(n, seed)
    check_bins(ece_bins)
    probs_a, labels = _checked(probs_a, labels)
    probs_b, _ = _checked(probs_b, labels)
    labels_in = labels
    if probs_b.shape != probs_a.shape:
        raise InputError(f"probs_a and probs_b must score the same samples and classes, got "
                         f"{probs_a.shape} and {probs_b.shape}")
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    auc = len(np.unique(labels)) > 1  # classification_metrics' AUC is None otherwise
    resampled_a = _resampled_metrics(probs_a[order], labels, ece_bins, auc)
    resampled_b = _resampled_metrics(probs_b[order], labels, ece_bins, auc)
    diffs: dict[str, list[np.ndarray]] = {m: [] for m in PAIRED_BOOTSTRAP_METRICS}
    for w in _resample_counts(labels, n, seed):
        a, b = resampled_a(w), resampled_b(w)
        for name in PAIRED_BOOTSTRAP_METRICS:
            if name in a:
                diffs[name].append(b[name] - a[name])
    ci = {name: percentile_interval(np.concatenate(parts))[0] if parts else None
          for name, parts in diffs.items()}
    # the point differences the intervals are around (a reader subtracted `_a` from `_b`)
    point_a = classification_metrics(probs_a, labels_in, ece_bins)
    point_b = classification_metrics(probs_b, labels_in, ece_bins)
    difference = {name: None if point_a[name] is None or point_b[name] is None
                  else point_b[name] - point_a[name] for name in PAIRED_BOOTSTRAP_METRICS}
    return {"difference": difference, "ci95_difference": ci,
            "bootstrap": {"n": int(n), "seed": int(seed),
                          "method": "percentile, stratified by class, paired (one resample "
                                    "scores both)"}}


def _resampled_metrics(probs: np.ndarray, labels: np.ndarray, ece_bins: int, auc: bool,
                       extra: Mapping[str, np.ndarray] | None = None,
                       ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The per-resample metrics `bootstrap_ci` and `paired_bootstrap_ci` share: for checked
    ``probs`` / ``labels`` already sorted by class (`_resample_counts`' order), a function of
    one chunk of draw-count rows ``w`` (m, N) giving each metric's (m,) values. ``auc``:
    whether the AUC is defined (False: a single-class split, no "auc" key); sensitivity
    and specificity are given for two classes only, each when its class is present.
    ``extra``: per-sample values (NaN: not counted), each resample's mean over the counted
    samples it draws (NaN where it draws none)."""
    extra = dict(extra or {})
    bins = int(ece_bins)
    n_samples, n_classes = probs.shape
    members = _class_slices(labels)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # the AUC's classes: class 1 against 0 for two, each present class against the rest
    auc_classes = ([] if not auc else [1] if n_classes == 2
                   else [int(c) for c in np.unique(labels)])
    rankings = {c: _ranking(probs[:, c], labels == c) for c in auc_classes}
    # the ECE's signed gap per (sample, bin): a resample's |Σ_bin| summed is its ECE·N
    gap = np.zeros((n_samples, bins))
    conf = probs.max(axis=1)
    gap[np.arange(n_samples), _bin_of(conf, bins)] = correct - conf
    # one matrix product per chunk for every weighted sum below: Brier's terms, the ECE's
    # gaps, and each per-sample metric's counted flags and values (NaN → 0)
    names = list(extra)
    k = len(names)
    sums = np.column_stack([_brier_per_sample(probs, labels), gap,
                            *(~np.isnan(extra[n]) for n in names),
                            *(np.nan_to_num(extra[n], nan=0.0) for n in names)])

    def metrics(w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        recall = {c: w[:, sl] @ correct[sl] / (sl.stop - sl.start)
                  for c, sl in members.items()}
        out["accuracy"] = w @ correct / n_samples
        # sklearn's balanced accuracy: the mean recall of the classes the labels hold
        out["balanced_accuracy"] = np.mean(list(recall.values()), axis=0)
        if n_classes == 2:
            for name, c in (("sensitivity", 1), ("specificity", 0)):
                if c in recall:
                    out[name] = recall[c]
        if auc_classes:
            out["auc"] = np.mean([_weighted_auc(w, *rankings[c]) for c in auc_classes],
                                 axis=0)
        total = w @ sums
        out["brier"] = total[:, 0] / n_samples
        out["ece"] = np.abs(total[:, 1:1 + bins]).sum(axis=1) / n_samples
        drawn = total[:, 1 + bins:1 + bins + k]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(drawn > 0, total[:, 1 + bins + k:] / drawn, np.nan)
        for j, name in enumerate(names):
            out[name] = means[:, j]
        return out

    return metrics


def percentile_interval(resampled: np.ndarray) -> tuple[list[float] | None, int]:
    """The percentile 95 % interval of one metric's bootstrap values (NaN: a resample
    where it is undefined, left out) and how many were left out; None when all were."""
    resampled = np.asarray(resampled, dtype=np.float64)
    defined = resampled[~np.isnan(resampled)]
    missing = int(len(resampled) - len(defined))
    if len(defined) == 0:  # no counted sample at all (an unannotated split)
        return None, missing
    lo, hi = np.percentile(defined, [2.5, 97.5])
    return [float(lo), float(hi)], missing


def _resample_counts(labels: np.ndarray, n: int,
                     seed: int | np.random.SeedSequence) -> Iterator[np.ndarray]:
    """`bootstrap_ci`'s ``n`` stratified resamples of samples sorted by ``labels``, as
    chunks of rows of draw counts (m, N): each class's n_c draws among its own n_c samples,
    from ``numpy.random.default_rng(seed)`` (a `SeedSequence` for a second, independent
    stream from one user seed). Chunks bound each matrix to ~8 MB."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed if isinstance(seed, np.random.SeedSequence)
                                else int(seed))
    members = _class_slices(labels)
    chunk = max(1, 2 ** 20 // len(labels))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        w = np.zeros((m, len(labels)))
        for sl in members.values():
            k = sl.stop - sl.start
            w[:, sl] = rng.multinomial(k, np.full(k, 1.0 / k), size=m)
        yield w


def _class_slices(labels: np.ndarray) -> dict[int, slice]:
    """Each class's run of samples in ``labels`` sorted by class."""
    present, first, size = np.unique(labels, return_index=True, return_counts=True)
    return {int(c): slice(int(a), int(a + k)) for c, a, k in zip(present, first, size,
                                                                   strict=True)}


def _checked_per_sample(per_sample: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    """float64 (N,) arrays, NaN for "not counted", or `InputError`."""
    out = {}
    for name, v in (per_sample or {}).items():
        if name in BOOTSTRAP_METRICS:
            raise InputError(f"per-sample metric {name!r} clashes with a classification "
                             f"metric's name")
        arr = np.asarray(_numpy(v), dtype=np.float64)
        if arr.shape != (n,):
            raise InputError(f"per-sample metric {name!r} has shape {arr.shape}, expected "
                             f"({n},) (one value per sample)")
        if np.isinf(arr).any():
            raise InputError(f"per-sample metric {name!r} holds inf values (NaN marks a "
                             f"sample that does not count)")
        out[name] = arr
    return out


def check_bootstrap(n: int, seed: int) -> None:
    """`InputError` unless ``n`` resamples (at least `MIN_BOOTSTRAP`) and ``seed`` (≥ 0)
    are usable by `bootstrap_ci`; callers check before the work whose result they need."""
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
        raise InputError(f"bootstrap resamples must be a non-negative integer, got {n!r}")
    if n < MIN_BOOTSTRAP:
        raise InputError(f"{n} bootstrap resamples: too few resamples for a 95 % interval; "
                         f"use at least {MIN_BOOTSTRAP} (1000 is usual)")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"bootstrap seed must be a non-negative integer, got {seed!r}")


def _ranking(score: np.ndarray, positive: np.ndarray,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples in ascending score order, where each run of tied scores starts, and
    whether each (so ordered) sample is a positive: what `_weighted_auc` needs per class."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts, positive[order]


def _weighted_auc(w: np.ndarray, order: np.ndarray, starts: np.ndarray,
                  positive: np.ndarray) -> np.ndarray:
    """AUC of each resample (row of draw counts ``w``): the share of (positive, negative)
    pairs ranked right, ties counting ½, over the resample's drawn samples."""
    w = w[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)  # drawn positives per tied score
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # drawn negatives scored strictly lower
    return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def _checked(probs: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """float64 (N, C) probabilities and int64 (N,) labels, or `InputError` naming what is
    wrong with them (see `classification_metrics`)."""
    probs = np.asarray(_numpy(probs), dtype=np.float64)
    labels = np.asarray(_numpy(labels))
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise InputError(f"classification metrics need probs (N, classes) and labels (N,), "
                         f"got {probs.shape} and {labels.shape}")
    if probs.shape[0] == 0:
        raise InputError("classification metrics of an empty split are undefined")
    if probs.shape[1] == 0:
        raise InputError(f"probs {probs.shape} hold no classes")
    n_bad = int((~np.isfinite(probs)).sum())
    if n_bad:
        raise InputError(f"probs hold {n_bad} NaN/inf value(s): the model's outputs are not "
                         f"finite")
    # loose enough for a half-precision softmax (rows off by ~C·5e-4), tight enough that
    # logits or unnormalised scores are caught
    off = float(np.abs(probs.sum(axis=1) - 1).max())
    if probs.min() < -1e-3 or probs.max() > 1 + 1e-3 or off > 1e-2:
        raise InputError(f"probs must be class probabilities (rows in [0, 1] summing to 1), "
                         f"got values in [{probs.min():.4g}, {probs.max():.4g}] with row sums "
                         f"off by up to {off:.3g}: pass softmax outputs, not logits")
    if labels.dtype == np.bool_:  # binary labels as False/True are classes 0/1
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer) and not (
            np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
        raise InputError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise InputError(f"labels must lie in 0..{probs.shape[1] - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    return probs, labels


def _numpy(x: object) -> object:
    """Tensors as NumPy arrays: np.asarray failed on a tensor that requires grad ("Can't call
    numpy() on Tensor that requires grad"), a bfloat16 one ("unsupported ScalarType
    BFloat16") and a CUDA one."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return x
