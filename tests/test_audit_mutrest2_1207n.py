"""Mutation audit of the resume settings check, best-epoch restore on --resume, the BraTS
grade-stratified split and CBIS-DDSM image / ROI-mask selection: behaviours the earlier
tests let slip (the six mutants the "mutrest" audit left surviving)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from fixtures_real import _save_nii, write_dicom
from test_audit_mutimport_1207m import _square_mask
from test_audit_mutrest_1207n import _run_folder

from causalign.data.importers.base import Sample, Skipped, Unit
from causalign.engine import TrainConfig
from causalign.engine.trainer import (
    BEST,
    CHECKPOINT,
    Trainer,
    load_checkpoint,
    settings_diff,
    train,
)
from causalign.errors import CausalignError

# ----------------------------------------------------------------------------- settings_diff


def test_another_model_reports_its_raw_model_args_without_resolving_them(tmp_path):
    """`settings_diff` resolves model_args against the defaults only when the model is the
    same: a multiview run (tau=0.5) resumed as cnn7 names the model and the raw model_args
    change instead of failing on "cnn7 has no option 'tau'", and a cnn7 run resumed as
    multiview is no model_args difference (both gave none). Kills T12 (model_args resolved
    with the new model whatever the stored one)."""
    run = _run_folder(tmp_path / "a", TrainConfig(model="multiview", model_args={"tau": 0.5}))
    assert settings_diff(run, TrainConfig(model="cnn7")) == [
        "model 'multiview' -> 'cnn7'", "model_args {'tau': 0.5} -> {}"]
    run = _run_folder(tmp_path / "b", TrainConfig(model="cnn7"))
    assert settings_diff(run, TrainConfig(model="multiview")) == [
        "model 'cnn7' -> 'multiview'"]


# ----------------------------------------------------------------------------- _restore_best


class _Killed(BaseException):
    """A kill (nothing in the trainer may catch it)."""


def test_resume_without_the_best_epochs_weights_stops_before_training(tiny_data, tmp_path,
                                                                      monkeypatch):
    """A 3-epoch run killed after epoch 2 whose best epoch is 1 (score patched), best.pt
    then lost: --resume refuses at once ("cannot select its best model"), leaving
    checkpoint.pt at epoch 2, instead of training epoch 3 and failing (or silently
    selecting another epoch) afterwards. Kills T18 (`_restore_best` skipping
    `_check_best`)."""
    monkeypatch.setattr(Trainer, "_score",
                        lambda self, val: 1.0 if self.state.epoch == 0 else 0.0)
    real = Trainer._save_state

    def save_then_die(self) -> None:
        real(self)
        if self.state.epoch == 2:
            raise _Killed

    cfg = TrainConfig(method="erm", epochs=3, width=4, threads=1, batch_size=16,
                      deletion_fractions=[0.1])
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "_save_state", save_then_die)
        with pytest.raises(_Killed):
            train(tiny_data, cfg, out, progress=False)
    state = load_checkpoint(out / CHECKPOINT)
    assert (state["epoch"], state["best_epoch"]) == (2, 1)
    (out / BEST).unlink()
    with pytest.raises(CausalignError, match="cannot select its best model"):
        train(tiny_data, cfg, out, resume=True, progress=False)
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 2
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 2


# ----------------------------------------------------------------------------- BraTS split


def _brats_graded(src: Path, n_per_grade: int) -> None:
    """HGG/ and LGG/ folders of n subjects each, 2×2×2 NIfTI volumes (plan reads headers
    only)."""
    vol = np.zeros((2, 2, 2), np.float32)
    for grade in ("HGG", "LGG"):
        for k in range(n_per_grade):
            subj = f"BraTS19_{grade}_{k:03d}"
            for mod in ("t1", "t1ce", "t2", "flair", "seg"):
                _save_nii(src / grade / subj / f"{subj}_{mod}.nii", vol, np.eye(4))


def test_brats_split_is_stratified_by_grade(tmp_path):
    """Patients are split per grade: with 6 HGG and 6 LGG subjects, train, val and test each
    hold both grades, for every seed tried (unstratified, 12 shuffled subjects leave val or
    test with one grade for some seed). Kills B8 (strata=None)."""
    from causalign.data.importers.brats import BratsImporter, BratsOptions

    _brats_graded(tmp_path, 6)
    for seed in range(8):
        units = BratsImporter(tmp_path, BratsOptions(seed=seed)).plan()
        assert len(units) == 12
        grades: dict[str, set[str]] = {}
        for u in units:
            grades.setdefault(u.split, set()).add(u.payload[2])
        assert grades == {s: {"HGG", "LGG"} for s in ("train", "val", "test")}, seed


# ----------------------------------------------------------------------------- CBIS-DDSM

CASE = "Mass-Training_P_00001_LEFT_CC"


def _full() -> np.ndarray:
    """A 128² mammogram: a bright breast with a horizontal gradient over a dark border."""
    full = np.zeros((128, 128), np.uint16)
    full[8:120, 8:120] = 1000 + (np.arange(112)[None, :] * 3).astype(np.uint16)
    return full


def _cbis(src: Path, images: dict[str, np.ndarray], rois: dict[str, np.ndarray],
          image_path: str, roi_path: str) -> list[Sample | Skipped]:
    """CBIS-DDSM case folders CASE (the full image's) and CASE_1 (the ROI's) holding the
    given files (paths relative to them), processed by CbisDdsmImporter.process for one
    abnormality with the given CSV paths."""
    from causalign.data.importers.cbis_ddsm import CbisDdsmImporter, CbisDdsmOptions

    k = 0
    for folder, files in ((CASE, images), (f"{CASE}_1", rois)):
        for name, arr in files.items():
            k += 1
            write_dicom(src / folder / name, arr, SOPInstanceUID=f"1.9.{k}",
                        SeriesInstanceUID=f"1.9.{k}", Modality="MG")
    imp = CbisDdsmImporter(src, CbisDdsmOptions(size=64))
    imp.pydicom, imp._case_dirs, imp._series_index = pydicom, None, {}
    e = {"image": image_path, "patient": "P_00001", "official": "train",
         "rows": [{"id": "x", "label": 1, "attributes": [], "source": "csv:2",
                   "roi": roi_path}]}
    return list(imp.process(Unit(key="k", split="train", source="s", payload=e)))


def test_cbis_image_is_the_largest_of_several_candidate_files(tmp_path):
    """An image path resolved to several files of its case folder (its series UID matches
    none) is the largest file, the full mammogram, not the first in sorted order (here a
    16² thumbnail): the sample equals the one read from the full image's literal path.
    Kills C5 (first candidate taken)."""
    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 4000, (16, 16)).astype(np.uint16)
    images = {"a/a/1-0.dcm": thumb, "a/b/1-1.dcm": _full()}
    rois = {"a/c/1-1.dcm": _square_mask(40, 80)}
    (s,) = _cbis(tmp_path / "x", images, rois, f"{CASE}/9.9/7.7/000000.dcm",
                 f"{CASE}_1/a/c/1-1.dcm")
    (ref,) = _cbis(tmp_path / "ref", {"a/b/1-1.dcm": _full()}, rois, f"{CASE}/a/b/1-1.dcm",
                   f"{CASE}_1/a/c/1-1.dcm")
    assert isinstance(s, Sample) and isinstance(ref, Sample)
    x0, y0, x1, y1 = s.box
    assert abs((x1 - x0) - 32) <= 2 and abs((y1 - y0) - 32) <= 2  # 40 px lesion, context 0.5
    np.testing.assert_array_equal(s.image, ref.image)
    np.testing.assert_array_equal(s.mask, ref.mask)


def test_cbis_empty_roi_mask_is_skipped_with_its_reason(tmp_path):
    """A full-size binary ROI file with no pixel set (a failed export) skips the
    abnormality as "empty ROI mask"; no sample with an empty mask (and a box of nothing)
    is written. Kills C8 (the empty mask returned)."""
    out = _cbis(tmp_path, {"a/b/1-1.dcm": _full()}, {"a/c/1-1.dcm": np.zeros((128, 128),
                                                                              np.uint8)},
                f"{CASE}/a/b/1-1.dcm", f"{CASE}_1/a/c/1-1.dcm")
    assert len(out) == 1 and isinstance(out[0], Skipped)
    assert out[0].reason == "empty ROI mask"


def test_cbis_roi_mask_in_another_series_of_the_case_folder_is_found(tmp_path):
    """The CSV's ROI path names the cropped lesion image, alone in its series folder; the
    binary mask is in another series folder of the abnormality's case folder and is found
    there (a 40 px lesion: the crop's box is ≈ 32 of 64 px). Kills C9 (the case folder's
    other files not tried: "ROI mask not found")."""
    rng = np.random.default_rng(1)
    crop = rng.integers(0, 4000, (40, 40)).astype(np.uint16)
    out = _cbis(tmp_path, {"a/b/1-1.dcm": _full()},
                {"a/c/1-1.dcm": crop, "a/d/1-2.dcm": _square_mask(40, 80)},
                f"{CASE}/a/b/1-1.dcm", f"{CASE}_1/a/c/1-1.dcm")
    assert len(out) == 1 and isinstance(out[0], Sample), out
    x0, y0, x1, y1 = out[0].box
    assert abs((x1 - x0) - 32) <= 2 and abs((y1 - y0) - 32) <= 2
    assert out[0].mask.sum() >= 0.9 * (x1 - x0) * (y1 - y0)
