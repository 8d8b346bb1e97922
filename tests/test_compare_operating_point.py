"""`causalign compare RUN_A RUN_B --operating-point RULE`: both runs' sensitivity and
specificity at a threshold (each chosen on its own predictions_val.csv, or one fixed T), with
McNemar's test on the positives and on the negatives (`paired_operating_point`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_audit_compare_1207f import _error_line, _write_csv

from causalign.cli import main
from causalign.metrics import mcnemar_test, paired_operating_point
from causalign.metrics.operating_point import OperatingPoint, choose_threshold


def _two(p1: np.ndarray) -> np.ndarray:
    """(N, 2) probabilities from class 1's."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1.0 - p1, p1], axis=1)


def _run(folder, rng, n_val=40, n_test=30, shift=0.3, val=True):
    """A run folder with hand-made predictions_val.csv / predictions_test.csv (the same
    test ids and labels in every run)."""
    y_test = np.arange(n_test) % 2
    ids = [f"test_{i:05d}" for i in range(n_test)]
    p_test = np.clip(0.5 + shift * (y_test - 0.5) + rng.normal(0, 0.25, n_test), 0.001, 0.999)
    _write_csv(folder / "predictions_test.csv", ids, y_test, _two(p_test))
    # one dataset for every run (compare reads config.yaml's data_content_digest)
    (folder / "config.yaml").write_text("method: erm\ndata_content_digest: 0123456789abcdef\n")
    y_val = np.arange(n_val) % 2
    p_val = np.clip(0.5 + shift * (y_val - 0.5) + rng.normal(0, 0.25, n_val), 0.001, 0.999)
    if val:
        _write_csv(folder / "predictions_val.csv", [f"val_{i:05d}" for i in range(n_val)],
                   y_val, _two(p_val))
    return _two(p_val), y_val, _two(p_test), y_test


def _compare(capsys, *argv):
    capsys.readouterr()
    rc = main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    assert rc in (0, None), captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("rule", ["sensitivity=0.9", "specificity=0.8", "youden"])
def test_thresholds_are_chosen_on_each_runs_own_val_csv(tmp_path, capsys, rule):
    rng = np.random.default_rng(4)
    pv_a, yv_a, pt_a, y = _run(tmp_path / "a", rng, shift=0.4)
    pv_b, yv_b, pt_b, _ = _run(tmp_path / "b", rng, shift=0.1)
    r = _compare(capsys, tmp_path / "a", tmp_path / "b", "--operating-point", rule)
    op = r["operating_point"]
    point = OperatingPoint.parse(rule)
    ta, tb = choose_threshold(point, pv_a, yv_a), choose_threshold(point, pv_b, yv_b)
    assert ta != tb  # each run its own threshold, not one shared
    assert (op["threshold_a"], op["threshold_b"]) == (ta, tb)
    assert op["rule"] == rule and op["chosen_on"] == "val" and "note" not in op
    pos, neg = y == 1, y == 0
    assert op["sensitivity_a"] == pytest.approx(np.mean(pt_a[pos, 1] >= ta))
    assert op["specificity_b"] == pytest.approx(np.mean(pt_b[neg, 1] < tb))
    assert op["mcnemar_sensitivity"]["accuracy_a"] == op["sensitivity_a"]
    assert op["mcnemar_specificity"]["accuracy_b"] == op["specificity_b"]
    # everything else as without the option
    plain = _compare(capsys, tmp_path / "a", tmp_path / "b")
    assert "operating_point" not in plain
    r.pop("operating_point")
    assert r == plain
    # --split val reports on the split the thresholds were chosen on, and says so
    on_val = _compare(capsys, tmp_path / "a", tmp_path / "b", "--split", "val",
                      "--operating-point", rule)["operating_point"]
    assert "optimistic" in on_val["note"]


def test_mcnemar_counts_against_a_hand_count(tmp_path, capsys):
    """Eight positives and six negatives, thresholds 0.5 (A) and 0.3 (B) written out."""
    # positives:   A calls 1 at ≥ 0.5, B at ≥ 0.3
    pos_p = [(0.9, 0.9),   # both called positive
             (0.6, 0.2),   # A only
             (0.7, 0.1),   # A only
             (0.4, 0.35),  # B only
             (0.45, 0.8),  # B only
             (0.2, 0.5),   # B only
             (0.1, 0.1),   # neither
             (0.55, 0.3)]  # both (B exactly at its threshold: p ≥ T)
    # negatives: "correct" = called negative (A: p < 0.5, B: p < 0.3)
    neg_p = [(0.1, 0.1),   # both correct
             (0.2, 0.4),   # A only correct
             (0.6, 0.1),   # B only correct
             (0.7, 0.2),   # B only correct
             (0.8, 0.9),   # both wrong
             (0.3, 0.29)]  # both correct
    pa = np.array([p for p, _ in pos_p + neg_p])
    pb = np.array([p for _, p in pos_p + neg_p])
    y = np.array([1] * 8 + [0] * 6)
    ids = [f"s{i}" for i in range(14)]
    _write_csv(tmp_path / "a.csv", ids, y, _two(pa))
    _write_csv(tmp_path / "b.csv", ids, y, _two(pb))
    op = _compare(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--operating-point",
                  "threshold=0.5")["operating_point"]
    assert op["threshold_a"] == op["threshold_b"] == 0.5 and op["chosen_on"] is None
    # one threshold for both: at 0.5 A calls positives 1, 2, 3, 8 and B 1, 5, 6
    s = op["mcnemar_sensitivity"]
    assert (s["both_correct"], s["a_only_correct"], s["b_only_correct"], s["both_wrong"]) == (
        1, 3, 2, 2)
    assert op["sensitivity_a"] == 4 / 8 and op["sensitivity_b"] == 3 / 8
    # the two thresholds apart (Python: the CLI uses one T for CSV files)
    r = paired_operating_point(_two(pa), _two(pb), y, 0.5, 0.3)
    s, t = r["mcnemar_sensitivity"], r["mcnemar_specificity"]
    assert (s["both_correct"], s["a_only_correct"], s["b_only_correct"], s["both_wrong"]) == (
        2, 2, 3, 1)
    assert (t["both_correct"], t["a_only_correct"], t["b_only_correct"], t["both_wrong"]) == (
        2, 1, 2, 1)
    assert (r["sensitivity_a"], r["sensitivity_b"]) == (4 / 8, 5 / 8)
    assert (r["specificity_a"], r["specificity_b"]) == (3 / 6, 4 / 6)
    # 5 discordant positives: exact binomial, 2·P[Bin(5, ½) ≤ 2] = 1
    assert s["p_value"] == 1.0 and s["method"].startswith("exact")
    assert s == mcnemar_test((pa[:8] >= 0.5).astype(int), (pb[:8] >= 0.3).astype(int), y[:8])
    # a split without negatives: that test says why, the other stands
    one_class = paired_operating_point(_two(pa[:8]), _two(pb[:8]), y[:8], 0.5, 0.3)
    assert "error" in one_class["mcnemar_specificity"]
    assert one_class["specificity_a"] is None
    assert one_class["mcnemar_sensitivity"] == s


def test_fixed_threshold_on_two_csv_files(tmp_path, capsys):
    rng = np.random.default_rng(7)
    _, _, pt_a, y = _run(tmp_path / "a", rng, val=False)
    _, _, pt_b, _ = _run(tmp_path / "b", rng, val=False)
    op = _compare(capsys, tmp_path / "a" / "predictions_test.csv",
                  tmp_path / "b" / "predictions_test.csv", "--operating-point",
                  "threshold=0.42")["operating_point"]
    assert op["threshold_a"] == op["threshold_b"] == 0.42 and op["chosen_on"] is None
    want = paired_operating_point(pt_a, pt_b, y, 0.42, 0.42)
    assert {k: op[k] for k in want} == want
    # run folders without predictions_val.csv: a fixed threshold needs none
    folders = _compare(capsys, tmp_path / "a", tmp_path / "b", "--operating-point",
                       "threshold=0.42")["operating_point"]
    assert folders == op


def test_refusals_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    _run(tmp_path / "a", rng)
    _run(tmp_path / "noval", rng, val=False)
    three = rng.dirichlet([1, 1, 1], 12)
    ids = [f"s{i}" for i in range(12)]
    _write_csv(tmp_path / "x.csv", ids, np.arange(12) % 3, three, ("x", "y", "z"))
    _write_csv(tmp_path / "y.csv", ids, np.arange(12) % 3, three[::-1], ("x", "y", "z"))
    line = _error_line(capsys, ["compare", str(tmp_path / "x.csv"), str(tmp_path / "y.csv"),
                                "--operating-point", "threshold=0.5"])
    assert line.startswith("error:") and "3-class run" in line and "--positive" in line
    csv_a = tmp_path / "a" / "predictions_test.csv"
    line = _error_line(capsys, ["compare", str(csv_a), str(tmp_path / "a"),
                                "--operating-point", "sensitivity=0.9"])
    assert line.startswith("error:") and "give threshold=T" in line and str(csv_a) in line
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "noval"),
                                "--operating-point", "youden"])
    assert line.startswith("error:") and "predictions_val.csv" in line
    assert str(tmp_path / "noval") in line and "causalign evaluate" in line
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "a"),
                                "--operating-point", "sensitivity=1.5"])
    assert line.startswith("error: --operating-point") and "[0, 1]" in line
