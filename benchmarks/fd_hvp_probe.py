"""Finite-difference Hessian-vector products (the paper's variant) against exact ones.

    python benchmarks/fd_hvp_probe.py [--seed 0] [--fd-eps 1e-2,1e-3,1e-4,1e-5]
        [--caps 3,10 (or "" for the products alone)] [--float64]
        [--out benchmarks/results/fd_hvp_probe/seedS[_float64].json]

The fixed-θ setting of `bench_causal_align.py` (its `setup`: the 7-layer CNN briefly trained
by ERM on the plus-minus data, 16 aligned samples). The samples' x* is warm-started by
``--warm-visits`` searches once; every measurement starts from a copy of that cache, so all
solve the same adjoint system. Per `method.fd_eps`:

* **products**: the relative error ‖H_fd p − H p‖ / ‖H p‖ of the central-difference product
  against the exact (double-backward) one at x*, for ``--directions`` random directions p per
  sample, in the inner problem T(x) = CE(f(x), y*) + α·d(x, x0) as the method solves it (eval
  mode, BatchNorm folded at the batch's statistics); and the share of products with
  pᵀH_fd p ≤ 0, which CG reads as negative curvature (the exact pᵀHp is positive there).
* **the training step** per CG cap, with the method's default ``negative_curvature`` (the
  Gauss-Newton fallback: the share of steps it solved, and the gradient's cosine to the
  exact-product one) and with ``negative_curvature=damping`` at δ fixed (the share of
  samples CG dropped).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from bench_causal_align import (
    _counts,
    check_counts,
    check_out,
    cosine,
    make_batch,
    setup,
    step_grads,
    visit,
)

from causalign.explain.counterfactual import capture_bn_stats, eval_mode
from causalign.implicit.adjoint import _fd_matvec, hvp
from causalign.io import atomic_write_json
from causalign.methods import build_method

CG_KEYS = ("cg_converged", "cg_dropped", "cg_iters", "gn_fallback")


def _step(model, batch, cache: dict, align_batch: int, **args) -> tuple[torch.Tensor, dict]:
    method = build_method("causal-align", dict(args, align_batch=align_batch, warm_start=True))
    method.cache.load_state_dict(copy.deepcopy(cache))
    g, parts = step_grads(method, model, batch)
    return g, {k: float(parts[k]) for k in CG_KEYS if k in parts}


def product_errors(model, batch, cache: dict, fd_eps: float, directions: int,
                   seed: int) -> dict:
    """Relative error of finite-difference against exact products at the cached x*."""
    method = build_method("causal-align", dict(warm_start=True))
    method.cache.load_state_dict(copy.deepcopy(cache))
    with torch.no_grad(), capture_bn_stats(model) as stats:
        model(batch["image"])
    res = method.generator(model).generate(batch["image"], target=1 - batch["label"],
                                           ids=batch["index"], report=False, bn_stats=stats)
    prob, x = res.problem, res.u_star.detach()
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    errors, nonpositive = [], 0
    with eval_mode(model, fold_bn=True, bn_stats=stats):
        def inner(u: torch.Tensor) -> torch.Tensor:
            return prob.terms(u)[0].sum()

        xx = x.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(inner(xx), xx, create_graph=True)
        fd = _fd_matvec(inner, x, fd_eps)
        for _ in range(directions):
            p = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            exact = hvp(g, xx, p).detach()
            approx = fd(p)
            err = (approx - exact).reshape(n, -1).norm(dim=1) / \
                exact.reshape(n, -1).norm(dim=1)
            errors += err.tolist()
            nonpositive += int(((p * approx).reshape(n, -1).sum(1) <= 0).sum())
    return {"relative_error_median": statistics.median(errors),
            "relative_error_max": max(errors),
            "share_nonpositive_curvature": nonpositive / (n * directions)}


def _positive_floats(text: str) -> list[float] | None:
    """Comma-separated finite numbers > 0; None if any is not ('abc' was a traceback)."""
    try:
        out = [float(e) for e in text.split(",")]
    except ValueError:
        return None
    return out if all(0 < e < float("inf") for e in out) else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fd-eps", default="1e-2,1e-3,1e-4,1e-5")
    ap.add_argument("--caps", default="3,10", help="CG iteration caps (method.cg_iters)")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--warm-visits", type=int, default=4)
    # the sweep's setting; smaller only to test the script
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--align-batch", type=int, default=16)
    ap.add_argument("--erm-steps", type=int, default=20)
    ap.add_argument("--float64", action="store_true",
                    help="model and images in float64: whether rounding causes the errors")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/fd_hvp_probe/seedS[_float64].json")
    a = ap.parse_args(argv)
    # per seed and dtype, as the stored files are named: a fixed seed0.json let the runs of
    # seeds 1 and 2 (and the float64 one) replace seed 0's results
    a.out = a.out or (f"benchmarks/results/fd_hvp_probe/seed{a.seed}"
                      f"{'_float64' if a.float64 else ''}.json")
    fd_steps = _positive_floats(a.fd_eps)
    caps = _counts(a.caps, 1) if a.caps else []
    if fd_steps is None:
        ap.error(f"--fd-eps must be numbers > 0, comma-separated; got '{a.fd_eps}'")
    if caps is None:
        ap.error(f"--caps must be integers >= 1, comma-separated; got '{a.caps}'")
    check_counts(ap, a, ("directions", "size", "align_batch"), ("warm_visits", "erm_steps"))
    check_out(ap, a.out)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ds, model = setup(a.size, 128, a.erm_steps, a.seed)
    batch = make_batch(ds, a.align_batch)
    if a.float64:
        model.double()
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    warm = build_method("causal-align", dict(align_batch=a.align_batch, warm_start=True))
    visit(warm, model, batch, a.warm_visits)
    cache = copy.deepcopy(warm.cache.state_dict())
    exact, exact_cg = _step(model, batch, cache, a.align_batch)
    rows = []
    for fd_eps in fd_steps:
        row: dict = dict(fd_eps=fd_eps, **product_errors(model, batch, cache, fd_eps,
                                                          a.directions, a.seed))
        for cap in caps:
            g, fallback = _step(model, batch, cache, a.align_batch, hvp="finite-difference",
                                fd_eps=fd_eps, cg_iters=cap)
            _, fixed = _step(model, batch, cache, a.align_batch, hvp="finite-difference",
                             fd_eps=fd_eps, cg_iters=cap, negative_curvature="damping",
                             damping_max=build_method("causal-align").params.damping)
            row[f"cap{cap}"] = {"default": dict(fallback, cosine_to_exact=cosine(g, exact)),
                                "damping_fixed": fixed}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "fd_hvp_probe", "seed": a.seed, "size": a.size,
              "dtype": "float64" if a.float64 else "float32",
              "align_batch": a.align_batch, "warm_visits": a.warm_visits,
              "directions": a.directions, "exact": exact_cg, "rows": rows,
              "torch": torch.__version__, "elapsed_s": time.perf_counter() - t_start}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
