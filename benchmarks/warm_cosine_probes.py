"""Why is the warm implicit gradient off at K = 10 on some seeds? Probes of the inner Adam.

    python benchmarks/warm_cosine_probes.py --seed 1 [--k 10] [--out FILE]
        [--variants "default;lr=0.02;lr=0.05;lr=0.005;decay=0.1;decay=0.01;carry"]

The fixed-θ setting of `bench_causal_align.py` (its `setup`, same 16 samples, 8 warm visits,
then the step whose gradient is compared). Each variant changes only the inner search:

* ``lr=V``: `method.inner_lr` V (constant, as the method runs it);
* ``decay=D``: the step size decays geometrically within each visit, lr → D·lr over the K
  steps (not a method option: the probe swaps in its own Adam loop);
* ``carry``: Adam's moments and step count carry over from one visit to the next instead of
  restarting at zero (likewise a probe-only Adam loop).

Per variant: cosine of the step's alignment gradient to the fixed reference from x0
(`reference_grad`, as the sweep) and to the reference continued tightly from the variant's
own x* (the local minimum its iterates are in), the two references' cosine, and L_align.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_causal_align as sweep
import torch
from bench_causal_align import (
    build_method,
    cosine,
    make_batch,
    reference_grad,
    setup,
    step_grads,
    visit,
)

import causalign.explain.counterfactual as cf
from causalign.io import atomic_write_json

_builtin_adam = cf._adam


def probe_adam(decay: float, carry: bool):
    """An inner Adam like `counterfactual._adam`, with a geometric step decay within the
    visit and, with ``carry``, moments kept from the previous visit (one batch: the probe
    always visits the same samples in the same order)."""
    state: dict = {}

    def adam(prob, u, steps, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        u = u.detach().clone()
        m, v, t0 = state.get("moments") or (torch.zeros_like(u), torch.zeros_like(u), 0)
        for i in range(steps):
            t = t0 + i + 1
            lr_t = lr * decay ** (i / max(steps - 1, 1))
            uu = u.requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(prob.objective(uu).sum(), uu)
            with torch.no_grad():
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                u = uu.detach().sub_(m.div(denom).mul_(lr_t / (1 - beta1 ** t)))
                if prob.projected:
                    u = prob.project(u)
        if carry:
            state["moments"] = (m, v, t0 + steps)
        return u.detach()

    return adam


def parse_variant(text: str) -> tuple[dict, float, bool]:
    args, decay, carry = {}, 1.0, False
    for item in filter(None, text.split(",")):
        if item == "default":
            continue
        if item == "carry":
            carry = True
            continue
        key, _, value = item.partition("=")
        try:
            number = float(value) if key in ("lr", "decay") else None
        except ValueError:
            number = None
        if number is None or not number > 0:
            raise SystemExit(f"error: variant item '{item}': expected lr=V or decay=D with "
                             "V, D > 0, carry or default")
        if key == "lr":
            args["inner_lr"] = number
        else:
            decay = number
    return args, decay, carry


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warm-visits", type=int, default=8)
    # the sweep's setting; smaller only to test the script
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--align-batch", type=int, default=16)
    ap.add_argument("--erm-steps", type=int, default=20)
    ap.add_argument("--ref-steps", type=int, default=300, help="Adam steps per reference stage")
    ap.add_argument("--ref-polish", type=int, default=50)
    ap.add_argument("--variants", default="default;lr=0.02;lr=0.05;lr=0.005;decay=0.1;"
                                          "decay=0.01;carry")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    sweep.check_counts(ap, a, ("k", "size", "align_batch", "ref_steps"),
                       ("warm_visits", "erm_steps", "ref_polish"))
    sweep.check_out(ap, a.out)
    variants = [(text, *parse_variant(text)) for text in a.variants.split(";")]
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    sweep.REF_STAGES = tuple((a.ref_steps, lr) for _, lr in sweep.REF_STAGES)
    ds, model = setup(a.size, 128, a.erm_steps, a.seed)
    sub = make_batch(ds, a.align_batch)
    ref, _ = reference_grad({}, model, sub, polish=a.ref_polish)
    rows = []
    for text, args, decay, carry in variants:  # parsed before setup: a typo failed after it
        custom = decay != 1.0 or carry
        # Adam unless the variant names another search: the one these probes vary (swapped
        # in below), whatever the method's default
        method = build_method("causal-align", dict({"inner_optimizer": "adam", **args},
                                                   align_batch=a.align_batch,
                                                   normalize="total",
                                                   steps=a.k, cg_iters=3, warm_start=True))
        cf._adam = probe_adam(decay, carry) if custom else _builtin_adam
        try:
            visit(method, model, sub, a.warm_visits)
            g, parts = step_grads(method, model, sub)
        finally:
            cf._adam = _builtin_adam  # the references use the method's own Adam
        own, own_parts = reference_grad({}, model, sub, method=method, polish=a.ref_polish)
        row = dict(variant=text, cosine_warm=cosine(g, ref), cosine_warm_own_ref=cosine(g, own),
                   own_ref_cosine_to_reference=cosine(own, ref), align_warm=parts.get("align"),
                   own_ref_align=own_parts.get("align"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "warm_cosine_probes", "seed": a.seed, "k": a.k,
              "warm_visits": a.warm_visits, "size": a.size, "align_batch": a.align_batch,
              "reference": {"adam_steps_per_stage": a.ref_steps, "newton_polish": a.ref_polish},
              "torch": torch.__version__, "rows": rows,
              "elapsed_s": time.perf_counter() - t_start}
    out = Path(a.out or f"benchmarks/results/warm_cosine_probes_seed{a.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
