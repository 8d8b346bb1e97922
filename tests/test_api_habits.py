"""PyTorch habits of the Python API: explainers, counterfactuals, metrics, CG, CCCE.

A call must leave the model as it found it (train/eval flags, BatchNorm buffers, no hooks, no
`.grad`), accept the usual target forms, and turn bad input into one clear error instead of an
index error or a silently wrong number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from causalign.causal.ccce import (
    SmoothedFrequency,
    attribution_report,
    causal_attribution,
    format_attribution_report,
)
from causalign.errors import CausalignError, InputError
from causalign.explain import get_explainer
from causalign.explain.counterfactual import CounterfactualGenerator
from causalign.implicit import batched_cg, implicit_gradient
from causalign.metrics import (
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    rank_accuracy,
)
from causalign.models import SevenLayerCNN

EXPLAINERS = ["gradcam", "gradient", "input-x-gradient", "wbp", "lrp-epsilon", "lrp-gamma"]


def _cnn(in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = SevenLayerCNN(in_channels, 2, width=4)
    for m in model.modules():  # non-trivial running statistics, so a change is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _snapshot(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor]]:
    return ([m.training for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model: nn.Module, before: tuple[list[bool], dict[str, torch.Tensor]]
                      ) -> None:
    modes, state = before
    assert [m.training for m in model.modules()] == modes
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == []  # e.g. BatchNorm running statistics
    assert _n_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- explainers


@pytest.mark.parametrize("name", EXPLAINERS)
def test_explainer_leaves_a_train_mode_model_untouched(name):
    """Maps are taken in eval mode: on a train-mode model Grad-CAM and the gradient maps used
    to run BatchNorm on batch statistics and overwrite its running statistics."""
    model = _cnn().train()
    model.features[1].eval()  # a submodule kept in eval must stay so
    before = _snapshot(model)
    x = torch.rand(2, 3, 16, 16)
    x_copy = x.clone()
    a = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
    _assert_untouched(model, before)
    assert torch.equal(x, x_copy) and not x.requires_grad and x.grad is None
    # the same map as from the eval-mode model: batch statistics did not enter
    model.eval()
    b = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["gradcam", "input-x-gradient"])
def test_maps_without_create_graph_are_detached(name):
    """Captum's Grad-CAM map kept the forward graph alive; a backward from it filled the
    parameters' .grad (and input × gradient kept a graph to the input)."""
    model = _cnn().eval()
    a = get_explainer(name, model).attribute(torch.rand(2, 3, 16, 16), target=1)
    assert not a.requires_grad and a.grad_fn is None


@pytest.mark.parametrize("name", EXPLAINERS)
@pytest.mark.parametrize("target", [5, torch.tensor([0, 5])])
def test_target_outside_the_classes_is_an_input_error(name, target):
    model = _cnn().eval()
    with pytest.raises(InputError, match=r"target classes must lie in 0\.\.1"):
        get_explainer(name, model).attribute(torch.rand(2, 3, 16, 16), target=target)
    assert _n_hooks(model) == 0


@pytest.mark.parametrize("name", ["gradcam", "gradient", "lrp-epsilon"])
def test_target_as_list_numpy_or_int32(name):
    model = _cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    ref = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
    for target in ([0, 1], np.array([0, 1]), torch.tensor([0, 1], dtype=torch.int32)):
        torch.testing.assert_close(get_explainer(name, model).attribute(x, target=target), ref)


@pytest.mark.parametrize("name", ["gradcam", "gradient", "input-x-gradient"])
def test_explainers_inside_inference_mode_fail_clearly(name):
    model = _cnn().eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        get_explainer(name, model).attribute(torch.rand(1, 3, 16, 16), target=1)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient"])
def test_create_graph_inside_no_grad_gives_the_plain_map(name):
    """Inside no_grad nothing is recorded, as for any op; it used to fail with autograd's
    "element 0 of tensors does not require grad"."""
    model = _cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    ref = get_explainer(name, model).attribute(x, target=1)
    with torch.no_grad():
        a = get_explainer(name, model).attribute(x, target=1, create_graph=True)
    torch.testing.assert_close(a, ref)


# --------------------------------------------------------------------------- counterfactuals


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": torch.tensor([0, 5])}, r"labels classes must lie in 0\.\.1"),
    ({"target": torch.tensor([0, 5])}, r"target classes must lie in 0\.\.1"),
    ({"target": torch.tensor([-1, 1])}, r"target classes must lie in 0\.\.1"),
    ({"target": torch.tensor([0, 1, 1])}, "one class per input"),
])
def test_counterfactual_bad_labels_or_targets_are_input_errors(kwargs, match):
    model = _cnn().train()
    before = _snapshot(model)
    gen = CounterfactualGenerator(model, steps=2)
    with pytest.raises(InputError, match=match):
        gen.generate(torch.rand(2, 3, 16, 16), **kwargs)
    _assert_untouched(model, before)


def test_counterfactual_labels_as_list_and_inference_mode():
    model = _cnn().eval()
    gen = CounterfactualGenerator(model, steps=2)
    x = torch.rand(2, 3, 16, 16)
    ref = gen.generate(x, labels=torch.tensor([0, 1])).x_star
    torch.testing.assert_close(gen.generate(x, labels=[0, 1]).x_star, ref)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        gen.generate(x, labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("optimizer", ["adam", "newton"])
def test_counterfactual_half_precision(optimizer):
    """float16: Adam's g² and eps underflowed to 0, so every sample came back "diverged";
    Gauss-Newton raised "lu_cpu" not implemented for 'Half'."""
    model = _cnn().eval().half()
    x = torch.rand(2, 3, 16, 16).half()
    res = CounterfactualGenerator(model, steps=5, optimizer=optimizer, lr=0.05).generate(
        x, labels=torch.tensor([0, 1]))
    assert res.x_star.dtype == torch.float16
    assert not res.diverged.any() and torch.isfinite(res.x_star).all()
    assert (res.x_star != x).any()  # the search moved


# --------------------------------------------------------------------------- metrics


LOCALISATION = [cam_precision, mass_in_mask, rank_accuracy, iou_dice]


@pytest.mark.parametrize("fn", LOCALISATION)
def test_localisation_rejects_nan_maps(fn):
    maps = torch.rand(2, 8, 8)
    maps[0, 0, 0] = float("nan")
    ann = torch.zeros(2, 8, 8)
    ann[:, 2:5, 2:5] = 1
    with pytest.raises(InputError, match="NaN/inf"):
        fn(maps, ann)


@pytest.mark.parametrize("fn", LOCALISATION)
def test_localisation_rejects_mismatched_shapes(fn):
    maps = torch.rand(2, 8, 8)
    ann = torch.zeros(2, 8, 8)
    ann[:, 2:5, 2:5] = 1
    # (1, 8, 8) used to broadcast silently: every map scored against sample 0's annotation
    for bad in (ann[:1], torch.zeros(2, 4, 4), torch.zeros(3, 8, 8)):
        with pytest.raises(InputError, match="same shape"):
            fn(maps, bad)
    ref = fn(maps, ann)  # a singleton channel axis is fine
    out = fn(maps[:, None], ann)
    for a, b in zip(out if isinstance(out, tuple) else (out,),
                    ref if isinstance(ref, tuple) else (ref,), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_deletion_runs_in_eval_mode_and_leaves_the_model_untouched():
    model = _cnn().train()
    before = _snapshot(model)
    x = torch.rand(2, 3, 16, 16)
    maps = torch.rand(2, 16, 16)
    drops = deletion_scores(model, x, maps, torch.tensor([0, 1]), fractions=(0.1,))
    _assert_untouched(model, before)
    ref = deletion_scores(model.eval(), x, maps, torch.tensor([0, 1]), fractions=(0.1,))
    torch.testing.assert_close(drops[0.1], ref[0.1])


def test_saliency_figure_maps_and_pc_features_restore_train_mode(tiny_data):
    """compute_maps (the saliency comparison figure) and the PC check's pooled_features
    called model.eval() and left a caller's train-mode model in eval mode."""
    from causalign.causal.pc import pooled_features
    from causalign.data.format import LesionDataset
    from causalign.methods import build_method
    from causalign.report.saliency import compute_maps

    model = _cnn().train()
    before = _snapshot(model)
    x = torch.rand(2, 3, 16, 16)
    maps = compute_maps(model, x, torch.tensor([0, 1]), ["gradient", "wbp"])
    _assert_untouched(model, before)
    assert maps["gradient"].shape == (2, 16, 16)
    ds = LesionDataset(tiny_data, "val")
    grey = SevenLayerCNN(ds.image_shape[0], 2, width=4).train()
    modes = [m.training for m in grey.modules()]
    feats = pooled_features(grey, build_method("erm"), ds)
    assert [m.training for m in grey.modules()] == modes
    assert feats.shape[0] == len(ds)


def test_deletion_rejects_bad_input_and_accepts_int_targets():
    model = _cnn().eval()
    x = torch.rand(2, 3, 16, 16)
    maps = torch.rand(2, 16, 16)
    t = torch.tensor([1, 1])
    with pytest.raises(InputError, match="NaN/inf"):
        deletion_scores(model, x, torch.full_like(maps, float("nan")), t)
    with pytest.raises(InputError, match=r"target classes must lie in 0\.\.1"):
        deletion_scores(model, x, maps, torch.tensor([0, 3]))
    with pytest.raises(InputError, match=r"fractions must lie in \(0, 1\]"):
        deletion_scores(model, x, maps, t, fractions=(0.0, 0.1))
    with pytest.raises(InputError, match="must be"):
        deletion_scores(model, x, torch.rand(2, 8, 8), t)
    torch.testing.assert_close(deletion_scores(model, x, maps, 1, fractions=(0.1,))[0.1],
                               deletion_scores(model, x, maps, t, fractions=(0.1,))[0.1])


def test_classification_metrics_reject_labels_outside_the_classes():
    """Label 2 with two-class probabilities used to give a silent AUC of 0.0."""
    probs = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    with pytest.raises(InputError, match=r"labels must lie in 0\.\.1"):
        classification_metrics(probs, np.array([0, 2, 2]))
    with pytest.raises(InputError, match="NaN/inf"):
        classification_metrics(np.array([[np.nan, np.nan], [0.3, 0.7]]), np.array([0, 1]))
    with pytest.raises(InputError, match="empty"):
        classification_metrics(np.zeros((0, 2)), np.zeros(0, int))
    with pytest.raises(InputError, match=r"probs \(N, classes\) and labels \(N,\)"):
        classification_metrics(probs, np.array([0, 1]))
    assert classification_metrics(probs, np.array([1, 0, 1]))["auc"] == 1.0


# --------------------------------------------------------------------------- implicit


def test_cg_rejects_unmeetable_settings_and_handles_an_empty_batch():
    def mv(p):
        return 2 * p

    b = torch.ones(2, 3)
    for tol in (-1.0, float("nan")):  # could never be met: silently "not converged"
        with pytest.raises(ValueError, match="tol must be"):
            batched_cg(mv, b, tol=tol)
    with pytest.raises(ValueError, match="x0 shape"):
        batched_cg(mv, b, x0=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="floating-point"):
        batched_cg(mv, torch.ones(2, 3, dtype=torch.long))
    empty = batched_cg(mv, torch.zeros(0, 3))
    assert empty.solution.shape == (0, 3) and empty.converged.shape == (0,)


def test_cg_convergence_claim_holds_for_the_true_residual():
    """The recursive residual keeps shrinking after the true one stalls: float32 at tol 1e-12
    reports "converged" (recursive ~1e-13) with a true residual ~1e-5. ``verify=True`` checks
    the claim; the default keeps the recursion's report (as SciPy and TorchOpt do)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    a64 = q @ torch.diag(torch.logspace(0, 3, 10, dtype=torch.float64)) @ q.T
    for dtype, tol in ((torch.float32, 1e-12), (torch.float64, 1e-12)):
        a = a64.to(dtype)
        b = torch.randn(3, 10, generator=gen, dtype=torch.float64).to(dtype)
        res = batched_cg(lambda p, a=a: p @ a, b, tol=tol, max_iter=100, verify=True)
        true = (b - res.solution @ a).norm(dim=1)
        torch.testing.assert_close(res.residual_norm, true)
        assert torch.equal(res.converged, true <= tol * b.norm(dim=1))
        assert res.converged.all() == (dtype == torch.float64)
        plain = batched_cg(lambda p, a=a: p @ a, b, tol=tol, max_iter=100)
        assert plain.converged.all()  # the recursion's claim, unchecked


def test_implicit_gradient_clear_errors():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="does not depend on x"):
        implicit_gradient(lambda u: theta.square().sum(), x, [theta], torch.ones_like(x))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        implicit_gradient(lambda u: (u - theta).square().sum(), x, [theta], torch.ones_like(x))
    assert theta.grad is None


# --------------------------------------------------------------------------- CCCE


class _Table:
    P = {(0, 0): 0.1, (1, 0): 0.5, (0, 1): 0.3, (1, 1): 0.9}

    def prob(self, a):
        return np.array([self.P[(int(r[0]), int(r[1]))] for r in a])


def test_ccce_no_effect_means_no_attribution():
    """y = 1 with every attribute already 0: every CCCE is 0, and the all-way tie used to
    name attribute 0 as the cause."""
    res = causal_attribution(_Table(), np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([1, 1]),
                             max_size=2, tol=0)
    assert res.r.tolist() == [[False, False], [True, False]]
    assert res.subset[0] == -1 and res.score[0] == 0.0


@pytest.mark.parametrize("kind", ["logistic", "frequency"])
def test_ccce_single_class_attributes_nothing(kind):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (30, 3)).astype(float)
    rep = attribution_report(a, np.ones(30, int), ["a", "b", "c"], kind=kind)
    assert rep["causal_frequency"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert rep["n_no_effect"] == 30
    # nothing attributed: the "only truly causal" fraction has no samples to speak of, and
    # the table shows the absent label as "–", not nan
    truth = {"causal_weights": {"a": 1.0, "b": 0.0, "c": 0.0}, "threshold": 0.5, "noise": 0.3}
    rep = attribution_report(a, np.ones(30, int), ["a", "b", "c"], kind=kind, truth=truth)
    assert rep["fraction_subset_only_truly_causal"] is None
    text = format_attribution_report(rep)
    assert "nan" not in text
    assert "30 sample(s) where no subset has an effect" in text
    assert "| a | 0.000 | – | 0.000 |" in text


def test_ccce_shape_errors_are_one_line():
    a = np.zeros((4, 3))
    y = np.array([0, 1, 0, 1])
    for args, match in (((a, y, ["a", "b"]), "2 attribute names for 3"),
                        ((a, y[:2], ["a", "b", "c"]), "one label per row"),
                        ((a[:, 0], y, ["a"]), "shaped"),
                        ((a, np.array([0, 1, np.nan, 1]), ["a", "b", "c"]), "binary label")):
        with pytest.raises(CausalignError, match=match):
            attribution_report(*args)
    assert math.isnan(causal_attribution(SmoothedFrequency().fit(a, y),
                                         np.full((1, 3), np.nan), np.array([1])).score[0])
