"""Classification metrics (scikit-learn)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """accuracy, balanced accuracy and AUC (one-vs-rest macro for >2 classes; None when the
    split holds a single class, where AUC is undefined)."""
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
