"""report.html's "Operating points and calibration" table for more than two classes: one row
per (method, class), that class against the rest (`one_vs_rest`, as `evaluate --positive
CLASS`), thresholds chosen on val, rates on test; two-class tables unchanged."""

from __future__ import annotations

import warnings

import numpy as np
from test_audit_repclin_1207q import _random_split, _run

from causalign.metrics.calibration import apply_temperature, fit_temperature
from causalign.metrics.classification import expected_calibration_error
from causalign.metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    one_vs_rest,
    operating_point_metrics,
)
from causalign.report.clinical import clinical_table, run_clinical_values
from causalign.report.html import _table_html

NAMES = ["benign", "malignant", "other"]  # the class names the fixture's CSVs carry


def _probs(rows: list[list[float]]) -> np.ndarray:
    p = np.asarray(rows, dtype=np.float64)
    return p / p.sum(1, keepdims=True)


# two seeds of hand-written 3-class predictions (val, test), every class in each split
VAL = [(_probs([[.7, .2, .1], [.5, .3, .2], [.2, .6, .2], [.3, .4, .3], [.1, .2, .7],
                [.3, .3, .4], [.3, .5, .2], [.2, .2, .6]]), [0, 0, 1, 1, 2, 2, 0, 2]),
       (_probs([[.6, .3, .1], [.4, .4, .2], [.1, .8, .1], [.5, .4, .1], [.2, .1, .7],
                [.1, .5, .4], [.3, .2, .5], [.3, .6, .1]]), [0, 0, 1, 1, 2, 2, 2, 1])]
TEST = [(_probs([[.8, .1, .1], [.3, .5, .2], [.2, .7, .1], [.4, .3, .3], [.2, .2, .6],
                 [.5, .2, .3], [.1, .3, .6]]), [0, 0, 1, 1, 2, 2, 2]),
        (_probs([[.6, .2, .2], [.2, .2, .6], [.3, .6, .1], [.2, .5, .3], [.1, .1, .8],
                 [.4, .4, .2], [.3, .3, .4]]), [0, 0, 1, 1, 2, 2, 2])]
RULES = ("youden", "sensitivity=0.9")


def _want(seed: int, c: int) -> list[float]:
    """Threshold, test sensitivity, test specificity per rule for class c against the rest,
    from the metrics functions on `one_vs_rest` computed here."""
    pv, yv = one_vs_rest(VAL[seed][0], np.asarray(VAL[seed][1]), c)
    pt, yt = one_vs_rest(TEST[seed][0], np.asarray(TEST[seed][1]), c)
    out = []
    for rule in RULES:
        t = choose_threshold(OperatingPoint.parse(rule), pv, yv)
        rates = operating_point_metrics(pt, yt, t)
        out += [t, *(rates[k] for k in ("sensitivity", "specificity", "ppv", "npv"))]
    return out


def _cell(values: list[float]) -> str:
    """The results table's mean (std, ddof 0) cell."""
    return f"{np.mean(values):.3f} ({np.std(values):.3f})"


def test_three_classes_give_one_row_per_class_against_the_rest(tmp_path):
    """Two seeds of hand-written 3-class CSVs: one row per class (named as the CSVs' p_
    columns), each cell the mean (std) over seeds of what choose_threshold /
    operating_point_metrics give on one_vs_rest; ECE and T (all classes) on the method's
    first row only, blank on its other rows."""
    runs = [_run(tmp_path, "busi", "erm", s, VAL[s], TEST[s]) for s in (0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither val split is separated: T inside its bounds
        t = clinical_table(tmp_path, {"runs": runs}, "busi")
    assert t.header[:3] == ["method", "class (vs rest)", "seeds"] and len(t.header) == 16
    assert [r[:3] for r in t.rows] == [["erm", n, "2"] for n in NAMES]
    for c, row in enumerate(t.rows):
        per_seed = [_want(s, c) for s in (0, 1)]
        assert row[3:13] == [_cell([v[i] for v in per_seed]) for i in range(10)], NAMES[c]
    temps = [fit_temperature(VAL[s][0], np.asarray(VAL[s][1])) for s in (0, 1)]
    ece = [expected_calibration_error(TEST[s][0], np.asarray(TEST[s][1])) for s in (0, 1)]
    after = [expected_calibration_error(apply_temperature(TEST[s][0], temps[s]),
                                        np.asarray(TEST[s][1])) for s in (0, 1)]
    assert t.rows[0][13:] == [_cell(ece), _cell(after), _cell(temps)]
    assert t.rows[1][13:] == t.rows[2][13:] == ["", "", ""]
    assert len(t.bold) == 3 and all(len(b) == 15 for b in t.bold)


def test_three_class_note_says_one_vs_rest_per_row(tmp_path):
    """The note no longer says there is no operating point: it says each row is one class
    against the rest (evaluate's --positive route) and where ECE and T are."""
    runs = [_run(tmp_path, "busi", "erm", 0, VAL[0], TEST[0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        note = clinical_table(tmp_path, {"runs": runs}, "busi").notes[0]
    assert note.startswith("3 classes: no positive class by convention, so one row per class")
    assert "--positive CLASS" in note and "one-vs-rest" in note
    assert "first row" in note and "no operating point" not in note


def test_run_values_per_class_keys_and_a_missing_class_noted(tmp_path):
    """run_clinical_values of a 3-class run keys each class's rates "<c>/<rule>.<rate>" with
    the class names; a val split without class 2 cannot choose its thresholds: those keys
    are absent and each rule noted with the class, the other classes still computed."""
    d = tmp_path / "r"
    pv, yv = VAL[0][0][:4], [0, 0, 1, 1]
    from test_audit_repclin_1207q import _csv
    _csv(d / "predictions_val.csv", pv, yv)
    _csv(d / "predictions_test.csv", *TEST[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values, notes = run_clinical_values(d)
    assert values["classes"] == NAMES and values["n_classes"] == 3
    pv0, yv0 = one_vs_rest(pv, np.asarray(yv), 0)
    assert values["0/youden.threshold"] == choose_threshold(OperatingPoint("youden"), pv0, yv0)
    assert "1/sensitivity=0.9.specificity" in values
    assert not any(k.startswith("2/") for k in values)
    assert [n.split(":")[0] for n in notes[:2]] == ["youden (other vs rest)",
                                                   "sensitivity=0.9 (other vs rest)"]


EXPECTED_TWO_CLASS = (
    "<h3>plus-minus</h3><table class='results'><thead><tr><th>method</th><th>seeds</th>"
    "<th>Youden: threshold (val)</th><th>sens. (test)</th><th>spec. (test)</th>"
    "<th>sens.=0.9: threshold (val)</th><th>sens. (test)</th><th>spec. (test)</th>"
    "<th>ECE (test)</th><th>ECE after T</th><th>T (val)</th></tr></thead><tbody><tr>"
    "<th>erm</th><td>2</td><td>0.505 (0.383)</td><td>0.707 (0.234)</td><td>0.622 (0.187)</td>"
    "<td>0.042 (0.042)</td><td>0.947 (0.053)</td><td>0.212 (0.169)</td><td>0.276 (0.059)</td>"
    "<td>0.238 (0.066)</td><td>4.361 (0.258)</td></tr><tr><th>ppi</th><td>2</td>"
    "<td>0.923 (0.043)</td><td>0.259 (0.041)</td><td>0.782 (0.018)</td><td>0.011 (0.005)</td>"
    "<td>0.882 (0.032)</td><td>0.188 (0.012)</td><td>0.339 (0.020)</td><td>0.142 (0.006)</td>"
    "<td>18.522 (13.037)</td></tr><tr><th>old</th><td>0</td><td>–</td><td>–</td><td>–</td>"
    "<td>–</td><td>–</td><td>–</td><td>–</td><td>–</td><td>–</td></tr></tbody></table>"
    "<ul class='notes'><li>old seed 0: no predictions_test.csv (a run older than the "
    "predictions files)</li></ul>")


def test_two_class_table_html_unchanged(tmp_path):
    """Guard: a demo-like two-class dataset (two methods × two seeds, one old run) renders
    the very HTML the table gave before per-class rows existed (captured from that code),
    once the PPV / NPV columns and the prevalence note added since are taken out."""
    rng = np.random.default_rng(11)
    runs = [_run(tmp_path, "plus-minus", lab, s, _random_split(rng, 40), _random_split(rng, 40))
            for lab in ("erm", "ppi") for s in (0, 1)]
    runs.append(_run(tmp_path, "plus-minus", "old", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = clinical_table(tmp_path, {"runs": runs}, "plus-minus")
    keep = [i for i, h in enumerate(t.header) if not h.startswith(("PPV", "NPV"))]
    assert len(keep) == 11 and t.notes[0].startswith("test prevalence (PPV and NPV")
    t.header = [t.header[i] for i in keep]
    t.rows = [[r[i] for i in keep] for r in t.rows]
    t.bold = [[b[i - 1] for i in keep[1:]] for b in t.bold]
    t.notes = t.notes[1:]
    assert _table_html(t) == EXPECTED_TWO_CLASS
