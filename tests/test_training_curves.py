"""`causalign curves RUN...` and report.html's training-curves section: per-epoch history
drawn (before, history.csv was the only way to see how a run trained)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causalign.cli import main
from causalign.report.figures import _alignment_columns, training_curves


def _write_history(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True)
    with open(run / "history.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _rows(n: int, align: bool = False) -> list[dict]:
    out = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 1 / e, "train_n_align": 8, "train_accuracy": 0.5 + e / 100,
               "val_accuracy": 0.5, "val_auc": 0.6, "seconds": 1.0}
        if align:
            row.update(train_img_align=0.9 / e, train_attr_align="", train_align_step=1)
        out.append(row)
    return out


def test_alignment_columns_are_the_terms_not_their_counts():
    assert _alignment_columns(_rows(2, align=True)) == ["train_img_align", "train_attr_align"]
    assert _alignment_columns(_rows(2)) == []


def test_the_figure_has_a_panel_more_for_an_alignment_method(tmp_path):
    training_curves({"erm": _rows(3)}, tmp_path / "plain.png")
    training_curves({"erm": _rows(3), "hier-align": _rows(40, align=True)},
                    tmp_path / "aligned.png")
    plain = Image.open(tmp_path / "plain.png").size
    aligned = Image.open(tmp_path / "aligned.png").size
    assert aligned[0] > plain[0] * 1.2  # four panels against three
    assert np.asarray(Image.open(tmp_path / "aligned.png").convert("L")).std() > 10  # drawn


def test_curves_command(tmp_path, capsys):
    a, b = tmp_path / "runs" / "erm" / "seed0", tmp_path / "runs" / "rrr" / "seed0"
    _write_history(a, _rows(3))
    _write_history(b, _rows(3, align=True))
    assert main(["curves", str(a)]) == 0
    assert (a / "curves.png").is_file()  # one run: into its folder
    assert main(["curves", str(a), str(b), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("args, needle", [
    (["{a}", "{b}"], "give --out FILE for the figure of 2 runs"),
    (["{empty}"], "no history.csv rows (not a training run, or no epoch finished yet)"),
    (["{missing}"], "not a run folder"),
    (["{a}", "--out", "{tmp}/x.txt"], "give a .png, .pdf or .svg file"),
])
def test_curves_command_refusals(tmp_path, capsys, args, needle):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_history(a, _rows(2))
    _write_history(b, _rows(2))
    (tmp_path / "empty").mkdir()
    names = {"a": a, "b": b, "empty": tmp_path / "empty", "missing": tmp_path / "missing",
             "tmp": tmp_path}
    assert main(["curves", *[x.format(**names) for x in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_report_has_a_training_curves_section(tmp_path):
    import json

    from causalign.report.html import write_report

    runs = []
    for label in ("erm", "causal-align"):
        _write_history(tmp_path / "runs" / label, _rows(4, align=label != "erm"))
        runs.append({"key": label, "status": "done", "dataset": "pm", "label": label,
                     "method": label, "setting": "default", "seed": 0,
                     "run_dir": f"runs/{label}", "metrics": {}})
    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": runs}))
    page = write_report(tmp_path).read_text()
    assert "<h2>Training curves</h2>" in page and "training curves pm" in page
    assert (tmp_path / "figures" / "curves_pm.png").is_file()
