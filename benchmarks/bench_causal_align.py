"""causal-align: step time vs ERM and implicit-gradient accuracy, swept over K and CG iterations.

    python benchmarks/bench_causal_align.py [--out benchmarks/results/causal_align_sweep.json]
        [--ks 1,3,5,10 --cgs 1,2,3,5 --size 64 --batch-size 64 --align-batch 16 --repeats 3]
        [--optimizers adam,newton --polish 0,2 --seed S --no-own-ref --skip-paper]
        [--cache-dtype float32|float16|bfloat16]

Setup (CPU, one intra-op thread by default): a plus-minus synthetic training set (the demo's
generator at --size px), the seed's 7-layer CNN briefly trained by ERM so it already leans on
the shortcut (the state causal-align has to correct), one training batch.

For every (inner optimiser, K inner steps, CG iterations, Gauss-Newton polish steps):

* **time**: one full training step (loss + backward) of causal-align and one of ERM on the same
  batch, alternated repeat by repeat in this process so load on a shared machine hits both;
  ratio = median(causal-align) / median(ERM).
* **cosine** of the alignment gradient dL_align/dθ (the step's gradient minus the CE gradient)
  to a high-accuracy reference on the same model and samples: the inner problem solved by
  3 × 300 warm-started Adam steps at lr 1e-2, 1e-3, 1e-4, then CG to 1e-8 relative residual
  (200 iterations). Reported cold (x* from K steps at x0) and warm (the sample's x* refined
  over 8 earlier visits, what warm start gives in training after a few epochs). The inner
  problem is not convex, and warm iterates may head for another local minimum than the
  reference's, so each warm row also gives its cosine to references started from that row's
  own x*: solved the same tight way (``cosine_warm_own_ref``) and by Gauss-Newton alone, which
  never leaves the row's basin (``cosine_warm_own_newton_ref``); ``--no-own-ref`` skips both.

The JSON is rewritten after every row (``"complete": false`` until the end), so an
interrupted sweep keeps its finished rows: rerun with the same options and it continues
(rows are only reused for identical options; each row's timing is a ratio measured within
its own process, so a resumed sweep's rows stay comparable).

Side by side, in the same process: the configuration of the paper's published code — latent
space of an autoencoder, L2 distance on the code, 200 Adam steps at lr 0.01, implicit gradient
by TorchOpt `custom_root` with `solve_normal_cg(rtol=0.1)` — on our latent problem (same
objective, α, L_align form and BatchNorm statistics as the latent reference; see
`paper_step`), timed as a training step like ours, with its cosine to the reference of the
latent problem (ours, solved tightly), the same solver run to convergence (which must agree
with that reference), and our solver on that same latent problem at the chosen K/CG.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine.config import TrainConfig
from causalign.errors import CausalignError
from causalign.explain.counterfactual import capture_bn_stats, eval_mode
from causalign.io import atomic_write_json
from causalign.methods import build_method
from causalign.methods.base import DataInfo
from causalign.methods.causal_align import auto_cg_iters

REF_STAGES = ((300, 1e-2), (300, 1e-3), (300, 1e-4))
REF_CG = dict(cg_iters=200, cg_tol=1e-8)
OWN_REF_POLISH = 50  # --ref-polish
OWN_NEWTON_STEPS = 100  # --own-newton-steps


def flat(gs) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def setup(size: int, n_train: int, erm_steps: int, seed: int):
    synth = SynthConfig(n_train=n_train, n_val=1, n_test=1, size=size, seed=seed)
    try:  # before the temporary folder: --size 16 was a DataError traceback (and a leftover)
        synth.validate()
    except CausalignError as exc:
        raise SystemExit(f"error: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix="bench_ca_"))
    # the split is read lazily, so the folder lives as long as the process (every run left
    # ~1 MB in the temp dir before)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    generate(tmp / "data", synth)
    ds = LesionDataset(tmp / "data", "train")
    torch.manual_seed(seed)
    erm = build_method("erm")
    model = erm.build_model(TrainConfig(), DataInfo(1, 2, (1, size, size), []))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(erm_steps):
        idx = torch.randperm(len(ds), generator=g)[:64]
        b = ds.batch(idx)
        loss = F.cross_entropy(model(b["image"]), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ds, model


def make_batch(ds: LesionDataset, n: int) -> dict:
    b = ds.batch(torch.arange(n))
    b["index"] = torch.arange(n)
    return b


def step_grads(method, model, batch) -> tuple[torch.Tensor, dict]:
    """Gradient of the whole step's loss and of CE alone (same BN batch statistics)."""
    params = [p for p in model.parameters()]
    out = method(model, batch)
    total = torch.autograd.grad(out.total, params)
    ce = torch.autograd.grad(F.cross_entropy(model(method.model_input(batch)), batch["label"]),
                             params)
    return flat(total) - flat(ce), out.parts


def time_step(method, model, batch) -> float:
    t0 = time.perf_counter()
    out = method(model, batch)
    model.zero_grad(set_to_none=True)
    out.total.backward()
    return time.perf_counter() - t0


def timed_ratio(make_method, model, batch, repeats: int, warmup: int = 1) -> dict:
    """Alternate ERM and the method; median seconds of each and the ratio."""
    erm = build_method("erm")
    method = make_method()
    te, tm = [], []
    for i in range(warmup + repeats):
        a = time_step(erm, model, batch)
        b = time_step(method, model, batch)
        if i >= warmup:
            te.append(a)
            tm.append(b)
    e, m = statistics.median(te), statistics.median(tm)
    return {"seconds_per_step": m, "erm_seconds_per_step": e, "ratio_to_erm": m / e}


def reference_grad(args: dict, model, batch, ae=None, method=None, stages=None,
                   polish: int = 0) -> tuple[torch.Tensor, dict]:
    """Tight inner solve (3 warm-started Adam stages, then ``polish`` Gauss-Newton steps) +
    long CG: the 'true' dL_align/dθ.

    From x0, or (``method``: a causal-align method whose warm-start cache holds a solution)
    from that solution — the inner problem is not convex, so this gives the reference for
    the local minimum a warm-started run is in (``stages``: (steps, lr) or (steps, lr,
    optimizer), default REF_STAGES). A stage without an optimizer uses the method's
    first-order one (Adam for a Newton method: 900 Newton steps would cost minutes).
    Newton's line search never increases T, so polishing stays in the stages' basin; 900
    Adam steps alone leave L_align well above that basin's minimum (0.28 against 0.15 after
    50 Newton steps, on one model)."""
    stages = REF_STAGES if stages is None else stages
    if method is None:
        method = build_method("causal-align", dict(args, warm_start=True))
        method.autoencoder = ae
    first_order = method.params.inner_optimizer
    first_order = first_order if first_order != "newton" else "adam"
    plan = [(st[0], st[1], st[2] if len(st) > 2 else first_order) for st in stages]
    plan += [(polish, 1.0, "newton")] if polish > 0 else []
    for steps, lr, optimizer in plan[:-1]:
        method.params.steps, method.params.inner_lr = steps, lr
        method.params.inner_optimizer = optimizer
        method.step = 0
        with torch.no_grad(), capture_bn_stats(model) as st:
            model(batch["image"])
        x, y = batch["image"], batch["label"]
        method.generator(model).generate(x, target=1 - y, ids=batch["index"], report=False,
                                         bn_stats=st)
    steps, lr, optimizer = plan[-1]
    method.params.steps, method.params.inner_lr = steps, lr
    method.params.inner_optimizer = optimizer
    method.params.cg_iters, method.params.cg_tol = REF_CG["cg_iters"], REF_CG["cg_tol"]
    return step_grads(method, model, batch)


def visit(method, model, batch, times: int) -> None:
    """``times`` earlier visits of ``batch``: counterfactual searches that fill the method's
    warm-start cache, at the batch's own BatchNorm statistics, as training would."""
    for _ in range(times):
        with torch.no_grad(), capture_bn_stats(model) as st:
            model(batch["image"])
        method.generator(model).generate(batch["image"], target=1 - batch["label"],
                                         ids=batch["index"], report=False, bn_stats=st)


def config_grad(args: dict, model, batch, warm_visits: int, own_ref: bool = False
                ) -> tuple[torch.Tensor, dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """The configuration's alignment gradient after ``warm_visits`` earlier visits; with
    ``own_ref``, also two references solved tightly from the x* that gradient used (its
    cache): the sweep's Adam stages + Gauss-Newton polish, and Gauss-Newton alone
    (`OWN_NEWTON_STEPS`). Newton's line search never increases T, so the second stays in the
    basin the configuration's x* is in; Adam's first steps at lr 1e-2 can leave it."""
    method = build_method("causal-align", dict(args, warm_start=warm_visits > 0))
    visit(method, model, batch, warm_visits)
    g, parts = step_grads(method, model, batch)
    if not own_ref or warm_visits == 0:
        return g, parts, None
    # the step left its x* in the warm-start cache: solve tightly from there (each reference
    # refines the cache in place, so the second starts from a copy of the step's)
    start = copy.deepcopy(method.cache.state_dict())
    own = reference_grad({}, model, batch, method=method, polish=OWN_REF_POLISH)[0]
    method.cache.load_state_dict(start)
    own_newton = reference_grad({}, model, batch, method=method,
                                stages=((OWN_NEWTON_STEPS, 1.0, "newton"),))[0]
    return g, parts, (own, own_newton)


# ------------------------------------------------------------------ the paper's published code


def paper_step(model, ae, batch, method, steps: int = 200, lr: float = 0.01,
               rtol: float = 0.1) -> tuple[torch.Tensor, float]:
    """The paper's published solver on our latent problem: 200 Adam steps on the code z (L2
    distance), then TorchOpt ``custom_root`` with ``solve_normal_cg(rtol=0.1)``.

    The objective is the one our latent rows and their reference solve (``method``, a
    causal-align method in latent space: its α, its L_align form ``normalize``, the batch's
    own BatchNorm statistics, x(z) = x0 + D(z) − D(z0)), so the cosine measures the solver
    alone. Until 2026-12-05 this ran the published code's own objective (running BatchNorm
    statistics, raw Eq. 3 sum) against our reference: two problems whose tight gradients
    have cosine ~0.2, so its 0.514 said nothing about the solver.

    Timed as a training step, like ours: the CE forward and backward on the same samples,
    then the counterfactual and its implicit gradient. Returns (dL_align/dθ, seconds)."""
    import warnings

    from torch.func import functional_call
    from torchopt.diff.implicit import custom_root
    from torchopt.linear_solve import solve_normal_cg

    warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt → functorch shim
    x0, y = batch["image"], batch["label"]
    outside = 1.0 - batch["mask"].to(x0.dtype)
    target = 1 - y
    alpha = method.params.alpha
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p for _, p in model.named_parameters())
    t0 = time.perf_counter()
    with capture_bn_stats(model) as bn_stats:  # the CE part of the step, in train mode
        ce = F.cross_entropy(model(x0), y)
    torch.autograd.grad(ce, params)
    with eval_mode(model, bn_stats=bn_stats):
        with torch.no_grad():
            z0 = ae.encode(x0)
            base = ae.decode(z0, tuple(x0.shape[-2:]))

        def image(z):
            return x0 + ae.decode(z, tuple(x0.shape[-2:])) - base

        def inner(z, *ps):
            logits = functional_call(model, dict(zip(names, ps, strict=True)), (image(z),))
            ce = F.cross_entropy(logits, target, reduction="sum")
            return ce + alpha * (z - z0).square().sum()

        def optimality(z, *ps):
            return torch.func.grad(inner)(z, *ps)

        @custom_root(optimality, argnums=tuple(range(1, len(params) + 1)),
                     solve=solve_normal_cg(rtol=rtol))
        def solver(z_init, *ps):
            z = z_init.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                with torch.enable_grad():
                    loss = inner(z, *(p.detach() for p in ps))
                opt.zero_grad()
                loss.backward()
                opt.step()
            return z.detach()

        z = solver(z0.clone(), *params)
        align = method._per_sample(image(z) - x0, outside).mean()
        grads = torch.autograd.grad(align, params)
    return flat(grads), time.perf_counter() - t0


def _row_key(row: dict) -> tuple:
    """(optimizer, K, CG cap or "gn", polish): what identifies a sweep row."""
    solve = "gn" if row["hvp"] == "gauss-newton" else row["cg_iters"]
    return row["optimizer"], row["steps"], solve, row["newton_polish"]


def finished_rows(out: Path, settings: dict) -> dict[tuple, dict]:
    """Rows of an interrupted sweep at ``out`` run with the same ``settings`` ({} when there
    is none: no file, a finished sweep, other options, or not this script's JSON)."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("complete", True) \
            or old.get("settings") != settings:
        return {}
    return {_row_key(r): r for r in old.get("sweep", [])}


def _counts(text: str, minimum: int, extra: tuple[str, ...] = ()) -> list | None:
    """Comma-separated integers >= ``minimum`` (or words of ``extra``); None if any is not."""
    out: list = []
    for item in text.split(","):
        item = item.strip()
        if item in extra:
            out.append(item)
        elif item.isascii() and item.isdigit() and int(item) >= minimum:
            out.append(int(item))
        else:
            return None
    return out


def check_options(ap: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[list, list]:
    """Sweep lists and counts, refused in one line before any setup: a typo failed with a
    traceback, and a bad --optimizers or --repeats 0 only after the minutes-long reference
    solves."""
    from causalign.explain.counterfactual import OPTIMIZERS

    ks = _counts(a.ks, 1)
    # "gn": the direct Gauss-Newton adjoint solve (method.hvp=gauss-newton) instead of CG
    cgs = _counts(a.cgs, 1, ("gn",))
    if ks is None:
        ap.error(f"--ks must be integers >= 1, comma-separated; got '{a.ks}'")
    if cgs is None:
        ap.error(f"--cgs must be integers >= 1 or gn, comma-separated; got '{a.cgs}'")
    if _counts(a.polish, 0) is None:
        ap.error(f"--polish must be integers >= 0, comma-separated; got '{a.polish}'")
    bad = [o for o in a.optimizers.split(",") if o not in OPTIMIZERS]
    if bad:
        ap.error(f"--optimizers: unknown '{bad[0]}'; valid: {', '.join(OPTIMIZERS)}")
    check_counts(ap, a, ("threads", "repeats", "size", "batch_size", "align_batch",
                         "ref_steps", "own_newton_steps", "paper_tight_steps"),
                 ("erm_steps", "warm_visits", "ref_polish"))
    check_out(ap, a.out)
    from causalign.methods.causal_align import CACHE_DTYPES

    if a.cache_dtype not in CACHE_DTYPES:
        ap.error(f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}; "
                 f"got '{a.cache_dtype}'")
    return ks, cgs


def check_counts(ap: argparse.ArgumentParser, a: argparse.Namespace,
                 positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    """Integer options of this sweep and the probes built on it, refused in one line before
    `setup` (a 0 failed with a traceback after it, or ran nothing)."""
    for names, least in ((positive, 1), (non_negative, 0)):
        for name in names:
            if getattr(a, name) < least:
                ap.error(f"--{name.replace('_', '-')} must be >= {least}, "
                         f"got {getattr(a, name)}")


def check_out(ap: argparse.ArgumentParser, out: str | Path | None) -> None:
    """A folder as --out failed at the JSON's write, after the work; a path under a file
    in a traceback (its folder's mkdir), as `causalign`'s own --json/--out checks refuse."""
    if out is None:
        return
    if Path(out).is_dir():
        ap.error(f"--out {out}: is a folder; give a file path for the JSON")
    for parent in Path(out).parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                ap.error(f"--out {out}: {parent} is a file, not a folder")
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/causal_align_sweep.json")
    ap.add_argument("--ks", default="1,3,5,10")
    ap.add_argument("--cgs", default="1,2,3,5",
                    help="CG iterations to sweep; gn = the direct Gauss-Newton solve")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--align-batch", type=int, default=16)
    ap.add_argument("--normalize", default=None, help="L_align form (default: the method's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--erm-steps", type=int, default=20)
    ap.add_argument("--warm-visits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--paper-tight-steps", type=int, default=2000,
                    help="Adam steps of the published solver's check run (rtol 1e-6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-steps", type=int, default=300, help="Adam steps per reference stage")
    ap.add_argument("--ref-polish", type=int, default=50,
                    help="Gauss-Newton steps that finish the Adam reference (0: Adam only, as "
                         "in results before 2026-12-02)")
    ap.add_argument("--no-own-ref", action="store_true",
                    help="skip the reference continued from each warm configuration's own x* "
                         "(the local minimum its iterates are in; ~45 s a row)")
    ap.add_argument("--own-newton-steps", type=int, default=100,
                    help="Gauss-Newton steps of the own-x* Newton reference")
    ap.add_argument("--optimizers", default="adam,newton",
                    help="inner optimisers to sweep (method.inner_optimizer)")
    ap.add_argument("--polish", default="0",
                    help="Gauss-Newton steps after the search to sweep (method.newton_polish)")
    ap.add_argument("--cache-dtype", default="float32",
                    help="precision of the warm-start cache of every configuration "
                         "(method.cache_dtype: float32 | float16 | bfloat16)")
    a = ap.parse_args()
    global REF_STAGES, OWN_REF_POLISH, OWN_NEWTON_STEPS
    REF_STAGES = tuple((a.ref_steps, lr) for _, lr in REF_STAGES)
    OWN_REF_POLISH, OWN_NEWTON_STEPS = a.ref_polish, a.own_newton_steps
    ks, cgs = check_options(ap, a)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in sorted(vars(a).items()) if k != "out"
                and not (k == "cache_dtype" and v == "float32")}  # as before the option
    done = finished_rows(out, settings)
    if done:
        print(f"continuing the interrupted sweep in {out}: {len(done)} row(s) kept", flush=True)

    ds, model = setup(a.size, max(128, a.batch_size), a.erm_steps, a.seed)
    batch = make_batch(ds, a.batch_size)
    sub = make_batch(ds, a.align_batch)  # the samples whose gradient the cosine compares
    base = build_method("causal-align").params
    normalize = a.normalize or base.normalize
    common = dict(align_batch=a.align_batch, normalize=normalize)
    if a.cache_dtype != "float32":  # the default: the settings of earlier sweeps as they were
        common["cache_dtype"] = a.cache_dtype
    print(f"reference (pixel space, {a.align_batch} samples)...", flush=True)
    ref, ref_parts = reference_grad({}, model, sub, polish=a.ref_polish)
    # the inner problem is not convex: Newton from x0 may settle in another minimum than
    # Adam's stages, so Newton rows are also compared with 100 Newton steps from x0
    ref_newton, ref_newton_parts = reference_grad({}, model, sub,
                                                  stages=((100, 1.0, "newton"),))

    rows = []
    polishes = [int(x) for x in a.polish.split(",")]
    for opt, k, c, pol in [(o, k, c, p) for o in a.optimizers.split(",") for k in ks
                           for c in cgs for p in polishes]:
        kept = done.get((opt, k, c, pol))
        if kept is not None:
            rows.append(kept)
            continue
        solve = (dict(hvp="gauss-newton") if c == "gn" else dict(cg_iters=c))
        args = dict(common, steps=k, inner_optimizer=opt, newton_polish=pol, **solve)
        t = timed_ratio(lambda args=args: build_method("causal-align", args), model, batch,
                        a.repeats)
        g_cold, parts, _ = config_grad(args, model, sub, 0)
        g_warm, parts_w, own = config_grad(args, model, sub, a.warm_visits,
                                           own_ref=not a.no_own_ref)
        row = dict(optimizer=opt, steps=k, cg_iters=None if c == "gn" else c,
                   hvp="gauss-newton" if c == "gn" else "exact", newton_polish=pol, **t,
                   cosine_cold=cosine(g_cold, ref), cosine_warm=cosine(g_warm, ref),
                   cosine_cold_newton_ref=cosine(g_cold, ref_newton),
                   cosine_warm_newton_ref=cosine(g_warm, ref_newton),
                   **({} if own is None else
                      dict(cosine_warm_own_ref=cosine(g_warm, own[0]),
                           own_ref_cosine_to_reference=cosine(own[0], ref),
                           cosine_warm_own_newton_ref=cosine(g_warm, own[1]),
                           own_newton_ref_cosine_to_reference=cosine(own[1], ref))),
                   align_warm=parts_w.get("align"),
                   cg_converged_warm=parts_w.get("cg_converged"),
                   flip_rate_warm=parts_w.get("flip_rate"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_json(out, {"benchmark": "causal_align_sweep", "complete": False,
                                "settings": settings, "sweep": rows})

    # Whole batch aligned (no align_batch) at the defaults, for the cost of align_batch.
    full = timed_ratio(lambda: build_method("causal-align", dict(common, align_batch=0)), model,
                       batch, a.repeats)
    result = {
        "benchmark": "causal_align_sweep", "complete": True, "settings": settings,
        "rows_kept_from_an_interrupted_run": len(done),
        "device": "cpu", "threads": a.threads,
        "torch": torch.__version__, "size": a.size, "batch_size": a.batch_size,
        "align_batch": a.align_batch, "normalize": normalize, "repeats": a.repeats,
        "warm_visits": a.warm_visits,
        "defaults": {"steps": base.steps, "inner_optimizer": base.inner_optimizer,
                     # 0 = auto: what it resolves to on this (binary) benchmark
                     "cg_iters": base.cg_iters or auto_cg_iters(2, soft=False),
                     "cg_tol": base.cg_tol,
                     "damping": base.damping, "alpha": base.alpha, "distance": base.distance,
                     "align_batch": base.align_batch, "normalize": base.normalize},
        "reference": {"inner": [list(s) for s in REF_STAGES], "newton_polish": a.ref_polish,
                      **REF_CG, "cg_converged": ref_parts.get("cg_converged"),
                      "flip_rate": ref_parts.get("flip_rate"), "align": ref_parts.get("align")},
        "reference_newton": {"inner": "100 Gauss-Newton steps from x0", **REF_CG,
                             "align": ref_newton_parts.get("align"),
                             "cosine_to_reference": cosine(ref_newton, ref)},
        "sweep": rows,
        "defaults_whole_batch_aligned": full,
    }

    if not a.skip_paper:
        from causalign.models.autoencoder import train_autoencoder

        print("paper configuration (latent, 200 Adam steps, TorchOpt normal CG)...", flush=True)
        ae = train_autoencoder(ds.images, epochs=15)
        lat = dict(common, space="latent", distance="l2")
        ref_lat, _ = reference_grad(lat, model, sub, ae, polish=a.ref_polish)
        lat_method = build_method("causal-align", lat)
        erm = build_method("erm")
        te, tp = [], []
        for _ in range(a.repeats):
            te.append(time_step(erm, model, sub))
            g_paper, tsec = paper_step(model, ae, sub, lat_method)
            tp.append(tsec)
        # the same solver run to convergence must meet the reference: the check that both
        # solve one problem (untimed)
        g_tight, _ = paper_step(model, ae, sub, lat_method, steps=a.paper_tight_steps,
                                rtol=1e-6)
        paper = {"seconds_per_step": statistics.median(tp),
                 "erm_seconds_per_step_same_batch": statistics.median(te),
                 "ratio_to_erm": statistics.median(tp) / statistics.median(te),
                 "cosine_to_latent_reference": cosine(g_paper, ref_lat),
                 "same_solver_tight_cosine_to_latent_reference": cosine(g_tight, ref_lat),
                 "same_solver_tight": {"adam_steps": a.paper_tight_steps, "rtol": 1e-6},
                 "objective": "ours: latent x0 + D(z) - D(z0), L2 on z, alpha "
                              f"{lat_method.params.alpha}, normalize "
                              f"{lat_method.params.normalize}, batch BatchNorm statistics",
                 "note": f"training step on {a.align_batch} samples (CE + counterfactual + "
                         f"implicit gradient), ERM on the same samples"}
        ours = {}
        # cold starts: the default search, and the paper code's 200 Adam steps with our solver
        for k, c, opt in ((base.steps, base.cg_iters, base.inner_optimizer),
                          (200, base.cg_iters, "adam")):
            args = dict(lat, steps=k, cg_iters=c, inner_optimizer=opt, warm_start=False)
            te, to = [], []
            for _ in range(a.repeats):
                te.append(time_step(erm, model, sub))
                m = build_method("causal-align", args)
                m.autoencoder = ae
                to.append(time_step(m, model, sub))  # a training step, as the paper row's
            m = build_method("causal-align", args)
            m.autoencoder = ae
            g, _ = step_grads(m, model, sub)
            ours[f"ours_latent_{opt}_K{k}_cg{c}"] = {
                "seconds_per_step": statistics.median(to),
                "erm_seconds_per_step_same_batch": statistics.median(te),
                "ratio_to_erm": statistics.median(to) / statistics.median(te),
                "cosine_to_latent_reference": cosine(g, ref_lat)}
        result["paper_config"] = {"torchopt_solve_normal_cg_rtol0.1_adam200": paper, **ours}
        print(json.dumps(result["paper_config"]), flush=True)

    result["elapsed_s"] = time.perf_counter() - t_start  # this process's part
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
