"""`causalign data import`: every importer on a fixture in its dataset's real on-disk layout
(tests/fixtures_real.py) — counts, label mapping, masks on lesions, split rules, shortcut only
in training, skipped items with reasons, resume after an interruption, clear errors."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from fixtures_real import (
    LIDC_NODULES,
    write_brats,
    write_busi,
    write_cbis,
    write_cub,
    write_folder,
    write_folder_csv,
    write_lidc,
    write_lidc_patches,
    write_mnist,
)

from causalign.cli import main
from causalign.data.format import SPLITS, LesionDataset, load_array, read_manifest, read_meta
from causalign.data.importers import IMPORTERS, run_import
from causalign.data.importers.util import assign_splits, phash
from causalign.errors import CausalignError, DataError

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")


def _read_all(root):
    """Every non-empty split through LesionDataset (full validation), by split."""
    out = {}
    for split in SPLITS:
        if any(r.split == split for r in read_manifest(root)):
            out[split] = LesionDataset(root, split)
    return out


def _by_id(root):
    return {r.id: r for r in read_manifest(root)}


def _image(root, rec):
    arr = load_array(root / rec.image).astype(np.float32)
    return arr / 255.0 if arr.dtype != np.float32 or arr.max() > 1.5 else arr


def _mask(root, rec):
    return load_array(root / rec.mask) > 0


def _skips(summary):
    return summary["skipped"]["by_reason"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """All fixtures, written once for the module."""
    base = tmp_path_factory.mktemp("real")
    return {
        "busi": write_busi(base / "busi"),
        "folder": write_folder(base / "folder"),
        "folder_csv": write_folder_csv(base / "folder_csv"),
        "cub": write_cub(base / "cub"),
        "mnist": write_mnist(base / "mnist"),
        "brats": write_brats(base / "brats"),
        "cbis": write_cbis(base / "cbis"),
        "lidc": write_lidc(base / "lidc"),
        "lidc_patches": write_lidc_patches(base / "lidc_patches"),
    }


# ----------------------------------------------------------------------------- BUSI


def test_busi(src, tmp_path):
    fx = src["busi"]
    out = tmp_path / "busi"
    s = run_import("busi", fx["root"].parent, out, {"size": 32, "seed": 1})
    recs = _by_id(out)
    labels = {rid: r.label for rid, r in recs.items()}
    assert sum(v == 0 for v in labels.values()) == fx["n_benign"]
    assert sum(v == 1 for v in labels.values()) == fx["n_malignant"]
    assert read_meta(out).classes == ["benign", "malignant"]
    # broken inputs are skipped with their reason, never silently dropped
    assert _skips(s) == {"missing mask": 1, "unreadable image": 1}
    items = {i["reason"]: i["source"] for i in s["skipped"]["items"]}
    assert "benign (6).png" in items["missing mask"]
    assert "malignant (5).png" in items["unreadable image"]
    # near-duplicates found by perceptual hash, and each group kept in one split
    assert s["details"]["duplicate_groups"] == 3
    assert len(s["details"]["cross_class_groups"]) == 1
    for a, b in fx["duplicates"]:
        ida, idb = a.replace(" (", "_").rstrip(")"), b.replace(" (", "_").rstrip(")")
        assert recs[ida].split == recs[idb].split, (a, b)
    # '_mask.png' and '_mask_1.png' merged by OR: benign (2) covers both halves of its disk
    m2 = _mask(out, recs["benign_2"])
    ys, xs = np.nonzero(m2)
    assert xs.min() < 32 * 22 / 48 < xs.max()  # lesion centre column 22 of 48 px
    full = fx["masks"]["benign (2)"]
    assert abs(m2.mean() - full.mean() * (40 / 48)) < 0.03  # letterboxed 40×48 → 32×32
    # masks fall on the (dark) lesions
    for rid, r in recs.items():
        img, m = _image(out, r), _mask(out, r)
        assert img[m].mean() < img[~m & (img > 0.05)].mean() - 0.1, rid
    assert (out / "import_summary.json").exists()
    assert json.loads((out / "import_summary.json").read_text())["n"] == 11
    ds = _read_all(out)
    assert sum(len(d) for d in ds.values()) == 11
    assert ds["train"].image_shape == (1, 32, 32)


def test_busi_normal_class_and_drop_duplicates(src, tmp_path):
    root = src["busi"]["root"]
    s = run_import("busi", root, tmp_path / "b3",
                   {"size": 32, "classes": "benign,malignant,normal", "drop_duplicates": True})
    recs = _by_id(tmp_path / "b3")
    normal = [r for r in recs.values() if r.label == 2]
    assert len(normal) == 2 and all(r.mask is None for r in normal)  # empty masks → no mask
    assert s["notes"]["empty mask stored as no mask (normal class or blank mask file)"] == 2
    assert _skips(s)["near-duplicate dropped (--drop-duplicates)"] == 3
    assert "benign_5" not in recs and "benign_1" in recs
    assert s["n"] == 2 + 11 - 3


def test_phash_separates_and_matches():
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(rng.random((40, 48)), 3)
    b = gaussian_filter(rng.random((40, 48)), 3)
    near = a + rng.normal(0, 0.0005, a.shape)
    assert (phash(a) != phash(near)).sum() <= 4
    assert (phash(a) != phash(b)).sum() > 12


# ----------------------------------------------------------------------------- folder


def test_folder_tree(src, tmp_path):
    fx = src["folder"]
    out = tmp_path / "f"
    s = run_import("folder", fx["root"], out, {"size": 32, "val_frac": 0.2, "test_frac": 0.2})
    meta = read_meta(out)
    assert meta.classes == ["healthy", "lesion"]
    per_class = {c: sum(s["splits"][sp]["per_class"][c] for sp in SPLITS) for c in meta.classes}
    assert per_class == fx["n"]
    assert _skips(s) == fx["skipped"]
    for r in read_manifest(out):
        if r.label == 1:
            img, m = _image(out, r), _mask(out, r)
            assert img[m].mean() > 0.85 and img[~m].mean() < 0.6, r.id
        else:
            assert r.mask is None
    assert all(len(d) for d in _read_all(out).values())


def test_exif_orientation_is_read_as_stored_and_counted(tmp_path):
    """A JPEG whose EXIF tag asks viewers to turn it keeps its stored pixels (as PIL and
    torchvision read it, and as the mask beside it was drawn here), and the summary counts
    it: before, nothing said so, and a mask drawn on the turned view sat elsewhere."""
    from PIL import Image

    from causalign.data.importers.util import EXIF_NOTE

    root = tmp_path / "src"
    for cls in ("healthy", "lesion"):
        (root / cls).mkdir(parents=True)
        for k in range(4):
            img = np.full((32, 32), 60, np.uint8)
            m = np.zeros((32, 32), np.uint8)
            if cls == "lesion":
                img[4:12, 4:12] = 250  # top-left in the stored pixels
                m[4:12, 4:12] = 255
                Image.fromarray(m).save(root / cls / f"im{k}_mask.png")
            exif = Image.Exif()
            exif[274] = 3 if k < 3 else 1  # 180°: 3 of 4 files of each class; 1: as stored
            Image.fromarray(img).save(root / cls / f"im{k}.jpg", quality=95, exif=exif)
    out = tmp_path / "d"
    s = run_import("folder", root, out, {"size": 32, "val_frac": 0.25, "test_frac": 0.25})
    assert s["notes"].get(EXIF_NOTE) == 6
    lesion = [r for r in read_manifest(out) if r.label == 1]
    assert lesion
    for r in lesion:
        img, m = _image(out, r), _mask(out, r)
        assert img[m].mean() > 0.85 and img[~m].mean() < 0.4, r.id


def test_folder_csv(src, tmp_path):
    fx = src["folder_csv"]
    out = tmp_path / "fc"
    s = run_import("folder", fx["root"], out, {"size": 32, "csv": fx["csv"]})
    meta = read_meta(out)
    assert meta.classes == ["normal", "tumour"]
    assert meta.attributes == ["bright", "other"]
    recs = _by_id(out)
    assert _skips(s) == {"missing file": 1}
    for k in range(8):
        r = recs[f"imgs_s{k}"]
        assert r.split == ("test" if k >= 6 else "val" if k >= 4 else "train")
        assert r.label == k % 2 and r.site == f"site{k % 2}"
        assert r.box == (12, 10, 24, 20)  # 32×32 source: box unchanged
        assert r.attributes[0] == k % 2 and math.isnan(r.attributes[1])
    ds = LesionDataset(out, "train")
    assert ds.sites == ["site0", "site1"]


# ----------------------------------------------------------------------------- CUB


def test_cub(src, tmp_path):
    fx = src["cub"]
    out = tmp_path / "cub"
    s = run_import("cub", fx["root"], out,
                   {"size": 32, "classes": "1,Sooty_Albatross", "val_frac": 0.34})
    meta = read_meta(out)
    assert meta.classes == ["001.Black_footed_Albatross", "003.Sooty_Albatross"]
    assert meta.channels == 3
    recs = _by_id(out)
    assert _skips(s) == {"missing file": 1}  # id 13 of class 3, listed but not on disk
    assert len(recs) == 8
    for iid, t in fx["truth"].items():
        rid = f"cub_{iid:05d}"
        if t["class"] == 2:
            assert rid not in recs
            continue
        r = recs[rid]
        assert r.label == (0 if t["class"] == 1 else 1)
        # official split: is_training_image 0 → test; val only from training images
        assert (r.split == "test") == (not t["train"])
        img = _image(out, r)  # (32, 32, 3)
        red = (img[..., 0] > 0.6) & (img[..., 1] < 0.35)
        x0, y0, x1, y1 = r.box
        inside = np.zeros(red.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert red[inside].mean() > 0.5 and red[~inside].mean() < 0.02, rid
        m = _mask(out, r)
        if t["class"] == 1:  # segmentation (≥ 128 of 255): an ellipse, not the whole box
            assert m.sum() < 0.9 * inside.sum() and (m & red).sum() > 0.8 * m.sum()
        else:  # no segmentation file: the box
            assert (m == inside).mean() > 0.97
    assert {r.split for r in recs.values()} == {"train", "val", "test"}
    assert _read_all(out)["test"].image_shape == (3, 32, 32)


def test_cub_box_crop(src, tmp_path):
    out = tmp_path / "cub2"
    run_import("cub", src["cub"]["root"], out, {"size": 24, "crop": "box", "mask": "box",
                                                 "classes": "2,3"})
    for r in read_manifest(out):
        x0, y0, x1, y1 = r.box
        # the box fills the crop minus the context margin (0.15 of its side on each side)
        assert 24 * 0.6 < x1 - x0 <= 24 and x0 > 0 and x1 < 24


# ----------------------------------------------------------------------------- MNIST


def test_decoy_mnist(src, tmp_path):
    fx = src["mnist"]
    out = tmp_path / "m"
    run_import("decoy-mnist", fx["root"], out, {"val_frac": 0.3})
    recs = list(read_manifest(out))
    assert len(recs) == 30 and read_meta(out).classes == [str(d) for d in range(10)]
    assert sum(r.split == "test" for r in recs) == 10
    xs = {"train": fx["train"][0], "test": fx["test"][0]}
    agree = {"train": [], "val": [], "test": []}
    for r in recs:
        part, idx = r.id.split("_")[1], int(r.id.split("_")[2])
        x = xs["train" if part == "train" else "test"][idx]
        img = load_array(out / r.image).astype(int)
        m = _mask(out, r)
        corners = [(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(24, 28)),
                   (slice(24, 28), slice(0, 4)), (slice(24, 28), slice(24, 28))]
        swatch = [c for c in corners if (img[c] == img[c][0, 0]).all() and img[c][0, 0] > 0]
        assert len(swatch) == 1, r.id
        shade = int(img[swatch[0]][0, 0])
        assert (255 - shade) % 25 == 0
        agree[r.split].append(shade == 255 - 25 * r.label)
        # the mask covers the digit (dilated) and never the swatch; nothing else is drawn
        assert m[x > 0].all() and not m[swatch[0]].any()
        rest = ~m
        rest[swatch[0]] = False
        assert (img[rest] == 0).all() and np.array_equal(img[m], x[m])
    assert all(agree["train"])  # the decoy encodes the label in training only
    assert not all(agree["test"]) and not all(agree["val"])


def test_decoy_mnist_corrupt_idx(src, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src["mnist"]["root"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = bytearray((bad / "train-images-idx3-ubyte").read_bytes())
    raw[3] = 0x01  # labels magic in an images file
    (bad / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic number 0x00000801, expected 0x00000803"):
        run_import("decoy-mnist", bad, tmp_path / "o")


# ----------------------------------------------------------------------------- BraTS


def test_brats_slices(src, tmp_path):
    fx = src["brats"]
    out = tmp_path / "br"
    s = run_import("brats", fx["root"], out, {"size": 24, "min_tumor_px": 5,
                                               "slices_per_subject": 3})
    assert _skips(s) == {"missing segmentation": 1, "unreadable NIfTI": 1}
    recs = _by_id(out)
    meta = read_meta(out)
    assert meta.channels == 4 and meta.classes == ["no_tumor", "tumor"]
    subjects = {rid.rsplit("_z", 1)[0] for rid in recs}
    assert subjects == {"BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_005",
                        "BraTS-GLI-00006-000"}  # 2023 names (t1n/t1c/t2w/t2f) understood
    for subj in subjects:  # subject-level split
        assert len({r.split for rid, r in recs.items() if rid.startswith(subj)}) == 1
    for rid, r in recs.items():
        img = np.load(out / r.image)  # (4, 24, 24): t1, t1ce, t2, flair
        assert img.shape == (4, 24, 24)
        if r.label == 1:
            m = _mask(out, r)
            flair = img[3]
            assert flair[m].mean() > 0.8 and flair[~m & (flair > 0)].mean() < 0.6, rid
        else:
            assert r.mask is None
    # 002 is 001 stored flipped in x with a flipped affine: identical once reoriented
    for z in ("z000", "z003", "z005"):
        a = np.load(out / recs[f"BraTS20_Training_001_{z}"].image)
        b = np.load(out / recs[f"BraTS20_Training_002_{z}"].image)
        assert np.allclose(a, b, atol=1e-5)
    assert sum(len(d) for d in _read_all(out).values()) == len(recs)


def test_brats_grade_and_volumes(src, tmp_path):
    fx = src["brats"]
    s = run_import("brats", fx["root"], tmp_path / "g", {"size": 16, "task": "grade",
                                                         "min_tumor_px": 5})
    assert _skips(s)["no grade"] == 1  # the BraTS 2023 subject
    for rid, r in _by_id(tmp_path / "g").items():
        assert r.label == int(fx["grades"][rid.rsplit("_z", 1)[0]] == "HGG")
    run_import("brats", fx["root"], tmp_path / "v", {"size": 16, "task": "grade",
                                                     "mode": "volumes", "depth": 6,
                                                     "modalities": "flair"})
    meta = read_meta(tmp_path / "v")
    assert meta.ndim == 3 and meta.channels == 1
    recs = _by_id(tmp_path / "v")
    # flair only: subject 004's corrupt t1 is not needed, so it is imported too
    assert set(recs) == {*fx["grades"], "BraTS20_Training_004"}
    for r in recs.values():
        vol, m = np.load(tmp_path / "v" / r.image), np.load(tmp_path / "v" / r.mask) > 0
        assert vol.shape == (6, 16, 16) and m.shape == vol.shape
        brain = (vol > 0) & ~m
        assert vol[m].mean() > 0.7 and vol[brain].mean() < 0.5  # FLAIR-bright tumour
    with pytest.raises(DataError, match="--mode volumes needs --task grade"):
        run_import("brats", fx["root"], tmp_path / "x", {"mode": "volumes"})


# ----------------------------------------------------------------------------- CBIS-DDSM


def test_cbis_ddsm(src, tmp_path):
    fx = src["cbis"]
    out = tmp_path / "c"
    s = run_import("cbis-ddsm", fx["root"], out, {"size": 32, "val_frac": 0.3})
    recs = _by_id(out)
    assert _skips(s) == {"image not found": 1, "ROI mask not found": 1,
                         "unreadable DICOM": 1}
    expected = {k: v for k, v in fx["cases"].items() if k.startswith("Mass")
                and v["patient"] not in ("P_00011", "P_00012", "P_00020")}
    assert set(recs) == set(expected)  # incl. P_00009, found through its SeriesInstanceUID
    patients = {"train": set(), "val": set()}
    for rid, e in expected.items():
        r = recs[rid]
        assert r.label == e["label"]
        if e["official"] == "test":  # the official split
            assert r.split == "test"
        else:
            assert r.split in ("train", "val")
            patients[r.split].add(e["patient"])
        img, m = _image(out, r), _mask(out, r)
        assert img[m].mean() > 0.9 and img[~m].mean() < 0.75, rid  # mask on the bright mass
        assert r.box == tuple(int(v) for v in (np.nonzero(m.any(0))[0].min(),
                                               np.nonzero(m.any(1))[0].min(),
                                               np.nonzero(m.any(0))[0].max() + 1,
                                               np.nonzero(m.any(1))[0].max() + 1))
    assert not patients["train"] & patients["val"] and patients["val"]
    meta = read_meta(out)
    assert meta.attributes == ["subtlety", "shape", "circumscription", "obscuration",
                               "ill_definiteness", "spiculation"]
    a = {rid: recs[rid].attributes for rid in recs}
    assert a["Mass-Training_P_00001_LEFT_CC_1"] == [1, 1, 0, 0, 0, 1]  # 5, IRREGULAR, SPIC.
    assert a["Mass-Training_P_00001_LEFT_CC_2"] == [0, 0, 1, 0, 0, 0]  # 3, OVAL, CIRCUMSCR.
    assert a["Mass-Training_P_00004_RIGHT_MLO_1"] == [1, 0, 0, 0, 1, 1]  # ILL_DEFINED-SPIC.
    assert a["Mass-Test_P_00017_RIGHT_MLO_1"] == [1, 1, 0, 0, 0, 0]  # MICROLOBULATED: none
    assert all(math.isnan(v) for v in a["Mass-Training_P_00010_RIGHT_CC_1"][1:])  # N/A
    assert recs["Mass-Training_P_00004_RIGHT_MLO_1"].label == 0  # BENIGN_WITHOUT_CALLBACK
    _read_all(out)


def test_cbis_background_removal_and_calc(src, tmp_path):
    import pydicom

    from causalign.data.importers.cbis_ddsm import remove_background

    e = src["cbis"]["cases"]["Mass-Training_P_00001_LEFT_CC_1"]
    full = pydicom.dcmread(src["cbis"]["root"] / "CBIS-DDSM" / e["image"]).pixel_array
    img, breast = remove_background(full)
    assert full[2:6, -6:-2].min() == 4000 and img[2:6, -6:-2].max() == 0  # label marker gone
    assert breast[32, 5] and not breast[2, -3] and img[20, 12] == 1.0
    s = run_import("cbis-ddsm", src["cbis"]["root"], tmp_path / "both",
                   {"size": 32, "abnormality": "both"})
    meta = read_meta(tmp_path / "both")
    assert meta.attributes[-2:] == ["calc_morphology", "calc_distribution"]
    recs = _by_id(tmp_path / "both")
    calc = recs["Calc-Training_P_00005_RIGHT_CC_1"].attributes
    assert calc[0] == 0 and all(math.isnan(v) for v in calc[1:6]) and calc[6:] == [1, 1]
    assert recs["Calc-Training_P_00007_LEFT_MLO_1"].attributes[6:] == [0, 0]
    assert recs["Calc-Test_P_00038_LEFT_CC_1"].split == "test"
    assert s["n"] == 7 + 3  # the 7 masses of test_cbis_ddsm and 3 calcifications


# ----------------------------------------------------------------------------- LIDC


def _lidc_ids(out):
    """Nodule name → record, by matching each record to the fixture's nodule patient and
    cluster order (clusters are numbered by position: z, then y, then x)."""
    order = {1: ["B", "A"], 2: ["C", "D"], 3: ["F", "E"]}
    out_map = {}
    for r in read_manifest(out):
        p = int(r.id.split("_")[0][-1])
        k = int(r.id.rsplit("_n", 1)[1])
        out_map[order[p][k]] = r
    return out_map


def test_lidc_malignancy(src, tmp_path):
    out = tmp_path / "l"
    s = run_import("lidc", src["lidc"]["root"], out, {"size": 32})
    nod = _lidc_ids(out)
    assert set(nod) == {"A", "C", "D", "E"}
    assert _skips(s) == {"no malignancy score (nodule < 3 mm)": 1,  # B: points only
                         "annotated slice missing": 1,  # F: only on the corrupt slice
                         "unreadable DICOM": 2,  # P3 slice 5 (header), P2 slice 5 (pixels)
                         "no CT series for XML": 1}
    # C's outline on P2's truncated slice is skipped, its other slices are used
    assert s["notes"] == {"nodule outline on a missing/unreadable slice (other slices used)": 1}
    for name, r in nod.items():
        assert r.label == LIDC_NODULES[name]["malignancy_label"], name  # median, 1–3 → 0
        assert r.attributes == LIDC_NODULES[name]["attrs"], name  # stated thresholds
    # consensus mask (≥ 2 of 4 readers) lies on the nodule, about its size at 1 mm/px
    a = nod["A"]
    img, m = _image(out, a), _mask(out, a)
    assert img[m].mean() > 0.5 and img[~m].mean() < 0.2  # +40 HU nodule in −850 HU lung
    assert abs(m.sum() - math.pi * 4.4**2) < 15  # readers' radii 4.0/4.4/3.6/4.8 mm
    assert m[16, 16]  # centred
    # patient-level split: each patient in exactly one split
    splits = {}
    for r in read_manifest(out):
        splits.setdefault(r.id.split("_")[0], set()).add(r.split)
    assert all(len(v) == 1 for v in splits.values())
    assert set().union(*splits.values()) == {"train", "val", "test"}
    assert s["details"]["patients"] == {sp: [p for p, v in splits.items() if sp in v]
                                        for sp in SPLITS}
    _read_all(out)


def test_lidc_dicom_files_named_by_uid_are_read(src, tmp_path):
    """Exports that name each DICOM file by its SOP instance UID ('1.3.6.1.4.1.9328.50.3.17',
    no '.dcm') were skipped: the UID's last component looked like a file suffix, so such a
    tree imported nothing. Renamed so, the fixture imports as it does with '.dcm' names."""
    import shutil

    root = tmp_path / "uid"
    shutil.copytree(src["lidc"]["root"], root)
    renamed = 0
    for i, f in enumerate(sorted(root.rglob("*.dcm"))):
        f.rename(f.with_name(f"1.3.6.1.4.1.9328.50.3.{i}"))
        renamed += 1
    assert renamed and not list(root.rglob("*.dcm"))
    want = run_import("lidc", src["lidc"]["root"], tmp_path / "a", {"size": 32})
    got = run_import("lidc", root, tmp_path / "b", {"size": 32})
    assert got["n"] == want["n"] > 0
    assert [(r.id, r.label, r.split) for r in read_manifest(tmp_path / "b")] == \
        [(r.id, r.label, r.split) for r in read_manifest(tmp_path / "a")]


def test_lidc_presence_union_and_patches(src, tmp_path):
    out = tmp_path / "p"
    s = run_import("lidc", src["lidc"]["root"], out, {"size": 32, "label": "presence"})
    nod = _lidc_ids(out)
    assert {k: r.label for k, r in nod.items()} == {"A": 1, "B": 0, "C": 1, "D": 0, "E": 1}
    assert nod["B"].mask is None  # points only
    assert read_meta(out).info["mask_rule"] == "union"
    run_import("lidc", src["lidc"]["root"], tmp_path / "cons", {"size": 32})
    cons = _mask(tmp_path / "cons", _lidc_ids(tmp_path / "cons")["A"])
    union = _mask(out, nod["A"])
    assert union.sum() > cons.sum() and union[cons].all()  # union ⊋ consensus
    assert "no malignancy score (nodule < 3 mm)" not in _skips(s)
    # pre-cropped patches + CSV (per-reader masks and scores)
    fx = src["lidc_patches"]
    out2 = tmp_path / "pc"
    s2 = run_import("lidc", fx["root"], out2, {"size": 24, "patches_csv": fx["csv"]})
    assert _skips(s2) == {"missing file": 1}
    recs = list(read_manifest(out2))
    assert len(recs) == 8
    for r in recs:
        assert r.label == (1 if r.id.endswith("_0") else 0)  # 4;5;4 → 1, 1;2;3 → 0
        assert r.attributes == [1, 0, 1, 0, 1, 1]
        m = _mask(out2, r)
        assert m.sum() == (np.hypot(*np.mgrid[-12:12, -12:12]) <= 5).sum()  # median reader
        assert _image(out2, r)[m].mean() > 0.6
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.id.split("_")[1], set()).add(r.split)
    assert all(len(v) == 1 for v in by_patient.values())


# ----------------------------------------------------------------------------- shared rules


def test_shortcut_only_in_training(src, tmp_path):
    root = src["folder"]["root"]
    plain, short = tmp_path / "plain", tmp_path / "short"
    opts = {"size": 32, "val_frac": 0.3, "test_frac": 0.3}
    run_import("folder", root, plain, opts)
    run_import("folder", root, short, {**opts, "shortcut": "plus-minus"})
    assert read_meta(short).info["shortcut_in"] == ["train"]
    p, q = _by_id(plain), _by_id(short)
    agree = {"train": [], "eval": []}
    for rid in p:
        a, b = _image(plain, p[rid]), _image(short, q[rid])
        changed = np.abs(a - b) > 0.02
        assert not changed[12:, :].any() and not changed[:, 12:].any()  # top-left only
        has_plus = abs(b[2, 5] - 0.9) < 0.01  # vertical arm of '+'
        assert abs(b[5, 3] - 0.9) < 0.01  # horizontal bar: every image has a symbol
        agree["train" if p[rid].split == "train" else "eval"].append(has_plus == bool(
            p[rid].label))
    assert all(agree["train"]) and not all(agree["eval"])


def test_resume_after_interruption(src, tmp_path, monkeypatch):
    root = src["busi"]["root"]
    opts = {"size": 32, "seed": 2}
    full = tmp_path / "full"
    run_import("busi", root, full, opts)
    from causalign.data.importers.busi import BusiImporter

    calls = {"n": 0}
    original = BusiImporter.process

    def flaky(self, unit):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        yield from original(self, unit)

    monkeypatch.setattr(BusiImporter, "process", flaky)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_import("busi", root, part, opts)
    assert not (part / "manifest.csv").exists()  # written only at the end
    (part / "images" / "benign_1.png").write_bytes(b"half-written")  # a damaged output
    calls["n"] = -1000
    s = run_import("busi", root, part, opts)
    # 5 units were done before the interruption; benign_1's damaged image is redone
    assert s["units"]["reused_from_previous_run"] == 4
    assert (part / "manifest.csv").read_text() == (full / "manifest.csv").read_text()
    for r in read_manifest(full):
        assert (part / r.image).read_bytes() == (full / r.image).read_bytes()
    full_s = json.loads((full / "import_summary.json").read_text())
    for key in ("splits", "skipped", "notes", "details"):
        assert s[key] == full_s[key]
    with pytest.raises(DataError, match=r"different settings \(--size\)"):
        run_import("busi", root, part, {**opts, "size": 48})
    run_import("busi", root, part, {**opts, "size": 48}, overwrite=True)
    assert LesionDataset(part, "train").image_shape == (1, 48, 48)


def test_assign_splits_groups_and_nonempty():
    groups = ["p1", "p1", "p2", "p3", "p3", "p4", "p5"]
    out = assign_splits(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0,
                        strata=["a", "a", "b", "a", "a", "c", "b"])
    assert set(out) == {"p1", "p2", "p3", "p4", "p5"}  # one split per group
    assert set(out.values()) == {"train", "val", "test"}
    assert out == assign_splits(list(reversed(groups)), {"train": 0.6, "val": 0.2,
                                                         "test": 0.2}, seed=0,
                                strata=list(reversed(["a", "a", "b", "a", "a", "c", "b"])))


def test_missing_library_names_the_extra(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(DataError, match=r"needs the 'pydicom' package.*causalign\[medical\]"):
        run_import("cbis-ddsm", src["cbis"]["root"], tmp_path / "o")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(DataError, match=r"'nibabel'.*causalign\[medical\]"):
        run_import("brats", src["brats"]["root"], tmp_path / "o2")


# ----------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(rc, err, needle):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]


def test_cli_errors(src, tmp_path, capsys):
    rc, _, err = _run(capsys, "data", "import", "busi", tmp_path / "nope", tmp_path / "o")
    _one_error_line(rc, err, "nope: source folder does not exist")
    rc, _, err = _run(capsys, "data", "import", "xray", tmp_path, tmp_path / "o")
    _one_error_line(rc, err, "unknown import kind 'xray'; valid: brats, busi")
    rc, _, err = _run(capsys, "data", "import", "busi", src["busi"]["root"], tmp_path / "o",
                      "--label", "presence")
    _one_error_line(rc, err, "--label not used by the busi importer")
    rc, _, err = _run(capsys, "data", "import", "lidc", src["busi"]["root"], tmp_path / "o")
    _one_error_line(rc, err, "no LIDC-IDRI annotation XML files found")
    assert not (tmp_path / "o").exists()  # a failed plan leaves no half-made OUT behind
    assert set(IMPORTERS) == {"lidc", "cbis-ddsm", "busi", "brats", "cub", "decoy-mnist",
                              "folder"}
    with pytest.raises(CausalignError):
        run_import("folder", src["busi"]["root"], tmp_path / "o3", {"classes": "x,y"})


def test_cli_import_train_evaluate(src, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    rc, out, err = _run(capsys, "data", "import", "folder", src["folder"]["root"], data,
                        "--size", "32", "--val-frac", "0.2", "--test-frac", "0.2",
                        "--no-progress")
    assert rc == 0, err
    assert "imported 10 samples (folder)" in out
    assert "1 × unreadable image: healthy/img_5.png" in out
    assert "summary saved to" in out
    rc, out, err = _run(capsys, "train", data, "--method", "erm", "--out", run, "--epochs", "1",
                        "--batch-size", "4", "--set", "width=4", "--no-progress")
    assert rc == 0, err
    rc, out, err = _run(capsys, "evaluate", run, "--split", "test")
    assert rc == 0, err
    assert json.loads(out)["n"] == LesionDataset(data, "test").labels.numel()
