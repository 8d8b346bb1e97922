"""Crash safety: a real `causalign train` killed with SIGKILL mid-epoch resumes to the same
final metrics and weights as an uninterrupted run; damaged checkpoints are named clearly."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from causalign.cli import main
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train
from causalign.errors import DataError
from causalign.io import atomic_savefig, atomic_torch_save, atomic_write_json

ARGS = ["--epochs", "3", "--batch-size", "8", "--seed", "1", "--set", "width=4",
        "--set", "deterministic=true", "--set", "threads=1", "--set", "eval_saliency=gradient",
        "--no-progress"]


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "data"
    generate(root, SynthConfig(n_train=96, n_val=16, n_test=16, size=32, seed=5))
    return root


def _epochs_done(run) -> list[dict]:
    path = run / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# `causalign train` as `python -m causalign` runs it, stopped inside epoch 2 (one step taken,
# the next batch not yet given) once epoch 1 is checkpointed; it says so by creating MARKER.
# The SIGKILL used to follow history.csv's first row by 0.3 epoch (sleep): but history.csv
# is written before the checkpoint (a slow fsync: no checkpoint yet), and a test process
# that woke late killed after epoch 2 had finished, both by chance of timing.
_STOPPED_IN_EPOCH_2 = textwrap.dedent("""
    import runpy, sys, time
    from pathlib import Path
    import causalign.engine.trainer as T

    marker = Path(sys.argv[1])
    real_epoch, real_batches, now = T.Trainer._train_epoch, T.iterate_batches, {}

    def train_epoch(self, epoch, *a, **k):
        now["epoch"] = epoch
        try:
            return real_epoch(self, epoch, *a, **k)
        finally:
            now.pop("epoch", None)

    def batches(*a, **k):
        for i, batch in enumerate(real_batches(*a, **k)):
            if now.get("epoch") == 2 and i == 1:
                marker.touch()
                while True:
                    time.sleep(1)
            yield batch

    T.Trainer._train_epoch, T.iterate_batches = train_epoch, batches
    sys.argv = ["causalign", *sys.argv[2:]]
    runpy.run_module("causalign", run_name="__main__")
""")


def test_sigkill_mid_epoch_then_resume_matches(crash_data, tmp_path, capsys):
    # Uninterrupted reference, same settings as the CLI run below (in-process: faster).
    full = tmp_path / "full"
    cfg = TrainConfig(epochs=3, batch_size=8, seed=1, width=4, deterministic=True, threads=1,
                      eval_saliency="gradient")
    train(crash_data, cfg, full, progress=False)

    run, marker = tmp_path / "killed", tmp_path / "in-epoch-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_IN_EPOCH_2, str(marker), "train",
                             str(crash_data), "--out", str(run), *ARGS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():  # epoch 1 checkpointed, one step of epoch 2 taken
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "epoch 2 never started"
            time.sleep(0.01)
        assert len(_epochs_done(run)) == 1
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1, "the kill landed after epoch 2 finished"
    assert not (run / "metrics.json").exists()

    rc = main(["train", str(crash_data), "--out", str(run), *ARGS, "--resume"])
    assert rc == 0, capsys.readouterr().err
    resumed = json.loads((run / "metrics.json").read_text())
    reference = json.loads((full / "metrics.json").read_text())
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    assert [r["val_auc"] for r in _epochs_done(run)] == \
        [r["val_auc"] for r in _epochs_done(full)]
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _user_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "garbage-no-digest", "empty"])
def test_damaged_checkpoint_is_one_clear_line(crash_data, tmp_path, capsys, damage):
    run = tmp_path / "run"
    args = ["--epochs", "1", "--batch-size", "32", "--set", "width=4", "--set",
            "eval_saliency=gradient", "--no-progress"]
    assert main(["train", str(crash_data), "--out", str(run), *args]) == 0
    capsys.readouterr()
    ck = run / "checkpoint.pt"
    data = bytearray(ck.read_bytes())
    if damage == "truncate":
        ck.write_bytes(data[: len(data) // 3])
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        ck.write_bytes(bytes(data))
    elif damage == "empty":
        ck.write_bytes(b"")
    else:  # no digest to check against: the unpickling failure is reported instead
        (run / "checkpoint.pt.sha256").unlink()
        ck.write_bytes(b"not a checkpoint" * 10)
    needle = ("cannot read checkpoint" if damage == "garbage-no-digest"
              else "corrupt or truncated")
    line = _user_error(capsys, ["train", str(crash_data), "--out", str(run), *args,
                                "--resume"], needle)
    assert "checkpoint.pt" in line
    # best.pt is intact, so evaluate still works; damaging it is caught the same way
    best = run / "best.pt"
    best.write_bytes(best.read_bytes()[:100])
    _user_error(capsys, ["evaluate", str(run)], "best.pt: checkpoint is corrupt or truncated")


def test_kill_between_data_and_digest_is_not_corrupt(tmp_path, monkeypatch):
    """A kill after the data rename but before the digest rename (pending digest left)."""
    from causalign.engine.trainer import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"v": 1})
    import causalign.io as cio

    def die(src, dst):
        raise KeyboardInterrupt  # stands in for SIGKILL between the two renames

    monkeypatch.setattr(cio.os, "replace", _replace_once_then(die))
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(path, {"v": 2})
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt.sha256.pending").exists()
    assert load_checkpoint(path)["v"] == 2  # new data, verified by the pending digest


def _replace_once_then(action):
    """os.replace that works for the pending-digest and data renames, then fails."""
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] <= 2:
            return real(src, dst)
        return action(src, dst)

    return replace


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_outputs_get_the_mode_open_would_give(tmp_path, umask):
    """The temporary file behind an atomic write is created 0600; the result must have the
    mode a plain open() gives (0666 less the umask), like any other output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        atomic_torch_save(tmp_path / "c.pt", {"v": 1})
        fig = plt.figure()
        atomic_savefig(fig, tmp_path / "f.png")
        plt.close(fig)
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (os.stat(tmp_path / "plain.txt").st_mode & 0o777) == want
    for name in ("m.json", "c.pt", "c.pt.sha256", "f.png"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == want, (name, oct(want))


def test_a_full_disk_is_one_line_naming_the_file(tiny_data, tmp_path, capsys, monkeypatch):
    """ENOSPC surfaces at write or fsync, whose OSError names no file: the CLI printed
    "error: No space left on device" without saying which output failed."""
    import errno

    import causalign.io as cio

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cio.os, "fsync", full)
    out = tmp_path / "run"
    rc = main(["train", str(tiny_data), "--out", str(out), "--epochs", "1", "--set", "width=4",
               "--no-progress"])
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {out}{os.sep}") and err[0].endswith(
        ": No space left on device"), err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def test_ctrl_c_inside_torch_save_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while torch.save streams a checkpoint: its zip writer's clean-up then fails
    ("unexpected pos ..."), and that RuntimeError replaced the interrupt, so `train` ended in
    a traceback with exit 1 instead of "interrupted" and 130 (seen in CI, by chance of
    timing). The interrupt must come out, the old checkpoint stay, no temporary remain."""
    from causalign.engine.trainer import load_checkpoint
    from causalign.io import _HashingWriter

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"v": 1})
    real_write, calls = _HashingWriter.write, {"n": 0}

    def write_then_ctrl_c(self, data):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-file: a record written, the archive not closed
            raise KeyboardInterrupt
        return real_write(self, data)

    monkeypatch.setattr(_HashingWriter, "write", write_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(path, {"v": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert calls["n"] >= 3
    assert load_checkpoint(path)["v"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("error", [
    RuntimeError("a library's clean-up failed"),
    OSError(28, "a library's clean-up failed"),  # an errno: the one-line OS branch
    DataError("a library's clean-up failed"),  # a library error turned into a user error
], ids=lambda e: type(e).__name__)
def test_an_error_raised_while_an_interrupt_unwinds_exits_130(tiny_data, tmp_path, capsys,
                                                              monkeypatch, error):
    """The CLI's own net for the same race in any other library clean-up: an exception
    whose context is the interrupt is the interrupt, one line and 130, no traceback."""
    import causalign.engine.trainer as trainer_module

    def save_interrupted(path, obj):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise error from None

    monkeypatch.setattr(trainer_module, "atomic_torch_save", save_interrupted)
    rc = main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "1",
               "--set", "width=4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and "clean-up failed" not in err
