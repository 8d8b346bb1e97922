"""Audit (part 5): the options parts 1-4 (test_audit_effect*_12*.py) left unchecked: `--device
cuda` / `cuda:1` on every command that takes it (no GPU), `--progress` / `--no-progress`
on every command that shows a bar, `export --out`, `curves` with several runs, and the
`--help` options no test exercised.

Each guard: changing the option changes an observable (stderr lines, the files written, the
lines handed to matplotlib). A refused option is one stderr line, before the heavy work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from causalign.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_real import write_busi  # noqa: E402
from test_audit_effect4_1207n import _err_line  # noqa: E402
from test_training_curves import _rows, _write_history  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """One 1-epoch ERM run on the tiny split."""
    out = tmp_path_factory.mktemp("effect5") / "erm"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(out), "--epochs",
                 "1", "--set", "width=4", "--set", "threads=1", "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------ --device cuda, no GPU


DEVICE_COMMANDS = {
    "causal pc": lambda run, data, out: ["causal", "pc", str(run), "--out", str(out)],
    "predict": lambda run, data, out: ["predict", str(run), str(data), "--out",
                                       str(out / "p.csv"), "--no-progress"],
    "evaluate": lambda run, data, out: ["evaluate", str(run), "--out", str(out / "m.json"),
                                        "--no-progress"],
    "explain": lambda run, data, out: ["explain", str(run), "--out", str(out),
                                       "--no-progress"],
    "counterfactual": lambda run, data, out: ["counterfactual", str(run), "--out",
                                              str(out), "--no-progress"],
    "train": lambda run, data, out: ["train", str(data), "--out", str(out), "--epochs", "1",
                                     "--no-progress"],
}


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_cuda_without_a_gpu_is_one_line_before_any_output(run, tiny_data, tmp_path, capsys,
                                                           monkeypatch, command, device):
    """Guard: `--device cuda` / `cuda:1` where CUDA is missing stops in one line naming the
    device, and writes nothing (no output folder / file: the refusal comes before the work).
    `export` and `benchmark` take no --device (typer refuses it); `bench step` is part 4's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    out = tmp_path / "out"
    line = _err_line(capsys, [*DEVICE_COMMANDS[command](run, tiny_data, out),
                              "--device", device])
    assert line == f"error: device '{device}' requested but CUDA is not available"
    assert not out.exists()


@pytest.mark.parametrize("command", [["export", "RUN"], ["benchmark", "quick", "--out", "O"]])
def test_commands_without_a_device_option_refuse_it(capsys, command):
    """Guard: export and benchmark have no --device (README CLI table); it is refused."""
    line = _err_line(capsys, [*command, "--device", "cuda"])
    assert "No such option: --device" in line


# ------------------------------------------------------------------ --progress / --no-progress


def _progress_commands(run: Path, data: Path, out: Path, busi: Path) -> dict[str, tuple]:
    """command -> (argv without the flag, the bar's first words)."""
    return {
        "data synth": (["data", "synth", str(out / "s"), "--n-train", "4", "--n-val", "2",
                        "--n-test", "2", "--size", "32", "--no-examples"], "synthesising"),
        "data import": (["data", "import", "busi", str(busi), str(out / "i"), "--size", "16"],
                        "importing"),
        "train": (["train", str(data), "--out", str(out / "t"), "--epochs", "1", "--set",
                   "width=4", "--set", "threads=1"], "epoch 1/1"),
        "evaluate": (["evaluate", str(run), "--split", "val", "--out", str(out / "m.json"),
                                        "--no-progress"],
                     "evaluating val"),
        "predict": (["predict", str(run), str(data), "--out", str(out / "p.csv"), "--no-progress"],
                    "predicting test"),
        "explain": (["explain", str(run), "--out", str(out / "e"), "--limit", "2"],
                    "explaining (gradcam)"),
        "counterfactual": (["counterfactual", str(run), "--out", str(out / "c"), "--limit",
                            "2"], "counterfactuals"),
    }


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    return write_busi(tmp_path_factory.mktemp("effect5_busi") / "busi")["root"]


@pytest.mark.parametrize("command", ["data synth", "data import", "train", "evaluate",
                                     "predict", "explain", "counterfactual"])
def test_progress_flags_on_a_non_terminal_stderr(run, tiny_data, busi, tmp_path, capsys,
                                                 command):
    """Guard: off a terminal (pytest's captured stderr) `--progress` prints each finished
    bar as ONE plain line (README: no redraws, no cursor codes), and `--no-progress` prints
    nothing on stderr at all. (benchmark / demo hand the flag on: test_audit_effect2.)"""
    argv, words = _progress_commands(run, tiny_data, tmp_path / "on", busi)[command]
    capsys.readouterr()
    assert main([*argv, "--progress"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err, repr(err)
    bars = [line for line in err.splitlines() if line.startswith(words)]
    assert len(bars) == 1 and "━" in bars[0], err
    argv, _ = _progress_commands(run, tiny_data, tmp_path / "off", busi)[command]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "━" not in err and "\r" not in err and words not in err, err


# ------------------------------------------------------------------ curves with several runs


def test_curves_draws_every_run_and_names_each_in_the_legend(tmp_path, monkeypatch, capsys):
    """Guard: `curves A B C --out F` hands matplotlib one loss line per run in its own colour
    (and the AUC / accuracy panels as many), and the figure's legend names each run by its
    path below the runs' common folder."""
    from causalign.report import figures

    runs = [tmp_path / "runs" / m / "seed0" for m in ("erm", "rrr", "gradmask")]
    for i, r in enumerate(runs):
        rows = _rows(3)
        for row in rows:
            row["train_loss"] = float(row["train_loss"]) + i  # tell the runs apart
        _write_history(r, rows)
    seen = {}
    monkeypatch.setattr(figures, "atomic_savefig",
                        lambda fig, path, **kw: seen.update(fig=fig, path=Path(path)))
    assert main(["curves", *map(str, runs), "--out", str(tmp_path / "c.png")]) == 0
    fig = seen["fig"]
    loss, auc, acc = fig.axes[:3]
    assert [list(line.get_ydata()) for line in loss.lines] == \
        [[1 / e + i for e in (1, 2, 3)] for i in range(3)]
    assert len({line.get_color() for line in loss.lines}) == 3
    assert len(auc.lines) == 3 and len(acc.lines) == 6  # val solid + train dashed per run
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == \
        ["erm/seed0", "rrr/seed0", "gradmask/seed0"]
    capsys.readouterr()


@pytest.mark.parametrize("bad, needle", [("missing", "not a run folder"),
                                         ("empty", "no history.csv rows"),
                                         ("file", "not a run folder")])
def test_curves_one_bad_run_among_several_is_one_line(tmp_path, capsys, bad, needle):
    """Guard: a missing / empty / non-folder run among good ones: one line, no figure."""
    good = [tmp_path / "a", tmp_path / "b"]
    for r in good:
        _write_history(r, _rows(2))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    fig = tmp_path / "c.png"
    line = _err_line(capsys, ["curves", str(good[0]), str(tmp_path / bad), str(good[1]),
                              "--out", str(fig)])
    assert needle in line and str(tmp_path / bad) in line
    assert not fig.exists()


# ------------------------------------------------------------------ export --out


@pytest.mark.slow
def test_export_out_writes_there_and_nowhere_else(run, tmp_path, capsys):
    """Guard: `export --out NEW/SUB/m.pt2` creates the folders and writes the program there
    only (no temporary left beside it, the run folder unchanged). ~20 s: torch.export."""
    before = sorted(p.name for p in run.iterdir())
    target = tmp_path / "new" / "sub" / "m.pt2"
    assert main(["export", str(run), "--out", str(target)]) == 0
    assert [p.name for p in (tmp_path / "new" / "sub").iterdir()] == ["m.pt2"]
    assert sorted(p.name for p in run.iterdir()) == before
    capsys.readouterr()


@pytest.fixture
def no_export(monkeypatch):
    """export_run replaced by a recorder: a refusal must come before it."""
    from causalign.engine import export

    calls = []
    monkeypatch.setattr(export, "export_run", lambda *a, **k: calls.append(a) or {})
    return calls


def test_export_out_a_folder_or_under_a_file_is_one_line(run, tmp_path, capsys, no_export):
    """Guard: --out an existing folder, or a path below a file: one line, nothing exported."""
    (tmp_path / "f").write_text("x")
    assert "is a folder" in _err_line(capsys, ["export", str(run), "--out", str(tmp_path)])
    line = _err_line(capsys, ["export", str(run), "--out", str(tmp_path / "f" / "m.pt2")])
    assert "is a file, not a folder" in line
    assert no_export == []


def test_export_out_in_an_unwritable_folder_is_refused_before_exporting(
        run, tmp_path, capsys, monkeypatch, no_export):
    """Regression: `export --out RO/m.pt2` in a folder the user cannot write went through
    the whole export (tracing and checking the model, ~20 s) and failed only on writing
    the temporary file (seen as root with `--out /proc/m.pt2`: 18.7 s, then "error:
    /proc/.m.pt2.7rfgtmze.tmp: No such file or directory"). Now one line naming the folder,
    before the export. (Root may write anywhere, so the test makes os.access say no.)"""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                        False if Path(p) == ro and mode & os.W_OK else real(p, mode, *a, **k))
    line = _err_line(capsys, ["export", str(run), "--out", str(ro / "m.pt2")])
    assert line == f"error: --out {ro / 'm.pt2'}: {ro} is not writable"
    line = _err_line(capsys, ["export", str(run), "--out", str(ro / "new" / "m.pt2")])
    assert line == f"error: --out {ro / 'new' / 'm.pt2'}: {ro} is not writable"
    assert no_export == []


# ------------------------------------------------------------------ options no test named


def test_train_no_resume_on_a_run_folder_is_one_line(run, tiny_data, capsys):
    """Guard: `train --no-resume` (the default) into a folder that holds a run refuses in one
    line pointing at --resume, and leaves the run's checkpoint untouched."""
    before = (run / "checkpoint.pt").read_bytes()
    line = _err_line(capsys, ["train", str(tiny_data), "--out", str(run), "--epochs", "1",
                              "--no-resume", "--no-progress"])
    assert line == f"error: {run}: already holds a run (pass --resume to continue it, or " \
                   "choose another --out)"
    assert (run / "checkpoint.pt").read_bytes() == before


def test_data_synth_no_overwrite_refuses_and_overwrite_replaces(tmp_path, capsys):
    """Guard: `data synth --no-overwrite` into a non-empty folder is one line and keeps its
    files; `--overwrite` writes the new dataset there."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["data", "synth", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "2",
            "--size", "32", "--no-examples", "--no-progress"]
    line = _err_line(capsys, [*argv, "--no-overwrite"])
    assert line == f"error: {out}: output folder exists and is not empty (use --overwrite)"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "manifest.csv").is_file()
    capsys.readouterr()


def test_data_import_no_overwrite_keeps_and_overwrite_redoes(busi, tmp_path, capsys):
    """Guard: a second `data import` with other settings into the same OUT is refused with
    --no-overwrite (the first import's images stay), and --overwrite redoes it."""
    out = tmp_path / "i"
    base = ["data", "import", "busi", str(busi), str(out), "--no-progress"]
    assert main([*base, "--size", "16"]) == 0
    first = sorted(p.name for p in (out / "images").iterdir())
    capsys.readouterr()
    assert main([*base, "--size", "24", "--no-overwrite"]) != 0
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in (out / "images").iterdir()) == first
    assert main([*base, "--size", "24", "--overwrite"]) == 0
    from PIL import Image

    with Image.open(next((out / "images").iterdir())) as im:
        assert im.size == (24, 24)
    capsys.readouterr()


def test_causal_pc_test_and_split_reach_the_report(run, tmp_path, capsys):
    """Guard: `causal pc --test kci --split train` runs the kernel test on the training
    split: pc_check.json records indep_test kci and the 48 training samples."""
    import json

    assert main(["causal", "pc", str(run), "--test", "kci", "--split", "train", "--out",
                 str(tmp_path / "pc")]) == 0
    rep = json.loads((tmp_path / "pc" / "pc_check.json").read_text())
    assert (rep["indep_test"], rep["n"]) == ("kci", 48)
    assert rep["split"] == "train"
    capsys.readouterr()
