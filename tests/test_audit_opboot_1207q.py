"""Operating-point intervals with the threshold's own uncertainty
(`operating_point_bootstrap`, evaluate's ``ci95.operating_point_with_threshold``) and paired
intervals of the rate differences in `compare --operating-point RULE --bootstrap N`
(`paired_operating_point_ci`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_operating_point
from test_audit_compare_1207f import _error_line
from test_compare_operating_point import _compare, _run, _two

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics import bootstrap_ci, paired_operating_point_ci
from causalign.metrics import operating_point as op_module
from causalign.metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    operating_point_bootstrap,
    operating_point_per_sample,
)

RATES = ("sensitivity", "specificity", "ppv", "npv")


def _stratified_draws(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Hand version of the stratified draws (one chunk: the splits here are small): per
    class in class order, n rows of draw counts among that class's samples; returned as
    index arrays into ``labels`` sorted by class."""
    order = np.argsort(labels, kind="stable")
    counts = np.zeros((n, len(labels)), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        k = int((labels == c).sum())
        counts[:, start:start + k] = rng.multinomial(k, np.full(k, 1.0 / k), size=n)
        start += k
    return [order[np.repeat(np.arange(len(labels)), row)] for row in counts]


def _sensitivity_threshold(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Brute force over every candidate: the best specificity among thresholds whose
    sensitivity is at least ``target``, then the lowest such threshold."""
    best = None
    for t in np.unique(score):
        called = score >= t
        sens = called[positive].mean()
        spec = (~called[~positive]).mean()
        if sens >= target - 1e-12 and (best is None or spec > best[0]):
            best = (spec, t)
    return float(best[1])


def _reference(pv, yv, pt, yt, target, n, seed):
    """A straightforward loop: val draw → threshold → rates on the test draw."""
    rng_val = np.random.default_rng(np.random.SeedSequence((seed, 1)))
    rng_test = np.random.default_rng(seed)
    val_draws = _stratified_draws(yv, n, rng_val)
    test_draws = _stratified_draws(yt, n, rng_test)
    values = {k: [] for k in ("threshold", *RATES)}
    for iv, it in zip(val_draws, test_draws, strict=True):
        t = _sensitivity_threshold(pv[iv, 1], yv[iv] == 1, target)
        called, pos = pt[it, 1] >= t, yt[it] == 1
        tp, fp = int((called & pos).sum()), int((called & ~pos).sum())
        tn, fn = int((~called & ~pos).sum()), int((~called & pos).sum())
        values["threshold"].append(t)
        for name, (a, b) in {"sensitivity": (tp, fn), "specificity": (tn, fp),
                             "ppv": (tp, fp), "npv": (tn, fn)}.items():
            values[name].append(a / (a + b) if a + b else np.nan)
    out, undefined = {}, {}
    for name, v in values.items():
        v = np.array(v)
        ok = v[~np.isnan(v)]
        if len(ok) < len(v):
            undefined[name] = int(len(v) - len(ok))
        out[name] = list(np.percentile(ok, [2.5, 97.5]))
    return out, undefined


def _scores(rng, n, shift):
    y = np.arange(n) % 2
    return _two(np.clip(0.5 + shift * (y - 0.5) + rng.normal(0, 0.25, n), 0.001, 0.999)), y


def test_with_threshold_interval_matches_a_hand_loop():
    """Same seed → the numbers of an independent loop (hand stratified draws, brute-force
    threshold choice, hand confusion counts)."""
    rng = np.random.default_rng(7)
    pv, yv = _scores(rng, 30, 0.3)
    pt, yt = _scores(rng, 40, 0.3)
    got = operating_point_bootstrap(OperatingPoint.parse("sensitivity=0.8"), pv, yv, pt, yt,
                                    200, seed=3)
    ref, undefined = _reference(pv, yv, pt, yt, 0.8, 200, 3)
    assert set(got["ci95"]) == set(ref)
    for name in ref:
        assert got["ci95"][name] == pytest.approx(ref[name], abs=1e-12), name
    assert got["undefined"] == undefined
    # same seed, same result; another seed, other draws
    again = operating_point_bootstrap(OperatingPoint.parse("sensitivity=0.8"), pv, yv, pt, yt,
                                      200, seed=3)
    assert again == got
    other = operating_point_bootstrap(OperatingPoint.parse("sensitivity=0.8"), pv, yv, pt,
                                      yt, 200, seed=4)
    assert other["ci95"] != got["ci95"]


def test_with_threshold_interval_is_wider_where_the_val_threshold_is_unstable():
    """Ten val positives spread over [0.05, 0.95]: the sensitivity-0.9 threshold sits at the
    2nd-lowest drawn positive, which moves from 0.05 to ~0.35 between val resamples. The
    2000 test positives/negatives lie on an even grid, where sensitivity(t) ≈ 1 − t, so
    that movement alone spans ~0.3 of test sensitivity, while the fixed threshold's
    test-only interval (1000 positives) is ~±0.02: the with-threshold interval must be the
    wider, and its test draws are the fixed one's (same seed), only the threshold varies."""
    pos = np.linspace(0.05, 0.95, 10)
    pv = _two(np.concatenate([pos - 0.04, pos]))
    yv = np.repeat([0, 1], 10)
    grid = np.linspace(0.0, 1.0, 1000)
    pt = _two(np.concatenate([grid, grid]))
    yt = np.repeat([0, 1], 1000)
    point = OperatingPoint.parse("sensitivity=0.9")
    t = choose_threshold(point, pv, yv)
    with_t = operating_point_bootstrap(point, pv, yv, pt, yt, 300, seed=0)["ci95"]
    rates = operating_point_per_sample(pt, yt, t)
    fixed = bootstrap_ci(pt, yt, 300, 0, per_sample={f"op@{k}": v for k, v in rates.items()}
                         )["ci95"]
    for name in ("sensitivity", "specificity"):
        w_with = with_t[name][1] - with_t[name][0]
        w_fixed = fixed[f"op@{name}"][1] - fixed[f"op@{name}"][0]
        assert w_with >= 3 * w_fixed, (name, with_t[name], fixed[f"op@{name}"])
    assert with_t["threshold"][0] <= t <= with_t["threshold"][1]
    assert with_t["threshold"][1] - with_t["threshold"][0] > 0.15


def test_undefined_ppv_resamples_are_counted():
    """specificity=1 puts the threshold just above the top val negative: a val draw holding
    the outlier negative at 0.99 puts it above every test score (≤ 0.9), nothing is called
    positive and that resample has no PPV: left out and counted (the hand loop's count)."""
    rng = np.random.default_rng(1)
    pv = _two(np.concatenate([np.linspace(0.1, 0.5, 9), [0.99], np.linspace(0.4, 0.95, 10)]))
    yv = np.repeat([0, 1], 10)
    pt = _two(np.clip(rng.uniform(0.0, 0.9, 30), 0, 0.9))
    yt = np.arange(30) % 2
    got = operating_point_bootstrap(OperatingPoint.parse("specificity=1"), pv, yv, pt, yt,
                                    300, seed=0)
    n_ppv = got["undefined"]["ppv"]
    # P(the outlier drawn among 10) = 1 − 0.9^10 ≈ 0.65
    assert 150 < n_ppv < 240
    assert "threshold" not in got["undefined"] and "sensitivity" not in got["undefined"]
    # the hand count of resamples whose threshold calls no test sample positive
    rng_val = np.random.default_rng(np.random.SeedSequence((0, 1)))
    expected = sum(
        not (pt[:, 1] >= choose_threshold(OperatingPoint.parse("specificity=1"), pv[i], yv[i])
             ).any() for i in _stratified_draws(yv, 300, rng_val))
    assert n_ppv == expected


def test_a_val_draw_the_rule_cannot_choose_on_is_counted(monkeypatch):
    """Stratified draws keep both classes, so this is a guard: a val draw `choose_threshold`
    refuses is left out of every interval and counted under undefined.threshold."""
    real = op_module.choose_threshold
    calls = {"n": 0}

    def flaky(point, probs, labels):
        calls["n"] += 1
        if calls["n"] > 1 and calls["n"] % 4 == 0:  # the first call checks the val split
            raise InputError("only one class")
        return real(point, probs, labels)

    monkeypatch.setattr(op_module, "choose_threshold", flaky)
    rng = np.random.default_rng(2)
    pv, yv = _scores(rng, 20, 0.3)
    pt, yt = _scores(rng, 20, 0.3)
    got = operating_point_bootstrap(OperatingPoint.parse("youden"), pv, yv, pt, yt, 200)
    assert got["undefined"]["threshold"] == 50  # calls 4, 8, …, 200 of draws 2..201
    for name in ("sensitivity", "specificity"):
        assert got["undefined"][name] == 50


def test_fixed_threshold_and_bad_inputs_are_refused():
    rng = np.random.default_rng(0)
    pv, yv = _scores(rng, 20, 0.3)
    with pytest.raises(InputError, match="nothing is chosen"):
        operating_point_bootstrap(OperatingPoint.parse("threshold=0.3"), pv, yv, pv, yv, 200)
    with pytest.raises(InputError, match="too few"):
        operating_point_bootstrap(OperatingPoint.parse("youden"), pv, yv, pv, yv, 10)
    with pytest.raises(InputError, match="both classes"):
        operating_point_bootstrap(OperatingPoint.parse("youden"), pv, np.zeros(20, int), pv,
                                  yv, 200)


def test_paired_differences_match_a_hand_loop():
    """One stratified test draw (bootstrap_ci's, same seed) scores both models."""
    rng = np.random.default_rng(5)
    pa, y = _scores(rng, 40, 0.4)
    pb, _ = _scores(rng, 40, 0.1)
    got = paired_operating_point_ci(pa, pb, y, 0.45, 0.55, n=300, seed=2)
    diffs = {"sensitivity_b_minus_a": [], "specificity_b_minus_a": []}
    for idx in _stratified_draws(y, 300, np.random.default_rng(2)):
        ca, cb, pos = pa[idx, 1] >= 0.45, pb[idx, 1] >= 0.55, y[idx] == 1
        diffs["sensitivity_b_minus_a"].append(cb[pos].mean() - ca[pos].mean())
        diffs["specificity_b_minus_a"].append((~cb[~pos]).mean() - (~ca[~pos]).mean())
    for name, v in diffs.items():
        assert got["ci95"][name] == pytest.approx(list(np.percentile(v, [2.5, 97.5])),
                                                  abs=1e-12), name
    assert got["bootstrap"]["n"] == 300 and got["bootstrap"]["seed"] == 2


def test_compare_cli_paired_intervals(tmp_path, capsys):
    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng, shift=0.4)
    _run(tmp_path / "b", rng, shift=0.1)
    r = _compare(capsys, tmp_path / "a", tmp_path / "b", "--operating-point",
                 "sensitivity=0.9", "--bootstrap", "200", "--bootstrap-seed", "1")
    op = r["operating_point"]
    from causalign.engine.evaluate import read_predictions

    a = read_predictions(tmp_path / "a" / "predictions_test.csv")
    b = read_predictions(tmp_path / "b" / "predictions_test.csv")
    ref = paired_operating_point_ci(a.probs, b.probs, a.labels, op["threshold_a"],
                                    op["threshold_b"], n=200, seed=1)
    assert op["ci95"] == ref["ci95"] and op["bootstrap"] == ref["bootstrap"]
    lo, hi = op["ci95"]["sensitivity_b_minus_a"]
    assert lo <= op["sensitivity_b"] - op["sensitivity_a"] <= hi
    # without --bootstrap: no interval (the JSON as before)
    plain = _compare(capsys, tmp_path / "a", tmp_path / "b", "--operating-point", "youden")
    assert "ci95" not in plain["operating_point"]


@pytest.mark.parametrize("argv, words", [
    (["--operating-point", "youden", "--bootstrap", "50"], "too few resamples"),
    (["--operating-point", "youden", "--bootstrap-seed", "3"], "only with --bootstrap"),
])
def test_compare_cli_bootstrap_refusals(tmp_path, capsys, argv, words):
    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng)
    _run(tmp_path / "b", rng)
    assert words in _error_line(capsys, ["compare", str(tmp_path / "a"),
                                         str(tmp_path / "b"), *argv])


erm_run = test_operating_point.erm_run  # the fixture: a 2-epoch ERM on tiny_data


def test_evaluate_cli_gives_the_with_threshold_block(erm_run, tmp_path, capsys):
    """`evaluate --operating-point youden --bootstrap N`: ci95.operating_point unchanged,
    ci95.operating_point_with_threshold as `operating_point_bootstrap` on the run's val and
    test predictions; with threshold=T the block is simply absent (not an error)."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import predict as predict_split
    from causalign.engine.trainer import load_run

    cfg, model, method, data = load_run(erm_run, device="cpu")
    pv, yv, _ = predict_split(model, method, LesionDataset(data, "val"), "cpu")
    pt, yt, _ = predict_split(model, method, LesionDataset(data, "test"), "cpu")
    capsys.readouterr()
    rc = main(["evaluate", str(erm_run), "--operating-point", "youden", "--bootstrap", "200",
               "--no-progress", "--saliency", "gradient", "--device", "cpu"])
    assert rc in (0, None)
    m = json.loads(capsys.readouterr().out)
    t = m["operating_point"]["threshold"]
    assert t == choose_threshold(OperatingPoint.parse("youden"), pv, yv)
    ref = operating_point_bootstrap(OperatingPoint.parse("youden"), pv, yv, pt, yt, 200, 0)
    got = m["ci95"]["operating_point_with_threshold"]
    assert set(got) == set(ref["ci95"])
    for name, interval in ref["ci95"].items():
        assert got[name] == pytest.approx(interval), name
    rates = operating_point_per_sample(pt, yt, t)
    fixed = bootstrap_ci(pt, yt, 200, 0, per_sample={f"op@{k}": v for k, v in rates.items()}
                         )["ci95"]
    for name in RATES:  # the existing block is the test-only one, unchanged
        assert m["ci95"]["operating_point"][name] == pytest.approx(fixed[f"op@{name}"])
    if ref["undefined"]:
        assert m["bootstrap"]["undefined"]["operating_point_with_threshold"] == ref["undefined"]
    rc = main(["evaluate", str(erm_run), "--operating-point", f"threshold={t!r}",
               "--bootstrap", "200", "--no-progress", "--saliency", "gradient",
               "--device", "cpu"])
    assert rc in (0, None)
    m2 = json.loads(capsys.readouterr().out)
    assert "operating_point_with_threshold" not in m2["ci95"]
    assert m2["ci95"]["operating_point"] == m["ci95"]["operating_point"]


def test_evaluate_on_val_has_no_with_threshold_block(erm_run, capsys):
    """With --split val the threshold is chosen on the split reported: there is no separate
    val split to resample, so the block is absent (the rates carry their `note`)."""
    capsys.readouterr()
    rc = main(["evaluate", str(erm_run), "--split", "val", "--operating-point", "youden",
               "--bootstrap", "200", "--no-progress", "--saliency", "gradient",
               "--device", "cpu"])
    assert rc in (0, None)
    m = json.loads(capsys.readouterr().out)
    assert "note" in m["operating_point"] and "operating_point" in m["ci95"]
    assert "operating_point_with_threshold" not in m["ci95"]


def test_compare_csv_inputs_with_a_fixed_threshold_get_paired_intervals(tmp_path, capsys):
    """CSV inputs carry no val split; with threshold=T the paired intervals still apply."""
    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng, shift=0.4)
    _run(tmp_path / "b", rng, shift=0.1)
    r = _compare(capsys, tmp_path / "a" / "predictions_test.csv",
                 tmp_path / "b" / "predictions_test.csv", "--operating-point",
                 "threshold=0.5", "--bootstrap", "100")
    op = r["operating_point"]
    assert op["chosen_on"] is None and set(op["ci95"]) == {"sensitivity_b_minus_a",
                                                           "specificity_b_minus_a"}
    lo, hi = op["ci95"]["specificity_b_minus_a"]
    assert lo <= op["specificity_b"] - op["specificity_a"] <= hi
