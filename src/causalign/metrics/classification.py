"""Classification metrics (scikit-learn)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from ..errors import InputError


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """accuracy, balanced accuracy and AUC (one-vs-rest macro for >2 classes; None when the
    split holds a single class, where AUC is undefined).

    ``probs`` (N, C) and integer ``labels`` (N,) in 0..C−1; anything else, an empty split or a
    NaN/inf probability raises `InputError` (a label C would otherwise count as "positive" in
    the binary AUC and give a silently wrong number)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise InputError(f"classification metrics need probs (N, classes) and labels (N,), "
                         f"got {probs.shape} and {labels.shape}")
    if probs.shape[0] == 0:
        raise InputError("classification metrics of an empty split are undefined")
    n_bad = int((~np.isfinite(probs)).sum())
    if n_bad:
        raise InputError(f"probs hold {n_bad} NaN/inf value(s): the model's outputs are not "
                         f"finite")
    if not np.issubdtype(labels.dtype, np.integer) and not (
            np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
        raise InputError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise InputError(f"labels must lie in 0..{probs.shape[1] - 1}, got "
                         f"{labels.min()}..{labels.max()}")
    pred = probs.argmax(axis=1)
    out: dict[str, float | None] = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": None,
        "auc": None,
    }
    present = np.unique(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, pred))
        if len(present) == probs.shape[1] == 2:
            out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
        elif len(present) == probs.shape[1] > 2:
            out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr"))
    return out
