"""The ROC curve's pointwise bootstrap band (`metrics.roc.roc_band`), drawn by `evaluate
--roc --bootstrap N`, and `compare --roc`'s marks of each run's argmax and operating point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from test_audit_compare_1207f import _write_csv
from test_bootstrap_calibration_localisation import _probs
from test_roc_figure import _recorded_roc_run

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics import roc_band
from causalign.metrics.classification import _resample_counts
from causalign.report.figures import roc_figure


def _polyline(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """The ROC polyline at one rate, by hand: the highest point exactly there (the top of a
    vertical segment), else the straight line between the neighbouring points."""
    here = tpr[fpr == at]
    if len(here):
        return float(here.max())
    return float(np.interp(at, fpr, tpr))


def _tied(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities rounded to 0.05, so many scores tie across the classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1) / 0.05) * 0.05
    return np.stack([1 - s, s], axis=1), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_and_band_against_sklearn_on_the_same_resamples(seed):
    probs, y = _tied(150, seed)
    band = roc_band(probs, y, n=200, seed=seed)
    grid = band["fpr"]
    assert grid[0] == 0 and grid[-1] == 1 and len(grid) == 101
    fpr, tpr, _ = roc_curve(y, probs[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(band["tpr"], [_polyline(fpr, tpr, g) for g in grid],
                               atol=1e-12)
    # each resample's curve by scikit-learn on the drawn samples themselves: the same
    # stratified draws `bootstrap_ci` makes (samples sorted by class, as it sorts them)
    order = np.argsort(y, kind="stable")
    ys, ss = y[order], probs[order, 1]
    curves = []
    for w in _resample_counts(ys, 200, seed):
        for row in w:
            drawn = np.repeat(np.arange(len(ys)), row.astype(int))
            f, t, _ = roc_curve(ys[drawn], ss[drawn], drop_intermediate=False)
            curves.append([_polyline(f, t, g) for g in grid])
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(band["lo"], lo, atol=1e-12)
    np.testing.assert_allclose(band["hi"], hi, atol=1e-12)
    assert band["lo"][-1] == band["hi"][-1] == 1.0
    assert (band["lo"] <= band["hi"]).all()
    # the same seed gives the same band; another seed another
    again = roc_band(probs, y, n=200, seed=seed)
    np.testing.assert_array_equal(again["lo"], band["lo"])
    assert not np.array_equal(roc_band(probs, y, n=200, seed=seed + 10)["lo"], band["lo"])


def test_band_narrows_with_more_samples():
    """The band is the curve's sampling uncertainty: 16 times the samples, about a quarter
    of the width (1/√n); checked loosely at the mid-range rates."""
    widths = []
    for n in (100, 1600):
        probs, y = _tied(n, 5)
        band = roc_band(probs, y, n=300, seed=0)
        widths.append(float(np.mean((band["hi"] - band["lo"])[20:81])))
    assert 0.15 < widths[1] / widths[0] < 0.4, widths


def test_one_vs_rest_class_and_a_chosen_grid():
    probs, y = _probs(120, 3, seed=6)
    band = roc_band(probs, y, n=100, seed=1, positive=2, fpr=[0.0, 0.1, 0.5])
    fpr, tpr, _ = roc_curve(y == 2, probs[:, 2], drop_intermediate=False)
    np.testing.assert_allclose(band["tpr"], [_polyline(fpr, tpr, g) for g in (0, .1, .5)])
    assert band["positive"] == 2 and band["n"] == 100


def test_refusals():
    probs, y = _tied(60, 0)
    with pytest.raises(InputError, match="needs class 1 and another class"):
        roc_band(probs, np.ones(60, dtype=int), n=100)
    with pytest.raises(InputError, match="positive class 2"):
        roc_band(probs, y, n=100, positive=2)
    with pytest.raises(InputError, match="rates in"):
        roc_band(probs, y, n=100, fpr=[0.1, 1.5])
    with pytest.raises(InputError):
        roc_band(probs, y, n=10)  # fewer resamples than an interval needs
    band = roc_band(probs, y, n=100)
    with pytest.raises(InputError, match="two-class"):
        roc_figure({"m": _probs(60, 3, seed=0)}, "/tmp/never.png", bands={"m": band})


def test_evaluate_draws_the_band_of_its_bootstrap_and_compare_marks_both_runs(
        tiny_data, tmp_path, capsys, monkeypatch):
    seen, run = _recorded_roc_run(tiny_data, tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--roc", str(tmp_path / "roc.png"), "--bootstrap",
                 "150", "--bootstrap-seed", "4", "--no-progress"]) in (0, None)
    (curves, kwargs), = seen
    (title,) = curves
    p, y = curves[title]
    band = kwargs["bands"][title]
    expected = roc_band(p, y, n=150, seed=4)
    for key in ("lo", "hi", "tpr"):
        np.testing.assert_array_equal(band[key], expected[key])
    assert main(["evaluate", str(run), "--roc", str(tmp_path / "r2.png"),
                 "--no-progress"]) in (0, None)
    assert seen[-1][1]["bands"] is None  # no --bootstrap: no band

    probs_b, _ = _probs(len(y), 2, seed=9)
    ids = [f"s{i}" for i in range(len(y))]
    _write_csv(tmp_path / "a.csv", ids, y, p, ("benign", "malignant"))
    _write_csv(tmp_path / "b.csv", ids, y, probs_b, ("benign", "malignant"))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--roc",
                 str(tmp_path / "c.png"), "--operating-point", "threshold=0.3"]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    points = seen[-1][1]["points"]
    assert points == {"a.csv": [("p ≥ 0.5 (argmax)", 0.5), ("p ≥ 0.3 (fixed)", 0.3)],
                      "b.csv": [("p ≥ 0.5 (argmax)", 0.5), ("p ≥ 0.3 (fixed)", 0.3)]}
    assert result["operating_point"]["threshold_a"] == 0.3
    # the marks' rates are each run's own at its threshold
    drawn = roc_figure({str(tmp_path / "b.csv"): (probs_b, y)}, tmp_path / "d.png",
                 points={str(tmp_path / "b.csv"): [("op", 0.3)]})
    assert drawn[str(tmp_path / "b.csv")][0]["points"][0]["tpr"] == pytest.approx(
        result["operating_point"]["sensitivity_b"])
