"""`evaluate --predictions` with temperature scaling writes the calibrated probabilities
(`pcal_<class>` beside the unchanged `p_<class>`, and a `calibration_temperature` column),
and `evaluate --temperature T` applies a given T instead of fitting one on val (a site
without a val split, or the development site's T carried to another)."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import test_operating_point
from scipy.special import softmax
from test_audit_compare_1207f import _error_line
from test_audit_mcop_1207q import run3  # noqa: F401  (fixture: a 1-epoch 3-class run)

from causalign.cli import main
from causalign.engine.evaluate import read_predictions
from causalign.metrics import expected_calibration_error

# the 2-epoch ERM run on the two-class tiny benchmark (one training for several files)
erm_run = test_operating_point.erm_run


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cols(rows: list[dict], prefix: str) -> np.ndarray:
    cols = [c for c in rows[0] if c.startswith(prefix)]
    return np.array([[float(r[c]) for c in cols] for r in rows])


def _scaled(p: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / T), computed here without causalign's apply_temperature."""
    return softmax(np.log(np.maximum(p, np.finfo(np.float64).tiny)) / t, axis=1)


def _evaluate(run, capsys, *extra: str) -> dict:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny val split may fit T at a bound
        rc = main(["evaluate", str(run), "--no-progress", "--device", "cpu", *extra])
    assert rc in (0, None), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_calibrated_predictions_carry_pcal_columns_equal_to_predict_temperature(
        erm_run, tiny_data, tmp_path, capsys):
    """evaluate --calibrate temperature --predictions: pcal_<class> = softmax(log p / T) of
    the file's own p_<class>, T the JSON's (calibration_temperature column, repr-exact), and
    equal to `predict --temperature T` on the same test images; p_ columns unchanged."""
    m = _evaluate(erm_run, capsys, "--calibrate", "temperature", "--predictions",
                  str(tmp_path / "cal.csv"))
    t = m["calibration"]["temperature"]
    rows = _rows(tmp_path / "cal.csv")
    assert [c for c in rows[0] if c.startswith("pcal_")] == ["pcal_benign", "pcal_malignant"]
    assert {float(r["calibration_temperature"]) for r in rows} == {t}
    q = _cols(rows, "pcal_")
    assert np.allclose(q, _scaled(_cols(rows, "p_"), t), rtol=0, atol=1e-12)
    assert expected_calibration_error(q, np.array([int(r["label"]) for r in rows])) == \
        pytest.approx(m["calibration"]["ece"], abs=1e-12)
    # predict --temperature T on the same images: the same calibrated probabilities
    assert main(["predict", str(erm_run), str(tiny_data), "--out", str(tmp_path / "p.csv"),
                 "--no-progress", "--temperature", repr(t)]) in (0, None)
    pred = _rows(tmp_path / "p.csv")
    assert [r["id"] for r in pred] == [r["id"] for r in rows]
    assert np.allclose(_cols(pred, "p_"), q, rtol=0, atol=1e-12)
    # the p_ columns are the model's own, as without --calibrate
    _evaluate(erm_run, capsys, "--predictions", str(tmp_path / "plain.csv"))
    plain = _rows(tmp_path / "plain.csv")
    assert "calibration_temperature" not in plain[0]
    assert not any(c.startswith("pcal_") for c in plain[0])
    assert [{k: v for k, v in r.items() if k in plain[0]} for r in rows] == plain


def test_readers_see_the_calibrated_file_as_before(erm_run, tmp_path, capsys):
    """read_predictions and compare read a file with pcal_ columns as the plain one: the
    same (uncalibrated) probabilities, no temperature (the `temperature` column is
    predict's, meaning the p_ columns are scaled; these are not)."""
    _evaluate(erm_run, capsys, "--temperature", "3", "--predictions",
              str(tmp_path / "cal.csv"))
    _evaluate(erm_run, capsys, "--predictions", str(tmp_path / "plain.csv"))
    cal, plain = read_predictions(tmp_path / "cal.csv"), read_predictions(tmp_path / "plain.csv")
    assert cal.classes == plain.classes == ["benign", "malignant"]
    assert (cal.probs == plain.probs).all() and cal.ids == plain.ids
    assert cal.temperature is None and plain.temperature is None
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", str(tmp_path / "cal.csv"), str(tmp_path / "plain.csv")]
                    ) in (0, None)
    out = capsys.readouterr().out
    assert "temperature" not in out
    res = json.loads(out)
    assert res["classes"] == ["benign", "malignant"]
    for key in ("accuracy", "auc", "brier", "ece"):
        assert res[f"{key}_a"] == res[f"{key}_b"], key
    # the same numbers compare gives for the plain file against itself
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["compare", str(tmp_path / "plain.csv"), str(tmp_path / "plain.csv")])
    twin = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "auc", "brier", "ece"):
        assert res[f"{key}_a"] == twin[f"{key}_a"], key


def test_given_temperature_scores_the_split_with_it(erm_run, tmp_path, capsys):
    """evaluate --temperature 2.5: calibration after = the test's own softmax(log p / 2.5) of
    the split's p, marked temperature_given, nothing said fitted on val; pcal_ columns at
    2.5."""
    m = _evaluate(erm_run, capsys, "--temperature", "2.5", "--predictions",
                  str(tmp_path / "e.csv"))
    cal = m["calibration"]
    assert cal["temperature"] == 2.5 and cal["temperature_given"] is True
    assert cal["method"] == "temperature"
    assert "chosen_on" not in cal and "n_chosen_on" not in cal
    rows = _rows(tmp_path / "e.csv")
    p, y = _cols(rows, "p_"), np.array([int(r["label"]) for r in rows])
    q = _scaled(p, 2.5)
    assert cal["ece"] == pytest.approx(expected_calibration_error(q, y), abs=1e-12)
    assert cal["ece_before"] == pytest.approx(expected_calibration_error(p, y), abs=1e-12)
    assert cal["brier"] == pytest.approx(float(((q[:, 1] - y) ** 2).mean()), abs=1e-12)
    assert cal["nll"] == pytest.approx(float(-np.log(q[np.arange(len(y)), y]).mean()),
                                       abs=1e-9)
    assert np.allclose(_cols(rows, "pcal_"), q, rtol=0, atol=1e-12)
    assert {r["calibration_temperature"] for r in rows} == {"2.5"}


def test_given_fitted_temperature_equals_calibrate(erm_run, capsys):
    """--temperature <the T --calibrate fitted>: the same calibration numbers and the same
    threshold_calibrated at --operating-point youden as --calibrate temperature."""
    fit = _evaluate(erm_run, capsys, "--calibrate", "temperature", "--operating-point",
                    "youden")
    t = fit["calibration"]["temperature"]
    given = _evaluate(erm_run, capsys, "--temperature", repr(t), "--operating-point", "youden")
    for key in ("temperature", "nll", "brier", "ece", "nll_before", "brier_before",
                "ece_before"):
        assert given["calibration"][key] == fit["calibration"][key], key
    assert given["operating_point"]["threshold_calibrated"] == \
        fit["operating_point"]["threshold_calibrated"]
    assert given["operating_point"]["threshold"] == fit["operating_point"]["threshold"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_given_temperature_refused_in_one_line(value, tmp_path, capsys):
    """evaluate --temperature 0 / -1 / nan / inf: one line, exit 2, before the run is read
    (it does not exist here), worded as predict's."""
    line = _error_line(capsys, ["evaluate", str(tmp_path / "no-run"), "--temperature", value])
    assert line.startswith("error: --temperature: temperature must be a finite number > 0")


def test_temperature_with_calibrate_refused(tmp_path, capsys):
    """--temperature T with --calibrate temperature: one line (fit or give, not both)."""
    line = _error_line(capsys, ["evaluate", str(tmp_path / "no-run"), "--temperature", "2",
                                "--calibrate", "temperature"])
    assert "--temperature" in line and "--calibrate" in line


def test_given_temperature_three_classes_operating_point_refused(run3, capsys):  # noqa: F811
    """3-class run, --operating-point with --positive and --temperature: refused in one line
    as with --calibrate (no threshold_calibrated exists)."""
    _, run = run3
    line = _error_line(capsys, ["evaluate", str(run), "--no-progress", "--device", "cpu",
                                "--operating-point", "youden", "--positive", "2",
                                "--temperature", "2"])
    assert "--temperature" in line and "no threshold_calibrated exists" in line
