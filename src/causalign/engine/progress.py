"""The one progress-bar style of every long job: rich, on stderr, `None` when switched off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


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
    progress = Progress(*columns, console=Console(stderr=True))
    with progress:
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


def _stop_silently(progress: Progress) -> None:
    """Stop without a trace: transient erases the bar, and `disable` skips the blank line
    `Progress.stop` prints off a terminal."""
    progress.live.transient = True
    progress.live.stop()
    progress.disable = True
