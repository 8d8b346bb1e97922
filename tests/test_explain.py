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


ALL_EXPLAINERS = ["gradcam", "gradient", "input-x-gradient", "wbp", "lrp-epsilon",
                  "lrp-alpha-beta"]


@pytest.mark.parametrize("name", ALL_EXPLAINERS)
def test_bad_inputs_fail_with_one_clear_error(model, name):
    from causalign.errors import InputError

    explainer = get_explainer(name, model)
    x = torch.rand(3, 1, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    # Without the check Grad-CAM and WBP return NaN maps and no error.
    with pytest.raises(InputError, match="inputs hold 1 NaN/inf value"):
        explainer.attribute(x, target=torch.tensor([0, 1, 1]))
    x = torch.rand(3, 1, 32, 32)
    with pytest.raises(InputError, match=r"one class per input \(3\), got shape \(2,\)"):
        explainer.attribute(x, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-negative"):  # InputError is a ValueError too
        explainer.attribute(x, target=torch.tensor([0, -1, 1]))
    with pytest.raises(InputError, match="floating-point tensor"):
        explainer.attribute(torch.zeros(3, 1, 32, 32, dtype=torch.uint8), target=0)
    with pytest.raises(InputError, match="non-empty batch"):
        explainer.attribute(torch.zeros(0, 1, 32, 32), target=0)
    # A single target tensor element applies to every input, as an int does.
    a = explainer.attribute(x, target=torch.tensor([1]))
    assert torch.allclose(a, explainer.attribute(x, target=1))


def test_wbp_names_a_target_class_the_model_lacks(model):
    from causalign.errors import InputError

    with pytest.raises(InputError, match=r"target classes must lie in 0..1, got 0..5"):
        get_explainer("wbp", model).attribute(torch.rand(2, 1, 32, 32),
                                              target=torch.tensor([0, 5]))
