"""Paired bootstrap intervals of every compared metric: `paired_bootstrap_ci` and
`compare --bootstrap N` (``ci95_difference`` of accuracy, balanced accuracy, AUC, Brier
score and ECE, B − A, without needing --operating-point)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from test_audit_compare_1207f import _write_csv
from test_audit_opboot_1207q import test_compare_cli_bootstrap_refusals as _refused
from test_compare_operating_point import _compare, _run

from causalign.errors import InputError
from causalign.metrics import (
    PAIRED_BOOTSTRAP_METRICS,
    bootstrap_ci,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    paired_bootstrap_ci,
    paired_operating_point_ci,
)
from causalign.metrics.classification import _resample_counts


def _metrics(p, y, bins):
    """The compared metrics of one resample, each from scikit-learn or its public
    function: AUC as compare reports it (macro one-vs-rest for more than two classes)."""
    auc = None
    if len(np.unique(y)) > 1:
        auc = (roc_auc_score(y, p[:, 1]) if p.shape[1] == 2
               else roc_auc_score(y, p, multi_class="ovr"))
    return {"accuracy": accuracy_score(y, p.argmax(axis=1)),
            "balanced_accuracy": balanced_accuracy_score(y, p.argmax(axis=1)), "auc": auc,
            "brier": brier_score(p, y), "ece": expected_calibration_error(p, y, bins)}


def _reference(pa, pb, y, n, seed, bins=15):
    """A straightforward loop: the same stratified resamples (`_resample_counts` on the
    labels sorted by class) as index arrays, each metric from `classification_metrics` /
    scikit-learn on the resampled A and B arrays, then percentiles of B − A."""
    order = np.argsort(y, kind="stable")
    sorted_y = y[order]
    diffs = {m: [] for m in PAIRED_BOOTSTRAP_METRICS}
    for w in _resample_counts(sorted_y, n, seed):
        for row in w:
            idx = order[np.repeat(np.arange(len(y)), row.astype(np.int64))]
            ma, mb = (_metrics(p[idx], y[idx], bins) for p in (pa, pb))
            for m in PAIRED_BOOTSTRAP_METRICS:
                if ma[m] is not None:
                    diffs[m].append(mb[m] - ma[m])
    return {m: list(np.percentile(v, [2.5, 97.5])) if v else None for m, v in diffs.items()}


def _models(rng, n, classes):
    y = np.arange(n) % classes
    pa = rng.dirichlet(np.ones(classes), n)
    # B leans towards the true class: better and differently calibrated
    pb = 0.6 * rng.dirichlet(np.ones(classes), n) + 0.4 * np.eye(classes)[y]
    return pa, pb, y


@pytest.mark.parametrize("classes, n, bins", [(2, 40, 15), (3, 45, 7)])
def test_difference_intervals_match_a_hand_loop(classes, n, bins):
    rng = np.random.default_rng(classes)
    pa, pb, y = _models(rng, n, classes)
    got = paired_bootstrap_ci(pa, pb, y, n=100, seed=3, ece_bins=bins)
    ref = _reference(pa, pb, y, 100, 3, bins)
    assert set(got["ci95_difference"]) == set(PAIRED_BOOTSTRAP_METRICS)
    for m in PAIRED_BOOTSTRAP_METRICS:
        assert got["ci95_difference"][m] == pytest.approx(ref[m], abs=1e-12), m
    assert got["bootstrap"]["n"] == 100 and got["bootstrap"]["seed"] == 3
    # B is the better model here: its AUC gain's interval excludes 0
    assert got["ci95_difference"]["auc"][0] > 0


def test_identical_runs_give_zero_intervals_and_seed_reproduces():
    rng = np.random.default_rng(1)
    pa, pb, y = _models(rng, 30, 2)
    same = paired_bootstrap_ci(pa, pa.copy(), y, n=100, seed=0)["ci95_difference"]
    assert all(v == [0.0, 0.0] for v in same.values()), same
    one = paired_bootstrap_ci(pa, pb, y, n=150, seed=4)
    assert paired_bootstrap_ci(pa, pb, y, n=150, seed=4) == one
    assert paired_bootstrap_ci(pa, pb, y, n=150, seed=5) != one


def test_single_class_split_has_no_auc_interval_and_bad_inputs_are_refused():
    rng = np.random.default_rng(2)
    pa, pb, _ = _models(rng, 20, 2)
    got = paired_bootstrap_ci(pa, pb, np.ones(20, int), n=100)["ci95_difference"]
    assert got["auc"] is None and got["brier"] is not None
    with pytest.raises(InputError, match="same samples and classes"):
        paired_bootstrap_ci(pa, rng.dirichlet(np.ones(3), 20), np.ones(20, int), n=100)
    with pytest.raises(InputError, match="too few"):
        paired_bootstrap_ci(pa, pb, np.ones(20, int), n=10)


def test_bootstrap_ci_unchanged_by_the_shared_inner_function():
    """Guard: bootstrap_ci (refactored onto `_resampled_metrics`) still equals a hand loop
    of scikit-learn on its resamples, per-sample means included."""
    rng = np.random.default_rng(7)
    pa, _, y = _models(rng, 30, 2)
    extra = np.where(rng.random(30) < 0.3, np.nan, rng.random(30))
    got = bootstrap_ci(pa, y, 100, 2, per_sample={"d": extra}, ece_bins=5)["ci95"]
    order = np.argsort(y, kind="stable")
    acc, brier, d = [], [], []
    for w in _resample_counts(y[order], 100, 2):
        for row in w:
            idx = order[np.repeat(np.arange(30), row.astype(np.int64))]
            m = classification_metrics(pa[idx], y[idx], 5)
            acc.append(m["accuracy"])
            brier.append(m["brier"])
            d.append(np.nanmean(extra[idx]))
    for name, v in (("accuracy", acc), ("brier", brier), ("d", d)):
        assert got[name] == pytest.approx(list(np.percentile(v, [2.5, 97.5])), abs=1e-12)


def test_compare_cli_bootstrap_without_operating_point(tmp_path, capsys):
    """`compare --bootstrap N` alone gives ci95_difference (refused before this change);
    the intervals are `paired_bootstrap_ci`'s with compare's --n-bins."""
    from causalign.engine.evaluate import read_predictions

    rng = np.random.default_rng(4)
    _run(tmp_path / "a", rng, shift=0.4)
    _run(tmp_path / "b", rng, shift=0.1)
    r = _compare(capsys, tmp_path / "a", tmp_path / "b", "--bootstrap", "200",
                 "--bootstrap-seed", "1", "--n-bins", "6")
    a = read_predictions(tmp_path / "a" / "predictions_test.csv")
    b = read_predictions(tmp_path / "b" / "predictions_test.csv")
    ref = paired_bootstrap_ci(a.probs, b.probs, a.labels, 200, 1, ece_bins=6)
    assert r["ci95_difference"] == ref["ci95_difference"]
    assert r["bootstrap"] == ref["bootstrap"]
    lo, hi = r["ci95_difference"]["ece"]
    assert lo <= r["ece_b"] - r["ece_a"] <= hi
    assert "operating_point" not in r
    plain = _compare(capsys, tmp_path / "a", tmp_path / "b")
    assert "ci95_difference" not in plain and "bootstrap" not in plain


def test_compare_cli_operating_point_adds_its_rates_beside_the_differences(tmp_path, capsys):
    """Guard (the rate intervals themselves: test_audit_opboot_1207q): --operating-point
    leaves ci95_difference as it is alone and puts the rate intervals of the same
    resamples inside operating_point."""
    rng = np.random.default_rng(8)
    pa, _, y = _models(rng, 30, 2)
    pb = np.stack([1 - pa[:, 1] ** 2, pa[:, 1] ** 2], axis=1)
    ids = [f"s{i}" for i in range(30)]
    _write_csv(tmp_path / "a.csv", ids, y, pa)
    _write_csv(tmp_path / "b.csv", ids, y, pb)
    alone = _compare(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--bootstrap", "100")
    both = _compare(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--bootstrap", "100",
                    "--operating-point", "threshold=0.3")
    assert both["ci95_difference"] == alone["ci95_difference"]
    assert both["operating_point"]["ci95"] == paired_operating_point_ci(
        pa, pb, y, 0.3, 0.3, n=100)["ci95"]
    # B is A's scores squared: the same ranking, so the AUC difference is exactly 0
    assert alone["ci95_difference"]["auc"] == [0.0, 0.0]


def test_compare_cli_three_classes(tmp_path, capsys):
    rng = np.random.default_rng(6)
    pa, pb, y = _models(rng, 36, 3)
    ids = [f"s{i}" for i in range(36)]
    classes = ("a", "b", "c")
    _write_csv(tmp_path / "a.csv", ids, y, pa, classes)
    _write_csv(tmp_path / "b.csv", ids, y, pb, classes)
    r = _compare(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--bootstrap", "100")
    ref = _reference(pa, pb, y, 100, 0)
    for m in PAIRED_BOOTSTRAP_METRICS:
        # the CSV holds 17 significant digits: the probabilities round-trip exactly
        assert r["ci95_difference"][m] == pytest.approx(ref[m], abs=1e-12), m


@pytest.mark.parametrize("argv, words", [
    (["--bootstrap", "50"], "too few resamples"),
    (["--bootstrap", "-1"], "give a number of resamples"),
    (["--bootstrap-seed", "3"], "only with --bootstrap"),
    (["--bootstrap", "200", "--bootstrap-seed", "-2"], "must be 0 or more"),
])
def test_compare_cli_bootstrap_refusals_without_operating_point(tmp_path, capsys, argv,
                                                                 words):
    """Still refused in one line now that --bootstrap needs no --operating-point."""
    _refused(tmp_path, capsys, argv, words)
