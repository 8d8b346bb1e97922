"""A step whose CG runs out of the *auto* iteration cap is solved by the Gauss-Newton system.

The auto cap (3 for binary) assumes a piecewise-linear classifier, where the preconditioned
system is identity + a rank-1 term. On a smooth classifier (a tanh MLP here) CG met no
negative curvature but missed the tolerance on every step, and every sample was dropped: the
alignment term was silently zero (in a user's own loop only `out.parts` showed it).
"""

from __future__ import annotations

import torch
from torch import nn

from causalign.methods import build_method


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 1, 16, 16, generator=g)
    mask = torch.zeros_like(x)
    mask[..., 4:10, 4:10] = 1
    ones = torch.ones(8, dtype=torch.bool)
    return {"image": x, "label": torch.tensor([0, 1] * 4), "mask": mask, "box_mask": mask,
            "has_mask": ones, "has_annotation": ones, "index": torch.arange(8)}


def _tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.Tanh(), nn.Linear(32, 2))


def _alignment_grad(model: nn.Module, batch: dict, **params) -> tuple[torch.Tensor, dict]:
    """dL_align/dθ alone (the λ = 1 gradient minus the λ = 0 one) and the λ = 1 parts."""
    grads, parts = [], {}
    for lam in (1.0, 0.0):
        method = build_method("causal-align", {**params, "lam": lam, "warm_start": False})
        model.zero_grad(set_to_none=True)
        out = method(model, batch)
        out.total.backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
        parts = parts or dict(out.parts)
    return grads[0] - grads[1], parts


def test_a_smooth_classifier_is_not_silently_left_unaligned():
    model, batch = _tanh_mlp(2), _batch(2)
    grad, parts = _alignment_grad(model, batch)
    assert float(parts["cg_dropped"]) == 0.0  # was 1.0: every sample dropped
    assert float(parts["gn_fallback"]) == 1.0
    assert float(grad.norm()) > 0
    # against a tight CG solve of the exact Hessian (it meets no negative curvature on this
    # seed, so no fallback there): the Gauss-Newton gradient points the same way
    ref, ref_parts = _alignment_grad(model, batch, cg_iters=300, cg_tol=1e-7)
    assert float(ref_parts["gn_fallback"]) == 0.0 and float(ref_parts["cg_converged"]) == 1.0
    assert float(torch.nn.functional.cosine_similarity(grad, ref, 0)) > 0.95


def test_a_cap_the_user_set_is_kept():
    # an explicit cg_iters is what a solver sweep measures: its misses stay dropped samples
    _, parts = _alignment_grad(_tanh_mlp(2), _batch(2), cg_iters=3)
    assert float(parts["cg_dropped"]) == 1.0
    assert float(parts["gn_fallback"]) == 0.0


def test_a_piecewise_linear_classifier_still_solves_by_cg():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    _, parts = _alignment_grad(model, _batch(0))
    assert float(parts["cg_converged"]) == 1.0
    assert float(parts["gn_fallback"]) == 0.0


def test_under_damping_a_smooth_classifier_raises_the_damping_instead():
    # negative_curvature=damping never takes the Gauss-Newton solve: a step missing the auto
    # cap raised nothing before and dropped every sample (a zero alignment term)
    model, batch = _tanh_mlp(2), _batch(2)
    grad, parts = _alignment_grad(model, batch, negative_curvature="damping")
    assert float(parts["cg_dropped"]) == 0.0  # was 1.0
    assert float(parts["gn_fallback"]) == 0.0
    assert float(parts["damping"]) > 0.01  # raised from the default, and recorded
    ref, ref_parts = _alignment_grad(model, batch, cg_iters=300, cg_tol=1e-7)
    assert float(ref_parts["gn_fallback"]) == 0.0 and float(ref_parts["cg_converged"]) == 1.0
    assert float(torch.nn.functional.cosine_similarity(grad, ref, 0)) > 0.95


def test_under_damping_a_cap_the_user_set_is_kept():
    _, parts = _alignment_grad(_tanh_mlp(2), _batch(2), negative_curvature="damping",
                               cg_iters=3)
    assert float(parts["cg_dropped"]) == 1.0
    assert float(parts["damping"]) == 0.01
