"""Importers on the on-disk variants of real dataset releases (BraTS 2024's label 4, …):
each either imports correctly or refuses in one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_real import (
    BRATS_SHAPE,
    CALC_HEADER,
    MASS_HEADER,
    _save_nii,
    _write_csv,
    write_busi,
    write_lidc,
)

from causalign.cli import main
from causalign.data.format import load_array, read_manifest
from causalign.data.importers import run_import
from causalign.errors import DataError

pytest.importorskip("nibabel")


def _brain() -> tuple[np.ndarray, ...]:
    x, y, z = np.mgrid[0:BRATS_SHAPE[0], 0:BRATS_SHAPE[1], 0:BRATS_SHAPE[2]]
    brain = (((x - 9.5) / 9) ** 2 + ((y - 9.5) / 9) ** 2 + ((z - 4.5) / 5.5) ** 2) <= 1
    return x, y, z, brain


def _brats_subject(root: Path, subj: str, seg: np.ndarray, brain: np.ndarray,
                   names: tuple[str, ...], sep: str, suffix: str = ".nii.gz") -> None:
    for mod in names:
        vol = np.where(brain, 300.0, 0.0).astype(np.float32)
        _save_nii(root / subj / f"{subj}{sep}{mod}{suffix}", vol, np.eye(4))
    _save_nii(root / subj / f"{subj}{sep}seg{suffix}", seg, np.eye(4))


# ----------------------------------------------------------------------------- BraTS 2024


def test_brats_2024_resection_cavity_is_not_tumour(tmp_path):
    """BraTS 2024 post-treatment gliomas label the resection cavity 4 (ET is 3 from 2023
    on). It was read as enhancing tumour: a subject with a cavity and no tumour gave 6
    "tumour" slices, masks on the hole."""
    x, y, z, brain = _brain()
    cavity = (abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 2) & (z <= 7) & brain
    et = (abs(x - 13) <= 2) & (abs(y - 13) <= 2) & (z == 5)
    root = tmp_path / "BraTS2024-GLI"
    names = ("t1n", "t1c", "t2w", "t2f")
    for k in range(4):
        seg = np.zeros(BRATS_SHAPE, np.uint8)
        seg[cavity] = 4
        if k % 2:
            seg[et] = 3
        _brats_subject(root, f"BraTS-GLI-0000{k}-100", seg, brain, names, "-")
    out = tmp_path / "out"
    s = run_import("brats", root, out, {"size": 20, "min_tumor_px": 5})
    recs = read_manifest(out)
    assert s["skipped"]["by_reason"] == {"no tumour slice": 2}  # cavity only: no tumour
    pos = [r for r in recs if r.label == 1]
    assert sorted(r.id for r in pos) == ["BraTS-GLI-00001-100_z005",
                                         "BraTS-GLI-00003-100_z005"]
    for r in pos:  # the mask is the ET (lower right of the brain), not the cavity
        m = load_array(out / r.mask) > 0
        assert m.sum() > 0
        ys, xs = np.nonzero(m)
        assert ys.mean() < 10 and xs.mean() > 10  # displayed: anterior (+y) up, +x right
    # negatives hold no labelled voxel at all: no cavity slice is a "no tumour" slice
    for r in recs:
        if r.label == 0:
            assert int(r.id.rsplit("_z", 1)[1]) not in range(2, 8)
    # enhancing task: the cavity is not enhancing tumour
    run_import("brats", root, tmp_path / "e", {"size": 20, "min_tumor_px": 5,
                                               "task": "enhancing"})
    assert all(r.label == 1 for r in read_manifest(tmp_path / "e"))


def test_brats_classic_label_4_is_still_enhancing(tmp_path):
    """2018–2021 names (_t1ce): 4 stays the enhancing tumour."""
    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 2) & (z <= 7) & brain] = 4
    root = tmp_path / "BraTS2021"
    _brats_subject(root, "BraTS2021_00000", seg, brain, ("t1", "t1ce", "t2", "flair"), "_")
    out = tmp_path / "out"
    run_import("brats", root, out, {"size": 20, "min_tumor_px": 5, "region": "et",
                                    "val_frac": 0.0, "test_frac": 0.0})
    assert sum(r.label for r in read_manifest(out)) == 6


def test_brats_2020_case_355_segmentation_under_another_name(tmp_path):
    """BraTS 2020 (uncompressed .nii, Kaggle) ships case 355's segmentation as
    'W39_1998.09.19_Segm.nii': the subject was skipped as "missing segmentation"."""
    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 3) & (z <= 6) & brain] = 2
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    mods = ("t1", "t1ce", "t2", "flair")
    _brats_subject(root, "BraTS20_Training_354", seg, brain, mods, "_", ".nii")
    _brats_subject(root, "BraTS20_Training_355", seg, brain, mods, "_", ".nii")
    (root / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii").rename(
        root / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii")
    # a validation-style subject without any segmentation stays skipped, also beside a
    # model's prediction (never taken for the ground truth)
    _brats_subject(root, "BraTS20_Training_356", seg, brain, mods, "_", ".nii")
    (root / "BraTS20_Training_356" / "BraTS20_Training_356_seg.nii").rename(
        root / "BraTS20_Training_356" / "seg_pred.nii")
    out = tmp_path / "out"
    s = run_import("brats", root, out, {"size": 20, "min_tumor_px": 5})
    assert s["skipped"]["by_reason"] == {"missing segmentation": 1}
    assert any("another name" in k for k in s["notes"])
    subjects = {r.id.rsplit("_z", 1)[0] for r in read_manifest(out)}
    assert subjects == {"BraTS20_Training_354", "BraTS20_Training_355"}
    a = {r.id.split("_z")[1]: r.label for r in read_manifest(out) if "354" in r.id}
    b = {r.id.split("_z")[1]: r.label for r in read_manifest(out) if "355" in r.id}
    assert a == b and sum(a.values()) == 4  # same seg → same slices and labels


# ----------------------------------------------------------------------------- CBIS-DDSM


def _kaggle_cbis(root: Path) -> Path:
    """The Kaggle JPEG re-release: archive/csv/{official CSVs, dicom_info.csv} and
    archive/jpeg/<SeriesInstanceUID>/1-1.jpg (no TCIA case folders)."""
    from PIL import Image

    rows, info = [], []
    for k in range(3):
        full, roi = f"1.3.6.1.4.1.9590.100.1.2.{100 + k}", f"1.3.6.1.4.1.9590.100.1.2.{200 + k}"
        case = f"Mass-Training_P_0000{k}_LEFT_CC"
        rows.append([f"P_0000{k}", 2, "LEFT", "CC", 1, "mass", "OVAL", "CIRCUMSCRIBED", 4,
                     "BENIGN", 3, f"{case}/1.2.{k}/{full}/000000.dcm\n",
                     f"{case}_1/1.3.{k}/{roi}/000001.dcm\n",
                     f"{case}_1/1.3.{k}/{roi}/000000.dcm\n"])
        for uid, desc in ((full, "full mammogram images"), (roi, "ROI mask images")):
            d = root / "jpeg" / uid
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((40, 40), np.uint8)).save(d / "1-1.jpg")
            info.append([f"CBIS-DDSM/dicom/{uid}.dcm", f"CBIS-DDSM/jpeg/{uid}/1-1.jpg", uid,
                         desc])
    _write_csv(root / "csv" / "mass_case_description_train_set.csv", MASS_HEADER, rows[1:])
    _write_csv(root / "csv" / "mass_case_description_test_set.csv", MASS_HEADER, rows[:1])
    for split in ("train", "test"):
        _write_csv(root / "csv" / f"calc_case_description_{split}_set.csv", CALC_HEADER, [])
    _write_csv(root / "csv" / "dicom_info.csv",
               ["file_path", "image_path", "SeriesInstanceUID", "SeriesDescription"], info)
    return root


def test_cbis_kaggle_jpeg_release_is_refused_by_name(tmp_path, capsys):
    """Every row was looked up and skipped ("3 × image not found"), then a generic "is this
    a cbis-ddsm folder?": the layout the user has was never named."""
    root = _kaggle_cbis(tmp_path / "archive")
    with pytest.raises(DataError, match="Kaggle JPEG re-release of CBIS-DDSM"):
        run_import("cbis-ddsm", root, tmp_path / "out", {"size": 32})
    assert not (tmp_path / "out" / "manifest.csv").exists()
    assert main(["data", "import", "cbis-ddsm", str(root), str(tmp_path / "o2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TCIA DICOM download" in err[0]


# ----------------------------------------------------------------------------- macOS copies

_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 40


def _add_appledouble(root: Path, pattern: str) -> int:
    """'._<name>' beside every file matching pattern, as a copy from a Mac leaves them."""
    files = [p for p in root.rglob(pattern) if not p.name.startswith(".")]
    for f in files:
        (f.parent / f"._{f.name}").write_bytes(_APPLEDOUBLE)
    return len(files)


def test_busi_ignores_macos_appledouble_files(tmp_path):
    """'._benign (1).png' beside each image (and mask) were taken as images: 13 extra skips
    on the fixture (12 "unreadable image", 1 "missing mask")."""
    fx = write_busi(tmp_path / "clean")
    clean = run_import("busi", fx["root"], tmp_path / "a", {"size": 24})
    mac = write_busi(tmp_path / "mac")
    assert _add_appledouble(mac["root"], "*.png") > 17
    s = run_import("busi", mac["root"], tmp_path / "b", {"size": 24})
    assert s["skipped"]["by_reason"] == clean["skipped"]["by_reason"]
    assert [r.id for r in read_manifest(tmp_path / "b")] == \
        [r.id for r in read_manifest(tmp_path / "a")]


def test_brats_ignores_macos_appledouble_files(tmp_path):
    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 3) & (z <= 6) & brain] = 2
    root = tmp_path / "BraTS2021"
    _brats_subject(root, "BraTS2021_00000", seg, brain, ("t1", "t1ce", "t2", "flair"), "_")
    assert _add_appledouble(root, "*.nii.gz") == 5
    s = run_import("brats", root, tmp_path / "out", {"size": 20, "min_tumor_px": 5})
    assert s["skipped"]["n"] == 0, s["skipped"]["by_reason"]
    assert s["details"]["subjects"] == 1


def test_lidc_ignores_macos_appledouble_xml(tmp_path):
    fx = write_lidc(tmp_path / "lidc")
    assert _add_appledouble(fx["root"], "*.xml") == 4
    s = run_import("lidc", fx["root"], tmp_path / "out", {"size": 16})
    assert "unreadable XML" not in s["skipped"]["by_reason"]


# ----------------------------------------------------------------------------- plain folders


def test_folder_mask_suffix_in_other_case_is_a_mask(tmp_path):
    """Suffixes were matched in any case ('.PNG', '.JPG'), the mask suffix was not:
    'img0_Mask.PNG' beside 'img0.JPG' was imported as an image of its class (a sample id
    'A_img0_Mask'), and img0 had no mask."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "ROOT"
    for c in ("A", "B"):
        (root / c).mkdir(parents=True)
        for k, ext in enumerate((".JPG", ".png", ".jpeg", ".tif")):
            img = (rng.random((30, 30)) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"img{k}{ext}")
        m = np.zeros((30, 30), np.uint8)
        m[5:10, 5:10] = 255
        Image.fromarray(m).save(root / c / "img0_Mask.PNG")
        Image.fromarray(m).save(root / c / "img1_MASK_1.png")
        (root / c / ".DS_Store").write_bytes(b"\0")
        (root / c / "._img2.jpeg").write_bytes(_APPLEDOUBLE)
    s = run_import("folder", root, tmp_path / "out", {"size": 16})
    recs = {r.id: r for r in read_manifest(tmp_path / "out")}
    assert s["skipped"]["n"] == 0
    assert sorted(recs) == [f"{c}_img{k}" for c in ("A", "B") for k in range(4)]
    assert [k for k, r in sorted(recs.items()) if r.mask is not None] == \
        ["A_img0", "A_img1", "B_img0", "B_img1"]


def test_brats_grades_from_the_kaggle_2020_layout(tmp_path):
    """Kaggle's BraTS 2020 (awsaf49/brats20-dataset-training-validation) keeps
    name_mapping.csv three folders below its root; grades were looked for two levels down
    only, so `--task grade` on that root imported nothing ("2 × no grade")."""
    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 3) & (z <= 6) & brain] = 2
    root = tmp_path / "brats20-dataset-training-validation"
    data = root / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    mods = ("t1", "t1ce", "t2", "flair")
    for k in (1, 2):
        _brats_subject(data, f"BraTS20_Training_00{k}", seg, brain, mods, "_", ".nii")
    _write_csv(data / "name_mapping.csv", ["Grade", "BraTS_2020_subject_ID"],
              [["HGG", "BraTS20_Training_001"], ["LGG", "BraTS20_Training_002"]])
    val = root / "BraTS2020_ValidationData" / "MICCAI_BraTS2020_ValidationData"
    _brats_subject(val, "BraTS20_Validation_001", seg, brain, mods, "_", ".nii")
    (val / "BraTS20_Validation_001" / "BraTS20_Validation_001_seg.nii").unlink()
    _write_csv(val / "name_mapping_validation_data.csv", ["BraTS_2020_subject_ID"],
              [["BraTS20_Validation_001"]])
    out = tmp_path / "out"
    s = run_import("brats", root, out, {"size": 20, "min_tumor_px": 5, "task": "grade",
                                        "val_frac": 0.0, "test_frac": 0.0})
    assert s["details"]["grades"] == {"HGG": 1, "LGG": 1}
    labels = {r.id.rsplit("_z", 1)[0]: r.label for r in read_manifest(out)}
    assert labels == {"BraTS20_Training_001": 1, "BraTS20_Training_002": 0}


def test_folder_reports_a_broken_symlink(tmp_path):
    """A class folder of links whose targets moved lost those images without a word (the
    import counted 1 of 2 images, 0 skipped)."""
    from PIL import Image

    store = tmp_path / "store"
    store.mkdir()
    root = tmp_path / "ROOT"
    for c in ("A", "B"):
        (root / c).mkdir(parents=True)
        for k in range(2):
            target = store / f"{c}{k}.png"
            Image.fromarray(np.full((12, 12), 40 * k, np.uint8)).save(target)
            (root / c / f"img{k}.png").symlink_to(target)
    (store / "A1.png").unlink()
    s = run_import("folder", root, tmp_path / "out", {"size": 16})
    assert s["skipped"]["by_reason"] == {"broken symlink": 1}
    assert s["skipped"]["items"][0]["source"] == "A/img1.png"
    assert sorted(r.id for r in read_manifest(tmp_path / "out")) == ["A_img0", "B_img0",
                                                                    "B_img1"]


def test_brats_peds_2024_label_numbering_is_refused_not_misread(tmp_path):
    """BraTS-PEDs 2024 labels 1 ET, 2 NET, 3 cystic component, 4 oedema. Read with the adult
    2023+ table, its cyst (3) became the 'enhancing tumour' and its oedema (4) a resection
    cavity; such a subject is now skipped with the reason."""
    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 6) <= 3) & (abs(y - 6) <= 3) & (z >= 2) & (z <= 7) & brain] = 4  # oedema
    seg[(abs(x - 6) <= 1) & (abs(y - 6) <= 1) & (z >= 3) & (z <= 6)] = 1  # ET
    seg[(abs(x - 13) <= 2) & (abs(y - 13) <= 2) & (z == 5)] = 3  # cyst
    root = tmp_path / "BraTS-PEDs2024"
    names = ("t1n", "t1c", "t2w", "t2f")
    _brats_subject(root, "BraTS-PED-00001-000", seg, brain, names, "-")
    ok = np.zeros(BRATS_SHAPE, np.uint8)  # 2023 numbering (labels 1-3) still imports
    ok[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z >= 2) & (z <= 7) & brain] = 3
    _brats_subject(root, "BraTS-PED-00002-000", ok, brain, names, "-")
    out = tmp_path / "out"
    s = run_import("brats", root, out, {"size": 20, "min_tumor_px": 5, "val_frac": 0.0,
                                        "test_frac": 0.0})
    assert s["skipped"]["by_reason"] == {"BraTS-PEDs 2024 labels": 1}
    recs = read_manifest(out)
    assert recs and {r.id.rsplit("_z", 1)[0] for r in recs} == {"BraTS-PED-00002-000"}


def test_busi_class_root_is_not_the_macosx_copy(tmp_path):
    """A macOS zip unpacked beside the data: '__MACOSX/{benign,malignant,normal}' sorted
    before 'busi/' and was taken for the class root ('__MACOSX: no usable images')."""
    src = tmp_path / "unzipped"
    write_busi(src / "busi")
    for cls in ("benign", "malignant", "normal"):
        stub = src / "__MACOSX" / cls / f"._{cls} (1).png"
        stub.parent.mkdir(parents=True)
        stub.write_bytes(b"\x00\x05\x16\x07")
    (src / "busi" / "Dataset_BUSI_with_GT").rename(src / "busi_data")
    (src / "busi").rmdir()
    out = tmp_path / "out"
    run_import("busi", src, out, {"size": 32})
    assert len(read_manifest(out)) > 0
