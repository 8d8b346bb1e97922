"""Gradient-based saliency through Captum: |∂z_t/∂x| and x ⊙ ∂z_t/∂x.

Captum's explainers do not keep the graph, so `create_graph=True` (training through a map,
as PPI's gradient backend does) takes the same quantity from `torch.autograd.grad`. Maps are
computed in eval mode (every module's flag restored afterwards) and, without
`create_graph`, detached.
"""

from __future__ import annotations

import torch
from captum.attr import Saliency
from torch import Tensor

from .base import (
    Explainer,
    Target,
    check_inputs,
    check_no_batch_statistics,
    eval_mode,
    register_explainer,
    shape_errors,
)


def _leaf(inputs: Tensor) -> Tensor:
    return inputs.detach().requires_grad_(True)


def _input_gradient(model, inputs: Tensor, target: Tensor, create_graph: bool) -> Tensor:
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    logits = model(x)
    score = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grad


def _gradient_map(explainer: Explainer, inputs: Tensor, target: Target,
                  create_graph: bool) -> tuple[Tensor, Tensor]:
    """(∂z_t/∂x, x) in eval mode; differentiable only with `create_graph` and autograd on
    (inside ``torch.no_grad()`` nothing is recorded, so the map is plain, as for any op)."""
    check_inputs(inputs, target, explainer.model)
    # batch statistics: each map depended on its batch-mates (by up to its own maximum)
    check_no_batch_statistics(explainer.model, inputs, f"{explainer.name} map")
    with shape_errors(explainer.model, inputs, explainer.name):
        return _gradient_map_checked(explainer, inputs, target, create_graph)


def _gradient_map_checked(explainer: Explainer, inputs: Tensor, target: Target,
                          create_graph: bool) -> tuple[Tensor, Tensor]:
    target = explainer._target(inputs, target)
    with eval_mode(explainer.model):
        if create_graph and torch.is_grad_enabled():
            forward = explainer._checked_model(target)
            return _input_gradient(forward, inputs, target, True), inputs
        x = _leaf(inputs)
        a = Saliency(explainer._checked_model(target)).attribute(x, target=target, abs=False)
    return a.detach(), inputs.detach()


@register_explainer("gradient")
class GradientSaliency(Explainer):
    """Simonyan et al. 2014 saliency: absolute input gradient of the target logit."""

    def attribute(self, inputs: Tensor, target: Target = None,
                  create_graph: bool = False) -> Tensor:
        a, _ = _gradient_map(self, inputs, target, create_graph)
        return a.abs()


@register_explainer("input-x-gradient")
class InputXGradientSaliency(Explainer):
    """x ⊙ ∂z_t/∂x (Shrikumar et al. 2016)."""

    def attribute(self, inputs: Tensor, target: Target = None,
                  create_graph: bool = False) -> Tensor:
        grad, x = _gradient_map(self, inputs, target, create_graph)
        return x * grad
