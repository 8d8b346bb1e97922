"""Operating points (`evaluate --operating-point`, `causalign.metrics.operating_point`):
sensitivity and specificity at a threshold chosen on validation, where before they were
argmax's only."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix
from test_bootstrap_calibration_localisation import _probs
from test_multiclass import _write_three_class

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.engine import TrainConfig, train
from causalign.engine.evaluate import evaluate_split
from causalign.engine.evaluate import predict as predict_split
from causalign.engine.trainer import load_run
from causalign.errors import InputError
from causalign.metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    operating_point_metrics,
    operating_point_per_sample,
)


def _tied_probs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities rounded to 0.05, so many samples tie on a score."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(np.round((rng.normal(0.4, 0.2, n) + 0.25 * y) * 20) / 20, 0, 1)
    return np.column_stack([1 - p1, p1]), y


def _rates(p1: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    called = p1 >= t
    return called[y == 1].mean(), (~called[y == 0]).mean()


def _reference(point: OperatingPoint, p1: np.ndarray, y: np.ndarray) -> float:
    """Brute force over every score as a threshold (and "above all"), with the documented
    tie rules: Youden's highest optimal threshold; a sensitivity target's best specificity,
    then its lowest threshold; a specificity target's best sensitivity, then its highest."""
    above = np.nextafter(p1.max(), np.inf)
    candidates = sorted({*p1.tolist(), above}, reverse=True)
    table = [(t, *_rates(p1, y, t)) for t in candidates]
    if point.rule == "youden":
        best = max(s + c - 1 for t, s, c in table if t != above)
        return max(t for t, s, c in table if t != above and s + c - 1 >= best - 1e-12)
    if point.rule == "sensitivity":
        # the best specificity meeting the target, then the lowest such threshold
        best = max(c for t, s, c in table if s >= point.target - 1e-12)
        return min(t for t, s, c in table if s >= point.target - 1e-12 and c == best)
    # the best sensitivity meeting the target, then the highest such threshold
    best = max(s for t, s, c in table if c >= point.target - 1e-12)
    return max(t for t, s, c in table if c >= point.target - 1e-12 and s == best)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["youden", "sensitivity=0.9", "sensitivity=0.5",
                                  "specificity=0.95", "specificity=0.7", "sensitivity=1",
                                  "specificity=1"])
def test_chosen_threshold_matches_a_brute_force_search(rule, seed):
    probs, y = _tied_probs(150, seed)
    point = OperatingPoint.parse(rule)
    got = choose_threshold(point, probs, y)
    assert got == pytest.approx(_reference(point, probs[:, 1], y), abs=1e-15)
    sens, spec = _rates(probs[:, 1], y, got)
    # the reported rates call the threshold's own (tied) samples positive, as chosen
    m = operating_point_metrics(probs, y, got)
    assert (m["sensitivity"], m["specificity"]) == (sens, spec)
    if point.rule == "sensitivity":
        assert sens >= point.target
    if point.rule == "specificity":
        assert spec >= point.target


def test_a_specificity_no_score_meets_calls_nothing_positive():
    """The top-scored sample is a negative: specificity 1 needs a threshold above every
    score (a finite one, so metrics.json stays JSON)."""
    probs = np.array([[0.1, 0.9], [0.3, 0.7], [0.6, 0.4], [0.8, 0.2]])
    y = np.array([0, 1, 1, 0])
    t = choose_threshold(OperatingPoint.parse("specificity=1"), probs, y)
    assert math.isfinite(t) and t > 0.9
    m = operating_point_metrics(probs, y, t)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 2, 2)
    assert m["ppv"] is None and m["specificity"] == 1.0 and m["sensitivity"] == 0.0


def test_fixed_threshold_is_not_chosen_and_metrics_match_sklearn():
    probs, y = _probs(200, 2, seed=5)
    point = OperatingPoint.parse("threshold=0.3")
    assert not point.chooses and choose_threshold(point, probs[:0], y[:0]) == 0.3
    m = operating_point_metrics(probs, y, 0.3)
    tn, fp, fn, tp = confusion_matrix(y, probs[:, 1] >= 0.3).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["sensitivity"] == tp / (tp + fn) and m["specificity"] == tn / (tn + fp)
    assert m["ppv"] == tp / (tp + fp) and m["npv"] == tn / (tn + fn)
    # each rate is the mean of its per-sample values over the samples that count, also
    # at a threshold many samples tie on
    for p, labels, t in ((probs, y, 0.3), (*_tied_probs(150, 0), 0.45)):
        m = operating_point_metrics(p, labels, t)
        for name, values in operating_point_per_sample(p, labels, t).items():
            assert np.nanmean(values) == pytest.approx(m[name], abs=1e-15)
            assert np.isnan(values).sum() == {"sensitivity": m["tn"] + m["fp"],
                                              "specificity": m["tp"] + m["fn"],
                                              "ppv": m["tn"] + m["fn"],
                                              "npv": m["tp"] + m["fp"]}[name]
    assert (_tied_probs(150, 0)[0][:, 1] == 0.45).sum() > 3


@pytest.mark.parametrize("text, match", [
    ("yuden", "give one of youden, sensitivity=S"),
    ("sensitivity", "give one of"),
    ("sensitivity=high", "'high' is not a number"),
    ("specificity=1.5", "must lie in \\[0, 1\\]"),
    ("threshold=nan", "must lie in \\[0, 1\\]"),
    ("sensitivity=0", "met by every threshold"),
])
def test_bad_rules_are_refused(text, match):
    with pytest.raises(InputError, match=match):
        OperatingPoint.parse(text)


def test_parse_round_trips_and_refuses_one_class_or_three():
    assert str(OperatingPoint.parse(" Sensitivity = 0.90 ")) == "sensitivity=0.9"
    assert OperatingPoint.parse("youden") == OperatingPoint("youden")
    probs, y = _probs(20, 2, seed=0)
    with pytest.raises(InputError, match="needs both classes, got only class 1"):
        choose_threshold(OperatingPoint("youden"), probs, np.ones(20, dtype=int))
    probs3, y3 = _probs(20, 3, seed=0)
    with pytest.raises(InputError, match="need a two-class model"):
        operating_point_metrics(probs3, y3, 0.5)


@pytest.fixture(scope="module")
def erm_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("op") / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=2, batch_size=16, width=4, seed=0), run,
          progress=False)
    return run


def test_evaluate_split_reports_the_operating_point_and_its_intervals(tiny_data, erm_run):
    """evaluate_split's operating point is `operating_point_metrics` of the split's own
    predictions, and its bootstrap intervals are the per-sample rates resampled with the
    same draws (they hold the point estimate)."""
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    p, y, _ = predict_split(model, method, ds, "cpu")
    t = float(np.median(p[:, 1]))
    m = evaluate_split(model, method, ds, "cpu", threshold=t, bootstrap=200)
    assert m["operating_point"] == operating_point_metrics(p, y, t)
    assert "operating_point" not in evaluate_split(model, method, ds, "cpu")
    for name, (lo, hi) in m["ci95"]["operating_point"].items():
        assert lo <= m["operating_point"][name] <= hi, name
    with pytest.raises(InputError, match="threshold must be a probability"):
        evaluate_split(model, method, ds, "cpu", threshold=1.5)


def _read_predictions(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows]),
            np.array([int(r["label"]) for r in rows]))


def test_cli_chooses_on_val_and_reports_on_test(erm_run, tmp_path, capsys):
    """`evaluate --operating-point youden`: the threshold is Youden's on the val split's
    predictions (not the test split's), the rates those of the test predictions at it."""
    capsys.readouterr()
    out = {}
    for split in ("val", "test"):
        rc = main(["evaluate", str(erm_run), "--split", split, "--operating-point", "youden",
                   "--predictions", str(tmp_path / f"{split}.csv"), "--no-progress"])
        assert rc in (0, None), capsys.readouterr().err
        out[split] = json.loads(capsys.readouterr().out)
    p_val, y_val = _read_predictions(tmp_path / "val.csv")
    p_test, y_test = _read_predictions(tmp_path / "test.csv")
    op = out["test"]["operating_point"]
    chosen = choose_threshold(OperatingPoint("youden"), p_val, y_val)
    assert op["threshold"] == pytest.approx(chosen, abs=1e-12)
    assert (op["rule"], op["chosen_on"], op["n_chosen_on"]) == ("youden", "val", len(y_val))
    ref = operating_point_metrics(p_test, y_test, op["threshold"])
    assert {k: op[k] for k in ref} == pytest.approx(ref, abs=1e-12)
    assert "note" not in op and "optimistic" in out["val"]["operating_point"]["note"]

    rc = main(["evaluate", str(erm_run), "--operating-point", "threshold=0.5",
               "--no-progress"])
    assert rc in (0, None)
    fixed = json.loads(capsys.readouterr().out)["operating_point"]
    assert fixed["chosen_on"] is None and fixed["threshold"] == 0.5
    # p1 ≥ 0.5 is argmax's call for two classes (no exact ties in float64 here)
    assert (fixed["sensitivity"], fixed["specificity"]) == pytest.approx(
        (out["test"]["sensitivity"], out["test"]["specificity"]), abs=1e-12)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_refuses_a_bad_rule_and_a_three_class_run_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    rc = main(["evaluate", str(tmp_path / "no-such-run"), "--operating-point", "sens=0.9"])
    lines = _error_lines(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(
        "error: --operating-point: operating point 'sens=0.9': give one of youden"), lines
    data = _write_three_class(tmp_path / "data")
    run = tmp_path / "run3"
    train(data, TrainConfig(method="erm", epochs=1, width=4, batch_size=8), run,
          progress=False)
    capsys.readouterr()
    rc = main(["evaluate", str(run), "--operating-point", "youden", "--no-progress"])
    lines = _error_lines(capsys)
    assert rc == 2 and len(lines) == 1 and "give --positive CLASS" in lines[0] and (
        "normal, benign, malignant") in lines[0], lines


def test_predict_calls_images_at_a_threshold(erm_run, tiny_data, tmp_path, capsys):
    """`predict --threshold T`: called_class is the positive class exactly where its
    probability reaches T, predicted stays the argmax (so `compare` still reads the file),
    and the summary counts both."""
    from causalign.engine.evaluate import read_predictions

    capsys.readouterr()
    plain, called = tmp_path / "plain.csv", tmp_path / "called.csv"
    assert main(["predict", str(erm_run), str(tiny_data), "--out", str(plain),
                 "--no-progress"]) in (0, None)
    probs = read_predictions(plain).probs
    t = float(np.sort(probs[:, 1])[len(probs) // 2])  # a score: its own sample is called 1
    capsys.readouterr()
    assert main(["predict", str(erm_run), str(tiny_data), "--out", str(called),
                 "--threshold", repr(t), "--no-progress"]) in (0, None)
    summary = capsys.readouterr().out
    with open(called, newline="") as fh:
        rows = list(csv.DictReader(fh))
    want = np.where(probs[:, 1] >= t, "malignant", "benign")
    assert [r["called_class"] for r in rows] == want.tolist()
    assert [float(r["threshold"]) for r in rows] == [t] * len(rows)
    back = read_predictions(called)
    np.testing.assert_array_equal(back.predicted, probs.argmax(1))
    n_called = int((probs[:, 1] >= t).sum())
    assert f"at {t:g}: benign: {len(rows) - n_called}, malignant: {n_called}" in summary
    assert 0 < n_called < len(rows)


def test_predict_threshold_refusals(tmp_path, capsys):
    data = _write_three_class(tmp_path / "data")
    run = tmp_path / "run3"
    train(data, TrainConfig(method="erm", epochs=1, width=4, batch_size=8), run,
          progress=False)
    capsys.readouterr()
    for threshold, message in (("1.5", "error: --threshold: operating-point threshold must "
                                       "be a probability in [0, 1], got 1.5"),
                               ("0.5", "error: --threshold 0.5: an operating point on a "
                                       "3-class run needs its positive class: give "
                                       "--positive CLASS (one-vs-rest), one of normal, "
                                       "benign, malignant")):
        rc = main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv"),
                   "--threshold", threshold, "--no-progress"])
        assert rc == 2 and _error_lines(capsys) == [message]
        assert not (tmp_path / "p.csv").exists()
