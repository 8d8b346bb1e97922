"""Benchmark reruns on a subset (--only/--methods/--seeds/--datasets) into a finished OUT:
the subset decides what is trained now, results and tables keep every finished run of the
suite (they were rewritten with the subset's rows only); `demo --methods erm,erm` refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from causalign.cli import main
from causalign.engine import benchmark as bm
from causalign.errors import ConfigError

TINY = {"n_train": 16, "n_val": 8, "n_test": 8, "size": 32}
RAW = {"name": "tiny", "defaults": {"epochs": 1, "width": 4, "batch_size": 16, "device": "cpu"},
       "datasets": {"pm": {"synth": TINY}},
       "experiments": {
           "A": {"title": "Table A", "datasets": ["pm"], "methods": ["erm", "rrr"],
                 "seeds": [0]},
           # erm seed 0 again: one run, shown in both tables
           "B": {"title": "Table B", "datasets": ["pm"],
                 "methods": [{"name": "erm", "label": "baseline"}], "seeds": [0]}}}


def _csv_keys(out: Path) -> list[str]:
    with open(out / "results.csv", newline="") as fh:
        return [r["key"] for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """The whole tiny suite, finished in OUT."""
    tmp = tmp_path_factory.mktemp("subset")
    suite = tmp / "tiny.yaml"
    suite.write_text(yaml.safe_dump(RAW))
    out = tmp / "full"
    assert main(["benchmark", str(suite), "--out", str(out), "--no-progress",
                 "--no-report"]) == 0
    return {"suite": str(suite), "out": out, "tables": (out / "tables.md").read_text(),
            "results": json.loads((out / "results.json").read_text())}


def _rerun(finished: dict, tmp_path: Path, capsys, *argv: str) -> tuple[Path, str]:
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    capsys.readouterr()
    assert main(["benchmark", finished["suite"], "--out", str(out), "--no-progress",
                 "--no-report", *argv]) == 0
    return out, capsys.readouterr().out


def test_a_methods_subset_keeps_every_finished_run_in_results_and_tables(finished, tmp_path,
                                                                          capsys):
    out, stdout = _rerun(finished, tmp_path, capsys, "--methods", "erm")
    # before: results.csv/json and tables.md held the erm run only, rrr's row was gone
    assert (out / "tables.md").read_text() == finished["tables"]
    assert _csv_keys(out) == ["pm/erm/seed0", "pm/rrr/seed0"]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["key"], r["status"], r["experiments"]) for r in runs] == \
        [(r["key"], r["status"], r["experiments"]) for r in finished["results"]["runs"]]
    assert [r["metrics"] for r in runs] == [r["metrics"] for r in finished["results"]["runs"]]
    # the summary says what was selected and what else the tables show
    assert "benchmark tiny (selected: --methods erm): 1 done, 0 failed, 0 skipped " \
           "(0 trained now)" in stdout
    assert "also show 1 finished run(s) of the suite outside the selection" in stdout


def test_an_only_subset_keeps_the_other_experiments_tables(finished, tmp_path, capsys):
    out, stdout = _rerun(finished, tmp_path, capsys, "--only", "B")
    tables = (out / "tables.md").read_text()
    assert tables == finished["tables"] and "### Table A" in tables and "| rrr |" in tables
    assert "selected: --only B" in stdout
    results = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in results["experiments"]] == ["A", "B"]
    # the selected run (B's baseline) is also table A's erm: listed under both
    (erm,) = [r for r in results["runs"] if r["key"] == "pm/erm/seed0"]
    assert erm["experiments"] == ["A", "B"]


def test_a_seeds_subset_adds_its_seed_to_the_finished_ones(finished, tmp_path, capsys):
    out, stdout = _rerun(finished, tmp_path, capsys, "--methods", "erm", "--seeds", "1")
    assert _csv_keys(out) == ["pm/erm/seed0", "pm/erm/seed1", "pm/rrr/seed0"]
    runs = {r["key"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    accs = [runs[f"pm/erm/seed{k}"]["metrics"]["test"]["accuracy"] for k in (0, 1)]
    suite = bm.load_suite(finished["suite"])
    table = bm.experiment_table(suite.experiments[0], list(runs.values()))
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2
    assert table.rows[0][2] == f"{mean:.3f} ({std:.3f})"  # erm over seeds 0 and 1
    rrr = finished["results"]["runs"][1]
    assert rrr["key"] == "pm/rrr/seed0"
    # over seed 0 only, where the note says "over seeds 0, 1": marked
    assert table.rows[1][2] == f"{rrr['metrics']['test']['accuracy']:.3f}†"
    assert "† over fewer seeds, without rrr: seed 1" in table.notes
    tables = (out / "tables.md").read_text()
    assert "mean (std) over seeds 0, 1" in tables and "| rrr |" in tables
    # seed 1 of rrr was never part of the suite: not counted as missing
    assert "not finished" not in stdout


def test_a_subset_in_a_fresh_out_shows_only_what_exists(tmp_path, capsys):
    """No table rows or tables for runs that were never made; the summary says they are
    missing."""
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(RAW))
    out = tmp_path / "out"
    assert main(["benchmark", str(suite), "--out", str(out), "--no-progress", "--no-report",
                 "--methods", "rrr"]) == 0
    stdout = capsys.readouterr().out
    assert _csv_keys(out) == ["pm/rrr/seed0"]
    tables = (out / "tables.md").read_text()
    assert "| rrr |" in tables and "| erm |" not in tables and "### Table B" not in tables
    assert "also show 0 finished run(s) of the suite outside the selection; 1 not finished" \
        in stdout


def test_finished_runs_with_other_settings_are_not_collected(finished, tmp_path, capsys):
    """A subset with a --set: the suite's other runs finished without it are not its runs."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    shutil.rmtree(out / "runs" / "pm" / "rrr")
    capsys.readouterr()
    assert main(["benchmark", finished["suite"], "--out", str(out), "--no-progress",
                 "--no-report", "--methods", "rrr", "--set", "epochs=2"]) == 0
    assert _csv_keys(out) == ["pm/rrr/seed0"]  # erm ran without it: left out, not mixed in
    assert "1 not finished" in capsys.readouterr().out


def test_demo_refuses_a_method_listed_twice(tmp_path, monkeypatch):
    import causalign.demo as demo

    def no_run(suite, *a, **kw):  # the demo would train (minutes): stop where it starts
        raise AssertionError(f"ran with {[m.name for m in suite.experiments[0].methods]}")

    monkeypatch.setattr(demo, "run_suite", no_run)
    with pytest.raises(ConfigError, match="--methods: method 'erm' is listed twice"):
        demo.run_demo(tmp_path / "d", methods=["erm", "rrr", "erm"], progress=False)
    assert not (tmp_path / "d").exists()
