"""Warning noise in normal use (audit 2026-12-07): each warning said once, and only where
it is true."""
from __future__ import annotations

from fixtures_real import write_folder

from causalign.cli import main
from causalign.data.importers import run_import


def test_train_says_a_one_class_val_split_once(tmp_path, capsys):
    # the folder fixture at seed 0 gives a val split of one healthy sample: the setup warns
    # before training, and the closing list of metrics.json's warnings printed it again
    fx = write_folder(tmp_path / "src")
    data = tmp_path / "data"
    run_import("folder", fx["root"], data, {"size": 32})
    capsys.readouterr()
    rc = main(["train", str(data), "--method", "erm", "--out", str(tmp_path / "run"),
               "--epochs", "1", "--batch-size", "8", "--set", "width=4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("the val split holds only") == 1, err
