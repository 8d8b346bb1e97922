"""Calibration (Brier score, ECE) in the classification metrics and stratified bootstrap
intervals (`bootstrap_ci`, `causalign evaluate --bootstrap N`): reviewers of a medical-imaging
paper ask for both, and metrics.json held point estimates only."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import sklearn
from sklearn.metrics import brier_score_loss, roc_auc_score

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import InputError
from causalign.metrics import (
    bootstrap_ci,
    brier_score,
    classification_metrics,
    expected_calibration_error,
)
from causalign.metrics.classification import _ranking, _weighted_auc

README = Path(__file__).resolve().parents[1] / "README.md"


def _binary(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], 1)


def _scored(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A moderately good binary classifier's probabilities, with tied scores."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.int64)
    p1 = np.round(np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1), 2)
    return _binary(p1), y


# --------------------------------------------------------------------------- calibration


def test_ece_hand_computed():
    """Five samples in three of the 15 bins; a bin's gap is |its accuracy − its mean
    confidence|, not the mean of per-sample gaps (which would give 0.328 here)."""
    probs = np.array([[0.19, 0.81],   # conf .81, correct   } bin (12/15, 13/15]
                      [0.85, 0.15],   # conf .85, wrong     }
                      [0.05, 0.95],   # conf .95, correct   } bin (14/15, 1]
                      [1.00, 0.00],   # conf 1.0, correct   }
                      [0.55, 0.45]])  # conf .55, wrong       bin (8/15, 9/15]
    labels = np.array([1, 1, 1, 0, 1])
    want = 2 / 5 * abs(0.5 - 0.83) + 2 / 5 * abs(1 - 0.975) + 1 / 5 * 0.55  # 0.252
    assert expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-12)
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(want, abs=1e-12)
    # one bin: |accuracy − mean confidence|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(
        abs(3 / 5 - (0.81 + 0.85 + 0.95 + 1.0 + 0.55) / 5))
    # perfectly confident and right: 0
    assert expected_calibration_error(_binary([0.0, 1.0]), np.array([0, 1])) == 0.0
    with pytest.raises(InputError, match="n_bins"):
        expected_calibration_error(probs, labels, n_bins=0)


def test_ece_matches_guo_et_al_binning_loop():
    """Against the loop of Guo et al.'s code (bins (lo, hi] of linspace(0, 1, 16)), on three
    classes."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (400, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, 400)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, 16)
    want = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            want += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-12)


def test_brier_hand_computed_binary_and_multiclass():
    probs, labels = _binary([0.8, 0.3, 0.6]), np.array([1, 0, 0])
    want = (0.2 ** 2 + 0.3 ** 2 + 0.6 ** 2) / 3
    assert brier_score(probs, labels) == pytest.approx(want)
    assert brier_score(probs, labels) == pytest.approx(brier_score_loss(labels, probs[:, 1]))
    assert classification_metrics(probs, labels)["brier"] == pytest.approx(want)
    # three classes: squares summed over the classes, averaged over samples
    p3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    y3 = np.array([0, 1])
    want3 = ((0.09 + 0.04 + 0.01) + (0.01 + 0.49 + 0.36)) / 2  # 0.5
    assert brier_score(p3, y3) == pytest.approx(want3)
    if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 7):
        assert want3 == pytest.approx(brier_score_loss(y3, p3, labels=[0, 1, 2]))
    # a one-class split still has a Brier score
    assert brier_score(probs[1:], labels[1:]) == pytest.approx((0.09 + 0.36) / 2)


# --------------------------------------------------------------------------- bootstrap


def test_weighted_auc_is_sklearn_auc_of_each_resample():
    """The vectorised AUC (a row of draw counts per resample) is `roc_auc_score` on the
    resampled scores, ties included."""
    probs, y = _scored(120, seed=1)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(8)]
    w = np.stack([np.bincount(d, minlength=len(y)) for d in draws]).astype(np.float64)
    got = _weighted_auc(w, *_ranking(probs[:, 1], y == 1))
    want = [roc_auc_score(y[d], probs[d, 1]) for d in draws]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_bootstrap_reproducible_and_contains_point_estimates():
    probs, y = _scored()
    a = bootstrap_ci(probs, y, n=500, seed=7)
    assert a == bootstrap_ci(probs, y, n=500, seed=7)
    assert a["ci95"] != bootstrap_ci(probs, y, n=500, seed=8)["ci95"]
    assert a["bootstrap"] == {"n": 500, "seed": 7, "method": "percentile, stratified by class"}
    point = classification_metrics(probs, y)
    assert set(a["ci95"]) == {"accuracy", "balanced_accuracy", "auc", "sensitivity",
                              "specificity", "brier", "ece"}
    # the calibration metrics' intervals: test_bootstrap_calibration_localisation (the ECE's
    # bootstrap distribution is biased upwards, so its interval need not hold the point)
    for name in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"):
        lo, hi = a["ci95"][name]
        assert 0.0 <= lo < point[name] < hi <= 1.0, name
        assert hi - lo < 0.25, name  # 300 samples: a few points wide, not the whole range
    # balanced accuracy's interval is that of the mean of the two recalls, not accuracy's
    assert a["ci95"]["balanced_accuracy"] != a["ci95"]["accuracy"]


def test_intervals_narrow_with_more_samples():
    """Percentile widths shrink about as 1/√n: 4x the samples, about half the width."""
    small, big = _scored(200, seed=2), _scored(3200, seed=2)
    w_small = np.diff(bootstrap_ci(*small, n=400, seed=0)["ci95"]["accuracy"])[0]
    w_big = np.diff(bootstrap_ci(*big, n=400, seed=0)["ci95"]["accuracy"])[0]
    assert 3.0 < w_small / w_big < 5.5  # √16 = 4


def test_stratified_resamples_keep_a_single_positive():
    """One positive among 60: a plain bootstrap drops it from ~37 % of the resamples (AUC and
    sensitivity undefined there); stratified, each resample keeps it."""
    rng = np.random.default_rng(0)
    y = np.zeros(60, dtype=np.int64)
    y[17] = 1
    p1 = rng.uniform(0.0, 0.6, 60)
    p1[17] = 0.45  # predicted negative, ranked above most negatives
    probs = _binary(p1)
    out = bootstrap_ci(probs, y, n=300, seed=0)["ci95"]
    lo, hi = out["auc"]
    assert np.isfinite([lo, hi]).all() and 0.0 < lo <= hi <= 1.0
    assert lo <= classification_metrics(probs, y)["auc"] <= hi
    assert out["sensitivity"] == [0.0, 0.0]  # the one positive, missed in every resample
    # the class counts are fixed, so accuracy's interval is specificity's scaled by 59/60
    np.testing.assert_allclose(out["accuracy"], np.array(out["specificity"]) * 59 / 60)


def test_bootstrap_multiclass_and_one_class_split():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(0, 1, (150, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = bootstrap_ci(probs, y, n=200, seed=0)["ci95"]
    assert out["sensitivity"] is None and out["specificity"] is None  # defined for two only
    point = classification_metrics(probs, y)
    for name in ("accuracy", "balanced_accuracy", "auc"):
        assert out[name][0] <= point[name] <= out[name][1]
    # one class: no AUC, no specificity; accuracy still has an interval
    one = bootstrap_ci(probs[y == 1][:, :2] / probs[y == 1][:, :2].sum(1, keepdims=True),
                       np.ones((y == 1).sum(), dtype=np.int64), n=100, seed=0)["ci95"]
    assert one["auc"] is None and one["specificity"] is None
    assert one["accuracy"] == one["sensitivity"]


@pytest.mark.parametrize("n", [-1, 0, 1, 99, True, 2.5])
def test_bootstrap_refuses_too_few_or_bad_counts(n):
    probs, y = _scored(50)
    with pytest.raises(InputError, match="too few resamples|non-negative integer"):
        bootstrap_ci(probs, y, n=n)
    with pytest.raises(InputError, match="seed"):
        bootstrap_ci(probs, y, n=100, seed=-1)


# --------------------------------------------------------------------------- CLI, README


def test_cli_bootstrap_writes_ci95_and_refuses_bad_counts(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"brier", "ece"} <= set(metrics["test"]) and "ci95" not in metrics["test"]
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert not any("brier" in h or "ece" in h for h in header)  # fixed columns
    capsys.readouterr()
    out = tmp_path / "eval.json"
    rc = main(["evaluate", str(run), "--bootstrap", "200", "--bootstrap-seed", "3",
               "--out", str(out), "--no-progress"])
    assert rc in (0, None), capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["bootstrap"] == {"n": 200, "seed": 3, "method": "percentile, stratified by class"}
    for name in ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"):
        lo, hi = m["ci95"][name]
        assert lo <= m[name] <= hi, name
    # the same intervals from the run's saved predictions, without the model
    with open(run / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
    again = bootstrap_ci(probs, np.array([int(r["label"]) for r in rows]), n=200, seed=3)
    assert again["ci95"] == {k: m["ci95"][k] for k in again["ci95"]}
    capsys.readouterr()
    for args, words in ((["--bootstrap", "50"], "too few resamples for a 95 % interval"),
                        (["--bootstrap", "-5"], "give a number of resamples"),
                        (["--bootstrap", "100", "--bootstrap-seed", "-1"], "--bootstrap-seed")):
        rc = main(["evaluate", str(tmp_path / "no-such-run"), *args, "--no-progress"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, lines  # before the run is even looked at
        assert lines[0].startswith("error: --bootstrap") and words in lines[0], lines


def test_readme_bootstrap_lines_run_on_a_predictions_csv(tmp_path):
    """The README's lines that read RUN/predictions_test.csv, run on a written CSV (the
    quickstart block around them trains first; test_readme runs it whole)."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "bootstrap_ci(" in b)
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rows = "))
    code = "\n".join(lines[start:])
    from causalign.metrics.operating_point import (
        OperatingPoint,
        choose_threshold,
        operating_point_metrics,
    )

    probs, y = _scored(80)
    (tmp_path / "runs" / "oracle").mkdir(parents=True)
    # the val split the example's operating point is chosen on: other samples
    val_probs, val_y = probs[::-1][:60], y[:60]
    for split, (ps, ys) in {"test": (probs, y), "val": (val_probs, val_y)}.items():
        with open(tmp_path / "runs" / "oracle" / f"predictions_{split}.csv", "w",
                  newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "site", "label", "predicted", "p_benign", "p_malignant"])
            for i, (p, lab) in enumerate(zip(ps, ys, strict=True)):
                w.writerow([f"{split}{i}", 0, lab, int(p.argmax()), f"{p[0]:.17g}",
                            f"{p[1]:.17g}"])
    printed: list[object] = []
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, {"csv": csv, "np": np, "bootstrap_ci": bootstrap_ci,
                    "print": printed.append})
    finally:
        os.chdir(cwd)
    t = choose_threshold(OperatingPoint.parse("sensitivity=0.9"), val_probs, val_y)
    assert printed == [bootstrap_ci(probs, y, n=1000, seed=0)["ci95"]["auc"],
                       operating_point_metrics(probs, y, t)]
