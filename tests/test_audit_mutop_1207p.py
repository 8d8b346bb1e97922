"""Mutation audit of the operating points, ROC curves, --pick balanced and the new bootstrap
intervals (metrics.operating_point, evaluate --operating-point/--roc, predict --threshold,
compare --roc, balanced_pick): behaviours the earlier tests let slip."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import test_operating_point
import torch
from test_bootstrap_calibration_localisation import _probs

from causalign.errors import InputError
from causalign.metrics.operating_point import (
    OperatingPoint,
    check_probability,
    choose_threshold,
    operating_point_metrics,
)

# the 2-epoch ERM run of test_operating_point (one training for both files' tests)
erm_run = test_operating_point.erm_run


def test_threshold_bounds_are_inclusive_and_a_bool_is_no_probability():
    """0 and 1 are thresholds (call everything / only p₁ = 1 positive), given as numbers or
    as ``threshold=0``/``threshold=1``; True is refused although it compares as 1. Kills
    ``threshold < 1.0`` in `check_probability` and the dropped ``isinstance(bool)`` test."""
    for t in (0, 0.0, 1, 1.0):
        check_probability(t)  # no error
    for text, t in (("threshold=0", 0.0), ("threshold=1", 1.0)):
        assert OperatingPoint.parse(text) == OperatingPoint("threshold", t)
    for bad in (True, False, 1.0000001, -1e-9, float("nan"), "0.5", None):
        with pytest.raises(InputError, match="must be a probability in \\[0, 1\\]"):
            check_probability(bad)
    # at 1.0 only a sample whose p₁ is exactly 1 is called positive
    probs = np.array([[0.0, 1.0], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    y = np.array([1, 1, 0, 0])
    m = operating_point_metrics(probs, y, 1.0)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 1, 2, 0)
    assert operating_point_metrics(probs, y, 0.0)["sensitivity"] == 1.0


@pytest.mark.parametrize("rule", ["youden", "sensitivity=0.9", "specificity=0.9"])
def test_choosing_on_negatives_only_is_refused(rule):
    """A val split with no positive (only class 0) is refused as one without negatives is:
    the ROC curve's sensitivity is undefined there. Kills the class-0 half of the "both
    classes" check dropped (``if positive.all():`` only)."""
    probs, _ = _probs(30, 2, seed=1)
    with pytest.raises(InputError, match="needs both classes, got only class 0 \\(30 samples"):
        choose_threshold(OperatingPoint.parse(rule), probs, np.zeros(30, dtype=int))


def test_evaluate_split_refuses_a_threshold_on_three_classes_before_any_pass(tmp_path):
    """`evaluate_split(threshold=)` checks the dataset's classes before touching the model
    (here None: any pass would fail otherwise than with the one-line InputError). Kills
    `check_threshold` without its `check_two_classes`."""
    from causalign.engine.evaluate import check_threshold, evaluate_split

    ds = SimpleNamespace(meta=SimpleNamespace(classes=["normal", "benign", "malignant"]),
                         root=tmp_path, split="test")
    with pytest.raises(InputError, match="3-class run needs its positive class: give "
                                         "--positive CLASS .* normal, benign, malignant"):
        evaluate_split(None, None, ds, "cpu", threshold=0.5)
    check_threshold(0.5, SimpleNamespace(meta=SimpleNamespace(classes=["a", "b"]),
                                         root=tmp_path))  # two classes: accepted


def test_attribute_accuracy_mean_is_the_mean_of_the_attributes_accuracies():
    """``attribute_accuracy.mean`` averages each attribute's accuracy (an attribute
    annotated on few samples counts as much as one annotated on all), and an attribute
    annotated nowhere is None and left out. Kills the mean pooled over all known hits."""
    from causalign.engine.evaluate import _attribute_accuracy

    nan = np.nan
    hits = np.array([[1, 0, nan], [1, nan, nan], [1, nan, nan], [0, nan, nan]], dtype=float)
    acc = _attribute_accuracy(hits, ["a", "b", "c"])
    assert acc["per_attribute"] == {"a": 0.75, "b": 0.0, "c": None}
    assert acc["mean"] == pytest.approx((0.75 + 0.0) / 2, abs=1e-15)  # pooled: 3/5


def test_delong_title_names_a_then_b():
    """`compare --roc`'s title gives run A's AUC first (the argument order, as
    ``delong.auc_a``), then B's and DeLong's p; without a p: the one-vs-rest title. Kills
    the AUCs swapped."""
    from causalign.cli import _delong_title

    title = _delong_title({"delong": {"auc_a": 0.91234, "auc_b": 0.70001, "p_value": 0.0123}})
    assert title == "AUC 0.912 vs 0.700, DeLong p = 0.0123"
    assert _delong_title({"delong": None}) == "ROC curves (one-vs-rest per class)"
    assert _delong_title({"delong": {"reason": "one class"}}) == (
        "ROC curves (one-vs-rest per class)")


def test_cli_fixed_threshold_is_used_as_given_and_not_called_optimistic(erm_run, tmp_path,
                                                                          capsys):
    """`evaluate --operating-point threshold=T`: the rates are those at T itself (not at
    argmax's 0.5), and on the val split a fixed T carries no "optimistic" note (nothing was
    chosen there). Kills ``threshold = point.target`` replaced by 0.5 and the note given for
    every rule on val."""
    import csv

    from causalign.cli import main

    capsys.readouterr()
    pred = tmp_path / "val.csv"
    assert main(["evaluate", str(erm_run), "--split", "val", "--operating-point",
                 "threshold=0.3", "--predictions", str(pred), "--no-progress"]) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    with open(pred, newline="") as fh:
        rows = list(csv.DictReader(fh))
    p = np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows])
    y = np.array([int(r["label"]) for r in rows])
    ref = operating_point_metrics(p, y, 0.3)
    assert op["threshold"] == 0.3 and op["rule"] == "threshold=0.3"
    assert {k: op[k] for k in ref} == pytest.approx(ref, abs=1e-12)
    assert "note" not in op and op["chosen_on"] is None
    # the fixture's model calls some val samples differently at 0.3 and 0.5
    assert ((p[:, 1] >= 0.3) != (p[:, 1] >= 0.5)).any()


def test_operating_point_intervals_resample_the_rates_at_the_given_threshold(tiny_data,
                                                                              erm_run):
    """``ci95.operating_point`` is `bootstrap_ci`'s interval of the per-sample rates at the
    threshold given (the same draws as accuracy), not at argmax's 0.5. Kills the per-sample
    rates computed at 0.5 (the earlier test checked only that each interval holds its
    point estimate)."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import evaluate_split
    from causalign.engine.evaluate import predict as predict_split
    from causalign.engine.trainer import load_run
    from causalign.metrics import bootstrap_ci
    from causalign.metrics.operating_point import operating_point_per_sample

    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    p, y, _ = predict_split(model, method, ds, "cpu")
    t = float(np.quantile(p[:, 1], 0.25))
    assert ((p[:, 1] >= t) != (p[:, 1] >= 0.5)).sum() >= 2  # 0.5 would call others
    m = evaluate_split(model, method, ds, "cpu", saliency="gradient", fractions=(0.1,),
                       threshold=t, bootstrap=200)
    rates = operating_point_per_sample(p, y, t)
    ref = bootstrap_ci(p, y, 200, 0, per_sample={f"op@{k}": v for k, v in rates.items()})["ci95"]
    assert set(m["ci95"]["operating_point"]) == set(rates)
    for name in rates:
        got = m["ci95"]["operating_point"][name]
        assert got == pytest.approx(ref[f"op@{name}"], abs=1e-12), name


class ZeroAttributes(torch.nn.Module):
    """A stub attribute predictor: every attribute logit exactly 0."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.w = torch.nn.Parameter(torch.zeros(1))

    def attributes(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(len(x), self.n) * self.w


def _masked_batches(ds, **keys):
    """``ds`` whose batches have each named bool key (e.g. has_annotation) replaced by
    ``fn(index)`` of the samples' indices."""
    real = ds.batch

    def batch(idx):
        out = real(idx)
        for key, fn in keys.items():
            out[key] = fn(idx).expand_as(out[key]).to(out[key].dtype).clone()
        return out

    ds.batch = batch
    return ds


def test_attribute_hits_call_a_zero_logit_absent(tiny_data):
    """σ(logit) > 0.5 is "present": a logit of exactly 0 (σ = 0.5) predicts the attribute
    absent, so it hits where the attribute is annotated absent. A stub model gives all-zero
    attribute logits. Kills ``logits >= 0``."""
    import torch

    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import attribute_hits

    ds = LesionDataset(tiny_data, "test")
    batch = ds.batch(torch.arange(len(ds)))
    hits = attribute_hits(ZeroAttributes(len(ds.meta.attributes)),
                          SimpleNamespace(model_input=lambda b: b["image"]), ds, "cpu")
    want = (batch["attributes"] <= 0.5).double().numpy()
    want[~batch["attr_known"].numpy().astype(bool)] = np.nan
    np.testing.assert_array_equal(hits, want)
    assert 0 < np.nanmean(want) < 1  # both present and absent attributes annotated


def test_with_threshold_checks_the_classes_the_pass_found():
    """A run trained before its classes were recorded is checked after the pass, on the
    classes of the predictions: three classes and a threshold are refused; two classes get
    the threshold (as a float) and `called` at it, argmax staying in `predicted`. Kills
    `_with_threshold` without its `_check_threshold`."""
    from causalign.engine.inference import Predictions, _with_threshold

    p3, _ = _probs(4, 3, seed=0)
    three = Predictions([f"s{i}" for i in range(4)], ["x"] * 4, p3, ["n", "b", "m"])
    with pytest.raises(InputError, match="3-class run needs its positive class: give "
                                         "--positive CLASS .* n, b, m"):
        _with_threshold(three, 0.5)
    assert _with_threshold(three, None).threshold is None
    p2 = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    two = _with_threshold(Predictions(["a", "b", "c"], ["x"] * 3, p2, ["neg", "pos"]), 0.4)
    assert two.threshold == 0.4 and two.called.tolist() == [0, 1, 1]
    assert two.predicted.tolist() == [0, 1, 0]


def test_attribute_hits_are_none_where_no_attribute_is_annotated(tiny_data):
    """A split whose attributes are all unannotated gives no hits (None: no
    ``attribute_accuracy`` entry), not an all-NaN array whose mean is NaN. Kills the
    all-NaN check dropped."""
    from causalign.data.format import LesionDataset
    from causalign.engine.evaluate import attribute_accuracy, attribute_hits

    ds = _masked_batches(LesionDataset(tiny_data, "test"),
                         attr_known=lambda idx: torch.zeros(len(idx), 1, dtype=torch.bool))
    model = ZeroAttributes(len(ds.meta.attributes))
    method = SimpleNamespace(model_input=lambda b: b["image"])
    assert attribute_hits(model, method, ds, "cpu") is None
    assert attribute_accuracy(model, method, ds, "cpu") is None


def test_predict_csv_keeps_argmax_class_beside_the_called_one(tmp_path):
    """`predict --threshold`'s CSV: ``predicted_class`` stays the argmax's class name and
    ``called_class`` is the class at the threshold (they differ for p₁ in [T, 0.5)). Kills
    predicted_class written as the called class."""
    import csv

    from causalign.engine.inference import Predictions

    p = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    pred = Predictions(["a", "b", "c", "d"], ["x"] * 4, p, ["neg", "pos"], threshold=0.35)
    pred.write_csv(tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["predicted_class"] for r in rows] == ["neg", "pos", "neg", "neg"]
    assert [r["called_class"] for r in rows] == ["neg", "pos", "pos", "neg"]
    assert [r["predicted"] for r in rows] == ["0", "1", "0", "0"]


def test_roc_figure_marks_points_on_two_class_curves_only(tmp_path):
    """Guard: thresholds on class 1's probability are marked on a two-class curve only; a
    three-class figure's one-vs-rest curves get none (class 1's curve vs the rest is not the
    curve such a threshold moves along for the argmax). Kills marks drawn on class 1's
    one-vs-rest curve."""
    from causalign.report.figures import roc_figure

    probs, y = _probs(60, 3, seed=5)
    drawn = roc_figure({"run": (probs, y)}, tmp_path / "roc.png",
                       points={"run": [("argmax", 0.5)]})
    assert [c["class"] for c in drawn["run"]] == [0, 1, 2]
    assert all(c["points"] == [] for c in drawn["run"])


def test_cam_empty_fraction_counts_annotated_samples_only(tiny_data, erm_run, monkeypatch):
    """``cam_empty_fraction`` is the share of the annotated samples whose map is empty: an
    unannotated sample is not counted (neither empty nor not). Every map is stubbed "empty"
    and half the samples unannotated, so it must be exactly 1 (counting the unannotated as
    0 gives 0.5). Kills the NaN flags counted as zeros."""
    import causalign.engine.evaluate as evaluate
    from causalign.data.format import LesionDataset
    from causalign.engine.trainer import load_run

    _, model, method, _ = load_run(erm_run, device="cpu")
    def odd(idx: torch.Tensor) -> torch.Tensor:
        return idx % 2 == 1

    ds = _masked_batches(LesionDataset(tiny_data, "test"), has_annotation=odd, has_mask=odd)
    real = evaluate.normalize_maps
    monkeypatch.setattr(evaluate, "normalize_maps",
                        lambda m, *a, **k: (real(m, *a, **k)[0],
                                            torch.ones(len(m), dtype=torch.bool)))
    m = evaluate.evaluate_split(model, method, ds, "cpu", saliency="gradient",
                                fractions=(0.1,))
    assert m["n_annotated"] == len(ds) // 2
    assert m["cam_empty_fraction"] == 1.0


def test_compare_roc_draws_b_in_a_s_sample_order(tmp_path, capsys, monkeypatch):
    """`compare --roc` with B's CSV listing the same samples in another order: B's curve
    is that of B's probabilities against each sample's own label (B's rows put in A's
    order), with the AUC `compare` reports as auc_b. Kills B's rows drawn in B's file order
    against A's labels."""
    from sklearn.metrics import roc_auc_score
    from test_audit_compare_1207f import _write_csv

    import causalign.report.figures as figures
    from causalign.cli import main

    probs_a, y = _probs(60, 2, seed=7)
    probs_b, _ = _probs(60, 2, seed=8)
    ids = [f"s{i}" for i in range(60)]
    rev = slice(None, None, -1)
    _write_csv(tmp_path / "a.csv", ids, y, probs_a)
    _write_csv(tmp_path / "b.csv", ids[rev], y[rev], probs_b[rev])
    seen = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(curves) or real(curves, path,
                                                                              **k))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--roc",
                 str(tmp_path / "roc.png")]) in (0, None)
    result = json.loads(capsys.readouterr().out)
    (curves,) = seen
    (pa, ya), (pb, yb) = curves["a.csv"], curves["b.csv"]
    np.testing.assert_array_equal(ya, y)
    assert roc_auc_score(ya, pa[:, 1]) == pytest.approx(result["auc_a"], abs=1e-12)
    assert roc_auc_score(yb, pb[:, 1]) == pytest.approx(result["auc_b"], abs=1e-12)
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, probs_b[:, 1]), abs=1e-12)


def test_two_outputs_through_dot_dot_are_one_file(tmp_path):
    """`_refuse_one_file` compares where the paths lead, not their spelling: ``d/../x.png``
    and ``x.png`` are one file and refused, naming both options; two files pass. Kills the
    check by ``a == b``."""
    from causalign.cli import _refuse_one_file
    from causalign.errors import CausalignError

    (tmp_path / "d").mkdir()
    roc, same = tmp_path / "d" / ".." / "x.png", tmp_path / "x.png"
    with pytest.raises(CausalignError, match=r"--roc .* and --reliability .* name the same "
                                             r"file"):
        _refuse_one_file(out=None, roc=roc, reliability=same)
    _refuse_one_file(out=tmp_path / "m.json", roc=roc, reliability=tmp_path / "y.png")
