"""Operating points of a binary classifier: a threshold on the positive class's probability,
chosen on one split (validation) and applied unchanged to another (test), with the
sensitivity, specificity, PPV and NPV it gives there.

Argmax — the rule accuracy uses — is the threshold 0.5; a screening reader instead fixes the
sensitivity (or specificity) the test must reach and reads off the other. Choosing the
threshold on the test split itself would report an optimistic pair, so `choose_threshold`
takes the split to choose on and `operating_point_metrics` the split to report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from ..errors import InputError
from .classification import _checked, _resample_counts, check_bootstrap, percentile_interval

# the rules `OperatingPoint.parse` accepts, in the form the CLI shows them
OPERATING_POINT_RULES = ("youden", "sensitivity=S", "specificity=S", "threshold=T")


@dataclass(frozen=True)
class OperatingPoint:
    """How the threshold is set: ``rule`` one of "youden" (the threshold maximising
    sensitivity + specificity − 1), "sensitivity" / "specificity" (the threshold giving the
    highest specificity whose sensitivity is at least ``target``, and the reverse), or
    "threshold" (``target`` itself, nothing is chosen)."""

    rule: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> OperatingPoint:
        """``youden``, ``sensitivity=0.9``, ``specificity=0.95`` or ``threshold=0.3``;
        anything else raises `InputError` naming the accepted forms."""
        spec = text.strip().lower()
        if spec == "youden":
            return cls("youden")
        m = re.fullmatch(r"(sensitivity|specificity|threshold)\s*=\s*(\S+)", spec)
        if m is None:
            raise InputError(f"operating point {text!r}: give one of "
                             f"{', '.join(OPERATING_POINT_RULES)} (e.g. sensitivity=0.9)")
        rule, value = m.groups()
        try:
            target = float(value)
        except ValueError:
            raise InputError(f"operating point {text!r}: {value!r} is not a number") from None
        if not np.isfinite(target) or not 0.0 <= target <= 1.0:
            raise InputError(f"operating point {text!r}: the {rule} must lie in [0, 1]")
        if rule != "threshold" and target == 0.0:
            # every threshold reaches a sensitivity of 0: the "choice" would be arbitrary
            raise InputError(f"operating point {text!r}: a {rule} of 0 is met by every "
                             f"threshold; give a target in (0, 1]")
        return cls(rule, target)

    @property
    def chooses(self) -> bool:
        """Whether the threshold is chosen from data (every rule but a fixed threshold)."""
        return self.rule != "threshold"

    def __str__(self) -> str:
        if self.target is None:
            return self.rule
        # `:g` alone recorded threshold=0.5526386145581799 as "threshold=0.552639" and
        # sensitivity=0.9999999 as "sensitivity=1": the shortest form that reads back exactly
        short = f"{self.target:g}"
        return f"{self.rule}={short if float(short) == self.target else repr(self.target)}"


def positive_class(positive: str | int | None, classes: Sequence[str]) -> int:
    """The index of the class an operating point calls positive: ``positive`` a class name of
    ``classes`` or its index (a name first, so a class named "1" is the name); None gives
    class 1 for two classes (the default) and `InputError` for more, where no class is
    the positive one by convention. An unknown name or index is refused naming the classes."""
    names = ", ".join(map(str, classes))
    if positive is None:
        if len(classes) == 2:
            return 1
        raise InputError(f"an operating point on a {len(classes)}-class run needs its positive "
                         f"class: give --positive CLASS (one-vs-rest), one of {names}")
    if isinstance(positive, str) and positive in classes:
        return list(classes).index(positive)
    try:
        index = int(positive)
    except (TypeError, ValueError):
        index = None
    if isinstance(positive, bool) or index is None or str(positive).strip() != str(index) \
            or not 0 <= index < len(classes):
        raise InputError(f"positive class {positive!r}: not a class of this run"
                         f"{_did_you_mean(str(positive), classes)}; give one of {names} (or an "
                         f"index 0-{len(classes) - 1})")
    return index


def _did_you_mean(given: str, classes: Sequence[str]) -> str:
    """" (did you mean 'malignant'?)" for a near miss of a class name (another case, a typo),
    else "": class names are matched exactly, so "Malignant" is refused."""
    import difflib

    names = [str(c) for c in classes]
    typed = given.strip()
    same = [c for c in names if c.lower() == typed.lower()]
    # a class name after two or more extra leading letters is a prefixed word, not a typo,
    # and a prefix may negate it: 'abnormal' got "did you mean 'normal'?", the other class
    close = same or [c for c in difflib.get_close_matches(typed, names, n=1, cutoff=0.75)
                     if not (typed.lower().endswith(c.lower())
                             and len(typed) - len(c) >= 2)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_vs_rest(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                positive: int) -> tuple[np.ndarray, np.ndarray]:
    """The two-class problem "class ``positive`` against the rest": probabilities
    ``[1 − p_c, p_c]`` and labels ``labels == c`` (0/1), on which `choose_threshold`,
    `operating_point_metrics` and their intervals run unchanged. Two classes with
    ``positive`` 1 are returned as they are (the very same numbers as without it)."""
    probs, labels = _checked(probs, labels)
    if not 0 <= positive < probs.shape[1]:
        raise InputError(f"positive class {positive}: the probabilities have "
                         f"{probs.shape[1]} classes")
    if probs.shape[1] == 2 and positive == 1:
        return probs, labels
    p = probs[:, positive]
    return np.stack([1.0 - p, p], axis=1), (labels == positive).astype(labels.dtype)


def check_probability(threshold: float) -> None:
    """`InputError` unless ``threshold`` is a probability in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0.0 <= threshold <= 1.0):  # NaN fails the comparison too
        raise InputError(f"operating-point threshold must be a probability in [0, 1], got "
                         f"{threshold!r}")


def choose_threshold(point: OperatingPoint, probs: np.ndarray | torch.Tensor,
                     labels: np.ndarray | torch.Tensor) -> float:
    """The threshold on class 1's probability (positive when ``p ≥ threshold``) that
    ``point`` picks on these samples (two-class probabilities and labels, both classes
    present; `InputError` otherwise). Candidates are the samples' own scores, as
    scikit-learn's `roc_curve` gives them; "youden" takes the highest of tied optima, a
    sensitivity target the best specificity among the thresholds that meet it and, of
    those, the lowest threshold (the best sensitivity at that specificity); a specificity
    target the best sensitivity and, of those, the highest (the best specificity): never
    a point another threshold beats on both rates. A fixed threshold is returned as it is."""
    if not point.chooses:
        return float(point.target)
    score, positive = _binary(probs, labels, f"choosing the {point} threshold")
    if positive.all() or not positive.any():
        raise InputError(f"choosing the {point} threshold needs both classes, got only "
                         f"class {int(positive[0])} ({len(positive)} samples)")
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    # thresholds[0] is "nothing positive" (inf, or max + 1 in older scikit-learn): a
    # candidate only for a specificity target no real threshold meets
    if point.rule == "youden":
        # in counts, not rates: 0.7 − 0.1 < 0.9 − 0.3 in floats, and the lower of two tied
        # optima (tp, fp) = (7, 1), (9, 3) of 10 + 10 samples was taken
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        tp, fp = np.rint(tpr * n_pos), np.rint(fpr * n_neg)
        i = 1 + int(np.argmax((tp * n_neg - fp * n_pos)[1:]))
    elif point.rule == "sensitivity":
        # the best specificity meeting the target, then the lowest threshold keeping it:
        # the highest meeting one alone left out positives that cost no negative (the demo's
        # ERM: val sensitivity 0.905 at 0.0991, 0.911 at 0.0973, specificity 0.315 at both)
        first = int(np.flatnonzero(tpr >= point.target - 1e-12)[0])
        i = int(np.flatnonzero(fpr == fpr[first])[-1])
    else:
        # the best sensitivity meeting the target, then the highest threshold keeping it
        # (the demo's oracle: val specificity 0.902 at 0.7695, 0.909 at 0.7736, same
        # sensitivity 0.707)
        last = int(np.flatnonzero(1.0 - fpr >= point.target - 1e-12)[-1])
        i = int(np.flatnonzero(tpr == tpr[last])[0])
    if i == 0:
        # above every score: JSON has no inf, and the next float above the top score
        # classifies these samples exactly as inf does
        return float(np.nextafter(score.max(), np.inf))
    return float(thresholds[i])


def operating_point_metrics(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                            threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV (None where undefined: no positive, no
    negative, nothing called positive or negative) and the confusion counts ``tp``, ``fp``,
    ``tn``, ``fn`` when class 1 is called for ``p ≥ threshold``."""
    score, positive = _binary(probs, labels, "operating-point metrics")
    called = score >= threshold
    tp = int((called & positive).sum())
    fp = int((called & ~positive).sum())
    tn = int((~called & ~positive).sum())
    fn = int((~called & positive).sum())

    def share(a: int, b: int) -> float | None:
        return a / (a + b) if a + b else None

    return {"threshold": float(threshold), "sensitivity": share(tp, fn),
            "specificity": share(tn, fp), "ppv": share(tp, fp), "npv": share(tn, fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def operating_point_per_sample(probs: np.ndarray | torch.Tensor,
                               labels: np.ndarray | torch.Tensor,
                               threshold: float) -> dict[str, np.ndarray]:
    """Each operating-point rate as a mean of a per-sample value with NaN where a sample does
    not count (sensitivity: a positive's "called positive"; PPV: a called positive's "is
    positive"; …): the form `bootstrap_ci(per_sample=)` resamples."""
    score, positive = _binary(probs, labels, "operating-point metrics")
    called = score >= threshold
    nan = np.full(len(score), np.nan)
    return {"sensitivity": np.where(positive, called, nan),
            "specificity": np.where(~positive, ~called, nan),
            "ppv": np.where(called, positive, nan),
            "npv": np.where(~called, ~positive, nan)}


def operating_point_bootstrap(point: OperatingPoint, probs_val: np.ndarray | torch.Tensor,
                              labels_val: np.ndarray | torch.Tensor,
                              probs: np.ndarray | torch.Tensor,
                              labels: np.ndarray | torch.Tensor, n: int = 1000,
                              seed: int = 0, strata: np.ndarray | torch.Tensor | None = None,
                              ) -> dict[str, Any]:
    """Percentile 95 % intervals of the threshold ``point`` chooses on the val samples and
    of the sensitivity, specificity, PPV and NPV it gives on the test samples, with the
    threshold's own uncertainty in them: each of ``n`` resamples draws the val split and the
    test split independently (stratified by class, as `bootstrap_ci`), re-chooses the
    threshold by ``point`` on the val draw (`choose_threshold`) and applies it to the test
    draw. The test draws are `bootstrap_ci`'s for the same labels and seed (so the rates at
    the fixed threshold, ``ci95.operating_point``, come from the same test draws); the val
    draws come from the independent stream ``SeedSequence((seed, 1))``. ``strata``: the test
    samples' own classes when ``labels`` are a one-vs-rest problem's (`one_vs_rest`), so that
    the test draws are still `bootstrap_ci`'s of the split (default ``labels``).

    Returns ``{"ci95": {"threshold", "sensitivity", "specificity", "ppv", "npv": [lo, hi]
    or None}, "undefined": {name: count}}``: a resample where a rate's denominator is empty
    (nothing called positive: no PPV) is left out of that rate and counted, and a val draw
    the rule cannot choose on (one class only: impossible for stratified draws of a split
    holding both, kept as a guard) is left out of all and counted under "threshold".
    `InputError` for a fixed threshold (nothing is chosen: the test-only interval is
    already complete), more than two classes, or a val split lacking a class."""
    check_bootstrap(n, seed)
    if not point.chooses:
        raise InputError(f"operating point {point}: nothing is chosen, so there is no "
                         f"threshold uncertainty to resample")
    probs_val, labels_val = _checked(probs_val, labels_val)
    choose_threshold(point, probs_val, labels_val)  # a bad val split fails before the loop
    _binary(probs, labels, "operating-point metrics")  # two classes, or InputError
    probs, labels = _checked(probs, labels)
    # sorted by class as `bootstrap_ci` sorts them: the same seed then draws the same rows
    order = np.argsort(labels_val, kind="stable")
    probs_val, labels_val = probs_val[order], labels_val[order]
    # stratified by the split's own classes where given: class c against the rest sorts and
    # draws its classes in another order (positive 0: the rest first), so other draws
    strata = labels if strata is None else np.asarray(strata)
    if strata.shape != labels.shape:
        raise InputError(f"operating_point_bootstrap: strata has shape {strata.shape}, the "
                         f"labels {labels.shape}")
    order = np.argsort(strata, kind="stable")
    strata, labels = strata[order], labels[order]
    score, positive = probs[order, 1], labels == 1
    thresholds = np.full(int(n), np.nan)
    done = 0
    for w in _resample_counts(labels_val, n, np.random.SeedSequence((int(seed), 1))):
        for row in w.astype(np.int64):
            drawn = np.repeat(np.arange(len(row)), row)
            try:
                thresholds[done] = choose_threshold(point, probs_val[drawn], labels_val[drawn])
            except InputError:
                pass  # one class drawn: no threshold, NaN, counted below
            done += 1
    rates: dict[str, list[np.ndarray]] = {k: [] for k in ("sensitivity", "specificity",
                                                           "ppv", "npv")}
    done = 0
    for w in _resample_counts(strata, n, seed):
        t = thresholds[done:done + len(w)]
        done += len(w)
        called = score[None, :] >= t[:, None]  # NaN threshold: a row of False, masked below
        tp, fp = (w * (called & positive)).sum(1), (w * (called & ~positive)).sum(1)
        tn, fn = (w * (~called & ~positive)).sum(1), (w * (~called & positive)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, (a, b) in {"sensitivity": (tp, fn), "specificity": (tn, fp),
                                 "ppv": (tp, fp), "npv": (tn, fn)}.items():
                rates[name].append(np.where(np.isnan(t) | (a + b == 0), np.nan, a / (a + b)))
    ci: dict[str, list[float] | None] = {}
    undefined: dict[str, int] = {}
    for name, values in {"threshold": thresholds,
                         **{k: np.concatenate(v) for k, v in rates.items()}}.items():
        ci[name], missing = percentile_interval(values)
        if missing:
            undefined[name] = missing
    return {"ci95": ci, "undefined": undefined}


def _binary(probs: object, labels: object, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Class 1's probability and the positive flags, or `InputError` for more classes."""
    probs, labels = _checked(probs, labels)
    if probs.shape[1] != 2:
        raise InputError(f"{what} need a two-class model (a positive class), got "
                         f"{probs.shape[1]} classes")
    return probs[:, 1], labels == 1
