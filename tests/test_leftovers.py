"""Leftover gaps: x* kept within the intensity range (bounds), RGB change maps that do not
cancel opposite channel changes, and `width` refused for fixed torchvision backbones."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.errors import ConfigError
from causalign.explain.counterfactual import CounterfactualGenerator, eval_mode
from causalign.explain.counterfactual_export import change_in_region, data_range
from causalign.models import build_model
from causalign.models.autoencoder import ConvAutoencoder

matplotlib.use("Agg")


def _linear_model() -> nn.Module:
    """Logit of class 1 grows with the brightness of the image's left half: the cheapest
    way to the target pushes already bright pixels past 1 unless bounded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        w = torch.zeros(2, 1, 8, 8)
        w[1, :, :, :4] = 1.0
        model[1].weight.copy_(w.flatten(1))
        model[1].bias.copy_(torch.tensor([0.0, -24.0]))
    return model.eval()


def _images() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.rand(4, 1, 8, 8) * 0.3
    x[:, :, :4, :4] = 0.95  # near the top of the range: the search wants them above 1
    return x


@pytest.mark.parametrize("space,optimizer", [
    ("pixel", "adam"), ("pixel", "ista"), ("pixel", "newton"),
    ("smooth", "adam"), ("smooth", "newton"), ("latent", "adam")])
def test_bounded_counterfactual_stays_in_range(space, optimizer):
    """Before: no bounds option; the search left [0, 1] (0.85 % of exported pixels)."""
    model, x = _linear_model(), _images()
    target = torch.ones(len(x), dtype=torch.long)
    ae = ConvAutoencoder(1) if space == "latent" else None
    kw = dict(alpha=1e-3, steps=40, lr=0.1, space=space, optimizer=optimizer, autoencoder=ae,
              distance="l2" if optimizer == "newton" else "l1")
    free = CounterfactualGenerator(model, **kw).generate(x, target=target)
    assert bool(((free.x_star < 0) | (free.x_star > 1)).any())  # the case is a real one
    res = CounterfactualGenerator(model, bounds=(0.0, 1.0), **kw).generate(x, target=target)
    assert float(res.x_star.min()) >= 0.0 and float(res.x_star.max()) <= 1.0
    assert not bool(res.diverged.any())
    if space == "pixel":  # x = u: the searched variable itself is feasible
        assert torch.equal(res.u_star, res.x_star)
        assert bool(res.flipped.all()), res.target_prob  # still reaches the target


def test_bounded_newton_never_increases_the_objective():
    model, x = _linear_model(), _images()
    target = torch.ones(len(x), dtype=torch.long)
    gen = CounterfactualGenerator(model, alpha=0.05, steps=15, optimizer="newton",
                                  distance="l1", bounds=(0.0, 1.0))
    res = gen.generate(x, target=target)
    with eval_mode(model):
        t_star = res.problem.objective(res.u_star)
        t0 = res.problem.objective(res.problem.u0)
    assert bool((t_star <= t0 + 1e-6).all())
    assert bool(res.flipped.all())


def test_bounds_keep_an_out_of_range_x0_feasible():
    """Each pixel's interval is [min(lo, x0), max(hi, x0)]: a pixel of x0 already at 1.5 is
    never pulled into [0, 1] nor pushed further out, and x(u0) = x0 in the clamped spaces."""
    model, x = _linear_model(), _images()
    x[:, :, 0, 0] = 1.5
    target = torch.ones(len(x), dtype=torch.long)
    res = CounterfactualGenerator(model, alpha=1e-3, steps=20, lr=0.1,
                                  bounds=(0.0, 1.0)).generate(x, target=target)
    assert bool((res.x_star[:, :, 0, 0] <= 1.5).all())
    assert bool((res.x_star[:, :, 0, 0] > 1.0).all())
    gen = CounterfactualGenerator(model, space="smooth", bounds=(0.0, 1.0))
    prob = gen.problem(x, target)
    assert torch.equal(prob.image(prob.u0), x)


def test_bounded_newton_reaches_the_box_constrained_optimum():
    """Projected Newton fixes the pixels its gradient holds at a bound: without that (only
    projecting the unconstrained step) it stalled 30 % above the optimum that projected Adam
    reaches in 500 steps."""
    model, x = _linear_model(), _images()
    target = torch.ones(len(x), dtype=torch.long)
    kw = dict(alpha=0.05, distance="l2", bounds=(0.0, 1.0))
    newton = CounterfactualGenerator(model, steps=10, optimizer="newton", **kw)
    adam = CounterfactualGenerator(model, steps=500, lr=0.01, **kw)
    rn, ra = newton.generate(x, target=target), adam.generate(x, target=target)
    with eval_mode(model):
        tn, ta = rn.problem.objective(rn.u_star), ra.problem.objective(ra.u_star)
    torch.testing.assert_close(tn, ta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bounds", [(1.0, 0.0), (0.0, float("nan")), (0.0, float("inf")),
                                    "01", (True, 1.0), (0.0, 1.0, 2.0), 3.0])
def test_bad_bounds_are_one_clear_error(bounds):
    with pytest.raises(ConfigError, match="bounds must be two finite numbers lo < hi"):
        CounterfactualGenerator(_linear_model(), bounds=bounds)


def test_data_range_is_unit_for_unit_images_else_observed():
    assert data_range(torch.rand(3, 1, 4, 4), torch.zeros(2, 1, 4, 4)) == (0.0, 1.0)
    assert data_range(torch.tensor([[-1000.0, 400.0]]), torch.tensor([[3.0]])) == (-1000.0,
                                                                                  400.0)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("leftovers") / "run"
    cfg = TrainConfig(epochs=1, width=4, batch_size=16, device="cpu",
                      eval_saliency="gradient", bn_recalibrate=False)
    train(tiny_data, cfg, run, progress=False)
    return run


def test_cli_counterfactual_bounds_default_to_the_data_range(tiny_run, tmp_path, capsys):
    """Before: no --bounds; x* left [0, 1] and summary.json did not say how much."""
    common = ["counterfactual", str(tiny_run), "--limit", "3", "--steps", "10", "--lr", "0.2",
              "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["settings"]["bounds"] == [0.0, 1.0] and s["valid_range"] == [0.0, 1.0]
    assert s["n_out_of_range"] == 0 and s["out_of_range_share"] == 0.0
    for rec in s["samples"]:
        if "flipped" in rec:
            xs = np.load(tmp_path / "b" / "cf" / f"{rec['id']}.npy")
            assert xs.min() >= 0.0 and xs.max() <= 1.0 and rec["n_out_of_range"] == 0
    assert main([*common, "--out", str(tmp_path / "n"), "--bounds", "none"]) == 0
    s = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert s["settings"]["bounds"] is None and s["n_out_of_range"] > 0
    assert 0 < s["out_of_range_share"] <= 1
    capsys.readouterr()
    rc = main([*common, "--out", str(tmp_path / "x"), "--bounds", "1,0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --bounds must be"), err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ RGB change maps


def _hue_change() -> tuple[np.ndarray, np.ndarray]:
    """(3, 6, 6) change: inside the region R +0.5 and G −0.5 (a pure hue change)."""
    change = np.zeros((3, 6, 6), dtype=np.float32)
    change[0, 1:3, 1:3] = 0.5
    change[1, 1:3, 1:3] = -0.5
    change[2, 4, 4] = -0.2
    region = np.zeros((6, 6), dtype=np.float32)
    region[1:3, 1:3] = 1
    return change, region


def test_rgb_change_map_does_not_cancel_opposite_channels():
    """Before: the drawn map summed the channels, so the hue change drew as white."""
    from causalign.report.figures import _change_ax, agg_figure, signed_change_map

    change, region = _hue_change()
    m = signed_change_map(change)
    assert m[1, 1] == pytest.approx(0.5) and m[4, 4] == pytest.approx(-0.2)
    assert m[0, 0] == 0.0
    assert np.array_equal(signed_change_map(change[:1]), change[0])  # one channel: itself
    ax = agg_figure().subplots()
    _change_ax(ax, change, region)
    drawn = np.asarray(ax.images[0].get_array())
    assert drawn[1, 1] == pytest.approx(0.5) and drawn[4, 4] == pytest.approx(-0.2)
    # the share inside the annotation takes magnitudes per channel: nothing cancels either
    share = change_in_region(torch.from_numpy(change)[None],
                             torch.from_numpy(region)[None, None])
    assert float(share[0]) == pytest.approx(4.0 / 4.2)  # 4 px × (0.5 + 0.5) of 4.2


# ------------------------------------------------------------------ width for backbones


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "inception_v3"])
def test_width_is_refused_for_fixed_backbones(name):
    """Before: silently ignored (resnet18: 11.17 M parameters at width 4 and at 64)."""
    with pytest.raises(ConfigError, match=f"model '{name}' has a fixed architecture: width "
                                          f"does not apply \\(got width=4"):
        build_model(name, 1, 2, width=4)


def test_cli_train_resnet18_with_width_is_one_line(tiny_data, tmp_path, capsys):
    rc = main(["train", str(tiny_data), "--model", "resnet18", "--set", "width=4",
               "--epochs", "1", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: model 'resnet18' has a fixed architecture"), err
    assert not (tmp_path / "r" / "history.csv").exists()
