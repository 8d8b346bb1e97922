"""How accurate is causal-align's implicit gradient *during training*?

    python benchmarks/causal_align_grad_in_training.py DATA --out DIR [--epochs 12 --seed 0]
        [--probe-epochs 1,2,4,8,12 --probe-n 16 --ks 10,30,100] [--set method.k=v ...]
        [--variant NAME:key=val,... | --variant +NAME:key=val,...]
    python benchmarks/causal_align_grad_in_training.py --from-run RUN --out DIR [...]

`benchmarks/bench_causal_align.py` measures the cosine of dL_align/dθ to a tightly solved
reference with the model fixed: "warm" there means 8 earlier visits of the same samples at
the same θ. In training a sample is aligned about once every 4 epochs (align_batch 16 of a
batch of 64) and θ moves between visits, so the warm start is stale. This script trains
causal-align (`causalign train` semantics, the same Trainer) and, after each probed epoch,
on a fixed set of annotated training samples, measures without disturbing the run (weights,
BatchNorm buffers, cache and RNG are restored). With --from-run it probes a finished run's
last checkpoint instead.

References (both: Adam stages with decaying lr, then --ref-polish Gauss-Newton steps, then CG
to 1e-8; Adam alone stops well short of the minimum, see bench_causal_align.reference_grad):

* `ref`: from x0, as in bench_causal_align.py (3 × 300 steps at lr 1e-2, 1e-3, 1e-4);
* `ref_run`: from the run's own cached x* (600 at 1e-3, 300 at 1e-4). The inner problem is
  not convex: the two can be different local minima with unrelated gradients, and `ref_run`
  is the one a warm-started run is trying to follow.

Gradients compared with them:

* `run`: the gradient the run itself would take now (a copy of its warm-start cache, its K);
* `cold_K`: K steps of the run's search (`inner_optimizer`: Adam at the default) from x0
  (no cache), for each K in --ks;
* `run_plus_K`: the run's cache refined by K steps;
* `--variant`: any method.<param> overrides, from x0 or (leading +) from the run's cache.

Reported per gradient: cosine to `ref` and to `ref_run`, its L_align value (share of the
change outside the mask with normalize=total), flip rate, norm relative to `ref`, cosine to
∇CE; per reference: ‖λ·g‖ / ‖∇CE‖ and cos(g, ∇CE). Writes DIR/grad_in_training.json and a
markdown table; a training run itself lands in DIR/run. The JSON is rewritten after each
probe ("complete": false until the end): rerun with the same options to continue an
interrupted call.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_causal_align import (  # noqa: E402
    REF_STAGES,
    cosine,
    flat,
    reference_grad,
    step_grads,
)

from causalign.data.format import LesionDataset  # noqa: E402
from causalign.engine.config import TrainConfig, apply_overrides, parse_set  # noqa: E402
from causalign.engine.trainer import CHECKPOINT, Trainer, load_checkpoint, load_run  # noqa: E402
from causalign.errors import CausalignError  # noqa: E402
from causalign.io import atomic_write_json, atomic_write_text  # noqa: E402
from causalign.methods import build_method  # noqa: E402


def probe_batch(ds: LesionDataset, device, n: int, seed: int = 1234) -> dict:
    """n annotated training samples, the same ones at every probe."""
    has = ds.has_mask.bool().nonzero().flatten()
    g = torch.Generator().manual_seed(seed)
    idx = has[torch.randperm(len(has), generator=g)[:n]].sort().values
    return {k: v.to(device) for k, v in ds.batch(idx).items()}


def cached_share(method, batch: dict) -> float:
    return float(method.cache.get(batch["index"], batch["image"])[1].float().mean())


def ce_grad(model, method, batch) -> torch.Tensor:
    params = list(model.parameters())
    loss = F.cross_entropy(model(method.model_input(batch)), batch["label"])
    return flat(torch.autograd.grad(loss, params))


Variant = tuple[str, dict, bool]  # (name, method.<param> overrides, start from the run's cache)


def default_variants(ks: list[int]) -> list[Variant]:
    out: list[Variant] = [("run", {}, True)]
    for k in ks:
        out += [(f"cold_{k}", {"steps": k}, False), (f"run_plus_{k}", {"steps": k}, True)]
    return out


def parse_variant(text: str) -> Variant:
    """'NAME:key=val,key=val' (cold, from x0) or '+NAME:...' (from the run's cache)."""
    warm = text.startswith("+")
    name, _, body = text.lstrip("+").partition(":")
    overrides = parse_set([kv for kv in body.split(",") if kv]) if body else {}
    return name, overrides, warm


def measure(model, method, batch: dict, variants: list[Variant], ref_steps: int = 300,
            polish: int = 50, ref_newton: int = 0) -> dict:
    """Each variant's alignment gradient against the two tight references (module docstring);
    the model's weights, mode and the RNG are restored afterwards, the method is not touched
    (variants from its cache run on a copy)."""
    weights = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()  # the step's own mode: CE with batch statistics, BN stats captured
    args = dataclasses.asdict(method.params)
    args.update(align_batch=0)  # align all probe samples
    out: dict = {}
    t0 = time.perf_counter()
    try:
        # ref_newton > 0: both references are that many Gauss-Newton steps alone (from x0 /
        # from the run's cache): its line search never increases T, so ref_run stays in the
        # run's basin, where Adam's dense first steps at 1e-3 can leave it
        newton = ((ref_newton, 1.0, "newton"),)
        stages = newton if ref_newton else tuple((ref_steps, lr) for _, lr in REF_STAGES)
        _say(f"probe: tight reference from x0 ({_stages_text(stages, polish, ref_newton)})", t0)
        ref, ref_parts = reference_grad(dict(args), model, batch, stages=stages,
                                         polish=0 if ref_newton else polish)
        g_ce = ce_grad(model, method, batch)
        lam = method.params.lam
        out["ref"] = {"align": ref_parts.get("align"), "flip_rate": ref_parts.get("flip_rate"),
                      "cg_converged": ref_parts.get("cg_converged"),
                      "norm_ratio_to_ce": float(lam * ref.norm() / g_ce.norm()),
                      "cosine_to_ce": cosine(ref, g_ce)}
        # the same tight solve from the run's own cached x*: the reference of the local
        # minimum the run is in (the x0 one may be another: the inner problem is not convex)
        run_m = copy.deepcopy(method)
        run_m.params = dataclasses.replace(run_m.params, align_batch=0)
        # from lr 1e-3: a first stage at 1e-2 could carry x* out of the run's basin
        _say("probe: tight reference from the run's cached x*", t0)
        ref_run, ref_run_parts = reference_grad(
            {}, model, batch, method=run_m,
            stages=newton if ref_newton else ((2 * ref_steps, 1e-3), (ref_steps, 1e-4)),
            polish=0 if ref_newton else polish)
        out["ref_run"] = {"align": ref_run_parts.get("align"),
                          "cosine_to_ref": cosine(ref_run, ref),
                          "norm_ratio_to_ce": float(lam * ref_run.norm() / g_ce.norm()),
                          "cosine_to_ce": cosine(ref_run, g_ce)}
        for name, overrides, warm in variants:
            _say(f"probe: variant {name}", t0)
            if warm:  # a copy of the run's method: its cache stays as it was
                m = copy.deepcopy(method)
                m.params = dataclasses.replace(m.params, align_batch=0, **overrides)
            else:
                m = build_method("causal-align", dict(args, warm_start=False, **overrides))
            g, parts = step_grads(m, model, batch)
            out[name] = {"overrides": overrides, "from_run_cache": warm,
                         "cosine_to_ref": cosine(g, ref),
                         "cosine_to_ref_run": cosine(g, ref_run), "align": parts.get("align"),
                         "flip_rate": parts.get("flip_rate"), "cf_warm": parts.get("cf_warm"),
                         "norm_ratio_to_ref": float(g.norm() / ref.norm()),
                         "cosine_to_ce": cosine(g, g_ce)}
    finally:
        model.load_state_dict(weights)
        model.train(was_training)
        torch.set_rng_state(rng)
    out["seconds"] = time.perf_counter() - t0
    return out


def _say(what: str, since: float) -> None:
    """One stderr line per stage: a probe runs minutes of reference solves, and the script
    printed nothing until its first JSON row."""
    print(f"[{time.perf_counter() - since:6.0f} s] {what}", file=sys.stderr, flush=True)


def _stages_text(stages: tuple, polish: int, ref_newton: int) -> str:
    if ref_newton:
        return f"{ref_newton} Gauss-Newton steps"
    return " + ".join(f"{n} Adam at {lr:g}" for n, lr in stages) + f", {polish} Gauss-Newton"


class ProbingTrainer(Trainer):
    """Trainer that probes after the checkpoint of each of ``probe_epochs``. ``probes`` are
    those an interrupted call kept (resume=True) and ``record(probes)`` runs after each new
    one, so a rerun continues instead of losing them."""

    def __init__(self, *a, probe_epochs: set[int], probe_n: int, variants: list[Variant],
                 ref_steps: int, polish: int = 50, ref_newton: int = 0,
                 probes: list[dict] | None = None, record=None, **kw):
        super().__init__(*a, **kw)
        self.probe_epochs, self.probe_n, self.variants = probe_epochs, probe_n, variants
        self.ref_steps, self.polish, self.ref_newton = ref_steps, polish, ref_newton
        self.probes: list[dict] = list(probes or [])
        self.record = record

    def _setup(self) -> None:
        super()._setup()
        # resumed from a checkpoint whose probe was cut short (the kill came while probing)
        self._probe_if_due()

    def _save_state(self) -> None:
        super()._save_state()
        self._probe_if_due()

    def _probe_if_due(self) -> None:
        epoch = self.state.epoch
        if epoch in self.probe_epochs and epoch not in {r["epoch"] for r in self.probes}:
            batch = probe_batch(self.train_set, self.device, self.probe_n)
            row = {"epoch": epoch, "cached": cached_share(self.method, batch),
                   **measure(self.model, self.method, batch, self.variants, self.ref_steps,
                           self.polish, self.ref_newton)}
            self.probes.append(row)
            print(json.dumps(row), flush=True)
            if self.record is not None:
                self.record(self.probes)


def kept_probes(out: Path, settings: dict) -> list[dict] | None:
    """The probes an interrupted (or finished) call with these ``settings`` recorded in
    OUT/grad_in_training.json; None when there is none, or it was run with other ones."""
    try:
        old = json.loads((out / "grad_in_training.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("settings") != settings:
        return None
    probes = old.get("probes")
    return probes if isinstance(probes, list) else None


def table(probes: list[dict], variants: list[Variant]) -> str:
    """Markdown: per probe, the references and each variant's cosine to the x0 reference /
    to the run-basin reference, and its L_align."""
    cols = [name for name, _, _ in variants]
    head = ("| epoch | cached | ref L_align | ref_run L_align | cos(ref, ref_run) | "
            "‖λg_ref‖/‖∇CE‖ | cos(g_ref, ∇CE) | cos(g_ref_run, ∇CE) | "
            + " | ".join(f"{c}: cos ref / ref_run / L_align" for c in cols) + " |")
    lines = [head, "|" + "---|" * (8 + len(cols))]
    for r in probes:
        ref, rr = r["ref"], r["ref_run"]
        cells = [f"{r[c]['cosine_to_ref']:.2f} / {r[c]['cosine_to_ref_run']:.2f} / "
                 f"{r[c]['align']:.2f}" for c in cols]
        lines.append(f"| {r['epoch']} | {r['cached']:.2f} | {ref['align']:.3f} | "
                     f"{rr['align']:.3f} | {rr['cosine_to_ref']:.2f} | "
                     f"{ref['norm_ratio_to_ce']:.2f} | {ref['cosine_to_ce']:.2f} | "
                     f"{rr['cosine_to_ce']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def probe_saved_run(run: Path, n: int, variants: list[Variant],
                    method_args: dict | None = None, ref_steps: int = 300,
                    polish: int = 50, ref_newton: int = 0) -> dict:
    """One probe at a run's last checkpoint (weights and warm-start cache of its last epoch).

    A run of another method (e.g. ERM) is scored with causal-align's defaults and an empty
    cache: what L_align and its gradient would be for that model. ``method_args`` override
    the scoring method's parameters (e.g. normalize=none for Eq. 3 as printed)."""
    cfg, model, method, data = load_run(run, device="cpu")
    state = load_checkpoint(run / CHECKPOINT)
    model.load_state_dict(state["model"])
    if cfg.method == "causal-align":
        method.load_state_dict(state.get("method_state", {}))
        if method_args:
            method.params = dataclasses.replace(method.params, **method_args)
            method.params.validate()
    else:
        method = build_method("causal-align", method_args or {})
    batch = probe_batch(LesionDataset(data, "train"), "cpu", n)
    return {"epoch": state["epoch"], "method": cfg.method, "cached": cached_share(method, batch),
            **measure(model, method, batch, variants, ref_steps, polish, ref_newton)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", help="dataset to train on (not with --from-run)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-run", help="probe this run's last checkpoint instead of training")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="0 = PyTorch's default")
    ap.add_argument("--probe-epochs", default="1,2,4,8,12")
    ap.add_argument("--probe-n", type=int, default=16)
    ap.add_argument("--ks", default="10,30,100")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra gradient to compare: 'NAME:key=val,...' solved from x0, or "
                         "'+NAME:key=val,...' from the run's warm-start cache")
    ap.add_argument("--ref-steps", type=int, default=300,
                    help="Adam steps per reference stage (ref_run: twice that at 1e-3)")
    ap.add_argument("--ref-polish", type=int, default=50,
                    help="Gauss-Newton steps that finish both references (0: Adam only, "
                         "the references of results before 2026-12-02)")
    ap.add_argument("--ref-newton", type=int, default=0,
                    help="> 0: both references are this many Gauss-Newton steps alone "
                         "(from x0 / from the run's cache) instead of Adam stages")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="training config (method.<param> only with --from-run: how to score)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    variants = default_variants([int(k) for k in a.ks.split(",") if k])
    variants += [parse_variant(v) for v in a.variant]
    result = {"benchmark": "causal_align_grad_in_training", "probe_n": a.probe_n,
              "reference": f"bench_causal_align.reference_grad (3 x {a.ref_steps} Adam at "
                           f"1e-2/1e-3/1e-4, CG 1e-8); ref_run: {2 * a.ref_steps} at 1e-3 + "
                           f"{a.ref_steps} at 1e-4 from the run's cache; both then "
                           f"{a.ref_polish} Gauss-Newton steps"}
    if a.ref_newton:
        result["reference"] = (f"{a.ref_newton} Gauss-Newton steps from x0 (ref) / from the "
                               f"run's cache (ref_run), then CG 1e-8")
    if a.from_run:
        sets = parse_set(a.sets)
        if any(not k.startswith("method.") for k in sets):
            ap.error("with --from-run, --set takes only method.<param> (the scoring method)")
        method_args = {k.split(".", 1)[1]: v for k, v in sets.items()}
        try:  # a missing or foreign run folder: one line, as for DATA below
            probe = probe_saved_run(Path(a.from_run), a.probe_n, variants, method_args,
                                    a.ref_steps, a.ref_polish, a.ref_newton)
        except CausalignError as exc:
            ap.error(str(exc))
        result.update(run=a.from_run, sets=a.sets, probes=[probe])
    else:
        if not a.data:
            ap.error("DATA is required unless --from-run is given")
        cfg = apply_overrides(TrainConfig(method="causal-align", epochs=a.epochs, seed=a.seed,
                                          threads=a.threads), parse_set(a.sets))
        # An interrupted call left OUT/run with a checkpoint: the rerun failed with a
        # traceback ("already holds a run (pass --resume ...)", an option this script has
        # not) and the probes taken so far were only in the killed process's stdout. Now
        # they are recorded after each probe, and a rerun with the same options resumes.
        settings = {k: v for k, v in sorted(vars(a).items()) if k != "out"}
        kept = None
        if (out / "run" / CHECKPOINT).exists():
            kept = kept_probes(out, settings)
            if kept is None:
                ap.error(f"--out {out}: {out / 'run'} holds a run of a call with other "
                         f"options (or none recorded); choose another --out or remove it")

        def record(probes: list[dict]) -> None:
            atomic_write_json(out / "grad_in_training.json",
                              {**result, "complete": False, "settings": settings,
                               "probes": probes})

        try:
            trainer = ProbingTrainer(a.data, cfg, out / "run", progress=False,
                                     resume=kept is not None,
                                     probe_epochs={int(e) for e in a.probe_epochs.split(",")},
                                     probe_n=a.probe_n, variants=variants,
                                     ref_steps=a.ref_steps, polish=a.ref_polish,
                                     ref_newton=a.ref_newton, probes=kept, record=record)
            if kept is None:  # from the start: a kill before the first probe is resumable
                record([])
            metrics = trainer.fit()
        except CausalignError as exc:
            ap.error(str(exc))
        result.update(complete=True, settings=settings)
        test = metrics.get("test", {})
        result.update(data=str(a.data), seed=a.seed, epochs=a.epochs, sets=a.sets,
                      test_accuracy=test.get("accuracy"),
                      test_cam_precision=test.get("cam_precision"), probes=trainer.probes)
    atomic_write_json(out / "grad_in_training.json", result)
    md = table(result["probes"], variants)
    atomic_write_text(out / "grad_in_training.md", md)
    print(md)


if __name__ == "__main__":
    main()
