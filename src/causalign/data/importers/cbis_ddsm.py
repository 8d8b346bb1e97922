"""CBIS-DDSM mammography (Lee et al. 2017; paper 000 §5.1).

SRC layout (the TCIA download; CSVs anywhere in SRC or two levels below)::

    mass_case_description_train_set.csv   mass_case_description_test_set.csv
    calc_case_description_train_set.csv   calc_case_description_test_set.csv
    CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<date…>/<series…>/1-1.dcm           full image
    CBIS-DDSM/Mass-Training_P_00001_LEFT_CC_1/<date…>/<series…>/1-1.dcm, 1-2.dcm  ROI mask
                                                                        and cropped image

The CSV columns used: ``patient_id, left or right breast, image view, abnormality id,
pathology, subtlety, mass shape, mass margins`` (mass) or ``calc type, calc distribution``
(calc), ``image file path, ROI mask file path``. Their paths
(``<case>/<StudyInstanceUID>/<SeriesInstanceUID>/000000.dcm``) rarely match the folders of
the TCIA download, so a path that does not exist is resolved by its case folder and
SeriesInstanceUID (read from the DICOM headers); the ROI mask is told apart from the cropped
image that shares its series by content: binary, with the full image's size.

Label rule: pathology MALIGNANT → 1; BENIGN and BENIGN_WITHOUT_CALLBACK → 0. Split: the
official one (train CSVs → train, test CSVs → test; a patient listed in a test CSV has all
their images in test, also those of another CSV's training set); `--val-frac` of the training
*patients* (random with `--seed`) become val. `--abnormality mass` (default), ``calc`` or ``both``.

Preprocessing: the full mammogram is scaled to [0, 1] by its maximum; background removal
keeps the largest connected component above half the Otsu threshold (the breast; labels and
markers outside it are zeroed); intensities are normalised by the 0.5/99.5 percentiles
inside the breast. Each abnormality gives one square crop centred on its ROI's bounding box,
with side = longest box side × (1 + 2·`--context`) (default 0.5: one half of the box on each
side), at least 32 px, resized to `--size`; the ROI mask is cropped alongside, and the box
columns hold its bounding box.

Binary attributes (paper 000: subtlety, shape, circumscription, obscuration,
ill-definiteness, spiculation; NaN where the CSV says N/A):
  subtlety           1 = obvious: subtlety ≥ 4 on DDSM's 1 (subtle) – 5 (obvious) scale
  shape              1 = IRREGULAR or ARCHITECTURAL_DISTORTION in mass shape, else 0
  circumscription    1 = CIRCUMSCRIBED in mass margins
  obscuration        1 = OBSCURED in mass margins
  ill_definiteness   1 = ILL_DEFINED in mass margins
  spiculation        1 = SPICULATED in mass margins
  calc_morphology    1 = PLEOMORPHIC, FINE_LINEAR_BRANCHING or AMORPHOUS in calc type
  calc_distribution  1 = CLUSTERED, LINEAR or SEGMENTAL in calc distribution
(combined values such as ``ILL_DEFINED-SPICULATED`` set each attribute they name;
MICROLOBULATED sets none.) Mass attributes are NaN for calcifications and vice versa.

Skipped with a reason: a CSV row whose image or ROI mask cannot be found, an unreadable
DICOM, an ROI series without a binary mask, an empty ROI mask, an unknown pathology.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..format import DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit
from .dicom import dicom_files, pydicom_module, read_header, read_pixels
from .util import (
    SkipItem,
    assign_splits,
    box_of_mask,
    crop_square,
    largest_component,
    otsu_threshold,
    percentile_normalise,
    read_csv,
    resize,
    resize_mask,
    walk,
)

MASS_ATTRS = ["subtlety", "shape", "circumscription", "obscuration", "ill_definiteness",
              "spiculation"]
CALC_ATTRS = ["subtlety", "calc_morphology", "calc_distribution"]
_REQUIRED = ("pathology", "image_file_path", "roi_mask_file_path")
_CASE = re.compile(r"^(Mass|Calc)-(Training|Test)_", re.IGNORECASE)


@dataclass
class CbisDdsmOptions(CommonOptions):
    size: int = 128
    abnormality: str = "mass"
    context: float = 0.5
    val_frac: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.abnormality not in ("mass", "calc", "both"):
            raise DataError(f"--abnormality must be mass, calc or both, got "
                            f"'{self.abnormality}'")
        if not 0 <= self.context <= 3:
            raise DataError(f"--context must be in [0, 3], got {self.context}")

    def fractions(self) -> dict[str, float]:
        return {"train": 1.0 - self.val_frac, "val": self.val_frac, "test": 0.0}


def _tokens(value: str) -> set[str]:
    v = (value or "").strip().upper()
    if v in ("", "N/A", "NA", "NONE", "NAN"):
        return set()
    return {t.strip() for t in v.split("-") if t.strip()}


def _any(tokens: set[str], wanted: set[str]) -> float:
    return math.nan if not tokens else float(bool(tokens & wanted))


def mass_attributes(row: dict) -> dict[str, float]:
    """Binary mass attributes from a CSV row (rules in the module docstring)."""
    shape = _tokens(row.get("mass_shape", ""))
    margins = _tokens(row.get("mass_margins", ""))
    return {
        "subtlety": subtlety(row),
        "shape": _any(shape, {"IRREGULAR", "ARCHITECTURAL_DISTORTION"}),
        "circumscription": _any(margins, {"CIRCUMSCRIBED"}),
        "obscuration": _any(margins, {"OBSCURED"}),
        "ill_definiteness": _any(margins, {"ILL_DEFINED"}),
        "spiculation": _any(margins, {"SPICULATED"}),
    }


def calc_attributes(row: dict) -> dict[str, float]:
    return {
        "subtlety": subtlety(row),
        "calc_morphology": _any(_tokens(row.get("calc_type", "")),
                                {"PLEOMORPHIC", "FINE_LINEAR_BRANCHING", "AMORPHOUS"}),
        "calc_distribution": _any(_tokens(row.get("calc_distribution", "")),
                                  {"CLUSTERED", "LINEAR", "SEGMENTAL"}),
    }


def subtlety(row: dict) -> float:
    try:
        v = float(row.get("subtlety", ""))
    except ValueError:
        return math.nan
    return math.nan if not 1 <= v <= 5 else float(v >= 4)


def pathology_label(value: str) -> int | None:
    v = (value or "").strip().upper()
    if v == "MALIGNANT":
        return 1
    if v in ("BENIGN", "BENIGN_WITHOUT_CALLBACK"):
        return 0
    return None


def find_csvs(src: Path, abnormality: str) -> dict[str, Path]:
    wanted = ["mass", "calc"] if abnormality == "both" else [abnormality]
    found: dict[str, Path] = {}
    for path in sorted([*src.glob("*.csv"), *src.glob("*/*.csv"), *src.glob("*/*/*.csv")]):
        m = re.fullmatch(r"(mass|calc)_case_description_(train|test)_set(?:_v\d+)?\.csv",
                         path.name.lower())
        if m and m.group(1) in wanted:
            found.setdefault(f"{m.group(1)}_{m.group(2)}", path)
    missing = [f"{a}_case_description_{s}_set.csv" for a in wanted for s in ("train", "test")
               if f"{a}_{s}" not in found]
    if missing:
        raise DataError(f"{src}: missing {', '.join(missing)} (the official CBIS-DDSM CSVs)")
    return found


def remove_background(full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mammogram → (image in [0, 1] with everything outside the breast zeroed, breast mask).

    Scale by the maximum, keep the largest connected component above half the Otsu
    threshold (the breast; labels and markers are separate components), normalise by the
    0.5/99.5 percentiles inside it."""
    x = full.astype(np.float32) - float(full.min())
    x = x / x.max() if x.max() > 0 else x
    breast = largest_component(x > otsu_threshold(x) / 2)
    img = np.where(breast, percentile_normalise(x, breast), 0.0).astype(np.float32)
    return img, breast


def _norm_key(k: str) -> str:
    return re.sub(r"\s+", "_", (k or "").strip().lower())


class CbisDdsmImporter(Importer):
    kind = "cbis-ddsm"
    Options = CbisDdsmOptions
    layout = ("{mass,calc}_case_description_{train,test}_set.csv + CBIS-DDSM/<case>/…/*.dcm "
              "(TCIA download)")

    def plan(self) -> list[Unit]:
        opts: CbisDdsmOptions = self.opts
        csvs = find_csvs(self.src, opts.abnormality)
        self._case_dirs: dict[str, Path] | None = None
        self._refuse_jpeg_release(csvs)
        self.pydicom = pydicom_module("CBIS-DDSM")
        self.attributes = (MASS_ATTRS if opts.abnormality == "mass" else
                           CALC_ATTRS if opts.abnormality == "calc" else
                           MASS_ATTRS + CALC_ATTRS[1:])
        self._series_index: dict[Path, dict[str, list[Path]]] = {}
        by_image: dict[str, dict] = {}
        seen_ids: set[str] = set()
        for key in sorted(csvs):
            abn, official = key.split("_")
            path = csvs[key]
            cols, raw = read_csv(path)
            # a renamed or missing column would otherwise skip every row one by one
            # ("unknown pathology ''") and import the other CSVs as if nothing were wrong
            missing = [c for c in _REQUIRED if c not in {_norm_key(k) for k in cols}]
            if missing:
                raise DataError(f"{path}: missing column(s) "
                                f"{', '.join(c.replace('_', ' ') for c in missing)} "
                                f"(columns: {', '.join(cols) or 'none'})")
            rows = [{_norm_key(k): v for k, v in r.items()} for r in raw]
            for lineno, row in enumerate(rows, start=2):
                where = f"{path.name}:{lineno}"
                img_path = row.get("image_file_path", "").strip().strip('"')
                roi_path = row.get("roi_mask_file_path", "").strip().strip('"')
                if not img_path or not roi_path:
                    self.skip(where, "missing path in CSV", "image or ROI mask file path empty")
                    continue
                label = pathology_label(row.get("pathology", ""))
                if label is None:
                    self.skip(where, "unknown pathology", f"'{row.get('pathology', '')}'")
                    continue
                attrs = mass_attributes(row) if abn == "mass" else calc_attributes(row)
                vec = [attrs.get(a, math.nan) for a in self.attributes]
                case_roi = roi_path.replace("\\", "/").split("/")[0]
                sid = re.sub(r"[^A-Za-z0-9._-]+", "_", case_roi) or f"{abn}_{lineno}"
                base, k = sid, 1
                while sid in seen_ids:
                    k += 1
                    sid = f"{base}_{k}"
                seen_ids.add(sid)
                patient = row.get("patient_id", "") or img_path.split("/")[0]
                entry = by_image.setdefault(f"{abn}:{img_path}", {
                    "image": img_path, "official": official, "patient": patient, "rows": []})
                entry["rows"].append({"id": sid, "label": label, "attributes": vec,
                                      "roi": roi_path, "source": where})
        # The official split is per CSV: a patient can be in one CSV's training set and
        # another's test set (mass train, calc test). All of a test patient's images go to
        # test, so no patient is in both training and test.
        test_patients = {e["patient"] for e in by_image.values() if e["official"] == "test"}
        train = [e for e in by_image.values()
                 if e["official"] == "train" and e["patient"] not in test_patients]
        # val drawn by patient, stratified by the label of the patient's first image's first
        # abnormality: unstratified, a small val split could hold one class only
        split_of = assign_splits([e["patient"] for e in train], opts.fractions(), opts.seed,
                                 strata=[e["rows"][0]["label"] for e in train])
        units, moved = [], 0
        for key, e in by_image.items():
            split = split_of.get(e["patient"], "test")
            moved += e["official"] == "train" and split == "test"
            units.append(Unit(key=key, split=split, source=e["image"], payload=e))
        self.details = {"csvs": {k: str(v) for k, v in sorted(csvs.items())},
                        "abnormalities_listed": sum(len(e["rows"]) for e in by_image.values()),
                        "train_images_of_test_patients_moved_to_test": moved}
        return self.limit_units(units)

    def meta(self) -> DatasetMeta:
        return DatasetMeta(
            name=f"cbis-ddsm-{self.opts.abnormality}", classes=["benign", "malignant"],
            attributes=list(self.attributes), ndim=2, channels=1,
            info={"label_rule": "pathology MALIGNANT → 1, BENIGN/BENIGN_WITHOUT_CALLBACK → 0",
                  "split_rule": "official train/test CSVs (a test patient's images all in test); "
                                "val = --val-frac of train patients",
                  "attribute_rules": "see causalign.data.importers.cbis_ddsm"})

    def _refuse_jpeg_release(self, csvs: dict[str, Path]) -> None:
        """The Kaggle JPEG re-release (csv/dicom_info.csv, jpeg/<SeriesInstanceUID>/1-1.jpg)
        keeps the official CSVs, whose DICOM paths then point nowhere: every row was looked
        up and skipped as "image not found", ending in a generic "is this a cbis-ddsm
        folder?". Its masks are lossy JPEGs and its folders hold no case names; without
        any TCIA case folder beside it, it is refused by name before any row is read."""
        folders = sorted({p.parent for p in csvs.values()} | {self.src})
        marks = [f / "dicom_info.csv" for f in folders if (f / "dicom_info.csv").is_file()]
        marks += [d for d in dict.fromkeys([self.src / "jpeg", *(f.parent / "jpeg"
                                                                  for f in folders)])
                  if d.is_dir()]
        if not marks:
            return
        self._case_dir("")  # indexes the TCIA case folders
        if self._case_dirs:
            return
        raise DataError(f"{self.src}: the Kaggle JPEG re-release of CBIS-DDSM ({marks[0]}) is "
                        f"not supported; import the TCIA DICOM download (CBIS-DDSM/<case>/…/"
                        f"*.dcm with the official CSVs)")

    # ------------------------------------------------------------------ file resolution
    def _case_dir(self, case: str) -> Path | None:
        if self._case_dirs is None:
            self._case_dirs = {}
            base = len(self.src.parts)
            for dirpath, dirnames, _ in walk(self.src):
                keep = []
                for d in dirnames:
                    if _CASE.match(d):
                        self._case_dirs.setdefault(d, Path(dirpath) / d)
                    else:
                        keep.append(d)
                dirnames[:] = keep if len(Path(dirpath).parts) - base < 3 else []
        return self._case_dirs.get(case)

    def resolve(self, csv_path: str, what: str) -> list[Path]:
        """Files a CSV path refers to: the literal path if it exists, else the DICOMs of its
        case folder with the path's SeriesInstanceUID (or all of them if none has it)."""
        p = csv_path.replace("\\", "/").strip("/")
        for base in (self.src, self.src / "CBIS-DDSM"):
            if (base / p).is_file():
                return [base / p]
        parts = p.split("/")
        folder = self._case_dir(parts[0])
        if folder is None:
            raise SkipItem(f"{what} not found", f"no folder '{parts[0]}' for {csv_path}")
        files = dicom_files(folder)
        if not files:
            raise SkipItem(f"{what} not found", f"no DICOM file in {folder}")
        if len(parts) >= 3:
            index = self._series_index.get(folder)
            if index is None:
                index = {}
                for f in files:
                    try:
                        uid = str(read_header(self.pydicom, f, ["SeriesInstanceUID"])
                                  .get("SeriesInstanceUID", ""))
                    except SkipItem:
                        uid = ""
                    index.setdefault(uid, []).append(f)
                self._series_index[folder] = index
            if parts[2] in index:
                return index[parts[2]]
        return files

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        opts: CbisDdsmOptions = self.opts
        e = unit.payload
        cands = self.resolve(e["image"], "image")
        path = cands[0] if len(cands) == 1 else max(cands, key=lambda f: f.stat().st_size)
        full, _ = read_pixels(self.pydicom, path)
        if float(full.max()) == float(full.min()):  # a failed export: every crop would be black
            raise SkipItem("blank image", f"{path}: every pixel is {float(full.min()):g}")
        img, _ = remove_background(full)
        for row in e["rows"]:
            try:
                mask = self._roi_mask(row["roi"], img.shape)
            except SkipItem as exc:
                yield Skipped(row["source"], exc.reason, exc.detail)
                continue
            bx0, by0, bx1, by1 = box_of_mask(mask)
            wanted = int(round(max(bx1 - bx0, by1 - by0) * (1 + 2 * opts.context)))
            side = max(wanted, 32)
            if wanted < 32:  # the floor decides the crop: --context changed nothing here
                self.note("crop at the 32 px minimum side (lesion too small for --context "
                          "to widen it)")
            cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
            crop = resize(crop_square(img, cx, cy, side), (opts.size, opts.size))
            m = resize_mask(crop_square(mask, cx, cy, side), (opts.size, opts.size))
            yield Sample(id=row["id"], split=unit.split, label=row["label"], image=crop, mask=m,
                         box=box_of_mask(m), attributes=row["attributes"],
                         group=e["patient"])

    def _roi_mask(self, roi_path: str, shape: tuple[int, int]) -> np.ndarray:
        """The binary ROI mask among the files of the ROI series (the cropped image that
        shares the series is not binary, or not of the full image's size)."""
        candidates = self.resolve(roi_path, "ROI mask")
        # The CSVs' ROI and cropped-image paths are swapped for some cases, and the TCIA
        # download may keep mask and crop in separate series: the path (or its series) can
        # name the crop alone. The mask is then another file of the same folder, or of the
        # abnormality's own case folder (one per abnormality), tried after the named ones.
        more = dicom_files(candidates[0].parent)
        case = self._case_dir(roi_path.replace("\\", "/").strip("/").split("/")[0])
        if case is not None:
            more += dicom_files(case)
        candidates = list(dict.fromkeys([*candidates, *more]))
        resized = None
        errors = []
        for f in candidates:
            try:
                arr, _ = read_pixels(self.pydicom, f)
            except SkipItem as exc:
                errors.append(exc.detail)
                continue
            if np.unique(arr).size > 2:
                continue  # the cropped image
            m = arr > arr.min()
            if m.shape == shape:
                if not m.any():
                    raise SkipItem("empty ROI mask", str(f))
                return m
            resized = m
        if resized is not None and resized.any():
            self.note("ROI mask resized to its image (sizes differed)")
            return resize_mask(resized, shape)
        if errors and len(errors) == len(candidates):
            raise SkipItem("unreadable DICOM", errors[0])
        raise SkipItem("ROI mask not found",
                       f"no binary mask among {len(candidates)} file(s) for {roi_path}")
