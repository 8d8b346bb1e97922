"""#3's Python API under the autograd contexts and model states PyTorch users call it in:
autocast around the training step, images that require grad (audit 2026-12-06)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.errors import InputError
from causalign.explain import CounterfactualGenerator
from causalign.implicit import implicit_gradient
from causalign.methods import build_method


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(n, 1, 16, 16)
    m[:, :, 4:10, 4:10] = 1
    return {"image": torch.rand(n, 1, 16, 16, generator=g), "label": torch.arange(n) % 2,
            "mask": m, "box_mask": m.clone(), "has_mask": torch.ones(n, dtype=torch.bool),
            "has_annotation": torch.ones(n, dtype=torch.bool), "index": torch.arange(n)}


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


# --------------------------------------------------------------------------- autocast


def test_implicit_gradient_under_autocast_is_the_float32_one():
    """A bf16 autocast around the call ran the objective, its Hessian products and the mixed
    product in bfloat16: the gradient was 9.9 % off (relative norm), silently."""
    model = _cnn().eval()
    x = _batch()["image"]
    params = list(model.parameters())
    y = torch.tensor([1, 0, 1, 0])

    def obj(u):
        return F.cross_entropy(model(u), y, reduction="sum") + 0.5 * (u - x).square().sum()

    outer = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref = implicit_gradient(obj, x, params, outer, cg_max_iter=10, damping=0.1)
    with _bf16():
        got = implicit_gradient(obj, x, params, outer, cg_max_iter=10, damping=0.1)
    assert all(g.dtype == torch.float32 for g in got.grads)
    torch.testing.assert_close(_flat(got.grads), _flat(ref.grads))


def test_counterfactual_search_under_autocast_is_the_float32_one():
    """generate() under autocast searched a bfloat16 model: x* 0.012 off per pixel."""
    model = _cnn().eval()
    b = _batch()
    gen = CounterfactualGenerator(model, steps=5)
    ref = gen.generate(b["image"], labels=b["label"])
    with _bf16():
        got = gen.generate(b["image"], labels=b["label"])
    torch.testing.assert_close(got.x_star, ref.x_star)
    torch.testing.assert_close(got.target_prob, ref.target_prob)


def _alignment_grad(autocast: bool, **kw) -> torch.Tensor:
    """dL_align/dθ of causal-align's loss (CE's gradient, taken alike, subtracted)."""
    b = _batch(8)
    model, ce_model = _cnn().train(), _cnn().train()
    method = build_method("causal-align", {"warm_start": False, **kw})
    with _bf16() if autocast else torch.autocast("cpu", enabled=False):
        out = method(model, b)
        ce = F.cross_entropy(ce_model(b["image"]), b["label"])
    total = torch.autograd.grad(out.total, list(model.parameters()))
    ce_grads = torch.autograd.grad(ce, list(ce_model.parameters()))
    return _flat([t - c for t, c in zip(total, ce_grads, strict=True)])


@pytest.mark.parametrize("optimizer", ["adam", "newton"])
def test_causal_align_loss_under_autocast_keeps_the_inner_problem_float32(optimizer):
    """A mixed-precision loop wraps `method(model, batch)` in autocast. The CE forward stays
    bf16 (the user's choice); the counterfactual search and CG ran in bf16 too: with Adam
    the alignment gradient was 13 % off the float32 one (cosine 0.992, silently), with
    inner_optimizer=newton the step failed in linalg.solve ("Expected A and B to have the
    same dtype"). bn=running: the same function in both runs (under bn=batch the inner
    problem uses the batch statistics of the bf16 forward, i.e. another function)."""
    ref = _alignment_grad(False, inner_optimizer=optimizer, steps=5, bn="running")
    got = _alignment_grad(True, inner_optimizer=optimizer, steps=5, bn="running")
    assert float((got - ref).norm() / ref.norm()) < 1e-3


# --------------------------------------------------------------------------- image grads


def test_causal_align_refuses_an_image_that_requires_grad():
    """An image that requires grad (an adversarial perturbation, a trained preprocessing)
    got only CE's gradient: its .grad equalled that of λ = 0, the alignment term's
    dependence on x missing, silently. Now one line; a detached image, a λ = 0 run and a
    call under no_grad are unaffected."""
    model = _cnn().train()
    b = _batch()
    b["image"] = b["image"].clone().requires_grad_(True)
    method = build_method("causal-align", {"steps": 2, "warm_start": False})
    with pytest.raises(InputError, match=r"batch\['image'\] requires grad.*\.detach\(\)"):
        method(model, b)
    assert all(q.grad is None for q in model.parameters())
    with torch.no_grad():
        assert not method(model, b).total.requires_grad
    out = build_method("causal-align", {"steps": 2, "lam": 0.0})(model, b)
    out.total.backward()
    assert b["image"].grad is not None
    b["image"] = b["image"].detach()
    assert torch.isfinite(method(model, b).total)


def test_causal_align_inside_inference_mode_is_refused_before_touching_state():
    """Refused only by the search, after the CE forward had updated BatchNorm's running
    statistics and the step counter had moved, in words naming generate(). Under no_grad
    the value comes back (no graph), as for any loss."""
    model = _cnn().train()
    before = [t.clone() for t in model[1].buffers()]
    method = build_method("causal-align", {"steps": 2, "warm_start": False})
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"causal-align needs "
                                                                   r"autograd.*inference_mode"):
        method(model, _batch())
    assert method.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model[1].buffers(), strict=True))
    with torch.no_grad():
        out = method(model, _batch())
    assert torch.isfinite(out.total) and not out.total.requires_grad and out.parts["align"] > 0


# --------------------------------------------------------------------------- validation


def test_causal_align_under_no_grad_leaves_the_training_state_alone():
    """A validation loss, `with torch.no_grad(): method(model, val_batch)`, wrote its
    counterfactuals into the warm-start cache under the validation indices, which the cache
    reads as training indices (validation image i's offset became training sample i's warm
    start), and moved the step counter (`align_every`'s schedule). Now the training step
    after it is the one without it, and the value is still the loss (a cold search)."""
    torch.manual_seed(0)
    train_b, val_b = _batch(4), _batch(4)
    val_b["image"] = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(7))

    def run(with_validation: bool):
        model = _cnn().train()
        method = build_method("causal-align", {"steps": 3, "align_every": 2})
        method(model, train_b).total.backward()  # fills the cache for indices 0..3
        if with_validation:
            with torch.no_grad():
                val = method(model, val_b)
            assert torch.isfinite(val.total) and val.parts["align"] > 0
            assert val.parts["cf_warm"] == 0  # no training sample's offset reused
        step, rows = method.step, method.cache.offsets.clone()
        model.zero_grad()
        method(model, train_b)  # step 1: no alignment (align_every 2)
        out = method(model, train_b)  # step 2: aligns, warm from step 0's offsets
        out.total.backward()
        return step, rows, out, [q.grad.clone() for q in model.parameters()]

    step_a, rows_a, out_a, grads_a = run(False)
    step_b, rows_b, out_b, grads_b = run(True)
    assert step_b == step_a == 1
    assert torch.equal(rows_b, rows_a)
    assert out_b.parts == out_a.parts
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
