"""report.html's "Operating points and calibration" section (report.clinical): thresholds
chosen on val, test sensitivity / specificity, ECE before → after temperature scaling, from the
runs' predictions CSVs only; checked against values computed here independently."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from causalign.engine.evaluate import write_prediction_rows
from causalign.metrics.calibration import apply_temperature, fit_temperature
from causalign.metrics.classification import classification_metrics
from causalign.report import html as report_html
from causalign.report.clinical import clinical_table, run_clinical_values


def _csv(path: Path, probs: np.ndarray, labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = ["benign", "malignant", "other"][:probs.shape[1]]
    write_prediction_rows(path, ["id", "site", "label"],
                          [[f"s{i}", "0", y] for i, y in enumerate(labels)], probs, classes)


def _two(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


def _run(out: Path, dataset: str, label: str, seed: int, val=None, test=None) -> dict:
    """A finished run record whose folder holds the given (probs, labels) CSVs."""
    run_dir = f"runs/{dataset}/{label}/seed{seed}"
    (out / run_dir).mkdir(parents=True, exist_ok=True)
    if val is not None:
        _csv(out / run_dir / "predictions_val.csv", *val)
    if test is not None:
        _csv(out / run_dir / "predictions_test.csv", *test)
    return {"key": f"{dataset}/{label}/seed{seed}", "dataset": dataset, "method": "erm",
            "label": label, "setting": "default", "seed": seed, "status": "done",
            "experiments": ["e"], "config_hash": f"{label}{seed}", "run_dir": run_dir,
            "metrics": {"test": {}}}


def _random_split(rng: np.random.Generator, n: int, classes: int = 2):
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * 2.5
    logits[np.arange(n), y] += 1.2  # informative but not separable, over-confident
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y.tolist()


def _youden_brute(p1: np.ndarray, y: np.ndarray) -> float:
    """Youden's threshold by trying every score (p ≥ t positive), highest of tied optima."""
    best, best_t = -np.inf, None
    for t in sorted(set(p1.tolist())):
        called = p1 >= t
        j = (called & (y == 1)).sum() / (y == 1).sum() - (called & (y == 0)).sum() / (y == 0).sum()
        if j >= best - 1e-12:
            best, best_t = j, t
    return best_t


def _sens_brute(p1: np.ndarray, y: np.ndarray, target: float) -> float:
    """Best specificity with sensitivity ≥ target; among those the lowest threshold."""
    cands = []
    for t in sorted(set(p1.tolist())):
        called = p1 >= t
        if (called & (y == 1)).sum() / (y == 1).sum() >= target:
            cands.append(((~called & (y == 0)).sum(), -t, t))
    return max(cands)[2]


def _rates(p1: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, float, float]:
    """Sensitivity, specificity, PPV, NPV of the calls p ≥ t."""
    called = p1 >= t
    return ((called & (y == 1)).sum() / (y == 1).sum(), (~called & (y == 0)).sum() / (y == 0).sum(),
            (called & (y == 1)).sum() / called.sum(), (~called & (y == 0)).sum() / (~called).sum())


def test_values_match_evaluate_computed_independently(tmp_path):
    """Each cell of a one-seed row is what `evaluate --operating-point youden|sensitivity=0.9
    --calibrate temperature` gives from the same CSVs: thresholds and rates by brute force
    over every val score, ECE as evaluate_split takes it (classification_metrics) before and
    after apply_temperature with T fitted on val."""
    rng = np.random.default_rng(3)
    (pv, yv), (pt, yt) = _random_split(rng, 120), _random_split(rng, 150)
    res = {"runs": [_run(tmp_path, "d", "erm", 0, (pv, yv), (pt, yt))]}
    t = clinical_table(tmp_path, res, "d")
    row = t.rows[0]
    yv, yt = np.asarray(yv), np.asarray(yt)
    ty, ts = _youden_brute(pv[:, 1], yv), _sens_brute(pv[:, 1], yv, 0.9)
    temp = fit_temperature(pv, yv)
    want = [ty, *_rates(pt[:, 1], yt, ty), ts, *_rates(pt[:, 1], yt, ts),
            classification_metrics(pt, yt)["ece"],
            classification_metrics(apply_temperature(pt, temp), yt)["ece"], temp]
    assert row[:2] == ["erm", "1"]
    assert row[2:] == [f"{v:.3f}" for v in want]
    assert 0.01 < temp < 100 and float(row[13]) < float(row[12])  # over-confident: ECE falls
    assert t.notes == [f"test prevalence (PPV and NPV depend on it): malignant "
                       f"{yt.sum()}/{len(yt)} = {yt.mean():.3f}"]


def test_hand_written_seeds_give_mean_and_population_std(tmp_path):
    """Two seeds with known answers: Youden picks 0.6 (seed 0) and 0.4 (seed 1) on val; on the
    test scores (0.3, 0.65 | 0.5, 0.9) they give sensitivity 0.5 / 1 and specificity 0.5 / 0.5:
    cells "0.500 (0.100)", "0.750 (0.250)", "0.500 (0.000)" (numpy mean, std ddof 0, as the
    results table); a separated val split notes T at its search bound."""
    test = (_two([0.3, 0.65, 0.5, 0.9]), [0, 0, 1, 1])
    res = {"runs": [_run(tmp_path, "d", "m", 0, (_two([0.1, 0.2, 0.6, 0.7]), [0, 0, 1, 1]), test),
                    _run(tmp_path, "d", "m", 1, (_two([0.1, 0.3, 0.4, 0.7]), [0, 0, 1, 1]), test)]}
    row = clinical_table(tmp_path, res, "d").rows[0]
    assert row[:5] == ["m", "2", "0.500 (0.100)", "0.750 (0.250)", "0.500 (0.000)"]
    # sensitivity ≥ 0.9 on val: both positives, so the same thresholds as Youden here
    assert row[7:12] == row[2:7]
    notes = clinical_table(tmp_path, res, "d").notes
    assert any("search bound" in n and n.startswith("m seed 0") for n in notes)


def test_run_without_val_or_without_any_predictions_is_noted(tmp_path):
    """A run with only predictions_test.csv: its test ECE, "–" for what needs val, and a note;
    a run with no predictions files (an older run) counts 0 seeds and is noted, no crash."""
    rng = np.random.default_rng(0)
    pt, yt = _random_split(rng, 40)
    res = {"runs": [_run(tmp_path, "d", "noval", 0, None, (pt, yt)),
                    _run(tmp_path, "d", "old", 0)]}
    t = clinical_table(tmp_path, res, "d")
    noval, old = t.rows
    assert noval[1] == "1 (0 with val thresholds)"
    assert noval[12] == f"{classification_metrics(pt, yt)['ece']:.3f}"
    assert noval[2:12] == ["–"] * 10 and noval[13:] == ["–", "–"]
    assert old == ["old", "0", *["–"] * 13]
    assert "noval seed 0: no predictions_val.csv: no threshold chosen, no temperature fitted" \
        in t.notes
    assert any(n.startswith("old seed 0: no predictions_test.csv") for n in t.notes)


def test_three_class_dataset_is_noted_and_keeps_calibration(tmp_path):
    """A 3-class dataset has no positive class: one row per class against the rest (values
    checked in test_audit_clin3_1207q), said in a note; ECE and temperature scaling (all
    classes) are given on the method's first row."""
    rng = np.random.default_rng(1)
    (pv, yv), (pt, yt) = _random_split(rng, 90, 3), _random_split(rng, 90, 3)
    res = {"runs": [_run(tmp_path, "d3", "erm", 0, (pv, yv), (pt, yt))]}
    t = clinical_table(tmp_path, res, "d3")
    assert [r[:3] for r in t.rows] == [["erm", c, "1"] for c in ("benign", "malignant",
                                                                  "other")]
    temp = fit_temperature(pv, yv)
    after = classification_metrics(apply_temperature(pt, temp), yt)["ece"]
    assert t.rows[0][13:] == [f"{classification_metrics(pt, yt)['ece']:.3f}", f"{after:.3f}",
                             f"{temp:.3f}"]
    assert t.notes[0].startswith("3 classes: no positive class")


def test_unreadable_csv_is_a_note_and_other_runs_still_count(tmp_path):
    """A corrupt predictions CSV notes that run (read_predictions' one line) and the method's
    other seeds still fill the row."""
    rng = np.random.default_rng(2)
    good = _run(tmp_path, "d", "m", 0, _random_split(rng, 40), _random_split(rng, 40))
    bad = _run(tmp_path, "d", "m", 1)
    (tmp_path / bad["run_dir"] / "predictions_test.csv").write_text("id,label\nx,1\n")
    t = clinical_table(tmp_path, {"runs": [good, bad]}, "d")
    assert t.rows[0][1] == "1"
    assert any(n.startswith("m seed 1:") and "not a predictions CSV" in n for n in t.notes)


def test_report_page_has_the_section_with_escaped_names(tmp_path):
    """write_report puts the section on the page, after the results tables, every dataset
    a table; a method label and a dataset with HTML in them are escaped, not markup."""
    rng = np.random.default_rng(4)
    evil = "<b>x&y</b>"
    runs = [_run(tmp_path, "d", evil, 0, _random_split(rng, 40), _random_split(rng, 40))]
    (tmp_path / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": runs}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = report_html.write_report(tmp_path).read_text()
    assert "<h2>Operating points and calibration</h2>" in page
    assert evil not in page and "&lt;b&gt;x&amp;y&lt;/b&gt;" in page
    start = page.index("Operating points and calibration")
    assert start < page.index("CAM overlays")


def test_run_values_guard_two_class_keys(tmp_path):
    """Guard: run_clinical_values returns every key the table reads for a two-class run."""
    rng = np.random.default_rng(5)
    d = tmp_path / "r"
    _csv(d / "predictions_val.csv", *_random_split(rng, 30))
    _csv(d / "predictions_test.csv", *_random_split(rng, 30))
    values, notes = run_clinical_values(d)
    assert set(values) == {"n_classes", "ece", "ece_after", "temperature", "test_counts",
                           "classes",
                           *(f"{r}.{k}" for r in ("youden", "sensitivity=0.9")
                             for k in ("threshold", "sensitivity", "specificity", "ppv",
                                       "npv"))}
    assert values["n_classes"] == 2 and notes == []


@pytest.mark.parametrize("labels", [[1, 1, 1, 1]])
def test_val_with_one_class_notes_the_rule(tmp_path, labels):
    """A val split of one class: no threshold and no T (each noted), test ECE still shown."""
    res = {"runs": [_run(tmp_path, "d", "m", 0, (_two([0.6, 0.7, 0.8, 0.9]), labels),
                         (_two([0.2, 0.7]), [0, 1]))]}
    t = clinical_table(tmp_path, res, "d")
    assert t.rows[0][2:12] == ["–"] * 10 and t.rows[0][12] != "–"
    assert any("youden" in n and "both classes" in n for n in t.notes)
    assert any("temperature scaling" in n for n in t.notes)
