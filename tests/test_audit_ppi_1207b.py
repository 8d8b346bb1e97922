"""Audit (paper 002: WBP and PPI on architectures beyond the seed CNN), 2026-12-07."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.errors import InputError
from causalign.explain.wbp import wbp_weights

# (functional call, the same activation as a module)
_PAIRS = [
    (lambda z: F.gelu(z), nn.GELU()),
    (lambda z: F.gelu(z, approximate="tanh"), nn.GELU(approximate="tanh")),
    (lambda z: F.silu(z), nn.SiLU()),
    (lambda z: torch.sigmoid(z), nn.Sigmoid()),
    (lambda z: z.tanh(), nn.Tanh()),
    (lambda z: F.elu(z, 0.5), nn.ELU(0.5)),
    (lambda z: F.softplus(z, beta=2.0), nn.Softplus(beta=2.0)),
    (lambda z: F.softshrink(z, 0.3), nn.Softshrink(0.3)),
    (lambda z: F.mish(z), nn.Mish()),
    # in place, as `h = F.silu(h, inplace=True)` (z is copied before it is overwritten)
    (lambda z: F.silu(z.clone(), inplace=True), nn.SiLU()),
    (lambda z: F.elu(z.clone(), 0.5, True), nn.ELU(0.5)),
]


class _MLP(nn.Module):
    def __init__(self, act: nn.Module | None = None, fn=None) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.act, self.fn = act, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.l1(x)
        return self.l2(self.fn(z) if self.fn is not None else self.act(z))


@pytest.mark.parametrize("i", range(len(_PAIRS)))
def test_wbp_rescales_functional_activations_as_modules(i: int) -> None:
    """A functional activation (F.gelu, torch.sigmoid, x.tanh() in a forward) back-propagated
    its true derivative g'(z) instead of WBP's rescale h = (g(z) − g(0))/z: the same weights
    gave a different "WBP" map with F.gelu than with nn.GELU (max diff 0.04, map ~0.1). Now
    the functional call gets the module's rule: same map, same parameter gradient through it
    (create_graph, as PPI trains), and the map is the paper's W̃⁰ computed by hand."""
    fn, act = _PAIRS[i]
    torch.manual_seed(i)
    module_net = _MLP(act=act).double()
    func_net = _MLP(fn=fn).double()
    func_net.load_state_dict(module_net.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    maps = []
    grads = []
    for net in (module_net, func_net):
        w = wbp_weights(net, x, target, create_graph=True)
        (g,) = torch.autograd.grad((x * w).square().sum(), net.l1.weight)
        maps.append(w.detach())
        grads.append(g)
    torch.testing.assert_close(maps[1], maps[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    # by hand: W̃⁰ = W2 diag(h(z)) W1, h(z) = (g(z) − g(0))/z
    z = module_net.l1(x).detach()
    with torch.no_grad():
        h = (fn(z) - fn(torch.zeros(1, dtype=z.dtype))) / z
        hand = torch.stack([module_net.l2.weight[t] @ torch.diag(h[n]) @ module_net.l1.weight
                            for n, t in enumerate(target.tolist())])
    torch.testing.assert_close(maps[1], hand, rtol=1e-9, atol=1e-12)


def test_wbp_functional_map_parameter_gradient_matches_finite_differences() -> None:
    """PPI trains through the map: for functional activations (now rescaled) the
    create_graph gradient of a loss on the map is the exact derivative (central differences,
    float64)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(torch.sigmoid(F.gelu(self.l1(x))))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(3, 4, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (x * wbp_weights(net, x, 1, create_graph=True)).square().sum()

    (g,) = torch.autograd.grad(loss(), net.l1.weight)
    fd = torch.zeros_like(g)
    eps = 1e-6
    with torch.no_grad():
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                net.l1.weight[i, j] += eps
                up = float(loss())
                net.l1.weight[i, j] -= 2 * eps
                down = float(loss())
                net.l1.weight[i, j] += eps
                fd[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


def test_wbp_module_activation_not_rescaled_twice() -> None:
    """nn.GELU's forward calls F.gelu: the module hook and the functional rescale must not
    both apply (h² would shrink the map)."""
    torch.manual_seed(0)
    net = _MLP(act=nn.GELU()).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    w = wbp_weights(net, x, 1)
    z = net.l1(x).detach()
    h = torch.special.ndtr(z)  # GELU(z)/z = Φ(z)
    hand = torch.stack([net.l2.weight[1] @ torch.diag(h[n]) @ net.l1.weight for n in range(3)])
    torch.testing.assert_close(w, hand.detach(), rtol=1e-10, atol=1e-12)


class _FunctionalNorm(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 2)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.l1(x)
        if self.kind == "layer_norm":
            z = F.layer_norm(z, (4,))
        else:
            q = z[:, None, None, :]
            z = F.scaled_dot_product_attention(q, q, q)[:, 0, 0]
        return self.l2(F.relu(z))


@pytest.mark.parametrize("kind", ["layer_norm", "scaled_dot_product_attention"])
def test_wbp_refuses_functional_layers_without_a_rule(kind: str) -> None:
    """nn.LayerNorm / nn.MultiheadAttention modules were refused, but F.layer_norm and
    F.scaled_dot_product_attention in a forward silently gave a gradient map labelled WBP."""
    model = _FunctionalNorm(kind).train()
    with pytest.raises(InputError, match=rf"wbp has no rule for F\.{kind}"):
        wbp_weights(model, torch.randn(2, 4), 0)
    assert model.training
    # outside WBP the model runs as before (the mode is gone)
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_lrp_epsilon_on_mish_model_matches_the_map_ppi_trains_on() -> None:
    """zennit's Activation type (relevance passes through) lacks nn.Mish: its lrp-epsilon map
    crossed Mish as a gradient and differed from `lrp_epsilon_modified_gradient` (PPI's
    lrp-epsilon backend, which rescales every activation) by 0.014 for a map of 0.012.
    Every variant now passes relevance through Mish as through GELU or SiLU."""
    from causalign.explain import get_explainer
    from causalign.explain.lrp import LRP_VARIANTS, lrp_epsilon_modified_gradient

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Mish(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double().eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    zennit_map = get_explainer("lrp-epsilon", model).attribute(x, target=1)
    trained_map = lrp_epsilon_modified_gradient(model, x, 1)
    torch.testing.assert_close(zennit_map, trained_map, rtol=1e-4, atol=1e-6)
    for name in ("lrp-alpha-beta", "lrp-zbox"):  # zennit's built-in composites take it too
        assert name in LRP_VARIANTS
        assert torch.isfinite(get_explainer(name, model).attribute(x, target=1)).all()


@pytest.mark.parametrize("name", ["wbp", "lrp-epsilon", "lrp-gamma"])
def test_wbp_and_lrp_refuse_batchnorm_without_running_statistics(name: str) -> None:
    """BatchNorm(track_running_stats=False) normalises over the batch even in eval mode: WBP's
    map of a sample changed with the other samples of its batch (by 0.07 of a 0.21 map), and
    zennit's BatchNorm merge crashed with "'NoneType' object has no attribute 'data'". Both
    are refused with one line, as instance norm without running statistics is."""
    from causalign.explain import get_explainer

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    with pytest.raises(InputError, match=rf"{name} has no rule for .*BatchNorm2d without "
                                         r"running statistics \(1x, e\.g\. '1'\)"):
        get_explainer(name, model).attribute(torch.rand(3, 3, 8, 8), target=1)
    assert model.training


@pytest.mark.parametrize(("name", "create_graph"), [("lrp-epsilon", False), ("lrp-epsilon", True),
                                                    ("lrp-gamma", False)])
@pytest.mark.parametrize("kind", ["layer_norm", "scaled_dot_product_attention"])
def test_lrp_refuses_functional_layers_without_a_rule(kind: str, name: str,
                                                      create_graph: bool) -> None:
    """LRP refused nn.LayerNorm / nn.MultiheadAttention modules but crossed F.layer_norm and
    F.scaled_dot_product_attention as a gradient: a small ViT-like model's lrp-epsilon map
    reached 172 for logits of ~0.1. Refused with one line; hooks and weights as before."""
    from causalign.explain import get_explainer

    torch.manual_seed(0)
    model = _FunctionalNorm(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=rf"{name} has no rule for F\.{kind}"):
        get_explainer(name, model).attribute(torch.randn(2, 4), target=0,
                                             create_graph=create_graph)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
