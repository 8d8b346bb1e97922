"""Models: the 7-layer CNN, MLP head, hierarchical wrapper, torchvision backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.errors import CausalignError
from causalign.models import HierarchicalModel, MLPHead, SevenLayerCNN, build_model, find_cam_layer
from causalign.models.bagnet import BagNet


def test_seven_layer_cnn():
    m = SevenLayerCNN(1, 2)
    weight_layers = [x for x in m.modules() if isinstance(x, nn.Conv2d | nn.Linear)]
    assert len(weight_layers) == 7
    x = torch.rand(3, 1, 64, 64)
    assert m(x).shape == (3, 2)
    feats = {}
    m.cam_layer.register_forward_hook(lambda mod, i, o: feats.setdefault("a", o))
    m(x)
    assert feats["a"].shape[-2:] == (16, 16)  # CAM at 1/4 resolution


def test_attribute_predictor_and_hierarchy():
    f1 = SevenLayerCNN(1, 6)
    f2 = MLPHead(6, 2)
    h = HierarchicalModel(f1, f2)
    x = torch.rand(2, 1, 32, 32)
    assert h.attributes(x).shape == (2, 6)
    assert h(x).shape == (2, 2)
    assert torch.allclose(h(x), f2(f1(x).sigmoid()))
    assert find_cam_layer(h) is f1.cam_layer


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("vgg11", 32), ("inception_v3", 80)])
def test_backbones_one_channel_any_classes(name, size):
    m = build_model(name, in_channels=1, num_outputs=3).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 1, size, size))
    assert out.shape == (2, 3)
    assert isinstance(find_cam_layer(m), nn.Module)


@pytest.mark.parametrize("name,patch", [("bagnet9", 9), ("bagnet17", 17)])
def test_bagnet_backbone_by_name(name, patch):
    # the window of each patch is tested in test_baselines; here: the name builds that model
    m = build_model(name, in_channels=1, num_outputs=3, width=8).eval()
    assert isinstance(m, BagNet) and m.patch == patch and find_cam_layer(m) is m.cam_layer
    with torch.no_grad():
        assert m(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_unknown_model():
    with pytest.raises(CausalignError, match="unknown model 'alexnet'; valid: .*resnet18"):
        build_model("alexnet", 1, 2)


def test_hierarchy_link_is_a_module_so_wbp_rescales_it():
    """WBP rescales a sigmoid only if it can hook it: at the f₁ → f₂ link it must apply
    h = (σ(z) − ½)/z, not σ'(z) (which a functional Tensor.sigmoid() would pass)."""
    from causalign.explain.wbp import wbp_weights

    torch.manual_seed(0)
    h = HierarchicalModel(SevenLayerCNN(1, 3, width=4), MLPHead(3, 2, hidden=8)).eval()
    h = h.double()
    with torch.no_grad():  # attribute logits far from 0, where σ' and the rescale differ
        h.f1.classifier.weight.mul_(300)
        h.f1.classifier.bias.fill_(1.5)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1])
    got = wbp_weights(h, x, target)
    # expected: f₁ and f₂ are piecewise linear in eval mode, so their WBP is their Jacobian;
    # only the link is rescaled
    xg = x.clone().requires_grad_(True)
    z = h.f1(xg)
    u = torch.sigmoid(z).detach().requires_grad_(True)
    logits = h.f2(u)
    (g2,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), u)
    rescale = (torch.sigmoid(z) - 0.5).detach() / z.detach()
    assert float(z.detach().abs().min()) > 0.5, z
    (want,) = torch.autograd.grad((g2 * rescale * z).sum(), xg)
    torch.testing.assert_close(got, want)
