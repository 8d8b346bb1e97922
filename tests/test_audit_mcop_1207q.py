"""Operating points for more than two classes: ``--positive CLASS`` on `evaluate`, `compare`
and `predict` (one-vs-rest on that class's probability), its defaults and its refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import test_operating_point
from sklearn.metrics import confusion_matrix
from test_audit_compare_1207f import _error_line, _write_csv
from test_multiclass import BUSI, _write_three_class

from causalign.cli import main
from causalign.data.format import LesionDataset
from causalign.engine.evaluate import predict as predict_split
from causalign.engine.trainer import TrainConfig, load_run, train
from causalign.errors import InputError
from causalign.metrics.operating_point import (
    OperatingPoint,
    choose_threshold,
    one_vs_rest,
    operating_point_metrics,
    positive_class,
)

# the 2-epoch ERM run on the two-class tiny benchmark (one training for several files)
erm_run = test_operating_point.erm_run


def _sklearn_rates(scores: np.ndarray, is_pos: np.ndarray, t: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV from scikit-learn's confusion matrix of the calls
    ``scores >= t`` against ``is_pos``: the reference, computed without causalign."""
    tn, fp, fn, tp = confusion_matrix(is_pos, scores >= t, labels=[False, True]).ravel()
    return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A real 1-epoch ERM run on a 3-class (BUSI-like) dataset."""
    tmp = tmp_path_factory.mktemp("mcop")
    data = _write_three_class(tmp / "data")
    run = tmp / "run3"
    train(data, TrainConfig(method="erm", epochs=1, width=4, batch_size=8), run,
          progress=False)
    return data, run


def test_positive_class_takes_a_name_or_an_index_and_refuses_the_rest():
    assert positive_class(None, ["benign", "malignant"]) == 1  # two classes: class 1
    assert positive_class("malignant", BUSI) == 2
    assert positive_class("0", BUSI) == 0 and positive_class(1, BUSI) == 1
    assert positive_class("1", ["0", "1", "2"]) == 1  # a name first (here the same)
    assert positive_class("2", ["2", "x", "y"]) == 0  # the class named "2", not index 2
    with pytest.raises(InputError, match="give --positive CLASS .* normal, benign, malignant"):
        positive_class(None, BUSI)
    for bad in ("cancer", "3", "-1", "1.0", True):
        with pytest.raises(InputError, match="not a class of this run; give one of normal, "
                                             "benign, malignant .*0-2"):
            positive_class(bad, BUSI)


def test_one_vs_rest_rates_match_sklearn_and_two_classes_stay_as_they_are():
    rng = np.random.default_rng(0)
    p_val, p_test = rng.dirichlet([1, 1, 1], 60), rng.dirichlet([1, 1, 1], 50)
    y_val, y_test = np.arange(60) % 3, rng.integers(0, 3, 50)
    for c in range(3):
        t = choose_threshold(OperatingPoint.parse("sensitivity=0.8"),
                             *one_vs_rest(p_val, y_val, c))
        # chosen on val as the rule says: sensitivity ≥ 0.8 there, on class c vs the rest
        assert _sklearn_rates(p_val[:, c], y_val == c, t)["sensitivity"] >= 0.8
        got = operating_point_metrics(*one_vs_rest(p_test, y_test, c), t)
        want = _sklearn_rates(p_test[:, c], y_test == c, t)
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    p2 = rng.dirichlet([1, 1], 20)
    y2 = np.arange(20) % 2
    same_p, same_y = one_vs_rest(p2, y2, 1)
    assert np.array_equal(same_p, p2) and np.array_equal(same_y, y2)  # not 1 − p₁ for p₀


def test_evaluate_three_classes_one_vs_rest_against_sklearn(run3, tmp_path, capsys):
    """`evaluate --operating-point sensitivity=0.9 --positive malignant` on a 3-class run:
    the threshold meets the sensitivity on val for malignant vs the rest, and the reported
    rates are scikit-learn's on the test split's p_malignant; the index gives the same."""
    data, run = run3
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--operating-point", "sensitivity=0.9", "--positive",
                 "malignant", "--bootstrap", "100", "--roc", str(tmp_path / "roc.png"),
                 "--out", str(out), "--no-progress", "--device", "cpu"]) in (0, None)
    op = json.loads(out.read_text())["operating_point"]
    assert op["positive"] == "malignant" and op["chosen_on"] == "val"
    _, model, method, _ = load_run(run, device="cpu")
    p_val, y_val, _ = predict_split(model, method, LesionDataset(data, "val"), "cpu")
    p_test, y_test, _ = predict_split(model, method, LesionDataset(data, "test"), "cpu")
    assert _sklearn_rates(p_val[:, 2], y_val == 2, op["threshold"])["sensitivity"] >= 0.9
    want = _sklearn_rates(p_test[:, 2], y_test == 2, op["threshold"])
    assert {k: op[k] for k in want} == pytest.approx(want, abs=1e-12)
    m = json.loads(out.read_text())
    assert set(m["ci95"]["operating_point"]) == {"sensitivity", "specificity", "ppv", "npv"}
    assert "operating_point_with_threshold" in m["ci95"] and (tmp_path / "roc.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--operating-point", "sensitivity=0.9", "--positive",
                 "2", "--no-progress", "--device", "cpu"]) in (0, None)
    by_index = json.loads(capsys.readouterr().out)["operating_point"]
    assert by_index == op


def test_evaluate_two_classes_unchanged_but_for_positive(erm_run, tmp_path, capsys):
    """Guard: a two-class run's operating point is class 1's by default; ``--positive 1`` and
    ``--positive malignant`` give the very same JSON; the only new key is ``positive`` (the
    base commit's output on this kind of run was checked equal apart from it)."""
    outs = []
    for extra in ([], ["--positive", "1"], ["--positive", "malignant"]):
        capsys.readouterr()
        assert main(["evaluate", str(erm_run), "--operating-point", "youden", "--calibrate",
                     "temperature", "--no-progress", "--device", "cpu", *extra]) in (0, None)
        outs.append(json.loads(capsys.readouterr().out)["operating_point"])
    assert outs[0] == outs[1] == outs[2]
    assert list(outs[0])[:3] == ["rule", "positive", "chosen_on"]
    assert outs[0]["positive"] == "malignant" and "threshold_calibrated" in outs[0]
    capsys.readouterr()
    # positive 0 on two classes: benign vs the rest, its calibrated threshold still exact
    assert main(["evaluate", str(erm_run), "--operating-point", "threshold=0.5", "--positive",
                 "benign", "--no-progress", "--device", "cpu"]) in (0, None)
    zero = json.loads(capsys.readouterr().out)["operating_point"]
    assert zero["positive"] == "benign" and zero["tp"] + zero["fn"] == outs[0]["tn"] + outs[0][
        "fp"]


def test_predict_calls_the_positive_class_else_the_likeliest_other():
    from causalign.engine.inference import Predictions, _with_threshold

    p = np.array([[0.5, 0.2, 0.3], [0.1, 0.35, 0.55], [0.2, 0.3, 0.5], [0.45, 0.3, 0.25]])
    got = _with_threshold(Predictions([f"s{i}" for i in range(4)], ["x"] * 4, p, BUSI),
                          0.3, positive="benign")
    # benign (1) where p_benign ≥ 0.3, else argmax of normal/malignant
    assert got.positive == 1 and got.called.tolist() == [0, 1, 1, 1]
    got = _with_threshold(Predictions([f"s{i}" for i in range(4)], ["x"] * 4, p, BUSI),
                          0.6, positive=2)
    assert got.called.tolist() == [0, 1, 1, 0]  # nothing reaches 0.6: the best of 0 and 1
    assert got.predicted.tolist() == [0, 2, 2, 0]


def test_predict_cli_three_classes_and_refusals(run3, tmp_path, capsys):
    data, run = run3
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--out", str(out), "--threshold", "0.3",
                 "--positive", "malignant", "--no-progress", "--device", "cpu"]) in (0, None)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    p = np.array([[float(r[f"p_{c}"]) for c in BUSI] for r in rows])
    rest = np.where(p[:, 0] >= p[:, 1], "normal", "benign")
    assert [r["called_class"] for r in rows] == np.where(p[:, 2] >= 0.3, "malignant",
                                                         rest).tolist()
    assert {r["positive"] for r in rows} == {"malignant"}
    base = ["predict", str(run), str(data), "--out", str(tmp_path / "x.csv"), "--no-progress"]
    for extra, part in ((["--threshold", "0.3"], "give --positive CLASS (one-vs-rest), one of "
                                                 "normal, benign, malignant"),
                        (["--threshold", "0.3", "--positive", "9"], "not a class of this run"),
                        (["--positive", "1"], "--positive 1 is used only with --threshold"),
                        (["--threshold", "0.3", "--positive", "1", "--temperature", "2"],
                         "no threshold_calibrated exists")):
        assert part in _error_line(capsys, [*base, *extra])
        assert not (tmp_path / "x.csv").exists()


def test_evaluate_refusals_in_one_line(run3, capsys):
    _, run = run3
    base = ["evaluate", str(run), "--no-progress", "--device", "cpu"]
    for extra, part in (
            (["--operating-point", "youden"], "--operating-point youden: an operating point "
                                              "on a 3-class run needs its positive class: "
                                              "give --positive CLASS (one-vs-rest), one of "
                                              "normal, benign, malignant"),
            (["--operating-point", "youden", "--positive", "cancer"],
             "--positive: positive class 'cancer': not a class of this run; give one of "
             "normal, benign, malignant (or an index 0-2)"),
            (["--operating-point", "youden", "--positive", "3"], "not a class of this run"),
            (["--positive", "malignant"], "--positive malignant is used only with "
                                          "--operating-point RULE"),
            (["--operating-point", "youden", "--positive", "2", "--calibrate", "temperature"],
             "no threshold_calibrated exists")):
        assert part in _error_line(capsys, [*base, *extra])


def _busi_run(folder, rng, n_val=45, n_test=30, skill=2.0):
    """A run folder with hand-written 3-class predictions_val/test.csv (the same ids and
    labels in every run)."""
    (folder / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("method: erm\ndata_content_digest: 0123456789abcdef\n")
    out = {}
    for split, n in (("val", n_val), ("test", n_test)):
        y = np.arange(n) % 3
        logits = rng.normal(0, 1, (n, 3)) + skill * np.eye(3)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        _write_csv(folder / f"predictions_{split}.csv", [f"{split}_{i:03d}" for i in range(n)],
                   y, p, BUSI)
        out[split] = (p, y)
    return out


def test_compare_three_classes_one_vs_rest_against_sklearn(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a, b = _busi_run(tmp_path / "a", rng), _busi_run(tmp_path / "b", rng, skill=1.0)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--operating-point",
                 "specificity=0.8", "--positive", "benign", "--bootstrap", "100", "--roc",
                 str(tmp_path / "roc.png")]) in (0, None)
    op = json.loads(capsys.readouterr().out)["operating_point"]
    assert op["positive"] == "benign"
    for which, run in (("a", a), ("b", b)):
        (pv, yv), (pt, yt) = run["val"], run["test"]
        t = op[f"threshold_{which}"]
        assert _sklearn_rates(pv[:, 1], yv == 1, t)["specificity"] >= 0.8
        want = _sklearn_rates(pt[:, 1], yt == 1, t)
        assert op[f"sensitivity_{which}"] == pytest.approx(want["sensitivity"], abs=1e-12)
        assert op[f"specificity_{which}"] == pytest.approx(want["specificity"], abs=1e-12)
    assert "ci95" in op or any(k.startswith("ci95") for k in op)
    assert "--positive: positive class 'x'" in _error_line(
        capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--operating-point",
                 "youden", "--positive", "x"])
    assert "give --positive CLASS" in _error_line(
        capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--operating-point",
                 "youden"])
    assert "--positive 0 is used only with --operating-point" in _error_line(
        capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--positive", "0"])
