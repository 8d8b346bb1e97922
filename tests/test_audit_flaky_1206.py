"""Races audit (flaky, 2026-12-06): what could fail by chance of timing, on a loaded 2-core CI
machine or for a user, made deterministic."""

from __future__ import annotations

import io
import os
import threading

import pytest
from rich.console import Console
from rich.progress import MofNCompleteColumn, TextColumn


def test_a_heartbeat_decided_as_a_task_finishes_does_not_repeat_its_finished_line(monkeypatch):
    # rich's refresh thread decided a heartbeat, then built its line outside any lock: a task
    # finishing meanwhile made the heartbeat show the finished state, so the finished line
    # came twice, the second after the caller's own print had returned (7 of 300 tries with
    # a 1 µs switch interval; test_audit_obs's heartbeat test reads that late line).
    # The refresh thread is played by `beat`, stopped where the line is built.
    from causalign.engine import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    buf = io.StringIO()
    bar = progress._line_progress_class()(TextColumn("{task.description}"),
                                          MofNCompleteColumn(), auto_refresh=False,
                                          console=Console(file=buf, width=60))
    decided, go = threading.Event(), threading.Event()
    real = bar.make_tasks_table

    def make_tasks_table(tasks):
        if threading.current_thread().name == "beat" and not decided.is_set():
            decided.set()
            go.wait(5)
        return real(tasks)

    bar.make_tasks_table = make_tasks_table
    with bar:
        task = bar.add_task("benchmark", total=3)
        beat = threading.Thread(target=bar._print_line, args=(task,), name="beat")
        beat.start()
        assert decided.wait(5)
        finish = threading.Thread(target=bar.advance, args=(task, 3))
        finish.start()
        finish.join(0.5)  # fixed: waits for the heartbeat (its line shows 0/3)
        go.set()
        beat.join(5)
        finish.join(5)
    lines = buf.getvalue().splitlines()
    assert lines == ["benchmark 0/3", "benchmark 3/3"], lines


def test_the_suite_runs_in_a_neutral_environment():
    # FORCE_COLOR=1 (common in CI workflows) made 3 output tests of test_audit_obs fail, as did
    # TTY_COMPATIBLE/TTY_INTERACTIVE=1 and COLUMNS=30; CAUSALIGN_TRACEBACK=1 (a developer
    # debugging) failed test_cli_contract's one-line errors. conftest removes them.
    names = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES",
             "CAUSALIGN_TRACEBACK")
    assert [n for n in names if n in os.environ] == []
    assert Console(file=io.StringIO()).is_terminal is False  # rich: a file is no terminal


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_reading_the_umask_for_an_atomic_write_does_not_set_it(tmp_path, monkeypatch):
    # every atomic write read the umask by setting it to 022 and back: meanwhile a file any
    # other thread created got 022's mode under the user's 077, and two threads writing at
    # once could leave the process at 022 for good
    from causalign import io as cio

    calls = []
    real = os.umask
    monkeypatch.setattr(cio.os, "umask", lambda m: calls.append(m) or real(m))
    old = real(0o077)
    try:
        assert cio._current_umask() == 0o077
        cio.atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        real(old)
    assert calls == []
    assert (os.stat(tmp_path / "m.json").st_mode & 0o777) == 0o600
