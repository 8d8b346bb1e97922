"""Gradient-based saliency through Captum: |∂z_t/∂x| and x ⊙ ∂z_t/∂x.

Captum's explainers do not keep the graph, so `create_graph=True` (training through a map,
as PPI's gradient backend does) takes the same quantity from `torch.autograd.grad`.
"""

from __future__ import annotations

import torch
from captum.attr import InputXGradient, Saliency
from torch import Tensor

from .base import Explainer, check_inputs, register_explainer


def _leaf(inputs: Tensor) -> Tensor:
    return inputs.detach().requires_grad_(True)


def _input_gradient(model, inputs: Tensor, target: Tensor, create_graph: bool) -> Tensor:
    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    logits = model(x)
    score = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grad


@register_explainer("gradient")
class GradientSaliency(Explainer):
    """Simonyan et al. 2014 saliency: absolute input gradient of the target logit."""

    def attribute(self, inputs: Tensor, target: Tensor | int | None = None,
                  create_graph: bool = False) -> Tensor:
        check_inputs(inputs, target)
        target = self._target(inputs, target)
        if create_graph:
            return _input_gradient(self.model, inputs, target, True).abs()
        return Saliency(self.model).attribute(_leaf(inputs), target=target, abs=True)


@register_explainer("input-x-gradient")
class InputXGradientSaliency(Explainer):
    """x ⊙ ∂z_t/∂x (Shrikumar et al. 2016)."""

    def attribute(self, inputs: Tensor, target: Tensor | int | None = None,
                  create_graph: bool = False) -> Tensor:
        check_inputs(inputs, target)
        target = self._target(inputs, target)
        if create_graph:
            return inputs * _input_gradient(self.model, inputs, target, True)
        return InputXGradient(self.model).attribute(_leaf(inputs), target=target)
