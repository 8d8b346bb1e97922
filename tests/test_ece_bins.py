"""The ECE's bin count (`--n-bins` of `evaluate` and `compare`, ``ece_bins`` of the API) and
calibration in `compare`'s output: 15 bins are Guo et al.'s, but papers also report 10 or
20, and `compare` gave accuracy and AUC only."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_audit_compare_1207f import _write_csv  # the same predictions CSV writer
from test_bootstrap_calibration_localisation import _probs

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import InputError
from causalign.metrics import (
    bootstrap_ci,
    brier_score,
    classification_metrics,
    expected_calibration_error,
)
from causalign.metrics.classification import _resample_counts


def test_classification_metrics_take_the_bin_count():
    probs, y = _probs(200, 3, seed=0)
    e10, e15 = (expected_calibration_error(probs, y, n) for n in (10, 15))
    assert e10 != e15
    assert classification_metrics(probs, y)["ece"] == e15
    assert classification_metrics(probs, y, ece_bins=10)["ece"] == e10
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="n_bins must be a positive integer"):
            classification_metrics(probs, y, ece_bins=bad)


def test_bootstrap_ece_interval_uses_the_bin_count():
    """The interval's ECE per resample is `expected_calibration_error` with those bins on
    the drawn samples (reference: each resample expanded)."""
    probs, y = _probs(120, 2, seed=1)
    got = bootstrap_ci(probs, y, n=120, seed=4, ece_bins=7)["ci95"]["ece"]
    order = np.argsort(y, kind="stable")
    p, ys = probs[order], y[order]
    ref = [expected_calibration_error(p[idx], ys[idx], 7)
           for w in _resample_counts(ys, 120, 4)
           for idx in (np.repeat(np.arange(len(ys)), row) for row in w.astype(np.int64))]
    np.testing.assert_allclose(got, np.percentile(ref, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert got != bootstrap_ci(probs, y, n=120, seed=4)["ci95"]["ece"]


def _ece_of_predictions(path, n_bins):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    return expected_calibration_error(probs, labels, n_bins)


def test_cli_evaluate_n_bins(tiny_data, tmp_path, capsys, monkeypatch):
    """`evaluate --n-bins N`: the ECE of the written predictions with N bins, recorded as
    ece_bins, and the reliability diagram drawn with N bins; the default records nothing
    and matches training's metrics.json."""
    import causalign.report.figures as figures

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    drawn = []
    real = figures.reliability_diagram
    monkeypatch.setattr(figures, "reliability_diagram",
                        lambda *a, **k: drawn.append(k.get("n_bins")) or real(*a, **k))
    capsys.readouterr()
    outs: dict = {}

    def evaluate(bins):
        out, preds = tmp_path / f"m{bins}.json", tmp_path / f"p{bins}.csv"
        extra = [] if bins is None else ["--n-bins", str(bins)]
        rc = main(["evaluate", str(run), "--out", str(out), "--predictions", str(preds),
                   "--reliability", str(tmp_path / f"r{bins}.png"), "--no-progress", *extra])
        assert rc in (0, None), capsys.readouterr().err
        outs[bins] = json.loads(out.read_text())
        assert outs[bins]["ece"] == pytest.approx(_ece_of_predictions(preds, bins or 15),
                                                  abs=1e-12)
        return preds

    preds = evaluate(None)
    # a 1-epoch model's confidences sit within a few hundredths of 0.5, where 15 and 40
    # bins may give one ECE: a count whose ECE differs on these predictions
    default = _ece_of_predictions(preds, 15)
    bins = next(n for n in (40, 200, 1000, 5000) if _ece_of_predictions(preds, n) != default)
    evaluate(bins)
    assert drawn == [15, bins]
    assert "ece_bins" not in outs[None] and outs[bins]["ece_bins"] == bins
    assert outs[None]["ece"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["test"]["ece"], abs=1e-12)
    assert outs[None]["ece"] != outs[bins]["ece"]
    capsys.readouterr()
    for command in (["evaluate", str(tmp_path / "no-such-run")],
                    ["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]):
        rc = main([*command, "--n-bins", "0"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and lines == ["error: --n-bins 0: give a number of bins of at least 1 "
                                     "(15 is usual)"], lines


def test_cli_compare_reports_calibration_with_the_bin_count(tmp_path, capsys):
    """compare gives each run's Brier score and ECE (with --n-bins bins) beside accuracy
    and AUC."""
    probs_a, y = _probs(80, 2, seed=2)
    probs_b, _ = _probs(80, 2, seed=3)
    ids = [f"s{i}" for i in range(80)]
    _write_csv(tmp_path / "a.csv", ids, y, probs_a)
    _write_csv(tmp_path / "b.csv", ids, y, probs_b)
    capsys.readouterr()
    results = {}
    for bins in (15, 6):
        assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                     "--n-bins", str(bins)]) in (0, None)
        results[bins] = json.loads(capsys.readouterr().out)
    for bins, r in results.items():
        assert r["ece_bins"] == bins
        assert r["ece_a"] == pytest.approx(expected_calibration_error(probs_a, y, bins))
        assert r["ece_b"] == pytest.approx(expected_calibration_error(probs_b, y, bins))
        assert r["brier_a"] == pytest.approx(brier_score(probs_a, y))
        assert r["brier_b"] == pytest.approx(brier_score(probs_b, y))
    assert results[15]["ece_a"] != results[6]["ece_a"]
