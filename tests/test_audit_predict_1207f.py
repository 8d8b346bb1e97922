"""`causalign predict RUN INPUT --out FILE.csv`: a run's predictions on new, unlabelled images
(plain files preprocessed as `data import folder` stores them, or a dataset folder)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from fixtures_real import write_dicom
from PIL import Image

from causalign.cli import main
from causalign.data.importers.run import run_import
from causalign.engine import TrainConfig, predict_images, train
from causalign.errors import CausalignError

CLASSES = ("benign", "malignant")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _raw_tree(root: Path, n: int = 12, seed: int = 0) -> Path:
    """ROOT/<class>/imgK.png: 8-bit gray, non-square, of varied sizes (so the import pads
    and resizes), the malignant ones with a bright patch."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(30, 60, size=2))
            a = rng.integers(0, 120, size=(h, w)).astype(np.uint8)
            if c == "malignant":
                a[h // 3:h // 2, w // 3:w // 2] = 250
            Image.fromarray(a).save(root / c / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A raw PNG tree, its `data import folder` at 32 px, and a 1-epoch run on it."""
    base = tmp_path_factory.mktemp("predict")
    raw = _raw_tree(base / "raw")
    data = base / "data"
    run_import("folder", raw, data, {"size": 32})
    run = base / "run"
    train(data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)
    return {"raw": raw, "data": data, "run": run, "base": base}


def _probs(rows: list[dict]) -> dict[str, np.ndarray]:
    return {r["id"]: np.array([float(r[f"p_{c}"]) for c in CLASSES]) for r in rows}


def test_raw_files_give_the_imported_splits_probabilities(trained, tmp_path, capsys):
    """The equivalence that matters: `predict` on the raw files equals `evaluate
    --predictions` on the split `data import` made of them (same preprocessing)."""
    ev = tmp_path / "ev.csv"
    assert main(["evaluate", str(trained["run"]), "--predictions", str(ev), "--device", "cpu",
                 "--no-progress"]) in (0, None)
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(trained["run"]), str(trained["raw"]), "--out", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc in (0, None), capsys.readouterr().err
    want, got = _probs(_rows(ev)), _probs(_rows(out))
    assert len(got) == 2 * 12 and set(want) <= set(got)  # every raw file; ids as imported
    diff = max(float(np.abs(want[i] - got[i]).max()) for i in want)
    assert diff <= 1e-5, diff
    # the training images too (the run's own train split, read back as stored)
    res = predict_images(trained["run"], trained["data"], split="train", device="cpu")
    raw = predict_images(trained["run"], [trained["raw"] / "benign"], device="cpu")
    by_id = dict(zip(res.ids, res.probs, strict=True))
    for sid, p in zip(raw.ids, raw.probs, strict=True):
        if f"benign_{sid}" in by_id:
            assert np.abs(by_id[f"benign_{sid}"] - p).max() <= 1e-5


def test_csv_format(trained, tmp_path, capsys):
    out = tmp_path / "p.csv"
    files = sorted((trained["raw"] / "malignant").glob("*.png"))[:3]
    assert main(["predict", str(trained["run"]), *map(str, files), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) in (0, None)
    assert "3 images ->" in capsys.readouterr().out
    rows = _rows(out)
    assert list(rows[0]) == ["id", "source", "site", "label", "predicted", "p_benign",
                             "p_malignant", "predicted_class", "data_warning"]
    assert [r["id"] for r in rows] == [f.stem for f in files]
    assert [r["source"] for r in rows] == [str(f) for f in files]
    for r in rows:
        p = np.array([float(r["p_benign"]), float(r["p_malignant"])])
        assert p.sum() == pytest.approx(1.0) and int(r["predicted"]) == int(p.argmax())
        assert r["predicted_class"] == CLASSES[int(r["predicted"])]
        assert r["label"] == "" and r["data_warning"] == ""
    assert not list(tmp_path.glob(".*"))  # atomic write: no temporary left


def test_dataset_folder_input_copies_labels(trained, tmp_path):
    out = tmp_path / "d.csv"
    assert main(["predict", str(trained["run"]), str(trained["data"]), "--split", "val",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) in (0, None)
    rows = _rows(out)
    manifest = {r["id"]: r for r in _rows(trained["data"] / "manifest.csv")
                if r["split"] == "val"}
    assert [r["id"] for r in rows] == list(manifest)
    assert all(r["label"] == manifest[r["id"]]["label"] for r in rows)
    assert all(r["site"] == manifest[r["id"]]["site"] for r in rows)
    # the same numbers `evaluate --predictions` gives for the split
    ev = tmp_path / "ev.csv"
    main(["evaluate", str(trained["run"]), "--split", "val", "--predictions", str(ev),
          "--device", "cpu", "--no-progress"])
    want, got = _probs(_rows(ev)), _probs(rows)
    assert max(float(np.abs(want[i] - got[i]).max()) for i in want) <= 1e-5


def test_dicom_input_matches_its_import(trained, tmp_path):
    """2D DICOM (.dcm) files, read by the folder importer (12-bit values / 4095) and by
    predict alike."""
    rng = np.random.default_rng(1)
    src = tmp_path / "dcm"
    for c in CLASSES:
        for i in range(6):
            a = rng.integers(0, 1500, size=(40, 36)).astype(np.uint16)
            a[0, 0] = 4000  # every file 12-bit: the import's depth and the predict's agree
            if c == "malignant":
                a[12:20, 12:20] = 3800
            write_dicom(src / c / f"s{i}.dcm", a, SOPInstanceUID=f"1.2.3.{len(c)}.{i}")
    data = tmp_path / "dcm_data"
    run_import("folder", src, data, {"size": 32, "val_frac": 0.0, "test_frac": 0.5})
    ev = tmp_path / "ev.csv"
    assert main(["evaluate", str(trained["run"]), "--data", str(data), "--predictions",
                 str(ev), "--device", "cpu", "--no-progress"]) in (0, None)
    res = predict_images(trained["run"], src, device="cpu")
    want = _probs(_rows(ev))
    got = dict(zip(res.ids, res.probs, strict=True))
    assert len(got) == 12 and set(want) <= set(got)
    assert max(float(np.abs(want[i] - got[i]).max()) for i in want) <= 1e-5


def test_other_intensity_is_flagged_once(trained, tmp_path, capsys):
    """8-bit files whose values fill only 0..20 of 255 (a site exporting dark images): the
    run's recorded-intensity check fires, once on stderr, and every row says so."""
    src = tmp_path / "dim"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        a = rng.integers(0, 20, size=(32, 32)).astype(np.uint8)
        Image.fromarray(a).save(src / f"x{i}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained["run"]), str(src), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) in (0, None)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pixel values" in err[0] and str(src) in err[0], err
    assert "causalign-predict-" not in err[0]  # names the input, not the temporary copy
    assert {r["data_warning"] for r in _rows(out)} == {"intensity"}


@pytest.mark.parametrize("case", ["no_run", "no_input", "empty", "corrupt", "channels",
                                  "not_image", "maps_alone", "counterfactual"])
def test_errors_are_one_line(trained, tmp_path, capsys, case):
    run, inp = trained["run"], tmp_path / "in"
    inp.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(inp / "ok.png")
    expect = {"no_run": "missing", "no_input": "does not exist", "empty": "no images found",
              "corrupt": "bad.png", "channels": "3 channel", "not_image": "not an image",
              "maps_alone": "go together", "counterfactual": "causalign counterfactual"}
    extra: list[str] = []
    if case == "no_run":
        run = tmp_path / "nope"
    elif case == "no_input":
        inp = tmp_path / "absent"
    elif case == "empty":
        inp = tmp_path / "empty"
        inp.mkdir()
        (inp / "notes.txt").write_text("x")
    elif case == "corrupt":
        (inp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif case == "channels":
        # an RGB dataset of the run's classes: the gray run's model takes 1 channel
        rgb = tmp_path / "rgb_raw"
        for c in CLASSES:
            (rgb / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(rgb / c / f"{i}.png")
        inp = tmp_path / "rgb"
        run_import("folder", rgb, inp, {"size": 32, "color": "rgb", "test_frac": 0.5})
    elif case == "not_image":
        inp = tmp_path / "a.txt"
        inp.write_text("x")
    elif case == "maps_alone":
        extra = ["--maps", str(tmp_path / "m")]
    elif case == "counterfactual":
        extra = ["--saliency", "counterfactual", "--maps", str(tmp_path / "m")]
    out = tmp_path / "p.csv"
    rc = main(["predict", str(run), str(inp), "--out", str(out), "--device", "cpu",
               "--no-progress", *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc not in (0, None) and len(lines) == 1, lines
    assert lines[0].startswith("error:") and expect[case] in lines[0], lines
    assert not out.exists()


def test_saliency_maps_match_explain_on_the_import(trained, tmp_path):
    """--saliency/--maps write explain's files per image, under the CSV's ids, with the
    maps `explain` gives for the imported copies."""
    out, maps = tmp_path / "p.csv", tmp_path / "maps"
    assert main(["predict", str(trained["run"]), str(trained["raw"]), "--out", str(out),
                 "--saliency", "gradcam", "--maps", str(maps), "--device", "cpu",
                 "--no-progress"]) in (0, None)
    ids = [r["id"] for r in _rows(out)]
    assert sorted(p.stem for p in (maps / "maps").glob("*.npy")) == sorted(ids)
    assert (maps / "grid.png").is_file() and len(list((maps / "overlays").glob("*.png"))) == 24
    ref = tmp_path / "explain"
    assert main(["explain", str(trained["run"]), "--saliency", "gradcam", "--out", str(ref),
                 "--device", "cpu", "--no-progress"]) in (0, None)
    for f in (ref / "maps").glob("*.npy"):
        a, b = np.load(f), np.load(maps / "maps" / f.name)
        assert a.shape == b.shape == (32, 32)
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_python_api_returns_probabilities(trained):
    files = sorted((trained["raw"] / "benign").glob("*.png"))[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the API reports shift checks, it does not warn
        res = predict_images(trained["run"], files, device="cpu")
    assert res.probs.shape == (2, 2) and res.classes == list(CLASSES)
    assert np.allclose(res.probs.sum(1), 1.0) and res.labels is None and res.warnings == {}
    with pytest.raises(CausalignError, match="--split"):
        predict_images(trained["run"], trained["data"], split="tset")
