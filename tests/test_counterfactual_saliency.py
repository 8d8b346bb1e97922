"""The counterfactual change as a Captum-style explainer (`CounterfactualSaliency`)."""

from __future__ import annotations

import json
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from causalign.cli import main
from causalign.errors import InputError
from causalign.explain import CounterfactualGenerator, CounterfactualSaliency, get_explainer
from causalign.explain.counterfactual import CounterfactualResult
from causalign.models import SevenLayerCNN


class Linear2(nn.Module):
    """Logits (−w·x/2, w·x/2): the target logit's gradient is ±w/2 everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x.flatten(1) * self.w.flatten()).sum(1, keepdim=True) / 2
        return torch.cat([-s, s], 1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_signed_map_of_a_linear_model_follows_the_target_logits_gradient():
    # Under l2, x* = x0 − c·∇(z_t − z_y*) with c > 0: x0 − x* is parallel to the target's
    # gradient, with its sign (w for target 1, −w for target 0).
    torch.manual_seed(0)
    w = torch.randn(1, 1, 6, 6)
    model = Linear2(w)
    x = torch.rand(4, 1, 6, 6)
    target = torch.tensor([1, 0, 1, 0])
    explainer = CounterfactualSaliency(model, signed=True, distance="l2", alpha=0.05,
                                       steps=300, lr=0.02)
    a = explainer.attribute(x, target=target)
    sign = torch.where(target == 1, 1.0, -1.0)
    cos = _cos(a, sign[:, None, None, None] * w.expand_as(x))
    assert (cos > 0.99).all(), cos
    assert explainer.flipped is not None and explainer.flipped.shape == (4,)
    # the default is the magnitude of the same change
    unsigned = CounterfactualSaliency(model, distance="l2", alpha=0.05, steps=300, lr=0.02)
    assert torch.allclose(unsigned.attribute(x, target=target), a.abs(), atol=1e-6)


def test_the_map_is_the_generators_change_for_the_other_class():
    torch.manual_seed(1)
    model = SevenLayerCNN(1, 3, width=4).eval()
    x = torch.rand(3, 1, 16, 16)
    target = torch.tensor([0, 2, 1])
    a = get_explainer("counterfactual", model, signed=True, steps=20).attribute(x, target=target)
    result = CounterfactualGenerator(model, steps=20).generate(x, labels=target)
    assert torch.equal(a, x - result.x_star)
    # y* is the most likely class other than the explained one, never the explained one
    assert (result.target != target).all()
    assert a.abs().sum() > 0


def test_target_none_explains_the_predicted_class():
    torch.manual_seed(2)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    pred = model(x).argmax(1)
    e = get_explainer("counterfactual", model, steps=10)
    assert torch.equal(e.attribute(x), e.attribute(x, target=pred))


def test_create_graph_and_fixed_settings_are_refused_in_one_line():
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(InputError, match="not differentiable in the model's weights"):
        get_explainer("counterfactual", model).attribute(x, target=1, create_graph=True)
    with pytest.raises(InputError, match="sets target_rule itself"):
        CounterfactualSaliency(model, target_rule=1)
    with pytest.raises(InputError, match="sets warm_start itself"):
        CounterfactualSaliency(model, warm_start=True)
    with pytest.raises(InputError, match="NaN/inf"):
        get_explainer("counterfactual", model).attribute(x * float("nan"), target=1)
    with pytest.raises(InputError, match="classes must lie in 0..1"):
        get_explainer("counterfactual", model, steps=2).attribute(x, target=2)


def test_a_diverged_search_gives_a_zero_map_and_a_warning(monkeypatch):
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    e = CounterfactualSaliency(model, steps=2)
    real = e.generator.generate

    def diverging(x0, **kw):  # the generator resets a diverged sample's x* to x0
        r = real(x0, **kw)
        x_star = r.x_star.clone()
        x_star[1] = x0[1]
        fields = {f: getattr(r, f) for f in CounterfactualResult.__dataclass_fields__}
        return CounterfactualResult(**{**fields, "x_star": x_star,
                                       "diverged": torch.tensor([False, True])})

    monkeypatch.setattr(e, "generator", types.SimpleNamespace(generate=diverging))
    with pytest.warns(RuntimeWarning, match="1 of 2 counterfactual searches diverged"):
        a = e.attribute(x, target=torch.tensor([0, 1]))
    assert a[1].abs().sum() == 0 and a[0].abs().sum() > 0


def test_explain_and_evaluate_take_the_counterfactual_map(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--method", "erm", "--out", str(run), "--epochs",
                 "1", "--set", "width=4", "--no-progress"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no diverged search on this model
        assert main(["explain", str(run), "--saliency", "counterfactual", "--out",
                     str(tmp_path / "ex"), "--limit", "2", "--no-progress"]) == 0
    maps = sorted((tmp_path / "ex" / "maps").glob("*.npy"))
    assert len(maps) == 2
    m = np.load(maps[0])
    assert m.shape == (32, 32) and (m >= 0).all() and m.max() > 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--saliency", "counterfactual",
                 "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 16 and 0.0 <= metrics["cam_precision"] <= 1.0


def test_explain_and_evaluate_search_with_the_runs_settings(tiny_data, tmp_path, capsys):
    """A causal-align run trained with α 0.5 and scaled-l2 got maps from the generic search
    (α 0.01, l1) under explain/evaluate; they now take the run's, as `counterfactual` does."""
    from causalign.data.format import LesionDataset
    from causalign.engine.trainer import load_run
    from causalign.explain.counterfactual import distance_scale

    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--method", "causal-align", "--out", str(run),
                 "--epochs", "1", "--set", "width=4", "--set", "method.steps=2", "--set",
                 "method.alpha=0.5", "--set", "method.distance=scaled-l2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["explain", str(run), "--saliency", "counterfactual", "--out",
                 str(tmp_path / "ex"), "--limit", "3", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert summary["explainer_settings"]["alpha"] == 0.5
    assert summary["explainer_settings"]["distance"] == "scaled-l2"
    _, model, _, _ = load_run(run, device="cpu")
    test = LesionDataset(tiny_data, "test")
    x = test.batch(torch.arange(3))["image"]
    pred = model(x).argmax(1)
    scale = distance_scale(LesionDataset(tiny_data, "train").images, "scaled-l2")
    ours = CounterfactualSaliency(model, alpha=0.5, distance="scaled-l2", scale=scale)
    written = np.stack([np.load(tmp_path / "ex" / "maps" / f"{r.id}.npy")
                        for r in test.records[:3]])
    expected = ours.attribute(x, target=pred)[:, 0].detach().numpy()
    generic = CounterfactualSaliency(model).attribute(x, target=pred)[:, 0].detach().numpy()
    assert np.allclose(written, expected, atol=1e-5)
    assert not np.allclose(written, generic, atol=1e-3)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--saliency", "counterfactual",
                 "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["counterfactual_search"]["alpha"] == 0.5
    assert metrics["counterfactual_search"]["distance"] == "scaled-l2"


def test_latent_run_without_its_autoencoder_is_refused(tiny_data, tmp_path):
    """A latent-space run's map needs the autoencoder it was trained with; a fresh one would
    search another space. Without it in checkpoint.pt: one line naming the file."""
    from causalign.engine.trainer import build_method
    from causalign.errors import CausalignError
    from causalign.explain.counterfactual_export import explainer_options_for_run

    method = build_method("causal-align", {"space": "latent"})
    (tmp_path / "run").mkdir()
    with pytest.raises(CausalignError, match="does not hold"):
        explainer_options_for_run(tmp_path / "run", method, tiny_data, "cpu")
