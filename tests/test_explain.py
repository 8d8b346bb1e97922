"""Explainer registry and the Captum-based explainers."""

from __future__ import annotations

import pytest
import torch

from causalign.errors import CausalignError
from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.models import SevenLayerCNN


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SevenLayerCNN(1, 2, width=4).eval()


@pytest.mark.parametrize("name", ["gradcam", "gradient", "input-x-gradient"])
def test_maps_have_input_shape(model, name):
    x = torch.rand(3, 1, 32, 32)
    a = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1, 1]))
    assert a.shape[0] == 3 and a.shape[2:] == (32, 32)
    assert saliency_map(a).shape == (3, 32, 32)
    assert torch.isfinite(a).all()


def test_gradient_matches_autograd(model):
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    model(x)[:, 1].sum().backward()
    a = get_explainer("gradient", model).attribute(x.detach(), target=1)
    assert torch.allclose(a, x.grad.abs(), atol=1e-6)
    b = get_explainer("input-x-gradient", model).attribute(x.detach(), target=1)
    assert torch.allclose(b, x.grad * x.detach(), atol=1e-6)


@pytest.mark.parametrize("name", ["gradcam", "gradient", "input-x-gradient"])
def test_create_graph_is_differentiable_in_parameters(model, name):
    x = torch.rand(2, 1, 32, 32)
    a = get_explainer(name, model).attribute(x, target=1, create_graph=True)
    grads = torch.autograd.grad(a.abs().sum(), [p for p in model.parameters()],
                                allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_saliency(model):
    with pytest.raises(CausalignError, match="unknown saliency method 'foo'; valid: .*gradcam"):
        get_explainer("foo", model)
    assert {"gradcam", "gradient", "input-x-gradient"} <= set(explainer_names())
