"""PyTorch habits of the explainers, metrics, implicit solvers and counterfactuals (round 2).

Complements tests/test_api_habits.py: wrapped backbones, dtype mismatches, CG edge cases and
the counterfactual generator's options.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from causalign.causal.ccce import SmoothedFrequency, causal_attribution, ccce_scores
from causalign.errors import ConfigError, InputError
from causalign.explain import get_explainer
from causalign.explain.counterfactual import CounterfactualGenerator, distance_scale
from causalign.implicit import batched_cg
from causalign.metrics import (
    cam_precision,
    deletion_scores,
    iou_dice,
    normalize_maps,
    rank_accuracy,
)
from causalign.models import HierarchicalModel, MLPHead, SevenLayerCNN, build_model


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 2).eval()
    for m in model.modules():  # non-trivial running statistics (BN folding must matter)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_lrp_of_a_wrapped_resnet_equals_that_of_the_bare_one():
    """The ResNet canonizer was chosen by the top-level type only: in the hierarchical model
    (f₁ = resnet18) or any wrapper, relevance crossed the residual sums as a gradient and the
    LRP-ε map summed to ~-1e10 for a logit of 0.5."""
    resnet = _resnet()
    x = torch.rand(2, 1, 32, 32)
    wrapped = nn.Sequential(resnet)
    torch.manual_seed(1)
    hier = HierarchicalModel(resnet, MLPHead(2, 2)).eval()
    for name in ("lrp-epsilon", "lrp-gamma"):
        ref = get_explainer(name, resnet).attribute(x, target=1)
        torch.testing.assert_close(get_explainer(name, wrapped).attribute(x, target=1), ref)
    # the hierarchical model's map is finite and of the scale of its logit (ε conserves it
    # up to the biases), not ~1e10
    rel = get_explainer("lrp-epsilon", hier).attribute(x, target=1)
    logit = hier(x)[:, 1]
    assert torch.isfinite(rel).all()
    assert rel.flatten(1).sum(1).abs().max() < 100 * logit.abs().max().clamp_min(1.0)


@pytest.mark.parametrize("name, kwargs", [
    ("lrp-epsilon", {"epsilon": float("nan")}),
    ("lrp-epsilon", {"epsilon": -1.0}),
    ("lrp-gamma", {"gamma": float("nan")}),
    ("lrp-zbox", {"stabilizer": 0.0}),
    ("lrp-zbox", {"low": 1.0, "high": 0.0}),
])
def test_lrp_options_that_give_nan_or_another_rule_are_refused(name, kwargs):
    """NaN ε/γ or a zero stabiliser gave all-NaN maps and no error; ε < 0 or low > high
    silently computed some other rule."""
    model = SevenLayerCNN(1, 2, width=4).eval()
    with pytest.raises(ConfigError, match=f"{name} needs finite epsilon >= 0"):
        get_explainer(name, model, **kwargs)
    a = get_explainer(name, model, epsilon=0.0).attribute(torch.rand(2, 1, 16, 16), target=1)
    assert torch.isfinite(a).all()  # ε = 0 (LRP-0) stays allowed


@pytest.mark.parametrize("name", ["gradcam", "gradient", "input-x-gradient", "wbp",
                                  "lrp-epsilon", "lrp-gamma"])
def test_inputs_of_another_dtype_than_the_model_are_one_clear_error(name):
    """float16/bfloat16/float64 images into a float32 model failed deep in Captum/zennit with
    torch's "expected scalar type Half but found Float" or "Input type (double) and bias type
    (float) should be the same". Under autocast mixed dtypes keep working."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    explainer = get_explainer(name, model)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(InputError, match=rf"inputs are {dtype} but SevenLayerCNN's "
                                             rf"parameters are torch.float32"):
            explainer.attribute(x.to(dtype), target=1)
    with pytest.raises(InputError, match="inputs are torch.float64"):
        explainer.predict_and_attribute(x.double())
    # the model in the inputs' dtype is fine
    a = get_explainer(name, model.double()).attribute(x.double(), target=1)
    assert a.dtype == torch.float64 and torch.isfinite(a).all()
    if name in ("gradcam", "gradient", "wbp"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = get_explainer(name, model.float()).attribute(x.bfloat16(), target=1)
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("name", ["gradcam", "gradient", "wbp", "lrp-epsilon"])
def test_predict_and_attribute_inside_no_grad(name):
    """Evaluation code often runs under ``torch.no_grad()``; Grad-CAM's one-pass
    predict_and_attribute then failed with "element 0 of tensors does not require grad"
    (its target score was taken outside the forward's enable_grad)."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(3, 1, 16, 16)
    explainer = get_explainer(name, model)
    logits, maps = explainer.predict_and_attribute(x)
    with torch.no_grad():
        logits2, maps2 = explainer.predict_and_attribute(x)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(maps2, maps)
    assert all(p.grad is None for p in model.parameters())


class _TupleModel(nn.Module):
    """Returns (logits, aux), as many detection/auxiliary-head models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SevenLayerCNN(1, 2, width=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.net(x), 0


@pytest.mark.parametrize("name", ["gradcam", "gradient", "wbp", "lrp-epsilon"])
def test_bool_targets_and_tuple_outputs_are_one_clear_error(name):
    """A bool tensor target (a mask by mistake) was silently read as classes 0/1 while a bool
    list or array was refused; a model returning a tuple failed with "'tuple' object has no
    attribute 'dim'"."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(InputError, match="integer class indices, got torch.bool"):
        get_explainer(name, model).attribute(x, target=torch.tensor([True, False]))
    tup = _TupleModel().eval()
    for target in (1, None):
        with pytest.raises(InputError, match=r"returns one \(N, classes\) logits tensor, "
                                             r"got tuple"):
            get_explainer(name, tup).attribute(x, target=target)
    with pytest.raises(InputError, match="got tuple"):
        get_explainer(name, tup).predict_and_attribute(x)
    with pytest.raises(InputError, match="deletion needs a model that returns one"):
        deletion_scores(tup, x, torch.rand(2, 16, 16), 1, fractions=(0.1,))


# --------------------------------------------------------------------------- metrics


def test_deletion_reports_bad_inputs_instead_of_nan_drops():
    """NaN pixels gave NaN drops and no error; a NumPy map failed in Tensor.sort with "order
    must be str, not int"; float64 images into a float32 model failed in conv2d."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    maps = torch.rand(2, 16, 16)
    t = torch.tensor([1, 1])
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="inputs hold 1 NaN/inf"):
        deletion_scores(model, bad, maps, t, fractions=(0.1,))
    with pytest.raises(InputError, match="logits hold 2 NaN/inf"):
        deletion_scores(model, x, maps, t, fractions=(0.1,),
                        logits=torch.tensor([[0.0, float("nan")], [float("inf"), 0.0]]))
    with pytest.raises(InputError, match="fill value must be finite"):
        deletion_scores(model, x, maps, t, fractions=(0.1,), fill=float("nan"))
    with pytest.raises(InputError, match="deletion needs tensors"):
        deletion_scores(model, x, maps.numpy(), t, fractions=(0.1,))
    with pytest.raises(InputError, match="inputs are torch.float64"):
        deletion_scores(model, x.double(), maps, t, fractions=(0.1,))


def test_deletion_takes_every_single_class_target_form():
    """An int applied to all inputs, but a 0-d tensor or a NumPy integer (what
    ``labels[i]`` or ``np.argmax`` return) was refused as of "shape ()"."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    maps = torch.rand(2, 16, 16)
    ref = deletion_scores(model, x, maps, 1, fractions=(0.1,))[0.1]
    for target in (torch.tensor(1), np.int64(1), np.array([1, 1]), [1, 1]):
        torch.testing.assert_close(deletion_scores(model, x, maps, target,
                                                   fractions=(0.1,))[0.1], ref)


def test_rank_accuracy_of_integer_and_half_maps():
    """Integer maps (counts, thresholded maps) raised "value cannot be converted to type
    int64_t without overflow" (the NaN of an empty annotation in an int dtype); half maps
    gave half-precision shares while every other score is float32."""
    maps = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 4, 4)
    ann = torch.zeros(2, 4, 4)
    ann[0, 3] = 1  # the 4 highest pixels of sample 0; sample 1 has no annotation
    ref = rank_accuracy(maps, ann)
    assert ref[0] == 1 and ref[1].isnan()
    for m in (maps.long(), maps.half()):
        out = rank_accuracy(m, ann)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, equal_nan=True)


def test_normalize_maps_rejects_nan_and_pixel_free_maps():
    """The public normalize_maps turned a NaN pixel into an all-NaN map flagged non-empty,
    and maps without pixels failed in Tensor.min ("Expected reduction dim 1 to have
    non-zero size") — in cam_precision and iou_dice too."""
    maps = torch.rand(2, 4, 4)
    maps[1, 0, 0] = float("nan")
    with pytest.raises(InputError, match="maps hold 1 NaN/inf"):
        normalize_maps(maps)
    none = torch.zeros(2, 0, 0)
    for fn in (normalize_maps, lambda m: cam_precision(m, m), lambda m: iou_dice(m, m)):
        with pytest.raises(InputError, match=r"maps \(2, 0, 0\) have no pixels"):
            fn(none)
    out, empty = normalize_maps(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]]))
    assert out.tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]] and empty.tolist() == [False, True]


# --------------------------------------------------------------------------- implicit


@pytest.mark.parametrize("dtype, value, size", [
    (torch.float16, 4.0, 4096),    # ‖b‖ = 256: ‖b‖² = 65536 overflowed float16
    (torch.bfloat16, 4.0, 65536),
    (torch.float32, 1e20, 3),      # ‖b‖² overflowed float32
    (torch.float32, 1e-25, 3),     # ‖b‖² underflowed to 0: "converged" at x = 0
    (torch.float64, 1e-200, 3),
])
def test_cg_solves_systems_of_any_scale(dtype, value, size):
    """A = 2I is as easy as a system gets; a float16 rhs of norm 256 or a float32 one of
    1e20 came back as "breakdown" with solution 0, and a float32 rhs of 1e-25 as
    "converged" with solution 0 (100 % error). A zero rhs beside it stays solved at once."""
    b = torch.full((2, size), value, dtype=dtype)
    b[1] = 0
    res = batched_cg(lambda p: 2 * p, b)
    assert res.solution.dtype == dtype
    assert res.converged.tolist() == [True, True] and not res.breakdown.any()
    torch.testing.assert_close(res.solution[0].double(), b[0].double() / 2, rtol=1e-2, atol=0)
    assert torch.equal(res.solution[1], torch.zeros_like(b[1]))


def test_cg_scaling_changes_nothing_at_ordinary_scales():
    """The rescaling by a power of two is exact: an ordinary float32 solve, a NaN rhs beside
    it and a warm start give what they gave before (the same bits as the unscaled b)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen)
    a = a @ a.T + 5 * torch.eye(5)
    b = torch.randn(3, 5, generator=gen)
    ref = batched_cg(lambda p: p @ a, b, max_iter=3)
    big = batched_cg(lambda p: p @ a, b * 2.0 ** 40, max_iter=3)
    assert torch.equal(big.solution, ref.solution * 2.0 ** 40)
    b[2, 0] = float("nan")
    res = batched_cg(lambda p: p @ a, b, max_iter=3, x0=torch.ones_like(b))
    assert res.breakdown.tolist() == [False, False, True]
    assert torch.isfinite(res.solution).all() and (res.solution[2] == 0).all()


# --------------------------------------------------------------------------- counterfactuals


class _BatchNormAutoencoder(nn.Module):
    """A user's autoencoder with BatchNorm and dropout (the built-in one has neither)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
        self.dec = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1), nn.Dropout(0.5))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def decode(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.dec(z)


def test_latent_counterfactuals_run_a_train_mode_autoencoder_in_eval_mode():
    """Only the classifier was put in eval mode: a train-mode autoencoder's BatchNorm mixed
    the batch (sample 0 alone moved by ~4.6 against its row in the batch), its running
    statistics were overwritten and dropout made two identical calls differ."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    ae = _BatchNormAutoencoder().train()
    ae.dec.eval()  # a submodule kept in eval must stay so
    modes = [m.training for m in ae.modules()]
    stats = {k: v.clone() for k, v in ae.state_dict().items()}
    x = torch.rand(3, 1, 16, 16)
    gen = CounterfactualGenerator(model, steps=3, space="latent", autoencoder=ae)
    a = gen.generate(x, labels=[0, 1, 0]).x_star
    b = gen.generate(x, labels=[0, 1, 0]).x_star
    alone = gen.generate(x[:1], labels=[0]).x_star
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a[:1])
    assert [m.training for m in ae.modules()] == modes
    assert all(torch.equal(v, stats[k]) for k, v in ae.state_dict().items())


def test_counterfactual_single_class_targets_and_dtype_mismatch():
    """``target=1`` / ``labels=torch.tensor(1)`` (one class for all, as the explainers take
    it) were refused as of "shape ()"; float64 images into a float32 model failed in conv2d
    with "expected scalar type Double but found Float"."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(3, 1, 16, 16)
    gen = CounterfactualGenerator(model, steps=2)
    ref = gen.generate(x, target=torch.tensor([1, 1, 1])).x_star
    for target in (1, torch.tensor(1), np.int64(1)):
        torch.testing.assert_close(gen.generate(x, target=target).x_star, ref)
    torch.testing.assert_close(gen.generate(x, labels=torch.tensor(0)).x_star, ref)
    with pytest.raises(InputError, match="inputs are torch.float64 but SevenLayerCNN's"):
        gen.generate(x.double(), labels=[0, 1, 0])


@pytest.mark.parametrize("optimizer", ["adam", "newton"])
def test_soft_counterfactual_targets_are_checked(optimizer):
    """Soft (attribute) targets of the wrong width failed in BCE with "Target size ... must
    be the same as input size"; NaN or out-of-range ones gave every sample "diverged" or a
    meaningless objective, with no error."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 3, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    gen = CounterfactualGenerator(model, steps=2, optimizer=optimizer)
    with pytest.raises(InputError, match=r"target \(2, 2\) must have the shape of the "
                                         r"model's outputs \(2, 3\)"):
        gen.generate(x, target=torch.rand(2, 2))
    for bad in (float("nan"), 2.0):
        with pytest.raises(InputError, match=r"probabilities in \[0, 1\]"):
            gen.generate(x, target=torch.full((2, 3), bad))
    res = gen.generate(x, target=torch.rand(2, 3))
    assert not res.diverged.any()


def test_warm_start_ids_are_checked():
    """Warm-start keys: a list failed with "'list' object has no attribute 'to'", a negative
    id wrapped around onto another sample's cached offset and a float id was truncated (0.5
    warm-started from sample 0's solution), all without an error."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(3, 1, 16, 16)
    gen = CounterfactualGenerator(model, steps=2, warm_start=True)
    first = gen.generate(x, labels=[0, 1, 0], ids=[0, 1, 2])  # a list works
    assert not first.warm.any() and len(gen.cache) == 3
    for ids, match in ((torch.tensor([-1, 0, 1]), "non-negative dataset indices, got -1"),
                       (torch.tensor([0.5, 1.0, 2.0]), "integer dataset indices"),
                       (torch.tensor([0, 1]), r"one dataset index per input \(3\)")):
        with pytest.raises(InputError, match=match):
            gen.generate(x, labels=[0, 1, 0], ids=ids)
    assert gen.generate(x, labels=[0, 1, 0], ids=torch.arange(3)).warm.all()


# --------------------------------------------------------------------------- CCCE


def test_ccce_of_a_label_the_model_deems_impossible_attributes_nothing():
    """P(Y=y | A=a) = 0 was replaced by the smallest float: every subset scored CCCE 1 and
    attribute 0 was named the full cause, also for y = 1 with every attribute already 0
    (where nothing can have an effect)."""
    a = np.array([[1, 0], [1, 0], [0, 0], [0, 1], [1, 1]], float)
    y = np.array([0, 0, 0, 1, 1])
    model = SmoothedFrequency(smoothing=0).fit(a, y)  # P(Y=1 | [1,0]) = P(Y=1 | [0,0]) = 0
    res = causal_attribution(model, np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]),
                             np.array([1, 1, 1]), max_size=2)
    assert res.r.tolist() == [[False, False], [False, False], [False, True]]
    assert res.subset.tolist() == [-1, -1, 1]
    assert np.isnan(res.score[:2]).all() and res.score[2] == 1.0
    scores = ccce_scores(model, np.array([[1.0, 0.0]]), np.array([1]), [(0,), (1,)])
    assert np.isnan(scores).all()


@pytest.mark.parametrize("optimizer", ["adam", "newton"])
def test_counterfactual_distance_scale_is_checked(optimizer):
    """A user's per-pixel scale: NaN or zero gave NaN distances (Adam flagged every sample
    "diverged", Newton flagged nothing), a negative one rewarded change, and one of another
    image size failed deep in the search with torch's size-mismatch message."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    for bad in (float("nan"), 0.0, -1.0):
        gen = CounterfactualGenerator(model, steps=2, distance="scaled-l2", optimizer=optimizer,
                                      scale=torch.full((1, 16, 16), bad))
        with pytest.raises(ConfigError, match="256 value\\(s\\) that are not finite and > 0"):
            gen.generate(x, labels=[0, 1])
    gen = CounterfactualGenerator(model, steps=2, distance="scaled-l2", optimizer=optimizer,
                                  scale=distance_scale(torch.rand(5, 1, 8, 8), "scaled-l2"))
    with pytest.raises(InputError, match=r"scale \(1, 8, 8\) must have the shape of one image "
                                         r"of x0 \(1, 16, 16\)"):
        gen.generate(x, labels=[0, 1])
    good = distance_scale(torch.rand(5, 1, 16, 16), "scaled-l2")
    res = CounterfactualGenerator(model, steps=2, distance="scaled-l2", optimizer=optimizer,
                                  scale=good).generate(x, labels=[0, 1])
    assert torch.isfinite(res.distance).all() and not res.diverged.any()
