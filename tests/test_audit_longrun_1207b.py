"""Long-run audit: what only shows after many epochs or on large splits (progress display,
run-folder growth, per-epoch cost)."""

from __future__ import annotations

import re

import pytest

from causalign.engine.progress import progress_bar


@pytest.fixture
def live_terminal(monkeypatch):
    """stderr taken for an interactive 12-row terminal (rich's env overrides), as a user's."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("LINES", "12")
    monkeypatch.setenv("COLUMNS", "100")
    for key in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(key, raising=False)


def test_a_live_display_keeps_the_running_epoch_visible_after_many_epochs(live_terminal,
                                                                           capsys):
    # rich kept every finished epoch's bar in the redrawn frame and cropped a frame taller
    # than the terminal with "...": from epoch ~11 in 12 rows the running epoch (its loss)
    # was cut off for the rest of a 100-epoch run
    with progress_bar(True) as progress:
        assert progress.live.is_started and progress.console.is_interactive
        for epoch in range(1, 31):
            task = progress.add_task(f"epoch {epoch}/31", total=2)
            progress.update(task, advance=2, description=f"epoch {epoch}/31 loss 0.5")
        running = progress.add_task("epoch 31/31", total=2)
        progress.update(running, advance=1, description="epoch 31/31 loss 0.25")
        console = progress.console
        frame = console.render_lines(progress.get_renderable(), console.options, pad=False)
        text = "\n".join("".join(s.text for s in line) for line in frame)
        assert len(frame) < console.height, "the live frame is taller than the terminal"
        assert "epoch 31/31 loss 0.25" in text
        assert "epoch 1/31" not in text  # finished epochs left the frame...
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err)  # colours, cursor
    for epoch in (1, 15, 30):  # ...each printed once, above it (the scrollback)
        assert err.count(f"epoch {epoch}/31 loss 0.5 ") == 1


def test_a_hidden_finished_task_still_takes_updates(live_terminal):
    with progress_bar(True) as progress:
        task = progress.add_task("evaluating", total=1)
        progress.advance(task)
        progress.update(task, description="evaluating done")  # no KeyError
        progress.advance(task)
