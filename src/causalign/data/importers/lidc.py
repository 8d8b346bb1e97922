"""LIDC-IDRI lung nodules (Armato et al. 2011; paper 000 §5.1, paper 002 §4.3 / App. F).

**DICOM + XML (the TCIA download).** SRC holds the CT series and the readers' XML files
anywhere below it, e.g.::

    LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/1-001.dcm … 069.xml

Each XML (``LidcReadMessage``, namespace ``http://www.nih.gov``) names its series in
``ResponseHeader/SeriesInstanceUid`` and holds up to four ``readingSession``s (one per
radiologist). Every ``unblindedReadNodule`` has ``characteristics`` (subtlety,
internalStructure, calcification, sphericity, margin, lobulation, spiculation, texture,
malignancy; absent for nodules < 3 mm) and ``roi``s: one per slice, with ``imageZposition``,
``imageSOP_UID``, ``inclusion`` (FALSE = a hole) and the outline as ``edgeMap``
``xCoord``/``yCoord`` pixel points (one point for nodules < 3 mm). The XML is parsed directly
(xml.etree); pylidc is not needed. DICOM slices are matched to the series by
SeriesInstanceUID, ordered by ImagePositionPatient z, and converted to Hounsfield units with
RescaleSlope/RescaleIntercept; PixelSpacing gives the pixel size in mm.

*Clustering.* The readers annotate independently, so their marks of one nodule are grouped:
annotations (centroid of their outline points, in mm) are linked closest pair first when
their distance is ≤ max(`--cluster-mm` (5), half the larger equivalent diameter), and two
groups merge only if no reader appears twice — a nodule has at most one mark per reader.

*Patch.* For each nodule, the slice where the combined mask is largest is cut into a
`--size` px patch at `--spacing` mm per pixel (bilinear resampling of the slice, centred on
the combined mask's centroid, air (−1000 HU) outside the scan) and windowed by `--window`
(default −1000…400 HU → 0…1).

*Mask.* Each reader's mask is the union of their inclusion outlines on that slice minus their
exclusion outlines. `--mask-rule consensus`: pixels marked by ≥ 50% of the nodule's readers;
``union``: by any reader (paper 002); ``auto`` (default): consensus for ``--label
malignancy``, union for ``--label presence``. Nodules marked only by points have no mask.
The box columns hold the mask's bounding box.

*Label* (`--label`):
  malignancy (default, paper 000): the median of the readers' malignancy scores (1–5);
             ≤ 3 → 0 (benign), > 3 → 1 (malignant). So 1–3 → 0 and 4–5 → 1, and when
             readers disagree the median decides (e.g. 3, 3, 4, 5 → 3.5 → malignant).
             Nodules without any malignancy score (< 3 mm) are skipped;
             `--drop-uncertain` also skips those whose median is exactly 3.
  presence   (paper 002): 1 when ≥ 3 readers marked the nodule, else 0.
`--min-readers` skips nodules marked by fewer readers.

*Attributes* — the median over readers of each score, then binarised (1 = the suspicious or
salient state, as in the synthetic benchmark; NaN when no reader scored it):
  subtlety       1–5 (5 obvious)             → 1 if median ≥ 4 (obvious)
  calcification  1–6 (6 absent)              → 1 if median < 6 (calcified)
  margin         1–5 (1 poorly defined)      → 1 if median ≤ 3 (poorly defined)
  spiculation    1–5 (1 none, 5 marked)      → 1 if median ≥ 3
  lobulation     1–5 (1 none, 5 marked)      → 1 if median ≥ 3
  texture        1–5 (1 ground glass, 5 solid) → 1 if median ≥ 4 (solid)

*Splits* are patient-level (no patient in two splits; the patient is the DICOM PatientID, or
where that is empty the <patient> folder of <patient>/<study>/<series>), random with `--seed`,
`--val-frac`/`--test-frac` (default 0.2 each, ≈ paper 000's 731/238/244).

**Pre-cropped patches** (`--patches-csv FILE`, paths relative to SRC): columns ``image``
(PNG/JPEG, or NPY: integer arrays and floats outside [0, 1] are HU and windowed),
``patient_id``; optional ``mask`` (one path, or one per reader separated by ';', combined by
`--mask-rule`), ``label`` (0/1 as given) or ``malignancy`` (score or ';'-separated reader
scores → median → rule above) or ``readers`` (count → presence rule), the six attribute
columns (score or ';'-separated reader scores → median → thresholds above), ``split`` (empty:
the split given on the patient's other rows, else drawn by patient; a patient the column
itself puts in two splits is noted in the summary).
Patches are resized to `--size` (their pixel spacing is unknown, so not resampled).

Skipped with a reason: unreadable XML/DICOM files, XML without a CT series on disk, nodules
whose annotated slice is missing or unreadable, nodules without malignancy score
(malignancy label), CSV rows pointing to missing files.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import DataError, not_one_of
from ..format import SPLITS, DatasetMeta
from .base import CommonOptions, Importer, Sample, Skipped, Unit, parse_list
from .dicom import dicom_files, is_dicom_name, pydicom_module, read_header, read_pixels
from .util import (
    IntensityScale,
    SkipItem,
    UsedIds,
    assign_splits,
    box_of_mask,
    median,
    polygon_mask,
    read_csv,
    read_image,
    read_mask,
    rel,
    resize,
    resize_mask,
    safe_id,
    scan_intensity,
    unique_id,
    walk,
    window,
)

ATTRIBUTES = ("subtlety", "calcification", "margin", "spiculation", "lobulation", "texture")
CHARACTERISTICS = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
                   "lobulation", "spiculation", "texture", "malignancy")
# attribute → (rule text, function of the median score)
THRESHOLDS = {
    "subtlety": ("median >= 4 (obvious)", lambda v: v >= 4),
    "calcification": ("median < 6 (calcified)", lambda v: v < 6),
    "margin": ("median <= 3 (poorly defined)", lambda v: v <= 3),
    "spiculation": ("median >= 3", lambda v: v >= 3),
    "lobulation": ("median >= 3", lambda v: v >= 3),
    "texture": ("median >= 4 (solid)", lambda v: v >= 4),
}
PRESENCE_READERS = 3


def binarise(name: str, score: float) -> float:
    """Binary attribute from a (median) LIDC score; NaN stays NaN."""
    return math.nan if math.isnan(score) else float(THRESHOLDS[name][1](score))


def malignancy_label(score: float) -> int:
    """Paper 000: malignancy 1–3 → 0, 4–5 → 1; a median between (3.5) → 1."""
    return int(score > 3)


@dataclass
class LidcOptions(CommonOptions):
    size: int = 64
    label: str = "malignancy"
    mask_rule: str = "auto"
    window: str = "-1000,400"
    spacing: float = 1.0
    cluster_mm: float = 5.0
    min_readers: int = 1
    drop_uncertain: bool = False
    patches_csv: str | None = None
    val_frac: float = 0.2
    test_frac: float = 0.2

    def validate(self) -> None:
        super().validate()
        if self.label not in ("malignancy", "presence"):
            raise DataError(not_one_of("--label", self.label, ("malignancy", "presence")))
        if self.mask_rule not in ("auto", "consensus", "union"):
            raise DataError(not_one_of("--mask-rule", self.mask_rule,
                                       ("auto", "consensus", "union")))
        self.window_range()
        if not 0.05 <= self.spacing <= 10:
            raise DataError(f"--spacing must be in [0.05, 10] mm, got {self.spacing}")
        if self.cluster_mm <= 0:
            raise DataError(f"--cluster-mm must be > 0, got {self.cluster_mm}")
        if not 1 <= self.min_readers <= 4:
            raise DataError(f"--min-readers must be in 1..4, got {self.min_readers}")
        if self.drop_uncertain and self.label != "malignancy":
            raise DataError("--drop-uncertain applies to --label malignancy only")

    def flag_use(self) -> list[tuple[str, bool, str]]:
        # pre-cropped patches: no CT series to resample, no reader marks to cluster or count
        return [(k, not self.patches_csv, "with the XML/DICOM layout (not with --patches-csv)")
                for k in ("spacing", "cluster_mm", "min_readers")]

    def window_range(self) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in self.window.split(","))
        except ValueError:
            raise DataError(f"--window must be 'LOW,HIGH' in HU, got '{self.window}'") from None
        if hi <= lo:
            raise DataError(f"--window {self.window}: HIGH must exceed LOW")
        return lo, hi

    def rule(self) -> str:
        if self.mask_rule != "auto":
            return self.mask_rule
        return "union" if self.label == "presence" else "consensus"


# ----------------------------------------------------------------------------- XML


@dataclass
class Roi:
    z: float
    sop: str
    inclusion: bool
    xs: list[float]
    ys: list[float]


@dataclass
class Annotation:
    reader: int
    nodule_id: str
    characteristics: dict[str, float]
    rois: list[Roi]
    centroid_px: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x, y (pixels), z (mm)
    diameter_px: float = 0.0

    def __post_init__(self) -> None:
        inc = [r for r in self.rois if r.inclusion] or self.rois
        xs = [x for r in inc for x in r.xs]
        ys = [y for r in inc for y in r.ys]
        zs = [r.z for r in inc for _ in r.xs]
        self.centroid_px = (float(np.mean(xs)), float(np.mean(ys)), float(np.mean(zs)))
        areas = [_polygon_area(r.xs, r.ys) for r in inc]
        self.diameter_px = max(math.sqrt(4 * a / math.pi) for a in areas) if areas else 0.0


@dataclass
class ReadMessage:
    series_uid: str
    n_sessions: int
    annotations: list[Annotation] = field(default_factory=list)


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return 0.0
    x, y = np.asarray(xs), np.asarray(ys)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _text(el: ET.Element | None, tag: str) -> str:
    child = el.find(tag) if el is not None else None
    return (child.text or "").strip() if child is not None else ""


def parse_lidc_xml(path: Path) -> ReadMessage:
    """Parse one LIDC-IDRI annotation XML (namespaces ignored)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise SkipItem("unreadable XML", f"{path.name}: {exc}") from None
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    if root.tag != "LidcReadMessage":
        raise SkipItem("not a CT annotation file", f"{path.name}: root <{root.tag}>")
    series = _text(root.find("ResponseHeader"), "SeriesInstanceUid")
    if not series:
        raise SkipItem("unreadable XML", f"{path.name}: no ResponseHeader/SeriesInstanceUid")
    sessions = root.findall("readingSession")
    msg = ReadMessage(series_uid=series, n_sessions=len(sessions))
    for reader, session in enumerate(sessions):
        for nod in session.findall("unblindedReadNodule"):
            chars = {}
            ch = nod.find("characteristics")
            for name in CHARACTERISTICS:
                t = _text(ch, name)
                try:
                    v = float(t) if t else math.nan
                except ValueError:
                    v = math.nan
                chars[name] = v if math.isfinite(v) else math.nan  # 'inf' is no score
            rois = []
            for roi in nod.findall("roi"):
                try:
                    z = float(_text(roi, "imageZposition"))
                    xs = [float(_text(e, "xCoord")) for e in roi.findall("edgeMap")]
                    ys = [float(_text(e, "yCoord")) for e in roi.findall("edgeMap")]
                except ValueError:
                    continue
                # a 'nan' outline would make a NaN centroid that clusters with nothing, so
                # the reader's mark would become a nodule of its own
                if not all(math.isfinite(v) for v in (z, *xs, *ys)):
                    continue
                if xs:
                    rois.append(Roi(z=z, sop=_text(roi, "imageSOP_UID"),
                                    inclusion=_text(roi, "inclusion").upper() != "FALSE",
                                    xs=xs, ys=ys))
            if rois:
                msg.annotations.append(Annotation(reader=reader, nodule_id=_text(nod, "noduleID"),
                                                  characteristics=chars, rois=rois))
    return msg


def cluster_annotations(anns: list[Annotation], spacing_rc: tuple[float, float],
                        tol_mm: float) -> list[list[int]]:
    """Group the readers' annotations of the same nodule (rule in the module docstring).
    Returns lists of annotation indices, ordered by nodule position (z, y, x)."""
    n = len(anns)
    sr, sc = spacing_rc
    pts = np.array([[a.centroid_px[0] * sc, a.centroid_px[1] * sr, a.centroid_px[2]]
                    for a in anns]).reshape(n, 3)
    diam = np.array([a.diameter_px * max(sr, sc) for a in anns])
    edges = []
    for i in range(n):
        for j in range(i + 1, n):
            if anns[i].reader == anns[j].reader:
                continue
            d = float(np.linalg.norm(pts[i] - pts[j]))
            if d <= max(tol_mm, 0.5 * max(diam[i], diam[j])):
                edges.append((d, i, j))
    parent = list(range(n))
    readers = [{a.reader} for a in anns]

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for _, i, j in sorted(edges):
        a, b = find(i), find(j)
        if a != b and not readers[a] & readers[b]:
            parent[b] = a
            readers[a] |= readers[b]
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    clusters = list(groups.values())
    clusters.sort(key=lambda c: tuple(np.round(pts[c].mean(axis=0)[::-1], 3)))
    return clusters


# ----------------------------------------------------------------------------- DICOM index


@dataclass
class Series:
    uid: str
    patient: str
    spacing: tuple[float, float]  # row, column spacing (mm)
    thickness: float
    slices: list[tuple[float, str, Path]]  # (z, SOPInstanceUID, path), sorted by z


@dataclass
class _Nodule:
    index: int
    ann: list[int]
    label: int
    attributes: list[float]
    readers: int


def _majority(labels: list[int]) -> int:
    """The most frequent label (the smallest on a tie): a series' stratum for the split."""
    return max(sorted(set(labels)), key=labels.count)


class LidcImporter(Importer):
    kind = "lidc"
    Options = LidcOptions
    layout = ("LIDC-IDRI/<patient>/<study>/<series>/*.dcm + the readers' *.xml, or "
              "--patches-csv FILE")

    def meta(self) -> DatasetMeta:
        opts: LidcOptions = self.opts
        classes = (["benign", "malignant"] if opts.label == "malignancy"
                   else ["absent", "present"])
        lo, hi = opts.window_range()
        return DatasetMeta(
            name=f"lidc-{opts.label}", classes=classes, attributes=list(ATTRIBUTES), ndim=2,
            channels=1,
            info={"label_rule": ("median reader malignancy: 1-3 → 0, > 3 → 1" if
                                 opts.label == "malignancy" else
                                 f">= {PRESENCE_READERS} readers marked the nodule → 1"),
                  "attribute_rules": {a: THRESHOLDS[a][0] for a in ATTRIBUTES},
                  "mask_rule": opts.rule(), "window_hu": [lo, hi],
                  "spacing_mm": opts.spacing if not opts.patches_csv else None,
                  "split_rule": "patient-level random split"})

    def plan(self) -> list[Unit]:
        if self.opts.patches_csv:
            return self._plan_patches()
        return self._plan_dicom()

    # ------------------------------------------------------------------ DICOM + XML
    def _plan_dicom(self) -> list[Unit]:
        opts: LidcOptions = self.opts
        # not hidden files: macOS copies leave a '._069.xml' (AppleDouble) beside each XML
        xmls = sorted(d / f for d, _, files in walk(self.src) for f in files
                      if f.lower().endswith(".xml") and not f.startswith(".")
                      and (d / f).is_file())
        if not xmls:
            csvs = sorted(self.src.glob("*.csv"))
            hint = f" (found {csvs[0].name}: use --patches-csv)" if csvs else ""
            raise DataError(f"{self.src}: no LIDC-IDRI annotation XML files found{hint}")
        self.pydicom = pydicom_module("LIDC-IDRI")
        self._index: dict[str, Series] = {}
        self._scanned: set[Path] = set()  # folders already indexed
        self._seen_files: set[Path] = set()
        reads: list[tuple[Path, ReadMessage]] = []
        series_seen: dict[str, Path] = {}
        task = self.task("reading LIDC annotations", len(xmls))
        for path in xmls:
            self.advance(task)
            try:
                msg = parse_lidc_xml(path)
            except SkipItem as exc:
                self.skip(rel(path, self.src), exc.reason, exc.detail)
                continue
            if msg.series_uid in series_seen:
                self.skip(rel(path, self.src), "duplicate XML for a series",
                          f"series already read from {rel(series_seen[msg.series_uid], self.src)}")
                continue
            series_seen[msg.series_uid] = path
            self._scan(path.parent)
            if msg.series_uid not in self._index:
                self._scan(self.src)
            if msg.series_uid not in self._index:
                self.skip(rel(path, self.src), "no CT series for XML",
                          f"no DICOM with SeriesInstanceUID {msg.series_uid}")
                continue
            reads.append((path, msg))
        plans = []
        for path, msg in reads:
            series = self._index[msg.series_uid]
            clusters = cluster_annotations(msg.annotations, series.spacing, opts.cluster_mm)
            nodules = []
            for k, cl in enumerate(clusters):
                where = f"{series.patient} nodule {k} ({rel(path, self.src)})"
                nod = self._label_nodule(msg, cl, k, where)
                if nod is not None:
                    nodules.append(nod)
            if nodules:
                plans.append((series, msg, nodules, path))
        patients = [s.patient for s, _, nods, _ in plans]
        # stratified by the series' majority nodule label (a patient's first series decides
        # its stratum): unstratified, a small import could leave val or test one class
        split_of = assign_splits(patients, opts.fractions(), opts.seed,
                                 weights=[len(n) for _, _, n, _ in plans],
                                 strata=[_majority([x.label for x in n]) for _, _, n, _ in plans])
        self.details = {"series": len(plans),
                        "nodules": sum(len(n) for _, _, n, _ in plans),
                        "patients": {s: sorted({p for p in patients if split_of[p] == s})
                                     for s in SPLITS}}
        units = [Unit(key=s.uid, split=split_of[s.patient], source=rel(path, self.src),
                      payload=(s, msg, nods)) for s, msg, nods, path in plans]
        return self.limit_units(units)

    def _scan(self, folder: Path) -> None:
        """Index the DICOM headers under `folder` by SeriesInstanceUID (once per file)."""
        if folder in self._scanned:
            return
        self._scanned.add(folder)
        tags = ["SeriesInstanceUID", "PatientID", "SOPInstanceUID", "ImagePositionPatient",
                "PixelSpacing", "SliceThickness", "SliceLocation"]
        files = dicom_files(folder) if folder != self.src else _all_dicoms(self.src)
        files = [f for f in files if f not in self._seen_files]
        # the whole-tree scan (XMLs kept apart from the CT, e.g. tcia-lidc-xml/) reads every
        # header of the download (~244k) under one step of the per-XML bar: a bar of its own
        task = self.task("indexing DICOM headers", len(files)) if folder == self.src else None
        for f in files:
            self.advance(task)
            self._seen_files.add(f)
            try:
                ds = read_header(self.pydicom, f, tags)
                uid = str(ds.SeriesInstanceUID)
                if "ImagePositionPatient" in ds:
                    z = float(ds.ImagePositionPatient[2])
                else:
                    z = float(ds.SliceLocation)
                sop = str(ds.SOPInstanceUID)
                sp = tuple(float(v) for v in ds.PixelSpacing)
                # patches are resampled in mm: a zero spacing divides by zero (a garbage
                # patch), a negative one mirrors the patch
                if len(sp) != 2 or not all(math.isfinite(v) and v > 0 for v in sp) \
                        or not math.isfinite(z):
                    raise ValueError(f"PixelSpacing {list(sp)} / z {z} not positive finite")
            except SkipItem as exc:
                self.skip(rel(f, self.src), exc.reason, exc.detail)
                continue
            except (AttributeError, KeyError, ValueError, TypeError, IndexError) as exc:
                self.skip(rel(f, self.src), "DICOM header incomplete",
                          f"{f.name}: {type(exc).__name__}: {exc}")
                continue
            s = self._index.get(uid)
            if s is None:
                thick = float(ds.get("SliceThickness", 0) or 0)
                patient = str(ds.get("PatientID", "") or "").strip()
                if not patient:
                    patient = self._patient_folder(f)
                    self.note("CT series without PatientID: patient taken from its folder "
                              "(<patient>/<study>/<series>)")
                s = self._index[uid] = Series(uid=uid, patient=patient,
                                              spacing=(sp[0], sp[1]), thickness=thick,
                                              slices=[])
            s.slices.append((z, sop, f))
            s.slices.sort()

    def _patient_folder(self, f: Path) -> str:
        """The patient folder of LIDC-IDRI/<patient>/<study>/<series>/<file> (the top folder
        below SRC when the tree is shallower). The series folder, used before, made each of
        a patient's studies a patient of its own (drawn into different splits) and one
        patient of every 'series1' folder."""
        try:
            parts = f.relative_to(self.src).parts
        except ValueError:
            return f.parent.name
        if len(parts) >= 4:
            return parts[-4]
        return parts[0] if len(parts) > 1 else self.src.name

    def _label_nodule(self, msg: ReadMessage, cl: list[int], k: int, where: str
                      ) -> _Nodule | None:
        opts: LidcOptions = self.opts
        anns = [msg.annotations[i] for i in cl]
        n_readers = len({a.reader for a in anns})
        if n_readers < opts.min_readers:
            self.skip(where, "fewer readers than --min-readers", f"{n_readers} reader(s)")
            return None
        scores = {name: median([a.characteristics.get(name, math.nan) for a in anns])
                  for name in CHARACTERISTICS}
        attrs = [binarise(a, scores[a]) for a in ATTRIBUTES]
        if opts.label == "presence":
            label = int(n_readers >= PRESENCE_READERS)
        else:
            mal = scores["malignancy"]
            if math.isnan(mal):
                self.skip(where, "no malignancy score (nodule < 3 mm)")
                return None
            if opts.drop_uncertain and mal == 3:
                self.skip(where, "median malignancy 3 (--drop-uncertain)")
                return None
            label = malignancy_label(mal)
        return _Nodule(index=k, ann=cl, label=label, attributes=attrs, readers=n_readers)

    def process(self, unit: Unit) -> Iterator[Sample | Skipped]:
        if self.opts.patches_csv:
            yield from self._process_patch(unit)
            return
        series, msg, nodules = unit.payload
        slices = _Slices(self.pydicom, series)
        for nod in nodules:
            sid = safe_id(f"{series.patient}_{series.uid[-6:]}_n{nod.index:02d}")
            try:
                yield self._nodule_sample(sid, unit.split, series, msg, nod, slices)
            except SkipItem as exc:
                yield Skipped(f"{series.patient} nodule {nod.index} ({unit.source})",
                              exc.reason, exc.detail)
        for path in sorted(slices.failed):
            exc = slices.failed[path]
            yield Skipped(rel(path, self.src), exc.reason, exc.detail)

    def _slice_of(self, roi: Roi, series: Series, z_of: dict[str, float]) -> str | None:
        if roi.sop in z_of:
            return roi.sop
        tol = max(series.thickness / 2, 0.5)
        best = min(z_of, key=lambda s: abs(z_of[s] - roi.z), default=None)
        return best if best is not None and abs(z_of[best] - roi.z) <= tol else None

    def _nodule_sample(self, sid: str, split: str, series: Series, msg: ReadMessage,
                       nod: _Nodule, slices: _Slices) -> Sample:
        opts: LidcOptions = self.opts
        z_of = slices.z_of
        anns = [msg.annotations[i] for i in nod.ann]
        # per slice, per reader: inclusion/exclusion outlines with ≥ 3 points
        outlines: dict[str, dict[int, list[Roi]]] = {}
        missing = 0
        for a in anns:
            for roi in a.rois:
                if len(roi.xs) < 3:
                    continue
                s = self._slice_of(roi, series, z_of)
                if s is None or slices.get(s) is None:
                    missing += 1
                    continue
                outlines.setdefault(s, {}).setdefault(a.reader, []).append(roi)
        need = (len(anns) + 1) // 2 if opts.rule() == "consensus" else 1
        zc = float(np.mean([a.centroid_px[2] for a in anns]))
        best, best_key, best_mask = None, None, None
        for s, by_reader in outlines.items():
            shape = slices.get(s).shape
            count = np.zeros(shape, np.int16)
            for rois in by_reader.values():
                m = np.zeros(shape, bool)
                for r in rois:
                    if r.inclusion:
                        m |= polygon_mask(shape, r.xs, r.ys)
                for r in rois:
                    if not r.inclusion:
                        m &= ~polygon_mask(shape, r.xs, r.ys)
                count += m
            mask = count >= need
            key = (int(mask.sum()), -abs(z_of[s] - zc))
            if best_key is None or key > best_key:
                best, best_key, best_mask = s, key, mask
        if best is None:  # points only (nodule < 3 mm), or every outlined slice missing
            if any(len(r.xs) >= 3 for a in anns for r in a.rois):
                raise SkipItem("annotated slice missing", "no readable slice with an outline")
            best = min(z_of, key=lambda s: abs(z_of[s] - zc))
            if abs(z_of[best] - zc) > max(series.thickness / 2, 0.5) + 1e-6 or \
                    slices.get(best) is None:
                raise SkipItem("annotated slice missing", f"no readable slice at z = {zc:.1f} mm")
            best_mask = None
        if best_mask is not None and best_mask.any():
            ys, xs = np.nonzero(best_mask)
            cx, cy = float(xs.mean()), float(ys.mean())
        else:
            if best_mask is not None:
                self.note("empty consensus mask stored as no mask")
            best_mask = None
            cx = float(np.mean([a.centroid_px[0] for a in anns]))
            cy = float(np.mean([a.centroid_px[1] for a in anns]))
        if missing:
            self.note("nodule outline on a missing/unreadable slice (other slices used)")
        lo, hi = opts.window_range()
        patch_hu = _resample(slices.get(best), cx, cy, series.spacing, opts.spacing, opts.size,
                             order=1, cval=-1000.0)
        mask = None
        if best_mask is not None:
            m = _resample(best_mask.astype(np.float32), cx, cy, series.spacing, opts.spacing,
                          opts.size, order=1, cval=0.0) >= 0.5
            if not m.any():
                m[opts.size // 2, opts.size // 2] = True
                self.note("mask smaller than one output pixel kept as its centre")
            mask = m
        return Sample(id=sid, split=split, label=nod.label, image=window(patch_hu, lo, hi),
                      mask=mask, box=box_of_mask(mask) if mask is not None else None,
                      attributes=nod.attributes, group=series.patient)

    # ------------------------------------------------------------------ patches CSV
    def _plan_patches(self) -> list[Unit]:
        opts: LidcOptions = self.opts
        p = Path(opts.patches_csv)
        path = p if p.is_absolute() else self.src / p
        if not path.exists() and p.exists():
            path = p
        if not path.exists():
            raise DataError(f"{opts.patches_csv}: patches CSV not found (looked in {self.src})")
        cols, rows = read_csv(path)
        pid_col = next((c for c in ("patient_id", "patient", "case") if c in cols), None)
        if "image" not in cols or pid_col is None:
            raise DataError(f"{path}: needs columns 'image' and 'patient_id' "
                            f"(has: {', '.join(cols)})")
        if opts.label == "presence":
            label_cols = [c for c in ("label", "readers", "num_readers") if c in cols]
        else:
            label_cols = [c for c in ("label", "malignancy") if c in cols]
        if not label_cols:
            need = "label or readers" if opts.label == "presence" else "label or malignancy"
            raise DataError(f"{path}: no label column for --label {opts.label} (need {need})")
        items = []
        for lineno, row in enumerate(rows, start=2):
            where = f"{path.name}:{lineno}"
            try:
                label = self._csv_label(row, label_cols[0])
                attrs = [binarise(a, median(_scores(row.get(a, "")))) for a in ATTRIBUTES]
            except ValueError as exc:
                self.skip(where, "bad value in CSV", str(exc))
                continue
            if label is None:
                continue  # reason recorded by _csv_label
            split = row.get("split", "")
            if split and split not in SPLITS:
                self.skip(where, "bad split value", f"'{split}'")
                continue
            image = self.src / row["image"]
            if not image.is_file():  # before the split: it would take a patient's place
                self.skip(f"{where} ({rel(image, self.src)})", "missing file", str(image))
                continue
            masks = [self.src / m for m in parse_list(row.get("mask", "").replace(";", ","))]
            items.append({"row": where, "image": image, "masks": masks,
                          "patient": row[pid_col], "label": label, "attributes": attrs,
                          "split": split,
                          "id": safe_id(str(Path(row["image"]).with_suffix("")))})
        # a patient with a split cell filled on some rows only: their other rows follow it
        # (drawn apart, one patient's patches sat in test and in train)
        given: dict[str, list[str]] = {}
        for it in items:
            if it["split"] and it["split"] not in given.setdefault(it["patient"], []):
                given[it["patient"]].append(it["split"])
        for it in items:
            if not it["split"] and it["patient"] in given:
                it["split"] = given[it["patient"]][0]
        mixed = sorted(p for p, splits in given.items() if len(splits) > 1)
        if mixed:  # the CSV's own split column puts a patient in two splits: say so
            self.note("patient(s) in more than one split by the CSV's split column (e.g. "
                      f"{mixed[0]}: {', '.join(given[mixed[0]])})", len(mixed))
        free = [it for it in items if not it["split"]]
        split_of = assign_splits([it["patient"] for it in free], opts.fractions(), opts.seed,
                                 strata=[it["label"] for it in free])
        used = UsedIds()
        units = []
        for it in items:
            it["id"] = unique_id(it["id"], used)
            units.append(Unit(key=it["row"], split=it["split"] or split_of[it["patient"]],
                              source=f"{it['row']} ({rel(it['image'], self.src)})", payload=it))
        units = self.limit_units(units)
        # image-file patches (not NPY, which follow the HU rule of _read_patch): one
        # intensity rule for the import, e.g. 16-bit PNGs by the import's bit depth
        self.scale = scan_intensity(u.payload["image"] for u in units
                                    if u.payload["image"].suffix.lower() != ".npy")
        return units

    def _csv_label(self, row: dict, col: str) -> int | None:
        opts: LidcOptions = self.opts
        cell = row.get(col, "")
        if col == "label":
            if cell not in ("0", "1"):
                raise ValueError(f"label '{cell}' is not 0 or 1")
            return int(cell)
        if col in ("readers", "num_readers"):
            n = float(cell)
            if not math.isfinite(n) or n < 0:  # int(inf) raises OverflowError
                raise ValueError(f"{col} '{cell}' is not a reader count")
            return int(n >= PRESENCE_READERS)
        mal = median(_scores(cell))
        if math.isnan(mal):
            raise ValueError(f"malignancy '{cell}' has no score")
        if opts.drop_uncertain and mal == 3:
            self.skip(row.get("image", "?"), "median malignancy 3 (--drop-uncertain)")
            return None
        return malignancy_label(mal)

    def _process_patch(self, unit: Unit) -> Iterator[Sample | Skipped]:
        opts: LidcOptions = self.opts
        it = unit.payload
        img = _read_patch(it["image"], opts.window_range(), self.scale)
        mask = None
        if it["masks"]:
            ms = [read_mask(m) for m in it["masks"]]
            for m, mp in zip(ms, it["masks"], strict=True):
                if m.shape != img.shape:
                    raise SkipItem("mask shape mismatch",
                                   f"{rel(mp, self.src)} is {m.shape}, image is {img.shape}")
            need = (len(ms) + 1) // 2 if opts.rule() == "consensus" else 1
            mask = np.sum(ms, axis=0) >= need
            if not mask.any():
                self.note("empty mask stored as no mask")
                mask = None
        img = resize(img, (opts.size, opts.size))
        if mask is not None:
            mask = resize_mask(mask, (opts.size, opts.size))
        yield Sample(id=it["id"], split=unit.split, label=it["label"], image=img, mask=mask,
                     box=box_of_mask(mask) if mask is not None else None,
                     attributes=it["attributes"], group=it["patient"])


class _Slices:
    """A series' slices, read on first use (a nodule needs only a few of hundreds)."""

    def __init__(self, pydicom, series: Series) -> None:
        self.pydicom = pydicom
        self.z_of = {sop: z for z, sop, _ in series.slices}
        self.path = {sop: p for _, sop, p in series.slices}
        self.cache: dict[str, np.ndarray | None] = {}
        self.failed: dict[Path, SkipItem] = {}

    def get(self, sop: str) -> np.ndarray | None:
        """Hounsfield units of a slice, or None when its pixels cannot be read."""
        if sop not in self.cache:
            try:
                self.cache[sop] = read_pixels(self.pydicom, self.path[sop])[0]
            except SkipItem as exc:
                self.failed[self.path[sop]] = exc
                self.cache[sop] = None
        return self.cache[sop]


def _scores(cell: str) -> list[float]:
    """'3' or '2;3;4' → [3.0] / [2.0, 3.0, 4.0] (empty → [], 'nan' = not scored, dropped);
    'inf' raises ValueError (an 'inf' malignancy would otherwise silently be label 1)."""
    out = [float(v) for v in parse_list((cell or "").replace(";", ","))]
    if any(math.isinf(v) for v in out):
        raise ValueError(f"'{cell}' is not a finite score")
    return [v for v in out if not math.isnan(v)]


def _read_patch(path: Path, win: tuple[float, float], scale: IntensityScale | None = None
                ) -> np.ndarray:
    if path.suffix.lower() != ".npy":
        return read_image(path, "L", scale)
    if not path.exists():
        raise SkipItem("missing file", str(path))
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SkipItem("unreadable image", f"{path}: {type(exc).__name__}: {exc}") from None
    if arr.ndim != 2:
        raise SkipItem("unsupported image", f"{path}: shape {arr.shape} (need a 2D patch)")
    integer = np.issubdtype(arr.dtype, np.integer)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise SkipItem("NaN/inf pixels", str(path))
    if integer or arr.min() < -0.5 or arr.max() > 1.5:
        return window(arr, *win)  # Hounsfield units
    return np.clip(arr, 0.0, 1.0)


def _resample(img: np.ndarray, cx: float, cy: float, spacing_rc: tuple[float, float],
              out_spacing: float, size: int, order: int, cval: float) -> np.ndarray:
    """A size×size patch centred on pixel (cx, cy) with `out_spacing` mm per pixel."""
    from scipy.ndimage import map_coordinates

    offs = (np.arange(size) - (size - 1) / 2) * out_spacing
    rr = cy + offs[:, None] / spacing_rc[0]
    cc = cx + offs[None, :] / spacing_rc[1]
    rr, cc = np.broadcast_arrays(rr, cc)
    return map_coordinates(img.astype(np.float32), [rr, cc], order=order, mode="constant",
                           cval=cval).astype(np.float32)


def _all_dicoms(src: Path) -> list[Path]:
    out = []
    for dirpath, _, filenames in walk(src):
        out += [dirpath / f for f in filenames if is_dicom_name(f)]
    return out
