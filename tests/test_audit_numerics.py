"""Audit of causal-align's handling of non-finite inner solves (issue 3: "a diverging inner
solve (NaN/inf) or a CG that does not converge is detected, counted in history.csv and
handled (that sample's term skipped)").

* one sample whose inner objective is NaN at x* dropped the alignment gradient of the whole
  batch (cg_dropped = every aligned sample), not that sample's term;
* a NaN/inf Hessian-vector product was taken for negative curvature: under
  negative_curvature=damping it raised δ to damping_max for the rest of the run, under
  gauss-newton it counted towards gn_switch (a permanent switch after three);
* history.csv's failure shares were averaged over steps weighted by the batch size, not by
  the aligned samples they are shares of.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import causalign.explain.counterfactual as CF
import causalign.methods.causal_align as CA
from causalign.engine.trainer import _accumulate, _epoch_means
from causalign.implicit.cg import batched_cg
from causalign.methods.base import build_method


class TinyCNN(nn.Module):
    """Piecewise-linear, BatchNorm-free: the inner problem needs no batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    return {"image": torch.rand(n, 1, 8, 8, generator=g),
            "label": torch.arange(n) % 2, "mask": mask,
            "has_mask": torch.ones(n, dtype=torch.bool),
            "box_mask": mask.clone(), "has_annotation": torch.ones(n, dtype=torch.bool)}


def _method(**args):
    m = build_method("causal-align", {"align_batch": 0, "warm_start": False, "steps": 5,
                                      **args})
    m.require_region = False
    return m


@pytest.fixture
def poison(monkeypatch):
    """Make T (value and derivatives, through the model) NaN for the sample whose x0 equals
    ``state["x0"]``, only while the implicit step runs (the search itself stays finite)."""
    state: dict = {"x0": None, "on": False, "terms_only": False}
    orig_fit, orig_implicit = CF.InnerProblem.fit, CA.CausalAlign._implicit

    def fit(self, u):
        ce, logits = orig_fit(self, u)
        if state["on"] and state["x0"] is not None:
            hit = (self.x0 == state["x0"]).flatten(1).all(1)
            if bool(hit.any()):
                nan = torch.where(hit, math.nan, 0.0).to(ce)
                ce = ce + nan * logits.square().sum(1)  # NaN in every derivative
        return ce, logits

    def implicit(self, model, res, *a, **k):
        state["on"] = True
        try:
            return orig_implicit(self, model, res, *a, **k)
        finally:
            state["on"] = False

    monkeypatch.setattr(CF.InnerProblem, "fit", fit)
    monkeypatch.setattr(CA.CausalAlign, "_implicit", implicit)
    return state


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("args", [{}, {"hvp": "gauss-newton"},
                                  {"negative_curvature": "damping"}])
def test_one_nonfinite_sample_drops_only_itself(poison, args):
    torch.manual_seed(0)
    model = TinyCNN()
    batch = _batch(6)
    # reference: the same step without the poisoned sample 0 (ids keep the search alike)
    clean = {k: v[1:] for k, v in batch.items()}
    ref_method = _method(**args)
    model.zero_grad()
    out_ref = ref_method(model, clean)
    out_ref.total.backward()
    ce_ref = nn.functional.cross_entropy(model(clean["image"]), clean["label"])
    g_ce = torch.autograd.grad(ce_ref, list(model.parameters()))
    align_ref = _grads(model) - torch.cat([g.flatten() for g in g_ce])

    poison["x0"] = batch["image"][0].clone()
    method = _method(**args)
    model.zero_grad()
    out = method(model, batch)
    assert math.isfinite(float(out.total.detach()))
    out.total.backward()
    ce = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    g_ce = torch.autograd.grad(ce, list(model.parameters()))
    align = _grads(model) - torch.cat([g.flatten() for g in g_ce])
    assert torch.isfinite(align).all()
    # exactly the one poisoned sample is dropped, not the batch
    assert out.parts["cg_dropped"] == pytest.approx(1 / 6)
    assert out.parts["cf_diverged"] == 0.0
    # and the others' alignment gradient is the clean one (the mean still runs over the 6
    # samples that did not diverge, hence 5/6)
    cos = torch.nn.functional.cosine_similarity(align, align_ref, dim=0)
    assert float(cos) > 0.999
    assert float(align.norm()) == pytest.approx(float(align_ref.norm()) * 5 / 6, rel=1e-3)


def _poison_products(monkeypatch, row: int = 0):
    """NaN Hessian-vector products (only) for one sample during the implicit step."""
    orig_terms, orig_implicit = CF.InnerProblem.terms, CA.CausalAlign._implicit
    state = {"on": False}

    def terms(self, u):
        t, logits = orig_terms(self, u)
        if state["on"]:
            extra = torch.zeros_like(t)
            extra[row] = math.nan * (u[row] - self.u0[row]).square().sum()
            t = t + extra
        return t, logits

    def implicit(self, *a, **k):
        state["on"] = True
        try:
            return orig_implicit(self, *a, **k)
        finally:
            state["on"] = False

    monkeypatch.setattr(CF.InnerProblem, "terms", terms)
    monkeypatch.setattr(CA.CausalAlign, "_implicit", implicit)


def test_nan_product_does_not_raise_damping(monkeypatch):
    _poison_products(monkeypatch)
    torch.manual_seed(0)
    model = TinyCNN()
    method = _method(negative_curvature="damping")
    out = method(model, _batch(6))
    # the NaN sample is dropped; δ is no remedy for NaN and must stay for later steps
    assert out.parts["cg_dropped"] == pytest.approx(1 / 6)
    assert out.parts["damping"] == pytest.approx(method.params.damping)
    assert method.damping == pytest.approx(method.params.damping)


def test_nan_product_is_no_gauss_newton_fallback(monkeypatch):
    _poison_products(monkeypatch)
    torch.manual_seed(0)
    model = TinyCNN()
    method = _method()
    for seed in range(3):
        out = method(model, _batch(6, seed))
        assert out.parts["gn_fallback"] == 0.0
        assert out.parts["cg_dropped"] == pytest.approx(1 / 6)
    assert method.gn_streak == 0 and not method.gn_switched


def test_cg_tells_nonfinite_from_negative_curvature():
    a = torch.tensor([1.0, -1.0, 2.0])

    def matvec(p):
        out = a[:, None] * p
        out[0] = math.nan
        return out

    res = batched_cg(matvec, torch.ones(3, 4), max_iter=5, tol=1e-6)
    assert res.breakdown.tolist() == [True, True, False]
    assert res.nonfinite.tolist() == [True, False, False]


def test_history_share_is_of_aligned_samples():
    """Step 1: 4 aligned, all diverged; step 2: 4 aligned... shares weighted by the aligned
    samples, not the batch: 4 of 8 diverged over two steps of 16 images is 0.5, and 4 of 20
    over steps aligning 4 and 16 is 0.2 (the batch-weighted mean read 0.5)."""
    sums: dict = {}
    weights: dict = {}
    t = torch.tensor(0.0)
    _accumulate(sums, weights, t, {"cf_diverged": 1.0}, 16, {"cf_diverged": 4})
    _accumulate(sums, weights, t, {"cf_diverged": 0.0}, 16, {"cf_diverged": 16})
    assert _epoch_means(sums, weights)["train_cf_diverged"] == pytest.approx(0.2)


def test_causal_align_reports_share_weights():
    torch.manual_seed(0)
    model = TinyCNN()
    batch = _batch(6)
    batch["has_mask"][:2] = False  # 4 of 6 aligned
    out = _method()(model, batch)
    assert out.parts["n_align"] == 4
    assert out.part_weights["cf_diverged"] == 4
    assert out.part_weights["cg_dropped"] == 4
    assert out.part_weights["cg_converged"] == 4
