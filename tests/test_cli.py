"""Command line: the happy path and one clear line for every user error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from causalign.cli import main
from causalign.engine.config import TrainConfig


def _run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_user_error(rc, err, needle):
    assert rc != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_train_evaluate_explain(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _run(capsys, "train", str(tiny_data), "--method", "erm", "--out", str(run),
                        "--epochs", "1", "--set", "width=4", "--no-progress")
    assert rc == 0, err
    assert "test accuracy" in out
    rc, out, err = _run(capsys, "evaluate", str(run), "--split", "val")
    assert rc == 0, err
    assert json.loads(out)["n"] == 16
    rc, out, err = _run(capsys, "explain", str(run), "--saliency", "gradient", "--out",
                        str(tmp_path / "ex"), "--limit", "3")
    assert rc == 0, err
    maps = sorted((tmp_path / "ex" / "maps").glob("*.npy"))
    assert len(maps) == 3 and np.load(maps[0]).shape == (32, 32)
    assert len(list((tmp_path / "ex" / "overlays").glob("*.png"))) == 3
    assert (tmp_path / "ex" / "grid.png").stat().st_size > 1000

    # A dataset the run's model does not fit (three classes): one line, not a traceback.
    import shutil

    import yaml

    other = tmp_path / "three_classes"
    shutil.copytree(tiny_data, other)
    meta = yaml.safe_load((other / "dataset.yaml").read_text())
    meta["classes"] = [*meta["classes"], "extra"]
    (other / "dataset.yaml").write_text(yaml.safe_dump(meta))
    rc, _, err = _run(capsys, "evaluate", str(run), "--data", str(other))
    _assert_user_error(rc, err, "does not fit the run's model (3 classes, 1 channel(s)")
    assert "classifier" in err and "(2, " in err and "(3, " in err

    # The run's own dataset moved away: the error says how to point at it.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = str(tmp_path / "moved_away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = _run(capsys, "evaluate", str(run))
    _assert_user_error(rc, err, "moved_away: the run's dataset folder does not exist (moved? "
                                "pass --data DIR)")
    rc, out, err = _run(capsys, "evaluate", str(run), "--data", str(tiny_data))
    assert rc == 0 and json.loads(out)["n"] > 0, err


def test_bench_step_prints_contract(capsys):
    rc, out, err = _run(capsys, "bench", "step", "--method", "oracle", "--size", "32",
                        "--batch-size", "4", "--steps", "1", "--warmup", "0")
    assert rc == 0, err
    obj = json.loads(out)
    for key in ("method", "seconds_per_step", "erm_seconds_per_step", "ratio_to_erm"):
        assert key in obj
    assert obj["method"] == "oracle" and obj["seconds_per_step"] > 0
    assert obj["method_args"] == {} and obj["warmup"] == 0
    rc, out, err = _run(capsys, "bench", "step", "--method", "rrr", "--size", "32",
                        "--batch-size", "4", "--steps", "1", "--warmup", "0", "--set",
                        "method.lam=5")
    assert rc == 0, err
    assert json.loads(out)["method_args"] == {"lam": 5}  # the settings timed are recorded
    # one parameter spelt both ways: the last one won silently
    rc, _, err = _run(capsys, "bench", "step", "--method", "rrr", "--size", "32", "--steps",
                      "1", "--set", "lam=3", "--set", "method.lam=4")
    _assert_user_error(rc, err, "--set method.lam given twice (3 and 4, as 'lam' and "
                                "'method.lam'); give one")
    rc, out, err = _run(capsys, "bench", "step", "--method", "rrr", "--size", "32",
                        "--batch-size", "4", "--steps", "1", "--warmup", "0", "--set",
                        "lam=1e-3", "--set", "method.lam=0.001")
    assert rc == 0 and json.loads(out)["method_args"] == {"lam": 0.001}, err


def test_bench_step_times_a_many_class_model(capsys, monkeypatch):
    # Before there was no --classes: causal-align's multi-class cost (its CG budget is
    # C + 10) could not be timed with `bench step`.
    from causalign.engine import bench

    seen = {}
    real = bench.time_steps_alternated

    def spy(method, batch, cfg, info, *args, **kwargs):
        seen.update(classes=info.num_classes, labels=set(batch["label"].tolist()))
        return real(method, batch, cfg, info, *args, **kwargs)

    monkeypatch.setattr(bench, "time_steps_alternated", spy)
    rc, out, err = _run(capsys, "bench", "step", "--method", "causal-align", "--classes", "5",
                        "--size", "16", "--batch-size", "16", "--steps", "1", "--warmup", "0",
                        "--set", "method.steps=2")
    assert rc == 0, err
    assert json.loads(out)["classes"] == 5 and seen["classes"] == 5
    assert seen["labels"] <= set(range(5)) and max(seen["labels"]) >= 2
    rc, out, err = _run(capsys, "bench", "step", "--classes", "1")
    assert rc != 0 and err.strip() == "error: --classes must be >= 2, got 1"


def test_bench_step_times_the_volume_model_on_volumes(capsys):
    # Before there was no --depth: `bench step --model multiview` was refused for its 2D
    # images, so the multiview step could not be timed at all.
    rc, out, err = _run(capsys, "bench", "step", "--method", "causal-align", "--model",
                        "multiview", "--size", "16", "--depth", "4", "--batch-size", "4",
                        "--steps", "1", "--warmup", "0", "--set", "method.steps=2")
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["model"] == "multiview" and obj["depth"] == 4 and obj["seconds_per_step"] > 0


def test_bench_step_alternates_erm_and_method_steps(monkeypatch):
    # Before, every ERM step was timed before every method step, so a load change on a
    # shared machine went into the ratio.
    from causalign.engine import bench

    order = []

    class Recorded:
        def __init__(self, name, *args, **kwargs):
            self.name = name

        def __call__(self):
            order.append(self.name)
            return 1.0 if self.name == "erm" else 3.0

    monkeypatch.setattr(bench, "_TimedStep", Recorded)
    result = bench.bench_step("causal-align", size=16, batch_size=2, steps=3, warmup=1)
    assert order == ["erm", "causal-align"] * 4  # one warm-up pair, then three timed pairs
    assert result["ratio_to_erm"] == 3.0


def test_an_empty_value_is_kept_where_it_is_the_options_default(tmp_path, capsys):
    # `data synth --weights ""` (the default: the benchmark's own rule) must not be
    # refused by the empty-argument check
    rc, out, err = _run(capsys, "data", "synth", str(tmp_path / "d"), "--weights", "",
                        "--n-train", "4", "--n-val", "2", "--n-test", "2", "--size", "32")
    assert rc == 0, err


def test_bench_step_leaves_the_callers_random_state_alone():
    # bench_step seeds its runs (one initial model for timed and profiled runs); the
    # caller's generator is restored, not left reseeded
    from causalign.engine.bench import bench_step

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    bench_step("erm", size=16, batch_size=2, steps=1, warmup=0)
    assert torch.equal(torch.rand(3), expected)


def test_synthetic_bench_batch_volumes_carry_their_lesion_in_the_middle_slices():
    from causalign.engine.bench import synthetic_batch

    flat, vol = synthetic_batch(3, 16), synthetic_batch(3, 16, depth=8)
    assert flat["image"].shape == (3, 1, 16, 16) and flat["mask"].shape == (3, 1, 16, 16)
    assert vol["image"].shape == (3, 1, 8, 16, 16) and vol["mask"].shape == (3, 1, 8, 16, 16)
    per_slice = vol["mask"].sum(dim=(1, 3, 4))
    assert (per_slice[:, :2] == 0).all() and (per_slice[:, 6:] == 0).all()
    assert (per_slice[:, 2:6] == 16).all()  # a 4 x 4 square (side size // 4) in each
    for d in (3, 4, 5):  # the same square in every lesion slice
        assert torch.equal(vol["mask"][:, :, d], vol["mask"][:, :, 2])


def test_bench_step_profile_names_the_parts_of_a_causal_align_step(capsys):
    """--profile: ms per step in the counterfactual search and the implicit gradient's parts
    (torch.profiler record_function ranges), each > 0 and together less than the step."""
    rc, out, err = _run(capsys, "bench", "step", "--method", "causal-align", "--size", "16",
                        "--batch-size", "4", "--steps", "2", "--warmup", "0", "--profile",
                        "--set", "method.steps=3")
    assert rc == 0, err
    obj = json.loads(out)
    parts = obj["profile_ms_per_step"]
    assert set(parts) == {"counterfactual.search", "implicit.first_derivative", "implicit.cg",
                          "implicit.mixed_product"}
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) < obj["profiled_step_ms"]
    # ERM has none of these parts
    rc, out, err = _run(capsys, "bench", "step", "--size", "16", "--batch-size", "4",
                        "--steps", "1", "--warmup", "0", "--profile")
    assert rc == 0, err
    assert json.loads(out)["profile_ms_per_step"] == {}


def test_unknown_method(tiny_data, tmp_path, capsys):
    rc, _, err = _run(capsys, "train", str(tiny_data), "--method", "magic", "--out",
                      str(tmp_path / "r"))
    _assert_user_error(rc, err, "unknown method 'magic'; valid: ")


def test_missing_data_dir(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    _assert_user_error(rc, err, "dataset folder does not exist")


def test_missing_run_dir(tmp_path, capsys):
    rc, _, err = _run(capsys, "evaluate", str(tmp_path / "norun"))
    _assert_user_error(rc, err, "run folder does not exist")


def test_unknown_saliency(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", str(tiny_data), "--out", str(run), "--epochs", "1",
                "--set", "width=4", "--no-progress")[0] == 0
    rc, _, err = _run(capsys, "explain", str(run), "--saliency", "xray", "--out",
                      str(tmp_path / "ex"))
    _assert_user_error(rc, err, "unknown saliency method 'xray'")


def test_bad_set_key(tiny_data, tmp_path, capsys):
    rc, _, err = _run(capsys, "train", str(tiny_data), "--out", str(tmp_path / "r"),
                      "--set", "learning_rate=1")
    _assert_user_error(rc, err, "unknown config key 'learning_rate'")


@pytest.fixture
def broken_data(tmp_path):
    from causalign.data.synth import SynthConfig, generate

    root = tmp_path / "broken"
    generate(root, SynthConfig(n_train=6, n_val=2, n_test=2, size=32, seed=0))
    return root


def _rewrite_manifest(root, fn):
    lines = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(fn(lines)) + "\n")


def test_data_errors_through_cli(broken_data, tmp_path, capsys):
    from PIL import Image

    # wrong mask shape
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(broken_data / "masks" / "train_00001.png")
    rc, _, err = _run(capsys, "train", str(broken_data), "--out", str(tmp_path / "r1"))
    _assert_user_error(rc, err, "train_00001.png: mask shape (5, 5) does not match image")


def test_corrupt_test_image_stops_training_before_it_starts(broken_data, tmp_path, capsys):
    # The test split is only evaluated after training; a bad file there must still fail
    # at once, not after the whole run.
    test_images = sorted((broken_data / "images").glob("test_*.png"))
    test_images[0].write_bytes(b"not a png")
    run = tmp_path / "r"
    rc, _, err = _run(capsys, "train", str(broken_data), "--out", str(run), "--epochs", "1")
    _assert_user_error(rc, err, f"{test_images[0].name}: cannot read image")
    assert not (run / "checkpoint.pt").exists() and not (run / "history.csv").exists()


def test_nan_image_through_cli(broken_data, tmp_path, capsys):
    img = np.full((32, 32), np.nan, np.float32)
    np.save(broken_data / "images" / "train_00002.npy", img)
    _rewrite_manifest(broken_data, lambda ls: [ls[0]] + [
        line.replace("images/train_00002.png", "images/train_00002.npy") for line in ls[1:]])
    rc, _, err = _run(capsys, "data", "check", str(broken_data))
    _assert_user_error(rc, err, "train_00002.npy: 1024 NaN/inf pixel value(s)")


def test_empty_split_through_cli(broken_data, tmp_path, capsys):
    _rewrite_manifest(broken_data, lambda ls: [line for line in ls if ",val," not in line])
    rc, _, err = _run(capsys, "train", str(broken_data), "--out", str(tmp_path / "r"))
    _assert_user_error(rc, err, "split 'val' is empty")


def test_label_out_of_range_through_cli(broken_data, tmp_path, capsys):
    def bump(lines):
        cells = lines[1].split(",")
        cells[2] = "7"
        return [lines[0], ",".join(cells), *lines[2:]]

    _rewrite_manifest(broken_data, bump)
    rc, _, err = _run(capsys, "data", "check", str(broken_data))
    _assert_user_error(rc, err, "label 7 outside the declared classes")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "causalign", "train", str(tmp_path / "none"),
                           "--method", "erm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("argv", "needle"), [
    (["nosuch"], "No such command 'nosuch'"),
    (["data", "validate", "x"], "No such command 'validate'"),
    (["train"], "Missing argument 'data'"),
    (["train", "x", "--bogus"], "No such option: --bogus"),
    (["train", "x", "--epochs", "many"], "'--epochs'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    # The parser's own errors (typer may vendor click, so its exception classes move) must
    # follow the same contract as ours: one line, exit 2, no traceback.
    rc, _, err = _run(capsys, *argv)
    _assert_user_error(rc, err, needle)
    assert rc == 2 and "--help" in err


def test_bare_group_prints_help_without_an_error_line(capsys):
    rc, out, err = _run(capsys, "data")
    assert rc == 2 and "synth" in out and "error" not in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["demo", "--methods", "erm,foo"], "unknown method 'foo'; valid: "),
    (["demo", "--methods", ","], "--methods names no method"),
    (["demo", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["bench", "step", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["bench", "step", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["bench", "step", "--depth", "2"], "--depth 2: volumes need at least 4 slices"),
    # an empty path was the current folder: an unset shell variable wrote there
    (["data", "synth", ""], "argument 3 is empty; give a value (as a path, '.' is the "
                            "current folder)"),
    (["demo", "--out="], "--out is empty; give a value ('.' is the current folder)"),
    (["bench", "step", "--set", ""], "--set is empty; give a value"),
    # after a flag the empty argument is a stray positional one, not the flag's value
    (["data", "synth", "{tmp}/d", "--overwrite", ""], "argument 5 is empty"),
    (["bench", "step", "--depth", "8"], "model 'cnn7' takes 2D images: leave --depth at 1"),
    (["bench", "step", "--model", "multiview"], "model 'multiview' takes volumes: give "
                                                "--depth >= 4"),
    (["data", "synth", "{tmp}/d", "--label-noise", "-1"], "--label-noise must be a finite σ"),
])
def test_demo_bench_and_synth_reject_bad_settings_before_any_work(tmp_path, capsys, argv,
                                                                   needle):
    # Before: `demo --methods foo` generated the data and exited 0 with a "skipped" table,
    # `--seeds 0` silently ran one seed, `bench step --steps 0` and a negative label noise
    # ended in tracebacks, and `--batch-size 0` timed empty batches.
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = tmp_path / "demo"
    if argv[0] == "demo":
        argv += ["--out", str(out)]
    rc, _, err = _run(capsys, *argv)
    _assert_user_error(rc, err, needle)
    assert rc == 2 and not out.exists() and not (tmp_path / "d").exists()


def test_ctrl_c_exits_130_with_a_message_and_keeps_the_checkpoint(tiny_data, tmp_path):
    # Recent typer (0.29 here) returns Ctrl-C as exit code 130 instead of raising;
    # main() used to drop that code, so an interrupted run exited 0 and silently.
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "causalign", "train", str(tiny_data),
                             "--out", str(run), "--epochs", "500", "--set", "width=4",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # as from a terminal: a suite started in the background (`make
                            # test &`) passes SIGINT on ignored, and the child then trained all
                            # 500 epochs and exited 0
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        # a failed wait left the 500-epoch child training through the rest of the suite
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()


def test_an_output_path_the_os_refuses_is_one_line(tiny_data, tmp_path, capsys):
    # A folder asked for under a regular file: NotADirectoryError used to end in a traceback.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = _run(capsys, "train", str(tiny_data), "--out", str(blocker / "run"),
                      "--epochs", "1", "--no-progress")
    _assert_user_error(rc, err, f"{blocker / 'run'}: Not a directory")
    rc, _, err = _run(capsys, "data", "synth", str(blocker / "d"), "--n-train", "4")
    _assert_user_error(rc, err, f"{blocker / 'd'}: Not a directory")


@pytest.mark.parametrize("method", ["oracle", "causal-align", "rrr", "cdep", "chang"])
def test_annotation_methods_refuse_a_training_split_without_any_annotation(
        tiny_data, tmp_path, capsys, method):
    import shutil

    data = tmp_path / "no_masks"
    shutil.copytree(tiny_data, data)
    lines = (data / "manifest.csv").read_text().splitlines()
    head = lines[0].split(",")
    blank = [head.index(c) for c in ("mask", "box_x0", "box_y0", "box_x1", "box_y1")]
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:
        for i in blank:
            r[i] = ""
    (data / "manifest.csv").write_text("\n".join([lines[0], *map(",".join, rows)]) + "\n")
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "train", str(data), "--method", method, "--out", str(run),
                      "--epochs", "1", "--set", "width=4", "--no-progress")
    _assert_user_error(rc, err, f"method '{method}' learns from lesion masks or boxes, but "
                                f"none of the 48 training samples has one")
    assert not run.exists()
    # ERM on the same data trains.
    assert _run(capsys, "train", str(data), "--out", str(run), "--epochs", "1", "--set",
                "width=4", "--no-progress")[0] == 0


def test_resume_with_nothing_to_resume_says_it_starts_a_new_run(tiny_data, tmp_path, capsys):
    """Allowed (a scheduler's job passes --resume from its first start), but a mistyped --out
    trained a new run from scratch without a word; a real resume stays quiet."""
    run = tmp_path / "run"
    argv = ["train", str(tiny_data), "--out", str(run), "--epochs", "1", "--set", "width=4",
            "--no-progress", "--resume"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    assert f"warning: {run}: --resume found no checkpoint.pt to continue" in err, err
    rc, out, err = _run(capsys, *argv)  # the run it finished: nothing new to say
    assert rc == 0 and "found no checkpoint" not in err and "already finished" in out + err


def test_resume_with_nothing_to_resume_warns_before_the_splits_are_read(
        tiny_data, tmp_path, monkeypatch):
    """The warning came after the method's setup (a latent-space autoencoder trains for
    minutes there): a user who mistyped --out waited that long to learn it. It now comes
    before the splits are read, so it is shown even when reading them fails."""
    import warnings

    from causalign.engine import trainer as trainer_mod

    def unreadable(*args, **kwargs):
        raise trainer_mod.CausalignError("split unreadable")

    monkeypatch.setattr(trainer_mod, "LesionDataset", unreadable)
    cfg = TrainConfig(epochs=1, width=4, threads=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(trainer_mod.CausalignError, match="split unreadable"):
            trainer_mod.Trainer(tiny_data, cfg, tmp_path / "run", resume=True,
                                progress=False).fit()
    assert any("--resume found no checkpoint.pt" in str(w.message) for w in seen), seen
