"""`data_info_from_disk` (run loading, the channel check of `evaluate`, `explain`,
`predict`) reads only the manifest's first record: `evaluate` parsed a whole manifest three
times (about 1 s each at 23,000 rows on this machine), where loading the split parses and
checks it once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from causalign.cli import main
from causalign.data.format import LesionDataset, read_manifest, read_meta
from causalign.engine import TrainConfig, train
from causalign.engine.trainer import data_info_from_disk
from causalign.errors import DataError


def _break_last_row(data: Path) -> int:
    """Give the manifest's last row a label outside the classes; returns its line number."""
    lines = (data / "manifest.csv").read_text().splitlines()
    cells = lines[-1].split(",")
    cells[2] = "7"  # id, split, label, ...
    lines[-1] = ",".join(cells)
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    return len(lines)


def test_read_manifest_limit_stops_after_the_first_records(tiny_data):
    """``limit=k`` gives the manifest's first k records, equal to the full parse's."""
    meta = read_meta(tiny_data)
    full = read_manifest(tiny_data, meta)
    assert read_manifest(tiny_data, meta, limit=1) == full[:1]
    assert read_manifest(tiny_data, meta, limit=5) == full[:5]
    assert read_manifest(tiny_data, meta, limit=10 ** 6) == full


def test_data_info_reads_only_the_first_record(tiny_data, tmp_path):
    """A broken last row does not reach `data_info_from_disk` (it no longer parses the rest;
    failed before: the whole manifest was parsed there), while loading a split still
    refuses it, naming the line."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    line = _break_last_row(data)
    info = data_info_from_disk(data)
    assert info.num_classes == 2 and info.image_shape == (1, 32, 32)
    with pytest.raises(DataError, match=rf"manifest.csv:{line}: label 7 outside"):
        read_manifest(data)
    with pytest.raises(DataError, match=rf"manifest.csv:{line}: label 7 outside"):
        LesionDataset(data, "test")


def test_evaluate_still_refuses_a_broken_manifest_row_in_one_line(tiny_data, tmp_path,
                                                                   capsys):
    """Guard: `evaluate --data` on a dataset with a broken row exits non-zero with one line
    naming the manifest line (the split's own parse)."""
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    line = _break_last_row(data)
    code = main(["evaluate", str(run), "--data", str(data), "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None)
    assert len(err) == 1 and f"manifest.csv:{line}: label 7 outside" in err[0], err
