"""One objective interface for every training method.

A method is an object with ``__call__(model, batch) -> LossOutput``; the trainer never knows
which method runs. Methods also say how to build their model (``build_model``), what the model
sees (``model_input``: the oracle restricts it to the annotation), and may fit statistics on
the training split first (``setup``). Hyper-parameters are a dataclass ``Params`` whose fields
are the valid ``method.<name>`` config keys.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError, did_you_mean, unknown_name, wrong_level

if TYPE_CHECKING:
    from ..data.format import LesionDataset
    from ..engine.config import TrainConfig

_METHODS: dict[str, type[Method]] = {}


@dataclass
class LossOutput:
    """Total loss to minimise and named parts (floats, for logging)."""

    total: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    # Terms of ``total`` that are means over a subset of the batch (annotated samples,
    # converged counterfactuals, ...): name -> (the term as added to ``total``, the number
    # of samples it averages). Data-parallel training re-weights each by the global batch's
    # count, so it stays the mean over the global subset (methods with `subset_means`).
    means: dict[str, tuple[Tensor, int]] = field(default_factory=dict)
    # Parts that are shares of a subset of the batch (causal-align's cf_diverged: of the
    # aligned samples): name -> that subset's size, the weight of this step's value in the
    # epoch's mean (history.csv). Parts not named here are weighted by the batch size.
    part_weights: dict[str, int] = field(default_factory=dict)


@dataclass
class DataInfo:
    """What a method needs to know about the data to build its model."""

    in_channels: int
    num_classes: int
    image_shape: tuple[int, ...]
    attributes: list[str]


@dataclass
class NoParams:
    pass


class Method:
    """Base objective: subclasses implement `loss`; `Params` lists their hyper-parameters."""

    name: str = "base"
    Params: type = NoParams
    # Does the method need annotations (masks/boxes) at training time? The trainer refuses
    # such a method on a training split without any: it would silently train as ERM.
    uses_annotations: bool = False
    # Does `model_input` read the annotation at test time too (the oracle's x·m)? A sample
    # without one is then classified from its full image, which the model never saw
    annotated_input: bool = False
    # True when the loss is only forward passes of the classifier (no torch.autograd.grad,
    # no double backward, no access to its submodules) and the trainer's backward() makes
    # every gradient: then the trainer may hand it a DistributedDataParallel / torch.compile
    # wrapper and run it under bf16 autocast. False (safe default): the bare module, float32,
    # gradients all-reduced after backward (engine/distributed.py).
    plain_forward: bool = False
    # Why a method is not plain_forward, for the trainer's compile/amp warnings: the reason
    # used to be "differentiates through the model twice" for every such method, which is
    # false for ICNN and CDEP (one backward each; they read the model's submodules).
    not_plain_reason: str = ("differentiates through the model twice (autograd.grad / "
                             "double backward)")
    # True when the loss fills `LossOutput.means`: every rank then shares those counts each
    # data-parallel step (one small gather), see engine/distributed.py.
    subset_means: bool = False
    # Set by the trainer: torch.bfloat16 when the `amp` config is on, else None.
    amp_dtype: Any = None
    # Set by setup() when it fitted state that is slow to fit again (a latent-space
    # autoencoder): the trainer then writes a checkpoint before epoch 1, so a run killed in
    # its first epoch resumes with that state instead of fitting it once more.
    checkpoint_after_setup: bool = False
    # Set by the data-parallel trainer before each step (`engine.distributed.GlobalStep`):
    # where this rank's chunk sits in the global batch, so a per-batch cap or draw
    # (causal-align's align_batch and balance, PPI's fraction) applies to the global batch
    # as in one process. None: single process.
    global_step: Any = None
    # Settings added after runs were stored whose default is not the earlier behaviour:
    # key -> the value that reproduces it. A stored run without the key is compared with
    # that value on --resume and when a benchmark collects it (`params_diff`), unless
    # `setting_had_no_effect` says its history shows the setting could not have acted.
    params_before: dict[str, Any] = {}
    # Settings that only place the method's state (same numbers either way, as TrainConfig's
    # device and threads): never a difference on --resume or when a benchmark collects a run
    # (`params_diff`), so a run that ran out of GPU memory can go on with them changed.
    placement_params: tuple[str, ...] = ()
    # The history.csv columns (without "train_") of the terms that guide the model towards
    # the expert evidence, as `loss` logs them in `LossOutput.parts`: the training curves
    # draw them in their fourth panel. Not the classification loss, counts or step flags.
    guidance_terms: tuple[str, ...] = ()
    # Per-class weights of the classification cross-entropy (`ce`), set by the trainer from
    # the `class_weight` setting (`set_class_weight`); None: the plain, unweighted mean.
    class_weight: Tensor | None = None

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def set_class_weight(self, weights: Any) -> None:
        """Weight the classification cross-entropy of every `ce` call per class (a sequence
        of one float per class, as `engine.config.resolve_class_weight` gives), or not
        (None)."""
        self.class_weight = None if weights is None else \
            torch.as_tensor(weights, dtype=torch.float32).detach().cpu().flatten()

    def ce(self, logits: Tensor, y: Tensor, *, batch_term: bool = True) -> Tensor:
        """The cross-entropy of the true labels ``y``: every method's classification term.

        Unweighted (``class_weight`` None) it is ``F.cross_entropy(logits, y)``, the same
        call as before the setting existed (bit-identical). Weighted it is PyTorch's weighted
        mean, Σ w_y·CE / Σ w_y over the rows. Under data-parallel training a term over the
        rank's whole chunk (``batch_term``) divides by the global batch's weight sum
        instead (its labels are in ``global_step``), so the trainer's average of the ranks'
        m·world/N-scaled losses is exactly the single-process weighted mean of the global
        batch, not a mean of per-rank weighted means. A term over a subset of the chunk
        (``batch_term=False``: Chang's factual images, PPI's L_ad rows) stays a per-rank
        weighted mean, combined by its count (`LossOutput.means`): exact when the ranks'
        subsets have the same mean weight, an approximation otherwise."""
        if self.class_weight is None:
            return F.cross_entropy(logits, y)
        # bf16 logits (amp) are upcast by cross_entropy's autocast rule: weigh in float32
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
        w = self.class_weight.to(device=logits.device, dtype=dtype)
        gs = self.global_step
        if not batch_term or gs is None or len(y) != gs.sizes[gs.rank] \
                or "label" not in gs.batch:
            return F.cross_entropy(logits, y, weight=w)
        # the chunk's Σ w_y·CE over (m/N)·(the global batch's Σ w_y): the trainer scales it
        # by m·world/N and averages over ranks, giving Σ_ranks Σ w_y·CE / Σ_global w_y
        per = F.cross_entropy(logits, y, reduction="none")
        total_w = w[gs.batch["label"].to(logits.device)].sum()
        return (w[y] * per).sum() / (total_w * (len(y) / gs.n_global))

    def setting_had_no_effect(self, key: str, history: list[dict]) -> bool:
        """True when a stored run's history.csv rows show that setting ``key`` (one of
        `params_before`) could not have changed that run."""
        return False

    def setup(  # noqa: B027 - optional hook
        self, train_set: LesionDataset, model: nn.Module
    ) -> None:
        """Fit anything that depends on the training split (statistics, caches)."""

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called by the trainer before each training epoch (1-based), for loss schedules."""

    def build_model(self, cfg: TrainConfig, info: DataInfo) -> nn.Module:
        from ..errors import CausalignError
        from ..models import VOLUME_MODELS, build_model

        volume = len(info.image_shape) == 4
        if volume and cfg.model not in VOLUME_MODELS:
            raise CausalignError(
                f"model '{cfg.model}' takes 2D images (C,H,W); this dataset holds volumes of "
                f"shape {info.image_shape} (use --model multiview)")
        if not volume and cfg.model in VOLUME_MODELS:
            raise CausalignError(f"model '{cfg.model}' takes volumes (C,D,H,W); this dataset "
                                 f"holds 2D images of shape {info.image_shape}")
        return build_model(cfg.model, info.in_channels, info.num_classes, width=cfg.width,
                           image_shape=info.image_shape, options=cfg.model_args)

    def classifier_autocast(self, device: torch.device | str) -> Any:
        """Context for a classifier forward that may run in bf16 when `amp` is on; keep
        counterfactual inner loops, CG and saliency maps outside it (float32)."""
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.amp_dtype)

    def model_input(self, batch: dict[str, Tensor]) -> Tensor:
        """The tensor the classifier sees for this batch (same at train and test time)."""
        return batch["image"]

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        """The loss of `model` on `batch`, after checking both: users call methods from their
        own training loops with their own models and batches, where a mask without its channel
        axis silently broadcast into an (N, N, H, W) penalty and an (N,) output failed deep in
        cross_entropy ("Expected floating point type for target with class probabilities")."""
        from ..explain.base import shape_errors

        top = check_batch(self.name, batch, self.uses_annotations, model)
        if hasattr(model, "_orig_mod"):  # torch.compile'd (trainer only): no hook to trace
            return self.loss(model, batch)
        handle = model.register_forward_hook(_logits_hook(self.name, top))
        try:
            # (N, H, W) images failed in the model's first conv or BatchNorm (a traceback)
            with shape_errors(model, batch["image"], self.name):
                return self.loss(model, batch)
        finally:
            handle.remove()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Method state saved in checkpoints (e.g. warm-start caches)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional hook
        pass


# What annotation-guided methods read (`_annotation.annotation_region`, the oracle, causal-align).
ANNOTATION_KEYS = ("mask", "has_mask", "box_mask", "has_annotation")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} of shape {tuple(value.shape)}"
    return type(value).__name__


def check_batch(method: str, batch: Any, annotations: bool = False,
                model: nn.Module | None = None) -> int:
    """Fail with one clear line (InputError) on a batch a method cannot use; returns the
    largest label, for `_logits_hook` to check against the model's classes.

    A batch is a dict as `causalign.data.LesionDataset` (and a torch DataLoader over it)
    yields: ``image`` (N, C, *spatial) float, ``label`` (N,) int64 and, for methods that use
    annotations, ``mask`` and ``box_mask`` (N, 1, *spatial) and ``has_mask`` and
    ``has_annotation`` (N,) bool, masks holding values in [0, 1], every pixel finite. Shapes
    and dtypes cost no device sync; the pixel and mask values one."""
    from ..explain.base import check_model_dtype

    if not isinstance(batch, Mapping):
        raise InputError(f"{method} needs a batch dict (as LesionDataset yields), got "
                         f"{type(batch).__name__}")
    need = ("image", "label", *(ANNOTATION_KEYS if annotations else ()))
    missing = [k for k in need if k not in batch]
    if missing:
        raise InputError(f"{method} needs batch keys {', '.join(need)} (as "
                         f"causalign.data.LesionDataset yields them); missing: "
                         f"{', '.join(missing)}")
    x = batch["image"]
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 \
            or x.shape[0] == 0:
        raise InputError(f"{method}: batch['image'] must be a non-empty floating-point tensor "
                         f"(N, C, *spatial), got {_describe(x)}")
    n = x.shape[0]
    y = batch["label"]
    if not isinstance(y, Tensor) or y.dtype != torch.long or tuple(y.shape) != (n,):
        raise InputError(f"{method}: batch['label'] must be an int64 tensor of shape ({n},) "
                         f"(one class index per image), got {_describe(y)}")
    ids = batch.get("index")
    if ids is not None and not (isinstance(ids, Tensor) and tuple(ids.shape) == (n,)):
        # a list failed in causal-align with "only integer tensors of a single element can be
        # converted to an index"
        raise InputError(f"{method}: batch['index'] (dataset indices, optional) must be a "
                         f"tensor of shape ({n},), got {_describe(ids)}")
    if annotations:
        region = (n, 1, *x.shape[2:])
        for key in ("mask", "box_mask"):
            m = batch[key]
            if isinstance(m, Tensor) and m.dim() == x.dim() + 1 and m.shape[0] == n \
                    and m.shape[1] == 1 and m.shape[2:] == x.shape[1:]:
                # the mask was blamed ("must have shape (4, 1, 32)") for an image without
                # its channel axis
                raise InputError(f"{method}: batch['image'] {tuple(x.shape)} has no channel "
                                 f"axis (its {key} is {tuple(m.shape)}): images are (N, C, "
                                 f"*spatial); pass image.unsqueeze(1)")
            if not isinstance(m, Tensor) or tuple(m.shape) != region or m.is_complex():
                raise InputError(f"{method}: batch['{key}'] must have shape {region} (one "
                                 f"channel, the image's spatial size), got {_describe(m)}")
        for key in ("has_mask", "has_annotation"):
            f = batch[key]
            if not isinstance(f, Tensor) or f.dtype != torch.bool or tuple(f.shape) != (n,):
                raise InputError(f"{method}: batch['{key}'] must be a bool tensor of shape "
                                 f"({n},), got {_describe(f)}")
    # Pixel and mask values, in one device sync (the methods already sync for their logged
    # parts). A NaN/inf pixel (a corrupt float image, a zero std in the user's own
    # normalisation) made the loss NaN and, after the optimiser step, the model. Masks weight
    # pixels ((1 - m) outside the lesion, x * m for the oracle): a 0/255 mask read from a PNG
    # gave weights of -254 and a silently wrong loss.
    graded = [k for k in ("mask", "box_mask") if annotations and batch[k].dtype != torch.bool]
    # The label range rides along: a label outside the model's classes failed in
    # cross_entropy ("Target 5 is out of bounds"; on CUDA a device-side assert), and -100
    # (cross_entropy's ignore_index) left CE silent and failed in causal-align naming y* 101.
    counts = torch.stack([y.min(), y.max(), (~torch.isfinite(x)).sum(),
                          *((~((batch[k] >= 0) & (batch[k] <= 1))).sum() for k in graded)])
    low, top, bad_pixels, *bad_masks = counts.tolist()
    if low < 0:
        raise InputError(f"{method}: batch['label'] must hold class indices >= 0, got {low} "
                         f"(cross_entropy's ignore_index is not supported: drop those samples)")
    if bad_pixels:
        rows = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:5])) + (", …" if len(rows) > 5 else "")
        raise InputError(f"{method}: batch['image'] holds {bad_pixels} NaN/inf value(s), in "
                         f"sample(s) {shown} of {n}; the loss and then the weights would be "
                         f"NaN")
    if any(bad_masks):
        k = graded[next(i for i, c in enumerate(bad_masks) if c)]
        lo, hi = batch[k].float().nan_to_num(nan=float("inf")).aminmax()
        raise InputError(f"{method}: batch['{k}'] must hold values in [0, 1] (1 = "
                         f"annotated), got {float(lo):g}..{float(hi):g} (NaN shown as inf); "
                         f"use (mask > 0) for 0/255 masks")
    if model is not None:
        check_model_dtype(model, x)
    return top


def _logits_hook(method: str, top: int | None = None
                 ) -> Callable[[nn.Module, tuple, Any], None]:
    """A forward hook that refuses a model output other than (N, classes >= 2) logits, or
    fewer classes than label ``top`` needs."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[1] < 2:
            raise InputError(f"{method} needs a model that returns (N, classes) logits with "
                             f"classes >= 2 (for two classes end in nn.Linear(d, 2)); "
                             f"{type(module).__name__} returned {_describe(output)}")
        if top is not None and top >= output.shape[1]:
            raise InputError(f"{method}: batch['label'] holds class {top}, but "
                             f"{type(module).__name__} returns {output.shape[1]} logits "
                             f"(classes 0..{output.shape[1] - 1})")

    from ..explain.base import INTERNAL_HOOK  # (here: explain/ is imported on first use)

    # ours, not a user's: eager_module does not warn that the search skips it
    setattr(hook, INTERNAL_HOOK, True)
    return hook


def resolved_params(method: Method) -> dict[str, Any]:
    """Every hyper-parameter of ``method`` with its value, defaults included (stored with a
    run, so a later change of a default is detected instead of silently mixing results)."""
    params = method.params
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}


def params_diff(stored: dict[str, Any], current: dict[str, Any],
                defaults: dict[str, Any] | None = None, before: dict[str, Any] | None = None,
                no_effect: Callable[[str], bool] | None = None,
                ignore: tuple[str, ...] = ()) -> list[str]:
    """'key old -> new' for every hyper-parameter whose value differs.

    A key missing from ``stored`` is a parameter added after the run was trained. Most new
    parameters default to the earlier behaviour, so it differs only when the wanted value
    is not its default (``defaults``; without them every missing key differs). Where the
    default changed the behaviour, ``before`` gives the earlier value (`Method.params_before`)
    and the wanted value is compared with it, unless ``no_effect(key)`` says the setting
    could not have acted on this run. Keys in ``ignore`` (`Method.placement_params`) are
    never a difference."""
    defaults, before = defaults or {}, before or {}
    diffs = []
    for k in sorted((set(stored) | set(current)) - set(ignore)):
        if k not in stored and k in before:
            if current.get(k) != before[k] and not (no_effect and no_effect(k)):
                diffs.append(f"method.{k} {before[k]!r} (before the setting existed) -> "
                             f"{current.get(k)!r}")
            continue
        if k not in stored and k in defaults and current.get(k) == defaults[k]:
            continue
        if stored.get(k) != current.get(k):
            diffs.append(f"method.{k} {stored.get(k)!r} -> {current.get(k)!r}")
    return diffs


def warn_unused_settings(params: Any, rows: Iterable[tuple[str, bool, str]],
                         defaults: Mapping[str, Any] | None = None) -> None:
    """One warning per setting changed from its default that this combination never reads.

    ``rows``: (key, whether the method reads it here, where it is read, e.g. "with
    method.mask=box"). Such a setting was accepted and recorded in config.yaml as if it
    acted; a warning, not a refusal, so runs trained so stay loadable and resumable.
    ``defaults``: the values that count as unchanged (default: ``params``' field defaults;
    hier-align's image level passes its own, e.g. cg_iters 8)."""
    if defaults is None:
        defaults = {f.name: f.default for f in dataclasses.fields(params)}
    for key, used, where in rows:
        value = getattr(params, key)
        if used or value == defaults[key]:
            continue
        shown = (str(value).lower() if isinstance(value, bool)  # as --set takes it
                 else f"{value:g}" if isinstance(value, float) else value)
        warnings.warn(f"method.{key}={shown} has no effect: it is used only {where}",
                      stacklevel=3)


def grad_norm(loss: Tensor, params: list[Tensor]) -> Tensor:
    """‖∂loss/∂params‖ (the graph is kept for the step's real backward); 0 when no
    parameter is trainable or none is used (a frozen f₁ or f₂ of hier-align), where
    autograd would refuse an empty input list."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) \
        if params and loss.requires_grad else ()
    squares = [g.square().sum() for g in grads if g is not None]
    return torch.sqrt(torch.stack(squares).sum()) if squares else loss.detach().new_zeros(())


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    _load_builtin()
    if name not in _METHODS:
        raise unknown_name("method", name, list(_METHODS))
    return _METHODS[name]


def build_method(name: str, args: dict[str, Any] | None = None) -> Method:
    """Instantiate a method, validating its hyper-parameters against `Params`."""
    cls = method_class(name)
    args = dict(args or {})
    valid = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(args) - set(valid))
    if unknown:
        # each with its default: nothing else on the command line shows a method's settings
        listed = ", ".join(f"method.{k}={_default_text(valid[k])}"
                           for k in sorted(valid)) or "(none)"
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} for method '{name}'; "
                          f"valid (with defaults): {listed}"
                          + "".join(wrong_level(k, "method") or _other_methods(k, name)
                                    or did_you_mean(k, valid, "method.") for k in unknown))
    params = cls.Params(**args)
    coerce_params(params)
    check = getattr(params, "validate", None)
    if callable(check):
        check()
    return cls(params)


def _other_methods(key: str, name: str) -> str:
    """"; lam is a setting of causal-align, cdep, …" when other methods have ``key``:
    `train DATA --set method.lam=1` without --method trains erm, which has none."""
    owners = [m for m in sorted(_METHODS) if m != name
              and key in {f.name for f in dataclasses.fields(_METHODS[m].Params)}]
    return f"; {key} is a setting of {', '.join(owners)} (see --method)" if owners else ""


def _default_text(f: dataclasses.Field) -> str:
    """A Params field's default as `--set` takes it (YAML: true/false, '' for empty)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    return "''" if value == "" else str(value)


def coerce_params(params: Any) -> None:
    """Convert each field of a ``Params`` dataclass to its default's type, in place.

    `--set method.lam=1e-3` arrives as the string "1e-3" (YAML 1.1 reads only "1.0e-3" as a
    number) and a YAML `steps: 10.0` as a float; without this, a method's ``validate``
    compares a str with a number (a TypeError traceback) or ``int(17.5)`` silently truncates.
    A value that does not convert, or a NaN/inf float (every weight, rate and threshold here
    must be finite), raises a ConfigError naming the key."""
    if not dataclasses.is_dataclass(params):
        return
    for f in dataclasses.fields(params):
        value, default = getattr(params, f.name), f.default
        if default is dataclasses.MISSING:
            continue
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError
            elif isinstance(default, int):
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                setattr(params, f.name, int(float(value)))
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise ValueError
                setattr(params, f.name, float(value))
            elif isinstance(default, str):
                # `target: no` -> False: not a name; `autoencoder: null` / `[]` became the
                # path "None" / "[]", where space=latent then saved an autoencoder
                if value is None or isinstance(value, (bool, float, list, tuple, dict)):
                    raise ValueError
                setattr(params, f.name, str(value))
        except (TypeError, ValueError, OverflowError):
            kind = type(default).__name__
            raise ConfigError(f"method.{f.name}: expected {kind}, got {value!r}") from None
        if isinstance(default, float) and not math.isfinite(getattr(params, f.name)):
            raise ConfigError(f"method.{f.name} must be a finite number, got {value!r}")


def _load_builtin() -> None:
    import importlib
    import pkgutil

    from .. import methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base":
            importlib.import_module(f"{pkg.__name__}.{info.name}")
