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
        finally:
            if not progress.tasks:  # nothing shown: stop silently (rich would print "\n")
                progress.live.transient = True
                progress.live.stop()
                progress.disable = True
