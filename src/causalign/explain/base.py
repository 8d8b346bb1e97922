"""One explainer interface for every saliency method, shaped like Captum's.

    explainer = get_explainer("gradcam", model)
    maps = explainer.attribute(images, target=labels)   # (N, C or 1, *spatial)

`attribute` returns a map with the input's spatial shape (channel dimension C for pixel
methods, 1 for CAM-style methods). `saliency_map` reduces it to (N, *spatial) for metrics.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CausalignError, InputError, unknown_name

_EXPLAINERS: dict[str, Callable[..., Explainer]] = {}

# What `attribute` accepts as a target: a class for all inputs or one class per input.
Target = Tensor | int | Sequence[int] | np.ndarray | None


class Explainer:
    """Base class: `Explainer(model).attribute(inputs, target=...)`."""

    name: str = "base"

    def __init__(self, model: nn.Module) -> None:
        # a torch.compile'd model is explained through its eager module (same parameters):
        # the explainers' hooks do not reach a graph Dynamo has already traced
        self.model = eager_module(model)

    def attribute(
        self, inputs: Tensor, target: Target = None, create_graph: bool = False
    ) -> Tensor:
        """The map of ``target``'s logit for each input of ``inputs`` (N, C, *spatial):
        shape (N, C, *spatial) for pixel methods, (N, 1, *spatial) for CAM-style ones.

        ``target``: one class for every input (an int), one per input (tensor, sequence or
        array of class indices), or None for the model's prediction. Computed in eval mode;
        detached unless ``create_graph`` (then differentiable in the model's parameters, for
        training through the map, where the method supports it). Subclasses implement it."""
        raise NotImplementedError

    def predict_and_attribute(self, inputs: Tensor,
                              target: Target = None) -> tuple[Tensor, Tensor]:
        """(logits, map of the predicted class), both detached, in eval mode.

        Evaluation needs the logits (accuracy, loss, the deletion baseline) and the map of the
        argmax class; this default takes one no-grad forward for the logits and then
        `attribute`. Explainers whose map comes with the logits of its own forward pass
        (Grad-CAM) override it and save that second forward. ``target``: the map of these
        classes instead (as `attribute` takes them; `predict --maps --threshold` explains
        the called class), the logits still the model's own."""
        check_inputs(inputs, target, model=self.model)  # its shape, as `attribute`
        with shape_errors(self.model, inputs, self.name), torch.no_grad(), \
                eval_mode(self.model):
            logits = check_logits(self.model(inputs))
        chosen = logits.argmax(1) if target is None else self._given_target(logits, target)
        return logits.detach(), self.attribute(inputs, target=chosen).detach()

    def _given_target(self, logits: Tensor, target: Target) -> Tensor:
        """A caller's target (not None) resolved to one class per row of ``logits`` and
        checked against their classes, as `attribute` would."""
        resolved = as_target(target)
        if isinstance(resolved, int):
            resolved = torch.full((logits.shape[0],), resolved, dtype=torch.long)
        resolved = resolved.to(logits.device).long().reshape(-1).expand(logits.shape[0])
        check_target_classes(logits, resolved)
        return resolved

    def _target(self, inputs: Tensor, target: Target) -> Tensor:
        """Resolve `target`: None means the predicted class (in eval mode, as mapped)."""
        target = as_target(target)
        if target is None:
            with torch.no_grad(), eval_mode(self.model):
                return check_logits(self.model(inputs)).argmax(dim=1)
        if isinstance(target, int):
            return torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
        return target.to(inputs.device).long().reshape(-1).expand(inputs.shape[0])

    def _checked_model(self, target: Tensor) -> Callable[[Tensor], Tensor]:
        """The model as a function that checks `target` against its number of classes before
        Captum indexes the logits with it (an index error there is a device-side assert on
        CUDA, not a readable message)."""

        def forward(x: Tensor) -> Tensor:
            logits = self.model(x)
            check_target_classes(logits, target)
            return logits

        return forward


def eager_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``_orig_mod``, the same parameters), else
    ``model``: the search and the implicit gradient run it eagerly. Through the compiled
    graph, causal-align's alignment gradient came out silently wrong (backend eager: off by
    13 % of its largest entry, the lean double-backward nodes of ``eval_mode(fold_bn=True)``
    traced into the graph) or failed deep in AOTAutograd (inductor: "donated buffers
    requires create_graph=False"); the caller's own forward (CE) stays compiled. A compiled
    module inside ``nn.DataParallel`` (rewrapped around the eager module, same devices) or
    ``DistributedDataParallel`` (its eager module: a new DDP would broadcast) is unwrapped
    alike: through the wrapper the gradient was off as much, silently.

    Every explainer runs it too: Captum's, zennit's and WBP's hooks on submodules are not
    part of a graph Dynamo traced before they were registered (any forward of the compiled
    model, or one map of another explainer), so Grad-CAM failed ("does not run layer") and
    LRP maps came out silently wrong (after a Grad-CAM map, 0.88 off for values of 1.3e-4).
    """
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        _warn_wrapper_hooks(model)
        return orig
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
            and isinstance(inner, nn.Module) and isinstance(getattr(inner, "_orig_mod", None),
                                                            nn.Module):
        _warn_wrapper_hooks(model, inner)
        if isinstance(model, nn.parallel.DistributedDataParallel) or not model.device_ids:
            return inner._orig_mod  # (a DataParallel without GPUs runs its module as is)
        return nn.DataParallel(inner._orig_mod, device_ids=model.device_ids,
                               output_device=model.output_device, dim=model.dim)
    parts = [m for m in model.modules() if isinstance(getattr(m, "_orig_mod", None),
                                                      nn.Module)]
    if parts:
        # compiled parts inside a container (nn.Sequential(torch.compile(backbone), head)):
        # the same graph problem, one level down. Explained through a view whose compiled
        # parts are their eager modules; the user's model is not changed.
        _warn_wrapper_hooks(*parts)
        return _eager_view(model)
    return model


def _eager_view(module: nn.Module) -> nn.Module:
    """``module`` with every torch.compile'd part replaced by its eager module: a shallow
    copy of each container on the way (same parameters, buffers and hooks; its own
    ``_modules`` dict), the user's module itself left as it is."""
    orig = getattr(module, "_orig_mod", None)
    if isinstance(orig, nn.Module):
        return _eager_view(orig)
    if not any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in module.modules()):
        return module
    view = copy.copy(module)
    view._modules = {name: None if child is None else _eager_view(child)
                     for name, child in module._modules.items()}
    return view


INTERNAL_HOOK = "_causalign_internal_hook"  # attribute set on causalign's own hook functions


def _warn_wrapper_hooks(*wrappers: nn.Module) -> None:
    """Say that hooks registered on a compiled model's wrapper(s) are not run: the eager
    module skips them (an input normalisation as a pre-hook on the torch.compile wrapper
    was silently left out of every map and counterfactual)."""
    # causalign's own (capture_bn_stats' recapture, marked `INTERNAL_HOOK`) are not the
    # user's: a compiled causal-align run warned of them at every generator it built
    n = sum(not getattr(h, INTERNAL_HOOK, False)
            for w in wrappers for h in (*w._forward_pre_hooks.values(),
                                        *w._forward_hooks.values()))
    if n:
        warnings.warn(f"{n} forward hook(s) on the torch.compile wrapper are not run: "
                      f"explanations and counterfactuals run its eager module "
                      f"(model._orig_mod); register them there to keep them",
                      stacklevel=3)


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock causalign holds while it changes ``model`` for one call (hooks
    whose effect depends on the call, in-place flags, patched ``forward``s, train/eval
    flags): two threads explaining one model at once undid each other's changes (a
    counterfactual search failed with "'BatchNorm2d' object has no attribute 'forward'").
    Plain forwards need not take it; code of one's own that changes the model may."""
    with _LOCKS_GUARD:  # one lock per model, also when two threads ask first at once
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    return lock


def this_call_only(module: nn.Module, hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, to be registered on ``module`` for one call, run only for that call: a
    forward of the same module in another thread (a shared model's prediction, another map)
    passes it by. Module hooks are global, so a WBP hook rescaled the input gradient another
    thread took meanwhile (a training step's gradient would have been WBP's) and Grad-CAM's
    kept the other thread's activations. A DataParallel replica (another module object, run
    in a worker thread) still runs it."""
    owner = threading.get_ident()

    def run(m: nn.Module, *args: Any) -> Any:
        if m is module and threading.get_ident() != owner:
            return None
        return hook(m, *args)

    return run


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode, then restore every submodule's own train/eval flag, also when
    the body raises. Maps are taken in eval mode: in train mode BatchNorm would mix the
    samples of a batch and overwrite its running statistics, and dropout would make them
    random. A model already in eval mode is not touched (maps of it from several threads run
    in parallel); one with a module in train mode is switched under `model_lock`, so two
    threads cannot restore each other's flags mid-map (its plain forwards in other threads
    then run in eval mode: share a model between threads in eval mode)."""
    if not any(m.training for m in model.modules()):
        yield model
        return
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            yield model
        finally:
            for m, training in modes:
                m.training = training


def as_target(target: Target) -> Tensor | int | None:
    """A target as None, a Python int or a tensor (lists, tuples and NumPy arrays of class
    indices become tensors; NumPy integer scalars become ints)."""
    if target is None:
        return target
    if isinstance(target, Tensor):
        if target.dtype == torch.bool:  # as for a bool list or array: a mask, not classes
            raise InputError(f"target must hold integer class indices, got {target.dtype}")
        return target
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return int(target)
    try:
        out = torch.as_tensor(np.asarray(target))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"target must be an int, a sequence of class indices or a tensor, "
                         f"got {type(target).__name__}") from exc
    if out.dtype == torch.bool or out.is_floating_point() or out.is_complex():
        raise InputError(f"target must hold integer class indices, got {out.dtype}")
    return out


def check_logits(logits: object, what: str = "saliency") -> Tensor:
    """`logits` if the model returned one (N, classes) tensor, else one clear line (a model
    returning a tuple or dict failed with "'tuple' object has no attribute 'dim'")."""
    if not isinstance(logits, Tensor):
        raise InputError(f"{what} needs a model that returns one (N, classes) logits tensor, "
                         f"got {type(logits).__name__}")
    if logits.dim() != 2:
        raise InputError(f"{what} needs (N, classes) logits, got shape {tuple(logits.shape)}")
    return logits


def check_target_classes(logits: Tensor, target: Tensor) -> None:
    """Fail with one clear line when a resolved target (N,) names a class the model's logits
    (N, classes) do not have."""
    check_logits(logits)
    if target.numel():
        lo, hi = torch.stack(target.aminmax()).tolist()  # one device sync, not two
        if lo < 0:
            raise InputError(f"target must hold non-negative integer class indices "
                             f"(0..{logits.shape[1] - 1}), got {lo}..{hi}")
        if hi >= logits.shape[1]:
            raise InputError(f"target classes must lie in 0..{logits.shape[1] - 1}, got "
                             f"{lo}..{hi}")


def check_inputs(inputs: Tensor, target: Target = None, model: nn.Module | None = None) -> None:
    """Fail with one clear line on inputs no saliency method can explain.

    `inputs` must be a floating-point batch (N, C, *spatial) of finite values (a NaN pixel
    turns Grad-CAM and WBP maps into NaN without an error); a tensor `target` needs one
    non-negative class per input (or one for all). Maps need autograd, so a call inside
    ``torch.inference_mode()`` fails here too. With `model`, the inputs' dtype must be its
    parameters' (see `check_model_dtype`)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("saliency maps need autograd; call attribute outside "
                           "torch.inference_mode()")
    target = as_target(target)
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        kind = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a floating-point tensor (N, C, *spatial), got {kind}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InputError(f"inputs must be a non-empty batch (N, C, *spatial), got shape "
                         f"{tuple(inputs.shape)}")
    if isinstance(target, Tensor):
        if target.dim() > 1 or target.numel() not in (1, inputs.shape[0]):
            raise InputError(f"target must hold one class per input ({inputs.shape[0]}), got "
                             f"shape {tuple(target.shape)}")
        if target.is_floating_point():
            raise InputError("target must hold non-negative integer class indices")
    # One device sync here (attribute() runs inside PPI's training steps); the target's
    # range, negatives included, is checked against the logits by check_target_classes.
    n_bad = int((~torch.isfinite(inputs.detach())).sum())
    if n_bad:
        raise InputError(f"inputs hold {n_bad} NaN/inf value(s); a saliency map of a "
                         f"non-finite image is undefined")
    if isinstance(target, int) and target < 0:
        raise InputError(f"target class must be >= 0, got {target}")
    if model is not None:
        check_model_dtype(model, inputs)


def check_no_batch_statistics(model: nn.Module, inputs: Tensor, what: str,
                              exempt: Container[nn.Module] = (),
                              fix: str = "pass one sample at a time") -> None:
    """One clear line for a batch (N > 1) through a BatchNorm without running statistics
    (``track_running_stats=False``) that is not in ``exempt`` (modules given fixed
    statistics): in eval mode it still normalises over the batch, so each sample's `what`
    would depend on the other samples in its batch (a gradient map by up to its own maximum,
    silently). One sample alone is its own batch and is accepted."""
    if inputs.shape[0] < 2:
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None \
                and m not in exempt:
            raise InputError(f"BatchNorm '{name or type(m).__name__}' has no running "
                             f"statistics (track_running_stats=False): in eval mode it "
                             f"normalises over the batch, so each sample's {what} would "
                             f"depend on the others in its batch; {fix}")


def check_model_dtype(model: nn.Module, inputs: Tensor, autocast_ok: bool = True) -> None:
    """Fail with one clear line when `inputs` and `model`'s floating-point parameters differ
    in dtype (float16 images into a float32 model): torch's own message ("expected scalar
    type Half but found Float", "Input type (double) and bias type (float) should be the
    same") comes from deep inside Captum or zennit and names neither. Under autocast mixed
    dtypes are the point, and a model whose parameters mix dtypes casts by itself: both pass.
    ``autocast_ok=False``: for callers that run the model with autocast off whatever the
    caller's context (the counterfactual search), where mixed dtypes fail as outside it.
    """
    from ..implicit.adjoint import _autocast_on  # both signatures: torch < 2.4 takes no device

    if autocast_ok and _autocast_on(inputs.device.type):
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and inputs.dtype not in dtypes:
        (dtype,) = dtypes
        raise InputError(f"inputs are {inputs.dtype} but {type(model).__name__}'s parameters "
                         f"are {dtype}; cast one to match (inputs.to({dtype}) or "
                         f"model.to({inputs.dtype}))")


def input_shape_hint(model: nn.Module, inputs: Tensor) -> str | None:
    """Why ``inputs`` do not fit ``model``'s first convolution (in module order), or None
    when they do, when the model has no convolution, or for one axis more (a volume a
    multi-view model slices). Consulted only where something has already failed (the
    model, in `shape_errors`; the maps' shape, in `deletion_scores`): a model whose first
    registered conv is not its input layer is never refused for it."""
    conv = next(((n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return None
    name, layer = conv
    d, c = len(layer.kernel_size), layer.in_channels
    axes = ("D", "H", "W")[-d:] if d <= 3 else ("*spatial",)
    takes = f"(N, {c}, {', '.join(axes)})"
    shape = tuple(inputs.shape)
    if (inputs.dim() == d + 2 and shape[1] == c) or inputs.dim() == d + 3:
        # one axis more may be a volume its model slices for a 2D conv (multiview): the
        # first conv says nothing about it
        return None
    if inputs.dim() == d + 1:
        no_channel = "N images without the channel axis? pass inputs.unsqueeze(1)"
        no_batch = "one image without the batch axis? pass inputs.unsqueeze(0)"
        fix = (f"{no_channel}; or {no_batch}" if c == 1 and shape[0] == 1 else no_channel
               if c == 1 else no_batch if shape[0] == c else f"{d + 2} axes needed")
    elif inputs.dim() == d + 2 and shape[-1] == c:
        fix = f"channels-last (N, {', '.join(axes)}, C) order? pass inputs.movedim(-1, 1)"
    elif inputs.dim() == d + 2:
        fix = f"{shape[1]} channel(s), not {c}"
    else:
        fix = f"{inputs.dim()} axes, not {d + 2}"
    label = f"'{name}'" if name else "itself"
    return (f"inputs of shape {shape} do not fit {type(model).__name__}, whose first layer "
            f"{label} ({type(layer).__name__}) takes {takes}: {fix}")


def _raised_at_input_layer(exc: BaseException, model: nn.Module) -> bool:
    """Whether ``exc`` was raised inside ``model``'s first convolution or a submodule
    registered before it (a leading BatchNorm): the layers whose input shape the hint is
    about. A failure further on (a head's "mat1 and mat2 shapes cannot be multiplied" in a
    CoordConv model whose first conv takes more channels than the images have) is another
    problem, and keeps its own error. Read from the traceback, on the failure path only."""
    named = list(model.named_modules())
    conv = next(((n, m) for n, m in named if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None or conv[1] is model:
        return True
    name, layer = conv
    early = set()
    for n, m in named:
        if m is layer:
            early.add(id(m))
            break
        # not the model nor the containers holding the conv: their forward is on the stack
        # of any failure inside them
        if n and not name.startswith(n + "."):
            early.add(id(m))
    inner = {id(m) for m in model.modules() if m is not model and m is not eager_module(model)}
    seen_inner = False
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in early:
            return True
        seen_inner = seen_inner or (owner is not None and id(owner) in inner)
        tb = tb.tb_next
    # no frame of any layer: the traceback cannot say where (a torch.compile'd model fails
    # while Dynamo traces it, in frames of its own), so the hint is given as before
    return not seen_inner


@contextmanager
def shape_errors(model: nn.Module, inputs: object, what: str) -> Iterator[None]:
    """Re-raise the model's own failure on mis-shaped ``inputs`` as one `InputError` line:
    (N, H, W) grayscale images failed in the first conv with "expected input[1, 4, 32, 32]
    to have 1 channels, but got 4 channels" (the batch read as channels) or in a BatchNorm
    with "expected 4D input (got 3D input)", a traceback from deep inside torch, Captum or
    zennit. Other failures, and inputs that fit, keep their own exception."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        text = str(exc).lower()
        # only torch's shape complaints ("expected input[...] to have 1 channels", "mat1 and
        # mat2 shapes cannot be multiplied", a leading BatchNorm's "running_mean should
        # contain 3 elements not 1"): any other failure keeps its own exception
        if isinstance(exc, CausalignError) or not isinstance(inputs, Tensor) \
                or not ("input" in text or "shape" in text or "running_mean" in text):
            raise
        hint = input_shape_hint(model, inputs)
        if hint is None or not _raised_at_input_layer(exc, model):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what}: {hint} (torch: {first})") from exc


_E = TypeVar("_E", bound=Explainer)


def register_explainer(name: str) -> Callable[[type[_E]], type[_E]]:
    """Class decorator: make an `Explainer` subclass available as `get_explainer(name, ...)`
    (and sets its ``name``). The class comes back as itself (typed so: with
    ``type[Explainer]`` a type checker that honours class decorators saw every registered
    explainer as the base class, its own constructor arguments and attributes unknown)."""

    def deco(cls: type[_E]) -> type[_E]:
        cls.name = name
        _EXPLAINERS[name] = cls
        return cls

    return deco


def explainer_names() -> list[str]:
    """The names `get_explainer` accepts, sorted."""
    _load_builtin()
    return sorted(_EXPLAINERS)


def get_explainer(name: str, model: nn.Module, **kwargs: Any) -> Explainer:
    """Build the explainer called `name` for `model` (unknown names list the valid ones);
    ``kwargs`` go to its constructor (e.g. ``layer=`` for gradcam)."""
    _load_builtin()
    if name not in _EXPLAINERS:
        raise unknown_name("saliency method", name, list(_EXPLAINERS))
    return _EXPLAINERS[name](model, **kwargs)


def saliency_map(attribution: Tensor) -> Tensor:
    """Reduce an attribution (N, C, *spatial) to a map (N, *spatial) by summing channels."""
    return attribution.sum(dim=1)


def _load_builtin() -> None:
    # Import modules that register explainers; optional ones may be absent while in progress.
    import importlib

    for mod in ("gradient", "gradcam", "wbp", "lrp", "counterfactual_map"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise
