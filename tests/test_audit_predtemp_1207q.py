"""`predict --temperature T`: the calibrated probabilities `evaluate --calibrate temperature`
scores, at prediction time; and the operating point's scale when `evaluate --operating-point`
and `--calibrate temperature` are given together (`threshold_calibrated`)."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax
from test_operating_point import erm_run  # noqa: F401  (fixture: a tiny 2-epoch ERM run)

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.engine import predict_images
from causalign.engine.evaluate import _input, read_predictions
from causalign.engine.trainer import load_run
from causalign.errors import InputError
from causalign.metrics import expected_calibration_error
from causalign.metrics.calibration import apply_temperature, calibrated_threshold


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _p(rows: list[dict]) -> np.ndarray:
    cols = [c for c in rows[0] if c.startswith("p_")]
    return np.array([[float(r[c]) for c in cols] for r in rows])


def _predict(run, data, out, *extra: str) -> list[dict]:
    rc = main(["predict", str(run), str(data), "--out", str(out), "--no-progress", *extra])
    assert rc in (0, None)
    return _rows(out)


def _evaluate(run, capsys, *extra: str) -> dict:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny val split may fit T at a bound
        rc = main(["evaluate", str(run), "--calibrate", "temperature", "--no-progress",
                   *extra])
    assert rc in (0, None), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_predict_temperature_is_softmax_of_the_models_logits_over_t(erm_run, tiny_data,  # noqa: F811
                                                                     tmp_path):
    """predict --temperature 2.5: p_<class> = softmax(logits / 2.5) of the model's own
    logits, computed here from one forward pass; `temperature` column recorded."""
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    model.eval()
    with torch.no_grad():
        z = model(_input(model, method, ds.batch(torch.arange(len(ds))))).double().numpy()
    rows = _predict(erm_run, tiny_data, tmp_path / "p.csv", "--temperature", "2.5")
    assert np.allclose(_p(rows), softmax(z / 2.5, axis=1), rtol=0, atol=1e-9)
    assert {r["temperature"] for r in rows} == {"2.5"}
    # the API returns the same scaled probabilities
    got = predict_images(erm_run, tiny_data, temperature=2.5)
    assert got.temperature == 2.5
    assert np.allclose(got.probs, softmax(z / 2.5, axis=1), rtol=0, atol=1e-9)


def test_predict_temperature_gives_evaluates_calibrated_probabilities(erm_run, tiny_data,  # noqa: F811
                                                                      tmp_path, capsys):
    """evaluate --calibrate temperature --predictions, then predict --temperature <its T> on
    the same test images: predict's probabilities are apply_temperature of evaluate's CSV,
    and their ECE / Brier are evaluate's calibration.ece / brier."""
    m = _evaluate(erm_run, capsys, "--predictions", str(tmp_path / "e.csv"))
    t = m["calibration"]["temperature"]
    ev = read_predictions(tmp_path / "e.csv")
    rows = _predict(erm_run, tiny_data, tmp_path / "p.csv", "--temperature", repr(t))
    q = _p(rows)
    assert [r["id"] for r in rows] == ev.ids
    assert np.allclose(q, apply_temperature(ev.probs, t), rtol=0, atol=1e-12)
    assert expected_calibration_error(q, ev.labels) == pytest.approx(
        m["calibration"]["ece"], abs=1e-12)
    brier = float(((q[:, 1] - ev.labels) ** 2).mean())  # two classes: on p₁
    assert brier == pytest.approx(m["calibration"]["brier"], abs=1e-12)


def test_temperature_one_leaves_the_probabilities_identical(erm_run, tiny_data, tmp_path):  # noqa: F811
    """--temperature 1: every column as without the flag, to the last digit (the
    log-softmax round trip used to move them by an ulp), plus temperature=1.
    Failed before the identity in apply_temperature (p_ columns differed in the 17th
    digit)."""
    plain = _predict(erm_run, tiny_data, tmp_path / "a.csv")
    one = _predict(erm_run, tiny_data, tmp_path / "b.csv", "--temperature", "1")
    assert [{k: v for k, v in r.items() if k != "temperature"} for r in one] == plain
    assert {r["temperature"] for r in one} == {"1"}
    p = np.array([[0.3, 0.7], [1.0, 0.0]])
    assert (apply_temperature(p, 1.0) == p).all()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_temperature_is_refused_in_one_line_before_any_work(value, tmp_path, capsys):
    """--temperature 0 / -1 / nan / inf: exit 2, one `error:` line, before the run is read
    (the run does not exist here); the API raises InputError."""
    capsys.readouterr()
    rc = main(["predict", str(tmp_path / "no-run"), str(tmp_path), "--out",
               str(tmp_path / "p.csv"), "--temperature", value])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --temperature: temperature must be a finite number "
                               "> 0"), lines
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(InputError, match="temperature must be a finite number"):
        predict_images(tmp_path / "no-run", tmp_path, temperature=float(value))


def test_calibrated_threshold_is_the_thresholds_image_at_t():
    """calibrated_threshold(t, T) = sigmoid(logit(t) / T), monotone: p₁ ≥ t ⇒ q₁ ≥ it, and
    q₁ > it ⇒ p₁ ≥ t (equality only where float64 saturates q₁, the reason predict keeps
    thresholds on the uncalibrated scale), scores of exactly 0 and 1 included."""
    rng = np.random.default_rng(0)
    p1 = np.concatenate([rng.random(500), [0.0, 1.0, 0.25]])
    p = np.stack([1 - p1, p1], axis=1)
    for temp in (0.05, 0.7, 3.0, 14.6, 100.0):
        q1 = apply_temperature(p, temp)[:, 1]
        for t in (*rng.random(20), 0.0, 1.0):
            tc = calibrated_threshold(float(t), temp)
            assert (q1[p1 >= t] >= tc).all() and (p1[q1 > tc] >= t).all(), (temp, t)
    assert calibrated_threshold(0.5, 7.0) == pytest.approx(0.5, abs=1e-15)
    assert calibrated_threshold(0.1, 2.0) == pytest.approx(
        1 / (1 + math.exp(-math.log(0.1 / 0.9) / 2)), rel=1e-12)
    # T 0.05 saturates: every p₁ above ~0.863 is exactly 1.0 once scaled
    assert calibrated_threshold(0.9, 0.05) == 1.0
    with pytest.raises(InputError):
        calibrated_threshold(0.5, 0.0)


def test_operating_point_with_calibrate_states_its_scale_and_predict_reproduces_it(
        erm_run, tiny_data, tmp_path, capsys):  # noqa: F811
    """evaluate --operating-point youden --calibrate temperature: the threshold is chosen on
    the uncalibrated val probabilities (`probabilities: "uncalibrated"`), with
    `threshold_calibrated` its image at T. predict --threshold <threshold> calls the same
    images with and without --temperature T (the threshold stays on the model's own p₁),
    as many as evaluate's tp + fp, and with both flags records threshold_calibrated."""
    m = _evaluate(erm_run, capsys, "--operating-point", "youden")
    op, t = m["operating_point"], m["calibration"]["temperature"]
    assert op["probabilities"] == "uncalibrated"
    assert op["threshold_calibrated"] == calibrated_threshold(op["threshold"], t)
    raw = _predict(erm_run, tiny_data, tmp_path / "r.csv", "--threshold", repr(op["threshold"]))
    cal = _predict(erm_run, tiny_data, tmp_path / "c.csv", "--temperature", repr(t),
                   "--threshold", repr(op["threshold"]))
    assert [r["called_class"] for r in raw] == [r["called_class"] for r in cal]
    positive = [c[2:] for c in raw[0] if c.startswith("p_")][1]
    assert sum(r["called_class"] == positive for r in raw) == op["tp"] + op["fp"], op
    assert {float(r["threshold_calibrated"]) for r in cal} == {op["threshold_calibrated"]}
    assert "threshold_calibrated" not in raw[0]
    # without --calibrate the scale is still said, and no calibrated threshold is made up
    capsys.readouterr()
    assert main(["evaluate", str(erm_run), "--operating-point", "youden",
                 "--no-progress"]) in (0, None)
    plain = json.loads(capsys.readouterr().out)["operating_point"]
    assert plain["probabilities"] == "uncalibrated" and "threshold_calibrated" not in plain


def test_predict_threshold_with_temperature_calls_on_the_models_own_p1():
    """Predictions.called with a temperature compares the uncalibrated p₁: a small T
    saturates the scaled p₁ at 1.0, and the calls must not change with T."""
    from causalign.engine.inference import Predictions, _with_threshold

    own = np.array([[0.1, 0.9], [0.07, 0.93], [0.05, 0.95], [0.7, 0.3]])
    plain = _with_threshold(Predictions(ids=list("abcd"), sources=list("abcd"),
                                        probs=own.copy(), classes=["n", "p"]), 0.92)
    hot = _with_threshold(Predictions(ids=list("abcd"), sources=list("abcd"),
                                      probs=own.copy(), classes=["n", "p"]), 0.92, 0.05)
    assert (hot.probs[:3, 1] == 1.0).all()  # saturated: no threshold could rank them
    assert plain.called.tolist() == hot.called.tolist() == [0, 1, 1, 0]
    assert (hot.uncalibrated == own).all()


def test_multiview_volume_run_scales_its_pooled_log_probabilities(tmp_path):
    """A multi-view volume run outputs log Σ w p (a pooled log-probability, not logits):
    predict --temperature 2 gives softmax(output / 2), the probabilities evaluate_split's
    calibration block scores at T = 2 (its ECE recomputed from predict's CSV)."""
    from causalign.data.synth import SynthConfig, generate
    from causalign.engine import TrainConfig, train
    from causalign.engine.evaluate import evaluate_split

    data, run = tmp_path / "vol", tmp_path / "run"
    generate(data, SynthConfig(n_train=16, n_val=8, n_test=8, size=32, depth=4, seed=5))
    train(data, TrainConfig(method="erm", model="multiview", epochs=1, batch_size=8, width=4,
                            seed=0), run, progress=False)
    _, model, method, _ = load_run(run, device="cpu")
    ds = LesionDataset(data, "test")
    model.eval()
    with torch.no_grad():
        out = model(_input(model, method, ds.batch(torch.arange(len(ds))))).double().numpy()
    assert np.allclose(softmax(out, axis=1).sum(axis=1), 1.0)  # a log-probability
    rows = _predict(run, data, tmp_path / "p.csv", "--temperature", "2")
    q = _p(rows)
    assert np.allclose(q, softmax(out / 2, axis=1), rtol=0, atol=1e-9)
    m = evaluate_split(model, method, ds, "cpu", saliency="wbp", temperature=2.0)
    y = np.array([int(r["label"]) for r in rows])
    assert expected_calibration_error(q, y) == pytest.approx(m["calibration"]["ece"],
                                                             abs=1e-9)
