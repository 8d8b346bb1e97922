"""Layer-wise relevance propagation (LRP) variants through zennit composites.

Registered names and the rules they apply (zennit 0.5; "dense" = ``nn.Linear``, "conv" = any
convolution, activations pass relevance through, average pooling uses the ε-normalisation):

===============  ===========================================================================
lrp-epsilon      ε rule on every conv and dense layer (LRP-ε, Bach et al. 2015)
lrp-gamma        γ rule (γ = 0.25) on conv layers, ε on dense layers
lrp-alpha-beta   α2β1 on conv layers, ε on dense layers (zennit ``EpsilonAlpha2Beta1``)
lrp-flat         flat rule on the first layer, z⁺ on conv, ε on dense (``EpsilonPlusFlat``)
lrp-w-square     w² rule on the first layer, z⁺ on conv, ε on dense
lrp-zbox         z^B rule on the first layer with the data range [low, high] = [0, 1], γ on
                 conv, ε on dense (``EpsilonGammaBox``)
===============  ===========================================================================

The relevance at the output is the target logit itself (R = z_t one-hot), so for bias-free
networks the input relevances sum to the logit (conservation). BatchNorm is folded into the
preceding conv/dense layer with zennit canonizers (``ResNetCanonizer`` for torchvision ResNets,
``VGGCanonizer`` for VGGs, ``SequentialMergeBatchNorm`` otherwise), so maps use running
statistics; attributions run in eval mode and every module's train/eval flag is restored.
BagNet's mean over patch evidence is made a pooling module for the rules (`_bagnet_canonizer`).

Differentiability. zennit's rules evaluate each layer with *copies* of its weights
(``nn.Parameter(param.data)``) and its canonizers overwrite ``.data``, so a zennit map carries
no gradient to the model's parameters. PPI trains through the map, so ``create_graph=True`` on
``lrp-epsilon`` uses `lrp_epsilon_modified_gradient`, a modified-gradient form of the same rule
that keeps the graph (it equals the zennit map; tests check it). The other variants refuse
``create_graph=True`` rather than return a map whose parameter gradient is silently wrong.

The multi-view CNN (volumes) pools its slices with functional log-softmax/logsumexp and
products that no zennit rule covers; zennit would pass relevance through them as a gradient.
There ``lrp-epsilon`` is always the modified-gradient form (so explained and trained maps
agree) and the other variants refuse the model with one line. Layers without a rule are
refused as modules (`wbp.unsupported_layers`) and as functional calls seen in the forward
(``F.layer_norm``, ``F.scaled_dot_product_attention``, ...: `wbp._FUNCTIONAL_NO_RULE`).
Functional activations in a forward (``F.gelu``, ``torch.sigmoid``: `wbp._FUNCTIONAL`) get
their module's rule: the rescale rule in the modified-gradient ``lrp-epsilon``, zennit's Pass
in the other variants (they were crossed as a gradient, so ``F.gelu`` and ``nn.GELU`` gave
different maps of the same weights).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import (
    Explainer,
    Target,
    check_inputs,
    check_target_classes,
    eval_mode,
    model_lock,
    register_explainer,
    shape_errors,
    this_call_only,
)

if TYPE_CHECKING:
    from zennit.canonizers import AttributeCanonizer
    from zennit.core import Composite

__all__ = ["LRP", "LRP_VARIANTS", "default_canonizers", "lrp_epsilon_modified_gradient"]


def default_canonizers(model: nn.Module) -> list:
    """zennit canonizers that fold BatchNorm (and ResNet's residual sums, BagNet's patch mean)
    for `model`.

    Every canonizer here matches modules anywhere in the tree, so a wrapped backbone (the
    hierarchical model's f₁, ``nn.Sequential(resnet)``, a normalising wrapper) gets the same
    rules as the bare one. Choosing by the *top-level* type left a wrapped ResNet without its
    residual-sum canonizer: relevance then crossed each ``out + identity`` as a gradient, and
    LRP-ε maps of a hierarchical resnet18 summed to ~1e10 for a logit of 0.5. zennit's
    VGGCanonizer is SequentialMergeBatchNorm itself."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    canonizers = [SequentialMergeBatchNorm(), _bagnet_canonizer()]
    blocks = {type(m) for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))}
    if any(issubclass(b, Bottleneck) for b in blocks):
        canonizers.append(ResNetBottleneckCanonizer())
    if any(issubclass(b, BasicBlock) for b in blocks):
        canonizers.append(ResNetBasicBlockCanonizer())
    return canonizers


def _bagnet_canonizer() -> AttributeCanonizer:
    """A zennit canonizer that turns BagNet's functional mean over patches into a module.

    ``BagNet.forward`` averages the patch evidence with ``Tensor.mean``, which no rule sees:
    zennit would push the output relevance through it as a *gradient*, giving every patch
    the same relevance logit/(h·w) whatever its evidence (a patch voting against the class
    would then receive positive relevance at the classifier's ε rule). As an
    ``AdaptiveAvgPool2d`` the mean gets the ε-normalised average-pooling rule (R_patch =
    evidence/(h·w) · R/logit), the same as cnn7's and ResNet's global pooling. Like zennit's
    ResNet canonizer it overloads ``forward`` on the instance for the composite's lifetime.
    """
    from zennit.canonizers import AttributeCanonizer

    from ..models.bagnet import BagNet

    def forward(self: BagNet, x: Tensor) -> Tensor:
        return self.canonizer_mean(self.patch_logits(x)).flatten(1)

    def attribute_map(name: str, module: nn.Module) -> dict | None:
        if isinstance(module, BagNet):
            return {"forward": forward.__get__(module), "canonizer_mean": nn.AdaptiveAvgPool2d(1)}
        return None

    return AttributeCanonizer(attribute_map)


def _composite(variant: str, canonizers: list, epsilon: float, gamma: float, low: float,
               high: float, stabilizer: float):
    from zennit.composites import (
        EpsilonAlpha2Beta1,
        EpsilonGammaBox,
        EpsilonPlusFlat,
        LayerMapComposite,
        SpecialFirstLayerMapComposite,
        layer_map_base,
    )
    from zennit.rules import Epsilon, Gamma, Pass, WSquare, ZPlus
    from zennit.types import Convolution
    from zennit.types import Linear as AnyLinear

    # zennit's `Activation` type (relevance passes through) lacks nn.Mish, which it then
    # crossed as a gradient: a Mish model's lrp-epsilon map differed from the modified-gradient
    # one PPI trains on (which rescales every activation, as WBP) by more than the map itself.
    extra = [(nn.Mish, Pass())]
    base = extra + layer_map_base(stabilizer)
    dense = (nn.Linear, Epsilon(epsilon=epsilon))
    if variant == "epsilon":
        return LayerMapComposite(base + [(Convolution, Epsilon(epsilon=epsilon)), dense],
                                 canonizers=canonizers)
    if variant == "gamma":
        return LayerMapComposite(
            base + [(Convolution, Gamma(gamma=gamma, stabilizer=stabilizer)), dense],
            canonizers=canonizers)
    if variant == "alpha-beta":
        return EpsilonAlpha2Beta1(epsilon=epsilon, stabilizer=stabilizer, layer_map=extra,
                                  canonizers=canonizers)
    if variant == "flat":
        return EpsilonPlusFlat(epsilon=epsilon, stabilizer=stabilizer, layer_map=extra,
                               canonizers=canonizers)
    if variant == "w-square":
        return SpecialFirstLayerMapComposite(
            layer_map=base + [(Convolution, ZPlus(stabilizer=stabilizer)), dense],
            first_map=[(AnyLinear, WSquare(stabilizer=stabilizer))], canonizers=canonizers)
    if variant == "zbox":
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma,
                               stabilizer=stabilizer, layer_map=extra, canonizers=canonizers)
    raise ValueError(f"unknown LRP variant '{variant}'")


_eval_mode = eval_mode  # the explainers' shared one (modes restored on errors)


class LRP(Explainer):
    """LRP relevance of the target logit, shaped like the input (N, C, *spatial)."""

    variant: str = "epsilon"

    def __init__(self, model: nn.Module, epsilon: float = 1e-6, gamma: float = 0.25,
                 low: float = 0.0, high: float = 1.0, stabilizer: float = 1e-6,
                 canonizers: list | None = None) -> None:
        super().__init__(model)
        # NaN ε or γ, or a zero stabiliser, gave all-NaN maps without an error; a negative ε
        # or γ, or low >= high, silently computed some other rule
        bad = [f"{name} {value}" for name, value, ok in (
            ("epsilon", epsilon, math.isfinite(epsilon) and epsilon >= 0),
            ("gamma", gamma, math.isfinite(gamma) and gamma >= 0),
            ("stabilizer", stabilizer, math.isfinite(stabilizer) and stabilizer > 0),
            ("low/high", f"{low}/{high}", math.isfinite(low) and math.isfinite(high)
             and low < high)) if not ok]  # `not ok` catches NaN
        if bad:
            raise ConfigError(f"{self.name} needs finite epsilon >= 0, gamma >= 0, "
                              f"stabilizer > 0 and low < high; got {', '.join(bad)}")
        self.epsilon, self.gamma = float(epsilon), float(gamma)
        self.low, self.high, self.stabilizer = float(low), float(high), float(stabilizer)
        self.canonizers = canonizers
        self._merges_checked = False  # see _check_bn_merges: one extra forward, once

    def composite(self) -> Composite:
        canon = self.canonizers if self.canonizers is not None else default_canonizers(self.model)
        return _composite(self.variant, canon, self.epsilon, self.gamma, self.low, self.high,
                          self.stabilizer)

    def attribute(self, inputs: Tensor, target: Target = None,
                  create_graph: bool = False) -> Tensor:
        check_inputs(inputs, target, self.model)
        with shape_errors(self.model, inputs, self.name):
            return self._attribute(inputs, target, create_graph)

    def _attribute(self, inputs: Tensor, target: Target, create_graph: bool) -> Tensor:
        if create_graph:
            if self.variant == "epsilon":
                return lrp_epsilon_modified_gradient(self.model, inputs, target, self.epsilon,
                                                     create_graph=True,
                                                     stabilizer=self.stabilizer)
            raise ValueError(f"lrp-{self.variant} is not differentiable in the model's "
                             f"parameters (zennit evaluates rules on weight copies); use "
                             f"lrp-epsilon, wbp, gradient or gradcam to train through a map")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("LRP needs autograd; call it outside torch.inference_mode()")
        pooled = _unruled_pooling(self.model)
        if pooled is not None:
            # zennit would push relevance through the pooling's log-softmax/logsumexp/products
            # as if it were a gradient: maps that conserve nothing and differ from the
            # modified-gradient LRP-ε that PPI trains on. LRP-ε has a rule-free form (below).
            if self.variant == "epsilon":
                return lrp_epsilon_modified_gradient(self.model, inputs, target, self.epsilon,
                                                     stabilizer=self.stabilizer)
            raise InputError(f"lrp-{self.variant} has no rule for {pooled}'s attention pooling "
                             f"(log-softmax, logsumexp, weighted slice sums); use lrp-epsilon, "
                             f"wbp or gradient on this model")
        from .wbp import check_rules

        check_rules(self.model, self.name)  # zennit would pass relevance through as a gradient
        with _eval_mode(self.model):
            target = self._target(inputs, target)  # predicted class in eval mode, as mapped
        # zennit canonizes (BatchNorm folded into the weights, bias parameters added) and hooks
        # the modules it explains in place: on a model shared between threads two maps undid
        # each other's changes (16 of 20 maps wrong; 60 hooks and stray bias parameters left
        # on the model) and other threads' predictions ran half-canonized modules. A private
        # copy (same weights) is explained instead; one that cannot be copied, under the lock.
        model = _private_copy(self.model)
        with model_lock(self.model) if model is self.model else nullcontext():
            return self._zennit_map(model, inputs, target)

    def _zennit_map(self, model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
        from .wbp import _Functional

        composite = self.composite()
        if not self._merges_checked:
            with _eval_mode(model):
                _check_bn_merges(model, inputs, composite.canonizers, self.name)
            self._merges_checked = True
        with torch.enable_grad(), _eval_mode(model), _restored_on_error(model):
            try:
                # not composite.context(): a canonizer or hook failing inside register() would
                # skip its __exit__ and leave the hooks registered so far on the user's model
                composite.register(model)
                x = inputs.detach().requires_grad_(True)
                # F.layer_norm, F.scaled_dot_product_attention, ...: no rule, as their modules
                # (relevance crossed them as a gradient: maps of ~170 for logits of ~0.1);
                # functional activations pass relevance, as zennit's rule for their modules
                with _Functional(None, model, self.name):
                    logits = model(x)
                check_target_classes(logits, target)
                onehot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
                # R at the output = the target logit, so relevance is in logit units.
                (rel,) = torch.autograd.grad(logits, x, grad_outputs=onehot * logits.detach())
            finally:
                composite.remove()
        return rel.detach()


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for zennit to canonize and hook (parameters and buffers
    copied, ``.grad`` not), or ``model`` itself when it cannot be copied. The objects whose
    methods are the user's hooks are shared, not copied: a recorder's ``rec.hook`` counted
    into a copy of ``rec`` (its owner saw 1 of 3 forwards), while plain-function hooks ran
    as registered."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                      m._backward_pre_hooks):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", None)
                if owner is not None and not isinstance(owner, nn.Module):
                    memo[id(owner)] = owner  # a module's own method binds to its copy
    try:
        return copy.deepcopy(model, memo)
    except (TypeError, RuntimeError, copy.Error):  # e.g. a lock or a generator in a module
        return model


def _bn_merge_pairs(model: nn.Module, canonizers: list) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) for every pair zennit's SequentialMergeBatchNorm folds:
    a BatchNorm that directly follows a conv/dense layer in *module registration order*."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.core import collect_leaves

    if not any(isinstance(c, SequentialMergeBatchNorm) for c in canonizers):
        return []
    lin_type = SequentialMergeBatchNorm.linear_type
    bn_type = SequentialMergeBatchNorm.batch_norm_type
    names = {id(m): n for n, m in model.named_modules()}
    pairs, last = [], None
    for leaf in collect_leaves(model):
        if isinstance(last, lin_type) and isinstance(leaf, bn_type):
            pairs.append((names.get(id(last), "?"), names.get(id(leaf), "?")))
        last = leaf
    return pairs


def _check_bn_merges(model: nn.Module, inputs: Tensor, canonizers: list, what: str) -> None:
    """Refuse a model where a BatchNorm that zennit would fold into the layer before it in
    module order does not take that layer's output.

    Registration order is not data flow: in a pre-activation ResNet, conv2 of one block is
    followed by bn1 of the next, which normalises conv2's output *plus the skip*, and in a
    DenseNet each norm1 normalises a concatenation. Folding such a pair made the canonized
    network compute other logits (a silently wrong map), or crashed half-way on a channel
    mismatch and left the user's model with merged weights and a stray bias. One no-grad
    forward with hooks checks that each BatchNorm's input *is* its layer's output."""
    pairs = _bn_merge_pairs(model, canonizers)
    if not pairs:
        return
    modules = dict(model.named_modules())
    outputs: dict[tuple[str, int], weakref.ref] = {}
    bad: list[tuple[str, str]] = []

    def keep(name: str):
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            # a weak reference: keeping every layer's output alive would hold the whole
            # forward's activations; DataParallel runs a thread per replica
            outputs[name, threading.get_ident()] = weakref.ref(out)
        return hook

    def compare(lin: str, bn: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            ref = outputs.get((lin, threading.get_ident()))
            if not args or ref is None or args[0] is not ref():
                bad.append((lin, bn))
        return hook

    handles = []
    try:
        for lin, bn in pairs:
            handles.append(modules[lin].register_forward_hook(keep(lin)))
            handles.append(modules[bn].register_forward_pre_hook(compare(lin, bn)))
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    if bad:
        lin, bn = bad[0]
        raise InputError(f"{what} cannot fold BatchNorm '{bn}' into '{lin}', the layer before "
                         f"it in module order: its input is not that layer's output (a residual "
                         f"sum or concatenation in between, as in pre-activation ResNets and "
                         f"DenseNets); use wbp, gradient or gradcam for this model")


@contextmanager
def _restored_on_error(model: nn.Module) -> Iterator[None]:
    """Put back every parameter and buffer of `model` (the objects and their ``.data``) when
    the body raises: zennit's canonizers rebind ``.data`` and add bias parameters, and one that
    fails half-way returns no handle to undo what it already changed."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    data = [(t, t.data) for _, ps, bs in saved for t in (*ps.values(), *bs.values())
            if t is not None]
    try:
        yield
    except BaseException:
        for m, params, buffers in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for t, d in data:
            t.data = d
        raise


def _unruled_pooling(model: nn.Module) -> str | None:
    """The class name of a submodule whose forward is nonlinear *functional* pooling that no
    zennit rule covers (the multi-view CNN's attention over slices), else None."""
    from ..models.multiview import MultiViewCNN

    for m in model.modules():
        if isinstance(m, MultiViewCNN):
            return type(m).__name__
    return None


def _variant(name: str, variant: str) -> type[LRP]:
    cls = type(f"LRP_{variant.replace('-', '_')}", (LRP,), {
        "variant": variant, "__doc__": f"LRP with the {variant} composite (see module doc)."})
    return register_explainer(name)(cls)


LRP_VARIANTS: dict[str, type[LRP]] = {
    f"lrp-{v}": _variant(f"lrp-{v}", v)
    for v in ("epsilon", "gamma", "alpha-beta", "flat", "w-square", "zbox")
}


# ---------------------------------------------------------------- differentiable LRP-ε


class _Scale:
    """Shared switch: True while the relevance map is being back-propagated."""

    def __init__(self) -> None:
        self.active = True


class _EpsilonFactor(torch.autograd.Function):
    """Identity forward; backward multiplies by z / (z + ε·sign z) while the map is built.

    The factor is treated as a constant in θ: its derivative, ε/(z + ε·sign z)², is an O(1/ε)
    spike where a pre-activation is ~0, noise rather than signal for training. After the map
    is built the switch turns off, so a later backward through the forward pass (a training
    loss) sees the plain identity.
    """

    @staticmethod
    def forward(ctx, z: Tensor, eps: float, scale: _Scale) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.eps, ctx.scale = eps, scale
        return z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if not ctx.scale.active:
            return grad, None, None
        (z,) = ctx.saved_tensors
        z = z.detach()
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)  # zennit: sign(0) counts as +1
        return grad * (z / (z + ctx.eps * sign)), None, None


def _epsilon_points(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, is average pooling) for the modules whose output is the denominator z of an
    ε-type rule after BN folding.

    A conv/dense layer followed directly by BatchNorm (in leaf order, as zennit's
    SequentialMergeBatchNorm sees it) is folded into one layer whose output is the BN output;
    average pooling is zennit's ``Norm`` rule, normalised by the *stabilizer*, not ε.
    """
    from zennit.core import collect_leaves
    from zennit.types import AvgPool, BatchNorm
    from zennit.types import Linear as AnyLinear

    leaves = list(collect_leaves(model))
    points = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, AnyLinear):
            nxt = leaves[i + 1] if i + 1 < len(leaves) else None
            points.append((nxt if isinstance(nxt, BatchNorm) else leaf, False))
        elif isinstance(leaf, AvgPool):
            points.append((leaf, True))
    return points


def lrp_epsilon_modified_gradient(model: nn.Module, inputs: Tensor,
                                  target: Target = None, epsilon: float = 1e-6,
                                  create_graph: bool = False,
                                  stabilizer: float = 1e-6) -> Tensor:
    """LRP-ε as input ⊙ modified gradient, differentiable in θ with ``create_graph=True``.

    With pass-through activations, the ε rule R_j = a_j Σ_k w_jk R_k / (z_k + ε·sign z_k) is
    x ⊙ (the input gradient of the target logit in which every ε-rule layer's backward is scaled
    by z/(z + ε·sign z), average pooling's by z/(z + stabilizer·sign z) (zennit's ``Norm``
    rule) and every activation's by g(z)/z) — Ancona et al. (2018). The activation
    part is exactly WBP's rescale rule, so this runs inside `wbp_mode` (eval mode, restored
    afterwards). For ReLU networks and ε → 0 it is input × gradient. Residual sums written as
    ``a + b`` in ``forward`` get no ε factor (zennit's ResNet canonizer adds one); the
    difference is confined to sums within ~ε of zero.
    """
    from .wbp import _Functional, _resolve_target, _wbp_mode

    scale = _Scale()
    handles = []

    def hook_with(eps: float):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            return _EpsilonFactor.apply(output, eps, scale)
        return hook

    try:
        with torch.enable_grad(), _wbp_mode(model, "lrp-epsilon") as phase:
            for m, pool in _epsilon_points(model):
                # pooling takes the stabilizer, as zennit's Norm rule: with ε there, the map
                # PPI trains on (create_graph) differed from the explained zennit one by 26 %
                # of its maximum at ε = 0.1
                hook = hook_with(stabilizer if pool else epsilon)
                handles.append(m.register_forward_hook(this_call_only(m, hook)))
            x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
            # functional activations rescaled as their modules (F.gelu was crossed as a
            # gradient, unlike nn.GELU); F.layer_norm etc. refused
            with _Functional(phase, model, "lrp-epsilon"):
                logits = model(x)
            tgt = _resolve_target(logits, target)
            score = logits.gather(1, tgt[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
    finally:
        scale.active = False
        for h in handles:
            h.remove()
    rel = (x if create_graph else x.detach()) * grad
    return rel if create_graph else rel.detach()

