"""causal-align: implicit gradient of L_align against finite differences, masks, config, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.errors import ConfigError
from causalign.explain.counterfactual import CounterfactualResult, InnerProblem, eval_mode
from causalign.methods import build_method
from causalign.methods.base import resolved_params
from causalign.models.autoencoder import ConvAutoencoder

DT = torch.float64


def _tiny_model(seed: int = 0) -> nn.Module:
    """Piecewise-linear net with BatchNorm (eval statistics set to non-trivial values)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 2)).to(DT)
    bn = model[2]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.train()  # train mode on purpose: the method must switch to eval itself


def _newton(prob: InnerProblem, u: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """x* to machine precision: Newton with exact per-sample Hessians (tiny dims)."""
    n, d = u.shape[0], u[0].numel()
    for _ in range(iters):
        uu = u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(prob.objective(uu).sum(), uu, create_graph=True)
        if g.abs().max() < 1e-13:
            break
        cols = []
        for j in range(d):
            e = torch.zeros(n, d, dtype=u.dtype)
            e[:, j] = 1.0
            (hj,) = torch.autograd.grad(g, uu, e.reshape(u.shape), retain_graph=True)
            cols.append(hj.reshape(n, d))
        h = torch.stack(cols, 2)
        u = u.detach() - torch.linalg.solve(h, g.detach().reshape(n, d)).reshape(u.shape)
    return u.detach()


def _solve(method, model, x0, target):
    gen = method.generator(model)
    with eval_mode(model, fold_bn=True):
        prob = gen.problem(x0, target)
        u = _newton(prob, prob.u0.clone())
        x_star = prob.image(u).detach()
    zeros = torch.zeros(len(x0), dtype=torch.bool)
    return CounterfactualResult(x_star=x_star, u_star=u, target=target, diverged=zeros,
                                warm=zeros, distance=torch.zeros(len(x0)), problem=prob)


def _align(res, region):
    return (((res.x_star - res.problem.x0) * (1 - region)).abs().flatten(1).sum(1)).mean()


def _case(space: str):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 4, 4, generator=gen, dtype=DT)
    region = torch.zeros(3, 1, 4, 4, dtype=DT)
    region[:, :, 1:3, 1:3] = 1.0
    target = torch.tensor([1, 0, 1])
    model = _tiny_model()
    args = dict(distance="l2", alpha=0.5, damping=0.0, cg_iters=60, cg_tol=1e-13, space=space,
                normalize="none")
    method = build_method("causal-align", args)
    if space == "latent":
        method.params.alpha = 0.05  # the code is 3-dim: a weaker pull keeps x* − x0 visible
        torch.manual_seed(0)
        ae = ConvAutoencoder(1, width=4, latent_channels=3).to(DT).eval().requires_grad_(False)
        with torch.no_grad():  # a random decoder is nearly flat; steepen it
            for mod in ae.decoder:
                if hasattr(mod, "weight"):
                    mod.weight.mul_(3.0)
        # Smooth activations: with ReLU kinks in the decoder the minimiser can sit on a kink,
        # where ∇T = 0 has no solution and neither the IFT nor finite differences apply.
        for i, mod in enumerate(ae.decoder):
            if isinstance(mod, nn.ReLU):
                ae.decoder[i] = nn.Tanh()
        method.autoencoder = ae
    if space == "smooth":
        method.params.smooth_sigma = 0.7  # at 4×4 pixels a wider blur would be nearly flat
    return model, method, x0, region, target


def _fd(model, method, x0, region, target, eps=1e-6):
    params = [p for p in model.parameters()]
    out = []
    for p in params:
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = flat[j].item()
            vals = []
            for s in (1, -1):
                flat[j] = old + s * eps
                vals.append(_align(_solve(method, model, x0, target), region).item())
            flat[j] = old
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=DT)


@pytest.fixture(scope="module", params=["pixel", "latent", "smooth"])
def fd_case(request):
    model, method, x0, region, target = _case(request.param)
    return request.param, model, method, x0, region, target, _fd(model, method, x0, region,
                                                                 target)


@pytest.mark.parametrize("variant", [dict(), dict(precondition=False),
                                     dict(hvp="finite-difference", fd_eps=1e-5)])
def test_implicit_gradient_of_alignment_matches_finite_differences(fd_case, variant,
                                                                   monkeypatch):
    space, model, method, x0, region, target, fd = fd_case
    # fd_case's method is shared by the variants: a plain setattr left precondition=False on
    # for the variants after it (and, shuffled, hvp="finite-difference" on for the default one)
    for k, v in variant.items():
        monkeypatch.setattr(method.params, k, v)
    assert (method.params.precondition, method.params.hvp) == (
        variant.get("precondition", True), variant.get("hvp", "exact"))
    res = _solve(method, model, x0, target)
    model.zero_grad(set_to_none=True)
    term, stats = method.implicit_term(model, res, region)
    assert term.item() == pytest.approx(_align(res, region).item())
    term.backward()
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    cos = F.cosine_similarity(ours, fd, dim=0).item()
    rel = ((ours - fd).norm() / fd.norm()).item()
    assert fd.norm() > 1e-3
    assert cos >= 0.99, (space, variant, cos, rel)
    assert rel < 1e-3, (space, variant, cos, rel)
    assert stats["cg_converged"] == 1.0 and stats["cg_dropped"] == 0.0
    # the finite-difference products themselves solved it (no Gauss-Newton fallback, which
    # would pass this test with the exact gradient whatever the differences gave)
    assert stats["gn_fallback"] == 0.0 and stats.get("fd_fallback", 0.0) == 0.0
    assert model.training  # the implicit step restored the caller's mode


# --------------------------------------------------------------------------- training step


def _batch(n: int = 4, size: int = 16, has_mask=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 4: size // 2, size // 4: size // 2] = 1.0
    has = torch.ones(n, dtype=torch.bool) if has_mask is None else torch.tensor(has_mask)
    return {"image": x, "label": torch.arange(n) % 2, "mask": mask, "has_mask": has,
            "box_mask": mask, "has_annotation": has, "index": torch.arange(n)}


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)).train()


def _grads(model: nn.Module, total: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    total.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _ce_grad(model: nn.Module, batch: dict) -> torch.Tensor:
    return _grads(model, F.cross_entropy(model(batch["image"]), batch["label"]))


FAST = dict(steps=3, cg_iters=3, warm_start=False)


def test_no_masks_no_alignment_term():
    model = _small_cnn()
    batch = _batch(has_mask=[False] * 4)
    method = build_method("causal-align", FAST)
    out = method(model, batch)
    assert out.parts["n_align"] == 0.0 and "align" not in out.parts
    torch.testing.assert_close(_grads(model, out.total), _ce_grad(model, batch))
    # Only annotated samples enter; the term then changes the gradient.
    batch = _batch(has_mask=[True, False, True, False])
    out = method(model, batch)
    assert out.parts["n_align"] == 2.0 and out.parts["align"] > 0
    g = _grads(model, out.total)
    assert torch.isfinite(g).all() and not torch.allclose(g, _ce_grad(model, batch))


def test_align_on_positive_aligns_only_non_zero_labels():
    model = _small_cnn()
    batch = _batch(n=6, has_mask=[True, True, True, True, False, True])  # labels 0,1,0,1,0,1
    seen = []
    method = build_method("causal-align", dict(FAST, align_on="positive"))
    original = method.alignment

    def recording(m, x, target, region, ids, **kw):
        seen.append(ids.clone())
        return original(m, x, target, region, ids, **kw)

    method.alignment = recording
    out = method(model, batch)
    assert seen[0].tolist() == [1, 3, 5] and out.parts["n_align"] == 3.0
    negatives = {k: v[batch["label"] == 0] for k, v in batch.items()}
    out = method(model, negatives)
    assert out.parts["n_align"] == 0.0 and "align" not in out.parts
    with pytest.raises(ConfigError, match="method.align_on must be all or positive"):
        build_method("causal-align", {"align_on": "negative"})


def test_predicted_target_flips_the_models_decision_not_the_label():
    model = _small_cnn()
    batch = _batch(n=6)
    with torch.no_grad():
        predicted = model(batch["image"]).argmax(1)
    seen = []
    for rule in ("other", "predicted"):
        method = build_method("causal-align", dict(FAST, target=rule))
        original = method.alignment

        def recording(m, x, target, region, ids, _orig=original, **kw):
            seen.append(target.clone())
            return _orig(m, x, target, region, ids, **kw)

        method.alignment = recording
        method(model, batch)
    assert seen[0].tolist() == (1 - batch["label"]).tolist()
    assert seen[1].tolist() == (1 - predicted).tolist()
    assert seen[0].tolist() != seen[1].tolist()  # this batch has misclassified samples
    with pytest.raises(ConfigError, match="method.target must be 'other', 'predicted'"):
        build_method("causal-align", {"target": "nearest"})


def test_align_every_n_steps_and_align_batch():
    model = _small_cnn()
    batch = _batch(n=6)
    method = build_method("causal-align", dict(FAST, align_every=2, align_batch=3))
    flags = [method(model, batch).parts for _ in range(3)]
    assert [p["align_step"] for p in flags] == [1.0, 0.0, 1.0]
    assert flags[0]["n_align"] == 3.0  # align_batch caps the aligned samples
    assert "n_align" not in flags[1]


def test_align_every_beyond_an_epoch_is_warned(tiny_data, tmp_path):
    # 48 training images in batches of 16: 3 steps an epoch. align_every=4 over 3 epochs
    # aligns on steps 0, 4, 8: every epoch has one; align_every=5 on steps 0 and 5 only
    import warnings

    from causalign.engine.config import TrainConfig
    from causalign.engine.trainer import train

    def run(every, name):
        cfg = TrainConfig(method="causal-align", epochs=3, batch_size=16, width=4, threads=1,
                          method_args=dict(FAST, align_every=every))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(tiny_data, cfg, tmp_path / name, progress=False)
        return [str(w.message) for w in seen if "align_every" in str(w.message)]

    assert run(4, "a") == []
    (msg,) = run(5, "b")
    assert "method.align_every=5 is more than the 3 steps of an epoch: 1 of the 3 epochs " \
        "have no alignment step" in msg


def test_batch_statistics_are_gathered_only_on_steps_that_align(monkeypatch):
    """bn=batch captures each BatchNorm's batch statistics for the inner problem; a step that
    does not align (align_every), or bn=running, must not pay for it."""
    import causalign.methods.causal_align as ca
    from causalign.explain.counterfactual import capture_bn_stats

    calls = []

    def counting(model):
        calls.append(1)
        return capture_bn_stats(model)

    monkeypatch.setattr(ca, "capture_bn_stats", counting)
    model, batch = _small_cnn(), _batch(n=4)
    method = build_method("causal-align", dict(FAST, align_every=2))
    steps = [method(model, batch).parts["align_step"] for _ in range(4)]
    assert steps == [1.0, 0.0, 1.0, 0.0] and len(calls) == 2
    calls.clear()
    method = build_method("causal-align", dict(FAST, bn="running"))
    method(model, batch)
    assert calls == []


def test_alignment_takes_the_batch_statistics_as_an_argument():
    """`alignment(bn_stats=…)` is what `loss` uses under bn=batch: the same L_align value
    as the step's, and a different one under running statistics (None)."""
    from causalign.explain.counterfactual import capture_bn_stats

    model, batch = _small_cnn(), _batch(n=4)
    with torch.no_grad():  # running statistics far from this batch's
        model[1].running_mean.fill_(3.0)
    parts = build_method("causal-align", FAST)(model, batch).parts
    x, y = batch["image"], batch["label"]
    with torch.no_grad(), capture_bn_stats(model) as stats:
        model(x)
    args = (model, x, 1 - y, batch["mask"], None)
    with_batch, _ = build_method("causal-align", FAST).alignment(*args, bn_stats=stats)
    running, _ = build_method("causal-align", FAST).alignment(*args)
    assert float(with_batch.detach()) == pytest.approx(parts["align"], rel=1e-5)
    assert abs(float(running.detach()) - parts["align"]) > 1e-3


def test_balance_caps_the_alignment_gradient_norm():
    """balance = ρ: ‖λ·dL_align/dθ‖ ≤ ρ·‖∇CE‖, same direction as without the cap."""
    batch = _batch(n=4)
    grads = {}
    for rho in (0.0, 0.05):
        model = _small_cnn()
        method = build_method("causal-align", dict(FAST, lam=2.0, balance=rho))
        out = method(model, batch)
        g_ce = _ce_grad(model, batch)
        grads[rho] = (_grads(model, out.total) - g_ce, g_ce, out.parts)
    free, g_ce, parts = grads[0.0]
    capped, _, capped_parts = grads[0.05]
    assert "align_grad_scale" not in parts
    assert free.norm() > 0.05 * g_ce.norm()  # the cap binds on this batch
    assert 0 < capped_parts["align_grad_scale"] < 1
    torch.testing.assert_close(capped.norm(), 0.05 * g_ce.norm(), rtol=1e-3, atol=1e-7)
    assert F.cosine_similarity(capped, free, 0) > 0.999


class _NaNWhenMoved(nn.Module):
    """Sample 0's logits turn NaN as soon as its input leaves x0 (a diverging inner solve)."""

    def __init__(self, model: nn.Module, x0: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x0 = model, x0

    def forward(self, x):
        out = self.model(x)
        if x.shape == self.x0.shape and not torch.equal(x[0], self.x0[0]):
            bad = torch.zeros_like(out)
            bad[0] = float("nan")
            out = out + bad
        return out


def test_diverged_counterfactual_is_skipped_and_counted():
    batch = _batch()
    model = _NaNWhenMoved(_small_cnn(), batch["image"])
    # Running BatchNorm statistics: the inner problem does not depend on the batch's others.
    method = build_method("causal-align", dict(FAST, bn="running"))
    out = method(model, batch)
    assert out.parts["cf_diverged"] == 0.25 and out.parts["n_align"] == 4.0
    g = _grads(model, out.total)
    assert torch.isfinite(out.total) and torch.isfinite(g).all()
    # The term is the other three samples' Eq. 3: dropping sample 0 changes nothing else.
    ref = build_method("causal-align", dict(FAST, bn="running"))
    sub = {k: v[1:] for k, v in batch.items()}
    _, stats = ref.alignment(model.model, sub["image"], 1 - sub["label"], sub["mask"], None)
    assert out.parts["align"] == pytest.approx(stats["align"], rel=1e-4)


def test_a_step_whose_every_search_diverged_reports_no_solve_figures():
    """Every counterfactual diverged: nothing was solved, so the step reports no L_align, CG
    convergence or iteration count (history.csv averages a part over the steps that report
    it). It reported cg_converged 0 and align 0, which pulled the epoch's means down as if
    CG had failed. The shares of all aligned samples stay (none flipped, none dropped), as
    on a step where only some diverged, so data-parallel chunks average like one process."""
    sub = _batch(n=1)
    model = _NaNWhenMoved(_small_cnn(), sub["image"])
    method = build_method("causal-align", dict(FAST, bn="running"))
    out = method(model, sub)
    assert out.parts["cf_diverged"] == 1.0 and out.parts["n_align"] == 1.0
    assert out.parts["flip_rate"] == 0.0 and out.parts["cg_dropped"] == 0.0
    for key in ("align", "cg_converged", "cg_iters"):
        assert key not in out.parts, key
    torch.testing.assert_close(_grads(model, out.total), _ce_grad(model.model, sub))


# ------------------------------------------------------- gaps found by a mutation audit


def test_a_diverged_samples_absence_leaves_the_others_gradient_unscaled():
    """The term is the mean over the samples that did not diverge: its gradient is the
    three clean samples' alignment gradient, not 3/4 of it (∇L_align divided by all n)."""
    import copy

    batch = _batch()
    model = _NaNWhenMoved(_small_cnn(), batch["image"])
    out = build_method("causal-align", dict(FAST, bn="running"))(model, batch)
    # the running statistics the step's inner problem used (a later train-mode forward
    # moves them)
    at_step = copy.deepcopy(model.model)
    g_align = _grads(model.model, out.total) - _ce_grad(model.model, batch)
    ref = build_method("causal-align", dict(FAST, bn="running"))
    sub = {k: v[1:] for k, v in batch.items()}
    term, _ = ref.alignment(at_step, sub["image"], 1 - sub["label"], sub["mask"], None)
    torch.testing.assert_close(g_align, _grads(at_step, term), rtol=1e-4, atol=1e-7)


def test_a_balance_that_does_not_bind_leaves_the_gradient_alone():
    # the cap only ever shrinks: min(1, ρ‖∇CE‖/‖∇L_align‖), never a factor above 1
    batch = _batch(n=4)
    grads = {}
    for rho in (0.0, 1e6):
        model = _small_cnn()
        out = build_method("causal-align", dict(FAST, balance=rho))(model, batch)
        grads[rho] = (_grads(model, out.total), out.parts)
    assert grads[1e6][1]["align_grad_scale"] == 1.0
    torch.testing.assert_close(grads[1e6][0], grads[0.0][0])


def test_a_callable_grad_cap_scales_the_alignment_gradient():
    # the data-parallel balance passes a function of (gradient, samples) giving the factor
    batch = _batch(n=4)
    model = _small_cnn()
    method = build_method("causal-align", dict(FAST, bn="running"))
    x, y, m = batch["image"], 1 - batch["label"], batch["mask"]
    seen = []

    def half(g, k):
        seen.append(k)
        return 0.5

    full, _ = method.alignment(model, x, y, m, None)
    capped, stats = method.alignment(model, x, y, m, None, grad_cap=half)
    assert seen == [4] and stats["align_grad_scale"] == 0.5
    torch.testing.assert_close(_grads(model, capped), 0.5 * _grads(model, full))


def test_damping_escalates_tenfold_until_cg_solves_the_step(monkeypatch):
    """negative_curvature=damping: δ × 10 per retry (from 0.01), capped at damping_max, until
    CG meets no negative curvature."""
    import causalign.methods.causal_align as ca
    from causalign.models import MultiViewCNN

    tried = []
    real = ca.implicit_gradient

    def recording(*args, **kw):
        out = real(*args, **kw)
        if kw.get("cg_x0") is None:  # not the re-solve without dropped samples
            tried.append((kw["damping"], bool(out.cg.breakdown.any())))
        return out

    monkeypatch.setattr(ca, "implicit_gradient", recording)
    torch.manual_seed(0)
    model = MultiViewCNN(1, 2, width=4).train()
    method = build_method("causal-align", dict(FAST, negative_curvature="damping",
                                               precondition=False, damping_max=50.0))
    out = method(model, _volume_batch())
    deltas = [d for d, _ in tried]
    assert deltas[0] == 0.01 and len(deltas) >= 2  # multiview breaks CG at δ = 0.01
    for a, b in zip(deltas, deltas[1:], strict=False):
        assert b == pytest.approx(min(10 * a, 50.0))
    assert all(broke for _, broke in tried[:-1])  # retried only after a breakdown
    assert not tried[-1][1] or deltas[-1] == 50.0
    assert out.parts["damping"] == pytest.approx(deltas[-1]) == method.damping


def test_a_failed_re_solve_drops_the_alignment_gradient(monkeypatch):
    """A sample CG fails is dropped and the step solved again without it; when that re-solve
    fails too, the step has no alignment gradient (it was used anyway)."""
    import dataclasses

    import causalign.methods.causal_align as ca

    real = ca.implicit_gradient
    calls = []

    def failing(*args, **kw):
        out = real(*args, **kw)
        calls.append(kw.get("cg_x0") is not None)
        bad = 0 if len(calls) == 1 else 1  # the solve fails sample 0, its re-solve sample 1
        converged = out.cg.converged.clone()
        converged[bad] = False
        return dataclasses.replace(out, cg=dataclasses.replace(out.cg, converged=converged))

    monkeypatch.setattr(ca, "implicit_gradient", failing)
    model = _small_cnn()
    batch = _batch()
    out = build_method("causal-align", FAST)(model, batch)
    assert calls == [False, True]  # the solve, then the warm-started re-solve
    assert out.parts["cg_dropped"] == 1.0
    torch.testing.assert_close(_grads(model, out.total), _ce_grad(model, batch))


def test_normalize_total_is_the_share_of_the_change_outside_the_region():
    method = build_method("causal-align", {})  # training default: normalize=total
    delta = torch.zeros(2, 1, 4, 4)
    delta[0, 0, 0, 0], delta[0, 0, 3, 3] = 0.3, -0.1  # 0.3 outside, 0.1 inside
    delta[1, 0, 3, 3] = 0.2  # all inside
    outside = torch.ones(2, 1, 4, 4)
    outside[:, :, 2:, 2:] = 0
    share = method._per_sample(delta, outside)
    torch.testing.assert_close(share, torch.tensor([0.3 / (0.4 + 1e-6), 0.0]))
    raw = build_method("causal-align", dict(normalize="none"))._per_sample(delta, outside)
    torch.testing.assert_close(raw, torch.tensor([0.3, 0.0]))


def test_training_steps_warm_start_from_the_previous_visit():
    """warm_start (the default) with the batch's dataset indices: the second visit of a
    sample starts from its cached x* (cf_warm), which training never used if the ids did
    not reach the generator."""
    model = _small_cnn()
    batch = _batch()
    method = build_method("causal-align", dict(FAST, warm_start=True))
    first = method(model, batch)
    second = method(model, batch)
    assert first.parts["cf_warm"] == 0.0 and second.parts["cf_warm"] == 1.0
    cold = build_method("causal-align", dict(FAST, warm_start=False))
    cold(model, batch)
    assert cold(model, batch).parts["cf_warm"] == 0.0


def test_nonconverged_cg_is_dropped_and_counted():
    model = _small_cnn()
    batch = _batch()
    # One iteration to 1e-12 cannot converge: every sample's term is dropped, none crashes.
    method = build_method("causal-align", dict(FAST, cg_iters=1, cg_tol=1e-12,
                                               precondition=False))
    out = method(model, batch)
    assert out.parts["cg_dropped"] == 1.0 and out.parts["cg_converged"] == 0.0
    torch.testing.assert_close(_grads(model, out.total), _ce_grad(model, batch))


def _volume_batch(n: int = 8, depth: int = 4, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, depth, size, size, generator=g)
    mask = torch.zeros(n, 1, depth, size, size)
    mask[..., 4:8, 4:8] = 1.0
    has = torch.ones(n, dtype=torch.bool)
    return {"image": x, "label": torch.arange(n) % 2, "mask": mask, "has_mask": has,
            "box_mask": mask, "has_annotation": has, "index": torch.arange(n)}


def test_negative_curvature_raises_the_damping_instead_of_dropping_every_sample():
    """multiview's slice attention makes the input Hessian indefinite: at δ = 0.01 CG breaks
    down on every sample and the run was ERM under another name. With
    `negative_curvature=damping` the step is solved again with δ × 10 (up to damping_max),
    and later steps keep the raised δ. By default it is solved with the Gauss-Newton system
    instead, and δ stays."""
    from causalign.models import MultiViewCNN

    def run(**kw):
        torch.manual_seed(0)
        model = MultiViewCNN(1, 2, width=4).train()
        method = build_method("causal-align", dict(FAST, **kw))
        return method, method(model, _volume_batch())

    off, out_off = run(damping_max=0.01, negative_curvature="damping")  # the oldest behaviour
    assert out_off.parts["cg_dropped"] == 1.0 and out_off.parts["damping"] == 0.01
    assert out_off.parts["gn_fallback"] == 0.0
    gn, out_gn = run()  # default: the Gauss-Newton fallback
    assert out_gn.parts["gn_fallback"] == 1.0 and out_gn.parts["cg_dropped"] == 0.0
    assert out_gn.parts["damping"] == 0.01 and gn.damping == 0.01
    assert out_gn.parts["cg_iters"] > 0  # the exact CG that met the negative curvature
    # the same gradient as solving every step with the Gauss-Newton system
    torch.manual_seed(0)
    model_a = MultiViewCNN(1, 2, width=4).train()
    ga = _grads(model_a, build_method("causal-align", FAST)(model_a, _volume_batch()).total)
    torch.manual_seed(0)
    model_b = MultiViewCNN(1, 2, width=4).train()
    gb = _grads(model_b, build_method("causal-align", dict(FAST, hvp="gauss-newton"))(
        model_b, _volume_batch()).total)
    torch.testing.assert_close(ga, gb)
    on, out_on = run(negative_curvature="damping")
    assert out_on.parts["damping"] > 0.01 and on.damping == out_on.parts["damping"]
    assert out_on.parts["cg_dropped"] < 1.0 and out_on.parts["cg_converged"] > 0.0
    # kept for later steps and in the checkpoint's method state
    fresh = build_method("causal-align", FAST)
    fresh.load_state_dict(on.state_dict())
    assert fresh.damping == on.damping
    # a piecewise-linear CNN has a positive semi-definite input Hessian: δ never moves
    cnn = build_method("causal-align", FAST)
    out = cnn(_small_cnn(), _batch())
    assert out.parts["damping"] == 0.01 and out.parts["cg_dropped"] == 0.0
    assert out.parts["gn_fallback"] == 0.0  # nor does the fallback ever run there


def test_after_gn_switch_fallback_steps_every_step_is_solved_directly():
    """On multiview CG met negative curvature on every step, and each step paid for the CG
    solve and then the Gauss-Newton fallback's (batch 64: 9.35x ERM against 6.79x after the
    switch). After gn_switch such steps in a row no CG runs: the step is solved
    directly, with the fallback's gradient, counted as a fallback; the switch is kept in the
    checkpoint. gn_switch=0 tries CG on every step, as before."""
    from causalign.models import MultiViewCNN

    torch.manual_seed(0)
    model = MultiViewCNN(1, 2, width=4).train()
    batch = _volume_batch()

    def steps(method, n):  # the model is not updated: every step meets the same curvature
        out = []
        for _ in range(n):
            torch.manual_seed(1)  # train mode draws the CE forward's slices
            o = method(model, batch)
            out.append((o.parts, _grads(model, o.total)))
        return out

    switching = build_method("causal-align", dict(FAST, gn_switch=2))
    direct = build_method("causal-align", dict(FAST, hvp="gauss-newton"))
    never = build_method("causal-align", dict(FAST, gn_switch=0))
    runs = steps(switching, 3)
    assert [p["cg_iters"] > 0 for p, _ in runs] == [True, True, False]  # no CG on step 3
    assert all(p["gn_fallback"] == 1.0 and p["cg_dropped"] == 0.0 for p, _ in runs)
    assert switching.gn_switched and switching.gn_streak == 2
    for (_, g), (_, g_direct) in zip(runs, steps(direct, 3), strict=True):
        torch.testing.assert_close(g, g_direct)  # the same gradient on every step
    assert all(p["cg_iters"] > 0 for p, _ in steps(never, 3)) and not never.gn_switched
    # kept in the checkpoint's method state
    resumed = build_method("causal-align", dict(FAST, gn_switch=2))
    resumed.load_state_dict(switching.state_dict())
    assert resumed.gn_switched and steps(resumed, 1)[0][0]["cg_iters"] == 0
    # a step that CG solves ends the streak; a piecewise-linear CNN never switches
    cnn = build_method("causal-align", dict(FAST, gn_switch=2))
    cnn.gn_streak = 1
    out = cnn(_small_cnn(), _batch())
    assert out.parts["gn_fallback"] == 0.0 and cnn.gn_streak == 0 and not cnn.gn_switched
    with pytest.raises(ConfigError, match="method.gn_switch must be >= 0"):
        build_method("causal-align", dict(gn_switch=-1))


def test_a_run_stored_before_gn_switch_resumes_only_if_it_never_fell_back(tmp_path):
    """gn_switch's default (3) is not the earlier behaviour (CG on every step, 0). A run
    stored before the setting existed was resumed or collected with the switch on; now it
    is compared with 0, unless its history shows no fallback, where the switch never acts."""
    import yaml

    from causalign.engine.config import TrainConfig
    from causalign.engine.trainer import settings_diff

    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="causal-align", epochs=1)
    params = dict(resolved_params(build_method("causal-align", {})))
    del params["gn_switch"]
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(),
                                                    "method_params": params}))

    def history(fallback):
        (run / "history.csv").write_text(f"epoch,train_gn_fallback\n1,0\n2,{fallback}\n")

    history(0.5)
    assert settings_diff(run, cfg) == [
        "method.gn_switch 0 (before the setting existed) -> 3"]
    off = TrainConfig(method="causal-align", epochs=1, method_args={"gn_switch": 0})
    assert settings_diff(run, off) == []  # resumable with the earlier behaviour
    history(0)  # never fell back (every 2D CNN run): the switch never acted
    assert settings_diff(run, cfg) == []
    (run / "history.csv").write_text("epoch,train_img_gn_fallback\n1,0.25\n")
    assert build_method("hier-align", {}).setting_had_no_effect("gn_switch", []) is True
    assert build_method("hier-align", {}).setting_had_no_effect(
        "gn_switch", [{"train_img_gn_fallback": "0.25"}]) is False


def test_data_parallel_merge_keeps_a_ranks_gn_switch():
    # rank 0's values were taken: a rank that had switched went back to CG + fallback at
    # every epoch's end
    from causalign.engine.distributed import merge_method_states

    s0 = {"gn_switched": False, "gn_streak": 1, "attr_gn_switched": False,
          "attr_gn_streak": 0, "step": 4}
    s1 = {"gn_switched": True, "gn_streak": 3, "attr_gn_switched": False,
          "attr_gn_streak": 2, "step": 3}
    merged = merge_method_states([s0, s1], [torch.tensor([0]), torch.tensor([1])])
    assert merged == {"gn_switched": True, "gn_streak": 3, "attr_gn_switched": False,
                      "attr_gn_streak": 2, "step": 4}


def test_hier_align_keeps_each_levels_gn_switch_in_its_state():
    hier = build_method("hier-align", dict(gn_switch=5))
    assert hier.pixel.params.gn_switch == 5 and hier.attr.params.gn_switch == 5
    hier.pixel.gn_switched, hier.attr.gn_streak = True, 2
    again = build_method("hier-align", {})
    again.load_state_dict(hier.state_dict())
    assert again.pixel.gn_switched and not again.attr.gn_switched
    assert again.attr.gn_streak == 2 and again.pixel.gn_streak == 0


# the forced failures also give the early TrainingTroubleWarning, which
# test_numerical_trouble_is_reported_when_it_first_happens checks
@pytest.mark.filterwarnings("ignore::causalign.errors.TrainingTroubleWarning")
@pytest.mark.parametrize("failure", ["diverged", "cg"])
def test_training_survives_forced_failures_and_logs_them(tiny_data, tmp_path, failure):
    """Through the trainer: a diverging inner solve (Adam step 1e38 → inf/NaN logits) or a CG
    that cannot converge is counted per epoch in history.csv; the model stays finite."""
    import csv

    from causalign.engine import TrainConfig, train
    from causalign.engine.trainer import load_run

    # Adam's step is what can be made to diverge (the default search; the Gauss-Newton one
    # never accepts a step that raises T: its non-finite rows, test_counterfactual)
    args = (dict(inner_optimizer="adam", inner_lr=1e38) if failure == "diverged"
            else dict(cg_iters=1, cg_tol=1e-12, precondition=False))
    cfg = TrainConfig(method="causal-align", epochs=1, width=4, batch_size=16,
                      deletion_fractions=[0.1], method_args=dict(FAST, **args))
    train(tiny_data, cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    key = "train_cf_diverged" if failure == "diverged" else "train_cg_dropped"
    assert float(rows[0][key]) == 1.0, rows[0]
    assert float(rows[0]["train_n_align"]) > 0
    _, model, _, _ = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the finished run says so, not only a history.csv column
    warnings = json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{key} >= 0.5 in 1 of 1 epoch(s)")


def test_numerical_trouble_is_reported_when_it_first_happens(tiny_data, tmp_path,
                                                             monkeypatch):
    """A counter that reaches the threshold is reported on stderr in that epoch, once, not
    only in metrics.json at the end of a run that may take hours."""
    from causalign.engine import TrainConfig, train

    cfg = TrainConfig(method="causal-align", epochs=2, width=4, batch_size=32,
                      deletion_fractions=[0.1], eval_saliency="gradient",
                      method_args=dict(FAST, cg_iters=1, cg_tol=1e-12, precondition=False))
    import warnings

    from causalign.engine import trainer as T
    from causalign.errors import TrainingTroubleWarning

    seen = {}
    final = T.Trainer._final_evaluation

    def spy(self, progress):  # what had been warned before the final evaluation
        seen["warned"] = [str(w.message) for w in caught
                          if issubclass(w.category, TrainingTroubleWarning)]
        return final(self, progress)

    monkeypatch.setattr(T.Trainer, "_final_evaluation", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_data, cfg, tmp_path / "run", progress=False)
    assert len(seen["warned"]) == 1, seen["warned"]
    assert seen["warned"][0].startswith("epoch 1: train_cg_dropped >= 0.5 in 1 of 1 epoch(s)")


def test_finite_difference_products_on_a_relu_cnn_fall_back_and_say_so():
    """On a CNN of ReLUs the finite differences cross activation switches (the products are
    off by more than their own norm, benchmarks/fd_hvp_probe.py) and CG breaks down: the step
    is solved with the Gauss-Newton system, counted as fd_fallback, and the trainer's warning
    names the cause. With exact products nothing falls back and no fd column appears."""
    from causalign.engine.trainer import numerical_trouble
    from causalign.models import build_model

    def step(**kw):
        torch.manual_seed(0)
        model = build_model("cnn7", 1, 2, width=8).train()
        out = build_method("causal-align", dict(steps=3, warm_start=False, **kw))(
            model, _batch(n=8, size=32))
        return out.parts, _grads(model, out.total)

    fd, g_fd = step(hvp="finite-difference")
    assert fd["fd_fallback"] == 1.0 and fd["gn_fallback"] == 1.0 and fd["cg_dropped"] == 0.0
    exact, g_exact = step()
    assert "fd_fallback" not in exact and exact["gn_fallback"] == 0.0
    # the fallback's gradient is the exact one (Gauss-Newton = H on a piecewise-linear CNN)
    assert F.cosine_similarity(g_fd, g_exact, dim=0) > 0.999
    (line,) = numerical_trouble([{"epoch": 1, "train_fd_fallback": fd["fd_fallback"]}])
    assert line.startswith("train_fd_fallback >= 0.5 in 1 of 1 epoch(s)")
    assert "method.hvp=exact" in line


def test_numerical_trouble_names_each_counter_that_reached_the_threshold():
    from causalign.engine.trainer import numerical_trouble

    history = [{"epoch": 1, "train_cg_dropped": 0.2, "train_cf_diverged": 0.0},
               {"epoch": 2, "train_cg_dropped": 0.75, "train_cf_diverged": ""},
               {"epoch": 3, "train_cg_dropped": 0.5}]
    (line,) = numerical_trouble(history)
    assert line.startswith("train_cg_dropped >= 0.5 in 2 of 3 epoch(s) (worst 0.75)")
    assert numerical_trouble([{"epoch": 1, "train_loss": 0.3}]) == []


@pytest.mark.parametrize("name", ["resnet18", "bagnet9"])
def test_backbone_step(name):
    from causalign.models import build_model

    model = build_model(name, 1, 2).train()
    batch = _batch(n=4, size=32)
    method = build_method("causal-align", dict(FAST, cg_iters=2))
    out = method(model, batch)
    assert out.parts["n_align"] == 4.0 and out.parts["cf_diverged"] == 0.0
    g = _grads(model, out.total)
    assert torch.isfinite(g).all()
    assert (g - _ce_grad(model, batch)).norm() > 0  # the alignment gradient reached θ
    assert model.training


def test_dilate_grows_the_region_in_plane_only():
    from causalign.methods.causal_align import dilate_region

    m = torch.zeros(2, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    out = dilate_region(m, 2)
    assert torch.equal(out[0, 0, 2:7, 2:7], torch.ones(5, 5)) and out[0].sum() == 25
    assert out[1].sum() == 0  # an empty region stays empty
    assert torch.equal(dilate_region(m, 0), m)
    vol = torch.zeros(1, 1, 3, 9, 9, dtype=torch.bool)
    vol[0, 0, 1, 4, 4] = True
    dv = dilate_region(vol, 1)
    assert dv.dtype == torch.bool and int(dv[0, 0, 1].sum()) == 9
    assert not dv[0, 0, 0].any() and not dv[0, 0, 2].any()  # slices are not mixed


def test_dilate_is_applied_to_the_alignment_region():
    method = build_method("causal-align", {"dilate": 1})
    mask = torch.zeros(1, 1, 5, 5)
    mask[0, 0, 2, 2] = 1
    region, has = method.annotation({"mask": mask, "has_mask": torch.ones(1, dtype=torch.bool)})
    assert int(region.sum()) == 9 and bool(has.all())
    with pytest.raises(Exception, match=r"method.dilate must be in 0\.\.1048576, got -1"):
        build_method("causal-align", {"dilate": -1})


def test_gradient_probe_in_training_leaves_the_run_unchanged(tiny_data, tmp_path, capsys):
    """benchmarks/causal_align_grad_in_training.py probes the implicit gradient between epochs;
    the run it probes must end exactly where an unprobed run with the same config ends, and
    every probe must report finite cosines for the run, each variant and both references."""
    import importlib.util

    from causalign.engine import TrainConfig, train
    from causalign.engine.trainer import CHECKPOINT, load_checkpoint

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "causal_align_grad_in_training.py"
    spec = importlib.util.spec_from_file_location("causal_align_grad_in_training", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    sets = ["width=4", "batch_size=16", "deletion_fractions=[0.1]", "method.steps=3",
            "method.align_batch=4"]
    probe.main([str(tiny_data), "--out", str(tmp_path / "probe"), "--epochs", "2",
                "--probe-epochs", "1,2", "--probe-n", "4", "--ks", "3", "--ref-steps", "10",
                "--threads", "0", "--variant", "+more:steps=6"]
               + [f"--set={s}" for s in sets])
    # each probe's stages are announced (it printed nothing for minutes before)
    err = capsys.readouterr().err
    assert err.count("probe: tight reference from x0 (10 Adam at 0.01 + 10 Adam at 0.001 "
                     "+ 10 Adam at 0.0001, 50 Gauss-Newton)") == 2, err
    assert err.count("probe: variant more") == 2, err
    cfg = TrainConfig(method="causal-align", epochs=2, width=4, batch_size=16,
                      deletion_fractions=[0.1], method_args=dict(steps=3, align_batch=4))
    train(tiny_data, cfg, tmp_path / "plain", progress=False)
    probed = load_checkpoint(tmp_path / "probe" / "run" / CHECKPOINT)
    plain = load_checkpoint(tmp_path / "plain" / CHECKPOINT)
    for k, v in plain["model"].items():
        assert torch.equal(v, probed["model"][k]), k
    assert torch.equal(plain["method_state"]["cache"]["offsets"],
                       probed["method_state"]["cache"]["offsets"])
    result = json.loads((tmp_path / "probe" / "grad_in_training.json").read_text())
    assert [r["epoch"] for r in result["probes"]] == [1, 2]
    for r in result["probes"]:
        for name in ("run", "cold_3", "run_plus_3", "more"):
            for key in ("cosine_to_ref", "cosine_to_ref_run"):
                assert -1.0 <= r[name][key] <= 1.0, (name, key, r[name])
        assert r["more"]["from_run_cache"] and not r["cold_3"]["from_run_cache"]
        assert r["ref"]["norm_ratio_to_ce"] > 0 and -1 <= r["ref_run"]["cosine_to_ref"] <= 1
        # "run" is the run's own setting from its cache, i.e. run_plus_K at its K
        assert r["run"]["cosine_to_ref"] == pytest.approx(r["run_plus_3"]["cosine_to_ref"])
    assert "more" in (tmp_path / "probe" / "grad_in_training.md").read_text()

    # --from-run scores a finished run; --set method.* changes how (Eq. 3 as printed here)
    saved = {}
    for name, extra in (("share", []), ("raw", ["--set", "method.normalize=none"]),
                        ("newton_ref", ["--ref-newton", "5"])):
        probe.main(["--from-run", str(tmp_path / "plain"), "--out", str(tmp_path / name),
                    "--ks", "", "--ref-steps", "10", "--probe-n", "4", "--threads", "0",
                    *extra])
        saved[name] = json.loads((tmp_path / name / "grad_in_training.json").read_text())
    share, raw = (saved[k]["probes"][0] for k in ("share", "raw"))
    assert share["epoch"] == raw["epoch"] == 2
    assert 0 <= share["ref"]["align"] <= 1 and 0 <= share["run"]["align"] <= 1
    assert raw["run"]["align"] > 1  # a pixel sum over the image, not a share
    # references by Gauss-Newton alone: named as such, and the run is compared with them
    assert saved["newton_ref"]["reference"].startswith("5 Gauss-Newton steps")
    assert "Gauss-Newton" in saved["share"]["reference"]  # Adam stages + Newton polish
    newton_probe = saved["newton_ref"]["probes"][0]
    assert -1.0 <= newton_probe["run"]["cosine_to_ref_run"] <= 1.0
    with pytest.raises(SystemExit):
        probe.main(["--from-run", str(tmp_path / "plain"), "--out", str(tmp_path / "bad"),
                    "--set", "epochs=3"])


def test_latent_space_auto_cg_budget_solves_what_three_iterations_drop(tiny_data):
    """The auto CG cap (3 for a binary classifier) rests on the preconditioned Hessian being
    identity + rank C − 1, true when the image is piecewise linear in the search variable.
    The latent space's decoder ends in a sigmoid, whose curvature is full rank: 3 iterations
    dropped every aligned sample here (52–61 % on the demo benchmark), so the alignment term
    was mostly absent. Auto now allows 10 there."""
    from causalign.data.format import LesionDataset
    from causalign.methods.causal_align import auto_cg_iters
    from causalign.models import build_model
    from causalign.models.autoencoder import train_autoencoder

    assert auto_cg_iters(2, soft=False) == 3
    assert auto_cg_iters(2, soft=False, curved_map=True) == 10
    assert auto_cg_iters(12, soft=False, curved_map=True) == 22  # C + 10 for C > 2
    ds = LesionDataset(tiny_data, "train")
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(ds.images), ds.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae = train_autoencoder(ds.images, epochs=3)
    batch = ds.batch(torch.arange(len(ds)))
    parts = {}
    for cap in (3, 0):
        method = build_method("causal-align", {"space": "latent", "distance": "l2",
                                               "cg_iters": cap, "warm_start": False})
        method.autoencoder = ae
        parts[cap] = method(model, batch).parts
    assert parts[3]["n_align"] == parts[0]["n_align"] == 16
    assert parts[3]["cg_dropped"] >= 0.5, parts[3]
    assert parts[0]["cg_dropped"] == 0.0 and parts[0]["cg_converged"] == 1.0, parts[0]
    assert 3 < parts[0]["cg_iters"] <= 10 * 3  # more than the old cap, up to 3 damping levels


def test_gauss_newton_adjoint_equals_a_tight_exact_solve_on_a_piecewise_linear_cnn():
    """`hvp=gauss-newton` solves (JᵀSJ + α∇²d + δI)v = ∇L by Woodbury. On a ReLU CNN in eval
    mode JᵀSJ is the CE Hessian, so its gradient is the exact-CG gradient solved to 1e-10
    (unpreconditioned, 200 iterations), at a fraction of the Hessian products."""
    batch = _batch(n=6, size=16)

    def run(**kw):
        model = _small_cnn()
        method = build_method("causal-align", dict(FAST, **kw))
        out = method(model, batch)
        return _grads(model, out.total), out.parts

    g_exact, parts_exact = run(cg_iters=200, cg_tol=1e-10, precondition=False)
    g_gn, parts_gn = run(hvp="gauss-newton")
    assert parts_exact["cg_dropped"] == 0.0 and parts_gn["cg_dropped"] == 0.0
    assert parts_gn["cg_iters"] == 0.0 and parts_gn["cg_converged"] == 1.0
    assert parts_gn["align"] == pytest.approx(parts_exact["align"], rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(g_exact, g_gn, dim=0)
    assert cos > 0.9999, float(cos)
    assert torch.linalg.vector_norm(g_gn) == pytest.approx(
        float(torch.linalg.vector_norm(g_exact)), rel=1e-3)
    # the alignment term is really in it: CE alone gives another gradient
    ce_only = torch.nn.functional.cosine_similarity(_ce_grad(_small_cnn(), batch), g_gn, dim=0)
    assert ce_only < 0.999


def test_gauss_newton_adjoint_needs_no_damping_on_an_indefinite_hessian():
    """multiview's slice attention makes the exact input Hessian indefinite (CG breaks down and
    δ is raised); the Gauss-Newton system is positive definite, so δ stays and no sample is
    dropped."""
    from causalign.models import MultiViewCNN

    torch.manual_seed(0)
    model = MultiViewCNN(1, 2, width=4).train()
    method = build_method("causal-align", dict(FAST, hvp="gauss-newton"))
    out = method(model, _volume_batch())
    assert out.parts["damping"] == 0.01 and method.damping == 0.01
    assert out.parts["cg_dropped"] == 0.0 and out.parts["cg_converged"] == 1.0
    out.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_a_smooth_sigma_outside_the_smooth_space_is_warned_at_setup(tiny_data):
    # method.smooth_sigma with space=pixel was silently unused (config.yaml recorded a blur
    # never applied). A warning when training starts, not a refusal: runs trained so by
    # earlier versions stay loadable (evaluate, counterfactual, --resume build the method).
    import warnings

    from causalign.data.format import LesionDataset

    train_set = LesionDataset(tiny_data, "train")
    method = build_method("causal-align", {"smooth_sigma": 3.0})
    with warnings.catch_warnings(record=True) as unused:
        warnings.simplefilter("always")
        method.setup(train_set, _small_cnn())
    assert [str(w.message).split(":")[0] for w in unused] == [
        "method.smooth_sigma=3 has no effect"]
    for args in ({"smooth_sigma": 3.0, "space": "smooth"}, {}):
        with warnings.catch_warnings(record=True) as fine:
            warnings.simplefilter("always")
            build_method("causal-align", args).setup(train_set, _small_cnn())
        assert fine == []


def test_damping_escalation_under_the_direct_solve_is_warned_at_setup(tiny_data):
    # hvp=gauss-newton runs no CG, so negative_curvature=damping was silently unused. A
    # warning when training starts, not a refusal: a run trained so stays loadable.
    import warnings

    from causalign.data.format import LesionDataset

    train_set = LesionDataset(tiny_data, "train")
    method = build_method("causal-align", dict(hvp="gauss-newton",
                                               negative_curvature="damping"))
    with warnings.catch_warnings(record=True) as contradictory:
        warnings.simplefilter("always")
        method.setup(train_set, _small_cnn())
    assert [str(w.message).split(":")[0] for w in contradictory] == [
        "method.negative_curvature=damping has no effect with method.hvp=gauss-newton"]
    with warnings.catch_warnings(record=True) as fine:
        warnings.simplefilter("always")
        build_method("causal-align", dict(hvp="gauss-newton")).setup(train_set, _small_cnn())
    assert fine == []  # the default rule is no contradiction


def test_unknown_hvp_mode_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="method.hvp must be one of exact, finite-difference, "
                                          "gauss-newton, got 'newton'"):
        build_method("causal-align", dict(hvp="newton"))
