"""Paired comparison of two runs (DeLong's test of correlated AUCs, McNemar's test of paired
accuracy, `causalign compare`) and reliability diagrams (`reliability_diagram`,
`evaluate --reliability`, `compare --reliability`): checked against independent references
(scikit-learn's AUC, a direct O(n²) structural-components variance, scipy / statsmodels)."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.engine.evaluate import read_predictions
from causalign.errors import InputError
from causalign.metrics import (
    delong_test,
    expected_calibration_error,
    mcnemar_test,
    reliability_bins,
)
from causalign.report.figures import _reliability_figure, reliability_diagram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _delong_direct(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """DeLong 1988 written out: ψ over every (positive, negative) pair, the placement values
    V10 (per positive) and V01 (per negative), their sample covariances (ddof 1)."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    s10 = np.cov(np.stack(v10))
    s01 = np.cov(np.stack(v01))
    cov = s10 / m + s01 / n
    return aucs[0], aucs[1], cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


@pytest.mark.parametrize("seed", range(6))
def test_delong_matches_sklearn_auc_and_direct_structural_components(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 60))
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 0, 1  # at least two of each class
    # scores rounded to one decimal: many ties within and across the classes
    a = np.round(0.4 * y + rng.random(n), 1)
    b = np.round(0.2 * y + rng.random(n), 1)
    r = delong_test(a, b, y)
    auc_a, auc_b, var = _delong_direct(a, b, y)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert r["auc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert r["se"] ** 2 == pytest.approx(var, abs=1e-10)
    assert r["difference"] == pytest.approx(auc_a - auc_b, abs=1e-12)
    z = (auc_a - auc_b) / np.sqrt(var)
    assert r["z"] == pytest.approx(z, abs=1e-9)
    assert r["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), abs=1e-9)
    lo, hi = r["ci95"]
    assert lo == pytest.approx(r["difference"] - 1.959963985 * r["se"], abs=1e-9)
    assert hi == pytest.approx(r["difference"] + 1.959963985 * r["se"], abs=1e-9)
    assert (r["n_positive"], r["n_negative"]) == (int(y.sum()), int((y == 0).sum()))


def test_delong_p_value_is_uniform_under_the_null():
    """Two scorers of the same quality (each its own noise on the same samples): at the 0.05
    level, about 5 % of 200 simulated test sets reject."""
    rng = np.random.default_rng(1)
    p = []
    for _ in range(200):
        y = rng.integers(0, 2, 80)
        a = y + rng.normal(0, 1.2, 80)
        b = y + rng.normal(0, 1.2, 80)
        p.append(delong_test(a, b, y)["p_value"])
    p = np.array(p)
    assert 0.01 <= (p < 0.05).mean() <= 0.10
    assert 0.35 <= np.mean(p) <= 0.65  # uniform's mean is 0.5


def test_delong_input_forms_and_refusals():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    p1 = np.clip(0.3 * y + rng.random(40) * 0.7, 0, 1)
    p2 = rng.random(40)
    two_col = delong_test(np.stack([1 - p1, p1], 1), np.stack([1 - p2, p2], 1), y.astype(bool))
    assert two_col == delong_test(p1, p2, y)
    same = delong_test(p1, p1, y)  # zero variance, equal AUCs
    assert same["difference"] == 0 and same["se"] == 0 and same["p_value"] == 1.0
    with pytest.raises(InputError, match="one-vs-rest"):
        delong_test(np.full((40, 3), 1 / 3), np.full((40, 3), 1 / 3), y)
    with pytest.raises(InputError, match="at least 2 positives"):
        delong_test(p1[:21], p2[:21], y[:21])
    with pytest.raises(InputError, match="binary labels"):
        delong_test(p1, p2, y * 2)
    with pytest.raises(InputError, match="NaN"):
        delong_test(np.r_[p1[:-1], np.nan], p2, y)


def test_delong_fast_on_ten_thousand_samples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000)
    a, b = y + rng.normal(0, 1, 10_000), y + rng.normal(0, 1.2, 10_000)
    start = time.perf_counter()
    r = delong_test(a, b, y)
    assert time.perf_counter() - start < 1.0  # ~0.01 s; the O(n²) form takes seconds
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))


def _paired(n01: int, n10: int, both: int = 10, neither: int = 5):
    """Predictions with given discordant counts: a right only n01 times, b right only n10."""
    y = np.zeros(n01 + n10 + both + neither, int)
    a = np.r_[np.zeros(n01), np.ones(n10), np.zeros(both), np.ones(neither)].astype(int)
    b = np.r_[np.ones(n01), np.zeros(n10), np.zeros(both), np.ones(neither)].astype(int)
    return a, b, y


@pytest.mark.parametrize(("n01", "n10"), [(0, 0), (3, 0), (7, 2), (12, 12), (20, 4),
                                          (16, 9), (30, 14), (5, 60)])
def test_mcnemar_matches_scipy_and_statsmodels(n01, n10):
    a, b, y = _paired(n01, n10)
    r = mcnemar_test(a, b, y)
    assert (r["a_only_correct"], r["b_only_correct"], r["both_correct"], r["both_wrong"]) == (
        n01, n10, 10, 5)
    assert r["accuracy_a"] == pytest.approx((n01 + 10) / len(y))
    k = n01 + n10
    if k == 0:
        assert r["p_value"] == 1.0
    elif k < 25:
        assert r["statistic"] is None and r["method"].startswith("exact")
        assert r["p_value"] == pytest.approx(stats.binomtest(n01, k, 0.5).pvalue, abs=1e-12)
    else:
        assert r["method"].startswith("chi-square")
        assert r["statistic"] == pytest.approx((abs(n01 - n10) - 1) ** 2 / k)
        assert r["p_value"] == pytest.approx(stats.chi2.sf(r["statistic"], 1), abs=1e-12)
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    table = [[10, n01], [n10, 5]]
    if k:
        ref = sm.mcnemar(table, exact=k < 25, correction=True)
        assert r["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_mcnemar_refusals():
    with pytest.raises(InputError, match="one entry per sample"):
        mcnemar_test([0, 1], [0], [0, 1])
    with pytest.raises(InputError, match="integer class"):
        mcnemar_test([0.5, 1], [0, 1], [0, 1])


def _binary(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.4 * y + rng.random(n) * 0.6, 0, 1)
    return np.stack([1 - p1, p1], 1), y


def test_reliability_bins_are_the_ece_bins_and_sklearn_calibration_curve():
    probs, y = _binary()
    b = reliability_bins(probs, y)
    assert b["ece"] == pytest.approx(expected_calibration_error(probs, y), abs=1e-12)
    assert sum(b["count"]) == len(y) and len(b["edges"]) == 16
    # the "positive" kind is scikit-learn's calibration_curve (uniform bins) per filled bin
    from sklearn.calibration import calibration_curve

    pos = reliability_bins(probs, y, n_bins=10, kind="positive")
    prob_true, prob_pred = calibration_curve(y, probs[:, 1], n_bins=10, strategy="uniform")
    filled = [i for i, c in enumerate(pos["count"]) if c]
    assert np.allclose([pos["observed"][i] for i in filled], prob_true)
    assert np.allclose([pos["mean_predicted"][i] for i in filled], prob_pred)
    with pytest.raises(InputError, match="two classes"):
        reliability_bins(np.full((3, 3), 1 / 3), [0, 1, 2], kind="positive")


def test_reliability_diagram_png_and_axes(tmp_path):
    probs, y = _binary()
    path = tmp_path / "rel.png"
    bins = reliability_diagram({"model A": (probs, y), "model B": (probs[::-1], y)}, path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > img.shape[0]
    fig, again = _reliability_figure({"model A": (probs, y), "model B": (probs[::-1], y)},
                                     None, "confidence")
    assert again == bins
    axes = fig.axes
    assert len(axes) == 4  # a diagram and a count histogram per model
    top = axes[0]
    assert "model A" in top.get_title() and f"ECE {bins[0]['ece']:.3f}" in top.get_title()
    assert top.get_ylabel() == "accuracy" and top.get_xlim() == (0, 1)
    # the diagonal, and one bar per filled bin with its count written above it
    assert any(list(line.get_xdata()) == [0, 1] for line in top.get_lines())
    filled = [c for c in bins[0]["count"] if c]
    assert len(top.patches) == len(filled)
    assert sorted(int(t.get_text()) for t in top.texts) == sorted(filled)
    assert axes[2].get_ylabel() == "count" and "confidence" in axes[2].get_xlabel()


# ------------------------------------------------------------------------------------ CLI


def _write_csv(path, ids, labels, probs, classes=("benign", "malignant")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "site", "label", "predicted", *(f"p_{c}" for c in classes)])
        for i, y, p in zip(ids, labels, probs, strict=True):
            w.writerow([i, 0, y, int(np.argmax(p)), *(f"{v:.17g}" for v in p)])


def _error_line(capsys, argv):
    rc = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for seed in (0, 1):
        train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4,
                                     seed=seed), root / f"erm{seed}", progress=False)
    return root / "erm0", root / "erm1"


def test_compare_cli_on_two_trained_runs(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs
    out, fig = tmp_path / "cmp.json", tmp_path / "rel.png"
    capsys.readouterr()
    rc = main(["compare", str(run_a), str(run_b), "--out", str(out),
               "--reliability", str(fig)])
    assert rc in (0, None), capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    a, b = read_predictions(run_a / "predictions_test.csv"), read_predictions(
        run_b / "predictions_test.csv")
    want = delong_test(a.probs, b.probs, a.labels)
    assert printed["delong"] == want  # JSON floats round-trip exactly
    for key, run in (("a", run_a), ("b", run_b)):  # the numbers metrics.json holds
        test = json.loads((run / "metrics.json").read_text())["test"]
        assert printed[f"auc_{key}"] == pytest.approx(test["auc"])
        assert printed[f"accuracy_{key}"] == pytest.approx(test["accuracy"])
    assert printed["mcnemar"] == mcnemar_test(a.predicted, b.predicted, a.labels)
    assert printed["n"] == 16 and printed["classes"] == ["benign", "malignant"]
    assert fig.read_bytes()[:8] == PNG_MAGIC
    # val split, and CSV files rather than run folders: the same result as the folders
    rc = main(["compare", str(run_a), str(run_b), "--split", "val"])
    val = json.loads(capsys.readouterr().out)
    rc = main(["compare", str(run_a / "predictions_val.csv"),
               str(run_b / "predictions_val.csv")])
    files = json.loads(capsys.readouterr().out)
    assert files["delong"] == val["delong"] and files["mcnemar"] == val["mcnemar"]


def test_evaluate_reliability_option(two_runs, tmp_path, capsys):
    run, _ = two_runs
    fig = tmp_path / "sub" / "rel.png"
    rc = main(["evaluate", str(run), "--split", "val", "--reliability", str(fig),
               "--no-progress"])
    assert rc in (0, None), capsys.readouterr().err
    assert fig.read_bytes()[:8] == PNG_MAGIC
    line = _error_line(capsys, ["evaluate", str(run), "--reliability",
                                str(tmp_path / "rel.txt"), "--no-progress"])
    assert "give a .png, .pdf or .svg file" in line


def test_compare_refuses_mismatched_predictions_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(12)]
    y = np.array([0, 1] * 6)
    p = rng.dirichlet([1, 1], 12)
    _write_csv(tmp_path / "a" / "predictions_test.csv", ids, y, p)
    _write_csv(tmp_path / "b.csv", ids[:-1] + ["other"], y, p)
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b.csv")])
    assert "cover different samples" in line and "'s11'" in line
    y2 = y.copy()
    y2[3] = 0
    _write_csv(tmp_path / "c.csv", ids, y2, p)
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "c.csv")])
    assert "disagree on the label of 1 sample(s), first id 's3'" in line
    _write_csv(tmp_path / "d.csv", ids, y, rng.dirichlet([1, 1, 1], 12), ("x", "y", "z"))
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "d.csv")])
    assert "not the same task" in line
    # a run without the split's CSV: says how to make it
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "a"),
                                "--split", "val"])
    assert "no predictions_val.csv" in line and "causalign evaluate" in line
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "a"),
                                "--split", "tset"])
    assert "--split tset: give one of train, val, test" in line
    (tmp_path / "bad.csv").write_text("id,label\ns0,0\n")
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "bad.csv")])
    assert "not a predictions CSV" in line
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "none.csv")])
    assert "no such" in line
    # never over an input or the run's own records
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b.csv"),
                                "--out", str(tmp_path / "a" / "predictions_test.csv")])
    assert "is the run's own predictions_test.csv" in line
    line = _error_line(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b.csv"),
                                "--out", str(tmp_path / "b.csv")])
    assert "is the predictions CSV being compared" in line


def test_compare_aligns_reordered_samples_and_tests_three_classes_one_vs_rest(tmp_path,
                                                                              capsys):
    rng = np.random.default_rng(2)
    n = 30
    ids = [f"s{i}" for i in range(n)]
    y = np.arange(n) % 3
    pa = rng.dirichlet([1, 1, 1], n)
    pb = rng.dirichlet([1, 1, 1], n)
    _write_csv(tmp_path / "a.csv", ids, y, pa, ("x", "y", "z"))
    perm = rng.permutation(n)  # B's rows in another order
    _write_csv(tmp_path / "b.csv", [ids[i] for i in perm], y[perm], pb[perm], ("x", "y", "z"))
    rc = main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert rc in (0, None)
    r = json.loads(capsys.readouterr().out)
    assert r["delong"] is None and "one-vs-rest" in r["delong_note"]
    for c, name in enumerate("xyz"):
        got = dict(r["delong_one_vs_rest"][name])
        got.pop("p_holm")  # the Holm adjustment over the classes (test_compare_holm.py)
        assert got == delong_test(pa[:, c], pb[:, c], y == c)
    assert r["mcnemar"] == mcnemar_test(pa.argmax(1), pb.argmax(1), y)


def test_report_has_a_calibration_section_from_the_runs_predictions(tmp_path):
    """report.html draws each method's test reliability diagram from predictions_test.csv
    (no model loaded); a run without the CSV is left out, none at all: no section."""
    from causalign.report.html import write_report

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(40)]
    y = np.arange(40) % 2
    runs = []
    for label in ("erm", "oracle", "rrr"):
        (tmp_path / "runs" / label).mkdir(parents=True)
        if label != "rrr":
            _write_csv(tmp_path / "runs" / label / "predictions_test.csv", ids, y,
                       rng.dirichlet([1, 1], 40))
        runs.append({"key": label, "status": "done", "dataset": "pm", "label": label,
                     "method": label, "setting": "default", "seed": 0,
                     "run_dir": f"runs/{label}", "metrics": {}})
    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": runs}))
    page = write_report(tmp_path).read_text()
    assert "<h2>Calibration</h2>" in page and "reliability diagrams pm" in page
    fig = tmp_path / "figures" / "reliability_pm.png"
    assert fig.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    h, w = matplotlib.image.imread(fig).shape[:2]
    assert w > 1.5 * h  # two panels side by side (erm, oracle), not three
    for label in ("erm", "oracle"):
        (tmp_path / "runs" / label / "predictions_test.csv").unlink()
    page = write_report(tmp_path).read_text()
    assert "Calibration" not in page and not fig.exists()  # a stale figure is removed


def test_readme_delong_example_prints_what_the_readme_says():
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "delong_test(" in b]
    assert len(block) == 1
    proc = subprocess.run([sys.executable, "-c", block[0]], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()
    assert first.startswith("AUC 0.756 vs 0.726, p 1.2e-05 (")
    assert second == "McNemar p 0.0043"
    assert "prints `AUC 0.756 vs 0.726, p 1.2e-05` and `McNemar p 0.0043`" in readme
