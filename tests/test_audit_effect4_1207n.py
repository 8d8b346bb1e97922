"""Audit (part 4): do the options the first three audits (test_audit_effect_1207f.py,
test_audit_effect2_1207m.py, test_audit_effect3_1207m.py) left unchecked act? `benchmark
--settings`, `bench step`'s flags, the cbis-ddsm / busi / decoy-mnist `data import` flags, and
the compare / evaluate / predict / curves / export / causal ccce / causal pc flags.

Each guard: changing the option from its default changes an observable (what `bench step`'s
timed step sees, the suite's run configs, imported files, a written JSON or figure). An option
accepted but unread in a combination is refused in one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from causalign.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_real import write_busi, write_cbis, write_mnist  # noqa: E402
from test_audit_effect2_1207m import _import_digest, _suite_seen  # noqa: E402


def _err_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect a user error: its one stderr line."""
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ runs shared below


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Two 1-epoch ERM runs (seeds 0, 1) on the tiny split."""
    base = tmp_path_factory.mktemp("effect4")
    out = []
    for seed in (0, 1):
        run = base / f"erm{seed}"
        assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run),
                     "--epochs", "1", "--seed", str(seed), "--set", "width=4",
                     "--set", "threads=1", "--no-progress"]) == 0
        out.append(run)
    return out


# ------------------------------------------------------------------ compare


def test_compare_split_with_two_csv_files_is_refused(runs, tmp_path, capsys):
    """Regression: `compare A.csv B.csv --split val` read the two files as they are and
    printed the comparison, exit 0: --split was accepted and unread (the JSON was that of
    the files, whatever split they hold). Now refused in one line naming --split."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    shutil.copy(runs[0] / "predictions_test.csv", a)
    shutil.copy(runs[1] / "predictions_test.csv", b)
    line = _err_line(capsys, ["compare", str(a), str(b), "--split", "val"])
    assert "--split" in line and "CSV" in line
    assert main(["compare", str(a), str(b)]) == 0  # without it: as before


def test_compare_split_reads_the_run_folders_split(runs, capsys):
    """Guard: with run folders (or one folder and a CSV), --split picks the predictions file
    (val and test accuracies, files named in the JSON)."""
    def cmp(*extra):
        capsys.readouterr()
        assert main(["compare", str(runs[0]), str(runs[1]), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    test, val = cmp(), cmp("--split", "val")
    assert test["predictions_a"].endswith("predictions_test.csv")
    assert val["predictions_a"].endswith("predictions_val.csv")
    assert (test["accuracy_a"], test["auc_a"]) != (val["accuracy_a"], val["auc_a"])
    capsys.readouterr()
    assert main(["compare", str(runs[0]), str(runs[1] / "predictions_val.csv"),
                 "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["auc_a"] == val["auc_a"]
