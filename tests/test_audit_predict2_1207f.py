"""`causalign predict` on what users feed it: raw folders that still hold mask files, raw
files of a BUSI or LIDC-patches import, raw BraTS subject folders (NIfTI volumes), and runs
whose importer preprocessed its images in a way plain files cannot reproduce."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures_real import write_brats, write_busi, write_lidc_patches
from PIL import Image

from causalign.cli import main
from causalign.data.importers.run import run_import
from causalign.data.importers.util import safe_id
from causalign.engine import TrainConfig, predict_images, train
from causalign.engine.inference import _refuse_plain_files
from causalign.errors import DataError


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _train(data: Path, run: Path, **kw) -> Path:
    kw = {"batch_size": 8, **kw}
    train(data, TrainConfig(method="erm", epochs=1, width=4, seed=0, **kw), run,
          progress=False)
    return run


def _evaluated(run: Path, tmp: Path, classes: list[str]) -> dict[str, np.ndarray]:
    """id → probabilities of `evaluate --predictions` over every split of the run's data."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        path = tmp / f"eval_{split}.csv"
        assert main(["evaluate", str(run), "--split", split, "--predictions", str(path),
                     "--device", "cpu"]) in (0, None)
        out.update({r["id"]: np.array([float(r[f"p_{c}"]) for c in classes])
                    for r in _rows(path)})
    return out


def _predicted(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    return {r["source"]: np.array([float(r[f"p_{c}"]) for c in classes]) for r in _rows(path)}


def _predict(run: Path, inputs: list[Path], out: Path) -> int | None:
    return main(["predict", str(run), *map(str, inputs), "--out", str(out), "--device", "cpu",
                 "--no-progress"])


# ----------------------------------------------------------------------------- folder


@pytest.fixture(scope="module")
def roi_run(tmp_path_factory):
    """A folder import whose masks are named '<image>_roi.png' (`--mask-suffix _roi`) and a
    1-epoch run on it."""
    base = tmp_path_factory.mktemp("roi")
    raw = base / "raw"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (raw / c).mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 120 if c == "a" else 250, size=(24, 30)).astype(np.uint8)
            Image.fromarray(img).save(raw / c / f"img{i}.png")
            Image.fromarray(((img > 100) * 255).astype(np.uint8)).save(raw / c / f"img{i}_roi.png")
    (raw / "a" / "img0_ROI_1.PNG").write_bytes((raw / "a" / "img0_roi.png").read_bytes())
    (raw / "a" / "notes.txt").write_text("not an image")
    (raw / "a" / "gone_roi.png").write_bytes((raw / "a" / "img0_roi.png").read_bytes())
    data = base / "data"
    run_import("folder", raw, data, {"size": 16, "mask_suffix": "_roi"})
    return {"raw": raw, "data": data, "run": _train(data, base / "run")}


def test_mask_files_of_a_raw_folder_are_skipped_and_counted(roi_run, tmp_path, capsys):
    """Regression: predict on the raw folder the run was imported from wrote a row for each
    of its 18 mask files too ('img0_roi.png' … predicted as images); it now reads the 16
    images the folder importer reads (its own `tree_files` rules, with the run's recorded
    `--mask-suffix`), says how many files it skipped and why, and gives each image the
    probabilities `evaluate` gives its imported copy."""
    out = tmp_path / "p.csv"
    assert _predict(roi_run["run"], [roi_run["raw"]], out) in (0, None)
    rows = _rows(out)
    assert len(rows) == 16 and not any("roi" in Path(r["source"]).name.lower()
                                   for r in rows)
    summary = capsys.readouterr().out
    assert "skipped 18 mask files ('<image>_roi*'" in summary, summary
    assert "1 not images" in summary, summary
    ev = _evaluated(roi_run["run"], tmp_path, ["a", "b"])
    got = {safe_id(str(Path(s).relative_to(roi_run["raw"]).with_suffix(""))): p
           for s, p in _predicted(out, ["a", "b"]).items()}
    assert got.keys() == ev.keys()
    assert max(np.abs(got[k] - ev[k]).max() for k in got) <= 1e-5


def test_a_mask_file_given_by_name_is_skipped_and_masks_alone_are_refused(roi_run):
    """Regression: a file named as a mask was predicted when given by name; alone, the
    inputs now hold no image and predict says so."""
    raw = roi_run["raw"] / "a"
    res = predict_images(roi_run["run"], [raw / "img1.png", raw / "img1_roi.png"],
                         device="cpu")
    assert res.ids == ["img1"] and sum(res.skipped.values()) == 1
    with pytest.raises(DataError, match="no images among the inputs"):
        predict_images(roi_run["run"], [raw / "img1_roi.png"], device="cpu")


# ----------------------------------------------------------------------------- BUSI, LIDC


def test_raw_busi_files_give_the_busi_imports_probabilities(tmp_path, capsys):
    """Regression: given the raw Dataset_BUSI_with_GT folder, predict wrote 29 rows, 15 of
    them the '_mask' files; it now predicts the 14 images only, and those the busi import
    kept get `evaluate`'s probabilities of their imported copies (BUSI preprocesses as the
    folder importer does: 8-bit rule, letterbox, resize)."""
    info = write_busi(tmp_path / "src")
    raw = tmp_path / "raw"
    shutil.copytree(info["root"], raw)
    (raw / "malignant" / "malignant (5).png").unlink()  # the fixture's corrupt image
    data = tmp_path / "data"
    run_import("busi", tmp_path / "src", data, {"size": 16})
    run = _train(data, tmp_path / "run")
    out = tmp_path / "p.csv"
    assert _predict(run, [raw], out) in (0, None)
    assert "skipped 15 mask files" in capsys.readouterr().out
    got = _predicted(out, ["benign", "malignant"])
    assert len(got) == 14 and not any("_mask" in s for s in got)
    ev = _evaluated(run, tmp_path, ["benign", "malignant"])
    pairs = [(p, ev[safe_id(Path(s).stem)]) for s, p in got.items()
             if safe_id(Path(s).stem) in ev]
    assert len(pairs) == len(ev) == 11  # benign (6) (no mask) and normal/ were not imported
    assert max(np.abs(a - b).max() for a, b in pairs) <= 1e-5


def test_raw_lidc_patches_are_windowed_as_their_import(tmp_path):
    """Regression: raw HU patches (int16 NPY) of a `data import lidc --patches-csv` run went
    through the folder path (16-bit integer rule, no HU window): probabilities up to 0.060
    off `evaluate`'s on the imported copies here (0.081 at 32 px, every patch 'benign').
    They are now read by the lidc importer's `_read_patch` with the run's recorded
    --window, and resized as it does."""
    write_lidc_patches(tmp_path / "src")
    data = tmp_path / "data"
    run_import("lidc", tmp_path / "src", data, {"size": 16, "patches_csv": "patches.csv"})
    run = _train(data, tmp_path / "run")
    out = tmp_path / "p.csv"
    assert _predict(run, [tmp_path / "src" / "patches"], out) in (0, None)
    classes = ["benign", "malignant"]
    got = {f"patches_{Path(s).stem}": p for s, p in _predicted(out, classes).items()}
    ev = _evaluated(run, tmp_path, classes)
    assert len(got) == 8 and got.keys() == ev.keys()
    assert max(np.abs(got[k] - ev[k]).max() for k in got) <= 1e-5


def test_lidc_patch_masks_listed_in_the_csv_are_skipped(tmp_path):
    """Regression: given the patches import's source folder, its 24 per-reader masks
    ('masks/LIDC-IDRI-0001_0_r0.png', named by the CSV's mask column, no suffix) were
    predicted as images beside the 8 patches; the CSV's masks are now left out and counted."""
    write_lidc_patches(tmp_path / "src")
    data = tmp_path / "data"
    run_import("lidc", tmp_path / "src", data, {"size": 16, "patches_csv": "patches.csv"})
    run = _train(data, tmp_path / "run")
    res = predict_images(run, [tmp_path / "src"], device="cpu")
    assert sorted(Path(s).parent.name for s in res.sources) == ["patches"] * 8
    assert res.skipped["mask files (the mask column of patches.csv)"] == 24


@pytest.mark.parametrize(("importer", "options", "refused"), [
    ("folder", {}, None), (None, {}, None), ("busi", {}, None), ("decoy-mnist", {}, None),
    ("cub", {"crop": "image"}, None), ("lidc", {"patches_csv": "p.csv"}, None),
    ("lidc", {"patches_csv": None}, "cut from CT series"),
    ("brats", {"mode": "slices"}, "brain's percentiles"),
    ("cbis-ddsm", {}, "ROI"), ("cub", {"crop": "box"}, "bounding box")])
def test_which_imports_plain_files_can_follow(importer, options, refused):
    """The decision table (new; `_refuse_plain_files` did not exist, every import took the
    folder path): importers whose preprocessing plain files cannot reproduce are refused in
    one line that names the difference and the way instead."""
    rec = {"importer": importer, "options": options}
    if refused is None:
        _refuse_plain_files(rec, Path("RUN"))
        return
    with pytest.raises(DataError, match=refused) as err:
        _refuse_plain_files(rec, Path("RUN"))
    assert f"causalign data import {importer}" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_brats_slice_run_refuses_plain_slices(tmp_path, capsys):
    """Regression: a run on BraTS slices (one modality) took PNG slices through the folder
    path (no brain-percentile scaling, no crop to the brain box) without a word; refused."""
    write_brats(tmp_path / "src")
    data = tmp_path / "data"
    run_import("brats", tmp_path / "src", data, {"size": 16, "modalities": "flair",
                                                 "slices_per_subject": 2, "min_tumor_px": 5})
    run = _train(data, tmp_path / "run")
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(png)
    capsys.readouterr()
    assert _predict(run, [png], tmp_path / "p.csv") not in (0, None)
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "BraTS slices" in err[0] and "data import brats" in err[0], err
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------- BraTS volumes


@pytest.fixture(scope="module")
def brats_run(tmp_path_factory):
    """`data import brats --mode volumes --task grade` of the BraTS fixture (subjects 001,
    002, 005 gradeable: one per split) and a 1-epoch multiview run on it."""
    base = tmp_path_factory.mktemp("brats")
    write_brats(base / "src")
    data = base / "data"
    run_import("brats", base / "src", data, {"size": 16, "mode": "volumes", "task": "grade",
                                             "depth": 4, "val_frac": 0.34,
                                             "test_frac": 0.34})
    run = _train(data, base / "run", model="multiview", batch_size=4)
    root = base / "src" / "MICCAI_BraTS2020_TrainingData"
    return {"run": run, "subjects": [root / f"BraTS20_Training_00{k}" for k in (1, 2, 5)]}


# the fixture's 3-subject split warns of its one-class train and val splits
@pytest.mark.filterwarnings("ignore:the (training|val) split holds only class:UserWarning")
def test_raw_brats_subjects_give_the_volume_imports_probabilities(brats_run, tmp_path):
    """Regression (new): a multiview run given raw subject folders said 'no images found';
    they now go through the brats importer's own functions (reorientation, voxel sizes,
    brain percentiles, crop square in mm, axial positions) at the run's recorded shape and
    get `evaluate`'s probabilities of the imported volumes — with the subject's segmentation
    beside the volumes, and without it (new patients have none)."""
    run, subjects = brats_run["run"], brats_run["subjects"]
    ev = _evaluated(run, tmp_path, ["LGG", "HGG"])
    noseg = tmp_path / "noseg"
    for s in subjects:
        shutil.copytree(s, noseg / s.name)
        (noseg / s.name / f"{s.name}_seg.nii.gz").unlink()
    for inputs in (subjects, [noseg]):
        res = predict_images(run, inputs, device="cpu")
        assert res.ids == sorted(ev) and res.classes == ["LGG", "HGG"]
        assert np.abs(res.probs - np.stack([ev[i] for i in res.ids])).max() <= 1e-5


def test_brats_subjects_missing_a_modality_are_skipped_and_counted(brats_run, tmp_path):
    """A subject folder without one of the run's modalities is left out, as the importer
    leaves it out, and counted in the summary; none left is one clear error."""
    one = tmp_path / "in" / brats_run["subjects"][0].name
    shutil.copytree(brats_run["subjects"][0], one)
    two = tmp_path / "in" / brats_run["subjects"][1].name
    shutil.copytree(brats_run["subjects"][1], two)
    (two / f"{two.name}_t2.nii.gz").unlink()
    res = predict_images(brats_run["run"], [tmp_path / "in"], device="cpu")
    assert res.ids == [one.name] and list(res.skipped.values()) == [1]
    with pytest.raises(DataError, match="has all of the run's modalities"):
        predict_images(brats_run["run"], [two], device="cpu")


def test_nifti_given_to_a_2d_run_is_refused_in_one_line(roi_run, brats_run, tmp_path, capsys):
    """A 2D run given NIfTI volumes (a folder of them, or one file) says what to do instead,
    not 'no images found'."""
    subj = brats_run["subjects"][0]
    for given in (subj, subj / f"{subj.name}_t1.nii.gz"):
        capsys.readouterr()
        assert _predict(roi_run["run"], [given], tmp_path / "p.csv") not in (0, None)
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and "NIfTI" in err[0] and "--mode volumes" in err[0], err
