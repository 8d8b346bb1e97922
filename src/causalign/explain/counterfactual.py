"""Counterfactual generator (seed 000 §3, Eq. 2; distances of App. C.4).

    x* = argmin_x  CE(f(x), y*) + α·d(x, x0)

solved per sample by K steps on the batch: Adam (default), ISTA (proximal gradient, sparse
x*) or damped Gauss-Newton (`_gauss_newton`: exact per-sample Newton systems via Woodbury,
few steps to a tight solve). The objective is a *sum* over samples and the model runs in eval
mode (BatchNorm uses fixed statistics: the running ones, or a training batch's captured by
`capture_bn_stats`, as causal-align's default ``bn="batch"`` passes them), so every sample's
problem is independent of the others in its batch — the property the implicit gradient
(causal-align training) relies on.
Each optimiser acts per sample, so a batched run is N separate runs in exact arithmetic; in
floating point the kernels round differently with the batch size, and the non-convex search
can amplify that (up to ~0.04 per pixel measured, README "Reproducibility").

Distances d(x, x0) = Σ_k e(x_k − x0_k) / s_k:

* ``l1``        e(δ) = √(δ² + ε²) − ε  (smooth surrogate of |δ|: its gradient and Hessian exist
  everywhere, which the stationarity condition behind the implicit gradient needs), s = 1;
* ``scaled-l1`` the same divided by the per-pixel MAD over the training images;
* ``l2``        e(δ) = δ², s = 1;
* ``scaled-l2`` δ² divided by the per-pixel standard deviation (the paper's App. C.4 form).

The per-pixel scales are normalised to mean 1, so α means the same for a distance and its
scaled version (the paper's absolute form differs from ours by a constant absorbed in α).

``space="latent"`` searches the code z of a small autoencoder instead (paper §3, "realistic
counterfactuals"): x*(z) = x0 + D(z) − D(z0), z0 = E(x0), with the distance taken on z. The
residual form makes x* = x0 exactly at z = z0, so reconstruction error never shows up as a
"change" (it would otherwise count against the alignment loss everywhere).

Targets y*: binary 1 − y; multi-class the most likely class other than y; "predicted": the
same rule applied to the model's prediction instead of the label (a misclassified sample's
counterfactual then heads for its label, so being wrong is no cheaper a counterfactual); or a
given class (samples already of that class get no counterfactual). Optional warm start from
the previous solution of the same sample (cache keyed by dataset index).

Optional intensity ``bounds`` (lo, hi) keep x* a valid image (default None: unbounded, as
causal-align training uses it). Each pixel's feasible interval is [min(lo, x0), max(hi, x0)],
so x0 itself is always feasible (x* = x0 costs nothing; a pixel already outside the range
never has to move). In pixel space x = u and the search is a true projected method: Adam
and ISTA project u after every step (for l1 the box-constrained proximal step is exactly
the soft-threshold followed by the clamp, the problem being separable per pixel), Newton
fixes the pixels held at a bound by their gradient, solves for the others and projects
along its line search (Bertsekas' projected Newton). In the smooth and latent spaces
x(u) = x0 + D(u) − D(u0) is not a box in u, so there the *image* is clamped,
x(u) = clamp(x0 + D(u) − D(u0)): the search optimises the clamped image it returns, the
distance stays the one on u.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from ..errors import MAX_SETTING, ConfigError, InputError
from ..implicit.adjoint import no_autocast
from ..implicit.fastgrad import patch_modules
from ..implicit.lowrank import lowrank_diag_solve
from ..models.norm import channel_mean_var
from .base import (
    INTERNAL_HOOK,
    check_model_dtype,
    check_no_batch_statistics,
    eager_module,
    model_lock,
    shape_errors,
)

if TYPE_CHECKING:
    from ..data.format import LesionDataset

__all__ = [
    "DISTANCES", "OPTIMIZERS", "SPACES", "CounterfactualGenerator", "CounterfactualResult",
    "GaussianSmoother", "InnerProblem", "logit_curvature",
    "WarmStartCache", "capture_bn_stats", "counterfactual_targets", "is_target_rule",
    "distance_curvature", "distance_scale", "distance_value", "eval_mode",
]

DISTANCES = ("l1", "scaled-l1", "l2", "scaled-l2")
SPACES = ("pixel", "latent", "smooth")
OPTIMIZERS = ("adam", "ista", "newton")


# --------------------------------------------------------------------------- distances


# Values per chunk of pixel columns (N images × k pixels) `distance_scale` converts to
# float64 at once: 64 MB, whatever the split's size (the whole split as float64, plus the
# median's copies, took ~35x the uint8 cache: 3.9 GB peak for 5000 gray 128 px images)
_SCALE_CHUNK_VALUES = 1 << 23
# below this many columns per chunk, torch's std over dim 0 may round differently
_SCALE_MIN_COLUMNS = 256


def distance_scale(images: Tensor | LesionDataset, distance: str,
                   floor: float = 0.05) -> Tensor | None:
    """Per-pixel scale s_k for the scaled distances, shape images.shape[1:].

    scaled-l1: MAD_k = median_i |x_ik − median_j x_jk|; scaled-l2: std_k. Normalised to mean 1
    and floored at ``floor`` (relative): constant pixels (padding, a fixed border) have MAD 0,
    and dividing by 0 would make them infinitely expensive — or, after a NaN, poison the run.

    ``images``: an (N, C, ...) tensor, or a `LesionDataset`, read from its compact cache a
    chunk of pixels at a time (the same scale as from its ``.images``, without building the
    whole split as float32 and float64); an 8-bit split's MAD comes from per-pixel
    histograms of its 256 levels, exact and independent of N's sorting cost.
    """
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance '{distance}'; valid: {', '.join(DISTANCES)}")
    if not distance.startswith("scaled"):
        return None
    if isinstance(images, Tensor):
        if images.dim() < 2 or len(images) == 0:
            raise InputError(f"per-pixel scales need a non-empty batch of training images "
                             f"(N, C, ...), got shape {tuple(images.shape)}")
        n, shape = len(images), tuple(images.shape[1:])
        # an integer image stack (8-bit PNGs) would give an integer scale: 0.05 → 0, and
        # then a division by zero; a NaN pixel would make the scale silently all-ones
        dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
        flat = images.reshape(n, -1)
        checked = False

        def columns(a: int, b: int) -> Tensor:
            return flat[:, a:b]
        uint8 = False
    elif hasattr(images, "pixel_columns"):
        n, shape, dtype = len(images), tuple(images.image_shape), torch.float32
        columns = images.pixel_columns
        uint8 = images.stored_dtype == np.uint8
        checked = True  # `LesionDataset` refuses NaN/inf pixels on reading
    else:
        raise InputError(f"per-pixel scales need a non-empty batch of training images (N, C, "
                         f"...), got shape {tuple(getattr(images, 'shape', ()))}")
    p = math.prod(shape)
    step = max(_SCALE_MIN_COLUMNS, _SCALE_CHUNK_VALUES // n)
    s = torch.empty(p, dtype=torch.float64)
    n_bad = 0
    for a in range(0, p, step):
        b = min(a + step, p)
        if uint8 and distance == "scaled-l1":  # integer levels: no NaN to count
            s[a:b] = _mad_uint8(images.pixel_columns(a, b, stored=True))
            continue
        x = columns(a, b).double()
        # a split was checked for NaN/inf on reading; a tensor: counted only where its sum
        # is not finite (any NaN/inf makes it so), a pass cheaper than isfinite's
        if not checked and not bool(torch.isfinite(x.sum())):
            n_bad += int((~torch.isfinite(x)).sum())
        if n_bad:  # only counted from here on: the message gives the total
            continue
        if distance == "scaled-l1":
            # the true median (mean of the two middle values for an even count), not
            # torch.median's lower one: a pixel at 0 in half the images and 1 in the other
            # half has MAD 0.5 (App. C.4), while the lower median gave MAD 0 and the floor
            s[a:b] = _median0((x - _median0(x)).abs())
        else:
            s[a:b] = x.std(dim=0) if n > 1 else 1.0
    if n_bad:
        raise InputError(f"training images hold {n_bad} NaN/inf value(s); no per-pixel "
                         f"{distance} scale from them")
    s = s.reshape(shape)
    mean = s.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(s, dtype=dtype)  # no variation at all: unscaled
    s = (s / mean).clamp_min(floor)
    return (s / s.mean()).to(dtype)


def _median0(x: Tensor) -> Tensor:
    """Median over dim 0 as statistics.median defines it (even count: mean of the middle two).
    torch.median gives the lower middle value, so that of −x is minus the upper one (two
    medians: ~2x faster than two kthvalue calls on a 1000-image set)."""
    return (x.median(dim=0).values - x.neg().median(dim=0).values) / 2


def _mad_uint8(u: Tensor) -> Tensor:
    """`_median0((x − _median0(x)).abs())` in float64 for x the float images (value / 255,
    as `LesionDataset` converts them) of 8-bit columns ``u`` (N, k), from per-column counts
    of the 256 levels: the same two order statistics of the same float64 values, in O(N + k
    log 256) per column where sorting N values cost ~60 ns each (36 s for 5000 images of
    128²; hours at 50k × 3 × 512²)."""
    n, k = u.shape
    # float32 true division, then float64: bit for bit the values `.images.double()` holds
    lut = (torch.arange(256, dtype=torch.float32) / 255.0).double()
    idx = u.to(torch.int64) + torch.arange(k, dtype=torch.int64) * 256
    counts = torch.bincount(idx.reshape(-1), minlength=k * 256).reshape(k, 256)
    del idx
    lo, hi = (n - 1) // 2, n // 2  # 0-based ranks of the lower and upper middle values

    def ranked(values: Tensor, cum: Tensor, r: int) -> Tensor:
        # the r-th smallest: at the first level whose cumulative count exceeds r
        return values.gather(1, (cum <= r).sum(1, keepdim=True)).squeeze(1)

    cum = counts.cumsum(1)
    levels = lut.expand(k, 256)
    med = (ranked(levels, cum, lo) + ranked(levels, cum, hi)) / 2
    dev = (lut - med[:, None]).abs()  # |x − median| of each level, per column
    dev, order = dev.sort(dim=1)
    cum = counts.gather(1, order).cumsum(1)
    return (ranked(dev, cum, lo) + ranked(dev, cum, hi)) / 2


def distance_value(delta: Tensor, distance: str, scale: Tensor | None = None,
                   eps: float = 0.0) -> Tensor:
    """Per-sample d = Σ_k e(δ_k)/s_k for δ = x − x0 (N, ...); ``eps`` > 0 smooths the l1."""
    if distance in ("l1", "scaled-l1"):
        e = (delta.square() + eps * eps).sqrt() - eps if eps > 0 else delta.abs()
    elif distance in ("l2", "scaled-l2"):
        e = delta.square()
    else:
        raise ConfigError(f"unknown distance '{distance}'; valid: {', '.join(DISTANCES)}")
    if scale is not None:
        e = e / scale
    return e.flatten(1).sum(1)


def distance_curvature(delta: Tensor, distance: str, scale: Tensor | None = None,
                       eps: float = 1e-2) -> Tensor:
    """Diagonal of ∇²d at δ, element-wise (the distance is separable, so this is exact).

    l1 surrogate: ε² / (δ² + ε²)^{3/2} — 1/ε at δ = 0, vanishing for large changes; l2: 2.
    Used for Jacobi preconditioning of the implicit-gradient CG.
    """
    if distance in ("l1", "scaled-l1"):
        c = eps * eps / (delta.square() + eps * eps).pow(1.5)
    else:
        c = torch.full_like(delta, 2.0)
    return c / scale if scale is not None else c


def is_target_rule(rule: object) -> bool:
    """Whether ``rule`` names a counterfactual target rule: "other", "predicted" or a
    non-negative class index (an int, or a string of ASCII digits: "²".isdigit() is True)."""
    if isinstance(rule, bool):
        return False
    if isinstance(rule, numbers.Integral):
        return int(rule) >= 0
    if rule in ("other", "predicted"):
        return True
    return isinstance(rule, str) and rule.isascii() and rule.isdigit()


def counterfactual_targets(labels: Tensor, num_classes: int, rule: str | int = "other",
                           logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(y*, valid): binary 1 − y; multi-class the most likely class ≠ y (needs ``logits``);
    "predicted" applies that rule to argmax ``logits`` instead of y; an int rule gives that
    class to every sample, valid only where y differs from it."""
    labels = labels.long()
    if rule == "predicted":
        if logits is None:
            raise ValueError("'predicted' counterfactual targets need the model's logits")
        labels, rule = logits.detach().argmax(1), "other"
    # ASCII digits only, as `is_target_rule`: "²".isdigit() is True and int("²") a bare
    # ValueError; int("٣") is 3
    if (isinstance(rule, numbers.Integral) and not isinstance(rule, bool)) or (
            isinstance(rule, str) and rule.isascii() and rule.lstrip("-").isdigit()):
        c = int(rule)
        if not 0 <= c < num_classes:
            raise ConfigError(f"counterfactual target class {c} outside 0..{num_classes - 1}")
        target = torch.full_like(labels, c)
        return target, labels != c
    if rule != "other":
        raise ConfigError(f"counterfactual target rule must be 'other', 'predicted' or a "
                          f"class index, got '{rule}'")
    if num_classes == 2:
        return 1 - labels, torch.ones_like(labels, dtype=torch.bool)
    if logits is None:
        raise ValueError("multi-class 'other' targets need the model's logits")
    # at least float32 (half logits), float64 kept: a near-tie is decided at full precision
    masked = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).scatter(
        1, labels[:, None], float("-inf"))
    return masked.argmax(1), torch.ones_like(labels, dtype=torch.bool)


BNStats = dict[nn.Module, tuple[Tensor, Tensor]]
# what `generate` takes as labels / class targets / warm-start ids: a tensor, or a list or
# array of integers (converted, `_as_indices`); one int stands for every input (classes)
Classes = Tensor | int | Sequence[int] | np.ndarray
Ids = Tensor | Sequence[int] | np.ndarray


@contextmanager
def ieee_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full float32 inside the context (no TF32), on CUDA.

    PyTorch lets cuDNN run float32 convolutions in TF32 (10 mantissa bits) by default on
    Ampere and later GPUs. The counterfactual search, ∇ₓT and its Hessian-vector products
    then carry ~1e-3 relative error: with convolution operands rounded to 10 bits (an
    emulation on CPU) the exact Hessian-vector product was off by 5e-2 instead of 4e-7 and
    the alignment gradient's cosine to a float64 reference fell to 0.79–0.89. Training's CE
    forward and backward keep whatever the user chose. Without CUDA nothing changes."""
    if not torch.cuda.is_available():
        yield
        return
    cudnn = torch.backends.cudnn
    settings: dict[str, object] = dict(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, benchmark_limit=cudnn.benchmark_limit,
        deterministic=cudnn.deterministic, allow_tf32=False)
    # the global fp32_precision kept as it is; only torch >= 2.9 has it (and flags() takes
    # it): on torch 2.2-2.8, which pyproject admits, reading it raised AttributeError at
    # every CUDA search
    precision = getattr(torch.backends, "fp32_precision", None)
    if precision is not None:
        settings["fp32_precision"] = precision
    flags = cudnn.flags(**settings)
    try:
        flags.__enter__()
    except RuntimeError as exc:  # the caller mixed PyTorch's legacy and new TF32 settings
        warnings.warn(f"could not turn TF32 off for the inner problem ({exc}); its "
                      f"convolutions keep the caller's precision", stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        flags.__exit__(None, None, None)


@contextmanager
def eval_mode(model: nn.Module, fold_bn: bool = False,
              bn_stats: BNStats | None = None) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no BatchNorm batch statistics, no dropout), then restore
    every submodule's own mode — a plain .train() would wake submodules kept in eval.

    ``fold_bn`` computes eval BatchNorm as the plain affine map x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε))
    (same values, same gradients in γ, β): PyTorch's generic BatchNorm double backward costs
    ~20% of a Hessian-vector product on CPU, the affine form almost nothing. It also gives
    convolutions and ReLUs the lean double backward of `causalign.implicit.fastgrad` (same
    kernels, bit-identical values; only inside ``implicit_gradient``'s twice-differentiated
    forward, elsewhere they run their own forward).
    ``bn_stats`` maps BatchNorm modules to fixed (mean, var) used instead of the running
    statistics (see `capture_bn_stats`); either way samples never interact.
    ``fold_bn`` (the inner problem's search and implicit gradient) also runs convolutions in
    full float32 on CUDA (`ieee_fp32_convolutions`) and turns a caller's autocast off
    (`no_autocast`: a bf16 autocast around causal-align's loss ran the search and CG in
    bfloat16, the alignment gradient 13 % off, silently).
    """
    bn_stats = bn_stats or {}
    if not fold_bn and not bn_stats and not any(m.training for m in model.modules()):
        yield model  # nothing to change: searches of one eval model in threads run in parallel
        return
    patched: list[tuple[nn.Module, object]] = []
    # the patched forwards live on the (shared) modules: two threads' searches restored each
    # other's ("'BatchNorm2d' object has no attribute 'forward'"), so one at a time per model
    with model_lock(model), ieee_fp32_convolutions() if fold_bn else nullcontext(), \
            no_autocast() if fold_bn else nullcontext():
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            for m in model.modules():
                if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                    continue
                stats = bn_stats.get(m)
                if stats is None and not (fold_bn and m.running_var is not None
                                          and _own_forward(m)):
                    continue
                patched.append((m, m.__dict__.get("forward")))
                mean, var = stats if stats is not None else (m.running_mean, m.running_var)
                m.forward = partial(_bn_affine, m, mean, var)
            if fold_bn:
                patched.extend(patch_modules(model))
            yield model
        finally:
            for m, was in modes:
                m.training = was
            for m, old in patched:
                del m.forward
                if old is not None:
                    m.forward = old


def _own_forward(m: nn.Module) -> bool:
    """Whether folding may replace ``m``'s forward: none set on the instance, or an enclosing
    ``eval_mode``'s. Another one (a wrapper, a monkeypatch) may compute more than the
    class's forward, which the folded map would silently skip; it runs as it is."""
    fwd = m.__dict__.get("forward")
    return fwd is None or (isinstance(fwd, partial) and fwd.func is _bn_affine)


def _bn_affine(bn: nn.Module, mean: Tensor, var: Tensor, x: Tensor) -> Tensor:
    inv = torch.rsqrt(var + bn.eps)
    w = bn.weight * inv if bn.weight is not None else inv
    b = bn.bias - mean * w if bn.bias is not None else -mean * w
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * w.view(shape).to(x.dtype) + b.view(shape).to(x.dtype)


@contextmanager
def capture_bn_stats(model: nn.Module) -> Iterator[BNStats]:
    """Record, during a train-mode forward, each BatchNorm's batch (mean, biased var).

    Training with counterfactuals computed under *running* statistics lets the network
    become two functions: sharp under batch statistics (what CE trains) and flat under the
    lagging running ones (what the alignment sees), which drives L_align to 0 for free —
    observed on the plus-minus benchmark (train-mode accuracy 1.0, eval-mode a constant).
    Freezing the current batch's statistics as constants gives the inner problem the very
    function CE trains, still without any interaction between samples.
    A BatchNorm run more than once (one module applied at several places) normalises each
    call with that call's statistics, but a module holds one (mean, var): the inner problem
    would use the last call's everywhere, another function than CE trains (logits off by
    0.66 on a two-call model), so that is refused in one line (InputError) when the
    context closes.
    """
    store: BNStats = {}
    repeated: list[nn.Module] = []

    def hook(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if m.training:
            if m in store and m not in repeated:
                repeated.append(m)
            store[m] = channel_mean_var(inp[0].detach())

    def bn_hooks(net: nn.Module) -> list:
        return [m.register_forward_hook(hook) for m in net.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # torch.compile'd parts (the model itself, or one inside DataParallel / DDP or a user's
    # container): hooks on their submodules do not fire in a graph Dynamo traced without
    # them (any earlier train-mode forward: a step of align_every > 1, a warm-up, another
    # instance of the same class compiled before), so the statistics came back empty and
    # the inner problem silently used the running ones (causal-align's gradient at cosine
    # 0.46 to the eager model's). A hook on each outermost compiled wrapper always runs: it
    # recomputes them from an eager no-grad forward of the same inputs. BatchNorms outside
    # any compiled part get the plain hook.
    compiled = [m for m in model.modules()
                if isinstance(getattr(m, "_orig_mod", None), nn.Module)]
    nested = {id(b) for c in compiled for b in c._orig_mod.modules() if b is not c}
    outermost = [c for c in compiled if id(c) not in nested]  # its eager pass covers the rest
    inside = {id(b) for c in compiled for b in c.modules()}
    # The RNG state the compiled forward started from: the eager pass replays it, so a
    # dropout before a BatchNorm draws the same mask (taken after the forward, the
    # statistics were those of another mask: means 0.5 off at p=0.5). Inductor's own RNG
    # differs from eager's unless fallback_random is set; eager backends match.
    # (per wrapper: DataParallel runs its replicas' forwards in threads at once)
    rng: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def save_rng(wrapper: nn.Module, args: tuple, kwargs: dict) -> None:
        rng[id(wrapper)] = (torch.get_rng_state(), [torch.cuda.get_rng_state(i)
                                                    for i in _cuda_devices(args, kwargs)])

    def recapture(wrapper: nn.Module, args: tuple, kwargs: dict, _out: object) -> None:
        # the wrapper's own eager module: a DataParallel replica's is on its device
        eager = wrapper._orig_mod
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in eager.modules()):
            _eager_batch_stats(eager, args, kwargs, bn_hooks, rng.pop(id(wrapper), None))

    for fn in (save_rng, recapture):  # not a user's hook on the wrapper (eager_module)
        setattr(fn, INTERNAL_HOOK, True)
    handles = []
    for c in outermost:
        handles += [c.register_forward_pre_hook(save_rng, with_kwargs=True),
                    c.register_forward_hook(recapture, with_kwargs=True)]
    handles += [m.register_forward_hook(hook) for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inside]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
    if repeated:
        name = next((n for n, m in model.named_modules() if m is repeated[0]), "")
        raise InputError(f"BatchNorm '{name or type(repeated[0]).__name__}' ran more than once "
                         f"while its statistics were captured: each call has its own batch "
                         f"statistics, which one fixed (mean, var) cannot reproduce; use "
                         f"bn='running' or a separate BatchNorm module per call")


def _cuda_devices(args: tuple, kwargs: dict) -> list[int]:
    """The CUDA devices of a forward's tensor inputs (whose RNG a dropout there draws)."""
    return sorted({t.device.index or 0 for t in (*args, *kwargs.values())
                   if isinstance(t, Tensor) and t.is_cuda})


def _eager_batch_stats(model: nn.Module, args: tuple, kwargs: dict,
                       bn_hooks: Callable[[nn.Module], list],
                       rng: tuple[Tensor, list[Tensor]] | None = None) -> None:
    """Run ``model`` (a compiled model's eager module, in its current modes) on the inputs
    of the compiled forward that just ran, with ``bn_hooks`` recording each BatchNorm's batch
    statistics; no graph, and neither the running statistics nor the RNG state (dropout)
    changed by this second pass."""
    # track_running_stats off for the pass: a train-mode BatchNorm then normalises with the
    # batch's statistics as before but updates no buffer. Updating and restoring them in
    # place bumped their version, and the compiled forward's backward, which saved them,
    # failed ("modified by an inplace operation").
    bns = [(m, m.track_running_stats) for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    cuda = _cuda_devices(args, kwargs)
    handles = bn_hooks(model)
    try:
        for m, _ in bns:
            if m.training:
                m.track_running_stats = False
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            if rng is not None:  # the state the compiled forward started from
                torch.set_rng_state(rng[0])
                for i, state in zip(cuda, rng[1], strict=True):
                    torch.cuda.set_rng_state(state, i)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, tracked in bns:
            m.track_running_stats = tracked


MAX_SMOOTH_SIGMA = 1024.0
MIN_L1_EPS = 1e-15  # smallest l1 smoothing ε whose ε² float32 still holds (with margin)


class GaussianSmoother(nn.Module):
    """The fixed linear "decoder" of ``space="smooth"``: u ↦ G_σ * u, a separable Gaussian blur
    over the last two axes (H, W; channels and volume slices are not mixed), replicate
    padding. ``encode`` gives the zero code, so x(u) = x0 + G_σ * u starts at x0."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        # inf: OverflowError in ceil below; 1e308 too, and 1e7 built a 6e7-tap kernel
        if not (math.isfinite(sigma) and 0 < sigma <= MAX_SMOOTH_SIGMA):
            raise ConfigError(f"smooth space needs a sigma in (0, {MAX_SMOOTH_SIGMA}] pixels "
                              f"(wider blurs exceed any image), got {sigma}")
        self.sigma = float(sigma)
        self.radius = max(1, math.ceil(3 * self.sigma))
        t = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        self.register_buffer("kernel", (k / k.sum()).float(), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        """The zero code: x(0) = x0."""
        return torch.zeros_like(x)

    def decode(self, u: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """G_σ * u, shaped like ``u``. ``size`` is not used (the blur keeps the shape); it
        is there for `ConvAutoencoder.decode`'s signature."""
        shape, r = u.shape, self.radius
        v = u.reshape(-1, 1, *shape[-2:])
        k = self.kernel.to(v.dtype)
        v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        v = F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return v.reshape(shape)


# --------------------------------------------------------------------------- inner problem


@dataclass
class InnerProblem:
    """T(u) = CE(f(x(u)), y*) + α·d(u, u0) per sample, with x(u) = u (pixels) or
    x0 + D(u) − D(u0) (latent; smooth with D = Gaussian blur, u0 = 0). The model must be in
    eval mode when it is evaluated."""

    model: nn.Module
    x0: Tensor
    u0: Tensor
    target: Tensor
    alpha: float
    distance: str
    scale: Tensor | None
    eps: float
    decoder: nn.Module | None = None
    base: Tensor | None = None  # D(u0) in latent / smooth space
    # Per-pixel feasible interval of x (shaped like x0; see the module docstring), or None.
    lower: Tensor | None = None
    upper: Tensor | None = None
    # Class targets not yet checked against the model's number of classes (done once, at the
    # first forward: cross_entropy's index error is a device-side assert on CUDA).
    unchecked: bool = dataclasses.field(default=True, repr=False, compare=False)

    def image(self, u: Tensor) -> Tensor:
        """The image x(u) a search variable stands for: u itself in pixel space, else
        x0 + decode(u) − decode(u0), clamped to the bounds when they are set."""
        if self.decoder is None:
            return u  # bounded: the optimisers keep u (= x) feasible by projection
        # x0 + (D(u) − D(u0)), not (x0 + D(u)) − D(u0): rounded twice, x* missed x0 by an
        # ulp at u = u0 (6e-8 on every pixel), where the docstring promises x0 exactly
        x = self.x0 + (self.decoder.decode(u, tuple(self.x0.shape[-2:])) - self.base)
        if self.lower is not None:  # a box on x is no box on u: clamp the image itself
            x = torch.clamp(x, self.lower, self.upper)
        return x

    def project(self, u: Tensor) -> Tensor:
        """u projected onto the feasible set: the box in pixel space, u itself otherwise
        (the image map clamps there) or when unbounded."""
        if self.lower is None or self.decoder is not None:
            return u
        return torch.clamp(u, self.lower, self.upper)

    @property
    def projected(self) -> bool:
        """Do the optimisers project u (bounded pixel space)?"""
        return self.lower is not None and self.decoder is None

    def objective(self, u: Tensor) -> Tensor:
        """Per-sample T (N,); sum it for a scalar whose gradient is block-diagonal."""
        return self.terms(u)[0]

    def terms(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample T, logits at x(u))."""
        ce, logits = self.fit(u)
        dist = distance_value(u - self.u0, self.distance, self.scale, self.eps)
        return ce + self.alpha * dist, logits

    def fit(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample CE(f(x(u)), y*), logits): T without the distance term."""
        logits = self.model(self.image(u))
        if self.unchecked and not self.target.is_floating_point():
            _check_class_logits(logits, len(u))
            _check_classes(self.target, logits.shape[1], "counterfactual target")
            self.unchecked = False
        elif self.unchecked:
            _check_soft_target(self.target, logits)
            self.unchecked = False
        if self.target.is_floating_point():
            # Soft multi-label targets (hierarchical Eq. 7: x* explains â → a*): Σ_k BCE.
            ce = F.binary_cross_entropy_with_logits(logits, self.target.to(logits.dtype),
                                                    reduction="none").flatten(1).sum(1)
        else:
            ce = F.cross_entropy(logits, self.target, reduction="none")
        return ce, logits

    def reached(self, logits: Tensor) -> Tensor:
        """Per sample: did the model reach the target? Class targets: argmax = y*; soft
        attribute targets: every thresholded attribute agrees with the target's."""
        if self.target.is_floating_point():
            return ((logits > 0) == (self.target > 0.5)).flatten(1).all(1)
        return logits.argmax(1) == self.target

    def curvature(self, u: Tensor) -> Tensor:
        """α·diag(∇²d) at u (the distance part of the Hessian)."""
        return self.alpha * distance_curvature(u - self.u0, self.distance, self.scale, self.eps)

    def subset(self, idx: Tensor) -> InnerProblem:
        """The same problem restricted to the samples ``idx`` (they are independent)."""
        per_sample = self.scale is not None and self.scale.dim() == self.x0.dim()
        return dataclasses.replace(
            self, x0=self.x0[idx], u0=self.u0[idx], target=self.target[idx],
            base=None if self.base is None else self.base[idx],
            lower=None if self.lower is None else self.lower[idx],
            upper=None if self.upper is None else self.upper[idx],
            scale=self.scale[idx] if per_sample else self.scale)


# --------------------------------------------------------------------------- warm start


def dihedral_transform(x: Tensor, dihedral: Tensor, inverse: bool = False) -> Tensor:
    """Per-sample dihedral transforms of the last two axes of ``x`` (N, ..., H, W).

    ``dihedral`` (N, 3) bool holds flip_h, flip_w, swap per sample, as the trainer's
    ``augment=dihedral`` records them in ``batch["dihedral"]``: flip H, then W, then
    transpose (swap only applies to square images). ``inverse`` undoes it (transpose, then
    the flips, which commute). Exact: every step is a permutation of the pixels."""
    t = dihedral.to(device=x.device, dtype=torch.bool)
    if t.dim() != 2 or t.shape != (len(x), 3):
        raise InputError(f"dihedral must be an (N, 3) bool tensor (flip_h, flip_w, swap) for "
                         f"{len(x)} inputs, got shape {tuple(t.shape)}")
    if x.dim() < 3:
        raise InputError(f"dihedral transforms need inputs (N, ..., H, W), got shape "
                         f"{tuple(x.shape)}")
    square = x.shape[-1] == x.shape[-2]
    if bool(t[:, 2].any()) and not square:
        raise InputError(f"dihedral swap (transposition) needs square images, got "
                         f"{tuple(x.shape[-2:])}")
    shape = (-1,) + (1,) * (x.dim() - 1)
    fh, fw, sw = (t[:, k].view(shape) for k in range(3))
    if inverse and square:
        x = torch.where(sw, x.transpose(-2, -1), x)
    x = torch.where(fh, x.flip(-2), x)
    x = torch.where(fw, x.flip(-1), x)
    if not inverse and square:
        x = torch.where(sw, x.transpose(-2, -1), x)
    return x


def dihedral_code(dihedral: Tensor) -> Tensor:
    """0..7: which of the 8 dihedral transforms each row of ``dihedral`` (N, 3) is."""
    t = dihedral.long()
    return t[:, 0] + 2 * t[:, 1] + 4 * t[:, 2]


# the lower precisions `WarmStartCache` may store its rows in (method.cache_dtype)
LOW_CACHE_DTYPES = (torch.float16, torch.bfloat16)


class WarmStartCache:
    """Last solution offset u* − u0 per sample, keyed by dataset index.

    Offsets (not x*) are stored so a warm start stays meaningful if the same sample comes
    back slightly different. Storage is compact: one row per sample ever stored, in the
    order they were first stored, plus an id → row table (8 bytes an id). A dense table
    indexed by id held a row for every id up to the largest, so a split where a tenth of
    the images have masks paid for all of them. ``device`` keeps the rows there ("cpu":
    host memory, each step copies only its batch's rows; None: the searched inputs'
    device). Image-shaped offsets of augmented inputs (``dihedral``, see
    `dihedral_transform`) are stored in the sample's own orientation and handed back in
    the orientation it has now: a flipped image's offset reused as is started the next
    search from a wrong (mirrored) offset. A row also keeps the class target y* it was
    solved for (``target`` of `put`); `get` given the current targets misses where they
    differ: with C > 2 classes the "other" rule's y* (the most likely other class) changes
    as the model trains (23 % of the revisits of a 12-class run), and a search started
    from a counterfactual towards another class ended worse than a cold one.

    ``dtype`` stores the rows in a lower precision (float16 or bfloat16: half the bytes;
    None: the dtype of the offsets stored, float32 in training); `get` hands them back in
    the searched inputs' dtype. A row that is not finite once cast (float16 overflows above
    65504, e.g. offsets of HU-valued CT images) is not kept: its sample starts cold, as
    after a diverged solve, rather than from a clipped offset. ``overflowed`` counts them.
    """

    def __init__(self, capacity: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is not None and dtype not in LOW_CACHE_DTYPES:
            raise InputError(f"WarmStartCache dtype must be None (the offsets' own) or one of "
                             f"{', '.join(map(str, LOW_CACHE_DTYPES))}, got {dtype}")
        self.dtype = dtype
        self.overflowed = 0  # rows not kept because the cast to dtype made them non-finite
        self.offsets: Tensor | None = None  # (rows, *sample shape)
        self.known: Tensor | None = None  # (rows,) bool: the row holds a usable offset
        self.row_ids: Tensor | None = None  # (rows,) the dataset id each row belongs to
        self.row_of: Tensor | None = None  # (ids,) long: each id's row, -1 for none
        # (rows,) long: the class y* each row was solved for, -1 unknown; None until a put
        # gives targets (soft-target users pay nothing)
        self.targets: Tensor | None = None
        self.rows_used = 0  # rows handed out so far (row_ids >= 0)
        # rows to grow to at most when doubling (the training split's size, as ids are its
        # indices): doubling past it allocated up to ~2N rows of offsets
        self.capacity = capacity
        self.device = None if device is None else torch.device(device)
        # ids are dataset index × id_stride + a per-sample key (the latent space under
        # dihedral augmentation keys each orientation apart: stride 8); the data-parallel
        # merge maps them back to dataset indices to know which rank solved a row
        self.id_stride = 1

    def __len__(self) -> int:
        return 0 if self.known is None else int(self.known.sum())

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (offsets and index tables)."""
        held = (self.offsets, self.known, self.row_ids, self.row_of, self.targets)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def cached_ids(self) -> Tensor:
        """The dataset ids with a usable offset, ascending (on the cache's device)."""
        if self.known is None:
            return torch.zeros(0, dtype=torch.long)
        return self.row_ids[self.known].sort().values

    def _home(self, like: Tensor) -> torch.device:
        return self.device if self.device is not None else like.device

    def _move(self, device: torch.device) -> None:
        if self.offsets is not None and self.offsets.device != device:
            self.offsets, self.known = self.offsets.to(device), self.known.to(device)
            self.row_ids, self.row_of = self.row_ids.to(device), self.row_of.to(device)
            if self.targets is not None:
                self.targets = self.targets.to(device)

    def _rows(self, ids: Tensor) -> Tensor:
        """Each id's row (-1: none); ``ids`` on the cache's device."""
        if not self.row_of.shape[0]:
            return torch.full_like(ids, -1)
        inside = (ids >= 0) & (ids < self.row_of.shape[0])
        return torch.where(inside, self.row_of[ids.clamp(0, self.row_of.shape[0] - 1)],
                           torch.full_like(ids, -1))

    def get(self, ids: Tensor, like: Tensor, dihedral: Tensor | None = None,
            target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(offsets, hit) for ``ids``; misses get zero offsets. ``dihedral`` (N, 3): the
        inputs' transforms; the stored (untransformed) offsets are transformed alike.
        ``target`` (N,) class y*: a row stored for another class is a miss (one stored
        without a target, e.g. by an older checkpoint, still hits)."""
        if self.offsets is None or not self.offsets.shape[0] \
                or self.offsets.shape[1:] != like.shape[1:]:
            return torch.zeros_like(like), torch.zeros(len(ids), dtype=torch.bool,
                                                       device=like.device)
        self._move(self._home(like))  # a loaded checkpoint's cache arrives on the CPU
        rows = self._rows(ids.to(self.offsets.device).long())
        safe = rows.clamp(min=0)
        hit = (rows >= 0) & self.known[safe]
        if target is not None and self.targets is not None:
            stored = self.targets[safe]
            hit = hit & ((stored < 0) | (stored == target.to(stored.device).long()))
        off = torch.where(hit.view(-1, *[1] * (like.dim() - 1)), self.offsets[safe],
                          torch.zeros((), dtype=self.offsets.dtype, device=hit.device))
        off, hit = off.to(like), hit.to(like.device)
        if dihedral is not None:
            off = dihedral_transform(off, dihedral)
        return off, hit

    def _grow(self, n_ids: int, n_rows: int, like: Tensor, home: torch.device) -> None:
        """Room for ids < ``n_ids`` and ``n_rows`` rows of ``like``'s sample shape."""
        if self.offsets is None:
            self.offsets = like.new_zeros((0, *like.shape[1:]), device=home,
                                          dtype=self.dtype or like.dtype)
            self.known = torch.zeros(0, dtype=torch.bool, device=home)
            self.row_ids = torch.zeros(0, dtype=torch.long, device=home)
            self.row_of = torch.zeros(0, dtype=torch.long, device=home)
        self._move(home)
        if n_ids > self.row_of.shape[0]:  # the id table is small: size it to the split
            size = max(n_ids, self.capacity or 0)
            self.row_of = torch.cat([self.row_of, self.row_of.new_full(
                (size - self.row_of.shape[0],), -1)])
        have = self.offsets.shape[0]
        if n_rows > have:
            grown = 2 * have
            if self.capacity is not None and n_rows <= self.capacity:
                grown = min(grown, self.capacity)
            extra = max(n_rows, grown) - have
            # copied into the grown tensor: torch.cat with a zeros block held the old rows,
            # the zeros and the result at once (2x the cache at its last doubling, 1.5x now)
            offsets = self.offsets.new_zeros((have + extra, *self.offsets.shape[1:]))
            offsets[:have] = self.offsets
            self.offsets = offsets
            self.known = torch.cat([self.known, self.known.new_zeros(extra)])
            self.row_ids = torch.cat([self.row_ids, self.row_ids.new_full((extra,), -1)])
            if self.targets is not None:
                self.targets = torch.cat([self.targets, self.targets.new_full((extra,), -1)])

    def put(self, ids: Tensor, offsets: Tensor, keep: Tensor,
            dihedral: Tensor | None = None, target: Tensor | None = None) -> None:
        """Store rows where ``keep``; rows not kept are forgotten (e.g. a diverged solve).
        ``dihedral`` (N, 3): the inputs' transforms, undone before storing. ``target``
        (N,): the class y* each offset was solved for (None: unknown, any target hits)."""
        if dihedral is not None:
            offsets = dihedral_transform(offsets, dihedral, inverse=True)
        home = self._home(offsets)
        ids, keep = ids.to(home).long(), keep.to(home).bool()
        if not len(ids):
            return
        if self.offsets is not None and self.offsets.shape[1:] != offsets.shape[1:]:
            self.clear()  # another input shape: old entries are useless
        used = self.rows_used  # a Python count: no device sync per step
        self._grow(int(ids.max()) + 1, used, offsets, home)
        kept = ids[keep]
        new = torch.unique(kept[self._rows(kept) < 0])  # ids stored for the first time
        if len(new):
            self._grow(0, used + len(new), offsets, home)
            fresh = torch.arange(used, used + len(new), device=home)
            self.row_of[new], self.row_ids[fresh] = fresh, new
            self.rows_used = used + len(new)
        rows = self._rows(kept)
        # every row kept (always when a checkpoint's cache is loaded): no gathered copy of
        # the offsets, which held the loaded cache a third time (+519 MB resuming 256 MB)
        solved = (offsets if len(kept) == len(ids) else offsets[keep]).detach().to(home)
        stored = solved.to(self.offsets.dtype)
        self.offsets[rows] = stored
        self.known[rows] = True
        if self.dtype is not None and self.dtype != offsets.dtype and len(rows):
            # cast overflow (float16 > 65504): such a row is a miss, not a clipped offset
            bad = ~torch.isfinite(stored.flatten(1)).all(1) \
                & torch.isfinite(solved.flatten(1)).all(1)
            if bool(bad.any()):
                self.known[rows[bad]] = False
                self.overflowed += int(bad.sum())
        if target is not None and self.targets is None:
            self.targets = self.row_ids.new_full(self.row_ids.shape, -1)
        if self.targets is not None:
            self.targets[rows] = -1 if target is None else target.to(home).long()[keep]
        dropped = self._rows(ids[~keep])
        self.known[dropped[dropped >= 0]] = False

    def clear(self) -> None:
        """Forget every cached offset."""
        self.offsets = self.known = self.row_ids = self.row_of = self.targets = None
        self.rows_used = 0

    def state_dict(self) -> dict:
        """The cached samples' ids (ascending) and offsets (CPU), for a checkpoint; {} when
        empty."""
        if self.offsets is None:
            return {}
        ids = self.cached_ids()
        rows = self._rows(ids)
        # row by row in chunks: a gather of every row at once held a second copy of the
        # cache on its device; written into one preallocated CPU tensor, since a list of
        # chunks then torch.cat held the rows twice on the host (1.7x the cache's bytes at
        # every checkpoint: +537 MB for a 313 MB cache)
        offsets = torch.empty((len(rows), *self.offsets.shape[1:]), dtype=self.offsets.dtype,
                              device="cpu")
        start = 0
        for r in rows.split(256):
            offsets[start:start + len(r)] = self.offsets[r]
            start += len(r)
        state = {"ids": ids.cpu(), "offsets": offsets}
        if self.id_stride != 1:
            state["id_stride"] = self.id_stride
        if self.targets is not None:
            state["targets"] = self.targets[rows].cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Replace the cache with what `state_dict` stored."""
        self.clear()
        if state and "id_stride" in state:
            self.id_stride = int(state["id_stride"])
        if state and len(state.get("ids", ())):
            # "targets": absent from checkpoints written before rows kept their y*.
            # Rows stored in a lower precision load into a cache without a dtype of its
            # own as float32 (then the warm start continues as it would have)
            offsets = state["offsets"]
            if self.dtype is None and offsets.dtype in LOW_CACHE_DTYPES:
                offsets = offsets.float()
            self.put(state["ids"], offsets, torch.ones(len(state["ids"]),
                                                                dtype=torch.bool),
                     target=state.get("targets"))


# --------------------------------------------------------------------------- generator


@dataclass
class CounterfactualResult:
    """Per-sample outcome of `CounterfactualGenerator.generate` (all tensors detached).

    ``x_star`` in pixel space; ``u_star`` the searched variable (= x_star for pixels, the code
    z* for latent); ``problem`` the inner problem at these samples (for the implicit step).
    ``flipped``/``target_prob`` are None when generated with ``report=False``.
    """

    x_star: Tensor
    u_star: Tensor
    target: Tensor
    diverged: Tensor
    warm: Tensor
    distance: Tensor
    problem: InnerProblem
    flipped: Tensor | None = None
    target_prob: Tensor | None = None

    @property
    def change(self) -> Tensor:
        """x* − x0, the signed change the counterfactual makes."""
        return self.x_star - self.problem.x0


def _is_count(value: object) -> bool:
    """A whole number >= 0 (an int, or a float such as 100.0 from a config file)."""
    if isinstance(value, bool):
        return False
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return v.is_integer() and v >= 0


class CounterfactualGenerator:
    """x* = argmin CE(f(x), y*) + α·d(x, x0) by ``steps`` steps of ``optimizer`` (adam, ista
    at step size ``lr``; newton, which needs no step size), per sample, then ``polish``
    Gauss-Newton steps (0: none).

    The model is put in eval mode for the search and restored afterwards; its parameters get
    no gradient. ``scale`` is the per-pixel scale of a scaled distance (`distance_scale` on
    training images); ``autoencoder`` is required for ``space="latent"``; ``smooth_sigma`` is
    the blur (pixels) of ``space="smooth"``. ``bounds`` (lo, hi) keeps x* within the
    intensity range (see the module docstring; None, the default: unbounded).
    """

    def __init__(self, model: nn.Module, *, alpha: float = 0.01, steps: int = 100,
                 lr: float = 0.01, distance: str = "l1", scale: Tensor | None = None,
                 eps: float = 1e-2, space: str = "pixel", autoencoder: nn.Module | None = None,
                 warm_start: bool = False, target_rule: str | int = "other",
                 optimizer: str = "adam", smooth_sigma: float = 1.0,
                 bounds: tuple[float, float] | None = None, polish: int = 0) -> None:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown counterfactual optimizer '{optimizer}'; valid: "
                              f"{', '.join(OPTIMIZERS)}")
        if distance not in DISTANCES:
            raise ConfigError(f"unknown distance '{distance}'; valid: {', '.join(DISTANCES)}")
        if space not in SPACES:
            raise ConfigError(f"unknown counterfactual space '{space}'; valid: "
                              f"{', '.join(SPACES)}")
        if space == "latent" and distance.startswith("scaled"):
            raise ConfigError(f"distance '{distance}' is per pixel; the latent space takes "
                              f"l1 or l2")
        if space == "latent" and autoencoder is None:
            raise ConfigError("space 'latent' needs an autoencoder")
        if distance.startswith("scaled") and scale is None:
            raise ConfigError(f"distance '{distance}' needs per-pixel scales from the "
                              f"training images (distance_scale)")
        if scale is not None:
            # a NaN or zero scale gave NaN distances (Adam: every sample "diverged"; Newton:
            # not flagged at all) and a negative one rewarded change; distance_scale gives
            # finite positive scales
            if not isinstance(scale, Tensor) or not scale.is_floating_point():
                raise ConfigError(f"distance scale must be a floating-point tensor "
                                  f"(distance_scale), got "
                                  f"{getattr(scale, 'dtype', type(scale).__name__)}")
            # its values are checked in `generate`, in the same device sync as x0's
        # finite too: inf passed ">= 0" / "> 0" and every sample then diverged (the CLI
        # checked it; the Python API did not); steps=inf failed in int() with an OverflowError
        # a string or None failed in math.isfinite with a bare "must be real number"
        bad = [f"{name} {value!r}" for name, value in (("alpha", alpha), ("lr", lr),
                                                        ("eps", eps))
               if isinstance(value, bool) or not (isinstance(value, numbers.Real) or (
                   isinstance(value, Tensor) and value.numel() == 1))]
        bad = bad or [f"{name} {value}" for name, value, ok in (
            ("alpha", alpha, math.isfinite(alpha) and 0 <= alpha <= MAX_SETTING),
            ("steps", steps, _is_count(steps)),
            ("polish", polish, _is_count(polish)),
            ("lr", lr, math.isfinite(lr) and lr > 0),
            # ε below ~1e-19: ε² underflows float32, every search came back NaN ("diverged")
            ("eps", eps, math.isfinite(eps) and eps >= MIN_L1_EPS)) if not ok]  # catches NaN
        if bad:
            raise ConfigError(f"counterfactual needs alpha in [0, {MAX_SETTING:g}], integer "
                              f"steps and polish >= 0, finite lr > 0 and eps >= "
                              f"{MIN_L1_EPS:g}; got {', '.join(bad)}")
        # an unknown rule failed only at the first generate(), after any setup work
        if not is_target_rule(target_rule):
            raise ConfigError(f"counterfactual target rule must be 'other', 'predicted' or a "
                              f"class index, got {target_rule!r}")
        self.model = eager_module(model)
        self.alpha, self.steps, self.lr = float(alpha), int(steps), float(lr)
        self.polish = int(polish)
        self.distance, self.scale, self.eps = distance, scale, float(eps)
        self.space, self.autoencoder = space, autoencoder
        self.smoother = GaussianSmoother(smooth_sigma) if space == "smooth" else None
        self.warm_start = warm_start
        self.target_rule = target_rule
        self.optimizer = optimizer
        self.bounds = _check_bounds(bounds)
        self.cache = WarmStartCache()

    def problem(self, x0: Tensor, target: Tensor, dihedral: Tensor | None = None
                ) -> InnerProblem:
        """The inner problem at x0 (encodes x0 in latent space). ``dihedral`` (N, 3): how each
        input was flipped (`augment=dihedral`); a per-pixel distance scale, measured on the
        stored images, is flipped with it, so a flipped image's problem is the flipped
        problem (unflipped, a change on the left was weighed by the right's scale)."""
        x0 = x0.detach()
        scale = self.scale.to(x0) if self.scale is not None else None
        if scale is not None and self.space != "latent" and scale.shape != x0.shape[1:]:
            # broadcasting failed deep in the search with torch's size-mismatch message
            raise InputError(f"distance scale {tuple(scale.shape)} must have the shape of one "
                             f"image of x0 {tuple(x0.shape[1:])} (distance_scale of images "
                             f"like these)")
        if scale is not None and dihedral is not None and self.space != "latent":
            scale = dihedral_transform(scale.expand(len(x0), *scale.shape), dihedral)
        if self.space == "latent":
            # the inputs' device and dtype: an autoencoder fitted on the float32 training
            # images failed in its first conv on a float64 model's inputs
            ae = _autoencoder_like(self.autoencoder, x0)
            # autocast off, as for the search (`eval_mode(fold_bn=True)`): under a caller's
            # bf16 autocast u0 and D(u0) came out bfloat16 and the search, run without
            # autocast, failed in the decoder ("Input type (c10::BFloat16) and bias type
            # (float) should be the same")
            with torch.no_grad(), eval_mode(ae), no_autocast():
                u0 = ae.encode(x0)
                base = ae.decode(u0, tuple(x0.shape[-2:]))
            return InnerProblem(self.model, x0, u0, target, self.alpha, self.distance, None,
                                self.eps, decoder=ae, base=base, **self._box(x0))
        if self.space == "smooth":
            if x0.dim() < 4:
                # the blur runs over the last two axes: on (N, C) it mixed the samples of a
                # batch (a batched search differed from per-sample ones), on (N, C, L) channels
                raise InputError(f"space 'smooth' blurs over H, W: it needs images (N, C, H, "
                                 f"W) or volumes (N, C, D, H, W), got shape {tuple(x0.shape)}")
            zero = torch.zeros_like(x0)  # G_σ * 0 = 0: x(u) = x0 + G_σ * u
            return InnerProblem(self.model, x0, zero, target, self.alpha, self.distance, scale,
                                self.eps, decoder=self.smoother.to(x0.device), base=zero,
                                **self._box(x0))
        return InnerProblem(self.model, x0, x0, target, self.alpha, self.distance, scale,
                            self.eps, **self._box(x0))

    def _box(self, x0: Tensor) -> dict[str, Tensor | None]:
        """Per-pixel feasible interval [min(lo, x0), max(hi, x0)]: x0 is always feasible."""
        if self.bounds is None:
            return {"lower": None, "upper": None}
        lo, hi = self.bounds
        return {"lower": x0.clamp(max=lo), "upper": x0.clamp(min=hi)}

    def targets(self, x0: Tensor, labels: Classes | None) -> tuple[Tensor, Tensor]:
        """(y*, valid) by the target rule; without labels y is the model's prediction.

        One eval-mode forward gives the number of classes, the prediction and the ranking
        the multi-class rule needs; training code passes y* directly and skips it."""
        with torch.no_grad(), eval_mode(self.model), no_autocast():  # ranked as searched
            logits = self.model(x0)
        _check_class_logits(logits, len(x0))
        if labels is None:
            labels = logits.argmax(1)
        labels = _as_classes(labels, len(x0), "labels").to(x0.device)
        _check_classes(labels, logits.shape[1], "labels")
        return counterfactual_targets(labels, logits.shape[1], self.target_rule, logits)

    def generate(self, x0: Tensor, *, labels: Classes | None = None,
                 target: Classes | None = None, ids: Ids | None = None,
                 report: bool = True, bn_stats: BNStats | None = None,
                 dihedral: Tensor | None = None) -> CounterfactualResult:
        """Counterfactuals for a batch x0 (N, C, ...); see `_generate`.

        A latent-space autoencoder runs in eval mode too (its modules' flags restored): in
        train mode its BatchNorm mixed the samples of the batch and overwrote its running
        statistics, and dropout made every search random."""
        ae = self.autoencoder if self.space == "latent" else None
        with shape_errors(self.model, x0, "counterfactual"), \
                eval_mode(ae) if ae is not None else nullcontext():
            return self._generate(x0, labels=labels, target=target, ids=ids, report=report,
                                  bn_stats=bn_stats, dihedral=dihedral)

    def _generate(self, x0: Tensor, *, labels: Classes | None = None,
                  target: Classes | None = None, ids: Ids | None = None,
                  report: bool = True, bn_stats: BNStats | None = None,
                  dihedral: Tensor | None = None) -> CounterfactualResult:
        """Counterfactuals for a batch x0 (N, C, ...).

        ``target`` (y*) wins over ``labels`` + the target rule; with neither, y is the model's
        prediction. ``ids`` (dataset indices) key the warm-start cache; ``dihedral`` (N, 3
        bool: flip_h, flip_w, swap; ``batch["dihedral"]`` of ``augment=dihedral``) says how
        each x0 was transformed from the sample as stored (`WarmStartCache`). ``bn_stats`` replaces
        BatchNorm running statistics (`capture_bn_stats`). A sample whose search produced
        NaN/inf is reset to x0 and flagged in ``diverged``; it never poisons others.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("counterfactual search needs autograd; call generate outside "
                               "torch.inference_mode()")
        if not isinstance(x0, Tensor):
            # a NumPy batch was described by its dtype and shape alone ("got float32 of
            # shape (6, 1, 32, 32)"), which read like a valid input
            raise InputError(f"x0 must be a torch.Tensor (N, C, ...), got "
                             f"{type(x0).__name__}; pass torch.as_tensor(x0)")
        if not x0.is_floating_point() or x0.dim() < 2:
            raise InputError(f"x0 must be a floating-point batch (N, C, ...), got "
                             f"{x0.dtype} of shape {tuple(x0.shape)}")
        x0 = x0.detach()
        bad = (~torch.isfinite(x0)).sum()
        if self.scale is not None:  # one device sync for both (generate runs every step)
            scale = self.scale.to(x0.device)
            bad = torch.stack([bad, (~(torch.isfinite(scale) & (scale > 0))).sum()])
        n_bad, *n_bad_scale = bad.reshape(-1).tolist()
        if n_bad_scale and n_bad_scale[0]:
            raise ConfigError(f"distance scale holds {n_bad_scale[0]} value(s) that are not "
                              f"finite and > 0 (distance_scale floors them)")
        if n_bad:  # a non-finite x0 would come back as a NaN "counterfactual" flagged diverged
            raise InputError(f"x0 holds {n_bad} NaN/inf value(s); no counterfactual of a "
                             f"non-finite image")
        # float64 images into a float32 model: one line, not conv2d's "expected scalar type".
        # Also under autocast: the search runs without it (`eval_mode(fold_bn=True)`), so
        # bfloat16 inputs to a float32 model failed deep inside ("mat1 and mat2 must have the
        # same dtype")
        check_model_dtype(self.model, x0, autocast_ok=False)
        # a batch through BatchNorm without running statistics coupled the searches (a
        # batched x* differed from the per-sample one by up to 0.54 per pixel)
        check_no_batch_statistics(self.model, x0, "counterfactual search", bn_stats or (),
                                  "pass bn_stats (capture_bn_stats) or one sample at a time")
        if target is None:
            target, valid = self.targets(x0, labels)
            if not bool(valid.all()):
                raise ValueError("some samples already have the requested target class; "
                                 "select valid samples first (counterfactual_targets)")
        if not (isinstance(target, Tensor) and target.is_floating_point()):
            # float = soft attribute targets (Eq. 7); anything else holds class indices
            target = _as_classes(target, len(x0), "target").long()
        elif target.shape[0] != len(x0):
            raise InputError(f"target has {target.shape[0]} rows for {len(x0)} inputs")
        target = target.to(x0.device)
        if dihedral is not None:
            dihedral = _as_dihedral(dihedral, len(x0))
        cache_dihedral = dihedral  # how cached offsets map onto these inputs
        if self.warm_start and ids is not None:
            ids = _as_ids(ids, len(x0))
            if dihedral is not None and self.space == "latent":
                # a code is not image-shaped (a flip of x0 is no flip of its code): each
                # orientation of a sample keeps its own entry, a warm start only from a
                # solution for this very input (a mirrored one started far off)
                ids = ids.to(dihedral.device) * 8 + dihedral_code(dihedral)
                self.cache.id_stride = 8
                cache_dihedral = None
        prob = self.problem(x0, target, dihedral)
        # the warm start reuses only offsets solved for the same class y* (`WarmStartCache`);
        # soft attribute targets are not checked
        class_target = None if target.is_floating_point() else target
        u0 = prob.u0
        warm = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        u = u0.clone()
        if self.warm_start and ids is not None:
            off, warm = self.cache.get(ids, u0, cache_dihedral, class_target)
            u = prob.project(u0 + off)  # an offset stored unbounded may leave the box
        with eval_mode(self.model, fold_bn=True, bn_stats=bn_stats):
            solve = {"adam": _adam, "ista": _proximal_gradient,
                     "newton": _gauss_newton}[self.optimizer]
            with record_function("causalign.counterfactual.search"):  # named in profiles
                u = solve(prob, u, self.steps, self.lr)
                if self.polish:
                    # Gauss-Newton's line search never increases T: it continues the search
                    # in the basin the first optimiser reached (an Adam iterate after K steps
                    # is often short of its minimum, where the implicit gradient holds)
                    u = _gauss_newton(prob, u, self.polish)
            shape = (-1,) + (1,) * (u.dim() - 1)
            ok = torch.isfinite(u).flatten(1).all(1)
            u = torch.where(ok.view(shape), u, u0)
            with torch.no_grad():
                x_star = prob.image(u)
                logits = _report_logits(self.model, x_star) if report else None
                if logits is not None:
                    finite = torch.isfinite(logits).all(1)
                    if not bool(finite.all()):  # the model's output at x* is not finite
                        ok = ok & finite
                        u = torch.where(ok.view(shape), u, u0)
                        x_star = prob.image(u)
                        # reported at the x* returned, x0: the target's probability was 0
                        # there, as if the search had left it at none
                        logits = _report_logits(self.model, x_star)
        flipped = target_prob = None
        if logits is not None:
            if target.is_floating_point():  # soft targets: mean agreement 1 − |σ(z) − a*|
                target_prob = 1 - (logits.sigmoid() - target).abs().flatten(1).mean(1)
            else:
                target_prob = logits.softmax(1).gather(1, target[:, None])[:, 0]
            # a diverged search is no counterfactual, whatever its x0's prediction
            flipped = ok & prob.reached(logits)
        diverged = ~ok
        if self.warm_start and ids is not None:
            self.cache.put(ids, u - u0, ok, cache_dihedral, class_target)
        dist = distance_value(u - u0, self.distance, prob.scale, eps=0.0)
        return CounterfactualResult(x_star=x_star.detach(), u_star=u.detach(), target=target,
                                    diverged=diverged, warm=warm, distance=dist.detach(),
                                    problem=prob, flipped=flipped, target_prob=target_prob)


def _report_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits for the report, in float32 at least: half/bfloat16 outputs are
    widened, float64 ones kept (their target probabilities were cut to float32)."""
    logits = model(x)
    return logits if logits.dtype == torch.float64 else logits.float()


def _autoencoder_like(ae: nn.Module, x0: Tensor) -> nn.Module:
    """``ae`` on x0's device and dtype: itself when it is there already (training), else an
    eval-mode copy. ``ae.to(...)`` moved the caller's own autoencoder in place: a float32 one
    came back float64 after a search of a float64 model and then failed on float32 images."""
    tensors = [*ae.parameters(), *ae.buffers()]
    if all(t.device == x0.device and (t.dtype == x0.dtype or not t.is_floating_point())
           for t in tensors):
        return ae
    return copy.deepcopy(ae).to(x0.device, x0.dtype).eval()


def _check_bounds(bounds: object) -> tuple[float, float] | None:
    """``bounds`` as (lo, hi) floats with lo < hi, both finite, or one clear ConfigError."""
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)  # type: ignore[union-attr]
        ok = not isinstance(bounds, str) and not any(
            isinstance(b, bool) for b in bounds)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        ok = False
    if not ok or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"counterfactual bounds must be two finite numbers lo < hi "
                          f"(the images' intensity range), got {bounds!r}")
    return lo, hi


def _as_indices(values: object, n: int, what: str, noun: str, one: str,
                broadcast: bool) -> Tensor:
    """``values`` (tensor, list, array) as an (n,) integer tensor of ``noun`` ("class
    indices"; ``one``: "class"), or one clear error; a 0-d value stands for every input when
    ``broadcast``."""
    try:
        out = values if isinstance(values, Tensor) else torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what} must be a tensor of {noun}, got "
                         f"{type(values).__name__}") from exc
    if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
        raise InputError(f"{what} must hold integer {noun}, got {out.dtype}")
    if broadcast and out.dim() == 0:
        out = out.expand(n)
    if out.shape != (n,):
        raise InputError(f"{what} must hold one {one} per input ({n}), got shape "
                         f"{tuple(out.shape)}")
    return out


def _as_classes(values: object, n: int, what: str) -> Tensor:
    """``values`` as (n,) class indices; one class stands for every input, as the
    explainers take an int target."""
    return _as_indices(values, n, what, "class indices", "class", broadcast=True)


def _as_ids(ids: object, n: int) -> Tensor:
    """Warm-start keys as an (n,) tensor of non-negative integers, or one clear error: a
    list failed with "'list' object has no attribute 'to'", a float id was truncated (0.5
    hit sample 0's entry) and a negative one wrapped around to another sample's entry."""
    out = _as_indices(ids, n, "ids", "dataset indices", "dataset index", broadcast=False)
    if out.numel() and int(out.min()) < 0:
        raise InputError(f"ids must be non-negative dataset indices, got {int(out.min())}")
    return out


def _as_dihedral(dihedral: object, n: int) -> Tensor:
    """Per-sample dihedral transforms as an (n, 3) bool tensor, or one clear error."""
    if not isinstance(dihedral, Tensor) or dihedral.shape != (n, 3) \
            or dihedral.is_floating_point() or dihedral.is_complex():
        raise InputError(f"dihedral must be an ({n}, 3) bool tensor (flip_h, flip_w, swap per "
                         f"input), got {getattr(dihedral, 'dtype', type(dihedral).__name__)} "
                         f"of shape {tuple(getattr(dihedral, 'shape', ()))}")
    return dihedral.bool()


def _check_soft_target(target: Tensor, logits: Tensor) -> None:
    """One clear line unless soft (attribute) targets are probabilities shaped like the
    model's outputs: torch's BCE said only "Target size ... must be the same as input size",
    and a NaN target made every sample "diverge" without naming the cause."""
    if target.shape != logits.shape:
        raise InputError(f"soft counterfactual target {tuple(target.shape)} must have the "
                         f"shape of the model's outputs {tuple(logits.shape)}")
    if target.numel():
        lo, hi = torch.stack(target.detach().float().aminmax()).tolist()  # NaN propagates
        if not 0.0 <= lo <= hi <= 1.0:
            raise InputError(f"soft counterfactual target must hold probabilities in [0, 1], "
                             f"got {lo:g}..{hi:g}")


def _check_class_logits(logits: object, n: int) -> None:
    """One clear line unless the model's outputs are (N, C) class logits with C >= 2. A
    single-logit (sigmoid) binary classifier made every target the sample's own class 0:
    x* = x0 reported as "flipped" with target_prob 1; an (N,) output failed with an
    IndexError."""
    shape = tuple(getattr(logits, "shape", ()))
    if not isinstance(logits, Tensor) or logits.dim() != 2 or shape[0] != n or shape[1] < 2:
        # a dict or namedtuple output read "of shape ()"
        got = f"of shape {shape}" if isinstance(logits, Tensor) else \
            f"as a {type(logits).__name__}"
        raise InputError(f"counterfactual class targets need (N, C) class logits with C >= 2 "
                         f"from the model, got outputs {got} for {n} inputs (a "
                         f"single-logit binary classifier z: return torch.cat([-z, z], 1) / 2, "
                         f"whose softmax is sigmoid(z))")


def _check_classes(classes: Tensor, num_classes: int, what: str) -> None:
    """Fail with one clear line unless every entry of ``classes`` lies in 0..num_classes−1."""
    if classes.numel():
        lo, hi = torch.stack(classes.aminmax()).tolist()  # one device sync, not two
        if not 0 <= lo <= hi < num_classes:
            raise InputError(f"{what} classes must lie in 0..{num_classes - 1}, got "
                             f"{lo}..{hi}")


def _adam(prob: InnerProblem, u: Tensor, steps: int, lr: float, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8) -> Tensor:
    """K element-wise Adam steps on Σ_i T_i(u_i). Written out (not torch.optim) so nothing
    touches the model's parameters and no optimizer state outlives the call.

    The moments are kept in at least float32: in float16 g² underflows to 0 and eps = 1e-8
    rounds to 0, so every step would be 0/0 and every sample "diverge"."""
    u = u.detach().clone()
    work = _work_dtype(u.dtype)
    m = torch.zeros_like(u, dtype=work)
    v = torch.zeros_like(u, dtype=work)
    for t in range(1, steps + 1):
        uu = u.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(prob.objective(uu).sum(), uu)
        with torch.no_grad():
            g = g.to(work)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step = lr / (1 - beta1 ** t)
            denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
            # (m / denom)·step, not addcdiv_(value=-step): an absurd step size must give inf
            # (then flagged as diverged), not a float-overflow exception
            u = uu.detach().sub_(m.div(denom).mul_(step).to(u.dtype))
            if prob.projected:  # projected Adam: x stays within the bounds at every step
                u = prob.project(u)
    return u.detach()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision searches (float16 / bfloat16), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def _proximal_gradient(prob: InnerProblem, u: Tensor, steps: int, lr: float) -> Tensor:
    """K proximal-gradient (ISTA) steps on Σ_i T_i(u_i) with a per-sample normalised step.

    Adam moves every coordinate with a non-zero gradient by ~lr per step whatever the size of
    that gradient (its first step is lr·sign(g)), so a pixel-space counterfactual spreads its
    change over the whole image. For the l1 distances the proximal step instead soft-thresholds
    δ = u − u0 at η·α/s: a pixel leaves x0 only where |∂CE/∂x| exceeds α/s, exactly the
    optimality condition of the non-smooth problem, so x* is sparse and its change sits where
    the classifier is sensitive. η_i = lr / max(max_k |∂CE_i/∂x_k|, α/s) bounds every move by
    2·lr per step (the sparsity pattern does not depend on η). For l2 distances the step is
    plain normalised gradient descent on the whole objective. A fixed step length can overshoot
    and oscillate, so each sample returns its best iterate by the exact (non-smooth) T.
    """
    u = u.detach().clone()
    sparse = prob.distance in ("l1", "scaled-l1")
    shape = (-1,) + (1,) * (u.dim() - 1)
    alpha = prob.alpha
    inv_scale = 1.0 / prob.scale if prob.scale is not None else 1.0
    pull = alpha * float(torch.as_tensor(inv_scale).max()) if sparse else 0.0
    best_u = u.clone()
    best_t = torch.full((len(u),), float("inf"), dtype=_work_dtype(u.dtype), device=u.device)
    # samples that met a NaN/inf gradient: the best-iterate rule hid it (a NaN gradient at x0
    # returned x0 as a plain "not flipped", never flagged as diverged)
    hit = torch.zeros(len(u), dtype=torch.bool, device=u.device)
    for step in range(steps + 1):
        last = step == steps  # the final iterate is only scored: no gradient needed
        uu = u if last else u.requires_grad_(True)
        with torch.set_grad_enabled(not last):
            fit = prob.fit(uu)[0]
            # l1: the smooth part only, the distance goes into the proximal operator
            dist = distance_value(uu - prob.u0, prob.distance, prob.scale, 0.0 if sparse
                                  else prob.eps)
            if not last:
                smooth = fit if sparse else fit + alpha * dist
                (g,) = torch.autograd.grad(smooth.sum(), uu)
        with torch.no_grad():
            t = (fit + alpha * dist).detach()
            better = torch.isfinite(t) & (t < best_t)
            best_t = torch.where(better, t, best_t)
            best_u = torch.where(better.view(shape), uu.detach(), best_u)
            if last:
                break
            hit |= ~torch.isfinite(g).flatten(1).all(1)
            # the l1 pull α/s counts in the normaliser: once the target is reached |g| falls
            # below α, and lr/max|g| alone would shrink δ by ≫ lr per step, back to x0
            gmax = g.abs().flatten(1).amax(1).view(shape).clamp_min(pull).clamp_min(1e-12)
            eta = lr / gmax
            delta = uu.detach() - prob.u0 - eta * g
            if sparse:
                thresh = eta * alpha * inv_scale
                delta = delta.sign() * (delta.abs() - thresh).clamp_min(0)
            u = prob.u0 + delta
            if prob.projected:  # per pixel, prox of l1 + box = soft-threshold, then clamp
                u = prob.project(u)
    # a sample that never had a finite objective keeps its (non-finite) last iterate, and one
    # that met a non-finite gradient comes back NaN: the caller resets either to x0 and flags
    # it as diverged (as Adam's)
    never = torch.isinf(best_t).view(shape)
    out = torch.where(never, u.detach(), best_u)
    return torch.where(hit.view(shape), torch.nan, out).detach()


def logit_curvature(prob: InnerProblem, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fit term's Gauss-Newton factors at u: (per-sample CE, J, r, S), detached.

    CE(z(u)) has gradient Jᵀr and Gauss-Newton Hessian JᵀSJ, with J = ∂z/∂u (N, R, D),
    r (N, R) and S = ∇²_z CE (N, R, R). Softmax: S·1 = 0 and Σ(p − e_y) = 0, so only the
    rows z_c − z_0 (c ≥ 1) matter: R = C − 1 backwards, one for a binary classifier. Soft
    (sigmoid) targets: R = C, S = diag σ(1 − σ). For a piecewise-linear classifier in eval mode
    (ReLU, max-pool, affine BatchNorm) JᵀSJ *is* the CE Hessian within a linear region.
    """
    uu = u.detach().requires_grad_(True)
    soft = prob.target.is_floating_point()
    with torch.enable_grad():
        ce, logits = prob.fit(uu)
        logits = logits.flatten(1)
        n_out = logits.shape[1]
        outs = ([logits[:, c] for c in range(n_out)] if soft
                else [logits[:, c] - logits[:, 0] for c in range(1, n_out)])
        rows = [torch.autograd.grad(o.sum(), uu, retain_graph=i < len(outs) - 1)[0]
                for i, o in enumerate(outs)]
    with torch.no_grad():
        jac = torch.stack(rows, 1).flatten(2)              # (N, C or C − 1, D)
        z = logits.detach()
        if soft:
            sig = z.sigmoid()
            resid = sig - prob.target.flatten(1).to(z)
            curv_out = torch.diag_embed(sig * (1 - sig))
        else:
            p = z.softmax(1)
            resid = (p - F.one_hot(prob.target, n_out).to(z))[:, 1:]
            q = p[:, 1:]
            curv_out = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    return ce.detach(), jac, resid, curv_out


def _gauss_newton(prob: InnerProblem, u: Tensor, steps: int, lr: float | None = None,
                  max_halvings: int = 10, armijo: float = 1e-4) -> Tensor:
    """K damped Gauss-Newton steps on Σ_i T_i(u_i), solved exactly per sample, with a
    per-sample backtracking line search (``lr`` is not used: the step comes from the model).

    T = CE(z(u)) + α·d(u). The curvature model is H = JᵀSJ + α·W with J = ∂z/∂u (C × D per
    sample, one backward per class; C − 1 for softmax, whose S has the null vector 1, so the
    rows z_c − z_0 carry everything), S = ∇²_z CE (softmax: diag p − ppᵀ; sigmoid: diag
    σ(1 − σ)) and W diagonal: 2/s for l2, the majoriser 1/(s·√(δ² + ε²)) for the smooth l1
    (IRLS; it is ≥ the surrogate's own curvature, so a far-moved pixel is not thrown across
    x0 by a vanishing second derivative). For a piecewise-linear classifier in eval mode
    (ReLU, max-pool, affine BatchNorm) JᵀSJ *is* the CE Hessian within a linear region. The
    C-rank + diagonal system is solved by Woodbury (`causalign.implicit.lowrank_diag_solve`)
    in O(C²D) per sample — no CG, no H:
        (A + JᵀSJ)⁻¹g = A⁻¹g − A⁻¹JᵀS (I + JA⁻¹JᵀS)⁻¹ JA⁻¹g,   A = α·W.
    The line search (Armijo, halving) evaluates only the samples not yet accepted, so T never
    increases; a sample without an acceptable step stays where it is.
    """
    u = u.detach().clone()
    if len(u) == 0:  # nothing to solve (an export batch whose every sample is skipped):
        return u     # the Woodbury solve cannot reshape 0 samples into (0, -1)
    shape = (-1,) + (1,) * (u.dim() - 1)
    # (D,) for one scale shared by every sample, (N, D) for per-sample (flipped) scales
    inv_scale = None if prob.scale is None else (1.0 / prob.scale).flatten(
        1 if prob.scale.dim() == u.dim() else 0)
    sparse = prob.distance in ("l1", "scaled-l1")
    work = _work_dtype(u.dtype)  # the systems are solved in >= float32, steps taken in u's
    # samples whose step could not be computed (NaN/inf logits, gradient or objective at an
    # accepted point): they stayed where they were and came back as a plain "not flipped"
    # (with report=False, as training calls it, even NaN logits at x0 went unflagged)
    stuck = torch.zeros(len(u), dtype=torch.bool, device=u.device)
    for _ in range(steps):
        ce, jac, resid, curv_out = logit_curvature(prob, u)
        with torch.no_grad():
            jac, resid, curv_out = jac.to(work), resid.to(work), curv_out.to(work)
            delta = (u - prob.u0).flatten(1).to(work)
            if sparse:
                root = (delta.square() + prob.eps ** 2).sqrt()
                grad_d, weight = delta / root, 1.0 / root
            else:
                grad_d, weight = 2 * delta, torch.full_like(delta, 2.0)
            if inv_scale is not None:
                grad_d, weight = grad_d * inv_scale.to(work), weight * inv_scale.to(work)
            g = (jac * resid[:, :, None]).sum(1) + prob.alpha * grad_d
            diag = (prob.alpha * weight).clamp_min(1e-12)  # A, the distance's curvature
            if prob.projected:
                # projected Newton: a pixel held at its bound by the gradient is fixed (A = ∞,
                # A⁻¹ = 0 there turns the Woodbury solve into the exact one over the free
                # pixels)
                flat = u.flatten(1)
                held = (((flat <= prob.lower.flatten(1)) & (g > 0))
                        | ((flat >= prob.upper.flatten(1)) & (g < 0)))
                diag = diag.masked_fill(held, math.inf)
            if prob.alpha == 0:
                # α = 0: g = Jᵀr and A⁻¹ = 1e12 (the clamp), where A⁻¹g − A⁻¹·corr cancels
                # catastrophically (the step was noise: no flip, or a 1e3-sized change).
                # The same step without the difference: A⁻¹Jᵀ(I + S·J A⁻¹Jᵀ)⁻¹r, i.e. the
                # Gauss-Newton step on the logits, min-norm in u
                a_inv = 1.0 / diag
                ja = jac * a_inv[:, None, :]
                eye = torch.eye(jac.shape[1], dtype=work, device=u.device)
                dual = eye + curv_out @ (ja @ jac.transpose(1, 2))
                # a sample with non-finite logits gets the identity here (never a
                # LinAlgError for the batch) and a NaN step, which the line search never
                # takes; solve_ex: no host sync for an error check
                broken = ~torch.isfinite(dual).flatten(1).all(1)
                dual = torch.where(broken[:, None, None], eye, dual)
                y, info = torch.linalg.solve_ex(
                    dual, resid[:, :, None].nan_to_num(0.0, 0.0, 0.0))
                step = -(a_inv * (jac.transpose(1, 2) @ y)[..., 0])
                step = step.masked_fill((broken | (info != 0))[:, None], math.nan)
            else:
                # (A + JᵀSJ)⁻¹g by Woodbury; NaN for a sample whose system is not finite
                step = -lowrank_diag_solve(jac, curv_out, diag, g)
            slope = (g * step).sum(1)
            t0 = (ce.detach() + prob.alpha * distance_value(
                u - prob.u0, prob.distance, prob.scale, prob.eps)).to(work)
            step = step.view_as(u)
            computed = torch.isfinite(step).flatten(1).all(1) & torch.isfinite(t0)
            stuck |= ~computed
            todo = computed & (slope < 0)
            t = torch.ones(len(u), dtype=work, device=u.device)
            for _ in range(max_halvings + 1):
                idx = todo.nonzero().flatten()
                if len(idx) == 0:
                    break
                cand = (u[idx] + t[idx].view(shape) * step[idx]).to(u.dtype)
                sub = prob.subset(idx)
                if prob.projected:
                    # Armijo along the projection arc; a non-descent arc must not increase T
                    cand = sub.project(cand)
                    gain = (g[idx] * (cand - u[idx]).flatten(1).to(work)).sum(1)
                    bound = t0[idx] + armijo * gain.clamp_max(0.0)
                else:
                    bound = t0[idx] + armijo * t[idx] * slope[idx]
                val = sub.objective(cand).to(work)
                ok = torch.isfinite(val) & (val <= bound)
                u[idx[ok]] = cand[ok]
                todo[idx[ok]] = False
                t[idx[~ok]] *= 0.5
    # non-finite rows: the caller resets them to x0 and flags them as diverged
    return torch.where(stuck.view(shape), torch.nan, u).detach()
