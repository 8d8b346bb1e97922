"""Split integrity: no patient (subject, group) in two splits, whatever the importer is given
(time points of one BraTS patient, split cells filled on some rows of a group only)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_real import BRATS_SHAPE, _png, _write_csv, write_lidc, write_lidc_patches

from causalign.data.format import read_manifest
from causalign.data.importers import run_import
from causalign.data.importers.util import read_csv


def _splits_by(records, key) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(key(r), set()).add(r.split)
    return out


def test_brats_time_points_of_one_patient_share_a_split(tmp_path):
    """BraTS 2024 post-treatment names BraTS-GLI-00005-100 and -101: one patient, two time
    points. Split per subject, 4 of 6 such patients had a scan in train and one in val/test."""
    pytest.importorskip("nibabel")
    from test_audit_releases_1207c import _brain, _brats_subject

    x, y, z, brain = _brain()
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(abs(x - 10) <= 2) & (abs(y - 10) <= 2) & (z >= 3) & (z <= 6) & brain] = 3
    root = tmp_path / "BraTS2024"
    for p in range(6):
        for tp in ("100", "101"):
            _brats_subject(root, f"BraTS-GLI-0000{p}-{tp}", seg, brain,
                           ("t1n", "t1c", "t2w", "t2f"), "-")
    s = run_import("brats", root, tmp_path / "out",
                   {"size": 16, "min_tumor_px": 5, "slices_per_subject": 1})
    recs = read_manifest(tmp_path / "out")
    by = _splits_by(recs, lambda r: r.id[:len("BraTS-GLI-00000")])
    assert len(by) == 6
    assert all(r.group == r.id[:len("BraTS-GLI-00000")] for r in recs)  # in the manifest
    assert {p: sp for p, sp in by.items() if len(sp) > 1} == {}
    assert s["details"]["patients"] == 6 and s["details"]["subjects"] == 12
    assert {sp for v in by.values() for sp in v} == {"train", "val", "test"}


def test_brats_patient_of_keeps_cohort_and_classic_names():
    """Guard: the cohort is part of the patient (GLI-00005 is not MEN-00005), and names
    without a time point (BraTS 2018-2021) are a patient each."""
    from causalign.data.importers.brats import patient_of

    assert patient_of("BraTS-GLI-00005-100") == patient_of("BraTS-GLI-00005-101")
    assert patient_of("BraTS-GLI-00005-000") != patient_of("BraTS-MEN-00005-000")
    assert patient_of("BraTS-MEN-RT-0001-1") == "BraTS-MEN-RT-0001"
    assert patient_of("BraTS2021_00000") == "BraTS2021_00000"
    assert patient_of("BraTS20_Training_001") == "BraTS20_Training_001"


def test_folder_group_rows_without_split_follow_the_groups_given_split(tmp_path):
    """A patient's first image given split 'test', the others left empty: the empty ones were
    drawn on their own, and 8 of 10 patients had images in test and in train or val."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    rows = []
    for p in range(10):
        for k in range(3):
            _png(root / f"p{p}_{k}.png", (rng.random((16, 16)) * 255).astype(np.uint8))
            rows.append([f"p{p}_{k}.png", "a" if p % 2 else "b", "test" if k == 0 else "",
                         f"P{p}"])
    rows += [["q_0.png", "a", "train", "Q"], ["q_1.png", "a", "test", "Q"]]  # user's choice
    for name in ("q_0.png", "q_1.png"):
        _png(root / name, (rng.random((16, 16)) * 255).astype(np.uint8))
    _write_csv(root / "l.csv", ["image", "label", "split", "group"], rows)
    s = run_import("folder", root, tmp_path / "out", {"csv": "l.csv", "size": 16})
    recs = read_manifest(tmp_path / "out")
    assert len(recs) == 32  # nobody dropped
    by = _splits_by([r for r in recs if r.id.startswith("p")], lambda r: r.id.split("_")[0])
    assert by == {f"p{p}": {"test"} for p in range(10)}
    # the CSV itself puts group Q in train and test: kept as given, and said so
    assert [n for what, n in s["notes"].items() if "more than one split" in what] == [1]


def test_lidc_patches_patient_rows_without_split_follow_the_patients_split(tmp_path):
    """The same for LIDC patches: a patient's rows with an empty split cell follow the split
    given on their other rows (they were drawn by patient, apart from it)."""
    pytest.importorskip("PIL")
    info = write_lidc_patches(tmp_path / "src")
    csv = tmp_path / "src" / info["csv"]
    cols, rows = read_csv(csv)
    # every patient: first patch fixed to test, the second left to the importer
    seen: set[str] = set()
    for r in rows:
        r["split"] = "" if r["patient_id"] in seen else "test"
        seen.add(r["patient_id"])
    _write_csv(csv, [*cols, "split"], [[r.get(c, "") for c in [*cols, "split"]] for r in rows])
    run_import("lidc", tmp_path / "src", tmp_path / "out",
               {"patches_csv": info["csv"], "size": 16})
    by = _splits_by(read_manifest(tmp_path / "out"), lambda r: r.id.rsplit("_", 1)[0])
    assert len(by) == info["patients"]
    assert all(sp == {"test"} for sp in by.values()), by


def test_manifest_records_group_and_data_check_reports_leaks(tmp_path, capsys):
    """The manifest named no patient, so nobody could verify a patient-level split, and
    `data check` said "ok" for a patient in train and test and for one image file copied into
    test. Now the importer's group is a manifest column, and check warns of both."""
    import shutil

    from causalign.cli import main

    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    rows = []
    for p in range(4):
        for k in range(2):
            _png(root / f"p{p}_{k}.png", (rng.random((16, 16)) * 255).astype(np.uint8))
            split = ["train", "val", "test"][p % 3] if p < 3 else ["train", "test"][k]
            rows.append([f"p{p}_{k}.png", "a" if p % 2 else "b", split, f"P{p}"])
    shutil.copy(root / "p0_0.png", root / "copy.png")
    rows.append(["copy.png", "b", "test", "C"])
    _write_csv(root / "l.csv", ["image", "label", "split", "group"], rows)
    out = tmp_path / "out"
    run_import("folder", root, out, {"csv": "l.csv", "size": 16})
    groups = {r.id: r.group for r in read_manifest(out)}
    assert groups["p3_0"] == "P3" and groups["copy"] == "C"
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "warning: 1 group(s) have samples in more than one split" in text
    assert "P3 (train, test)" in text
    assert "warning: 1 image(s) have pixels identical to an image of another split: " \
           "train/p0_0 = test/copy" in text


def test_data_check_quiet_without_leaks_and_old_manifests_read(tmp_path, capsys):
    """Guard: a dataset without a group column (every manifest written before) reads as
    before and checks without warnings; a synthetic dataset has no image in two splits."""
    from causalign.cli import main

    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--n-train", "24", "--n-val", "8", "--n-test",
                 "8", "--size", "32", "--no-progress", "--no-examples"]) == 0
    assert "group" not in (out / "manifest.csv").read_text().splitlines()[0].split(",")
    assert {r.group for r in read_manifest(out)} == {""}
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "warning" not in text and text.rstrip().endswith("ok")


def test_lidc_series_without_patient_id_grouped_by_patient_folder(tmp_path):
    """A CT without PatientID (an anonymised copy) took its *series* folder as the patient:
    a patient's other studies became patients of their own (with two more studies each,
    seed 0 put patient 1's three studies in train, test and val), and every patient's
    'series1' folder one patient."""
    pydicom = pytest.importorskip("pydicom")
    import re
    import shutil

    write_lidc(tmp_path / "src")
    base = tmp_path / "src" / "LIDC-IDRI"
    for pdir in sorted(base.glob("LIDC-IDRI-000*")):
        first = next(pdir.glob("*/*"))
        new = pdir / "study1" / "series1"  # a second study: the same scan under new UIDs
        shutil.copytree(first, new)
        uid = None
        for f in sorted(new.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(f)
            except Exception:  # the fixture's corrupt slices
                continue
            uid = str(ds.SeriesInstanceUID)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid + ".1", str(ds.SOPInstanceUID) + ".1"
            ds.save_as(f)
        for x in new.glob("*.xml"):
            text = x.read_text().replace(uid, uid + ".1")
            x.write_text(re.sub(r"(<imageSOP_UID>[^<]+)", r"\1.1", text))
    for f in base.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        ds.PatientID = ""
        ds.save_as(f)
    s = run_import("lidc", tmp_path / "src", tmp_path / "out", {"size": 16, "seed": 0})
    recs = read_manifest(tmp_path / "out")
    assert {r.group for r in recs} == {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"}
    assert s["details"]["series"] == 6
    by = _splits_by(recs, lambda r: r.group)
    assert all(len(sp) == 1 for sp in by.values()), by
    assert any("without PatientID" in what for what in s["notes"])
