"""BatchNorm batch statistics as causal-align (capture_bn_stats) and RRR use them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.explain.counterfactual import capture_bn_stats
from causalign.models.norm import channel_mean_var


@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (4, 2, 5, 6, 7), (16, 5, 9)])
def test_channel_mean_var_matches_torch(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
    dims = [0, *range(2, x.dim())]
    mean, var = channel_mean_var(x)
    assert mean.shape == var.shape == (shape[1],)
    torch.testing.assert_close(mean, x.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(dims, unbiased=False), rtol=1e-12, atol=1e-12)


def test_channel_mean_var_accurate_with_large_offset():
    """A two-pass variance keeps its accuracy where E[x²] − E[x]² would cancel away."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 8, 8) * 1e-2 + 1e3
    exact = x.double().var([0, 2, 3], unbiased=False)
    _, var = channel_mean_var(x)
    torch.testing.assert_close(var.double(), exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_mean_var_half_precision_does_not_overflow(dtype):
    """One activation per channel 300 away from the rest: its square (9e4) overflows
    float16, the variance (~310) does not. Reduced in float32 the result is finite, in the
    input's dtype and as close as that dtype can hold."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    x[0, :, 0, 0] = 300.0
    x = x.to(dtype)
    mean, var = channel_mean_var(x)
    assert mean.dtype == var.dtype == dtype
    exact = x.double().var([0, 2, 3], unbiased=False)
    assert torch.isfinite(var).all()
    torch.testing.assert_close(var.double(), exact, rtol=1e-2, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean([0, 2, 3]), rtol=1e-2, atol=1.0)


def test_capture_bn_stats_are_the_batch_norm_statistics():
    """With momentum 1 the running buffers become the batch's own statistics (running_var
    unbiased): what capture_bn_stats records must be those, for every BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=1.0), nn.ReLU(),
                          nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3, momentum=1.0)).train()
    x = torch.randn(6, 1, 12, 12)
    with capture_bn_stats(model) as stats:
        model(x)
    bns = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    assert set(stats) == set(bns)
    for bn in bns:
        mean, var = stats[bn]
        h = {bns[0]: 10, bns[1]: 8}[bn]
        n = x.shape[0] * h * h
        torch.testing.assert_close(mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var * n / (n - 1), bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_eval_mode_with_captured_stats_gives_the_train_mode_output(fold_bn):
    """causal-align's inner problem: the model in eval mode (samples independent) with the
    batch's BatchNorm statistics frozen in, i.e. the function CE trains on this batch. A
    mutation that dropped ``bn_stats`` (running statistics instead) passed every test of
    this file."""
    from causalign.explain.counterfactual import eval_mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64) * 2 + 1
    model.train()
    with capture_bn_stats(model) as stats, torch.no_grad():
        train_out = model(x)
    with torch.no_grad(), eval_mode(model, fold_bn=fold_bn, bn_stats=stats):
        frozen = model(x)
        one = model(x[:1])  # a sample alone: no batch statistics of its own
    with torch.no_grad(), eval_mode(model, fold_bn=fold_bn):
        running = model(x)
    torch.testing.assert_close(frozen, train_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one, train_out[:1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(running, train_out, atol=1e-3)
    assert model.training  # restored
