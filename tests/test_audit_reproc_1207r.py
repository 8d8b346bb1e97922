"""report.html's ROC section over seeds: it drew one run per method (default setting, lowest
seed) with no band, while the results table beside it gives "mean (std) over 3 seeds". Now
a two-class method's curve is the vertical average of its seeds' curves with the seeds'
min–max band, a one-seed method's curve carries `roc_band`'s bootstrap band, and the
legend gives the AUC's mean (std) over the seeds. The drawn data are read off what reaches
matplotlib, and recomputed here with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.axes import Axes
from sklearn.metrics import roc_auc_score, roc_curve
from test_audit_repclin_1207q import _random_split, _run
from test_roc_band import _polyline

from causalign.metrics import roc_at, roc_band
from causalign.report import figures
from causalign.report import html as report_html

GRID = np.linspace(0.0, 1.0, 101)


def _split(rng: np.random.Generator, n: int, classes: int = 2, tie: bool = False):
    p, y = _random_split(rng, n, classes)
    if tie:  # scores on a 0.05 grid: many ties across the classes
        p1 = np.round(p[:, 1] / 0.05) * 0.05
        p = np.stack([1 - p1, p1], axis=1)
    return p, y


def _recorded(monkeypatch) -> dict[str, list]:
    """Every Axes.plot / fill_between call's arguments, and the saved figure's legend
    entries (the save itself skipped)."""
    seen: dict[str, list] = {"plot": [], "fill": [], "legend": []}
    real_plot, real_fill = Axes.plot, Axes.fill_between

    def plot(self, *args, **kw):
        seen["plot"].append((args, kw))
        return real_plot(self, *args, **kw)

    def fill(self, *args, **kw):
        seen["fill"].append((args, kw))
        return real_fill(self, *args, **kw)

    def save(fig, path, **kw):
        seen["legend"].append([" ".join(t.get_text().split())
                               for t in fig.axes[0].get_legend().get_texts()])

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "fill_between", fill)
    monkeypatch.setattr(figures, "atomic_savefig", save)
    return seen


def _bench(tmp_path, seeds: dict[str, int], classes: int = 2, n: int = 70):
    """A fake benchmark folder: per method label its seeds' test predictions (returned as
    label → [(probs, labels)] by seed), plus a non-default setting that must not count."""
    rng = np.random.default_rng(3)
    runs, preds = [], {}
    for label, k in seeds.items():
        for s in range(k):
            test = _split(rng, n, classes, tie=(s == 1 and classes == 2))
            runs.append(_run(tmp_path, "d", label, s, None, test))
            preds.setdefault(label, []).append((test[0], np.asarray(test[1])))
    other = _run(tmp_path, "d", "erm", 7, None, _split(rng, n, classes))
    runs.append(dict(other, setting="lr=0.1", key="d/erm/lr/seed7"))
    return {"runs": runs}, preds


def _sk_at_grid(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One seed's class-1 curve at the grid, by scikit-learn's points and by hand."""
    fpr, tpr, _ = roc_curve(y == 1, p[:, 1], drop_intermediate=False)
    return np.array([_polyline(fpr, tpr, g) for g in GRID])


def test_three_seeds_draw_their_mean_curve_min_max_band_and_auc_mean_std(tmp_path,
                                                                          monkeypatch):
    results, preds = _bench(tmp_path, {"erm": 3, "causal-align": 3})
    seen = _recorded(monkeypatch)
    note = report_html.roc_figure_of(tmp_path, results, "d", tmp_path / "roc.png")
    curves = seen["plot"][1:]  # after the chance diagonal
    assert len(curves) == 2 and len(seen["fill"]) == 2
    for k, label in enumerate(("erm", "causal-align")):
        at = np.stack([_sk_at_grid(p, y) for p, y in preds[label]])
        (x, mean), _ = curves[k]
        np.testing.assert_allclose(x, GRID, atol=0)
        np.testing.assert_allclose(mean, at.mean(axis=0), atol=1e-12)
        (bx, lo, hi), _ = seen["fill"][k]
        np.testing.assert_allclose(bx, GRID, atol=0)
        np.testing.assert_allclose(lo, at.min(axis=0), atol=1e-12)
        np.testing.assert_allclose(hi, at.max(axis=0), atol=1e-12)
        aucs = [roc_auc_score(y == 1, p[:, 1]) for p, y in preds[label]]
        assert (f"{label} (AUC {np.mean(aucs):.3f} ({np.std(aucs):.3f}) over 3 seeds)"
                in seen["legend"][0])
    assert note == ("mean of the seeds' curves, band the min–max of the seeds' curves: erm, "
                    "causal-align.")


def test_one_seed_method_gets_roc_bands_bootstrap_band(tmp_path, monkeypatch):
    results, preds = _bench(tmp_path, {"erm": 3, "ppi": 1})
    seen = _recorded(monkeypatch)
    note = report_html.roc_figure_of(tmp_path, results, "d", tmp_path / "roc.png")
    (p, y), = preds["ppi"]
    (x, tpr), _ = seen["plot"][2]
    fpr_sk, tpr_sk, _ = roc_curve(y == 1, p[:, 1])
    np.testing.assert_array_equal(x, fpr_sk)  # its own curve, as evaluate --roc draws it
    np.testing.assert_array_equal(tpr, tpr_sk)
    band = roc_band(p, y, n=report_html.ROC_RESAMPLES, seed=0)
    (bx, lo, hi), _ = seen["fill"][1]
    for got, want in ((bx, band["fpr"]), (lo, band["lo"]), (hi, band["hi"])):
        np.testing.assert_array_equal(got, want)
    auc = roc_auc_score(y == 1, p[:, 1])
    assert f"ppi (AUC {auc:.3f} over 1 seed)" in seen["legend"][0]
    assert note.endswith(f"one seed, band pointwise bootstrap 95 % "
                         f"({report_html.ROC_RESAMPLES} resamples): ppi.")


def test_roc_at_is_roc_bands_own_curve_and_sklearns_polyline():
    rng = np.random.default_rng(5)
    p, y = _split(rng, 90, tie=True)
    y = np.asarray(y)
    np.testing.assert_allclose(roc_at(p, y), _sk_at_grid(p, y), atol=1e-12)
    np.testing.assert_array_equal(roc_at(p, y), roc_band(p, y, n=100)["tpr"])
    grid = np.array([0.0, 0.33, 1.0])
    np.testing.assert_array_equal(roc_at(p, y, fpr=grid), roc_band(p, y, n=100,
                                                                   fpr=grid)["tpr"])


def test_roc_seeds_figure_refuses_more_than_two_classes():
    from causalign.errors import InputError

    p, y = _split(np.random.default_rng(6), 30, classes=3)
    with pytest.raises(InputError, match="not a two-class model"):
        figures.roc_seeds_figure({"m": [(p, y)]}, "never.png")


def test_three_classes_keep_the_lowest_seeds_one_vs_rest_curves(tmp_path, monkeypatch):
    """Guard: a 3-class dataset's figure is still `roc_figure` of each method's lowest seed
    (one-vs-rest curves named by class), whatever other seeds exist."""
    results, preds = _bench(tmp_path, {"erm": 3, "ppi": 2}, classes=3)
    seen: list = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure", lambda curves, path, **k: seen.append(
        (curves, k)) or real(curves, path, **k))
    assert report_html.roc_figure_of(tmp_path, results, "d", tmp_path / "roc.png") is True
    (curves, kw), = seen
    assert list(curves) == ["erm", "ppi"]
    for label in curves:
        np.testing.assert_allclose(curves[label][0], preds[label][0][0], atol=1e-6)
        np.testing.assert_array_equal(curves[label][1], preds[label][0][1])
    assert kw["class_names"]["erm"] == ["benign", "malignant", "other"]
    # the title names the seed drawn (a reader saw "d: test split" beside a seeds table)
    assert kw["title"] == "d: test split, each method's lowest seed with a curve"
    assert (tmp_path / "roc.png").stat().st_size > 5000
