"""Adversarial review of the evaluation options as merged together (`--positive`,
`--operating-point threshold=TA,TB`, `--bootstrap`, `--calibrate`, `--roc`, `predict
--threshold/--temperature`): the combinations nobody tested after the hand merge."""

from __future__ import annotations

import numpy as np
import pytest
import test_operating_point
from test_audit_compare_1207f import _error_line, _write_csv
from test_multiclass import BUSI

from causalign.data.format import LesionDataset
from causalign.engine.evaluate import evaluate_split
from causalign.engine.evaluate import predict as predict_split
from causalign.engine.inference import _check_threshold
from causalign.engine.trainer import load_run
from causalign.errors import InputError
from causalign.metrics import operating_point as op_module
from causalign.metrics.operating_point import OperatingPoint
from causalign.metrics.roc import roc_band

# the 2-epoch ERM run on the two-class tiny benchmark (one training for several files)
erm_run = test_operating_point.erm_run


def _unbalanced(data):
    """Samples of unequal class counts: with equal ones, drawing the classes in the other
    order happens to give the same percentiles, which hid the defect below."""
    ds = LesionDataset(data, "train", limit=29)
    counts = np.bincount([int(ds.labels[i]) for i in range(len(ds))], minlength=2)
    assert counts[0] != counts[1] and counts.min() >= 5, counts
    return ds


def _three_class_csvs(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(30)]
    y = np.arange(30) % 3
    for name in ("a.csv", "b.csv"):
        _write_csv(tmp_path / name, ids, y, rng.dirichlet([1, 1, 1], 30), classes=BUSI)
    return tmp_path / "a.csv", tmp_path / "b.csv"


def test_compare_pair_without_positive_names_the_pair_given(tmp_path, capsys):
    """`compare --operating-point threshold=0.3,0.6` on a 3-class pair without --positive
    was refused naming `--operating-point threshold=0.3`, a rule the user never gave (the
    pair is parsed as its first value for the checks)."""
    a, b = _three_class_csvs(tmp_path)
    line = _error_line(capsys, ["compare", str(a), str(b), "--operating-point",
                                "threshold=0.3,0.6"])
    assert "--operating-point threshold=0.3,0.6: " in line
    assert "give --positive CLASS" in line


@pytest.mark.parametrize("positive, expect", [(None, "--threshold 0.3: "),
                                              ("cancer", "--positive: ")])
def test_predict_threshold_refusals_name_the_option(positive, expect):
    """`predict --threshold 0.3` on a 3-class run without --positive said only "an operating
    point on a 3-class run needs its positive class" (which option?), and an unknown
    `--positive cancer` "positive class 'cancer': …"; `evaluate` and `compare` name it."""
    with pytest.raises(InputError) as e:
        _check_threshold(0.3, BUSI, positive)
    assert str(e.value).startswith(expect), str(e.value)
    assert "normal, benign, malignant" in str(e.value)


def test_guard_predict_threshold_default_positive_on_two_classes():
    """Guard: two classes need no --positive (class 1), and an index is a class."""
    assert _check_threshold(0.3, ["benign", "malignant"]) == 1
    assert _check_threshold(0.3, BUSI, "0") == 0


@pytest.mark.parametrize("positive", [0, 1])
def test_with_threshold_test_draws_are_those_of_ci95_operating_point(
        tiny_data, erm_run, monkeypatch, positive):
    """`ci95.operating_point_with_threshold`'s test draws are documented as those of
    `ci95.operating_point` (only the threshold's re-choice differs). With --positive 0 on two
    classes (or any class of more) the one-vs-rest labels were stratified instead, so the
    draws differed. With the threshold held fixed on every val draw the two blocks' rates
    must then agree exactly (positive 1: a guard)."""
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = _unbalanced(tiny_data)
    p, y, _ = predict_split(model, method, ds, "cpu")
    t = float(np.median(p[:, positive]))
    # every val resample "chooses" t: the with-threshold block is then the fixed one's
    monkeypatch.setattr(op_module, "choose_threshold", lambda *a, **k: t)
    point = OperatingPoint.parse("youden")
    m = evaluate_split(model, method, ds, "cpu", saliency="gradient", threshold=t,
                       bootstrap=200, positive=positive, chosen_by=(point, p, y),
                       fractions=(0.1,))
    fixed, again = m["ci95"]["operating_point"], m["ci95"]["operating_point_with_threshold"]
    assert again["threshold"] == pytest.approx([t, t])
    for k in ("sensitivity", "specificity"):
        assert again[k] == pytest.approx(fixed[k], abs=1e-12), k


def test_roc_band_for_another_positive_uses_the_intervals_draws(tiny_data, erm_run,
                                                                 monkeypatch):
    """`evaluate --roc --bootstrap N --operating-point … --positive 0`: the band is drawn
    from the stratified resamples the intervals use (`roc_band(p, y, positive=0)`, sorted
    and stratified by the split's classes), not from those of the relabelled one-vs-rest
    problem (another draw order, another band)."""
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = _unbalanced(tiny_data)
    p, y, _ = predict_split(model, method, ds, "cpu")
    seen = {}

    def spy(curves, path, title=None, points=None, bands=None):
        seen.update(bands or {})

    import causalign.report.figures as figures

    # evaluate_split imports roc_figure when it draws: the module's attribute is the one used
    monkeypatch.setattr(figures, "roc_figure", spy)
    evaluate_split(model, method, ds, "cpu", saliency="gradient", threshold=0.5,
                   bootstrap=200, positive=0, roc="unused.png", fractions=(0.1,))
    (band,) = seen.values()
    want = roc_band(p, y, 200, 0, positive=0)
    np.testing.assert_allclose(band["lo"], want["lo"])
    np.testing.assert_allclose(band["hi"], want["hi"])


def test_compare_threshold_on_a_temperature_scaled_csv_says_so(tmp_path, capsys):
    """`predict --temperature T` CSVs hold softmax(logits / T); `compare --operating-point
    threshold=0.45` on one applied the threshold (on the uncalibrated scale where `evaluate`
    chose it) to the scaled probabilities, silently: read_predictions dropped the column.
    It now warns in one line and records the T beside the threshold."""
    from causalign.cli import main

    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(20)]
    y = np.arange(20) % 2
    _write_csv(tmp_path / "a.csv", ids, y, rng.dirichlet([1, 1], 20))
    _write_csv(tmp_path / "b.csv", ids, y, rng.dirichlet([1, 1], 20))
    text = (tmp_path / "b.csv").read_text().splitlines()
    scaled = [text[0] + ",temperature"] + [row + ",3" for row in text[1:]]
    (tmp_path / "b.csv").write_text("\n".join(scaled) + "\n")
    out = tmp_path / "c.json"
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--operating-point", "threshold=0.45", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "temperature 3" in err[0] and "b.csv" in err[0], err
    import json

    op = json.loads(out.read_text())["operating_point"]
    assert op["temperature_b"] == 3 and "temperature_a" not in op


def test_guard_compare_uncalibrated_csvs_warn_nothing(tmp_path, capsys):
    """Guard: the model's own probabilities (no temperature column) get no warning."""
    from causalign.cli import main

    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(20)]
    y = np.arange(20) % 2
    for name in ("a.csv", "b.csv"):
        _write_csv(tmp_path / name, ids, y, rng.dirichlet([1, 1], 20))
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--operating-point", "threshold=0.45"]) == 0
    assert not capsys.readouterr().err.strip()


def test_compare_roc_title_of_one_positive_class_is_its_own_delong(tmp_path, monkeypatch):
    """`compare --roc --operating-point … --positive benign` on 3 classes draws only benign's
    curve against the rest, but its title read "ROC curves (one-vs-rest per class) · benign
    vs rest". It now gives that curve's AUCs and DeLong p (`delong_one_vs_rest.benign`)."""
    import json

    import causalign.report.figures as figures
    from causalign.cli import main

    seen = {}
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, title=None, **k: seen.update(title=title,
                                                                          n=len(curves)))
    a, b = _three_class_csvs(tmp_path)
    out = tmp_path / "c.json"
    assert main(["compare", str(a), str(b), "--operating-point", "threshold=0.4",
                 "--positive", "benign", "--roc", str(tmp_path / "roc.png"), "--out",
                 str(out)]) == 0
    test = json.loads(out.read_text())["delong_one_vs_rest"]["benign"]
    assert seen["title"] == (f"AUC {test['auc_a']:.3f} vs {test['auc_b']:.3f}, DeLong p = "
                             f"{test['p_value']:.3g} · benign vs rest")
