"""Counterfactual generator as a library (helper audit): an empty batch under the
Gauss-Newton search, and BatchNorm without running statistics coupling the samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.errors import InputError
from causalign.explain import CounterfactualGenerator
from causalign.explain.counterfactual import capture_bn_stats


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


@pytest.mark.parametrize("kwargs", [{"optimizer": "newton"},
                                    {"optimizer": "adam", "polish": 2},
                                    {"optimizer": "newton", "bounds": (0, 1)}])
def test_an_empty_batch_is_no_error_for_the_gauss_newton_search(kwargs):
    """`causalign counterfactual` passes x[valid]: a batch whose every prediction already is
    a fixed target class (method.target=k) is empty, and the Newton search crashed in the
    Woodbury solve ("cannot reshape tensor of 0 elements into shape [0, -1]")."""
    gen = CounterfactualGenerator(_linear(), steps=3, **kwargs)
    res = gen.generate(torch.rand(0, 1, 4, 4), target=torch.zeros(0, dtype=torch.long))
    assert res.x_star.shape == (0, 1, 4, 4) and res.flipped.shape == (0,)


def _bn_free(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1),
                         nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 2)).eval()


def test_batchnorm_without_running_statistics_is_refused_for_a_batch():
    """In eval mode such a BatchNorm normalises over the batch: a batched x* differed from
    the per-sample one by up to 0.54 per pixel (Newton, 20 steps), silently."""
    model = _bn_free()
    x = torch.rand(4, 1, 8, 8)
    gen = CounterfactualGenerator(model, alpha=0.01, steps=5, optimizer="newton")
    with pytest.raises(InputError, match="running statistics"):
        gen.generate(x, target=torch.ones(4, dtype=torch.long))
    # one sample at a time is its own batch: allowed
    one = gen.generate(x[:1], target=torch.ones(1, dtype=torch.long))
    assert one.x_star.shape == (1, 1, 8, 8)


def test_batchnorm_without_running_statistics_works_with_fixed_statistics():
    """Given fixed statistics (capture_bn_stats, as causal-align passes them) the samples
    are independent again: batched = per sample."""
    model = _bn_free()
    x = torch.rand(4, 1, 8, 8)
    model.train()
    with capture_bn_stats(model) as stats, torch.no_grad():
        model(torch.rand(8, 1, 8, 8))
    model.eval()
    gen = CounterfactualGenerator(model, alpha=0.01, steps=10, optimizer="adam")
    t = torch.ones(4, dtype=torch.long)
    batched = gen.generate(x, target=t, bn_stats=stats)
    single = torch.cat([gen.generate(x[i:i + 1], target=t[:1], bn_stats=stats).x_star
                        for i in range(4)])
    torch.testing.assert_close(batched.x_star, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("space", ["latent", "smooth"])
def test_the_residual_spaces_return_x0_exactly_where_the_code_did_not_move(space):
    """x* = x0 + D(z) − D(z0) is x0 at z = z0 (README): evaluated as (x0 + D(z)) − D(z0)
    it missed by an ulp on every pixel (max 6e-8), a "change" outside any mask."""
    from causalign.models.autoencoder import train_autoencoder

    torch.manual_seed(0)
    ae = train_autoencoder(torch.rand(16, 1, 8, 8), epochs=1) if space == "latent" else None
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x0 = torch.rand(3, 1, 8, 8)
    gen = CounterfactualGenerator(model, steps=0, space=space, autoencoder=ae)
    res = gen.generate(x0, target=torch.ones(3, dtype=torch.long))
    assert torch.equal(res.x_star, x0)
    assert torch.equal(res.change, torch.zeros_like(x0))
