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


def _one_class_suite(tmp_path):
    fx = write_folder(tmp_path / "src")
    data = tmp_path / "data"
    run_import("folder", fx["root"], data, {"size": 32})
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: noise\ndefaults: {epochs: 1, width: 4, batch_size: 8, device: cpu}\n"
        f"datasets:\n  folder: {{path: {data}}}\n"
        "experiments:\n  t:\n    title: t\n    datasets: [folder]\n"
        "    methods: [erm, rrr]\n    seeds: [0, 1]\n    rows: method\n"
        "    metrics: [test.accuracy]\n", encoding="utf-8")
    return suite


def test_benchmark_says_a_datasets_one_class_val_split_once(tmp_path, capsys):
    # every run on the dataset warned the same line (4 runs: 4 lines), naming no dataset
    suite = _one_class_suite(tmp_path)
    capsys.readouterr()
    rc = main(["benchmark", str(suite), "--out", str(tmp_path / "b"), "--no-progress",
               "--no-report"])
    cap = capsys.readouterr()
    err = cap.err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "the val split holds only" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("warning: folder/"), lines[0]  # names the run, so the dataset
    # the table's notes (stdout, tables.md, report.html): one note, not one per run
    notes = [ln for ln in cap.out.splitlines() if "the val split holds only" in ln]
    assert len(notes) == 1, cap.out
    assert "and 3 other run(s): warning:" in notes[0], notes[0]


def test_benchmark_warnings_still_reach_a_recording_caller(tmp_path):
    # catch_warnings(record=True) (pytest.warns, a notebook) gets the warning, once
    import warnings

    from causalign.engine.benchmark import load_suite, run_suite

    suite = _one_class_suite(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_suite(load_suite(suite), tmp_path / "b", progress=False, report=False,
                  log=lambda _: None)
    hits = [w for w in caught if "the val split holds only" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
