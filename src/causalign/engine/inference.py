"""`causalign predict`: a trained run's predictions on new, unlabelled images.

Two kinds of input:

- a causalign dataset folder (its dataset.yaml): one split, read as `evaluate` reads it
  (labels are only copied into the output);
- plain image files (PNG/JPEG/BMP/TIFF/NPY/DICOM; folders are searched recursively). They are not
  preprocessed by code of their own: each goes through the folder importer's reading
  (`read_folder_image`, with the import's `scan_intensity` rule), `fit_square` at the run's
  recorded image size and the importer's writer (`_write_sample`: the same 8/16-bit PNG
  quantisation), into a temporary dataset that is then read like any other. A raw file
  thus reaches the model with the bytes `data import folder` would have stored for it.
  Folders are sorted by the folder importer's `tree_files` (mask files, hidden files and
  other suffixes are skipped and counted). The run's importer decides the rest
  (`_refuse_plain_files`, `_plain_reader`): LIDC patches go through the lidc importer's
  patch reader; imports that crop or normalise otherwise are refused in one line;
- raw BraTS subject folders, for a run on `data import brats --mode volumes`: through the
  brats importer's `load_subject` / `subject_image` / `subject_volume`.

The run's recorded training data (`data_intensity`, `data_image_shape`) is compared with the
input by the same checks `evaluate` makes (`warn_other_intensity`, `warn_other_geometry`):
one warning line each, and the output's ``data_warning`` column names them.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.format import META, SPLITS, DatasetMeta, LesionDataset, read_meta, write_manifest
from ..data.importers.base import Sample
from ..data.importers.folder import (
    FolderOptions,
    mask_name_pattern,
    read_folder_image,
    tree_files,
)
from ..data.importers.run import _to_record, _write_sample
from ..data.importers.util import (
    IMAGE_SUFFIXES,
    IntensityScale,
    SkipItem,
    UsedIds,
    fit_square,
    safe_id,
    scan_intensity,
    unique_id,
    walk,
)
from ..errors import CausalignError, DataError, InputError, not_one_of
from ..metrics.calibration import (
    apply_temperature,
    calibrated_threshold,
    check_temperature,
    refuse_calibrated_threshold,
)
from .evaluate import predict as predict_split
from .evaluate import write_prediction_rows

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass
class Predictions:
    """What `predict_images` returns: one entry per image, in input order.

    ``probs`` (N, C) float64 class probabilities in the run's class order (``classes``);
    ``ids`` the sample ids (plain files: their path relative to the folder given, as `data
    import folder` names them); ``sources`` the files (or dataset image paths); ``labels``
    the dataset's labels (None for plain files); ``warnings`` the data-shift checks that
    fired ("intensity", "geometry"; for plain files "clipped": values beyond the
    training import's intensity rule) with their messages; ``skipped`` the files of the
    folders given that were not read, by reason (mask files, broken links, other files);
    ``threshold`` the probability of class ``positive`` (an index; class 1 of two classes)
    from which `called` says that class
    (None: no threshold, `called` is the argmax), always on the model's own (uncalibrated)
    probability, the scale `evaluate --operating-point` chooses it on; ``temperature`` the T
    ``probs`` were scaled by (softmax(log p / T), as `evaluate --calibrate temperature`
    scales them; None: the model's own), ``uncalibrated`` then the model's own
    probabilities."""

    ids: list[str]
    sources: list[str]
    probs: np.ndarray
    classes: list[str]
    labels: list[int] | None = None
    sites: list[str] | None = None
    warnings: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    threshold: float | None = None
    temperature: float | None = None
    uncalibrated: np.ndarray | None = None
    positive: int = 1

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def called(self) -> np.ndarray:
        """The class at ``threshold``: ``positive`` where the model's own p_positive ≥
        threshold, else the argmax of the other classes (two classes: the other one, as
        before); without a threshold the argmax."""
        if self.threshold is None:
            return self.predicted
        # on the uncalibrated p₁ even with a temperature: one scale for every threshold
        # (evaluate chooses it there), and a small T saturates the scaled p₁ at 1.0 in
        # float64 (T 0.05: every p₁ above 0.863), where a threshold can no longer rank
        own = self.probs if self.uncalibrated is None else self.uncalibrated
        c = self.positive
        rest = own.copy()
        rest[:, c] = -np.inf  # below threshold: the likeliest of the other classes
        return np.where(own[:, c] >= self.threshold, c, rest.argmax(axis=1)).astype(np.int64)

    def write_csv(self, path: str | Path) -> None:
        """One row per image (atomically): id, source, site, label (empty for plain files),
        predicted, p_<class> as in `evaluate --predictions`, predicted_class and
        data_warning (the shift checks that fired, ';'-joined; empty when none); with a
        ``threshold``, also ``called_class`` (the class at it), ``threshold`` and ``positive``
        (the class it is on); with a
        ``temperature``, also ``temperature`` (the p_<class> columns' scale) and, with both,
        ``threshold_calibrated`` (where the threshold lies on the calibrated p₁)."""
        n = len(self.ids)
        labels = self.labels if self.labels is not None else [""] * n
        sites = self.sites if self.sites is not None else [""] * n
        flag = ";".join(self.warnings)
        write_prediction_rows(
            path, ["id", "source", "site", "label"],
            [[i, s, t, y] for i, s, t, y in zip(self.ids, self.sources, sites, labels,
                                                strict=True)],
            self.probs, self.classes,
            tail=self._tail(flag))

    def _tail(self, flag: str) -> tuple[list[str], list[list[str]]]:
        def name(k: int) -> str:
            return self.classes[k] if k < len(self.classes) else str(k)

        cols, rows = ["predicted_class"], [[name(k)] for k in self.predicted]
        if self.threshold is not None:
            # argmax's class stays beside the called one: `compare` and `read_predictions`
            # take `predicted` as the argmax
            cols += ["called_class", "threshold", "positive"]
            for row, c in zip(rows, self.called, strict=True):
                row += [name(c), f"{self.threshold:.17g}", name(self.positive)]
        if self.temperature is not None:  # which scale p_<class> are on
            cols.append("temperature")
            extra = [f"{self.temperature:.17g}"]
            if self.threshold is not None:
                cols.append("threshold_calibrated")
                extra.append(f"{calibrated_threshold(self.threshold, self.temperature):.17g}")
            for row in rows:
                row += extra
        return [*cols, "data_warning"], [[*row, flag] for row in rows]


def is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def image_files(inputs: Sequence[str | Path], mask_suffix: str = "_mask"
                ) -> tuple[list[tuple[str, Path]], dict[str, int]]:
    """(id, file) of every image among ``inputs`` (files, or folders searched recursively
    in sorted order), and how many files were left out, by reason. Folders are sorted by the
    folder importer's own rules (`tree_files`): files whose stem ends in ``mask_suffix``
    (``x_mask.png``, ``x_Mask_1.png``) are masks, not images, and broken links, hidden files
    and other suffixes are not read, as `data import folder` leaves them out. Ids follow the
    folder importer: the path relative to the folder given, without suffix, through
    `safe_id` / `unique_id`."""
    found: list[tuple[str, Path]] = []
    skipped: dict[str, int] = {}
    used = UsedIds()
    seen: set[Path] = set()  # resolved paths already listed
    mask_re = mask_name_pattern(mask_suffix)

    def left_out(reason: str, n: int) -> None:
        if n:
            skipped[reason] = skipped.get(reason, 0) + n

    for given in map(Path, inputs):
        if not given.exists():
            raise InputError(f"{given}: input does not exist")
        if given.is_dir():
            tree = tree_files(given, mask_suffix)
            masks = sum(len(v) for v in tree.masks.values())
            left_out(f"mask files ('<image>{mask_suffix}*', as `data import folder` reads "
                     f"them)", masks)
            left_out("broken links", len(tree.broken))
            left_out("not images (hidden, or not " + ", ".join(IMAGE_SUFFIXES) + ")",
                     tree.other)
            if not tree.images and any(is_nifti(f) for _, _, names in walk(given)
                                       for f in names):
                raise DataError(f"{given}: holds NIfTI volumes, which predict reads only for "
                                f"a run trained on BraTS volumes (`data import brats --mode "
                                f"volumes`); import them and predict on that dataset")
            if not tree.images:
                raise DataError(f"{given}: no images found ({', '.join(IMAGE_SUFFIXES)})"
                                + (f"; only {masks} mask file(s) '<image>{mask_suffix}*'"
                                   if masks else ""))
            pairs = [(f.relative_to(given), f) for f in tree.images]
        elif given.suffix.lower() in IMAGE_SUFFIXES:
            if mask_re.match(given.stem):  # named as a mask: the importer would not read it
                left_out(f"mask files ('<image>{mask_suffix}*', as `data import folder` "
                         f"reads them)", 1)
                continue
            pairs = [(Path(given.name), given)]
        elif is_nifti(given.name):
            raise DataError(f"{given}: a NIfTI volume, which predict reads only for a run "
                            f"trained on BraTS volumes (`data import brats --mode volumes`); "
                            f"import it and predict on that dataset")
        else:
            raise DataError(f"{given}: not an image file ({', '.join(IMAGE_SUFFIXES)}) nor a "
                            f"folder")
        # one row per file: a file given twice, or by name and inside a folder given, was
        # predicted twice (rows 'img0' and 'img0_1' of one image)
        fresh = [(r, f) for r, f in pairs if f.resolve() not in seen]
        left_out("files given more than once (one row each)", len(pairs) - len(fresh))
        seen.update(f.resolve() for _, f in fresh)
        found += [(unique_id(safe_id(str(r.with_suffix(""))), used), f) for r, f in fresh]
    if not found:
        left = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise DataError(f"no images among the inputs ({left})")
    return found, skipped


def _run_records(run: Path) -> dict[str, Any]:
    """The run's record of its training data: classes, attributes, image shape and the
    dataset's image format (png unless its import chose npy)."""
    from .trainer import read_run_config

    raw = read_run_config(run)
    shape, classes = raw.get("data_image_shape"), raw.get("data_classes")
    stored = raw.get("data")
    meta = None
    if isinstance(stored, str) and stored and Path(stored).is_dir():
        try:
            meta = read_meta(Path(stored))
        except CausalignError:
            meta = None
    if not isinstance(classes, list):
        classes = list(meta.classes) if meta is not None else None
    if not (isinstance(shape, list) and len(shape) >= 3 and isinstance(classes, list)):
        raise CausalignError(f"{run / 'config.yaml'}: records no training image shape or "
                             f"classes (a run from an older version): import the images "
                             f"with `causalign data import` and predict on that dataset")
    attributes = raw.get("data_attributes")
    if not isinstance(attributes, list):
        attributes = list(meta.attributes) if meta is not None else []
    # which importer made the training data, with its options: the dataset's record, else
    # the run's copy of it (a moved or deleted dataset took the folder path, silently: a
    # `--mask-suffix _roi` import's masks were predicted as images)
    recorded = raw.get("data_import") if isinstance(raw.get("data_import"), dict) else {}
    info = meta.info if meta is not None else recorded
    importer = info.get("importer")
    options = info.get("options") or {}
    if not isinstance(options, dict):
        options = {}
    # the training import's intensity rule: the run's record, else its dataset's
    scale = IntensityScale.from_record(raw.get("data_intensity_scale"))
    if scale is None and meta is not None:
        scale = IntensityScale.from_record(meta.info.get("intensity_scale"))
    # why no rule, for the fallback's warning (synthetic data were never imported)
    no_rule = ("its dataset is not at hand and config.yaml records no intensity rule"
               if meta is None else
               "its dataset is synthetic (`data synth`) and records no intensity rule"
               if info.get("generator") else
               f"its dataset's importer ({info.get('importer')}) records no intensity rule"
               if info.get("importer") not in (None, "folder") else
               "its dataset records no intensity rule (imported before it was recorded)")
    return {"shape": [int(v) for v in shape], "classes": [str(c) for c in classes],
            "attributes": [str(a) for a in attributes],
            "image_format": options.get("image_format", "png"), "scale": scale,
            # which importer made the training data, with its options: it decides how plain
            # files are preprocessed (`_plain_reader`)
            "importer": importer if isinstance(importer, str) else None,
            "options": options, "no_rule": no_rule}


def mask_suffix_of(rec: dict[str, Any]) -> str:
    """The mask suffix of the run's import: `--mask-suffix` of a folder import, '_mask' for
    the others (BUSI's '<image>_mask.png')."""
    suffix = rec["options"].get("mask_suffix") if rec["importer"] == "folder" else None
    return suffix if isinstance(suffix, str) and suffix else "_mask"


def _intensity_rule(trained: IntensityScale | None, here: IntensityScale, run: Path,
                    no_rule: str = "its dataset records no intensity rule") -> IntensityScale:
    """How these files' values map to [0, 1]: the training import's rule for the kinds of
    source it had (taken over these files instead, 12-bit files whose values stay under
    2048 were divided by 2047, not the training's 4095, and float images by this batch's
    own range), and the import's rule over these files for kinds it had not (12-bit DICOM
    for a run trained on 8-bit PNGs: / 4095, as importing them would). A run whose import
    recorded no rule gets the latter throughout, said when it matters."""
    if trained is None:
        if here.high_depth:
            warnings.warn(f"{run}: {no_rule}; files deeper than 8 bits are scaled by a rule "
                          f"taken over the files given ({here.describe()}), which can "
                          f"differ from the training import's", stacklevel=3)
        return here
    return IntensityScale(
        int_max=trained.int_max if trained.int_max is not None else here.int_max,
        float_range=trained.float_range if trained.has_float else here.float_range,
        has_float=trained.has_float or here.has_float)


# importers whose per-image preprocessing is the folder importer's: one intensity rule,
# letterbox to a square, resize (BUSI, CUB with `--crop image`; Decoy-MNIST's square 8-bit
# digits are resized alone, which the letterbox of a square image is). Raw files of their
# datasets take the folder path as is.
_FOLDER_LIKE = ("folder", "busi", "decoy-mnist")
_IMPORT_HINT = "import them with `causalign data import {kind}` and predict on that dataset"


def _refuse_plain_files(rec: dict[str, Any], run: Path) -> None:
    """Raise when the run's training import preprocessed its images in a way plain files
    cannot reproduce (the folder path would feed the model other pixels, silently)."""
    kind, opts = rec["importer"], rec["options"]
    if kind is None or kind in _FOLDER_LIKE or (kind == "cub" and opts.get("crop") != "box"):
        return
    if kind == "lidc" and opts.get("patches_csv"):
        return  # pre-cropped patches: read by the lidc importer's own `_read_patch`
    why = {
        "lidc": "nodule patches the lidc importer cut from CT series around each annotated "
                "nodule (resampled to mm, HU windowed)",
        "brats": "BraTS slices (reoriented, normalised by the brain's percentiles over the "
                 "whole volume, cropped to the brain's box, chosen by the segmentation)",
        "cbis-ddsm": "CBIS-DDSM crops (breast segmented and percentile-normalised, cropped "
                     "around each abnormality's ROI)",
        "cub": "CUB crops around each bird's bounding box (`--crop box`)",
    }.get(kind, f"images the {kind} importer preprocessed")
    raise DataError(f"{run}: trained on {why}, which plain files do not go through: "
                    + _IMPORT_HINT.format(kind=kind))


def _plain_reader(rec: dict[str, Any], run: Path, files: list[Path]
                  ) -> tuple[Callable[[Path], np.ndarray], int, str | None]:
    """How a plain file becomes the run's input (an image of the run's size, values in
    [0, 1]) by its training import's own code, the PNG depth that import stored, and why
    some of the files' values end clipped (`_clipped`), or None."""
    channels, size, _ = rec["shape"]
    if rec["importer"] == "lidc":
        # pre-cropped patches: NPY in HU windowed by the import's --window, image files by
        # the import's rule, resized (not letterboxed) as `_process_patch` does
        from ..data.importers.lidc import LidcOptions, _read_patch
        from ..data.importers.util import resize

        window = LidcOptions(window=str(rec["options"].get("window", LidcOptions.window))
                             ).window_range()
        scale = rec["scale"] or scan_intensity(f for f in files if f.suffix.lower() != ".npy")

        def read_patch(path: Path) -> np.ndarray:
            return resize(_read_patch(path, window, scale), (size, size))

        # values outside the window are clipped by design: no "clipped" warning
        return read_patch, 16 if scale.high_depth else 8, None
    color = "rgb" if channels == 3 else "gray"
    here = scan_intensity(files)
    scale = _intensity_rule(rec["scale"], here, run, rec["no_rule"])

    def read_folder(path: Path) -> np.ndarray:
        return fit_square(read_folder_image(path, color, scale), None, size)[0]

    return read_folder, 16 if scale.high_depth else 8, _clipped(rec["scale"], here)


def _clipped(trained: IntensityScale | None, here: IntensityScale) -> str | None:
    """Why some of these files' values end clipped at 0 or 1 by the training import's rule
    (deeper integers than its depth, floats beyond its range), or None. Clipped values sit
    inside [0, 1], so `warn_other_intensity` cannot see them: a 16-bit scanner's PNGs on a
    run imported from 12-bit ones saturated 93 % of their pixels unsaid (uniform 16-bit values)."""
    if trained is None:
        return None
    if trained.int_max is not None and here.int_max is not None \
            and here.int_max > trained.int_max:
        return (f"integer values of {int(here.int_max).bit_length()} bits (the training "
                f"import divided by {int(trained.int_max)}): those above it clipped to 1")
    if trained.has_float and here.has_float:
        lo, hi = trained.float_range or (0.0, 1.0)  # None: floats kept, clipped to [0, 1]
        new_lo, new_hi = here.float_range or (0.0, 1.0)
        slack = 1e-3 * (hi - lo)  # the scan's float32 rounding is no clipping
        if new_lo < lo - slack or new_hi > hi + slack:
            return (f"float values {new_lo:g}..{new_hi:g} (the training import mapped "
                    f"{lo:g}..{hi:g} to [0, 1]): those outside it clipped to 0 or 1")
    return None


def _import_files(files: list[tuple[str, Path]], rec: dict[str, Any], run: Path, out: Path,
                  progress: Progress | None = None) -> dict[str, str]:
    """Write ``files`` as split "test" of a dataset in ``out``, preprocessed as the run's
    training import did (`data import folder`'s path for most, see `_plain_reader`) at the
    run's image size and channel count (labels 0: unknown). Returns the "clipped" data
    warning (`_clipped`) when it applies."""
    shape = rec["shape"]
    if len(shape) != 3:
        raise DataError(f"{run}: trained on volumes {tuple(shape)}; plain image files are "
                        f"2D: import the volumes (`causalign data import`) and predict on "
                        f"that dataset")
    channels, h, w = shape
    if channels not in (1, 3) or h != w:
        raise DataError(f"{run}: trained on images of shape {tuple(shape)}, which the folder "
                        f"importer does not make (gray or RGB squares); predict on a "
                        f"dataset folder instead")
    _refuse_plain_files(rec, run)
    opts = FolderOptions(size=h, color="rgb" if channels == 3 else "gray",
                         image_format=rec["image_format"])
    meta = DatasetMeta(name="predict", classes=rec["classes"], attributes=rec["attributes"],
                       ndim=2, channels=channels)
    read, png_bits, clipped = _plain_reader(rec, run, [f for _, f in files])
    task = progress.add_task("reading images", total=len(files)) if progress else None
    rows = []
    for sid, path in files:
        try:
            img = read(path)
        except SkipItem as exc:
            detail = exc.detail if str(path) in exc.detail else f"{path}: {exc.detail}"
            raise DataError(f"{exc.reason}: {detail}") from None
        sample = Sample(id=sid, split="test", label=0, image=img,
                        attributes=[float("nan")] * len(meta.attributes))
        try:
            rows.append(_write_sample(out, sample, meta, opts, png_bits))
        except SkipItem as exc:
            raise DataError(f"{path}: {exc.reason} ({exc.detail})") from None
        if task is not None:
            progress.advance(task)
    write_manifest(out, meta, [_to_record(r) for r in rows])
    return {"clipped": f"{run}: the files given hold {clipped}; the model sees those "
                       f"pixels saturated"} if clipped else {}


def is_nifti(name: str) -> bool:
    return name.lower().endswith((".nii", ".nii.gz"))


def nifti_subjects(inputs: Sequence[Path], mods: list[str]
                   ) -> tuple[dict[str, dict[str, Path]], dict[str, int]]:
    """BraTS subjects among ``inputs`` (subject folders, folders of them, or their NIfTI
    files), found by the brats importer's own file names (`find_subjects`), and how many
    were left out by reason (a subject without one of ``mods``)."""
    from ..data.importers.brats import find_subjects

    subjects: dict[str, dict[str, Path]] = {}
    for given in inputs:
        if not given.exists():
            raise InputError(f"{given}: input does not exist")
        if given.is_dir():
            found = find_subjects(given)
        elif is_nifti(given.name):
            # one file: its subject as the importer names it, this file only
            found = {s: {m: p for m, p in f.items() if p.resolve() == given.resolve()}
                     for s, f in find_subjects(given.parent, max_depth=1).items()}
            found = {s: f for s, f in found.items() if f}
        else:
            found = {}
        if not found:
            raise DataError(f"{given}: no BraTS NIfTI volumes (<subject>_t1.nii.gz …; the "
                            f"run was trained on BraTS volumes)")
        for subj, files in found.items():
            subjects.setdefault(subj, {}).update(files)
    skipped: dict[str, int] = {}
    kept = {}
    for subj in sorted(subjects):
        if all(m in subjects[subj] for m in mods):
            kept[subj] = subjects[subj]
        else:
            reason = f"subjects without one of the run's modalities ({', '.join(mods)})"
            skipped[reason] = skipped.get(reason, 0) + 1
    if not kept:
        raise DataError(f"no subject among the inputs has all of the run's modalities "
                        f"({', '.join(mods)})")
    return kept, skipped


def _import_volumes(subjects: dict[str, dict[str, Path]], rec: dict[str, Any], run: Path,
                    out: Path, progress: Progress | None = None) -> None:
    """Write raw BraTS subjects as split "test" of a volume dataset in ``out``, preprocessed
    by the brats importer's own functions (`load_subject`: RAS reorientation, voxel sizes;
    `subject_image`: brain percentiles, crop square in mm; `subject_volume`: axial positions
    spanning the brain) at the run's recorded (C, D, H, W). A subject folder's segmentation,
    when present, joins the brain mask as it did at import; without one the brain is the
    voxels > 0 in a modality (the same wherever the tumour lies inside them)."""
    from ..data.importers.brats import (
        BratsOptions,
        load_subject,
        subject_image,
        subject_volume,
    )
    from ..data.importers.util import require

    nib = require("nibabel", "BraTS")
    channels, depth, h, _ = rec["shape"]
    opts = BratsOptions(size=h, depth=depth, mode="volumes", task="grade",
                        modalities=",".join(_brats_modalities(rec)),
                        image_format=rec["image_format"])
    meta = DatasetMeta(name="predict", classes=rec["classes"], attributes=rec["attributes"],
                       ndim=3, channels=channels)
    task = progress.add_task("reading volumes", total=len(subjects)) if progress else None
    rows = []
    for subj, files in subjects.items():
        try:
            vols, seg, spacing = load_subject(nib, subj, files, opts.mods())
            if seg is not None:
                seg = np.rint(seg).astype(np.int16)  # as the importer rounds it
            image, brain, sl = subject_image(subj, vols, seg, spacing)
            vol, _ = subject_volume(image, brain, sl, depth, h)
            sample = Sample(id=subj, split="test", label=0,
                            image=vol[0] if vol.shape[0] == 1 else vol,
                            attributes=[float("nan")] * len(meta.attributes))
            rows.append(_write_sample(out, sample, meta, opts))
        except SkipItem as exc:
            detail = exc.detail if subj in exc.detail else f"{subj}: {exc.detail}"
            raise DataError(f"{exc.reason}: {detail}") from None
        if task is not None:
            progress.advance(task)
    write_manifest(out, meta, [_to_record(r) for r in rows])


def _brats_modalities(rec: dict[str, Any]) -> list[str]:
    """The run's modalities, in channel order, from its import's options."""
    from ..data.importers.brats import BratsOptions

    return BratsOptions(modalities=str(rec["options"].get("modalities") or
                                       BratsOptions.modalities)).mods()


def _drop_listed_masks(files: list[tuple[str, Path]], inputs: Sequence[Path],
                       rec: dict[str, Any], skipped: dict[str, int]
                       ) -> list[tuple[str, Path]]:
    """A `lidc --patches-csv` import names its masks in the CSV's ``mask`` column (per-reader
    'masks/x_r0.png', no suffix rule): given the folder that holds that CSV, the files it
    lists as masks are left out (and counted in ``skipped``), as the importer reads them."""
    csv_name = rec["options"].get("patches_csv") if rec["importer"] == "lidc" else None
    if not csv_name:
        return files
    from ..data.importers.base import parse_list
    from ..data.importers.util import read_csv

    listed: set[Path] = set()
    for given in inputs:
        table = given / str(csv_name)
        if given.is_dir() and table.is_file():
            _, rows = read_csv(table)
            listed |= {(given / m).resolve() for r in rows
                       for m in parse_list((r.get("mask") or "").replace(";", ","))}
    kept = [(sid, f) for sid, f in files if f.resolve() not in listed]
    if len(kept) < len(files):
        reason = f"mask files (the mask column of {Path(str(csv_name)).name})"
        skipped[reason] = skipped.get(reason, 0) + len(files) - len(kept)
    if not kept:
        raise DataError("no images among the inputs (only the masks the patches CSV lists)")
    return kept


def _checked_split(run: Path, data: Path, split: str, shown: Path
                   ) -> tuple[LesionDataset, dict[str, str]]:
    """The split (channels checked against the run's model), and the run's data-shift
    checks that fired, each message naming ``shown`` rather than a temporary folder."""
    from ..data.format import check_split_channels
    from .trainer import data_info_from_disk, warn_other_geometry, warn_other_intensity

    ds = LesionDataset(data, split)
    check_split_channels(ds, data_info_from_disk(data).in_channels, "the run's model takes")
    fired = {}
    for name, check in (("intensity", warn_other_intensity),
                        ("geometry", warn_other_geometry)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check(run, ds)
        if caught:
            text = str(caught[0].message)
            fired[name] = text.replace(f"{ds.root} ({split})", str(shown), 1) \
                if data != shown else text
    return ds, fired


def predict_images(run: str | Path, inputs: str | Path | Sequence[str | Path],
                   split: str | None = None, batch_size: int = 256,
                   device: str = "auto", progress: Progress | None = None,
                   saliency: str | None = None, maps: str | Path | None = None,
                   threshold: float | None = None, temperature: float | None = None,
                   positive: int | str | None = None) -> Predictions:
    """Class probabilities of RUN's model for new images.

    ``inputs``: a causalign dataset folder (its ``split``, default "test"; alone), or
    image files / folders of them (no ``split``), preprocessed as `causalign data import
    folder` would store them at the run's image size and channel count. The data-shift
    checks of `evaluate` run on the input (their messages in ``Predictions.warnings``; not
    warned here: the caller decides).
    ``saliency`` with ``maps``: also each image's map of its predicted class (with
    ``threshold``, of its called class: the decision made), written by `explain`'s export
    (MAPS/maps/<id>.npy, overlays/<id>.png, grid.png, summary.json with each map's
    ``explained`` class and the ``provenance``: run, weights, inputs).
    ``threshold``: an operating point (`Predictions.threshold`), e.g. the one `evaluate
    --operating-point` chose, on the probability of class ``positive`` (a class name or index,
    `positive_class`: class 1 of two classes by default; required for more, and refused with
    ``temperature`` there, where no threshold on the calibrated probability calls the same
    images), checked before any image is read. It applies to the model's own probability,
    with ``temperature`` too (the scale on which `evaluate` chose it; `Predictions.called`).
    ``temperature``: a T > 0 (e.g. the one `evaluate --calibrate temperature` fitted on val):
    the probabilities are softmax(log p / T) of the model's p, as that evaluation scaled
    them (`apply_temperature`; equal to softmax(logits / T), and for the multi-view volume
    model, whose output is a pooled log-probability, softmax(output / T))."""
    from .trainer import load_run, read_run_config

    if temperature is not None:  # an argument's own error first, as the CLI's
        check_temperature(temperature)
    run = Path(run)
    recorded = read_run_config(run)  # a missing run fails before any image is read
    if threshold is not None:
        _check_threshold(threshold, recorded.get("data_classes"), positive, temperature)
    elif positive is not None:
        raise InputError(f"--positive {positive} is used only with --threshold T (the class "
                         f"it is on); add --threshold")
    if (saliency is None) != (maps is None):
        raise InputError("--saliency and --maps go together (a saliency method and the "
                         "folder for its maps)")
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input given (a dataset folder or image files)")
    if len(paths) > 1:
        # searched as plain files, a dataset's images/ and masks/ of every split were
        # predicted (masks as images)
        data = next((p for p in paths if is_dataset(p)), None)
        if data is not None:
            raise InputError(f"{data}: a dataset folder is predicted alone (its --split); "
                             f"give it as the only input")
    if len(paths) == 1 and is_dataset(paths[0]):
        split = "test" if split is None else split
        if split not in SPLITS:
            raise InputError(not_one_of("--split", split, SPLITS))
        data = paths[0]
        _, model, method, data = load_run(run, device=device, data=data)
        ds, fired = _checked_split(run, data, split, data)
        dev = next(model.parameters()).device
        _check_saliency(saliency, model)
        probs, _, _ = predict_split(model, method, ds, dev, batch_size, progress=progress)
        result = _with_threshold(Predictions(
            ids=[r.id for r in ds.records], sources=[str(data / r.image) for r in ds.records],
            probs=probs, classes=list(ds.meta.classes),
            labels=[int(r.label) for r in ds.records], sites=[r.site for r in ds.records],
            warnings=fired), threshold, temperature, positive)
        _export_maps(model, method, ds, saliency, maps, dev, progress, result=result,
                     provenance=lambda: _maps_provenance(run, model, data, ds, dev, paths,
                                                         split))
        return result
    if split is not None:  # plain files have no split: ignoring it hid a mistaken input
        raise InputError(f"--split {split}: for a dataset folder input only; the input is "
                         f"plain image files")
    rec = _run_records(run)
    volumes = len(rec["shape"]) == 4 and rec["importer"] == "brats"
    if volumes:  # raw BraTS subjects, through the brats importer's preprocessing
        subjects, skipped = nifti_subjects(paths, _brats_modalities(rec))
        files = [(s, next(iter(f.values())).parent) for s, f in subjects.items()]
    else:
        files, skipped = image_files(paths, mask_suffix_of(rec))
        files = _drop_listed_masks(files, paths, rec, skipped)
    with tempfile.TemporaryDirectory(prefix="causalign-predict-") as tmp:
        data = Path(tmp)
        clipped: dict[str, str] = {}
        if volumes:
            _import_volumes(subjects, rec, run, data, progress)
        else:
            clipped = _import_files(files, rec, run, data, progress)
        _, model, method, data = load_run(run, device=device, data=data)
        shown = paths[0] if len(paths) == 1 else Path(f"{len(paths)} inputs")
        ds, fired = _checked_split(run, data, "test", shown)
        fired.update(clipped)
        dev = next(model.parameters()).device
        _check_saliency(saliency, model)
        probs, _, _ = predict_split(model, method, ds, dev, batch_size, progress=progress)
        result = _with_threshold(Predictions(
            ids=[sid for sid, _ in files], sources=[str(f) for _, f in files], probs=probs,
            classes=list(ds.meta.classes), warnings=fired, skipped=skipped), threshold,
            temperature, positive)
        _export_maps(model, method, ds, saliency, maps, dev, progress, labelled=False,
                     result=result,
                     provenance=lambda: _maps_provenance(run, model, None, ds, dev, paths,
                                                         None))
    return result


def _check_threshold(threshold: float, classes: Sequence[str] | None,
                     positive: int | str | None = None,
                     temperature: float | None = None) -> int | None:
    """The positive class's index (`positive_class`; None when the run recorded no classes),
    or `InputError` unless ``threshold`` is a probability and the class is the run's. With
    ``temperature`` on more than two classes refused: the calibrated p_c depends on every
    class's p, so no ``threshold_calibrated`` calls the images ``threshold`` calls."""
    from ..metrics.operating_point import check_probability, positive_class

    check_probability(threshold)
    if classes is None:
        return None
    try:
        index = positive_class(positive, [str(c) for c in classes])
    except InputError as e:
        # the option at fault named, as `evaluate` and `compare` name theirs
        option = f"--threshold {threshold:g}" if positive is None else "--positive"
        raise InputError(f"{option}: {e}") from None
    if temperature is not None and len(classes) > 2:
        refuse_calibrated_threshold("--threshold with --temperature", len(classes),
                                    "give one of them")
    return index


def _with_threshold(result: Predictions, threshold: float | None,
                    temperature: float | None = None,
                    positive: int | str | None = None) -> Predictions:
    """``result`` with its probabilities scaled by ``temperature`` and its ``threshold`` set,
    checked against its classes (a run trained before the classes were recorded is checked
    only here, after the pass)."""
    if temperature is not None:
        result.uncalibrated = result.probs
        result.probs = apply_temperature(result.probs, temperature)
        result.temperature = float(temperature)
    if threshold is not None:
        result.positive = _check_threshold(threshold, result.classes, positive, temperature)
        result.threshold = float(threshold)
    return result


def _check_saliency(saliency: str | None, model: Any) -> None:
    """An unknown name fails before the prediction pass (as `explain` checks it)."""
    if saliency == "counterfactual":
        # its search settings come from the run's training split (`explain`'s
        # explainer_options_for_run); default ones would not be the run's maps
        raise InputError("--saliency counterfactual is not offered by predict: use "
                         "`causalign counterfactual RUN --data DATA` on the imported images")
    if saliency is not None:
        from ..explain import get_explainer

        get_explainer(saliency, model)


def _maps_provenance(run: Path, model: Any, data: Path | None, ds: LesionDataset,
                     device: Any, inputs: Sequence[Path], split: str | None) -> dict:
    """`output_provenance` (as explain's summary) of predict's maps, with the ``inputs`` given
    and the dataset ``split``; plain files' ``data`` (a temporary import, gone after) is
    left out, the digest of what the model read stays."""
    from .provenance import output_provenance

    if data is None:
        record = output_provenance(run, model, ds.root, ds, device)
        record.pop("data")
    else:
        record = output_provenance(run, model, data, ds, device)
    return {**record, "inputs": [str(p.resolve()) for p in inputs], "split": split}


def _export_maps(model: Any, method: Any, ds: LesionDataset, saliency: str | None,
                 maps: str | Path | None, device: Any, progress: Progress | None,
                 labelled: bool = True, result: Predictions | None = None,
                 provenance: Callable[[], dict] | None = None) -> None:
    """``provenance``: called only when maps are written (it digests the split and asks
    git for the source commit)."""
    if saliency is None or maps is None:
        return
    from ..explain.export import export_saliency

    # plain files carry the temporary import's placeholder label 0, not a true class; the
    # maps explain the class the CSV calls (`called`: the argmax without a threshold), so a
    # positive call at an operating point is shown with its own map, not the argmax's
    export_saliency(model, method, ds, saliency, maps, device=device, progress=progress,
                    labelled=labelled,
                    targets=None if result is None else result.called,
                    record=None if provenance is None else {"provenance": provenance()})
