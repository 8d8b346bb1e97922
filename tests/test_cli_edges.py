"""Command line and engine edge cases: edited or damaged run folders, resume bookkeeping,
out-of-range settings, datasets without a test split, output paths that are folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import CausalignError

TINY = ["--set", "width=4", "--set", "batch_size=16", "--set", "deletion_fractions=[0.1]"]


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_user_error(rc, err, needle):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def _cfg() -> TrainConfig:
    return TrainConfig(epochs=1, width=4, batch_size=16, deletion_fractions=[0.1])


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One finished 1-epoch run, copied by each test that changes it."""
    run = tmp_path_factory.mktemp("edges") / "run"
    train(tiny_data, _cfg(), run, progress=False)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


@pytest.fixture(scope="module")
def no_test_data(tiny_data, tmp_path_factory):
    """tiny_data without its test split (allowed: training reports val metrics only)."""
    root = tmp_path_factory.mktemp("notest") / "data"
    shutil.copytree(tiny_data, root)
    lines = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(
        [lines[0]] + [ln for ln in lines[1:] if ln.split(",")[1] != "test"]) + "\n")
    return root


@pytest.fixture(scope="module")
def no_test_run(no_test_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("notest_run") / "run"
    train(no_test_data, _cfg(), run, progress=False)
    return run


# ---------------------------------------------------------------- edited config.yaml


@pytest.mark.parametrize(("text", "needle"), [
    ("APPEND", "unknown setting(s) foo (edited, or written by another causalign version?)"),
    ("method: [erm\n", "not valid YAML"),
    ("", "not a run configuration (expected a mapping of settings, got nothing)"),
    ("- a\n", "not a run configuration (expected a mapping of settings, got list)"),
    ("REPLACE_EPOCHS", "epochs: expected int, got 'many'"),
])
def test_an_edited_run_config_is_one_line_for_evaluate_and_resume(run_copy, tiny_data, capsys,
                                                                  text, needle):
    # Before: TypeError (unknown key), yaml ScannerError/ParserError, AttributeError ('list'
    # has no 'get') tracebacks; an empty file silently meant "all defaults" and ended in a
    # load_state_dict traceback (resume) or "dataset.yaml missing (. is not a dataset)".
    cfg = run_copy / "config.yaml"
    if text == "APPEND":
        cfg.write_text(cfg.read_text() + "foo: 1\n")
    elif text == "REPLACE_EPOCHS":
        cfg.write_text(cfg.read_text().replace("epochs: 1\n", "epochs: many\n"))
    else:
        cfg.write_text(text)
    rc, out, err = _run(capsys, "evaluate", run_copy, "--split", "val")
    _assert_user_error(rc, err, f"{cfg}: {needle}")
    assert out == ""
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume",
                      "--no-progress", *TINY)
    _assert_user_error(rc, err, f"{cfg}: {needle}")


def test_a_run_config_without_its_dataset_path_asks_for_data(run_copy, capsys):
    # Before: Path("") is ".", so the current folder was taken as the run's dataset.
    cfg = run_copy / "config.yaml"
    raw = yaml.safe_load(cfg.read_text())
    del raw["data"]
    cfg.write_text(yaml.safe_dump(raw))
    rc, _, err = _run(capsys, "evaluate", run_copy, "--split", "val")
    _assert_user_error(rc, err, "config.yaml: names no dataset (pass --data DIR)")


def test_resume_after_config_edited_to_another_model_is_one_line(run_copy, tiny_data, capsys):
    # width 4 -> 8 in config.yaml: the checkpoint no longer fits (was a RuntimeError with
    # dozens of "size mismatch" lines).
    cfg = run_copy / "config.yaml"
    cfg.write_text(cfg.read_text().replace("width: 4\n", "width: 8\n"))
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, "checkpoint.pt: does not fit the model that")
    assert "parameter shapes differ" in err


def test_resume_from_a_weights_only_checkpoint_is_one_line(run_copy, tiny_data, capsys):
    # best.pt copied over checkpoint.pt (digest too): was KeyError 'optimizer'.
    for suffix in ("", ".sha256"):
        shutil.copy(run_copy / f"best.pt{suffix}", run_copy / f"checkpoint.pt{suffix}")
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, "checkpoint.pt: not a training checkpoint (no best_epoch")


def test_evaluate_a_checkpoint_without_model_weights_is_one_line(run_copy, capsys):
    import torch

    from causalign.io import atomic_torch_save

    atomic_torch_save(run_copy / "best.pt", torch.zeros(3))  # valid digest, wrong content
    rc, _, err = _run(capsys, "evaluate", run_copy, "--split", "val")
    _assert_user_error(rc, err, "best.pt: not a causalign checkpoint (no model weights)")


def test_a_file_given_as_run_folder_says_so(tmp_path, capsys):
    f = tmp_path / "run.pt"
    f.write_text("x")
    rc, _, err = _run(capsys, "evaluate", f)
    _assert_user_error(rc, err, f"{f}: is a file, not a run folder")


# ---------------------------------------------------------------- resume bookkeeping


@pytest.mark.parametrize("damage", ["deleted", "extra_row"])
def test_resuming_a_run_rewrites_history_csv_from_the_checkpoint(run_copy, tiny_data, capsys,
                                                                  damage):
    # A kill between history.csv and checkpoint.pt leaves a row the checkpoint lacks; a
    # deleted file stayed deleted. Resuming a finished run trains no epoch, so neither was
    # ever repaired.
    hist = run_copy / "history.csv"
    good = hist.read_text()
    if damage == "deleted":
        hist.unlink()
    else:
        last = good.strip().splitlines()[-1]
        hist.write_text(good + last.replace("1,", "2,", 1) + "\n")
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err
    assert hist.read_text() == good
    rows = [ln.split(",")[0] for ln in good.strip().splitlines()[1:]]
    assert rows == ["1"]


# ---------------------------------------------------------------- settings out of range


@pytest.mark.parametrize(("setting", "needle"), [
    ("seed=1180591620717411303424", "seed must be <= 18446744073709551615"),
    ("threads=99999999999", "threads must be <= 2147483647"),
    ("width=99999999999999999999", "width must be <= 9223372036854775807"),
])
def test_integers_past_torchs_range_are_rejected(tiny_data, tmp_path, capsys, setting, needle):
    # Before: "ValueError: Overflow when unpacking long" tracebacks from torch.manual_seed,
    # torch.set_num_threads and nn.Conv2d.
    rc, _, err = _run(capsys, "train", tiny_data, "--out", tmp_path / "r", "--epochs", "1",
                      "--no-progress", "--set", setting)
    _assert_user_error(rc, err, needle)
    assert not (tmp_path / "r").exists()


def test_the_largest_torch_seed_is_accepted():
    # the bound is torch's own: the largest seed validate() lets through must seed a generator
    cfg = TrainConfig(seed=2**64 - 1)
    cfg.validate()
    assert torch.Generator().manual_seed(cfg.seed).initial_seed() == 2**64 - 1
    with pytest.raises(CausalignError, match="seed"):
        TrainConfig(seed=2**64).validate()


# ---------------------------------------------------------------- no test split


def test_train_without_a_test_split_does_not_call_val_numbers_test(no_test_run, no_test_data,
                                                                   tmp_path, capsys):
    # Before: "erm: test accuracy 0.417, …" printed the val metrics under the name "test".
    run = tmp_path / "run"
    shutil.copytree(no_test_run, run)
    rc, out, err = _run(capsys, "train", no_test_data, "--out", run, "--resume",
                        "--no-progress")
    assert rc == 0, err
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert out.startswith(f"erm: val accuracy {val['accuracy']:.3f}")
    assert "(no test split)" in out and "test accuracy" not in out


def test_report_on_runs_without_a_test_split_draws_its_figures(no_test_run, tmp_path):
    # Before: the CAM grid and counterfactual figures were replaced by "failed: split
    # 'test' is empty" paragraphs, and the table's empty cells had no explanation.
    from causalign.engine.benchmark import Experiment, MethodSpec, experiment_table
    from causalign.report.html import write_report

    out = tmp_path / "bench"
    shutil.copytree(no_test_run, out / "runs" / "notest" / "erm" / "seed0")
    metrics = json.loads((no_test_run / "metrics.json").read_text())
    rec = {"key": "notest/erm/seed0", "dataset": "notest", "method": "erm", "label": "erm",
           "setting": "default", "seed": 0, "experiments": ["t"], "config_hash": "x",
           "run_dir": "runs/notest/erm/seed0", "status": "done", "metrics": metrics}
    exp = {"name": "t", "title": "t", "rows": "method", "metrics": ["test.accuracy"],
           "datasets": ["notest"], "methods": [{"name": "erm", "label": "erm", "set": {}}],
           "settings": {"default": {}}, "seeds": [0], "reference": None}
    (out / "results.json").write_text(json.dumps({"suite": "s", "description": "",
                                                  "experiments": [exp], "runs": [rec]}))
    page = write_report(out).read_text()
    assert "class='failed'" not in page
    assert (out / "figures" / "cam_grid_notest.png").stat().st_size > 1000
    assert (out / "figures" / "counterfactuals_notest.png").stat().st_size > 1000
    table = experiment_table(Experiment("t", "t", ["notest"], [MethodSpec("erm", "erm")], [0],
                                        {"default": {}}, "method", ["test.accuracy"]), [rec])
    assert "notest/erm/seed0: no test split: test metrics omitted" in table.notes


# ---------------------------------------------------------------- outputs


def test_benchmark_with_a_bad_set_key_fails_before_writing_anything(tmp_path, capsys):
    # Before: every run was recorded as failed, and results.json/tables.md/report.html of
    # an existing OUT were overwritten with those failures.
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "s", "datasets": {"d": {"synth": {"size": 32, "n_train": 8, "n_val": 4,
                                                 "n_test": 4}}},
        "experiments": {"t": {"datasets": ["d"], "methods": ["erm"]}}}))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "benchmark", suite, "--out", out, "--no-progress",
                      "--set", "learning_rate=1")
    _assert_user_error(rc, err, "--set: unknown config key 'learning_rate'")
    assert not out.exists()


def test_evaluate_out_that_is_a_folder_fails_before_evaluating(finished_run, tmp_path, capsys):
    # Before: the split was evaluated, then os.replace failed naming the temporary file
    # ("/x/.out.ab12.tmp → /x/out: Is a directory").
    folder = tmp_path / "metrics"
    folder.mkdir()
    rc, out, err = _run(capsys, "evaluate", finished_run, "--split", "val", "--out", folder)
    _assert_user_error(rc, err, f"--out {folder}: is a folder")
    assert out == "" and "evaluating" not in err


def test_atomic_write_onto_a_folder_names_the_folder(tmp_path):
    from causalign.io import atomic_write_text

    with pytest.raises(IsADirectoryError) as info:
        atomic_write_text(tmp_path, "x")
    assert info.value.filename == str(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_stored_config_errors_are_causalign_errors(run_copy):
    from causalign.engine.trainer import stored_config

    (run_copy / "config.yaml").write_text("lr: -1\n")
    with pytest.raises(CausalignError, match="lr must be a finite number > 0"):
        stored_config(run_copy)


# ---------------------------------------------------------------- devices, --config, --out


@pytest.mark.parametrize("command", [["evaluate", "{run}"], ["explain", "{run}", "--out",
                                                              "{tmp}/ex"],
                                     ["bench", "step", "--steps", "1"]])
def test_an_unknown_device_is_one_line(finished_run, tmp_path, capsys, command):
    # Before: torch.device("bogus") → RuntimeError traceback listing torch's backends.
    argv = [a.format(run=finished_run, tmp=tmp_path) for a in command]
    rc, _, err = _run(capsys, *argv, "--device", "bogus")
    _assert_user_error(rc, err, "device must be auto, cpu or cuda[:k], got 'bogus'")


def test_a_cuda_index_past_the_devices_is_one_line(monkeypatch):
    import torch

    from causalign.engine.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CausalignError, match=r"device 'cuda:3': this machine has 1 CUDA"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_a_runs_config_yaml_works_as_config(finished_run, tiny_data, tmp_path, capsys):
    # Before: "error: unknown config key 'data'": the resolved config.yaml a run writes
    # could not be given back to --config to repeat the run.
    run = tmp_path / "again"
    rc, _, err = _run(capsys, "train", tiny_data, "--config", finished_run / "config.yaml",
                      "--out", run, "--no-progress")
    assert rc == 0, err
    again = yaml.safe_load((run / "config.yaml").read_text())
    first = yaml.safe_load((finished_run / "config.yaml").read_text())
    # the settings repeat; the provenance is of each run: its causalign_commit is the
    # checkout's HEAD when it ran, and a commit between the two runs (during the suite)
    # failed this test
    assert again.pop("environment").keys() == first.pop("environment").keys()
    assert again == first


def test_training_into_a_finished_run_without_checkpoint_is_refused(run_copy, tiny_data,
                                                                     capsys):
    # Before: with checkpoint.pt deleted (evaluate needs only best.pt), `train --out RUN`
    # silently replaced the finished run's config, history, best.pt and metrics.json.
    for name in ("checkpoint.pt", "checkpoint.pt.sha256"):
        (run_copy / name).unlink()
    before = (run_copy / "metrics.json").read_text()
    for extra in ([], ["--resume"]):
        rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--method", "oracle",
                          "--no-progress", *TINY, *extra)
        _assert_user_error(rc, err, "already holds a finished run (metrics.json) without "
                                    "checkpoint.pt to resume from")
    assert (run_copy / "metrics.json").read_text() == before
    assert "method: erm" in (run_copy / "config.yaml").read_text()


@pytest.mark.parametrize(("argv", "needle"), [
    (["counterfactual", "{run}", "--lr", "inf"], "--lr must be finite, got inf"),
    (["counterfactual", "{run}", "--alpha", "inf"], "--alpha must be finite, got inf"),
    (["counterfactual", "{run}", "--eps", "inf"], "--eps must be finite, got inf"),
    (["causal", "ccce", "{data}", "--tol", "-1"], "--tol must be a finite number >= 0"),
    (["causal", "pc", "{run}", "--alpha", "2"], "--alpha must lie in (0, 1), got 2.0"),
    (["causal", "pc", "{run}", "--components", "0"], "--components must be >= 1, got 0"),
])
def test_option_values_out_of_range_are_one_line(finished_run, tiny_data, tmp_path, capsys,
                                                 argv, needle):
    # Before: counterfactual --lr inf ran, every sample "diverged", and summary.json held
    # "lr": Infinity (not JSON); ccce --tol -1 printed a table; pc --alpha 2 ended in
    # causal-learn's AssertionError traceback; pc --components 0 checked X -> A -> Y
    # without any X.
    argv = [a.format(run=finished_run, data=tiny_data) for a in argv]
    out = tmp_path / "o"
    rc, _, err = _run(capsys, *argv, *(["--out", out] if argv[0] == "counterfactual" else []))
    _assert_user_error(rc, err, needle)
    assert not out.exists() and not (finished_run / "pc").exists()


@pytest.mark.parametrize(("seeds", "needle"), [
    (["a"], "experiment 't': seeds must be whole numbers >= 0, got 'a'"),
    ([1.5], "experiment 't': seeds must be whole numbers >= 0, got 1.5"),
    ([-1], "experiment 't': seeds must be whole numbers >= 0, got -1"),
])
def test_suite_seeds_must_be_whole_numbers(seeds, needle):
    # Before: int("a") was a ValueError traceback and int(1.5) silently ran seed 1.
    from causalign.engine.benchmark import parse_suite
    from causalign.errors import ConfigError

    raw = {"datasets": {"d": {"synth": {"size": 32}}},
           "experiments": {"t": {"datasets": ["d"], "methods": ["erm"], "seeds": seeds}}}
    with pytest.raises(ConfigError) as info:
        parse_suite(raw, Path("."))
    assert needle in str(info.value)


def test_benchmark_negative_seed_fails_before_writing_anything(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "datasets": {"d": {"synth": {"size": 32, "n_train": 8, "n_val": 4, "n_test": 4}}},
        "experiments": {"t": {"datasets": ["d"], "methods": ["erm"]}}}))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "benchmark", suite, "--out", out, "--seeds", "0,-1")
    _assert_user_error(rc, err, "--seeds must be >= 0, got '0,-1'")
    assert not out.exists()


def test_a_run_with_invalid_settings_gets_the_error_txt_the_summary_points_to(tmp_path,
                                                                            capsys):
    # Before: "(tracebacks: OUT/runs/<run>/error.txt)" named a file that was never written
    # for a run whose suite `set:` was invalid.
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "datasets": {"d": {"synth": {"size": 32, "n_train": 8, "n_val": 4, "n_test": 4}}},
        "experiments": {"t": {"datasets": ["d"],
                              "methods": [{"name": "erm", "set": {"lr": "abc"}}]}}}))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "benchmark", suite, "--out", out, "--no-progress", "--no-report")
    _assert_user_error(rc, err, "1 of 1 runs failed, e.g. d/erm/seed0: ConfigError: lr: "
                                "expected float, got 'abc'")
    assert "lr: expected float, got 'abc'" in (out / "runs/d/erm/seed0/error.txt").read_text()


@pytest.mark.parametrize("where", ["config", "suite", "run"])
def test_a_binary_yaml_file_is_one_line(run_copy, tiny_data, tmp_path, capsys, where):
    # Before: UnicodeDecodeError tracebacks (it is a ValueError, not a YAML or OS error).
    binary = b"\xff\xfe\x00\x01not yaml"
    if where == "config":
        path = tmp_path / "c.yaml"
        path.write_bytes(binary)
        argv = ["train", tiny_data, "--config", path, "--out", tmp_path / "r"]
    elif where == "suite":
        path = tmp_path / "s.yaml"
        path.write_bytes(binary)
        argv = ["benchmark", path, "--out", tmp_path / "b"]
    else:
        path = run_copy / "config.yaml"
        path.write_bytes(binary)
        argv = ["evaluate", run_copy]
    rc, _, err = _run(capsys, *argv)
    _assert_user_error(rc, err, f"{path}: not valid YAML ('utf-8' codec can't decode")


def test_resume_on_another_dataset_is_refused_but_a_moved_one_is_accepted(run_copy, tiny_data,
                                                                          tmp_path, capsys):
    # Before: `train OTHER --out RUN --resume` continued and finally evaluated the run on
    # OTHER, overwriting metrics.json, while config.yaml still named the first dataset.
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    manifest = other / "manifest.csv"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))
    before = (run_copy / "metrics.json").read_text()
    rc, _, err = _run(capsys, "train", other, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, f"--resume continues the stored run, but {other} is not the "
                                f"dataset it was trained on")
    assert (run_copy / "metrics.json").read_text() == before
    # an exact copy of the stored dataset is the same data
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    rc, _, err = _run(capsys, "train", copy, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err
    # the stored dataset no longer exists (moved): its copy may continue it, another not
    cfg = run_copy / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(tiny_data.resolve()), str(tmp_path / "gone")))
    rc, _, err = _run(capsys, "train", copy, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err
    rc, _, err = _run(capsys, "train", other, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, "is not the dataset it was trained on")
    # a run from before the digests: a moved dataset could be any, as before
    cfg.write_text("".join(line for line in cfg.read_text().splitlines(keepends=True)
                           if not line.startswith(("data_digest:", "data_content_digest:"))))
    rc, _, err = _run(capsys, "train", other, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_resume_accepts_the_dataset_with_other_line_endings(run_copy, tiny_data, tmp_path,
                                                            capsys, ending):
    """dataset.yaml and manifest.csv saved with CRLF (opened and saved on Windows, git's
    autocrlf) are the same dataset: --resume refused them as another one. An edited CRLF
    manifest is still refused."""
    copy = tmp_path / "crlf"
    shutil.copytree(tiny_data, copy)
    for name in ("dataset.yaml", "manifest.csv"):
        path = copy / name
        path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", ending))
    if ending == b"\r\n":
        assert b"\r\n" in (copy / "manifest.csv").read_bytes()
    rc, _, err = _run(capsys, "train", copy, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err
    manifest = copy / "manifest.csv"
    manifest.write_bytes(b"".join(manifest.read_bytes().splitlines(keepends=True)[:-1]))
    rc, _, err = _run(capsys, "train", copy, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, "is not the dataset it was trained on")


def test_resume_on_a_dataset_regenerated_at_the_same_path_is_refused(tiny_data, tmp_path,
                                                                     capsys):
    """Regenerated in place (another seed, fewer images), the dataset passed the path check:
    the run went on with a warm-start cache and history of other images (state audit)."""
    from causalign.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "run"
    common = ["--set", "width=4", "--set", "threads=1", "--set", "eval_saliency=gradient",
              "--set", "deletion_fractions=[0.1]", "--no-progress"]
    rc, _, err = _run(capsys, "train", data, "--out", run, "--epochs", "1", *common)
    assert rc == 0, err
    (run / "metrics.json").unlink()  # as if stopped before the end: resumable
    shutil.rmtree(data)
    generate(data, SynthConfig(n_train=24, n_val=8, n_test=8, size=32, seed=5))
    before = (run / "checkpoint.pt").read_bytes()
    rc, _, err = _run(capsys, "train", data, "--out", run, "--epochs", "1", "--resume",
                      *common)
    _assert_user_error(rc, err, f"--resume continues the stored run, but {data} is not the "
                                f"dataset it was trained on (its dataset.yaml or manifest.csv "
                                f"differ")
    assert (run / "checkpoint.pt").read_bytes() == before


def test_train_without_out_uses_one_folder_per_method_and_seed(tiny_data, tmp_path, capsys,
                                                               monkeypatch):
    # Before: every `train` without --out wrote runs/run, so the second seed of a loop
    # stopped with "already holds a run".
    monkeypatch.chdir(tmp_path)
    common = ["train", str(tiny_data), "--epochs", "1", "--set", "width=4", "--set",
              "threads=1", "--set", "eval_saliency=gradient", "--no-progress"]
    for s in ("0", "1"):
        rc, _, err = _run(capsys, *common, "--seed", s)
        assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["erm-seed0", "erm-seed1"]
    assert (tmp_path / "runs" / "erm-seed1" / "metrics.json").is_file()


def test_bench_step_threads_option_sets_and_restores_torch_threads(capsys):
    before = torch.get_num_threads()
    rc, out, err = _run(capsys, "bench", "step", "--size", "16", "--batch-size", "4",
                        "--steps", "1", "--warmup", "0", "--threads", "1")
    assert rc == 0, err
    assert json.loads(out)["threads"] == 1
    assert torch.get_num_threads() == before
    rc, _, err = _run(capsys, "bench", "step", "--threads", "-1")
    _assert_user_error(rc, err, "--threads")


def test_causaligns_own_warnings_are_one_warning_line(tiny_data, tmp_path, capsys):
    """A causalign UserWarning (here sync_bn in a single process) printed as Python's two
    lines, a file path with a line number and the source line that raised it; the CLI now
    prints it as one `warning: …` line, like the trainer's own warnings. Other packages'
    warnings keep Python's format."""
    import warnings

    before = warnings.showwarning
    rc, _, err = _run(capsys, "train", str(tiny_data), "--method", "erm", "--epochs", "1",
                      "--out", str(tmp_path / "run"), "--set", "width=4", "--set",
                      "threads=1", "--set", "sync_bn=true", "--no-progress")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "sync_bn" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: sync_bn: "), err
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert warnings.showwarning is before  # main() leaves Python's display as it found it


@pytest.mark.parametrize("key,value", [("lr", 1e38), ("weight_decay", 1e39)])
def test_a_setting_beyond_float32_arithmetic_is_refused(key, value):
    """A finite but huge lr or weight decay passed validation, and Adam's first step failed
    with 'value cannot be converted to type float without overflow' (a traceback)."""
    from causalign.engine.config import TrainConfig
    from causalign.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key} must be at most 1e"):
        TrainConfig(**{key: value}).validate()


@pytest.mark.parametrize("method,args,match", [
    ("causal-align", {"alpha": 1e38}, "method.alpha must be in"),
    ("causal-align", {"lam": 1e39}, "method.lam must be in"),
    ("hier-align", {"lam2": 1e39}, "method.lam1/lam2 must be in"),
])
def test_alignment_weights_beyond_float32_arithmetic_are_refused(method, args, match):
    """α = 1e38 made every search 'diverge' with advice to lower method.inner_lr, λ = 1e39 a
    non-finite loss with advice to lower --lr: neither named the setting at fault."""
    from causalign.errors import ConfigError
    from causalign.methods import build_method

    with pytest.raises(ConfigError, match=match):
        build_method(method, args)


def test_counterfactual_refuses_an_alpha_beyond_float32_arithmetic():
    from causalign.errors import ConfigError
    from causalign.explain.counterfactual import CounterfactualGenerator

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ConfigError, match="alpha in"):
        CounterfactualGenerator(model, alpha=1e39)
    CounterfactualGenerator(model, alpha=1e30, lr=1e38)  # lr: a diverged search, reported


def test_resume_with_another_method_names_the_method_not_its_stored_settings(run_copy,
                                                                              tiny_data,
                                                                              capsys):
    """A stored run with method.* settings, resumed under another --method: the stored
    settings were checked against the new method first ("unknown parameter(s) lam for
    method 'erm'"), which hid the cause."""
    cfg = run_copy / "config.yaml"
    text = cfg.read_text()
    assert "method: erm\n" in text and "method_args: {}\n" in text
    cfg.write_text(text.replace("method: erm\n", "method: rrr\n")
                   .replace("method_args: {}\n", "method_args:\n  lam: 5.0\n"))
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume", "--method",
                      "erm", "--no-progress")
    _assert_user_error(rc, err, "settings differ: method 'rrr' -> 'erm'")


def test_an_edited_method_setting_in_config_yaml_names_the_file(run_copy, capsys):
    """method_args edited to a bad value: `evaluate` said "method.lam must be >= 0" without
    the file; config.yaml says above method_params that only method_args is read back."""
    cfg = run_copy / "config.yaml"
    text = cfg.read_text()
    assert "edit method_args to change one" in text  # the note above method_params
    cfg.write_text(text.replace("method: erm\n", "method: rrr\n")
                   .replace("method_args: {}\n", "method_args:\n  lam: -1.0\n"))
    rc, _, err = _run(capsys, "evaluate", run_copy, "--no-progress")
    _assert_user_error(rc, err, f"{cfg}: method.lam must be >= 0")


def test_a_config_file_whose_method_args_is_no_mapping_is_named(tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method_args: [1, 2]\n")
    rc, _, err = _run(capsys, "train", tiny_data, "--config", bad, "--out", tmp_path / "run",
                      "--no-progress")
    _assert_user_error(rc, err, f"{bad}: method_args must be a mapping")


def test_training_into_the_dataset_folder_is_refused(tiny_data, capsys):
    rc, _, err = _run(capsys, "train", tiny_data, "--out", tiny_data, "--no-progress")
    _assert_user_error(rc, err, "is the dataset folder; choose another --out")
    assert not (tiny_data / "config.yaml").exists()


def test_resume_with_another_method_before_the_first_checkpoint_names_the_method(
        run_copy, tiny_data, capsys):
    """Killed before its first checkpoint: config.yaml is there, checkpoint.pt and
    metrics.json not; the stored method.* settings went to the new method as well."""
    for name in ("checkpoint.pt", "checkpoint.pt.sha256", "metrics.json"):
        (run_copy / name).unlink(missing_ok=True)
    cfg = run_copy / "config.yaml"
    cfg.write_text(cfg.read_text().replace("method: erm\n", "method: rrr\n")
                   .replace("method_args: {}\n", "method_args:\n  lam: 5.0\n"))
    rc, _, err = _run(capsys, "train", tiny_data, "--out", run_copy, "--resume", "--method",
                      "erm", "--no-progress")
    _assert_user_error(rc, err, "settings differ: method 'rrr' -> 'erm'")


def test_a_config_file_with_empty_method_args_reads_as_no_arguments(tmp_path):
    from causalign.engine.config import load_config_file

    empty = tmp_path / "empty.yaml"
    empty.write_text("method: erm\nmethod_args:\nmodel_args:\n")
    assert load_config_file(empty) == {"method": "erm", "method_args": {}, "model_args": {}}


def test_a_checkpoint_from_a_node_with_more_gpus_restores_the_visible_ones(monkeypatch):
    """The checkpoint keeps one CUDA generator state per visible GPU; resumed where fewer
    are visible, set_rng_state_all indexed past them (an IndexError traceback)."""
    from causalign.engine.trainer import restore_cuda_rng

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.append(states))
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    restore_cuda_rng(states)
    assert len(got) == 1 and len(got[0]) == 1 and torch.equal(got[0][0], states[0])
    restore_cuda_rng(None)  # a checkpoint written without CUDA
    assert len(got) == 1


def test_resume_on_pixels_rewritten_in_place_is_refused(run_copy, tiny_data, tmp_path, capsys):
    # Before: the digest covered dataset.yaml and manifest.csv only, so a dataset whose image
    # was rewritten under the same name resumed on the new pixels with the old run's state.
    from PIL import Image

    edited = tmp_path / "edited"
    shutil.copytree(tiny_data, edited)
    png = sorted((edited / "images").glob("train_*.png"))[0]
    pixels = np.array(Image.open(png))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(png)
    before = (run_copy / "metrics.json").read_text()
    rc, _, err = _run(capsys, "train", edited, "--out", run_copy, "--resume", "--no-progress")
    _assert_user_error(rc, err, f"--resume continues the stored run, but the images, masks, boxes "
                                f"or labels of {edited} read differently than when it started")
    assert (run_copy / "metrics.json").read_text() == before
    # the unedited copy still resumes
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    rc, _, err = _run(capsys, "train", copy, "--out", run_copy, "--resume", "--no-progress")
    assert rc == 0, err
