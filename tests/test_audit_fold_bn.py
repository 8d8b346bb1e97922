"""eval_mode(fold_bn=True) and the lean double-backward nodes against plain PyTorch (model.eval(),
native BatchNorm, autograd's own double backward): values, ∇ₓT, H·v, mixed products and the
implicit gradient, float64."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.errors import InputError
from causalign.explain.counterfactual import capture_bn_stats, eval_mode
from causalign.implicit import implicit_gradient
from causalign.implicit.fastgrad import double_backward_graph

D = torch.float64


def _products(net: nn.Module, x0: torch.Tensor, lean: bool, bn_stats=None,
              params=None) -> list[torch.Tensor]:
    """[f(x), ∇ₓT, H·v, ∂(∇ₓT·v)/∂θ..., implicit dL/dθ...] of T = Σ CE(f(x), y) + ½‖x − x0‖²;
    lean: inside eval_mode(fold_bn=True) as implicit_gradient runs it, else plain eval()."""
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(x0.shape, generator=gen, dtype=D)
    r = torch.randn(x0.shape, generator=gen, dtype=D)
    y = torch.arange(len(x0)) % 3
    params = list(net.parameters()) if params is None else params

    def inner(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x), y, reduction="sum") + 0.5 * (x - x0).square().sum()

    was = net.training
    net.eval()
    with eval_mode(net, fold_bn=True, bn_stats=bn_stats) if lean else nullcontext():
        x = (x0 + 0.1).requires_grad_(True)
        with double_backward_graph() if lean else nullcontext():
            out = net(x)
            (g,) = torch.autograd.grad(inner(x), x, create_graph=True)
        hv = torch.autograd.grad(g, x, v, retain_graph=True)[0]
        mixed = torch.autograd.grad(g, params, v, retain_graph=True)
        ig = implicit_gradient(inner, x.detach(), params, r, cg_max_iter=50,
                               cg_tol=1e-12).grads
    net.train(was)
    return [out.detach(), g.detach(), hv, *mixed, *ig]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_an_instance_level_forward_is_kept_under_fold_bn() -> None:
    """A forward set on the instance (a wrapper, a monkeypatch) computes more than the
    class's: the lean conv/ReLU nodes and the folded BatchNorm replaced it (logits off by
    0.66, the implicit gradient by 85 % of its largest entry)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(D)
    net(torch.randn(4, 2, 8, 8, dtype=D))  # running statistics
    conv, bn, relu = net[3], net[1], net[4]
    conv.forward = lambda x, f=conv.forward: f(x) * 2.0
    bn.forward = lambda x, f=bn.forward: f(x) + 0.5
    relu.forward = lambda x, f=relu.forward: f(x) + 0.5 * x
    overrides = [m.__dict__["forward"] for m in (conv, bn, relu)]
    x0 = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=D)
    _assert_close(_products(net, x0, lean=True), _products(net, x0, lean=False))
    assert [m.__dict__["forward"] for m in (conv, bn, relu)] == overrides  # restored as given


def test_nested_eval_mode_still_records_the_lean_nodes() -> None:
    """The skip above does not skip an enclosing eval_mode's own patch."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()).to(D)
    x = torch.randn(1, 2, 6, 6, dtype=D, requires_grad=True)
    with eval_mode(net, fold_bn=True), eval_mode(net, fold_bn=True), double_backward_graph():
        out = net(x)
    assert type(out.grad_fn).__name__.startswith("_ReLU")
    assert type(out.grad_fn.next_functions[0][0]).__name__.startswith("_Conv")
    assert all("forward" not in m.__dict__ for m in net.modules())


class _SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.bn(self.conv(h)))
        return self.fc(h.mean((2, 3)))


def test_capture_bn_stats_refuses_a_batchnorm_run_twice() -> None:
    """One (mean, var) per module: a BatchNorm applied at two places got its last call's
    statistics at both, silently another function than the training forward (0.66)."""
    torch.manual_seed(0)
    net = _SharedBN().to(D).train()
    with pytest.raises(InputError, match="'bn' ran more than once"), torch.no_grad(), \
            capture_bn_stats(net):
        net(torch.randn(6, 3, 6, 6, dtype=D))


def test_captured_statistics_reproduce_the_training_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(D).train()
    x = torch.randn(6, 3, 8, 8, dtype=D) * 2 + 1
    with torch.no_grad(), capture_bn_stats(net) as stats:
        train_out = net(x)
    with torch.no_grad(), eval_mode(net, fold_bn=True, bn_stats=stats):
        torch.testing.assert_close(net(x), train_out, rtol=1e-12, atol=1e-12)
    assert net.training and all(m.training for m in net.modules())


def _bn_by_hand(net: nn.Module, stats) -> nn.Module:
    """A copy whose BatchNorms run F.batch_norm with the given statistics (native kernel)."""
    import copy

    ref = copy.deepcopy(net)
    names = {m: n for n, m in net.named_modules()}
    mods = dict(ref.named_modules())
    for m, (mean, var) in stats.items():
        r = mods[names[m]]
        r.forward = (lambda x, r=r, mean=mean, var=var:
                     F.batch_norm(x, mean, var, r.weight, r.bias, False, 0.0, r.eps))
    return ref


_CASES = {
    "stride-dilation-nobias": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 4, stride=3, padding=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
    "conv1d-bn1d": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(32, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3)),
    "conv3d-preact": lambda: nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm3d(4), nn.Conv3d(4, 4, 2),
        nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3)),
}
_SHAPES = {"stride-dilation-nobias": (3, 2, 11, 11), "conv1d-bn1d": (3, 2, 17),
           "conv3d-preact": (2, 2, 4, 5, 5)}


@pytest.mark.parametrize("case", sorted(_CASES))
@pytest.mark.parametrize("stats", [False, True])
def test_fold_bn_matches_plain_pytorch(case: str, stats: bool) -> None:
    torch.manual_seed(0)
    net = _CASES[case]().to(D).train()
    x0 = torch.randn(_SHAPES[case], dtype=D)
    with torch.no_grad(), capture_bn_stats(net) as bn_stats:
        net(x0 * 1.5 + 0.3)
    bn_stats = bn_stats if stats else None
    ref = _bn_by_hand(net, bn_stats) if stats else net
    # the first conv's weight alone: the mixed product's weight term is taken only where asked
    for pick in (lambda m: list(m.parameters()), lambda m: [m[0].weight]):
        _assert_close(_products(net, x0, lean=True, bn_stats=bn_stats, params=pick(net)),
                      _products(ref, x0, lean=False, params=pick(ref)))
    assert all(m.training for m in net.modules())
    assert all("forward" not in m.__dict__ for m in net.modules())
