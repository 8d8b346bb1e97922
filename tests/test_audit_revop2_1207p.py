"""Adversarial review of `evaluate --calibrate temperature` and `compare --operating-point`
(revop2): numbers checked against independent computations."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.special import log_softmax
from scipy.stats import binomtest

from causalign.cli import main
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


def _write_csv(path, labels, p1) -> None:
    rows = ["id,site,label,predicted,p_benign,p_malignant"]
    for i, (y, p) in enumerate(zip(labels, p1, strict=True)):
        rows.append(f"s{i:02d},0,{y},{int(p > 0.5)},{float(1 - p)!r},{float(p)!r}")
    path.write_text("\n".join(rows) + "\n")


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_compare_fixed_threshold_on_csvs_counts_ties_as_called(tmp_path, capsys):
    """Guard: `compare A.csv B.csv --operating-point threshold=0.3 --out --roc`: scores
    exactly at 0.3 are called positive (p ≥ T), the rates and McNemar tables equal a hand
    count, the p-values scipy's exact binomial, and the JSON (stdout and --out) is strict."""
    rng = np.random.default_rng(5)
    y = np.array([1] * 12 + [0] * 14)
    pa = rng.choice([0.1, 0.3, 0.7], size=len(y))  # many exact ties at T
    pb = rng.choice([0.2, 0.3, 0.9], size=len(y))
    _write_csv(tmp_path / "a.csv", y, pa)
    _write_csv(tmp_path / "b.csv", y, pb)
    capsys.readouterr()
    rc = main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
               "--operating-point", "threshold=0.3", "--out", str(tmp_path / "c.json"),
               "--roc", str(tmp_path / "roc.png")])
    cap = capsys.readouterr()
    out = cap.out
    assert rc in (0, None), cap.err
    got = _strict(out)["operating_point"]
    assert _strict((tmp_path / "c.json").read_text())["operating_point"] == got
    assert (tmp_path / "roc.png").stat().st_size > 0
    ca, cb, pos = pa >= 0.3, pb >= 0.3, y == 1
    assert got["threshold_a"] == got["threshold_b"] == 0.3 and got["chosen_on"] is None
    assert got["sensitivity_a"] == ca[pos].mean() and got["sensitivity_b"] == cb[pos].mean()
    assert got["specificity_a"] == (~ca[~pos]).mean()
    assert got["specificity_b"] == (~cb[~pos]).mean()
    for key, keep, ok_a, ok_b in (("mcnemar_sensitivity", pos, ca, cb),
                                  ("mcnemar_specificity", ~pos, ~ca, ~cb)):
        b = int((ok_a[keep] & ~ok_b[keep]).sum())
        c = int((~ok_a[keep] & ok_b[keep]).sum())
        assert (got[key]["a_only_correct"], got[key]["b_only_correct"]) == (b, c)
        want = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert got[key]["p_value"] == pytest.approx(min(1.0, want), rel=1e-9)


def test_compare_chosen_threshold_refuses_a_one_class_val_csv_in_one_line(tmp_path, capsys):
    """Guard: a run folder whose predictions_val.csv holds no positive: `compare
    --operating-point youden` exits 2 with one `error:` line naming the file, no traceback."""
    y = np.array([0, 1] * 6)
    for name in ("ra", "rb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("method: erm\n")  # a run folder
        _write_csv(tmp_path / name / "predictions_test.csv", y, np.linspace(0.1, 0.9, 12))
    _write_csv(tmp_path / "ra" / "predictions_val.csv", [1, 0, 1, 0], [0.8, 0.2, 0.6, 0.4])
    _write_csv(tmp_path / "rb" / "predictions_val.csv", [0, 0, 0], [0.8, 0.2, 0.6])
    capsys.readouterr()
    rc = main(["compare", str(tmp_path / "ra"), str(tmp_path / "rb"),
               "--operating-point", "youden"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), cap.err
    assert "predictions_val.csv" in lines[0] and "Traceback" not in cap.err


def _val_rates(p1: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    called = p1 >= t
    return called[y == 1].mean(), (~called[y == 0]).mean()


def test_target_rules_pick_no_point_beaten_on_both_rates():
    """sensitivity=S / specificity=S on the val split: no other threshold has both rates
    at least as good and one better (brute force over every score). The highest threshold
    meeting a sensitivity left out positives that cost no negative, and the lowest meeting
    a specificity gave up negatives for no positive: the demo's oracle at specificity=0.9
    took 0.7695 (val sens 0.707, spec 0.902) over 0.7736 (0.707, 0.909)."""
    from causalign.metrics.operating_point import OperatingPoint, choose_threshold

    # scores high → low: pos pos neg pos pos neg neg pos neg neg (5 positives, 5 negatives)
    p1 = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5])
    y = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    probs = np.column_stack([1 - p1, p1])
    # sensitivity ≥ 0.5 is first met at 0.8 (3/5, one negative above); 0.75 adds a
    # positive and no negative (4/5, specificity 0.8 at both): 0.75 (0.8 before)
    assert choose_threshold(OperatingPoint.parse("sensitivity=0.5"), probs, y) == 0.75
    # specificity ≥ 0.6: 0.7 is the lowest meeting it (spec 0.6, sens 1); 0.75 has sens 1
    # too and spec 0.8: 0.75 (0.7 before)
    assert choose_threshold(OperatingPoint.parse("specificity=0.6"), probs, y) == 0.75
    rng = np.random.default_rng(11)
    for _ in range(30):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p1 = np.clip(np.round((rng.normal(0.4, 0.2, 40) + 0.25 * y) * 20) / 20, 0, 1)
        probs = np.column_stack([1 - p1, p1])
        for rule in ("sensitivity=0.8", "specificity=0.8", "sensitivity=0.5"):
            t = choose_threshold(OperatingPoint.parse(rule), probs, y)
            se, sp = _val_rates(p1, y, t)
            for u in np.unique(p1):
                a, b = _val_rates(p1, y, u)
                assert not (a >= se and b >= sp and (a > se or b > sp)), (rule, t, u)
