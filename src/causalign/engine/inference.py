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

The run's recorded training data (`data_intensity`, `data_image_shape`) is compared with the
input by the same checks `evaluate` makes (`warn_other_intensity`, `warn_other_geometry`):
one warning line each, and the output's ``data_warning`` column names them.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.format import META, SPLITS, DatasetMeta, LesionDataset, read_meta, write_manifest
from ..data.importers.base import Sample
from ..data.importers.folder import FolderOptions, read_folder_image
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
    fired ("intensity", "geometry") with their messages."""

    ids: list[str]
    sources: list[str]
    probs: np.ndarray
    classes: list[str]
    labels: list[int] | None = None
    sites: list[str] | None = None
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def write_csv(self, path: str | Path) -> None:
        """One row per image (atomically): id, source, site, label (empty for plain files),
        predicted, p_<class> as in `evaluate --predictions`, predicted_class and
        data_warning (the shift checks that fired, ';'-joined; empty when none)."""
        n = len(self.ids)
        labels = self.labels if self.labels is not None else [""] * n
        sites = self.sites if self.sites is not None else [""] * n
        flag = ";".join(self.warnings)
        write_prediction_rows(
            path, ["id", "source", "site", "label"],
            [[i, s, t, y] for i, s, t, y in zip(self.ids, self.sources, sites, labels,
                                                strict=True)],
            self.probs, self.classes,
            tail=(["predicted_class", "data_warning"],
                  [[self.classes[k] if k < len(self.classes) else str(k), flag]
                   for k in self.predicted]))


def is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def image_files(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(id, file) of every image among ``inputs`` (files, or folders searched recursively
    in sorted order). Ids follow the folder importer: the path relative to the folder given,
    without suffix, through `safe_id` / `unique_id`."""
    found: list[tuple[str, Path]] = []
    used = UsedIds()
    for given in map(Path, inputs):
        if not given.exists():
            raise InputError(f"{given}: input does not exist")
        if given.is_dir():
            files = [d / f for d, _, names in walk(given) for f in names
                     if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith(".")
                     and (d / f).is_file()]
            if not files:
                raise DataError(f"{given}: no images found ({', '.join(IMAGE_SUFFIXES)})")
            pairs = [(f.relative_to(given), f) for f in files]
        elif given.suffix.lower() in IMAGE_SUFFIXES:
            pairs = [(Path(given.name), given)]
        else:
            raise DataError(f"{given}: not an image file ({', '.join(IMAGE_SUFFIXES)}) nor a "
                            f"folder")
        found += [(unique_id(safe_id(str(r.with_suffix(""))), used), f) for r, f in pairs]
    return found


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
    options = (meta.info.get("options") or {}) if meta is not None else {}
    # the training import's intensity rule: the run's record, else its dataset's
    scale = IntensityScale.from_record(raw.get("data_intensity_scale"))
    if scale is None and meta is not None:
        scale = IntensityScale.from_record(meta.info.get("intensity_scale"))
    return {"shape": [int(v) for v in shape], "classes": [str(c) for c in classes],
            "attributes": [str(a) for a in attributes],
            "image_format": options.get("image_format", "png")
            if isinstance(options, dict) else "png", "scale": scale}


def _intensity_rule(trained: IntensityScale | None, here: IntensityScale, run: Path
                    ) -> IntensityScale:
    """How these files' values map to [0, 1]: the training import's rule for the kinds of
    source it had (taken over these files instead, 12-bit files whose values stay under
    2048 were divided by 2047, not the training's 4095, and float images by this batch's
    own range), and the import's rule over these files for kinds it had not (12-bit DICOM
    for a run trained on 8-bit PNGs: / 4095, as importing them would). A run whose import
    recorded no rule gets the latter throughout, said when it matters."""
    if trained is None:
        if here.high_depth:
            warnings.warn(f"{run}: its dataset records no intensity rule (imported before "
                          f"it was recorded); files deeper than 8 bits are scaled by a rule "
                          f"taken over the files given ({here.describe()}), which can "
                          f"differ from the training import's", stacklevel=3)
        return here
    return IntensityScale(
        int_max=trained.int_max if trained.int_max is not None else here.int_max,
        float_range=trained.float_range if trained.has_float else here.float_range,
        has_float=trained.has_float or here.has_float)


def _import_files(files: list[tuple[str, Path]], run: Path, out: Path,
                  progress: Progress | None = None) -> None:
    """Write ``files`` as split "test" of a dataset in ``out``, preprocessed as `data import
    folder` does at the run's image size and channel count (labels 0: unknown)."""
    rec = _run_records(run)
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
    opts = FolderOptions(size=h, color="rgb" if channels == 3 else "gray",
                         image_format=rec["image_format"])
    meta = DatasetMeta(name="predict", classes=rec["classes"], attributes=rec["attributes"],
                       ndim=2, channels=channels)
    scale = _intensity_rule(rec["scale"], scan_intensity(f for _, f in files), run)
    png_bits = 16 if scale.high_depth else 8
    task = progress.add_task("reading images", total=len(files)) if progress else None
    rows = []
    for sid, path in files:
        try:
            img = read_folder_image(path, opts.color, scale)
        except SkipItem as exc:
            detail = exc.detail if str(path) in exc.detail else f"{path}: {exc.detail}"
            raise DataError(f"{exc.reason}: {detail}") from None
        img, _, _ = fit_square(img, None, opts.size)
        sample = Sample(id=sid, split="test", label=0, image=img,
                        attributes=[float("nan")] * len(meta.attributes))
        try:
            rows.append(_write_sample(out, sample, meta, opts, png_bits))
        except SkipItem as exc:
            raise DataError(f"{path}: {exc.reason} ({exc.detail})") from None
        if task is not None:
            progress.advance(task)
    write_manifest(out, meta, [_to_record(r) for r in rows])


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
                   split: str = "test", batch_size: int = 256,
                   device: str = "auto", progress: Progress | None = None,
                   saliency: str | None = None, maps: str | Path | None = None
                   ) -> Predictions:
    """Class probabilities of RUN's model for new images.

    ``inputs``: a causalign dataset folder (its ``split``), or image files / folders of
    them, preprocessed as `causalign data import folder` would store them at the run's
    image size and channel count. The data-shift checks of `evaluate` run on the input
    (their messages in ``Predictions.warnings``; not warned here: the caller decides).
    ``saliency`` with ``maps``: also each image's map of its predicted class, written by
    `explain`'s export (MAPS/maps/<id>.npy, overlays/<id>.png, grid.png)."""
    from .trainer import load_run, read_run_config

    run = Path(run)
    read_run_config(run)  # a missing run fails before any image is read
    if (saliency is None) != (maps is None):
        raise InputError("--saliency and --maps go together (a saliency method and the "
                         "folder for its maps)")
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input given (a dataset folder or image files)")
    if len(paths) == 1 and is_dataset(paths[0]):
        if split not in SPLITS:
            raise InputError(not_one_of("--split", split, SPLITS))
        data = paths[0]
        _, model, method, data = load_run(run, device=device, data=data)
        ds, fired = _checked_split(run, data, split, data)
        dev = next(model.parameters()).device
        _check_saliency(saliency, model)
        probs, _, _ = predict_split(model, method, ds, dev, batch_size, progress=progress)
        _export_maps(model, method, ds, saliency, maps, dev, progress)
        return Predictions(ids=[r.id for r in ds.records],
                           sources=[str(data / r.image) for r in ds.records],
                           probs=probs, classes=list(ds.meta.classes),
                           labels=[int(r.label) for r in ds.records],
                           sites=[r.site for r in ds.records], warnings=fired)
    files = image_files(paths)
    with tempfile.TemporaryDirectory(prefix="causalign-predict-") as tmp:
        data = Path(tmp)
        _import_files(files, run, data, progress)
        _, model, method, data = load_run(run, device=device, data=data)
        shown = paths[0] if len(paths) == 1 else Path(f"{len(paths)} inputs")
        ds, fired = _checked_split(run, data, "test", shown)
        dev = next(model.parameters()).device
        _check_saliency(saliency, model)
        probs, _, _ = predict_split(model, method, ds, dev, batch_size, progress=progress)
        _export_maps(model, method, ds, saliency, maps, dev, progress)
        classes = list(ds.meta.classes)
    return Predictions(ids=[sid for sid, _ in files], sources=[str(f) for _, f in files],
                       probs=probs, classes=classes, warnings=fired)


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


def _export_maps(model: Any, method: Any, ds: LesionDataset, saliency: str | None,
                 maps: str | Path | None, device: Any, progress: Progress | None) -> None:
    if saliency is None or maps is None:
        return
    from ..explain.export import export_saliency

    export_saliency(model, method, ds, saliency, maps, device=device, progress=progress)
