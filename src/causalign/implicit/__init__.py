"""Implicit differentiation of per-sample argmins: batched CG and the adjoint gradient."""

from causalign.implicit.adjoint import (
    ImplicitResult,
    hvp,
    implicit_argmin,
    implicit_gradient,
    no_autocast,
)
from causalign.implicit.cg import CGResult, CoupledSystemsError, batched_cg
from causalign.implicit.lowrank import lowrank_diag_solve

__all__ = [
    "CGResult",
    "CoupledSystemsError",
    "ImplicitResult",
    "batched_cg",
    "hvp",
    "implicit_argmin",
    "implicit_gradient",
    "lowrank_diag_solve",
    "no_autocast",
]
