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
* Other activations are rescaled only when they are ``nn.Module`` instances (nn.Sigmoid,
  nn.GELU, ...). A functional call (``torch.sigmoid``, ``F.gelu``) inside a ``forward`` cannot be
  seen by a hook: it back-propagates its true derivative g'(z), i.e. that layer gets the
  gradient rule instead of the rescale rule.
* Activations with g(0) ≠ 0 (Sigmoid, Hardsigmoid, Softplus, LogSigmoid) have no finite
  g(z)/z at z = 0: 0.5/z would let pre-activations near zero dominate the map. Their constant
  g(0) does not interact with the input, so, like a bias, it is left out:
  h = (g(z) − g(0))/z, computed in closed form without cancellation. For g(0) = 0 this is the
  paper's g(z)/z. Where |z| is tiny h takes its limit g'(0).
* ``create_graph=True`` gives the exact derivative of the map in θ. A plain z·stopgrad(h)
  would miss h's own dependence on θ, and reusing the rescaled graph to differentiate the
  pre-activations z(θ) would chain h instead of g'. So h is recomputed in the backward pass
  from the saved z with differentiable ops, and once the map is built the hooked nodes switch
  to passing gradients through the activation's true derivative.
* The map is computed in eval mode (BatchNorm running statistics, no dropout, samples
  independent); every module's previous train/eval flag is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .base import Explainer, register_explainer

__all__ = ["WBP", "wbp_mode", "wbp_weights", "rescale_factor"]

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


def _safe_ratio(num: Tensor, z: Tensor, limit: float | Tensor, eps: float) -> Tensor:
    """num/z, with the limit value where |z| < eps (so no 0/0 and no blow-up)."""
    small = z.abs() < eps
    ratio = num / torch.where(small, torch.ones_like(z), z)
    return torch.where(small, torch.as_tensor(limit, dtype=ratio.dtype, device=z.device), ratio)


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
    """Rules for g(0) ≠ 0, where (g(z) − g(0))/z would lose digits to cancellation."""
    if isinstance(module, nn.Sigmoid):
        return lambda z, out: _safe_ratio(_centered_sigmoid(z), z, 0.25, _tiny(z))
    if isinstance(module, nn.Hardsigmoid):
        return lambda z, out: _safe_ratio(torch.clamp(z / 6, -0.5, 0.5), z, 1 / 6, _tiny(z))
    if isinstance(module, nn.Softplus):
        beta, threshold = float(module.beta), float(module.threshold)
        return lambda z, out: _safe_ratio(
            _centered_softplus(z, beta, threshold), z, 0.5, _tiny(z)
        )
    if isinstance(module, nn.LogSigmoid):
        return lambda z, out: _safe_ratio(_centered_logsigmoid(z), z, 0.5, _tiny(z))
    return None


def _tiny(z: Tensor) -> float:
    # Below this |z| the ratio of two O(z) terms is replaced by its limit; error O(eps·g'').
    return float(torch.finfo(z.dtype).eps) if z.is_floating_point() else 1e-7


def _generic_rule(module: nn.Module) -> _Rule:
    """h = (out − g(0))/z for any elementwise activation module; g(0), g'(0) probed once."""
    cache: dict[tuple[torch.dtype, torch.device], tuple[float, float]] = {}

    def probe(z: Tensor) -> tuple[float, float]:
        key = (z.dtype, z.device)
        if key not in cache:
            with torch.enable_grad():
                zero = torch.zeros(1, dtype=z.dtype, device=z.device, requires_grad=True)
                # .forward: no hooks, no recursion; `zero * 1` tolerates in-place modules.
                g0 = module.forward(zero * 1)
                (dg0,) = torch.autograd.grad(g0.sum(), zero)
            cache[key] = (float(g0.detach()), float(dg0))
        return cache[key]

    def rule(z: Tensor, out: Tensor) -> Tensor:
        g0, dg0 = probe(z)
        eps = _tiny(z)
        if g0 != 0.0:  # cancellation in out − g(0) costs ~ulp(g0)/|z|: keep |z| larger
            eps = math.sqrt(eps) * max(1.0, abs(g0))
        return _safe_ratio(out - g0, z, dg0, eps)

    return rule


def rescale_factor(module: nn.Module) -> _Rule | None:
    """The WBP rescale rule h(z, g(z)) for an activation module; None where the gradient is it.

    Returns None for modules that need no rescaling (ReLU-like ones and non-activations).
    """
    if isinstance(module, _GRADIENT_IS_RULE) or not isinstance(module, _RESCALED):
        return None
    return _closed_form_rule(module) or _generic_rule(module)


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
        ctx, z: Tensor, out: Tensor, rule: _Rule, phase: _Phase
    ) -> Tensor:
        ctx.save_for_backward(z, out)
        ctx.rule = rule
        ctx.phase = phase
        return out.view_as(out)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        if not ctx.phase.rescale:
            return None, grad, None, None
        z, out = ctx.saved_tensors
        h = ctx.rule(z, out)
        return (grad * h).to(z.dtype), None, None, None


def _make_hook(
    rule: _Rule, phase: _Phase
) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return None
        z = args[0]
        if not (z.requires_grad or output.requires_grad):
            return None  # nothing will flow through here
        return _RescaledBackward.apply(z, output, rule, phase)

    return hook


@contextmanager
def wbp_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode with WBP's rescale rule on its activation modules.

    Forward values are unchanged; gradients through each rescaled activation are h = g(z)/z
    times the incoming gradient. Hooks, in-place flags and every module's train/eval flag are
    restored on exit, also when the body raises.
    """
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
            handles.append(module.register_forward_hook(_make_hook(rule, phase)))
        yield model
    finally:
        phase.rescale = False  # later backwards through this graph differentiate z(θ)
        for handle in handles:
            handle.remove()
        for module in made_out_of_place:
            module.inplace = True
        for module, training in modes:
            module.training = training


def _resolve_target(logits: Tensor, target: Tensor | int | None) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"WBP needs (N, classes) logits, got shape {tuple(logits.shape)}")
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.numel() == 1 and logits.shape[0] != 1:
        target = target.expand(logits.shape[0])
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries for {logits.shape[0]} inputs")
    return target


def wbp_weights(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | int | None = None,
    create_graph: bool = False,
) -> Tensor:
    """W̃⁰[target]: the WBP saliency weights of each input's target logit, shaped like inputs.

    `target` None means the predicted class. With `create_graph=True` the result stays
    differentiable in the parameters (and in `inputs` when they require grad).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("WBP needs autograd; call it outside torch.inference_mode()")
    with torch.enable_grad(), wbp_mode(model):
        x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
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
        self, inputs: Tensor, target: Tensor | int | None = None, create_graph: bool = False
    ) -> Tensor:
        weights = wbp_weights(self.model, inputs, target, create_graph=create_graph)
        x = inputs if create_graph else inputs.detach()
        return x * weights
