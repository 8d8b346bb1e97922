"""Mutation audit of temperature scaling (`metrics.calibration`, evaluate_split's
``temperature=`` path, `evaluate --calibrate`): behaviours the earlier tests let slip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.special import softmax
from test_operating_point import erm_run  # noqa: F401  (fixture: a tiny 2-epoch ERM run)

import causalign.cli as cli_module
import causalign.engine.evaluate as evaluate_module
import causalign.report.figures as figures_module
from causalign.cli import main
from causalign.data import LesionDataset
from causalign.engine import load_run
from causalign.engine.evaluate import evaluate_split
from causalign.errors import CausalignError, InputError
from causalign.metrics import bootstrap_ci, expected_calibration_error
from causalign.metrics.calibration import (
    PROB_FLOOR,
    apply_temperature,
    fit_temperature,
    log_probabilities,
)


def _fit_quietly(probs: np.ndarray, y: np.ndarray, **kw) -> tuple[float, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit_temperature(probs, y, **kw)
    return t, [str(w.message) for w in caught]


def _ref_nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: mean −log p[label], floored as documented."""
    return float(-np.log(np.maximum(probs[np.arange(len(y)), y], PROB_FLOOR)).mean())


def test_log_probabilities_of_logits_are_normalised():
    """``logits=True`` returns log-softmax rows (exp sums to 1), not the raw logits
    (kills: the logits path returning z unnormalised, which the fit alone cannot see)."""
    z = np.array([[3.0, -1.0, 0.5], [0.0, 2.0, 10.0]])
    logp, y = log_probabilities(z, np.array([0, 2]), logits=True)
    ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    assert np.allclose(logp, ref, atol=1e-12) and y.tolist() == [0, 2]


def test_logits_path_checks_labels_and_finiteness():
    """The logits path refuses out-of-range labels and NaN/inf logits with InputError
    (kills: the label check or the isfinite check dropped from the logits branch)."""
    z = np.array([[3.0, -1.0], [0.0, 2.0]])
    with pytest.raises(InputError, match="labels must lie in"):
        fit_temperature(z, np.array([0, 5]), logits=True)
    with pytest.raises(InputError, match="NaN/inf"):
        fit_temperature(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), logits=True)


def test_uniform_probabilities_warn_no_signal_at_the_upper_bound():
    """Uniform probabilities make the NLL flat: Brent's own point lies within 1e-6 of
    T_MAX with the same NLL as the bound, and that alone must warn, naming 'no signal'
    (kills: the `min(s - lo, hi - s) < 1e-6` clause dropped; the warning's
    separable/no-signal branch flipped)."""
    t, msgs = _fit_quietly(np.full((4, 2), 0.5), np.array([0, 1, 0, 1]))
    assert t == pytest.approx(100.0, rel=1e-6)
    assert len(msgs) == 1 and "search bound" in msgs[0] and "no signal" in msgs[0], msgs
    # anti-correlated probabilities: the NLL falls towards T → ∞, the bound itself wins
    t, msgs = _fit_quietly(np.array([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1], [0.4, 0.6]]),
                           np.array([1, 0, 1, 0]))
    assert t == pytest.approx(100.0) and "no signal" in msgs[0], msgs


def test_fit_reaches_a_large_temperature():
    """A model over-confident by a factor 30 is fitted at T ≈ 30, inside [0.01, 100]
    (kills: T_MAX lowered to 10, which would clip the demo ERM's T = 14.6)."""
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 2.0, (20000, 2))
    y = (rng.random(20000) > softmax(z, axis=1)[:, 0]).astype(int)
    t, msgs = _fit_quietly(softmax(30.0 * z, axis=1), y)
    assert t == pytest.approx(30.0, rel=0.1) and not msgs


def test_apply_temperature_floors_zeros_and_refuses_1d():
    """apply_temperature floors exact zeros (and a half-precision softmax's tiny
    negatives) at PROB_FLOOR before the log, so a large T lifts them to
    PROB_FLOOR**(1/T) relative, not 0 or NaN; 1-D input is an InputError
    (kills: np.log(p) unfloored; the ndim check dropped)."""
    p = np.array([[1.0, 0.0], [1.0 + 1e-4, -1e-4]])
    q = apply_temperature(p, 100.0)
    logp = np.log(np.maximum(p, PROB_FLOOR)) / 100.0
    ref = np.exp(logp - np.log(np.exp(logp).sum(axis=1, keepdims=True)))
    assert np.isfinite(q).all() and np.allclose(q, ref, rtol=1e-12, atol=0)
    assert q[0, 1] == pytest.approx(PROB_FLOOR ** 0.01 / (1 + PROB_FLOOR ** 0.01), rel=1e-9)
    with pytest.raises(InputError, match=r"probs must be \(N, classes\)"):
        apply_temperature(np.array([0.5, 0.5]), 1.0)


@pytest.fixture(scope="module")
def loaded(tiny_data, erm_run):  # noqa: F811
    _, model, method, _ = load_run(erm_run, device="cpu")
    return model, method, LesionDataset(tiny_data, "test")


def test_evaluate_split_calibration_block_against_references(loaded, tmp_path, monkeypatch):
    """evaluate_split(temperature=0.05 (a sharpening T, so the scaled
    probabilities spread over the bins), ece_bins=5, bootstrap=100): nll/brier/ece are those of
    the scaled probabilities at the split's own bin count, *_before those of the model's,
    ci95.calibration the bootstrap of the scaled ones at the same bins, and the diagram's
    panels are (before: unscaled, after: scaled) (kills: nll_before of the scaled
    probabilities, brier after = before, ECE after or its interval at the default 15 bins,
    the panels swapped)."""
    model, method, ds = loaded
    captured = {}
    monkeypatch.setattr(figures_module, "reliability_diagram",
                        lambda panels, path, n_bins: captured.update(panels=panels, n=n_bins))
    m = evaluate_split(model, method, ds, "cpu", temperature=0.05, ece_bins=5,
                       bootstrap=100, bootstrap_seed=4, reliability=tmp_path / "r.png",
                       predictions=tmp_path / "p.csv")
    pred = evaluate_module.read_predictions(tmp_path / "p.csv")
    p, y = pred.probs, pred.labels
    q = apply_temperature(p, 0.05)
    cal = m["calibration"]
    assert cal["temperature"] == 0.05
    assert cal["nll"] == pytest.approx(_ref_nll(q, y), abs=1e-6)
    assert cal["nll_before"] == pytest.approx(_ref_nll(p, y), abs=1e-6)
    assert cal["nll"] != pytest.approx(cal["nll_before"], abs=1e-6)
    # two classes: the Brier score is the mean of (p₁ − y)² (README, Metrics)
    assert cal["brier"] == pytest.approx(float(((q[:, 1] - y) ** 2).mean()), abs=1e-6)
    assert cal["brier_before"] == pytest.approx(float(((p[:, 1] - y) ** 2).mean()), abs=1e-6)
    assert cal["ece"] == pytest.approx(expected_calibration_error(q, y, 5), abs=1e-6)
    assert cal["ece"] != pytest.approx(expected_calibration_error(q, y, 15), abs=1e-9)
    ref = bootstrap_ci(q, y, 100, 4, ece_bins=5)["ci95"]
    got = m["ci95"]["calibration"]
    assert set(got) == {"brier", "ece"}
    for k in got:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
    (before, (pb, _)), (after, (pa, _)) = captured["panels"].items()
    assert before.endswith(", before") and after.endswith(", after T=0.05")
    assert np.allclose(pb, p, atol=1e-6) and np.allclose(pa, q, atol=1e-6)
    assert captured["n"] == 5


def test_evaluate_split_refuses_a_bad_temperature_before_writing(loaded, tmp_path):
    """A bad temperature is refused before the pass: no predictions CSV is left behind
    (kills: evaluate_split's up-front check_temperature dropped, which left the CSV
    written and failed only in apply_temperature after the whole pass)."""
    model, method, ds = loaded
    with pytest.raises(InputError, match="temperature must be"):
        evaluate_split(model, method, ds, "cpu", temperature=-1.0,
                       predictions=tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def _evaluate(args: list[str], capsys) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 16-image val split may fit T at a bound
        rc = main(args)
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc in (0, None) else None), cap.err


def test_cli_predicts_val_once_for_operating_point_and_calibrate(erm_run, capsys,  # noqa: F811
                                                                 monkeypatch):
    """--operating-point youden with --calibrate temperature predicts the val split once
    and both report the same n_chosen_on; the calibration block's keys come in the README's
    order (kills: on_val's cache bypassed, val predicted twice; the block built with
    **fitted first)."""
    calls = []
    real = evaluate_module.predict

    def counting(model, method, ds, *a, **kw):
        calls.append(ds.split)
        return real(model, method, ds, *a, **kw)

    monkeypatch.setattr(evaluate_module, "predict", counting)
    rc, out, err = _evaluate(["evaluate", str(erm_run), "--operating-point", "youden",
                              "--calibrate", "temperature", "--no-progress"], capsys)
    assert rc in (0, None), err
    assert calls.count("val") == 1, calls
    cal = out["calibration"]
    assert list(cal) == ["method", "temperature", "chosen_on", "n_chosen_on", "nll", "brier",
                         "ece", "nll_before", "brier_before", "ece_before"]
    assert cal["n_chosen_on"] == out["operating_point"]["n_chosen_on"] == 16


def test_cli_names_the_option_when_val_is_missing(erm_run, capsys, monkeypatch):  # noqa: F811
    """With no val split, --calibrate's one-line error names the option and the val split
    (kills: on_val's error losing its option prefix)."""
    real = cli_module._split_for_model

    def no_val(data_path, split, *a, **kw):
        if split == "val":
            raise CausalignError("no split 'val' here")
        return real(data_path, split, *a, **kw)

    monkeypatch.setattr(cli_module, "_split_for_model", no_val)
    rc, _, err = _evaluate(["evaluate", str(erm_run), "--calibrate", "temperature",
                            "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines == ["error: --calibrate temperature fits its temperature on the "
                                 "val split: no split 'val' here"], lines
