"""Property-based tests (hypothesis) of the numerical core: batched CG, the implicit adjoint
gradient, the localisation / faithfulness / classification metrics, WBP (as a black box) and
CCCE. Every test is derandomised with few, tiny examples, so it is deterministic and fast."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from torch import nn

from causalign.causal.ccce import (
    SmoothedFrequency,
    causal_attribution,
    ccce_scores,
    fit_label_model,
    subsets,
)
from causalign.implicit import batched_cg, implicit_gradient
from causalign.metrics import (
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
    rank_accuracy,
)

DT = torch.float64

# Deterministic (derandomize: the same examples on every run, so CI never flakes), few
# examples, no per-example deadline (the first call of a torch op is slow).
PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------- helpers


def _spd(d: int, cond: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A d×d SPD matrix with eigenvalues scale·[1 … cond] (log-spaced) in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), d, dtype=DT) * scale
    return q @ torch.diag(eig) @ q.T


def _matvec(a: torch.Tensor):
    """Block-diagonal batched product with dense per-sample matrices a (N, D, D)."""
    def mv(p: torch.Tensor) -> torch.Tensor:
        flat = p.reshape(p.shape[0], -1)
        return torch.einsum("nij,nj->ni", a.to(p.dtype), flat).reshape(p.shape)

    return mv


def _true_residual(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                   damping: float = 0.0) -> torch.Tensor:
    """‖b − (A + δI)x‖ per sample, in float64."""
    a, b, x = a.to(DT), b.to(DT).reshape(len(b), -1), x.to(DT).reshape(len(x), -1)
    return (b - torch.einsum("nij,nj->ni", a, x) - damping * x).norm(dim=1)


# A batch of systems with very different conditioning and scale, one per sample.
systems = st.lists(
    st.tuples(st.sampled_from([1.0, 10.0, 1e3, 1e6, 1e10]),     # condition number
              st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e8]),     # eigenvalue scale
              st.sampled_from([1e-20, 1e-3, 1.0, 1e5, 1e20])),  # rhs scale
    min_size=1, max_size=5)


def _batch(spec, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.stack([_spd(d, c, s, gen) for c, s, _ in spec])
    b = torch.stack([torch.randn(d, generator=gen, dtype=DT) * r for _, _, r in spec])
    return a, b


# --------------------------------------------------------------------------- batched CG


@PROPS
@given(spec=systems, d=st.integers(1, 6), seed=seeds, max_iter=st.integers(0, 12),
       warm=st.booleans())
def test_cg_batch_equals_each_sample_alone(spec, d, seed, max_iter, warm) -> None:
    """Per-sample independence: a converged sample is not disturbed by an ill-conditioned
    or diverging neighbour, and every sample's result equals its solve alone."""
    a, b = _batch(spec, d, seed)
    x0 = b * 0.5 if warm else None
    # the batch with the default periodic stop test: samples done early stay frozen while
    # the others iterate on
    res = batched_cg(_matvec(a), b, x0=x0, max_iter=max_iter, tol=1e-8)
    for i in range(len(b)):
        one = batched_cg(_matvec(a[i:i + 1]), b[i:i + 1],
                         x0=None if x0 is None else x0[i:i + 1], max_iter=max_iter, tol=1e-8,
                         check_every=1)
        torch.testing.assert_close(res.solution[i:i + 1], one.solution, rtol=1e-12, atol=0)
        torch.testing.assert_close(res.residual_norm[i:i + 1], one.residual_norm,
                                   rtol=1e-12, atol=0)
        assert bool(res.converged[i]) == bool(one.converged[0])
        assert bool(res.breakdown[i]) == bool(one.breakdown[0])


@PROPS
@given(spec=systems, d=st.integers(1, 6), seed=seeds)
def test_cg_converged_flag_agrees_with_true_residual(spec, d, seed) -> None:
    """float64, tol 1e-6 (above sqrt(eps), so the recursion's residual is reported): a
    "converged" sample's true residual is within tol·‖b‖ up to the recursion's drift
    (~eps·cond(A)·‖b‖ per step, bounded here by 1e-6·‖b‖ for cond ≤ 1e10 and ≤ 12 steps),
    and an unconverged one's reported residual is above the threshold."""
    a, b = _batch(spec, d, seed)
    tol = 1e-6
    res = batched_cg(_matvec(a), b, max_iter=4 * d, tol=tol)
    true = _true_residual(a, b, res.solution)
    b_norm = b.norm(dim=1)
    assert torch.isfinite(res.solution).all()
    assert not res.breakdown.any()  # SPD: no negative curvature can be met
    for i in range(len(b)):
        if res.converged[i]:
            assert res.residual_norm[i] <= tol * b_norm[i]
            assert true[i] <= 2 * tol * b_norm[i], (true[i], b_norm[i])
        else:
            assert res.residual_norm[i] > tol * b_norm[i]
        # the reported residual is the true one up to the drift
        assert abs(res.residual_norm[i] - true[i]) <= 1e-6 * b_norm[i]


@PROPS
@given(spec=systems, d=st.integers(1, 6), seed=seeds, exp=st.integers(-60, 60))
def test_cg_is_exactly_homogeneous_in_b(spec, d, seed, exp) -> None:
    """CG is linear in b: solving for 2^k·b gives 2^k times the solution, bit for bit (the
    solver rescales each sample by a power of two), with the same flags."""
    a, b = _batch(spec, d, seed)
    c = 2.0 ** exp
    r1 = batched_cg(_matvec(a), b, max_iter=8, tol=1e-8)
    r2 = batched_cg(_matvec(a), b * c, max_iter=8, tol=1e-8)
    assert torch.equal(r2.solution, r1.solution * c)
    assert torch.equal(r2.converged, r1.converged)
    assert torch.equal(r2.breakdown, r1.breakdown)


@PROPS
@given(spec=systems, d=st.integers(1, 5), seed=seeds,
       damping=st.sampled_from([0.0, 1e-3, 0.5, 10.0]))
def test_cg_damping_equals_shifted_matrix(spec, d, seed, damping) -> None:
    """``damping`` δ solves (A + δI)v = b, the same as passing A + δI."""
    a, b = _batch(spec, d, seed)
    shifted = a + damping * torch.eye(d, dtype=DT)
    r1 = batched_cg(_matvec(a), b, max_iter=3 * d, tol=1e-9, damping=damping)
    r2 = batched_cg(_matvec(shifted), b, max_iter=3 * d, tol=1e-9)
    scale = b.norm(dim=1, keepdim=True) / torch.linalg.eigvalsh(shifted)[:, :1]
    assert ((r1.solution - r2.solution).abs() <= 1e-6 * scale).all()
    # damped residuals are reported against A + δI
    true = _true_residual(a, b, r1.solution, damping)
    conv = r1.converged
    assert (true[conv] <= 2e-9 * b.norm(dim=1)[conv] + 1e-6 * b.norm(dim=1)[conv]).all()


@PROPS
@given(d=st.integers(2, 6), seed=seeds, n=st.integers(1, 4),
       neg=st.lists(st.booleans(), min_size=4, max_size=4))
def test_cg_indefinite_systems_flag_breakdown_and_stay_finite(d, seed, n, neg) -> None:
    """Negative-definite samples (pᵀAp < 0 on every p) report breakdown with a finite (zero)
    solution and never "converged"; their SPD neighbours are solved as if alone."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.stack([_spd(d, 10.0, 1.0, gen) for _ in range(n)])
    sign = torch.tensor([-1.0 if s else 1.0 for s in neg[:n]], dtype=DT)
    a = a * sign.view(-1, 1, 1)
    b = torch.randn(n, d, generator=gen, dtype=DT)
    res = batched_cg(_matvec(a), b, max_iter=3 * d, tol=1e-10)
    assert torch.isfinite(res.solution).all()
    bad = sign < 0
    assert torch.equal(res.breakdown, bad)
    assert not (res.converged & bad).any()
    assert (res.solution[bad] == 0).all()  # frozen before its first step
    ref = torch.linalg.solve(a[~bad], b[~bad])
    torch.testing.assert_close(res.solution[~bad], ref, rtol=1e-7, atol=1e-9)


@PROPS
@given(d=st.integers(1, 6), seed=seeds, n=st.integers(1, 4),
       zero=st.lists(st.booleans(), min_size=4, max_size=4))
def test_cg_zero_rhs_is_solved_by_zero(d, seed, n, zero) -> None:
    """b_i = 0 has the exact solution 0: reported converged with solution 0 and residual 0,
    with or without a warm start, without disturbing the other samples."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.stack([_spd(d, 100.0, 1.0, gen) for _ in range(n)])
    b = torch.randn(n, d, generator=gen, dtype=DT)
    z = torch.tensor(zero[:n])
    b[z] = 0.0
    for x0 in (None, torch.randn(n, d, generator=gen, dtype=DT)):
        res = batched_cg(_matvec(a), b, x0=x0, max_iter=3, tol=1e-6)
        assert res.converged[z].all()
        assert (res.solution[z] == 0).all()
        assert (res.residual_norm[z] == 0).all()


@PROPS
@given(spec=systems, d=st.integers(1, 6), seed=seeds)
def test_cg_float32_agrees_with_float64(spec, d, seed) -> None:
    """A float32 solve of the same systems is the float64 one to float32 accuracy where
    the system is well conditioned (cond ≤ 1e3), and is finite and flagged everywhere."""
    a, b = _batch(spec, d, seed)
    r64 = batched_cg(_matvec(a), b, max_iter=4 * d, tol=1e-5)
    r32 = batched_cg(_matvec(a.float()), b.float(), max_iter=4 * d, tol=1e-5)
    assert r32.solution.dtype == torch.float32
    assert torch.isfinite(r32.solution).all() and torch.isfinite(r32.residual_norm).all()
    cond = torch.tensor([c for c, _, _ in spec])
    ok = (cond <= 1e3) & r64.converged & r32.converged
    ref = torch.linalg.solve(a, b)
    err = (r32.solution.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert (err[ok] <= 1e-5 * cond[ok].double() * 10).all(), err


@PROPS
@given(n=st.integers(2, 4), d=st.integers(2, 5), seed=seeds)
def test_cg_noncontiguous_inputs(n, d, seed) -> None:
    """A transposed (non-contiguous) b, or b and x0 with a trailing stride, give the same
    solve as contiguous copies."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.stack([_spd(d, 10.0, 1.0, gen) for _ in range(n)])
    b = torch.randn(d, n, generator=gen, dtype=DT).T
    x0 = torch.randn(n, 2 * d, generator=gen, dtype=DT)[:, ::2]
    assert not b.is_contiguous() and not x0.is_contiguous()
    r1 = batched_cg(_matvec(a), b, x0=x0, max_iter=3 * d, tol=1e-10)
    r2 = batched_cg(_matvec(a), b.contiguous(), x0=x0.contiguous(), max_iter=3 * d, tol=1e-10)
    torch.testing.assert_close(r1.solution, r2.solution, rtol=1e-9, atol=1e-12)
    assert torch.equal(r1.converged, r2.converged)


# --------------------------------------------------------------------------- implicit gradient


@PROPS
@given(n=st.integers(1, 4), d=st.integers(1, 4), k=st.integers(1, 3), seed=seeds,
       hvp_mode=st.sampled_from(["exact", "finite-difference"]))
def test_implicit_gradient_matches_closed_form_quadratic(n, d, k, seed, hvp_mode) -> None:
    """T_i(x, θ) = ½xᵀA_i(θ)x − b_i(θ)ᵀx with A_i(θ) = S_i + Σ_j θ_j² P_ij (SPD) and
    b_i(θ) = B_i θ: x* = A⁻¹b, and the adjoint gradient of L = Σ c_i·x*_i equals the
    autograd gradient through torch.linalg.solve, for any batch order."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.stack([_spd(d, 5.0, 1.0, gen) for _ in range(n)])
    pm = torch.randn(n, k, d, d, generator=gen, dtype=DT)
    pm = pm @ pm.transpose(-1, -2) / d  # PSD pieces
    bm = torch.randn(n, d, k, generator=gen, dtype=DT)
    c = torch.randn(n, d, generator=gen, dtype=DT)
    theta0 = torch.randn(k, generator=gen, dtype=DT)

    def system(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = theta0.clone().requires_grad_(True)
        a = s[order] + torch.einsum("j,njde->nde", theta.square(), pm[order])
        b = torch.einsum("ndj,j->nd", bm[order], theta)
        return theta, a, b

    # reference: autograd through the dense solve
    theta, a, b = system(torch.arange(n))
    x_star = torch.linalg.solve(a, b)
    (ref,) = torch.autograd.grad((c * x_star).sum(), theta)

    for order in (torch.arange(n), torch.arange(n).flip(0)):
        theta, a, b = system(order)
        xs = torch.linalg.solve(a, b).detach()

        def inner(x, a=a, b=b):
            return (0.5 * torch.einsum("nd,nde,ne->n", x, a, x) - (b * x).sum(1)).sum()

        out = implicit_gradient(inner, xs, [theta], c[order], cg_max_iter=50, cg_tol=1e-12,
                                hvp=hvp_mode)
        assert out.cg.converged.all() and not out.cg.breakdown.any()
        tol = 1e-8 if hvp_mode == "exact" else 1e-4  # FD: O(fd_eps²) relative error
        torch.testing.assert_close(out.grads[0], ref, rtol=tol, atol=tol)


def test_cg_warm_started_zero_rhs_regression() -> None:
    """Regression: b_i = 0 with a warm start x0_i ≠ 0 ran to max_iter and was reported
    unconverged (its threshold tol·‖b_i‖ = 0 is unreachable in floating point)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([_spd(2, 100.0, 1.0, gen) for _ in range(2)])
    b = torch.randn(2, 2, generator=gen, dtype=DT)
    b[1] = 0.0
    x0 = torch.randn(2, 2, generator=gen, dtype=DT)
    res = batched_cg(_matvec(a), b, x0=x0, max_iter=3, tol=1e-6)
    assert res.converged.tolist() == [True, True]
    assert (res.solution[1] == 0).all() and res.residual_norm[1] == 0
    torch.testing.assert_close(res.solution[0], torch.linalg.solve(a[0], b[0]))


# --------------------------------------------------------------------------- localisation

# Small integer-valued maps: exact under +, × by powers of two and the transforms below, with
# many ties (quantised maps, binary maps, constant maps).
def _maps(max_n: int = 3, max_side: int = 3, values: int = 4):
    @st.composite
    def build(draw):
        n = draw(st.integers(1, max_n))
        h = draw(st.integers(1, max_side))
        w = draw(st.integers(2, max_side + 1))
        vals = draw(st.lists(st.integers(-values, values), min_size=n * h * w,
                             max_size=n * h * w))
        ann = draw(st.lists(st.booleans(), min_size=n * h * w, max_size=n * h * w))
        m = torch.tensor(vals, dtype=DT).view(n, h, w)
        a = torch.tensor(ann).view(n, h, w)
        return m, a

    return build()


def _rank_accuracy_by_enumeration(m: torch.Tensor, a: torch.Tensor) -> float:
    """Mean over every tie order (all pixel permutations as tie-breakers) of the share of A
    among the |A| top-ranked pixels: the expected score rank_accuracy defines."""
    vals, ann = m.flatten().tolist(), a.flatten().tolist()
    k = sum(ann)
    if k == 0:
        return float("nan")
    total, count = 0.0, 0
    for perm in itertools.permutations(range(len(vals))):
        top = sorted(range(len(vals)), key=lambda i: (-vals[i], perm[i]))[:k]
        total += sum(ann[i] for i in top) / k
        count += 1
    return total / count


@PROPS
@given(data=_maps(max_n=2, max_side=2, values=2))
def test_rank_accuracy_is_the_expected_score_over_tie_orders(data) -> None:
    m, a = data
    got = rank_accuracy(m, a)
    for i in range(len(m)):
        want = _rank_accuracy_by_enumeration(m[i], a[i])
        if math.isnan(want):
            assert torch.isnan(got[i])
        else:
            assert got[i].item() == pytest.approx(want, abs=1e-12)


@PROPS
@given(data=_maps(), shift=st.integers(-5, 5), exp=st.integers(-3, 3))
def test_rank_accuracy_invariant_to_monotone_transforms(data, shift, exp) -> None:
    """Only the ranking (ties included) matters: any strictly increasing transform of the
    map gives the same score; scores lie in [0, 1]."""
    m, a = data
    base = rank_accuracy(m, a)
    for t in (m * 2.0 ** exp + shift, m ** 3 + 5 * m, torch.exp(m / 4), m.long()):
        # an integer map's score is float32 (the shares are rounded to float32's precision)
        atol = 1e-6 if t.dtype == torch.long else 1e-12
        torch.testing.assert_close(rank_accuracy(t, a), base, rtol=0, atol=atol,
                                   equal_nan=True, check_dtype=False)
    ok = ~torch.isnan(base)
    assert ((base[ok] >= 0) & (base[ok] <= 1)).all()


@PROPS
@given(data=_maps(), shift=st.integers(-5, 5), exp=st.integers(-3, 3),
       threshold=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_thresholded_scores_invariant_to_positive_affine_maps(data, shift, exp,
                                                              threshold) -> None:
    """cam_precision and IoU/Dice binarise the min–max normalised map, so a·m + c (a > 0)
    scores the same; all scores lie in [0, 1] and Dice = 2·IoU / (1 + IoU)."""
    m, a = data
    t = m * 2.0 ** exp + shift  # exact in float64 for these small integers
    prec, (iou, dice) = cam_precision(m, a, threshold), iou_dice(m, a, threshold)
    assert torch.equal(cam_precision(t, a, threshold), prec)
    iou2, dice2 = iou_dice(t, a, threshold)
    assert torch.equal(iou2, iou) and torch.equal(dice2, dice)
    for s in (prec, iou, dice):
        assert ((s >= 0) & (s <= 1)).all()
    torch.testing.assert_close(dice, 2 * iou / (1 + iou), rtol=0, atol=1e-12)


@PROPS
@given(data=_maps(), threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_cam_precision_matches_its_definition(data, threshold) -> None:
    """|{norm ≥ t} ∩ A| / |{norm ≥ t}| with norm the per-sample min–max normalisation, and 0
    for a constant map; normalize_maps spans exactly [0, 1] for non-constant maps."""
    m, a = data
    got = cam_precision(m, a, threshold)
    norm, empty = normalize_maps(m)
    for i in range(len(m)):
        lo, hi = m[i].min(), m[i].max()
        assert bool(empty[i]) == bool(hi == lo)
        if hi == lo:
            assert got[i] == 0
            continue
        assert norm[i].min() == 0 and norm[i].max() == 1
        sel = (m[i] - lo) / (hi - lo) >= threshold
        want = (sel & a[i]).sum().item() / max(sel.sum().item(), 1)
        assert got[i].item() == pytest.approx(want, abs=1e-12)


@PROPS
@given(data=_maps(), scale=st.floats(1e-30, 1e30))
def test_mass_in_mask_matches_definition_and_is_scale_free(data, scale) -> None:
    """Σ s·M / Σ s with s = max(map, 0): in [0, 1], 0 for a map with no positive mass, and
    the same for any positive rescaling (including ones near float32's range)."""
    m, a = data
    got = mass_in_mask(m, a)
    s = m.clamp_min(0).flatten(1)
    tot = s.sum(1)
    want = torch.where(tot > 0, (s * a.flatten(1)).sum(1) / tot.clamp_min(1e-300),
                       torch.zeros_like(tot))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert ((got >= 0) & (got <= 1)).all()
    torch.testing.assert_close(mass_in_mask(m * scale, a), got, rtol=1e-9, atol=1e-12)
    m32 = (m.float() * np.float32(min(scale, 1e30) / 8)).float()
    if torch.isfinite(m32).all() and (m32 != 0).eq(m != 0).all():
        torch.testing.assert_close(mass_in_mask(m32, a).double(), got, rtol=1e-5, atol=1e-6)


@PROPS
@given(data=_maps())
def test_localisation_scores_are_per_sample_and_layout_free(data) -> None:
    """Each sample's score is its score alone (no batch coupling); (N, 1, H, W) maps and
    masks score as (N, H, W); float16 maps (exactly representable here) score as float32."""
    m, a = data
    fns = [cam_precision, mass_in_mask, rank_accuracy,
           lambda m, a: iou_dice(m, a)[0], lambda m, a: iou_dice(m, a)[1]]
    for fn in fns:
        full = fn(m, a)
        for i in range(len(m)):
            torch.testing.assert_close(fn(m[i:i + 1], a[i:i + 1]), full[i:i + 1],
                                       equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(fn(m[:, None], a[:, None]), full, equal_nan=True,
                                   rtol=0, atol=0)
        torch.testing.assert_close(fn(m.half(), a).double(), fn(m.float(), a).double(),
                                   equal_nan=True, rtol=0, atol=1e-6)


@PROPS
@given(data=_maps(), exp=st.sampled_from([-149, -140, -126, -60, 0, 60, 124, 125, 126]),
       threshold=st.sampled_from([0.25, 0.5, 0.75]))
def test_thresholded_scores_hold_over_the_whole_float32_range(data, exp, threshold) -> None:
    """float32 maps scaled by any power of two that keeps them finite (up to ~3e38, down to
    subnormals where the integers stay exact) score as the unscaled map."""
    m, a = data
    m32 = m.float()
    t = m32 * 2.0 ** exp
    span = float(m.abs().max())
    if not torch.isfinite(t).all() or not torch.equal(t / 2.0 ** exp, m32) or span == 0:
        return  # overflowed, or lost bits in the subnormal range
    assert torch.equal(cam_precision(t, a, threshold), cam_precision(m32, a, threshold))
    assert torch.equal(iou_dice(t, a, threshold)[0], iou_dice(m32, a, threshold)[0])
    norm, empty = normalize_maps(t)
    assert torch.isfinite(norm).all() and torch.equal(empty, normalize_maps(m32)[1])


def test_normalize_maps_wide_float32_range_regression() -> None:
    """Regression: a float32 map spanning [-3e38, 3e38] overflowed hi − lo to inf, so every
    normalised value was 0 or NaN and cam_precision silently scored 0 instead of 1/3."""
    m = torch.tensor([[[-3e38, 3e38], [0.0, 1e38]]])
    a = torch.tensor([[[False, True], [False, False]]])
    norm, empty = normalize_maps(m)
    assert not empty.any()
    torch.testing.assert_close(norm, torch.tensor([[[0.0, 1.0], [0.5, 2 / 3]]]))
    # selected (≥ 0.5): 3e38 (annotated), 0 and 1e38 (not)
    torch.testing.assert_close(cam_precision(m, a), torch.tensor([1 / 3]))
    iou, dice = iou_dice(m, a)
    torch.testing.assert_close(iou, torch.tensor([1 / 3]))
    torch.testing.assert_close(dice, torch.tensor([0.5]))


# --------------------------------------------------------------------------- deletion


class _SumModel(nn.Module):
    """logits (0, Σ pixels of channel 0): deleting a pixel of value v lowers logit 1 by v."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0].flatten(1).sum(1) + self.dummy
        return torch.stack([torch.zeros_like(s), s], 1)


@st.composite
def _images(draw):
    """(N, 2, H, W) float64 images with distinct positive integer pixels in channel 0."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 4))
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    ch0 = torch.stack([torch.randperm(h * w, generator=gen) + 1 for _ in range(n)])
    x = torch.stack([ch0.view(n, h, w).to(DT) / (h * w),
                     torch.rand(n, h, w, generator=gen, dtype=DT)], 1)
    return x


@PROPS
@given(x=_images(), shift=st.integers(-3, 3), exp=st.integers(-4, 4))
def test_deletion_removes_the_top_k_pixels_of_the_map(x, shift, exp) -> None:
    """With the map equal to channel 0 (distinct values), deleting the top-k pixels lowers
    logit 1 by exactly their sum: drop = σ(Σx) − σ(Σx − top-k sum). The drops do not change
    when the map is shifted or scaled by a positive factor, and each sample's drop is its
    drop alone."""
    model = _SumModel()
    maps = x[:, 0]
    numel = maps[0].numel()
    fr = (0.002, 0.1, 0.5, 1.0)
    got = deletion_scores(model, x, maps, 1, fractions=fr)
    total = maps.flatten(1).sum(1)
    srt = maps.flatten(1).sort(1, descending=True).values
    for f in fr:
        k = max(1, int(round(f * numel)))
        want = torch.sigmoid(total) - torch.sigmoid(total - srt[:, :k].sum(1))
        torch.testing.assert_close(got[f], want, rtol=1e-12, atol=1e-12)
    moved = deletion_scores(model, x, maps * 2.0 ** exp + shift, 1, fractions=fr)
    for f in fr:
        assert torch.equal(moved[f], got[f])
    for i in range(len(x)):
        one = deletion_scores(model, x[i:i + 1], maps[i:i + 1], 1, fractions=fr)
        for f in fr:
            torch.testing.assert_close(one[f], got[f][i:i + 1], rtol=1e-12, atol=0)


@PROPS
@given(x=_images(), shift=st.integers(-3, 3))
def test_deletion_of_tied_maps_is_shift_invariant_and_exact_in_count(x, shift) -> None:
    """A quantised map with ties: k pixels are removed exactly (drop of the all-ones image
    = σ(N) − σ(N − k)), and a constant added to the map changes nothing."""
    model = _SumModel()
    ones = torch.ones_like(x)
    n, numel = len(x), x[0, 0].numel()
    maps = (x[:, 0] * 3).floor()  # ties
    fr = (0.01, 0.3, 0.7)
    got = deletion_scores(model, ones, maps, torch.ones(n, dtype=torch.long), fractions=fr)
    for f in fr:
        k = max(1, int(round(f * numel)))
        want = torch.sigmoid(torch.tensor(float(numel), dtype=DT)) - torch.sigmoid(
            torch.tensor(float(numel - k), dtype=DT))
        torch.testing.assert_close(got[f], want.expand(n), rtol=1e-12, atol=1e-12)
    got_x = deletion_scores(model, x, maps, 1, fractions=fr)
    moved = deletion_scores(model, x, maps + shift, 1, fractions=fr)
    for f in fr:
        assert torch.equal(moved[f], got_x[f])


# --------------------------------------------------------------------------- classification


@st.composite
def _predictions(draw):
    """(probs (N, C), labels (N,)) with coarse probabilities (many ties) summing to 1."""
    c = draw(st.integers(2, 4))
    n = draw(st.integers(2, 12))
    counts = draw(st.lists(st.lists(st.integers(0, 3), min_size=c, max_size=c),
                           min_size=n, max_size=n))
    counts = np.array(counts, np.float64) + 1e-9  # no all-zero row
    probs = counts / counts.sum(1, keepdims=True)
    labels = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return probs, labels


@PROPS
@given(pred=_predictions())
def test_classification_metrics_agree_with_scikit_learn(pred) -> None:
    """accuracy, balanced accuracy and AUC (binary; one-vs-rest macro over the classes the
    split holds) equal scikit-learn's on inputs with ties, and do not depend on sample
    order; tensors give the same as arrays."""
    probs, labels = pred
    got = classification_metrics(probs, labels)
    pred_cls = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred_cls))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(labels, pred_cls)
    assert got["balanced_accuracy"] == pytest.approx(bal)
    present = np.unique(labels)
    c = probs.shape[1]
    if len(present) < 2:
        assert got["auc"] is None
    elif c == 2:
        assert got["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    else:
        want = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])
        assert got["auc"] == pytest.approx(want, abs=1e-12)
        if len(present) == c:
            assert got["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    perm = np.arange(len(labels))[::-1]
    again = classification_metrics(probs[perm], labels[perm])
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert again[key] == pytest.approx(got[key])
    as_t = classification_metrics(torch.tensor(probs, dtype=torch.float32),
                                  torch.tensor(labels))
    assert as_t["accuracy"] == pytest.approx(got["accuracy"])


def test_multiclass_auc_keeps_ties_of_a_saturated_softmax_regression() -> None:
    """Regression: the one-vs-rest AUC was taken on rows renormalised to sum 1, which broke
    the ties of an overconfident float32 softmax (every row holds an exact 1.0, ranked by its
    ~1e-13 tails): 0.5293 against scikit-learn's 0.5264 on the same probabilities. Also
    1 − 1e-16 renormalisation of coarse rows broke exact ties (0.708 against 0.75)."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (60,), generator=gen)
    logits = torch.randn(60, 3, generator=gen) * 3
    logits[torch.arange(60), torch.randint(0, 3, (60,), generator=gen)] += 40
    p = logits.softmax(1)
    assert bool((p == 1).any(1).all())
    want = roc_auc_score(y.numpy(), p.double().numpy(), multi_class="ovr")
    assert classification_metrics(p, y)["auc"] == pytest.approx(want, abs=1e-12)

    counts = np.array([[1, 1, 1]] * 4 + [[0, 1, 2]], np.float64) + 1e-9
    probs = counts / counts.sum(1, keepdims=True)
    labels = np.array([0, 0, 0, 1, 2])
    assert classification_metrics(probs, labels)["auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-12)  # 0.75


# --------------------------------------------------------------------------- WBP (black box)


def _bias_free_relu_net(c: int, seed: int, inplace: bool) -> nn.Module:
    """Conv/BatchNorm/ReLU/pooling without any additive constant (BN: zero mean and β)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False)).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].bias.zero_()
    return net


@PROPS
@given(seed=seeds, n=st.integers(1, 3), c=st.integers(1, 2), side=st.sampled_from([2, 4, 6]),
       scale=st.floats(1e-3, 1e3), inplace=st.booleans(), train=st.booleans())
def test_wbp_is_complete_and_homogeneous_on_bias_free_relu_nets(seed, n, c, side, scale,
                                                                inplace, train) -> None:
    """x^L = W̃⁰x: on a bias-free conv/BatchNorm/ReLU/pooling network the map of class m sums to
    logit m exactly, scales with a positive rescaling of the input, and a sample's map is
    its map alone; the model's modes, in-place flags and hooks are left as they were."""
    from causalign.explain.wbp import WBP

    net = _bias_free_relu_net(c, seed, inplace).train(train)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=gen, dtype=DT)
    target = torch.randint(0, 3, (n,), generator=gen)
    maps = WBP(net).attribute(x, target)
    with torch.no_grad():
        logits = net.eval()(x).gather(1, target[:, None]).squeeze(1)
    net.train(train)
    torch.testing.assert_close(maps.flatten(1).sum(1), logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(WBP(net).attribute(x * scale, target), maps * scale,
                               rtol=1e-9, atol=1e-12)
    for i in range(n):
        torch.testing.assert_close(WBP(net).attribute(x[i:i + 1], target[i:i + 1]),
                                   maps[i:i + 1], rtol=1e-12, atol=1e-14)
    assert all(m.training == train for m in net.modules())
    assert net[5].inplace == inplace
    assert int(net[1].num_batches_tracked) == 0  # BatchNorm statistics untouched
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


@PROPS
@given(seed=seeds, n=st.integers(1, 3))
def test_wbp_centres_sigmoid_activations(seed, n) -> None:
    """linear → Sigmoid → linear without biases: W̃⁰x = W₂(σ(z) − σ(0)), so the map of class m
    sums to logit m − ½·Σ_j W₂[m, j] (σ(0) = ½ is left out like a bias)."""
    from causalign.explain.wbp import WBP

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(),
                        nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(n, 5, dtype=DT) * 3
    for m in (0, 1):
        maps = WBP(net).attribute(x, m)
        with torch.no_grad():
            want = net(x)[:, m] - 0.5 * net[2].weight[m].sum()
        torch.testing.assert_close(maps.sum(1), want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- CCCE


@st.composite
def _monotone_tables(draw):
    """A monotone P(Y=1 | a) over p binary attributes (p(a) ≤ p(a') for a ⪯ a'), as the
    running max of random values over the subsets below each configuration."""
    p = draw(st.integers(1, 4))
    # coarse values: the running max then has plateaus, i.e. attributes with no effect alone
    values = st.one_of(st.sampled_from([0.05, 0.2, 0.5, 0.8]), st.floats(0.01, 0.99))
    raw = draw(st.lists(values, min_size=2 ** p, max_size=2 ** p))
    configs = list(itertools.product((0, 1), repeat=p))
    table = {}
    for a in configs:
        below = [b for b in configs if all(x <= y for x, y in zip(b, a, strict=True))]
        table[a] = max(raw[configs.index(b)] for b in below)
    return p, table


class _TableModel:
    def __init__(self, table: dict) -> None:
        self.table = table

    def prob(self, a: np.ndarray) -> np.ndarray:
        return np.array([self.table[tuple(int(v) for v in row)] for row in np.asarray(a)])


def _counterfactual_effect(table: dict, a: tuple, y: int, s: tuple) -> float:
    """E(Y_{A_S=1} − Y_{A_S=0} | A=a, Y=y) under the monotone structural model
    Y_a = 1{U ≤ p(a)}, U ~ Uniform(0, 1) shared by all interventions: given (a, y), U is
    uniform on I = [0, p(a)] (y = 1) or (p(a), 1] (y = 0)."""
    lo, hi = (0.0, table[a]) if y == 1 else (table[a], 1.0)

    def share(value: int) -> float:  # P(Y_{A_S=value} = 1 | U ∈ I)
        cf = tuple(value if j in s else v for j, v in enumerate(a))
        return max(0.0, min(hi, table[cf]) - lo) / (hi - lo)

    return share(1) - share(0)


@PROPS
@given(model=_monotone_tables(), seed=seeds, max_size=st.integers(1, 3))
def test_ccce_equals_the_enumerated_counterfactual_effect(model, seed, max_size) -> None:
    """Zhao et al.'s identification: under exogeneity and monotonicity CCCE(S) from P(Y | A)
    equals the counterfactual effect computed by integrating the structural model."""
    p, table = model
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (6, p))
    y = rng.integers(0, 2, 6)
    sets = subsets(p, max_size)
    got = ccce_scores(_TableModel(table), a, y, sets)
    for i in range(len(a)):
        for j, s in enumerate(sets):
            want = _counterfactual_effect(table, tuple(int(v) for v in a[i]), int(y[i]), s)
            assert got[i, j] == pytest.approx(want, abs=1e-12), (a[i], y[i], s)


@PROPS
@given(model=_monotone_tables(), seed=seeds, tol=st.sampled_from([0.0, 1e-6, 0.05, 0.5, 1.0]))
def test_causal_attribution_picks_the_smallest_near_best_subset(model, seed, tol) -> None:
    """The chosen S has a positive effect and scores within tol of the best; no smaller
    subset with an effect does; of its size it has the top score; r marks exactly S; no
    positive effect → no attribution; rows with a missing attribute get none; and each row's
    result is independent of the others."""
    p, table = model
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (16, p)).astype(np.float64)
    y = rng.integers(0, 2, 16)
    a[0, 0] = np.nan
    m = _TableModel(table)
    res = causal_attribution(m, a, y, max_size=3, tol=tol)
    sets = res.sets
    assert not res.known[0] and res.subset[0] == -1 and not res.r[0].any()
    scores = ccce_scores(m, a[1:], y[1:], sets)
    size = np.array([len(s) for s in sets])
    for i in range(1, len(a)):
        sc = scores[i - 1]
        best = sc.max()
        if best <= 0:
            assert res.subset[i] == -1 and not res.r[i].any()
            continue
        j = res.subset[i]
        assert sc[j] > 0  # a subset without an effect is never named the cause
        assert sc[j] >= best - tol and res.score[i] == sc[j]
        assert not ((sc >= best - tol) & (sc > 0) & (size < size[j])).any()
        assert sc[j] == sc[size == size[j]].max()
        assert set(np.flatnonzero(res.r[i])) == set(sets[j])
    perm = rng.permutation(len(a))
    again = causal_attribution(m, a[perm], y[perm], max_size=3, tol=tol)
    assert np.array_equal(again.subset, res.subset[perm])
    assert np.array_equal(again.r, res.r[perm])


@settings(PROPS, max_examples=8)  # each example fits an L-BFGS-B model
@given(seed=seeds, p=st.integers(1, 4), n=st.integers(1, 30))
def test_fitted_label_models_are_monotone_probabilities(seed, p, n) -> None:
    """The monotone logistic model has non-negative weights (so P(Y=1 | a) never falls when
    an attribute is switched on), and the smoothed frequency is (n₁ + k·π)/(n + k) per cell;
    both give probabilities in [0, 1]."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (n, p))
    y = rng.integers(0, 2, n)
    logistic = fit_label_model(a, y, "logistic")
    assert (logistic.weights >= 0).all()
    configs = np.array(list(itertools.product((0, 1), repeat=p)))
    pr = logistic.prob(configs)
    assert ((pr >= 0) & (pr <= 1)).all()
    for i, j in itertools.product(range(len(configs)), repeat=2):
        if (configs[i] <= configs[j]).all():
            assert pr[i] <= pr[j] + 1e-12
    freq = fit_label_model(a, y, "frequency")
    assert isinstance(freq, SmoothedFrequency)
    prior = y.mean()
    for cfg, got in zip(configs, freq.prob(configs), strict=True):
        cell = (a == cfg).all(1)
        want = (y[cell].sum() + prior) / (cell.sum() + 1.0)
        assert got == pytest.approx(want, abs=1e-12)


def test_causal_attribution_ignores_near_best_subsets_without_effect_regression() -> None:
    """Regression: with tol (0.01) above the best score, a single attribute with CCCE 0 was
    "within tol of the best" and, being smaller, was named the cause; only the pair has an
    effect (each attribute alone is redundant: an OR-like P(Y | A))."""
    table = {(0, 0): 0.5, (1, 0): 0.504, (0, 1): 0.504, (1, 1): 0.504}
    res = causal_attribution(_TableModel(table), np.array([[1, 1]]), np.array([1]), tol=0.01)
    assert res.sets[res.subset[0]] == (0, 1)
    assert res.r.tolist() == [[True, True]]
    assert res.score[0] == pytest.approx(1 - 0.5 / 0.504)


@st.composite
def _quadratic(draw):
    """A batch of strongly convex quadratics T_i = ½xᵀA_i(θ)x − b_i(θ)ᵀx (see above)."""
    n, d, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(seeds))
    s = torch.stack([_spd(d, 5.0, 1.0, gen) for _ in range(n)])
    pm = torch.randn(n, k, d, d, generator=gen, dtype=DT)
    pm = pm @ pm.transpose(-1, -2) / d
    bm = torch.randn(n, d, k, generator=gen, dtype=DT)
    c = torch.randn(n, d, generator=gen, dtype=DT)
    theta0 = torch.randn(k, generator=gen, dtype=DT)
    return s, pm, bm, c, theta0


def _ab(q, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, pm, bm, _, _ = q
    return (s + torch.einsum("j,njde->nde", theta.square(), pm),
            torch.einsum("ndj,j->nd", bm, theta))


@PROPS
@given(q=_quadratic(), damping=st.sampled_from([0.0, 0.1, 2.0]), warm=st.booleans())
def test_implicit_gradient_damping_and_warm_start_closed_form(q, damping, warm) -> None:
    """With damping δ the adjoint solves (A + δI)v = c, so dL/dθ = −(∂g/∂θ)ᵀ(A + δI)⁻¹c with
    g = A(θ)x* − b(θ) at fixed x*; a warm start (any x0) does not change the converged
    result; implicit_argmin delivers the same gradient through backward()."""
    from causalign.implicit import implicit_argmin

    c, theta0 = q[3], q[4]
    theta = theta0.clone().requires_grad_(True)
    a, b = _ab(q, theta)
    xs = torch.linalg.solve(a, b).detach()
    d = xs.shape[1]
    v = torch.linalg.solve(a.detach() + damping * torch.eye(d, dtype=DT), c)
    g = torch.einsum("nde,ne->nd", a, xs) - b
    (ref,) = torch.autograd.grad(g, theta, grad_outputs=-v)

    def inner(x):
        a, b = _ab(q, theta)
        return (0.5 * torch.einsum("nd,nde,ne->n", x, a, x) - (b * x).sum(1)).sum()

    x0 = torch.randn_like(c) if warm else None
    out = implicit_gradient(inner, xs, [theta], c, cg_max_iter=60, cg_tol=1e-12,
                            damping=damping, cg_x0=x0)
    assert out.cg.converged.all()
    torch.testing.assert_close(out.grads[0], ref, rtol=1e-8, atol=1e-10)

    leaf = theta0.clone().requires_grad_(True)

    def inner_leaf(x):
        a, b = _ab(q, leaf)
        return (0.5 * torch.einsum("nd,nde,ne->n", x, a, x) - (b * x).sum(1)).sum()

    x_att = implicit_argmin(inner_leaf, xs, [leaf], cg_max_iter=60, cg_tol=1e-12,
                            damping=damping)
    torch.testing.assert_close(x_att, xs, rtol=0, atol=0)
    (x_att * c).sum().backward()
    torch.testing.assert_close(leaf.grad, ref, rtol=1e-8, atol=1e-10)


@PROPS
@given(spec=systems, d=st.integers(1, 6), seed=seeds,
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_cg_verified_convergence_is_true(spec, d, seed, dtype) -> None:
    """With ``verify`` below sqrt(eps) (1e-10 in float64, 1e-5 in float32) a "converged"
    claim holds for the true residual b − Av (up to the rounding of recomputing it here,
    eps·‖A‖‖v‖), whatever the recursion's drift."""
    a, b = _batch(spec, d, seed)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = batched_cg(_matvec(a.to(dtype)), b.to(dtype), max_iter=3 * d, tol=tol, verify=True)
    eps = torch.finfo(dtype).eps
    true = _true_residual(a.to(dtype), b.to(dtype), res.solution)
    a_norm = torch.linalg.matrix_norm(a.to(dtype).double(), ord=2)
    slack = 4 * d * eps * (a_norm * res.solution.double().norm(dim=1) + b.norm(dim=1))
    bn = b.to(dtype).double().norm(dim=1)
    for i in range(len(b)):
        if res.converged[i]:
            assert true[i] <= tol * bn[i] + slack[i], (true[i], tol * bn[i], slack[i])


@PROPS
@given(spec=systems, d=st.integers(1, 5), seed=seeds,
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_cg_low_precision_solutions_stay_finite(spec, d, seed, dtype) -> None:
    """Whatever the conditioning and scale (eigenvalues down to 1e-6, far below float16's
    comfortable range), a low-precision solve returns a finite solution and residual; a
    sample that cannot be solved in the dtype is flagged (breakdown or not converged),
    never returned as inf."""
    a, b = _batch(spec, d, seed)
    b = b.clamp(-6e4, 6e4) if dtype == torch.float16 else b
    res = batched_cg(_matvec(a), b.to(dtype), max_iter=3 * d, tol=1e-2)
    assert res.solution.dtype == dtype
    assert torch.isfinite(res.solution).all()
    assert torch.isfinite(res.residual_norm).all()
    assert not (res.converged & res.breakdown).any()


def test_cg_float16_step_overflow_regression() -> None:
    """Regression: A = 1e-5·I in float16 (b = 1e-3, true solution 100) overflowed the step
    α ≈ 1e5 and returned an all-inf solution and an inf residual; it is now flagged
    breakdown with the zero solution, and its neighbour is unaffected."""
    b = torch.full((2, 4), 1e-3, dtype=torch.float16)
    scale = torch.tensor([1e-5, 1e-3]).view(2, 1)
    res = batched_cg(lambda p: p * scale.to(p.dtype), b, max_iter=5, tol=1e-2)
    assert torch.isfinite(res.solution).all() and torch.isfinite(res.residual_norm).all()
    assert res.breakdown.tolist() == [True, False]
    assert res.converged.tolist() == [False, True]
    torch.testing.assert_close(res.solution[1].float(), torch.ones(4), rtol=1e-2, atol=0)


def test_cg_unrepresentable_solution_regression() -> None:
    """Regression: float16 A = 0.01·I, b = 6e4 (solution 6e6, beyond float16) converged in
    the solver's rescaled space and came back as an inf solution flagged "converged"; it is
    now flagged breakdown with the zero solution and that solution's residual ‖b‖."""
    b = torch.tensor([[6e4, -6e4], [1.0, 2.0]], dtype=torch.float16)
    res = batched_cg(lambda p: p * 0.01, b, max_iter=4, tol=1e-2)
    assert torch.isfinite(res.solution).all()
    assert res.converged.tolist() == [False, True]
    assert res.breakdown.tolist() == [True, False]
    assert (res.solution[0] == 0).all()
    torch.testing.assert_close(res.residual_norm[0], b[0].float().norm(), rtol=1e-3, atol=0)
    torch.testing.assert_close(res.solution[1].float(), torch.tensor([100.0, 200.0]),
                               rtol=1e-3, atol=0)
