"""Mutation audit of the guidance-term curves, short run labels, grouped ROC legends and the
--positive hint (report/figures.py, cli.py curves/evaluate/compare, operating_point's
`_did_you_mean`): behaviours the earlier tests let slip."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_audit_mutfig_1207n import _saved as _kept  # figures drawn, not saved
from test_bootstrap_calibration_localisation import _probs
from test_compare_operating_point import _compare, _run
from test_multiclass import BUSI

import causalign.report.figures as figures
from causalign.cli import main
from causalign.engine.trainer import TrainConfig, train
from causalign.errors import InputError
from causalign.metrics.operating_point import OperatingPoint, choose_threshold, positive_class
from causalign.report.figures import short_path_labels


def _rows(**terms: list[float]) -> list[dict]:
    """History rows, one per epoch, with the given train_<term> columns."""
    n = len(next(iter(terms.values())))
    return [{"epoch": e + 1, "train_loss": 0.5, "train_accuracy": 0.6, "val_accuracy": 0.5,
             "val_auc": 0.6, "train_ce": 0.5, **{f"train_{k}": v[e] for k, v in terms.items()}}
            for e in range(n)]


def _term_axes(figs) -> object:
    (fig,) = figs
    assert len(fig.axes) == 4, [ax.get_title() for ax in fig.axes]
    return fig.axes[3]


# --- training_curves: the guidance panel's log-scale rule and title ------------------------

def test_a_zero_term_keeps_the_guidance_panel_linear(monkeypatch, tmp_path):
    """RRR's penalty can be exactly 0 (no annotated sample in an epoch): on a log axis the
    point vanishes, so the rule is min > 0, not ≥ 0 (kills `min(finite) >= 0`)."""
    figs = _kept(monkeypatch)
    figures.training_curves({"rrr": _rows(rrr=[0.0, 0.02]), "ppi": _rows(con=[0.8, 0.7])},
                            tmp_path / "c.png")
    ax = _term_axes(figs)
    assert ax.get_yscale() == "linear"
    assert ax.get_title() == "guidance terms (train)"


@pytest.mark.parametrize(("small", "large", "scale"),
                         [(0.1, 1.0, "log"), (0.1, 0.99, "linear"), (0.2, 1.0, "linear")])
def test_log_scale_from_a_tenfold_spread(monkeypatch, tmp_path, small, large, scale):
    """Log axis exactly when the largest positive value is ≥ 10 × the smallest (10× on the
    dot is log; 9.9× and 5× stay linear): kills `> 10 *` and a smaller factor. The title
    says "log scale" when it is one (kills a title that never says so)."""
    figs = _kept(monkeypatch)
    figures.training_curves({"rrr": _rows(rrr=[small, small]), "cdep": _rows(cdep=[large,
                                                                                 large])},
                            tmp_path / "c.png")
    ax = _term_axes(figs)
    assert ax.get_yscale() == scale
    assert ax.get_title() == ("guidance terms (train, log scale)" if scale == "log"
                              else "guidance terms (train)")


def test_an_empty_cell_does_not_turn_the_log_rule_off(monkeypatch, tmp_path):
    """A blank term cell (NaN) is left out of the rule: RRR 0.02–0.03 beside PPI's 0.8 is
    still a log axis (kills using the NaN in min/max, where min(nan, …) is NaN)."""
    figs = _kept(monkeypatch)
    figures.training_curves({"rrr": _rows(rrr=["", 0.02, 0.03]),
                             "ppi": _rows(ad=[0.8, 0.8, 0.7])}, tmp_path / "c.png")
    assert _term_axes(figs).get_yscale() == "log"


# --- short_path_labels ---------------------------------------------------------------------

def test_short_labels_number_repeats_from_one():
    """The same path twice: "a #1", "a #2" (kills numbering from 0); others unnumbered."""
    assert short_path_labels(["/r/a", "/r/a"]) == ["a #1", "a #2"]
    assert short_path_labels(["/r/a", "/r/b"]) == ["a", "b"]


def test_seed_rule_needs_digits_and_a_named_parent():
    """Only "seed<digits>" keeps its parent (a folder named "seed" does not; kills
    `seed\\d*`), and runs straight under / keep their names (no "/seed0"; kills dropping
    the `common.name` condition)."""
    assert short_path_labels(["/b/runs/seed"]) == ["seed"]
    assert short_path_labels(["/seed0", "/seed1"]) == ["seed0", "seed1"]


def test_a_symlinked_run_keeps_the_name_it_was_given(tmp_path):
    """A link "best" to runs/erm/seed3 is labelled "best", not its target's path (kills
    resolving the paths)."""
    target = tmp_path / "runs" / "erm" / "seed3"
    target.mkdir(parents=True)
    os.symlink(target, tmp_path / "best")
    assert short_path_labels([tmp_path / "best"]) == ["best"]


# --- roc_figure grouping and legend placement -----------------------------------------------

def test_one_three_class_run_keeps_a_colour_per_class(monkeypatch, tmp_path):
    """The grouping rule needs several runs: one run's three one-vs-rest curves are three
    colours, solid (grouping is for several runs; kills `len(drawn) >= 1`)."""
    figs = _kept(monkeypatch)
    p, y = _probs(60, 3, seed=5)
    figures.roc_figure({"erm": (p, y)}, tmp_path / "r.png", class_names={"erm": BUSI})
    curves = [ln for ln in figs[0].axes[0].get_lines() if ln.get_label() != "chance"]
    assert [ln.get_color() for ln in curves] == ["C0", "C1", "C2"]
    assert {ln.get_linestyle() for ln in curves} == {"-"}


@pytest.mark.parametrize(("marks", "below"), [(3, False), (4, True)])
def test_five_legend_entries_stay_inside_six_go_below(monkeypatch, tmp_path, marks, below):
    """chance + curve + 3 marks = 5 entries: the lower-right corner, figure 4.4 in tall;
    6 entries: below the axes, the figure taller (kills `entries < _LEGEND_INSIDE`)."""
    figs = _kept(monkeypatch)
    rng = np.random.default_rng(0)
    y = np.arange(80) % 2
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 80), 0.01, 0.99)
    points = [(f"t{t}", t) for t in (0.3, 0.4, 0.5, 0.6)[:marks]]
    figures.roc_figure({"erm": (np.stack([1 - p1, p1], 1), y)}, tmp_path / "r.png",
                       points={"erm": points})
    fig = figs[0]
    assert len(fig.axes[0].get_legend().get_texts()) == 2 + marks
    assert bool(fig.get_figheight() > 4.4 + 0.3) == below
    assert fig.get_figheight() == pytest.approx(4.4) or below


@pytest.mark.parametrize(("methods", "below"), [(4, False), (5, True)])
def test_seed_averaged_roc_legend_goes_below_past_five_entries(monkeypatch, tmp_path,
                                                               methods, below):
    """The report's seed-averaged ROC figure (`roc_seeds_figure`) places its legend as
    `roc_figure` does: chance + 4 methods inside, chance + 5 (the demo has 6) below the
    axes, the figure taller (before: always in the corner, over the curves; mutant M17)."""
    figs = _kept(monkeypatch)
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2
    runs = {}
    for m in range(methods):
        p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 60), 0.01, 0.99)
        runs[f"m{m}"] = [(np.stack([1 - p1, p1], 1), y)]
    figures.roc_seeds_figure(runs, tmp_path / "r.png", n_boot=100)
    fig = figs[0]
    assert len(fig.axes[0].get_legend().get_texts()) == 1 + methods
    assert bool(fig.get_figheight() > 4.4 + 0.3) == below


# --- --positive hint -----------------------------------------------------------------------

@pytest.mark.parametrize("given", ["preMalignant", "nonmalignanT"])
def test_prefixed_name_in_another_case_gets_no_hint(given):
    """The prefix rule ignores case as the exact-name rule does: "preMalignant" (difflib
    ratio 0.76 to 'malignant', so a near miss) is a prefixed word, no typo (kills a
    case-sensitive `endswith`, which hinted 'malignant')."""
    with pytest.raises(InputError) as e:
        positive_class(given, ["normal", "benign", "malignant"])
    assert "did you mean" not in str(e.value)
    assert "malignant" in str(e.value)  # the classes are still listed


# --- cli: evaluate / compare labels ----------------------------------------------------------

def test_evaluate_of_a_benchmark_seed_folder_names_its_method(tiny_data, tmp_path, capsys,
                                                              monkeypatch):
    """`evaluate …/oracle/seed0 --roc`: the curve is "oracle/seed0 (test)" (kills labelling
    by the folder's name, "seed0 (test)")."""
    seen: list = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(list(curves)) or real(
                            curves, path, **k))
    run = tmp_path / "runs" / "oracle" / "seed0"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4), run,
          progress=False)
    assert main(["evaluate", str(run), "--roc", str(tmp_path / "roc.png"),
                 "--no-progress"]) in (0, None)
    capsys.readouterr()
    assert seen == [["oracle/seed0 (test)"]]


def test_compare_marks_each_runs_own_threshold_on_its_curve(tmp_path, capsys, monkeypatch):
    """`compare A B --roc --operating-point youden`: run A's curve carries A's threshold
    (chosen on A's val CSV), B's curve B's (kills swapping the labels in the marks loop)."""
    seen: list = []
    real = figures.roc_figure
    monkeypatch.setattr(figures, "roc_figure",
                        lambda curves, path, **k: seen.append(k["points"]) or real(
                            curves, path, **k))
    rng = np.random.default_rng(4)
    base = tmp_path / "runs"
    pv_a, yv_a, *_ = _run(base / "erm" / "seed0", rng, shift=0.4)
    pv_b, yv_b, *_ = _run(base / "rrr" / "seed0", rng, shift=0.1)
    _compare(capsys, base / "erm" / "seed0", base / "rrr" / "seed0", "--roc",
             tmp_path / "roc.png", "--operating-point", "youden")
    point = OperatingPoint.parse("youden")
    ta, tb = choose_threshold(point, pv_a, yv_a), choose_threshold(point, pv_b, yv_b)
    assert ta != tb
    (points,) = seen
    assert [t for _, t in points["erm/seed0"]] == [0.5, ta]
    assert [t for _, t in points["rrr/seed0"]] == [0.5, tb]


def test_curves_refuses_a_run_given_through_dotdot(tmp_path, capsys):
    """`curves runs/erm runs/x/../erm`: one run, refused (kills comparing the unresolved
    path, which `..` keeps apart; `./` alone Path already folds)."""
    run = tmp_path / "runs" / "erm"
    run.mkdir(parents=True)
    (tmp_path / "runs" / "x").mkdir()
    (run / "history.csv").write_text("epoch,train_loss,train_accuracy,val_accuracy,val_auc\n"
                                     "1,0.7,0.5,0.5,0.5\n")
    code = main(["curves", str(run), str(tmp_path / "runs" / "x" / ".." / "erm"), "--out",
                 str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None) and len(err) == 1 and "given twice" in err[0], err


def test_clinical_caption_says_which_class_is_positive():
    """The caption names class 1 of two and each class in turn for more (the 3-class review;
    kills the old "(class 1's)" wording), in the report's HTML too."""
    from causalign.report.clinical import CLINICAL_CAPTION, caption_html

    assert "(class 1's of two; for more, each class's in turn" in CLINICAL_CAPTION
    assert "(class 1's of two; for more, each class's in turn" in caption_html(
        CLINICAL_CAPTION)

