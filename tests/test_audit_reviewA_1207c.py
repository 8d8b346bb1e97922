"""Review of the 2026-12-07 session's newest commits (part A): regressions found there."""

from __future__ import annotations

from pathlib import Path

from causalign.engine.trainer import remove_stale_temporaries


def test_a_killed_predictions_write_leaves_no_temporary(tmp_path: Path) -> None:
    # training writes predictions_{val,test}.csv atomically (1fb5761); a SIGKILL during that
    # write leaves '.predictions_val.csv.<random>.tmp', which a resume must clean up as it
    # does for the run's other outputs
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".predictions_val.csv.ab12cd.tmp", run / ".predictions_test.csv.x9.tmp",
             run / ".metrics.json.q1.tmp"]
    for p in stale:
        p.write_text("partial")
    keep = run / "predictions_val.csv"
    keep.write_text("id\n")
    removed = remove_stale_temporaries(run)
    assert sorted(removed) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert keep.exists()


def test_evaluate_refuses_one_file_for_out_and_predictions(tiny_data, tmp_path, capsys):
    # `evaluate --out F --predictions ./F` wrote the CSV, then the JSON over it: exit 0 and
    # the predictions were gone. Refused before any work, in one line.
    from causalign.cli import main
    from causalign.engine import TrainConfig, train

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    capsys.readouterr()
    target = tmp_path / "both.out"
    rc = main(["evaluate", str(run), "--split", "val", "--out", str(target),
               "--predictions", str(tmp_path / "." / "both.out"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "--out" in lines[0] and "--predictions" in lines[0]
    assert not target.exists()
