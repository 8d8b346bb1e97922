"""Per-sample predictions (predictions_<split>.csv, `evaluate --predictions`) and the
sensitivity / specificity / per-class recall in metrics.json: users computing confidence
intervals, DeLong tests or calibration had to re-run the model to get them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from causalign.cli import main
from causalign.data.format import read_manifest
from causalign.engine import TrainConfig, train
from causalign.metrics import classification_metrics


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sensitivity_specificity_and_recalls_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, y)
    pred = probs.argmax(1)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["recall_per_class"] == pytest.approx(
        list(recall_score(y, pred, average=None, labels=[0, 1])))
    # three classes, one absent: its recall is None, not 0; no sensitivity for C > 2
    y3 = np.array([0, 0, 1, 1, 1])
    p3 = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .1, .8], [.2, .6, .2]])
    m3 = classification_metrics(p3, y3)
    assert m3["recall_per_class"][:2] == pytest.approx([0.5, 2 / 3])
    assert m3["recall_per_class"][2] is None
    assert m3["sensitivity"] is None and m3["specificity"] is None
    # one-class split: the other class's recall is undefined
    assert classification_metrics(probs[y == 1], y[y == 1])["specificity"] is None


def test_training_writes_predictions_that_reproduce_metrics_json(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = {r.id: r for r in read_manifest(tiny_data)}
    for split in ("val", "test"):
        rows = _rows(run / f"predictions_{split}.csv")
        want_ids = [r.id for r in read_manifest(tiny_data) if r.split == split]
        assert [r["id"] for r in rows] == want_ids  # manifest order, every sample once
        assert all(int(r["label"]) == manifest[r["id"]].label for r in rows)
        y = np.array([int(r["label"]) for r in rows])
        cols = [k for k in rows[0] if k.startswith("p_")]
        assert len(cols) == 2
        p = np.array([[float(r[c]) for c in cols] for r in rows])
        pred = np.array([int(r["predicted"]) for r in rows])
        assert np.array_equal(pred, p.argmax(1))
        m = metrics[split]
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
        assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    # history.csv keeps its columns: no per-class list among them
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert not any("recall" in h or "sensitivity" in h for h in header)


def test_evaluate_predictions_option(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    out = tmp_path / "sub" / "preds.csv"
    rc = main(["evaluate", str(run), "--split", "val", "--predictions", str(out),
               "--no-progress"])
    assert rc in (0, None), capsys.readouterr().err
    assert _rows(out) == _rows(run / "predictions_val.csv")
    capsys.readouterr()
    # a folder as the file: refused before the evaluation, in one line
    rc = main(["evaluate", str(run), "--predictions", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith("error: --predictions") and "is a folder" in lines[0]



def test_evaluate_refuses_to_write_over_the_runs_own_records(tiny_data, tmp_path, capsys):
    """`--out RUN/metrics.json` replaced the training's test metrics with the evaluation's
    (exit 0), and `--predictions RUN/config.yaml` left a run that no longer loads."""
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    before = {name: (run / name).read_bytes()
              for name in ("metrics.json", "config.yaml", "predictions_test.csv")}
    capsys.readouterr()
    for option, name in (("--out", "metrics.json"), ("--predictions", "config.yaml"),
                         ("--predictions", "predictions_test.csv")):
        rc = main(["evaluate", str(run), "--split", "val", option, str(run / name),
                   "--no-progress"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {option} {run / name}: is the run's own {name}")
    assert {name: (run / name).read_bytes() for name in before} == before
    # another file in the run folder is fine
    rc = main(["evaluate", str(run), "--split", "val", "--out", str(run / "eval_val.json"),
               "--no-progress"])
    assert rc in (0, None) and json.loads((run / "eval_val.json").read_text())["split"] == "val"
