"""Saliency sanity checks (Adebayo et al. 2018) of benchmarks/saliency_sanity.py: cascading
model-parameter randomisation must tell a map that depends on the model from one that does
not, so the check itself can fail."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from causalign.data.synth import SynthConfig, generate
from causalign.explain import get_explainer
from causalign.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "benchmarks" / "saliency_sanity.py"
    spec = importlib.util.spec_from_file_location("bench_saliency_sanity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load()


class InputEdges:
    """A model-independent 'explainer': the Sobel gradient magnitude of the input (what
    Adebayo et al. found guided backprop to resemble)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(self, inputs: Tensor, target=None) -> Tensor:
        k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        x = inputs.sum(1, keepdim=True)
        gx = F.conv2d(x, k.view(1, 1, 3, 3), padding=1)
        gy = F.conv2d(x, k.t().reshape(1, 1, 3, 3), padding=1)
        return (gx ** 2 + gy ** 2).sqrt()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def test_sanity_check_flags_a_model_independent_explainer(tiny):
    """The input's edges stay perfectly correlated with themselves through every
    randomisation step: the check must report ρ = 1 and list the method as suspect."""
    model, x, target = tiny
    res = S.cascading_randomisation(model, x, target, ["edges"],
                                    make=lambda name, m: InputEdges(m))
    steps = res["steps"]["edges"]
    assert len(steps) == len(S.cascade_layers(model)) + 1 == 8  # trained + 7 weight layers
    assert all(s["rank_abs"] == pytest.approx(1.0) for s in steps)
    assert steps[-1]["ssim"] == pytest.approx(1.0)
    assert S.suspects(res["steps"], 0.8) == ["edges"]


@pytest.mark.parametrize("name", ["gradient", "wbp", "lrp-epsilon"])
def test_sanity_check_sees_real_maps_change(tiny, name):
    """A real explainer's maps lose their rank order once every layer is re-initialised
    (measured on this model: ρ(|map|) 0.05 for the gradient, 0.40 for WBP and LRP-ε, which
    are x ⊙ gradient on a ReLU net: the input factor keeps some order), and the model given
    is left as it was."""
    model, x, target = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = S.cascading_randomisation(model, x, target, [name])
    steps = res["steps"][name]
    assert steps[0]["rank_abs"] == pytest.approx(1.0)
    assert steps[-1]["rank_abs"] < 0.6
    assert S.suspects(res["steps"], 0.8) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cascade_groups_batchnorm_with_its_layer_and_randomise_changes_it(tiny):
    model, _, _ = tiny
    layers = S.cascade_layers(model)
    assert layers[0][0] == "classifier" and layers[-1][0] == "features.0"
    conv, bn = layers[-1][1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    work = S.copy.deepcopy(model)
    conv, bn = S.cascade_layers(work)[-1][1]
    bn.running_var.fill_(4.0)
    w = conv.weight.clone()
    S.randomise([conv, bn], seed=3)
    assert not torch.equal(conv.weight, w)
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_similarity_measures():
    a = torch.rand(3, 16, 16)
    same = S.compare(a, a.clone())
    assert same["rank_abs"] == pytest.approx(1.0) and same["ssim"] == pytest.approx(1.0)
    flipped = S.compare(a - 0.5, 0.5 - a)
    assert flipped["rank_signed"] == pytest.approx(-1.0)
    assert flipped["rank_abs"] == pytest.approx(1.0)  # |−m| = |m|
    noise = S.compare(a, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert abs(noise["rank_abs"]) < 0.3 and noise["ssim"] < 0.5
    const = S.compare(a, torch.zeros(3, 16, 16))  # no rank order: left out and counted
    assert const["rank_abs"] is None and const["constant_maps"] == 3


def test_ssim_matches_the_textbook_formula_on_a_single_window():
    """One 7×7 window: SSIM is the global formula with sample (co)variances."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 7, 7, generator=g), torch.rand(1, 7, 7, generator=g)
    fa, fb = a.flatten().double(), b.flatten().double()
    va, vb = fa.var(), fb.var()
    cov = ((fa - fa.mean()) * (fb - fb.mean())).sum() / (fa.numel() - 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = ((2 * fa.mean() * fb.mean() + c1) * (2 * cov + c2)) / (
        (fa.mean() ** 2 + fb.mean() ** 2 + c1) * (va + vb + c2))
    assert float(S.ssim(a, b)) == pytest.approx(float(ref), rel=1e-5)


def test_script_end_to_end_and_label_randomisation(tmp_path):
    """A 1-epoch run: JSON with one entry per layer and method, both figures, and the
    permuted-label copy keeps the test split and permutes the training labels."""
    from causalign.engine import TrainConfig, train

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=24, n_val=8, n_test=6, size=32, shortcut="none"))
    run = tmp_path / "run"
    train(data, TrainConfig(epochs=1, batch_size=8, width=4, device="cpu"), run,
          progress=False)
    perm = tmp_path / "perm"
    S.main([str(run), "--write-permuted", str(perm), "--seed", "1"])
    rows = {p: list(csv.DictReader(open(d / "manifest.csv", encoding="utf-8")))
            for p, d in (("a", data), ("b", perm))}
    test_a = [(r["id"], r["label"]) for r in rows["a"] if r["split"] == "test"]
    assert test_a == [(r["id"], r["label"]) for r in rows["b"] if r["split"] == "test"]
    tr_a = [r["label"] for r in rows["a"] if r["split"] == "train"]
    tr_b = [r["label"] for r in rows["b"] if r["split"] == "train"]
    assert sorted(tr_a) == sorted(tr_b) and tr_a != tr_b
    run2 = tmp_path / "run2"
    train(perm, TrainConfig(epochs=1, batch_size=8, width=4, device="cpu", seed=1), run2,
          progress=False)
    out = tmp_path / "res" / "s.json"
    S.main([str(run), "--label-run", str(run2), "--methods", "gradient,wbp", "--n", "4",
            "--no-progress", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["layers"][0] == "trained" and len(res["layers"]) == 8
    assert set(res["steps"]) == {"gradient", "wbp"}
    assert all(len(v) == 8 for v in res["steps"].values())
    assert res["steps"]["wbp"][0]["rank_abs"] == pytest.approx(1.0)
    assert res["label_randomisation"]["wbp"]["rank_abs"] < 0.99
    assert (tmp_path / "res" / "s_maps.png").stat().st_size > 0
    assert (tmp_path / "res" / "s_curves.png").stat().st_size > 0


def test_script_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        S.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])
    assert str(exc.value).startswith("error: ") and "\n" not in str(exc.value)
    assert "does not exist" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        S.main([str(tmp_path), "--methods", "gradient,bogus"])
    assert exc.value.code == 2 and "bogus" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_explainer_built_once_follows_weights_changed_in_place(tiny):
    """An explainer kept across a change of the model's weights in place (as training does)
    maps the new weights, not a copy taken when it was built."""
    model, x, target = tiny
    work = S.copy.deepcopy(model)
    names = ["gradient", "gradcam", "wbp", "lrp-epsilon", "lrp-gamma"]
    built = {n: get_explainer(n, work) for n in names}
    for i, (_, mods) in enumerate(S.cascade_layers(work)):
        S.randomise(mods, i)
    for n in names:
        kept = built[n].attribute(x, target=target)
        fresh = get_explainer(n, work).attribute(x, target=target)
        assert torch.allclose(kept, fresh), n
