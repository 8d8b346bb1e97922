"""ROC curves (`roc_figure`, `evaluate --roc`, `compare --roc`): the figure a reader of a
diagnostic model looks at first, which causalign did not draw."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from test_audit_compare_1207f import _write_csv
from test_bootstrap_calibration_localisation import _probs

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import InputError
from causalign.metrics import classification_metrics
from causalign.report.figures import roc_figure


def test_binary_curves_points_and_aucs_are_sklearns(tmp_path):
    probs_a, y = _probs(120, 2, seed=0)
    probs_b, _ = _probs(120, 2, seed=1)
    path = tmp_path / "roc.png"
    drawn = roc_figure({"a": (probs_a, y), "b": (probs_b, y)}, path,
                       points={"a": [("argmax", 0.5), ("op", 0.3)]})
    assert path.stat().st_size > 5000
    for label, probs in (("a", probs_a), ("b", probs_b)):
        (curve,) = drawn[label]
        fpr, tpr, _ = roc_curve(y, probs[:, 1])
        np.testing.assert_array_equal(curve["fpr"], fpr)
        np.testing.assert_array_equal(curve["tpr"], tpr)
        assert curve["auc"] == roc_auc_score(y, probs[:, 1]) and curve["class"] == 1
    assert drawn["b"][0]["points"] == []
    for mark, t in zip(drawn["a"][0]["points"], (0.5, 0.3), strict=True):
        called = probs_a[:, 1] >= t
        assert mark["threshold"] == t
        assert mark["tpr"] == called[y == 1].mean() and mark["fpr"] == called[y == 0].mean()


def test_more_classes_draw_each_present_class_against_the_rest(tmp_path):
    probs, y = _probs(150, 3, seed=2)
    y[y == 2] = 0  # class 2 absent from the labels: no curve for it, as the AUC skips it
    drawn = roc_figure({"run": (probs, y)}, tmp_path / "roc.svg")
    assert [c["class"] for c in drawn["run"]] == [0, 1]
    assert np.mean([c["auc"] for c in drawn["run"]]) == pytest.approx(
        classification_metrics(probs, y)["auc"], abs=1e-12)
    with pytest.raises(InputError, match="holds one class only"):
        roc_figure({"run": (probs, np.zeros(150, dtype=int))}, tmp_path / "x.png")
    with pytest.raises(InputError, match="no predictions"):
        roc_figure({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _recorded_roc_run(data, tmp_path, monkeypatch) -> tuple[list, object]:
    """A one-epoch ERM run, and the list every later `roc_figure` call records its
    ``(curves, kwargs)`` in (the figure is still drawn)."""
    import causalign.report.figures as figures

    seen: list = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append((curves, k)) or real(
                            curves, path, **k))
    run = tmp_path / "run"
    train(data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4), run,
          progress=False)
    return seen, run


def test_cli_evaluate_and_compare_draw_roc(tiny_data, tmp_path, capsys, monkeypatch):
    seen, run = _recorded_roc_run(tiny_data, tmp_path, monkeypatch)
    capsys.readouterr()
    roc = tmp_path / "roc.png"
    assert main(["evaluate", str(run), "--roc", str(roc), "--operating-point", "youden",
                 "--predictions", str(tmp_path / "p.csv"), "--no-progress"]) in (0, None)
    metrics = json.loads(capsys.readouterr().out)
    assert roc.stat().st_size > 5000
    (curves, kwargs), = seen
    (title,) = curves
    assert title == "run (test)"  # the folder's name (full path: JSON, not legend)
    marks = kwargs["points"][title]
    assert marks[0][1] == 0.5 and marks[1][1] == metrics["operating_point"]["threshold"]
    # the curve is the split's: its AUC is the one metrics.json reports
    p, y = curves[title]
    assert roc_auc_score(y, p[:, 1]) == pytest.approx(metrics["auc"], abs=1e-12)

    rc = main(["compare", str(run), str(run / "predictions_val.csv"), "--roc",
               str(tmp_path / "c.png")])
    assert rc == 1 or rc == 2  # other samples (test against val): refused
    capsys.readouterr()
    assert main(["compare", str(run), str(tmp_path / "p.csv"), "--roc",
                 str(tmp_path / "c.png")]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["roc"] == str(tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size
    assert len(seen[-1][0]) == 2 and "DeLong p" in seen[-1][1]["title"]

    for command in (["evaluate", str(run)], ["compare", str(run), str(tmp_path / "p.csv")]):
        rc = main([*command, "--roc", str(tmp_path / "same.png"), "--reliability",
                   str(tmp_path / "same.png")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and "name the same file" in lines[0], lines
        rc = main([*command, "--roc", str(tmp_path / "roc.txt")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and lines == [f"error: --roc {tmp_path / 'roc.txt'}: give a .png, .pdf "
                                     f"or .svg file"], lines
    assert not (tmp_path / "same.png").exists()


def test_compare_roc_of_three_classes(tmp_path, capsys):
    probs_a, y = _probs(90, 3, seed=3)
    probs_b, _ = _probs(90, 3, seed=4)
    ids = [f"s{i}" for i in range(90)]
    classes = ("normal", "benign", "malignant")
    _write_csv(tmp_path / "a.csv", ids, y, probs_a, classes)
    _write_csv(tmp_path / "b.csv", ids, y, probs_b, classes)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--roc",
                 str(tmp_path / "roc.pdf")]) in (0, None)
    assert (tmp_path / "roc.pdf").read_bytes()[:4] == b"%PDF"
    assert "one-vs-rest" in json.loads(capsys.readouterr().out)["delong_note"]


def test_a_predictions_row_longer_than_its_header_is_refused(tmp_path):
    """A row with more values than the header (three probabilities under two p_ columns)
    was read as its first two values, and refused later as "not probabilities", if at all;
    empty trailing cells (a spreadsheet's) stay accepted."""
    from causalign.engine.evaluate import read_predictions

    probs, y = _probs(5, 3, seed=0)
    _write_csv(tmp_path / "p.csv", [f"s{i}" for i in range(5)], y, probs)
    with pytest.raises(InputError, match=r"p.csv line 2: 1 value\(s\) more than the header's 6 "
                                         r"columns \(id 's0'\)"):
        read_predictions(tmp_path / "p.csv")
    text = (tmp_path / "p.csv").read_text().splitlines()
    (tmp_path / "q.csv").write_text("\n".join([text[0]] + [",".join(r.split(",")[:6]) + ",,"
                                                           for r in text[1:]]) + "\n")
    assert len(read_predictions(tmp_path / "q.csv").ids) == 5


def test_report_has_a_roc_section_from_the_runs_predictions(tmp_path, monkeypatch):
    """report.html draws each method's test ROC curve (from predictions_test.csv, no model
    loaded) on one axes per dataset; without predictions: no section, no stale figure."""
    import causalign.report.figures as figures
    from causalign.report.html import write_report

    drawn = []
    # two classes: each method's seeds (one here) through roc_seeds_figure
    real = figures.roc_seeds_figure
    monkeypatch.setattr(figures, "roc_seeds_figure",
                        lambda runs, path, **k: drawn.append(runs) or real(runs, path, **k))
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(40)]
    y = np.arange(40) % 2
    runs, written = [], {}
    for label in ("erm", "oracle", "rrr"):
        (tmp_path / "runs" / label).mkdir(parents=True)
        if label != "rrr":
            written[label] = rng.dirichlet([1, 1], 40)
            _write_csv(tmp_path / "runs" / label / "predictions_test.csv", ids, y,
                       written[label])
        runs.append({"key": label, "status": "done", "dataset": "pm", "label": label,
                     "method": label, "setting": "default", "seed": 0,
                     "run_dir": f"runs/{label}", "metrics": {}})
    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": runs}))
    page = write_report(tmp_path).read_text()
    assert "<h2>ROC curves</h2>" in page and "ROC curves pm" in page
    (curves,) = drawn
    assert list(curves) == ["erm", "oracle"]
    for label, ((probs, labels),) in curves.items():
        np.testing.assert_allclose(probs, written[label], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(labels, y)
    fig = tmp_path / "figures" / "roc_pm.png"
    assert fig.read_bytes()[:4] == b"\x89PNG"
    for label in ("erm", "oracle"):
        (tmp_path / "runs" / label / "predictions_test.csv").unlink()
    page = write_report(tmp_path).read_text()
    assert "ROC curves" not in page and not fig.exists()
