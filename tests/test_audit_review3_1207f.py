"""Review of predict / compare / export (review3): regression tests of the defects found by
running them, and guards of what was checked and found right."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_audit_compare_1207f import _error_line, _write_csv

from causalign.cli import main


def _pair(tmp_path, classes_b):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(20)]
    y = np.array([0, 1] * 10)
    _write_csv(tmp_path / "a.csv", ids, y, rng.dirichlet([1, 1], 20))
    p = rng.dirichlet([1, 1], 20)
    _write_csv(tmp_path / "b.csv", ids, y, p, classes_b)
    return tmp_path / "a.csv", tmp_path / "b.csv"


@pytest.mark.parametrize("classes_b", [("malignant", "benign"), ("normal", "tumour")])
def test_compare_refuses_predictions_of_other_class_names_or_order(tmp_path, capsys,
                                                                   classes_b):
    """Only the number of classes was compared: a CSV whose columns read p_malignant,
    p_benign (another class order: its label 0 means malignant) or other class names was
    compared position by position, the AUC of B read off the wrong column."""
    a, b = _pair(tmp_path, classes_b)
    line = _error_line(capsys, ["compare", str(a), str(b)])
    assert "classes" in line and "benign" in line and classes_b[0] in line


def test_compare_same_classes_still_compares(tmp_path, capsys):
    """Guard: the same class names in the same order compare as before."""
    a, b = _pair(tmp_path, ("benign", "malignant"))
    assert main(["compare", str(a), str(b)]) in (0, None)
    assert json.loads(capsys.readouterr().out)["classes"] == ["benign", "malignant"]


def _run_dir(path, digest, ids, y, p):
    _write_csv(path / "predictions_test.csv", ids, y, p)
    (path / "config.yaml").write_text(f"method: erm\ndata: /x/{path.name}\n"
                                      f"data_content_digest: {digest}\n")
    return path


def test_compare_warns_when_run_folders_trained_on_different_datasets(tmp_path, capsys):
    """Two runs of different datasets (two `data synth` seeds: ids test_00000… in both) were
    compared sample by sample whenever their labels happened to agree, with nothing said; a
    label disagreement did not say why. Their config.yaml's data_content_digest tells."""
    rng = np.random.default_rng(0)
    ids = [f"test_{i:05d}" for i in range(12)]
    y = np.array([0, 1] * 6)
    a = _run_dir(tmp_path / "a", "1111", ids, y, rng.dirichlet([1, 1], 12))
    b = _run_dir(tmp_path / "b", "2222", ids, y, rng.dirichlet([1, 1], 12))
    assert main(["compare", str(a), str(b)]) in (0, None)
    err = capsys.readouterr().err
    assert "warning:" in err and "different datasets" in err, err
    y2 = y.copy()
    y2[0] = 1
    c = _run_dir(tmp_path / "c", "3333", ids, y2, rng.dirichlet([1, 1], 12))
    line = _error_line(capsys, ["compare", str(a), str(c)])
    assert "disagree on the label" in line and "different datasets" in line
    # guard: the same digest (the same dataset) says nothing of the kind
    d = _run_dir(tmp_path / "d", "1111", ids, y, rng.dirichlet([1, 1], 12))
    assert main(["compare", str(a), str(d)]) in (0, None)
    assert "different datasets" not in capsys.readouterr().err


def _deep_run(root, kind):
    """A one-epoch run on a folder import of 12-bit PNGs (int_max 4095) or HU NPYs."""
    from PIL import Image

    from causalign.data.importers.run import run_import
    from causalign.engine import TrainConfig, train

    rng = np.random.default_rng(0)
    for c in ("benign", "malignant"):
        (root / "raw" / c).mkdir(parents=True)
        for i in range(8):
            if kind == "png16":
                Image.fromarray(rng.integers(0, 4000, (24, 24)).astype(np.uint16)).save(
                    root / "raw" / c / f"img{i}.png")
            else:
                np.save(root / "raw" / c / f"img{i}.npy",
                        rng.uniform(-1000, 1000, (24, 24)).astype(np.float32))
    run_import("folder", root / "raw", root / "data", {"size": 16})
    train(root / "data", TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0),
          root / "run", progress=False)
    return root / "run"


@pytest.mark.parametrize("kind", ["png16", "npy_hu"])
def test_predict_says_when_new_files_exceed_the_training_rule_and_are_clipped(tmp_path,
                                                                              kind):
    """A 16-bit scanner's PNGs (values up to 65535) on a run imported from 12-bit ones were
    divided by the training's 4095 and clipped at 1: 93 % of the pixels saturated, no
    warning (evaluate's intensity check sees values inside [0, 1]); likewise HU files
    beyond the training import's float range. Now a "clipped" data warning."""
    from PIL import Image

    from causalign.engine import predict_images

    run = _deep_run(tmp_path, kind)
    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(1)
    if kind == "png16":
        Image.fromarray(rng.integers(0, 65535, (24, 24)).astype(np.uint16)).save(new / "a.png")
        inside = rng.integers(0, 4000, (24, 24)).astype(np.uint16)
        Image.fromarray(inside).save(tmp_path / "inside.png")
    else:
        np.save(new / "a.npy", rng.uniform(-1000, 3000, (24, 24)).astype(np.float32))
        np.save(tmp_path / "inside.npy", rng.uniform(-900, 900, (24, 24)).astype(np.float32))
    res = predict_images(run, [new], device="cpu")
    assert "clipped" in res.warnings, res.warnings
    assert "clipped to" in res.warnings["clipped"]
    # guard: files within the training import's range are not flagged
    inside = tmp_path / ("inside.png" if kind == "png16" else "inside.npy")
    assert "clipped" not in predict_images(run, [inside], device="cpu").warnings


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    from causalign.data import SynthConfig, generate
    from causalign.engine import TrainConfig, train

    root = tmp_path_factory.mktemp("review3")
    generate(root / "data", SynthConfig(n_train=32, n_val=8, n_test=8, size=32))
    train(root / "data", TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0),
          root / "run", progress=False)
    return root / "data", root / "run"


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
                    ).save(path)
    return path


def test_predict_refuses_a_dataset_folder_among_other_inputs(synth_run, tmp_path, capsys):
    """`predict RUN DATA other.png` searched the dataset folder as plain files: its
    images/ and masks/ PNGs (masks as images) of all three splits, 226 rows for a 112-image
    dataset plus one file; `predict RUN DATA DATA` gave 450."""
    data, run = synth_run
    png = _png(tmp_path / "x.png")
    for argv in ([str(data), str(png)], [str(data), str(data)]):
        line = _error_line(capsys, ["predict", str(run), *argv, "--out",
                                    str(tmp_path / "p.csv"), "--no-progress"])
        assert "dataset folder" in line and str(data) in line, line
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_split_for_plain_files(synth_run, tmp_path, capsys):
    """--split acts on a dataset folder only; given with plain files (even a misspelt one,
    `--split bogus`) it was ignored without a word."""
    data, run = synth_run
    png = _png(tmp_path / "x.png")
    for split in ("val", "bogus"):
        line = _error_line(capsys, ["predict", str(run), str(png), "--split", split,
                                    "--out", str(tmp_path / "p.csv"), "--no-progress"])
        assert "--split" in line and "dataset folder" in line, line
    # guard: without --split, and with --split on the dataset folder, it predicts
    assert main(["predict", str(run), str(png), "--out", str(tmp_path / "p.csv"),
                 "--no-progress", "--device", "cpu"]) in (0, None)
    assert main(["predict", str(run), str(data), "--split", "val", "--out",
                 str(tmp_path / "q.csv"), "--no-progress", "--device", "cpu"]) in (0, None)
    with open(tmp_path / "q.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8


def test_predict_maps_of_plain_files_claim_no_label(synth_run, tmp_path, monkeypatch):
    """`predict --saliency --maps` on plain (unlabelled) files titled every overlay and grid
    row "y=benign" and wrote "label": 0 into summary.json: the placeholder label 0 of the
    temporary import shown as the image's true class."""
    import causalign.report.figures as figures
    from causalign.engine import predict_images

    titles = []
    real_overlay, real_grid = figures.overlay, figures.cam_grid
    monkeypatch.setattr(figures, "overlay", lambda *a, title="", **k: (
        titles.append(title), real_overlay(*a, title=title, **k))[1])
    monkeypatch.setattr(figures, "cam_grid", lambda *a, row_titles=None, **k: (
        titles.extend(row_titles or []), real_grid(*a, row_titles=row_titles, **k))[1])
    data, run = synth_run
    png = _png(tmp_path / "x.png")
    predict_images(run, [png], device="cpu", saliency="gradcam", maps=tmp_path / "m")
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["samples"][0]["label"] is None
    assert titles and not any("y=" in t for t in titles), titles
    # guard: a dataset input keeps its labels in the maps' titles and summary
    titles.clear()
    predict_images(run, data, device="cpu", saliency="gradcam", maps=tmp_path / "d")
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert all(isinstance(s["label"], int) for s in summary["samples"])
    assert all("y=" in t for t in titles)


def test_predict_fallback_warning_does_not_call_a_synthetic_dataset_an_old_import(
        synth_run, tmp_path):
    """A run on `data synth` data given a 16-bit PNG was told its dataset was "imported
    before it was recorded": synthetic data were never imported, so no rule exists."""
    from PIL import Image

    from causalign.engine import predict_images

    _, run = synth_run
    Image.fromarray(np.full((32, 32), 3000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.warns(UserWarning, match="records no intensity rule") as caught:
        predict_images(run, [tmp_path / "deep.png"], device="cpu")
    text = " ".join(str(w.message) for w in caught)
    assert "imported before it was recorded" not in text
    assert "synthetic" in text, text


def test_compare_names_predict_output_as_unlabelled(synth_run, tmp_path, capsys):
    """`predict`'s CSV of plain files (empty label column) given to compare was "label or
    probability is not a number": the value is missing, and compare needs labels."""
    _, run = synth_run
    png = _png(tmp_path / "x.png")
    assert main(["predict", str(run), str(png), "--out", str(tmp_path / "p.csv"),
                 "--no-progress", "--device", "cpu"]) in (0, None)
    capsys.readouterr()
    line = _error_line(capsys, ["compare", str(run), str(tmp_path / "p.csv")])
    assert "no label" in line and "predict" in line, line


def test_compare_reads_a_predictions_csv_saved_by_excel(tmp_path, capsys):
    """A predictions CSV opened and saved by Excel (UTF-8 with BOM, CRLF) was "not a
    predictions CSV (... has \\ufeffid, ...)"; the project's other CSV readers take it."""
    a, b = _pair(tmp_path, ("benign", "malignant"))
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + b.read_bytes().replace(b"\r\n", b"\n")
                      .replace(b"\n", b"\r\n"))
    assert main(["compare", str(a), str(excel)]) in (0, None)
    assert main(["compare", str(a), str(b)]) in (0, None)
    first, second = capsys.readouterr().out.split("}\n{", 1)
    assert json.loads(first + "}")["delong"] == json.loads("{" + second)["delong"]


def test_compare_names_the_file_and_line_of_a_non_finite_probability(tmp_path, capsys):
    """A hand-edited "nan" probability was refused as "probs hold 1 NaN/inf value(s): the
    model's outputs are not finite", naming neither file nor row."""
    a, b = _pair(tmp_path, ("benign", "malignant"))
    lines = b.read_text().splitlines()
    cells = lines[3].split(",")
    cells[4] = "nan"
    lines[3] = ",".join(cells)
    b.write_text("\n".join(lines) + "\n")
    line = _error_line(capsys, ["compare", str(a), str(b)])
    assert str(b) in line and "line 4" in line and "s2" in line, line


def test_export_record_carries_the_training_imports_intensity_rule(tmp_path):
    """causalign.json, "what a deployment needs to feed" the program, had the trained
    value range but not the import's rule mapping raw 12/16-bit or HU files to it
    (info.intensity_scale / data_intensity_scale, which `predict` applies)."""
    import torch

    from causalign.engine import export_run
    from causalign.engine.trainer import read_run_config

    run = _deep_run(tmp_path, "png16")
    export_run(run, tmp_path / "m.pt2")
    extra = {"causalign.json": ""}
    torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    record = json.loads(extra["causalign.json"])
    assert record["data_intensity_scale"] == read_run_config(run)["data_intensity_scale"]
    assert record["data_intensity_scale"]["int_max"] == 4095.0
