"""`causalign curves` names its runs with `short_path_labels` (as `compare`'s figures):
the paths below the runs' common folder; the same run given twice is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

import causalign.report.figures as figures
from causalign.cli import main


def _run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "history.csv").write_text(
        "epoch,train_loss,train_accuracy,val_accuracy,val_auc,val_loss\n"
        "1,0.7,0.5,0.5,0.5,0.7\n2,0.6,0.6,0.6,0.6,0.6\n")
    return folder


def test_curves_labels_are_the_paths_below_the_common_folder(tmp_path, monkeypatch):
    """Guard (the labels were right before the move to the shared helper): two runs are
    named below their common folder, one run by its folder's name."""
    a = _run(tmp_path / "bench" / "runs" / "erm" / "seed0")
    b = _run(tmp_path / "bench" / "runs" / "rrr" / "seed0")
    seen: list[list[str]] = []
    monkeypatch.setattr(figures, "training_curves",
                        lambda histories, out, **k: seen.append(list(histories)))
    assert main(["curves", str(a), str(b), "--out", str(tmp_path / "c.png")]) in (0, None)
    assert seen == [["erm/seed0", "rrr/seed0"]]
    assert main(["curves", str(a)]) in (0, None)
    assert seen[-1] == ["erm/seed0"]  # a bare seed folder keeps its method's


def test_curves_refuses_a_run_given_twice(tmp_path, capsys):
    """Guard: one run twice (also through another spelling of its path) is one clear line."""
    a = _run(tmp_path / "runs" / "erm")
    other_spelling = tmp_path / "runs" / "." / "erm"
    code = main(["curves", str(a), str(other_spelling), "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None) and len(err) == 1 and "given twice" in err[0], err


@pytest.mark.parametrize("name", ["erm", "ppi"])
def test_curves_of_one_run_writes_its_figure(tmp_path, name):
    """Guard: the figure is written beside the run by default."""
    run = _run(tmp_path / name)
    assert main(["curves", str(run)]) in (0, None)
    assert (run / "curves.png").stat().st_size > 5000
