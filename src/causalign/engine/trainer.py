"""Trainer: Adam, seeds, progress bar, history.csv, checkpoint every epoch with resume,
best-on-val selection, run directory with the resolved config, final metrics.json.

The trainer is method-agnostic: it calls `method(model, batch) -> LossOutput`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from .. import __version__
from ..data.format import LesionDataset, check_split_channels, read_meta
from ..errors import (
    CausalignError,
    ConfigError,
    DataError,
    NumericalError,
    TrainingTroubleWarning,
    not_one_of,
)
from ..io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_folder_free,
    folder_lock,
    replace,
    verified_bytes,
)
from ..methods.base import (
    DataInfo,
    Method,
    build_method,
    method_class,
    params_diff,
    resolved_params,
)
from ..models.backbones import BACKBONES
from . import distributed as D
from .config import (
    SAMPLERS,
    TrainConfig,
    apply_overrides,
    load_yaml,
    mps_note,
    resolve_class_weight,
)
from .evaluate import evaluate_split, iterate_batches, predict, quick_metrics
from .progress import progress_bar
from .provenance import content_digest, environment

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
RESUMES = "resumes.json"  # one record per --resume: when, from which epoch, on what machine
# what `Trainer._save_state` writes and `_load_state` needs
_CHECKPOINT_KEYS = ("epoch", "best_epoch", "best_score", "history", "model", "optimizer", "rng")


def resolve_device(name: str | torch.device) -> torch.device:
    """auto | cpu | cuda | cuda:K (or such a torch.device) as a torch.device; anything else,
    or a CUDA device this machine lacks, is a user error (torch.device's own is a
    RuntimeError listing backends)."""
    if isinstance(name, torch.device):  # what a PyTorch caller passes to load_run
        name = str(name)
    if not isinstance(name, str):  # re.fullmatch raised a TypeError on None
        raise CausalignError(f"device must be auto, cpu or cuda[:k], got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and match is None:
        raise CausalignError(f"device must be auto, cpu or cuda[:k], got '{name}'"
                             + mps_note(name))
    if match is not None:
        if not torch.cuda.is_available():
            raise CausalignError(f"device '{name}' requested but CUDA is not available")
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise CausalignError(f"device '{name}': this machine has {count} CUDA device(s) "
                                 f"(cuda:0…cuda:{count - 1})")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def drop_single_last(n: int, batch_size: int, model: nn.Module) -> bool:
    """Whether to drop the final batch of an epoch over ``n`` samples: only when it would
    hold exactly one sample and the model has BatchNorm, whose train-mode statistics of one
    sample are undefined at 1x1 spatial size (a ValueError) and a one-image estimate
    otherwise. The order is reshuffled every epoch, so each sample is still seen over
    epochs; other configurations keep every batch (bit-identical results). A split of a
    single sample (n <= batch_size) keeps its batch: dropping it would leave no step."""
    return n > batch_size and n % batch_size == 1 and has_batchnorm(model)


def recalibrate_batchnorm(model: nn.Module, method: Method, dataset: LesionDataset,
                          batch_size: int, device: torch.device) -> None:
    """Recompute BatchNorm running statistics over ``dataset`` (what the model sees).

    Uses `torch.optim.swa_utils.update_bn` (cumulative average, model mode restored). The
    batches are taken in order, so no sampler randomness is consumed; dropout's is forked.
    """
    if not has_batchnorm(model):
        return
    drop = drop_single_last(len(dataset), batch_size, model)  # as in training
    inputs = (method.model_input(b) for b in iterate_batches(dataset, batch_size,
                                                             device=device, drop_last=drop))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        update_bn(inputs, model)


SPATIAL_KEYS = ("image", "mask", "box_mask")


def dihedral_augment(batch: dict[str, Tensor], generator: torch.Generator
                     ) -> dict[str, Tensor]:
    """Random per-sample flips of H and W (and transposition when H == W), applied alike to
    the image and its masks. Draws from ``generator`` (the sampler's, saved in checkpoints),
    so an interrupted run resumes with the same augmentations. ``out["dihedral"]`` (N, 3)
    bool records what each sample got (flip_h, flip_w, swap; swap only where applied): the
    warm-start caches of causal-align/hier-align keep per-sample offsets in the stored
    orientation (`causalign.explain.counterfactual.dihedral_transform`)."""
    n = len(batch["label"])
    flip_h, flip_w, swap = torch.rand(3, n, generator=generator) < 0.5
    h, w = batch["image"].shape[-2:]
    out = dict(batch)
    out["dihedral"] = torch.stack([flip_h, flip_w, swap & (h == w)], 1).to(
        batch["label"].device)
    for key in SPATIAL_KEYS:
        if key not in out:
            continue
        x = out[key].clone()
        fh, fw, sw = (d.to(x.device) for d in (flip_h, flip_w, swap))
        x[fh] = x[fh].flip(-2)
        x[fw] = x[fw].flip(-1)
        if h == w:
            x[sw] = x[sw].transpose(-2, -1)
        out[key] = x
    return out


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu",
                    digest: dict[str, str] | None = None) -> dict:
    """Load a checkpoint, verifying the SHA-256 written beside it; ``digest["sha256"]``
    receives that of the bytes loaded (the file may be replaced right after)."""
    if not path.exists():
        raise CausalignError(f"{path}: checkpoint not found")
    data = verified_bytes(path)  # .sha256 (or .sha256.pending: killed between renames)
    if data is None:
        raise CausalignError(f"{path}: checkpoint is corrupt or truncated (checksum mismatch)")
    import io

    if digest is not None:
        digest["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        # weights_only: a checkpoint is a pickle, and one received with a run folder (its
        # .sha256 made alongside) ran any code it named when loaded. Only tensors, plain
        # containers and the NumPy array of older checkpoints' RNG state are accepted.
        with _safe_numpy():
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        what = re.search(r"GLOBAL (\S+)", str(exc))
        if what is None:  # not a pickle at all (garbage bytes): damaged, not hostile
            raise CausalignError(f"{path}: cannot read checkpoint (UnpicklingError)") from None
        raise CausalignError(
            f"{path}: refused: the checkpoint holds a Python object other than tensors and "
            f"plain data ({what.group(1)}), which loading could execute; load only "
            f"checkpoints written by causalign") from None
    except Exception as exc:
        raise CausalignError(f"{path}: cannot read checkpoint ({type(exc).__name__})") from None


def _numpy_safe_globals() -> list:
    """What a pickled NumPy array needs: older checkpoints kept NumPy's RNG state as one
    (uint32 keys). Arrays are rebuilt from raw bytes, never by calling stored code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


_NUMPY_SAFE_GLOBALS = _numpy_safe_globals()


def _safe_numpy():
    """The allow-list as a context (torch >= 2.5); older torch reads tensors only, which is
    all that checkpoints written since hold (`_numpy_rng_to_tensor`)."""
    safe = getattr(torch.serialization, "safe_globals", None)
    return safe(_NUMPY_SAFE_GLOBALS) if safe is not None else nullcontext()


def _numpy_rng_to_tensor(state: tuple) -> tuple:
    """NumPy's legacy RNG state with its uint32 key array as an int64 tensor."""
    return (state[0], torch.from_numpy(np.asarray(state[1]).astype(np.int64)), *state[2:])


def _numpy_rng_from_tensor(state: tuple) -> tuple:
    """`_numpy_rng_to_tensor`'s inverse; a state holding an ndarray (older checkpoints) is
    returned as it is."""
    keys = state[1]
    if isinstance(keys, Tensor):
        keys = keys.cpu().numpy().astype(np.uint32)
    return (state[0], keys, *state[2:])


def check_stand_in(state: object, path: Path) -> None:
    """Refuse ``path`` (a run's checkpoint.pt, read because its best.pt is missing) when it
    holds another epoch than the run's best: its weights are the last epoch's, and
    `evaluate`, `explain`, `counterfactual` and `init` reported or started from them as the
    run's best model without a word (a PPI run whose best epoch was 1 of 3 scored val AUC
    0.603 instead of metrics.json's 0.651). A checkpoint of the best epoch itself (a kill
    between checkpoint.pt and best.pt) still stands in."""
    if path.name != CHECKPOINT or not isinstance(state, dict):
        return
    epoch, best = state.get("epoch"), state.get("best_epoch")
    if isinstance(epoch, int) and epoch < 1:
        # the checkpoint a space=latent run writes before epoch 1 (its autoencoder): the
        # classifier's weights are still the random initialisation
        raise CausalignError(f"{path.with_name(BEST)}: missing, and {CHECKPOINT} was written "
                             f"before the run's first epoch finished: no trained weights yet")
    if isinstance(epoch, int) and isinstance(best, int) and best != epoch:
        raise CausalignError(
            f"{path.with_name(BEST)}: missing, and {CHECKPOINT} holds epoch {epoch}, not the "
            f"run's best epoch {best}: its weights are not the run's best model (restore "
            f"{BEST}, or train the run again)")


def init_file(source: str | Path) -> Path:
    """The file `init` names: a run folder's best.pt (else its checkpoint.pt), or the file."""
    path = Path(source)
    if path.is_dir():
        path = path / BEST if (path / BEST).exists() else path / CHECKPOINT
    return path


def init_source(source: str | Path) -> dict[str, str] | None:
    """The resolved file and content digest of `init`, recorded in config.yaml: `init` is
    kept as given, so the same config.yaml rerun elsewhere (a relative path, another
    person's runs/) or after the source run was resumed (a new best.pt) started from other
    weights, silently. None when there is no such file."""
    path = init_file(source)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()[:16]}


def init_weights(model: nn.Module, source: str | Path) -> None:
    """Load model weights from a run folder (best.pt, else checkpoint.pt) or a checkpoint."""
    path = init_file(source)
    if not path.exists():
        raise CausalignError(f"init: {source}: no checkpoint there (a run folder or a .pt file)")
    state = load_checkpoint(path)
    if Path(source).is_dir():  # a run folder without best.pt (a file named is taken as is)
        check_stand_in(state, path)
    weights = state["model"] if isinstance(state, dict) and "model" in state else state
    if not isinstance(weights, dict):
        # a .pt of a tensor or None made `"model" in state` raise (a traceback)
        raise CausalignError(f"init: {path} holds no model weights ("
                             f"{type(weights).__name__}, not a state dict)")
    weights = _init_slice_positions(model, weights)
    problem = state_dict_mismatch(model, weights)
    if problem is not None:
        raise CausalignError(f"init: {path} does not fit this model ({problem[1]})")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CausalignError(f"init: {path} does not fit this model ({first})") from None


def _init_slice_positions(model: nn.Module, weights: dict) -> dict:
    """Fine-tuning a multi-view model on volumes of another depth: its slice-position table
    has max(512, depth) rows for the data at hand, the source run's for its own data, and
    init failed on "position.weight (520, 6) vs (512, 6)". The rows both tables have are
    taken from the source; the model keeps its own size (so --resume and evaluate rebuild it
    from the data as before), rows past the source's keep their fresh initialisation."""
    from ..models import MultiViewCNN

    w = weights.get("position.weight")
    own = getattr(model, "position", None)
    if (not isinstance(model, MultiViewCNN) or not isinstance(w, Tensor) or w.dim() != 2
            or not isinstance(own, nn.Embedding) or w.shape[1] != own.embedding_dim
            or w.shape[0] == own.num_embeddings):
        return weights
    table = own.weight.detach().clone()
    k = min(len(table), len(w))
    table[:k] = w[:k].to(table)
    return {**weights, "position.weight": table}


def dataset_digest(data: Path) -> str | None:
    """A digest of the dataset's dataset.yaml and manifest.csv (labels, splits, attributes,
    annotation files), stored in a run's config.yaml so --resume can tell a dataset
    regenerated or edited in place from the one the run started on; None if unreadable."""
    from ..data.format import MANIFEST, META

    digest = hashlib.sha256()
    try:
        for name in (META, MANIFEST):
            digest.update((data / name).read_bytes())
            digest.update(b"\0")
    except OSError:
        return None
    return digest.hexdigest()[:16]


def _line_ending_forms(text: bytes) -> set[bytes]:
    """`text` as stored, with LF and with CRLF line endings."""
    lf = text.replace(b"\r\n", b"\n")
    return {text, lf, lf.replace(b"\n", b"\r\n")}


def dataset_digest_matches(data: Path, digest: str) -> bool:
    """Whether `data`'s dataset.yaml and manifest.csv give `digest` (`dataset_digest`), as
    stored or with their line endings converted: a manifest opened and saved on Windows
    (CRLF), or checked out by git with autocrlf, is the same dataset, and --resume refused
    it as another one. Its pixels, masks and labels are still compared by
    `data_content_digest`."""
    from ..data.format import MANIFEST, META

    try:
        meta, manifest = ((data / name).read_bytes() for name in (META, MANIFEST))
    except OSError:
        return False
    for m in _line_ending_forms(meta):
        for c in _line_ending_forms(manifest):
            if hashlib.sha256(m + b"\0" + c + b"\0").hexdigest()[:16] == digest:
                return True
    return False


def same_dataset(a: Path, b: Path) -> bool:
    """The same folder, or a copy of it (identical dataset.yaml and manifest.csv)."""
    from ..data.format import MANIFEST, META

    if a.resolve() == b.resolve():
        return True
    try:
        return all((a / f).read_bytes() == (b / f).read_bytes() for f in (META, MANIFEST))
    except OSError:
        return False


def data_info(ds: LesionDataset) -> DataInfo:
    return DataInfo(in_channels=ds.image_shape[0], num_classes=ds.num_classes,
                    image_shape=ds.image_shape, attributes=list(ds.meta.attributes))


def _optional_split(data: Path, split: str) -> LesionDataset | None:
    """The split, or None when it has no samples (allowed for test); other errors raise."""
    try:
        return LesionDataset(data, split)
    except CausalignError as exc:
        if "is empty" not in str(exc):
            raise
        return None


# what the trainer writes into a run folder, atomically (`causalign.io`); the predictions
# CSVs too, or a kill during their write left a '.predictions_val.csv.*.tmp' no resume removed
RUN_OUTPUTS = (CHECKPOINT, BEST, "history.csv", "metrics.json", "config.yaml",
               "predictions_val.csv", "predictions_test.csv")


def _writes_run_folder() -> bool:
    """Whether this process writes the run folder: always, except a data-parallel rank
    other than 0 (torchrun's RANK, or the caller's process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    try:
        return int(os.environ.get("RANK", "0")) == 0 or D.env_world_size() <= 1
    except ValueError:  # init_distributed names a malformed RANK
        return True


def remove_stale_temporaries(run: Path) -> list[Path]:
    """Delete the temporary files that a SIGKILL (or power loss) during an atomic write of
    the run's outputs left behind: ``.NAME.<random>.tmp`` beside NAME, e.g. a whole
    checkpoint's size per kill, which no later write would ever remove. Only the trainer's
    own output names are matched (one process trains a run folder at a time)."""
    removed = []
    for name in RUN_OUTPUTS:
        # ".checkpoint.pt.*.tmp" also matches its digest's ".checkpoint.pt.sha256.pending.*"
        for tmp in run.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def restore_cuda_rng(states: list[Tensor] | None) -> None:
    """Set the CUDA generators from a checkpoint's per-device states. A checkpoint written on
    a node with more GPUs than this one holds more states than there are devices, and
    `torch.cuda.set_rng_state_all` indexed past them (an IndexError): the visible devices
    get the first states, as their indices match."""
    if states is None or not torch.cuda.is_available():
        return
    torch.cuda.set_rng_state_all([s.cpu() for s in states[:torch.cuda.device_count()]])


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    best_epoch: int = 0
    best_score: float = -math.inf
    history: list[dict[str, Any]] | None = None


# history columns that count failed inner solves, as fractions of the aligned samples
TROUBLE_COLUMNS = {
    "train_cg_dropped": "CG missed its tolerance (or, under method.negative_curvature=damping, "
                        "broke down even at method.damping_max), or the Gauss-Newton solve "
                        "was not finite, so the alignment gradient skipped those samples; "
                        "try a larger method.cg_iters, method.damping or method.damping_max "
                        "(or, with method.hvp=finite-difference on a ReLU network, "
                        "method.hvp=exact)",
    "train_fd_fallback": "the finite-difference Hessian products (method.hvp=finite-difference) "
                         "broke CG, so those steps were solved with the Gauss-Newton system "
                         "instead (after method.gn_switch such steps in a row, every later "
                         "step is, without trying the products): on a network of ReLUs or "
                         "max-pools finite differences cross activation switches and are not "
                         "the Hessian; use method.hvp=exact",
    "train_cf_diverged": "the counterfactual search diverged (NaN/inf) and was reset, so the "
                         "alignment term skipped those samples; try a smaller method.inner_lr",
    "train_cf_stuck": "the counterfactual search left x* = x without reaching the target (no "
                      "iterate beat the start), so L_align was 0 for those samples; a "
                      "method.inner_lr too large for method.inner_optimizer overshoots every "
                      "step (try a smaller method.inner_lr), and a method.alpha so large "
                      "that no change pays for itself keeps x too (try a smaller alpha)",
    "train_empty_mask": "PPI's saliency maps had no positive evidence for the label (or the "
                        "hard/box mask kept no point), so L_con/L_ad skipped those images; "
                        "try method.saliency=wbp or a softer mask",
}


def _trouble_columns(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(column, meaning) for every failure counter in `history`: TROUBLE_COLUMNS, and
    hier-align's per-level ones (train_img_cg_dropped, train_attr_cf_diverged, …)."""
    seen = dict.fromkeys(k for row in history for k in row)
    out = []
    for column, meaning in TROUBLE_COLUMNS.items():
        counter = column.removeprefix("train_")
        out += [(c, meaning) for c in seen
                if c == column or (c.startswith("train_") and c.endswith("_" + counter))]
    return out


HISTORY_VAL_METRICS = ("accuracy", "balanced_accuracy", "auc", "loss")


def one_class_notes(train_set: LesionDataset, val_set: LesionDataset,
                    select_metric: str) -> list[str]:
    """One line per split of the run that holds a single class (all its samples one label):
    the training split (the model can only learn a constant; also a training split without
    some declared class, whose output is never trained) and the validation split, on
    which AUC is undefined and the best-epoch selection falls back to balanced accuracy, that
    one class's recall: it picks the epoch that predicts that class most often, not the best
    model (measured: 52 negatives, three epochs tied at 0.538, the last one kept)."""
    notes = []

    def only(ds: LesionDataset) -> str | None:
        present = torch.unique(ds.labels).tolist() if len(ds) else []
        if len(present) != 1:
            return None
        c = int(present[0])
        names = getattr(ds.meta, "classes", None) or []
        named = f" ({names[c]})" if c < len(names) else ""
        return f"class {c}{named}, {len(ds)} sample(s)"

    held = only(train_set)
    if held is not None:
        notes.append(f"the training split holds only {held}: the model cannot learn to tell "
                     f"the classes apart (check the manifest's split and label columns)")
    elif len(train_set):
        # a declared class without a training sample: its output is never trained, and the
        # val/test AUC (over the classes each split holds) does not show it
        names = list(getattr(train_set.meta, "classes", None) or [])
        present = set(torch.unique(train_set.labels).tolist())
        missing = [c for c in range(train_set.num_classes) if c not in present]
        if missing:
            which = ", ".join(f"{c} ({names[c]})" if c < len(names) else str(c)
                              for c in missing)
            notes.append(f"the training split holds no sample of class {which}: the model "
                         f"cannot learn to predict it (check the manifest's split and label "
                         f"columns)")
    held = only(val_set)
    if held is not None and select_metric != "loss":
        on = ("AUC is undefined there, so the best epoch is selected on balanced accuracy "
              "(that class's recall)" if select_metric == "auc" else
              f"the best epoch is selected on {select_metric}")
        notes.append(f"the val split holds only {held}: {on}, which rewards predicting that "
                     f"class, not a better model; add samples of the other class(es) to val")
    return notes


def numerical_trouble(history: list[dict[str, Any]], threshold: float = 0.5) -> list[str]:
    """One line per failure counter of `history` that reached `threshold` in some epoch:
    the run finished, but its alignment term was mostly absent there, which history.csv
    alone leaves for the user to notice."""
    lines = []
    for column, meaning in _trouble_columns(history):
        values = [(row["epoch"], float(row[column])) for row in history
                  if row.get(column) not in (None, "") and math.isfinite(float(row[column]))]
        bad = [epoch for epoch, v in values if v >= threshold]
        if bad:
            worst = max(v for _, v in values)
            lines.append(f"{column} >= {threshold:g} in {len(bad)} of {len(values)} epoch(s) "
                         f"(worst {worst:.2f}): {meaning}")
    return lines


# history columns holding an epoch's mean training cross-entropy of the label (PPI: cls)
CE_COLUMNS = ("train_ce", "train_cls")
EXPLODING_CE = 10.0  # × a constant classifier's ln C


def exploding_loss(history: list[dict[str, Any]], num_classes: int, lr: float) -> list[str]:
    """One line if the mean training cross-entropy of some epoch exceeded EXPLODING_CE times
    a constant classifier's ln C. A run can recover from such an epoch (torchvision's VGG11
    under Adam at lr 1e-3: CE 119 in epoch 1, 6.2 in epoch 2), so its end metrics hide that
    the optimiser overshot; the usual cure is a smaller learning rate."""
    chance = math.log(max(num_classes, 2))
    bad = []
    for row in history:
        for column in CE_COLUMNS:
            value = row.get(column)
            if value not in (None, "") and not float(value) <= EXPLODING_CE * chance:
                bad.append((row["epoch"], float(value)))
                break
    if not bad:
        return []
    worst = max(v for _, v in bad)
    return [f"exploding loss: mean training cross-entropy above {EXPLODING_CE:g} x ln "
            f"{num_classes} = {EXPLODING_CE * chance:.2f} (a constant classifier's "
            f"{chance:.2f}) in {len(bad)} epoch(s), first epoch {bad[0][0]} (worst {worst:.3g}): "
            f"the optimiser overshoots; try a smaller --lr (this run: {lr:g})"]


def sampler_probabilities(labels: Tensor | np.ndarray, num_classes: int,
                          class_names: list[str] | None = None) -> Tensor:
    """Per-sample draw probabilities of ``sampler=balanced``: 1 / (classes present × count
    of the sample's class), so each class is drawn with probability 1 / classes (float64,
    sums to 1). A declared class without a training sample is refused: the sampler could
    not draw it, and the other classes would silently share its share."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    counts = torch.bincount(y, minlength=num_classes)[:num_classes]
    missing = [i for i in range(num_classes) if counts[i] == 0]
    if missing:
        names = [class_names[i] if class_names else str(i) for i in missing]
        raise ConfigError(f"sampler=balanced: the training split has no sample of class "
                          f"{', '.join(names)}, which it could not draw; use sampler=none "
                          f"or add such samples")
    return 1.0 / (num_classes * counts.double()[y])


def epoch_order(labels: Tensor | np.ndarray, num_classes: int, sampler: str,
                generator: torch.Generator) -> Tensor:
    """One epoch's training sample indices: ``none`` a permutation of the split (the order
    `iterate_batches(shuffle=True)` gives, bit for bit); ``balanced`` len(labels) draws with
    replacement by `sampler_probabilities` (PyTorch's WeightedRandomSampler scheme)."""
    n = len(labels)
    if sampler == "none":
        return torch.randperm(n, generator=generator)
    if sampler == "balanced":
        return torch.multinomial(sampler_probabilities(labels, num_classes), n,
                                 replacement=True, generator=generator)
    raise ConfigError(not_one_of("sampler", sampler, SAMPLERS))


class Trainer:
    """Train `cfg.method` on DATA into the run folder `out`."""

    def __init__(self, data: str | Path, cfg: TrainConfig | Mapping[str, Any],
                 out: str | Path, resume: bool = False, progress: bool = True,
                 name: str | None = None) -> None:
        if isinstance(cfg, Mapping):  # {"method": "oracle", "epochs": 3}, as --config reads
            # a run's config.yaml loaded whole works, as with --config: its provenance
            # (data, digests, versions, method_params) is no setting ("unknown config key
            # 'data'" before)
            cfg = apply_overrides(TrainConfig(), {k: v for k, v in cfg.items()
                                                  if k not in RUN_METADATA})
        elif not isinstance(cfg, TrainConfig):  # an AttributeError on .validate() before
            raise ConfigError(f"cfg must be a TrainConfig (or a mapping of its keys), got "
                              f"{type(cfg).__name__}")
        cfg.validate()
        self.data = Path(data)
        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        self.show_progress = progress
        # said in its stderr warnings: a benchmark trains many runs in one process
        self.name = name
        self._warned: set[str] = set()  # failure counters already reported (_warn_early)
        self.device = resolve_device(cfg.device)
        self.method: Method = build_method(cfg.method, cfg.method_args)
        # hier-align's first aligned epoch past the last one: the run trained CE + BCE only,
        # exit 0 and no word, with method.align_start recorded in config.yaml as if it acted
        start = getattr(getattr(self.method, "params", None), "align_start", 1)
        if isinstance(start, int) and start > cfg.epochs:
            raise ConfigError(f"method.align_start={start} is after the run's last epoch "
                              f"(epochs {cfg.epochs}): the alignment terms would never act; "
                              f"use method.align_start <= {cfg.epochs} or more epochs")
        # PPI's warm-up covering every epoch: the same silent ERM under PPI's name
        warmup = getattr(getattr(self.method, "params", None), "warmup_epochs", 0)
        if isinstance(warmup, int) and warmup >= cfg.epochs:
            raise ConfigError(f"method.warmup_epochs={warmup} covers every epoch of the run "
                              f"(epochs {cfg.epochs}): the {cfg.method} terms would never act; "
                              f"use method.warmup_epochs < {cfg.epochs} or more epochs")
        self._setups = 0  # fit() calls that reached _setup (a second one rebuilds the method)
        # fail fast, before loading images: a missing/invalid dataset, and a class_weight
        # list whose length is not the dataset's class count
        meta = read_meta(self.data)
        if isinstance(cfg.class_weight, list):
            resolve_class_weight(cfg.class_weight, [], len(meta.classes), list(meta.classes))
        if _writes_run_folder():  # a run still training there: say so, not "already holds a
            check_folder_free(self.out)  # run (pass --resume)" from its first checkpoint
        self._check_out_dir()

    def _check_out_dir(self) -> None:
        ckpt = self.out / CHECKPOINT
        if self.out.exists() and not self.out.is_dir():
            raise CausalignError(f"{self.out}: exists and is not a folder")
        # the run's files (config.yaml, history.csv, checkpoints) went in among the images
        if self.out.resolve() == self.data.resolve():
            raise CausalignError(f"{self.out}: is the dataset folder; choose another --out")
        if ckpt.exists() and not self.resume:
            raise CausalignError(f"{self.out}: already holds a run (pass --resume to continue "
                                 f"it, or choose another --out)")
        # metrics.json without checkpoint.pt: a finished run whose checkpoint was deleted
        # (evaluate needs only best.pt); training into it would silently replace it. (A
        # best.pt alone, e.g. a run of an older version killed in its first epoch between
        # its two saves, holds nothing to resume: restart.)
        if (self.out / "metrics.json").exists() and not ckpt.exists():
            raise CausalignError(f"{self.out}: already holds a finished run (metrics.json) "
                                 f"without {CHECKPOINT} to resume from; choose another --out")
        if self.resume and ckpt.exists():
            stored_cfg = read_run_config(self.out)
            stored, digest = stored_cfg.get("data"), stored_cfg.get("data_digest")
            # another dataset would silently continue (and finally evaluate) the run on it,
            # while config.yaml still names the first. With the stored digest a copy or a
            # moved dataset (same contents) may go on, and a dataset regenerated or edited
            # at the same path may not: its warm-start cache and history belong to other
            # images. Runs from before the digest: a stored path that no longer exists is a
            # moved dataset, and a copy (same manifest) is the same data.
            if isinstance(digest, str):
                if not dataset_digest_matches(self.data, digest):
                    raise CausalignError(
                        f"{self.out}: --resume continues the stored run, but {self.data} "
                        f"is not the dataset it was trained on (its dataset.yaml or "
                        f"manifest.csv differ from when the run started; use a new --out)")
            elif (isinstance(stored, str) and Path(stored).is_dir()
                    and not same_dataset(Path(stored), self.data)):
                raise CausalignError(f"{self.out}: --resume continues the stored run, but it "
                                     f"was trained on {stored}, not {self.data} (use a new "
                                     f"--out)")
            diffs = settings_diff(self.out, self.cfg, self.method)
            if diffs:
                raise CausalignError(f"{self.out}: --resume continues the stored run, but these "
                                     f"settings differ: {'; '.join(diffs)} (use a new --out)")

    def _check_same_contents(self) -> None:
        """Refuse a resume on images, masks or labels that changed since the run started.

        `data_digest` (checked with the folder) covers dataset.yaml and manifest.csv only: an
        image rewritten in place under its name (re-windowed CT, a re-exported mask) went on
        with the stored warm-start cache, scales and history of the old pixels. Runs from
        before `data_content_digest` have none to compare with."""
        stored = read_run_config(self.out).get("data_content_digest")
        if not isinstance(stored, str):
            return
        now = content_digest((self.train_set, self.val_set, self.test_set))
        if now != stored:
            raise CausalignError(
                f"{self.out}: --resume continues the stored run, but the images, masks, "
                f"boxes or labels of {self.data} read differently than when it started "
                f"(same dataset.yaml and manifest.csv: files changed, or a causalign "
                f"version that reads them differently; use a new --out)")

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        # again, not only in __init__: a second fit() of the same Trainer retrained from
        # scratch over the run its first fit() had finished (metrics.json rewritten). Before
        # init_distributed: no rank can have written a checkpoint of this fit yet.
        self._check_out_dir()
        if self._setups:
            # A fit() interrupted (Ctrl-C in a notebook) left its training state in the
            # method: causal-align's step counter (align_every), warm-start caches and raised
            # damping. Calling fit() again before the first checkpoint restarted from that
            # state, not from scratch, so the run differed from an uninterrupted one; from a
            # checkpoint it is overwritten anyway. Start from a fresh method, as a new
            # Trainer (or `causalign train --resume`) does.
            self.method = build_method(self.cfg.method, self.cfg.method_args)
            self._warned.clear()
        self._setups += 1
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        # torchrun's environment (or a caller's process group) → data-parallel; see
        # engine/distributed.py for the design. World size 1 leaves everything as it was.
        self.dist = D.init_distributed(self.cfg.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:
            self.show_progress = False
        # Every rank reads the same splits with the same settings, so under torchrun each
        # printed the same setup warnings (non-binary masks, align_every, amp ...) once per
        # rank. Rank 0 says them; warnings during training (a rank's own batches) still
        # show on every rank.
        with nullcontext() if self.dist.is_main else _warnings_ignored():
            self._setup_run()

    def _setup_run(self) -> None:
        """`_setup` once the process group is joined: data, model, method, checkpoint."""
        if self.resume and self.dist.is_main and not (self.out / CHECKPOINT).exists():
            # allowed (a scheduler's job passes --resume from its first start), but said: a
            # mistyped --out otherwise trained a new run from scratch without a word. Said
            # before the splits are read and the method set up (a latent-space autoencoder
            # trains for minutes there), so a user can stop the run at once.
            warnings.warn(f"{self.out}: --resume found no {CHECKPOINT} to continue; training "
                          f"a new run from epoch 1", stacklevel=2)
        seed_everything(self.cfg.seed, self.cfg.deterministic)
        self.train_set = LesionDataset(self.data, "train")
        if self.cfg.sampler == "balanced":  # a class it cannot draw: refused before training
            sampler_probabilities(self.train_set.labels, self.train_set.num_classes,
                                  list(self.train_set.meta.classes))
            if self.cfg.class_weight == "balanced":
                warnings.warn("sampler=balanced with class_weight=balanced corrects the class "
                              "imbalance twice (balanced draws, then weights against the "
                              "former majority); use one of them", stacklevel=2)
        self._train_eval: LesionDataset | None = None  # `_train_eval_set`, made on first use
        self.val_set = LesionDataset(self.data, "val")
        # Read the test split now, not after training: a corrupt test image must stop the
        # run before hours of training, not after. Peak memory is unchanged, since the final
        # evaluation holds all three splits anyway.
        self.test_set = _optional_split(self.data, "test")
        for other in (self.val_set, self.test_set):
            if other is not None:  # each split is validated only within itself
                check_split_channels(other, self.train_set.image_shape[0],
                                     "the training split's have")
        # a split with one class trained or selected silently (exit 0, a constant model or
        # an arbitrary best epoch): said at once and kept for metrics.json's warnings
        self._class_notes = one_class_notes(self.train_set, self.val_set,
                                            self.cfg.select_metric)
        for note in self._class_notes:
            warnings.warn(note, stacklevel=2)
        if self.method.uses_annotations and not bool(self.train_set.has_box_or_mask.any()):
            # Every sample would skip the annotation term: the run would be ERM under
            # another name, and a results table would not show it.
            raise CausalignError(f"method '{self.cfg.method}' learns from lesion masks or "
                                 f"boxes, but none of the {len(self.train_set)} training "
                                 f"samples has one (use erm, or annotate the data)")
        self.info = data_info(self.train_set)
        self.model = self.method.build_model(self.cfg, self.info)
        if self.dist.enabled and self.cfg.sync_bn:
            if self.device.type != "cuda":
                raise CausalignError("sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif self.cfg.sync_bn:
            # one process has no other rank to synchronise with: say so rather than record
            # sync_bn: true in config.yaml for a run that ran plain BatchNorm
            warnings.warn("sync_bn: training runs in a single process (world size 1), which "
                          "has no other ranks to synchronise with; BatchNorm runs as usual",
                          stacklevel=2)
        # A resumed run's weights come from its checkpoint: its init source may since have
        # moved or been deleted, or be a path relative to another folder (config.yaml keeps
        # it as given), and resuming failed on it for weights it would overwrite anyway.
        if self.cfg.init and not (self.resume and (self.out / CHECKPOINT).is_file()):
            init_weights(self.model, self.cfg.init)
        self.model = self.model.to(self.device)
        self._wrap_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                          weight_decay=self.cfg.weight_decay)
        self.scheduler = None
        if self.cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=self.cfg.epochs)
        created = self.dist.is_main and not self.out.exists()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
        resuming = self.resume and (self.out / CHECKPOINT).exists()
        if self.dist.enabled:  # rank 0's view of the run folder decides (multi-node)
            resuming = D.broadcast_object(resuming)
        if resuming:
            self._check_same_contents()
        ckpt = self._read_checkpoint() if resuming else None
        self.class_weights = self._class_weights(resuming)
        self.method.set_class_weight(self.class_weights)  # before setup: a method may use it
        if ckpt is not None:
            # the method's state first, so setup() skips what the checkpoint holds: a
            # latent-space autoencoder would be retrained (minutes) and then discarded.
            # _load_state loads it again after setup, which may reseed or refit state.
            self.method.load_state_dict(ckpt.get("method_state", {}))
        try:
            self.method.setup(self.train_set, self.model)
        except Exception:
            # a setting the data cannot take (method.target past its classes, ...) left an
            # empty run folder behind
            if created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            raise
        self._warn_sparse_alignment()
        self.generator = torch.Generator().manual_seed(self.cfg.seed)
        self.state = RunState(history=[])
        if ckpt is not None:
            self._load_state(ckpt)
            if self.dist.is_main:
                # history.csv from the checkpoint's rows at once: a kill between writing the
                # two leaves a row the checkpoint lacks, and a resumed finished run trains
                # no epoch that would rewrite a deleted or stale file
                self._write_history()
                self._restore_best()
                if not (self.out / "metrics.json").is_file():  # a finished run trains nothing
                    self._record_resume()
        elif self.dist.is_main:
            resolved = {
                "data": str(self.data.resolve()),
                "data_digest": dataset_digest(self.data),
                # the pixels too: data_digest covers only dataset.yaml and manifest.csv
                "data_content_digest": content_digest((self.train_set, self.val_set,
                                                       self.test_set)),
                # the label and attribute order the model's outputs mean: evaluating it on
                # another dataset (--data, another site) listing them otherwise is refused
                "data_classes": list(self.train_set.meta.classes),
                "data_attributes": list(self.train_set.meta.attributes),
                # the pixel values the model learnt on: another site's images far outside
                # them (16-bit or HU values unscaled) are warned about (`warn_other_intensity`)
                "data_intensity": list(intensity_range(self.train_set)),
                # and their size: another site's images are fed unresized (warned about)
                "data_image_shape": [int(v) for v in self.train_set.image_shape],
                # the import's rule from file values to [0, 1] (folder, BUSI, LIDC patches):
                # `causalign predict` maps new files with it (null: no such import)
                "data_intensity_scale": self.train_set.meta.info.get("intensity_scale"),
                # and which importer made the data, with its options: `predict` preprocesses
                # plain files as it did, also once the dataset has moved (null: not imported)
                "data_import": _import_record(self.train_set.meta.info),
                # the network actually built: bagnet and icnn build their own, so `model`
                # (a setting, default cnn7) did not say what was trained
                "model_class": type(self.model).__name__,
                "model_parameters": sum(int(p.numel()) for p in self.model.parameters()),
                "causalign_version": __version__,
                "torch_version": str(torch.__version__),
                # the weights `init` named when the run started (init is kept as given)
                **({"init_source": init_source(self.cfg.init)} if self.cfg.init else {}),
                # the per-class weights class_weight resolved to (balanced: from the
                # training labels), so the run shows the numbers its CE used
                **({"class_weight_values": self.class_weights}
                   if self.class_weights is not None else {}),
                # commit, versions, machine and thread count: what makes a rerun
                # bit-identical (README "Reproducibility")
                "environment": environment(self.device, self.dist.world),
                **self.cfg.to_dict(),
                "method_params": resolved_params(self.method),
            }
            record = {"method_params": resolved.pop("method_params")}
            # method_params is what users edit first (every hyper-parameter is listed there),
            # but only method_args is read back: the file says so where the edit would go
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False)
                              + "# method_params: the method's resolved settings, a record "
                                "(compared on --resume); edit method_args to change one\n"
                              + yaml.safe_dump(record, sort_keys=False))
            if self.method.checkpoint_after_setup:  # e.g. a freshly trained autoencoder
                self._save_state()

    def _class_weights(self, resuming: bool) -> list[float] | None:
        """The per-class CE weights of `class_weight` (`resolve_class_weight`). A resumed run
        keeps those its config.yaml records: the training labels are the same (its data
        digests are checked), but a rule changed by a later version must not change the
        loss of a run halfway."""
        weights = resolve_class_weight(self.cfg.class_weight, self.train_set.labels,
                                       self.train_set.num_classes,
                                       list(self.train_set.meta.classes))
        if resuming and weights is not None:
            stored = (read_run_config(self.out).get("class_weight_values")
                      if self.dist.is_main else None)
            if self.dist.enabled:
                stored = D.broadcast_object(stored)
            if stored is not None:
                if not (isinstance(stored, list) and len(stored) == len(weights) and all(
                        isinstance(w, int | float) and not isinstance(w, bool)
                        and math.isfinite(w) and w >= 0 for w in stored)):
                    raise CausalignError(f"{self.out / 'config.yaml'}: class_weight_values "
                                         f"must list {len(weights)} finite weights >= 0 (one "
                                         f"per class), got {stored!r}")
                weights = [float(w) for w in stored]
        return weights

    def _record_resume(self) -> None:
        """Append this resume's machine to OUT/resumes.json: config.yaml's `environment` is
        the first start's, so a run resumed on another machine, torch or thread count (which
        change the bits, README "Reproducibility") said nothing of it."""
        path = self.out / RESUMES
        try:
            past = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        except (OSError, ValueError):  # unreadable: kept beside, a fresh list is started
            past = None
        if not isinstance(past, list):
            replace(path, path.with_name(path.name + ".unreadable"))
            past = []
        past.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "from_epoch": self.state.epoch,
                     "environment": environment(self.device, self.dist.world)})
        atomic_write_json(path, past)

    def _save_state(self) -> None:
        ckpt = {
            "epoch": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "best_score": self.state.best_score,
            "history": self.state.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "method_state": self.method.state_dict(),
            "config": self.cfg.to_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                # as a tensor: the checkpoint then holds no NumPy object, so plain
                # torch.load (weights_only by default) reads it too
                "numpy": _numpy_rng_to_tensor(np.random.get_state()),
                "python": random.getstate(),
                "sampler": self.generator.get_state(),
            },
        }
        atomic_torch_save(self.out / CHECKPOINT, ckpt)

    def _wrap_model(self) -> None:
        """`train_model`: what the method's loss calls. DDP (bucketed all-reduce overlapping
        backward) and torch.compile only for methods that are plain forwards + backward; the
        others get the bare module and `all_reduce_gradients` after backward."""
        self.train_model: nn.Module = self.model
        plain = getattr(self.method, "plain_forward", False)
        if self.dist.enabled:
            D.broadcast_module(self.model)
            if plain:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.compile:
            if plain:
                self.train_model = torch.compile(self.train_model)
            else:
                warnings.warn(f"compile: method '{self.cfg.method}' "
                              f"{self.method.not_plain_reason}, which torch.compile does "
                              f"not support; training it uncompiled", stacklevel=2)
        if self.cfg.amp and not plain:
            # No method opens a Method.classifier_autocast region today: the warning said
            # those "use bf16", so amp seemed to do part of its work; it does none.
            warnings.warn(f"amp: method '{self.cfg.method}' keeps float32: it "
                          f"{self.method.not_plain_reason}; amp has no effect on it",
                          stacklevel=2)
        if self.cfg.amp and plain and self.device.type == "cpu" and not _native_cpu_bf16():
            # bf16 is emulated on such CPUs: measured on a 2-core AVX2 machine, a cnn7 step
            # of 16 images at 32 px took 0.35 s under amp against 0.046 s in float32 (7.6x),
            # and a vgg11 run did not finish; the run looked hung, not slowed by a setting
            warnings.warn("amp: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 "
                          "autocast is emulated and training runs several times slower than "
                          "float32 (measured 7.6x on cnn7); amp is for CUDA, set amp=false "
                          "here", stacklevel=2)
        self.method.amp_dtype = torch.bfloat16 if self.cfg.amp else None

    def _autocast(self):
        """bf16 autocast around a plain-forward method's loss when `amp` is on."""
        if self.cfg.amp and getattr(self.method, "plain_forward", False):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _guard_one_sample(self, batch: dict[str, Tensor]):
        return _one_sample_batchnorm_error(self.cfg, batch, len(self.train_set))

    def _read_checkpoint(self) -> dict:
        if self.dist.enabled:  # rank 0 reads (other nodes may not see its disk), then shares
            ckpt = (load_checkpoint(self.out / CHECKPOINT, map_location="cpu")
                    if self.dist.is_main else None)
            ckpt = D.broadcast_object(ckpt)
        else:
            ckpt = load_checkpoint(self.out / CHECKPOINT, map_location=self.device)
        path = self.out / CHECKPOINT
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:  # e.g. a best.pt copied over it: weights only, no optimizer or RNG state
            raise CausalignError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
        return ckpt

    def _load_state(self, ckpt: dict) -> None:
        path = self.out / CHECKPOINT
        problem = state_dict_mismatch(self.model, ckpt["model"])
        if problem is not None:  # config.yaml edited after the checkpoint was written
            raise CausalignError(f"{path}: does not fit the model that {self.out / 'config.yaml'}"
                                 f" describes ({problem[1]}); use a new --out")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.method.load_state_dict(ckpt.get("method_state", {}))
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        restore_cuda_rng(rng.get("cuda"))
        np.random.set_state(_numpy_rng_from_tensor(rng["numpy"]))
        random.setstate(rng["python"])
        self.generator.set_state(rng["sampler"].cpu())
        self.state = RunState(epoch=ckpt["epoch"], best_epoch=ckpt["best_epoch"],
                              best_score=ckpt["best_score"], history=ckpt["history"])

    # ------------------------------------------------------------------ loop

    def _progress(self):
        return progress_bar(self.show_progress)

    def _train_epoch(self, epoch: int, progress) -> dict[str, float]:
        self.model.train()
        # per key: sample-weighted sum, and the samples of the steps that reported it
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        task = None
        drop = drop_single_last(len(self.train_set), self.cfg.batch_size, self.model)
        n_batches = (len(self.train_set) - drop + self.cfg.batch_size - 1) // self.cfg.batch_size
        if progress is not None:
            task = progress.add_task(f"epoch {epoch}/{self.cfg.epochs}", total=n_batches)
        if self.dist.enabled:
            if self.cfg.augment != "none":
                raise CausalignError("augment is not supported with torchrun yet (the global "
                                     "batch's draws would differ per rank); use augment=none")
            return self._train_epoch_distributed(epoch, progress, task, drop)
        for step, batch in enumerate(iterate_batches(
                self.train_set, self.cfg.batch_size, order=self._epoch_order(),
                device=self.device, drop_last=drop)):
            if self.cfg.augment == "dihedral":
                batch = dihedral_augment(batch, self.generator)
            with self._autocast(), self._guard_one_sample(batch):
                out = self.method(self.train_model, batch)
            if not torch.isfinite(out.total):
                raise NumericalError(
                    f"non-finite loss at epoch {epoch} step {step} (parts: {out.parts}); "
                    f"try a lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            self.optimizer.step()
            _accumulate(sums, weights, out.total, out.parts, len(batch["label"]),
                        out.part_weights)
            if task is not None:
                progress.update(task, advance=1, description=f"epoch {epoch}/{self.cfg.epochs} "
                                f"loss {sums['loss'] / weights['loss']:.4f}")
        return _epoch_means(sums, weights)

    def _train_epoch_distributed(self, epoch: int, progress, task, drop: bool
                                 ) -> dict[str, float]:
        """One epoch data-parallel: the single-process global batches, each rank its chunk;
        training loss and parts are sample-weighted means over all ranks."""
        world, rank = self.dist.world, self.dist.rank
        plain = self.train_model is not self.model
        sums: dict[str, float] = {}
        weights: dict[str, int] = {}
        n = len(self.train_set)
        bs = self.cfg.batch_size
        counts: list[tuple[int, int, str, float]] = []  # (step, N, key, count): summed
        batches: list[Tensor] = []  # the epoch's global batches (dataset indices)
        order = self._epoch_order()  # the single process's order: every rank draws it
        for step, start in enumerate(range(0, n - drop, bs)):  # drop: see drop_single_last
            global_idx = order[start:start + bs]
            n_global = len(global_idx)
            local = D.shard_indices(global_idx, rank, world)
            # where this chunk sits in the global batch: per-batch caps and draws inside the
            # method (align_batch, balance, PPI's fraction) then act on the global batch
            self.method.global_step = D.global_step(self.train_set, global_idx, rank, world)
            batches.append(global_idx)
            # DDP needs every rank to run forward+backward; a batch smaller than the world
            # leaves some ranks empty, so it takes the all-reduce-after-backward path.
            use_ddp = plain and n_global >= world
            self.optimizer.zero_grad(set_to_none=True)
            m = len(local)
            out = None
            if m > 0:
                batch = {k: v.to(self.device, non_blocking=True)
                         for k, v in self.train_set.batch(local).items()}
                try:
                    with self._autocast(), self._guard_one_sample(batch):
                        out = self.method(self.train_model if use_ddp else self.model, batch)
                    if not torch.isfinite(out.total):
                        raise NumericalError(
                            f"non-finite loss at epoch {epoch} step {step} on rank {rank} "
                            f"(parts: {out.parts}); try a lower --lr")
                except CausalignError as exc:  # this rank's chunk: the rank must say it
                    raise D.mark_rank_local(exc) from None
            global_counts = None
            if getattr(self.method, "subset_means", False):  # every rank, even an empty one
                global_counts = D.sum_counts(D.gather_objects(
                    {} if out is None else {k: c for k, (_, c) in out.means.items()}, world))
            if out is not None:
                rank_loss = D.reweight_subset_means(out.total, out.means, global_counts, m,
                                                    n_global)
                # mean over the chunk × m·world/N: the rank average is the global-batch mean
                (rank_loss * (m * world / n_global)).backward()
                out.total = rank_loss.detach()  # its share of the global-batch loss: history
                # counts (n_align, ...) add up over ranks; the other parts are chunk means
                counts += [(step, n_global, k, v) for k, v in out.parts.items()
                           if D.is_count_part(k)]
                # a logged subset mean (align) likewise: its share k/K of the global mean,
                # weighted in the epoch's mean as one process weights it: by the global
                # subset's size K where the method names the part in `part_weights` (the
                # global batch's N otherwise)
                counts += [(step, global_counts[k] if k in out.part_weights else n_global, k,
                            out.parts[k] * c / max(global_counts[k], 1))
                           for k, (_, c) in out.means.items()
                           if global_counts is not None and k in out.parts]
                # counts replaced below
                _accumulate(sums, weights, out.total, out.parts, m, out.part_weights)
            if not use_ddp:
                D.all_reduce_gradients(list(self.model.parameters()), world)
            self.optimizer.step()
            if task is not None:
                loss = sums.get("loss", 0.0) / max(weights.get("loss", 0), 1)
                progress.update(task, advance=1, description=f"epoch {epoch}/{self.cfg.epochs} "
                                f"loss {loss:.4f}")
        self.method.global_step = None
        gathered = D.gather_objects((sums, weights, counts), world)
        sums, _ = D.merge_sums([(s, 0) for s, _, _ in gathered])
        weights, _ = D.merge_sums([(w, 0) for _, w, _ in gathered])
        c_sums, c_weights = D.merge_step_counts([c for _, _, c in gathered])
        sums.update(c_sums)  # in place: history's column order stays the single process's
        weights.update(c_weights)
        # the samples whose newest cache entry is this rank's (a balanced draw repeats some)
        self._merge_method_state(D.last_touched(batches, rank, world))
        return _epoch_means(sums, weights)

    def _epoch_order(self) -> Tensor:
        """This epoch's training sample order (`epoch_order` of the `sampler` setting), drawn
        from the run's sampler generator: seeded by `seed`, saved in every checkpoint, so a
        resumed run draws what an uninterrupted one would, and every rank the same."""
        return epoch_order(self.train_set.labels, self.train_set.num_classes,
                           self.cfg.sampler, self.generator)

    def _merge_method_state(self, touched: Tensor) -> None:
        """Make the method's state (warm-start caches, step counter) one again across ranks
        after a data-parallel epoch (`D.merge_method_states`), so the next epoch and the
        checkpoint (rank 0's) see what a single process would have."""
        state = self.method.state_dict()
        # only the cache entries of this rank's samples travel (a cache holds one image-sized
        # offset per sample: all of every rank's would be world × the cache on each rank)
        gathered = D.gather_objects((D.touched_only(state, touched), touched),
                                    self.dist.world)
        if not any(s for s, _ in gathered):
            return
        self.method.load_state_dict(D.merge_method_states(
            [s for s, _ in gathered], [t for _, t in gathered], own=state))

    def _train_eval_set(self) -> LesionDataset:
        """The training samples `train_accuracy` is measured on (`train_eval_samples`): a
        fixed random subset, the same every epoch and on every rank (seeded by the run's
        seed; the manifest's first N may be one class), or the whole split."""
        n = self.cfg.train_eval_samples
        if not 0 < n < len(self.train_set):
            return self.train_set
        if self._train_eval is None:
            g = torch.Generator().manual_seed(self.cfg.seed)
            keep = torch.randperm(len(self.train_set), generator=g)[:n].sort().values
            self._train_eval = self.train_set.restricted(keep)
        return self._train_eval

    def _quick_metrics(self, dataset) -> dict:
        """`quick_metrics`; data-parallel: each rank predicts a chunk, predictions gathered."""
        if not self.dist.enabled:
            return quick_metrics(self.model, self.method, dataset, self.device)
        from ..metrics import classification_metrics

        shard = D.Shard(dataset, self.dist.rank, self.dist.world)
        part = None
        if len(shard):
            probs, labels, loss = predict(self.model, self.method, shard, self.device)
            part = (probs, labels, loss * len(labels))
        parts = [p for p in D.gather_objects(part, self.dist.world) if p is not None]
        probs = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        out = classification_metrics(probs, labels)
        out["loss"] = sum(p[2] for p in parts) / len(labels)
        out["n"] = int(len(labels))
        return out

    def _check_finite_weights(self, epoch: int) -> None:
        """A finite loss can still come with a non-finite gradient on the last step, and
        BatchNorm statistics can overflow on absurd intensities; never checkpoint or evaluate
        a non-finite model (one host sync per epoch)."""
        tensors = list(self.model.parameters()) + [b for b in self.model.buffers()
                                                   if b.is_floating_point()]
        flags = [torch.isfinite(t).all() for t in tensors]
        if flags and not bool(torch.stack(flags).all()):
            raise NumericalError(f"non-finite model weights or BatchNorm statistics after "
                                 f"epoch {epoch}; try a lower --lr or check the input "
                                 f"intensity scale")

    def _score(self, metrics: dict) -> float:
        key = self.cfg.select_metric
        if key == "loss":
            return -metrics["loss"]
        value = metrics.get(key)
        if value is None:  # AUC undefined (one class in val): fall back to balanced accuracy
            value = metrics.get("balanced_accuracy")
        return -math.inf if value is None else value

    def fit(self) -> dict:
        """Train (or resume), select the best epoch on val, evaluate, write metrics.json.

        The process-wide torch settings that `threads` and `deterministic` change are
        restored on return (a caller's later work must not run single-threaded or in
        deterministic mode because of one training run); so are the caller's grad mode and
        default dtype, which training overrides (autograd on, float32). Training seeds the
        global RNGs (torch, CUDA, numpy, Python) from `seed`; the caller's states are put
        back on return, so a notebook's own seeded draws after a train() are the ones they
        would have been without it."""
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.benchmark)
        # Training needs autograd and the data's float32, whatever the caller's context: a
        # call inside torch.no_grad()/inference_mode() failed at the first backward, and
        # torch.set_default_dtype(torch.float64) built float64 weights that the float32
        # batches cannot enter (tracebacks). Both are restored on return.
        # One writer per run folder: the same command launched twice (a job array), or a
        # --resume while the run still trains, trained the run twice over the same files
        # (and deleted the other's in-flight temporaries). Rank 0 alone writes it.
        lock = (folder_lock(self.out, f"causalign train --out {self.out}")
                if _writes_run_folder() else nullcontext())
        with (lock, _float32_default(), _callers_rng(), torch.inference_mode(False),
              torch.enable_grad()):
            return self._fit_restoring(saved)

    def _fit_restoring(self, saved: tuple) -> dict:
        try:
            self._setup()
            try:
                finished = self._finished_metrics()
                return finished if finished is not None else self._fit()
            finally:
                self.dist.close()
        finally:
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            torch.backends.cudnn.benchmark = saved[3]

    def _finished_metrics(self) -> dict | None:
        """--resume of a run that had finished (its checkpoint holds every epoch and its
        metrics.json those epochs and that best epoch): the stored metrics. Re-running the
        final evaluation would cost minutes on real data and rewrite a finished run's
        metrics.json (on a GPU not bit-identically); there is nothing left to do. None when
        training or the final evaluation is still to do (e.g. killed while evaluating)."""
        if not self.resume or self.state.epoch < self.cfg.epochs:
            return None
        metrics = None
        if self.dist.is_main:  # rank 0's disk decides, as for the checkpoint
            try:
                stored = json.loads((self.out / "metrics.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):  # missing or unreadable: evaluate again
                stored = None
            # best.pt gone (deleted by hand): the final evaluation says so, as before
            if (isinstance(stored, dict) and stored.get("epochs") == self.state.epoch
                    and stored.get("best_epoch") == self.state.best_epoch
                    and (self.out / BEST).is_file()):
                metrics = stored
        return D.broadcast_object(metrics) if self.dist.enabled else metrics

    def _fit(self) -> dict:
        main = self.dist.is_main
        with self._progress() as progress:
            for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
                t0 = time.perf_counter()
                self.method.on_epoch_start(epoch)
                row = {"epoch": epoch, **self._train_epoch(epoch, progress)}
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.cfg.bn_recalibrate:
                    recalibrate_batchnorm(self.model, self.method, self.train_set,
                                          self.cfg.batch_size, self.device)
                if self.dist.enabled:  # every rank validates rank 0's BatchNorm statistics
                    D.broadcast_buffers(self.model)
                self._check_finite_weights(epoch)
                train_eval = self._quick_metrics(self._train_eval_set())
                row["train_accuracy"] = train_eval["accuracy"]
                val = self._quick_metrics(self.val_set)
                # history's columns stay these four (metrics.json's per-class recalls are
                # a list and would change the header a resumed run appends to)
                row.update({f"val_{k}": val[k] for k in HISTORY_VAL_METRICS})
                row["seconds"] = time.perf_counter() - t0
                score = self._score(val)
                # ">=": among equally good epochs keep the later, better-trained one
                improved = score >= self.state.best_score
                if improved:
                    self.state.best_score, self.state.best_epoch = score, epoch
                self.state.epoch = epoch
                self.state.history.append(row)
                if main:
                    self._write_history()
                    self._save_state()
                    # best.pt only after the checkpoint that records its epoch: a kill between
                    # the two then leaves a checkpoint whose own weights are the best ones
                    # (restored on resume, `_restore_best`), never a best.pt of an epoch that
                    # --resume reruns (on a GPU not bit-identically) and may not select
                    if improved:
                        self._save_best()
                    # after the epoch is saved: a script that turns the warning into an
                    # error stops here and loses nothing (--resume continues)
                    self._warn_early(row)
            if not self.dist.enabled:
                return self._final_evaluation(progress)
            # rank 0 evaluates and writes metrics.json; the others wait and return its metrics
            metrics = self._final_evaluation(progress) if main else None
            return D.broadcast_object(metrics)

    def _warn_sparse_alignment(self) -> None:
        """Warn when `method.align_every` leaves whole epochs without an alignment step. Its
        step counter runs over the whole run, so align_every=100 with 8 steps an epoch
        aligned on step 0 and then trained plain CE for 12 epochs, without a word."""
        every = getattr(getattr(self.method, "params", None), "align_every", 1)
        if not isinstance(every, int) or every <= 1:
            return
        drop = drop_single_last(len(self.train_set), self.cfg.batch_size, self.model)
        steps = (len(self.train_set) - drop + self.cfg.batch_size - 1) // self.cfg.batch_size
        if steps < 1 or every <= steps:
            return
        epochs = self.cfg.epochs
        aligned = {s // steps for s in range(0, epochs * steps, every)}
        if len(aligned) == epochs:
            return
        warnings.warn(f"method.align_every={every} is more than the {steps} steps of an epoch: "
                      f"{epochs - len(aligned)} of the {epochs} epochs have no alignment step "
                      f"(plain CE; their alignment columns in history.csv stay empty)",
                      stacklevel=2)

    def _warn_early(self, row: dict[str, Any]) -> None:
        """The first epoch in which a failure counter reaches numerical_trouble's threshold
        says so on stderr at once: a run whose alignment term is mostly absent (e.g. CG
        breaking down on every step) should not train for hours before the end-of-run
        warning; so does an exploding loss (`exploding_loss`). Once per counter and run.

        A Python warning (`TrainingTroubleWarning`), not a print: a script or notebook can
        filter it or turn it into an error; the command line shows it as one `warning: …`
        line as before."""
        for line in numerical_trouble([row]) + self._exploding([row]):
            column = line.split(":", 1)[0].split(" ", 1)[0]
            if column not in self._warned:
                self._warned.add(column)
                run = f"{self.name}: " if self.name else ""
                warnings.warn(f"{run}epoch {row['epoch']}: {line}", TrainingTroubleWarning,
                              stacklevel=2)

    def _exploding(self, history: list[dict[str, Any]]) -> list[str]:
        return exploding_loss(history, self.train_set.num_classes, self.cfg.lr)

    def _save_best(self) -> None:
        atomic_torch_save(self.out / BEST, {"epoch": self.state.best_epoch,
                                            "model": self.model.state_dict()})

    def _restore_best(self) -> None:
        """After loading a checkpoint: a kill between checkpoint.pt and best.pt of an epoch
        that improved leaves best.pt of an earlier epoch (or none); that checkpoint's model
        is the best one, so write it."""
        if self.state.epoch == 0:
            return
        if self.state.best_epoch != self.state.epoch:
            self._check_best()
            return
        try:
            if self._best_problem(load_checkpoint(self.out / BEST)) is None:
                return
        except CausalignError:  # missing or damaged: rewritten below
            pass
        self._save_best()  # also over a best.pt of another model (copied from another run)

    def _best_problem(self, best: Any) -> str | None:
        """Why `best` (best.pt's content) is not this run's best epoch, or None. Its epoch
        number alone let another run's best.pt (another architecture) through to the final
        evaluation's load_state_dict, a traceback of dozens of lines."""
        path = self.out / BEST
        if not (isinstance(best, dict) and best.get("epoch") == self.state.best_epoch
                and isinstance(best.get("model"), dict)):
            return f"{path}: holds no weights of epoch {self.state.best_epoch}"
        problem = state_dict_mismatch(self.model, best["model"])
        return None if problem is None else (
            f"{path}: does not fit the model that {self.out / 'config.yaml'} describes "
            f"({problem[1]})")

    def _check_best(self) -> None:
        """The best epoch is an earlier one than the checkpoint's: only best.pt holds its
        weights. Missing, damaged or of another epoch, --resume trained every remaining epoch
        and only then failed in the final evaluation (and again on every later --resume, the
        run could never finish); say so before training. Not for a run with no epoch left,
        whose final evaluation (or stored metrics) comes at once."""
        if self.state.epoch >= self.cfg.epochs:
            return
        path = self.out / BEST
        try:
            problem = self._best_problem(load_checkpoint(path))
        except CausalignError as exc:
            problem = str(exc)
        if problem is not None:
            raise CausalignError(
                f"{problem}; it is the only copy of the run's best epoch "
                f"{self.state.best_epoch} ({CHECKPOINT} holds epoch {self.state.epoch}), so "
                f"the run cannot select its best model: train it again with a new --out")

    def _write_history(self) -> None:
        rows = self.state.history
        keys = history_columns(rows)
        lines = [",".join(keys)]
        for r in rows:
            lines.append(",".join(_fmt(r.get(k)) for k in keys))
        atomic_write_text(self.out / "history.csv", "\n".join(lines) + "\n")

    def _final_evaluation(self, progress) -> dict:
        best = load_checkpoint(self.out / BEST, map_location=self.device)
        problem = state_dict_mismatch(self.model, best["model"]) if isinstance(best, dict) \
            and isinstance(best.get("model"), dict) else ("names", "no model weights")
        if problem is not None:  # e.g. copied from another run after the last epoch
            raise CausalignError(f"{self.out / BEST}: does not fit the model that "
                                 f"{self.out / 'config.yaml'} describes ({problem[1]}); "
                                 f"use a new --out")
        self.model.load_state_dict(best["model"])
        metrics: dict[str, Any] = {
            "method": self.cfg.method,
            "best_epoch": best["epoch"],
            "epochs": self.state.epoch,
        }
        splits = [("val", self.val_set)]
        if self.test_set is None:
            metrics["note"] = "no test split: test metrics omitted"
        else:
            splits.append(("test", self.test_set))
        for name, ds in splits:
            metrics[name] = evaluate_split(
                self.model, self.method, ds, self.device, saliency=self.cfg.eval_saliency,
                fractions=tuple(self.cfg.deletion_fractions), progress=progress,
                deletion_fill=self.cfg.deletion_fill,
                predictions=self.out / f"predictions_{name}.csv")
        train_acc = quick_metrics(self.model, self.method, self.train_set, self.device)
        metrics["train"] = {k: train_acc[k] for k in ("accuracy", "balanced_accuracy", "loss",
                                                       "n")}
        history = self.state.history or []
        trouble = (list(getattr(self, "_class_notes", [])) + numerical_trouble(history)
                   + self._exploding(history))
        if trouble:
            metrics["warnings"] = trouble
        atomic_write_json(self.out / "metrics.json", metrics)
        return metrics


def _accumulate(sums: dict[str, float], weights: dict[str, int], total: Tensor,
                parts: dict[str, float], n: int,
                part_weights: dict[str, int] | None = None) -> None:
    """Add one step's loss and parts, each weighted by the step's ``n`` samples, or by
    ``part_weights[k]`` for a part that is a share of a subset (`LossOutput.part_weights`:
    a step's cf_diverged of 1 aligned sample weighed as much as another's of 16, and the
    epoch's value was not the share of the epoch's aligned samples)."""
    part_weights = part_weights or {}
    for k, v in (("loss", float(total.detach())), *parts.items()):
        w = part_weights.get(k, n)
        sums[k] = sums.get(k, 0.0) + v * w
        weights[k] = weights.get(k, 0) + w


def _epoch_means(sums: dict[str, float], weights: dict[str, int]) -> dict[str, float]:
    """history.csv's train_* columns: each part's sample-weighted mean over the steps that
    reported it. Methods report some parts only on some steps (alignment every n-th step,
    CG statistics only when a batch holds annotated samples); averaging those over every
    sample would dilute them (a CG that always converges would read 0.5). A part no step
    reported stays absent (an empty cell)."""
    return {f"train_{k}": v / max(weights.get(k, 0), 1) for k, v in sums.items()}


@contextmanager
def _one_sample_batchnorm_error(cfg: TrainConfig, batch: dict[str, Tensor], n_train: int
                                ) -> Iterator[None]:
    """BatchNorm's ValueError on a train-mode batch of one sample (only possible with
    batch_size=1, see drop_single_last, or a method's own sub-batch) as one clear line."""
    try:
        yield
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):  # BatchNorm's
            raise
        fix = "use a larger batch_size"
        if len(batch["label"]) > 1:
            what = f"method '{cfg.method}' fed a sub-batch of one sample to the model"
        elif n_train == 1:
            what, fix = "the training split holds a single sample", "add training samples"
        else:
            what = f"batch_size {cfg.batch_size} gives a training batch of one sample"
        raise CausalignError(f"{what}, but model '{cfg.model}' has BatchNorm layers, which "
                             f"need more than one value per channel in training mode; "
                             f"{fix}") from None


def _native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (else autocast emulates it, slowly).
    The probe is private torch API: where it is missing, assume native (no warning)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@contextmanager
def _warnings_ignored() -> Iterator[None]:
    """No warning shown inside (the filters are restored on exit). The caller's filters still
    apply: simplefilter('ignore') overrode -W error, so rank 0 failed at a setup warning while
    the other ranks went on into the first collective and waited there for it."""
    with warnings.catch_warnings(record=True):  # what would be shown is recorded, dropped
        yield


@contextmanager
def _float32_default() -> Iterator[None]:
    """torch's default dtype float32 inside (models are built in the dtype of the data and
    of the checkpoints), the caller's restored after, also on an exception."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@contextmanager
def _callers_rng() -> Iterator[None]:
    """The global RNG states (torch CPU and every CUDA device, numpy, Python) put back on the
    way out. Training seeds them all (`seed_everything`): train() left a caller's seeded
    stream reset to the run's seed, so a notebook's draws after it repeated the run's. (CUDA
    only where available; a checkpoint reads every device's state there anyway.)"""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def history_columns(rows: list[dict[str, Any]]) -> list[str]:
    """history.csv's header: epoch, the method's train_* parts, train_accuracy, val_*,
    seconds, each group in the order its columns first appear. A part first reported in a
    later epoch (hier-align's align_start, align_every beyond an epoch, PPI's warm-up) was
    appended after `seconds`, so one method's runs had different column orders."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def group(k: str) -> int:
        if k == "epoch":
            return 0
        if k == "train_accuracy":
            return 2
        if k.startswith("train_"):
            return 1
        if k.startswith("val_"):
            return 3
        return 5 if k == "seconds" else 4

    return sorted(keys, key=group)  # stable: first-seen order within a group


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def train(data: str | Path, cfg: TrainConfig | Mapping[str, Any], out: str | Path,
          resume: bool = False, progress: bool = True, name: str | None = None) -> dict:
    """Train a model and return its metrics (what `causalign train` does). ``name`` (e.g. a
    benchmark's run key) prefixes the warnings it prints while training."""
    return Trainer(data, cfg, out, resume=resume, progress=progress, name=name).fit()


RUN_METADATA = ("data", "data_digest", "data_content_digest", "data_classes",
                "data_attributes", "data_intensity", "data_image_shape",
                "data_intensity_scale", "data_import", "model_class",
                "model_parameters", "causalign_version",
                "torch_version", "environment", "method_params", "init_source",
                "class_weight_values")


def read_run_config(run: str | Path) -> dict[str, Any]:
    """RUN/config.yaml as a mapping. A missing, empty, unreadable or non-mapping file is a
    user error naming the file (it is hand-editable, and an edit must not end in a
    traceback or, worse, in silently used defaults)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise CausalignError(f"{path}: missing (not a causalign run folder)")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CausalignError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict) or not raw:
        raise CausalignError(f"{path}: not a run configuration (expected a mapping of "
                             f"settings, got {'nothing' if not raw else type(raw).__name__})")
    return raw


def stored_config(run: Path) -> TrainConfig:
    """The resolved TrainConfig saved in RUN/config.yaml (validated: an edited file with an
    unknown key or a bad value is reported as one line naming the file)."""
    from .config import valid_keys

    path = Path(run) / "config.yaml"
    raw = {k: v for k, v in read_run_config(run).items() if k not in RUN_METADATA}
    unknown = sorted(str(k) for k in raw if k not in valid_keys() and k != "method_args")
    if unknown:
        raise CausalignError(f"{path}: unknown setting(s) {', '.join(unknown)} (edited, or "
                             f"written by another causalign version?)")
    try:
        # missing keys keep their defaults (files from versions without them)
        cfg = apply_overrides(TrainConfig(), raw)
        # an edited method_args (method.alpha -1) failed later, in build_method, as a line
        # that did not name the file
        build_method(cfg.method, cfg.method_args)
    except CausalignError as exc:
        raise CausalignError(f"{path}: {exc}") from None
    return _keep_run_params(cfg, stored_method_params(run))


def _keep_run_params(cfg: TrainConfig, stored: dict | None) -> TrainConfig:
    """``cfg`` with the run's own hyper-parameters where this version's defaults differ.

    config.yaml's method_args holds only what the user set; the rest came from the defaults
    of the version that trained the run, recorded in method_params. A default changed since
    (causal-align's cg_iters 3 -> 0 = auto) was applied to the old run: `train --resume`
    refused it as "settings differ: method.cg_iters 3 -> 0 (use a new --out)" with nothing
    changed by the user, and `load_run` (counterfactual, which lends the run's search
    settings) built the method with the new default. Settings added since with a default
    that is not the earlier behaviour (`Method.params_before`) get that earlier value."""
    if not stored:
        return cfg
    try:
        cls = method_class(cfg.method)
        defaults = resolved_params(build_method(cfg.method, {}))
    except CausalignError:
        return cfg
    skip = set(cfg.method_args) | set(cls.placement_params)
    keep = {k: v for k, v in stored.items()
            if k in defaults and k not in skip and v != defaults[k]}
    keep.update({k: v for k, v in cls.params_before.items()
                 if k not in stored and k not in skip and k in defaults})
    if not keep:
        return cfg
    args = {**cfg.method_args, **keep}
    try:
        build_method(cfg.method, args)
    except CausalignError:
        # a stored value this version no longer takes: left to the record, which
        # `settings_diff` names on --resume
        return cfg
    cfg.method_args = args
    return cfg


def stored_method_params(run: Path) -> dict | None:
    """The method's resolved hyper-parameters saved with RUN (None for runs from versions
    that did not store them)."""
    raw = read_run_config(run)
    params = raw.get("method_params")
    return params if isinstance(params, dict) else None


def settings_diff(run: Path, cfg: TrainConfig, method: Method | None = None) -> list[str]:
    """'key stored -> wanted' for every setting in which RUN differs from ``cfg`` (device
    and threads excluded); when those agree, the method's resolved hyper-parameters are
    compared too (runs that stored them), so a changed default is caught as well."""
    from ..models import resolved_model_args

    stored_cfg = stored_config(run)
    stored = stored_cfg.to_dict()
    want = cfg.to_dict()
    if stored_cfg.model == cfg.model:  # an option at its default is no difference
        stored["model_args"] = resolved_model_args(cfg.model, stored_cfg.model_args)
        want["model_args"] = resolved_model_args(cfg.model, cfg.model_args)
    stored_params = stored_method_params(run)
    skip = {"device", "threads"}
    if stored_params is not None and stored.get("method") == want.get("method"):
        # compared below as resolved values: the raw --set strings refused `alpha=1e-3`
        # against a stored 0.001, and a default passed explicitly (`steps=10`)
        skip.add("method_args")
    diffs = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in want.items()
             if k not in skip and stored.get(k) != v]
    if not diffs and stored_params is not None:
        method = method or build_method(cfg.method, cfg.method_args)
        defaults = resolved_params(build_method(cfg.method, {}))
        history: list[dict] | None = None

        def no_effect(key: str) -> bool:
            nonlocal history
            if history is None:
                history = _stored_history(run)
            return method.setting_had_no_effect(key, history)

        diffs = params_diff(stored_params, resolved_params(method), defaults,
                            before=method.params_before, no_effect=no_effect,
                            ignore=method.placement_params)
    return diffs


def _stored_history(run: Path) -> list[dict]:
    """RUN's history.csv rows as {column: text} ([] without one)."""
    import csv

    try:
        with open(run / "history.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []


def data_info_from_disk(data: Path) -> DataInfo:
    """DataInfo from dataset.yaml and the first image, without loading a whole split."""
    from ..data.format import load_array, read_manifest, to_float_image

    meta = read_meta(data)
    # the first record only: the whole manifest is parsed (and checked) where a split is
    # loaded; parsing it here too cost `evaluate` and `explain` two extra parses
    records = read_manifest(data, meta, limit=1)
    if not records:
        raise CausalignError(f"{data}: manifest has no samples")
    path = data / records[0].image
    shape = to_float_image(load_array(path), meta.ndim, path).shape
    return DataInfo(in_channels=shape[0], num_classes=len(meta.classes), image_shape=shape,
                    attributes=list(meta.attributes))


def _import_record(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """dataset.yaml's importer and its options, for a run's config (None: not imported)."""
    importer = info.get("importer")
    if not isinstance(importer, str):
        return None
    options = info.get("options")
    return {"importer": importer, "options": dict(options) if isinstance(options, dict) else {}}


def load_run(run: str | Path, device: str | torch.device = "auto", data: str | Path | None = None
             ) -> tuple[TrainConfig, nn.Module, Method, Path]:
    """Load a run: its config, best model (eval mode), method and dataset path.

    `data` overrides the dataset the run was trained on (e.g. another site)."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise CausalignError(f"{run}: is a file, not a run folder")
    if not run.is_dir():
        raise CausalignError(f"{run}: run folder does not exist")
    raw = read_run_config(run)
    stored_data = raw.get("data")
    if data is None and not (isinstance(stored_data, str) and stored_data):
        # Path("") is ".", which would load whatever dataset the current folder holds
        raise CausalignError(f"{run / 'config.yaml'}: names no dataset (pass --data DIR)")
    data_path = Path(data) if data is not None else Path(stored_data)
    if data is None and not data_path.is_dir():
        raise CausalignError(f"{data_path}: the run's dataset folder does not exist (moved? "
                             f"pass --data DIR)")
    cfg = stored_config(run)
    if cfg.model in BACKBONES and cfg.width != TrainConfig.width:
        # a run from before a width was refused for fixed backbones: it never changed them
        cfg.width = TrainConfig.width
    dev = resolve_device(device)
    method = build_method(cfg.method, cfg.method_args)
    weights = run / BEST if (run / BEST).exists() else run / CHECKPOINT
    # on the CPU: without best.pt this is checkpoint.pt, whose optimiser state and warm-start
    # cache went onto the device only for the weights to be copied out (load_state_dict
    # moves them to the model's device)
    loaded: dict[str, str] = {}
    state = load_checkpoint(weights, map_location="cpu", digest=loaded)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CausalignError(f"{weights}: not a causalign checkpoint (no model weights)")
    check_stand_in(state, weights)
    info = data_info_from_disk(data_path)
    # the checkpoint's dtype, whatever torch's default is; the random initialisation that
    # the checkpoint's weights replace drew from the caller's global RNG (forked: built on
    # the CPU, moved after)
    with _float32_default(), torch.random.fork_rng(devices=[]):
        model = method.build_model(cfg, info)
        _match_slice_positions(model, state["model"])
    model = model.to(dev)
    _load_run_weights(model, state["model"], weights, data_path, info)  # counts first
    _check_run_names(run, raw, model, data_path)  # then names and order
    model.eval()
    # which file and bytes these weights are: a run still training replaces best.pt (or
    # writes its first one) after this read, and hashing the file again later named other
    # weights than the model holds (`causalign counterfactual`'s summary.json)
    model.causalign_weights = {"weights": weights.name, "weights_sha256": loaded.get("sha256")}
    return cfg, model, method, data_path


def _run_names(raw: dict, key: str, stored_data: object) -> list[str] | None:
    """The class or attribute names RUN was trained with: config.yaml's record, else (a run
    from before it was kept) its dataset's dataset.yaml when that folder is still there."""
    names = raw.get(f"data_{key}")
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(stored_data, str) and stored_data and Path(stored_data).is_dir():
        try:
            return list(getattr(read_meta(Path(stored_data)), key))
        except CausalignError:
            return None
    return None


def _check_run_names(run: Path, raw: dict, model: nn.Module, data_path: Path) -> None:
    """Refuse data whose classes (or, for a model predicting attributes, attributes) are
    named or ordered otherwise than the run's. Labels are indices into dataset.yaml's list:
    another site listing [malignant, benign] was scored by index, measured accuracy 0.34 and
    AUC 0.27 for a model at 0.66 / 0.73 on the same images listed [benign, malignant]."""
    meta = read_meta(data_path)
    checks = [("classes", meta.classes)]
    if callable(getattr(model, "attributes", None)):  # hier-align's f1: outputs per attribute
        checks.append(("attributes", meta.attributes))
    for key, here in checks:
        trained = _run_names(raw, key, raw.get("data"))
        if trained is not None and list(here) != trained:
            raise DataError(
                f"{data_path}: {key} {list(here)} are not the run's {trained} ({run} was "
                f"trained with them in that order; outputs are matched by position: list the "
                f"run's names in its order in dataset.yaml, the manifest's {key} to match)")


def intensity_range(ds: LesionDataset, chunk: int = 64) -> tuple[float, float]:
    """The smallest and largest pixel value of a split, as the model sees them (scaled)."""
    lo, hi = math.inf, -math.inf
    for start in range(0, len(ds), chunk):  # in chunks: no float copy of the whole split
        x = ds.image_batch(torch.arange(start, min(start + chunk, len(ds))))
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return lo, hi


def warn_other_intensity(run: Path, ds: LesionDataset) -> None:
    """Warn when ``ds``'s pixel values lie far from those RUN was trained on: images are
    fed as stored (uint8/uint16 scaled to 0..1, float and int16 arrays as they are), so
    another site's float 0..65535 or HU arrays reached a model trained on 0..1 PNGs
    unscaled. Measured: accuracy 0.545, AUC 0.500 for a model at 0.66 / 0.729, no word.
    A run without the record (older versions) is not checked."""
    try:
        trained = read_run_config(run).get("data_intensity")
    except CausalignError:
        return
    if not (isinstance(trained, list) and len(trained) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in trained)):
        return
    lo, hi = float(trained[0]), float(trained[1])
    span = max(hi - lo, 1e-12)
    here_lo, here_hi = intensity_range(ds)
    # a span outside the training range, or one an eighth of it (12-bit values in a 16-bit
    # PNG read as 0..0.06): the synthetic sites' contrast gains (0.75..1.25) stay inside
    # (a constant training split has no span to be narrower than: its own constant images
    # were flagged as "an eighth of it")
    narrow = hi > lo and here_hi - here_lo < span / 8
    if here_lo < lo - span or here_hi > hi + span or narrow:
        warnings.warn(f"{ds.root} ({ds.split}): pixel values {here_lo:.4g}..{here_hi:.4g}, "
                      f"the run was trained on {lo:.4g}..{hi:.4g}; images are not rescaled "
                      f"to the run's range, so its predictions here are probably meaningless "
                      f"(store this site's images as the training site's were)", stacklevel=2)


def warn_other_geometry(run: Path, ds: LesionDataset) -> None:
    """Warn when ``ds``'s images have another height and width than those RUN was trained
    on: they are fed as they are (the classifiers pool globally, so any size runs), and a
    model trained at 32 px evaluated on 48 px images met lesions 1.5× the size it learnt,
    with no word (accuracy 0.44 -> 0.28 on one such pair). A volume's depth may differ.
    A run without the record (older versions) is not checked."""
    try:
        trained = read_run_config(run).get("data_image_shape")
    except CausalignError:
        return
    if not (isinstance(trained, list) and len(trained) >= 3
            and all(isinstance(v, int) for v in trained)):
        return
    here = [int(v) for v in ds.image_shape]
    if here[-2:] != trained[-2:]:
        warnings.warn(f"{ds.root} ({ds.split}): images are {here[-2]}×{here[-1]} px, the run "
                      f"was trained on {trained[-2]}×{trained[-1]}; they are not resized, so "
                      f"lesions reach the model at another scale than it learnt (resample "
                      f"this site's images to the training size)", stacklevel=2)


def _match_slice_positions(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Size a multi-view model's slice-position table as the checkpoint's.

    build_model gives it max(512, depth) rows for the depth of the data at hand, so a run
    trained on volumes deeper than 512 slices rebuilt for other data (--data, another depth)
    had another row count, and loading failed as "does not fit the run's model". The table is
    the run's: volumes deeper than it are then refused by the forward, naming both depths."""
    from ..models import MultiViewCNN

    w = state.get("position.weight")
    if (not isinstance(model, MultiViewCNN) or not isinstance(w, Tensor) or w.dim() != 2
            or w.shape[1] != model.position.embedding_dim
            or w.shape[0] == model.position.num_embeddings):
        return
    old = model.position.weight
    model.position = nn.Embedding(w.shape[0], w.shape[1], device=old.device, dtype=old.dtype)
    model.max_slices = int(w.shape[0])


def state_dict_mismatch(model: nn.Module, state: dict[str, Tensor]) -> tuple[str, str] | None:
    """Why `state` cannot load into `model`, as (kind, first example + count), or None.

    kind is "shape" (same names, other shapes: e.g. another class count) or "names" (another
    architecture). load_state_dict's own message spans dozens of lines."""
    current = model.state_dict()

    def first(items: list[str]) -> str:
        return items[0] + (f" and {len(items) - 1} more" if len(items) > 1 else "")

    shapes = [f"{k} {tuple(v.shape)} vs {tuple(current[k].shape)}" for k, v in state.items()
              if k in current and hasattr(v, "shape") and current[k].shape != v.shape]
    if shapes:
        return "shape", f"parameter shapes differ, checkpoint vs model: {first(shapes)}"
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    if missing or unexpected:
        parts = ([f"missing {first(missing)}"] if missing else []) + (
            [f"unexpected {first(unexpected)}"] if unexpected else [])
        return "names", f"parameter names differ: {'; '.join(parts)}"
    return None


def _load_run_weights(model: nn.Module, state: dict[str, Tensor], weights: Path,
                      data_path: Path, info: DataInfo) -> None:
    """load_state_dict, with a one-line user error when the dataset does not fit the model
    (another class count, channel count or attribute list than the run was trained on)."""
    problem = state_dict_mismatch(model, state)
    if problem is not None and problem[0] == "shape":
        raise CausalignError(
            f"{data_path}: does not fit the run's model ({info.num_classes} classes, "
            f"{info.in_channels} channel(s), {len(info.attributes)} attribute(s) here); "
            f"{problem[1]}")
    if problem is not None:  # not this run's architecture
        raise CausalignError(f"{weights}: does not match the run's model ({problem[1]})")
    model.load_state_dict(state)
