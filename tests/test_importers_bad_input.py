"""Malformed but realistic input to the importers and to the dataset reader: each case either
imports correctly or stops with one clear line naming the file and the problem (DataError /
`error:` and exit 2), never a traceback, never a silently wrong dataset."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from fixtures_real import (
    write_brats,
    write_busi,
    write_cbis,
    write_cub,
    write_lidc,
    write_lidc_patches,
    write_mnist,
)
from PIL import Image

from causalign.cli import main
from causalign.data.format import (
    DatasetMeta,
    DatasetWriter,
    LesionDataset,
    read_manifest,
    read_meta,
)
from causalign.data.importers import run_import
from causalign.errors import DataError

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tree(root, n=6, shape=(12, 14), classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            _png(root / c / f"img_{i}.png", (rng.random(shape) * 255).astype(np.uint8))


def _one_error_line(capsys, argv, needle):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def _skips(summary):
    return summary["skipped"]["by_reason"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Fixtures in the real layouts, written once; each test copies the one it damages."""
    base = tmp_path_factory.mktemp("real_bad")
    return {
        "lidc": write_lidc(base / "lidc")["root"],
        "lidc_patches": write_lidc_patches(base / "lidc_patches")["root"],
        "cbis": write_cbis(base / "cbis")["root"],
        "brats": write_brats(base / "brats")["root"],
        "cub": write_cub(base / "cub")["root"],
        "mnist": write_mnist(base / "mnist")["root"],
        "busi": write_busi(base / "busi")["root"].parent,
    }


def _copy(real, kind, tmp_path):
    dst = tmp_path / f"{kind}_src"
    shutil.copytree(real[kind], dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- sample ids


def test_folder_ids_stay_unique_when_a_suffix_collides(tmp_path):
    # 'img 1' and 'img_1' both map to 'a_img_1'; the old de-duplication named the second
    # 'a_img_1_1', the id 'img_1_1.png' already has -> AssertionError traceback
    _tree(tmp_path / "src")
    for name in ("img 1.png", "img_1_1.png"):
        _png(tmp_path / "src" / "a" / name, np.full((12, 14), 90, np.uint8))
    s = run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 8})
    ids = [r.id for r in read_manifest(tmp_path / "out")]
    assert s["n"] == 14 and len(set(ids)) == 14


# ----------------------------------------------------------------------------- source CSVs


def test_folder_csv_not_utf8_is_one_error_line(tmp_path, capsys):
    _tree(tmp_path / "src")
    rows = "".join(f"{c}/img_{i}.png,{c}\n" for c in "ab" for i in range(6))
    (tmp_path / "src" / "list.csv").write_bytes(("image,label,site\n" + rows).encode()
                                                + "a/img_0.png,a,Zürich\n".encode("latin-1"))
    _one_error_line(capsys, ["data", "import", "folder", tmp_path / "src", tmp_path / "out",
                             "--csv", "list.csv", "--no-progress"], "list.csv: not UTF-8 text")


def test_folder_csv_non_finite_box_and_bad_attributes_are_skipped(tmp_path):
    _tree(tmp_path / "src")
    head = "image,label,box_x0,box_y0,box_x1,box_y1,attr_round\n"
    rows = [f"{c}/img_{i}.png,{c},1,1,6,6,1\n" for c in "ab" for i in range(2, 6)]
    rows += ["a/img_0.png,a,1,1,nan,6,1\n", "b/img_0.png,b,1,1,inf,6,0\n",  # traceback
             "a/img_1.png,a,1,1,6,6,inf\n", "b/img_1.png,b,1,1,6,6,3\n"]  # unreadable later
    (tmp_path / "src" / "list.csv").write_text(head + "".join(rows))
    s = run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 8, "csv": "list.csv"})
    assert _skips(s) == {"bad box": 2, "bad attribute value": 2}
    assert s["n"] == 8
    for split in ("train", "val", "test"):
        assert bool(LesionDataset(tmp_path / "out", split).attributes.isfinite().all())


def test_folder_csv_rows_of_one_image_are_one_sample(tmp_path):
    # one row per lesion: the rows of one file were split independently, so the same pixels
    # landed in train and in test; then they were kept together but each row stayed a
    # sample of its own, annotated with its own lesion only (the other lesions of the image
    # counted as "outside the annotation" in Eq. 3 and CAM precision)
    _tree(tmp_path / "src", n=10, shape=(40, 40))
    rows = "".join(f"{c}/img_{i}.png,{c},2,2,8,8\n{c}/img_{i}.png,{c},20,24,30,36\n"
                   for c in "ab" for i in range(10))
    rows += "a/img_0.png,b,1,1,3,3\n"  # no: a 3rd row of img_0 with another label
    rows += "b/img_9.png,b,,,,\n"  # a row with no box adds nothing to the box
    (tmp_path / "src" / "list.csv").write_text("image,label,box_x0,box_y0,box_x1,box_y1\n"
                                               + rows)
    s = run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 40, "csv": "list.csv"})
    assert _skips(s) == {"rows of one image with different labels": 1}
    assert s["notes"]["CSV rows merged into their image's sample (masks OR-ed, boxes joined)"] \
        == 19 + 1
    recs = read_manifest(tmp_path / "out")
    assert len(recs) == 19 and len({r.id for r in recs}) == 19
    assert all(r.box == (2, 2, 30, 36) for r in recs)  # both lesions' boxes, joined


def test_folder_csv_rows_of_one_image_take_a_site_given_on_one_row(tmp_path):
    # an empty site cell was stored as "0" before the merge, so it clashed with the site the
    # image's other row named, and the image was skipped
    _tree(tmp_path / "src", n=4, shape=(16, 16))
    rows = "".join(f"{c}/img_{i}.png,{c},B\n{c}/img_{i}.png,{c},\n" for c in "ab" for i in range(4))
    rows += "a/img_0.png,a,C\n"  # a second named site for img_0: a real clash
    (tmp_path / "src" / "list.csv").write_text("image,label,site\n" + rows)
    s = run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 16, "csv": "list.csv"})
    assert _skips(s) == {"rows of one image with different sites": 1}
    recs = read_manifest(tmp_path / "out")
    assert len(recs) == 7 and {r.site for r in recs} == {"B"}


def test_folder_csv_rows_of_one_image_merge_their_masks(tmp_path):
    _tree(tmp_path / "src", n=4, shape=(16, 16))
    for k, (y, x) in enumerate(((2, 2), (10, 10))):
        m = np.zeros((16, 16), np.uint8)
        m[y:y + 4, x:x + 4] = 255
        _png(tmp_path / "src" / f"m{k}.png", m)
    rows = "".join(f"{c}/img_{i}.png,{c},m0.png,1\n{c}/img_{i}.png,{c},m1.png,\n"
                   for c in "ab" for i in range(4))
    (tmp_path / "src" / "list.csv").write_text("image,label,mask,attr_round\n" + rows)
    run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 16, "csv": "list.csv"})
    ds = LesionDataset(tmp_path / "out", "train")
    assert len(ds) > 0
    for i in range(len(ds)):
        d = ds[i]
        assert int(d["mask"].sum()) == 32  # both lesions' masks, OR-ed
        assert float(d["attributes"][0]) == 1.0  # one row knows it, the other leaves it blank


def test_cbis_csv_missing_column_or_not_utf8(real, tmp_path, capsys):
    src = _copy(real, "cbis", tmp_path)
    csv_path = src / "mass_case_description_train_set.csv"
    text = csv_path.read_text()
    # a renamed column used to skip every row ("unknown pathology") and exit 0 without train
    csv_path.write_text(text.replace("pathology", "diagnosis", 1))
    with pytest.raises(DataError, match=r"mass_case_description_train_set.csv: missing "
                                        r"column\(s\) pathology"):
        run_import("cbis-ddsm", src, tmp_path / "o1", {"size": 16})
    csv_path.write_bytes(text.replace("OVAL", "OVÅL").encode("latin-1"))
    _one_error_line(capsys, ["data", "import", "cbis-ddsm", src, tmp_path / "o2",
                             "--no-progress"], "mass_case_description_train_set.csv: not UTF-8")


def test_cbis_blank_mammogram_is_skipped(real, tmp_path):
    import pydicom

    src = _copy(real, "cbis", tmp_path)
    full = sorted(src.glob("CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/*/*/*.dcm"))[0]
    ds = pydicom.dcmread(str(full))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
    ds.save_as(str(full))
    s = run_import("cbis-ddsm", src, tmp_path / "out", {"size": 16})
    assert _skips(s)["blank image"] == 1  # were two all-black crops, labelled
    assert not any(r.id.startswith("Mass-Training_P_00001_LEFT_CC")
                   for r in read_manifest(tmp_path / "out"))


def test_brats_ignores_an_unreadable_unrelated_csv(real, tmp_path):
    src = _copy(real, "brats", tmp_path)
    (src / "survival_info.csv").write_bytes("Brats20ID,Age\nx,6\u00e9\n".encode("latin-1"))
    s = run_import("brats", src, tmp_path / "out", {"size": 16, "min_tumor_px": 5,
                                                    "slices_per_subject": 2})
    assert s["n"] > 0


# ----------------------------------------------------------------------------- NIfTI / DICOM


def _rewrite_nifti(path, fn):
    import nibabel as nib

    im = nib.load(str(path))
    out = nib.Nifti1Image(fn(np.asarray(im.dataobj).astype(np.float32)), im.affine)
    nib.save(out, str(path))


def test_brats_nan_voxels_skip_the_subject(real, tmp_path):
    src = _copy(real, "brats", tmp_path)
    seg = next(src.rglob("BraTS20_Training_005_seg.nii.gz"))

    def nan_block(v):
        v[5:8, 5:8, 3:6] = np.nan  # NaN labels used to be cast to an arbitrary class
        return v

    _rewrite_nifti(seg, nan_block)
    s = run_import("brats", src, tmp_path / "out", {"size": 16, "min_tumor_px": 5,
                                                    "slices_per_subject": 2})
    assert _skips(s)["NaN/inf voxels"] == 1
    assert "BraTS20_Training_005_seg.nii.gz" in str(s["skipped"]["items"])
    assert not any(r.id.startswith("BraTS20_Training_005") for r in read_manifest(tmp_path / "out"))


def test_lidc_non_positive_pixel_spacing_is_refused(real, tmp_path):
    import pydicom

    src = _copy(real, "lidc", tmp_path)
    files = sorted(src.glob("LIDC-IDRI/LIDC-IDRI-0001/*/*/*.dcm"))
    for f in files:  # a zero spacing divided by zero, a negative one mirrored the patch
        ds = pydicom.dcmread(str(f))
        ds.PixelSpacing = [0, 0] if f == files[0] else [-0.8, -0.8]
        ds.save_as(str(f))
    s = run_import("lidc", src, tmp_path / "out", {"size": 16})
    assert _skips(s)["DICOM header incomplete"] == len(files)
    assert "PixelSpacing" in str(s["skipped"]["items"])
    assert not any(r.id.startswith("LIDC-IDRI-0001") for r in read_manifest(tmp_path / "out"))


def test_lidc_xml_non_finite_values(real, tmp_path):
    base = run_import("lidc", real["lidc"], tmp_path / "base", {"size": 16})
    src = _copy(real, "lidc", tmp_path)
    for x in src.glob("LIDC-IDRI/LIDC-IDRI-0001/*/*/*.xml"):
        t = re.sub(r"<xCoord>\d+</xCoord>", "<xCoord>nan</xCoord>", x.read_text(), count=3)
        x.write_text(re.sub(r"<malignancy>\d</malignancy>", "<malignancy>inf</malignancy>", t))
    s = run_import("lidc", src, tmp_path / "out", {"size": 16})
    # a NaN outline made a NaN centroid that clustered with nothing: an extra "nodule";
    # an 'inf' malignancy made patient 1's nodule malignant
    assert s["n"] == base["n"] - 1
    assert not any(r.id.startswith("LIDC-IDRI-0001") for r in read_manifest(tmp_path / "out"))


def test_lidc_patches_non_finite_scores(real, tmp_path):
    src = _copy(real, "lidc_patches", tmp_path)
    csv_path = src / "patches.csv"
    text = csv_path.read_text()
    # an 'inf' malignancy was label 1, an 'inf' subtlety attribute 1
    csv_path.write_text(text.replace("4;5;4", "inf", 1).replace("5;5;4", "inf", 2))
    s = run_import("lidc", src, tmp_path / "o1", {"size": 16, "patches_csv": "patches.csv"})
    assert _skips(s)["bad value in CSV"] == 2
    # 'nan' stays "not scored" (dropped from the median), as before
    csv_path.write_text(text.replace("5;5;4", "nan;5;4", 1))
    s = run_import("lidc", src, tmp_path / "o2", {"size": 16, "patches_csv": "patches.csv"})
    assert "bad value in CSV" not in _skips(s) and s["n"] == 8
    # a reader count of 'inf' raised OverflowError (and 'r;r;r' is no count either)
    csv_path.write_text(text.replace("malignancy", "readers", 1).replace("4;5;4", "inf", 1))
    with pytest.raises(DataError, match=r"8 × bad value in CSV"):
        run_import("lidc", src, tmp_path / "o3", {"size": 16, "patches_csv": "patches.csv",
                                                  "label": "presence"})


def test_decoy_mnist_corrupt_gzip_is_one_error_line(real, tmp_path, capsys):
    src = _copy(real, "mnist", tmp_path)
    gz = src / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gz.read_bytes())
    raw[20:60] = bytes(b ^ 0xFF for b in raw[20:60])  # zlib.error, not an OSError
    gz.write_bytes(bytes(raw))
    _one_error_line(capsys, ["data", "import", "decoy-mnist", src, tmp_path / "out",
                             "--no-progress"], "t10k-images-idx3-ubyte.gz: unreadable")


def test_cub_hand_edited_tables(real, tmp_path, capsys):
    src = _copy(real, "cub", tmp_path)
    cub = src / "CUB_200_2011"
    boxes = cub / "bounding_boxes.txt"
    boxes.write_text(re.sub(r"^1 [\d.]+", "1 nan", boxes.read_text(), flags=re.M))
    split = cub / "train_test_split.txt"
    split.write_text(re.sub(r"^2 1", "2 2", split.read_text(), flags=re.M))
    s = run_import("cub", src, tmp_path / "o1", {"size": 16})  # 'nan' box: ValueError
    assert s["notes"]["image without a usable bounding box"] == 1
    assert _skips(s)["bad split entry"] == 1  # '2' was silently a test image
    images = cub / "images.txt"
    text = images.read_text()
    images.write_text("image_id path\n" + text)  # a header line: int('image_id') traceback
    _one_error_line(capsys, ["data", "import", "cub", src, tmp_path / "o2", "--no-progress"],
                    "images.txt:1: id 'image_id' is not a number")
    images.write_bytes(text.encode() + "14 003.x/caf\u00e9.jpg\n".encode("latin-1"))
    _one_error_line(capsys, ["data", "import", "cub", src, tmp_path / "o3", "--no-progress"],
                    "images.txt: not UTF-8 text")


# ----------------------------------------------------------------------------- folders


def test_symlinked_folders_are_followed(real, tmp_path):
    # datasets are often assembled from links; rglob/os.walk skipped them silently
    src = _copy(real, "lidc", tmp_path)
    p2 = src / "LIDC-IDRI" / "LIDC-IDRI-0002"
    shutil.move(p2, tmp_path / "elsewhere")
    p2.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    a = run_import("lidc", real["lidc"], tmp_path / "o1", {"size": 16})
    b = run_import("lidc", src, tmp_path / "o2", {"size": 16})
    assert b["n"] == a["n"] and _skips(b) == _skips(a)
    # a nested linked folder in a class folder, and a link loop
    _tree(tmp_path / "f", n=4)
    _tree(tmp_path / "more", n=3, classes=("b",))
    (tmp_path / "f" / "b" / "more").symlink_to(tmp_path / "more" / "b")
    (tmp_path / "f" / "a" / "loop").symlink_to(tmp_path / "f" / "a")
    s = run_import("folder", tmp_path / "f", tmp_path / "o3", {"size": 8})
    assert s["splits"]["train"]["n"] + s["splits"]["val"]["n"] + s["splits"]["test"]["n"] == 11


def test_class_folder_without_images_is_refused(real, tmp_path, capsys):
    _tree(tmp_path / "src")
    (tmp_path / "src" / "__MACOSX").mkdir()  # became a third class with no sample
    _one_error_line(capsys, ["data", "import", "folder", tmp_path / "src", tmp_path / "out",
                             "--no-progress"], "class folder(s) __MACOSX hold no images")
    assert run_import("folder", tmp_path / "src", tmp_path / "o2",
                      {"size": 8, "classes": "a,b"})["n"] == 12
    busi = _copy(real, "busi", tmp_path)
    for p in (busi / "Dataset_BUSI_with_GT" / "benign").iterdir():
        p.unlink()  # the import produced a 'benign, malignant' dataset of malignant only
    with pytest.raises(DataError, match=r"no usable images in benign/"):
        run_import("busi", busi, tmp_path / "o3", {"size": 16})


def test_summary_warns_about_a_class_without_samples(tmp_path):
    _tree(tmp_path / "src")
    for i in range(6):
        (tmp_path / "src" / "b" / f"img_{i}.png").write_bytes(b"\x89PNG broken")
    s = run_import("folder", tmp_path / "src", tmp_path / "out", {"size": 8})
    assert "class 'b' has no samples (every one was skipped or filtered out)" in s["warnings"]


def test_out_inside_src_is_refused(tmp_path, capsys):
    _tree(tmp_path / "src")
    # a rerun used to import OUT/images as a new class 'out' (24 samples, 3 classes)
    _one_error_line(capsys, ["data", "import", "folder", tmp_path / "src",
                             tmp_path / "src" / "out", "--no-progress"],
                    "output folder is (inside) the source folder")
    _one_error_line(capsys, ["data", "import", "folder", tmp_path / "src" / "a", tmp_path / "src",
                             "--overwrite", "--no-progress"], "contains the source folder")
    assert not (tmp_path / "src" / "out").exists() and (tmp_path / "src" / "a").is_dir()


# ----------------------------------------------------------------------------- the reader


def _dataset(root, n=4, side=8):
    w = DatasetWriter(root, DatasetMeta("toy", ["neg", "pos"], ["round"]))
    for i, split in enumerate(["train"] * n + ["val", "test"]):
        img = np.full((side, side), 0.2 + 0.1 * i, np.float32)
        mask = np.zeros((side, side), np.uint8)
        mask[2:5, 2:5] = 1
        w.add(img, label=i % 2, split=split, mask=mask, attributes=[float(i % 2)])
    w.close()
    return root


def _edit_manifest(root, fn):
    p = root / "manifest.csv"
    p.write_text(fn(p.read_text()))


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda t: re.sub(r"(000000,.*),0\n", r"\1,inf\n", t), "attribute round = 'inf' is not in"),
    (lambda t: re.sub(r"(000000,.*),0\n", r"\1,2\n", t), "attribute round = '2' is not in"),
    (lambda t: re.sub(r"(000000,train,0,0,images/000000.png,masks/000000.png),,,,",
                      r"\1,1,1,inf,5", t), "is not four finite numbers"),
    (lambda t: t.replace("000001,", "000000,", 1), "id '000000' already used on line 2"),
    (lambda t: t.replace("000001,", "a/../x,", 1), "id 'a/../x' is not usable"),
    (lambda t: re.sub(r"(000000,.*)\n", r"\1,1,extra\n", t), "13 cells, the header has 11"),
    (lambda t: re.sub(r"(000000,train,0,0,images/000000.png).*\n", r"\1\n", t),
     "5 cells, the header has 11"),
])
def test_reader_refuses_hand_edited_manifest(tmp_path, edit, needle):
    root = _dataset(tmp_path / "d")
    _edit_manifest(root, edit)
    with pytest.raises(DataError, match=re.escape(needle)):
        LesionDataset(root, "train")


def test_reader_accepts_spreadsheet_manifest(tmp_path):
    # saved by a spreadsheet: BOM, CRLF, spaces after the commas of the header, trailing ','
    root = _dataset(tmp_path / "d")
    t = (root / "manifest.csv").read_text()
    lines = t.splitlines()
    lines[0] = ", ".join(lines[0].split(","))
    (root / "manifest.csv").write_bytes(("\ufeff" + "\r\n".join(ln + "," for ln in lines)
                                         + "\r\n").encode())
    ds = LesionDataset(root, "train")
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("name: x\nclasses: [a, b]\nndim: two\n", "'ndim' must be 2 or 3"),
    ("name: x\nclasses: [a, b]\nchannels: gray\n", "'channels' must be a positive integer"),
    ("name: x\nclasses: [a, b]\ninfo: [1, 2]\n", "'info' must be a mapping"),
    ("name: x\nclasses: [a, b]\nattributes: round\n", "'attributes' must be a list"),
    ("name: x\nclasses: [a, a]\n", "'classes' lists a more than once"),
    ("name: x\nclasses: [[a], b]\n", "'classes' entry ['a'] is not a name"),
])
def test_reader_refuses_hand_edited_yaml(tmp_path, yaml_text, needle):
    root = _dataset(tmp_path / "d")
    (root / "dataset.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match=re.escape(needle)):
        read_meta(root)


def test_reader_names_a_folder_in_place_of_a_file(tmp_path):
    # the API raised IsADirectoryError (the CLI's OSError handler hid it)
    root = _dataset(tmp_path / "d")
    (root / "manifest.csv").unlink()
    (root / "manifest.csv").mkdir()
    with pytest.raises(DataError, match="manifest.csv: not a file"):
        LesionDataset(root, "train")
    (root / "dataset.yaml").unlink()
    (root / "dataset.yaml").mkdir()
    with pytest.raises(DataError, match="dataset.yaml: not a file"):
        read_meta(root)


def test_reader_masks_in_colour_and_all_zero(tmp_path):
    root = _dataset(tmp_path / "d")
    m = np.zeros((8, 8, 3), np.uint8)
    m[2:5, 2:5, 1] = 255  # drawn in green: the red channel alone is empty
    _png(root / "masks" / "000000.png", m)
    _png(root / "masks" / "000001.png", np.zeros((8, 8), np.uint8))  # annotates nothing
    ds = LesionDataset(root, "train")
    assert bool(ds.has_mask[0]) and float(ds.masks[0].sum()) == 9
    # an all-zero mask is no annotation (as the importers store it), not "evidence nowhere"
    assert not bool(ds.has_mask[1]) and not bool(ds[1]["has_annotation"])
    assert bool(ds.has_mask[2])


def test_reader_npy_hw1_and_shape_message(tmp_path):
    root = _dataset(tmp_path / "d")
    np.save(root / "images" / "000000.npy", np.full((8, 8, 1), 0.5, np.float32))
    _edit_manifest(root, lambda t: t.replace("images/000000.png", "images/000000.npy"))
    assert LesionDataset(root, "train").image_shape == (1, 8, 8)
    _png(root / "images" / "000002.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"image has 3 channel\(s\), 000000.npy, the split's "
                                        r"first image, has 1"):
        LesionDataset(root, "train")


def test_writer_refuses_duplicate_ids_before_overwriting(tmp_path):
    w = DatasetWriter(tmp_path / "d", DatasetMeta("toy", ["neg", "pos"]))
    w.add(np.zeros((8, 8), np.float32), label=0, split="train", sample_id="s")
    before = (tmp_path / "d" / "images" / "s.png").read_bytes()
    with pytest.raises(DataError, match="sample id 's' added twice"):
        w.add(np.ones((8, 8), np.float32), label=1, split="train", sample_id="s")
    assert (tmp_path / "d" / "images" / "s.png").read_bytes() == before
    with pytest.raises(DataError, match="split 'training'"):
        w.add(np.ones((8, 8), np.float32), label=1, split="training", sample_id="t")
    nan = np.full((8, 8), 0.5, np.float32)
    nan[0, 0] = np.nan  # written to the PNG as a black pixel, silently
    with pytest.raises(DataError, match=r"sample u: 1 NaN/inf pixel value\(s\)"):
        w.add(nan, label=1, split="train", sample_id="u")
    assert not (tmp_path / "d" / "images" / "u.png").exists()
