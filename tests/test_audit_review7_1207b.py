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
        self.m = {"gelu": nn.GELU(), "sigmoid": nn.Sigmoid(), "silu": nn.SiLU(),
                  "leaky": nn.LeakyReLU(0.2)}[act]
        self.fn = {"gelu": F.gelu, "sigmoid": torch.sigmoid, "silu": F.silu,
                   "leaky": lambda h: F.leaky_relu(h, 0.2)}[act]
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


@pytest.mark.parametrize("act", ["gelu", "leaky"])
@pytest.mark.parametrize("variant", ["lrp-epsilon", "lrp-alpha-beta", "lrp-flat"])
def test_zennit_lrp_passes_relevance_through_functional_activations(variant: str, act: str
                                                                    ) -> None:
    # zennit gives activation modules the Pass rule; F.gelu was crossed as a gradient, and
    # so was F.leaky_relu (its gradient is WBP's rule, not Pass: 0.018 of a 0.13 map)
    mod, fun = _pair(act)
    x = torch.randn(3, 1, 6, 6)
    a = get_explainer(variant, mod).attribute(x, 0)
    b = get_explainer(variant, fun).attribute(x, 0)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _FunctionalStats(nn.Module):
    """conv -> a functional normalisation over batch/sample statistics -> relu -> linear."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4).eval()
        self.l = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        if self.kind == "instance":
            h = F.instance_norm(h)
        elif self.kind == "batch-train":
            h = F.batch_norm(h, None, None, training=True)
        elif self.kind == "torch-batch":
            h = torch.batch_norm(h, None, None, None, None, True, 0.1, 1e-5, False)
        elif self.kind == "torch-layer":
            h = torch.layer_norm(h, h.shape[1:])
        elif self.kind == "running":  # eval-mode running statistics: an affine map, fine
            h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var)
        return self.l(F.relu(h).flatten(1))


@pytest.mark.parametrize("kind", ["instance", "batch-train", "torch-batch", "torch-layer"])
@pytest.mark.parametrize("name", ["wbp", "lrp-epsilon"])
def test_functional_batch_statistics_refused(kind: str, name: str) -> None:
    # their modules are refused (unsupported_layers); the functional forms ran silently and a
    # sample's F.batch_norm(training=True) map changed with its batch-mates (0.037 of 0.27)
    from causalign.errors import InputError

    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(InputError, match=r"(instance_norm|batch_norm|layer_norm)"):
        get_explainer(name, _FunctionalStats(kind)).attribute(x, 0)


@pytest.mark.parametrize("name", ["wbp", "lrp-epsilon"])
def test_functional_running_statistics_still_explained(name: str) -> None:
    x = torch.randn(4, 1, 6, 6)
    a = get_explainer(name, _FunctionalStats("running")).attribute(x, 0)
    assert torch.isfinite(a).all() and a.abs().max() > 0
