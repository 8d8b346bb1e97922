"""PPI's loss against paper 002's equations, re-implemented directly on a tiny linear model.

For f(x) = W·vec(x) + b the WBP saliency matrix is W̃⁰ = W (Eq. 6), so s_y(x) = W[y] ⊙ x
(Eq. 7) is known in closed form and every term of L can be computed by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.methods import build_method


def _linear(c: int = 1, h: int = 3, w: int = 3, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes))


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[str, float],
               mask_fn, fill: str = "zero") -> torch.Tensor:
    """L = w_cls L_cls + w_con L_con + w_reg L_reg + w_ad L_ad, written from the paper."""
    lin = model[1]
    f = lambda v: lin(v.flatten(1))  # noqa: E731
    wrow = lin.weight[y].view_as(x)                     # W̃⁰[y], Eq. 6 for a linear net
    s = (wrow * x).sum(1)                               # s_y(x) = W̃⁰[y] ⊙ x, Eq. 7
    pos = s.clamp_min(0)
    s = pos / pos.flatten(1).max(1).values.view(-1, 1, 1)  # normalised to [0, 1]
    t = mask_fn(s)
    filler = x.mean((2, 3), keepdim=True) if fill == "mean" else torch.zeros_like(x)
    x_star = x - t.unsqueeze(1) * (x - filler)          # Eq. 1 (zero fill)
    x_adv = x - t.detach().flip(0).unsqueeze(1) * (x - filler)  # Eq. 4, j = the other image
    p_y = f(x_star).softmax(1).gather(1, y[:, None]).squeeze(1)
    l_cls = F.cross_entropy(f(x), y)
    l_con = -(1 - p_y).log().mean()                     # Eq. 3, ℓ(x*, ¬y)
    l_reg = s.abs().flatten(1).mean(1).mean()           # ‖s‖₁ per pixel
    l_ad = F.cross_entropy(f(x_adv), y)                 # Eq. 5
    return (weights["cls_weight"] * l_cls + weights["con_weight"] * l_con
            + weights["reg_weight"] * l_reg + weights["ad_weight"] * l_ad)


WEIGHTS = {"cls_weight": 0.5, "con_weight": 2.0, "reg_weight": 3.0, "ad_weight": 0.7}


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_soft_mask_loss_equals_the_papers_equations(fill):
    model = _linear()
    torch.manual_seed(1)
    x, y = torch.rand(2, 1, 3, 3), torch.tensor([0, 1])  # n = 2: the derangement is a swap
    method = build_method("ppi", {**WEIGHTS, "omega": 20.0, "sigma": 0.3, "fill": fill})
    got = method(model, {"image": x, "label": y}).total
    want = _reference(model, x, y, WEIGHTS,
                      lambda s: torch.sigmoid(20.0 * (s - 0.3)), fill)  # Eq. 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # and the gradients in θ agree (the map is part of the graph in both)
    g_got = torch.autograd.grad(got, list(model.parameters()))
    want = _reference(model, x, y, WEIGHTS, lambda s: torch.sigmoid(20.0 * (s - 0.3)), fill)
    g_want = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_soft_mask_removes_the_salient_side():
    # T → 1 where s > σ: those pixels are zeroed in x*, the rest is untouched (Eq. 1, 2).
    model = _linear()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0] = 5.0  # class 1's only evidence: pixel (0, 0)
    x = torch.full((2, 1, 3, 3), 0.5)
    y = torch.tensor([1, 1])
    method = build_method("ppi")
    t = method.mask(method.saliency(model, x, y).detach().clamp_min(0) / 2.5)
    assert t[0, 0, 0].item() == pytest.approx(1.0) and t[0].flatten()[1:].max() < 1e-6


def test_hard_mask_loss_equals_the_papers_equations():
    model = _linear(h=4, w=4)
    torch.manual_seed(2)
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([1, 0])
    method = build_method("ppi", {**WEIGHTS, "mask": "hard", "hard_k": 1.0})

    def hard(s: torch.Tensor) -> torch.Tensor:  # App. B: keep s > k·std(s), per image
        return (s > s.flatten(1).std(1, unbiased=False).view(-1, 1, 1)).float()

    got = method(model, {"image": x, "label": y}).total
    want = _reference(model, x, y, WEIGHTS, hard)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_three_class_contrast_is_one_vs_others():
    model = _linear(classes=3)
    torch.manual_seed(3)
    x, y = torch.rand(2, 1, 3, 3), torch.tensor([2, 1])
    only_con = {"cls_weight": 0.0, "con_weight": 1.0, "reg_weight": 0.0, "ad_weight": 0.0}
    method = build_method("ppi", {**only_con, "omega": 20.0, "sigma": 0.3})
    got = method(model, {"image": x, "label": y}).total
    want = _reference(model, x, y, only_con, lambda s: torch.sigmoid(20.0 * (s - 0.3)))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_wbp_on_a_tanh_bn_mlp_is_table_1_chained_by_hand():
    # x^L = W2 · diag(h) · diag(γ/σ) · W1 · x + const, h = tanh(z)/z (Table 1), s = W̃⁰[m] ⊙ x
    # (Eq. 7); with create_graph its gradient in θ equals that of the explicit product.
    from causalign.explain.wbp import wbp_weights

    torch.manual_seed(4)
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3)).train()
    x, m = torch.randn(3, 4), torch.tensor([0, 2, 1])
    w = wbp_weights(model, x, m, create_graph=True)
    assert model.training and bn.training  # mode restored

    lin1, lin2 = model[0], model[3]
    z = bn.weight * (lin1(x) - bn.running_mean) / (bn.running_var + bn.eps).sqrt() + bn.bias
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    want = (lin2.weight[m] * torch.tanh(z) / z * scale) @ lin1.weight  # W̃⁰[m], row per image
    assert torch.allclose(w, want, atol=1e-6)
    g = torch.autograd.grad(((w * x) ** 2).sum(), lin1.weight)[0]
    g_want = torch.autograd.grad(((want * x) ** 2).sum(), lin1.weight)[0]
    assert torch.allclose(g, g_want, atol=1e-5)
