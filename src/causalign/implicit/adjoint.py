"""Adjoint implicit gradient of a per-sample argmin (seed 000 §4.2, adjoint form).

At x* = argmin_x T(x, θ) the stationarity g(x*, θ) := ∇ₓT = 0 holds, so for an outer loss L(x*)

    dL/dθ = −(∂g/∂θ)ᵀ v,   (H + δI) v = ∇ₓL,   H = ∂g/∂x.

v comes from batched CG with matrix-free Hessian-vector products, and the final product is a
single backward of g·v w.r.t. θ. Neither H nor the Jacobian ∇_θ x* is ever formed.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.profiler import record_function

from causalign.implicit.cg import CGResult, CoupledSystemsError, batched_cg, iteration_count
from causalign.implicit.fastgrad import double_backward_graph

__all__ = ["ImplicitResult", "hvp", "implicit_argmin", "implicit_gradient", "no_autocast"]

# device types whose autocast `no_autocast` turns off where the caller turned it on
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off inside, on every device type where the caller has it on.

    A training step wrapped in ``torch.autocast(..., dtype=torch.bfloat16)`` (the usual
    mixed-precision habit) ran the inner problem's convolutions, ∇ₓT and every
    Hessian-vector product in bfloat16 (7 mantissa bits, worse than the TF32 that
    `ieee_fp32_convolutions` turns off): the implicit gradient was off by 9-10 % relative on
    a small CNN (cosine 0.997), silently. Inside, they run in the model's own dtype."""
    with ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if _autocast_on(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _autocast_on(device: str) -> bool:
    """Is autocast on for this device type (False for one this build does not know)?"""
    try:
        return bool(torch.is_autocast_enabled(device))
    except RuntimeError:  # a device type this build of torch does not know
        return False
    except TypeError:  # torch < 2.4: no device argument
        if device == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device == "cuda" and bool(torch.is_autocast_enabled())


@contextmanager
def math_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention``) in its math
    form inside: a graph that is differentiated twice needs it, since the fused flash and
    memory-efficient kernels implement no double backward. Nothing changes on torch < 2.3,
    which has no ``torch.nn.attention``."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _without_autocast(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run inside `no_autocast`: its forwards and, since the autograd engine runs a
    backward under the autocast state of its caller, its backwards too (a Linear's double
    backward is a matmul that autocast casts). Typed with ``fn``'s own signature:
    ``Callable[..., Any]`` erased `implicit_gradient`'s to ``(*Any, **Any) -> Any`` for
    type checkers and IDEs."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with no_autocast():
            return fn(*args, **kwargs)

    return run


HVPMode = Literal["exact", "finite-difference"]


@dataclass
class ImplicitResult:
    """Outer-loss gradients w.r.t. each parameter (aligned with ``params``) and the CG log."""

    grads: tuple[Tensor, ...]
    cg: CGResult


def hvp(grad_x: Tensor, x: Tensor, v: Tensor) -> Tensor:
    """Exact Hessian-vector product H v = ∂/∂x (g·v) by double backward.

    ``grad_x`` must be g = ∇ₓT computed with ``create_graph=True``. The graph is retained so the
    product can be taken repeatedly (one call per CG iteration).
    """
    (out,) = torch.autograd.grad(grad_x, x, grad_outputs=v, retain_graph=True, allow_unused=True)
    # T linear in x leaves g without a path back to x: the Hessian is then zero.
    return torch.zeros_like(x) if out is None else out


def _grad_x(inner_objective: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇ₓT at x, without building a graph for higher derivatives."""
    xx = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(inner_objective(xx), xx, allow_unused=True)
    return torch.zeros_like(xx) if g is None else g


def _fd_matvec(
    inner_objective: Callable[[Tensor], Tensor], x: Tensor, fd_eps: float
) -> Callable[[Tensor], Tensor]:
    """H p ≈ (g(x + h p) − g(x − h p)) / 2h per sample (the paper's finite-difference variant).

    The step is per sample so each perturbation has norm fd_eps·max(1, ‖x_i‖): a fixed-norm step
    would be lost in rounding for large images and too coarse for tiny attribute vectors.
    """
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    x_norm = x.detach().reshape(n, -1).norm(dim=1)

    def matvec(p: Tensor) -> Tensor:
        p_norm = p.reshape(n, -1).norm(dim=1)
        h = fd_eps * x_norm.clamp_min(1.0) / p_norm.clamp_min(torch.finfo(p.dtype).tiny)
        h = torch.where(p_norm > 0, h, torch.zeros_like(h)).view(shape)
        # The step in x's dtype: CG's directions are in the outer gradient's, which may be
        # wider (a float64 ∇ₓL on a float32 problem evaluated the model at a float64 x and a
        # float32 model failed: "Input type (double) and bias type (float)").
        step = (h * p).to(x.dtype)
        g_plus = _grad_x(inner_objective, x + step)
        g_minus = _grad_x(inner_objective, x - step)
        # p_i = 0 gives h_i = 0 and 0/0: that product is exactly zero.
        denom = 2 * h.clamp_min(torch.finfo(h.dtype).tiny)
        return torch.where(h > 0, (g_plus - g_minus).to(p.dtype) / denom, 0.0)

    return matvec


@_without_autocast
def implicit_gradient(
    inner_objective: Callable[[Tensor], Tensor],
    x_star: Tensor,
    params: Iterable[Tensor] | Tensor,
    outer_grad: Tensor,
    *,
    cg_max_iter: int = 20,
    cg_tol: float = 1e-5,
    damping: float = 0.0,
    hvp: HVPMode = "exact",
    fd_eps: float = 1e-3,
    cg_x0: Tensor | None = None,
    cg_verify: bool = False,
    adjoint: Tensor | None = None,
    check_finite: bool = True,
) -> ImplicitResult:
    """dL/dθ for x* = argmin_x T(x, θ), given ``outer_grad`` = ∇ₓL at x*.

    ``inner_objective(x)`` returns Σ_i T_i(x_i, θ) (a scalar) so ∇ₓ is block-diagonal over the
    batch; θ enters through closure and ``params`` lists the tensors to differentiate (any
    iterable, e.g. ``model.parameters()``; leaves or
    intermediate tensors such as a predicted attribute vector; one tensor alone is taken as a
    list of one, as in ``torch.autograd.grad``). Unused params get zeros, except a computed
    param the objective never reaches although it reaches the weights the param is computed
    from (a parametrized .weight read outside it: a stale copy), which is refused. The
    caller's graph is left intact: tensors computed from θ outside ``inner_objective`` can be
    backpropagated through afterwards, and the function called again.
    Per-sample CG needs the samples uncoupled: T_i may depend on x_i alone, so no BatchNorm
    in train mode (batch statistics), no dropout, and x of shape (D,) means D scalar
    problems, not one D-vector problem (give it shape (1, D); a 1-D x whose entries
    interact is refused). Otherwise a coupled objective gives a wrong gradient, which CG may
    still report as converged. x* must be finite (a NaN row made
    every θ-gradient NaN): drop or reset such samples first.
    ``hvp`` picks exact double-backward products or finite differences of ∇ₓT.
    ``cg_verify`` checks CG's "converged" claim against the true residual when ``cg_tol`` is
    below sqrt(machine eps) (see :func:`batched_cg`; exact products only).
    ``adjoint``: v already solved by the caller (a structured solve such as
    :func:`~causalign.implicit.lowrank_diag_solve` of a Gauss-Newton Hessian); CG is skipped
    and reported as a direct solve (0 iterations, residual not tracked: NaN, converged and
    no breakdown where v is finite).
    ``check_finite=False`` skips the refusal of a non-finite x* (one host sync a call), for
    callers that have already reset such samples.
    ``outer_grad`` of a lower precision than x* is promoted to x*'s dtype. Bad arguments fail
    in one line (ValueError/TypeError): ``cg_max_iter`` an integer >= 1, ``damping`` >= 0,
    ``fd_eps`` > 0 and at least 10× x*'s machine epsilon for finite differences.
    Runs without autocast (`no_autocast`): under a caller's ``torch.autocast`` the
    objective, its derivatives and CG stay in the dtype of x* and the weights.
    Returns the gradients; nothing is accumulated into any ``.grad``.
    """
    if not (isinstance(x_star, Tensor) and x_star.is_floating_point() and x_star.dim() >= 1):
        got = (f"{x_star.dtype} of shape {tuple(x_star.shape)}" if isinstance(x_star, Tensor)
               else type(x_star).__name__)
        raise ValueError(f"x_star must be a floating-point tensor (N, ...) with a leading batch "
                         f"dimension, got {got}")
    if not (isinstance(outer_grad, Tensor) and outer_grad.is_floating_point()):
        raise ValueError(f"outer_grad must be a floating-point tensor, got "
                         f"{getattr(outer_grad, 'dtype', type(outer_grad).__name__)}")
    if outer_grad.shape != x_star.shape:
        raise ValueError(f"outer_grad shape {tuple(outer_grad.shape)} != x* {tuple(x_star.shape)}")
    if adjoint is not None and (not isinstance(adjoint, Tensor) or adjoint.shape != x_star.shape):
        raise ValueError(f"adjoint shape {tuple(getattr(adjoint, 'shape', ()))} != x* "
                         f"{tuple(x_star.shape)}")
    if check_finite and x_star.numel() > 0:
        finite = torch.isfinite(x_star.detach()).reshape(x_star.shape[0], -1).all(1)
        if not bool(finite.all()):
            # ∂g/∂θ at a NaN/inf sample is NaN, and NaN·0 = NaN: its zero adjoint did not keep
            # it out of the mixed product, so one such sample made every θ-gradient NaN while
            # the CG report flagged that sample alone.
            bad_rows = (~finite).nonzero().flatten().tolist()
            shown = ", ".join(map(str, bad_rows[:5])) + (", ..." if len(bad_rows) > 5 else "")
            raise ValueError(f"x_star is not finite in sample(s) [{shown}]: no gradient is "
                             f"defined there; drop or reset those samples first")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("implicit_gradient needs autograd; call it outside "
                           "torch.inference_mode()")
    params = _as_param_list(params)
    bad = [i for i, q in enumerate(params) if not isinstance(q, Tensor)]
    if bad:  # `q.requires_grad` below failed with "'float' object has no attribute ..."
        raise TypeError(f"params must be tensors; params[{bad[0]}] is "
                        f"{type(params[bad[0]]).__name__}")
    _check_options(hvp, cg_max_iter, damping, fd_eps, x_star.dtype)
    # ∇ₓL lives in x's space: a lower-precision outer_grad (float32 against a float64 x*, or
    # an autocast half) ran the whole CG in its dtype and capped the gradient's accuracy there.
    outer_grad = outer_grad.to(torch.promote_types(outer_grad.dtype, x_star.dtype))

    x = x_star.detach().requires_grad_(True)
    # exact products differentiate this forward twice: lean double-backward nodes for the
    # modules that causalign's eval_mode(fold_bn=True) patched (implicit/fastgrad.py).
    # Attention in its math form: g is differentiated again (products, mixed product), and
    # the fused kernels have no double backward ("derivative for aten::_scaled_dot_product_
    # flash_attention_for_cpu_backward is not implemented": any model with
    # nn.MultiheadAttention or F.scaled_dot_product_attention failed in causal-align)
    with torch.enable_grad(), double_backward_graph() if hvp == "exact" else nullcontext(), \
            math_attention(), record_function("causalign.implicit.first_derivative"):
        t = inner_objective(x)
        if not isinstance(t, Tensor) or t.numel() != 1:
            raise ValueError(f"inner_objective must return a scalar (Σ_i T_i), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        g = None
        if t.requires_grad:
            (g,) = torch.autograd.grad(t.reshape(()), x, create_graph=True, allow_unused=True)
    if g is None:  # autograd's own message would say "Set allow_unused=True"
        raise ValueError("inner_objective does not depend on x: x* is no argmin of it")

    if adjoint is not None:
        v = adjoint.detach().to(outer_grad.dtype)
        finite = torch.isfinite(v).flatten(1).all(1)
        cg = CGResult(solution=torch.where(finite.view((-1,) + (1,) * (v.dim() - 1)), v, 0.0),
                      iterations=0, residual_norm=torch.full(finite.shape, float("nan"),
                                                           dtype=v.dtype, device=v.device),
                      converged=finite, breakdown=~finite, nonfinite=~finite)
        return _mixed_product(g, params, cg)

    if hvp == "exact":

        def matvec(p: Tensor) -> Tensor:
            # T linear in x, with no θ that requires grad: g is a constant without a graph
            # (autograd.grad failed with "element 0 of tensors does not require grad"); H = 0.
            if not g.requires_grad:
                return torch.zeros_like(p)
            return _exact_hvp(g, x, p).detach()

    else:
        matvec = _fd_matvec(inner_objective, x.detach(), fd_eps)

    with record_function("causalign.implicit.cg"), _coupled_as_objective_error(x_star):
        cg = batched_cg(
            matvec,
            outer_grad.detach(),
            x0=cg_x0,
            max_iter=cg_max_iter,
            tol=cg_tol,
            damping=damping,
            # stop as soon as every sample has converged: a product costs a forward and a
            # backward, the "anything active?" test one host sync. Preconditioned CG on a
            # piecewise-linear classifier converges in C iterations (causal_align.py), so with the
            # binary default cap of 3 the 3rd product was computed for samples already frozen
            # (the solution is the same: frozen samples' iterates never move)
            check_every=1,
            # finite-difference products are not a fixed linear map: their true residual
            # measures the differencing noise (~fd_eps²), not the solve
            verify=cg_verify and hvp == "exact",
        )
    return _mixed_product(g, params, cg)


@contextmanager
def _coupled_as_objective_error(x_star: Tensor) -> Iterator[None]:
    """batched_cg's refusal of a coupled 1-D system, said in implicit_gradient's terms."""
    try:
        yield
    except CoupledSystemsError:
        d = x_star.shape[0]
        raise ValueError(f"inner_objective couples the entries of the 1-D x_star (shape "
                         f"({d},)): a 1-D x is {d} independent scalar problems (the first "
                         f"dimension is the batch); for one {d}-vector problem pass x_star "
                         f"and outer_grad of shape (1, {d})") from None


def _check_options(hvp: str, cg_max_iter: object, damping: float, fd_eps: float,
                   dtype: torch.dtype) -> None:
    """One ValueError line for an option :func:`implicit_gradient` cannot use."""
    if hvp not in ("exact", "finite-difference"):
        raise ValueError(f"hvp must be 'exact' or 'finite-difference', got {hvp!r}")
    # Zero iterations return the start: every gradient would silently be 0 (or cg_x0's).
    iteration_count(cg_max_iter, "cg_max_iter", minimum=1)
    if hvp == "finite-difference":
        # fd_eps <= 0 or NaN made every product 0: CG broke down and each gradient came back
        # silently 0. A step within a few ulps of x (bfloat16: eps 7.8e-3 against the default
        # 1e-3) rounds x ± h·p back to x, or leaves only rounding noise in the difference.
        if not (math.isfinite(fd_eps) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a finite number > 0, got {fd_eps}")
        floor = 10 * torch.finfo(dtype).eps
        if fd_eps < floor:
            raise ValueError(f"fd_eps={fd_eps:g} is below what {dtype} resolves: the "
                             f"finite-difference Hessian products would be rounding noise; "
                             f"use fd_eps >= {floor:.2g} or hvp='exact'")
    try:
        damping_ok = math.isfinite(damping) and damping >= 0
    except TypeError:
        damping_ok = False
    if not damping_ok:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def _mixed_product(g: Tensor, params: Sequence[Tensor], cg: CGResult) -> ImplicitResult:
    """dL/dθ = −(∂g/∂θ)ᵀ v with v = cg.solution: one backward of g·v w.r.t. θ."""
    v = cg.solution.detach()
    # Only tensors that can carry a gradient are differentiated; the rest get zeros.
    diff_idx = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[Tensor] = [torch.zeros_like(p) for p in params]
    mixed: Sequence[Tensor | None] = [None] * len(diff_idx)
    if diff_idx and g.requires_grad:
        with record_function("causalign.implicit.mixed_product"):
            # retain_graph: g's graph can reach nodes the caller built from θ outside
            # inner_objective (a = θ.exp() used inside it); freeing them broke the caller's
            # own later backward and a second solve ("backward through the graph a second
            # time"). g's own nodes are local and go when it does.
            mixed = torch.autograd.grad(
                g, [params[i] for i in diff_idx], grad_outputs=v, allow_unused=True,
                retain_graph=True,
            )
    for i, gr in zip(diff_idx, mixed, strict=True):
        if gr is not None:
            grads[i] = -gr
        elif params[i].grad_fn is not None and _reaches_leaves_of(g, v, params[i]):
            # A computed tensor the objective never reached, while it does reach the weights
            # the tensor is computed from, is a stale copy: a parametrized module's .weight
            # (parametrize, weight_norm, spectral_norm) is recomputed on every access, so
            # [conv.weight] got an all-zero gradient, silently. One whose weights the
            # objective does not use at all keeps its zero gradient.
            raise ValueError(f"params[{i}] is a computed tensor that inner_objective does "
                             f"not use (its gradient would be 0): a parametrized weight is "
                             f"recomputed on each access; pass the tensors it is computed "
                             f"from (model.parameters())")
    return ImplicitResult(grads=tuple(grads), cg=cg)


def _reaches_leaves_of(g: Tensor, v: Tensor, tensor: Tensor) -> bool:
    """Whether g·v depends on any leaf ``tensor`` is computed from (one extra backward, on
    the refusal path only)."""
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            leaves.append(node.variable)
        stack.extend(nxt for nxt, _ in node.next_functions)
    if not leaves or not g.requires_grad:
        return False
    reached = torch.autograd.grad(g, leaves, grad_outputs=v, allow_unused=True,
                                  retain_graph=True)
    return any(r is not None for r in reached)


def _as_param_list(params: Iterable[Tensor] | Tensor) -> list[Tensor]:
    """``params`` as a list; a bare tensor is one parameter. ``list(theta)`` split it into
    0-d slices that are not in any graph, so every gradient came back silently 0."""
    return [params] if isinstance(params, Tensor) else list(params)


_exact_hvp = hvp  # `implicit_gradient` shadows the name with its ``hvp`` mode argument


class _ImplicitArgmin(torch.autograd.Function):
    """Identity on x* in the forward pass; implicit adjoint gradient to params in the backward."""

    @staticmethod
    def forward(ctx: Any, x_star: Tensor, options: dict[str, Any], *params: Tensor) -> Tensor:
        ctx.x_star = x_star.detach()
        ctx.options = options
        # The original objects, not saved copies: the closure in ``options`` uses these very
        # tensors, and autograd.grad needs them as they appear in its graph.
        ctx.params = params
        return x_star.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        opts = dict(ctx.options)
        inner = opts.pop("inner_objective")
        res = implicit_gradient(inner, ctx.x_star, list(ctx.params), grad_out.detach(),
                                **opts)
        grads = res.grads
        if torch.is_grad_enabled():
            # create_graph=True: the mixed product has no graph, so a second derivative would
            # silently miss the terms through v and ∂g/∂θ (and a non-leaf param's chain rule
            # would still attach one): differentiating these gradients raises instead.
            # The guard node takes the params as inputs: the engine only runs nodes on a path
            # to what is differentiated, and the params are that path.
            grads = tuple(_FirstOrderOnly.apply(gr, *ctx.params) for gr in grads)
        return (None, None, *grads)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose own derivative is refused (`implicit_argmin` is once differentiable)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, *params: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError("implicit_argmin is once_differentiable: its gradient cannot be "
                           "differentiated again (create_graph=True gives no second "
                           "derivative)")


def implicit_argmin(
    inner_objective: Callable[[Tensor], Tensor],
    x_star: Tensor,
    params: Iterable[Tensor] | Tensor,
    **options: Any,
) -> Tensor:
    """Attach a detached solution x* to the graph of ``params`` via the implicit adjoint.

    The returned tensor equals x*; backpropagating any loss through it runs
    :func:`implicit_gradient` (``options`` are its keyword arguments) and delivers dL/dθ to
    ``params``. Params may be non-leaf tensors (e.g. predicted attributes), whose gradient then
    flows on to whatever produced them. The training methods call `implicit_gradient`
    directly (their outer loss is known when they solve); this is the autograd-composable form
    for other bilevel code.
    """
    # Checked now: a misspelt option or a bad value failed only inside .backward(), after the
    # whole forward and loss had run.
    known = [k for k, p in inspect.signature(implicit_gradient).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"implicit_argmin got unknown option {unknown[0]!r}; known: "
                        f"{', '.join(known)}")
    if not (isinstance(x_star, Tensor) and x_star.is_floating_point()):
        raise ValueError(f"x_star must be a floating-point tensor, got "
                         f"{getattr(x_star, 'dtype', type(x_star).__name__)}")
    defaults = {k: p.default for k, p in inspect.signature(implicit_gradient).parameters.items()}
    chosen = {**defaults, **options}
    _check_options(chosen["hvp"], chosen["cg_max_iter"], chosen["damping"], chosen["fd_eps"],
                   x_star.dtype)
    params = _as_param_list(params)
    _refuse_nested_params(params)
    opts = dict(options, inner_objective=inner_objective)
    return _ImplicitArgmin.apply(x_star.detach(), opts, *params)


def _refuse_nested_params(params: Sequence[Tensor]) -> None:
    """One ValueError line when a param is computed from another one.

    The backward of `_ImplicitArgmin` returns each param's total derivative (autograd.grad
    through every path of g), and autograd then also carries the derived param's gradient on
    to its source: the path through it was counted twice (params [a = e^φ, φ]: 0.296 for an
    exact 0.519). Only the graphs of non-leaf params are walked: model weights cost nothing.
    """
    first: dict[int, int] = {}
    for i, q in enumerate(params):
        j = first.setdefault(id(q), i)
        if j != i and isinstance(q, Tensor) and q.requires_grad:  # [θ, θ]: counted twice too
            raise ValueError(f"params[{i}] is params[{j}]: pass each tensor once (its "
                             f"gradient would be counted twice)")
    # a non-leaf param is one output of its grad_fn: (node, output_nr). A node can have
    # several (unbind, split, chunk): siblings of one node are not computed from each other.
    owner: dict[tuple[object, int], int] = {}
    for i, q in enumerate(params):
        if not isinstance(q, Tensor) or not q.requires_grad:
            continue
        if q.grad_fn is not None:
            owner.setdefault((q.grad_fn, q.output_nr), i)
    leaves = {id(q): i for i, q in enumerate(params)
              if isinstance(q, Tensor) and q.requires_grad and q.grad_fn is None}
    if len(owner) + len(leaves) < 2:
        return
    for i, q in enumerate(params):
        if not isinstance(q, Tensor) or q.grad_fn is None:
            continue
        seen: set[object] = {q.grad_fn}
        stack = [q.grad_fn]
        while stack:
            node = stack.pop()
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                j = owner.get((nxt, nr))
                if j is None:
                    var = getattr(nxt, "variable", None)  # AccumulateGrad of a leaf
                    j = leaves.get(id(var)) if var is not None else None
                if j is not None and j != i:
                    raise ValueError(f"params[{i}] is computed from params[{j}]: pass only one "
                                     f"of them (its gradient would be counted twice)")
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
