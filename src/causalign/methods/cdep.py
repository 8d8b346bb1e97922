"""Contextual Decomposition Explanation Penalization, CDEP (Rieger, Singh, Murdoch & Yu,
ICML 2020).

Contextual decomposition (CD; Murdoch et al. 2018, Singh et al. 2019 for CNNs) splits every
activation into a part β caused by an input region S and a part γ caused by the rest, layer by
layer, so that β + γ equals the ordinary activation at every layer — in particular the logits:

* input: β₀ = x ⊙ s, γ₀ = x ⊙ (1 − s);
* affine layers (conv, linear, BatchNorm): β' = Wβ, γ' = Wγ, and the bias is shared in
  proportion to |Wβ| and |Wγ| (CDEP's ``prop_conv``/``prop_linear``); BatchNorm is the affine
  map of its normalisation — running statistics in eval mode, the batch statistics of the
  full activation β + γ in train mode (so the decomposition still sums to the forward pass);
* ReLU: β' = ReLU(β), γ' = ReLU(β + γ) − ReLU(β);
* max-pooling: the window's arg-max of β + γ selects which β and γ pass;
* average pooling, flatten, dropout (eval): linear without bias, applied to both parts.

CDEP's loss adds the importance of a region the model should *not* use: for S = the
non-annotated region (outside the lesion mask, or box), the CD scores of the logits give
β_k (evidence of S for class k) and γ_k (of the annotated part); the penalty is the mean over
classes and annotated samples of softmax(β_k, γ_k)[0], the share of class-k evidence that
comes from the background (CDEP's ``softmax(stack(rel, irrel))[:, 0]``):

    L = CE(f(x), y) + λ · mean softmax([β_k, γ_k])₀.

λ = 1 by default: the penalty lies in [0, 1] like CE's scale; with λ = 10 the model can zero
the background share by staying at chance (measured on a two-cue toy problem).

Supported models: the 7-layer CNN, BagNet-q, torchvision's VGG (vgg11) and any
``nn.Sequential`` of the layers above; ResNet and Inception (residual sums, concatenated
branches) are refused before training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ._annotation import annotation_region, check_region, refuse_full_regions
from .base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..data.format import LesionDataset

_EPS = 1e-20


def _share_bias(rel: Tensor, irrel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Split an additive bias between the two parts in proportion to their magnitudes.

    γ takes the rest of the bias, not b / (a + b + ε) of it: where both parts are exactly 0
    (a zero background, a unit no part reaches) that dropped the bias and β + γ no longer
    equalled the forward pass. There the whole bias goes to γ, as in CD for LSTMs (Murdoch
    et al.) and CDEP's BatchNorm rule, so S = ∅ still gives β = 0."""
    a, b = rel.abs(), irrel.abs()
    frac = a / (a + b + _EPS)  # 0 where a = b = 0; ε also bounds the gradient
    return rel + frac * bias, irrel + (1.0 - frac) * bias


def _bias_view(bias: Tensor, like: Tensor) -> Tensor:
    return bias.view(1, -1, *[1] * (like.dim() - 2))


def cd_conv(m: nn.Conv2d, rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    # The module's own padding (`_conv_forward`): F.conv2d with m.padding always pads with
    # zeros, so a reflect/replicate/circular conv was decomposed as another function and
    # β + γ missed the logits (by 0.02–0.04 on a one-conv chain).
    r = m._conv_forward(rel, m.weight, None)
    i = m._conv_forward(irrel, m.weight, None)
    if m.bias is None:
        return r, i
    return _share_bias(r, i, _bias_view(m.bias, r))


def cd_linear(m: nn.Linear, rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    r, i = F.linear(rel, m.weight), F.linear(irrel, m.weight)
    if m.bias is None:
        return r, i
    return _share_bias(r, i, m.bias)


def cd_batchnorm(m: nn.modules.batchnorm._BatchNorm, rel: Tensor, irrel: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """BatchNorm as the affine map it applies: y = a·z + c with a = γ/√(var+ε),
    c = b − a·mean; train mode uses the batch statistics of z = β + γ (no running update)."""
    if m.training or not m.track_running_stats or m.running_mean is None:
        z = rel + irrel
        dims = [0, *range(2, z.dim())]
        mean = z.mean(dims)
        var = z.var(dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    s, c = _bias_view(scale, rel), _bias_view(shift, rel)
    return _share_bias(rel * s, irrel * s, c)


def cd_relu(rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    r = F.relu(rel)
    return r, F.relu(rel + irrel) - r


def cd_maxpool(m: nn.MaxPool2d, rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    _, idx = F.max_pool2d(rel + irrel, m.kernel_size, m.stride, m.padding, m.dilation,
                          ceil_mode=m.ceil_mode, return_indices=True)
    flat = idx.flatten(2)

    def pick(t: Tensor) -> Tensor:
        return t.flatten(2).gather(2, flat).view_as(idx)

    return pick(rel), pick(irrel)


# The layers `cd_propagate` has a rule for.
CD_LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.MaxPool2d,
             nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_CD_NAMES = ", ".join(t.__name__.lstrip("_") for t in CD_LAYERS)


def cd_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat chain of layers CD can propagate through."""
    from torchvision.models import VGG

    from ..models.bagnet import BagNet
    from ..models.cnn import SevenLayerCNN

    if isinstance(model, SevenLayerCNN):
        return [*model.features, model.pool, model.flatten, model.dropout, model.classifier]
    if isinstance(model, BagNet):
        # Patch evidence of the real patches (the 1x1 classifier on the unpadded features is
        # patch_logits: padding then cropping is the identity there), then their mean.
        return [*model.features, model.classifier, nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if isinstance(model, VGG):  # torchvision: features → avgpool → flatten → classifier
        return [*model.features, model.avgpool, nn.Flatten(), *model.classifier]
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for m in model:
            # a supported model inside a chain (nn.Sequential(normalise, cnn7)) is its layers
            out += cd_layers(m) if isinstance(m, (nn.Sequential, SevenLayerCNN, BagNet, VGG)) \
                else [m]
        # every layer checked here, so `setup` refuses the model before training instead of
        # the first step's `cd_propagate`
        for m in out:
            if not isinstance(m, CD_LAYERS):
                raise ConfigError(f"cdep: no contextual-decomposition rule for "
                                  f"{type(m).__name__} (supported: {_CD_NAMES})")
        return out
    raise ConfigError(f"cdep: contextual decomposition supports the cnn7, bagnet* and vgg11 "
                      f"models and nn.Sequential chains, not {type(model).__name__} (residual "
                      f"and multi-branch models have no CD rule here)")


def cd_propagate(layers: Iterable[nn.Module], rel: Tensor, irrel: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Propagate (β, γ) through a chain of layers."""
    for m in layers:
        if isinstance(m, nn.Conv2d):
            rel, irrel = cd_conv(m, rel, irrel)
        elif isinstance(m, nn.Linear):
            rel, irrel = cd_linear(m, rel, irrel)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            rel, irrel = cd_batchnorm(m, rel, irrel)
        elif isinstance(m, nn.ReLU):
            rel, irrel = cd_relu(rel, irrel)
        elif isinstance(m, nn.MaxPool2d):
            rel, irrel = cd_maxpool(m, rel, irrel)
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten)):
            rel, irrel = m(rel), m(irrel)
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:  # the same units are dropped in both parts
                keep = (torch.rand_like(rel) >= m.p).to(rel.dtype) / (1 - m.p)
                rel, irrel = rel * keep, irrel * keep
        elif isinstance(m, nn.Identity):
            pass
        else:
            raise ConfigError(f"cdep: no contextual-decomposition rule for "
                              f"{type(m).__name__} (supported: {_CD_NAMES})")
    return rel, irrel


def contextual_decomposition(model: nn.Module, x: Tensor, region: Tensor
                             ) -> tuple[Tensor, Tensor]:
    """CD scores of the logits: (β, γ) with β the evidence of ``region`` (1 = in S),
    γ that of the rest; β + γ = model(x)."""
    return cd_propagate(cd_layers(model), x * region, x * (1.0 - region))


@dataclass
class CDEPParams:
    lam: float = 1.0  # λ, weight of the explanation penalty
    region: str = "mask"  # annotation: mask (box fallback) | box

    def validate(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(f"method.lam must be >= 0, got {self.lam}")
        check_region(self.region)


@register_method("cdep")
class CDEP(Method):
    Params = CDEPParams
    uses_annotations = True
    guidance_terms = ("cdep",)
    subset_means = True  # the penalty averages the annotated samples (LossOutput.means)
    not_plain_reason = ("runs contextual decomposition over the model's layers one by one "
                        "(not the model's forward)")

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        cd_layers(model)  # unsupported models fail before training starts
        # S = ∅ for every sample: β = 0 and the penalty softmax(0, γ_k)₀ = σ(−logit_k) only
        # pushes every logit up
        refuse_full_regions("cdep", train_set, self.params.region,
                            "there is no background whose evidence CDEP could penalise")

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x = self.model_input(batch)
        area, annotated = annotation_region(batch, self.params.region)
        logits = model(x)  # the ordinary forward (updates BatchNorm running statistics)
        if bool(annotated.any()):
            # CD of the annotated samples; S = the region outside the annotation. BatchNorm
            # uses these samples' batch statistics, so β + γ equals their train-mode forward.
            rel, irrel = contextual_decomposition(model, x[annotated], 1.0 - area[annotated])
            share = torch.stack([rel, irrel], dim=-1).softmax(-1)[..., 0]  # (n, classes)
            expl = share.mean()
        else:
            expl = logits.sum() * 0.0
        ce = self.ce(logits, batch["label"])
        total = ce + self.params.lam * expl
        k = int(annotated.sum())
        # weighted by the annotated samples in history's train_cdep (see rrr)
        return LossOutput(total, {"ce": float(ce.detach()), "cdep": float(expl.detach())},
                          means={"cdep": (self.params.lam * expl, k)},
                          part_weights={"cdep": k})
