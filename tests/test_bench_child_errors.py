"""Benchmark scripts that run children: a child's failure is one `error:` line naming the
dataset, not a traceback per child followed by the parent's CalledProcessError."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"child_errors_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_dataset_open_reports_a_failing_child_in_one_line(tmp_path, monkeypatch):
    """A folder that is not a dataset: each child printed a traceback, then the parent
    raised CalledProcessError; now the child's last line, with the folder and --src."""
    mod = _load("bench_dataset_open", monkeypatch)
    data = tmp_path / "not_a_dataset"
    data.mkdir()
    monkeypatch.setattr(sys, "argv", ["bench_dataset_open.py", str(data), "--repeats", "2",
                                      "--src", str(ROOT / "src")])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    message = str(exit_.value.code)
    assert message.startswith(f"error: {data} with --src {ROOT / 'src'}: ")
    assert "dataset.yaml: missing" in message and "\n" not in message


def test_bench_dataset_open_refuses_zero_repeats(tmp_path, monkeypatch, capsys):
    """--repeats 0 measured nothing and then failed on min() of an empty list."""
    mod = _load("bench_dataset_open", monkeypatch)
    (tmp_path / "d").mkdir()
    monkeypatch.setattr(sys, "argv", ["bench_dataset_open.py", str(tmp_path / "d"),
                                      "--repeats", "0"])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_bench_startup_scale_refuses_an_empty_training_split_before_writing(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    """--n-train 0 wrote a dataset with no training image, then stopped on DataError's
    traceback ("split 'train' is empty")."""
    mod = _load("bench_startup_scale", monkeypatch)
    root = tmp_path / "data"
    monkeypatch.setattr(sys, "argv", ["bench_startup_scale.py", str(root), "--n-train", "0"])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2
    assert "--n-train must be at least 2" in capsys.readouterr().err
    assert not root.exists()
