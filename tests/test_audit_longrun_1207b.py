"""Long-run audit: what only shows after many epochs or on large splits (progress display,
run-folder growth, per-epoch cost)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from causalign.data.format import LesionDataset
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
        (state,) = [t for t in progress.tasks if t.id == task]
        # retired from the live frame, yet the updates after that still landed
        assert not state.visible and state.finished
        assert state.description == "evaluating done" and state.completed == 2


def _count_reads(monkeypatch) -> list[str]:
    """File names `LesionDataset` reads (images and masks), recorded in the returned list."""
    from causalign.data import format as fmt

    reads: list[str] = []
    real = fmt.load_array

    def counted(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(fmt, "load_array", counted)
    return reads


def test_synth_examples_read_only_the_samples_they_show(tiny_data, tmp_path, monkeypatch):
    # examples.png shows 16 training samples, but `data synth` read, decoded and validated
    # the whole training split for it (~2 min of a 20000-image synth)
    from causalign.cli import write_examples

    reads = _count_reads(monkeypatch)
    write_examples(tiny_data, tmp_path / "examples.png", n=4)
    assert (tmp_path / "examples.png").stat().st_size > 0
    assert sorted(set(reads)) == [f"train_{i:05d}.png" for i in range(4)], reads


def test_a_limited_dataset_is_the_first_samples_of_the_whole_one(tiny_data):
    whole = LesionDataset(tiny_data, "test")
    first = LesionDataset(tiny_data, "test", limit=5)
    assert len(first) == 5 and first.records == whole.records[:5]
    assert first.sites == whole.sites
    a, b = first.batch(torch.arange(5)), whole.batch(torch.arange(5))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].nan_to_num(-7), b[key].nan_to_num(-7)), key
    assert len(LesionDataset(tiny_data, "test", limit=10**6)) == len(whole)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="limit"):
            LesionDataset(tiny_data, "test", limit=bad)


def test_explain_with_a_limit_reads_only_those_samples(tiny_data, tmp_path, monkeypatch,
                                                        capsys):
    # `explain --limit 32` (the default) read and validated the whole split first: minutes
    # for 32 maps of a 20000-image test split
    from causalign.cli import main
    from causalign.engine import trainer
    from causalign.engine.config import TrainConfig
    from causalign.methods import build_method

    def untrained_run(run, device="auto", data=None):  # a run's model, without training one
        cfg = TrainConfig(width=4)
        method = build_method("erm", {})
        model = method.build_model(cfg, trainer.data_info_from_disk(tiny_data)).eval()
        return cfg, model, method, tiny_data

    monkeypatch.setattr(trainer, "load_run", untrained_run)
    reads = _count_reads(monkeypatch)
    assert main(["explain", str(tmp_path / "run"), "--saliency", "gradient", "--out",
                 str(tmp_path / "ex"), "--limit", "3", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert len(list((tmp_path / "ex" / "maps").glob("*.npy"))) == 3
    assert sorted({r for r in reads if r.startswith("test_")}) == \
        [f"test_{i:05d}.png" for i in range(3)], reads
