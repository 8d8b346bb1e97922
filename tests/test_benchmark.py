"""Benchmark runner: plan, failures recorded, killed half-way then resumed; report.html
rendered in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from causalign.cli import main
from causalign.engine import benchmark as bm
from causalign.engine.trainer import Trainer

SUITE = {
    "name": "tiny",
    "defaults": {"epochs": 2, "width": 4, "batch_size": 16, "device": "cpu"},
    "datasets": {"pm": {"synth": {"n_train": 32, "n_val": 16, "n_test": 16, "size": 32,
                                  "seed": 1}}},
    "experiments": {
        "t1": {"title": "Tiny table", "datasets": ["pm"], "seeds": [0],
               "methods": ["erm", "rrr", "oracle",
                           {"name": "rrr", "label": "rrr-bad", "set": {"method.lam": -1}},
                           "no-such-method"],
               "metrics": ["test.cam_precision", "test.accuracy"]},
        # erm seed 0 again (merged, trained once) and seed 1: mean (std) over two seeds
        "t2": {"title": "Again", "datasets": ["pm"], "seeds": [0, 1], "methods": ["erm"]},
    },
}
TRAINED = ["pm/erm/seed0", "pm/rrr/seed0", "pm/oracle/seed0", "pm/erm/seed1"]


def _suite(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(SUITE))
    return bm.load_suite(p)


def _count_training(monkeypatch) -> list[tuple[str, int]]:
    """Record (run folder, epoch) of every epoch trained."""
    calls: list[tuple[str, int]] = []
    original = Trainer._save_state

    def recording(self):
        calls.append((self.out.relative_to(self.out.parents[2]).as_posix(), self.state.epoch))
        original(self)

    monkeypatch.setattr(Trainer, "_save_state", recording)
    return calls


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A benchmark killed in its 3rd run (after that run's first epoch), then re-run."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    suite = _suite(tmp)
    original = Trainer._save_state
    epochs: list[tuple[str, int]] = []

    def killer(self):
        original(self)
        epochs.append((self.out.name, self.state.epoch))
        if len(epochs) == 5:  # runs 1, 2 done (2 epochs each); run 3 after epoch 1
            raise KeyboardInterrupt

    # contexts, not bare MonkeyPatch objects: an undo() after a failed pytest.raises was
    # skipped, and the killer (KeyboardInterrupt: pytest stops) outlived this module
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_save_state", killer)
        with pytest.raises(KeyboardInterrupt):
            bm.run_suite(suite, out, progress=True, report=False)
    first = json.loads((out / "results.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_training(mp)
        results = bm.run_suite(suite, out, progress=False, report=True)
    return {"out": out, "suite": suite, "first": first, "calls": calls, "results": results,
            "tmp": tmp}


def test_kill_then_rerun_finishes_only_the_missing_runs(bench_dir, monkeypatch):
    first, calls = bench_dir["first"], bench_dir["calls"]
    assert not first["complete"]
    assert [r["key"] for r in first["runs"] if r["status"] == "done"] == TRAINED[:2]
    # the re-run trained: the interrupted run's 2nd epoch (resumed from its checkpoint) and
    # the three runs that never started — nothing that had finished
    assert calls == [("pm/oracle/seed0", 2), ("pm/erm/seed1", 1), ("pm/erm/seed1", 2)]
    resumed = bench_dir["out"] / "runs" / "pm/oracle/seed0" / "history.csv"
    assert len(resumed.read_text().strip().splitlines()) == 3  # header + epochs 1, 2
    runs = {r["key"]: r for r in bench_dir["results"]["runs"]}
    assert [k for k in TRAINED if runs[k]["trained_now"]] == TRAINED[2:]
    # a third invocation trains nothing
    again = _count_training(monkeypatch)
    bm.run_suite(bench_dir["suite"], bench_dir["out"], progress=False, report=False)
    assert again == []
    # a finished run is never silently reused for other settings
    copy = bench_dir["tmp"] / "copy"
    shutil.copytree(bench_dir["out"], copy)
    changed = bm.parse_suite({**SUITE, "defaults": {**SUITE["defaults"], "epochs": 3}},
                             bench_dir["tmp"], "tiny")
    res = bm.run_suite(changed, copy, progress=False, report=False)
    assert again == []
    errors = {r["key"]: r.get("error", "") for r in res["runs"]}
    assert all("other settings (epochs 2 -> 3)" in errors[k] for k in TRAINED)
    # ... nor when only a method *default* changed since it was trained (the suite is the same)
    copy2 = bench_dir["tmp"] / "copy2"
    shutil.copytree(bench_dir["out"], copy2)
    cfg_path = copy2 / "runs" / "pm/rrr/seed0" / "config.yaml"
    stored = yaml.safe_load(cfg_path.read_text())
    assert stored["method_params"]["lam"] == 10.0  # the resolved default is stored
    stored["method_params"]["lam"] = 5.0  # as if trained when the default was 5
    cfg_path.write_text(yaml.safe_dump(stored))
    res = bm.run_suite(bench_dir["suite"], copy2, progress=False, report=False)
    assert again == []
    errors = {r["key"]: r.get("error", "") for r in res["runs"]}
    assert "other settings (method.lam 5.0 -> 10.0)" in errors["pm/rrr/seed0"]
    assert errors["pm/erm/seed0"] == ""


def test_failures_and_skips_are_recorded(bench_dir):
    out, results = bench_dir["out"], bench_dir["results"]
    runs = {r["key"]: r for r in results["runs"]}
    assert results["complete"] and len(runs) == 6  # t2's erm seed 0 merged into t1's
    assert runs["pm/erm/seed0"]["experiments"] == ["t1", "t2"]
    for k in TRAINED:
        assert runs[k]["status"] == "done"
        assert 0 <= runs[k]["metrics"]["test"]["accuracy"] <= 1
    bad = runs["pm/rrr-bad/seed0"]
    assert bad["status"] == "failed" and "method.lam" in bad["error"]
    skip = runs["pm/no-such-method/seed0"]
    assert skip["status"] == "skipped" and "not registered" in skip["reason"]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done", "failed", "skipped"}
    assert rows[0]["test_cam_precision"] != ""
    tables = (out / "tables.md").read_text()
    assert "### Tiny table" in tables and "### Again" in tables
    assert "**" in tables and "not registered" in tables
    t1 = bm.experiment_table(bench_dir["suite"].experiments[0], results["runs"])
    assert [r[0] for r in t1.rows] == ["erm", "rrr", "oracle", "rrr-bad", "no-such-method"]
    assert not any(t1.bold[2])  # the oracle, a ceiling, is never ranked
    assert t1.rows[3][1:] == ["–", "–"]
    t2 = bm.experiment_table(bench_dir["suite"].experiments[1], results["runs"])
    accs = [runs[f"pm/erm/seed{k}"]["metrics"]["test"]["accuracy"] for k in (0, 1)]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2
    assert t2.rows[0][2] == f"{mean:.3f} ({std:.3f})"  # mean (std) over the two seeds


def test_shipped_suites_plan():
    for name in ("quick", "paper", "demo"):
        specs = bm.plan(bm.load_suite(name))
        assert specs and not [s.error for s in specs if s.error]
    paper = bm.plan(bm.load_suite("paper"))
    t1 = [s for s in paper if "table1" in s.experiments]
    assert len(t1) == 9 * 3 and {s.method for s in t1} >= {"rrr", "icnn", "bagnet", "cdep",
                                                            "chang", "oracle", "causal-align"}
    assert {s.dataset for s in paper} == {"plus-minus", "intensity", "none"}
    dist = [s for s in paper if "table7" in s.experiments]
    # table7's l1 is the default: its run is Table 1's (trained once), with no distance set
    assert sorted(s.config.method_args.get("distance", "l1") for s in dist) == \
        ["l1", "l2", "scaled-l1", "scaled-l2"]


def test_benchmark_probe_suites_plan():
    """The suites the README cites for its probes (benchmarks/suites/) stay runnable."""
    suites = Path(__file__).parents[1] / "benchmarks" / "suites"
    files = sorted(suites.glob("*.yaml"))
    assert files
    for f in files:
        specs = bm.plan(bm.load_suite(f))
        assert specs and not [s.error for s in specs if s.error], f.name
    probes = bm.plan(bm.load_suite(suites / "causal_align_probes.yaml"))
    big = [s for s in probes if "data_4k" in s.experiments]
    assert len(big) == 12 and len({s.key for s in big}) == 12  # 2 datasets × 2 methods × 3 seeds
    assert {s.dataset for s in big} == {"plus-minus-4k", "shortcut-free-4k"}


def test_cli_benchmark_user_errors(tmp_path, capsys):
    assert main(["benchmark", "no-such-suite", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown suite" in err and "quick" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SUITE, "defaults": {"epochz": 1}}))
    assert main(["benchmark", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key 'epochz'" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_is_self_contained_and_renders(bench_dir, tmp_path):
    report = bench_dir["out"] / "report.html"
    text = report.read_text()
    assert text.count("<table") >= 2 and "data:image/png;base64," in text
    assert "CAM overlays" in text and "Counterfactuals" in text and "Deletion curves" in text
    assert 'src="http' not in text and "<link" not in text  # nothing fetched from outside
    assert "not registered" in text
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium package)")
    # copy alone: the page must not need the run folder or figures/ beside it
    alone = tmp_path / "report.html"
    alone.write_text(text)
    shot = tmp_path / "shot.png"
    # Chromium's profile and caches in tmp_path: with the user's HOME every call left a
    # headless profile (~/.cache/chromium-headless/scoped_dir*, never removed) behind
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config")}
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--window-size=1200,1600",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*flags, f"--screenshot={shot}", alone.as_uri()], check=True,
                   capture_output=True, timeout=120, env=env)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page
    dom = subprocess.run([*flags, "--dump-dom", alone.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120, env=env).stdout
    assert dom.count("<table") >= 2 and "Tiny table" in dom and "<img" in dom


@pytest.mark.slow
def test_quick_suite_runs_every_method(tmp_path):
    """The shipped CI-sized suite end to end: every registered method trains, report built."""
    results = bm.run_suite(bm.load_suite("quick"), tmp_path / "q", progress=False)
    bad = [(r["key"], r.get("error")) for r in results["runs"] if r["status"] == "failed"]
    assert not bad
    assert (tmp_path / "q" / "report.html").exists()


def test_cli_benchmark_fails_fast_on_bad_suites_and_exits_nonzero_on_failed_runs(tmp_path,
                                                                                   capsys):
    def write(suite: dict) -> str:
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump(suite))
        return str(p)

    tiny = {"n_train": 8, "n_val": 4, "n_test": 4, "size": 32}
    exp = {"datasets": ["d"], "methods": ["erm"], "seeds": [0]}
    # Bad generator settings and an empty seed list fail at load, before any dataset or run.
    for suite, needle in [
        ({"datasets": {"d": {"synth": {"bogus": 1}}}, "experiments": {"e": exp}},
         "dataset 'd': unknown synth setting(s) bogus; valid: n_train"),
        ({"datasets": {"d": {"synth": {**tiny, "label_noise": -1}}}, "experiments": {"e": exp}},
         "dataset 'd': --label-noise must be a finite σ >= 0"),
        ({"datasets": {"d": {"synth": tiny}}, "experiments": {"e": {**exp, "seeds": []}}},
         "experiment 'e': seeds is empty"),
    ]:
        out = tmp_path / "o1"
        assert main(["benchmark", write(suite), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not out.exists()
    # A run that fails is recorded, every output is written, and the exit code says so.
    # (A missing dataset folder is refused before any output; a damaged one fails its runs.)
    out = tmp_path / "o2"
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "dataset.yaml").write_text("bogus: 1\n")
    suite = {"datasets": {"d": {"path": str(tmp_path / "damaged")}}, "experiments": {"e": exp}}
    assert main(["benchmark", write(suite), "--out", str(out), "--no-progress",
                 "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 of 1 runs failed, e.g. d/erm/seed0: DataError:" in err
    assert (out / "tables.md").exists() and (out / "runs/d/erm/seed0/error.txt").exists()


def test_a_finished_runs_numerical_warnings_reach_the_table_notes():
    """A run whose alignment term was mostly skipped finishes 'done'; its metrics.json
    warning must reach tables.md, not stay in the run folder."""
    from causalign.engine.benchmark import Experiment, MethodSpec, _slim, experiment_table

    metrics = {"method": "causal-align", "test": {"accuracy": 0.5},
               "warnings": ["train_cg_dropped >= 0.5 in 1 of 1 epoch(s) (worst 1.00): CG"]}
    rec = {"key": "d/causal-align/seed0", "dataset": "d", "method": "causal-align",
           "label": "causal-align", "setting": "default", "seed": 0, "experiments": ["t"],
           "status": "done", "metrics": _slim(metrics)}
    exp = Experiment("t", "t", ["d"], [MethodSpec("causal-align", "causal-align")], [0],
                     {"default": {}}, "method", ["test.accuracy"])
    notes = experiment_table(exp, [rec]).notes
    assert "d/causal-align/seed0: warning: train_cg_dropped >= 0.5 in 1 of 1 epoch(s) " \
           "(worst 1.00): CG" in notes
