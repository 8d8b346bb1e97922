"""The forms of model and batch a PyTorch user brings to causal-align, the counterfactual
generator and the implicit library from their own training loop: a torch.compile'd model,
a parametrized weight, labels outside the model's classes, a list of dataset indices. Each
either gives the plain model's result or fails in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

from causalign.errors import InputError
from causalign.explain import CounterfactualGenerator
from causalign.implicit import implicit_argmin, implicit_gradient
from causalign.methods import build_method


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _batch(n: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, 1, size, size)
    mask[..., 4:10, 4:10] = 1
    flags = torch.ones(n, dtype=torch.bool)
    return {"image": torch.rand(n, 1, size, size, generator=g), "label": torch.arange(n) % 2,
            "mask": mask, "box_mask": mask.clone(), "has_mask": flags,
            "has_annotation": flags.clone(), "index": torch.arange(n)}


def _grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out = build_method("causal-align", {"steps": 3})(model, batch)
    return out.total, torch.autograd.grad(out.total, list(model.parameters()))


def test_compiled_model_gets_the_plain_models_alignment_gradient():
    """Through a torch.compile'd model (backend eager) the loss was right but the alignment
    gradient was off by 1.8e-2 (its largest entry 0.14): the lean double-backward nodes of
    the inner problem's eval_mode were traced into the compiled graph. Inductor failed in
    AOTAutograd ("donated buffers ... create_graph=False")."""
    batch = _batch()
    model = _net().train()
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    x, y = batch["image"], batch["label"]
    res = CounterfactualGenerator(compiled, steps=3).generate(x, labels=y)
    ref = CounterfactualGenerator(model, steps=3).generate(x, labels=y)
    torch.testing.assert_close(res.x_star, ref.x_star)
    total, grads = _grads(model, batch)
    total_c, grads_c = _grads(compiled, batch)
    torch.testing.assert_close(total_c, total)
    for a, b in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert compiled.training


@pytest.mark.parametrize("method", ["erm", "causal-align"])
def test_labels_outside_the_models_classes_are_refused(method):
    """Label 5 for a 2-class model failed in cross_entropy ("Target 5 is out of bounds", a
    device-side assert on CUDA); -100 (cross_entropy's ignore_index) trained ERM on the rest
    silently and made causal-align name a y* of 101."""
    batch = _batch()
    with pytest.raises(InputError, match=r"batch\['label'\] holds class 5, but Sequential "
                                         r"returns 2 logits"):
        build_method(method)(_net(), dict(batch, label=torch.tensor([0, 1, 5, 1])))
    with pytest.raises(InputError, match=r"batch\['label'\] must hold class indices >= 0, "
                                         r"got -100"):
        build_method(method)(_net(), dict(batch, label=torch.tensor([0, 1, -100, 1])))


def test_dataset_indices_that_are_not_a_tensor_are_refused():
    """A list under 'index' failed in causal-align with a TypeError ("only integer tensors
    of a single element can be converted to an index")."""
    batch = _batch()
    with pytest.raises(InputError, match=r"batch\['index'\] .* must be a tensor of shape "
                                         r"\(4,\), got list"):
        build_method("causal-align")(_net(), dict(batch, index=[0, 1, 2, 3]))


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


def test_a_parametrized_weight_passed_as_a_param_is_refused():
    """A parametrized module's .weight is recomputed on every access: passed as a param it
    never appears in the objective's graph, and its gradient came back all zero, silently
    (implicit_gradient and implicit_argmin alike). model.parameters() (the original) is
    right: twice the plain weight's gradient for w = 2·original."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 2)).eval()
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 6, 6)
    y = torch.tensor([1, 0, 1])
    plain = copy.deepcopy(model)
    parametrize.register_parametrization(model[0], "weight", _Double())

    def inner_of(m: nn.Module):
        return lambda u: F.cross_entropy(m(u), y, reduction="sum") + 0.5 * (u - x0).square().sum()

    opts = dict(cg_tol=1e-8, cg_max_iter=50, damping=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] is a computed tensor that "
                                         r"inner_objective does not use"):
        implicit_gradient(inner_of(model), x0, [model[0].weight], torch.ones_like(x0), **opts)
    x_star = implicit_argmin(inner_of(model), x0, [model[0].weight], **opts)
    with pytest.raises(ValueError, match=r"computed tensor"):
        x_star.sum().backward()
    original = model[0].parametrizations.weight.original
    (g,) = implicit_gradient(inner_of(model), x0, [original], torch.ones_like(x0), **opts).grads
    (ref,) = implicit_gradient(inner_of(plain), x0, [plain[0].weight], torch.ones_like(x0),
                               **opts).grads
    torch.testing.assert_close(g, 2 * ref)


def test_a_dict_output_is_named_by_the_generator():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    with pytest.raises(InputError, match=r"got outputs as a dict for 4 inputs"):
        CounterfactualGenerator(DictOut().eval()).generate(_batch()["image"])


def test_an_objective_free_of_every_param_gives_zeros_also_for_computed_params():
    """The refusal above is for an objective that depends on θ through other tensors; one
    that depends on none (no sample aligned, say) has a zero gradient for every param."""
    theta = torch.randn(3, requires_grad=True)
    a = theta.exp()  # computed, unused by the objective
    x0 = torch.rand(2, 3)
    res = implicit_gradient(lambda u: 0.5 * (u - x0).square().sum(), x0, [theta, a],
                            torch.ones_like(x0), cg_tol=1e-8, cg_max_iter=10)
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(res.grads, [theta, a],
                                                                     strict=True))
