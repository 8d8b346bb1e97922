"""Volume path regressions: BraTS geometry (anisotropic voxels, voxel-size mismatches, display
orientation) and the multi-view model's memory-bounded inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_real import _brats_volumes, _save_nii

from causalign.data.format import read_manifest, read_meta
from causalign.data.importers import run_import
from causalign.models import MultiViewCNN

pytest.importorskip("nibabel")

_OPTS = {"size": 16, "task": "grade", "mode": "volumes", "depth": 6, "modalities": "flair",
         "val_frac": 0.0, "test_frac": 0.0}


def _write_subject(root: Path, subj: str, vols: dict, affine: np.ndarray,
                   seg_affine: np.ndarray | None = None) -> None:
    for mod in ("flair", "seg"):
        aff = seg_affine if mod == "seg" and seg_affine is not None else affine
        _save_nii(root / subj / f"{subj}_{mod}.nii.gz", vols[mod], aff)


def _import(root: Path, subjects: list[str], out: Path) -> dict:
    (root / "name_mapping.csv").write_text(
        "Grade,ID\n" + "".join(f"HGG,{s}\n" for s in subjects))
    return run_import("brats", root, out, dict(_OPTS))


def _load(out: Path, subj: str) -> tuple[np.ndarray, np.ndarray]:
    rec = {r.id: r for r in read_manifest(out)}[subj]
    return np.load(out / rec.image), np.load(out / rec.mask) > 0


def test_brats_anisotropic_in_plane_voxels_are_not_squashed(tmp_path):
    # Before: the brain's bounding square was cut in voxels, so a subject stored at 2×1 mm
    # (every other x voxel) came out squashed to half the width (brain in columns 4–12 of 16
    # instead of 0–15). Now the crop is square in mm: same geometry as the 1 mm original.
    v = _brats_volumes(np.random.default_rng(1), (6, 12, 5))
    _write_subject(tmp_path / "src", "S_iso", v, np.eye(4))
    _write_subject(tmp_path / "src", "S_aniso", {k: a[::2].copy() for k, a in v.items()},
                   np.diag([2.0, 1.0, 1.0, 1.0]))
    _import(tmp_path / "src", ["S_iso", "S_aniso"], tmp_path / "out")
    boxes = {}
    for subj in ("S_iso", "S_aniso"):
        vol, mask = _load(tmp_path / "out", subj)
        assert vol[mask].mean() > 0.7  # the mask still sits on the FLAIR-bright tumour
        ys, xs = np.nonzero((vol > 0).any(axis=0))
        zs, ty, tx = np.nonzero(mask)
        boxes[subj] = (xs.min(), xs.max(), ys.min(), ys.max(), tx.mean(), ty.mean())
    iso, aniso = boxes["S_iso"], boxes["S_aniso"]
    assert np.allclose(aniso[:4], iso[:4], atol=1)  # brain extent: columns and rows
    assert abs(aniso[4] - iso[4]) < 1.5 and abs(aniso[5] - iso[5]) < 1.5  # tumour centre


def test_brats_volumes_with_different_voxel_sizes_are_skipped(tmp_path):
    # Before: a segmentation on a 2 mm grid over 1 mm images of the same shape (a different
    # world extent) was imported as if voxel i of one were voxel i of the other.
    v = _brats_volumes(np.random.default_rng(2), (6, 12, 5))
    _write_subject(tmp_path / "src", "S_ok", v, np.eye(4))
    _write_subject(tmp_path / "src", "S_bad", v, np.eye(4),
                   seg_affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    s = _import(tmp_path / "src", ["S_ok", "S_bad"], tmp_path / "out")
    assert s["skipped"]["by_reason"] == {"voxel sizes differ": 1}
    assert {r.id for r in read_manifest(tmp_path / "out")} == {"S_ok"}


def test_brats_display_orientation_matches_metadata(tmp_path):
    # The tumour sits in the patient's left hemisphere (RAS +x), the file is stored LPS as
    # BraTS 2021's are. The output is radiological (patient left on the viewer's right);
    # before, the metadata and docs said "patient left on the left".
    v = _brats_volumes(np.random.default_rng(3), (15, 10, 5))  # x = 15 of 0..19: left
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [19, 19, 0]
    _write_subject(tmp_path / "src", "S_lps", {k: a[::-1, ::-1].copy() for k, a in v.items()},
                   lps)
    _import(tmp_path / "src", ["S_lps"], tmp_path / "out")
    _, mask = _load(tmp_path / "out", "S_lps")
    assert np.nonzero(mask)[2].mean() > 8  # right half of the columns
    orientation = read_meta(tmp_path / "out").info["orientation"]
    assert "viewer's right" in orientation and "left on the left" not in orientation


def test_multiview_no_grad_inference_runs_in_chunks_with_the_same_result():
    # Before: prediction (eval mode, no_grad, batches of 256 volumes) pushed all N·D slices
    # through the CNN at once: ~105 MB per 4×32×128×128 volume, ~27 GB per batch. Now the
    # volumes go through in chunks of at most `infer_floats` first-layer activations.
    torch.manual_seed(0)
    model = MultiViewCNN(2, 3, width=4).eval()
    x = torch.rand(5, 2, 6, 16, 16)
    out_ref = model(x).detach()  # with gradients enabled: one pass, as WBP and PPI need
    att_ref = model.last_attention
    model.infer_floats = 2 * 6 * 16 * 16 * 4  # two volumes per chunk
    seen: list[int] = []
    handle = model.slice_cnn.features.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    assert seen == [12, 12, 6]  # views (volume × slice) per CNN call
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert torch.allclose(model.last_attention, att_ref, atol=1e-6)
    assert torch.equal(model.last_slices, torch.arange(6).expand(5, 6))
    model.train()  # training keeps one pass (BatchNorm batch statistics, random slices)
    seen.clear()
    handle = model.slice_cnn.features.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert seen == [5 * 3]  # train_slices 0.5 of 6 slices, all volumes at once


def test_evaluation_batches_of_volumes_are_capped_by_values_not_samples(tmp_path, monkeypatch):
    """Evaluation ran 128 (256 for prediction) samples a batch whatever their size: a BraTS
    volume (4x155x128x128, 10 M values) gave ~180 GB for the saliency pass. Batches are now
    capped at EVAL_VALUES_PER_BATCH input values; the metrics do not depend on it."""
    import causalign.engine.evaluate as ev
    from causalign.data.format import LesionDataset
    from causalign.data.synth import SynthConfig, generate
    from causalign.methods.base import build_method
    from causalign.models import build_model

    data = tmp_path / "vol"
    generate(data, SynthConfig(n_train=4, n_val=4, n_test=10, size=32, depth=4, seed=0))
    ds = LesionDataset(data, "test")
    torch.manual_seed(0)
    model = build_model("multiview", ds.image_shape[0], 2, width=4, image_shape=ds.image_shape)
    method = build_method("erm", {})
    per_sample = int(np.prod(ds.image_shape))  # 1x4x32x32 = 4096 values

    sizes: list[int] = []
    real = ev.iterate_batches

    def recording(dataset, batch_size, **kw):
        sizes.append(batch_size)
        return real(dataset, batch_size, **kw)

    monkeypatch.setattr(ev, "iterate_batches", recording)
    whole = ev.evaluate_split(model, method, ds, "cpu", saliency="wbp", fractions=(0.1,))
    monkeypatch.setattr(ev, "EVAL_VALUES_PER_BATCH", 3 * per_sample)
    sizes.clear()
    capped = ev.evaluate_split(model, method, ds, "cpu", saliency="wbp", fractions=(0.1,))
    ev.predict(model, method, ds, "cpu")
    assert sizes == [3, 3]  # evaluate_split's and predict's batches: 3 volumes, not 128 / 256
    for key, value in whole.items():
        if isinstance(value, float):
            assert capped[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    monkeypatch.setattr(ev, "EVAL_VALUES_PER_BATCH", per_sample // 2)  # larger than the cap
    sizes.clear()
    ev.predict(model, method, ds, "cpu")
    assert sizes == [1]  # one sample a batch, never zero
