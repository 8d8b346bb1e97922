"""LRP variants (zennit composites) and the differentiable LRP-ε used for PPI training."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.explain.lrp import LRP_VARIANTS, lrp_epsilon_modified_gradient
from causalign.models import SevenLayerCNN

F64 = torch.float64
VARIANTS = sorted(LRP_VARIANTS)
EXACT = {"epsilon": 1e-12, "stabilizer": 1e-12}  # ε → 0: the rules' exact limits


def bias_free_relu_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False),
    ).to(F64)
    with torch.no_grad():  # O(1) logits, so the stabilisers are negligible
        for p in net.parameters():
            p.normal_(0, 1)
    return net.eval()


def cnn_with_bn(dtype=F64) -> SevenLayerCNN:
    torch.manual_seed(1)
    model = SevenLayerCNN(1, 2, width=4).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def input_x_grad(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg).gather(1, t[:, None]).sum(), xg)
    return x * g


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_all_variants_registered():
    assert set(VARIANTS) == {"lrp-epsilon", "lrp-gamma", "lrp-alpha-beta", "lrp-flat",
                             "lrp-w-square", "lrp-zbox"}
    assert set(VARIANTS) <= set(explainer_names())


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_runs_on_cnn_with_batchnorm(name):
    model = cnn_with_bn(torch.float32).train()  # attribution must switch to eval and back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 1, 32, 32)
    rel = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1, 1]))
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert saliency_map(rel).shape == (3, 32, 32)
    assert model.training and all(m.training for m in model.modules())
    # The BatchNorm canonizer folded BN into the convs and must have undone it exactly.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", VARIANTS)
def test_conservation_on_bias_free_relu_net(name):
    net = bias_free_relu_net()
    x = torch.rand(4, 1, 12, 12, dtype=F64)  # inside ZBox's [0, 1] bounds
    t = torch.tensor([0, 1, 2, 1])
    rel = get_explainer(name, net, **EXACT).attribute(x, target=t)
    logit = net(x).gather(1, t[:, None]).squeeze(1).detach()
    assert torch.allclose(rel.flatten(1).sum(1), logit, rtol=1e-9, atol=0)
    # With the default stabilisers (1e-6) it holds to about that size, relative to the logits.
    rel = get_explainer(name, net).attribute(x, target=t)
    assert (rel.flatten(1).sum(1) - logit).abs().max() <= 1e-4 * logit.abs().max()


def test_epsilon_lrp_equals_input_times_gradient():
    net = bias_free_relu_net()
    x = torch.rand(4, 1, 12, 12, dtype=F64)
    t = torch.tensor([2, 0, 1, 1])
    rel = get_explainer("lrp-epsilon", net, **EXACT).attribute(x, target=t)
    assert rel_err(rel, input_x_grad(net, x, t)) < 1e-9
    # ... and the rules are not all the same map: γ and α2β1 differ from x ⊙ ∂z/∂x.
    for other in ("lrp-gamma", "lrp-alpha-beta"):
        assert rel_err(get_explainer(other, net, **EXACT).attribute(x, target=t),
                       input_x_grad(net, x, t)) > 1e-3


def test_differentiable_epsilon_matches_zennit_with_batchnorm():
    model = cnn_with_bn()
    x = torch.rand(3, 1, 32, 32, dtype=F64)
    t = torch.tensor([1, 0, 1])
    # zennit's folded BatchNorm keeps its eps: each BN becomes x/√(1 + 1e-5), so its maps are
    # ~5e-6 per BN layer smaller than the exact rule; 1e-4 bounds that for 6 layers.
    for kw in ({}, EXACT):
        ref = get_explainer("lrp-epsilon", model, **kw).attribute(x, target=t)
        ours = lrp_epsilon_modified_gradient(model, x, t, epsilon=kw.get("epsilon", 1e-6),
                                             stabilizer=kw.get("stabilizer", 1e-6))
        assert rel_err(ours, ref) < 1e-4
    # For a ReLU net LRP-ε (ε → 0) is input × gradient, biases and BN included.
    assert rel_err(ours, input_x_grad(model, x, t)) < 1e-8


def test_differentiable_epsilon_matches_zennit_on_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).to(F64).eval()
    x = torch.rand(1, 3, 32, 32, dtype=F64)
    t = torch.tensor([1])
    ref = get_explainer("lrp-epsilon", model, **EXACT).attribute(x, target=t)  # ResNetCanonizer
    ours = lrp_epsilon_modified_gradient(model, x, t, **EXACT)
    assert rel_err(ours, ref) < 2e-4  # 20 folded BNs, as above
    assert rel_err(ours, input_x_grad(model, x, t)) < 1e-8


def test_create_graph_reaches_parameters_for_epsilon_only():
    model = cnn_with_bn(torch.float32)
    x = torch.rand(2, 1, 32, 32)
    rel = get_explainer("lrp-epsilon", model).attribute(x, target=1, create_graph=True)
    grads = torch.autograd.grad(rel.clamp_min(0).sum(), list(model.parameters()),
                                allow_unused=True)
    conv_w = model.features[0].weight
    g = dict(zip([id(p) for p in model.parameters()], grads, strict=True))[id(conv_w)]
    assert g is not None and g.abs().sum() > 0
    with pytest.raises(ValueError, match="not differentiable"):
        get_explainer("lrp-gamma", model).attribute(x, target=1, create_graph=True)
