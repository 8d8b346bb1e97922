"""CCCE causal attribution: hand-computed cases, label models, missing evidence."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.causal.ccce import (
    MonotoneLogistic,
    SmoothedFrequency,
    attribution_report,
    causal_attribution,
    ccce_scores,
    subsets,
)
from causalign.data.synth import ATTRIBUTES, CAUSAL_WEIGHTS, label_threshold


class Table:
    """P(Y=1 | a) for two binary attributes, by hand."""

    P = {(0, 0): 0.1, (1, 0): 0.5, (0, 1): 0.3, (1, 1): 0.9}

    def prob(self, a):
        return np.array([self.P[(int(r[0]), int(r[1]))] for r in a])


def test_subsets_enumerates_by_size():
    assert subsets(3, 2) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)]
    assert len(subsets(6, 3)) == 6 + 15 + 20


def test_ccce_hand_computed_y1():
    # a = (1,1), y = 1: CCCE(S) = 1 − P(Y=1 | A_S=0, a_-S) / P(Y=1 | a)
    s = ccce_scores(Table(), np.array([[1, 1]]), np.array([1]), subsets(2, 2))[0]
    np.testing.assert_allclose(s, [1 - 0.3 / 0.9, 1 - 0.5 / 0.9, 1 - 0.1 / 0.9])
    res = causal_attribution(Table(), np.array([[1.0, 1.0]]), np.array([1]), max_size=2, tol=0)
    assert res.r.tolist() == [[True, True]]
    res1 = causal_attribution(Table(), np.array([[1.0, 1.0]]), np.array([1]), max_size=1, tol=0)
    assert res1.r.tolist() == [[True, False]]
    assert res1.score[0] == pytest.approx(2 / 3)


def test_ccce_hand_computed_y0():
    # a = (0,0), y = 0: CCCE(S) = 1 − P(Y=0 | A_S=1, a_-S) / P(Y=0 | a)
    s = ccce_scores(Table(), np.array([[0, 0]]), np.array([0]), subsets(2, 2))[0]
    np.testing.assert_allclose(s, [1 - 0.5 / 0.9, 1 - 0.7 / 0.9, 1 - 0.1 / 0.9])


def test_ccce_tie_prefers_smallest_subset():
    # a = (1,0), y = 1: switching the absent attribute off changes nothing, so {0} and {0,1}
    # tie at 1 − 0.1/0.5 = 0.8 and the smaller set is attributed.
    s = ccce_scores(Table(), np.array([[1, 0]]), np.array([1]), subsets(2, 2))[0]
    np.testing.assert_allclose(s, [0.8, 0.0, 0.8])
    res = causal_attribution(Table(), np.array([[1.0, 0.0]]), np.array([1]), max_size=2, tol=0)
    assert res.r.tolist() == [[True, False]]


def test_missing_evidence_gets_no_attribution():
    a = np.array([[1.0, np.nan], [1.0, 1.0]])
    res = causal_attribution(Table(), a, np.array([1, 1]), max_size=2, tol=0)
    assert res.known.tolist() == [False, True]
    assert not res.r[0].any() and res.r[1].all()


def test_monotone_logistic_weights_nonnegative_and_ordered():
    rng = np.random.default_rng(0)
    a = (rng.random((4000, 3)) < 0.5).astype(float)
    z = 2.0 * a[:, 0] + 0.7 * a[:, 1] - 1.0 * a[:, 2] - 1.0
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    m = MonotoneLogistic(l1=0.0).fit(a, y)
    assert m.weights[2] == 0.0  # negative effect clamped to exactly zero
    assert m.weights[0] == pytest.approx(2.0, abs=0.25)
    assert m.weights[1] == pytest.approx(0.7, abs=0.25)
    assert np.all(m.weights >= 0)


def test_smoothed_frequency_hand_computed():
    a = np.array([[0], [0], [1], [1], [1]])
    y = np.array([0, 1, 1, 1, 0])
    m = SmoothedFrequency(smoothing=1.0).fit(a, y)
    np.testing.assert_allclose(m.prob(np.array([[0], [1]])),
                               [(1 + 0.6) / (2 + 1), (2 + 0.6) / (3 + 1)])
    m2 = SmoothedFrequency(smoothing=1.0).fit(np.array([[0, 0]]), np.array([1]))
    assert m2.prob(np.array([[1, 1]]))[0] == pytest.approx(1.0)  # unseen cell → prior


def test_report_on_synthetic_rule_recovers_causal_attributes():
    # The benchmark's own label rule, without images: calcification (weight 0) must (almost)
    # never be attributed, and the attributed sets hold truly causal attributes only.
    rng = np.random.default_rng(1)
    w = np.array(CAUSAL_WEIGHTS)
    a = (rng.random((1500, len(w))) < 0.5).astype(float)
    y = (a @ w + rng.normal(0, 0.3, len(a)) > label_threshold()).astype(int)
    truth = {"causal_weights": dict(zip(ATTRIBUTES, CAUSAL_WEIGHTS, strict=True)),
             "threshold": label_threshold(), "noise": 0.3}
    rep = attribution_report(a, y, list(ATTRIBUTES), truth=truth, tol=0.01)
    assert rep["causal_frequency"]["calcification"] < 0.02
    assert rep["fraction_subset_only_truly_causal"] > 0.95
    assert rep["fitted_weights"]["spiculation"] > rep["fitted_weights"]["subtlety"]
    assert rep["causal_frequency"]["spiculation"] > rep["causal_frequency"]["subtlety"]


def test_dataset_report_follows_a_moved_label_rule(tmp_path):
    """`data synth --weights` moves the label's causes into the lesion's interior: CCCE on the
    written dataset attributes them there, and never the default rule's spiculation."""
    from causalign.causal.ccce import dataset_attribution_report
    from causalign.data.synth import SynthConfig, generate

    weights = {"calcification": 2.0, "texture": 1.5, "subtlety": 1.0}
    generate(tmp_path / "d", SynthConfig(n_train=600, n_val=2, n_test=2, size=32, seed=3,
                                         causal_weights=weights))
    rep = dataset_attribution_report(tmp_path / "d", tol=0.01)
    freq = rep["causal_frequency"]
    for name in ("spiculation", "margin", "lobulation"):
        assert freq[name] < 0.02, (name, freq)
    assert freq["calcification"] > freq["subtlety"] > 0.1, freq
    assert rep["fraction_subset_only_truly_causal"] > 0.95


class NearTable:
    """Nearly deterministic P(Y=1 | a): every subset of a = (1, 1), y = 1 scores > 0.99."""

    P = {(0, 0): 1e-4, (1, 0): 2e-3, (0, 1): 5e-3, (1, 1): 0.999}

    def prob(self, a):
        return np.array([self.P[(int(r[0]), int(r[1]))] for r in a])


def test_api_default_tol_is_the_documented_one():
    """The API's default tol was 1e-6 while the CLI and hier-align (and the docs) use 0.01: a
    caller of causal_attribution / attribution_report got other subsets for the same data."""
    a, y = np.array([[1.0, 1.0]]), np.array([1])
    # CCCE({0}) 0.995, CCCE({1}) 0.998, CCCE({0, 1}) 0.9999: within 0.01, a single attribute
    res = causal_attribution(NearTable(), a, y, max_size=2)
    assert res.r.tolist() == [[False, True]]
    rng = np.random.default_rng(0)
    aa = rng.integers(0, 2, (40, 3)).astype(float)
    yy = (aa[:, 0] + aa[:, 1] >= 1).astype(int)
    rep = attribution_report(aa, yy, ["a", "b", "c"])
    assert rep == attribution_report(aa, yy, ["a", "b", "c"], tol=0.01)
