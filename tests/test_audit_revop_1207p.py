"""Audit revop: adversarial review of `evaluate --operating-point`, `predict --threshold`,
`--pick balanced` and the new bootstrap intervals (attributes, cam_empty_fraction)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import test_operating_point

from causalign.cli import main
from causalign.data.format import LesionDataset, balanced_pick
from causalign.engine.evaluate import evaluate_split
from causalign.engine.evaluate import predict as predict_split
from causalign.engine.trainer import load_run
from causalign.metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    operating_point_metrics,
)


def test_youden_takes_the_highest_of_exactly_tied_optima():
    """Ten positives and ten negatives where (tp, fp) = (7, 1) and (9, 3) give the same
    Youden index 3/5; in floats 0.7 − 0.1 = 0.6 < 0.9 − 0.3 = 0.6000000000000001, and the
    lower threshold (0.429, specificity 0.7) was chosen against the documented highest
    (0.618, specificity 0.9)."""
    seq = "PPPPPNPPNNPPNNNNNNNP"  # by descending score
    score = np.linspace(0.95, 0.05, len(seq))
    y = np.array([c == "P" for c in seq], dtype=int)
    probs = np.column_stack([1 - score, score])
    # reference in exact rationals over every score as a threshold
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    youden = {t: Fraction(int(((score >= t) & (y == 1)).sum()), n_pos)
              - Fraction(int(((score >= t) & (y == 0)).sum()), n_neg) for t in score}
    best = max(youden.values())
    expected = max(t for t, j in youden.items() if j == best)
    got = choose_threshold(OperatingPoint("youden"), probs, y)
    assert got == expected
    m = operating_point_metrics(probs, y, got)
    assert (m["tp"], m["fp"]) == (7, 1)


@pytest.mark.parametrize("seed", range(5))
def test_youden_ties_exact_on_random_tied_scores(seed):
    """Guard: on tied scores (rounded to 0.1) the chosen threshold is the highest one whose
    exact Youden index is maximal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(np.round(rng.uniform(0, 1, 60) * 10) / 10, 0, 1)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    youden = {t: Fraction(int(((p1 >= t) & (y == 1)).sum()), n_pos)
              - Fraction(int(((p1 >= t) & (y == 0)).sum()), n_neg) for t in set(p1.tolist())}
    best = max(youden.values())
    got = choose_threshold(OperatingPoint("youden"), np.column_stack([1 - p1, p1]), y)
    assert got == max(t for t, j in youden.items() if j == best)


def test_rule_string_keeps_the_target_given():
    """The JSON's `rule` is `str(point)`: with `:g` a fixed threshold 0.5526386145581799
    (one `evaluate` printed) was recorded as "threshold=0.552639", and sensitivity=0.9999999
    as "sensitivity=1", a target the threshold was not chosen for."""
    assert str(OperatingPoint.parse("threshold=0.5526386145581799")) == \
        "threshold=0.5526386145581799"
    assert str(OperatingPoint.parse("sensitivity=0.9999999")) == "sensitivity=0.9999999"
    # short targets keep their short form
    assert str(OperatingPoint.parse("sensitivity=0.90")) == "sensitivity=0.9"
    assert str(OperatingPoint.parse("specificity=1")) == "specificity=1"
    for text in ("threshold=0.5526386145581799", "sensitivity=0.9999999", "threshold=1e-07"):
        point = OperatingPoint.parse(text)
        assert OperatingPoint.parse(str(point)) == point


erm_run = test_operating_point.erm_run  # the fixture: a 2-epoch ERM on tiny_data


def test_bootstrap_undefined_rates_are_named_as_in_ci95(tiny_data, erm_run):
    """At a threshold calling one test image positive, resamples without it have no PPV:
    `bootstrap.undefined` counted them under the internal name "operating_point@ppv", which
    no `ci95` key matches; they are now under undefined.operating_point.ppv."""
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    p, y, _ = predict_split(model, method, ds, "cpu")
    t = float(p[:, 1].max())
    m = evaluate_split(model, method, ds, "cpu", threshold=t, bootstrap=200,
                       saliency="gradient", fractions=(0.1,))
    assert m["operating_point"]["tp"] + m["operating_point"]["fp"] == 1
    undefined = m["bootstrap"]["undefined"]
    assert not any("@" in k for k in undefined), undefined
    n_undefined = undefined["operating_point"]["ppv"]
    # a resample lacks the single called image with probability (1 − 1/n_class)^n_class
    assert 0 < n_undefined < 200
    assert set(undefined["operating_point"]) <= set(m["ci95"]["operating_point"])
    json.dumps(m, allow_nan=False)


def test_cli_fixed_threshold_json_is_strict_and_matches_a_hand_count(erm_run, tmp_path,
                                                                     capsys):
    """`evaluate --operating-point threshold=T --bootstrap 100` at T equal to a test
    probability (from `--predictions`): the counts are a hand count of p ≥ T from the CSV
    (the tied image called positive; guard), the JSON has no NaN/Infinity (guard), and the
    rule records T as given (it read "threshold=0.495276" for T = 0.4952762601064668)."""
    pred = tmp_path / "p.csv"
    main(["evaluate", str(erm_run), "--no-progress", "--predictions", str(pred)])
    rows = [line.split(",") for line in pred.read_text().splitlines()]
    head = rows[0]
    p1 = np.array([float(r[head.index("p_malignant")]) for r in rows[1:]])
    y = np.array([int(r[head.index("label")]) for r in rows[1:]])
    t = float(np.sort(p1)[len(p1) // 2])
    capsys.readouterr()
    main(["evaluate", str(erm_run), "--no-progress", "--bootstrap", "100",
          "--operating-point", f"threshold={t!r}"])
    out = json.loads(capsys.readouterr().out,
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    op = out["operating_point"]
    called = p1 >= t
    assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (
        int((called & (y == 1)).sum()), int((called & (y == 0)).sum()),
        int((~called & (y == 0)).sum()), int((~called & (y == 1)).sum()))
    assert op["rule"] == f"threshold={t!r}" and op["chosen_on"] is None


def test_balanced_pick_past_the_split_and_one_class():
    """Guard: a limit past the split's size keeps every sample once; a one-class split is
    taken in order; the classes alternate while both last."""
    assert sorted(balanced_pick([1, 1, 0, 1], 10)) == [0, 1, 2, 3]
    assert balanced_pick([1, 1, 1], 2) == [0, 1]
    assert balanced_pick([1, 1, 0, 1, 0], 4) == [2, 0, 4, 1]
