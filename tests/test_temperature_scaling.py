"""Temperature scaling (`causalign.metrics.calibration`, `evaluate --calibrate temperature`):
T fitted on val by NLL, checked against a brute-force grid and a known true temperature;
the CLI's T is the fit on the val predictions it writes, its ECE that of the scaled test
probabilities, the argmax and AUC unchanged."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score
from test_operating_point import erm_run  # noqa: F401  (fixture: a tiny 2-epoch ERM run)

from causalign.cli import main
from causalign.engine.evaluate import read_predictions
from causalign.errors import InputError
from causalign.metrics import bootstrap_ci, expected_calibration_error
from causalign.metrics.calibration import (
    PROB_FLOOR,
    apply_temperature,
    fit_temperature,
    negative_log_likelihood,
)


def _grid_nll(probs: np.ndarray, y: np.ndarray, temps: np.ndarray) -> np.ndarray:
    """Independent reference: mean −log softmax(log p / T)[y] for each T, computed with
    NumPy directly (logsumexp by hand), not through the module."""
    logp = np.log(np.maximum(probs, PROB_FLOOR))
    out = []
    for t in temps:
        z = logp / t
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
        out.append(float((lse - z[np.arange(len(y)), y]).mean()))
    return np.array(out)


def _known_temperature(n: int, k: float, classes: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) and probabilities softmax(k·z): calibrated at T = k."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, classes))
    true = softmax(z, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(true, axis=1)).sum(axis=1)
    return softmax(k * z, axis=1), np.minimum(y, classes - 1)


@pytest.mark.parametrize(("k", "classes"), [(2.5, 2), (0.5, 3), (1.0, 4)])
def test_fit_recovers_a_known_temperature(k, classes):
    probs, y = _known_temperature(20000, k, classes, seed=int(10 * k) + classes)
    t = fit_temperature(probs, y)
    assert t == pytest.approx(k, rel=0.05)
    # logits give the same T: softmax is shift-invariant
    z = np.log(probs) + 3.0
    assert fit_temperature(z, y, logits=True) == pytest.approx(t, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_is_the_grid_minimum_of_the_nll(seed):
    probs, y = _known_temperature(400, 1.0 + seed, 2 + seed, seed)
    t = fit_temperature(probs, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))  # steps of 0.15 % in T
    nll = _grid_nll(probs, y, grid)
    i = int(np.argmin(nll))
    assert grid[max(i - 1, 0)] <= t <= grid[min(i + 1, len(grid) - 1)]
    # and no grid point beats the fitted T
    assert _grid_nll(probs, y, np.array([t]))[0] <= nll.min() + 1e-12
    assert negative_log_likelihood(apply_temperature(probs, t), y) == pytest.approx(
        _grid_nll(probs, y, np.array([t]))[0], abs=1e-12)


def test_scaling_keeps_the_argmax_and_the_two_class_auc():
    # margins up to ~16: no float64 p₁ saturates at 1.0, whose ties scaling would break
    # (log p₀ still ranks them), the one way the AUC can move
    probs, y = _known_temperature(500, 1.0, 2, seed=5)
    for t in (0.3, 1.0, 2.7):
        q = apply_temperature(probs, t)
        assert np.allclose(q.sum(axis=1), 1.0)
        assert (q.argmax(axis=1) == probs.argmax(axis=1)).all()
        assert roc_auc_score(y, q[:, 1]) == pytest.approx(roc_auc_score(y, probs[:, 1]),
                                                          abs=1e-12)
    assert np.allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)


def test_exact_zeros_are_floored_not_infinite():
    """A float64 softmax's exact 0 (margin > 745) reads as the floor: finite fit, no NaN."""
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 1, 1, 1, 0])
    t = fit_temperature(probs, y)
    assert np.isfinite(t) and t > 0
    q = apply_temperature(probs, t)
    assert np.isfinite(q).all() and (q.argmax(1) == probs.argmax(1)).all()
    assert np.isfinite(negative_log_likelihood(probs, np.array([1, 0, 0, 0, 0])))


def test_refuses_one_class_empty_and_bad_temperatures():
    with pytest.raises(InputError, match="at least two classes"):
        fit_temperature(np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]))
    with pytest.raises(InputError, match="empty"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))
    with pytest.raises(InputError, match="not logits"):
        fit_temperature(np.array([[3.0, -1.0], [0.0, 2.0]]), np.array([0, 1]))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="temperature must be"):
            apply_temperature(np.array([[0.5, 0.5]]), bad)


def test_a_separable_split_warns_at_the_bound():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1], [0.4, 0.6]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit_temperature(probs, np.array([0, 1, 0, 1]))
    assert t == pytest.approx(1e-2) and any("search bound" in str(w.message) for w in caught)


def test_cli_fits_on_val_and_scales_the_test_split(erm_run, tmp_path, capsys):  # noqa: F811
    capsys.readouterr()
    out = {}
    for split in ("val", "test"):
        args = ["evaluate", str(erm_run), "--split", split, "--calibrate", "temperature",
                "--predictions", str(tmp_path / f"{split}.csv"), "--no-progress"]
        if split == "test":
            args += ["--bootstrap", "200", "--bootstrap-seed", "3",
                     "--reliability", str(tmp_path / "rel.png")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a tiny val split may fit T at a bound
            rc = main(args)
        assert rc in (0, None), capsys.readouterr().err
        out[split] = json.loads(capsys.readouterr().out)
    val, test = read_predictions(tmp_path / "val.csv"), read_predictions(tmp_path / "test.csv")
    cal = out["test"]["calibration"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = fit_temperature(val.probs, val.labels)
    assert cal["temperature"] == pytest.approx(t, rel=1e-9)
    assert (cal["method"], cal["chosen_on"], cal["n_chosen_on"]) == (
        "temperature", "val", len(val.labels))
    assert out["val"]["calibration"]["temperature"] == pytest.approx(t, rel=1e-9)
    assert "optimistic" in out["val"]["calibration"]["note"] and "note" not in cal
    q = apply_temperature(test.probs, t)
    assert cal["ece"] == pytest.approx(expected_calibration_error(q, test.labels), abs=1e-12)
    assert cal["ece_before"] == pytest.approx(out["test"]["ece"], abs=1e-15)
    assert cal["brier_before"] == pytest.approx(out["test"]["brier"], abs=1e-15)
    assert cal["nll"] == pytest.approx(negative_log_likelihood(q, test.labels), abs=1e-12)
    # the model's own metrics are unscaled: accuracy is the CSV's argmax, unchanged by T
    assert (q.argmax(1) == test.predicted).all()
    assert out["test"]["accuracy"] == pytest.approx((test.predicted == test.labels).mean())
    assert out["test"]["auc"] == pytest.approx(roc_auc_score(test.labels, q[:, 1]), abs=1e-12)
    # the scaled intervals are bootstrap_ci of the scaled probabilities with the same seed
    ref = bootstrap_ci(q, test.labels, 200, 3)["ci95"]
    got = out["test"]["ci95"]["calibration"]
    assert set(got) == {"ece", "brier"}
    for name in got:
        assert got[name] == pytest.approx(ref[name], abs=1e-12), name
    assert got["ece"] != out["test"]["ci95"]["ece"]  # the scaled ones, not the model's
    # two panels (before, after): 2 × 3.6 in at 110 dpi wide, one would be ~396 px
    width = int.from_bytes((tmp_path / "rel.png").read_bytes()[16:20], "big")
    assert width > 700, width


def test_cli_refuses_an_unknown_method_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    rc = main(["evaluate", str(tmp_path / "no-such-run"), "--calibrate", "platt"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0] == (
        "error: --calibrate platt: unknown method; choose from temperature"), lines
