"""Mutation audit of the last review's fixes (draws by the split's own classes in
`operating_point_bootstrap(strata=)` and `roc_band(positive=)`, `read_predictions`'
temperature column and `compare`'s warning, `compare --roc --positive`): behaviours the
earlier tests let slip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_operating_point
from sklearn.metrics import roc_curve
from test_audit_compare_1207f import _write_csv
from test_roc_band import _polyline

from causalign.data.format import LesionDataset
from causalign.engine.evaluate import evaluate_split, read_predictions
from causalign.engine.trainer import load_run
from causalign.errors import InputError
from causalign.metrics import bootstrap_ci
from causalign.metrics import operating_point as op_module
from causalign.metrics.classification import _resample_counts
from causalign.metrics.operating_point import (
    OperatingPoint,
    one_vs_rest,
    operating_point_bootstrap,
    operating_point_per_sample,
)
from causalign.metrics.roc import roc_band

# the 2-epoch ERM run on the two-class tiny benchmark (one training for several files)
erm_run = test_operating_point.erm_run


def _three_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of unequal counts, interleaved in the split's order (classes 1 and 2
    mixed), so that sorting by "class 0 against the rest" leaves them unsorted."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.3, 0.45, 0.25])
    logits = rng.normal(0, 1, (n, 3)) + 1.2 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return p, y


def test_strata_of_three_classes_give_bootstrap_cis_test_draws(monkeypatch):
    """`operating_point_bootstrap(..., strata=y)` on class 0 against the rest of 3 classes:
    with the threshold held fixed, its rates are `bootstrap_ci(p, y)`'s per-sample rates
    exactly (the split's own stratified draws), and strata of another shape is refused.
    Kills: sorting by the one-vs-rest labels while stratifying by the classes (classes 1
    and 2 then interleaved: wrong slices), and dropping the shape check."""
    p, y = _three_classes(45, 0)
    p_op, y_op = one_vs_rest(p, y, 0)
    t = float(np.median(p[:, 0]))
    monkeypatch.setattr(op_module, "choose_threshold", lambda *a, **k: t)
    got = operating_point_bootstrap(OperatingPoint.parse("youden"), p_op, y_op, p_op, y_op,
                                    200, seed=5, strata=y)["ci95"]
    rates = operating_point_per_sample(p_op, y_op, t)
    ref = bootstrap_ci(p, y, 200, 5, per_sample={f"op@{k}": v for k, v in rates.items()}
                       )["ci95"]
    assert got["threshold"] == pytest.approx([t, t])
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        assert got[k] == pytest.approx(ref[f"op@{k}"], abs=1e-12), k
    # and not the draws of the relabelled problem (the test above can tell them apart)
    plain = operating_point_bootstrap(OperatingPoint.parse("youden"), p_op, y_op, p_op, y_op,
                                      200, seed=5)["ci95"]
    assert any(plain[k] != got[k] for k in ("sensitivity", "specificity", "ppv", "npv"))
    with pytest.raises(InputError, match="strata has shape"):
        operating_point_bootstrap(OperatingPoint.parse("youden"), p_op, y_op, p_op, y_op,
                                  100, seed=5, strata=y[:-1])


@pytest.mark.parametrize("positive", [0, 2])
def test_roc_band_of_one_class_of_three_against_sklearn_on_the_splits_draws(positive):
    """`roc_band(p, y, positive=c)` on 3 classes: each resample is `bootstrap_ci`'s draw of
    the split sorted by its own classes, the curve of c against the rest (scikit-learn on
    the drawn samples). Kills: sorting or stratifying by the one-vs-rest flags instead."""
    p, y = _three_classes(60, 1)
    band = roc_band(p, y, n=100, seed=2, positive=positive)
    grid = band["fpr"]
    order = np.argsort(y, kind="stable")
    ys, ss = y[order], p[order, positive]
    curves = []
    for w in _resample_counts(ys, 100, 2):
        for row in w:
            drawn = np.repeat(np.arange(len(ys)), row.astype(int))
            f, tp, _ = roc_curve(ys[drawn] == positive, ss[drawn], drop_intermediate=False)
            curves.append([_polyline(f, tp, g) for g in grid])
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    np.testing.assert_allclose(band["lo"], lo, atol=1e-12)
    np.testing.assert_allclose(band["hi"], hi, atol=1e-12)
    assert band["positive"] == positive


def _scaled(path, temps):
    """Append a temperature column (one value per row, cycled) to a predictions CSV."""
    text = path.read_text().splitlines()
    rows = [f"{r},{temps[i % len(temps)]}" for i, r in enumerate(text[1:])]
    path.write_text("\n".join([text[0] + ",temperature", *rows]) + "\n")


@pytest.mark.parametrize("temps", [["2", ""], ["2", "3"], ["2", "x"]])
def test_temperature_column_of_mixed_values_is_refused(tmp_path, temps):
    """A temperature column with two different values, an empty cell beside a value, or a
    non-number is refused (one T scales every row). Kills: treating any empty cell as "no
    column" and taking one of several values."""
    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "a.csv", [f"s{i}" for i in range(6)], np.arange(6) % 2,
               rng.dirichlet([1, 1], 6))
    _scaled(tmp_path / "a.csv", temps)
    with pytest.raises(InputError, match="the temperature column holds"):
        read_predictions(tmp_path / "a.csv")


def test_guard_temperature_column_read(tmp_path):
    """Guard: one value in every row is that T; no column is None."""
    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "a.csv", [f"s{i}" for i in range(6)], np.arange(6) % 2,
               rng.dirichlet([1, 1], 6))
    assert read_predictions(tmp_path / "a.csv").temperature is None
    _scaled(tmp_path / "a.csv", ["2.5"])
    assert read_predictions(tmp_path / "a.csv").temperature == 2.5


def test_compare_both_csvs_scaled_records_and_warns_each(tmp_path, capsys):
    """Both CSVs from `predict --temperature` (T 2 and 3): operating_point records
    temperature_a = 2 and temperature_b = 3 and one warning line names each file. Kills:
    looking at run b only, and recording every T under temperature_b."""
    from causalign.cli import main

    rng = np.random.default_rng(1)
    ids, y = [f"s{i}" for i in range(20)], np.arange(20) % 2
    for name, t in (("a.csv", "2"), ("b.csv", "3")):
        _write_csv(tmp_path / name, ids, y, rng.dirichlet([1, 1], 20))
        _scaled(tmp_path / name, [t])
    out = tmp_path / "c.json"
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--operating-point", "threshold=0.45", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2, err
    assert "a.csv" in err[0] and "temperature 2 " in err[0], err
    assert "b.csv" in err[1] and "temperature 3 " in err[1], err
    op = json.loads(out.read_text())["operating_point"]
    assert (op["temperature_a"], op["temperature_b"]) == (2, 3)


def test_compare_roc_positive_0_of_two_classes_draws_class_0_against_the_rest(
        tmp_path, monkeypatch):
    """`compare --roc --operating-point threshold=0.4 --positive benign` on two classes:
    the thresholds are on p_benign, so the curves drawn are benign's against the rest
    (probabilities [1 − p_benign, p_benign], labels y == 0), titled with the two-class
    DeLong test and "· benign vs rest". Kills: redrawing the curves for more than two
    classes only (class 1's curves with class 0's thresholds marked)."""
    import causalign.report.figures as figures
    from causalign.cli import main

    seen = {}
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, title=None, **k: seen.update(curves=curves,
                                                                          title=title))
    rng = np.random.default_rng(2)
    ids, y = [f"s{i}" for i in range(24)], np.arange(24) % 2
    pa, pb = rng.dirichlet([1, 1], 24), rng.dirichlet([1, 1], 24)
    _write_csv(tmp_path / "a.csv", ids, y, pa)
    _write_csv(tmp_path / "b.csv", ids, y, pb)
    out = tmp_path / "c.json"
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--operating-point", "threshold=0.4", "--positive", "benign", "--roc",
                 str(tmp_path / "roc.png"), "--out", str(out)]) == 0
    (ca, cb) = seen["curves"].values()
    for (probs, labels), p in ((ca, pa), (cb, pb)):
        np.testing.assert_allclose(probs[:, 1], p[:, 0], atol=1e-15)
        np.testing.assert_array_equal(labels, (y == 0).astype(int))
    test = json.loads(out.read_text())["delong"]
    assert seen["title"] == (f"AUC {test['auc_a']:.3f} vs {test['auc_b']:.3f}, DeLong p = "
                             f"{test['p_value']:.3g} · benign vs rest")


def test_roc_band_refuses_a_class_the_split_lacks():
    """`roc_band(positive=2)` on a split with no sample of class 2 (3-class probabilities):
    no positives, no curve, refused rather than a band of NaN. Kills: checking only "every
    sample positive"."""
    p, y = _three_classes(30, 3)
    y = np.where(y == 2, 1, y)
    with pytest.raises(InputError, match="needs class 2 and another class"):
        roc_band(p, y, n=100, positive=2)


def test_evaluate_roc_title_names_class_0_of_two(tiny_data, erm_run, monkeypatch):
    """`evaluate --roc --threshold T --positive 0` on two classes: the curve drawn is class
    0's against the rest, so the title says "· <class 0> vs rest" (class 1's curve, the
    default, says nothing). Kills: adding the suffix for more than two classes only."""
    import causalign.report.figures as figures

    titles = []
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: titles.extend(curves))
    _, model, method, _ = load_run(erm_run, device="cpu")
    ds = LesionDataset(tiny_data, "test", limit=12)
    for positive in (0, 1):
        evaluate_split(model, method, ds, "cpu", threshold=0.5, positive=positive,
                       roc="unused.png", fractions=(0.1,))
    name = ds.meta.classes[0]
    assert titles == [f"split 'test' · {name} vs rest", "split 'test'"]
