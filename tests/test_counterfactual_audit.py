"""Audit regressions for the counterfactual generator and `causalign counterfactual`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from causalign.data.format import LesionDataset
from causalign.errors import ConfigError, InputError
from causalign.explain.counterfactual import CounterfactualGenerator
from causalign.explain.counterfactual_export import data_range
from causalign.models.autoencoder import ConvAutoencoder


def _linear(n_out: int = 2, flat_out: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, n_out)]
    if flat_out:
        layers.append(nn.Flatten(0))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("n_out,flat_out", [(1, False), (1, True)])
def test_single_logit_model_is_refused_not_reported_as_flipped(n_out, flat_out):
    """A one-logit (sigmoid) binary classifier made every target the sample's own class:
    x* = x0 came back "flipped" with target_prob 1; an (N,) output raised an IndexError."""
    model = _linear(n_out, flat_out)
    x = torch.rand(3, 1, 8, 8)
    gen = CounterfactualGenerator(model, steps=2)
    with pytest.raises(InputError, match="C >= 2"):
        gen.generate(x)
    with pytest.raises(InputError, match="C >= 2"):  # explicit class targets too
        gen.generate(x, target=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("space", ["pixel", "smooth"])
def test_newton_with_alpha_zero_finds_the_counterfactual(space):
    """α = 0 (allowed; Adam and ISTA flip every sample) left Newton's Woodbury step to
    catastrophic cancellation: no step at all in the smooth space (flip rate 0), changes of
    ~4000 and a missed flip in pixel space."""
    model = _linear()
    x = torch.rand(3, 1, 8, 8) * 0.5
    res = CounterfactualGenerator(model, alpha=0.0, steps=5, optimizer="newton",
                                  space=space).generate(x)
    assert not res.diverged.any()
    assert res.flipped.all()
    assert res.change.abs().amax() < 50


class _NaNGradRow0(torch.autograd.Function):
    """Identity forward (finite logits); a NaN gradient for sample 0 (e.g. sqrt at 0)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        g = g.clone()
        g[0] = float("nan")
        return g


class _NaNGradModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_NaNGradRow0.apply(x))


@pytest.mark.parametrize("optimizer", ["adam", "ista", "newton"])
def test_a_nan_gradient_is_flagged_as_diverged_by_every_optimizer(optimizer):
    """ISTA's best-iterate rule and Newton's line search hid a NaN gradient: x* = x0 came
    back as a plain "not flipped", diverged False (Adam flagged it)."""
    x = torch.rand(3, 1, 8, 8) * 0.5
    res = CounterfactualGenerator(_NaNGradModel(), steps=3, lr=0.05,
                                  optimizer=optimizer).generate(x)
    assert res.diverged.tolist() == [True, False, False]
    assert torch.equal(res.x_star[0], x[0]) and torch.isfinite(res.x_star).all()
    assert res.flipped[1:].all()


def test_the_report_keeps_a_float64_models_precision():
    # target_prob was cut to float32 (the logits were cast) for a float64 model and input
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.5
    model = _linear().double()
    res = CounterfactualGenerator(model, steps=3, lr=0.05).generate(x)
    with torch.no_grad():
        expected = model(res.x_star).softmax(1).gather(1, res.target[:, None])[:, 0]
    assert res.target_prob.dtype == torch.float64
    torch.testing.assert_close(res.target_prob, expected, rtol=1e-12, atol=1e-12)
    half = CounterfactualGenerator(_linear().bfloat16(), steps=2, lr=0.05).generate(
        x.bfloat16())
    assert half.target_prob.dtype == torch.float32  # low precision is widened


class _NaNLogitsRow0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        poison = torch.zeros_like(z)
        poison[0] = float("nan")
        return z + poison if len(z) == 3 else z  # the full batch: sample 0's logits NaN


def test_newton_flags_nan_logits_without_report():
    """report=False (how causal-align training calls it): Newton at NaN logits never
    stepped and returned x0 as not diverged."""
    x = torch.rand(3, 1, 8, 8) * 0.5
    res = CounterfactualGenerator(_NaNLogitsRow0(), steps=3, optimizer="newton").generate(
        x, target=torch.ones(3, dtype=torch.long), report=False)
    assert res.diverged.tolist() == [True, False, False]
    assert torch.equal(res.x_star[0], x[0])


def test_latent_search_leaves_the_callers_autoencoder_as_it_was():
    """A float64 model's search converted the caller's float32 autoencoder in place
    (`.to(dtype)`), which then failed on the float32 images it was made for."""
    torch.manual_seed(0)
    ae = ConvAutoencoder(in_channels=1, width=4, latent_channels=2).train()
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    res = CounterfactualGenerator(model, steps=2, space="latent",
                                  autoencoder=ae).generate(x)
    assert res.x_star.dtype == torch.float64 and torch.isfinite(res.x_star).all()
    assert all(p.dtype == torch.float32 for p in ae.parameters())
    assert ae.training
    ae.eval()
    with torch.no_grad():
        ae(torch.rand(1, 1, 16, 16))  # still usable on its own float32 images


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    from causalign.cli import main

    run = tmp_path_factory.mktemp("cf_audit") / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--set", "threads=1",
                 "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("split,bounds", [("test", "0,1"), ("test", "data"),
                                          ("train", "data")])
def test_cli_counterfactual_builds_no_whole_split_float_copy(tiny_run, tiny_data, tmp_path,
                                                             monkeypatch, split, bounds):
    """Every call built the whole training split as float32 (`.images`, twice for --split
    train), even for --bounds LO,HI and an l1 search of a few images; the range is now read
    batch by batch and gives the same value."""
    from causalign.cli import main

    expected = data_range(LesionDataset(tiny_data, "train").images,
                          LesionDataset(tiny_data, split).images)
    calls = []
    original = LesionDataset.images

    def counted(self):
        calls.append(self.split)
        return original.fget(self)

    monkeypatch.setattr(LesionDataset, "images", property(counted))
    out = tmp_path / "cf"
    assert main(["counterfactual", str(tiny_run), "--split", split, "--out", str(out),
                 "--limit", "2", "--steps", "2", "--bounds", bounds, "--no-progress"]) == 0
    assert calls == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["valid_range"] == ([0.0, 1.0] if bounds == "0,1" else list(expected))
    calls.clear()
    assert main(["counterfactual", str(tiny_run), "--split", split, "--out", str(out),
                 "--limit", "2", "--steps", "2", "--distance", "scaled-l1",
                 "--no-progress"]) == 0
    assert calls == []  # the per-pixel scales read the training split chunk by chunk


@pytest.mark.parametrize("shape", [(3, 8), (3, 2, 8)])
def test_smooth_space_refuses_inputs_without_two_spatial_axes(shape):
    """The blur runs over the last two axes: an (N, C) batch was blurred across its samples
    (sample 0's x* depended on the others), an (N, C, L) one across channels."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape[1:]), 2))
    gen = CounterfactualGenerator(model, space="smooth", steps=2)
    with pytest.raises(InputError, match="space 'smooth'"):
        gen.generate(torch.rand(*shape))


@pytest.mark.parametrize("kwargs", [{"alpha": "a"}, {"lr": None}, {"eps": [0.1]},
                                    {"alpha": torch.tensor([1.0, 2.0])},
                                    {"target_rule": "foo"}, {"target_rule": -1},
                                    {"target_rule": True}])
def test_bad_settings_are_one_config_error_at_construction(kwargs):
    """A string alpha failed in math.isfinite with a bare TypeError ("must be real number");
    an unknown target rule was only refused at the first generate()."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError) as err:
        CounterfactualGenerator(model, **kwargs)
    assert "\n" not in str(err.value)


def test_numeric_settings_of_other_types_are_accepted():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    for kwargs in ({"alpha": np.float32(0.1)}, {"alpha": torch.tensor(0.1)},
                   {"target_rule": np.int64(1)}, {"target_rule": "1"},
                   {"target_rule": "predicted"}):
        gen = CounterfactualGenerator(model, steps=2, **kwargs)
        res = gen.generate(torch.rand(3, 1, 2, 2), labels=torch.zeros(3, dtype=torch.long))
        assert res.x_star.shape == (3, 1, 2, 2)


def test_cli_warns_when_the_searches_diverge(tiny_run, tmp_path, capsys):
    """Every search diverged (x* kept at x0), yet the run exited 0 with "flip rate 0.000"
    and nothing on stderr; only summary.json's n_diverged said so."""
    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(tiny_run), "--out", str(out), "--limit", "3", "--steps",
                 "3", "--lr", "1e38", "--bounds", "none", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_diverged"] == 3
    assert "warning: 3 of 3 counterfactual searches diverged" in capsys.readouterr().err


def test_cli_refuses_a_model_with_non_finite_outputs(tiny_run, tmp_path, capsys):
    """NaN weights: argmax of NaN logits was reported as prediction 0, exit 0."""
    import hashlib
    import shutil

    from causalign.cli import main

    run = tmp_path / "run_nan"
    shutil.copytree(tiny_run, run)
    for name in ("checkpoint.pt", "best.pt"):
        path = run / name
        if not path.exists():
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        weights = state["model"]
        first = next(k for k, v in weights.items() if v.is_floating_point())
        weights[first].view(-1)[0] = float("nan")
        torch.save(state, path)
        digest = path.with_name(name + ".sha256")
        old = digest.read_text()
        digest.write_text(old.replace(old.split()[0],
                                      hashlib.sha256(path.read_bytes()).hexdigest()))
    assert main(["counterfactual", str(run), "--out", str(tmp_path / "cf"), "--limit", "2",
                 "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model's outputs are not finite on sample" in err[0]


def test_cli_refuses_an_autoencoder_outside_the_latent_space(tiny_run, tmp_path, capsys):
    from causalign.cli import main

    assert main(["counterfactual", str(tiny_run), "--out", str(tmp_path / "cf"), "--limit",
                 "2", "--steps", "2", "--autoencoder", str(tmp_path / "ae.pt"),
                 "--no-progress"]) == 2
    assert "--autoencoder is used only with --space latent" in capsys.readouterr().err
    assert not (tmp_path / "ae.pt").exists()


@pytest.mark.parametrize("sigma", [1e308, 1e7])
def test_a_blur_wider_than_any_image_is_refused(sigma):
    """1e308: OverflowError traceback from ceil(3σ); 1e7: a 6e7-tap kernel."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ConfigError, match=r"sigma in \(0, 1024"):
        CounterfactualGenerator(model, space="smooth", smooth_sigma=sigma)


def test_images_outside_0_1_are_drawn_over_their_own_range():
    """A fixed [0, 1] grey scale drew CT in HU (or any −50..50 data) almost all black and
    white; x and x* share one scale so the change shows as it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from causalign.report.figures import _show_image, display_range

    hu = np.linspace(-50, 50, 64, dtype=np.float32).reshape(1, 8, 8)
    assert display_range(hu) == (-50.0, 50.0)
    assert display_range(hu / 100 + 0.5) == (0.0, 1.0)  # data in [0, 1]: as before
    assert display_range(hu, hu * 2) == (-100.0, 100.0)
    assert display_range(np.full((1, 4, 4), np.nan)) == (0.0, 1.0)
    fig, ax = plt.subplots()
    try:
        _show_image(ax, hu)
        assert ax.images[0].get_clim() == (-50.0, 50.0)
        _show_image(ax, np.repeat(hu, 3, axis=0))  # RGB rescaled, not clipped to [0, 1]
        rgb = ax.images[1].get_array()
        assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0 and len(np.unique(rgb)) > 32
    finally:
        plt.close(fig)


def test_a_hier_align_run_lends_its_image_levels_search_settings():
    """Trained with method.alpha1=0.5 distance=l2, its counterfactuals used α = 0.01 and l1."""
    from causalign.explain.counterfactual_export import settings_for_run
    from causalign.methods import build_method

    method = build_method("hier-align", {"alpha1": 0.5, "distance": "l2", "eps": 0.02})
    s = settings_for_run(method)
    assert (s.alpha, s.distance, s.eps, s.space) == (0.5, "l2", 0.02, "pixel")
    assert settings_for_run(method, alpha=0.1).alpha == 0.1  # explicit options still win


def test_the_generator_refuses_a_target_rule_the_config_refuses():
    """One predicate decides what a target rule is: "²".isdigit() is True, so the
    generator took it and failed with a ValueError at the first search; a negative class
    index is no class either."""
    from causalign.explain.counterfactual import is_target_rule

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    for bad in ("²", -1, "-1", True, "others"):
        assert not is_target_rule(bad)
        with pytest.raises(ConfigError, match="target rule"):
            CounterfactualGenerator(model, target_rule=bad)
    for good in ("other", "predicted", 0, "1"):
        assert is_target_rule(good)
        CounterfactualGenerator(model, target_rule=good)


def test_cli_refuses_a_smooth_sigma_outside_the_smooth_space(tiny_run, tmp_path, capsys):
    """--smooth-sigma 3 on a pixel-space search ran unblurred while summary.json recorded
    smooth_sigma 3.0; --autoencoder outside the latent space was already refused."""
    from causalign.cli import main

    assert main(["counterfactual", str(tiny_run), "--out", str(tmp_path / "cf"), "--limit",
                 "2", "--steps", "2", "--smooth-sigma", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--smooth-sigma is used only with --space smooth" in err[0]
    assert not (tmp_path / "cf").exists()


def test_the_inner_problem_runs_convolutions_without_tf32_on_cuda(monkeypatch):
    """PyTorch lets cuDNN run float32 convolutions in TF32 on Ampere+ GPUs by default; the
    search and the implicit gradient (eval_mode with fold_bn) turn it off and restore it.
    No GPU here: CUDA is reported present, and the flag is read inside the model."""
    from causalign.explain.counterfactual import eval_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return x.flatten(1)[:, :2]

    assert torch.backends.cudnn.allow_tf32  # PyTorch's default
    CounterfactualGenerator(Probe(), steps=2).generate(torch.rand(2, 1, 4, 4),
                                                       labels=torch.tensor([0, 1]))
    with eval_mode(Probe(), fold_bn=False) as model:
        model(torch.rand(1, 1, 4, 4))
    # the check of the model's outputs at x0 runs first, in the caller's precision; every
    # search step in full float32; eval_mode without fold_bn leaves the setting alone
    assert seen[0] is True and set(seen[1:-1]) == {False} and seen[-1] is True
    assert torch.backends.cudnn.allow_tf32  # restored


def test_the_warm_start_cache_grows_no_further_than_the_training_split():
    """Shuffled batches reach ~N ids at once; doubling then held ~2N rows of offsets on the
    model's device (1980 rows for N = 1000). With the split's size as capacity it holds N;
    ids beyond it still fit (doubling, as before)."""
    from causalign.explain.counterfactual import WarmStartCache

    like = torch.zeros(4, 1, 2, 2)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for capacity, rows in ((None, 1024), (1000, 1000)):
        cache = WarmStartCache(capacity)
        for ids in order.split(4):
            cache.put(ids, like, torch.ones(4, dtype=torch.bool))
        assert cache.offsets.shape[0] == rows, capacity
    cache.put(torch.tensor([1500]), like[:1], torch.ones(1, dtype=torch.bool))
    assert cache.offsets.shape[0] >= 1001 and cache.cached_ids()[-1] == 1500


def test_load_run_reads_the_checkpoint_on_the_cpu(tiny_run, monkeypatch):
    """Without best.pt, load_run reads checkpoint.pt: its optimiser state and warm-start
    cache went onto the --device only for the weights to be copied out."""
    import causalign.engine.trainer as trainer_mod

    where = []

    class Recorded(Exception):
        pass

    def recording(path, map_location=None, **kw):
        where.append(str(map_location))
        raise Recorded

    # a device other than the CPU (no GPU here): the weights' file must still be read onto
    # the CPU
    monkeypatch.setattr(trainer_mod, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(trainer_mod, "load_checkpoint", recording)
    with pytest.raises(Recorded):
        trainer_mod.load_run(tiny_run, device="cuda")
    assert where == ["cpu"]


def test_multiclass_other_target_is_decided_at_the_logits_precision():
    """'other' on 3+ classes takes the strongest other class; float64 logits were rounded to
    float32 first, so two classes 1e-12 apart tied and the lower index won."""
    from causalign.explain.counterfactual import counterfactual_targets

    logits = torch.tensor([[5.0, 1.0, 1.0 + 1e-12]], dtype=torch.float64)
    target, valid = counterfactual_targets(torch.tensor([0]), 3, "other", logits)
    assert target.tolist() == [2] and valid.tolist() == [True]
    half = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float16)
    assert counterfactual_targets(torch.tensor([0]), 3, "other", half)[0].tolist() == [1]


def test_latent_export_into_another_exports_folder_is_refused_before_training(
        tiny_data, tmp_path, capsys, monkeypatch):
    # Before: `counterfactual --space latent --out F` with F holding `explain`'s output
    # trained its autoencoder (minutes on real data), saved it into F, then was refused.
    import causalign.models.autoencoder as AE
    from causalign.cli import main

    run, out = tmp_path / "run", tmp_path / "shared"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs",
                 "1", "--set", "width=4", "--no-progress"]) == 0
    assert main(["explain", str(run), "--saliency", "gradient", "--out", str(out), "--limit",
                 "2", "--no-progress"]) == 0
    before = sorted(p.name for p in out.iterdir())

    def no_training(*args, **kwargs):
        raise AssertionError("the autoencoder was trained for a refused folder")

    monkeypatch.setattr(AE, "train_autoencoder", no_training)
    capsys.readouterr()
    rc = main(["counterfactual", str(run), "--space", "latent", "--distance", "l2", "--out",
               str(out), "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "holds the output of `causalign explain`" in err
    assert sorted(p.name for p in out.iterdir()) == before  # no autoencoder.pt left in it
