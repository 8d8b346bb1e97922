"""Mutation audit of the saliency explainers (explain/base, gradient, gradcam, wbp, lrp):
behaviours the earlier tests let slip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.errors import InputError
from causalign.explain import get_explainer, saliency_map
from causalign.explain.wbp import RescaleRule


def cam_net() -> nn.Sequential:
    """Conv → ReLU → pool → conv (the CAM layer, 4x4 on 8x8 inputs) → ReLU → 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(80, 3),
    ).eval()


def cam_reference(net: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor,
                  keep: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM by hand: (pre-ReLU channel sum at the layer's resolution, the upsampled map).

    ``keep``: which of the layer's outputs to use when the forward runs it more than once."""
    outs: list[torch.Tensor] = []
    def hook(m: nn.Module, a: tuple, o: torch.Tensor) -> torch.Tensor:
        outs.append(o)
        return o.clone()  # a later in-place op (ReLU(inplace=True)) edits the copy

    handle = layer.register_forward_hook(hook)
    try:
        logits = net(x)
    finally:
        handle.remove()
    acts = outs[-1] if keep == "last" else outs[0]
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts)[0]
    raw = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True).detach()
    up = F.interpolate(torch.relu(raw), size=x.shape[2:], mode="bilinear", align_corners=False)
    return raw, up


def test_gradcam_map_is_relu_of_mean_gradient_weighted_activations():
    """Grad-CAM = ReLU(Σ_k mean(∂z_t/∂A_k)·A_k), bilinearly upsampled, in both the Captum-
    style path and the one-pass `predict_and_attribute` (target = argmax there). Kills:
    sum instead of spatial mean of the gradients (both paths), ReLU dropped, 'nearest'
    upsampling, argmin as the predicted class."""
    net = cam_net()
    x = torch.rand(4, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 1])
    raw, ref = cam_reference(net, net[3], x, target)
    assert (raw < 0).any() and (raw > 0).any()  # the ReLU matters for this net
    cam = get_explainer("gradcam", net, layer=net[3]).attribute(x, target=target)
    assert cam.shape == (4, 1, 8, 8)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-7)

    pred = net(x).argmax(1)
    logits, cam1 = get_explainer("gradcam", net, layer=net[3]).predict_and_attribute(x)
    torch.testing.assert_close(logits, net(x).detach())
    torch.testing.assert_close(cam1, cam_reference(net, net[3], x, pred)[1], rtol=1e-5,
                               atol=1e-7)


def test_gradcam_of_a_layer_run_twice_uses_its_last_output():
    """A layer the forward runs twice (a shared conv): the map is of its last output, as
    Captum's. Kills ``seen[0]`` (the first output) in `_cam`."""
    torch.manual_seed(1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 3, 3, padding=1)
            self.shared = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.shared(torch.tanh(self.stem(x))))
            h = torch.tanh(self.shared(h))
            return self.head(h.mean(dim=(2, 3)))

    net = Twice().eval()
    x = torch.rand(2, 1, 6, 6)
    target = torch.tensor([0, 2])
    last = cam_reference(net, net.shared, x, target, "last")[1]
    first = cam_reference(net, net.shared, x, target, "first")[1]
    assert (last - first).abs().max() > 1e-4
    cam = get_explainer("gradcam", net, layer="shared").attribute(x, target=target)
    torch.testing.assert_close(cam, last, rtol=1e-5, atol=1e-7)


def test_gradcam_one_pass_keeps_the_layer_output_before_an_inplace_relu():
    """``nn.ReLU(inplace=True)`` right after the CAM layer overwrites its output: the one-pass
    `predict_and_attribute` must notice (version counter) and give the layer's own map, not
    the ReLU's. Kills dropping the ``_version`` check."""
    net = cam_net()
    net[4] = nn.ReLU(inplace=True)
    x = torch.rand(3, 1, 8, 8)
    pred = net(x).argmax(1)
    raw, ref = cam_reference(net, net[3], x, pred)
    _, cam = get_explainer("gradcam", net, layer=net[3]).predict_and_attribute(x)
    torch.testing.assert_close(cam, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam", "lrp-epsilon",
                                  "wbp"])
def test_default_target_is_the_predicted_class(name):
    """``target=None`` maps the argmax class, in `attribute` and in `predict_and_attribute`.
    Kills argmin in `Explainer._target` and in the default `predict_and_attribute`
    (a 3-class net, so argmin is another class)."""
    net = cam_net()
    x = torch.rand(4, 1, 8, 8)
    pred = net(x).argmax(1)
    explainer = get_explainer(name, net)
    explicit = explainer.attribute(x, target=pred)
    torch.testing.assert_close(explainer.attribute(x), explicit)
    _, mapped = explainer.predict_and_attribute(x)
    torch.testing.assert_close(mapped, explicit)


def test_saliency_map_sums_the_channels():
    """`saliency_map` reduces (N, C, *spatial) by summing channels (not averaging)."""
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(saliency_map(a), a[:, 0] + a[:, 1] + a[:, 2])


@pytest.mark.parametrize("name", ["gradient", "gradcam", "lrp-epsilon", "wbp"])
def test_target_bounds_and_length_are_checked(name):
    """Class index == number of classes is refused (off-by-one at the bound), the last class
    is accepted, and a target tensor of the wrong length is refused. Kills ``hi >`` for
    ``hi >=`` and the dropped length check."""
    net = cam_net()
    x = torch.rand(2, 1, 8, 8)
    explainer = get_explainer(name, net)
    with pytest.raises(InputError, match="0..2"):
        explainer.attribute(x, target=torch.tensor([1, 3]))
    assert explainer.attribute(x, target=torch.tensor([2, 2])).shape[0] == 2
    with pytest.raises(InputError, match="one class per input"):
        explainer.attribute(x, target=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name", ["gradient", "gradcam"])
def test_maps_of_a_model_in_train_mode_are_its_eval_mode_maps(name):
    """A model left in train mode (dropout, BatchNorm) is mapped in eval mode, and its flags
    are restored. Kills dropping ``model.eval()`` in `eval_mode` and in `_gradient_map`."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 1, 8, 8)
    target = torch.tensor([0, 1, 2])
    expected = get_explainer(name, net.eval(), layer=net[4]) if name == "gradcam" \
        else get_explainer(name, net.eval())
    want = expected.attribute(x, target=target)
    net.train()
    stats = net[1].running_mean.clone()
    got = expected.attribute(x, target=target)
    torch.testing.assert_close(got, want)
    assert all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, stats)


class _Shifted(nn.Module):
    """tanh(z) + 0.3: g(0) ≠ 0 and no closed-form rule, so RescaleRule's generic branch."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) + 0.3


def test_generic_rescale_rule_leaves_out_g0():
    """For an activation with g(0) ≠ 0 and no closed form, h = (g(z) − g(0))/z with the limit
    g'(0) at 0, in both backward paths. Kills dropping the ``− g0`` (h = g(z)/z)."""
    rule = RescaleRule(_Shifted())
    z = torch.tensor([0.0, -2.0, -0.5, 0.25, 1.0, 3.0], dtype=torch.float64)
    out = torch.tanh(z) + 0.3
    want = torch.where(z == 0, torch.ones_like(z), torch.tanh(z) / torch.where(z == 0, 1.0, z))
    with torch.no_grad():
        plain = rule.scale_grad(torch.ones_like(z), z, out)
    with torch.enable_grad():
        graph = rule(z, out)
    torch.testing.assert_close(plain, want)
    torch.testing.assert_close(graph, want)


def _bn_avgpool_net() -> nn.Sequential:
    """Bias-free conv → BatchNorm (folded by zennit) → ReLU → avg-pool → conv → global
    average → dense, float64, with O(1) activations so a large ε changes the map."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1)
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.3, 2.0)
    return net.eval()


@pytest.mark.parametrize("kw", [{"epsilon": 0.5}, {"epsilon": 0.1, "stabilizer": 0.05}])
def test_trained_lrp_epsilon_is_the_explained_one_for_any_epsilon(kw):
    """Regression: the differentiable LRP-ε (``create_graph=True``, what PPI trains on) is the
    zennit map the explainer shows, for any ε and stabilizer. It scaled average pooling by ε
    where zennit's Norm rule takes the stabilizer: at ε = 0.1 the two maps differed by 26 %
    of the map's maximum. Also kills: ε at the conv instead of its folded BatchNorm, no ε
    at the pooling, the sign of ε flipped."""
    net = _bn_avgpool_net()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    explainer = get_explainer("lrp-epsilon", net, **kw)
    shown = explainer.attribute(x, target=t)
    trained = explainer.attribute(x, target=t, create_graph=True)
    # zennit folds BN with its eps (x/√(var + 1e-5)): ~1e-5 of the map, as test_lrp's bound
    assert (trained.detach() - shown).abs().max() <= 1e-4 * shown.abs().max()
    assert (shown - get_explainer("lrp-epsilon", net).attribute(x, target=t)).abs().max() \
        > 0.05 * shown.abs().max()  # ... and ε does change the map here


class _FunctionalSiLU(nn.Module):
    """conv → SiLU → dense, the SiLU as ``F.silu(h, inplace=...)`` in forward."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv(x), inplace=self.inplace)
        return self.fc(h.flatten(1))


def test_wbp_of_an_inplace_functional_activation_rescales_its_input():
    """``F.silu(h, inplace=True)`` overwrites z, which the rescale rule h = g(z)/z = σ(z)
    needs: WBP copies z first, so the map equals the out-of-place one and the rule by hand.
    Kills dropping that copy (the rule then saw g(z) as z)."""
    torch.manual_seed(4)
    net = _FunctionalSiLU(inplace=True).eval()
    x = torch.randn(2, 1, 6, 6)
    t = torch.tensor([1, 0])
    # by hand: the WBP weights of a conv → SiLU → linear net are Wᵀ_conv (σ(z) ⊙ W_fc[t])
    z = net.conv(x).detach()
    upstream = net.fc.weight[t].detach().reshape(2, 3, 6, 6) * torch.sigmoid(z)
    weights = torch.nn.grad.conv2d_input(x.shape, net.conv.weight.detach(), upstream, padding=1)
    got = get_explainer("wbp", net).attribute(x, target=t)
    torch.testing.assert_close(got, x * weights, rtol=1e-5, atol=1e-6)
    net.inplace = False
    torch.testing.assert_close(get_explainer("wbp", net).attribute(x, target=t), got)


def test_lrp_epsilon_parameter_gradient_holds_the_epsilon_factors_constant():
    """``create_graph=True`` LRP-ε: the gradient of a loss on the map in θ, with each ε factor
    z/(z + ε·sign z) held constant (its documented choice) and the tanh rescale h = tanh(z)/z
    differentiated through the true forward. Reference: the rule chained by hand on a
    two-layer net. Kills leaving the ε factor on for the backward through the forward pass
    (h's z then picked up the factor a second time)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(),
                        nn.Linear(3, 2, bias=False)).double().eval()
    eps = 0.5
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 1])
    w = torch.randn(3, 4, dtype=torch.float64)
    rel = get_explainer("lrp-epsilon", net, epsilon=eps).attribute(x, target=t,
                                                                   create_graph=True)
    got = torch.autograd.grad((rel * w).sum(), [net[0].weight, net[2].weight])

    def factor(z: torch.Tensor) -> torch.Tensor:
        return (z / (z + eps * torch.where(z >= 0, 1.0, -1.0))).detach()

    w1, w2 = net[0].weight, net[2].weight
    z1 = x @ w1.T
    z2 = torch.tanh(z1) @ w2.T
    g2 = F.one_hot(t, 2).double() * factor(z2)
    g1 = (g2 @ w2) * (torch.tanh(z1) / z1) * factor(z1)
    ref_rel = x * (g1 @ w1)
    torch.testing.assert_close(rel.detach(), ref_rel.detach())
    want = torch.autograd.grad((ref_rel * w).sum(), [w1, w2])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
