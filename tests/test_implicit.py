"""Batched CG and the adjoint implicit gradient against dense solves and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from causalign.implicit import (
    batched_cg,
    hvp,
    implicit_argmin,
    implicit_gradient,
    lowrank_diag_solve,
)

DT = torch.float64


# --------------------------------------------------------------------------- batched CG


def _spd_batch(n: int, d: int, conds: list[float], seed: int = 0) -> torch.Tensor:
    """N SPD matrices with prescribed condition numbers (random eigenbases)."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for c in conds:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
        eig = torch.logspace(0, math.log10(c), d, dtype=DT)
        mats.append(q @ torch.diag(eig) @ q.T)
    return torch.stack(mats)


def _dense_matvec(a: torch.Tensor):
    def mv(p: torch.Tensor) -> torch.Tensor:
        flat = p.reshape(p.shape[0], -1)
        return torch.einsum("nij,nj->ni", a, flat).reshape(p.shape)

    return mv


@pytest.mark.parametrize("dims", [(10,), (2, 5)])
def test_cg_matches_dense_solve(dims: tuple[int, ...]) -> None:
    a = _spd_batch(4, 10, [1.0, 10.0, 100.0, 1000.0])
    b = torch.randn(4, *dims, generator=torch.Generator().manual_seed(1), dtype=DT)
    res = batched_cg(_dense_matvec(a), b, max_iter=200, tol=1e-10)
    ref = torch.linalg.solve(a, b.reshape(4, 10)).reshape(b.shape)
    assert res.solution.shape == b.shape
    assert res.converged.all() and not res.breakdown.any()
    torch.testing.assert_close(res.solution, ref, rtol=1e-7, atol=1e-9)
    b_norm = b.reshape(4, -1).norm(dim=1)
    assert (res.residual_norm <= 1e-10 * b_norm).all()
    # The recursion's residual is the true one.
    true_r = (b - _dense_matvec(a)(res.solution)).reshape(4, -1).norm(dim=1)
    assert (true_r <= 1e-8 * b_norm).all()


def test_cg_damping_and_per_sample_freezing() -> None:
    a = _spd_batch(4, 10, [1.0, 1.0, 50.0, 500.0])
    a[0] = torch.eye(10, dtype=DT)  # converges after one step, then must stay frozen
    b = torch.randn(4, 10, generator=torch.Generator().manual_seed(2), dtype=DT)
    b[1] = 0.0  # zero right-hand side: solved at the start, solution must stay exactly 0
    damping = 0.5
    res = batched_cg(_dense_matvec(a), b, max_iter=100, tol=1e-11, damping=damping)
    ref = torch.linalg.solve(a + damping * torch.eye(10, dtype=DT), b)
    torch.testing.assert_close(res.solution, ref, rtol=1e-8, atol=1e-10)
    assert torch.equal(res.solution[1], torch.zeros(10, dtype=DT))
    assert res.converged.all()
    # Damping changes the answer materially: an undamped solve is far from it.
    undamped = torch.linalg.solve(a, b)
    assert (undamped - res.solution).norm() > 0.1 * undamped.norm()


def test_cg_early_exit_and_warm_start() -> None:
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    a = torch.eye(6, dtype=DT).expand(3, 6, 6) * scale.view(3, 1, 1)
    b = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    res = batched_cg(_dense_matvec(a), b, max_iter=100, tol=1e-12, check_every=5)
    # Scaled identities converge in one step; the loop stops at the first check, not at 100.
    assert res.iterations == 5
    torch.testing.assert_close(res.solution, b / scale[:, None])
    warm = batched_cg(_dense_matvec(a), b, x0=res.solution, max_iter=100, tol=1e-12)
    assert warm.converged.all()
    torch.testing.assert_close(warm.solution, res.solution, rtol=0, atol=1e-14)


class _CountHostSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense: the op behind .item()/bool(tensor), i.e. a host sync."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_cg_loop_has_no_host_sync_besides_periodic_check() -> None:
    a = _spd_batch(4, 10, [1.0, 10.0, 100.0, 1000.0])
    b = torch.randn(4, 10, generator=torch.Generator().manual_seed(8), dtype=DT)
    mv = _dense_matvec(a)
    with _CountHostSyncs() as never:
        res = batched_cg(mv, b, max_iter=20, tol=1e-30, check_every=0)
    assert never.count == 0 and res.iterations == 20
    with _CountHostSyncs() as periodic:
        res = batched_cg(mv, b, max_iter=20, tol=1e-30, check_every=5)
    assert periodic.count == 4 and res.iterations == 20  # one cheap any() per 5 iterations


def test_cg_flags_breakdown_without_nan() -> None:
    d = 8
    a = _spd_batch(5, d, [10.0] * 5, seed=4)
    a[1] = -a[1]  # negative definite: negative curvature at the first step
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5), dtype=DT))
    eig = torch.tensor([3.0, 2.0, 1.5, 1.0, -1.0, -2.0, 0.5, 4.0], dtype=DT)
    a[2] = q @ torch.diag(eig) @ q.T  # indefinite
    b = torch.randn(5, d, generator=torch.Generator().manual_seed(6), dtype=DT)
    base = _dense_matvec(a)

    def mv(p: torch.Tensor) -> torch.Tensor:
        out = base(p)
        out[3] = float("nan")  # a broken Hessian product for one sample
        return out

    res = batched_cg(mv, b, max_iter=50, tol=1e-10)
    assert torch.isfinite(res.solution).all() and torch.isfinite(res.residual_norm).all()
    assert res.breakdown.tolist() == [False, True, True, True, False]
    assert res.converged.tolist() == [True, False, False, False, True]
    ref = torch.linalg.solve(a[[0, 4]], b[[0, 4]])
    torch.testing.assert_close(res.solution[[0, 4]], ref, rtol=1e-7, atol=1e-9)
    # Negative definite stops before any step: its iterate is still the zero start.
    assert torch.equal(res.solution[1], torch.zeros(d, dtype=DT))


# ------------------------------------------------------------ implicit gradient of an argmin

ALPHA = 0.5
N, D, HID, K = 3, 6, 4, 3


def _mlp(x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2


def _inner(x: torch.Tensor, params, x0: torch.Tensor, y_star: torch.Tensor) -> torch.Tensor:
    """Σ_i CE(f_θ(x_i), y*_i) + α‖x_i − x0_i‖²: strongly convex in x for small weights."""
    ce = F.cross_entropy(_mlp(x, params), y_star, reduction="sum")
    return ce + ALPHA * ((x - x0) ** 2).sum()


def _outer(x_star: torch.Tensor, x0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the alignment loss: weighted square + smoothed ℓ1 of x* − x0."""
    delta = x_star - x0
    return ((w * delta) ** 2).sum() + (torch.sqrt(delta**2 + 1e-3) * w).sum()


def _block_hessian(grad_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, D, D) per-sample Hessians from D batched HVPs (H is block-diagonal)."""
    n = x.shape[0]
    d = x[0].numel()
    cols = []
    for j in range(d):
        e = torch.zeros(n, d, dtype=x.dtype)
        e[:, j] = 1.0
        cols.append(hvp(grad_x, x, e.reshape(x.shape)).reshape(n, d))
    return torch.stack(cols, dim=2)


def _solve_inner(params, x0, y_star, x_init=None, steps: int = 30) -> torch.Tensor:
    """Newton's method to machine precision (tiny problem, exact block Hessians)."""
    ps = tuple(p.detach() for p in params)
    x = (x0 if x_init is None else x_init).detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            xx = x.requires_grad_(True)
            (g,) = torch.autograd.grad(_inner(xx, ps, x0, y_star), xx, create_graph=True)
            gmax = g.abs().max().item()
            if gmax < 1e-14:
                break
            h = _block_hessian(g, xx)
            step = torch.linalg.solve(h, g.detach().reshape(x.shape[0], -1))
            x = (xx.detach() - step.reshape(x.shape)).detach()
    return x.detach()


def _problem(dims: tuple[int, ...] = (D,)):
    gen = torch.Generator().manual_seed(7)
    params = (
        (0.6 * torch.randn(D, HID, generator=gen, dtype=DT)).requires_grad_(),
        (0.3 * torch.randn(HID, generator=gen, dtype=DT)).requires_grad_(),
        (0.6 * torch.randn(HID, K, generator=gen, dtype=DT)).requires_grad_(),
        (0.3 * torch.randn(K, generator=gen, dtype=DT)).requires_grad_(),
    )
    x0 = torch.randn(N, *dims, generator=gen, dtype=DT)
    y_star = torch.tensor([1, 2, 0])
    w = torch.rand(N, *dims, generator=gen, dtype=DT) + 0.5
    return params, x0, y_star, w


def _fd_grad(params, x0, y_star, w, x_star, eps: float = 1e-5) -> torch.Tensor:
    """Central differences of θ ↦ L(x*(θ)), re-solving x* (warm-started) for every θ ± εe_j."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def loss_at(theta: torch.Tensor) -> float:
        ps = tuple(t.reshape(p.shape) for t, p in zip(theta.split(sizes), params, strict=True))
        xs = _solve_inner(ps, x0, y_star, x_init=x_star)
        return _outer(xs, x0, w).item()

    out = torch.empty_like(flat)
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = eps
        out[j] = (loss_at(flat + e) - loss_at(flat - e)) / (2 * eps)
    return out


def _cos_rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = F.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).norm() / b.norm()).item()
    return cos, rel


def _ours(params, x0, y_star, w, x_star, **kw):
    xs = x_star.clone().requires_grad_(True)
    (outer_grad,) = torch.autograd.grad(_outer(xs, x0, w), xs)
    res = implicit_gradient(
        lambda x: _inner(x, params, x0, y_star), x_star, list(params), outer_grad, **kw
    )
    return res, torch.cat([g.reshape(-1) for g in res.grads])


@pytest.fixture(scope="module")
def reference():
    """Shared problem, its x*, and the finite-difference gradient (the expensive part)."""
    params, x0, y_star, w = _problem()
    x_star = _solve_inner(params, x0, y_star)
    return params, x0, y_star, w, x_star, _fd_grad(params, x0, y_star, w, x_star)


def test_inner_problem_is_solved_and_strongly_convex(reference) -> None:
    params, x0, y_star, _, x_star, fd = reference
    xx = x_star.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_inner(xx, params, x0, y_star), xx, create_graph=True)
    assert g.abs().max().item() < 1e-12
    eig_min = torch.linalg.eigvalsh(_block_hessian(g, xx)).min().item()
    assert eig_min > 0.2  # 2α = 1 minus the CE curvature: the IFT applies
    assert fd.norm().item() > 1e-2  # the reference gradient is not trivially zero


@pytest.mark.parametrize("mode", ["exact", "finite-difference"])
def test_implicit_gradient_matches_finite_differences(reference, mode: str) -> None:
    params, x0, y_star, w, x_star, fd = reference
    res, ours = _ours(
        params, x0, y_star, w, x_star, cg_max_iter=50, cg_tol=1e-12, hvp=mode, fd_eps=1e-4
    )
    cos, rel = _cos_rel(ours, fd)
    assert res.cg.converged.all() and not res.cg.breakdown.any()
    assert cos >= 0.99
    # Measured: exact ~2e-10, finite-difference HVP ~3e-8 (float64, fd_eps=1e-4).
    assert rel < (1e-7 if mode == "exact" else 1e-5), (cos, rel)
    assert len(res.grads) == 4 and all(
        g.shape == p.shape for g, p in zip(res.grads, params, strict=True)
    )


@pytest.mark.parametrize("mode", ["exact", "finite-difference"])
def test_implicit_gradient_float32_and_multidim_x(reference, mode: str) -> None:
    """The same problem with x as (N, 2, 3) in float32 still matches the float64 reference."""
    params, x0, y_star, w, x_star, fd = reference
    p32 = tuple(p.detach().float().requires_grad_() for p in params)
    shp = (N, 2, 3)
    res, ours = _ours(
        p32,
        x0.float().reshape(shp),
        y_star,
        w.float().reshape(shp),
        x_star.float().reshape(shp),
        cg_max_iter=30,
        cg_tol=1e-6,
        hvp=mode,
        fd_eps=1e-3,
    )
    cos, rel = _cos_rel(ours.double(), fd)
    assert res.grads[0].dtype == torch.float32
    # Measured: exact ~5e-7, finite-difference HVP ~1e-5.
    assert cos >= 0.999 and rel < 1e-3, (cos, rel)


def test_damping_shrinks_the_gradient(reference) -> None:
    params, x0, y_star, w, x_star, fd = reference
    _, damped = _ours(params, x0, y_star, w, x_star, cg_max_iter=50, cg_tol=1e-12, damping=10.0)
    cos, rel = _cos_rel(damped, fd)
    # Heavy damping biases the solve towards v ≈ ∇L/δ: the gradient is much smaller.
    assert damped.norm() < 0.5 * fd.norm()
    assert rel > 0.1


def test_unused_and_nongrad_params_get_zeros(reference) -> None:
    params, x0, y_star, w, x_star, _ = reference
    unused = torch.ones(5, dtype=DT, requires_grad=True)
    frozen = torch.ones(2, dtype=DT)
    xs = x_star.clone().requires_grad_(True)
    (og,) = torch.autograd.grad(_outer(xs, x0, w), xs)
    res = implicit_gradient(
        lambda x: _inner(x, params, x0, y_star), x_star, [params[0], unused, frozen], og
    )
    assert torch.equal(res.grads[1], torch.zeros(5, dtype=DT))
    assert torch.equal(res.grads[2], torch.zeros(2, dtype=DT))
    assert res.grads[0].abs().sum() > 0


def test_implicit_argmin_total_derivative_through_nonleaf_anchor(reference) -> None:
    """x0 = tanh(u) enters both T and L (as â does in the hierarchical method): backprop through
    implicit_argmin gives the total dL/du, checked by central differences over u."""
    params, _, y_star, w, _, _ = reference
    gen = torch.Generator().manual_seed(11)
    u = (0.5 * torch.randn(N, D, generator=gen, dtype=DT)).requires_grad_()

    def loss_of_u(uu: torch.Tensor, x_init: torch.Tensor | None = None) -> torch.Tensor:
        x0 = torch.tanh(uu)
        xs = _solve_inner(params, x0.detach(), y_star, x_init=x_init)
        xs = implicit_argmin(
            lambda x: _inner(x, params, x0, y_star), xs, [*params, x0], cg_max_iter=50, cg_tol=1e-12
        )
        return _outer(xs, x0, w)

    loss = loss_of_u(u)
    loss.backward()
    x_ref = _solve_inner(params, torch.tanh(u).detach(), y_star)
    eps = 1e-5
    fd = torch.empty(N * D, dtype=DT)
    with torch.no_grad():
        for j in range(N * D):
            e = torch.zeros(N * D, dtype=DT)
            e[j] = eps
            a_plus, a_minus = torch.tanh(u + e.reshape(N, D)), torch.tanh(u - e.reshape(N, D))
            lp = _outer(_solve_inner(params, a_plus, y_star, x_ref), a_plus, w)
            lm = _outer(_solve_inner(params, a_minus, y_star, x_ref), a_minus, w)
            fd[j] = (lp - lm) / (2 * eps)
    cos, rel = _cos_rel(u.grad.reshape(-1), fd)
    assert cos >= 0.99 and rel < 1e-6, (cos, rel)
    # Params got their implicit gradients too.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for p in params:
        p.grad = None


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torchopt still calls functorch.vjp
def test_matches_torchopt_custom_root(reference) -> None:
    torchopt = pytest.importorskip("torchopt")
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_cg

    params, x0, y_star, w, x_star, fd = reference

    def optimality(x, w1, b1, w2, b2):
        return torch.func.grad(lambda xx: _inner(xx, (w1, b1, w2, b2), x0, y_star))(x)

    @custom_root(optimality, argnums=(1, 2, 3, 4), solve=solve_cg(maxiter=100, rtol=1e-12))
    def solver(x_init, w1, b1, w2, b2):
        return _solve_inner((w1, b1, w2, b2), x0, y_star, x_init=x_init)

    xs = solver(x_star.clone(), *params)
    torch.testing.assert_close(xs, x_star)
    topt = torch.autograd.grad(_outer(xs, x0, w), params)
    topt = torch.cat([g.reshape(-1) for g in topt])
    _, ours = _ours(params, x0, y_star, w, x_star, cg_max_iter=50, cg_tol=1e-12)
    cos, rel = _cos_rel(ours, topt)
    assert cos >= 0.99 and rel < 1e-6, (cos, rel)
    assert torchopt.__version__  # imported for real, not a stub


# --------------------------------------------------------------------------- direct solves


def test_lowrank_diag_solve_matches_a_dense_solve() -> None:
    """(JᵀSJ + diag a) v = b per sample by Woodbury = torch.linalg.solve of the dense matrix;
    a sample with a non-finite system comes back NaN without touching the others."""
    gen = torch.Generator().manual_seed(3)
    n, r, d = 4, 2, 12
    jac = torch.randn(n, r, d, generator=gen, dtype=DT)
    half = torch.randn(n, r, r, generator=gen, dtype=DT)
    curv = half @ half.transpose(1, 2)
    diag = torch.rand(n, d, generator=gen, dtype=DT) + 0.1
    rhs = torch.randn(n, 3, 4, generator=gen, dtype=DT)
    dense = jac.transpose(1, 2) @ curv @ jac + torch.diag_embed(diag)
    want = torch.linalg.solve(dense, rhs.reshape(n, d))
    got = lowrank_diag_solve(jac, curv, diag, rhs)
    assert got.shape == rhs.shape and got.dtype == DT
    torch.testing.assert_close(got.reshape(n, d), want, rtol=1e-10, atol=1e-12)
    jac[1, 0, 5] = float("nan")
    got = lowrank_diag_solve(jac, curv, diag, rhs)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3]]).all()
    torch.testing.assert_close(got[[0, 2, 3]].reshape(3, d), want[[0, 2, 3]])
    with pytest.raises(ValueError, match="diag"):
        lowrank_diag_solve(jac, curv, diag[:, :5], rhs)


def test_supplied_adjoint_skips_cg_and_gives_the_same_gradient(reference) -> None:
    """implicit_gradient(adjoint=v) with v from a dense solve of (H + δI)v = ∇L is the CG
    gradient (and the finite-difference one); CG is reported as a direct solve."""
    params, x0, y_star, w, x_star, fd = reference
    xx = x_star.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_inner(xx, params, x0, y_star), xx, create_graph=True)
    xs = x_star.clone().requires_grad_(True)
    (outer_grad,) = torch.autograd.grad(_outer(xs, x0, w), xs)
    v = torch.linalg.solve(_block_hessian(g, xx), outer_grad.reshape(N, -1)).reshape(x_star.shape)
    res, ours = _ours(params, x0, y_star, w, x_star, adjoint=v.detach())
    cos, rel = _cos_rel(ours, fd)
    assert cos >= 0.99 and rel < 1e-7, (cos, rel)
    assert res.cg.iterations == 0 and res.cg.converged.all() and not res.cg.breakdown.any()
    assert torch.isnan(res.cg.residual_norm).all()  # not tracked: no claim is made
    bad = v.detach().clone()
    bad[1] = float("nan")
    res = _ours(params, x0, y_star, w, x_star, adjoint=bad)[0]
    assert res.cg.breakdown.tolist() == [False, True, False]
    assert all(bool(torch.isfinite(gr).all()) for gr in res.grads)
    with pytest.raises(ValueError, match="adjoint shape"):
        _ours(params, x0, y_star, w, x_star, adjoint=v[:2])


# ------------------------------------------------- options reaching CG (mutation audit)


def _quadratic(a: torch.Tensor):
    """T(x, θ) = Σ_i ½ x_iᵀ A_i x_i − θ_iᵀ x_i: x* = A⁻¹θ and, for an outer gradient w,
    dL/dθ = A⁻¹w (the adjoint v itself)."""

    def inner(theta: torch.Tensor):
        def t(x: torch.Tensor) -> torch.Tensor:
            return (0.5 * torch.einsum("ni,nij,nj->n", x, a, x) - (theta * x).sum(1)).sum()

        return t

    return inner


def test_a_warm_start_reaches_cg():
    """cg_x0 is what the trainer's re-solve warm-starts from; ignoring it only slowed CG, so
    no gradient check could see it. Started at the solution, one iteration converges;
    from zero, on a condition number of 1e4, it does not."""
    a = _spd_batch(3, 20, [1e4, 1e4, 1e4])
    theta = torch.randn(3, 20, dtype=DT, requires_grad=True)
    w = torch.randn(3, 20, dtype=DT)
    x_star = torch.linalg.solve(a, theta.detach())
    v = torch.linalg.solve(a, w)
    t = _quadratic(a)(theta)
    cold = implicit_gradient(t, x_star, [theta], w, cg_max_iter=1, cg_tol=1e-8)
    assert not cold.cg.converged.any()
    warm = implicit_gradient(t, x_star, [theta], w, cg_x0=v, cg_max_iter=1, cg_tol=1e-8)
    assert warm.cg.converged.all()
    torch.testing.assert_close(warm.grads[0], v, rtol=1e-8, atol=1e-10)


def test_cg_verify_reaches_cg():
    """cg_verify checks CG's convergence claim against the true residual ‖b − (H + δI)v‖;
    not passed on, a float32 solve asked for a tolerance below its precision claimed
    convergence its residual does not have."""
    a = _spd_batch(4, 40, [1e4] * 4, seed=1).float()
    theta = torch.randn(4, 40, requires_grad=True)
    w = torch.randn(4, 40)
    x_star = torch.linalg.solve(a, theta.detach())
    t = _quadratic(a)(theta)
    kw = dict(cg_max_iter=400, cg_tol=1e-9)
    trusted = implicit_gradient(t, x_star, [theta], w, **kw)
    verified = implicit_gradient(t, x_star, [theta], w, cg_verify=True, **kw)
    v = verified.cg.solution
    true_rel = (w - torch.einsum("nij,nj->ni", a, v)).norm(dim=1) / w.norm(dim=1)
    assert trusted.cg.converged.all()  # the recurrence's residual fell below 1e-9
    assert not verified.cg.converged.any() and (true_rel > 1e-9).all()
