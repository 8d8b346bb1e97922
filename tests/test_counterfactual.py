"""Counterfactual generator: flips, distances, independence, warm start, divergence, latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.data.format import LesionDataset
from causalign.errors import ConfigError
from causalign.explain.counterfactual import (
    DISTANCES,
    CounterfactualGenerator,
    GaussianSmoother,
    WarmStartCache,
    counterfactual_targets,
    distance_curvature,
    distance_scale,
    distance_value,
    eval_mode,
)
from causalign.implicit import hvp
from causalign.models import build_model
from causalign.models.autoencoder import load_autoencoder, save_autoencoder, train_autoencoder


@pytest.fixture(scope="module")
def trained(tiny_data):
    """A width-4 seed CNN fitted to the tiny training split (ERM, a few seconds)."""
    ds = LesionDataset(tiny_data, "train")
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = F.cross_entropy(model(ds.images), ds.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(ds.images).argmax(1) == ds.labels).float().mean().item()
    assert acc >= 0.75, acc  # the model really decides something worth flipping
    return model, ds


@pytest.fixture
def trained_in_train_mode(trained):
    """`trained`, switched to train mode for one test and put back to eval: the module's
    other tests share the model, and it stayed in train mode (BatchNorm on batch statistics)
    for whichever of them ran after this one."""
    trained[0].train()
    yield trained
    trained[0].eval()


def test_generator_flips_predictions_and_restores_model(trained_in_train_mode):
    model, ds = trained_in_train_mode
    x = ds.images[:16]
    model.zero_grad(set_to_none=True)
    gen = CounterfactualGenerator(model, alpha=0.001, steps=60, lr=0.02)
    res = gen.generate(x)  # y = the model's prediction
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad(), eval_mode(model):
        pred = model(x).argmax(1)
        after = model(res.x_star).argmax(1)
    assert torch.equal(res.target, 1 - pred)
    assert torch.equal(res.flipped, after == res.target)
    assert res.flipped.float().mean() >= 0.9, res.flipped
    assert (res.target_prob[res.flipped] > 0.5).all()
    l1 = (res.x_star - x).abs().flatten(1).sum(1)
    torch.testing.assert_close(res.distance, l1)
    assert not res.diverged.any()


@pytest.mark.parametrize("optimizer", ["adam", "newton"])
def test_batch_equals_per_sample_runs(trained, optimizer):
    """Eval-mode model + sum objective: a batched search is N independent searches."""
    model, ds = trained
    x = ds.images[:5]
    gen = CounterfactualGenerator(model, alpha=0.01, steps=15, lr=0.02, optimizer=optimizer)
    batched = gen.generate(x, target=torch.tensor([0, 1, 1, 0, 1]))
    for i, t in enumerate([0, 1, 1, 0, 1]):
        single = gen.generate(x[i:i + 1], target=torch.tensor([t]))
        torch.testing.assert_close(single.x_star[0], batched.x_star[i], rtol=1e-4, atol=1e-5)


def test_sparser_with_larger_alpha(trained):
    model, ds = trained
    x = ds.images[:8]
    small = CounterfactualGenerator(model, alpha=1e-4, steps=40, lr=0.02).generate(x)
    large = CounterfactualGenerator(model, alpha=0.05, steps=40, lr=0.02).generate(x)
    assert large.distance.mean() < small.distance.mean()


@pytest.mark.parametrize("distance", DISTANCES)
def test_smooth_surrogates_give_finite_hessian_vector_products(trained, distance):
    model, ds = trained
    x0 = ds.images[:4]
    scale = distance_scale(ds.images, distance)
    gen = CounterfactualGenerator(model, alpha=0.1, steps=0, distance=distance, scale=scale)
    prob = gen.problem(x0, torch.tensor([0, 1, 0, 1]))
    p = torch.randn_like(x0)
    with eval_mode(model, fold_bn=True):
        # x = x0 exactly (|δ| has a kink there) and a point with changed pixels
        for x in (x0.clone(), x0 + 0.1 * torch.randn_like(x0)):
            xx = x.requires_grad_(True)
            (g,) = torch.autograd.grad(prob.objective(xx).sum(), xx, create_graph=True)
            hp = hvp(g, xx, p)
            assert torch.isfinite(hp).all() and hp.abs().sum() > 0
            # Curvature along p is positive: the distance term is strictly convex
            assert ((hp * p).flatten(1).sum(1) > 0).all()
            # The distance part of H is diagonal: α·curvature·p, checked on the pure distance
            (gd,) = torch.autograd.grad(
                (0.1 * distance_value(xx - x0, distance, scale, prob.eps)).sum(), xx,
                create_graph=True)
            torch.testing.assert_close(hvp(gd, xx, p), prob.curvature(xx.detach()) * p,
                                       rtol=1e-4, atol=1e-6)


def test_distance_values_and_scales():
    d = torch.tensor([[0.0, 0.5, -2.0]])
    assert distance_value(d, "l1").item() == pytest.approx(2.5)
    assert distance_value(d, "l2").item() == pytest.approx(4.25)
    eps = 1e-2
    smooth = distance_value(d, "l1", eps=eps).item()
    assert 2.5 - 2 * eps < smooth < 2.5
    s = torch.tensor([1.0, 2.0, 0.5])
    assert distance_value(d, "scaled-l2", s).item() == pytest.approx(0.25 / 2 + 4 / 0.5)
    assert distance_curvature(torch.zeros(1, 1), "l1", eps=eps).item() == pytest.approx(1 / eps)
    # MAD and std per pixel, normalised to mean 1; a constant pixel is floored, not 1/0.
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.random((51, 1, 2, 2))).float()  # odd: a unique median
    imgs[:, 0, 0, 0] = 0.3
    imgs[:, 0, 1, 1] *= 4
    mad = distance_scale(imgs, "scaled-l1")
    x = imgs.numpy().reshape(51, -1)
    ref = np.median(np.abs(x - np.median(x, 0)), 0)
    ref = ref / ref.mean()
    ref = np.maximum(ref, 0.05)
    np.testing.assert_allclose(mad.flatten().numpy(), ref / ref.mean(), rtol=1e-5)
    assert mad.flatten()[0] > 0 and mad.flatten()[3] > mad.flatten()[1]
    std = distance_scale(imgs, "scaled-l2")
    assert std.flatten()[3] > std.flatten()[1] and torch.isfinite(std).all()
    assert distance_scale(imgs, "l1") is None
    with pytest.raises(ConfigError, match="unknown distance"):
        distance_scale(imgs, "l3")


def test_target_rules():
    y = torch.tensor([0, 1, 1])
    t, ok = counterfactual_targets(y, 2)
    assert t.tolist() == [1, 0, 0] and ok.all()
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 9.0, -1.0], [2.0, 0.0, 1.0]])
    t, ok = counterfactual_targets(torch.tensor([0, 1, 0]), 3, logits=logits)
    assert t.tolist() == [2, 0, 2]  # the most likely class other than y
    t, ok = counterfactual_targets(torch.tensor([0, 2, 1]), 3, rule="2")
    assert t.tolist() == [2, 2, 2] and ok.tolist() == [True, False, True]
    # "predicted" flips the model's decision, not the label
    binary = torch.tensor([[2.0, -1.0], [0.0, 3.0], [4.0, 1.0]])
    t, ok = counterfactual_targets(torch.tensor([0, 1, 1]), 2, rule="predicted", logits=binary)
    assert t.tolist() == [1, 0, 1] and ok.all()  # the misclassified third heads for its label
    t, _ = counterfactual_targets(torch.tensor([1, 0, 1]), 3, rule="predicted", logits=logits)
    assert t.tolist() == [2, 0, 2]  # runner-up to the prediction, whatever the label
    with pytest.raises(ValueError, match="logits"):
        counterfactual_targets(y, 2, rule="predicted")
    with pytest.raises(ConfigError):
        counterfactual_targets(y, 2, rule="5")
    with pytest.raises(ConfigError):
        counterfactual_targets(y, 2, rule="nearest")


def test_warm_start_reuses_cache(trained):
    model, ds = trained
    x = ds.images[:6]
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    gen = CounterfactualGenerator(model, alpha=0.01, steps=10, lr=0.02, warm_start=True)
    first = gen.generate(x, ids=ids)
    assert not first.warm.any() and len(gen.cache) == 6
    gen.steps = 0  # no search: the result is exactly where the cache starts it
    again = gen.generate(x, ids=ids)
    assert again.warm.all()
    torch.testing.assert_close(again.x_star, first.x_star)
    gen.steps = 10
    cont = gen.generate(x, ids=ids)  # continues from the cached point: lower objective
    with eval_mode(model):
        t_first = first.problem.objective(first.x_star)
        t_cont = cont.problem.objective(cont.x_star)
    assert (t_cont <= t_first + 1e-4).float().mean() >= 0.8
    # Unknown ids start cold; a state round trip keeps the entries.
    gen.steps = 0
    cold = gen.generate(x[:2], ids=torch.tensor([99, 100]))
    assert not cold.warm.any() and torch.equal(cold.x_star, x[:2])
    cache = WarmStartCache()
    cache.load_state_dict(gen.cache.state_dict())
    off, hit = cache.get(ids, x)
    assert hit.all()
    torch.testing.assert_close(off, cont.x_star - x)


class _NaNForFirst(nn.Module):
    """Wraps a model; sample 0's logits become NaN once its input moved from x0."""

    def __init__(self, model: nn.Module, x0: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x0 = model, x0

    def forward(self, x):
        out = self.model(x)
        moved = (x[0] - self.x0[0]).abs().sum() > 0
        bad = torch.zeros_like(out)
        bad[0] = float("nan") if moved else 0.0
        return out + bad


def test_non_finite_x0_is_an_input_error_not_a_divergence(trained):
    from causalign.errors import InputError

    model, ds = trained
    x = ds.images[:4].clone()
    x[2, 0, 3, 3] = float("inf")
    gen = CounterfactualGenerator(model, alpha=0.01, steps=5, lr=0.02)
    # Before the check this returned x* = x0 for sample 2 (inf kept) flagged as diverged.
    with pytest.raises(InputError, match="x0 holds 1 NaN/inf value"):
        gen.generate(x, target=torch.tensor([1, 0, 1, 0]))


def test_divergence_is_reset_and_flagged(trained):
    model, ds = trained
    x = ds.images[:4]
    ids = torch.arange(4)
    gen = CounterfactualGenerator(_NaNForFirst(model, x), alpha=0.01, steps=5, lr=0.02,
                                  warm_start=True)
    res = gen.generate(x, target=torch.tensor([1, 0, 1, 0]), ids=ids)
    assert res.diverged.tolist() == [True, False, False, False]
    assert torch.equal(res.x_star[0], x[0]) and torch.isfinite(res.x_star).all()
    # x* = x0 is what is returned, so its report is x0's: the target's probability was
    # reported as 0 there (as if the search had pushed it to none)
    from causalign.explain.counterfactual import eval_mode
    with torch.no_grad(), eval_mode(model):
        p0 = model(x[:1]).softmax(1)[0, 1]
    assert not res.flipped[0] and 0 < float(p0) < 1
    torch.testing.assert_close(res.target_prob[0], p0, rtol=1e-4, atol=1e-5)
    _, hit = gen.cache.get(ids, x)
    assert hit.tolist() == [False, True, True, True]  # a diverged solve is not cached
    clean = CounterfactualGenerator(model, alpha=0.01, steps=5, lr=0.02).generate(
        x[1:], target=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(res.x_star[1:], clean.x_star, rtol=1e-4, atol=1e-5)


def test_fold_bn_matches_eval_batchnorm(trained):
    model, ds = trained
    x = ds.images[:4]
    with torch.no_grad(), eval_mode(model):
        ref = model(x)
    with torch.no_grad(), eval_mode(model, fold_bn=True):
        folded = model(x)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_latent_space_autoencoder(trained, tmp_path):
    model, ds = trained
    ae = train_autoencoder(ds.images, epochs=100, batch_size=8, width=8)  # 600 steps
    baseline = (ds.images - ds.images.mean(0)).square().mean().item()  # predict the mean image
    assert ae.train_mse < 0.2 * baseline, (ae.train_mse, baseline)
    path = tmp_path / "ae.pt"
    save_autoencoder(path, ae)
    ae2 = load_autoencoder(path)
    with torch.no_grad():
        torch.testing.assert_close(ae2(ds.images[:4]), ae(ds.images[:4]))
    x = ds.images[:8]
    gen = CounterfactualGenerator(model, alpha=0.001, steps=0, space="latent", autoencoder=ae2)
    same = gen.generate(x)
    torch.testing.assert_close(same.x_star, x)  # residual form: z = z0 gives x* = x0 exactly
    gen.steps, gen.lr = 100, 0.05
    res = gen.generate(x)
    assert res.u_star.shape[1:] == (8, 8, 8) and torch.isfinite(res.x_star).all()
    assert res.flipped.float().mean() >= 0.5, res.flipped
    with pytest.raises(ConfigError, match="latent space takes l1 or l2"):
        CounterfactualGenerator(model, space="latent", distance="scaled-l1", autoencoder=ae)
    with pytest.raises(ConfigError, match="needs an autoencoder"):
        CounterfactualGenerator(model, space="latent")



def test_gaussian_smoother_is_a_normalised_blur_per_slice():
    sm = GaussianSmoother(1.5)
    const = torch.full((2, 1, 12, 12), 0.7)
    torch.testing.assert_close(sm.decode(const), const)  # kernel sums to 1, replicate pad
    torch.testing.assert_close(sm.encode(const), torch.zeros_like(const))
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    out = sm.decode(impulse)[0, 0]
    t = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k = k / torch.exp(-0.5 * (torch.arange(-5, 6) / 1.5) ** 2).sum()  # radius ceil(3σ) = 5
    torch.testing.assert_close(out[7, 4:11].double(), (k * k[3]), rtol=1e-5, atol=1e-7)
    vol = torch.zeros(1, 1, 3, 15, 15)  # the kernel (radius 5) stays inside: mass is kept
    vol[0, 0, 1, 7, 7] = 1.0
    blurred = sm.decode(vol)
    assert blurred[0, 0, 0].abs().max() == 0 and blurred[0, 0, 2].abs().max() == 0
    assert blurred[0, 0, 1].sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match=r"sigma in \(0, 1024"):
        GaussianSmoother(0.0)


def test_smooth_space_counterfactual_is_a_blurred_perturbation(trained):
    """x* = x0 + G_σ * u*: it flips the model, starts at x0, and its change has far less
    high-frequency energy than the pixel-space x* of the same model."""
    model, ds = trained
    x = ds.images[:16]
    gen = CounterfactualGenerator(model, alpha=0.001, steps=0, space="smooth")
    torch.testing.assert_close(gen.generate(x).x_star, x)
    gen.steps, gen.lr = 60, 0.05
    res = gen.generate(x)
    torch.testing.assert_close(res.change, GaussianSmoother(1.0).decode(res.u_star),
                               rtol=1e-5, atol=1e-6)
    assert res.flipped.float().mean() >= 0.75, res.flipped

    def roughness(change):  # mean |discrete Laplacian| per unit of mean |change|
        lap = (4 * change[..., 1:-1, 1:-1] - change[..., :-2, 1:-1] - change[..., 2:, 1:-1]
               - change[..., 1:-1, :-2] - change[..., 1:-1, 2:])
        return float(lap.abs().mean() / change.abs().mean())

    pixel = CounterfactualGenerator(model, alpha=0.001, steps=60, lr=0.02).generate(x)
    assert roughness(res.change) < 0.5 * roughness(pixel.change), (
        roughness(res.change), roughness(pixel.change))
    with pytest.raises(ConfigError, match=r"sigma in \(0, 1024"):
        CounterfactualGenerator(model, space="smooth", smooth_sigma=-1.0)


@pytest.fixture(scope="module")
def erm_run(tiny_data, tmp_path_factory):
    from causalign.cli import main

    run = tmp_path_factory.mktemp("cf_cli") / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs", "1",
                 "--set", "width=4", "--set", "deletion_fractions=[0.1]", "--no-progress"]) == 0
    return run


def test_cli_counterfactual_writes_triptychs(erm_run, tmp_path):
    """`causalign counterfactual RUN`: per image x* (.npy), a triptych PNG, a summary."""
    import json

    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "3", "--steps",
                 "20", "--lr", "0.05"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["n_generated"] == 3 and summary["n_diverged"] == 0
    for r in summary["samples"]:
        xs = np.load(out / "cf" / f"{r['id']}.npy")
        assert xs.shape == (1, 32, 32) and np.isfinite(xs).all()
        assert (out / "triptychs" / f"{r['id']}.png").stat().st_size > 1000
        assert isinstance(r["flipped"], bool) and r["distance"] >= 0
    assert summary["mean_distance"] > 0 and (out / "grid.png").exists()
    # the per prediction→target breakdown partitions the searched samples
    by = summary["by_transition"]
    assert sum(t["n"] for t in by.values()) == 3
    for key, t in by.items():
        rs = [r for r in summary["samples"] if f"{r['prediction']}→{r['target']}" == key]
        assert t["n"] == len(rs) and t["flip_rate"] == np.mean([r["flipped"] for r in rs])


def test_cli_counterfactual_prints_the_worst_prediction_target_pairs_first(
        erm_run, tmp_path, capsys, monkeypatch):
    """With several prediction→target pairs the CLI line lists their flip rates, lowest
    first and at most 8: one overall rate hid a pair the search could not reach."""
    from causalign.cli import main
    from causalign.explain import counterfactual_export as export

    real = export.export_counterfactuals
    rates = [0.9, 0.1, 0.5, 1.0, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4]

    def with_many_pairs(*args, **kwargs):
        summary = real(*args, **kwargs)
        summary["by_transition"] = {f"{i}→{i + 1}": {"n": 1, "flip_rate": r}
                                    for i, r in enumerate(rates)}
        return summary

    monkeypatch.setattr(export, "export_counterfactuals", with_many_pairs)
    assert main(["counterfactual", str(erm_run), "--out", str(tmp_path / "cf"), "--limit",
                 "2", "--steps", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines()
                if ln.startswith("flip rate by prediction→target: "))
    shown = [p.split()[0] for p in line.split(": ", 1)[1].split(", ")]
    # class 1 by its name (the dataset's benign / malignant), indices past them as they are
    assert shown == ["malignant→2", "6→7", "4→5", "9→10", "2→3", "8→9", "5→6", "7→8"]


def test_cli_counterfactual_ista(erm_run, tmp_path, capsys):
    import json

    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "3", "--steps",
                 "20", "--lr", "0.05", "--optimizer", "ista"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_generated"] == 3 and summary["mean_distance"] > 0
    x_star = np.stack([np.load(out / "cf" / f"{r['id']}.npy") for r in summary["samples"]])
    import yaml

    ds = LesionDataset(yaml.safe_load((erm_run / "config.yaml").read_text())["data"], "test")
    unchanged = (x_star == ds.images[:3].numpy()).mean()
    assert unchanged > 0.2  # sparse: many pixels exactly as they were
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--optimizer", "lbfgs"]) != 0
    assert "unknown optimizer 'lbfgs'" in capsys.readouterr().err


def test_cli_counterfactual_smooth_space(erm_run, tmp_path, capsys):
    import json

    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "2", "--space",
                 "smooth", "--smooth-sigma", "2", "--steps", "10", "--lr", "0.05"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["space"] == "smooth" and summary["settings"]["smooth_sigma"] == 2
    assert summary["n_generated"] == 2 and summary["mean_distance"] > 0
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--space", "smooth",
                 "--smooth-sigma", "0"]) != 0
    assert "--smooth-sigma must be > 0, got 0.0" in capsys.readouterr().err


def test_cli_counterfactual_eps_sparsifies_the_newton_search(erm_run, tmp_path, capsys):
    """--eps reaches the generator: with the Gauss-Newton search a near-exact l1 (ε = 1e-4)
    moves fewer pixels noticeably than the default smoothing (ε = 1e-2, l2-like below ε)."""
    import json

    from causalign.cli import main

    moved = {}
    for eps in ("1e-2", "1e-4"):
        out = tmp_path / f"cf{eps}"
        assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "3",
                     "--steps", "20", "--optimizer", "newton", "--eps", eps]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["eps"] == float(eps) and summary["n_generated"] == 3
        x_star = np.stack([np.load(out / "cf" / f"{r['id']}.npy") for r in summary["samples"]])
        import yaml

        ds = LesionDataset(yaml.safe_load((erm_run / "config.yaml").read_text())["data"], "test")
        moved[eps] = float((np.abs(x_star - ds.images[:3].numpy()) > 1e-3).mean())
    assert moved["1e-4"] < 0.5 * moved["1e-2"], moved
    assert main(["counterfactual", str(erm_run), "--out", str(tmp_path / "x"), "--eps", "0"]) != 0
    assert "--eps must be > 0, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--alpha", "-1"], "got alpha -1.0"),
    (["--lr", "nan"], "got lr nan"),
])
def test_cli_counterfactual_names_the_bad_search_setting(erm_run, tmp_path, capsys, argv,
                                                         needle):
    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "2", *argv]) == 2
    err = capsys.readouterr().err
    # Exactly one line: the unused progress display must not leave a blank line above it.
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, repr(err)
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_cli_counterfactual_latent_space(erm_run, tmp_path):
    """--space latent trains an autoencoder on the run's training split, saves it, reuses it."""
    import json

    from causalign.cli import main

    ae_path = tmp_path / "ae.pt"
    for k in range(2):
        out = tmp_path / f"cf{k}"
        assert main(["counterfactual", str(erm_run), "--out", str(out), "--limit", "2",
                     "--space", "latent", "--distance", "l2", "--autoencoder", str(ae_path),
                     "--steps", "10"]) == 0
        assert ae_path.exists()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["space"] == "latent" and summary["n_generated"] == 2


def test_change_map_colours(tmp_path):
    """The change panel follows the paper's Fig. 9: x* > x red, x* < x blue."""
    import matplotlib.image as mpimg

    from causalign.report.figures import counterfactual_triptych

    img = np.zeros((1, 8, 8), np.float32)
    xs = img.copy()
    xs[0, :, :4] = 1.0  # left half increased
    xs[0, :, 4:] = -1.0  # right half decreased
    counterfactual_triptych(img, xs, None, tmp_path / "t.png")
    rgb = mpimg.imread(tmp_path / "t.png")[..., :3]
    panel = rgb[:, 2 * rgb.shape[1] // 3:]
    red = (panel[..., 0] > 0.6) & (panel[..., 2] < 0.3)
    blue = (panel[..., 2] > 0.6) & (panel[..., 0] < 0.3)
    _, x_red = np.nonzero(red)
    _, x_blue = np.nonzero(blue)
    assert len(x_red) > 50 and len(x_blue) > 50
    assert x_red.mean() < x_blue.mean()  # red on the left (increase), blue on the right


def test_ista_one_step_moves_exactly_the_pixels_past_the_l1_threshold(trained):
    """One proximal step from x0: a pixel changes iff |∂CE/∂x| > α (the l1 optimality
    condition), by lr·|g|/max|g| − threshold, whatever the step size."""
    model, ds = trained
    x = ds.images[:6]
    target = 1 - ds.labels[:6]
    alpha = 0.02
    gen = CounterfactualGenerator(model, alpha=alpha, steps=1, lr=0.05, optimizer="ista")
    res = gen.generate(x, target=target)
    xx = x.clone().requires_grad_(True)
    with eval_mode(model):
        (g,) = torch.autograd.grad(F.cross_entropy(model(xx), target, reduction="sum"), xx)
    moved = (res.x_star - x).abs() > 0
    assert torch.equal(moved, g.abs() > alpha)
    assert 0 < moved.float().mean() < 1  # a real mix on this model
    eta = 0.05 / g.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
    expect = -g.sign() * (eta * (g.abs() - alpha)).clamp_min(0)
    torch.testing.assert_close(res.x_star - x, expect, rtol=1e-4, atol=1e-6)


def test_ista_thresholds_each_pixel_at_its_own_scale(trained):
    """scaled-l1: a pixel moves iff |∂CE/∂x| > α/s (its MAD), by the soft-threshold at
    η·α/s, with η = lr / max(max|g|, α·max(1/s)); and the reported distance is Σ|Δ|/s."""
    model, ds = trained
    x, target, alpha = ds.images[:6], 1 - ds.labels[:6], 0.02
    scale = distance_scale(ds.images, "scaled-l1")
    assert scale.min() < 0.5 * scale.max()  # a real spread of scales on this data
    res = CounterfactualGenerator(model, alpha=alpha, steps=1, lr=0.05, optimizer="ista",
                                  distance="scaled-l1", scale=scale).generate(x, target=target)
    xx = x.clone().requires_grad_(True)
    with eval_mode(model):
        (g,) = torch.autograd.grad(F.cross_entropy(model(xx), target, reduction="sum"), xx)
    thresh = alpha / scale
    moved = (res.x_star - x).abs() > 0
    assert torch.equal(moved, g.abs() > thresh)
    assert 0 < moved.float().mean() < 1
    gmax = g.abs().flatten(1).amax(1).clamp_min(float(thresh.max())).view(-1, 1, 1, 1)
    eta = 0.05 / gmax
    expect = -g.sign() * (eta * (g.abs() - thresh)).clamp_min(0)
    torch.testing.assert_close(res.x_star - x, expect, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.distance,
                               ((res.x_star - x).abs() / scale).flatten(1).sum(1))


def test_a_sample_that_diverges_later_loses_its_warm_start(trained):
    """A diverged solve is not cached, and an entry cached before is forgotten: a later
    visit starts cold, not from the offset that led to the divergence."""
    model, ds = trained
    x, ids, target = ds.images[:4], torch.arange(4), torch.tensor([1, 0, 1, 0])
    healthy = CounterfactualGenerator(model, alpha=0.01, steps=5, lr=0.02, warm_start=True)
    healthy.generate(x, target=target, ids=ids)
    assert healthy.cache.get(ids, x)[1].all()
    poisoned = CounterfactualGenerator(_NaNForFirst(model, x), alpha=0.01, steps=5, lr=0.02,
                                       warm_start=True)
    poisoned.cache = healthy.cache
    assert poisoned.generate(x, target=target, ids=ids).diverged.tolist() == [
        True, False, False, False]
    assert healthy.cache.get(ids, x)[1].tolist() == [False, True, True, True]
    again = CounterfactualGenerator(model, alpha=0.01, steps=0, lr=0.02, warm_start=True)
    again.cache = healthy.cache
    res = again.generate(x, target=target, ids=ids)
    assert res.warm.tolist() == [False, True, True, True]
    assert torch.equal(res.x_star[0], x[0])


def test_ista_is_sparser_than_adam_and_flips(trained):
    model, ds = trained
    x = ds.images[:16]
    adam = CounterfactualGenerator(model, alpha=0.005, steps=60, lr=0.02).generate(x)
    ista = CounterfactualGenerator(model, alpha=0.005, steps=60, lr=0.05,
                                   optimizer="ista").generate(x)
    # the same problem solved better: a lower objective T = CE(y*) + α·‖δ‖₁ with a several
    # times smaller change (Adam moves every pixel)
    objective = lambda r: -r.target_prob.log() + 0.005 * r.distance  # noqa: E731
    assert objective(ista).mean() < objective(adam).mean()
    assert ista.distance.mean() < 0.25 * adam.distance.mean()
    unchanged = lambda r: ((r.x_star - x).abs() == 0).float().mean()  # noqa: E731
    assert unchanged(ista) > 0.2 and unchanged(adam) < 0.01
    assert ista.flipped.float().mean() >= 0.75, ista.flipped
    assert not ista.diverged.any()
    with pytest.raises(ConfigError, match="unknown counterfactual optimizer 'lbfgs'"):
        CounterfactualGenerator(model, optimizer="lbfgs")


def test_cf_localisation_symbol_swap_matches_the_generator():
    """benchmarks/cf_localisation.py's reliance check: swapping turns the generator's "+" into
    a "−" (vertical bar gone) and a "−" into exactly the generator's "+"."""
    import importlib.util
    from pathlib import Path

    from causalign.data.synth import draw_symbol

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cf_localisation.py"
    spec = importlib.util.spec_from_file_location("cf_localisation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    base = (0.32 + 0.01 * rng.standard_normal((2, 64, 64))).astype(np.float32)
    plus, minus = base[0].copy(), base[1].copy()
    draw_symbol(plus, True, 64)
    draw_symbol(minus, False, 64)
    images = torch.from_numpy(np.stack([plus, minus]))[:, None]
    swapped, had_plus = bench.swap_symbol(images)
    assert had_plus.tolist() == [True, False]
    ref_minus = np.zeros((64, 64), np.float32)
    draw_symbol(ref_minus, False, 64)
    ref_plus = np.zeros((64, 64), np.float32)
    draw_symbol(ref_plus, True, 64)
    bar = (ref_plus > 0) & (ref_minus == 0)
    assert swapped[0, 0].numpy()[bar].max() < 0.4  # the "+" lost its vertical bar
    np.testing.assert_array_equal(swapped[0, 0].numpy()[ref_minus > 0], np.float32(0.9))
    drawn = np.where(ref_plus > 0, np.float32(0.9), minus)
    np.testing.assert_array_equal(swapped[1, 0].numpy(), drawn)


def test_cf_localisation_runs_chosen_settings_and_names_bad_ones(erm_run, tmp_path):
    """--setting replaces the grid (ε reaches the generator and is recorded); each row has the
    shares over all images and over the positives, and the raw Eq. 3; a malformed setting is a
    one-line error."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cf_localisation.py"
    spec = importlib.util.spec_from_file_location("cf_localisation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_setting("pixel:newton:0.01:1e-4") == ("pixel", "newton", 0.01, 1e-4)
    assert bench.parse_setting("smooth:ista:0.05") == ("smooth", "ista", 0.05, 1e-2)
    for bad in ("pixel:lbfgs:0.01", "pixel:adam", "pixel:adam:big"):
        with pytest.raises(SystemExit, match="--setting"):
            bench.parse_setting(bad)
    out = tmp_path / "loc.json"
    figure = tmp_path / "maps.png"
    bench.main([str(erm_run), "--n", "8", "--steps", "5", "--setting", "pixel:newton:0.01:1e-4",
                "--setting", "pixel:adam:0.01", "--out", str(out), "--figure", str(figure),
                "--figure-n", "3"])
    result = json.loads(out.read_text())["results"][0]
    assert "examples" not in result  # the arrays feed the figure only
    rows = result["counterfactuals"]
    assert [(r["optimizer"], r["eps"], r["steps"]) for r in rows] == [("newton", 1e-4, 5),
                                                                      ("adam", 1e-2, 5)]
    for r in rows:
        for key in ("mask", "box", "corner", "mask_positive", "box_positive"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        assert r["mask"] <= r["box"] and r["eq3_raw"] > 0
        assert 0.0 <= r["rank_mask"] <= 1.0 and 0.0 <= r["rank_mask_positive"] <= 1.0
        assert 0 <= r["eq3_raw_median"] <= r["eq3_raw_q90"]
    assert "| pixel | newton | 0.01 | 0.0001 |" in out.with_suffix(".md").read_text()
    # 3 image rows × (input + 2 settings) panels of ~1.8 × 1.85 in at 110 dpi
    from PIL import Image

    width, height = Image.open(figure).size
    assert abs(width - 1.8 * 3 * 110) <= 2 and abs(height - 1.85 * 3 * 110) <= 2, (width, height)


@pytest.mark.parametrize("targets", ["class", "soft"])
def test_newton_reaches_a_stationary_point_of_a_convex_problem(targets):
    """Linear classifier + l2 distance: T is strictly convex and JᵀSJ is exactly its CE (or
    Σ BCE) Hessian, so Gauss-Newton converges to ∇T = 0 in a few steps; Adam at the same
    number of steps is far from it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 5, 3))
    x = torch.rand(4, 3, 5, 5)
    target = (torch.tensor([0, 1, 2, 1]) if targets == "class"
              else torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.9, 1.0],
                                 [1.0, 1.0, 0.0]]))
    kw = dict(alpha=0.05, steps=8, distance="l2")

    def grad_norm(res):
        u = res.u_star.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(res.problem.objective(u).sum(), u)
        return g.flatten(1).norm(dim=1)

    newton = CounterfactualGenerator(model, optimizer="newton", **kw).generate(x, target=target)
    adam = CounterfactualGenerator(model, lr=0.05, **kw).generate(x, target=target)
    assert (grad_norm(newton) < 1e-4).all(), grad_norm(newton)
    assert (grad_norm(adam) > 100 * grad_norm(newton)).all()
    assert not newton.diverged.any()


def test_newton_never_increases_the_objective_and_beats_adam(trained):
    """On the seed CNN (smooth l1): every Gauss-Newton step lowers or keeps each sample's T
    (line search), and 10 steps end far lower than 10 or 100 Adam steps (0.03 against
    0.30 / 0.13 on this model: Adam's dense sign steps wander before they settle)."""
    model, ds = trained
    x, target = ds.images[:16], 1 - ds.labels[:16]

    def objective(optimizer, steps):
        res = CounterfactualGenerator(model, alpha=0.01, steps=steps,
                                      optimizer=optimizer).generate(x, target=target)
        with torch.no_grad(), eval_mode(model, fold_bn=True):
            return res.problem.objective(res.u_star), res

    values = [objective("newton", k)[0] for k in range(6)]
    for before, after in zip(values[:-1], values[1:], strict=True):
        assert (after <= before + 1e-6).all()
    assert (values[-1] < values[0] - 1e-3).all()  # every sample moved
    newton, res = objective("newton", 10)
    assert newton.mean() < 0.5 * min(objective("adam", k)[0].mean() for k in (10, 100))
    assert res.flipped.float().mean() >= 0.75, res.flipped


def test_newton_polish_finishes_adam_in_its_basin(trained):
    """polish=P: P Gauss-Newton steps after the K Adam steps. They start from Adam's iterate
    (equal to P Newton steps on that iterate), never raise any sample's T and lower it on
    the batch (0.296 → 0.029 on this model at P = 3)."""
    from causalign.explain.counterfactual import _gauss_newton

    model, ds = trained
    x, target = ds.images[:16], 1 - ds.labels[:16]

    def run(polish):
        res = CounterfactualGenerator(model, alpha=0.01, steps=10,
                                      polish=polish).generate(x, target=target)
        with torch.no_grad(), eval_mode(model, fold_bn=True):
            return res, res.problem.objective(res.u_star)

    adam, t_adam = run(0)
    polished, t_pol = run(3)
    with eval_mode(model, fold_bn=True):
        by_hand = _gauss_newton(adam.problem, adam.u_star, 3)
    torch.testing.assert_close(polished.u_star, by_hand)
    assert (t_pol <= t_adam + 1e-6).all()
    assert t_pol.mean() < 0.5 * t_adam.mean(), (t_pol.mean(), t_adam.mean())
    with pytest.raises(ConfigError, match="polish -1"):
        CounterfactualGenerator(model, polish=-1)


@pytest.mark.parametrize("setting", ["smooth", "latent", "scaled-l1", "scaled-l2"])
def test_newton_works_in_every_space_and_distance(trained, setting):
    """The Gauss-Newton search only needs logits and ∂logits/∂u, so it runs through the
    smooth and latent decoders and the per-pixel scales, and solves each better than Adam at
    the same number of steps (measured: 0.13 vs 0.34 smooth, 0.59 vs 3.5 latent)."""
    model, ds = trained
    x, target = ds.images[:8], 1 - ds.labels[:8]
    kw: dict = {"space": setting} if setting in ("smooth", "latent") else {
        "distance": setting, "scale": distance_scale(ds.images, setting)}
    if setting == "latent":
        torch.manual_seed(0)
        kw.update(distance="l2", autoencoder=train_autoencoder(ds.images, epochs=3))

    def objective(optimizer):
        res = CounterfactualGenerator(model, alpha=0.01, steps=10, optimizer=optimizer,
                                      **kw).generate(x, target=target)
        assert not res.diverged.any()
        with torch.no_grad(), eval_mode(model, fold_bn=True):
            return res.problem.objective(res.u_star).mean()

    assert objective("newton") < objective("adam")


def test_counterfactual_solvers_benchmark_writes_table_json_and_plot(erm_run, tmp_path):
    """benchmarks/counterfactual_solvers.py: one row per solver with finite T, the Newton
    row below the Adam row at equal steps on this model, markdown and PNG beside the JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "counterfactual_solvers.py"
    spec = importlib.util.spec_from_file_location("counterfactual_solvers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "solvers.json"
    bench.main([str(erm_run), "--n", "4", "--threads", "0", "--solvers", "adam:10,newton:10",
                "--labels", "erm", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["results"][0]["rows"]
    assert [(r["optimizer"], r["steps"]) for r in rows] == [("adam", 10), ("newton", 10)]
    assert all(np.isfinite(r["objective_mean"]) and r["seconds"] > 0 for r in rows)
    assert rows[1]["objective_mean"] < rows[0]["objective_mean"]
    assert "| erm | newton | 10 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        bench.main([str(erm_run), "--solvers", "adam", "--out", str(out)])


class _NaNWhere(nn.Module):
    """Wraps a model; logits are NaN (or inf) for inputs with any pixel above ``limit`` —
    a property of the input alone, so it holds whatever batch the sample is in."""

    def __init__(self, model: nn.Module, limit: float, value: float) -> None:
        super().__init__()
        self.model, self.limit, self.value = model, limit, value

    def forward(self, x):
        out = self.model(x)
        bad = x.flatten(1).amax(1, keepdim=True) > self.limit
        return torch.where(bad, torch.full_like(out, self.value), out)


def test_newton_flags_a_nan_model_and_never_steps_to_a_non_finite_point(trained):
    """Non-finite logits at x0 are flagged as diverged (x* = x0, the others unaffected); a
    model that turns inf once an input brightens is never followed there by the line search."""
    model, ds = trained
    x = ds.images[:4].clamp(0, 0.9)
    x[0, 0, 0, 0] = 0.95  # only sample 0 is poisoned at x0
    target = 1 - ds.labels[:4]
    kw = dict(alpha=0.01, steps=5, optimizer="newton")
    poisoned = _NaNWhere(model, 0.92, float("nan"))
    res = CounterfactualGenerator(poisoned, **kw).generate(x, target=target)
    assert res.diverged.tolist() == [True, False, False, False]
    assert torch.equal(res.x_star[0], x[0]) and not res.flipped[0]
    assert torch.isfinite(res.x_star).all()
    assert torch.isnan(res.target_prob[0])  # the model itself is NaN at x* = x0
    # sample 0's NaN does not leak into the others: they end as they do without it
    rest = CounterfactualGenerator(poisoned, **kw).generate(x[1:], target=target[1:])
    torch.testing.assert_close(res.x_star[1:], rest.x_star, rtol=1e-4, atol=1e-5)
    assert (res.x_star[1:] != x[1:]).any()

    edge = CounterfactualGenerator(_NaNWhere(model, 0.905, float("inf")), **kw).generate(
        x[1:], target=target[1:])
    assert not edge.diverged.any() and torch.isfinite(edge.x_star).all()
    assert (edge.x_star.flatten(1).amax(1) <= 0.905).all()


def test_transition_rates_group_by_prediction_and_target():
    from causalign.explain.counterfactual_export import transition_rates

    rec = [dict(prediction=2, target=0, flipped=True, target_prob=0.9, distance=1.0),
           dict(prediction=2, target=0, flipped=False, target_prob=0.3, distance=3.0),
           dict(prediction=0, target=1, flipped=True, target_prob=0.7, distance=2.0)]
    rates = transition_rates(rec)
    assert list(rates) == ["0→1", "2→0"]
    assert rates["2→0"] == {"n": 2, "flip_rate": 0.5, "mean_target_prob": 0.6,
                            "mean_distance": 2.0}
    assert rates["0→1"]["n"] == 1 and rates["0→1"]["flip_rate"] == 1.0
    assert transition_rates([]) == {}
