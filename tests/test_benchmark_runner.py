"""Benchmark runner: --set method.<p> checked up front against the selected methods, run axes
(method, seed) never silently overridden, misspelt selections refused, stale synthetic data
refused, a run shared by several experiments shown in each of their tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from causalign.cli import main
from causalign.engine import benchmark as bm
from causalign.errors import ConfigError

TINY = {"n_train": 16, "n_val": 8, "n_test": 8, "size": 32}
RAW = {"name": "tiny", "defaults": {"epochs": 1, "width": 4, "batch_size": 16, "device": "cpu"},
       "datasets": {"pm": {"synth": TINY}},
       "experiments": {"t1": {"datasets": ["pm"], "methods": ["erm", "rrr"], "seeds": [0]}}}


def _write(tmp_path: Path, raw: dict) -> str:
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_set_method_key_no_selected_method_has_is_refused_before_any_output(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run(capsys, "benchmark", _write(tmp_path, RAW), "--out", out, "--no-progress",
                   "--no-report", "--set", "method.foo=1")
    assert rc == 2 and err.count("\n") == 1, err
    assert "--set: method.foo is a parameter of none of the selected methods (erm, rrr)" in err
    assert "method.lam" in err  # the keys that would work
    assert not out.exists()
    # a bad value of a parameter some have fails every run it reaches: refused alike
    rc, err = _run(capsys, "benchmark", _write(tmp_path, RAW), "--out", out, "--no-progress",
                   "--no-report", "--set", "method.lam=-1")
    assert rc == 2 and "method.lam must be >= 0" in err and not out.exists(), err
    # the quick suite's ten methods have ~70 parameters: the nearest are named, not all
    rc, err = _run(capsys, "benchmark", "quick", "--out", out, "--no-progress",
                   "--set", "method.lamda=1")
    assert rc == 2 and err.count("\n") == 1 and not out.exists(), err
    assert err.rstrip().endswith("did you mean method.lam, method.lam2, method.lam1?"), err


def test_set_method_key_only_some_methods_have_applies_to_those():
    suite = bm.parse_suite(RAW, Path("."), "tiny")
    lines: list[str] = []
    base = {s.key: s for s in bm.plan(suite)}
    specs = {s.key: s for s in bm.plan(suite, {"method.lam": 3})}
    bm._check_extra(suite, {"method.lam": 3}, list(specs.values()), lines.append)
    assert lines == ["--set method.lam applies to rrr only (not erm: no such parameter)"]
    assert not any(s.error for s in specs.values())
    assert specs["pm/rrr/seed0"].config.method_args == {"lam": 3}
    # erm's runs are the ones without --set: a finished erm run is reused, not failed
    assert specs["pm/erm/seed0"].config.method_args == {}
    assert specs["pm/erm/seed0"].config_hash == base["pm/erm/seed0"].config_hash
    # the method_args={…} spelling is split the same way
    alt = {s.key: s for s in bm.plan(suite, {"method_args": {"lam": 3}})}
    assert alt["pm/erm/seed0"].error is None
    assert alt["pm/rrr/seed0"].config_hash == specs["pm/rrr/seed0"].config_hash


@pytest.mark.parametrize("key, option", [("seed", "--seeds"), ("method", "--methods")])
def test_set_seed_or_method_is_refused_not_silently_ignored(tmp_path, capsys, key, option):
    out = tmp_path / "out"
    value = "3" if key == "seed" else "rrr"
    rc, err = _run(capsys, "benchmark", _write(tmp_path, RAW), "--out", out, "--no-progress",
                   "--set", f"{key}={value}")
    assert rc == 2 and err.count("\n") == 1 and f"'{key}' is set by each run; use {option}" \
        in err, err
    assert not out.exists()
    # in the suite file too: each run's own method and seed replaced the value
    bad = {**RAW, "defaults": {**RAW["defaults"], key: value}}
    with pytest.raises(ConfigError, match=f"defaults: '{key}' is set by each run"):
        bm.parse_suite(bad, Path("."), "tiny")


def test_misspelt_methods_or_datasets_are_refused(tmp_path, capsys):
    suite = bm.parse_suite(RAW, Path("."), "tiny")
    with pytest.raises(ConfigError, match=r"--methods: 'rrrr' not in suite tiny \(it has: erm, "
                                          r"rrr\)"):
        bm.select(suite, methods=["erm", "rrrr"])
    with pytest.raises(ConfigError, match="--datasets: 'nope' not in suite tiny"):
        bm.select(suite, datasets=["pm", "nope"])
    assert [m.name for m in bm.select(suite, methods=["rrr"]).experiments[0].methods] == ["rrr"]
    rc, err = _run(capsys, "benchmark", _write(tmp_path, RAW), "--out", tmp_path / "o",
                   "--methods", "erm,rrrr", "--no-progress")
    assert rc == 2 and "'rrrr' not in suite" in err and not (tmp_path / "o").exists()


def test_settings_selection_keeps_only_the_named_override_sets(tmp_path, capsys):
    # Table 7 reruns of some distances only: before --settings, the l1 runs (Table 1's) ran
    # again with the others
    raw = {**RAW, "experiments": {
        "t7": {"datasets": ["pm"], "methods": ["rrr"], "seeds": [0],
               "settings": {"a": {"method.lam": 1}, "b": {"method.lam": 2},
                            "c": {"method.lam": 3}}},
        "t1": RAW["experiments"]["t1"]}}
    suite = bm.parse_suite(raw, Path("."), "tiny")
    sub = bm.select(suite, settings=["b", "c"])
    # an experiment without those settings (t1 has only "default") drops out
    assert [e.name for e in sub.experiments] == ["t7"]
    assert sub.experiments[0].settings == {"b": {"method.lam": 2}, "c": {"method.lam": 3}}
    assert sorted(s.config.method_args["lam"] for s in bm.plan(sub)) == [2, 3]
    assert "--settings b,c" in sub.selection
    with pytest.raises(ConfigError, match=r"--settings: 'd' not in suite tiny \(it has: a, b, "
                                          r"c, default\)"):
        bm.select(suite, settings=["b", "d"])
    rc, err = _run(capsys, "benchmark", _write(tmp_path, raw), "--out", tmp_path / "o",
                   "--settings", "zz", "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "--settings: 'zz' not in suite" in err, err
    assert not (tmp_path / "o").exists()


def test_duplicate_labels_datasets_and_colliding_dataset_folders_are_refused():
    def exp(**kw) -> dict:
        return {**RAW, "experiments": {"t1": {**RAW["experiments"]["t1"], **kw}}}

    # two configurations under one label were averaged together as if they were seeds
    with pytest.raises(ConfigError, match="method label 'rrr' is listed twice"):
        bm.parse_suite(exp(methods=["rrr", {"name": "rrr", "set": {"method.lam": 1}}]),
                       Path("."))
    with pytest.raises(ConfigError, match="dataset 'pm' is listed twice"):
        bm.parse_suite(exp(datasets=["pm", "pm"]), Path("."))
    # "a b" and "a-b" were both generated into OUT/data/a-b: the second reused the first
    two = {**RAW, "datasets": {"a b": {"synth": TINY}, "a-b": {"synth": {**TINY, "seed": 1}}}}
    with pytest.raises(ConfigError, match="datasets 'a b' and 'a-b' would share the folder"):
        bm.parse_suite(two, Path("."))


def test_changed_synthetic_dataset_settings_are_refused_before_any_output(tmp_path):
    out = tmp_path / "out"
    suite = bm.parse_suite(RAW, tmp_path, "tiny")
    data = bm.prepare_dataset(suite, "pm", out)
    (out / "results.json").write_text("{}")  # as a finished benchmark left it
    assert bm.prepare_dataset(suite, "pm", out) == data  # same settings: reused
    changed = bm.parse_suite({**RAW, "datasets": {"pm": {"synth": {**TINY, "n_train": 24}}}},
                             tmp_path, "tiny")
    with pytest.raises(ConfigError, match=r"holds dataset 'pm' generated with other settings "
                                          r"\(n_train 16 -> 24\)"):
        bm.run_suite(changed, out, progress=False, report=False, log=lambda s: None)
    assert (out / "results.json").read_text() == "{}"
    assert not (out / "runs").exists()
    with pytest.raises(ConfigError, match="n_train 16 -> 24"):
        bm.prepare_dataset(changed, "pm", out)


def test_causal_weights_are_part_of_a_synthetic_datasets_identity(tmp_path):
    """A dataset generated before `causal_weights` existed is the default rule's (reused);
    one generated with other weights is refused, naming the setting."""
    import yaml

    out = tmp_path / "out"
    suite = bm.parse_suite(RAW, tmp_path, "tiny")
    data = bm.prepare_dataset(suite, "pm", out)
    meta_file = data / "dataset.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    assert meta["info"]["config"]["causal_weights"] is None
    del meta["info"]["config"]["causal_weights"]  # as the generator wrote it before
    meta_file.write_text(yaml.safe_dump(meta))
    assert bm.prepare_dataset(suite, "pm", out) == data
    interior = {"calcification": 2.0, "texture": 1.5, "subtlety": 1.0}
    moved = bm.parse_suite({**RAW, "datasets": {"pm": {"synth": {**TINY,
                                                                 "causal_weights": interior}}}},
                           tmp_path, "tiny")
    with pytest.raises(ConfigError, match=r"generated with other settings \(causal_weights "
                                          r"None -> \{'calcification': 2.0"):
        bm.prepare_dataset(moved, "pm", out)
    bad = {**RAW, "datasets": {"pm": {"synth": {**TINY, "causal_weights": {"lobes": 1}}}}}
    with pytest.raises(ConfigError, match="dataset 'pm': causal weights: unknown attribute "
                                          "'lobes'"):
        bm.parse_suite(bad, tmp_path, "tiny")


def test_a_run_shared_by_two_experiments_fills_both_tables(tmp_path):
    """Paper Table 2 lists Table 1's runs under other labels: merged into one run, its
    cells were empty ('–') in every table but the first."""
    raw = {**RAW, "experiments": {
        "a": {"title": "A", "datasets": ["pm"], "methods": [{"name": "erm", "label": "ERM"}]},
        "b": {"title": "B", "datasets": ["pm"],
              "methods": [{"name": "erm", "label": "baseline"}]}}}
    suite = bm.parse_suite(raw, tmp_path, "tiny")
    res = bm.run_suite(suite, tmp_path / "out", progress=False, report=False,
                       log=lambda s: None)
    (run,) = res["runs"]
    assert run["status"] == "done" and run["experiments"] == ["a", "b"]
    acc = f"{run['metrics']['test']['accuracy']:.3f}"
    stored = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    for e, label in zip(suite.experiments, ["ERM", "baseline"], strict=True):
        t = bm.experiment_table(e, stored)
        assert t.rows == [[label, t.rows[0][1], acc]] and t.rows[0][1] != "–"
    # the shipped paper suite: Table 2 and Table 6 share runs with Table 1
    paper = bm.load_suite("paper")
    specs = bm.plan(paper)
    recs = [{"key": s.key, "dataset": s.dataset, "method": s.method, "label": s.label,
             "setting": s.setting, "seed": s.seed, "experiments": s.experiments,
             "roles": {k: [list(x) for x in v] for k, v in s.roles.items()},
             "status": "done", "metrics": {"test": {"accuracy": 0.5, "cam_precision": 0.5}}}
            for s in specs]
    for e in paper.experiments:
        assert all("–" not in row for row in bm.experiment_table(e, recs).rows), e.name


def test_a_resumed_runs_seconds_include_the_epochs_before_the_interruption(tmp_path):
    """results.csv 'seconds' of a run killed and resumed counted only the resumed part."""
    import time

    from causalign.engine.trainer import Trainer

    raw = {**RAW, "defaults": {**RAW["defaults"], "epochs": 2},
           "experiments": {"t1": {"datasets": ["pm"], "methods": ["erm"]}}}
    suite = bm.parse_suite(raw, tmp_path, "tiny")
    out = tmp_path / "out"
    train_epoch, save = Trainer._train_epoch, Trainer._save_state

    def slow(self, *a, **kw):  # a first epoch that takes a while
        time.sleep(2.0)
        return train_epoch(self, *a, **kw)

    def killed(self):
        save(self)
        raise KeyboardInterrupt

    # a context: should the run not be interrupted, a bare MonkeyPatch's undo() was skipped
    # and every later Trainer in the session raised KeyboardInterrupt, which ends pytest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_train_epoch", slow)
        mp.setattr(Trainer, "_save_state", killed)
        with pytest.raises(KeyboardInterrupt):
            bm.run_suite(suite, out, progress=False, report=False, log=lambda s: None)
    (run,) = bm.run_suite(suite, out, progress=False, report=False, log=lambda s: None)["runs"]
    with open(out / run["run_dir"] / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    assert run["status"] == "done" and len(history) == 2  # epochs 1, 2
    epochs = sum(float(row["seconds"]) for row in history)
    assert epochs > 2.0 and run["seconds"] >= epochs
    stored = json.loads((out / run["run_dir"] / "benchmark_run.json").read_text())
    assert stored["seconds"] == run["seconds"] and stored["resumed_after_seconds"] > 2.0


def test_a_run_that_failed_then_succeeds_keeps_no_stale_error_txt(tmp_path):
    bad = {**RAW, "experiments": {"t1": {"datasets": ["pm"], "methods": [
        {"name": "rrr", "set": {"method.lam": -1}}]}}}
    out = tmp_path / "out"
    (run,) = bm.run_suite(bm.parse_suite(bad, tmp_path), out, progress=False, report=False,
                          log=lambda s: None)["runs"]
    assert run["status"] == "failed" and (out / run["run_dir"] / "error.txt").exists()
    fixed = {**RAW, "experiments": {"t1": {"datasets": ["pm"], "methods": [
        {"name": "rrr", "set": {"method.lam": 1}}]}}}
    (run,) = bm.run_suite(bm.parse_suite(fixed, tmp_path), out, progress=False, report=False,
                          log=lambda s: None)["runs"]
    assert run["status"] == "done"
    assert not (out / run["run_dir"] / "error.txt").exists()  # it described the failed try


def test_a_set_that_contradicts_finished_runs_is_refused_before_any_output(tmp_path, capsys):
    """Rerun of a finished OUT with a new --set: every run failed as 'other settings' and
    results.json, tables.md and the report were rewritten with those failures."""
    raw = {**RAW, "experiments": {"t1": {"datasets": ["pm"], "methods": ["erm"]}}}
    suite, out = _write(tmp_path, raw), tmp_path / "out"
    assert main(["benchmark", suite, "--out", str(out), "--no-progress", "--no-report"]) == 0
    capsys.readouterr()
    before = {f: (out / f).read_text() for f in ("results.json", "results.csv", "tables.md")}
    rc, err = _run(capsys, "benchmark", suite, "--out", out, "--no-progress", "--no-report",
                   "--set", "epochs=2")
    assert rc == 2 and err.count("\n") == 1, err
    assert "runs/pm/erm/seed0 holds a run trained without it (epochs 1 -> 2)" in err
    assert {f: (out / f).read_text() for f in before} == before
    # a --set that changes nothing the run depends on (device) still collects it
    assert main(["benchmark", suite, "--out", str(out), "--no-progress", "--no-report",
                 "--set", "device=cpu"]) == 0


def test_a_selection_keeps_each_runs_folder():
    """Two configurations under one label: the first met got `x`, the other `x-<hash>`, so
    `--only B` named B's run `x` and failed on A's finished folder ('other settings')."""
    raw = {**RAW, "experiments": {
        "A": {"datasets": ["pm"], "methods": [{"name": "rrr", "label": "x"}]},
        "B": {"datasets": ["pm"], "methods": [{"name": "rrr", "label": "x",
                                               "set": {"method.lam": 1}}]}}}
    suite = bm.parse_suite(raw, Path("."), "tiny")
    full = {s.config_hash: s.key for s in bm.plan(suite, {"epochs": 2})}
    assert len(set(full.values())) == 2
    for only in (["A"], ["B"]):
        (spec,) = bm.plan(bm.select(suite, experiments=only), {"epochs": 2})
        assert spec.key == full[spec.config_hash], only
    # --seeds: the same folders as the whole suite with those seeds
    (spec,) = bm.plan(bm.select(suite, experiments=["B"], seeds=[3]))
    assert spec.key == next(s.key for s in bm.plan(bm.select(suite, seeds=[3]))
                            if s.config_hash == spec.config_hash)
    # the paper suite: Table 6's plus-minus runs are Table 1's, in Table 1's folders
    paper = bm.load_suite("paper")
    keys = {s.config_hash: s.key for s in bm.plan(paper)}
    t6 = bm.plan(bm.select(paper, experiments=["table6"]))
    assert all(s.key == keys[s.config_hash] for s in t6)
    assert "plus-minus/Ours-causal-align/seed0" in {s.key for s in t6}
