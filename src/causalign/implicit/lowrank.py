"""Direct per-sample solve of a low-rank-plus-diagonal system (Woodbury).

The Gauss-Newton Hessian of T(u) = CE(z(u)) + α·d(u) is JᵀSJ + A: J = ∂z/∂u has R rows per
sample (R = C − 1 for softmax), S = ∇²_z CE is R × R and A = α·∇²d is diagonal. For a
piecewise-linear classifier it is the exact Hessian, and it is positive definite whenever
A is. (JᵀSJ + A)v = b then costs R backwards for J and an R × R solve per sample,
O(R²D), instead of CG iterations of double-backward Hessian products:

    (A + JᵀSJ)⁻¹b = A⁻¹b − A⁻¹JᵀS·y,   (I + JA⁻¹JᵀS)·y = JA⁻¹b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["lowrank_diag_solve"]


def lowrank_diag_solve(jac: Tensor, curv: Tensor, diag: Tensor, rhs: Tensor) -> Tensor:
    """v with (Jᵢᵀ Sᵢ Jᵢ + diag(aᵢ)) vᵢ = bᵢ for every sample i.

    ``jac`` (N, R, D), ``curv`` = S (N, R, R), ``diag`` = a (N, D), all > 0, and ``rhs``
    (N, ...) with D elements per sample; returns v shaped like ``rhs``. Solved in at least
    float32. S is expected positive semi-definite (a softmax CE Hessian is), which keeps the
    system positive definite. A sample whose system is not finite or singular, or whose
    diagonal is not positive, comes back as NaN (never a LinAlgError for the batch).
    """
    n = rhs.shape[0]
    if jac.dim() != 3 or curv.shape != (n, jac.shape[1], jac.shape[1]) or jac.shape[0] != n:
        raise ValueError(f"jac must be (N, R, D) and curv (N, R, R) for N = {n}, got "
                         f"{tuple(jac.shape)} and {tuple(curv.shape)}")
    # not reshape(n, -1): ambiguous for N = 0 (a RuntimeError, where batched_cg and
    # implicit_gradient return an empty solve)
    b = rhs.reshape(n, math.prod(rhs.shape[1:]))
    if diag.shape != b.shape or jac.shape[2] != b.shape[1]:
        raise ValueError(f"diag {tuple(diag.shape)} and jac {tuple(jac.shape)} do not match "
                         f"rhs with {b.shape[1]} elements per sample")
    work = torch.promote_types(rhs.dtype, torch.float32)
    jac, curv, diag, b = jac.to(work), curv.to(work), diag.to(work), b.to(work)
    bad = ~(diag > 0).all(1)
    a_inv = 1.0 / diag.clamp_min(torch.finfo(work).tiny)
    ja = jac * a_inv[:, None, :]
    eye = torch.eye(jac.shape[1], dtype=work, device=jac.device)
    inner = eye + (ja @ jac.transpose(1, 2)) @ curv                  # I + J A⁻¹ Jᵀ S
    bad |= ~torch.isfinite(inner).flatten(1).all(1) | ~torch.isfinite(b).all(1)
    inner = torch.where(bad[:, None, None], eye, inner)
    # solve_ex: a singular I + J A⁻¹ Jᵀ S in one sample (an indefinite S) raised a
    # LinAlgError for the whole batch; its info flags that sample alone.
    y, info = torch.linalg.solve_ex(inner, (ja @ b[:, :, None]).nan_to_num(0.0, 0.0, 0.0))
    bad |= info != 0
    v = a_inv * (b - (jac.transpose(1, 2) @ (curv @ y))[..., 0])
    v = v.masked_fill(bad[:, None], float("nan"))  # not v[bad] = …: no host sync on CUDA
    return v.reshape(rhs.shape).to(rhs.dtype)
