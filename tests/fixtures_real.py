"""Tiny fixtures in each real dataset's own on-disk format, for tests/test_importers.py.

Each writer lays out files exactly as the public download does (folder and file names, CSV
columns, DICOM tags, NIfTI affines, IDX headers), small (≤ 64 px, a few samples), with a
bright or dark lesion at a known place so tests can check masks land on lesions, and with a
few deliberately broken inputs (missing mask, corrupt file, CSV row pointing nowhere). Each
returns a dict of what the importer should find.
"""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

# ----------------------------------------------------------------------------- helpers


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma: float = 3.0
             ) -> np.ndarray:
    t = gaussian_filter(rng.standard_normal(shape), sigma)
    t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    return 0.3 + 0.4 * t


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- BUSI


def write_busi(root: Path) -> dict:
    """Dataset_BUSI_with_GT/{benign,malignant,normal}/'<class> (k).png' + '_mask[_j].png'.

    benign 1–7 (benign (2) has a second mask '_mask_1'; benign (6) has no mask; benign (5) is a
    near-copy of benign (1)), malignant 1–6 (malignant (4) ≈ malignant (2); malignant (6) ≈
    benign (3), a cross-class duplicate; malignant (5) is corrupt), normal 1–2 (empty masks).
    Lesions are dark (hypoechoic) disks on a speckle-like texture, 40×48 px."""
    base = root / "Dataset_BUSI_with_GT"
    rng = np.random.default_rng(0)
    shape = (40, 48)
    images: dict[str, np.ndarray] = {}

    def make(cls: str, k: int, centre=(20, 24), r=7.0, copy_of: str | None = None,
             extra_mask: bool = False, mask: bool = True) -> None:
        name = f"{cls} ({k})"
        if copy_of is not None:
            img = np.clip(images[copy_of] + rng.normal(0, 0.004, shape), 0, 1)
            m = _mask_of[copy_of]
        else:
            img = _texture(rng, shape)
            m = _disk(shape, *centre, r) if cls != "normal" else np.zeros(shape, bool)
            img[m] *= 0.3
        images[name] = img
        _mask_of[name] = m
        _png(base / cls / f"{name}.png", np.stack([_u8(img)] * 3, axis=-1))  # RGB as BUSI
        if mask:
            first = m.copy()
            if extra_mask:  # second lesion part in a separate file
                first[:, centre[1]:] = False
                second = m & ~first
                _png(base / cls / f"{name}_mask_1.png", (second * 255).astype(np.uint8))
            _png(base / cls / f"{name}_mask.png", (first * 255).astype(np.uint8))

    _mask_of: dict[str, np.ndarray] = {}
    for k in range(1, 5):
        make("benign", k, centre=(12 + 4 * k, 10 + 6 * k), extra_mask=(k == 2))
    make("benign", 5, copy_of="benign (1)")
    make("benign", 6, mask=False)
    make("benign", 7, centre=(25, 30))
    for k in range(1, 4):
        make("malignant", k, centre=(14 + 3 * k, 14 + 5 * k), r=9)
    make("malignant", 4, copy_of="malignant (2)")
    (base / "malignant" / "malignant (5).png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _png(base / "malignant" / "malignant (5)_mask.png", np.zeros(shape, np.uint8))
    make("malignant", 6, copy_of="benign (3)")
    for k in (1, 2):
        make("normal", k)
    return {
        "root": base,
        "masks": _mask_of,
        "duplicates": [("benign (1)", "benign (5)"), ("malignant (2)", "malignant (4)"),
                       ("benign (3)", "malignant (6)")],
        "n_benign": 6, "n_malignant": 5,  # imported with default classes
        "skipped": {"missing mask": ["benign (6)"], "unreadable image": ["malignant (5)"]},
    }


# ----------------------------------------------------------------------------- folder


def write_folder(root: Path, size: tuple[int, int] = (30, 40)) -> dict:
    """ROOT/<class>/<image>.png with '<image>_mask.png' for most images: class 'healthy'
    (bright disk lesions absent, 6 images) and 'lesion' (6 images with a bright disk).
    lesion/img_5 has a mask of the wrong size, healthy/img_5.png is corrupt."""
    rng = np.random.default_rng(1)
    lesions = {}
    for cls in ("healthy", "lesion"):
        for k in range(6):
            img = _texture(rng, size) * 0.6
            cy, cx = 8 + 2 * k, 10 + 3 * k
            m = _disk(size, cy, cx, 5)
            if cls == "lesion":
                img[m] = 0.95
            path = root / cls / f"img_{k}.png"
            if cls == "healthy" and k == 5:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"not a png")
                continue
            _png(path, _u8(img))
            if cls == "lesion":
                lesions[f"lesion/img_{k}"] = (cy, cx)
                if k == 5:
                    _png(root / cls / f"img_{k}_mask.png", np.zeros((5, 5), np.uint8))
                else:
                    _png(root / cls / f"img_{k}_mask.png", (m * 255).astype(np.uint8))
    return {"root": root, "lesions": lesions, "n": {"healthy": 5, "lesion": 5},
            "skipped": {"unreadable image": 1, "mask shape mismatch": 1}}


def write_folder_csv(root: Path) -> dict:
    """The same kind of images listed in a CSV with split, box, attributes, site and group
    columns; one row points to a missing file."""
    rng = np.random.default_rng(2)
    rows = []
    for k in range(8):
        img = _texture(rng, (32, 32)) * 0.5
        label = k % 2
        if label:
            img[10:20, 12:24] = 0.9
        _png(root / "imgs" / f"s{k}.png", _u8(img))
        split = "test" if k >= 6 else "val" if k >= 4 else "train"
        rows.append([f"imgs/s{k}.png", "tumour" if label else "normal", split,
                     12, 10, 24, 20, f"site{k % 2}", f"patient{k // 2}", label, ""])
    rows.append(["imgs/missing.png", "normal", "train", "", "", "", "", "site0", "p9", 0, 1])
    _write_csv(root / "labels.csv", ["image", "label", "split", "box_x0", "box_y0", "box_x1",
                                     "box_y1", "site", "group", "attr_bright", "attr_other"],
               rows)
    return {"root": root, "csv": "labels.csv"}


# ----------------------------------------------------------------------------- CUB


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_cub(root: Path, with_segmentations: bool = True) -> dict:
    """CUB_200_2011 with 3 classes × 4 JPEGs (40×32, a red 'bird' ellipse in its box), the
    official text files, segmentations for class 001 only, and an images.txt entry whose
    file is missing (id 13)."""
    base = root / "CUB_200_2011"
    rng = np.random.default_rng(3)
    images, labels, split, boxes = [], [], [], []
    truth = {}
    iid = 0
    for c, folder in enumerate(CUB_CLASSES, start=1):
        for k in range(4):
            iid += 1
            h, w = 32, 40
            img = np.stack([_texture(rng, (h, w))] * 3, axis=-1) * np.array([0.3, 0.6, 0.3])
            x, y, bw, bh = 4 + 3 * k, 5 + k, 18, 14
            yy, xx = np.mgrid[0:h, 0:w]
            bird = (((xx - (x + bw / 2)) / (bw / 2)) ** 2
                    + ((yy - (y + bh / 2)) / (bh / 2)) ** 2) <= 1
            img[bird] = [0.9, 0.1, 0.1]
            name = f"{folder}/{folder.split('.')[1]}_{iid:04d}_{100 + iid}.jpg"
            (base / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_u8(img)).save(base / "images" / name, quality=95)
            if with_segmentations and c == 1:
                seg = (bird * 204).astype(np.uint8)  # 4 of 5 annotators
                seg[0, 0] = 51  # one annotator's stray pixel: below the majority
                _png((root / "segmentations" / name).with_suffix(".png"), seg)
            images.append(f"{iid} {name}")
            labels.append(f"{iid} {c}")
            split.append(f"{iid} {0 if k == 3 else 1}")
            boxes.append(f"{iid} {x:.1f} {y:.1f} {bw:.1f} {bh:.1f}")
            truth[iid] = {"class": c, "train": k != 3, "box": (x, y, x + bw, y + bh)}
    images.append("13 003.Sooty_Albatross/Sooty_Albatross_missing.jpg")
    labels.append("13 3")
    split.append("13 1")
    boxes.append("13 1.0 1.0 5.0 5.0")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split), ("bounding_boxes.txt", boxes),
                        ("classes.txt", [f"{i} {c}" for i, c in enumerate(CUB_CLASSES, 1)])):
        (base / name).write_text("\n".join(lines) + "\n")
    return {"root": root, "truth": truth, "missing_id": 13}


# ----------------------------------------------------------------------------- MNIST


def _idx(path: Path, magic: int, arr: np.ndarray, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> dict:
    """The four MNIST IDX files (magic 0x00000803 images, 0x00000801 labels); the t10k files
    gzipped as distributed. 'Digits' are rings centred in the 28×28 frame."""
    rng = np.random.default_rng(4)

    def digits(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        ys = (np.arange(n) + offset) % 10
        xs = np.zeros((n, 28, 28), np.uint8)
        for i, y in enumerate(ys):
            r = 4 + (y % 5)
            ring = _disk((28, 28), 14, 14, r) & ~_disk((28, 28), 14, 14, r - 2)
            xs[i][ring] = rng.integers(150, 256, int(ring.sum()))
        return xs, ys.astype(np.uint8)

    xtr, ytr = digits(n_train, 0)
    xte, yte = digits(n_test, 3)
    _idx(root / "train-images-idx3-ubyte", 0x00000803, xtr, gz=False)
    _idx(root / "train-labels-idx1-ubyte", 0x00000801, ytr, gz=False)
    _idx(root / "t10k-images-idx3-ubyte", 0x00000803, xte, gz=True)
    _idx(root / "t10k-labels-idx1-ubyte", 0x00000801, yte, gz=True)
    return {"root": root, "train": (xtr, ytr), "test": (xte, yte)}


# ----------------------------------------------------------------------------- DICOM


def write_dicom(path: Path, stored: np.ndarray, truncate: bool = False, **tags) -> None:
    """Write a single-frame DICOM file (Explicit VR Little Endian) with the given tags;
    `truncate` keeps a valid header but cuts the pixel data in half."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = tags.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = tags.get("PhotometricInterpretation", "MONOCHROME2")
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if np.issubdtype(stored.dtype, np.signedinteger) else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if truncate:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


# ----------------------------------------------------------------------------- LIDC

LIDC_ROWS = 48
LIDC_SPACING = 0.8  # mm per pixel
LIDC_THICK = 2.0  # mm between slices
LIDC_Z0 = -100.0

# Each nodule: patient, centre (row px, col px, slice index), radius (mm), per-reader
# characteristics (None = small nodule, points only), readers. Malignancy is the last score.
LIDC_NODULES = {
    # 4 readers: malignancy 4,5,4,3 → median 4 → 1. subtlety 5,4,4,3 → 4 → 1; calcification
    # 6,6,6,6 → 0; margin 2,3,2,4 → 2.5 → 1; spiculation 1,2,1,1 → 1 → 0; lobulation 3,3,4,2
    # → 3 → 1; texture 5,5,4,5 → 5 → 1.
    "A": dict(patient=1, centre=(20, 18, 2), radius=4.0, readers=[0, 1, 2, 3],
              chars=[(5, 1, 6, 3, 2, 3, 1, 5, 4), (4, 1, 6, 3, 3, 3, 2, 5, 5),
                     (4, 1, 6, 4, 2, 4, 1, 4, 4), (3, 1, 6, 3, 4, 2, 1, 5, 3)],
              attrs=[1, 0, 1, 0, 1, 1], malignancy_label=1),
    # < 3 mm: points only, 2 readers, no characteristics.
    "B": dict(patient=1, centre=(36, 38, 4), radius=0.0, readers=[1, 3], chars=None),
    # 3 readers: malignancy 2,3,3 → 3 → 0; subtlety 2,3,2 → 2 → 0; calcification 3,6,3 → 3
    # → 1; margin 4,5,5 → 5 → 0; spiculation 3,4,3 → 3 → 1; lobulation 1,1,2 → 1 → 0;
    # texture 1,2,1 → 1 → 0.
    "C": dict(patient=2, centre=(24, 24, 3), radius=5.0, readers=[0, 1, 2],
              chars=[(2, 1, 3, 3, 4, 1, 3, 1, 2), (3, 1, 6, 3, 5, 1, 4, 2, 3),
                     (2, 1, 3, 3, 5, 2, 3, 1, 3)],
              attrs=[0, 1, 0, 1, 0, 0], malignancy_label=0),
    # 2 readers, malignancy 2,2 → 0.
    "D": dict(patient=2, centre=(10, 36, 2), radius=3.5, readers=[2, 3],
              chars=[(3, 1, 6, 3, 3, 1, 1, 5, 2), (3, 1, 6, 3, 3, 1, 1, 5, 2)],
              attrs=[0, 0, 1, 0, 0, 1], malignancy_label=0),
    # 4 readers disagree 3,4,3,4 → median 3.5 → 1.
    "E": dict(patient=3, centre=(30, 16, 2), radius=4.5, readers=[0, 1, 2, 3],
              chars=[(4, 1, 6, 3, 3, 3, 1, 5, 3), (4, 1, 6, 3, 3, 3, 1, 5, 4),
                     (4, 1, 6, 3, 3, 3, 1, 5, 3), (4, 1, 6, 3, 3, 3, 1, 5, 4)],
              attrs=[1, 0, 1, 0, 1, 1], malignancy_label=1),
    # outlined only on slice 5 of patient 3, whose DICOM file is corrupt.
    "F": dict(patient=3, centre=(12, 34, 5), radius=1.6, readers=[0, 2],
              chars=[(5, 1, 6, 3, 3, 3, 1, 5, 5), (5, 1, 6, 3, 3, 3, 1, 5, 5)],
              attrs=[1, 0, 1, 0, 1, 1], malignancy_label=1),
}
LIDC_READER_JITTER = [(0.0, 0.0, 0.0), (0.6, -0.5, 0.5), (-0.5, 0.4, -0.5), (0.3, 0.6, 1.0)]
LIDC_CORRUPT = (3, 5)  # patient 3, slice index 5: not DICOM at all
LIDC_TRUNCATED = (2, 5)  # patient 2, slice 5: header fine, pixel data cut (nodule C's edge)


def _uid(*parts: int) -> str:
    return "1.3.6.1.4.1.14519.5.2.1.6279.6001." + ".".join(str(p) for p in parts)


def lidc_patient_id(p: int) -> str:
    return f"LIDC-IDRI-{p:04d}"


def _lidc_volume(p: int, rng: np.random.Generator) -> np.ndarray:
    vol = -850.0 + rng.normal(0, 20, (6, LIDC_ROWS, LIDC_ROWS))
    for nod in LIDC_NODULES.values():
        if nod["patient"] != p:
            continue
        r_px = max(nod["radius"], 1.2) / LIDC_SPACING
        cy, cx, cz = nod["centre"]
        for z in range(6):
            dz = (z - cz) * LIDC_THICK
            rr = math.sqrt(max(r_px**2 - (dz / LIDC_SPACING) ** 2, 0.0))
            if rr > 0:
                vol[z][_disk((LIDC_ROWS, LIDC_ROWS), cy, cx, rr)] = 40.0
    return vol


def _contour(cy: float, cx: float, r: float, n: int = 16) -> list[tuple[int, int]]:
    pts = []
    for t in np.linspace(0, 2 * np.pi, n, endpoint=False):
        pt = (int(round(cx + r * math.cos(t))), int(round(cy + r * math.sin(t))))
        if pt not in pts:
            pts.append(pt)
    return pts


def _lidc_xml(p: int, series_uid: str, study_uid: str, sops: list[str]) -> str:
    sessions = []
    for reader in range(4):
        nods = []
        for name, nod in LIDC_NODULES.items():
            if nod["patient"] != p or reader not in nod["readers"]:
                continue
            jy, jx, jr = LIDC_READER_JITTER[reader]
            cy, cx, cz = nod["centre"]
            rois = []
            if nod["chars"] is None:  # small nodule: one point
                rois.append((cz, [(cx, cy)]))
            else:
                r_px = nod["radius"] / LIDC_SPACING + jr
                for z in range(6):
                    dz = (z - cz) * LIDC_THICK / LIDC_SPACING
                    if abs(dz) < r_px:
                        rr = math.sqrt(r_px**2 - dz**2)
                        if rr >= 1.5:
                            rois.append((z, _contour(cy + jy, cx + jx, rr)))
            chars = ""
            if nod["chars"] is not None:
                vals = nod["chars"][nod["readers"].index(reader)]
                keys = ("subtlety", "internalStructure", "calcification", "sphericity",
                        "margin", "lobulation", "spiculation", "texture", "malignancy")
                chars = ("<characteristics>" + "".join(f"<{k}>{v}</{k}>" for k, v in
                                                       zip(keys, vals, strict=True))
                         + "</characteristics>")
            roi_xml = "".join(
                f"<roi><imageZposition>{LIDC_Z0 - z * LIDC_THICK:.6f} </imageZposition>"
                f"<imageSOP_UID>{sops[z]}</imageSOP_UID><inclusion>TRUE</inclusion>"
                + "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                          for x, y in pts) + "</roi>"
                for z, pts in rois)
            nods.append(f"<unblindedReadNodule><noduleID>Nodule {name}{reader}</noduleID>"
                        f"{chars}{roi_xml}</unblindedReadNodule>")
        # a non-nodule mark, as real files have
        nods.append("<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>-100.0"
                    f"</imageZposition><imageSOP_UID>{sops[0]}</imageSOP_UID><locus><xCoord>5"
                    "</xCoord><yCoord>5</yCoord></locus></nonNodule>")
        sessions.append(f"<readingSession><annotationVersion>3.12</annotationVersion>"
                        f"<servicingRadiologistID>{1000 + reader}</servicingRadiologistID>"
                        + "".join(nods) + "</readingSession>")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1" '
            'xmlns="http://www.nih.gov" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
            "<ResponseHeader><Version>1.8.1</Version><MessageId>-1</MessageId>"
            "<TaskDescription>Second unblinded read</TaskDescription>"
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid>"
            f"<StudyInstanceUID>{study_uid}</StudyInstanceUID>"
            "<ResponseDescription>1 - Reading complete</ResponseDescription></ResponseHeader>"
            + "".join(sessions) + "</LidcReadMessage>\n")


def write_lidc(root: Path) -> dict:
    """LIDC-IDRI/LIDC-IDRI-000{1,2,3}/<study>/<series>/1-0k.dcm + 0xy.xml: 6 axial CT slices of
    48×48 px (0.8 mm, 2 mm apart) per patient, nodules of LIDC_NODULES as +40 HU spheres in
    −850 HU lung, four readers' XML reads. Patient 2 stores signed pixels with intercept
    −1000, the others unsigned with intercept −1024. Patient 3's slice 5 is not DICOM;
    patient 2's slice 5 has truncated pixel data. An extra XML refers to a series that is
    not on disk."""
    rng = np.random.default_rng(5)
    base = root / "LIDC-IDRI"
    for p in (1, 2, 3):
        pid = lidc_patient_id(p)
        study, series = _uid(p, 1), _uid(p, 2)
        folder = base / pid / "01-01-2000-NA-CT CHEST-3" / f"3000{p}.000000-NA-{p}"
        vol = _lidc_volume(p, rng)
        sops = [_uid(p, 3, z) for z in range(6)]
        signed = p == 2
        intercept = -1000.0 if signed else -1024.0
        for z in range(6):
            path = folder / f"1-{z + 1:03d}.dcm"
            if (p, z) == LIDC_CORRUPT:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\x00" * 200 + b"truncated")
                continue
            stored = np.round(vol[z] - intercept).astype(np.int16 if signed else np.uint16)
            write_dicom(path, stored, SOPInstanceUID=sops[z], StudyInstanceUID=study,
                        SeriesInstanceUID=series, PatientID=pid, Modality="CT",
                        PixelSpacing=[LIDC_SPACING, LIDC_SPACING], SliceThickness=LIDC_THICK,
                        ImagePositionPatient=[-19.2, -19.2, LIDC_Z0 - z * LIDC_THICK],
                        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], RescaleSlope=1,
                        RescaleIntercept=intercept, InstanceNumber=z + 1,
                        truncate=(p, z) == LIDC_TRUNCATED)
        (folder / f"{68 + p:03d}.xml").write_text(_lidc_xml(p, series, study, sops))
    orphan = base / "tcia-lidc-xml" / "185"
    orphan.mkdir(parents=True)
    (orphan / "999.xml").write_text(_lidc_xml(1, _uid(9, 9), _uid(9, 8), [_uid(9, 3, z)
                                                                            for z in range(6)]))
    return {"root": root, "nodules": LIDC_NODULES}


def write_lidc_patches(root: Path) -> dict:
    """Pre-cropped patches: patches/<patient>_<k>.npy (int16 HU) with per-reader masks
    masks/<patient>_<k>_r<j>.png and patches.csv (image, patient_id, mask 'a;b;c',
    malignancy 'r1;r2;…', attribute scores); one row points to a missing file."""
    rng = np.random.default_rng(6)
    rows = []
    for p in range(1, 5):
        for k in range(2):
            hu = (-850 + rng.normal(0, 15, (24, 24))).astype(np.int16)
            disk = _disk((24, 24), 12, 12, 5)
            hu[disk] = 30
            masks = []
            for j, r in enumerate((4, 5, 6)):
                name = f"masks/LIDC-IDRI-{p:04d}_{k}_r{j}.png"
                _png(root / name, (_disk((24, 24), 12, 12, r) * 255).astype(np.uint8))
                masks.append(name)
            (root / "patches").mkdir(parents=True, exist_ok=True)
            np.save(root / "patches" / f"LIDC-IDRI-{p:04d}_{k}.npy", hu)
            mal = "4;5;4" if k == 0 else "1;2;3"
            rows.append([f"patches/LIDC-IDRI-{p:04d}_{k}.npy", f"LIDC-IDRI-{p:04d}",
                         ";".join(masks), mal, "5;5;4", "6;6;6", "2;2;3", "1;1;1", "3;4;3",
                         "5;5;5"])
    rows.append(["patches/gone.npy", "LIDC-IDRI-0009", "", "3", "", "", "", "", "", ""])
    _write_csv(root / "patches.csv", ["image", "patient_id", "mask", "malignancy", "subtlety",
                                      "calcification", "margin", "spiculation", "lobulation",
                                      "texture"], rows)
    return {"root": root, "csv": "patches.csv", "patients": 4}


# ----------------------------------------------------------------------------- CBIS-DDSM

MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view",
               "abnormality id", "abnormality type", "mass shape", "mass margins", "assessment",
               "pathology", "subtlety", "image file path", "cropped image file path",
               "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view",
               "abnormality id", "abnormality type", "calc type", "calc distribution",
               "assessment", "pathology", "subtlety", "image file path",
               "cropped image file path", "ROI mask file path"]
MAMMO = (64, 48)  # rows, cols


def _mammogram(rng: np.random.Generator, lesions: list[tuple[int, int, int]], side: str
               ) -> np.ndarray:
    """uint16 mammogram: dark background, breast half-ellipse from the chest wall, bright
    lesion disks, and a bright label marker in the far corner (not touching the breast)."""
    h, w = MAMMO
    yy, xx = np.mgrid[0:h, 0:w]
    wall = 0 if side == "LEFT" else w - 1
    breast = ((xx - wall) / 34.0) ** 2 + ((yy - h / 2) / 30.0) ** 2 <= 1
    img = np.where(breast, 1500 + 300 * gaussian_filter(rng.standard_normal((h, w)), 2), 30)
    for cy, cx, r in lesions:
        img[_disk((h, w), cy, cx, r)] = 3500
    marker = (slice(2, 6), slice(w - 6, w - 2)) if side == "LEFT" else (slice(2, 6), slice(2, 6))
    img[marker] = 4000
    return np.clip(img, 0, 65535).astype(np.uint16)


def write_cbis(root: Path) -> dict:
    """The official CSVs + CBIS-DDSM/<case>/<StudyUID>/<SeriesUID>/00000k.dcm files. One case
    (P_00009) is stored in the TCIA download's folder naming instead (date / series
    description folders, 1-1.dcm / 1-2.dcm, mask second), reachable only by SeriesInstanceUID.
    Broken on purpose: P_00011's image is missing, P_00012's ROI series holds only the
    cropped image, P_00020's full image DICOM is corrupt."""
    rng = np.random.default_rng(7)
    n = [0]

    def uid() -> str:
        n[0] += 1
        return f"1.3.6.1.4.1.9590.100.1.2.{1000 + n[0]}"

    # rows: patient, side, view, abnormality id, shape/type, margins/distribution,
    # pathology, subtlety, lesion (row, col, radius)
    mass_train = [("P_00001", "LEFT", "CC", 1, "IRREGULAR", "SPICULATED", "MALIGNANT", 5,
                   (20, 12, 5)),
                  ("P_00001", "LEFT", "CC", 2, "OVAL", "CIRCUMSCRIBED", "BENIGN", 3,
                   (44, 14, 4)),
                  ("P_00004", "RIGHT", "MLO", 1, "LOBULATED", "ILL_DEFINED-SPICULATED",
                   "BENIGN_WITHOUT_CALLBACK", 4, (30, 36, 5)),
                  ("P_00009", "LEFT", "CC", 1, "ROUND", "OBSCURED", "MALIGNANT", 2,
                   (32, 10, 4)),
                  ("P_00010", "RIGHT", "CC", 1, "N/A", "N/A", "BENIGN", 3, (34, 40, 4)),
                  ("P_00011", "LEFT", "CC", 1, "OVAL", "OBSCURED", "BENIGN", 3, (30, 10, 4)),
                  ("P_00012", "LEFT", "MLO", 1, "OVAL", "OBSCURED", "MALIGNANT", 3,
                   (30, 10, 4))]
    mass_test = [("P_00016", "LEFT", "CC", 1, "ROUND", "OBSCURED", "MALIGNANT", 2, (28, 12, 5)),
                 ("P_00017", "RIGHT", "MLO", 1, "IRREGULAR", "MICROLOBULATED", "BENIGN", 5,
                  (30, 38, 4)),
                 ("P_00020", "LEFT", "CC", 1, "OVAL", "OBSCURED", "BENIGN", 3, (30, 10, 4))]
    calc_train = [("P_00005", "RIGHT", "CC", 1, "PLEOMORPHIC", "CLUSTERED", "MALIGNANT", 3,
                   (30, 38, 3)),
                  ("P_00007", "LEFT", "MLO", 1, "ROUND_AND_REGULAR-LUCENT_CENTER",
                   "DIFFUSELY_SCATTERED", "BENIGN_WITHOUT_CALLBACK", 2, (30, 10, 3))]
    calc_test = [("P_00038", "LEFT", "CC", 1, "AMORPHOUS", "SEGMENTAL", "MALIGNANT", 4,
                  (25, 12, 3))]
    images: dict[tuple, tuple[str, list]] = {}
    csv_rows: dict[str, list] = {}
    expected = {}
    for csv_name, prefix, rows, header in (
            ("mass_case_description_train_set.csv", "Mass-Training", mass_train, MASS_HEADER),
            ("mass_case_description_test_set.csv", "Mass-Test", mass_test, MASS_HEADER),
            ("calc_case_description_train_set.csv", "Calc-Training", calc_train, CALC_HEADER),
            ("calc_case_description_test_set.csv", "Calc-Test", calc_test, CALC_HEADER)):
        out_rows = []
        for pid, side, view, abn, a1, a2, path_, subtle, lesion in rows:
            case = f"{prefix}_{pid}_{side}_{view}"
            key = (prefix, pid, side, view)
            if key not in images:
                images[key] = (f"{case}/{uid()}/{uid()}/000000.dcm", [])
            images[key][1].append(lesion)
            roi_case = f"{case}_{abn}"
            study, series = uid(), uid()
            roi_path = f"{roi_case}/{study}/{series}/000000.dcm"
            crop_path = f"{roi_case}/{study}/{series}/000001.dcm"
            abn_type = "mass" if prefix.startswith("Mass") else "calcification"
            out_rows.append([pid, 2, side, view, abn, abn_type, a1, a2, 4, path_, subtle,
                             images[key][0] + "\n", crop_path + "\n", roi_path + "\n"])
            expected[roi_case] = {"image": images[key][0], "roi": roi_path, "crop": crop_path,
                                  "series": series, "lesion": lesion, "side": side,
                                  "label": int(path_ == "MALIGNANT"), "patient": pid,
                                  "official": "test" if "Test" in prefix else "train"}
        csv_rows[csv_name] = (header, out_rows)
    base = root / "CBIS-DDSM"
    for (prefix, pid, side, _view), (img_path, lesions) in images.items():
        mammo = _mammogram(rng, lesions, side)
        tcia = pid == "P_00009"
        series_uid = img_path.split("/")[2]
        if tcia:
            target = (base / img_path.split("/")[0] / "07-20-2016-DDSM-45371"
                      / "1.000000-full mammogram images-10421" / "1-1.dcm")
        else:
            target = base / img_path
        if pid == "P_00011":
            continue  # the CSV row points nowhere
        if pid == "P_00020":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"DICM but not really" * 5)
            continue
        write_dicom(target, mammo, SOPInstanceUID=uid(), SeriesInstanceUID=series_uid,
                    StudyInstanceUID=img_path.split("/")[1], PatientID=f"{prefix}_{pid}",
                    Modality="MG", SeriesDescription="full mammogram images",
                    SOPClassUID="1.2.840.10008.5.1.4.1.1.1.2")
    for roi_case, e in expected.items():
        if e["patient"] in ("P_00011", "P_00020"):
            continue
        cy, cx, r = e["lesion"]
        mask = (_disk(MAMMO, cy, cx, r) * 255).astype(np.uint8)
        crop = np.full((2 * r + 6, 2 * r + 6), 3000, np.uint16)
        crop[3:-3, 3:-3] = 3500 + np.arange((2 * r) ** 2).reshape(2 * r, 2 * r)
        tcia = e["patient"] == "P_00009"
        if tcia:
            folder = (base / roi_case / "07-21-2016-DDSM-71234" / "1.000000-ROI mask images-421")
            mask_file, crop_file = folder / "1-2.dcm", folder / "1-1.dcm"
        else:
            mask_file, crop_file = base / e["roi"], base / e["crop"]
        common = dict(SeriesInstanceUID=e["series"], StudyInstanceUID=e["roi"].split("/")[1],
                      PatientID=roi_case, Modality="MG",
                      SeriesDescription="ROI mask images",
                      SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
        write_dicom(crop_file, crop, SOPInstanceUID=uid(), **common)
        if e["patient"] != "P_00012":
            write_dicom(mask_file, mask, SOPInstanceUID=uid(), **common)
    for name, (header, rows) in csv_rows.items():
        _write_csv(root / name, header, rows)
    return {"root": root, "cases": expected}


# ----------------------------------------------------------------------------- BraTS

BRATS_SHAPE = (20, 20, 10)  # x, y, z voxels


def _brats_volumes(rng: np.random.Generator, centre: tuple[int, int, int]) -> dict:
    x, y, z = np.mgrid[0:BRATS_SHAPE[0], 0:BRATS_SHAPE[1], 0:BRATS_SHAPE[2]]
    brain = (((x - 9.5) / 9) ** 2 + ((y - 9.5) / 9) ** 2 + ((z - 4.5) / 5.5) ** 2) <= 1
    cx, cy, cz = centre
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    seg = np.zeros(BRATS_SHAPE, np.uint8)
    seg[(d <= 3) & brain] = 2  # oedema
    seg[(d <= 2) & brain] = 4  # enhancing
    seg[(d <= 1) & brain] = 1  # necrotic core
    vols = {}
    for k, mod in enumerate(("t1", "t1ce", "t2", "flair")):
        v = np.where(brain, 300 + 50 * k + rng.normal(0, 10, BRATS_SHAPE), 0.0)
        if mod == "flair":
            v[seg > 0] = 900.0  # oedema is bright on FLAIR
        if mod == "t1ce":
            v[seg == 4] = 1000.0
        vols[mod] = v.astype(np.float32)
    vols["seg"] = seg
    return vols


def _save_nii(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_brats(root: Path) -> dict:
    """BraTS 2020 layout (MICCAI_BraTS2020_TrainingData/BraTS20_Training_00k/
    BraTS20_Training_00k_{t1,t1ce,t2,flair,seg}.nii.gz + name_mapping.csv) for subjects 001
    (HGG), 002 (LGG: 001's volumes stored flipped in x with an x-flipped affine — identical
    after reorientation), 003 (no seg), 004 (corrupt t1), 005 (HGG), plus one BraTS 2023
    subject (BraTS-GLI-00006-000-{t1n,t1c,t2w,t2f,seg}.nii.gz, no grade)."""
    rng = np.random.default_rng(8)
    base = root / "MICCAI_BraTS2020_TrainingData"
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = [-10, -10, -5]
    las = ras.copy()
    las[0, 0] = -1.0
    las[0, 3] = 9.0  # same world box, x axis reversed
    v1 = _brats_volumes(rng, (6, 12, 5))
    subjects = {
        "BraTS20_Training_001": (v1, ras),
        "BraTS20_Training_002": ({k: v[::-1].copy() for k, v in v1.items()}, las),
        "BraTS20_Training_003": (_brats_volumes(rng, (12, 8, 4)), ras),
        "BraTS20_Training_004": (_brats_volumes(rng, (10, 10, 5)), ras),
        "BraTS20_Training_005": (_brats_volumes(rng, (13, 7, 5)), ras),
    }
    for subj, (vols, aff) in subjects.items():
        for mod, data in vols.items():
            if subj.endswith("003") and mod == "seg":
                continue
            path = base / subj / f"{subj}_{mod}.nii.gz"
            if subj.endswith("004") and mod == "t1":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(gzip.compress(b"not a nifti header" * 20))
                continue
            _save_nii(path, data, aff)
    v6 = _brats_volumes(rng, (8, 8, 5))
    v6["seg"] = np.where(v6["seg"] == 4, 3, v6["seg"]).astype(np.uint8)  # 2023: ET = 3
    names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
    for mod, data in v6.items():
        _save_nii(root / "BraTS-GLI-00006-000" / f"BraTS-GLI-00006-000-{names[mod]}.nii.gz",
                  data, ras)
    _write_csv(base / "name_mapping.csv",
               ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID",
                "TCGA_TCIA_subject_ID", "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"],
               [["HGG", "Brats17_a", "Brats18_a", "TCGA-02-0006", "BraTS19_a",
                 "BraTS20_Training_001"],
                ["LGG", "Brats17_b", "Brats18_b", "TCGA-02-0009", "BraTS19_b",
                 "BraTS20_Training_002"],
                ["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_003"],
                ["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_004"],
                ["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_005"]])
    return {"root": root, "grades": {"BraTS20_Training_001": "HGG",
                                     "BraTS20_Training_002": "LGG",
                                     "BraTS20_Training_005": "HGG"}}
