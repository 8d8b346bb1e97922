"""Classification metrics (scikit-learn)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from ..errors import InputError


def classification_metrics(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                           ) -> dict[str, Any]:
    """accuracy, balanced accuracy and AUC (one-vs-rest macro for >2 classes, over the
    classes the split holds; None when the split holds a single class, where AUC is
    undefined), and each class's recall (`recall_per_class`, None for a class the split
    lacks), which for two classes are also given as `sensitivity` (class 1's recall) and
    `specificity` (class 0's); None for more classes.

    ``probs`` (N, C) rows of class probabilities (each in [0, 1], summing to 1) and integer
    (or bool) ``labels`` (N,) in 0..C−1; anything else, an empty split or a NaN/inf
    probability raises `InputError` (a label C would otherwise count as "positive" in the
    binary AUC and give a silently wrong number; so would logits, whose class-1 column ranks
    samples differently from the softmax probability)."""
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
    return out


def _numpy(x: object) -> object:
    """Tensors as NumPy arrays: np.asarray failed on a tensor that requires grad ("Can't call
    numpy() on Tensor that requires grad"), a bfloat16 one ("unsupported ScalarType
    BFloat16") and a CUDA one."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return x
