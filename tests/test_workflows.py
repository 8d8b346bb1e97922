"""End-to-end user workflows from the real on-disk formats (tests/fixtures_real.py):
`causalign data import` → train → evaluate → explain → counterfactual, checking that the
results are right (masks on lesions, labels, splits), not only that files appear."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_real import (
    write_brats,
    write_cbis,
    write_cub,
    write_folder_csv,
    write_lidc_patches,
)

from causalign.cli import main
from causalign.data.format import load_array, read_manifest
from causalign.data.importers import run_import
from causalign.errors import DataError

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")


def _by_id(root):
    return {r.id: r for r in read_manifest(root)}


# ----------------------------------------------------------------------------- CBIS-DDSM


def _assert_imported_with_mask_on_the_mass(root, out, case):
    s = run_import("cbis-ddsm", root, out, {"size": 32})
    assert s["skipped"]["by_reason"].get("ROI mask not found") == 1  # only P_00012's
    rec = _by_id(out)[case]
    img = load_array(out / rec.image).astype(np.float32) / 255.0
    m = load_array(out / rec.mask) > 0
    assert img[m].mean() > 0.9 and img[~m].mean() < 0.75  # the mask is on the mass


def test_cbis_roi_path_naming_the_cropped_image_still_finds_the_mask(tmp_path):
    """The official CSVs swap the ROI-mask and cropped-image paths for some cases; the ROI
    path then names an existing file that is the crop, and the mask is its series sibling."""
    fx = write_cbis(tmp_path / "src")
    case = "Mass-Training_P_00004_RIGHT_MLO_1"
    e = fx["cases"][case]
    base = fx["root"] / "CBIS-DDSM"
    roi, crop = base / e["roi"], base / e["crop"]
    tmp = roi.with_name("swap.tmp")
    roi.rename(tmp)
    crop.rename(roi)
    tmp.rename(crop)
    _assert_imported_with_mask_on_the_mass(fx["root"], tmp_path / "out", case)


def test_cbis_both_puts_a_patient_of_a_test_csv_wholly_in_test(tmp_path):
    """The official split is per CSV: one patient can be in the mass training CSV and the
    calc test CSV. With --abnormality both, that patient's training images went to
    train/val while another of their images was in test (a patient-level leak)."""
    fx = write_cbis(tmp_path / "src")
    calc_test = fx["root"] / "calc_case_description_test_set.csv"
    text = calc_test.read_text()
    assert text.count("P_00038,") == 1
    calc_test.write_text(text.replace("P_00038,", "P_00001,"))  # patient_id column only
    out = tmp_path / "out"
    s = run_import("cbis-ddsm", fx["root"], out, {"size": 32, "abnormality": "both"})
    recs = _by_id(out)
    p1 = {i: r.split for i, r in recs.items() if "P_00001" in i or "P_00038" in i}
    assert len(p1) == 3, p1  # P_00001's two masses and the relabelled calcification
    assert set(p1.values()) == {"test"}, p1
    assert s["details"]["train_images_of_test_patients_moved_to_test"] == 1  # one mammogram
    assert {r.split for i, r in recs.items() if "P_00004" in i} != {"test"}  # others kept


def test_cbis_mask_in_its_own_series_when_the_csv_series_holds_only_the_crop(tmp_path):
    """TCIA downloads may keep the ROI mask and the cropped image in separate series; when
    the CSV's series UID is the crop's, the mask sits in another series folder of the
    abnormality's case folder."""
    import pydicom

    fx = write_cbis(tmp_path / "src")
    case = "Mass-Training_P_00009_LEFT_CC_1"  # the fixture's TCIA-named case
    series = next((fx["root"] / "CBIS-DDSM" / case).glob("*/*ROI mask images*"))
    mask_file = series / "1-2.dcm"
    own = series.parent / "1.000000-ROI mask images-999" / "1-1.dcm"
    own.parent.mkdir()
    ds = pydicom.dcmread(mask_file)
    ds.SeriesInstanceUID = "1.3.6.1.4.1.9590.100.1.2.999999"
    ds.save_as(own)
    mask_file.unlink()
    _assert_imported_with_mask_on_the_mass(fx["root"], tmp_path / "out", case)


# ----------------------------------------------------------------------------- splits


def test_lidc_patches_row_of_a_missing_file_does_not_empty_a_split(tmp_path):
    """The fixture's CSV row 'patches/gone.npy' (its own patient) was given the only val
    place, then skipped: val came out empty and training refused the dataset."""
    fx = write_lidc_patches(tmp_path / "src")
    out = tmp_path / "out"
    s = run_import("lidc", fx["root"], out, {"size": 16, "patches_csv": fx["csv"]})
    assert s["skipped"]["by_reason"] == {"missing file": 1}
    assert s["skipped"]["items"][0]["source"] == "patches.csv:10 (patches/gone.npy)"
    assert all(s["splits"][k]["n"] > 0 for k in ("train", "val", "test")), s["splits"]
    assert not s["warnings"]
    by_patient: dict[str, set] = {}
    for r in read_manifest(out):  # patient-level split
        by_patient.setdefault(r.id.split("_")[1], set()).add(r.split)
    assert all(len(v) == 1 for v in by_patient.values())


def test_folder_csv_row_of_a_missing_file_does_not_empty_a_split(tmp_path):
    fx = write_folder_csv(tmp_path / "src")
    rows = ["image,label,group"] + [f"imgs/s{k}.png,{'tumour' if k % 2 else 'normal'},"
                                    f"p{k // 2}" for k in range(6)]
    rows.insert(1, "imgs/missing.png,normal,p9")
    (fx["root"] / "list.csv").write_text("\n".join(rows) + "\n")
    # seed 6 gave the missing file's group the only val place
    s = run_import("folder", fx["root"], tmp_path / "out",
                   {"csv": "list.csv", "size": 16, "val_frac": 0.2, "test_frac": 0.2, "seed": 6})
    assert s["skipped"]["by_reason"] == {"missing file": 1}
    assert all(s["splits"][k]["n"] > 0 for k in ("train", "val", "test")), s["splits"]


# ----------------------------------------------------------------------------- import retries


def test_import_that_found_nothing_can_be_retried_with_other_options(tmp_path):
    """`no samples imported` leaves nothing to resume, so fixing the options and rerunning
    must not be refused as 'holds an import with different settings'."""
    fx = write_brats(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no samples imported"):
        run_import("brats", fx["root"], out, {"size": 16})  # tumours < --min-tumor-px 100
    s = run_import("brats", fx["root"], out, {"size": 16, "min_tumor_px": 5})
    assert s["n"] > 0 and s["units"]["reused_from_previous_run"] == 0


# ----------------------------------------------------------------------------- figures


def _label_boxes(monkeypatch, draw) -> tuple[list, object]:
    """Draw a figure; return the window extents of its row labels (y labels of column 0,
    top to bottom) and the figure's own extent."""
    import causalign.report.figures as figures

    seen: dict = {}

    def capture(fig, path, **kw):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_ylabel()]
        axes.sort(key=lambda ax: -ax.get_position().y0)
        seen["boxes"] = [ax.yaxis.label.get_window_extent(r) for ax in axes]
        seen["fig"] = fig.bbox

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    draw(figures)
    return seen["boxes"], seen["fig"]


@pytest.mark.parametrize("grid", ["counterfactual", "cam"])
def test_row_labels_with_real_sample_ids_stay_in_their_rows(monkeypatch, tmp_path, grid):
    """Real ids (CBIS-DDSM, LIDC) are longer than a row is high: the labels overlapped the
    next row's and ran off the figure's bottom edge."""
    ids = ["Mass-Test_P_00016_LEFT_CC_1 0→1", "Mass-Test_P_00017_RIGHT_MLO_1 0→1",
           "LIDC-IDRI-0002_01.2.2_n00 y=0 p=1"]
    img = np.zeros((3, 1, 16, 16), np.float32)
    reg = np.zeros((3, 16, 16), np.float32)

    def draw(figures):
        if grid == "counterfactual":
            figures.counterfactual_grid(img, img + 0.1, reg, tmp_path / "g.png", row_titles=ids)
        else:
            figures.cam_grid(img, reg, {"wbp": reg, "gradcam": reg}, tmp_path / "g.png",
                             row_titles=ids)

    boxes, fig = _label_boxes(monkeypatch, draw)
    assert len(boxes) == 3
    for upper, lower in zip(boxes, boxes[1:], strict=False):
        assert lower.y1 <= upper.y0 + 0.5, (upper, lower)  # no overlap between rows
    assert all(b.y0 >= fig.y0 - 0.5 and b.y1 <= fig.y1 + 0.5 for b in boxes)  # on the page


# ----------------------------------------------------------------------------- counterfactuals


def test_attribute_change_under_the_triptych_shows_the_crossing_of_one_half():
    """A hier-align counterfactual on LIDC listed 'lobulation 0.50→0.50' as changed: two
    digits hid that the attribute crossed 0.5 (0.5004 → 0.4996)."""
    import torch
    from torch import nn

    from causalign.explain.counterfactual_export import attribute_changes

    class Hier(nn.Module):
        def attributes(self, x):  # logit = the first pixel
            return x.flatten(1)[:, :2]

    logit = float(torch.logit(torch.tensor(0.5004)))
    x = torch.tensor([[[[logit, 3.0]]]])
    x_star = torch.tensor([[[[-logit, -3.0]]]])
    (rec,) = attribute_changes(Hier(), x, x_star, ["lobulation", "margin"])
    assert rec["attributes_changed"] == ["lobulation 0.5004→0.4996", "margin 0.95→0.05"]


def test_change_in_region_broadcasts_a_one_channel_annotation_over_colour_channels():
    import torch

    from causalign.explain.counterfactual_export import change_in_region

    change = torch.zeros(2, 3, 4, 4)
    change[0, :, 0, 0] = 1.0  # inside the annotation, every channel
    change[0, 1, 3, 3] = 1.0  # outside
    change[1, 2, 3, 3] = 2.0  # outside only
    region = torch.zeros(2, 1, 4, 4)
    region[:, 0, 0, 0] = 1.0
    assert change_in_region(change, region).tolist() == [0.75, 0.0]


def _cli(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


@pytest.mark.slow  # a whole CLI workflow (import, train, counterfactual)
def test_cub_rgb_workflow_import_train_counterfactual(tmp_path, capsys):
    """`causalign counterfactual` on an RGB import (CUB) crashed: a one-channel annotation
    against a three-channel change ('size of tensor a (12288) must match … (4096)')."""
    import json

    fx = write_cub(tmp_path / "src")
    data, run = tmp_path / "cub", tmp_path / "run"
    _cli(capsys, "data", "import", "cub", fx["root"], data, "--size", "16", "--no-progress")
    _cli(capsys, "train", data, "--method", "erm", "--out", run, "--epochs", "1",
         "--set", "threads=1", "--set", "width=4", "--device", "cpu", "--no-progress")
    cf = tmp_path / "cf"
    _cli(capsys, "counterfactual", run, "--out", cf, "--limit", "2", "--steps", "3",
         "--device", "cpu")
    summary = json.loads((cf / "summary.json").read_text())
    assert summary["n_generated"] == 2 and (cf / "grid.png").exists()
    for rec in summary["samples"]:
        assert 0.0 <= rec["change_in_mask"] <= 1.0  # the bird's mask, all three channels
        assert load_array(cf / "cf" / f"{rec['id']}.npy").shape == (3, 16, 16)


@pytest.mark.parametrize("channels", [2, 4])
def test_multichannel_mri_images_are_drawn_with_every_modality(monkeypatch, tmp_path, channels):
    """`--modalities t1ce,flair` (2 channels) crashed explain and counterfactual ("Invalid
    shape (16, 16, 2) for image data"); 4 BraTS modalities showed t1/t1ce/t2 as RGB and
    left out FLAIR, where the whole tumour (the mask) is bright."""
    import causalign.report.figures as figures

    shown = {}

    def capture(fig, path, **kw):
        shown["original"] = np.asarray(fig.axes[0].images[0].get_array())

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    x = np.zeros((channels, 8, 8), np.float32)
    x[-1, 2:4, 2:4] = 1.0  # the lesion only in the last modality (FLAIR)
    figures.counterfactual_triptych(x, x, None, tmp_path / "t.png")
    np.testing.assert_allclose(shown["original"], x.mean(axis=0))
