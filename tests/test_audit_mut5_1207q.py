"""Mutation audit of the ROC band, the operating-point intervals (threshold re-chosen, paired),
the calibrated threshold / predict --temperature and the PC check's sample count:
behaviours the earlier tests let slip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_compare_operating_point import _run

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics import roc_band
from causalign.metrics.operating_point import OperatingPoint, choose_threshold


def _binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0.001, 0.999)
    return np.stack([1 - p1, p1], axis=1), y


def test_roc_band_refuses_a_split_without_positives():
    """A split of negatives only has no sensitivity (0/0): refused, like one of positives
    only (the existing test covered that side alone). Kills the mutant that checked only
    ``is_pos.all()`` and returned NaN curves."""
    probs, _ = _binary(40, 0)
    with pytest.raises(InputError, match="needs class 1 and another class"):
        roc_band(probs, np.zeros(40, dtype=int), n=100)


def test_compare_roc_marks_each_runs_own_chosen_threshold(tmp_path, capsys, monkeypatch):
    """`compare --roc --operating-point sensitivity=0.9`: run B's mark sits at B's own
    threshold (chosen on B's predictions_val.csv), not A's. The existing test used one fixed
    threshold=0.3 for both runs, so the mutant marking both at threshold_a survived."""
    import causalign.report.figures as figures

    seen = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(k) or real(curves, path, **k))
    rng = np.random.default_rng(4)
    pva, yva, _, _ = _run(tmp_path / "a", rng, shift=0.4)
    pvb, yvb, _, _ = _run(tmp_path / "b", rng, shift=0.1)
    rule = OperatingPoint.parse("sensitivity=0.9")
    ta, tb = choose_threshold(rule, pva, yva), choose_threshold(rule, pvb, yvb)
    assert ta != tb  # otherwise the test could not tell the runs apart
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--roc",
                 str(tmp_path / "c.png"), "--operating-point", "sensitivity=0.9"]) in (0, None)
    json.loads(capsys.readouterr().out)
    marks = seen[-1]["points"]
    assert [t for _, t in marks["a"]] == [0.5, ta]
    assert [t for _, t in marks["b"]] == [0.5, tb]


def test_roc_figure_refuses_the_band_of_class_0_on_a_two_class_curve(tmp_path):
    """The curve drawn for two classes is class 1's; a band of class 0's curve (its mirror)
    would shade the wrong region, so it is refused. The existing test only passed a
    three-class model; the mutant checking ``positive is None`` drew class 0's band."""
    from causalign.report.figures import roc_figure

    probs, y = _binary(60, 1)
    band = roc_band(probs, y, n=100, positive=0)
    with pytest.raises(InputError, match="class 1's curve of a two-class model"):
        roc_figure({"m": (probs, y)}, tmp_path / "never.png", bands={"m": band})
    assert not (tmp_path / "never.png").exists()


def test_with_threshold_rates_call_a_score_equal_to_the_threshold_positive():
    """`operating_point_bootstrap` calls class 1 for p ≥ threshold, as
    `operating_point_metrics` does. The chosen threshold is always a val score; with scores
    on a 0.1 grid the test split holds scores equal to it, and the hand loop (≥) must match.
    Kills the mutant ``score > t`` (continuous test scores never met the threshold)."""
    from test_audit_opboot_1207q import _reference

    from causalign.metrics.operating_point import operating_point_bootstrap

    rng = np.random.default_rng(3)

    def grid_scores(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        p1 = np.round(np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0.05, 0.95), 1)
        return np.stack([1 - p1, p1], axis=1), y

    pv, yv = grid_scores(40)
    pt, yt = grid_scores(40)
    got = operating_point_bootstrap(OperatingPoint.parse("sensitivity=0.8"), pv, yv, pt, yt,
                                    n=200, seed=0)
    want, _ = _reference(pv, yv, pt, yt, 0.8, 200, 0)
    for name, interval in want.items():
        assert got["ci95"][name] == pytest.approx(interval, abs=1e-12), name


def test_bootstrap_99_is_refused_by_the_option_check_and_100_runs(tmp_path, capsys):
    """`compare --bootstrap N` refuses N = MIN_BOOTSTRAP − 1 = 99 in the option check (one
    line naming --bootstrap, before any file is read) and accepts 100, the boundary itself.
    Kills the off-by-one ``0 < bootstrap < MIN_BOOTSTRAP - 1`` (99 got past the option check
    to the library's unnamed "99 bootstrap resamples" refusal)."""
    from test_audit_compare_1207f import _error_line

    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng)
    _run(tmp_path / "b", rng)
    argv = ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--operating-point",
            "youden", "--bootstrap"]
    capsys.readouterr()
    line = _error_line(capsys, [*argv, "99"])
    assert "--bootstrap 99: too few resamples" in line, line
    assert main([*argv, "100"]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["operating_point"]["bootstrap"]["n"] == 100


def test_paired_operating_point_ci_refuses_a_bad_threshold_b():
    """Both thresholds are checked as probabilities: a threshold_b of 1.5 (nothing called
    positive, a silent all-negative model B) is refused. Kills the mutant dropping
    ``check_probability(threshold_b)``."""
    from causalign.metrics import paired_operating_point_ci

    probs, y = _binary(40, 2)
    with pytest.raises(InputError, match="threshold must be a probability"):
        paired_operating_point_ci(probs, probs, y, 0.5, 1.5, n=100)
    with pytest.raises(InputError, match="threshold must be a probability"):
        paired_operating_point_ci(probs, probs, y, float("nan"), 0.5, n=100)


def test_apply_temperature_one_returns_a_copy_not_the_input():
    """T = 1 is the identity in value, but a new array: writing into the result (evaluate and
    predict keep both the scaled and the model's own probabilities) must not change the
    input. Kills the mutant ``return p`` (float64 input came back as the same object)."""
    from causalign.metrics.calibration import apply_temperature

    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    out = apply_temperature(p, 1.0)
    assert out is not p and np.array_equal(out, p)
    out[0, 0] = 0.0
    assert p[0, 0] == 0.2


def test_calibrated_threshold_refuses_a_threshold_outside_0_1():
    """calibrated_threshold checks the threshold as a probability: 1.5 or −0.1 would be
    floored into a finite 'calibrated threshold' and written to the predict CSV. Kills the
    mutant dropping ``check_probability(threshold)``."""
    from causalign.metrics.calibration import calibrated_threshold

    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InputError, match="threshold must be a probability"):
            calibrated_threshold(bad, 2.0)


def test_pc_sample_count_threshold_and_partly_annotated_rows():
    """`_annotated` counts the fully annotated rows: exactly _MIN_SAMPLES (20) passes, 19 is
    refused, and a row missing any one attribute does not count. Kills ``<=`` for ``<`` and
    ``isnan(...).all(1)`` for ``.any(1)`` (a row with one attribute annotated counted)."""
    from causalign.causal.pc import _MIN_SAMPLES, _annotated
    from causalign.errors import CausalignError

    assert _MIN_SAMPLES == 20
    rng = np.random.default_rng(0)
    names = ["a0", "a1"]
    a = rng.normal(size=(20, 2))
    *_, keep = _annotated(a, names, None, None)
    assert keep.sum() == 20
    with pytest.raises(CausalignError, match="only 19 fully annotated samples"):
        _annotated(a[:19], names, None, None)
    partly = np.vstack([a[:19], [[0.3, np.nan]], [[np.nan, 0.1]]])
    with pytest.raises(CausalignError, match="only 19 fully annotated samples"):
        _annotated(partly, names, None, None)
    # with a selection, only the selected column's annotation counts
    *_, keep = _annotated(partly, names, None, ["a0"])
    assert keep.tolist() == [True] * 20 + [False]


def test_pc_select_named_twice_keeps_one_column():
    """``select`` naming an attribute twice gives it once (a duplicated column is a singular
    correlation matrix for Fisher-z). Kills the mutant dropping ``dict.fromkeys``."""
    from causalign.causal.pc import _annotated

    a = np.random.default_rng(1).normal(size=(25, 3))
    cols, names, causal, _ = _annotated(a, ["a0", "a1", "a2"], ["a2", "a0"], ["a2", "a2", "a0"])
    assert names == ["a2", "a0"] and causal == ["a2", "a0"]
    np.testing.assert_array_equal(cols, a[:, [2, 0]])


def test_percentile_interval_leaves_nan_resamples_out():
    """An undefined resample (NaN) is left out of the interval and counted, not read as 0.
    Kills the mutant taking the percentiles of ``nan_to_num(resampled)`` (a tenth of NaN
    dragged the lower bound to 0)."""
    from causalign.metrics.classification import percentile_interval

    values = np.r_[np.full(10, np.nan), np.linspace(0.6, 0.9, 90)]
    interval, missing = percentile_interval(values)
    assert missing == 10
    assert interval == pytest.approx(list(np.percentile(np.linspace(0.6, 0.9, 90),
                                                        [2.5, 97.5])), abs=1e-15)
    assert percentile_interval(np.full(5, np.nan)) == (None, 5)


def test_pc_an_empty_attribute_selection_is_refused():
    """``select=[]`` (``--attributes ""``) is refused naming "(none given)", not run on zero
    columns. Kills the mutant checking only ``unknown``."""
    from causalign.causal.pc import _annotated

    a = np.random.default_rng(2).normal(size=(25, 2))
    with pytest.raises(InputError, match=r"unknown attribute\(s\) \(none given\)"):
        _annotated(a, ["a0", "a1"], None, [])


def test_compare_negative_bootstrap_is_refused_naming_the_option(tmp_path, capsys):
    """`compare --bootstrap -5` is refused by the option check in one line naming
    --bootstrap. Kills the mutant dropping the ``bootstrap < 0`` check (-5 is truthy: it
    reached the library's unnamed "bootstrap resamples must be a non-negative integer")."""
    from test_audit_compare_1207f import _error_line

    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng)
    _run(tmp_path / "b", rng)
    capsys.readouterr()
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                "--operating-point", "youden", "--bootstrap", "-5"])
    assert "--bootstrap -5: give a number of resamples" in line, line


def test_evaluate_roc_bootstrap_of_a_three_class_run_draws_no_band(tmp_path, capsys,
                                                                    monkeypatch):
    """`evaluate --roc --bootstrap N` on a three-class run draws the one-vs-rest curves and
    no band (a band is class 1's curve of a two-class model; `roc_figure` refuses it for
    more classes). Kills the mutant drawing the band whenever --bootstrap is given (the
    command failed with roc_figure's refusal)."""
    from test_multiclass import _write_three_class

    import causalign.report.figures as figures
    from causalign.engine import TrainConfig, train

    seen = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(k) or real(curves, path, **k))
    data = _write_three_class(tmp_path / "data")
    run = tmp_path / "run3"
    train(data, TrainConfig(method="erm", epochs=1, width=4, batch_size=8), run,
          progress=False)
    capsys.readouterr()
    rc = main(["evaluate", str(run), "--roc", str(tmp_path / "roc.png"), "--bootstrap",
               "100", "--no-progress", "--saliency", "gradient", "--device", "cpu"])
    assert rc in (0, None), capsys.readouterr().err
    assert seen[-1]["bands"] is None and (tmp_path / "roc.png").is_file()
    assert json.loads(capsys.readouterr().out)["bootstrap"]["n"] == 100
