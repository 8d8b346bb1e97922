"""The one progress-bar style of every long job: rich, on stderr, `None` when switched off.

Off a terminal (a CI log, `2> log`) rich draws nothing until the bar stops and then prints
every task at once: a training run's log stayed empty until it ended, every line stamped with
the end time, and CI services that stop a job after 10 minutes without output (CircleCI,
Travis) stopped long runs. There each task prints its one line when it finishes, and a task
still running prints it once every `HEARTBEAT_S`, also while nothing advances it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

HEARTBEAT_S = 60.0  # off a terminal: a running task's line at most this often


@contextmanager
def progress_bar(enabled: bool = True, remaining: bool = True) -> Iterator[Progress | None]:
    """A rich `Progress` (description, bar, n/total, elapsed[, remaining]) on stderr.

    Yields None when `enabled` is false, so callers write `if progress is not None`. A
    display that never got a bar leaves no trace; in particular no blank line above an error,
    which the command line prints as its only line."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    console = Console(stderr=True)
    if (console.is_terminal and not console.is_jupyter and not is_tty(console.file)
            and os.environ.get("TTY_INTERACTIVE") != "1"):
        # FORCE_COLOR (set by many CI workflows) or TTY_COMPATIBLE makes rich take any file
        # for a terminal: a CI log then got ~10 redrawn frames a second on one line (10 KB
        # for 3 one-step epochs) instead of one line per task. Colour stays; redraws go.
        console = Console(stderr=True, force_interactive=False)
    if _lines_only(console):
        kind = _line_progress_class()
    elif console.is_jupyter:
        kind = Progress
    else:
        kind = _live_progress_class()
    progress = kind(*columns, console=console)
    try:
        progress.start()
    except BaseException:
        # Ctrl-C while rich waited for its refresh thread to start: `with progress` never
        # called stop, and the thread lived on (heartbeats into whatever ran next)
        _stop_silently(progress)
        raise
    try:
        yield progress
    except BaseException:
        # an error or Ctrl-C ends the job: erase the bar (off a terminal: do not print
        # its last frame), so the command line's `error: …` or `interrupted` stays the
        # only line on stderr
        _stop_silently(progress)
        raise
    finally:
        if not progress.tasks:  # nothing shown: stop silently
            _stop_silently(progress)
        progress.stop()  # what `with progress` did; nothing after _stop_silently


def _lines_only(console: Console) -> bool:
    """No live display: a file or pipe, a dumb terminal, or a terminal rich may not redraw
    (TTY_INTERACTIVE=0, a forced terminal that is a file): rich redraws none of them."""
    return not console.is_jupyter and (not console.is_terminal or console.is_dumb_terminal
                                       or not console.is_interactive)


def is_tty(stream: object) -> bool:
    """Whether ``stream`` is a terminal (False for a file, a pipe or a closed stream)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # closed
        return False


_LINE_PROGRESS: Any = None


def _line_progress_class() -> Any:
    """`Progress` printing a task's line when it finishes (and a heartbeat while it runs)
    instead of all of them when the display stops. Built on first use: rich is imported
    lazily, as above."""
    global _LINE_PROGRESS
    if _LINE_PROGRESS is not None:
        return _LINE_PROGRESS
    from rich.progress import Progress, TaskID

    class LineProgress(Progress):
        def __init__(self, *columns: Any, **kwargs: Any) -> None:
            # transient: the lines are out already, the final frame would repeat them; no
            # redirected stdout/stderr (on a forced terminal rich sent stdout to stderr, to
            # keep a live display below it that lines do not have)
            super().__init__(*columns, transient=True, redirect_stdout=False,
                             redirect_stderr=False, **kwargs)
            self._last_line: dict[TaskID, float] = {}  # task -> when its line was printed
            self._finished_lines: set[TaskID] = set()

        def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
            task_id = super().add_task(*args, **kwargs)
            self._last_line[task_id] = time.monotonic()  # a heartbeat HEARTBEAT_S later
            return task_id

        def update(self, task_id: TaskID, **kwargs: Any) -> None:
            super().update(task_id, **kwargs)
            self._print_line(task_id)

        def advance(self, task_id: TaskID, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._print_line(task_id)

        def get_renderable(self) -> Any:
            # rich's refresh thread calls this ~10 times a second, also while nothing
            # updates a bar: a benchmark's bar moves only between runs, and one run of 17
            # minutes left a CI log silent that long. Heartbeats come from here too.
            for task_id in list(getattr(self, "_last_line", ())):  # () while __init__ runs
                self._print_line(task_id)
            return super().get_renderable()

        def _print_line(self, task_id: TaskID) -> None:
            # the caller's thread and rich's refresh thread both get here. Decision, line and
            # print under Live's lock (the refresh thread holds it while calling in; taken
            # first, so the order is always Live's, then Progress's) and Progress's (what
            # update/advance hold while changing a task): with the print outside, a heartbeat
            # decided just before a task finished rendered the finished state, so the
            # finished line came twice, the second after the caller's own had returned
            with self.live._lock, self._lock:
                task = self._tasks.get(task_id)
                if (self.disable or task is None or not task.visible
                        or task_id in self._finished_lines):
                    return
                now = time.monotonic()
                if task.finished:
                    self._finished_lines.add(task_id)
                elif now - self._last_line.get(task_id, now) < HEARTBEAT_S:
                    return
                self._last_line[task_id] = now
                self.console.print(self.make_tasks_table([task]))

        def stop(self) -> None:
            if self.disable:
                return
            # a task that never finished (no total, or left short): its last state, once,
            # as rich printed every task at the end
            try:
                with self.live._lock, self._lock:  # as _print_line: no heartbeat between
                    for task in self.tasks:
                        if task.visible and task.id not in self._finished_lines:
                            self._finished_lines.add(task.id)
                            self.console.print(self.make_tasks_table([task]))
            finally:
                # also after Ctrl-C in a print above: else rich's refresh thread lived on,
                # printing heartbeats into whatever ran next in the process
                self.live.stop()  # without Progress.stop's blank line off a terminal

    _LINE_PROGRESS = LineProgress
    return LineProgress


_LIVE_PROGRESS: Any = None


def _live_progress_class() -> Any:
    """`Progress` for a live terminal whose finished tasks leave the display: their line is
    printed once above it (into the scrollback) and the task hidden. rich kept every finished
    task in the redrawn frame and crops a frame taller than the terminal with "...": from
    epoch ~24 of a 100-epoch run in a 24-row terminal the running epoch's bar (its loss) and
    then the final evaluation's were below the crop, the display looked frozen for the rest
    of the run, and each redraw (10 a second) rendered every past epoch again."""
    global _LIVE_PROGRESS
    if _LIVE_PROGRESS is not None:
        return _LIVE_PROGRESS
    from rich.progress import Progress, TaskID

    class LiveProgress(Progress):
        def update(self, task_id: TaskID, **kwargs: Any) -> None:
            super().update(task_id, **kwargs)
            self._retire(task_id)

        def advance(self, task_id: TaskID, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._retire(task_id)

        def _retire(self, task_id: TaskID) -> None:
            # Live's lock first, then Progress's: the order of rich's refresh thread (as in
            # LineProgress._print_line). A hidden task still takes updates (never a KeyError)
            with self.live._lock, self._lock:
                task = self._tasks.get(task_id)
                if self.disable or task is None or not task.visible or not task.finished:
                    return
                line = self.make_tasks_table([task])  # while visible: it skips hidden ones
                task.visible = False
                self.refresh()  # else the print below repeats the frame still holding it
                self.console.print(line)

    _LIVE_PROGRESS = LiveProgress
    return LiveProgress


def _stop_silently(progress: Progress) -> None:
    """Stop without a trace: transient erases the bar, and `disable` skips the blank line
    `Progress.stop` prints off a terminal."""
    progress.live.transient = True
    progress.live.stop()
    progress.disable = True
