"""Interrupted runs lose nothing: resume equals an uninterrupted run for every method, a
finished run is not re-evaluated by --resume, temporaries of killed writes are removed, and
under torchrun a user error is printed once, not once per rank."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import causalign.engine.distributed as D
from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.engine import trainer as T
from causalign.errors import CausalignError
from causalign.methods.base import method_class, method_names


def _cfg(method: str = "erm", epochs: int = 1, **kw) -> TrainConfig:
    settings = dict(width=4, batch_size=16, seed=3, deterministic=True, threads=1,
                    eval_saliency="gradient", deletion_fractions=[0.1])
    return TrainConfig(method=method, epochs=epochs, **{**settings, **kw})


CLI_ARGS = ["--epochs", "1", "--seed", "3", "--set", "width=4", "--set", "batch_size=16",
            "--set", "deterministic=true", "--set", "threads=1", "--set",
            "eval_saliency=gradient", "--set", "deletion_fractions=[0.1]", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    train(tiny_data, _cfg(), run, progress=False)
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


# ---------------------------------------------------------------- every method, bitwise


class _Stop(KeyboardInterrupt):
    """Stands in for Ctrl-C (KeyboardInterrupt) in the middle of a training step."""


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("seconds")  # wall time
    return rows


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "shape"):  # numpy RNG state
        return bool((a == b).all())
    return a == b


def _assert_same_run(full: Path, resumed: Path) -> None:
    assert (full / "metrics.json").read_text() == (resumed / "metrics.json").read_text()
    assert _history(full) == _history(resumed)
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "method_state", "rng", "best_epoch",
                "best_score", "epoch"):
        assert _same(a[key], b[key]), key
    assert _same(torch.load(full / "best.pt", weights_only=False),
                 torch.load(resumed / "best.pt", weights_only=False))


def _interrupt_mid_epoch(monkeypatch, method: str, epoch: int, after_steps: int) -> None:
    """Raise _Stop in `epoch`'s step after_steps + 1, inside the method's loss."""
    cls = method_class(method)
    seen = {"epoch": 0, "steps": 0}
    start, call = cls.on_epoch_start, cls.__call__

    def on_epoch_start(self, e):
        seen["epoch"] = e
        return start(self, e)

    def __call__(self, model, batch):
        if seen["epoch"] == epoch:
            seen["steps"] += 1
            if seen["steps"] > after_steps:
                raise _Stop
        return call(self, model, batch)

    monkeypatch.setattr(cls, "on_epoch_start", on_epoch_start)
    monkeypatch.setattr(cls, "__call__", __call__)


def _check_method(method: str, data: Path, tmp_path: Path, monkeypatch, stop_epoch: int = 2,
                  **kw) -> None:
    full = tmp_path / "full"
    train(data, _cfg(method, epochs=2, **kw), full, progress=False)
    run = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_mid_epoch(m, method, epoch=stop_epoch, after_steps=1)
        with pytest.raises(_Stop):
            train(data, _cfg(method, epochs=2, **kw), run, progress=False)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == stop_epoch - 1
    train(data, _cfg(method, epochs=2, **kw), run, resume=True, progress=False)
    _assert_same_run(full, run)


def test_causal_align_resumes_bitwise_mid_epoch(tiny_data, tmp_path, monkeypatch):
    # The most stateful method: warm-start cache, step counter (align_every), distance
    # scale; checked for every method by the slow test below.
    _check_method("causal-align", tiny_data, tmp_path, monkeypatch,
                  batch_size=24, method_args={"steps": 2, "align_every": 2})


def test_latent_space_resume_does_not_retrain_the_autoencoder(tiny_data, tmp_path,
                                                              monkeypatch):
    # Before: setup() ran before the checkpoint was read, so a resumed space=latent run
    # trained a fresh autoencoder (minutes on real data) and then discarded it for the
    # checkpoint's copy. The result was right; the time was lost.
    import causalign.models.autoencoder as AE

    calls = {"n": 0}
    fit = AE.train_autoencoder

    def counted(*args, **kw):
        calls["n"] += 1
        return fit(*args, **{**kw, "epochs": 1})

    monkeypatch.setattr(AE, "train_autoencoder", counted)
    latent = {"method_args": {"steps": 2, "space": "latent", "distance": "l2"}}
    _check_method("causal-align", tiny_data, tmp_path, monkeypatch, **latent)
    assert calls["n"] == 2  # the full run and the interrupted one; not the resume
    # Killed in epoch 1, before the first epoch's checkpoint: the autoencoder was lost with
    # the process and fitted again on resume (~35 s at demo size). It is now checkpointed
    # (epoch 0) as soon as it is trained, and the resumed run is still bitwise the full one.
    calls["n"] = 0
    _check_method("causal-align", tiny_data, tmp_path / "epoch1", monkeypatch, stop_epoch=1,
                  **latent)
    assert calls["n"] == 2


@pytest.mark.slow  # ~5 s per method on 2 cores
@pytest.mark.parametrize("method", method_names())
def test_every_method_resumes_bitwise_mid_epoch(tiny_data, tmp_path, monkeypatch, method):
    _check_method(method, tiny_data, tmp_path, monkeypatch)


# ---------------------------------------------------------------- a finished run


def test_resume_of_a_finished_run_neither_reevaluates_nor_rewrites(run_copy, tiny_data,
                                                                    capsys, monkeypatch):
    # Before: --resume of a finished run trained no epoch but ran the whole final
    # evaluation again (minutes on real data; on a GPU not bit-identical) and replaced
    # metrics.json, printing the same summary as a fresh run: nothing said it was done.
    metrics = run_copy / "metrics.json"
    before = (metrics.read_bytes(), os.stat(metrics).st_ino)

    def no_evaluation(self, progress):
        raise AssertionError("the final evaluation ran again")

    monkeypatch.setattr(T.Trainer, "_final_evaluation", no_evaluation)
    rc = main(["train", str(tiny_data), "--out", str(run_copy), *CLI_ARGS, "--resume"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (metrics.read_bytes(), os.stat(metrics).st_ino) == before  # not even replaced
    assert f"{run_copy}: already finished (1 epoch(s)), nothing to resume" in err
    assert "test accuracy" in out  # the stored metrics are reported as before


def test_resume_after_a_kill_in_the_final_evaluation_evaluates(run_copy, tiny_data):
    # every epoch checkpointed but no metrics.json (killed while evaluating): not finished
    stored = (run_copy / "metrics.json").read_text()
    (run_copy / "metrics.json").unlink()
    metrics = train(tiny_data, _cfg(), run_copy, resume=True, progress=False)
    assert (run_copy / "metrics.json").read_text() == stored
    assert metrics["epochs"] == 1


# ---------------------------------------------------------------- killed writes


def test_temporaries_of_killed_writes_are_removed(run_copy, tiny_data):
    # Before: a SIGKILL inside atomic_torch_save (reproduced: fsync slowed, process killed)
    # left ".checkpoint.pt.<random>.tmp" (a whole checkpoint) in the run folder for good.
    stale = [run_copy / ".checkpoint.pt.lyuo4_9y.tmp",
             run_copy / ".checkpoint.pt.sha256.pending.k2j3h4g5.tmp",
             run_copy / ".best.pt.a1b2c3d4.tmp", run_copy / ".history.csv.zz9yy8xx.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    other = run_copy / ".notes.txt.a1b2c3d4.tmp"  # not the trainer's: kept
    other.write_bytes(b"x")
    train(tiny_data, _cfg(), run_copy, resume=True, progress=False)
    assert [p for p in stale if p.exists()] == []
    assert other.exists()


# ---------------------------------------------------------------- torchrun: one error line


class _Stopped(BaseException):
    """Stands in for torchrun's SIGTERM once local rank 0 has reported and exited."""


@pytest.mark.parametrize(("env", "waits"), [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, True),
    ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, False),  # a node's first process
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, False),
    ({}, False),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "3"}, False),
])
def test_hold_back_user_error_only_on_other_local_ranks(monkeypatch, env, waits):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    slept: list[float] = []
    monkeypatch.setattr(D.time, "sleep", slept.append)
    D.hold_back_user_error(CausalignError("x"))
    assert slept == ([D.QUIET_RANK_GRACE_S] if waits else [])
    slept.clear()
    D.hold_back_user_error(D.mark_rank_local(CausalignError("nan on rank 1")))
    assert slept == []  # a rank's own error is printed at once


def test_cli_error_is_left_to_local_rank_zero(monkeypatch, capsys, tmp_path):
    # Before: under torchrun every rank printed the same "error: ..." line.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")

    def stopped(seconds):
        raise _Stopped  # torchrun ends this rank while it waits

    monkeypatch.setattr(D.time, "sleep", stopped)
    with pytest.raises(_Stopped):
        main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert capsys.readouterr().err == ""
    # a rank that torchrun did not stop (an error rank 0 does not share) still says it
    monkeypatch.setattr(D.time, "sleep", lambda s: None)
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]


@pytest.mark.slow  # two fresh interpreters under torchrun (~15 s on 2 cores)
def test_torchrun_user_error_is_printed_once(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this interpreter")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(port), "-m", "causalign",
           "train", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--device",
           "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: {tmp_path / 'missing'}: dataset folder does not exist"], lines


def test_a_resume_records_its_machine(tiny_data, tmp_path, monkeypatch):
    # config.yaml's `environment` is the first start's: a run resumed on another machine,
    # torch or thread count (which change the bits) left no trace of it
    import json

    import causalign.engine.trainer as trainer_module

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_mid_epoch(m, "erm", epoch=2, after_steps=1)
        with pytest.raises(_Stop):
            train(tiny_data, _cfg("erm", epochs=2), run, progress=False)
    assert not (run / "resumes.json").exists()
    real = trainer_module.environment
    monkeypatch.setattr(trainer_module, "environment",
                        lambda *a, **k: {**real(*a, **k), "platform": "the other machine"})
    train(tiny_data, _cfg("erm", epochs=2), run, resume=True, progress=False)
    records = json.loads((run / "resumes.json").read_text())
    assert [r["from_epoch"] for r in records] == [1]
    assert records[0]["environment"]["platform"] == "the other machine"
    config = (run / "config.yaml").read_text()
    assert "the other machine" not in config  # the first start's record is kept
    # a finished run's --resume trains nothing and records nothing
    train(tiny_data, _cfg("erm", epochs=2), run, resume=True, progress=False)
    assert len(json.loads((run / "resumes.json").read_text())) == 1
