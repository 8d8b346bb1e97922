"""Library-use audit of causalign.implicit: inner problems outside the tests' own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from causalign.implicit import implicit_argmin, implicit_gradient


def _quartic(theta: torch.Tensor):
    """T_i(x_i) = ½ θ₁ x_i² − sin(θ₀) x_i + 0.1 θ₁ x_i⁴: θ enters non-linearly with x."""

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * theta[1] * x.square() - theta[0].sin() * x
                + 0.1 * theta[1] * x.pow(4)).sum()

    return inner


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_x_star_is_refused_in_one_line(bad: float) -> None:
    # Before: one NaN sample made the whole batch's θ-gradient NaN ([2.34, nan]) while the
    # CG report flagged only that sample as breakdown, all samples NaN gave silent zeros.
    theta = torch.tensor([0.5, 1.0], requires_grad=True)
    x = torch.rand(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match=r"x_star is not finite in sample\(s\) \[1\]"):
        implicit_gradient(_quartic(theta), x, theta, torch.ones(3, 2))
    with pytest.raises(ValueError, match="not finite"):
        implicit_argmin(_quartic(theta), x, theta).sum().backward()
    # a caller that resets such samples itself (causal-align) skips the check and its sync
    res = implicit_gradient(_quartic(theta), x, theta, torch.ones(3, 2), check_finite=False)
    assert bool(res.cg.breakdown[1]) and not bool(res.cg.breakdown[0])


def test_finite_difference_products_with_a_float64_outer_grad_on_a_float32_problem() -> None:
    # Before: the float64 outer gradient made CG's directions float64, x + h·p was evaluated in
    # float64 and a float32 model failed: "Input type (double) and bias type (float) should be
    # the same". Exact products worked in the same set-up.
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x0 = torch.randn(2, 2, 4, 4)

    def inner(x: torch.Tensor) -> torch.Tensor:
        return F.softplus(F.conv2d(x, w, b, padding=1)).sum() + (x - x0).square().sum()

    og = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    exact = implicit_gradient(inner, x0, [w, b], og, cg_tol=1e-6, cg_max_iter=100)
    fd = implicit_gradient(inner, x0, [w, b], og, cg_tol=1e-6, cg_max_iter=100,
                           hvp="finite-difference", fd_eps=1e-2)
    for a, c in zip(fd.grads, exact.grads, strict=True):
        assert a.dtype == torch.float32
        cos = F.cosine_similarity(a.flatten().double(), c.flatten().double(), dim=0)
        assert cos > 0.9999, float(cos)


def test_implicit_argmin_refuses_params_computed_from_other_params() -> None:
    # T = ½ e^φ x² − φ x: x* = φ e^{-φ}, dx*/dφ = (1 − φ) e^{-φ} = 0.518573 at φ = 0.3.
    # Before: params [a = e^φ, φ] counted the path through a twice: 0.296327.
    phi = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    a = phi.exp()

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * a * x * x - phi * x).sum()

    x_star = (phi * torch.exp(-phi)).detach()
    exact = float((1 - phi.detach()) * torch.exp(-phi.detach()))
    x = implicit_argmin(inner, x_star, [phi], cg_tol=1e-12)
    (g,) = torch.autograd.grad(x.sum(), phi)
    assert abs(float(g) - exact) < 1e-12
    with pytest.raises(ValueError, match=r"params\[0\] is computed from params\[1\]"):
        implicit_argmin(inner, x_star, [a, phi], cg_tol=1e-12)
    # the same tensor twice was counted twice as well: 1.037146 for 0.518573
    with pytest.raises(ValueError, match=r"params\[1\] is params\[0\]"):
        implicit_argmin(inner, x_star, [phi, phi], cg_tol=1e-12)
    # a non-leaf alone is fine: its gradient flows on to φ (the path through φ's direct use
    # in T is then not differentiated, as for any tensor left out of params)
    x = implicit_argmin(inner, x_star, [a], cg_tol=1e-12)
    (g,) = torch.autograd.grad(x.sum(), phi)
    assert abs(float(g) + float(x_star)) < 1e-12


def test_implicit_argmin_refuses_to_be_differentiated_twice() -> None:
    # T = ½ a x² − x with a = e^φ: x* = e^{-φ}, dx*/dφ = −e^{-φ}, d²x*/dφ² = e^{-φ}.
    # Before: create_graph=True gave a first derivative whose graph held only a → φ, so the
    # "second derivative" silently came back as −e^{-φ} (the terms through v and ∂g/∂a missing).
    phi = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    a = phi.exp()

    def inner(x: torch.Tensor) -> torch.Tensor:
        return (0.5 * a * x * x - x).sum()

    x = implicit_argmin(inner, torch.exp(-phi.detach()), [a], cg_tol=1e-12)
    (g,) = torch.autograd.grad(x.sum(), phi, create_graph=True)
    assert abs(float(g.detach()) + float(torch.exp(-phi.detach()))) < 1e-12
    with pytest.raises(RuntimeError, match="once_differentiable"):
        torch.autograd.grad(g.sum(), phi)
