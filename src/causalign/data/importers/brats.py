"""BraTS brain-tumour MRI (paper 000 App. C.1; volumes for paper 002's multi-view model).

SRC layout: one folder per subject, anywhere under SRC, holding NIfTI volumes::

    BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz     (BraTS 2018–2021)
    BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz  (BraTS 2023)
    name_mapping.csv   optional (BraTS 2020): 'Grade' (HGG/LGG) per subject id
    HGG/… LGG/…        or grade folders (BraTS 2018/2019)

2023 names map to the classic ones: t1n → t1, t1c → t1ce, t2w → t2, t2f → flair. Volumes are
reoriented to RAS (nibabel ``as_closest_canonical``) so axial slices are ``[:, :, z]``, shown
in the radiological convention: anterior up, patient left on the viewer's right. Each modality
is scaled to [0, 1] by its 0.5/99.5 percentiles inside the brain (voxels > 0 in any modality);
the brain's bounding square, square in millimetres (anisotropic in-plane voxels, e.g. 1×2 mm,
are not squashed), is cropped and resized to `--size`. Image channels = `--modalities` in the
given order.

Segmentation labels, by the release's naming. 2018–2021 names (``_t1ce``): 1 necrotic/
non-enhancing core, 2 oedema, 4 enhancing tumour. 2023+ names (``-t1c``): 1 non-enhancing
core, 2 oedema (SNFH), 3 enhancing tumour, and in BraTS 2024's post-treatment gliomas 4 the
resection cavity, which is not tumour (it is in no region; its slices are not tumour slices).
BraTS-PEDs 2024 numbers its labels otherwise (1 ET, 2 NET, 3 cyst, 4 oedema): a BraTS-PED
subject whose segmentation holds label 4 is skipped ("BraTS-PEDs 2024 labels"); one without
oedema cannot be told from the 2023 numbering and is read as it.
`--region` picks the mask (classic / 2023+ labels): wt (whole tumour, default: 1–4 / 1–3),
tc (core: 1, 3, 4 / 1, 3), et (enhancing: 3, 4 / 3).

`--mode slices` (default), label by `--task`:
  tumor      1 = axial slice with ≥ `--min-tumor-px` whole-tumour voxels, 0 = a brain slice
             without any labelled voxel (tumour or cavity; brain area ≥ 25% of the largest
             slice's); as many negatives as positives per subject, both evenly spaced
             through the volume.
  grade      tumour slices only; 1 = HGG, 0 = LGG (subjects without a grade are skipped).
  enhancing  tumour slices only; 1 = ≥ `--min-tumor-px` // 4 enhancing voxels in the slice.
  Up to `--slices-per-subject` tumour slices per subject (evenly spaced).
`--mode volumes`: one (C, D, H, W) volume per subject (`--depth` slices spanning the brain),
whole-tumour mask, label = grade (needs `--task grade`).

Splits are per patient (no patient in two splits), random with `--seed`, stratified by grade
when known. A subject is a patient, except in 2023+ names ``BraTS-<cohort>-<patient>-<time
point>``: BraTS 2024's post-treatment ``BraTS-GLI-00005-100`` and ``-101`` are one patient at
two time points, kept in one split (the cohort stays in the patient: GLI-00005 is not
MEN-00005). Skipped with a reason: a missing modality or segmentation, an unreadable NIfTI,
volumes whose shapes or voxel sizes differ, a subject without tumour slices. A subject
folder whose segmentation has another name (BraTS 2020's case 355:
``W39_1998.09.19_Segm.nii``) uses its one NIfTI named ``*_Segm.nii``, noted in the summary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from ...errors import DataError, not_one_of
from ..format import DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit, parse_list
from .util import (
    SkipItem,
    assign_splits,
    box_of_mask,
    check_voxels,
    crop_square,
    percentile_normalise,
    read_csv,
    require,
    resize,
    walk,
)

MODALITIES = ("t1", "t1ce", "t2", "flair")
ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
_FILE = re.compile(r"^(?P<subject>.+?)[_-](?P<mod>t1ce|t1n|t1c|t1|t2w|t2f|t2|flair|seg)"
                   r"\.nii(?:\.gz)?$", re.IGNORECASE)
# '<anything>_Segm.nii': a segmentation under a name that is not '<subject>_seg' (only this
# form, so that e.g. a model's 'seg_pred.nii.gz' is never taken for the ground truth)
_STRAY_SEG = re.compile(r"^.+[_-]segm\.nii(?:\.gz)?$", re.IGNORECASE)
REGIONS = {"wt": (1, 2, 3, 4), "tc": (1, 3, 4), "et": (3, 4)}
# 2023+ subject names: BraTS-<cohort>-<patient>-<time point> (GLI, MEN, MET, PED, SSA, MEN-RT)
_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+(?:-[A-Za-z]+)*-\d+)-\d+$", re.IGNORECASE)
# 2023+ releases (BraTS-GLI-…-t1c names): enhancing tumour is 3, and 4 is BraTS 2024's
# resection cavity, a post-surgical hole that the classic regions above took for enhancing
# tumour (a subject with a cavity and no tumour gave only "tumour" slices, masks on the hole)
REGIONS_2023 = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
RESECTION_CAVITY_2024 = 4


def label_scheme(files: dict[str, Path]) -> str:
    """'2023' when a subject's files carry the 2023+ modality names (t1n, t1c, t2w, t2f),
    else 'classic' (2018–2021: enhancing tumour = 4)."""
    for path in files.values():
        m = _FILE.match(path.name)
        if m and m.group("mod").lower() in ALIASES:
            return "2023"
    return "classic"


@dataclass
class BratsOptions(CommonOptions):
    size: int = 128
    task: str = "tumor"
    mode: str = "slices"
    modalities: str = "t1,t1ce,t2,flair"
    region: str = "wt"
    slices_per_subject: int = 8
    min_tumor_px: int = 100
    depth: int = 32
    val_frac: float = 0.15
    test_frac: float = 0.15

    def validate(self) -> None:
        super().validate()
        if self.task not in ("tumor", "grade", "enhancing"):
            raise DataError(not_one_of("--task", self.task, ("tumor", "grade", "enhancing")))
        if self.mode not in ("slices", "volumes"):
            raise DataError(not_one_of("--mode", self.mode, ("slices", "volumes")))
        if self.mode == "volumes" and self.task != "grade":
            raise DataError("--mode volumes needs --task grade (every BraTS volume has a "
                            "tumour, so tumour presence cannot label volumes)")
        mods = parse_list(self.modalities)
        bad = [m for m in mods if ALIASES.get(m, m) not in MODALITIES]
        if not mods or bad:
            raise DataError(f"--modalities '{self.modalities}': choose from "
                            f"{', '.join(MODALITIES)}")
        if self.region not in REGIONS:
            raise DataError(not_one_of("--region", self.region, REGIONS))
        if self.slices_per_subject < 1 or self.min_tumor_px < 1 or self.depth < 4:
            raise DataError("--slices-per-subject and --min-tumor-px must be >= 1, "
                            "--depth >= 4")

    def flag_use(self) -> list[tuple[str, bool, str]]:
        vol = self.mode == "volumes"
        return [("depth", vol, "with --mode volumes"),
                ("min_tumor_px", not vol, "with --mode slices"),
                ("slices_per_subject", not vol, "with --mode slices")]

    def mods(self) -> list[str]:
        return [ALIASES.get(m, m) for m in parse_list(self.modalities)]


def patient_of(subject: str) -> str:
    """The patient a subject belongs to: 'BraTS-GLI-00005' for BraTS 2024's time points
    'BraTS-GLI-00005-100' and '-101'; other names are a patient each. Split per subject, the
    two scans of one patient landed in train and test (4 of 6 two-scan patients)."""
    m = _TIMEPOINT.match(subject)
    return m.group("patient") if m else subject


def find_subjects(src: Path, max_depth: int = 4) -> dict[str, dict[str, Path]]:
    """subject id → {modality: path}, from file names anywhere under SRC. A subject folder
    without a '<subject>_seg' file but with one NIfTI named '*_Segm.nii' uses that one:
    BraTS 2020's case 355 ships its segmentation as 'W39_1998.09.19_Segm.nii'."""
    subjects: dict[str, dict[str, Path]] = {}
    stray: dict[Path, list[Path]] = {}  # folder → NIfTIs whose names are not BraTS names
    base = len(src.parts)
    for dirpath, dirnames, filenames in walk(src):
        if len(Path(dirpath).parts) - base >= max_depth:
            dirnames[:] = []
        for name in filenames:
            # a hidden '._BraTS20_…_t1.nii' (macOS AppleDouble) made a subject of its own
            m = _FILE.match(name) if not name.startswith(".") else None
            if m:
                mod = m.group("mod").lower()
                subjects.setdefault(m.group("subject"), {})[ALIASES.get(mod, mod)] = (
                    Path(dirpath) / name)
            elif _STRAY_SEG.match(name) and not name.startswith("."):
                stray.setdefault(Path(dirpath), []).append(Path(dirpath) / name)
    for subj, files in subjects.items():
        folder = next(iter(files.values())).parent
        cands = stray.get(folder, [])
        # only in the subject's own folder, and only when unambiguous
        if "seg" not in files and folder.name == subj and len(cands) == 1:
            files["seg"] = cands[0]
    return subjects


def find_grades(src: Path, subjects: dict[str, dict[str, Path]]) -> dict[str, str]:
    """HGG/LGG per subject from a CSV with a 'Grade' column (name_mapping.csv) or from
    HGG/ and LGG/ parent folders."""
    grades: dict[str, str] = {}
    for subj, files in subjects.items():
        for parent in next(iter(files.values())).parents:
            if parent.name.upper() in ("HGG", "LGG"):
                grades[subj] = parent.name.upper()
                break
    # as deep as subject folders are looked for: the Kaggle copy of BraTS 2020 keeps it in
    # <root>/BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/name_mapping.csv
    csvs = [p for pattern in ("*.csv", "*/*.csv", "*/*/*.csv", "*/*/*/*.csv")
            for p in sorted(src.glob(pattern))]
    for path in csvs:
        try:
            cols, rows = read_csv(path)
        except DataError:
            continue  # some other (unreadable) CSV: grades come from name_mapping.csv
        if not rows or "Grade" not in cols:
            continue
        for row in rows:
            g = (row.get("Grade") or "").strip().upper()
            if g not in ("HGG", "LGG"):
                continue
            for v in row.values():
                if v and v.strip() in subjects:
                    grades.setdefault(v.strip(), g)
    return grades


def load_volume(nib: ModuleType, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume in RAS orientation as float32 (x, y, z), and its voxel size in mm along
    x, y, z (the lengths of the reoriented affine's columns)."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors …
        raise SkipItem("unreadable NIfTI", f"{path.name}: {type(exc).__name__}: {exc}"
                       ) from None
    check_voxels(img.shape, path, "NIfTI")  # the header, before any voxel is read
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
        spacing = np.sqrt((np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors …
        raise SkipItem("unreadable NIfTI", f"{path.name}: {type(exc).__name__}: {exc}"
                       ) from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SkipItem("unexpected NIfTI shape", f"{path.name}: {data.shape}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:  # a NaN label would be cast to an arbitrary integer class in the mask
        raise SkipItem("NaN/inf voxels", f"{path.name}: {bad} voxel(s)")
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        spacing = np.ones(3)  # a degenerate affine: treat voxels as isotropic
    return data, spacing


def to_display(vol: np.ndarray) -> np.ndarray:
    """RAS (x, y, z) → (z, rows, cols): anterior at the top, patient left on the viewer's
    right (radiological convention: columns run along +x, towards the patient's left)."""
    return np.ascontiguousarray(np.rot90(vol, k=1, axes=(0, 1)).transpose(2, 0, 1))


class BratsImporter(Importer):
    kind = "brats"
    Options = BratsOptions
    layout = ("<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii.gz (or 2023's -t1n/-t1c/-t2w/-t2f/"
              "-seg) [+ name_mapping.csv or HGG/ LGG/ folders for grades]")

    def plan(self) -> list[Unit]:
        opts: BratsOptions = self.opts
        self.nib = require("nibabel", "BraTS")
        subjects = find_subjects(self.src)
        if not subjects:
            raise DataError(f"{self.src}: no BraTS NIfTI files (<subject>_t1.nii.gz …) found")
        grades = find_grades(self.src, subjects)
        need = [*opts.mods(), "seg"]
        ok = []
        for subj in sorted(subjects):
            files = subjects[subj]
            missing = [m for m in need if m not in files]
            if missing:
                reason = "missing segmentation" if missing == ["seg"] else "missing modality"
                self.skip(subj, reason, f"no {', '.join(missing)} file")
                continue
            if opts.task == "grade" and subj not in grades:
                self.skip(subj, "no grade", "not in a CSV with a Grade column nor under "
                                            "HGG/ or LGG/")
                continue
            if not _FILE.match(files["seg"].name):
                self.note("segmentation under another name used (e.g. BraTS 2020 case 355's "
                          "W39_1998.09.19_Segm.nii)")
            bad = self._unreadable_header([files[m] for m in need])
            if bad:
                self.skip(subj, "unreadable NIfTI", bad)
                continue
            ok.append(subj)
        patients = [patient_of(s) for s in ok]
        split_of = assign_splits(patients, opts.fractions(), opts.seed,
                                 strata=[grades.get(s, "") for s in ok])
        self.details = {"subjects": len(ok), "patients": len(set(patients)),
                        "grades": {g: sum(grades.get(s) == g for s in ok) for g in ("HGG", "LGG")}}
        units = [Unit(key=s, split=split_of[p], source=s,
                      payload=(s, subjects[s], grades.get(s))) for s, p in zip(ok, patients,
                                                                          strict=True)]
        return self.limit_units(units)

    def _unreadable_header(self, paths: list[Path]) -> str:
        """Headers are read while planning (cheap), so a corrupt file is skipped before the
        subjects are split; truncated voxel data is still caught when processing."""
        for p in paths:
            try:
                check_voxels(self.nib.load(str(p)).shape, p, "NIfTI")
            except SkipItem as exc:
                return exc.detail
            except Exception as exc:  # ImageFileError, gzip/zlib errors …
                return f"{p.name}: {type(exc).__name__}: {exc}"
        return ""

    def meta(self) -> DatasetMeta:
        opts: BratsOptions = self.opts
        classes = {"tumor": ["no_tumor", "tumor"], "grade": ["LGG", "HGG"],
                   "enhancing": ["non_enhancing", "enhancing"]}[opts.task]
        return DatasetMeta(
            name=f"brats-{opts.task}", classes=classes, attributes=[],
            ndim=3 if opts.mode == "volumes" else 2, channels=len(opts.mods()),
            info={"modalities": opts.mods(), "region": opts.region, "mode": opts.mode,
                  "split_rule": "patient-level random split (a 2023+ patient's time points "
                                "BraTS-GLI-00005-100, -101 together)",
                  "label_rule": {"tumor": f"slice with >= {opts.min_tumor_px} tumour voxels "
                                          "→ 1, tumour-free brain slice → 0",
                                 "grade": "HGG → 1, LGG → 0",
                                 "enhancing": f">= {opts.min_tumor_px // 4} enhancing voxels "
                                              "→ 1"}[opts.task],
                  "orientation": "RAS; axial slices, anterior up, patient left on the "
                                 "viewer's right (radiological)"})

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        opts: BratsOptions = self.opts
        subj, files, grade = unit.payload
        vols, seg, spacing = load_subject(self.nib, subj, files, opts.mods())
        seg = np.rint(seg).astype(np.int16)
        regions = REGIONS_2023 if label_scheme(files) == "2023" else REGIONS
        if subj.upper().startswith("BRATS-PED") and (seg == 4).any():
            # BraTS-PEDs 2024 numbers its labels 1 ET, 2 NET, 3 cystic component, 4 oedema:
            # read as the adult gliomas' labels, ET became 'core' and the cystic component
            # 'enhancing'. 2023's PED labels (1-3) follow the adult numbering.
            raise SkipItem("BraTS-PEDs 2024 labels", f"{subj}: label 4 (oedema in "
                           f"BraTS-PEDs 2024: 1 ET, 2 NET, 3 cyst, 4 oedema) is not the "
                           f"adult glioma numbering this importer reads")
        if regions is REGIONS_2023 and (seg == RESECTION_CAVITY_2024).any():
            self.note("label 4 read as resection cavity (BraTS 2024), not tumour")
        image, brain_d, sl = subject_image(subj, vols, seg, spacing)
        seg_d = to_display(seg)
        region = np.isin(seg_d, regions[opts.region])
        if opts.mode == "volumes":
            vol, mask = subject_volume(image, brain_d, sl, opts.depth, opts.size, region)
            yield Sample(id=subj, split=unit.split, label=int(grade == "HGG"),
                         image=vol[0] if vol.shape[0] == 1 else vol, mask=mask,
                         group=patient_of(subj))
            return
        whole = np.isin(seg_d, regions["wt"]).sum(axis=(1, 2))
        labelled = (seg_d > 0).sum(axis=(1, 2))  # tumour or (2024) resection cavity
        pos = [k for k in range(len(whole)) if whole[k] >= opts.min_tumor_px]
        if not pos:
            raise SkipItem("no tumour slice", f"{subj}: no slice with >= {opts.min_tumor_px} "
                                              f"tumour voxels")
        chosen = _evenly(pos, opts.slices_per_subject)
        picks = [(k, 1) for k in chosen]
        if opts.task == "tumor":
            area = brain_d.sum(axis=(1, 2))
            neg = [k for k in range(len(whole))
                   if labelled[k] == 0 and area[k] >= 0.25 * area.max()]
            if len(neg) < len(chosen):
                self.note("fewer tumour-free slices than tumour slices")
            picks += [(k, 0) for k in _evenly(neg, len(chosen))]
        et = np.isin(seg_d, regions["et"]).sum(axis=(1, 2))
        for k, positive in sorted(picks):
            if opts.task == "tumor":
                label = positive
            elif opts.task == "grade":
                label = int(grade == "HGG")
            else:
                label = int(et[k] >= max(opts.min_tumor_px // 4, 1))
            img = _crop_resize(image[:, k], sl, opts.size)
            mask = None
            if positive:
                m = _crop_resize(region[k][None].astype(np.float32), sl, opts.size)[0]
                mask = m >= 0.5 if (m >= 0.5).any() else None
            yield Sample(id=f"{subj}_z{k:03d}", split=unit.split, label=label,
                         image=img[0] if img.shape[0] == 1 else img, mask=mask,
                         box=box_of_mask(mask) if mask is not None else None,
                         group=patient_of(subj))


def load_subject(nib: ModuleType, subj: str, files: dict[str, Path], mods: list[str]
                 ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """A subject's modality volumes (``mods``, in order) and segmentation (None where
    ``files`` has no "seg"), reoriented to RAS, and their common voxel size; raises
    SkipItem when shapes or voxel sizes differ. `causalign predict` loads raw subject
    folders through this function too."""
    names = [*mods, "seg"] if "seg" in files else list(mods)
    loaded = [load_volume(nib, files[m]) for m in names]
    spacing = loaded[-1][1]
    shapes = {v.shape for v, _ in loaded}
    if len(shapes) != 1:
        raise SkipItem("volume shapes differ", f"{subj}: {sorted(shapes)}")
    if any(not np.allclose(sp, spacing, rtol=1e-3, atol=1e-4) for _, sp in loaded):
        raise SkipItem("voxel sizes differ", f"{subj}: " + ", ".join(
            sorted({"×".join(f"{v:.3g}" for v in sp) for _, sp in loaded})) + " mm")
    seg = loaded[-1][0] if "seg" in files else None
    return [v for v, _ in loaded[:len(mods)]], seg, spacing


def subject_image(subj: str, vols: list[np.ndarray], seg: np.ndarray | None,
                  spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                tuple[float, float, int, int]]:
    """The import's intensity and geometry rules for one subject: (C, z, rows, cols) image
    (each modality scaled by its 0.5/99.5 percentiles inside the brain, 0 outside), the brain
    in display orientation, and the brain's bounding box, square in mm (centre x, centre y,
    width, height in voxels). The brain is every voxel > 0 in a modality or labelled in
    ``seg`` (without a segmentation: in a modality only)."""
    brain = np.zeros(vols[0].shape, bool)
    for v in vols:
        brain |= v > 0
    if seg is not None:
        brain |= seg > 0
    if not brain.any():
        raise SkipItem("empty volume", subj)
    chans = [np.where(brain, percentile_normalise(v, brain), 0.0) for v in vols]
    image = np.stack([to_display(c) for c in chans])  # (C, z, rows, cols)
    brain_d = to_display(brain)
    # brain bounding square (over all slices), square in mm: displayed columns run along
    # RAS x, rows along y, so an anisotropic in-plane grid (sx ≠ sy) is cropped as a
    # rectangle of voxels and the resize makes the pixels square (it was cropped square in
    # voxels: a 2×1 mm grid came out squashed to half its width).
    x0, y0, x1, y1 = box_of_mask(brain_d.any(axis=0))
    sx, sy = float(spacing[0]), float(spacing[1])
    side = max(x1 - x0, y1 - y0)
    w = h = side
    if not np.isclose(sx, sy, rtol=1e-3):
        side_mm = max((x1 - x0) * sx, (y1 - y0) * sy)
        w, h = max(1, round(side_mm / sx)), max(1, round(side_mm / sy))
    return image, brain_d, ((x0 + x1) / 2, (y0 + y1) / 2, w, h)


def subject_volume(image: np.ndarray, brain: np.ndarray, sl: tuple[float, float, int, int],
                   depth: int, size: int, region: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """`--mode volumes`: the (C, depth, size, size) volume (``depth`` axial positions spanning
    the brain, linearly interpolated, each cropped to ``sl`` and resized) and ``region``'s
    mask alike (None when absent or empty)."""
    zs = np.nonzero(brain.any(axis=(1, 2)))[0]
    pos = np.linspace(zs.min(), zs.max(), depth)
    vol = np.stack([_crop_resize(_interp_z(image, p), sl, size) for p in pos],
                   axis=1)  # (C, D, H, W)
    if region is None:
        return vol, None
    mask = np.stack([_crop_resize(_interp_z(region[None].astype(np.float32), p), sl,
                                  size)[0] >= 0.5 for p in pos])
    return vol, mask if mask.any() else None


def _crop_resize(chw: np.ndarray, sl: tuple[float, float, int, int], size: int) -> np.ndarray:
    """Crop the box (centre x, centre y, width, height; a square in mm) from (C, H, W),
    padded with 0 outside, and resize to size×size."""
    cx, cy, w, h = sl
    if w == h:
        return resize(crop_square(chw, cx, cy, w), (size, size))
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    out = np.zeros((*chw.shape[:-2], h, w), dtype=chw.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + w, chw.shape[-1]), min(y0 + h, chw.shape[-2])
    if sx1 > sx0 and sy1 > sy0:
        out[..., sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = chw[..., sy0:sy1, sx0:sx1]
    return resize(out, (size, size))


def _interp_z(vol: np.ndarray, p: float) -> np.ndarray:
    """Linear interpolation between axial slices of (C, Z, H, W) at position p."""
    lo = int(np.floor(p))
    hi = min(lo + 1, vol.shape[1] - 1)
    t = p - lo
    return (1 - t) * vol[:, lo] + t * vol[:, hi]


def _evenly(items: list[int], n: int) -> list[int]:
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]
