"""Weight Back Propagation (WBP) saliency (seed 002, §3.2 and Table 1).

WBP writes the logits as x^L = W̃⁰x, building the saliency matrix W̃ backwards layer by layer:
FC and conv layers multiply by their (transposed, flipped) weights, BatchNorm by γ/σ (running
statistics), pooling relocates (max) or distributes (average) it, and an activation g rescales
it by h = g(z)/z. Biases never enter. The map for class m is s_m(x) = W̃⁰[m] ⊙ x.

Every rule except the activation one is the layer's Jacobian, so W̃⁰ is the input gradient of
logit m in a network whose activations pass their gradient through the *rescale* h instead of
g'(z). `wbp_mode` arranges exactly that with forward hooks on activation modules (the forward
values do not change), so W̃⁰ costs one forward and one backward pass, for any architecture, and
`create_graph=True` keeps it differentiable in the parameters (PPI trains through it).

Choices, and what they mean for users:

* ReLU, LeakyReLU, PReLU, Hardshrink are positively homogeneous per piece: g(z)/z is their
  Jacobian, so they need no hook and functional calls (``F.relu``) are fine. PyTorch's ReLU
  gate is 1{z > 0} where the paper writes 1{z ≥ 0}; they differ only where z == 0 exactly.
* Other activations are rescaled as ``nn.Module`` instances (nn.Sigmoid, nn.GELU, ...) by
  forward hooks and, in `wbp_weights` (the WBP explainer, PPI), as functional calls too
  (``torch.sigmoid``, ``x.tanh()``, ``F.gelu``, ``F.silu``, ...: `_FUNCTIONAL`) through a torch
  function mode around the forward pass. Without it a functional activation back-propagated its
  true derivative g'(z): a GELU MLP written with ``F.gelu`` got a different map from the same
  weights with ``nn.GELU`` (0.04 of a 0.1 map), labelled WBP. An ``inplace=True`` call is
  rescaled in the tensor it returns (z is copied first); code that reads the overwritten
  input afterwards instead, and in-place methods (``sigmoid_``), get the gradient rule.
  `wbp_mode` on its own (a user's own forward and backward) hooks modules only, and so does
  an ``nn.DataParallel`` model on several GPUs (its replicas run in threads the mode, which
  is thread-local, does not reach).
* Activations with g(0) ≠ 0 (Sigmoid, Hardsigmoid, Softplus, LogSigmoid) have no finite
  g(z)/z at z = 0: 0.5/z would let pre-activations near zero dominate the map. Their constant
  g(0) does not interact with the input, so, like a bias, it is left out:
  h = (g(z) − g(0))/z, computed in closed form without cancellation. For g(0) = 0 this is the
  paper's g(z)/z. At z = 0 h takes its limit g'(0) (PyTorch's derivative at a kink).
* ``create_graph=True`` gives the exact derivative of the map in θ. A plain z·stopgrad(h)
  would miss h's own dependence on θ, and reusing the rescaled graph to differentiate the
  pre-activations z(θ) would chain h instead of g'. So h is recomputed in the backward pass
  from the saved z with differentiable ops, and once the map is built the hooked nodes switch
  to passing gradients through the activation's true derivative.
* The map is computed in eval mode (BatchNorm running statistics, no dropout, samples
  independent); every module's previous train/eval flag is restored afterwards.
* Nonlinear modules with no rule in the paper (LayerNorm, GroupNorm, instance statistics,
  attention, softmax, GLU, bilinear: `unsupported_layers`) are refused with one line naming
  them: back-propagating their true derivative would give a gradient map labelled WBP. So are
  the functional normalisations and attention (``F.layer_norm``, ``F.group_norm``,
  ``F.scaled_dot_product_attention``, ...: `_FUNCTIONAL_NO_RULE`; ``F.instance_norm`` and
  ``F.batch_norm`` over batch statistics: `_batch_statistics`) when `wbp_weights` sees one
  in the forward pass. Functional softmax (the multi-view CNN's pooling over slices) and
  products of two input-dependent tensors in a ``forward`` (the gates of squeeze-excitation
  blocks in EfficientNet and MobileNetV3, ``scale * x``) get the gradient (product) rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import InputError
from .base import (
    Explainer,
    Target,
    as_target,
    check_inputs,
    check_logits,
    check_target_classes,
    model_lock,
    register_explainer,
    shape_errors,
    this_call_only,
)

__all__ = ["WBP", "RescaleRule", "rescale_factor", "unsupported_layers", "wbp_mode",
           "wbp_weights"]

# h(z, out) -> rescale factor, elementwise; `out` is the module's output g(z).
_Rule = Callable[[Tensor, Tensor], Tensor]

# Piecewise positively homogeneous: the Jacobian already is g(z)/z, no hook needed.
_GRADIENT_IS_RULE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardshrink, nn.Identity)

# Activations whose backward pass is replaced by the rescale rule.
_RESCALED = (
    nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink,
)


def _safe_ratio(num: Tensor, z: Tensor, limit: float, eps: float = 0.0) -> Tensor:
    """num/z, with the limit value where |z| <= eps (so no 0/0 and no blow-up).

    The numerators here are accurate relative to z, so eps = 0 (only z == 0 is special) keeps
    both one-sided limits right for activations with a kink at 0 (ELU, SELU, ReLU6).
    """
    small = z == 0 if eps == 0 else z.abs() <= eps
    if torch.is_grad_enabled():  # create_graph: out-of-place, no inf anywhere in the graph
        return torch.where(small, limit, num / torch.where(small, 1.0, z))
    return (num / z).masked_fill_(small, limit)  # plain backward: fewer passes over memory


def _centered_sigmoid(z: Tensor) -> Tensor:
    return 0.5 * torch.tanh(0.5 * z)  # == sigmoid(z) − 1/2, without cancellation


def _centered_softplus(z: Tensor, beta: float, threshold: float) -> Tensor:
    # softplus(z) − log(2)/β = log1p(expm1(βz)/2)/β; beyond `threshold` softplus is linear.
    bz = beta * z
    linear = z - math.log(2.0) / beta
    inner = torch.log1p(torch.expm1(torch.clamp(bz, max=threshold)) / 2) / beta
    return torch.where(bz > threshold, linear, inner)


def _centered_logsigmoid(z: Tensor) -> Tensor:
    # logsigmoid(z) + log 2 = −(softplus(−z) − log 2)
    return -_centered_softplus(-z, 1.0, 20.0)


def _closed_form_rule(module: nn.Module) -> _Rule | None:
    """Rules known in closed form.

    g(z) = z·φ(z) activations (GELU, SiLU, Mish) have h = φ(z): no division, no special case.
    For g(0) ≠ 0, (g(z) − g(0))/z would lose digits to cancellation, so it is written out.
    """
    if isinstance(module, nn.GELU):
        if module.approximate == "tanh":
            c = math.sqrt(2 / math.pi)
            return lambda z, out: 0.5 * (1 + torch.tanh(c * (z + 0.044715 * z * z * z)))
        return lambda z, out: torch.special.ndtr(z)  # GELU(z)/z = Φ(z)
    if isinstance(module, nn.SiLU):
        return lambda z, out: torch.sigmoid(z)
    if isinstance(module, nn.Mish):
        return lambda z, out: torch.tanh(nn.functional.softplus(z))
    if isinstance(module, nn.Sigmoid):
        return lambda z, out: _safe_ratio(_centered_sigmoid(z), z, 0.25)
    if isinstance(module, nn.Hardsigmoid):
        return lambda z, out: _safe_ratio(torch.clamp(z / 6, -0.5, 0.5), z, 1 / 6)
    if isinstance(module, nn.Softplus):
        beta, threshold = float(module.beta), float(module.threshold)
        return lambda z, out: _safe_ratio(_centered_softplus(z, beta, threshold), z, 0.5)
    if isinstance(module, nn.LogSigmoid):
        return lambda z, out: _safe_ratio(_centered_logsigmoid(z), z, 0.5)
    return None


class RescaleRule:
    """WBP's rescale factor h(z) = (g(z) − g(0))/z for one activation module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.closed = _closed_form_rule(module)
        self._constants: dict[tuple[torch.dtype, torch.device], tuple[float, float]] = {}

    def constants(self, z: Tensor) -> tuple[float, float]:
        """(g(0), g'(0)) in z's dtype, probed once per dtype and device."""
        key = (z.dtype, z.device)
        if key not in self._constants:
            with torch.enable_grad():
                zero = torch.zeros(1, dtype=z.dtype, device=z.device, requires_grad=True)
                # .forward: no hooks, no recursion; `zero * 1` tolerates in-place modules.
                g0 = self.module.forward(zero * 1)
                (dg0,) = torch.autograd.grad(g0.sum(), zero)
            self._constants[key] = (float(g0.detach()), float(dg0))
        return self._constants[key]

    def __call__(self, z: Tensor, out: Tensor) -> Tensor:
        """h from the pre-activation z and the module's output g(z), differentiably."""
        if self.closed is not None:
            return self.closed(z, out)
        g0, dg0 = self.constants(z)
        if g0 == 0.0:
            return _safe_ratio(out, z, dg0)
        # A g(0) ≠ 0 without a closed form: out − g(0) cancels, costing ~ulp(g0)/|z|, so
        # small |z| takes the limit instead.
        eps = math.sqrt(float(torch.finfo(z.dtype).eps)) * max(1.0, abs(g0))
        return _safe_ratio(out - g0, z, dg0, eps)

    def scale_grad(self, grad: Tensor, z: Tensor, out: Tensor) -> Tensor:
        """grad ⊙ h: the rescaled activation's backward."""
        if not torch.is_grad_enabled():
            g0, dg0 = self.constants(z)
            if g0 == 0.0:
                # Plain backward, g(0) = 0: g(z)/z is accurate for every z ≠ 0 and z == 0 gives
                # 0/0, so 3 passes over memory do it (the closed forms take up to 5).
                h = torch.div(out, z).nan_to_num_(nan=dg0)
                return h.mul_(grad) if h.dtype == grad.dtype else grad * h
        return grad * self(z, out)


# Nonlinear modules that no WBP rule (seed 002, Table 1) nor LRP rule here covers: their
# normalisation statistics, attention weights or products depend on the input, so neither the
# layer Jacobian nor a rescale h = g(z)/z is the paper's W̃ (zennit even treats
# MultiheadAttention as an activation and crashes in its backward hook).
_NO_RULE: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.MultiheadAttention,
    nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.Bilinear,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def unsupported_layers(model: nn.Module) -> list[str]:
    """'Type (n×, e.g. 'name')' for each kind of `model`'s nonlinear modules without a WBP/LRP
    rule; empty when every module is covered. Instance norm counts unless it normalises with
    running statistics (then it is BatchNorm's affine map in eval mode), and so does a
    BatchNorm without running statistics (``track_running_stats=False``): in eval mode it
    still normalises over the batch, so the γ/σ rule has no σ and a sample's map depended on
    the other samples in its batch (WBP: by 0.07 of a 0.21 map; zennit's BatchNorm merge
    crashed with "'NoneType' object has no attribute 'data'")."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        instance_stats = (isinstance(m, nn.modules.instancenorm._InstanceNorm)
                          and not m.track_running_stats)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is None:
            found.setdefault(f"{type(m).__name__} without running statistics",
                             []).append(name or "<model>")
        elif isinstance(m, _NO_RULE) or instance_stats:
            found.setdefault(type(m).__name__, []).append(name or "<model>")
    return [f"{kind} ({len(names)}x, e.g. '{names[0]}')" for kind, names in found.items()]


def check_rules(model: nn.Module, what: str) -> None:
    """Refuse, with one line, a model with modules `what` (wbp, lrp-*) has no rule for."""
    bad = unsupported_layers(model)
    if bad:
        raise InputError(f"{what} has no rule for {type(model).__name__}'s "
                         f"{', '.join(bad)} (its rules cover conv, linear, BatchNorm, pooling "
                         f"and activation layers); use gradient, input-x-gradient or gradcam "
                         f"for this model")


def rescale_factor(module: nn.Module) -> RescaleRule | None:
    """The WBP rescale rule for an activation module; None where the gradient already is it.

    Returns None for modules that need no rescaling (ReLU-like ones and non-activations).
    """
    if isinstance(module, _GRADIENT_IS_RULE) or not isinstance(module, _RESCALED):
        return None
    return RescaleRule(module)


class _Phase:
    """Shared by one `wbp_mode` call's nodes: True while W̃⁰ is being back-propagated."""

    def __init__(self) -> None:
        self.rescale = True


class _RescaledBackward(torch.autograd.Function):
    """Identity on the activation output; its backward depends on the phase.

    While W̃⁰ is computed (inside `wbp_mode`) the backward multiplies by h(z) instead of
    g'(z); h is recomputed from the saved tensors with differentiable ops, so a
    `create_graph=True` backward records h's dependence on z (hence on θ and x). After the
    context exits, a second backward (a training loss on the map) that reaches this node
    differentiates the *forward* values z(θ): the gradient then goes to the module's own output
    `out`, whose grad_fn is the activation's exact derivative g'(z).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, out: Tensor, rule: RescaleRule, phase: _Phase
    ) -> Tensor:
        ctx.save_for_backward(z, out)
        ctx.rule = rule
        ctx.phase = phase
        # A copy, not a view: models may modify an activation's output in place (`y += r`),
        # which autograd forbids on views returned by a Function (and `out` is saved).
        return out.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        if not ctx.phase.rescale:
            return None, grad, None, None
        z, out = ctx.saved_tensors
        return ctx.rule.scale_grad(grad, z, out).to(z.dtype), None, None, None


def _make_hook(
    rule: RescaleRule, phase: _Phase
) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return None
        z = args[0]
        if not (z.requires_grad or output.requires_grad):
            return None  # nothing will flow through here
        if getattr(output.grad_fn, "_forward_cls", None) is _RescaledBackward:
            return None  # its functional call inside forward was rescaled (`_Functional`)
        return _RescaledBackward.apply(z, output, rule, phase)

    return hook


# Functional activations (as torch hands them to a function mode) -> their module equivalent,
# built from the call's arguments (its rescale rule is the module's, closed forms included).
_FUNCTIONAL: dict[Callable, Callable[..., nn.Module]] = {
    F.gelu: lambda approximate="none": nn.GELU(approximate=approximate),
    F.silu: lambda inplace=False: nn.SiLU(),
    F.mish: lambda inplace=False: nn.Mish(),
    torch.sigmoid: nn.Sigmoid,
    Tensor.sigmoid: nn.Sigmoid,
    torch.tanh: nn.Tanh,
    Tensor.tanh: nn.Tanh,
    F.elu: lambda alpha=1.0, inplace=False: nn.ELU(alpha),
    F.celu: lambda alpha=1.0, inplace=False: nn.CELU(alpha),
    F.selu: lambda inplace=False: nn.SELU(),
    F.softplus: lambda beta=1.0, threshold=20.0: nn.Softplus(beta, threshold),
    F.hardtanh: lambda min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val),
    F.relu6: lambda inplace=False: nn.ReLU6(),
    F.hardswish: lambda inplace=False: nn.Hardswish(),
    F.hardsigmoid: lambda inplace=False: nn.Hardsigmoid(),
    F.logsigmoid: nn.LogSigmoid,
    F.softsign: nn.Softsign,
    F.tanhshrink: nn.Tanhshrink,
    F.softshrink: lambda lambd=0.5: nn.Softshrink(lambd),
}

# Functional activations whose gradient already is the rescale rule (g(z)/z, see the module
# doc): WBP leaves them alone, but zennit's Pass rule (`_Functional` with phase None) is not
# their gradient: F.leaky_relu crossed as a gradient scales relevance by the slope, and an
# lrp-epsilon map then differed from nn.LeakyReLU's (0.018 of a 0.13 map). The factories only
# name the positional arguments (for ``inplace``).
_PASS_ONLY: dict[Callable, Callable[..., None]] = {
    F.relu: lambda inplace=False: None,
    torch.relu: lambda: None,
    Tensor.relu: lambda: None,
    F.leaky_relu: lambda negative_slope=0.01, inplace=False: None,
    F.prelu: lambda weight=None: None,
    F.rrelu: lambda lower=1 / 8, upper=1 / 3, training=False, inplace=False: None,
    F.hardshrink: lambda lambd=0.5: None,
    F.threshold: lambda threshold=None, value=None, inplace=False: None,
}

# Functional forms of `_NO_RULE` modules: refused when `wbp_weights` sees them run. (Softmax
# is not among them: the multi-view CNN pools its slices with F.log_softmax, see module doc.)
_FUNCTIONAL_NO_RULE: dict[Callable, str] = {
    F.layer_norm: "F.layer_norm", F.group_norm: "F.group_norm",
    F.local_response_norm: "F.local_response_norm", F.glu: "F.glu", F.bilinear: "F.bilinear",
    F.scaled_dot_product_attention: "F.scaled_dot_product_attention",
    F.multi_head_attention_forward: "F.multi_head_attention_forward",
    **({F.rms_norm: "F.rms_norm"} if hasattr(F, "rms_norm") else {}),
    # the torch namespace's own forms (F.layer_norm calls them, but a forward may directly)
    torch.layer_norm: "torch.layer_norm", torch.group_norm: "torch.group_norm",
    **({torch.rms_norm: "torch.rms_norm"} if hasattr(torch, "rms_norm") else {}),
}


def _batch_statistics(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """The name of a functional normalisation over the batch's (or the sample's own)
    statistics, as the modules `unsupported_layers` refuses (instance norm without running
    statistics, BatchNorm with ``training=True`` or without running statistics): a sample's
    map then depended on its batch-mates (WBP 0.04 of a 0.27 map) or had no γ/σ rule."""
    def arg(i: int, name: str, default: object) -> object:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if func in (F.instance_norm, torch.instance_norm):
        if arg(5, "use_input_stats", True):
            return f"{'F' if func is F.instance_norm else 'torch'}.instance_norm " \
                   f"(normalising with the sample's own statistics)"
    elif func in (F.batch_norm, torch.batch_norm):
        training = arg(5, "training", False)
        # F.batch_norm(input, running_mean, running_var, ...), torch.batch_norm(input,
        # weight, bias, running_mean, running_var, ...)
        var = arg(2 if func is F.batch_norm else 4, "running_var", None)
        if training or var is None:
            return f"{'F' if func is F.batch_norm else 'torch'}.batch_norm over the batch's " \
                   f"statistics (training=True or no running statistics)"
    return None


class _PassBackward(torch.autograd.Function):
    """Identity on an activation's output whose backward hands the incoming gradient to z
    unchanged: zennit's ``Pass`` rule, which its LRP composites give activation modules."""

    @staticmethod
    def forward(ctx, z: Tensor, out: Tensor) -> Tensor:  # type: ignore[override]
        return out.clone()  # a copy, as `_RescaledBackward` (models edit outputs in place)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class _Functional(TorchFunctionMode):
    """Rescales functional activations (`_FUNCTIONAL`) run during one forward pass, as the
    module hooks do, and refuses functional layers without a rule (`_FUNCTIONAL_NO_RULE`).
    Only the forward runs under it: the rules' own ops in the backward are not activations.

    `phase` None gives the activations zennit's Pass rule instead (the LRP composites' rule
    for their modules): without either a functional activation (``F.gelu``) was crossed as a
    gradient, so LRP maps of the same weights differed between ``F.gelu`` and ``nn.GELU``."""

    def __init__(self, phase: _Phase | None, model: nn.Module, what: str) -> None:
        super().__init__()
        self.phase, self.model, self.what = phase, model, what
        self.rules: dict[tuple, RescaleRule] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        no_rule = _FUNCTIONAL_NO_RULE.get(func) or _batch_statistics(func, args, kwargs)
        if no_rule:
            raise InputError(f"{self.what} has no rule for {no_rule} in "
                             f"{type(self.model).__name__}'s forward (its rules cover conv, "
                             f"linear, BatchNorm, pooling and activation layers); use "
                             f"gradient, input-x-gradient or gradcam for this model")
        entry = _FUNCTIONAL.get(func) or (_PASS_ONLY.get(func) if self.phase is None else None)
        if entry is None or not args or not isinstance(args[0], Tensor) or "out" in kwargs \
                or not torch.is_grad_enabled():
            return func(*args, **kwargs)  # (`out=`: writes a given tensor, no graph to keep)
        make, z = entry, args[0]
        # positional extras (F.softshrink(x, 0.3), F.elu(x, 0.5, True)) as the factory's
        # keywords
        names = make.__code__.co_varnames[:make.__code__.co_argcount] \
            if hasattr(make, "__code__") else ()
        options = {**dict(zip(names, args[1:], strict=False)), **kwargs}
        # in place (`h = F.silu(h, inplace=True)`) overwrites z, which the rule needs: keep a
        # copy (the returned tensor is rescaled; code that reads h itself afterwards is not)
        z_in = z.clone() if options.get("inplace") and z.requires_grad else z
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or not (z_in.requires_grad or out.requires_grad) \
                or out.shape != z_in.shape:
            return out  # nothing flows through, or not elementwise
        if self.phase is None:
            return _PassBackward.apply(z_in, out)
        key = (func, tuple(sorted((k, v) for k, v in options.items() if k != "inplace")))
        rule = self.rules.get(key)
        if rule is None:
            rule = self.rules[key] = RescaleRule(make(**options))
        return _RescaledBackward.apply(z_in, out, rule, self.phase)


@contextmanager
def wbp_mode(model: nn.Module, what: str = "wbp") -> Iterator[nn.Module]:
    """Put `model` in eval mode with WBP's rescale rule on its activation modules.

    Forward values are unchanged; gradients through each rescaled activation are h = g(z)/z
    times the incoming gradient. Hooks, in-place flags and every module's train/eval flag are
    restored on exit, also when the body raises. A model with modules no rule covers
    (`unsupported_layers`) is refused, naming `what` and the modules. Functional activations
    are not seen here (`wbp_weights` adds them for its forward pass).
    """
    with _wbp_mode(model, what):
        yield model


@contextmanager
def _wbp_mode(model: nn.Module, what: str = "wbp") -> Iterator[_Phase]:
    """`wbp_mode`, yielding its phase (shared with `_Functional`)."""
    check_rules(model, what)
    # held for the whole map: another thread's wbp_mode would re-enable the in-place flags
    # and switch train/eval flags back under this one's forward
    lock = model_lock(model)
    lock.acquire()
    modes = [(m, m.training) for m in model.modules()]
    phase = _Phase()
    handles = []
    made_out_of_place: list[nn.Module] = []
    try:
        model.eval()
        for module in model.modules():
            rule = rescale_factor(module)
            if rule is None:
                continue
            if getattr(module, "inplace", False):
                # An in-place activation overwrites z, which the rule needs.
                module.inplace = False
                made_out_of_place.append(module)
            handles.append(module.register_forward_hook(
                this_call_only(module, _make_hook(rule, phase))))
        yield phase
    finally:
        phase.rescale = False  # later backwards through this graph differentiate z(θ)
        for handle in handles:
            handle.remove()
        for module in made_out_of_place:
            module.inplace = True
        for module, training in modes:
            module.training = training
        lock.release()


def _resolve_target(logits: Tensor, target: Target) -> Tensor:
    check_logits(logits, "WBP")
    target = as_target(target)
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, int):
        target = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    target = target.to(logits.device).long().reshape(-1)
    if target.numel() == 1 and logits.shape[0] != 1:
        target = target.expand(logits.shape[0])
    if target.shape[0] != logits.shape[0]:
        raise InputError(f"target has {target.shape[0]} entries for {logits.shape[0]} inputs")
    check_target_classes(logits, target)  # an int target too: gather would fail unreadably
    return target


def wbp_weights(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    create_graph: bool = False,
) -> Tensor:
    """W̃⁰[target]: the WBP saliency weights of each input's target logit, shaped like inputs.

    `target` None means the predicted class. With `create_graph=True` the result stays
    differentiable in the parameters (and in `inputs` when they require grad).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("WBP needs autograd; call it outside torch.inference_mode()")
    with torch.enable_grad(), _wbp_mode(model) as phase:
        x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
        with _Functional(phase, model, "wbp"):  # the forward only, see `_Functional`
            logits = model(x)
        tgt = _resolve_target(logits, target)
        # Samples are independent in eval mode, so one backward of the summed target logits
        # gives every sample's row of W̃⁰.
        score = logits.gather(1, tgt[:, None]).sum()
        (weights,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return weights if create_graph else weights.detach()


@register_explainer("wbp")
class WBP(Explainer):
    """Weight Back Propagation map s_m(x) = W̃⁰[m] ⊙ x (seed 002, Eq. 7)."""

    def attribute(
        self, inputs: Tensor, target: Target = None, create_graph: bool = False
    ) -> Tensor:
        check_inputs(inputs, target, self.model)
        with shape_errors(self.model, inputs, self.name):
            weights = wbp_weights(self.model, inputs, target, create_graph=create_graph)
        x = inputs if create_graph else inputs.detach()
        return x * weights
