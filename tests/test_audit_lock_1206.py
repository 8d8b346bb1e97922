"""Concurrent use of one folder: a second writer (the same job launched twice, a --resume
while the run still trains) is refused at once, naming the other process; the lock dies
with its holder (even by SIGKILL), so a lock file left behind blocks nobody."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from causalign.cli import main
from causalign.io import LOCK_NAME, FolderInUse, check_folder_free, folder_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

# another process holding the lock as `folder_lock` does; plain Python (no torch import), so
# it starts in well under a second
_HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".causalign.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid {os.getpid()} on testhost, `causalign train`".encode())
    print("locked", flush=True)
    sys.stdin.read()
""")


@contextmanager
def held_by_other_process(folder: Path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(10)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lock") / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "threads=1", "--no-progress"]) == 0
    return run


def _one_line_naming(capsys, folder: Path, pid: int) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(folder) in err and f"pid {pid}" in err and "in use" in err, err
    return err


def test_train_into_a_folder_another_process_trains_is_refused(tiny_data, tmp_path, capsys):
    # before: the second `train --out RUN` trained too (both exit 0, one run's files
    # written by two processes); with --resume it resumed the first's checkpoint alike
    out = tmp_path / "run"
    with held_by_other_process(out) as holder:
        argv = ["train", str(tiny_data), "--method", "erm", "--out", str(out), "--epochs", "1",
                "--set", "width=4", "--no-progress"]
        assert main(argv) == 2
        _one_line_naming(capsys, out, holder.pid)
        assert main(argv + ["--resume"]) == 2
        _one_line_naming(capsys, out, holder.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    # released (the holder exited): the same command now trains
    assert main(argv) == 0
    assert (out / "metrics.json").is_file()


def test_train_refusal_names_the_process_not_its_first_checkpoint(tiny_data, tiny_run, tmp_path,
                                                                  capsys):
    # a run that has its first checkpoint already read "already holds a run (pass --resume
    # to continue it)", and --resume then trained it twice
    with held_by_other_process(tiny_run) as holder:
        assert main(["train", str(tiny_data), "--method", "erm", "--out", str(tiny_run),
                     "--epochs", "1", "--set", "width=4", "--no-progress"]) == 2
        _one_line_naming(capsys, tiny_run, holder.pid)


@pytest.mark.parametrize("command", ["counterfactual", "explain"])
def test_export_into_a_folder_in_use_is_refused(command, tiny_run, tmp_path, capsys):
    out = tmp_path / "cf"
    argv = [command, str(tiny_run), "--out", str(out), "--limit", "2", "--no-progress"]
    if command == "counterfactual":
        argv += ["--steps", "2"]
    with held_by_other_process(out) as holder:
        assert main(argv) == 2
        _one_line_naming(capsys, out, holder.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert main(argv) == 0
    assert (out / "summary.json").is_file()


def test_benchmark_into_a_folder_in_use_is_refused(tmp_path, capsys):
    # before: the second benchmark resumed the runs the first was training and deleted
    # the dataset it was still generating (an interrupted generation, to it)
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""
        name: s
        defaults: {epochs: 1, width: 4, batch_size: 16, device: cpu, threads: 1}
        datasets:
          pm: {synth: {n_train: 16, n_val: 8, n_test: 8, size: 32, seed: 0}}
        experiments:
          t: {datasets: [pm], methods: [erm], seeds: [0], rows: method,
              metrics: [test.accuracy]}
    """))
    out = tmp_path / "bench"
    with held_by_other_process(out) as holder:
        assert main(["benchmark", str(suite), "--out", str(out), "--no-report",
                     "--no-progress"]) == 2
        _one_line_naming(capsys, out, holder.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_sigkilled_holder_leaves_a_lock_file_that_blocks_nobody(tmp_path):
    out = tmp_path / "run"
    with held_by_other_process(out) as holder:
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            check_folder_free(out)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    assert (out / LOCK_NAME).exists()  # stale: left by the killed holder
    check_folder_free(out)
    with folder_lock(out, "causalign train"):
        text = (out / LOCK_NAME).read_text()
        assert text.startswith(f"pid {os.getpid()} ") and "causalign train" in text
    assert sorted(p.name for p in out.iterdir()) == []  # released: the lock file is removed


def test_lock_is_reentrant_in_its_thread_refused_in_another(tmp_path):
    out = tmp_path / "x"
    errors = []

    def other() -> None:
        try:
            with folder_lock(out, "other"):
                pass
        except FolderInUse as exc:
            errors.append(str(exc))

    with folder_lock(out, "outer"), folder_lock(out, "inner"):  # the CLI, then the exporter
        check_folder_free(out)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread" in errors[0]
    assert not out.exists()  # created by the lock and left empty: removed with it


def test_lock_keeps_a_folder_it_did_not_create_or_that_got_outputs(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with folder_lock(kept, "x"):
        pass
    assert kept.is_dir() and not any(kept.iterdir())
    new = tmp_path / "new"
    with folder_lock(new, "x"):
        (new / "summary.json").write_text("{}")
    assert (new / "summary.json").is_file()
    with pytest.raises(Exception, match="not a folder"):
        with folder_lock(new / "summary.json", "x"):
            pass


def _save_during(monkeypatch, path: Path, hook_on: str, new) -> None:
    """Run one whole `atomic_torch_save` of ``new`` right after the reader's first read of
    the file whose name ends in ``hook_on`` (a trainer saving while `load_run` reads)."""
    from causalign.io import atomic_torch_save

    real_bytes, real_text = Path.read_bytes, Path.read_text
    fired = []

    def fire(self) -> None:
        if not fired and self.name.endswith(hook_on):
            fired.append(self)
            atomic_torch_save(path, new)

    def read_bytes(self):
        data = real_bytes(self)
        fire(self)
        return data

    def read_text(self, *a, **k):
        text = real_text(self, *a, **k)
        fire(self)
        return text

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "read_text", read_text)


def test_checkpoint_replaced_while_read_is_not_reported_corrupt(tmp_path, monkeypatch):
    # before: the old bytes were checked against the digest of the new file saved
    # meanwhile: "checkpoint is corrupt or truncated" for a whole, valid file
    import torch

    from causalign.engine.trainer import load_checkpoint
    from causalign.io import atomic_torch_save

    path = tmp_path / "best.pt"
    atomic_torch_save(path, {"epoch": 1})
    _save_during(monkeypatch, path, "best.pt", {"epoch": 2})
    assert load_checkpoint(path)["epoch"] in (1, 2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 2
    torch.save({"epoch": 3}, path)  # a real corruption (digest of another file) still fails
    with pytest.raises(Exception, match="corrupt"):
        load_checkpoint(path)


def test_pending_digest_renamed_while_read_is_not_reported_corrupt(tmp_path, monkeypatch):
    # the writer between its two renames: data new, digest old, pending = new digest. Its
    # last rename landed between the reader's two digest reads: the pending one was gone
    # (a FileNotFoundError, or "corrupt" when its exists() came after the rename)
    from causalign.io import atomic_torch_save, verified_bytes

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"epoch": 1})
    old_sha = (tmp_path / "checkpoint.pt.sha256").read_text()
    atomic_torch_save(path, {"epoch": 2})
    pending = tmp_path / "checkpoint.pt.sha256.pending"
    os.replace(tmp_path / "checkpoint.pt.sha256", pending)
    (tmp_path / "checkpoint.pt.sha256").write_text(old_sha)
    real_text = Path.read_text

    def read_text(self, *a, **k):
        text = real_text(self, *a, **k)
        if self.name == "checkpoint.pt.sha256" and pending.exists():
            os.replace(pending, self)  # the writer's last step
        return text

    monkeypatch.setattr(Path, "read_text", read_text)
    assert verified_bytes(path) == path.read_bytes()


def test_only_rank_zero_checks_and_locks_the_run_folder(tiny_data, tmp_path, monkeypatch):
    # under torchrun rank 0 holds the lock: the other ranks, which never write the run
    # folder, must not refuse it as "in use"
    from causalign.engine.trainer import Trainer

    out = tmp_path / "run"
    cfg = {"method": "erm", "epochs": 1, "width": 4}
    with held_by_other_process(out):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        Trainer(tiny_data, cfg, out)  # no FolderInUse
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(FolderInUse):
            Trainer(tiny_data, cfg, out)


def test_counterfactual_summary_names_the_weights_it_used_while_training_writes(
        tiny_run, tmp_path, monkeypatch, capsys):
    # a run still training: best.pt was replaced after `load_run` read it, and summary.json
    # hashed the file again, naming weights the counterfactuals did not come from
    import json
    import shutil

    import torch

    import causalign.engine.trainer as trainer
    from causalign.io import atomic_torch_save

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    used = (run / "best.pt.sha256").read_text().split()[0]
    real = trainer.load_run

    def load_then_train_on(*a, **k):
        loaded = real(*a, **k)
        state = trainer.load_checkpoint(run / "best.pt")
        state["model"] = {k: v + 1 if torch.is_floating_point(v) else v
                          for k, v in state["model"].items()}
        atomic_torch_save(run / "best.pt", state)  # the next epoch's best
        return loaded

    monkeypatch.setattr(trainer, "load_run", load_then_train_on)
    out = tmp_path / "cf"
    assert main(["counterfactual", str(run), "--limit", "1", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 0
    prov = json.loads((out / "summary.json").read_text())["provenance"]
    assert prov["weights"] == "best.pt" and prov["weights_sha256"] == used
    assert (run / "best.pt.sha256").read_text().split()[0] != used


def test_a_lock_file_removed_by_its_releaser_as_it_is_opened_is_not_held(tmp_path,
                                                                         monkeypatch):
    # the previous holder unlinked the file between our open and flock: a lock on that
    # orphan would not exclude the next process, which creates and locks a new file
    import fcntl

    import causalign.io as cio

    out = tmp_path / "run"
    out.mkdir()
    real, calls = fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:
            os.unlink(out / LOCK_NAME)  # the releaser's last step
        return real(fd, op)

    monkeypatch.setattr(cio.fcntl, "flock", flock)
    with folder_lock(out, "causalign train"):
        monkeypatch.setattr(cio.fcntl, "flock", real)
        assert len(calls) == 2  # the orphan was dropped, the new file locked
        probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import fcntl, os, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("free")
            except OSError:
                print("held")
        """), str(out / LOCK_NAME)], capture_output=True, text=True, check=True)
        assert probe.stdout.strip() == "held"


def test_data_synth_and_import_into_a_folder_in_use_are_refused(tmp_path, capsys):
    # before: two `data synth OUT` at once both passed the emptiness check (the other had
    # not written yet) and wrote every file twice; two imports replayed one journal
    out = tmp_path / "data"
    synth = ["data", "synth", str(out), "--n-train", "8", "--n-val", "4", "--n-test", "4",
             "--size", "32", "--no-examples", "--no-progress"]
    with held_by_other_process(out) as holder:
        assert main(synth) == 2
        _one_line_naming(capsys, out, holder.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert main(synth) == 0  # the dead holder's lock file is no "not empty" folder
    assert (out / "manifest.csv").is_file() and not (out / LOCK_NAME).exists()
    src = tmp_path / "src"
    for label in ("benign", "malignant"):
        (src / label).mkdir(parents=True)
        for i in range(2):
            png = sorted((out / "images").rglob("*.png"))[i]  # any PNG will do
            (src / label / f"{i}.png").write_bytes(png.read_bytes())
    imported = tmp_path / "imported"
    with held_by_other_process(imported) as holder:
        assert main(["data", "import", "folder", str(src), str(imported),
                     "--no-progress"]) == 2
        _one_line_naming(capsys, imported, holder.pid)
    assert main(["data", "import", "folder", str(src), str(imported), "--no-progress"]) == 0
    assert (imported / "manifest.csv").is_file() and not (imported / LOCK_NAME).exists()
