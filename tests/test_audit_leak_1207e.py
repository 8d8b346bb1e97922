"""Split integrity: no patient (subject, group) in two splits, whatever the importer is given
(time points of one BraTS patient, split cells filled on some rows of a group only)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_real import BRATS_SHAPE

from causalign.data.format import read_manifest
from causalign.data.importers import run_import


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
    by = _splits_by(read_manifest(tmp_path / "out"), lambda r: r.id[:len("BraTS-GLI-00000")])
    assert len(by) == 6
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
