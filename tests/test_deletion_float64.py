"""Deletion drops of a confident model: in float32, p = 1 − 1e-12 and 1 − 1e-9 both round to
1.0, so removing evidence that lowered the target's probability read as a drop of exactly 0."""
import math

import torch
from torch import nn

from causalign.metrics import deletion_scores


class _Confident(nn.Module):
    """logits (0, a·Σx): all-ones 4×4 input, so deleting k pixels lowers the margin by a·k."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a * x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z), z], 1)


def test_a_confident_models_small_drop_is_not_rounded_to_zero():
    a = 27.6 / 16  # margin 27.6 → 1 − p ≈ 1e-12; 12 pixels left → margin 20.7, 1 − p ≈ 1e-9
    x = torch.ones(1, 1, 4, 4)
    maps = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    drop = deletion_scores(_Confident(a), x, maps, 1, fractions=(0.25,))[0.25]
    expected = 1 / (1 + math.exp(-27.6)) - 1 / (1 + math.exp(-20.7))
    # the expected drop is positive (~1e-9); float32 probabilities gave 0.0
    assert expected > 1e-10
    assert drop.dtype == torch.float32  # the difference is taken in float64
    # the logits are float32 (margins within ~1e-6 relative), hence the tolerance
    assert math.isclose(float(drop[0]), expected, rel_tol=1e-4)


def test_float32_and_float64_models_give_the_same_drops():
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    d32 = deletion_scores(model, x, maps, 0, fractions=(0.5,))[0.5]
    d64 = deletion_scores(model.double(), x.double(), maps, 0, fractions=(0.5,))[0.5]
    assert (d32.dtype, d64.dtype) == (torch.float32, torch.float64)
    torch.testing.assert_close(d32.double(), d64, atol=1e-6, rtol=0)
