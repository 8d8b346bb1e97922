"""Mutation audit of the real-format importers (LIDC-IDRI, BraTS, CBIS-DDSM, CUB-200,
DICOM reading, Decoy MNIST): behaviours the earlier tests let slip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fixtures_real import write_dicom

from causalign.data.importers import dicom as dcm
from causalign.data.importers import lidc

pydicom = pytest.importorskip("pydicom")


def _dicom(path: Path, stored: np.ndarray, **tags) -> Path:
    write_dicom(path, stored, SOPInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3",
                Modality="CT", **tags)
    return path


# ----------------------------------------------------------------------------- DICOM


def test_read_pixels_multiplies_by_slope_before_adding_intercept(tmp_path):
    """HU = RescaleSlope·stored + RescaleIntercept (DICOM PS3.3 C.11.1.1.2), checked with a
    slope ≠ 1: the fixtures all use slope 1, so (stored + intercept)·slope survived (M02)."""
    stored = np.array([[0, 100], [1000, 2000]], np.uint16)
    path = _dicom(tmp_path / "a.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024)
    arr, _ = dcm.read_pixels(pydicom, path)
    np.testing.assert_allclose(arr, stored.astype(np.float64) * 2 - 1024)


def test_monochrome1_is_inverted_so_bright_is_dense(tmp_path):
    """MONOCHROME1 stores 'high = dark': read_pixels flips it (max − value) so bright means
    dense as in MONOCHROME2; never tested, so dropping the flip survived (M03)."""
    stored = np.array([[0, 10], [30, 40]], np.uint16)
    a1, _ = dcm.read_pixels(pydicom, _dicom(tmp_path / "m1.dcm", stored,
                                            PhotometricInterpretation="MONOCHROME1"))
    a2, _ = dcm.read_pixels(pydicom, _dicom(tmp_path / "m2.dcm", stored))
    np.testing.assert_allclose(a2, stored)
    np.testing.assert_allclose(a1, 40 - stored.astype(np.float64))


def test_dicom_names_without_suffix_or_named_by_uid_are_candidates():
    """DICOMDIR trees store 'IM000001' (no suffix) and TCIA downloads UID-named files;
    both must be read, hidden AppleDouble files and other suffixes not (kills M04, which
    dropped suffix-less names)."""
    assert dcm.is_dicom_name("IM000001")
    assert dcm.is_dicom_name("1-001.dcm") and dcm.is_dicom_name("X.DCM")
    assert dcm.is_dicom_name("1.3.6.1.4.1.14519.5")
    assert not dcm.is_dicom_name("._1-001.dcm")
    assert not dcm.is_dicom_name("069.xml")
    assert not dcm.is_dicom_name("notes.txt")


# ----------------------------------------------------------------------------- LIDC


def test_lidc_attribute_thresholds_at_every_score():
    """Each attribute's binarisation at every score 1–6 against the README's table
    (subtlety ≥ 4, calcification < 6, margin ≤ 3, spiculation ≥ 3, lobulation ≥ 3,
    texture ≥ 4); the fixtures never hit texture's boundary 4, so '> 4' survived (L04)."""
    rule = {"subtlety": lambda v: v >= 4, "calcification": lambda v: v != 6,
            "margin": lambda v: v <= 3, "spiculation": lambda v: v >= 3,
            "lobulation": lambda v: v >= 3, "texture": lambda v: v in (4, 5, 6)}
    for name in lidc.ATTRIBUTES:
        for v in (1, 2, 2.5, 3, 3.5, 4, 5, 6):
            assert lidc.binarise(name, float(v)) == float(rule[name](v)), (name, v)
        assert math.isnan(lidc.binarise(name, math.nan))


def _ann(reader: int, x: float, y: float, z: float = 0.0, r: float = 0.0) -> lidc.Annotation:
    """One reader's mark: a point (r = 0) or a 16-point circle of radius r px."""
    if r == 0:
        xs, ys = [x], [y]
    else:
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        xs, ys = list(x + r * np.cos(t)), list(y + r * np.sin(t))
    return lidc.Annotation(reader=reader, nodule_id=f"n{reader}", characteristics={},
                           rois=[lidc.Roi(z=z, sop="s", inclusion=True, xs=xs, ys=ys)])


def test_lidc_cluster_never_holds_one_reader_twice():
    """Reader 0 marks two nodules 4 mm apart, reader 1 one mark between them: linking
    closest pair first gives {r0a, r1} and {r0b}, never reader 0 twice in a nodule (the
    README's rule; dropping the reader check merged all three, L09)."""
    anns = [_ann(0, 10, 10), _ann(0, 14, 10), _ann(1, 11, 10)]
    clusters = lidc.cluster_annotations(anns, (1.0, 1.0), 5.0)
    assert sorted(sorted(c) for c in clusters) == [[0, 2], [1]]
    for c in clusters:
        readers = [anns[i].reader for i in c]
        assert len(readers) == len(set(readers))


def test_lidc_cluster_tolerance_grows_with_nodule_size():
    """Two readers' outlines of a 20 mm nodule whose centroids lie 7 mm apart are one
    nodule (distance ≤ half the larger equivalent diameter, 10 mm > --cluster-mm 5); two
    points 7 mm apart are two. Kills L10 (diameter term dropped)."""
    big = [_ann(0, 20, 20, r=10), _ann(1, 27, 20, r=10)]
    assert len(lidc.cluster_annotations(big, (1.0, 1.0), 5.0)) == 1
    small = [_ann(0, 20, 20), _ann(1, 27, 20)]
    assert len(lidc.cluster_annotations(small, (1.0, 1.0), 5.0)) == 2


def test_lidc_cluster_distance_uses_row_and_column_spacing():
    """Pixel offsets are converted to mm with PixelSpacing (row, column): with 1 mm rows and
    3 mm columns, 3 px along x is 9 mm (two nodules) and 3 px along y is 3 mm (one).
    Kills L11 (row/column spacing swapped)."""
    along_x = [_ann(0, 10, 10), _ann(1, 13, 10)]
    along_y = [_ann(0, 10, 10), _ann(1, 10, 13)]
    assert len(lidc.cluster_annotations(along_x, (1.0, 3.0), 5.0)) == 2
    assert len(lidc.cluster_annotations(along_y, (1.0, 3.0), 5.0)) == 1


def test_lidc_resample_steps_rows_and_columns_by_their_own_spacing():
    """A patch at 1 mm/px from a slice with 0.5 mm rows and 2 mm columns steps 2 px per
    output row and 0.5 px per output column; checked on a slice whose value is
    100·row + column (bilinear is exact there). Kills L12 (spacings swapped)."""
    rows, cols = np.mgrid[0:64, 0:64].astype(np.float32)
    img = 100 * rows + cols
    out = lidc._resample(img, cx=30.0, cy=32.0, spacing_rc=(0.5, 2.0), out_spacing=1.0,
                         size=5, order=1, cval=-1000.0)
    offs = np.arange(5) - 2.0
    expect = 100 * (32.0 + offs[:, None] / 0.5) + (30.0 + offs[None, :] / 2.0)
    np.testing.assert_allclose(out, expect, atol=1e-3)


def _square(reader: int, x0: float, y0: float, x1: float, y1: float, z: float = 0.0,
            sop: str = "s0", inclusion: bool = True, n_side: int = 1) -> lidc.Roi:
    """A square outline with n_side points per side (more points: same polygon, more
    weight in the annotation's centroid)."""
    t = np.linspace(0, 1, n_side, endpoint=False)
    xs = [*(x0 + (x1 - x0) * t), *([x1] * n_side), *(x1 - (x1 - x0) * t), *([x0] * n_side)]
    ys = [*([y0] * n_side), *(y0 + (y1 - y0) * t), *([y1] * n_side), *(y1 - (y1 - y0) * t)]
    return lidc.Roi(z=z, sop=sop, inclusion=inclusion, xs=[float(v) for v in xs],
                    ys=[float(v) for v in ys])


class _FakeSlices:
    """Stands in for lidc._Slices: HU slices by SOP UID, with their z."""

    def __init__(self, slices: dict[str, tuple[float, np.ndarray]]) -> None:
        self.z_of = {s: z for s, (z, _) in slices.items()}
        self.hu = {s: a for s, (_, a) in slices.items()}

    def get(self, sop: str) -> np.ndarray:
        return self.hu[sop]


def _nodule_sample(tmp_path, anns: list[lidc.Annotation], slices: dict, **opts):
    """Run LidcImporter._nodule_sample on hand-made reader marks (1 mm pixels, patch at
    1 mm/px, so the patch is the slice cut 1:1 around the mask's centroid)."""
    o = lidc.LidcOptions(**{"size": 32, **opts})
    imp = lidc.LidcImporter(tmp_path, o)
    series = lidc.Series(uid="1.2", patient="P", spacing=(1.0, 1.0), thickness=2.0, slices=[])
    msg = lidc.ReadMessage(series_uid="1.2", n_sessions=4, annotations=anns)
    nod = lidc._Nodule(index=0, ann=list(range(len(anns))), label=1, attributes=[],
                       readers=len({a.reader for a in anns}))
    return imp._nodule_sample("P_n00", "train", series, msg, nod, _FakeSlices(slices))


def _reader(reader: int, *rois: lidc.Roi) -> lidc.Annotation:
    return lidc.Annotation(reader=reader, nodule_id=str(reader), characteristics={},
                           rois=list(rois))


def test_lidc_consensus_is_half_of_the_readers_not_a_strict_majority(tmp_path):
    """--mask-rule consensus keeps pixels marked by ≥ 50% of the readers: of 2 readers, one
    suffices, so reader 0's 20×10 px outline around reader 1's 10×6 px one gives the larger
    area. Also pins the patch centre: the mask's centroid is the patch centre (x, y not
    swapped). Kills L07 (strict majority) and L20 (centre x/y swapped)."""
    hu = np.full((64, 64), -850.0, np.float32)
    anns = [_reader(0, _square(0, 10, 30, 30, 40)), _reader(1, _square(1, 15, 32, 25, 38))]
    s = _nodule_sample(tmp_path, anns, {"s0": (0.0, hu)}, mask_rule="consensus")
    big = 21 * 11  # outline pixels included
    assert abs(int(s.mask.sum()) - big) <= 0.15 * big
    ys, xs = np.nonzero(s.mask)
    assert abs(xs.mean() - 15.5) <= 1.0 and abs(ys.mean() - 15.5) <= 1.0


def test_lidc_exclusion_outline_is_a_hole_in_the_mask(tmp_path):
    """inclusion FALSE outlines are holes: an outline 10..30 with an exclusion 15..25 leaves
    a ring (centre unmasked, ≈ 21² − 9² px). Kills L08 (exclusions not subtracted)."""
    hu = np.full((64, 64), -850.0, np.float32)
    ann = _reader(0, _square(0, 10, 10, 30, 30),
                  _square(0, 15, 15, 25, 25, inclusion=False))
    s = _nodule_sample(tmp_path, [ann], {"s0": (0.0, hu)})
    ring = 21 * 21 - 9 * 9
    assert abs(int(s.mask.sum()) - ring) <= 0.15 * ring
    assert not s.mask[14:18, 14:18].any()


def test_lidc_patch_outside_the_scan_is_air(tmp_path):
    """A nodule at the slice's corner: the patch part outside the scan is air (−1000 HU →
    0 after the −1000…400 window), not 0 HU (0.714). Kills L13 (cval 0)."""
    hu = np.full((64, 64), -500.0, np.float32)
    ann = _reader(0, _square(0, 0, 0, 6, 6))
    s = _nodule_sample(tmp_path, [ann], {"s0": (0.0, hu)})
    inside = 500 / 1400
    img = np.asarray(s.image)
    assert np.isclose(img[-1, -1], inside, atol=1e-3)
    assert img[0, 0] == 0.0 and (img < inside + 1e-3).all()


def test_lidc_equal_masks_pick_the_slice_nearest_the_nodule_centre(tmp_path):
    """Two slices with the same outline: the one nearest the readers' centroid z wins. The
    z = 0 outline has 20 points per side, the z = 2 one 1, so the centroid is near z = 0;
    slices differ in HU so the patch shows which was taken. Kills L17 (far slice)."""
    near = np.full((64, 64), -500.0, np.float32)
    far = np.full((64, 64), 0.0, np.float32)
    ann = _reader(0, _square(0, 20, 20, 30, 30, z=0.0, sop="a", n_side=20),
                  _square(0, 20, 20, 30, 30, z=2.0, sop="b"))
    s = _nodule_sample(tmp_path, [ann], {"a": (0.0, near), "b": (2.0, far)})
    assert np.isclose(float(np.asarray(s.image)[16, 16]), 500 / 1400, atol=1e-3)


def test_lidc_patient_is_the_folder_above_study_and_series(tmp_path):
    """Without PatientID the patient is <patient> of <patient>/<study>/<series>/<file>: two
    studies of one patient are one patient (kills L19, which took the study folder)."""
    imp = lidc.LidcImporter(tmp_path, lidc.LidcOptions())
    f = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0007" / "01-01-2000-CT" / "3000.0-NA" / "1.dcm"
    assert imp._patient_folder(f) == "LIDC-IDRI-0007"


def test_lidc_drop_uncertain_skips_median_three_in_the_xml_path(tmp_path):
    """--drop-uncertain skips a nodule whose median malignancy is exactly 3 (2, 3, 4), and
    without it that nodule is benign; 3.5 (3, 4) stays malignant. Kills L14 (the flag
    ignored for XML reads: only the patches-CSV path was tested)."""
    def label(scores: list[float], **opts):
        anns = [lidc.Annotation(reader=r, nodule_id="n", characteristics={"malignancy": v},
                                rois=[lidc.Roi(0.0, "s", True, [1.0], [1.0])])
                for r, v in enumerate(scores)]
        msg = lidc.ReadMessage(series_uid="1", n_sessions=4, annotations=anns)
        imp = lidc.LidcImporter(tmp_path, lidc.LidcOptions(**opts))
        nod = imp._label_nodule(msg, list(range(len(anns))), 0, "here")
        return None if nod is None else nod.label

    assert label([2, 3, 4]) == 0
    assert label([2, 3, 4], drop_uncertain=True) is None
    assert label([3, 4], drop_uncertain=True) == 1


def test_lidc_integer_npy_patch_is_hounsfield_even_in_zero_one(tmp_path):
    """An integer NPY patch is HU whatever its range: values 0/1 HU are windowed
    (−1000…400 → ≈ 0.714), not read as a [0, 1] image. Kills L15 (integer rule dropped)."""
    p = tmp_path / "p.npy"
    np.save(p, np.array([[0, 1], [1, 0]], np.int16))
    out = lidc._read_patch(p, (-1000.0, 400.0))
    np.testing.assert_allclose(out, (np.array([[0, 1], [1, 0]]) + 1000) / 1400, atol=1e-5)


def test_lidc_csv_reader_count_presence_rule(tmp_path):
    """--label presence from a 'readers' column: ≥ 3 readers → 1, 2 → 0 (paper 002).
    Kills L21 ('> 3')."""
    imp = lidc.LidcImporter(tmp_path, lidc.LidcOptions(label="presence"))
    assert imp._csv_label({"readers": "3"}, "readers") == 1
    assert imp._csv_label({"readers": "2"}, "readers") == 0
    assert imp._csv_label({"readers": "4"}, "readers") == 1


# ----------------------------------------------------------------------------- CBIS-DDSM


def test_cbis_mass_shape_attribute_counts_architectural_distortion():
    """shape = 1 for IRREGULAR or ARCHITECTURAL_DISTORTION (also within a combined value),
    0 for OVAL/ROUND/LOBULATED, NaN for N/A. Kills C05 (distortion dropped)."""
    from causalign.data.importers.cbis_ddsm import mass_attributes

    def shape(v: str) -> float:
        return mass_attributes({"mass_shape": v, "mass_margins": "SPICULATED"})["shape"]

    assert shape("ARCHITECTURAL_DISTORTION") == 1.0
    assert shape("ROUND-ARCHITECTURAL_DISTORTION") == 1.0
    assert shape("IRREGULAR") == 1.0
    assert shape("OVAL") == 0.0 and shape("LOBULATED") == 0.0
    assert math.isnan(shape("N/A"))


# ----------------------------------------------------------------------------- CUB


def test_cub_not_visible_attribute_is_missing_not_its_is_present_value(tmp_path):
    """image_attribute_labels.txt: certainty 1 ('not visible') makes the value NaN whatever
    is_present says; certainties 2–4 keep is_present; an image without a line is NaN.
    Kills U01 (certainty ignored)."""
    from causalign.data.importers.cub import read_attribute_labels

    p = tmp_path / "image_attribute_labels.txt"
    p.write_text("1 2 1 1 0.5\n1 5 0 3 1.0\n2 2 1 4 0.2\n2 5 1 2 0.3 extra\n1 9 1 4 0.1\n")
    out = read_attribute_labels(p, ["2", "5"], {"1", "2", "3"})
    assert math.isnan(out["1"][0]) and out["1"][1] == 0.0
    assert out["2"] == [1.0, 1.0]
    assert "3" not in out


def test_cub_segmentation_majority_threshold_is_128(tmp_path):
    """CUB segmentations average annotators: gray ≥ 128 (a majority) is foreground, 127 is
    not. Kills U02 ('> 128')."""
    from PIL import Image

    from causalign.data.importers.cub import read_mask_threshold

    p = tmp_path / "s.png"
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(p)
    assert read_mask_threshold(p).tolist() == [[False, False, True, True]]


# ----------------------------------------------------------------------------- BraTS


def _brats_one(tmp_path: Path, subj: str, seg: np.ndarray, sep: str, names: tuple[str, ...],
               **opts) -> dict:
    """Write one BraTS subject (a 20×20×10 ellipsoid brain, identity affine) and import it
    into train only; returns {record id: (label, mask or None)}."""
    pytest.importorskip("nibabel")
    from fixtures_real import BRATS_SHAPE, _save_nii

    from causalign.data.format import load_array, read_manifest
    from causalign.data.importers import run_import

    x, y, z = np.mgrid[0:BRATS_SHAPE[0], 0:BRATS_SHAPE[1], 0:BRATS_SHAPE[2]]
    brain = (((x - 9.5) / 9) ** 2 + ((y - 9.5) / 9) ** 2 + ((z - 4.5) / 5.5) ** 2) <= 1
    root = tmp_path / "src"
    for mod in names:
        _save_nii(root / subj / f"{subj}{sep}{mod}.nii.gz",
                  np.where(brain, 300.0, 0.0).astype(np.float32), np.eye(4))
    _save_nii(root / subj / f"{subj}{sep}seg.nii.gz", seg(x, y, z, brain).astype(np.uint8),
              np.eye(4))
    out = tmp_path / "out"
    run_import("brats", root, out, {"size": 20, "val_frac": 0.0, "test_frac": 0.0, **opts})
    return {r.id: (r.label, load_array(out / r.mask) > 0 if r.mask else None)
            for r in read_manifest(out)}


def test_brats_2023_cavity_beside_oedema_is_not_enhancing(tmp_path):
    """2023+ names: a tumour slice holding oedema (2) and a resection cavity (4) but no
    enhancing tumour (3) is 'non-enhancing' for --task enhancing. Kills B01 (4 counted as
    enhancing in the 2023 table; the earlier test's cavity slices were never tumour
    slices)."""
    def seg(x, y, z, brain):
        s = np.zeros(x.shape)
        s[(abs(x - 6) <= 2) & (abs(y - 6) <= 2) & (z == 5)] = 2
        s[(abs(x - 13) <= 2) & (abs(y - 13) <= 2) & (z == 5)] = 4
        return s

    recs = _brats_one(tmp_path, "BraTS-GLI-00001-100", seg, "-", ("t1n", "t1c", "t2w", "t2f"),
                      task="enhancing", min_tumor_px=8)
    assert {k: v[0] for k, v in recs.items()} == {"BraTS-GLI-00001-100_z005": 0}


def test_brats_classic_core_region_excludes_oedema(tmp_path):
    """--region tc (tumour core) is labels 1, 3, 4 in the 2018–2021 numbering: oedema (2)
    is not core. A slice with 3×3 core (1) inside 5×5 oedema gives a 9-voxel-sized mask
    (at --size 20, the 20-voxel brain maps 1:1). Kills B02 (oedema in the core)."""
    def seg(x, y, z, brain):
        s = np.zeros(x.shape)
        s[(abs(x - 10) <= 2) & (abs(y - 10) <= 2) & (z == 5)] = 2
        s[(abs(x - 10) <= 1) & (abs(y - 10) <= 1) & (z == 5)] = 1
        return s

    recs = _brats_one(tmp_path, "BraTS2021_00000", seg, "_", ("t1", "t1ce", "t2", "flair"),
                      region="tc", min_tumor_px=8)
    label, mask = recs["BraTS2021_00000_z005"]
    assert label == 1 and mask is not None
    assert 6 <= int(mask.sum()) <= 12  # ≈ 9 core voxels, not the 25 of core + oedema


def test_brats_enhancing_threshold_is_inclusive(tmp_path):
    """--task enhancing: a slice is enhancing with ≥ --min-tumor-px // 4 enhancing voxels
    (8 // 4 = 2: exactly 2 ET voxels → 1). Kills B05 ('>')."""
    def seg(x, y, z, brain):
        s = np.zeros(x.shape)
        s[(abs(x - 10) <= 2) & (abs(y - 10) <= 2) & (z == 5)] = 2
        s[(x == 10) & (y >= 10) & (y <= 11) & (z == 5)] = 4
        return s

    recs = _brats_one(tmp_path, "BraTS2021_00000", seg, "_", ("t1", "t1ce", "t2", "flair"),
                      task="enhancing", min_tumor_px=8)
    assert {k: v[0] for k, v in recs.items()} == {"BraTS2021_00000_z005": 1}


def test_brats_2023_modality_names_map_to_their_classic_channels(tmp_path):
    """BraTS 2023 names: t1n → t1 (native), t1c → t1ce (contrast), t2w → t2, t2f → flair;
    swapping t1n/t1c fed the native T1 as the contrast channel. Kills B03."""
    from causalign.data.importers.brats import find_subjects, label_scheme

    subj = tmp_path / "BraTS-GLI-00002-000"
    subj.mkdir()
    for mod in ("t1n", "t1c", "t2w", "t2f", "seg"):
        (subj / f"BraTS-GLI-00002-000-{mod}.nii.gz").write_bytes(b"")
    files = find_subjects(tmp_path)["BraTS-GLI-00002-000"]
    assert {m: p.name.rsplit("-", 1)[1] for m, p in files.items()} == {
        "t1": "t1n.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2w.nii.gz", "flair": "t2f.nii.gz",
        "seg": "seg.nii.gz"}
    assert label_scheme(files) == "2023"


def test_brats_cavity_slices_are_never_tumour_free_negatives(tmp_path):
    """--task tumor negatives hold no labelled voxel: a BraTS 2024 slice with only the
    resection cavity (4) is neither tumour nor 'no tumour'. With the cavity on every slice
    but the tumour's, there is no negative at all. Kills B06 (negatives chosen by the
    tumour labels only, so cavity slices became 'no tumour' samples)."""
    def seg(x, y, z, brain):
        s = np.zeros(x.shape)
        s[(abs(x - 10) <= 2) & (abs(y - 10) <= 2) & (z == 5)] = 2
        s[(abs(x - 6) <= 1) & (abs(y - 6) <= 1) & (z != 5)] = 4
        return s

    recs = _brats_one(tmp_path, "BraTS-GLI-00003-100", seg, "-", ("t1n", "t1c", "t2w", "t2f"),
                      min_tumor_px=8)
    assert {k: v[0] for k, v in recs.items()} == {"BraTS-GLI-00003-100_z005": 1}


def test_brats_patient_of_joins_2024_time_points_only():
    """BraTS 2023+ 'BraTS-<cohort>-<patient>-<time point>': time points of one patient are
    one patient (kept in one split), the cohort stays part of the patient, classic names
    are a patient each. Kills B07 (every subject its own patient)."""
    from causalign.data.importers.brats import patient_of

    assert patient_of("BraTS-GLI-00005-100") == patient_of("BraTS-GLI-00005-101") \
        == "BraTS-GLI-00005"
    assert patient_of("BraTS-MEN-00005-000") != patient_of("BraTS-GLI-00005-000")
    assert patient_of("BraTS-MEN-RT-0001-000") == "BraTS-MEN-RT-0001"
    assert patient_of("BraTS20_Training_001") == "BraTS20_Training_001"


def test_cbis_patient_in_a_test_csv_has_all_images_in_test(tmp_path):
    """The official split is per CSV: P_1 is in the mass training CSV and the calc test CSV,
    so all of P_1's images go to test (no patient in train and test); P_2 (train only)
    stays out of test. Only the CSVs are read while planning. Kills C02 (a test patient's
    training images kept in train/val)."""
    from fixtures_real import CALC_HEADER, MASS_HEADER, _write_csv

    from causalign.data.importers.cbis_ddsm import CbisDdsmImporter, CbisDdsmOptions

    def row(header, pid, kind, n):
        case = f"{kind}-{'Test' if kind.endswith('t') else 'Training'}_{pid}_LEFT_CC"
        vals = {"patient_id": pid, "pathology": "MALIGNANT" if n % 2 else "BENIGN",
                "subtlety": "3", "image file path": f"{case}/1.2/1.3/000000.dcm",
                "ROI mask file path": f"{case}_{n}/1.2/1.4/000000.dcm"}
        return [vals.get(h, "") for h in header]

    pids = [f"P_{k:05d}" for k in range(1, 9)]
    _write_csv(tmp_path / "mass_case_description_train_set.csv", MASS_HEADER,
               [row(MASS_HEADER, p, "Mass-Train", k) for k, p in enumerate(pids)])
    _write_csv(tmp_path / "mass_case_description_test_set.csv", MASS_HEADER,
               [row(MASS_HEADER, "P_00099", "Mass-Test", 1)])
    _write_csv(tmp_path / "calc_case_description_train_set.csv", CALC_HEADER,
               [row(CALC_HEADER, "P_00098", "Calc-Train", 1)])
    _write_csv(tmp_path / "calc_case_description_test_set.csv", CALC_HEADER,
               [row(CALC_HEADER, "P_00001", "Calc-Test", 1)])
    imp = CbisDdsmImporter(tmp_path, CbisDdsmOptions(abnormality="both", val_frac=0.5))
    units = imp.plan()
    by_patient: dict[str, set[str]] = {}
    for u in units:
        by_patient.setdefault(u.payload["patient"], set()).add(u.split)
    assert by_patient["P_00001"] == {"test"}
    assert imp.details["train_images_of_test_patients_moved_to_test"] == 1
    assert all(by_patient[p] <= {"train", "val"} for p in pids[1:])


def _cbis_case(tmp_path: Path, roi_files: dict[str, np.ndarray], size: int = 64):
    """One CBIS-DDSM image (128² px: a bright breast over a dark background) and its ROI
    folder files, processed by CbisDdsmImporter.process with literal CSV paths."""
    from causalign.data.importers.base import Unit
    from causalign.data.importers.cbis_ddsm import CbisDdsmImporter, CbisDdsmOptions

    full = np.zeros((128, 128), np.uint16)
    full[8:120, 8:120] = 1000 + (np.arange(112)[None, :] * 3).astype(np.uint16)
    case = "Mass-Training_P_00001_LEFT_CC"
    _dicom(tmp_path / case / "a" / "b" / "1-1.dcm", full)
    for k, (name, arr) in enumerate(roi_files.items()):
        write_dicom(tmp_path / f"{case}_1" / "a" / "c" / name, arr, SOPInstanceUID=f"1.9.{k}",
                    SeriesInstanceUID="1.9", Modality="MG")
    imp = CbisDdsmImporter(tmp_path, CbisDdsmOptions(size=size))
    imp.pydicom, imp._case_dirs, imp._series_index = pydicom, None, {}
    first = next(iter(roi_files))
    e = {"image": f"{case}/a/b/1-1.dcm", "patient": "P_00001", "official": "train",
         "rows": [{"id": "x", "label": 1, "attributes": [], "source": "csv:2",
                   "roi": f"{case}_1/a/c/{first}"}]}
    return list(imp.process(Unit(key="k", split="train", source="s", payload=e)))


def _square_mask(lo: int, hi: int) -> np.ndarray:
    m = np.zeros((128, 128), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


def test_cbis_crop_adds_context_of_half_the_box_on_each_side(tmp_path):
    """The crop's side is the ROI box's longest side × (1 + 2·--context): with the default
    0.5 a 40 px lesion fills half the crop (≈ 32 of 64 px). The fixtures' lesions are below
    the 32 px minimum crop, so 'side × (1 + context)' survived (C04)."""
    (s,) = _cbis_case(tmp_path, {"1-1.dcm": _square_mask(40, 80)})
    x0, y0, x1, y1 = s.box
    assert abs((x1 - x0) - 32) <= 2 and abs((y1 - y0) - 32) <= 2


def test_cbis_roi_mask_is_the_binary_file_not_a_three_level_image(tmp_path):
    """The ROI series also holds the cropped lesion image: only a binary file is the mask.
    A full-size image with 3 gray levels (two squares on black) listed first is passed over
    for the binary 20 px lesion mask beside it, which fills its box; C06 (up to 3 levels
    accepted) took both squares, a mask covering a fifth of its 70 px box."""
    three = np.zeros((128, 128), np.uint16)
    three[20:40, 20:40] = 100
    three[70:90, 70:90] = 200
    (s,) = _cbis_case(tmp_path, {"1-1.dcm": three, "1-2.dcm": _square_mask(50, 70)})
    x0, y0, x1, y1 = s.box
    assert abs((x1 - x0) - 32) <= 2  # the 20 px lesion, with context, fills half the crop
    assert s.mask.sum() >= 0.8 * (x1 - x0) * (y1 - y0)


def test_cub_box_crop_margin_is_context_on_each_side(tmp_path):
    """--crop box: a square of the box's longest side × (1 + 2·--context) (0.15: 1.3×), so a
    40 px box fills 64·40/52 ≈ 49 px of a 64 px crop; the earlier test accepted anything
    from 60% to 100%, so 'side × (1 + context)' (≈ 56 px) survived (U05)."""
    from PIL import Image

    from causalign.data.importers.base import Unit
    from causalign.data.importers.cub import CubImporter, CubOptions

    (tmp_path / "images" / "001.A").mkdir(parents=True)
    Image.fromarray(np.full((100, 128, 3), 90, np.uint8)).save(tmp_path / "images/001.A/a.png")
    imp = CubImporter(tmp_path, CubOptions(size=64, crop="box", mask="box"))
    imp.root, imp.seg_root = tmp_path, None
    (s,) = imp.process(Unit(key="1", split="train", source="a",
                            payload=("1", "001.A/a.png", 0, (20.0, 30.0, 60.0, 70.0), None)))
    x0, y0, x1, y1 = s.box
    assert abs((x1 - x0) - 64 * 40 / 52) <= 1.5 and abs((y1 - y0) - 64 * 40 / 52) <= 1.5


# ----------------------------------------------------------------------------- Decoy MNIST


def test_decoy_mnist_mask_excludes_the_swatch_even_over_the_digit(tmp_path):
    """The mask is the dilated digit minus the 4×4 decoy swatch. The fixture's digits never
    reach a corner, so 'swatch excluded' could be dropped (D02); here the digit fills the
    frame (real MNIST strokes can reach the corner rows), so exactly the 16 swatch pixels,
    shaded 255 − 25·3, are unmasked."""
    from causalign.data.importers.base import Unit
    from causalign.data.importers.decoy_mnist import DecoyMnistImporter, DecoyMnistOptions

    imp = DecoyMnistImporter(tmp_path, DecoyMnistOptions())
    imp.data = {"train": (np.full((1, 28, 28), 100, np.uint8), np.array([3], np.uint8))}
    (s,) = imp.process(Unit(key="train0", split="train", source="t", payload=("train", 0)))
    swatch = np.isclose(np.asarray(s.image), (255 - 75) / 255)
    assert swatch.sum() == 16
    np.testing.assert_array_equal(s.mask, ~swatch)
