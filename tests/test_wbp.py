"""WBP saliency: one-backward implementation vs the explicit Table 1 rules (tests/wbp_reference)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from wbp_reference import wbp_reference

from causalign.explain import get_explainer
from causalign.explain.wbp import WBP, rescale_factor, wbp_mode, wbp_weights

TOL = 1e-5
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny; on a shared CPU intra-op threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest entry."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def bn(module: nn.Module) -> nn.Module:
    """BatchNorm with non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.3, 2.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module


def conv_net(act: nn.Module) -> nn.Sequential:
    """Strided+padded conv, BN, grouped conv, overlapping max-pool, dilated conv, avg-pool, FC."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        bn(nn.BatchNorm2d(4)),
        act,
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        act,
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 4, 3, padding="same", dilation=2),
        act,
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 8),
        act,
        nn.Dropout(0.5),
        nn.Linear(8, 3),
    )


def wbp_rule_error(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """Largest relative error of WBP's map and weights against the explicit Table 1 rules."""
    net = net.eval()
    w_ref, s_ref = wbp_reference(net, x, target)
    s = WBP(net).attribute(x, target)
    w = wbp_weights(net, x, target)
    assert s.shape == x.shape and w.shape == x.shape
    return max(rel_err(s, s_ref), rel_err(w, w_ref))


ACTIVATIONS = [
    nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
    nn.ELU(), nn.Softplus(), nn.LeakyReLU(0.1), nn.Mish(), nn.Hardtanh(), nn.ReLU6(),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_conv_net_matches_rules(act: nn.Module) -> None:
    torch.manual_seed(0)
    net = conv_net(act).to(F64)
    x = 2 * torch.randn(3, 2, 13, 13, dtype=F64)
    assert wbp_rule_error(net, x, torch.tensor([0, 2, 1])) <= TOL


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.GELU()], ids=repr)
def test_float32_map_matches_float64_rules(act: nn.Module) -> None:
    # The float32 map (closed-form rescale factors, no cancellation) vs the float64 rules.
    torch.manual_seed(1)
    net = conv_net(act).to(F64).eval()
    x = 2 * torch.randn(3, 2, 13, 13, dtype=F64)
    target = torch.tensor([1, 0, 2])
    _, s_ref = wbp_reference(net, x, target)
    s = WBP(copy.deepcopy(net).float()).attribute(x.float(), target)
    assert rel_err(s, s_ref) <= TOL


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_create_graph_map_equals_plain_map(act: nn.Module) -> None:
    # The differentiable backward and the fast plain one compute the same factors.
    torch.manual_seed(15)
    net = conv_net(act).eval()
    x = 2 * torch.randn(2, 2, 13, 13)
    plain = WBP(net).attribute(x, 1)
    graph = WBP(net).attribute(x, 1, create_graph=True)
    assert rel_err(graph.detach(), plain) <= TOL


RESCALED = [
    nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ELU(0.7),
    nn.CELU(1.3), nn.SELU(), nn.Softplus(beta=2.0), nn.Mish(), nn.Hardtanh(-2.0, 1.5),
    nn.ReLU6(), nn.Hardswish(), nn.Hardsigmoid(), nn.LogSigmoid(), nn.Softsign(),
    nn.Tanhshrink(), nn.Softshrink(0.3),
]


@pytest.mark.parametrize("act", RESCALED, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_rescale_factor_values(act: nn.Module, dtype: torch.dtype) -> None:
    # h = (g(z) − g(0))/z, finite everywhere, with the limit g'(0) at z = 0, in both backward
    # paths (differentiable and plain).
    rule = rescale_factor(act)
    assert rule is not None and rescale_factor(nn.ReLU()) is None
    z = torch.tensor([0.0, 1e-30, -1e-30, 1e-6, -1e-6, 1e-3, -0.4, 0.7, 3.0, -5.0, 50.0, -60.0],
                     dtype=dtype)
    with torch.no_grad():
        out = act(z)
        plain = rule.scale_grad(torch.ones_like(z), z, out)
    with torch.enable_grad():
        graph = rule(z, out)
    z64 = z.double()
    g = act.double() if hasattr(act, "double") else act
    truth = (g(z64) - g(torch.zeros(1, dtype=F64))) / z64
    zero = torch.zeros(1, dtype=F64, requires_grad=True)
    (slope0,) = torch.autograd.grad(g(zero * 1).sum(), zero)
    big = z64.abs() >= 1e-6  # below, float64 (g(z) − g(0))/z itself loses digits
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for h in (plain, graph):
        assert torch.isfinite(h).all()
        assert torch.allclose(h.double()[big], truth[big], rtol=tol, atol=tol)
        assert torch.allclose(h.double()[0], slope0, atol=1e-6)
        # ±1e-30: the one-sided limits, which h(±1e-6) approximates to O(1e-6).
        assert torch.allclose(h.double()[1:3], truth[3:5], atol=1e-5)


def test_mlp_and_bn1d() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Linear(12, 16), bn(nn.BatchNorm1d(16)), nn.Tanh(), nn.Linear(16, 8), nn.GELU(),
        nn.Linear(8, 3),
    ).to(F64)
    assert wbp_rule_error(net, torch.randn(5, 12, dtype=F64), torch.tensor([0, 1, 2, 0, 1])) <= TOL


def test_strided_padded_and_grouped_convs() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 4, stride=3, padding=2),  # output size leaves rows the stride skips
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3, dilation=2),
        nn.Tanh(),
        nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(0, 1), bias=False),
        nn.Flatten(),
        nn.LazyLinear(2),
    ).to(F64)
    x = torch.randn(2, 3, 29, 27, dtype=F64)
    net(x)  # materialise the lazy layer
    assert wbp_rule_error(net, x, torch.tensor([1, 0])) <= TOL


def test_pooling_layers() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),  # overlapping windows: collisions must add
        nn.Conv2d(3, 3, 3, padding=1), nn.SiLU(),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d((3, 2)),  # 4×4 → 3×2: uneven, overlapping windows
        nn.Conv2d(3, 3, 1), nn.ELU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(3, 2),
    ).to(F64)
    assert wbp_rule_error(net, torch.randn(3, 1, 15, 14, dtype=F64), torch.tensor([0, 1, 1])) <= TOL


def test_1d_and_3d_layers() -> None:
    torch.manual_seed(5)
    net1 = nn.Sequential(
        nn.Conv1d(2, 4, 5, stride=2, padding=2), bn(nn.BatchNorm1d(4)), nn.Tanh(),
        nn.MaxPool1d(2), nn.AvgPool1d(3, 1, 1), nn.AdaptiveAvgPool1d(3), nn.Flatten(),
        nn.Linear(12, 2),
    ).to(F64)
    assert wbp_rule_error(net1, torch.randn(2, 2, 19, dtype=F64), torch.tensor([0, 1])) <= TOL
    net3 = nn.Sequential(
        nn.Conv3d(1, 3, 3, stride=2, padding=1), bn(nn.BatchNorm3d(3)), nn.GELU(),
        nn.MaxPool3d(2), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(3, 2),
    ).to(F64)
    assert wbp_rule_error(net3, torch.randn(2, 1, 7, 8, 9, dtype=F64), torch.tensor([1, 0])) <= TOL


def test_biases_and_bn_shift_do_not_enter() -> None:
    # BN directly before the linear head: its shift β − γμ/σ and the head's bias reach no
    # activation, so changing them must leave the map unchanged (they do not interact with x).
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 3, 3), bn(nn.BatchNorm2d(3)), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    ).to(F64).eval()
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    before = WBP(net).attribute(x, 1)
    with torch.no_grad():
        net[3].bias.add_(3.0)
        net[3].running_mean.add_(-2.0)
        net[5].bias.add_(5.0)
    after = WBP(net).attribute(x, 1)
    assert torch.allclose(before, after, rtol=1e-12, atol=0)
    assert rel_err(after, wbp_reference(net, x, torch.tensor([1, 1]))[1]) <= TOL


def test_completeness_without_biases() -> None:
    # Eq. 6, x^L = W̃⁰x: with no biases and g(0) = 0 the map sums to the target logit.
    torch.manual_seed(7)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8, bias=False), nn.SiLU(), nn.Linear(8, 3, bias=False),
    ).to(F64).eval()
    x = torch.randn(4, 2, 16, 16, dtype=F64)
    target = torch.tensor([0, 1, 2, 1])
    s = WBP(net).attribute(x, target)
    logits = net(x).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(s.sum(dim=(1, 2, 3)), logits, rtol=1e-10, atol=1e-12)
    # The plain input×gradient does not have this property for these activations.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg).gather(1, target[:, None]).sum(), xg)
    assert not torch.allclose((x * grad).sum(dim=(1, 2, 3)), logits, rtol=1e-3)


def test_target_resolution_and_shape() -> None:
    torch.manual_seed(8)
    net = conv_net(nn.GELU()).eval()
    x = torch.randn(4, 2, 13, 13)
    pred = net(x).argmax(dim=1)
    explainer = get_explainer("wbp", net)
    assert isinstance(explainer, WBP)
    s = explainer.attribute(x)  # None: the predicted class
    assert s.shape == x.shape and not s.requires_grad
    assert torch.equal(s, explainer.attribute(x, pred))
    assert torch.equal(explainer.attribute(x, 2), explainer.attribute(x, torch.full((4,), 2)))
    with torch.no_grad():  # explainers are often called from evaluation code
        assert torch.equal(explainer.attribute(x), s)


def _fd_grad(net: nn.Module, x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
             param: torch.Tensor, entries: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """Central finite differences of Σ R ⊙ s_ref at the given flat entries of `param`."""
    fd = torch.zeros(len(entries), dtype=param.dtype)
    with torch.no_grad():
        flat = param.view(-1)
        for j, i in enumerate(entries.tolist()):
            old = flat[i].item()
            flat[i] = old + step
            plus = (wbp_reference(net, x, target)[1] * weights).sum()
            flat[i] = old - step
            minus = (wbp_reference(net, x, target)[1] * weights).sum()
            flat[i] = old
            fd[j] = (plus - minus) / (2 * step)
    return fd


def test_create_graph_gives_exact_parameter_gradient() -> None:
    # d(map)/dθ must include the rescale factors' own dependence on θ, taken through the true
    # forward derivatives; the explicit rules differentiated by finite differences are the truth.
    torch.manual_seed(9)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), bn(nn.BatchNorm2d(3)), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(12, 4), nn.GELU(),
        nn.Linear(4, 2),
    ).to(F64).eval()
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    target = torch.tensor([0, 1])
    weights = torch.randn_like(x)
    s = WBP(net).attribute(x, target, create_graph=True)
    grads = torch.autograd.grad((s * weights).sum(), [net[0].weight, net[4].weight])
    for param, grad in zip([net[0].weight, net[4].weight], grads, strict=True):
        entries = torch.randperm(param.numel())[:8]
        fd = _fd_grad(net, x, target, weights, param, entries)
        assert rel_err(grad.reshape(-1)[entries], fd) < 1e-6


def test_create_graph_trains_all_parameters() -> None:
    torch.manual_seed(10)
    net = conv_net(nn.ReLU())
    x = torch.randn(2, 2, 13, 13)
    s = WBP(net).attribute(x, torch.tensor([0, 1]), create_graph=True)
    assert s.requires_grad
    s.abs().sum().backward()
    for name, p in net.named_parameters():
        if name.endswith("weight"):  # biases reach the map only through ReLU gates
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Without create_graph nothing is kept.
    assert not WBP(net).attribute(x, 0).requires_grad


def test_hooks_removed_and_model_untouched() -> None:
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.SiLU(inplace=True), nn.Conv2d(4, 4, 3),
        nn.GELU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.Sigmoid(),
    )
    untouched = copy.deepcopy(net)
    x = torch.randn(3, 1, 8, 8)
    WBP(net).attribute(x, 1)
    WBP(net).attribute(x, 0, create_graph=True).sum().backward()
    net.zero_grad()
    assert all(not m._forward_hooks for m in net.modules())
    assert net[2].inplace
    assert net.training and all(m.training for m in net.modules())
    for model in (net, untouched):
        model.eval()
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    out_a, out_b = net(xa), untouched(xb)
    assert torch.equal(out_a, out_b)
    (ga,) = torch.autograd.grad(out_a[:, 1].sum(), xa)
    (gb,) = torch.autograd.grad(out_b[:, 1].sum(), xb)
    assert torch.equal(ga, gb)


class _InPlaceAfterActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(1, 2, 3), nn.GELU(), nn.Linear(72, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y += 1.0  # fine for the plain model (GELU saves its input), so fine under WBP too
        return self.head(y.flatten(1))


def test_in_place_update_of_activation_output() -> None:
    torch.manual_seed(16)
    net = _InPlaceAfterActivation()
    s = WBP(net).attribute(torch.randn(2, 1, 8, 8), 0, create_graph=True)
    s.abs().sum().backward()
    assert torch.isfinite(s).all() and net.conv.weight.grad.abs().sum() > 0


def test_modes_restored_and_running_stats_frozen() -> None:
    net = conv_net(nn.Tanh())
    net.train()
    net[1].eval()  # a frozen BN inside a training model must stay as it was
    modes = [m.training for m in net.modules()]
    stats = copy.deepcopy(net[1].state_dict())
    WBP(net).attribute(torch.randn(2, 2, 13, 13), 0)
    assert [m.training for m in net.modules()] == modes
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, stats[key]), key


def test_cleanup_on_exception() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).train()
    with pytest.raises(RuntimeError):
        WBP(net).attribute(torch.randn(2, 5), 0)  # wrong width: the forward raises
    assert net.training and not net[1]._forward_hooks
    with pytest.raises(ValueError):
        with wbp_mode(net):
            raise ValueError("boom")
    assert net.training and not net[1]._forward_hooks


def test_resnet18_equals_input_times_gradient() -> None:
    torch.manual_seed(12)
    net = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    x = torch.randn(2, 3, 64, 64)
    s = WBP(net).attribute(x, torch.tensor([0, 1]))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg).gather(1, torch.tensor([[0], [1]])).sum(), xg)
    assert s.shape == x.shape and torch.isfinite(s).all() and s.abs().sum() > 0
    assert torch.equal(s, x * grad)  # ReLU-only: WBP is input × gradient, bit for bit


def test_resnet18_gelu_variant_is_rescaled() -> None:
    torch.manual_seed(13)
    net = torchvision.models.resnet18(weights=None, num_classes=2)
    for module in list(net.modules()):  # each block reuses one activation module
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.GELU())
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    s = WBP(net).attribute(x, 1)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    assert torch.isfinite(s).all()
    assert rel_err(s, x * grad) > 1e-3  # the rescale rule is in effect on every call


def test_vgg11_and_inception_v3() -> None:
    torch.manual_seed(14)
    vgg = torchvision.models.vgg11(weights=None, num_classes=2)
    x = torch.randn(1, 3, 64, 64)
    s = WBP(vgg).attribute(x)
    assert s.shape == x.shape and torch.isfinite(s).all() and s.abs().sum() > 0
    assert vgg.training  # restored
    inception = torchvision.models.inception_v3(
        weights=None, num_classes=2, aux_logits=False, init_weights=False
    )
    x = torch.randn(1, 3, 75, 75)
    s = WBP(inception).attribute(x, 1)
    assert s.shape == x.shape and torch.isfinite(s).all() and s.abs().sum() > 0
