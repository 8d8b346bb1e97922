"""The command-line contract (DESIGN.md): user errors are one `error:` line and exit 2, with
nothing else on stderr; output paths are checked before the work; flags and --set agree;
CAUSALIGN_TRACEBACK; --help states the defaults."""

from __future__ import annotations

import pytest
import torch
import typer.main
from test_cli_edges import _run

from causalign.cli import app, main
from causalign.engine import TrainConfig, train
from causalign.errors import DataError


def _assert_user_error(rc, err, needle):
    """Stricter than test_cli_edges': the error is the only line on stderr, blank ones too."""
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)  # the only line on stderr
    assert err.startswith("error: ") and needle in err, err


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("contract") / "run"
    train(tiny_data, TrainConfig(epochs=1, width=4, batch_size=16, deletion_fractions=[0.1]),
          run, progress=False)
    return run


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


# ---------------------------------------------------------------- output paths


def test_evaluate_out_under_a_file_fails_before_evaluating(finished_run, a_file, capsys):
    # Before: the whole split was evaluated (its progress bar shown), then the write failed
    # with the misleading "a_file: File exists".
    rc, out, err = _run(capsys, "evaluate", finished_run, "--split", "val",
                        "--out", a_file / "m.json")
    _assert_user_error(rc, err, f"--out {a_file / 'm.json'}: {a_file} is a file, not a folder")
    assert out == "" and "evaluating" not in err


def test_ccce_json_under_a_file_fails_before_the_attribution(tiny_data, a_file, capsys):
    rc, out, err = _run(capsys, "causal", "ccce", tiny_data, "--json", a_file / "r.json")
    _assert_user_error(rc, err, f"--json {a_file / 'r.json'}: {a_file} is a file, not a folder")
    assert out == ""


def test_an_output_folder_that_is_a_file_says_so(finished_run, a_file, capsys):
    # Before: "error: a_file: File exists" (mkdir's words for a file in the way).
    rc, _, err = _run(capsys, "explain", finished_run, "--out", a_file, "--limit", "1")
    _assert_user_error(rc, err, f"{a_file}: exists and is not a folder")
    rc, _, err = _run(capsys, "data", "synth", a_file, "--n-train", "4")
    _assert_user_error(rc, err, f"{a_file}: exists and is not a folder")
    # a folder asked for under a file names the file in the way
    rc, _, err = _run(capsys, "explain", finished_run, "--out", a_file / "sub", "--limit", "1")
    _assert_user_error(rc, err, f"{a_file / 'sub'}: Not a directory ({a_file} is a file, "
                                f"not a folder)")


# ---------------------------------------------------------------- flags against --set


@pytest.mark.parametrize(("argv", "needle"), [
    (["--method", "erm", "--set", "method=oracle"],
     "--method erm and --set method=oracle conflict"),
    (["--epochs", "2", "--set", "epochs=1"], "--epochs 2 and --set epochs=1 conflict"),
    (["--batch-size", "8", "--set", "batch_size=16"],
     "--batch-size 8 and --set batch_size=16 conflict"),
])
def test_a_flag_and_set_naming_two_values_is_refused(tiny_data, tmp_path, capsys, argv, needle):
    # Before: --set won silently (`--method erm --set method=oracle` trained the oracle).
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "train", tiny_data, "--out", out, "--no-progress", *argv)
    _assert_user_error(rc, err, needle)
    assert not out.exists()


def test_a_flag_and_set_that_agree_are_accepted(tmp_path, capsys):
    # `--lr 0.001` and `--set lr=1e-3` (YAML reads a string) name one value: the command
    # goes on to its next check, the missing dataset
    missing = tmp_path / "none"
    rc, _, err = _run(capsys, "train", missing, "--lr", "0.001", "--set", "lr=1e-3",
                      "--epochs", "3", "--set", "epochs=3", "--no-progress")
    _assert_user_error(rc, err, f"{missing}: dataset folder does not exist")
    # an invalid --set value is named as such, not as a conflict
    rc, _, err = _run(capsys, "train", missing, "--batch-size", "16", "--set",
                      "batch_size=abc")
    _assert_user_error(rc, err, "batch_size: expected int, got 'abc'")


# ---------------------------------------------------------------- CAUSALIGN_TRACEBACK


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_causalign_traceback_off_values_keep_one_line(a_file, capsys, monkeypatch, value):
    # Before: any non-empty value, "0" included, turned the one line into a traceback.
    monkeypatch.setenv("CAUSALIGN_TRACEBACK", value)
    rc, _, err = _run(capsys, "data", "synth", a_file / "d", "--n-train", "4")
    _assert_user_error(rc, err, f"{a_file / 'd'}: Not a directory")


def test_causalign_traceback_one_shows_the_os_error(a_file, monkeypatch):
    monkeypatch.setenv("CAUSALIGN_TRACEBACK", "1")
    with pytest.raises(NotADirectoryError):
        main(["data", "synth", str(a_file / "d"), "--n-train", "4"])


# ---------------------------------------------------------------- out of memory


@pytest.mark.parametrize(("exc", "needle"), [
    (MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000)"),
     "Unable to allocate 74.5 GiB"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 40000000000 bytes."), "can't allocate memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the "
                            "documentation"), "CUDA out of memory. Tried to allocate 2.00 GiB."),
])
def test_running_out_of_memory_is_one_line(capsys, monkeypatch, exc, needle):
    # Before: `bench step --size 100000` and `data synth --size 100000` ended in a traceback
    # of the allocation (torch: RuntimeError, numpy: MemoryError).
    import causalign.engine.bench as bench

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(bench, "bench_step", fail)
    rc, out, err = _run(capsys, "bench", "step", "--size", "100000")
    _assert_user_error(rc, err, needle)
    assert err.startswith("error: out of memory: ") and "See the documentation" not in err
    assert out == ""


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    import causalign.engine.bench as bench

    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "bench_step", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["bench", "step"])


# ---------------------------------------------------------------- progress bars


def _synth_failing_mid_bar(exc: BaseException):
    def generate(out, cfg, progress=None):
        task = progress.add_task("synthesising", total=3)
        progress.advance(task)
        raise exc
    return generate


@pytest.mark.parametrize(("exc", "rc", "line"), [
    (DataError("a sample could not be written"), 2, "error: a sample could not be written"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_a_bar_interrupted_by_an_error_leaves_only_the_message(tmp_path, capsys, monkeypatch,
                                                                exc, rc, line):
    # Before: off a terminal, the bar's last frame ("synthesising ━━ 1/3") and a blank line
    # were printed above the error line (in a terminal the bar stayed on screen).
    import causalign.data.synth as synth

    monkeypatch.setattr(synth, "generate", _synth_failing_mid_bar(exc))
    code, out, err = _run(capsys, "data", "synth", tmp_path / "d", "--n-train", "4")
    assert code == rc and out == ""
    assert err == line + "\n", repr(err)


def test_a_bar_that_finishes_is_still_shown(capsys):
    from causalign.engine.progress import progress_bar

    with progress_bar() as bar:
        task = bar.add_task("counting", total=2)
        bar.advance(task, 2)
    assert "counting" in capsys.readouterr().err


# ---------------------------------------------------------------- --help


def _command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def test_train_help_states_trainconfigs_defaults():
    # Before: --epochs, --batch-size, --lr and --seed had no help at all (their default is
    # None so that --config and a resumed run's settings apply, so none was shown).
    base = TrainConfig()
    helps = {p.name: p.help or "" for p in _command("train").params}
    for name in ("epochs", "batch_size", "lr", "seed", "model", "device", "method"):
        assert f"(default {getattr(base, name)})" in helps[name], (name, helps[name])


def test_every_option_says_what_it_takes():
    missing = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        missing.extend(f"{' '.join(path)} {p.opts[0]}" for p in cmd.params
                       if p.param_type_name == "option" and p.name != "help" and not p.help)

    walk(typer.main.get_command(app), [])
    assert not missing, missing


# ---------------------------------------------------------------- benchmark selections


@pytest.mark.parametrize("option", ["--methods", "--only", "--datasets", "--seeds",
                                    "--settings"])
def test_a_benchmark_selection_naming_nothing_is_refused(tmp_path, capsys, option):
    # Before: `--methods ,` (an empty list selects everything) ran the whole suite, and
    # `--seeds ,` ran no run at all and exited 0 with an empty table.
    out = tmp_path / "bench"
    rc, stdout, err = _run(capsys, "benchmark", "quick", "--out", out, "--no-progress",
                           "--no-report", option, ",")
    _assert_user_error(rc, err, f"{option} names nothing, got ','")
    assert stdout == "" and not out.exists()


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize(("argv", "command"), [
    (["train", "x", "--epochs"], "causalign train"),
    (["data", "synth", "x", "--size"], "causalign data synth"),
    (["benchmark", "quick", "--out"], "causalign benchmark"),
])
def test_an_option_without_its_value_points_to_the_commands_help(capsys, argv, command):
    # Before: "(see `causalign --help`)", the top-level help, which lists no such option.
    rc, _, err = _run(capsys, *argv)
    _assert_user_error(rc, err, f"requires an argument. (see `{command} --help`)")


# ---------------------------------------------------------------- SIGTERM


def test_sigterm_ends_a_command_with_one_line_and_143(capsys, monkeypatch):
    # Before: SIGTERM (a scheduler's stop, `kill`) ended the process at once: no line, no
    # clean-up of a write in progress.
    import os
    import signal

    import causalign.engine.bench as bench

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(bench, "bench_step", lambda *a, **k: os.kill(os.getpid(),
                                                                      signal.SIGTERM))
    rc, out, err = _run(capsys, "bench", "step")
    assert (rc, out, err) == (143, "", "terminated\n")
    assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller


def test_sigterm_is_left_to_torchrun_under_torchrun(capsys, monkeypatch):
    # torchrun stops the other ranks with SIGTERM after local rank 0 printed the job's one
    # error line: they must stay silent, so no handler there
    import signal

    import causalign.engine.bench as bench

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(bench, "bench_step",
                        lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)) or {})
    assert main(["bench", "step"]) == 0
    assert seen == [signal.getsignal(signal.SIGTERM)]



# ---------------------------------------------------------------- --config


def test_an_unknown_key_in_a_config_file_names_the_file(tiny_data, tmp_path, capsys):
    # Before: "unknown config key 'name'", nothing said it came from the --config file (here
    # a dataset.yaml passed by mistake) rather than from --set.
    rc, _, err = _run(capsys, "train", tiny_data, "--config", tiny_data / "dataset.yaml",
                      "--out", tmp_path / "r", "--no-progress")
    _assert_user_error(rc, err, f"{tiny_data / 'dataset.yaml'}: unknown config key(s) 'name'")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- --no-progress


@pytest.mark.parametrize("command", ["data synth", "evaluate", "explain", "counterfactual",
                                     "demo"])
def test_every_command_with_a_progress_bar_takes_no_progress(command):
    # Before: only train, benchmark and data import had the switch; off a terminal the others
    # left their bars' last frames in a script's stderr log.
    names = {o for p in _command(*command.split()).params for o in p.secondary_opts}
    assert "--no-progress" in names


def test_no_progress_leaves_stderr_empty(finished_run, tmp_path, capsys):
    rc, out, err = _run(capsys, "data", "synth", tmp_path / "d", "--n-train", "4", "--n-val",
                        "2", "--n-test", "2", "--size", "32", "--no-examples", "--no-progress")
    assert rc == 0 and err == "" and out.startswith("wrote 8 samples")
    rc, out, err = _run(capsys, "evaluate", finished_run, "--split", "val", "--no-progress")
    assert rc == 0 and err == "" and out.lstrip().startswith("{")
    rc, _, err = _run(capsys, "evaluate", finished_run, "--split", "val")
    assert rc == 0 and "evaluating" in err  # the bar is still there by default
