"""Batched, matrix-free conjugate gradient for N independent SPD systems.

The implicit gradient of a per-sample argmin needs (H_i + δI) v_i = b_i for every sample i;
H is block-diagonal over the batch, so one batched matvec serves all N systems at once and
each system keeps its own step sizes and stopping state.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "CoupledSystemsError", "batched_cg"]


@dataclass
class CGResult:
    """Outcome of :func:`batched_cg`.

    ``iterations`` counts loop iterations run (the batch stops together); per-sample state is in
    ``residual_norm`` (‖b_i − (A_i + δI) v_i‖ as tracked by the recursion; recomputed from v_i
    with ``verify`` when ``tol`` < sqrt(machine eps), where the recursion's drift matters),
    ``converged`` and ``breakdown`` (non-positive or non-finite curvature met: that sample was
    frozen at its last finite iterate; or its solution lies beyond the dtype's range: it is
    returned as zero; a right-hand side that is not finite gives the zero solution and a NaN
    residual). A warm start ``x0`` that is not finite is replaced by zero for that sample.
    ``residual_norm`` is in at least float32 (a float16 system's residual may exceed float16's
    range).
    """

    solution: Tensor
    iterations: int
    residual_norm: Tensor
    converged: Tensor
    breakdown: Tensor
    nonfinite: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:  # built by hand (a direct solve): no product was taken
            self.nonfinite = torch.zeros_like(self.breakdown)


def _bdot(u: Tensor, v: Tensor) -> Tensor:
    """Per-sample inner product: reduce over every non-batch dim, in at least float32 (a
    float16 sum of squares overflows once a vector's norm passes 256)."""
    acc = torch.promote_types(u.dtype, torch.float32)
    return (u.to(acc) * v.to(acc)).reshape(u.shape[0], -1).sum(dim=1)


def _pow2_scale(b: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per sample, the power of two at or just above max |b_i| (1 where b_i is zero or not
    finite), shaped for broadcasting, in at least float32.

    CG is linear in b, so solving for b/s and multiplying the solution by s is the same solve;
    a power of two makes both divisions exact. Unscaled, ‖b‖² overflowed to inf for a
    float32 rhs ~1e20 or a float16 rhs of norm > 256 (reported as breakdown, solution 0),
    and underflowed to 0 for a float32 rhs ~1e-25 (reported converged at the solution 0)."""
    acc = torch.promote_types(b.dtype, torch.float32)
    amax = b.detach().to(acc).abs().reshape(b.shape[0], -1).amax(dim=1)
    ok = torch.isfinite(amax) & (amax > 0)
    _, exp = torch.frexp(torch.where(ok, amax, torch.ones_like(amax)))
    # max |b_i| >= 2^127 in float32: the power above it, 2^128, is inf (a rhs of 2e38 broke
    # down with solution 0); the largest finite power instead, b/s < 2. The exponent goes to
    # ldexp as a float of acc's dtype: torch 2.2's ldexp took 2^exp in float32 for an
    # integer exp, 0 below 2^-149, so a float64 rhs of 1e-200 was divided by 0.
    exp = exp.clamp(max=math.floor(math.log2(torch.finfo(acc).max))).to(acc)
    scale = torch.ldexp(torch.ones_like(amax), exp)
    return torch.where(ok, scale, torch.ones_like(amax)).view(shape)


def batched_cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-5,
    damping: float = 0.0,
    check_every: int = 5,
    verify: bool = False,
) -> CGResult:
    """Solve (A_i + damping·I) v_i = b_i for each sample i of ``b`` (shape (N, *dims)).

    ``matvec(p)`` must return A p for the whole batch and act block-diagonally (sample i of the
    output depends only on sample i of ``p``). A 1-D ``b`` (D,) is D independent 1×1 systems,
    not one D-dimensional system as in SciPy's and TorchOpt's cg: a ``matvec`` that mixes
    its entries is refused (`CoupledSystemsError`, a ValueError; two more products, a third
    before a refusal); pass ``b[None]`` for one system. Sample i stops when
    ‖r_i‖ <= tol·‖b_i‖; stopped samples are frozen by masking while the rest continue. The
    loop never synchronises with the host except for a cheap "anything still active?" test
    every ``check_every`` iterations.

    By default ``converged`` and ``residual_norm`` are the recursion's, as in SciPy's and
    TorchOpt's CG. With ``verify`` and ``tol`` below sqrt(machine eps), where the recursion
    drifts from the truth, a "converged" claim is checked against the true residual (one more
    ``matvec``). It is off by default because a float32 solve rarely attains such a tolerance:
    training would drop every sample, and a reference solve run to ``max_iter`` is still the
    most accurate one available. Leave it off when ``matvec`` is not a fixed linear map
    (finite-difference products: their noise, not the solve, would set that residual).
    """
    for name, t in (("b", b), ("x0", x0)):
        if t is not None and not isinstance(t, Tensor):
            # a NumPy b failed with "'numpy.ndarray' object has no attribute 'dim'"
            raise ValueError(f"{name} must be a torch.Tensor (N, ...), got "
                             f"{type(t).__name__}; pass torch.as_tensor({name})")
    if b.dim() < 1:
        raise ValueError("b must have a leading batch dimension")
    if not b.is_floating_point():  # integer iterates would truncate every step silently
        raise ValueError(f"b must be a floating-point tensor, got {b.dtype}")
    max_iter = iteration_count(max_iter, "max_iter", minimum=0)
    # `not tol >= 0` also catches NaN: a NaN or negative tolerance can never be met, so every
    # solve would run to max_iter and be reported unconverged, however exact.
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    # δ < 0 shifts the spectrum down: (A + δI) may be indefinite and the solve silently
    # differs from the damped one asked for (a sign slip, not a damping)
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != b {tuple(b.shape)}")
    n = b.shape[0]
    shape = (n,) + (1,) * (b.dim() - 1)
    if n == 0:  # nothing to solve (reshape(0, -1) in _bdot is ambiguous)
        empty = b.new_zeros(0)
        none = torch.zeros(0, dtype=torch.bool, device=b.device)
        return CGResult(solution=b.clone(), iterations=0, residual_norm=empty,
                        converged=none, breakdown=none.clone(), nonfinite=none.clone())

    def apply(p: Tensor) -> Tensor:
        out = matvec(p)
        # A (N, 1) product for an (N, D) system broadcast silently and CG just "did not
        # converge"; shape metadata costs no host sync.
        if not isinstance(out, Tensor) or out.shape != p.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"matvec must return a tensor shaped like its input "
                             f"{tuple(p.shape)}, got {got}")
        return out + damping * p if damping != 0.0 else out

    if b.dim() == 1 and n > 1 and max_iter > 0:
        _refuse_coupled_scalar_systems(matvec, b)

    # Solve for b/s (s a per-sample power of two) so that no inner product over- or
    # underflows; x and the residual are scaled back at the end.
    scale = _pow2_scale(b, shape)
    acc = scale.dtype  # inner products, step sizes and thresholds: at least float32
    b_in = b
    b = (b.to(acc) / scale).to(b.dtype)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = (x0.detach().to(acc) / scale).to(b.dtype)
        r = b - apply(x)
    rs = _bdot(r, r)
    b_norm = _bdot(b, b).sqrt()
    thresh = tol * b_norm
    if x0 is not None:
        # A warm start that is not finite (or whose residual is not) says nothing about a
        # finite system: start that sample from zero rather than give it up (it came back as
        # zero and "breakdown" though solvable).
        cold = ~torch.isfinite(rs) & torch.isfinite(b_norm)
        x = torch.where(cold.view(shape), torch.zeros_like(x), x)
        r = torch.where(cold.view(shape), b, r)
        rs = torch.where(cold, b_norm.square(), rs)

    # A non-finite right-hand side cannot be solved: flag it and return zeros there.
    bad_start = ~(torch.isfinite(rs) & torch.isfinite(b_norm))
    breakdown = bad_start.clone()
    nonfinite = bad_start.clone()
    # b_i = 0 is solved exactly by v_i = 0 (as in SciPy's cg). From a warm start x0_i ≠ 0 its
    # threshold tol·‖b_i‖ = 0 was unreachable in floating point: the sample ran to max_iter
    # and was reported unconverged, however small its residual.
    reset = bad_start | (b_norm == 0)
    x = torch.where(reset.view(shape), torch.zeros_like(x), x)
    r = torch.where(reset.view(shape), torch.zeros_like(r), r)
    rs = torch.where(reset, torch.zeros_like(rs), rs)
    converged = ~bad_start & (rs.sqrt() <= thresh)  # b_i = 0 is already solved
    active = ~(converged | breakdown)
    p = r.clone()

    tiny = torch.finfo(acc).tiny
    iterations = 0
    for k in range(max_iter):
        ap = apply(p)
        pap = _bdot(p, ap)
        # Negative/zero curvature or NaN: the system is not SPD along p; stop that sample
        # before it takes a step, so its last iterate stays finite.
        bad = active & ~(torch.isfinite(pap) & (pap > 0))
        breakdown = breakdown | bad
        nonfinite = nonfinite | (active & ~torch.isfinite(pap))
        active = active & ~bad
        am = active.view(shape)

        alpha = rs / torch.where(active, pap, torch.ones_like(pap))
        # torch.where (not multiplying by a zero step) so NaN/inf in a frozen sample's A p
        # can never leak into its iterate.
        step = alpha.view(shape).to(b.dtype)  # steps in b's dtype, as the iterates
        x = torch.where(am, x + step * p, x)
        r = torch.where(am, r - step * ap, r)
        rs_new = torch.where(active, _bdot(r, r), rs)

        done = active & (rs_new.sqrt() <= thresh)
        converged = converged | done
        active = active & ~done

        beta = rs_new / rs.clamp_min(tiny)
        p = torch.where(active.view(shape), r + beta.view(shape).to(b.dtype) * p, p)
        rs = rs_new
        iterations = k + 1
        if check_every > 0 and iterations % check_every == 0 and not bool(active.any()):
            break

    residual = rs.sqrt()
    # The recursion's residual drifts from the true b − (A + δI)x by ~ eps·cond(A)·‖b‖ and
    # keeps shrinking after the true one has stalled: at tolerances near the precision it
    # reports "converged" for solves that are not (float32 at tol 1e-12: a recursive 1e-13
    # against a true 1e-6). Below sqrt(eps) the claim is therefore checked with one more
    # product, and the true residual reported; looser tolerances (training's 1e-3) skip it.
    if verify and iterations > 0 and tol < math.sqrt(torch.finfo(b.dtype).eps):
        r_true = b - apply(x)
        true_r = _bdot(r_true, r_true).sqrt()
        checked = ~breakdown & torch.isfinite(true_r)
        residual = torch.where(checked, true_r, residual)
        converged = converged & checked & (true_r <= thresh)

    # back to b's scale; a rhs that was not finite keeps its flagged zero solution
    solution = (x.to(acc) * scale).to(b.dtype) if x.dtype != acc else x * scale
    # A solution beyond the dtype's range (float16 A = 0.01·I, b = 6e4: v = 6e6) came back
    # inf and "converged": flag it breakdown with the zero solution (and that residual, ‖b‖),
    # as a right-hand side that is not finite.
    overflow = ~bad_start & ~torch.isfinite(solution).reshape(n, -1).all(1)
    breakdown = breakdown | overflow
    nonfinite = nonfinite | overflow
    converged = converged & ~overflow
    residual = torch.where(overflow, b_norm, residual)
    # not solved at all: a residual of 0 read as "solved exactly"
    residual = torch.where(bad_start, torch.full_like(residual, float("nan")), residual)
    solution = torch.where((bad_start | overflow).view(shape), torch.zeros_like(b_in), solution)
    return CGResult(
        solution=solution,
        iterations=iterations,
        residual_norm=residual * scale.view(-1),
        converged=converged,
        breakdown=breakdown,
        nonfinite=nonfinite,
    )


class CoupledSystemsError(ValueError):
    """`batched_cg` was given a 1-D ``b`` and a ``matvec`` that mixes its entries."""


def _refuse_coupled_scalar_systems(matvec: Callable[[Tensor], Tensor], b: Tensor) -> None:
    """Raise `CoupledSystemsError` when ``matvec`` does not act entry by entry on a 1-D b.

    A 1-D b of length D is D independent 1×1 systems (the first dimension is the batch), but
    SciPy's ``cg(A, b)`` and TorchOpt's ``solve_cg(matvec, b)`` read it as ONE D-dimensional
    system. Called that way with ``lambda p: A @ p``, every "system" was reported converged
    while ‖A v − b‖ was of the order of ‖b‖: a silently wrong solution. An entry-wise map
    commutes with flipping the signs of entries, exactly in floating point (rounding is
    symmetric), whatever the dtype: A(s ⊙ b) = s ⊙ A b for random signs s. A coupled map
    does not. Two more products, on this rare path only (a batch of scalar problems), and a
    third before a refusal (the map's own run-to-run noise).

    The probe is b with each entry scaled by a power of two into [0.5, 1] (exact; the same
    directions for a linear map): probed with b itself, a float16 b of 3e4 overflowed A b to
    inf, and the coupling hidden behind the overflow was accepted (then "converged" 13 % off).
    An entry-wise map also sends a zero entry to zero: a coupling into an entry where b is 0
    is seen whatever the signs (b = e_5 with a tridiagonal A slipped through at random)."""
    p = b.detach()
    if not bool(torch.isfinite(p).all()):
        p = torch.where(torch.isfinite(p), p, torch.zeros_like(p))
    p = (p.to(torch.promote_types(p.dtype, torch.float32)) / _pow2_scale(p, (p.shape[0],))
         ).to(p.dtype)
    signs = torch.randint(0, 2, p.shape, generator=torch.Generator().manual_seed(0))
    signs[1] = 1 - signs[0]  # both signs present: a 2x2 coupling is always seen
    signs = (2 * signs - 1).to(device=p.device, dtype=p.dtype)
    u, v = matvec(p), matvec(signs * p)
    if not (isinstance(u, Tensor) and isinstance(v, Tensor) and u.shape == v.shape == p.shape):
        return  # batched_cg's own check names the wrong shape
    acc = torch.promote_types(p.dtype, torch.float32)
    u, v = u.detach().to(acc), v.detach().to(acc)
    gap = (v - signs.to(acc) * u).abs()
    # bit-exact for an entry-wise map; a little room for reductions whose order varies
    # between the two calls (atomics on a GPU)
    slack = 16 * torch.finfo(p.dtype).eps * (u.abs() + v.abs())
    ok = ~torch.isfinite(gap) | (gap <= slack)
    if not bool(ok.all()):
        # An entry-wise map whose per-entry sums cancel and run in another order each call
        # (atomics on a GPU) differs from itself by more than 16 eps: such an entry was
        # refused (a 256-term sum cancelling 100x, reordered: gaps ~1e-4 relative). A third
        # product, on this path only, measures the map's own run-to-run noise; a gap within
        # a few times that noise is no evidence of coupling (a deterministic map has none).
        w = matvec(p)
        if isinstance(w, Tensor) and w.shape == p.shape:
            w = w.detach().to(acc)
            both = u.abs() + w.abs()
            rel = torch.where(both > 0, (w - u).abs() / both, torch.zeros_like(both))
            noise = rel[torch.isfinite(rel)].amax() if bool(torch.isfinite(rel).any()) else 0.0
            ok |= gap <= 8 * noise * (u.abs() + v.abs())
    # an entry-wise map sends a zero entry to zero, however its sums are ordered
    ok &= (p != 0) | ((u == 0) & (v == 0)) | ~torch.isfinite(u) | ~torch.isfinite(v)
    if not bool(ok.all()):
        d = b.shape[0]
        raise CoupledSystemsError(
            f"matvec couples the entries of the 1-D b (shape ({d},)): batched_cg solves a 1-D "
            f"b as {d} independent 1x1 systems (the first dimension is the batch); for one "
            f"{d}-dimensional system, as SciPy's or TorchOpt's cg, pass b[None] (shape "
            f"(1, {d})) and a matvec acting on that shape")


def iteration_count(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or one ValueError line naming ``name``. A float
    (NaN included) failed in range() with "'float' object cannot be interpreted as an
    integer"; a bool is refused too. numpy ints and 0-d integer tensors pass."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return count
