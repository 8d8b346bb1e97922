"""Edge cases of the public implicit-differentiation API (`batched_cg`, `implicit_gradient`):
argument validation, dtypes, and agreement with TorchOpt on a non-quadratic inner problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causalign.implicit import batched_cg, implicit_argmin, implicit_gradient

DT = torch.float64


def _readme_problem(dtype: torch.dtype = DT):
    """README's example: T_i = ½‖x_i − θ‖² + ¼Σx_i⁴, x* by Newton; dL/dθ = 4/(1 + 3x*²) for
    L = Σ x* over 4 rows."""
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=dtype, requires_grad=True)

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * (x - theta).square() + 0.25 * x.pow(4)).sum()

    x = torch.zeros(4, 3, dtype=dtype)
    for _ in range(50):
        x = x - (x - theta.detach() + x**3) / (1 + 3 * x**2)
    exact = 4 / (1 + 3 * x[0].double() ** 2)
    return theta, inner, x, exact


# ------------------------------------------------------------------ argument validation


@pytest.mark.parametrize("fd_eps", [0.0, -1e-3, float("nan")])
def test_finite_difference_step_that_cannot_move_x_is_refused(fd_eps):
    # Before: h = 0 (or h < 0, NaN) made every Hessian product 0, CG broke down and each
    # gradient came back as a silent 0.
    theta, inner, x, _ = _readme_problem()
    with pytest.raises(ValueError, match="fd_eps must be a finite number > 0"):
        implicit_gradient(inner, x, [theta], torch.ones_like(x), hvp="finite-difference",
                          fd_eps=fd_eps)


def test_finite_difference_step_below_the_dtypes_resolution_is_refused():
    # bfloat16 (eps 7.8e-3) rounds x ± 1e-3·p back to x: before, the default fd_eps gave every
    # gradient as 0; float16 at 1e-3 gave a 35 % wrong gradient reported "converged".
    theta, inner, x, exact = _readme_problem(torch.bfloat16)
    with pytest.raises(ValueError, match=r"fd_eps=0.001 is below what torch.bfloat16"):
        implicit_gradient(inner, x, [theta], torch.ones_like(x), hvp="finite-difference")
    theta, inner, x, exact = _readme_problem(torch.float16)
    with pytest.raises(ValueError, match="hvp='exact'"):
        implicit_gradient(inner, x, [theta], torch.ones_like(x), hvp="finite-difference")
    # A step the dtype resolves still works, to float16 accuracy.
    res = implicit_gradient(inner, x, [theta], torch.ones_like(x), hvp="finite-difference",
                            fd_eps=0.03, cg_tol=1e-3)
    assert res.cg.converged.all()
    torch.testing.assert_close(res.grads[0].double(), exact, rtol=2e-2, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, float("nan"), True])
def test_cg_iteration_cap_must_be_a_positive_integer(bad):
    # Before: 0 returned a zero gradient silently, 2.5/NaN died in range() with "'float'
    # object cannot be interpreted as an integer".
    theta, inner, x, _ = _readme_problem()
    with pytest.raises(ValueError, match="cg_max_iter must be an integer >= 1"):
        implicit_gradient(inner, x, [theta], torch.ones_like(x), cg_max_iter=bad)
    if bad != 0:
        with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
            batched_cg(lambda p: 2 * p, torch.ones(2, 3), max_iter=bad)
    # integer types other than int are fine
    res = implicit_gradient(inner, x, [theta], torch.ones_like(x), cg_max_iter=np.int64(5))
    assert res.cg.converged.all()


def test_negative_damping_is_refused():
    # Before: accepted, solving (H − |δ|I)v = b: here a gradient up to 2.9x the damped one.
    theta, inner, x, _ = _readme_problem()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        implicit_gradient(inner, x, [theta], torch.ones_like(x), damping=-1.0)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        batched_cg(lambda p: 2 * p, torch.ones(2, 3), damping=-0.5)


def test_bad_x_star_and_params_fail_in_one_clear_line():
    theta, inner, x, _ = _readme_problem()
    ones = torch.ones_like(x)
    # before: AttributeError "'float' object has no attribute 'requires_grad'"
    with pytest.raises(TypeError, match=r"params must be tensors; params\[1\] is float"):
        implicit_gradient(inner, x, [theta, 1.0], ones)
    # before: "only Tensors of floating point dtype can require gradients"
    with pytest.raises(ValueError, match="x_star must be a floating-point tensor"):
        implicit_gradient(inner, x.long(), [theta], ones)
    # before: "b must have a leading batch dimension" (b: a name the caller never used)
    with pytest.raises(ValueError, match="x_star must be a floating-point tensor.*shape \\(\\)"):
        implicit_gradient(lambda v: (v - theta[0]).square(), x[0, 0], [theta], ones[0, 0])
    with pytest.raises(ValueError, match="outer_grad must be a floating-point tensor"):
        implicit_gradient(inner, x, [theta], ones.long())


# ------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("rhs_dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_outer_grad_does_not_cap_the_gradients_accuracy(rhs_dtype):
    # ∇ₓL computed in float32 (or under autocast) for a float64 x*: before, the whole CG ran
    # in the rhs's dtype — float32: error 7.5e-8, bfloat16: 5.4e-3, both "converged" at 1e-12.
    theta, inner, x, exact = _readme_problem()
    res = implicit_gradient(inner, x, [theta], torch.ones(4, 3, dtype=rhs_dtype),
                            cg_tol=1e-12, cg_max_iter=50)
    assert res.cg.solution.dtype == DT
    torch.testing.assert_close(res.grads[0], exact, rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------------- degenerate objectives


def test_inner_objective_linear_in_x_has_a_zero_hessian_not_an_autograd_error():
    # T = Σ c·x with a constant c: ∇ₓT has no graph at all. Before: RuntimeError "element 0 of
    # tensors does not require grad and does not have a grad_fn" from the first product.
    theta = torch.ones(3, requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0])
    x = torch.zeros(4, 3)
    b = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    res = implicit_gradient(lambda v: (v * c).sum(), x, [theta], b, damping=0.5)
    # H = 0: the damped system is 0.5·I, solved in one step; θ does not enter T at all
    assert res.cg.converged.all() and not res.cg.breakdown.any()
    torch.testing.assert_close(res.cg.solution, b / 0.5)
    assert torch.equal(res.grads[0], torch.zeros(3))
    # undamped, H = 0 is no SPD system: reported as breakdown, with zero (finite) gradients
    res = implicit_gradient(lambda v: (v * c).sum(), x, [theta], b)
    assert res.cg.breakdown.all() and torch.equal(res.grads[0], torch.zeros(3))


# ---------------------------------------------------- agreement with TorchOpt, problem two


def _inner2(x, a, c, log_s, w, x0):
    """Σ_i Σ logcosh(A x_i + c) + ½e^s‖x_i − x0_i‖² + Σ softplus(W ⊙ x_i): strongly convex,
    not quadratic; x is (N, 2, 3) and the parameters have shapes (6, 6), (6,), () and (2, 3)."""
    z = x.reshape(x.shape[0], -1) @ a + c
    logcosh = (z + F.softplus(-2 * z) - np.log(2.0)).sum()
    return logcosh + 0.5 * log_s.exp() * (x - x0).square().sum() + F.softplus(w * x).sum()


def _solve2(params, x0, x_init=None):
    ps = tuple(p.detach() for p in params)
    x = (x0 if x_init is None else x_init).detach().clone()
    n = x.numel()
    for _ in range(40):
        g = torch.func.grad(lambda v: _inner2(v, *ps, x0))(x)
        if g.abs().max() < 1e-14:
            break
        h = torch.autograd.functional.hessian(lambda v: _inner2(v, *ps, x0), x).reshape(n, n)
        x = x - torch.linalg.solve(h, g.reshape(n)).reshape(x.shape)
    return x


def _outer2(x, x0):
    return (torch.sin(3 * x) * (x - x0)).sum() + (x - x0).pow(3).sum()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torchopt still calls functorch.vjp
def test_matches_torchopt_on_a_non_quadratic_problem_with_mixed_parameter_shapes():
    torchopt = pytest.importorskip("torchopt")
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_cg

    gen = torch.Generator().manual_seed(3)
    params = (
        (0.5 * torch.randn(6, 6, generator=gen, dtype=DT)).requires_grad_(),
        (0.3 * torch.randn(6, generator=gen, dtype=DT)).requires_grad_(),
        torch.tensor(0.2, dtype=DT, requires_grad=True),  # a 0-d parameter
        torch.randn(2, 3, generator=gen, dtype=DT).requires_grad_(),
    )
    x0 = torch.randn(3, 2, 3, generator=gen, dtype=DT)

    def optimality(x, a, c, log_s, w):
        return torch.func.grad(lambda v: _inner2(v, a, c, log_s, w, x0))(x)

    @custom_root(optimality, argnums=(1, 2, 3, 4), solve=solve_cg(maxiter=200, rtol=1e-13))
    def solver(x_init, a, c, log_s, w):
        return _solve2((a, c, log_s, w), x0, x_init=x_init)

    x_star = _solve2(params, x0)
    xs = solver(x_star.clone(), *params)
    torch.testing.assert_close(xs, x_star)
    topt = torch.autograd.grad(_outer2(xs, x0), params)
    assert all(t.shape == p.shape and t.abs().sum() > 1e-3
               for t, p in zip(topt, params, strict=True))  # every parameter matters

    xr = x_star.clone().requires_grad_(True)
    (outer,) = torch.autograd.grad(_outer2(xr, x0), xr)
    res = implicit_gradient(lambda v: _inner2(v, *params, x0), x_star, params, outer,
                            cg_max_iter=100, cg_tol=1e-13)
    assert res.cg.converged.all()
    for ours, ref in zip(res.grads, topt, strict=True):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)
    # the autograd-Function form agrees, accumulating into .grad like any backward
    attached = implicit_argmin(lambda v: _inner2(v, *params, x0), x_star, params,
                               cg_max_iter=100, cg_tol=1e-13)
    _outer2(attached, x0).backward()
    for p, ref in zip(params, topt, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-10)
    assert torchopt.__version__  # imported for real, not a stub


# ------------------------------------------------------------ causal-align in a user's loop


def test_causal_align_channels_last_and_gradient_accumulation():
    """A channels_last model gets the contiguous model's gradient; building the loss leaves
    .grad alone, and backward accumulates into it like any loss (micro-batch habits)."""
    from torch import nn

    from causalign.methods import build_method

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)).train()

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 12, 12, generator=g)
    mask = torch.zeros(4, 1, 12, 12)
    mask[..., 3:6, 3:6] = 1.0
    has = torch.ones(4, dtype=torch.bool)
    batch = {"image": x, "label": torch.arange(4) % 2, "mask": mask, "has_mask": has,
             "box_mask": mask, "has_annotation": has}
    fast = dict(steps=3, cg_iters=3, warm_start=False)

    ref_model = cnn()
    build_method("causal-align", fast)(ref_model, batch).total.backward()
    ref = [p.grad.clone() for p in ref_model.parameters()]

    model = cnn().to(memory_format=torch.channels_last)
    cl = dict(batch, image=x.contiguous(memory_format=torch.channels_last))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # the previous micro-batch's gradient
    out = build_method("causal-align", fast)(model, cl)
    assert out.parts["n_align"] == 4.0 and out.parts["cg_dropped"] == 0.0
    assert all(bool((p.grad == 0.5).all()) for p in model.parameters())  # untouched so far
    out.total.backward()
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r + 0.5, rtol=1e-4, atol=1e-5)


def test_causal_align_leaves_an_unused_parameters_grad_none_as_erm_does():
    """A zero .grad on a parameter the model never uses made weight decay act on it under
    causal-align but not under ERM (whose backward leaves it None)."""
    from torch import nn

    from causalign.methods import build_method

    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))
            self.spare = nn.Linear(3, 3)  # e.g. a head switched off

        def forward(self, x):
            return self.net(x)

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 1, 12, 12)
    mask[..., 3:6, 3:6] = 1.0
    has = torch.ones(4, dtype=torch.bool)
    batch = {"image": torch.rand(4, 1, 12, 12, generator=g), "label": torch.arange(4) % 2,
             "mask": mask, "has_mask": has, "box_mask": mask, "has_annotation": has}
    for name in ("erm", "causal-align"):
        model = WithSpare()
        args = dict(steps=3, warm_start=False) if name == "causal-align" else {}
        out = build_method(name, args)(model, batch)
        if name == "causal-align":
            assert out.parts["n_align"] == 4.0 and out.parts["cg_dropped"] == 0.0
        out.total.backward()
        assert model.spare.weight.grad is None and model.spare.bias.grad is None, name
        assert all(p.grad is not None and bool(p.grad.ne(0).any())
                   for p in model.net.parameters()), name


def _caller_built_problem():
    """θ enters the inner problem through a = exp(θ), computed by the caller outside it."""
    theta = torch.tensor([0.1, -0.2, 0.3], dtype=DT, requires_grad=True)
    a = theta.exp()

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * (x - a).square() + 0.25 * x.pow(4)).sum()

    x = torch.zeros(4, 3, dtype=DT)
    for _ in range(60):
        x = x - (x - a.detach() + x**3) / (1 + 3 * x**2)
    # dΣx*/dθ over 4 rows: 4·(dx*/da)·(da/dθ) with dx*/da = 1/(1 + 3x*²)
    return theta, a, inner, x, 4 / (1 + 3 * x[0] ** 2) * a.detach()


def test_the_callers_graph_survives_an_implicit_gradient():
    theta, a, inner, x, exact = _caller_built_problem()
    res = implicit_gradient(inner, x, [theta], torch.ones_like(x), cg_tol=1e-12)
    torch.testing.assert_close(res.grads[0], exact)
    # a second solve on the same objective (causal-align retries with more damping) and the
    # caller's own backward through a: both freed-graph errors before
    again = implicit_gradient(inner, x, [theta], torch.ones_like(x), cg_tol=1e-12)
    torch.testing.assert_close(again.grads[0], exact)
    (a * a).sum().backward()
    torch.testing.assert_close(theta.grad, 2 * a.detach() ** 2)


def test_implicit_argmin_combines_with_other_uses_of_the_same_graph():
    theta, a, inner, x, exact = _caller_built_problem()
    x_att = implicit_argmin(inner, x, [theta], cg_tol=1e-12)
    (x_att.sum() + (a * a).sum()).backward()
    torch.testing.assert_close(theta.grad, exact + 2 * a.detach() ** 2)


def test_one_tensor_as_params_is_a_list_of_one():
    # list(theta) split it into 0-d slices outside the graph: all-zero gradients, "converged"
    theta, inner, x, exact = _readme_problem()
    res = implicit_gradient(inner, x, theta, torch.ones_like(x), cg_tol=1e-12)
    assert len(res.grads) == 1
    torch.testing.assert_close(res.grads[0], exact)
    implicit_argmin(inner, x, theta, cg_tol=1e-12).sum().backward()
    torch.testing.assert_close(theta.grad, exact)


@pytest.mark.parametrize(("options", "needle"), [
    ({"hvp": "bogus"}, "hvp must be"),
    ({"cg_max_iter": 0}, "cg_max_iter must be an integer >= 1"),
    ({"damping": -1.0}, "damping must be a finite number >= 0"),
    ({"hvp": "finite-difference", "fd_eps": 0.0}, "fd_eps must be"),
    ({"cg_maxiter": 5}, "unknown option 'cg_maxiter'"),
])
def test_implicit_argmin_refuses_bad_options_before_the_forward_runs_on(options, needle):
    # they failed only inside .backward(), after the whole forward and loss had run
    theta, inner, x, _ = _readme_problem()
    with pytest.raises((ValueError, TypeError), match=needle):
        implicit_argmin(inner, x, [theta], **options)


def test_cg_checks_the_shape_of_the_operators_output():
    b = torch.randn(3, 6, dtype=DT)
    # an (N, 1) product broadcast against the (N, D) system: CG "did not converge", silently
    with pytest.raises(ValueError, match=r"matvec must return a tensor shaped like its input"):
        batched_cg(lambda p: p.sum(1, keepdim=True), b)


def test_cg_restarts_a_non_finite_warm_start_and_marks_an_unsolvable_rhs():
    a = torch.diag_embed(torch.tensor([[1.0, 2.0, 4.0]] * 3, dtype=DT))
    b = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    b[2, 0] = float("nan")
    x0 = torch.zeros_like(b)
    x0[1, 1] = float("nan")  # a solvable system: it was given up as zero and "breakdown"
    res = batched_cg(lambda p: (a @ p[..., None])[..., 0], b, x0=x0, tol=1e-12)
    assert res.converged.tolist() == [True, True, False]
    assert res.breakdown.tolist() == [False, False, True]
    torch.testing.assert_close(res.solution[:2], b[:2] / a.diagonal(dim1=1, dim2=2)[:2])
    # the unsolved sample's residual is not 0 ("solved exactly") but NaN, with a zero solution
    assert torch.isnan(res.residual_norm[2]) and (res.solution[2] == 0).all()


def test_lowrank_solve_flags_a_singular_sample_instead_of_failing_the_batch():
    from causalign.implicit import lowrank_diag_solve

    n, d = 3, 5
    jac = torch.zeros(n, 1, d, dtype=DT)
    jac[:, 0, 0] = 1.0
    curv = torch.ones(n, 1, 1, dtype=DT)
    curv[1] = -1.0  # indefinite S: I + J A⁻¹ Jᵀ S = 0 for sample 1 (LinAlgError for all)
    rhs = torch.randn(n, d, dtype=DT, generator=torch.Generator().manual_seed(1))
    v = lowrank_diag_solve(jac, curv, torch.ones(n, d, dtype=DT), rhs)
    assert torch.isnan(v[1]).all() and torch.isfinite(v[[0, 2]]).all()
    dense = jac.transpose(1, 2) @ curv @ jac + torch.eye(d, dtype=DT)
    solved = torch.linalg.solve(dense[[0, 2]], rhs[[0, 2], :, None])[..., 0]
    torch.testing.assert_close(v[[0, 2]], solved)
