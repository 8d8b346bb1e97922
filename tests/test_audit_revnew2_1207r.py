"""Adversarial review (revnew2) of the newest figure features: `causalign curves` on
histories with empty term columns or without an epoch column, and figure labels."""

from __future__ import annotations

import pytest
from test_audit_curvterms_1207r import _capture

from causalign.report import figures


def _row(e: int, **terms: str) -> dict:
    # history.csv rows as `_stored_history` reads them: every cell text, '' for empty
    return {"epoch": str(e), "train_loss": str(1.0 / e), "train_accuracy": "0.6",
            "val_accuracy": "0.5", "val_auc": str(0.5 + e / 10), **terms}


def test_a_term_column_without_any_value_draws_no_empty_panel(monkeypatch, tmp_path):
    """A history whose train_align column is empty in every row (an old or hand-cut
    history, align_every beyond the run) drew an empty 'alignment term' panel."""
    got = _capture(monkeypatch)
    rows = [_row(1, train_align=""), _row(2, train_align="")]
    figures.training_curves({"run": rows}, tmp_path / "c.png")
    assert [ax.get_title() for ax in got["fig"].axes] == [
        "training loss", "validation AUC", "accuracy (val solid, train dashed, hollow)"]


def test_an_empty_term_of_one_run_is_not_in_the_legend_of_another(monkeypatch, tmp_path):
    """In a mix, a run whose term column holds no value adds no legend entry; the other
    run's term is drawn with its values."""
    got = _capture(monkeypatch)
    rrr = [_row(1, train_rrr="0.1"), _row(2, train_rrr="0.05")]
    ppi = [_row(1, train_con="", train_ad="0.8"), _row(2, train_con="", train_ad="0.7")]
    figures.training_curves({"rrr": rrr, "ppi": ppi}, tmp_path / "c.png")
    ax = got["fig"].axes[3]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["rrr", "ad"]
    drawn = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert drawn["rrr"] == [0.1, 0.05] and drawn["ad"] == [0.8, 0.7]


def test_guard_a_term_empty_in_some_epochs_keeps_its_points(monkeypatch, tmp_path):
    """Guard: align_every beyond an epoch leaves that epoch's cells empty; the aligned
    epochs' values are still drawn (NaN in between)."""
    got = _capture(monkeypatch)
    rows = [_row(1, train_align="0.92"), _row(2, train_align=""), _row(3, train_align="0.93")]
    figures.training_curves({"run": rows}, tmp_path / "c.png")
    ys = [list(ln.get_ydata()) for ln in got["fig"].axes[3].get_lines() if len(ln.get_xdata())]
    assert len(ys) == 1 and ys[0][0] == 0.92 and ys[0][2] == 0.93 and ys[0][1] != ys[0][1]


def test_a_history_without_an_epoch_column_is_drawn_by_row(monkeypatch, tmp_path):
    """A history.csv without 'epoch' (an old or hand-made one) drew every panel empty,
    with overlapping fractional ticks, and `curves` said 'wrote'; the rows are the
    epochs 1, 2, … in their order."""
    got = _capture(monkeypatch)
    rows = [{k: v for k, v in _row(e, train_rrr=str(0.1 / e)).items() if k != "epoch"}
            for e in (1, 2)]
    figures.training_curves({"run": rows}, tmp_path / "c.png")
    loss = [ln for ln in got["fig"].axes[0].get_lines() if len(ln.get_xdata())]
    assert [list(ln.get_xdata()) for ln in loss] == [[1.0, 2.0]]
    assert list(loss[0].get_ydata()) == [1.0, 0.5]
    assert [t.get_text() for t in got["fig"].axes[0].get_xticklabels()] == ["1", "2"]


@pytest.mark.parametrize(("paths", "want"), [
    (["runs/a", "runs/a #2", "runs/a"], 3),
    (["runs/erm/seed0", "./runs/erm/seed0/"], 2),
    (["runs/erm/seed0/../seed1", "runs/erm/seed1"], 2),
])
def test_guard_short_labels_stay_unique_for_odd_spellings(paths, want):
    """Guard: the same path in other spellings, or a name that looks numbered, still
    gives distinct labels."""
    labels = figures.short_path_labels(paths)
    assert len(set(labels)) == want == len(labels)


def test_guard_short_labels_of_a_run_and_a_csv_of_the_same_name(tmp_path, monkeypatch):
    """Guard: run folder runs/erm and runs/erm.csv read apart; a bare seed folder keeps
    its method's folder, relative '.' names its folder."""
    monkeypatch.chdir(tmp_path)
    assert figures.short_path_labels(["runs/erm", "runs/erm.csv"]) == ["erm", "erm.csv"]
    assert figures.short_path_labels(["seed0", "seed1"]) == [
        f"{tmp_path.name}/seed0", f"{tmp_path.name}/seed1"]
    assert figures.short_path_labels(["."]) == [tmp_path.name]
