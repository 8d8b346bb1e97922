"""The lean double-backward convolution and ReLU (implicit/fastgrad.py) give bit-identical
gradients, Hessian-vector products and mixed products, and the adjoint CG stops once solved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.explain.counterfactual import eval_mode
from causalign.implicit import implicit_gradient
from causalign.implicit.fastgrad import _Conv, _ReLU, double_backward_graph


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 5, padding=2, dilation=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).to(dtype)
    net.train()
    net(torch.randn(8, 2, 16, 16, dtype=dtype))  # non-trivial running statistics
    return net


def _products(net: nn.Module, x0: torch.Tensor, v: torch.Tensor, lean: bool):
    """(∇ₓT, H·v, ∂(∇ₓT·v)/∂θ) of T = Σ CE(f(x), y) + ½‖x‖², as implicit_gradient builds them."""
    params = list(net.parameters())
    y = torch.arange(len(x0)) % 3
    with eval_mode(net, fold_bn=True):
        x = x0.clone().requires_grad_(True)
        with double_backward_graph() if lean else torch.enable_grad():
            t = nn.functional.cross_entropy(net(x), y, reduction="sum") + 0.5 * x.square().sum()
        (g,) = torch.autograd.grad(t, x, create_graph=True)
        hv = [torch.autograd.grad(g, x, v, retain_graph=True)[0] for _ in range(2)]
        mixed = torch.autograd.grad(g, params, v)
    return g.detach(), hv, mixed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_double_backward_is_bit_identical(dtype: torch.dtype) -> None:
    net = _net(dtype)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 16, 16, generator=gen, dtype=dtype)
    v = torch.randn(5, 2, 16, 16, generator=gen, dtype=dtype)
    ref = _products(net, x0, v, lean=False)
    new = _products(net, x0, v, lean=True)
    assert torch.equal(ref[0], new[0])
    assert all(torch.equal(a, b) for a, b in zip(ref[1], new[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ref[2], new[2], strict=True))


def test_lean_nodes_only_inside_the_context_and_modules_restored() -> None:
    net = _net(torch.float32)
    x = torch.randn(2, 2, 16, 16, requires_grad=True)
    conv, relu = net[0], net[2]
    with eval_mode(net, fold_bn=True):
        plain = conv(x)
        with double_backward_graph():
            lean, lean_relu = conv(x), relu(x)
        assert torch.equal(plain, lean)
    assert type(plain.grad_fn).__name__ == "ConvolutionBackward0"
    assert lean.grad_fn.__class__.__name__.startswith(_Conv.__name__)
    assert lean_relu.grad_fn.__class__.__name__.startswith(_ReLU.__name__)
    # restored: the class's own forward, and the context is off again
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_adjoint_cg_stops_when_every_sample_has_converged() -> None:
    """A scaled identity Hessian is solved in one CG iteration: no further products."""
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    theta = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x_star = theta.detach().clone()

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * scale[:, None] * (x - theta).square()).sum()

    out = implicit_gradient(inner, x_star, [theta], torch.ones(3, 4, dtype=torch.float64),
                            cg_max_iter=3, cg_tol=1e-10)
    assert out.cg.iterations == 1 and bool(out.cg.converged.all())
    # dL/dθ = −(∂g/∂θ)ᵀ H⁻¹ 1 = diag(s)·(1/s) = 1
    torch.testing.assert_close(out.grads[0], torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("conf", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                  dict(kernel_size=3, stride=1, dilation=2, ceil_mode=True),
                                  dict(kernel_size=(2, 3), stride=(2, 1), ceil_mode=True)])
def test_search_max_pool_matches_the_builtin(conf: dict) -> None:
    """The search's max-pool (`_MaxPool2d`, a channels_last copy: ~2x cheaper on CPU) gives
    the built-in's values and gradients, also with ties (first maximum) and NaN."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 3, (3, 5, 11, 13), generator=gen).double()  # many ties
    x0[0, 1, 2, 3] = float("nan")
    w = torch.randn(3, 5, 11, 13, generator=gen, dtype=torch.float64)
    pool = nn.MaxPool2d(**conf)
    outs = []
    for patched in (False, True):
        x = x0.clone().requires_grad_(True)
        with eval_mode(pool, fold_bn=True) if patched else torch.enable_grad():
            y = pool(x * w)
        (g,) = torch.autograd.grad(y.nan_to_num().square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.nan_to_num().sum(), x)
        outs.append((y.detach(), g.detach(), gg, type(y.grad_fn).__name__))
    (y0, g0, gg0, node0), (y1, g1, gg1, node1) = outs
    assert node0 == "MaxPool2DWithIndicesBackward0" and node1 != node0  # the patch ran
    assert torch.equal(y0.nan_to_num(-1.0), y1.nan_to_num(-1.0)) and y1.is_contiguous()
    assert torch.equal(g0.nan_to_num(-1.0), g1.nan_to_num(-1.0))
    assert torch.equal(gg0.nan_to_num(-1.0), gg1.nan_to_num(-1.0))
    assert "forward" not in pool.__dict__  # restored
