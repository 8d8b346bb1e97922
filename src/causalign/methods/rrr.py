"""Right for the Right Reasons (Ross, Hughes & Doshi-Velez, IJCAI 2017).

    L(θ) = CE(f(x), y) + λ · Σ_d (A_d · ∂/∂x_d Σ_k log p̂_k(x))²      (+ λ₂‖θ‖²)

The paper's λ₂‖θ‖² is the trainer's ``weight_decay`` = 2λ₂ (Adam's L2 term adds wd·θ to
the gradient, the gradient of (wd/2)‖θ‖²).

A_d = 1 on pixels the annotation marks as irrelevant (outside the lesion mask, or its box),
0 inside: the model is penalised for being *sensitive* to the background, the "right reasons"
term. The gradient is of the summed log-probabilities over all classes (as in the paper, so it
does not depend on the label) and is taken with ``create_graph=True``; the penalty is summed
over pixels and averaged over the annotated samples of the batch (samples without an
annotation contribute CE only).

λ: the paper sets λ₁ "so that the right-answer and right-reason terms have similar orders of
magnitude" (1000 on Decoy-MNIST with their MLP). With the CNNs here the penalty of an untrained
model is ~1e-2…5e-2 per image against CE ≈ 0.69, so the default λ = 10 puts the two terms on
the same scale; ``method.lam`` changes it. For two classes Σ_k log p̂_k = log p̂(1 − p̂), whose
gradient (1 − 2p̂)·∇logit vanishes at p̂ = ½: a large λ buys a small penalty with an
unconfident model, so λ trades accuracy for background insensitivity.

BatchNorm: the input gradient is taken with the batch statistics held constant
(`batch_stats_as_constants`), so it is each sample's own gradient — the one the eval-mode model
has — not one that leaks through the batch mean and variance.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.norm import channel_mean_var
from ._annotation import annotation_region, check_region, refuse_full_regions
from .base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..data.format import LesionDataset


@dataclass
class RRRParams:
    lam: float = 10.0  # λ₁, weight of the right-reasons term
    region: str = "mask"  # annotation: mask (box fallback) | box

    def validate(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(f"method.lam must be >= 0, got {self.lam}")
        check_region(self.region)


@contextmanager
def batch_stats_as_constants(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm normalises with the batch's statistics, so each sample's output
    depends on every other sample of the batch and its input gradient carries that
    cross-talk. Inside this context the statistics are used as constants (detached), so the
    gradient is each sample's own — what the eval-mode model, normalising with fixed running
    statistics, has. Running statistics are not updated here."""
    mods = [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def forward(m, x: Tensor) -> Tensor:
        shape = (1, -1, *[1] * (x.dim() - 2))
        mean, var = (s.detach().view(shape) for s in channel_mean_var(x.detach()))
        y = (x - mean) * torch.rsqrt(var + m.eps)
        if m.weight is not None:
            y = y * m.weight.view(shape) + m.bias.view(shape)
        return y

    for m in mods:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def input_gradients(model: nn.Module, x: Tensor, create_graph: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """(logits, ∂/∂x Σ_k log p̂_k(x)) — the input gradient RRR constrains, per sample."""
    x = x.detach().requires_grad_(True)
    with batch_stats_as_constants(model):
        logits = model(x)
    logp = F.log_softmax(logits, dim=1)
    (grad,) = torch.autograd.grad(logp.sum(), x, create_graph=create_graph)
    return logits, grad


def right_reasons(grad: Tensor, irrelevant: Tensor) -> Tensor:
    """Per-sample Σ_d (A_d ∂_d)² (channels share the spatial annotation)."""
    return (irrelevant * grad).pow(2).flatten(1).sum(1)


@register_method("rrr")
class RRR(Method):
    Params = RRRParams
    uses_annotations = True
    guidance_terms = ("rrr",)
    subset_means = True  # the penalty averages the annotated samples (LossOutput.means)

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        refuse_full_regions("rrr", train_set, self.params.region,
                            "the right-reasons penalty is 0 (the run would be ERM)")

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x = self.model_input(batch)
        logits = model(x)  # ordinary forward: CE and BatchNorm running statistics
        ce = self.ce(logits, batch["label"])
        _, grad = input_gradients(model, x, create_graph=True)
        area, annotated = annotation_region(batch, self.params.region)
        penalty = right_reasons(grad, 1.0 - area)
        rr = penalty[annotated].mean() if bool(annotated.any()) else penalty.sum() * 0.0
        total = ce + self.params.lam * rr
        k = int(annotated.sum())
        # history's train_rrr is the mean over the epoch's annotated samples: weighted by
        # them, so a step without any (its 0) does not dilute it, as it did by batch size
        return LossOutput(total, {"ce": float(ce.detach()), "rrr": float(rr.detach())},
                          means={"rrr": (self.params.lam * rr, k)}, part_weights={"rrr": k})
