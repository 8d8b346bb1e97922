"""LIDC (patches and DICOM) and CBIS-DDSM's validation split are drawn by patient and now
stratified by label, as the folder, BUSI, BraTS and CUB importers already were: drawn
unstratified, a small import could leave val or test with one class only."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from fixtures_real import _write_csv, write_cbis

from causalign.data.format import read_manifest
from causalign.data.importers import run_import


def _patches(root, malignant: int, benign: int) -> str:
    (root / "patches").mkdir(parents=True)
    rows = []
    for p in range(malignant + benign):
        name = f"patches/LIDC-IDRI-{p:04d}_0.npy"
        np.save(root / name, np.full((16, 16), -800 + p, np.int16))
        rows.append([name, f"LIDC-IDRI-{p:04d}", "5;5;4" if p < malignant else "1;1;2"])
    _write_csv(root / "patches.csv", ["image", "patient_id", "malignancy"], rows)
    return "patches.csv"


@pytest.mark.parametrize("seed", range(6))
def test_lidc_patches_val_and_test_hold_both_classes(tmp_path, seed):
    """5 malignant and 25 benign patients at 0.7 / 0.1 / 0.2: unstratified, val or test held
    no malignant patient for 2 of these 6 seeds."""
    src = tmp_path / "src"
    csv = _patches(src, malignant=5, benign=25)
    run_import("lidc", src, tmp_path / "out", {"patches_csv": csv, "size": 16, "seed": seed})
    records = read_manifest(tmp_path / "out")
    by_split: dict[str, Counter] = {}
    for r in records:
        by_split.setdefault(r.split, Counter())[r.label] += 1
    assert set(by_split) == {"train", "val", "test"}
    for split in ("val", "test"):
        assert set(by_split[split]) == {0, 1}, (split, by_split)


def test_cbis_validation_patients_are_drawn_by_label(tmp_path, monkeypatch):
    """CBIS-DDSM's val split, carved by patient from the official training CSV rows, was
    drawn without strata; now each patient's stratum is its first abnormality's label."""
    from causalign.data.importers import cbis_ddsm

    calls = []
    original = cbis_ddsm.assign_splits

    def recording(groups, fractions, seed, weights=None, strata=None):
        calls.append((list(groups), strata))
        return original(groups, fractions, seed, weights=weights, strata=strata)

    monkeypatch.setattr(cbis_ddsm, "assign_splits", recording)
    fx = write_cbis(tmp_path / "cbis")
    run_import("cbis-ddsm", fx["root"], tmp_path / "out", {"size": 32, "val_frac": 0.3})
    assert len(calls) == 1
    groups, strata = calls[0]
    assert strata is not None and len(strata) == len(groups)
    assert set(strata) == {0, 1}  # the fixture's training rows hold both pathologies
