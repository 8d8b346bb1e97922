"""Mutation audit of the multi-class operating point (--positive), compare's paired
bootstrap and threshold pair, cross-site provenance and the report's clinical table:
behaviours the earlier tests let slip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_audit_flowrev_1207q import two_sites  # noqa: F401  (module fixture)
from test_compare_operating_point import _compare, _run
from test_multiclass import BUSI

from causalign.cli import main
from causalign.errors import InputError
from causalign.metrics.operating_point import one_vs_rest, positive_class


def test_positive_class_refuses_a_non_integral_index():
    """A float or a padded index is not a class index: 1.5 was truncated to class 1 and "01"
    read as 1 (kills dropping the ``str(positive) != str(index)`` check)."""
    for bad in (1.5, "01", "+2", 2.0):
        with pytest.raises(InputError, match="not a class of this run"):
            positive_class(bad, BUSI)
    assert positive_class(" 2 ", BUSI) == 2  # surrounding blanks of a typed index are fine


def test_one_vs_rest_refuses_a_negative_class_index():
    """A negative index named the last class by Python indexing while the labels matched
    none: every sample a negative (kills dropping the lower bound of the range check)."""
    p = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    with pytest.raises(InputError, match="positive class -1"):
        one_vs_rest(p, np.array([2, 0]), -1)
    with pytest.raises(InputError, match="positive class 3"):
        one_vs_rest(p, np.array([2, 0]), 3)


def test_cross_site_fixed_threshold_names_no_chosen_on_data(two_sites, capsys):  # noqa: F811
    """threshold=T on another site chooses nothing: no ``chosen_on_data`` (the dataset whose
    val chose it), only ``chosen_on`` None (kills recording ``where`` for every rule)."""
    run, site_b = two_sites
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(site_b), "--operating-point",
                 "threshold=0.4", "--device", "cpu", "--no-progress"]) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    assert op["chosen_on"] is None and op["threshold"] == 0.4
    assert "chosen_on_data" not in op


def test_compare_roc_of_two_classes_with_positive_zero_is_class_zero_vs_rest(tmp_path, capsys,
                                                                            monkeypatch):
    """--positive benign on two classes: both runs' rates are on p_benign against y == 0, and
    the ROC curves drawn are benign-vs-rest ([1 − p₀, p₀], labels y == 0), not class 1's
    curve with p_benign thresholds marked on it (kills testing only ``n_classes != 2`` for
    the curves, run A's probabilities left as they are while the labels flip, and the
    ``positive`` name taken as class 1's)."""
    import causalign.report.figures as figures

    seen = {}
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.update(curves=curves, **k))
    rng = np.random.default_rng(5)
    a, b = _run(tmp_path / "a", rng), _run(tmp_path / "b", rng)
    op = _compare(capsys, tmp_path / "a", tmp_path / "b", "--operating-point", "threshold=0.4",
                  "--positive", "benign", "--roc", tmp_path / "roc.png")["operating_point"]
    assert op["positive"] == "benign"
    for which, run in (("a", a), ("b", b)):  # both runs' rates on p_benign, y == benign
        p0, pos = run[2][:, 0], run[3] == 0
        assert op[f"sensitivity_{which}"] == (p0[pos] >= 0.4).mean()
        assert op[f"specificity_{which}"] == (p0[~pos] < 0.4).mean()
    p_test, y_test = a[2], a[3]
    curve_p, curve_y = seen["curves"]["a"]
    assert np.allclose(curve_p[:, 1], p_test[:, 0]) and np.array_equal(curve_y, y_test == 0)
    assert seen["title"].endswith("benign vs rest")


def _paired_hand_loop(pa, pb, y, n, seed):
    """B − A per resample from `classification_metrics` on index arrays of the same
    stratified draws (`_resample_counts` on the labels sorted by class): the reference.
    Not test_audit_cmpboot's `_reference`: its scikit-learn "ovr" AUC refuses a split
    lacking a class, the case pinned here."""
    from causalign.metrics import PAIRED_BOOTSTRAP_METRICS, classification_metrics
    from causalign.metrics.classification import _resample_counts

    order = np.argsort(y, kind="stable")
    diffs = {m: [] for m in PAIRED_BOOTSTRAP_METRICS}
    for w in _resample_counts(y[order], n, seed):
        for row in w:
            idx = order[np.repeat(np.arange(len(y)), row.astype(np.int64))]
            ma, mb = (classification_metrics(p[idx], y[idx]) for p in (pa, pb))
            for m in PAIRED_BOOTSTRAP_METRICS:
                if ma[m] is not None:  # AUC of a single-class draw
                    diffs[m].append(mb[m] - ma[m])
    return {m: list(np.percentile(v, [2.5, 97.5])) if v else None for m, v in diffs.items()}


def test_paired_intervals_with_unbalanced_classes_and_an_absent_class():
    """Three classes, 14 / 5 / 0 samples: balanced accuracy's recalls divide by each class's
    own count and the macro AUC averages the classes the split holds (the hand loop's
    `classification_metrics`). The earlier tests drew equal class counts, where n_c = N / C
    made a recall over N·C/… indistinguishable, and every class present (kills recall over
    N / classes, and the AUC over all C classes: NaN for the absent one, no interval)."""
    from causalign.metrics import paired_bootstrap_ci

    rng = np.random.default_rng(11)
    y = np.array([0] * 14 + [1] * 5)
    rng.shuffle(y)
    pa = rng.dirichlet([1, 1, 1], len(y))
    pb = 0.5 * rng.dirichlet([1, 1, 1], len(y)) + 0.5 * np.eye(3)[y]
    got = paired_bootstrap_ci(pa, pb, y, n=100, seed=4)["ci95_difference"]
    want = _paired_hand_loop(pa, pb, y, 100, 4)
    for m, interval in want.items():
        assert got[m] == pytest.approx(interval, abs=1e-12), m


def test_paired_single_class_split_skips_the_auc_without_a_warning():
    """A split of one class has no AUC: the interval is None and no resample computes the
    0/0 AUC (which printed numpy's "invalid value encountered" on `compare --bootstrap`);
    the other differences still get intervals (kills computing the AUC regardless)."""
    import warnings

    from causalign.metrics import paired_bootstrap_ci

    rng = np.random.default_rng(2)
    y = np.zeros(12, dtype=np.int64)
    pa, pb = rng.dirichlet([1, 1], 12), rng.dirichlet([1, 1], 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = paired_bootstrap_ci(pa, pb, y, n=100, seed=0)["ci95_difference"]
    assert got["auc"] is None
    want = _paired_hand_loop(pa, pb, y, 100, 0)
    for m in ("accuracy", "brier", "ece"):
        assert got[m] == pytest.approx(want[m], abs=1e-12), m


def test_clinical_table_counts_default_setting_runs_only(tmp_path):
    """The table is the default setting's, as its header says: a finished run of another
    setting (an ablation with its own, here perfect, scores) is not averaged in (kills
    dropping the setting filter: 2 seeds, its threshold in the mean)."""
    from test_audit_repclin_1207q import _run as _report_run
    from test_audit_repclin_1207q import _two as _two_csv

    from causalign.report.clinical import clinical_table

    val = (_two_csv([0.1, 0.2, 0.6, 0.7]), [0, 0, 1, 1])
    test = (_two_csv([0.3, 0.65, 0.5, 0.9]), [0, 0, 1, 1])
    other = _report_run(tmp_path, "d", "m", 1, (_two_csv([0.05, 0.1, 0.95, 0.97]), [0, 0, 1, 1]),
                        test)
    other["setting"] = "alpha=2"
    res = {"runs": [_report_run(tmp_path, "d", "m", 0, val, test), other]}
    row = clinical_table(tmp_path, res, "d").rows[0]
    # seed 0 alone: Youden picks 0.6 on val; on test sensitivity 1/2, specificity 1/2
    assert row[:5] == ["m", "1", "0.600", "0.500", "0.500"]


def test_clinical_section_has_a_table_for_every_dataset(tmp_path):
    """Every dataset of the report gets its operating-point table, not only the first (as
    the CAM grids are capped, said on the page): kills looping over ``datasets[:1]``."""
    from test_audit_repclin_1207q import _random_split
    from test_audit_repclin_1207q import _run as _report_run

    from causalign.report import html as report_html

    rng = np.random.default_rng(6)
    runs = [_report_run(tmp_path, d, f"method_{d}", 0, _random_split(rng, 30),
                        _random_split(rng, 30)) for d in ("site_one", "site_two")]
    parts = report_html._clinical_section(tmp_path, {"runs": runs}, ["site_one", "site_two"],
                                          None)
    page = "".join(parts)
    assert len(parts) == 3  # the heading and one table per dataset
    assert "method_site_one" in page and "method_site_two" in page


def test_clinical_values_refuse_val_and_test_of_different_class_counts(tmp_path):
    """predictions_val.csv of three classes beside a two-class predictions_test.csv (CSVs of
    two tasks): nothing is chosen or fitted on that val, the test ECE alone is given with
    the one note saying why (kills dropping the check: a temperature fitted on the other
    task's val was applied to this test split)."""
    from test_audit_repclin_1207q import _csv, _random_split

    from causalign.metrics import expected_calibration_error
    from causalign.report.clinical import run_clinical_values

    rng = np.random.default_rng(8)
    pt, yt = _random_split(rng, 30)
    _csv(tmp_path / "predictions_val.csv", *_random_split(rng, 30, classes=3))
    _csv(tmp_path / "predictions_test.csv", pt, yt)
    values, notes = run_clinical_values(tmp_path)
    assert values == {"n_classes": 2, "ece": pytest.approx(expected_calibration_error(pt, yt)),
                      "test_counts": np.bincount(yt, minlength=2).tolist(),
                      "classes": ["benign", "malignant"]}
    assert notes == ["predictions_val.csv has 3 classes, predictions_test.csv 2"]


def test_output_provenance_digests_the_split_it_was_given(tiny_data, tmp_path):
    """summary.json's ``split_content_digest`` is the digest of the split whose maps were
    written (sha256 of its content digest, as config.yaml's): the test and val splits give
    different values (kills a constant digest of no split, which the earlier test's
    "non-empty" check let through)."""
    import hashlib
    from types import SimpleNamespace

    import torch

    from causalign.data.format import LesionDataset
    from causalign.engine.provenance import output_provenance as _output_provenance

    model = SimpleNamespace(causalign_weights={"weights_sha256": "ab" * 32})
    digests = {}
    for split in ("test", "val"):
        ds = LesionDataset(tiny_data, split)
        prov = _output_provenance(tmp_path, model, tiny_data, ds, torch.device("cpu"))
        want = hashlib.sha256(ds.content_digest().encode()).hexdigest()[:16]
        assert prov["split_content_digest"] == want
        assert prov["weights_sha256"] == "ab" * 32 and prov["data"] == str(tiny_data.resolve())
        digests[split] = want
    assert digests["test"] != digests["val"]
