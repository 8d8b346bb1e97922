"""Post-hoc calibration: temperature scaling (Guo et al. 2017).

One scalar T > 0, fitted on one split (validation) by minimising the negative log-likelihood
of softmax(logits / T) and applied unchanged to another (test). Dividing every logit by the
same positive T keeps each row's order, so the argmax (accuracy, sensitivity, specificity)
and, for two classes, the ranking of class 1's probability (AUC) are unchanged; only the
confidence, hence NLL, Brier score and ECE, moves.

Works from probabilities as well as logits: log p = z − logsumexp(z) differs from the logits
z by a per-row constant, and softmax is shift-invariant, so softmax(log p / T) equals
softmax(z / T).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from ..errors import InputError
from .classification import _checked, _numpy
from .operating_point import check_probability

# the methods `evaluate --calibrate` accepts
CALIBRATION_METHODS = ("temperature",)

# T is searched in [T_MIN, T_MAX] (on log T): beyond them the probabilities are one-hot or
# uniform to float64 precision, and a fit that lands on a bound says the split is separable
# (T → 0) or carries no signal (T → ∞)
T_MIN, T_MAX = 1e-2, 1e2

# The floor of a probability before its log: the smallest normal float64. A float64 softmax
# gives exactly 0 for a logit margin above ~745; the floor reads that as a margin of ~708
# (log 2.2e-308), a lower bound of the true one, finite so that 0/T stays defined. Also
# lifts the tiny negatives a half-precision softmax can give.
PROB_FLOOR = float(np.finfo(np.float64).tiny)


def log_probabilities(probs_or_logits: np.ndarray | torch.Tensor,
                      labels: np.ndarray | torch.Tensor, logits: bool = False,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-probabilities (N, C) and int64 labels (N,), checked as
    `classification_metrics` checks its inputs (``logits``: the scores are logits, any finite
    values, taken through log-softmax; else class probabilities, floored at `PROB_FLOOR`)."""
    if logits:
        z = np.asarray(_numpy(probs_or_logits), dtype=np.float64)
        if z.ndim != 2 or not np.isfinite(z).all():
            raise InputError(f"logits must be a finite (N, classes) array, got shape {z.shape}"
                             f"{'' if z.ndim != 2 else ' with NaN/inf values'}")
        # a uniform row passes `_checked` as probabilities; only the labels are checked here
        _, y = _checked(np.full(z.shape, 1.0 / max(z.shape[1], 1)), labels)
        return log_softmax(z, axis=1), y
    p, y = _checked(probs_or_logits, labels)
    return np.log(np.maximum(p, PROB_FLOOR)), y


def _nll(logp: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean NLL of softmax(logp / t) at the labels."""
    return float(-log_softmax(logp / t, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(probs_or_logits: np.ndarray | torch.Tensor,
                    labels: np.ndarray | torch.Tensor, logits: bool = False) -> float:
    """The temperature T > 0 that minimises the mean negative log-likelihood of
    softmax(log p / T) (equally softmax(logits / T)) at ``labels``: T > 1 softens an
    over-confident model, T < 1 sharpens an under-confident one.

    ``probs_or_logits`` (N, C): class probabilities (as `classification_metrics` takes them;
    exact zeros floored at `PROB_FLOOR`, see there) or, with ``logits=True``, logits.
    The NLL is convex in 1/T, so unimodal in log T: bounded Brent on log T in
    [`T_MIN`, `T_MAX`] (to ~1e-9 in log T). A fit at a bound (a split the model separates
    perfectly drives T → 0) warns. `InputError` for an empty split or one whose labels hold a
    single class (nothing to calibrate against: any sharpening of a correct argmax lowers
    the NLL)."""
    logp, y = log_probabilities(probs_or_logits, labels, logits)
    present = np.unique(y)
    if len(present) < 2:
        raise InputError(f"temperature scaling needs labels of at least two classes; the "
                         f"{len(y)} labels are all class {int(present[0])}")
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    # every label at its row's maximum (and not all rows flat): each sample's NLL falls as T
    # falls, so the optimum is T → 0. Decided here, not by the search: the NLL underflows to
    # exactly 0 once margin / T > ~37, and Brent stopped anywhere on that flat floor, unwarned
    # (T 2.97 for one-hot rows, 0.088 for margins of 20.7)
    margin = logp[np.arange(len(y)), y][:, None] - logp
    if (margin >= 0).all() and (margin > 0).any():
        warnings.warn(f"temperature scaling: the fitted T lies at the search bound {T_MIN:g} "
                      f"(the NLL keeps falling past it: a split the model separates)",
                      stacklevel=2)
        return T_MIN
    res = minimize_scalar(lambda s: _nll(logp, y, math.exp(s)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-9})
    s = float(res.x)
    # Brent's bounded search never evaluates the bounds themselves: compare them too
    best = min((s, lo, hi), key=lambda v: _nll(logp, y, math.exp(v)))
    if best != s or min(s - lo, hi - s) < 1e-6:
        warnings.warn(f"temperature scaling: the fitted T lies at the search bound "
                      f"{math.exp(best):g} (the NLL keeps falling past it: "
                      f"{'a split the model separates' if best - lo < 1e-6 else 'no signal'})",
                      stacklevel=2)
    return math.exp(best)


def apply_temperature(probs: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(log p / T) of class probabilities ``probs`` (N, C), float64 (N, C); zeros
    floored at `PROB_FLOOR` first (T = 1: ``probs`` unchanged, as float64). `InputError`
    unless ``temperature`` is finite and > 0."""
    check_temperature(temperature)
    p = np.asarray(_numpy(probs), dtype=np.float64)
    if p.ndim != 2:
        raise InputError(f"probs must be (N, classes), got shape {p.shape}")
    if temperature == 1:
        # the identity: the log-softmax round trip moved the last digits (1 ulp), so
        # `predict --temperature 1` differed from no flag
        return p.copy()
    logp = np.log(np.maximum(p, PROB_FLOOR))
    # shifted by each row's maximum first (softmax is shift-invariant): a tiny T (1e-320,
    # accepted as finite and > 0) overflowed log p / T to -inf in every cell, giving NaN;
    # shifted, the maximum stays 0 and the rest go to -inf: the one-hot limit T -> 0
    with np.errstate(over="ignore"):  # the overflow to -inf is that limit, not an error
        shifted = (logp - logp.max(axis=1, keepdims=True)) / temperature
    return np.exp(log_softmax(shifted, axis=1))


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """The threshold on class 1's temperature-scaled probability that calls the same samples
    as ``threshold`` on its uncalibrated one (two classes). softmax(log p / T)₁ is
    sigmoid(logit(p₁) / T), increasing in p₁, so p₁ ≥ t ⇔ q₁ ≥ this (up to float rounding
    of a score equal to t): the row (1 − t, t) scaled as `apply_temperature` scales a
    sample's (a score of exactly 0 or 1 is floored as there, so 0 and 1 map to where those
    scores go, not to 0 and 1)."""
    check_probability(threshold)
    check_temperature(temperature)
    return float(apply_temperature(np.array([[1.0 - threshold, threshold]]), temperature)[0, 1])


def check_temperature(temperature: float) -> None:
    """`InputError` unless ``temperature`` is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a finite number > 0, got {temperature!r}")


def negative_log_likelihood(probs: np.ndarray | torch.Tensor,
                            labels: np.ndarray | torch.Tensor) -> float:
    """Mean −log p[label] (the cross-entropy of the probabilities), zeros floored at
    `PROB_FLOOR` (a certain wrong answer costs ~708, not inf); inputs as
    `classification_metrics`."""
    logp, y = log_probabilities(probs, labels)
    return _nll(logp, y, 1.0)


def refuse_calibrated_threshold(option: str, n_classes: int, advice: str) -> None:
    """`InputError` for a threshold with temperature scaling on more than two classes: the
    calibrated p_c (softmax(log p / T)_c) depends on every class's p, not on p_c alone, so no
    one threshold on it calls the images the uncalibrated one calls (two classes:
    sigmoid(logit(p_c) / T), increasing in p_c, hence `calibrated_threshold`). ``option``
    names the flags at fault, ``advice`` what to do instead."""
    raise InputError(f"{option} on a {n_classes}-class run: the calibrated probability of a "
                     f"class is not a function of its own uncalibrated one, so no "
                     f"threshold_calibrated exists; {advice}")
