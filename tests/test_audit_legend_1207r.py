"""Legible legends of `evaluate`/`compare` --roc and --reliability figures: each curve was
labelled with its run's full path, repeated for every class of a three-class run, and the
seven-entry legend covered the curves. Recorded from what matplotlib is given (the figure
before it is saved), not from the PNG."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from test_audit_compare_1207f import _write_csv
from test_bootstrap_calibration_localisation import _probs
from test_compare_operating_point import _compare, _run
from test_multiclass import BUSI
from test_roc_figure import _recorded_roc_run

import causalign.report.figures as figures
from causalign.cli import main


@pytest.fixture()
def recorded(monkeypatch):
    """Every figure saved, and every `roc_figure` / `reliability_diagram` call's labels."""
    seen: dict[str, list] = {"figs": [], "roc": [], "reliability": []}
    real_save, real_roc, real_rel = (figures.atomic_savefig, figures.roc_figure,
                                     figures.reliability_diagram)
    monkeypatch.setattr(figures, "atomic_savefig",
                        lambda fig, path, **k: seen["figs"].append(fig) or real_save(
                            fig, path, **k))
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen["roc"].append(list(curves)) or real_roc(
                            curves, path, **k))
    monkeypatch.setattr(figures, "reliability_diagram",
                        lambda panels, path, **k: seen["reliability"].append(list(panels))
                        or real_rel(panels, path, **k))
    return seen


def _three_class_csvs(root, n: int = 60) -> tuple:
    """Two predictions CSVs of the same samples, three classes, both named p.csv."""
    pa, y = _probs(n, 3, seed=1)
    pb, _ = _probs(n, 3, seed=2)
    ids = [f"s{i}" for i in range(n)]
    a, b = root / "long" / "bench" / "busi" / "p.csv", root / "long" / "bench" / "ddsm" / "p.csv"
    _write_csv(a, ids, y, pa, BUSI)
    _write_csv(b, ids, y, pb, BUSI)
    return a, b, pa, pb, y


def test_compare_labels_are_the_paths_below_a_long_common_prefix(tmp_path, capsys,
                                                                        recorded):
    """`compare …/bench/runs/busi/erm/seed0 …/rrr/seed0` labelled both figures' curves and
    panels with the two full paths; now "erm/seed0" and "rrr/seed0", the JSON keeping the
    full paths."""
    rng = np.random.default_rng(0)
    base = tmp_path / "x" / "bench" / "runs" / "busi"
    _run(base / "erm" / "seed0", rng)
    _run(base / "rrr" / "seed0", rng)
    out = _compare(capsys, base / "erm" / "seed0", base / "rrr" / "seed0", "--roc",
                   tmp_path / "roc.png", "--reliability", tmp_path / "rel.png")
    assert recorded["roc"] == [["erm/seed0", "rrr/seed0"]]
    assert recorded["reliability"] == [["erm/seed0", "rrr/seed0"]]
    assert out["a"] == str(base / "erm" / "seed0") and out["b"] == str(base / "rrr" / "seed0")
    roc_fig, rel_fig = recorded["figs"][1], recorded["figs"][0]
    labels = roc_fig.axes[0].get_legend_handles_labels()[1]
    assert not any(str(tmp_path) in t for t in labels), labels
    assert [ax.get_title().split("\n")[0] for ax in rel_fig.axes[:2]] == ["erm/seed0",
                                                                          "rrr/seed0"]


def test_equal_tails_stay_distinct(tmp_path, capsys, recorded):
    """Two CSVs both named p.csv under …/busi and …/ddsm: "busi/p.csv" and "ddsm/p.csv"
    (the file name alone would give two equal labels, one curve hiding the other's key)."""
    a, b, *_ = _three_class_csvs(tmp_path)
    _compare(capsys, a, b, "--roc", tmp_path / "roc.png")
    assert recorded["roc"] == [["busi/p.csv", "ddsm/p.csv"]]


def test_short_path_labels_never_repeat_a_label(tmp_path):
    """Below the common folder; one path: its name; the same path twice: numbered."""
    from causalign.report.figures import short_path_labels

    r = tmp_path / "runs"
    assert short_path_labels([r / "busi/erm/seed0", r / "ddsm/erm/seed0"]) == [
        "busi/erm/seed0", "ddsm/erm/seed0"]
    # bare seed folders keep their method's folder (test_a_benchmark_seed_folder_keeps_its_method)
    assert short_path_labels([r / "erm/seed0", r / "erm/seed1"]) == ["erm/seed0", "erm/seed1"]
    assert short_path_labels([r / "erm/seed0"]) == ["erm/seed0"]
    twice = short_path_labels([r / "a", r / "a"])
    assert len(set(twice)) == 2 and all(t.startswith("a") for t in twice)


def test_evaluate_labels_a_run_by_its_folder_name(tiny_data, tmp_path, capsys, monkeypatch):
    """`evaluate RUN --roc` labelled the curve "/full/path/to/run (test)"; now "run (test)"."""
    seen, run = _recorded_roc_run(tiny_data, tmp_path, monkeypatch)
    assert main(["evaluate", str(run), "--roc", str(tmp_path / "roc.png"),
                 "--no-progress"]) in (0, None)
    capsys.readouterr()
    ((curves, _),) = seen
    assert list(curves) == ["run (test)"]


def test_a_benchmark_seed_folder_keeps_its_method():
    """`evaluate oracle/seed0 --roc` labelled the curve "seed0 (test)", which says nothing
    of whose run it is; a bare seed folder keeps its parent (the benchmark's method folder),
    alone and in a pair of seeds; other names are unchanged."""
    from causalign.report.figures import short_path_labels

    assert short_path_labels(["/b/runs/d/oracle/seed0"]) == ["oracle/seed0"]
    assert short_path_labels(["/b/runs/d/erm/seed0", "/b/runs/d/erm/seed1"]) == \
        ["erm/seed0", "erm/seed1"]
    assert short_path_labels(["/b/runs/d/erm/seed0", "/b/runs/d/rrr/seed0"]) == \
        ["erm/seed0", "rrr/seed0"]
    assert short_path_labels(["/x/my_run"]) == ["my_run"]
    assert short_path_labels(["/x/seed12x"]) == ["seed12x"]


def test_three_class_compare_groups_run_by_colour_and_class_by_style(tmp_path, capsys,
                                                                     recorded):
    """2 runs × 3 classes: six colours and a legend over the curves before. Now each run one
    colour, each class one line style (the same in both runs), every (run, class) named once
    in the legend, and the legend below the axes, not on them."""
    a, b, *_ = _three_class_csvs(tmp_path)
    _compare(capsys, a, b, "--roc", tmp_path / "roc.png")
    (fig,) = recorded["figs"]
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_label() != "chance"]
    assert len(curves) == 6
    colour = {line.get_label(): line.get_color() for line in curves}
    style = {line.get_label(): line.get_linestyle() for line in curves}
    by_run = {run: {colour[t] for t in colour if t.startswith(run)}
              for run in ("busi/p.csv", "ddsm/p.csv")}
    assert all(len(c) == 1 for c in by_run.values()) and len(set.union(*by_run.values())) == 2
    for name in BUSI:
        styles = {style[t] for t in style if f"· {name} vs rest" in t}
        assert len(styles) == 1, (name, style)
    assert len(set(style.values())) == 3
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    for run in ("busi/p.csv", "ddsm/p.csv"):
        for name in BUSI:
            assert sum(t.startswith(f"{run} · {name} vs rest") for t in texts) == 1, texts
    # the legend lies below the axes and its x label (figure pixels), inside the figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = legend.get_window_extent(renderer)
    assert 0 <= legend_box.y0 and legend_box.y1 <= ax.get_tightbbox(renderer).y0


def test_drawn_curves_are_the_same_arrays(tmp_path, recorded):
    """Guard: the grouping restyles the curves only; each drawn line is scikit-learn's
    curve of its class against the rest, the returned arrays the same."""
    pa, y = _probs(50, 3, seed=3)
    pb, _ = _probs(50, 3, seed=4)
    drawn = figures.roc_figure({"A": (pa, y), "B": (pb, y)}, tmp_path / "r.png",
                               class_names={"A": BUSI, "B": BUSI})
    lines = [line for line in recorded["figs"][0].axes[0].get_lines()
             if line.get_label() != "chance"]
    parts = [(p, part) for label, p in (("A", pa), ("B", pb)) for part in drawn[label]]
    assert len(lines) == len(parts) == 6
    for line, (p, part) in zip(lines, parts, strict=True):
        fpr, tpr, _ = roc_curve(y == part["class"], p[:, part["class"]])
        np.testing.assert_array_equal(line.get_xdata(), fpr)
        np.testing.assert_array_equal(line.get_ydata(), tpr)
        np.testing.assert_array_equal(part["fpr"], fpr)


def test_a_run_and_a_csv_inside_it_keep_the_run_name(tmp_path):
    """`compare RUN RUN/../p.csv`: the CSV's label says which folder it is in."""
    from causalign.report.figures import short_path_labels

    run = tmp_path / "runs" / "erm" / "seed0"
    assert short_path_labels([run, run / "predictions_test.csv"]) == [
        "erm/seed0", "erm/seed0/predictions_test.csv"]
    assert short_path_labels([run / "a.csv", tmp_path / "b.csv"]) == [
        "runs/erm/seed0/a.csv", "b.csv"]
