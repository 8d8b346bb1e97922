"""Evaluation of a trained model on one split: classification, CAM localisation, deletion."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.format import LesionDataset
from ..errors import InputError
from ..explain import get_explainer, saliency_map
from ..explain.base import eval_mode
from ..explain.gradcam import ConstantMapError
from ..io import atomic_write_text
from ..methods.base import Method
from ..metrics import (
    bootstrap_ci,
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
)
from ..metrics.calibration import (
    apply_temperature,
    check_temperature,
    negative_log_likelihood,
)
from ..metrics.classification import ECE_BINS, check_bins, check_bootstrap
from ..metrics.operating_point import (
    check_probability,
    one_vs_rest,
    operating_point_bootstrap,
    operating_point_metrics,
    operating_point_per_sample,
    positive_class,
)

if TYPE_CHECKING:
    from rich.progress import Progress

    from .distributed import Shard

# The saliency-against-annotation means `evaluate_split` reports (and resamples)
LOCALISATION_METRICS = ("cam_precision", "cam_precision_mask", "cam_mass_in_mask",
                        "saliency_iou", "saliency_dice")

# Saliency methods that cannot explain the volume model: Grad-CAM's layer sees slices, not
# volumes, and zennit has rules for none of MultiViewCNN's attention pooling except via
# lrp-epsilon's modified gradient (explain/lrp.py).
VOLUME_UNSUPPORTED = ("gradcam", "lrp-alpha-beta", "lrp-flat", "lrp-gamma", "lrp-w-square",
                      "lrp-zbox")


def iterate_batches(
    dataset: LesionDataset | Shard, batch_size: int, shuffle: bool = False,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    drop_last: bool = False, order: Tensor | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Batches of the cached split, moved to `device`. ``order`` (sample indices, e.g. a
    sampler's draw with repeats) replaces the pass in split or shuffled order."""
    # a negative size gave no batches at all (metrics of nothing), 0 a bare range() error
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if order is None:
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    n = len(order)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        batch = dataset.batch(order[start:start + batch_size])
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _input(model: nn.Module, method: Method, batch: dict[str, Tensor]) -> Tensor:
    """What the model sees, in the dtype of its floating-point parameters: the splits are
    float32, and a model cast with `.double()` or `.to(torch.bfloat16)` failed inside its
    first layer (a dtype-mismatch traceback; the inputs are not the caller's to cast)."""
    x = method.model_input(batch)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    return x


# Input values in one evaluation batch. Evaluation's batches were a fixed 128 / 256
# samples: harmless for 2D images (128 of 1x64x64 are 0.5 M values), but a BraTS volume
# (4x155x128x128) is 10 M, and a batch of 128 needed ~180 GB for the saliency pass (WBP on one
# such volume peaks at 1.4 GB). 2D images up to 1x128x128 keep 128 per batch (unchanged);
# volumes and larger images get fewer per batch, never fewer than one. Measured with WBP on
# 24 volumes of 1x32x128x128 (multiview, width 16, CPU): peak RSS 7.7 GB in one batch, 5.4 GB
# at 2**23 values (16 volumes a batch), 2.1 GB at 2**21 (4 a batch); same metrics.
EVAL_VALUES_PER_BATCH = 2 ** 21

# On the CPU a tighter cap, for speed: the activations of a whole batch of large images fall
# out of the CPU caches, and evaluation (1 + len(fractions) forwards per batch) got slower
# per image as batches grew. cnn7, 1 thread, `evaluate_split` with Grad-CAM, process CPU
# time (benchmarks/bench_sizes.py conditions): 224 px, 32 images: 7.6 s in one batch, 3.6 s
# in batches of 5; 128 px, 64 images: 5.1 s → 3.2 s (batches of 16); 64 px, 256 images:
# 4.5 s → 2.7 s (batches of 64). ResNet-18, which downsamples early, is unchanged (7.6 s →
# 7.5 s at 224 px). Same metrics to the last digit. GPUs keep the larger batches.
EVAL_VALUES_PER_BATCH_CPU = 2 ** 18


def eval_batch_size(dataset: LesionDataset | Shard, batch_size: int,
                    device: torch.device | str | None = None) -> int:
    """``batch_size`` capped so a batch holds at most `EVAL_VALUES_PER_BATCH` input values
    (`EVAL_VALUES_PER_BATCH_CPU` when `device` is the CPU). Evaluation in eval mode is
    batch-independent, so only memory and speed change."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        return batch_size  # iterate_batches names the bad value
    shape = getattr(dataset, "image_shape", None)  # iterate_batches needs only len + batch
    if shape is None:
        return batch_size
    cap = EVAL_VALUES_PER_BATCH
    if _is_cpu(device):
        cap = min(cap, EVAL_VALUES_PER_BATCH_CPU)
    per_sample = max(1, math.prod(shape))
    return max(1, min(batch_size, cap // per_sample))


def _is_cpu(device: torch.device | str | None) -> bool:
    try:
        return device is not None and torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):  # not a device: iterate_batches' .to() names it
        return False


@torch.no_grad()
def predict(model: nn.Module, method: Method, dataset: LesionDataset | Shard,
            device: torch.device | str,
            batch_size: int = 256, progress: Progress | None = None
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Class probabilities, labels and mean cross-entropy over the split, in eval mode (every
    module's train/eval flag restored). Results stay on the device until the end: one host
    copy per split, not two device syncs per batch. ``progress``: a bar advanced per batch."""
    probs, labels, losses = [], [], []
    task = None
    if progress is not None:
        task = progress.add_task(f"predicting {dataset.split}", total=len(dataset))
    with eval_mode(model):
        for batch in iterate_batches(dataset, eval_batch_size(dataset, batch_size, device),
                                     device=device):
            logits = model(_input(model, method, batch))
            losses.append(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
            probs.append(_probs(logits))
            labels.append(batch["label"])
            if task is not None:
                progress.advance(task, len(logits))
    p = torch.cat(probs).cpu().numpy()
    y = torch.cat(labels).cpu().numpy()
    return p, y, _mean_loss(losses)


def _probs(logits: Tensor) -> Tensor:
    """Class probabilities for the classification metrics, in float64: a float32 softmax
    rounds every probability above 1 − 3e-8 (a logit margin above ~17) to exactly 1.0, so a
    confident model's positives all tied and its AUC came out 0.5 whatever their ranking;
    float64 keeps margins up to ~36 apart."""
    return logits.double().softmax(1)


def write_predictions(path: str | Path, dataset: LesionDataset, probs: np.ndarray,
                      temperature: float | None = None) -> None:
    """One CSV row per sample of ``dataset``, in its manifest order: id, site, label,
    predicted (argmax) and each class's probability (``p_<class name>``), written
    atomically. ``probs`` (N, C) are the split's class probabilities in that order.

    ``temperature``: also each class's temperature-scaled probability (``pcal_<class
    name>``, `apply_temperature` of ``probs``) and a ``calibration_temperature`` column
    holding T. The ``p_`` columns stay the model's own and the column is not named
    ``temperature`` (`read_predictions` reads that as "p_ columns are scaled", as `predict
    --temperature` writes): `compare` and the report read the file as without it."""
    records = dataset.records
    if probs.shape[0] != len(records):
        raise InputError(f"{probs.shape[0]} prediction rows for the {len(records)} samples "
                         f"of split '{dataset.split}'")
    classes = getattr(dataset.meta, "classes", None) or []
    tail = None
    if temperature is not None:
        scaled = apply_temperature(probs, temperature)
        tail = ([*(f"pcal_{n}" for n in _column_names(classes, probs.shape[1])),
                 "calibration_temperature"],
                [[*(f"{v:.17g}" for v in row), repr(float(temperature))] for row in scaled])
    write_prediction_rows(path, ["id", "site", "label"],
                          [[r.id, r.site, r.label] for r in records], probs, classes, tail)


def _column_names(classes: list[str], n: int) -> list[str]:
    """The names of ``n`` probability columns: ``classes``, then indices past them."""
    return list(classes) + [str(c) for c in range(len(classes), n)]


def write_prediction_rows(path: str | Path, head: list[str], rows: list[list[Any]],
                          probs: np.ndarray, classes: list[str],
                          tail: tuple[list[str], list[list[Any]]] | None = None) -> None:
    """The predictions CSV, written atomically: the ``head`` columns of each row, then
    predicted (argmax) and each class's probability (``p_<class name>``, classes past
    ``classes`` by index), then the optional ``tail`` (column names, one list per row).
    Shared by `evaluate --predictions` and `causalign predict`, so both name and format the
    probabilities alike."""
    names = _column_names(classes, probs.shape[1])
    tail_cols, tail_rows = tail if tail is not None else ([], [[] for _ in rows])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*head, "predicted", *(f"p_{n}" for n in names), *tail_cols])
    pred = probs.argmax(axis=1)
    for cells, row, k, extra in zip(rows, probs, pred, tail_rows, strict=True):
        # repr-exact float64 (17 significant digits): a saturated model's 1 − 1e-12 stays
        # apart from 1.0, as the AUC in metrics.json took it
        writer.writerow([*cells, int(k), *(f"{v:.17g}" for v in row), *extra])
    atomic_write_text(path, buf.getvalue())


class Predictions(NamedTuple):
    """A predictions CSV read back (`read_predictions`), in its row order."""

    ids: list[str]
    sites: list[str]
    labels: np.ndarray  # (N,) int64
    predicted: np.ndarray  # (N,) int64, the argmax of probs
    probs: np.ndarray  # (N, C) float64
    classes: list[str]  # the class names of the p_<class> columns
    # the T its probabilities were scaled by (`predict --temperature`'s column), else None
    temperature: float | None = None


def read_predictions(path: str | Path) -> Predictions:
    """A CSV `write_predictions` wrote (``RUN/predictions_<split>.csv``, ``evaluate
    --predictions``), or `InputError` naming what is wrong with it (missing, no id/label/p_
    columns, a value that is not a number, a duplicate id)."""
    path = Path(path)
    try:
        # -sig: a CSV saved by a spreadsheet starts with a BOM ("\ufeffid", no id column)
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such predictions CSV") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a predictions CSV ({exc.__class__.__name__})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    cols = [c for c in header if c.startswith("p_")]
    missing = [c for c in ("id", "label") if c not in header]
    if missing or not cols:
        raise InputError(f"{path}: not a predictions CSV (needs columns id, label and "
                         f"p_<class>; has {', '.join(header) or 'none'})")
    ids, sites, labels, probs = [], [], [], []
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if row["label"] == "":  # `causalign predict` on plain files writes none
            raise InputError(f"{path} line {line}: no label (id {row.get('id')!r}): predictions "
                             f"of unlabelled images, as `causalign predict` writes for plain "
                             f"files, cannot be scored")
        extra = [v for v in row.get(None) or () if v.strip()]
        if extra:  # the values past the header were dropped: p_ columns shifted or missing
            raise InputError(f"{path} line {line}: {len(extra)} value(s) more than the "
                             f"header's {len(header)} columns (id {row.get('id')!r})")
        try:
            labels.append(int(row["label"]))
            probs.append([float(row[c]) for c in cols])
        except (TypeError, ValueError):
            raise InputError(f"{path} line {line}: label or probability is not a number "
                             f"(id {row.get('id')!r})") from None
        if not all(math.isfinite(v) for v in probs[-1]):  # float() reads "nan" and "inf"
            raise InputError(f"{path} line {line}: a probability is NaN or infinite "
                             f"(id {row.get('id')!r})")
        if row["id"] in seen:
            raise InputError(f"{path} line {line}: id {row['id']!r} appears twice")
        seen.add(row["id"])
        ids.append(row["id"])
        sites.append(row.get("site") or "")
    if not ids:
        raise InputError(f"{path}: no prediction rows")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return Predictions(ids, sites, y, p.argmax(axis=1), p, [c[2:] for c in cols],
                       _read_temperature(path, text))


def _read_temperature(path: Path, text: str) -> float | None:
    """The ``temperature`` column `predict --temperature` writes (one T for every row): its
    p_<class> are temperature-scaled, not the model's own. None without the column."""
    values = {row.get("temperature") or "" for row in csv.DictReader(io.StringIO(text))}
    if values == {""}:
        return None
    try:
        (t,) = {float(v) for v in values}
    except ValueError:
        raise InputError(f"{path}: the temperature column holds {len(values)} different "
                         f"values or one that is not a number ({', '.join(sorted(values))})"
                         ) from None
    return t


def _mean_loss(losses: list[Tensor]) -> float:
    """Mean of per-sample cross-entropies, summed in float64 over the whole split at once:
    the same number however the split was batched (float32 sums per batch made the loss
    depend on the batch size in its last digits)."""
    return float(torch.cat(losses).double().mean())


def quick_metrics(model: nn.Module, method: Method, dataset: LesionDataset,
                  device: torch.device | str) -> dict:
    """Classification metrics and loss (used every epoch for model selection)."""
    probs, labels, loss = predict(model, method, dataset, device)
    out = classification_metrics(probs, labels)
    out["loss"] = loss
    out["n"] = int(len(labels))
    return out


def evaluate_split(
    model: nn.Module, method: Method, dataset: LesionDataset, device: torch.device | str,
    saliency: str = "gradcam", fractions: tuple[float, ...] = (0.002, 0.01, 0.02, 0.1, 0.2),
    batch_size: int = 128, progress: Progress | None = None,
    explainer_kwargs: dict[str, Any] | None = None, deletion_fill: float = 0.0,
    predictions: str | Path | None = None, bootstrap: int = 0, bootstrap_seed: int = 0,
    reliability: str | Path | None = None, reliability_title: str | None = None,
    ece_bins: int = ECE_BINS, threshold: float | None = None, roc: str | Path | None = None,
    temperature: float | None = None, chosen_by: tuple[Any, Any, Any] | None = None,
    positive: int | str | None = None, temperature_source: str | None = None,
) -> dict:
    """Everything metrics.json reports for a split.

    ``predictions``: also write each sample's prediction there as CSV (`write_predictions`),
    for the statistics metrics.json does not hold (`causalign compare`'s DeLong and McNemar
    tests of two runs, read back by `read_predictions`; error review); with
    ``temperature``, also the calibrated ``pcal_<class>`` columns and
    ``calibration_temperature``.

    ``bootstrap``: also give percentile 95 % intervals (`ci95`, with the `bootstrap` settings)
    of the classification and calibration metrics, and of the localisation and deletion
    means (``ci95["deletion"][fraction]``), from that many stratified resamples of the split
    (`bootstrap_ci`, seeded by ``bootstrap_seed``; a localisation mean is resampled over the
    annotated samples each resample draws); 0 (the default) gives none. Checked before the
    pass.

    ``reliability``: also draw the split's reliability diagram there
    (`report.figures.reliability_diagram`, titled ``reliability_title``, default the split;
    with ``temperature``, before and after, the after panel naming ``temperature_source``,
    e.g. "fitted on val" or "given").

    ``ece_bins``: the bins of the ECE, its interval and the reliability diagram (15, Guo et
    al.'s, by default); another number is recorded as ``ece_bins``.

    ``roc``: also draw the split's ROC curve there (`report.figures.roc_figure`, titled
    ``reliability_title``; two classes: the argmax's point and ``threshold``'s marked, and
    with ``bootstrap`` the curve's pointwise 95 % band, `metrics.roc.roc_band`).

    ``threshold``: also give the split's ``operating_point`` when class 1 is called for
    ``p ≥ threshold`` (`operating_point_metrics`: sensitivity, specificity, PPV, NPV and the
    confusion counts; with ``bootstrap``, their intervals in ``ci95["operating_point"]``).
    ``positive``: the class called positive (a class name or index; `positive_class`):
    the rates are class ``positive``'s against the rest (`one_vs_rest`); default class 1 of
    a two-class dataset, required for more (`InputError` before the pass otherwise).

    ``chosen_by``: ``(point, val probs, val labels)`` that chose ``threshold`` (all classes'
    probabilities: reduced to ``positive`` against the rest here); with
    ``bootstrap`` and a choosing rule, ``ci95["operating_point_with_threshold"]`` holds the
    threshold's and the rates' intervals with the threshold re-chosen on each val resample
    (`operating_point_bootstrap`; its left-out resamples under
    ``bootstrap["undefined"]["operating_point_with_threshold"]``).

    ``temperature``: also give ``calibration`` of the split's probabilities scaled by it
    (`metrics.calibration.apply_temperature`, a T fitted elsewhere, e.g. on val): ``nll``,
    ``brier`` and ``ece`` after, and ``nll_before``, ``brier_before``, ``ece_before``; every
    other metric stays the unscaled model's. With ``reliability`` the diagram has two panels
    (before, after); with ``bootstrap``, ``ci95["calibration"]`` holds the intervals of the
    scaled Brier and ECE from the same resamples.

    Localisation uses the saliency of the *predicted* class on the input the model sees
    (`method.model_input`); `cam_precision` against the box when the sample has one (else the
    mask), `cam_precision_mask`, `cam_mass_in_mask`, IoU/Dice against the pixel mask.
    Deletion zeroes the top-k pixels of the same map and measures the predicted class's
    probability drop. Runs in eval mode; every module's train/eval flag is restored.

    One pass over the split: the logits that give the prediction (`predict_and_attribute`,
    one forward for Grad-CAM's map and prediction together) also give the classification
    metrics and the deletion baseline, so the model runs 1 + len(fractions) times per batch
    (it ran 4 + len(fractions) times: a separate prediction pass, the prediction again, the
    map's own forward and the deletion baseline).
    """
    if bootstrap != 0:  # a bad count fails now, not after the whole evaluation
        check_bootstrap(bootstrap, bootstrap_seed)
    check_bins(ece_bins)
    if threshold is not None:
        positive = check_threshold(threshold, dataset, positive)
    if temperature is not None:
        check_temperature(temperature)
    with eval_mode(model):
        return _evaluate_split(model, method, dataset, device, saliency, fractions,
                               batch_size, progress, explainer_kwargs or {}, deletion_fill,
                               predictions, bootstrap, bootstrap_seed, reliability,
                               reliability_title, ece_bins, threshold, roc, temperature,
                               chosen_by, positive, temperature_source)


def _nested(flat: dict[str, Any], groups: dict[str, str]) -> dict[str, Any]:
    """``flat`` with each "PREFIX@KEY" entry whose PREFIX is in ``groups`` moved to
    ``[groups[PREFIX]][KEY]``: the per-sample names `bootstrap_ci` was given, as ci95 nests
    them."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        prefix, at, key = name.partition("@")
        if at and prefix in groups:
            out.setdefault(groups[prefix], {})[key] = value
        else:
            out[name] = value
    return out


def check_threshold(threshold: float, dataset: LesionDataset,
                    positive: int | str | None = None) -> int:
    """The positive class's index (`positive_class` of ``dataset``'s classes), or
    `InputError` unless ``threshold`` is a probability in [0, 1] and the class is known."""
    check_probability(threshold)
    return positive_class(positive, dataset.meta.classes)


def _evaluate_split(model: nn.Module, method: Method, dataset: LesionDataset,
                    device: torch.device | str, saliency: str, fractions: tuple[float, ...],
                    batch_size: int, progress: Progress | None,
                    explainer_kwargs: dict[str, Any], deletion_fill: float = 0.0,
                    predictions: str | Path | None = None, bootstrap: int = 0,
                    bootstrap_seed: int = 0, reliability: str | Path | None = None,
                    reliability_title: str | None = None, ece_bins: int = ECE_BINS,
                    threshold: float | None = None, roc: str | Path | None = None,
                    temperature: float | None = None,
                    chosen_by: tuple[Any, Any, Any] | None = None,
                    positive: int | None = None,
                    temperature_source: str | None = None) -> dict:
    note = None
    if saliency in VOLUME_UNSUPPORTED and len(dataset.image_shape) == 4:
        # Grad-CAM's upsampling is 2D-only; localisation still gets a map rather than nothing.
        note = f"{saliency} needs 2D images: localisation and deletion use wbp on volumes"
        saliency, explainer_kwargs = "wbp", {}
    explainer = get_explainer(saliency, model, **explainer_kwargs)
    probs, labels, losses = [], [], []
    local: dict[str, list[Tensor]] = {name: [] for name in LOCALISATION_METRICS}
    # per sample: whether its map is empty under cam_precision's test (NaN: unannotated)
    empty: list[Tensor] = []
    deletion: dict[float, list[Tensor]] = {f: [] for f in fractions}
    task = None
    if progress is not None:
        task = progress.add_task(f"evaluating {dataset.split}", total=len(dataset))
    batches = iterate_batches(dataset, eval_batch_size(dataset, batch_size, device),
                              device=device)
    for batch in batches:
        x = _input(model, method, batch)
        try:
            logits, maps = explainer.predict_and_attribute(x)
        except ConstantMapError:
            # a 1x1 Grad-CAM layer (resnet18 under 33 px; every batch has the images' size,
            # so the first says it): its map is a constant, by whose rounding noise
            # localisation and deletion ranked pixels; WBP instead, as for volumes
            note = ("gradcam's layer is 1x1 at this image size (a constant map): "
                    "localisation and deletion use wbp")
            saliency, explainer = "wbp", get_explainer("wbp", model)
            logits, maps = explainer.predict_and_attribute(x)
        n_bad = int((~torch.isfinite(logits)).sum())
        if n_bad:  # before the maps' own NaN errors, which would blame the saliency
            raise InputError(f"the model's outputs on split '{dataset.split}' hold {n_bad} "
                             f"NaN/inf value(s): the model's outputs are not finite")
        # as `predict`: float64 probabilities and a summed cross-entropy, kept on the device
        # (no sync per batch) and classified once at the end
        losses.append(F.cross_entropy(logits.float(), batch["label"], reduction="none"))
        probs.append(_probs(logits))
        labels.append(batch["label"])
        pred = logits.argmax(1)
        maps = saliency_map(maps)  # float64 maps stay float64 (their ranking for deletion)
        maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
        if maps.dim() == batch["mask"].dim():  # (N,1,...) maps from single-channel reduce
            maps = maps[:, 0]
        ann = batch["has_annotation"]
        has_mask = batch["has_mask"]
        box = batch["box_mask"][:, 0]
        mask = batch["mask"][:, 0]
        # each sample's value, NaN where it does not count: the means below, and
        # the per-sample values `bootstrap_ci` resamples for their intervals
        values = {name: torch.full((len(pred),), float("nan"), dtype=torch.float64,
                                   device=maps.device) for name in LOCALISATION_METRICS}
        is_empty = torch.full_like(values["cam_precision"], float("nan"))
        if ann.any():
            values["cam_precision"][ann] = cam_precision(maps[ann], box[ann]).double()
            is_empty[ann] = normalize_maps(maps[ann])[1].double()  # cam_precision's test
        empty.append(is_empty)
        if has_mask.any():
            values["cam_precision_mask"][has_mask] = cam_precision(
                maps[has_mask], mask[has_mask]).double()
            values["cam_mass_in_mask"][has_mask] = mass_in_mask(
                maps[has_mask], mask[has_mask]).double()
            i, d = iou_dice(maps[has_mask], mask[has_mask])
            values["saliency_iou"][has_mask] = i.double()
            values["saliency_dice"][has_mask] = d.double()
        for name, v in values.items():
            local[name].append(v)
        for frac, drop in deletion_scores(model, x, maps, pred, fractions,
                                          fill=deletion_fill, logits=logits).items():
            deletion[frac].append(drop)
        if task is not None:
            progress.advance(task, len(pred))

    p = torch.cat(probs).cpu().numpy()
    y = torch.cat(labels).cpu().numpy()
    out = classification_metrics(p, y, ece_bins)
    if ece_bins != ECE_BINS:
        out["ece_bins"] = ece_bins
    out["loss"] = _mean_loss(losses)
    out["n"] = int(len(y))
    if threshold is not None:
        # class `positive` against the rest: the two-class code below runs unchanged on it
        # (two classes, positive 1: the very probabilities, the output as before)
        p_op, y_op = one_vs_rest(p, y, positive)
        out["operating_point"] = operating_point_metrics(p_op, y_op, threshold)
    if predictions is not None:
        write_predictions(predictions, dataset, p, temperature)
    scaled = None
    if temperature is not None:
        scaled = apply_temperature(p, temperature)
        after = classification_metrics(scaled, y, ece_bins)
        out["calibration"] = {
            "temperature": float(temperature),
            "nll": negative_log_likelihood(scaled, y), "brier": after["brier"],
            "ece": after["ece"], "nll_before": negative_log_likelihood(p, y),
            "brier_before": out["brier"], "ece_before": out["ece"]}
    if reliability is not None:
        from ..report.figures import reliability_diagram

        title = reliability_title or f"split '{dataset.split}'"
        panels = {title: (p, y)} if scaled is None else {
            f"{title}, before": (p, y),
            # a T fitted on val and one given (another site's) read alike without it
            f"{title}, after T={temperature:.3g}"
            + (f" ({temperature_source})" if temperature_source else ""): (scaled, y)}
        reliability_diagram(panels, reliability, n_bins=ece_bins)
    if roc is not None:
        from ..report.figures import roc_figure

        title = reliability_title or f"split '{dataset.split}'"
        curve = (p, y)
        if threshold is not None:
            # the curve the operating point lies on: the positive class's against the rest
            # (class 1's of two classes, as before; several one-vs-rest curves took no mark)
            curve = (p_op, y_op)
            if p.shape[1] != 2 or positive != 1:
                title = f"{title} · {dataset.meta.classes[positive]} vs rest"
        marks = [("p ≥ 0.5 (argmax)", 0.5)] if p.shape[1] == 2 else []
        if threshold is not None:
            marks.append((f"operating point p ≥ {threshold:.3g}", threshold))
        band = None
        if bootstrap and curve[0].shape[1] == 2:  # the resamples `bootstrap_ci` draws below
            from ..metrics.roc import roc_band

            # drawn by the split's own classes, as `bootstrap_ci` draws (the one-vs-rest
            # labels sort and draw them in another order); class 1 of the curve drawn
            band = {**roc_band(p, y, bootstrap, bootstrap_seed,
                               positive=1 if threshold is None else positive), "positive": 1}
        # names matter only where each class's one-vs-rest curve is drawn (> 2 columns)
        named = ({"class_names": {title: list(dataset.meta.classes)}}
                 if curve[0].shape[1] > 2 else {})
        roc_figure({title: curve}, roc, points={title: marks},
                   bands=None if band is None else {title: band}, **named)
    per_sample = {name: torch.cat(parts) for name, parts in local.items()}
    per_sample["cam_empty_fraction"] = torch.cat(empty)
    counted = {name: v[~v.isnan()] for name, v in per_sample.items()}

    def mean(values: Tensor) -> float | None:
        return float(values.float().mean()) if len(values) else None

    out.update({
        **{name: mean(counted[name]) for name in LOCALISATION_METRICS},
        "cam_empty_fraction": mean(counted["cam_empty_fraction"]),
        "n_annotated": len(counted["cam_precision"]),
        # the samples cam_precision_mask, cam_mass_in_mask and IoU/Dice average (a pixel
        # mask): fewer than n_annotated where some samples have only a box
        "n_mask": len(counted["cam_precision_mask"]),
        "saliency": saliency,
        "deletion": {f"{f:g}": mean(torch.cat(v)) for f, v in deletion.items()},
    })
    hits = attribute_hits(model, method, dataset, device)
    if hits is not None:
        out["attribute_accuracy"] = _attribute_accuracy(hits, dataset.meta.attributes)
    if bootstrap:
        # the localisation and deletion means resampled with the same draws as accuracy
        for f, v in deletion.items():
            per_sample[f"deletion@{f:g}"] = torch.cat(v)
        extra = {k: v.cpu().numpy() for k, v in per_sample.items()}
        names = dataset.meta.attributes if hits is not None else []
        extra.update({f"attribute@{n}": hits[:, j] for j, n in enumerate(names)})
        rates = (operating_point_per_sample(p_op, y_op, threshold) if threshold is not None
                 else {})
        extra.update({f"operating_point@{k}": v for k, v in rates.items()})
        resampled = bootstrap_ci(p, y, bootstrap, bootstrap_seed, per_sample=extra,
                                 ece_bins=ece_bins)
        ci = resampled["ci95"]
        ci["deletion"] = {f"{f:g}": ci.pop(f"deletion@{f:g}") for f in deletion}
        if rates:
            ci["operating_point"] = {k: ci.pop(f"operating_point@{k}") for k in rates}
        if names:  # each attribute's accuracy; not their mean, a mean of ratios
            ci["attribute_accuracy"] = {n: ci.pop(f"attribute@{n}") for n in names}
        if scaled is not None:
            # the same seed and labels draw the same resamples (`_resample_counts`)
            again = bootstrap_ci(scaled, y, bootstrap, bootstrap_seed, ece_bins=ece_bins)
            ci["calibration"] = {k: again["ci95"][k] for k in ("brier", "ece")}
        if "undefined" in resampled["bootstrap"]:
            # named as in ci95: "operating_point@ppv" matched no key a reader has
            resampled["bootstrap"]["undefined"] = _nested(
                resampled["bootstrap"]["undefined"],
                {"deletion": "deletion", "operating_point": "operating_point",
                 "attribute": "attribute_accuracy"})
        if chosen_by is not None and chosen_by[0].chooses:
            # the question ci95.operating_point leaves out: the threshold is a val statistic
            point, p_val, y_val = chosen_by
            again = operating_point_bootstrap(point, *one_vs_rest(p_val, y_val, positive),
                                              p_op, y_op, bootstrap, bootstrap_seed, strata=y)
            ci["operating_point_with_threshold"] = again["ci95"]
            if again["undefined"]:
                resampled["bootstrap"].setdefault("undefined", {})[
                    "operating_point_with_threshold"] = again["undefined"]
        out.update(resampled)
    if note is not None:
        out["saliency_note"] = note
    return out


@torch.no_grad()
def attribute_accuracy(model: nn.Module, method: Method, dataset: LesionDataset,
                       device: torch.device | str, batch_size: int = 256) -> dict | None:
    """For models that predict attributes (``model.attributes(x)`` → logits, e.g. the
    hierarchical X→A→Y model): accuracy of σ(logit) > 0.5 against the annotated attributes,
    per attribute (over samples where it is annotated) and the mean over attributes.
    None when the model predicts no attributes or the split has no annotations."""
    hits = attribute_hits(model, method, dataset, device, batch_size)
    return None if hits is None else _attribute_accuracy(hits, dataset.meta.attributes)


@torch.no_grad()
def attribute_hits(model: nn.Module, method: Method, dataset: LesionDataset,
                   device: torch.device | str, batch_size: int = 256) -> np.ndarray | None:
    """(N, attributes) float64: 1 where the model's σ(logit) > 0.5 matches the annotated
    attribute, 0 where not, NaN where it is not annotated, in the split's order (the
    per-sample values `attribute_accuracy` averages and `bootstrap_ci` resamples). None when
    the model predicts no attributes or the split has no annotations."""
    if not callable(getattr(model, "attributes", None)) or not dataset.meta.attributes:
        return None
    parts = []  # per batch, copied to the host once (no sync per batch)
    with eval_mode(model):
        for batch in iterate_batches(dataset, eval_batch_size(dataset, batch_size, device),
                                     device=device):
            logits = model.attributes(_input(model, method, batch)).float()
            hit = ((logits > 0) == (batch["attributes"] > 0.5)).double()
            parts.append(hit.masked_fill(~batch["attr_known"].bool(), float("nan")))
    hits = torch.cat(parts).cpu().numpy()
    return hits if bool((~np.isnan(hits)).any()) else None


def _attribute_accuracy(hits: np.ndarray, names: list[str]) -> dict:
    known = ~np.isnan(hits)
    per = {n: (float(np.nanmean(hits[:, j])) if known[:, j].any() else None)
           for j, n in enumerate(names)}
    vals = [v for v in per.values() if v is not None]
    return {"mean": float(np.mean(vals)), "per_attribute": per}
