"""Audit 2026-12-07 (base): the baselines against their original papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.methods.cdep import contextual_decomposition


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_cd_sums_to_logits_with_the_conv_padding_mode(padding_mode):
    """CD must decompose the function the model computes: a conv with non-zero padding was
    propagated with zero padding, so β + γ missed the logits by 0.02–0.04."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    region = (torch.rand(2, 1, 8, 8) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(rel + irrel, model(x), atol=1e-12, rtol=0)


def test_cdep_setup_refuses_a_chain_with_a_layer_without_a_cd_rule():
    """`setup` promises to refuse an unsupported model before training: a chain with a
    LeakyReLU passed it and failed only in the first step's propagation."""
    from causalign.errors import ConfigError
    from causalign.methods import build_method

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.LeakyReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(ConfigError, match="no contextual-decomposition rule for LeakyReLU"):
        build_method("cdep").setup(None, model)


def test_cd_of_a_supported_model_inside_a_chain():
    """nn.Sequential(preprocessing, cnn7) was refused ("no rule for SevenLayerCNN") although
    both parts have CD rules."""
    from causalign.models.cnn import SevenLayerCNN

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), SevenLayerCNN(1, 2, width=4)).double().eval()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    region = (torch.rand(2, 1, 16, 16) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(rel + irrel, model(x), atol=1e-12, rtol=0)
