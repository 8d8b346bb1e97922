"""Audit 2026-12-07 (benchmark scripts run as documented): regression tests."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"audit_bench_1207c_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(run: Path, data: Path, method: str = "erm", epochs: int = 5) -> Path:
    """A finished run folder as far as the template checks look: config.yaml + metrics.json."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": str(data), "method": method, "epochs": epochs, "seed": 0}))
    (run / "metrics.json").write_text("{}")
    return run


def test_ppi_vs_erm_refuses_an_erm_template_of_other_data_or_epochs(tiny_data, tmp_path,
                                                                    monkeypatch):
    """--erm-run runs were tabled without a look at what they were trained on: ERM runs of
    another dataset (1 epoch) stood in the ERM column of a table headed with --data's name
    and '3 epochs'. Now the script stops and names both differences."""
    mod = _load("ppi_vs_erm", monkeypatch)
    other = tmp_path / "other_data"
    _fake_run(tmp_path / "erm_seed0", other, epochs=5)
    with pytest.raises(SystemExit) as exit_:
        mod.run_one(tiny_data, tmp_path / "runs", "erm", 0, 12, {},
                    template=str(tmp_path / "erm_seed{seed}"))
    msg = str(exit_.value.code)
    assert "--erm-run" in msg and "epochs 5 -> 12" in msg and f"data {other}" in msg
    assert not (tmp_path / "runs").exists()


def test_erm_template_check_accepts_a_copy_of_the_data(tiny_data, tmp_path, monkeypatch):
    """A run of the same length on a copy of --data (the demo's folder moved) is accepted."""
    reuse = _load("_reuse", monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    run = _fake_run(tmp_path / "erm_seed0", copy, epochs=12)
    reuse.check_template_run(run, "erm", 12, tiny_data, "--erm-run")  # no SystemExit
    with pytest.raises(SystemExit, match="method ppi -> erm"):
        reuse.check_template_run(_fake_run(tmp_path / "ppi", tiny_data, "ppi", 12), "erm", 12,
                                 tiny_data, "--erm-run")




def _exit_text(exc: pytest.ExceptionInfo, capsys) -> str:
    return str(exc.value.code) + capsys.readouterr().err


@pytest.mark.parametrize(("name", "argv", "needle"), [
    ("feature_reliance", ["{tmp}/missing", "--out", "{tmp}/o/fr.json"],
     "error: {tmp}/missing: run folder does not exist"),
    ("bench_faithfulness", ["--run-template", "{tmp}/missing{seed}", "--seeds", "1",
                            "--out", "{tmp}/o"],
     "{tmp}/missing0: no metrics.json (--run-template names finished runs)"),
    ("ppi_vs_erm", ["--data", "{tmp}/missing", "--seeds", "1", "--epochs", "1",
                    "--runs", "{tmp}/runs", "--out", "{tmp}/o"],
     "error: {tmp}/missing: dataset folder does not exist"),
    ("hier_ablation", ["--variants", "bogus", "--work", "{tmp}/work", "--out", "{tmp}/o/h.json"],
     "--variants: unknown bogus; known: none, flat, hier, hier-noalign"),
    ("causal_align_grad_in_training", ["--from-run", "{tmp}/missing", "--out", "{tmp}/o"],
     "error: {tmp}/missing: run folder does not exist"),
])
def test_benchmark_user_errors_are_one_line(name, argv, needle, tmp_path, monkeypatch, capsys):
    """A missing run or dataset folder was a CausalignError / FileNotFoundError traceback in
    these scripts (hier_ablation: a KeyError after generating its data); now one line,
    non-zero, and nothing written."""
    mod = _load(name, monkeypatch)
    argv = [v.replace("{tmp}", str(tmp_path)) for v in argv]
    with pytest.raises(SystemExit) as exit_:
        mod.main(argv)
    assert exit_.value.code not in (0, None)
    text = _exit_text(exit_, capsys)
    assert needle.replace("{tmp}", str(tmp_path)) in text
    assert "Traceback" not in text
    assert not (tmp_path / "o").exists() and not (tmp_path / "work").exists()


def test_cross_site_seeds_refuses_a_foreign_result_in_one_line(tmp_path, monkeypatch, capsys):
    """Another script's JSON (feature_reliance's) was a KeyError 'seed' traceback."""
    mod = _load("cross_site_seeds", monkeypatch)
    other = tmp_path / "fr.json"
    other.write_text('{"runs": []}')
    monkeypatch.setattr(sys, "argv", ["cross_site_seeds.py", str(other),
                                      "--out", str(tmp_path / "o" / "s.json")])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert f"{other}: not a cross_site.py result (no seed" in _exit_text(exit_, capsys)
    assert not (tmp_path / "o").exists()


def test_bench_dataset_open_refuses_a_missing_folder_in_one_line(tmp_path, monkeypatch,
                                                                 capsys):
    """A missing DATA ran every child to its traceback, then raised CalledProcessError."""
    mod = _load("bench_dataset_open", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bench_dataset_open.py", str(tmp_path / "missing"),
                                      "--repeats", "1"])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code == 2
    assert f"{tmp_path / 'missing'}: dataset folder does not exist" in capsys.readouterr().err


def test_hier_ablation_states_its_settings_and_whether_it_finished(tmp_path, monkeypatch):
    """The JSON, rewritten after every run, had no mark of a stopped script (a file with one
    run of six read like a finished table) and did not record --hier-set, the settings the
    README's 'earlier defaults' ablation was run with."""
    mod = _load("hier_ablation", monkeypatch)
    monkeypatch.setattr(mod, "synth_or_reuse", lambda *a, **k: None)
    calls: list[str] = []

    def fake_run(data, runs, name, method, args, seed, epochs, threads):
        if len(calls) == 1 and stop:
            raise KeyboardInterrupt
        calls.append(name)
        return {"test": {"accuracy": 0.5, "cam_precision": 0.1}, "best_epoch": 1}

    monkeypatch.setattr(mod, "run_one", fake_run)
    out = tmp_path / "h.json"
    argv = ["--work", str(tmp_path / "w"), "--out", str(out), "--seeds", "1",
            "--variants", "none,hier", "--no-sweep", "--hier-set", "balance=0"]
    stop = True
    with pytest.raises(KeyboardInterrupt):
        mod.main(argv)
    part = json.loads(out.read_text())
    assert part["complete"] is False and part["runs_done"] == 1 and part["runs_planned"] == 2
    assert part["hier_set"] == {"balance": 0}
    assert out.with_suffix(".md").read_text().startswith("INCOMPLETE: 1 of 2 runs")
    stop, calls[:] = False, []
    mod.main(argv)
    whole = json.loads(out.read_text())
    assert whole["complete"] is True and whole["runs_done"] == 2
    assert whole["seeds"] == 1 and whole["variants"] == ["none", "hier"]
    assert "INCOMPLETE" not in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(("name", "argv"), [
    ("ppi_vs_erm", ["--synth-dir", "{tmp}/data", "--n-train", "16", "--n-val", "8",
                    "--n-test", "8", "--seeds", "1", "--epochs", "1", "--runs", "{tmp}/runs",
                    "--out", "{tmp}/o"]),
    ("ppi_variants", ["--data", "{tmp}/data", "--erm-run", "{tmp}/erm{seed}",
                      "--runs", "{tmp}/runs", "--out", "{tmp}/o"]),
    ("cross_site", ["--sites", "2", "--n-train", "16", "--n-val", "8", "--n-test", "16",
                    "--size", "32", "--epochs", "1", "--work", "{tmp}/work", "--out", "{tmp}/o"]),
])
def test_ppi_set_typo_is_refused_before_anything_is_trained(name, argv, tmp_path,
                                                            monkeypatch, capsys):
    """`--set method.fracton=0.25` was reported only when the first PPI run started, after
    ERM's run of seed 0 / site 0 had been trained (ppi_vs_erm at its default size: a full
    12-epoch ERM run). Now the scripts stop before making data or runs."""
    mod = _load(name, monkeypatch)
    argv = [v.replace("{tmp}", str(tmp_path)) for v in argv]
    with pytest.raises(SystemExit) as exit_:
        mod.main([*argv, "--set", "method.fracton=0.25"])
    assert "unknown parameter(s) fracton for method 'ppi'" in _exit_text(exit_, capsys)
    assert list(tmp_path.iterdir()) == []


def test_ppi_override_check_accepts_the_documented_set(monkeypatch):
    reuse = _load("_reuse", monkeypatch)
    params = reuse.check_overrides("ppi", {"method.fraction": 0.25, "method.mask": "box"})
    assert params["fraction"] == 0.25 and params["mask"] == "box"


def test_cross_site_seeds_refuses_results_of_other_settings(tmp_path, monkeypatch, capsys):
    """Seed results of other --epochs / --set were averaged under the first one's label
    ('8 epochs' over an 8-epoch and a 4-epoch result, exit 0)."""
    mod = _load("cross_site_seeds", monkeypatch)
    figs = {"mean": 0.6, "in_site_mean": 0.7, "cross_site_mean": 0.5, "gap_in_minus_cross": 0.2}
    paths = []
    for seed, epochs in ((0, 8), (1, 4)):
        r = {"seed": seed, "sites": 2, "epochs": epochs, "shortcut": "none",
             "ppi_overrides": {"method.fraction": 0.25},
             "sizes": {"train": 800, "val": 200, "test": 400, "per_site_test": [9 + seed, 8]},
             "erm": {"auc": [[0.7, 0.6], [0.5, 0.8]], **figs},
             "ppi": {"auc": [[0.7, 0.6], [0.5, 0.8]], **figs}}
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "o" / "seeds.json"
    monkeypatch.setattr(sys, "argv", ["cross_site_seeds.py", *map(str, paths), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert "seed 1 was run with other settings than seed 0 (epochs 8 vs 4)" in _exit_text(
        exit_, capsys)
    assert not out.exists()
    # per-site test sizes differ by seed (the data's own draw): not a difference
    paths[1].write_text(paths[1].read_text().replace('"epochs": 4', '"epochs": 8'))
    mod.main()
    assert json.loads(out.read_text())["epochs"] == 8


def test_bench_faithfulness_refuses_template_runs_of_other_settings(tiny_data, tmp_path,
                                                                   monkeypatch, capsys):
    """--run-template runs of different data / epochs were pooled into one table: seed 0
    (1 epoch, data32) and seed 1 (2 epochs, data32b) gave faithfulness.json with data
    'data32', epochs 2, exit 0."""
    from types import SimpleNamespace

    from causalign.data.synth import SynthConfig, generate

    mod = _load("bench_faithfulness", monkeypatch)
    generate(tmp_path / "other_data", SynthConfig(n_train=16, n_val=8, n_test=8, size=32,
                                                  seed=9))
    stored = {0: (tiny_data, 1), 1: (tmp_path / "other_data", 2)}
    for seed in stored:
        (tmp_path / f"r{seed}").mkdir()
        (tmp_path / f"r{seed}" / "metrics.json").write_text(
            json.dumps({"test": {"accuracy": 0.5, "auc": 0.5}}))

    def fake_load_run(run, device="cpu"):
        data, epochs = stored[int(str(run)[-1])]
        return SimpleNamespace(method="erm", epochs=epochs), None, None, data

    monkeypatch.setattr(mod, "load_run", fake_load_run)
    monkeypatch.setattr(mod, "deletion_table", lambda model, method, ds, names, fractions,
                        seed: {"wbp": {f"{f:g}": 0.1 for f in fractions}})
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--run-template", str(tmp_path / "r{seed}"), "--seeds", "2",
                  "--threads", "1", "--out", str(tmp_path / "o")])
    text = _exit_text(exit_, capsys)
    assert f"{tmp_path / 'r1'}: not a run of seed 0's settings (epochs 1 -> 2; data" in text
    assert not (tmp_path / "o").exists()


def _crash_writing(monkeypatch, target: Path) -> None:
    """Opening ``target`` itself for writing truncates it, then fails (a full disk)."""
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        if self == target and "w" in mode:
            real_open(self, mode, *args, **kwargs).close()
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def test_bench_startup_scale_writes_its_json_atomically(tmp_path, monkeypatch):
    """--out was written in place: a failed write left an empty file for the last result."""
    mod = _load("bench_startup_scale", monkeypatch)
    root = tmp_path / "data"
    root.mkdir()
    (root / "manifest.csv").write_text("")
    monkeypatch.setattr(mod, "run_phases", lambda root, ae_epochs: {"load": {"seconds": 1.0}})
    out = tmp_path / "startup.json"
    out.write_text('{"previous": true}\n')
    _crash_writing(monkeypatch, out)
    monkeypatch.setattr(sys, "argv", ["bench_startup_scale.py", str(root), "--out", str(out)])
    mod.main()
    assert json.loads(out.read_text()) == {"load": {"seconds": 1.0}}


def test_bench_dataset_open_writes_its_json_atomically(tmp_path, monkeypatch):
    mod = _load("bench_dataset_open", monkeypatch)
    (tmp_path / "data").mkdir()

    class Done:
        stdout = "0.5 0.25 16\n"
        stderr = ""
        returncode = 0

    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: Done())
    out = tmp_path / "open.json"
    out.write_text('{"previous": true}\n')
    _crash_writing(monkeypatch, out)
    monkeypatch.setattr(sys, "argv", ["bench_dataset_open.py", str(tmp_path / "data"),
                                      "--repeats", "1", "--out", str(out)])
    mod.main()
    assert json.loads(out.read_text())["train_samples"] == 16
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["bench_faithfulness", "cross_site"])
def test_benchmark_figures_are_written_atomically(name, tmp_path, monkeypatch):
    """faithfulness_curves.png and cross_site.png were saved in place, after the JSON: a
    save that failed halfway left a broken PNG beside a whole result."""
    import numpy as np
    from matplotlib.figure import Figure

    mod = _load(name, monkeypatch)
    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if isinstance(fname, (str, Path)):  # straight to the file: half of it, then a failure
            Path(fname).write_bytes(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    png = tmp_path / "figure.png"
    if name == "bench_faithfulness":
        fractions = (0.01, 0.1)
        mod.curves({"wbp": {f"{f:g}": {"mean": 0.2, "std": 0.0} for f in fractions},
                    mod.RANDOM: {f"{f:g}": {"mean": 0.1, "std": 0.0} for f in fractions}},
                   fractions, png)
    else:
        m = np.array([[0.7, 0.6], [0.5, 0.8]])
        mod.heatmaps({"+PPI": m, "No PPI": m}, png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(("name", "argv", "needle"), [
    ("bench_sizes", ["--models", "cnn7", "--sizes", "32", "--methods", "causal_align",
                     "--skip", "eval", "--warmup", "0"],
     "unknown method 'causal_align'; valid: "),
    ("bench_memory", ["--methods", "bogus", "--sizes", "32", "--batches", "2,4"],
     "unknown method 'bogus'; valid: "),
    ("bench_gpu", ["--methods", "erm,bogus"], "unknown method 'bogus'; valid: "),
    ("bench_gpu", ["--model", "bogus"], "unknown model 'bogus'; valid: "),
    ("bench_saliency", ["--models", "bogus", "--repeats", "1"], "unknown model 'bogus'"),
    ("bench_eval_hotpath", ["--saliency", "bogus", "--n", "4", "--size", "32"],
     "unknown saliency method 'bogus'"),
    ("bench_erm", ["--device", "bogus"], "error: device must be auto, cpu or cuda"),
])
def test_timing_scripts_refuse_unknown_names_in_one_line(name, argv, needle, tmp_path,
                                                         monkeypatch, capsys):
    """bench_sizes / bench_memory measured an unknown --methods entry, stored its error as
    that row and exited 0 with a result file; bench_gpu said 'skipped' (exit 0) on a CPU
    machine whatever the typo; bench_saliency, bench_eval_hotpath and bench_erm raised
    tracebacks. Now: one line, non-zero, no result."""
    mod = _load(name, monkeypatch)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        mod.main()
    assert exit_.value.code not in (0, None)
    text = _exit_text(exit_, capsys)
    assert needle in text and "Traceback" not in text
    assert not out.exists()


@pytest.mark.parametrize(("name", "argv", "needle"), [
    ("ppi_vs_erm", ["--seeds", "0", "--data", "{tmp}/data", "--runs", "{tmp}/runs"],
     "--seeds must be >= 1, got 0"),
    ("ppi_variants", ["--seeds", "0", "--data", "{tmp}/data", "--erm-run", "{tmp}/e{seed}",
                      "--runs", "{tmp}/runs"], "--seeds must be >= 1, got 0"),
    ("bench_faithfulness", ["--seeds", "0", "--run-template", "{tmp}/r{seed}"],
     "--seeds must be >= 1, got 0"),
    ("hier_ablation", ["--seeds", "0", "--work", "{tmp}/work", "--size", "32", "--n-train", "16",
                       "--n-val", "8", "--n-test", "8", "--no-sweep"],
     "--seeds must be >= 1, got 0"),
    ("hier_ablation", ["--hier-set", "balance", "--work", "{tmp}/work"],
     "--hier-set 'balance': expected KEY=VALUE"),
    ("hier_ablation", ["--hier-set", "balanse=0", "--work", "{tmp}/work"],
     "unknown parameter(s) balanse for method 'hier-align'"),
])
def test_seed_count_and_hier_set_are_checked_first(name, argv, needle, tmp_path, monkeypatch,
                                                   capsys):
    """--seeds 0 was a StatisticsError (ppi_vs_erm, ppi_variants) or IndexError
    (bench_faithfulness) traceback, and an empty 'complete' table from hier_ablation (exit
    0); --hier-set without '=' a ValueError traceback, and an unknown hier-align key was
    refused only after the data and the ERM runs were made."""
    mod = _load(name, monkeypatch)
    argv = [v.replace("{tmp}", str(tmp_path)) for v in argv]
    with pytest.raises(SystemExit) as exit_:
        mod.main([*argv, "--out", str(tmp_path / "o" / "r.json")])
    assert exit_.value.code not in (0, None)
    assert needle in _exit_text(exit_, capsys)
    assert list(tmp_path.iterdir()) == []


def test_cf_localisation_refuses_more_labels_than_runs(tmp_path, monkeypatch, capsys):
    """Two --labels for one run: the second was dropped and the script went on (exit 0);
    counterfactual_solvers.py already refused the same mismatch."""
    mod = _load("cf_localisation", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        mod.main([str(tmp_path / "missing"), "--labels", "A", "B",
                  "--out", str(tmp_path / "cf.json")])
    assert "2 labels for 1 runs" in _exit_text(exit_, capsys)
