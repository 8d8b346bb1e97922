"""LRP on BagNet: the mean of the patch evidence must get LRP's averaging rule.

BagNet's logits are ``patch_logits(x).mean((2, 3))``, a functional mean that zennit has no
rule for: it passed the output relevance through it as a gradient, so every patch got the
same relevance logit/(h·w) whatever its evidence, and the ε rule of the classifier then
divided that by the patch's own evidence — a patch voting against the class received
positive relevance. With the mean ruled (ε-normalised, like average pooling elsewhere),
LRP-ε at ε → 0 is input × gradient, as for every other ReLU model.
"""

from __future__ import annotations

import pytest
import torch
from test_lrp import input_x_grad, rel_err  # the same references as the other models' tests
from torch import nn

from causalign.explain import get_explainer
from causalign.explain.lrp import LRP_VARIANTS, lrp_epsilon_modified_gradient
from causalign.models import build_model

F64 = torch.float64
EXACT = {"epsilon": 1e-12, "stabilizer": 1e-12}


def spread_bagnet(name: str = "bagnet9") -> nn.Module:
    """A BagNet whose patch evidence varies (and changes sign) over the image, as after
    training; at PyTorch's default init it is nearly uniform, which hid the error."""
    torch.manual_seed(0)
    model = build_model(name, 1, 2, width=4).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
        model.classifier.weight.mul_(20)
        model.classifier.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("name", ["bagnet9", "bagnet13"])
def test_epsilon_lrp_on_bagnet_equals_input_times_gradient(name):
    model = spread_bagnet(name)
    x = torch.rand(2, 1, 24, 24, dtype=F64)
    t = torch.tensor([0, 1])
    ev = model.patch_logits(x)[torch.arange(2), t]
    assert (ev.flatten(1).std(1) > 0.3 * ev.mean((1, 2)).abs()).all()  # patches disagree
    rel = get_explainer("lrp-epsilon", model, **EXACT).attribute(x, target=t)
    # Before: 9.9 (bagnet9), 18 (bagnet13). 1e-4: zennit's folded BN keeps its eps
    # (~5e-6 per BN, see test_lrp).
    assert rel_err(rel, input_x_grad(model, x, t)) < 1e-4
    assert rel_err(lrp_epsilon_modified_gradient(model, x, t, **EXACT), rel) < 1e-4
    # Bias-free classifier: the relevance still sums to the logit.
    logit = model(x).gather(1, t[:, None]).squeeze(1).detach()
    assert torch.allclose(rel.flatten(1).sum(1), logit, rtol=1e-4, atol=0)


def test_patch_relevance_is_its_evidence():
    # Where the rule acts: the relevance reaching each patch's features (the classifier's
    # input, summed over channels) is that patch's evidence / (h·w) for a bias-free 1×1
    # classifier — a patch voting against the class keeps its negative sign. Before, every
    # patch got logit / (h·w).
    model = spread_bagnet()
    x = torch.rand(1, 1, 24, 24, dtype=F64)
    t = 1
    with torch.no_grad():
        ev = model.patch_logits(x)[0, t]
    assert ev.min() < 0 < ev.max()
    feats: list[torch.Tensor] = []
    handle = model.align.register_forward_hook(lambda m, a, out: feats.append(out))
    try:
        explainer = get_explainer("lrp-epsilon", model, **EXACT)
        with torch.enable_grad(), explainer.composite().context(model):
            logits = model(x.clone().requires_grad_(True))
            (r,) = torch.autograd.grad(logits[0, t], feats[0],
                                       grad_outputs=logits[0, t].detach())
    finally:
        handle.remove()
    p = model.pad
    per_patch = r[0].sum(0)[p:r.shape[-2] - p, p:r.shape[-1] - p]
    # 1e-4: zennit's folded BatchNorms keep their eps (~5e-6 each, see test_lrp).
    assert torch.allclose(per_patch, ev / ev.numel(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", sorted(LRP_VARIANTS))
def test_every_variant_restores_bagnet(name):
    # The BagNet canonizer overloads forward only inside the composite's context.
    model = spread_bagnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 16, 16, dtype=F64)
    rel = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
    assert rel.shape == x.shape and torch.isfinite(rel).all()
    assert "forward" not in vars(model) and not hasattr(model, "canonizer_mean")
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
