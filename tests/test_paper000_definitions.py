"""Paper 000's definitions rebuilt by hand on tiny problems and compared with the code.

Equation ↔ test:

* Eq. 2 objective T = CE(f(x), y*) + α·d(x, x0), all four distances ......... test_eq2_objective_*
* Eq. 2 minimiser x* against a closed form (linear model, l2) ............... test_eq2_minimiser_*
* App. C.4 MAD / std scales from the training set, zero guard ............... test_scale_*
* y* rules (binary 1 − y, multi-class most likely other, predicted, k) ...... test_targets_*
* Eq. 3 (pixels outside m, l1, mean over annotated samples; normalize) ...... test_eq3_*
* L = CE + λ·L_align, which samples contribute (masks, boxes, none) ......... test_total_loss_*
* §4.2 implicit gradient −M_θᵀ(H + δI)⁻¹∇ₓL, dense, exact and FD Hv ......... test_implicit_*
* §4.3 Eq. 5–7 two-level loss of hier-align ................................. test_hier_*
* §4.3 CCCE against its counterfactual definition on a structural model ..... test_ccce_*
* §3 latent space: autoencoder trained, saved, reloaded; search in its code . test_latent_*
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from causalign.causal.ccce import TrueProbit, causal_attribution, ccce_scores, subsets
from causalign.explain.counterfactual import (
    CounterfactualGenerator,
    counterfactual_targets,
    distance_scale,
    eval_mode,
)
from causalign.implicit import implicit_gradient
from causalign.methods import build_method
from causalign.models.hierarchical import HierarchicalModel
from causalign.models.mlp import MLPHead

DT = torch.float64


def _mlp(d: int = 4, classes: int = 2, seed: int = 0) -> nn.Module:
    """A smooth 2-layer net (tanh): its Hessians exist everywhere, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, classes)).to(DT)


def _x(n: int = 2, h: int = 2, w: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g, dtype=DT)


# --------------------------------------------------------------------------- Eq. 2


@pytest.mark.parametrize("distance", ["l1", "scaled-l1", "l2", "scaled-l2"])
def test_eq2_objective_matches_the_formula(distance):
    model = _mlp()
    x0, x = _x(seed=1), _x(seed=2)
    target = torch.tensor([1, 0])
    alpha, eps = 0.3, 0.05
    scale = torch.tensor([[[0.5, 1.0], [1.5, 1.0]]], dtype=DT) if "scaled" in distance \
        else None
    gen = CounterfactualGenerator(model, alpha=alpha, distance=distance, scale=scale, eps=eps)
    got = gen.problem(x0, target).objective(x)
    delta = x - x0
    # e(δ): the smoothed |δ| for the l1 family (√(δ²+ε²) − ε), δ² for the l2 family
    e = (delta**2 + eps**2).sqrt() - eps if "l1" in distance else delta**2
    s = scale if scale is not None else torch.ones_like(x0[0])
    d = (e / s).flatten(1).sum(1)
    ce = -torch.log_softmax(model(x), 1)[torch.arange(2), target]
    torch.testing.assert_close(got, ce + alpha * d)


def test_eq2_minimiser_matches_closed_form_for_a_linear_model():
    """Binary linear logits z = (0, w·x + b), y* = 1, d = l2: stationarity gives
    x* = x0 + σ(−s*)·w/(2α) with s* = w·x* + b the root of s = s0 + σ(−s)‖w‖²/(2α)."""
    torch.manual_seed(0)
    w = torch.randn(4, dtype=DT)
    b, alpha = -0.3, 0.7

    class Lin(nn.Module):
        def forward(self, x):
            s = x.flatten(1) @ w + b
            return torch.stack([torch.zeros_like(s), s], 1)

    x0 = _x(3)
    gen = CounterfactualGenerator(Lin(), alpha=alpha, distance="l2", steps=30,
                                  optimizer="newton")
    res = gen.generate(x0, target=torch.ones(3, dtype=torch.long))
    s0 = x0.flatten(1) @ w + b
    k = float(w @ w) / (2 * alpha)
    lo, hi = s0.clone(), s0 + k  # f(s) = s − s0 − k·σ(−s) is increasing; root in [s0, s0+k]
    for _ in range(200):
        mid = (lo + hi) / 2
        pos = mid - s0 - k * torch.sigmoid(-mid) > 0
        hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
    want = x0 + (torch.sigmoid(-lo)[:, None] * w / (2 * alpha)).view_as(x0)
    torch.testing.assert_close(res.x_star, want, atol=1e-9, rtol=0)
    assert res.flipped is not None


def test_eq2_exact_l1_minimiser_moves_only_the_steepest_pixel():
    """Exact l1 (ISTA's proximal step) on a linear model: optimality |∂CE/∂x_k| ≤ α with
    equality where x moves; ∂CE/∂x = −σ(−s)·w, so only argmax |w_k| can leave x0."""
    w = torch.tensor([0.2, -2.0, 0.5, 0.1], dtype=DT)

    class Lin(nn.Module):
        def forward(self, x):
            s = x.flatten(1) @ w
            return torch.stack([torch.zeros_like(s), s], 1)

    x0 = torch.full((1, 1, 2, 2), 0.5, dtype=DT)
    alpha = 0.5
    gen = CounterfactualGenerator(Lin(), alpha=alpha, distance="l1", steps=400, lr=0.01,
                                  optimizer="ista")
    res = gen.generate(x0, target=torch.ones(1, dtype=torch.long))
    delta = (res.x_star - x0).flatten()
    assert delta[[0, 2, 3]].abs().max() == 0
    assert delta[1] < 0  # w₁ < 0: lowering x₁ raises the class-1 logit
    s = float(res.x_star.flatten() @ w)
    # stationarity on the moved pixel: σ(−s)·|w₁| = α (up to the fixed step's oscillation)
    assert torch.sigmoid(torch.tensor(-s)).item() * 2.0 == pytest.approx(alpha, abs=0.02)


# --------------------------------------------------------------------------- App. C.4 scales


def _paper_scale(images: np.ndarray, distance: str) -> np.ndarray:
    """MAD_k = median_i |x_ik − median_j x_jk| (statistics.median: the mean of the two middle
    values for an even count) or std_k; then the code's normalisation to mean 1."""
    flat = images.reshape(len(images), -1)
    if distance == "scaled-l1":
        s = []
        for col in flat.T:
            med = statistics.median(col.tolist())
            s.append(statistics.median([abs(v - med) for v in col.tolist()]))
        s = np.array(s)
    else:
        s = flat.std(0, ddof=1)
    return (s / s.mean()).reshape(images.shape[1:])


@pytest.mark.parametrize("n", [5, 6])
@pytest.mark.parametrize("distance", ["scaled-l1", "scaled-l2"])
def test_scale_is_the_per_pixel_mad_or_std_of_the_training_set(distance, n):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(n, 1, 3, 3, generator=g, dtype=DT)
    got = distance_scale(images, distance)
    want = _paper_scale(images.numpy(), distance)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_scale_mad_uses_the_true_median_for_an_even_count():
    """Half the training images have a pixel at 0, half at 1 (a shortcut symbol's stroke):
    its MAD is 0.5, not 0 — torch.median's lower middle value gave median 0, MAD 0 and
    the 5% floor, making that pixel 20× too expensive to change."""
    images = torch.zeros(4, 1, 1, 2, dtype=DT)
    images[:, 0, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    images[:, 0, 0, 1] = torch.tensor([0.0, 1.0, 2.0, 4.0])
    got = distance_scale(images, "scaled-l1").flatten()
    # MADs: 0.5 and 1.0 (|x − 1.5| = 1.5, .5, .5, 2.5) → normalised to mean 1
    torch.testing.assert_close(got, torch.tensor([2 / 3, 4 / 3], dtype=DT))


def test_scale_zero_guard_floors_constant_pixels_and_a_constant_set_is_unscaled():
    images = torch.rand(6, 1, 2, 2, dtype=DT)
    images[:, 0, 0, 0] = 0.25  # a constant pixel (padding): MAD = std = 0
    for distance in ("scaled-l1", "scaled-l2"):
        s = distance_scale(images, distance)
        assert torch.isfinite(s).all() and s.min() > 0
        assert s.mean().item() == pytest.approx(1.0)
        # the floor is 5% of the mean before renormalisation
        raw = torch.from_numpy(_paper_scale(images.numpy(), distance))
        floored = raw.clamp_min(0.05)
        torch.testing.assert_close(s, floored / floored.mean())
    const = torch.full((4, 1, 2, 2), 0.3, dtype=DT)
    assert torch.equal(distance_scale(const, "scaled-l1"), torch.ones(1, 2, 2, dtype=DT))
    assert distance_scale(images, "l1") is None and distance_scale(images, "l2") is None


def test_scale_of_an_integer_image_stack_is_floating_point():
    """8-bit training images: the scale used to come back as uint8, the 5% floor and every
    value below 1 truncated to 0, and the scaled distance then divided by zero."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(10, 1, 3, 3, generator=g) * 255).to(torch.uint8)
    for distance in ("scaled-l1", "scaled-l2"):
        s = distance_scale(images, distance)
        assert s.is_floating_point() and s.min() > 0
        torch.testing.assert_close(s, distance_scale(images.float(), distance))


def test_scale_refuses_non_finite_or_empty_training_images():
    from causalign.errors import InputError

    images = torch.rand(6, 1, 2, 2)
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):  # was: silently all-ones (unscaled)
        distance_scale(images, "scaled-l2")
    with pytest.raises(InputError, match="non-empty"):
        distance_scale(torch.zeros(0, 1, 2, 2), "scaled-l1")


# --------------------------------------------------------------------------- y*


def test_targets_binary_multiclass_predicted_and_fixed():
    y = torch.tensor([0, 1, 1])
    t, ok = counterfactual_targets(y, 2)
    assert t.tolist() == [1, 0, 0] and ok.all()
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0], [1.0, 2.0, 0.5]])
    y3 = torch.tensor([0, 1, 2])
    t, ok = counterfactual_targets(y3, 3, "other", logits)
    assert t.tolist() == [2, 0, 1] and ok.all()  # the most likely class other than y
    t, _ = counterfactual_targets(y3, 3, "predicted", logits)  # rule applied to argmax = 0,1,1
    assert t.tolist() == [2, 0, 0]
    t, ok = counterfactual_targets(y3, 3, 2)
    assert t.tolist() == [2, 2, 2] and ok.tolist() == [True, True, False]


# --------------------------------------------------------------------------- Eq. 3


def _eq3(x_star, x, m, normalize="none"):
    a = (x_star - x).abs()
    out = (a * (1 - m)).flatten(1).sum(1)
    if normalize == "total":
        out = out / (a.flatten(1).sum(1) + 1e-6)
    return out


@pytest.mark.parametrize("normalize", ["none", "total"])
def test_eq3_per_sample_term(normalize):
    method = build_method("causal-align", {"normalize": normalize})
    x, x_star = _x(3, 3, 3, seed=4), _x(3, 3, 3, seed=5)
    m = torch.zeros_like(x)
    m[:, :, 1:, 1:] = 1
    got = method._per_sample(x_star - x, 1 - m)
    torch.testing.assert_close(got, _eq3(x_star, x, m, normalize))
    if normalize == "none":  # by hand for sample 0: the 5 pixels of the L outside the mask
        outside = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
        want = sum(abs(float(x_star[0, 0, i, j] - x[0, 0, i, j])) for i, j in outside)
        assert got[0].item() == pytest.approx(want)


def test_eq3_default_training_normalisation_is_the_share_outside():
    """causal-align's training default divides by the whole change (README); the params that
    other methods build on keep Eq. 3 as printed."""
    from causalign.methods.causal_align import CausalAlignParams

    assert build_method("causal-align", {}).params.normalize == "total"
    assert CausalAlignParams().normalize == "none"


# --------------------------------------------------------------------------- L = CE + λ·L_align


def _batch(n=4, has=None, box=None):
    x = _x(n, 2, 2, seed=6)
    m = torch.zeros_like(x)
    m[:, :, 0, 0] = 1
    b = torch.zeros_like(x)
    b[:, :, 0, :] = 1
    has = torch.ones(n, dtype=torch.bool) if has is None else torch.tensor(has)
    hb = has if box is None else torch.tensor(box)
    return {"image": x, "label": torch.arange(n) % 2, "mask": m, "has_mask": has,
            "box_mask": b, "has_annotation": hb}


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("region", ["mask", "box"])
@pytest.mark.parametrize("normalize", ["none", "total"])
def test_total_loss_is_ce_plus_lambda_times_eq3_over_annotated_samples(region, normalize,
                                                                        classes):
    model = _mlp(classes=classes)
    has, box = [True, False, True, True], [False, True, True, False]
    batch = _batch(has=has, box=box)
    lam, alpha = 0.7, 0.2
    method = build_method("causal-align", dict(
        lam=lam, alpha=alpha, steps=7, inner_lr=0.05, distance="l2", normalize=normalize,
        region=region, warm_start=False, align_batch=0))
    out = method(model, batch)
    x, y = batch["image"], batch["label"]
    sel = torch.tensor(has if region == "mask" else box)
    m = batch["mask"] if region == "mask" else batch["box_mask"]
    gen = CounterfactualGenerator(model, alpha=alpha, steps=7, lr=0.05, distance="l2",
                                  optimizer=method.params.inner_optimizer)  # the default's
    logits = model(x)
    if classes == 2:
        y_star = 1 - y
    else:  # the most likely class other than y
        y_star = logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
    res = gen.generate(x[sel], target=y_star[sel])
    align = _eq3(res.x_star, x[sel], m[sel], normalize).mean()
    want = F.cross_entropy(model(x), y) + lam * align
    assert out.total.item() == pytest.approx(want.item(), rel=1e-10)
    assert out.parts["n_align"] == float(sel.sum())


def test_total_loss_without_annotations_is_ce_exactly():
    model = _mlp()
    batch = _batch(has=[False] * 4)
    method = build_method("causal-align", {"steps": 2, "warm_start": False})
    out = method(model, batch)
    assert out.total.item() == F.cross_entropy(model(batch["image"]), batch["label"]).item()
    assert out.parts["n_align"] == 0.0


# --------------------------------------------------------------------------- §4.2 implicit


def _dense_implicit(model, res, outer, damping):
    """−Σ_i (∂∇ₓT_i/∂θ)ᵀ (H_i + δI)⁻¹ ∇ₓL_i with H_i, ∂∇ₓT_i/∂θ formed explicitly."""
    prob = res.problem
    params = list(model.parameters())
    total = torch.zeros(sum(p.numel() for p in params), dtype=DT)
    for i in range(len(res.x_star)):
        sub = prob.subset(torch.tensor([i]))
        xi = res.x_star[i:i + 1].detach().requires_grad_(True)
        d = xi.numel()
        (g,) = torch.autograd.grad(sub.objective(xi).sum(), xi, create_graph=True)
        g = g.flatten()
        rows_h, rows_m = [], []
        for k in range(d):
            hk = torch.autograd.grad(g[k], [xi, *params], retain_graph=True,
                                     allow_unused=True)
            rows_h.append(hk[0].flatten())
            rows_m.append(torch.cat([(z if z is not None else torch.zeros_like(p)).flatten()
                                     for z, p in zip(hk[1:], params, strict=True)]))
        hess = torch.stack(rows_h) + damping * torch.eye(d, dtype=DT)   # (d, d)
        mixed = torch.stack(rows_m)                                      # ∂g/∂θ (d, P)
        v = torch.linalg.solve(hess, outer[i].flatten())
        total -= mixed.T @ v
    return total


@pytest.mark.parametrize("variant", [
    dict(), dict(precondition=False), dict(hvp="finite-difference", fd_eps=1e-6),
    dict(distance="l1"), dict(distance="scaled-l1"), dict(normalize="total")])
def test_implicit_gradient_equals_the_dense_ift_formula(variant):
    model = _mlp()
    x0 = _x(3, seed=7)
    target = torch.tensor([1, 0, 1])
    m = torch.zeros_like(x0)
    m[:, :, 0, :] = 1
    damping, alpha = 0.05, 0.4
    distance = variant.get("distance", "l2")
    scale = torch.tensor([[[0.5, 1.0], [1.5, 1.0]]], dtype=DT)
    args = dict(distance=distance, alpha=alpha, damping=damping, cg_iters=50, cg_tol=1e-12,
                normalize="none", eps=0.1)
    args.update({k: v for k, v in variant.items() if k != "distance"})
    method = build_method("causal-align", args)
    method.scale = scale if "scaled" in distance else None
    with eval_mode(model):
        gen = CounterfactualGenerator(model, alpha=alpha, distance=distance, eps=0.1, steps=60,
                                      optimizer="newton", scale=method.scale)
        res = gen.generate(x0, target=target)
    term, stats = method.implicit_term(model, res, m)
    ours = torch.cat([g.flatten() for g in torch.autograd.grad(term, list(model.parameters()))])
    # ∇ₓ of Eq. 3 (mean over the 3 samples): sign(δ)(1 − m); normalize=total, o = A/(B + κ)
    # with A = Σ|δ|(1 − m), B = Σ|δ|: ∂o/∂δ = sign(δ)((1 − m)(B + κ) − A)/(B + κ)²
    delta = res.x_star - x0
    outer = torch.sign(delta) * (1 - m)
    if args["normalize"] == "total":
        a_ = (delta.abs() * (1 - m)).flatten(1).sum(1).view(-1, 1, 1, 1)
        b_ = delta.abs().flatten(1).sum(1).view(-1, 1, 1, 1) + 1e-6
        outer = torch.sign(delta) * ((1 - m) * b_ - a_) / b_**2
    outer = outer / len(x0)
    want = _dense_implicit(model, res, outer, damping)
    tol = 1e-4 if variant.get("hvp") == "finite-difference" else 1e-8
    assert ((ours - want).norm() / want.norm()).item() < tol
    assert stats["cg_dropped"] == 0.0


def test_implicit_gradient_sign_on_a_scalar_problem():
    """T(x, θ) = ½(x − θ)² + ¼x⁴: x* solves x − θ + x³ = 0, dx*/dθ = 1/(1 + 3x*²) > 0."""
    theta = torch.tensor([0.8], dtype=DT, requires_grad=True)
    x = torch.zeros(1, 1, dtype=DT)
    for _ in range(60):
        x = x - (x - theta.detach() + x**3) / (1 + 3 * x**2)
    res = implicit_gradient(lambda u: (0.5 * (u - theta) ** 2 + 0.25 * u**4).sum(), x,
                            [theta], torch.ones_like(x), cg_tol=1e-12)
    assert res.grads[0].item() == pytest.approx(1 / (1 + 3 * x.item() ** 2), rel=1e-10)


# --------------------------------------------------------------------------- §4.3 hier-align


def _hier(p=3, seed=0):
    torch.manual_seed(seed)
    f1 = nn.Sequential(nn.Flatten(), nn.Linear(4, p)).to(DT)
    return HierarchicalModel(f1, MLPHead(p, 2, hidden=4).to(DT))


def test_hier_two_level_loss_is_eq5():
    model = _hier()
    x = _x(4, seed=8)
    y = torch.tensor([0, 1, 1, 0])
    attrs = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=DT)
    m = torch.zeros_like(x)
    m[:, :, 1, :] = 1
    batch = {"image": x, "label": y, "attributes": attrs,
             "attr_known": torch.ones(4, 3, dtype=torch.bool), "mask": m,
             "has_mask": torch.tensor([True, True, False, True]), "box_mask": m,
             "has_annotation": torch.ones(4, dtype=torch.bool), "index": torch.arange(4)}
    lam1, lam2, aw = 0.6, 1.7, 0.8
    method = build_method("hier-align", dict(
        lam1=lam1, lam2=lam2, attr_weight=aw, balance=0.0, normalize="none",
        attr_normalize="none", warm_start=False, align_batch=0, steps=4, attr_steps=6))
    r = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    method.r_table, method.r_known = r, torch.tensor([True, True, True, False])
    out = method(model, batch)
    # by hand
    z = model.f1(x)
    a_hat = z.sigmoid()
    ce = F.cross_entropy(model.f2(a_hat), y)
    bce = F.binary_cross_entropy_with_logits(z, attrs)  # mean over the known entries
    target = 1 - y
    rows = torch.arange(4)  # every row needs the attribute level or the image level
    res_a = method.attribute_counterfactual(model, a_hat[rows], target[rows])
    a_star = res_a.x_star
    need_a = torch.tensor([True, True, True, False])  # r known
    l2 = ((a_star - a_hat) * (~r).to(DT)).abs().sum(1)[need_a].mean()
    need_x = batch["has_mask"]
    res_x = method.image_counterfactual(model, x[need_x], a_star[need_x])
    l1 = _eq3(res_x.x_star, x[need_x], m[need_x]).mean()
    want = ce + aw * bce + lam2 * l2 + lam1 * l1
    assert out.total.item() == pytest.approx(want.item(), rel=1e-9)
    # Eq. 6 is searched on the attribute logits: a* = σ(u*), distance on u − logit(â)
    prob = res_a.problem
    u = prob.u0 + 0.3
    hand = F.cross_entropy(model.f2(u.sigmoid()), target, reduction="none") + \
        method.params.alpha2 * ((u - prob.u0) ** 2 + method.params.attr_eps**2).sqrt() \
        .sub(method.params.attr_eps).sum(1)
    with eval_mode(model):
        torch.testing.assert_close(prob.objective(u), hand)
    # Eq. 7's fit term: Σ_k BCE(f₁(x')_k, a*_k)
    px = res_x.problem
    xx = x[need_x] + 0.1
    want7 = F.binary_cross_entropy_with_logits(model.f1(xx), a_star[need_x],
                                               reduction="none").sum(1)
    torch.testing.assert_close(px.fit(xx)[0], want7)


# --------------------------------------------------------------------------- CCCE


def _ccce_by_definition(w, t, sigma, a, y, s):
    """E(Y_{A_S=1} − Y_{A_S=0} | A=a, Y=y) in the SCM Y_a = 1[w·a − t + U > 0], U ~ N(0, σ²)
    independent of A: the unit's U is shared by both potential outcomes, and the evidence
    (a, y) restricts U to U > c(a) (y = 1) or U ≤ c(a) (y = 0), c(a) = t − w·a."""
    a1, a0 = a.copy(), a.copy()
    a1[list(s)], a0[list(s)] = 1, 0
    c, c1, c0 = (t - w @ v for v in (a, a1, a0))
    # Y_{a1} − Y_{a0} = 1 exactly when c1 < U ≤ c0 (w ≥ 0: c1 ≤ c0), else 0
    lo, hi = (max(c1, c), c0) if y == 1 else (c1, min(c0, c))
    num = max(norm.cdf(hi / sigma) - norm.cdf(lo / sigma), 0.0)
    den = norm.sf(c / sigma) if y == 1 else norm.cdf(c / sigma)
    return num / den


def test_ccce_equals_its_counterfactual_definition_for_both_labels():
    w, t, sigma = np.array([1.2, 0.0, 0.7, 2.0]), 1.5, 0.6
    model = TrueProbit(w, t, sigma)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(12, 4)).astype(float)
    y = np.array([0, 1] * 6)
    sets = subsets(4, 3)
    got = ccce_scores(model, a, y, sets)
    want = np.array([[_ccce_by_definition(w, t, sigma, a[i], y[i], s) for s in sets]
                     for i in range(len(a))])
    np.testing.assert_allclose(got, want, atol=1e-12)
    # the attributed subset is the argmax (tol 0: among exact ties the smallest)
    res = causal_attribution(model, a, y, max_size=3, tol=0.0)
    for i in range(len(a)):
        if res.subset[i] >= 0:
            assert got[i, res.subset[i]] == pytest.approx(want[i].max(), abs=1e-12)
            assert res.r[i].tolist() == [j in sets[res.subset[i]] for j in range(4)]


def test_ccce_subsets_are_all_nonempty_sets_of_at_most_three():
    sets = subsets(5, 3)
    assert len(sets) == 5 + 10 + 10 and len(set(sets)) == len(sets)
    assert all(1 <= len(s) <= 3 and list(s) == sorted(s) for s in sets)


# --------------------------------------------------------------------------- latent space


def test_latent_autoencoder_trained_saved_reloaded_and_searched(tmp_path):
    from causalign.models.autoencoder import load_autoencoder

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 8, 8, generator=g)

    class Data:
        pass

    data = Data()
    data.images, data.has_mask = images, torch.ones(8, dtype=torch.bool)
    path = tmp_path / "ae.pt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    method = build_method("causal-align", {"space": "latent", "autoencoder": str(path),
                                           "distance": "l2", "steps": 3})
    method.setup(data, model)
    assert path.exists()
    ae = load_autoencoder(path)
    for a, b in zip(ae.state_dict().values(), method.autoencoder.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    gen = method.generator(model)
    x0 = images[:2]
    res = gen.generate(x0, target=torch.tensor([1, 0]))
    z0 = ae.encode(x0)
    assert res.u_star.shape == z0.shape  # the search variable is the code
    want = x0 + ae.decode(res.u_star, (8, 8)) - ae.decode(z0, (8, 8))
    torch.testing.assert_close(res.x_star, want)
    assert not torch.equal(res.u_star, z0)
    # the distance is taken on the code: α·‖z − z0‖²
    prob = res.problem
    z = z0 + 0.1
    hand = F.cross_entropy(model(prob.image(z)), prob.target, reduction="none") + \
        method.params.alpha * ((z - z0) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(prob.objective(z), hand)


def test_latent_damaged_autoencoder_file_is_one_clear_error(tmp_path):
    """A file with the autoencoder's tag but broken contents raised a bare KeyError /
    RuntimeError (a traceback from the CLI); a corrupt file named its path twice."""
    from causalign.errors import CausalignError
    from causalign.io import atomic_torch_save
    from causalign.models.autoencoder import load_autoencoder

    for i, data in enumerate([{"kind": "causalign-autoencoder"},
                              {"kind": "causalign-autoencoder",
                               "config": {"in_channels": 1, "width": 4}, "state": {}}]):
        path = tmp_path / f"ae{i}.pt"
        atomic_torch_save(path, data)
        with pytest.raises(CausalignError, match="damaged autoencoder state") as err:
            load_autoencoder(path)
        assert "\n" not in str(err.value) and str(err.value).count(str(path)) == 1
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CausalignError) as err:
        load_autoencoder(junk)
    assert str(err.value).count(str(junk)) == 1


def test_latent_autoencoder_of_other_channels_is_one_clear_error():
    """An RGB autoencoder file on grey images (`counterfactual --space latent --autoencoder`)
    failed inside a conv with a RuntimeError traceback."""
    from causalign.errors import CausalignError
    from causalign.models.autoencoder import ConvAutoencoder

    ae = ConvAutoencoder(3, width=4, latent_channels=2)
    with pytest.raises(CausalignError, match="3-channel images, got 1"):
        ae.encode(torch.rand(2, 1, 8, 8))
    assert ae.encode(torch.rand(2, 3, 8, 8)).shape == (2, 2, 2, 2)
