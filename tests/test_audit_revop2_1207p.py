"""Adversarial review of `evaluate --calibrate temperature` and `compare --operating-point`
(revop2): numbers checked against independent computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.special import log_softmax

from causalign.metrics.calibration import T_MIN, fit_temperature


def _fit(probs: np.ndarray, y: np.ndarray, **kw) -> tuple[float, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit_temperature(probs, y, **kw)
    return t, [str(w.message) for w in caught]


@pytest.mark.parametrize("p_wrong", [0.0, 1e-9, 0.4])
def test_separable_val_split_fits_the_lower_bound_and_warns(p_wrong):
    """A val split whose every label has the largest probability: each sample's NLL falls
    as T falls, so the fit belongs at T_MIN with the documented "separates" warning. The
    NLL underflows to exactly 0 once margin / T > ~37, and Brent stopped anywhere on that
    flat floor without a warning: T 2.97 (softening!) for one-hot rows, 0.088 for 1e-9,
    0.011 for 0.6/0.4 rows."""
    row = [1 - p_wrong, p_wrong]
    probs = np.array([row, row[::-1]] * 8)
    y = np.array([0, 1] * 8)
    t, msgs = _fit(probs, y)
    assert t == pytest.approx(T_MIN)
    assert len(msgs) == 1 and "separates" in msgs[0]
    # independent: the NLL is non-increasing as T falls over the whole search range
    logp = np.log(np.maximum(probs, 1e-300))
    nll = [-log_softmax(logp / s, axis=1)[np.arange(16), y].mean()
           for s in np.geomspace(100, T_MIN, 50)]
    assert all(b <= a for a, b in zip(nll, nll[1:], strict=False))


def test_separable_logits_with_three_classes_fit_the_lower_bound():
    """The same from logits of three classes (margins 3 and 5): T_MIN, warned."""
    z = np.array([[5.0, 2.0, 0.0], [0.0, 5.0, 0.0], [1.0, 0.0, 6.0]] * 3)
    t, msgs = _fit(z, np.array([0, 1, 2] * 3), logits=True)
    assert t == pytest.approx(T_MIN) and len(msgs) == 1


def test_one_misranked_sample_keeps_an_interior_fit():
    """Guard: one sample whose label is not its argmax makes T → 0 blow its NLL up: the
    fit is interior (checked against a grid of the NLL), and no warning."""
    probs = np.array([[0.9, 0.1], [0.1, 0.9]] * 8 + [[0.7, 0.3]])
    y = np.array([0, 1] * 8 + [1])
    t, msgs = _fit(probs, y)
    logp = np.log(probs)
    grid = np.geomspace(0.05, 20, 20001)
    nll = [-log_softmax(logp / s, axis=1)[np.arange(len(y)), y].mean() for s in grid]
    assert not msgs
    assert math.log(t) == pytest.approx(math.log(grid[int(np.argmin(nll))]), abs=1e-3)
