"""Review of the 1207 merged commits (review7): regressions found by a fresh-eyes pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.explain import get_explainer
from causalign.explain.lrp import lrp_epsilon_modified_gradient


class _Act(nn.Module):
    """conv -> activation (module or functional) -> linear, same weights either way."""

    def __init__(self, functional: bool, act: str = "gelu") -> None:
        super().__init__()
        self.functional, self.act = functional, act
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.m = {"gelu": nn.GELU(), "sigmoid": nn.Sigmoid(), "silu": nn.SiLU()}[act]
        self.fn = {"gelu": F.gelu, "sigmoid": torch.sigmoid, "silu": F.silu}[act]
        self.l = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        h = self.fn(h) if self.functional else self.m(h)
        return self.l(h.flatten(1))


def _pair(act: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    mod, fun = _Act(False, act), _Act(True, act)
    fun.load_state_dict(mod.state_dict())
    return mod, fun


@pytest.mark.parametrize("act", ["gelu", "sigmoid", "silu"])
def test_lrp_epsilon_modified_gradient_rescales_functional_activations(act: str) -> None:
    # PPI with method.saliency=lrp-epsilon trains on this map: F.gelu was crossed as a
    # gradient (0.024 of a 0.11 map) while nn.GELU got the rescale rule
    mod, fun = _pair(act)
    x = torch.randn(3, 1, 6, 6)
    a = lrp_epsilon_modified_gradient(mod, x, 0)
    b = lrp_epsilon_modified_gradient(fun, x, 0)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and the differentiable form too
    b2 = lrp_epsilon_modified_gradient(fun, x, 0, create_graph=True)
    torch.testing.assert_close(a, b2.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["lrp-epsilon", "lrp-alpha-beta", "lrp-flat"])
def test_zennit_lrp_passes_relevance_through_functional_activations(variant: str) -> None:
    # zennit gives activation modules the Pass rule; F.gelu was crossed as a gradient
    mod, fun = _pair("gelu")
    x = torch.randn(3, 1, 6, 6)
    a = get_explainer(variant, mod).attribute(x, 0)
    b = get_explainer(variant, fun).attribute(x, 0)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
