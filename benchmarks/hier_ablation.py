"""Hierarchical alignment ablation (seed 000 Table 2) and sensitivity sweeps (Tables 4–5).

    python benchmarks/hier_ablation.py [--work DIR] [--out benchmarks/results/hier_ablation.json]
        [--seeds 3 --epochs 10 --size 48 --n-train 400 --n-val 100 --n-test 200]
        [--alpha1 0.005,0.02 --lam 0.8,1.2] [--no-sweep] [--threads 1]

On the plus-minus synthetic benchmark (the "+"/"−" symbol gives the label away in training
only) trains, per seed:

* ``none``         ERM (no alignment, no hierarchy) — Table 2 row 1;
* ``flat``         causal-align (L_align only) — Table 2 row 2;
* ``hier``         hier-align (L_align + hierarchical) — Table 2 row 3;
* ``hier-noalign`` hier-align with λ₁ = λ₂ = 0: the X→A→Y bottleneck alone (not in the
  paper; separates the effect of the hierarchy from that of its alignment terms);

then, at seed 0, hier-align with α₁ and with λ (= λ₁ = λ₂) varied one at a time around the
paper's defaults (α₁ = 0.01, λ = 1, whose point is the ablation's seed-0 run). Reports test
CAM precision (Grad-CAM, against the lesion box) and accuracy as mean (std, ddof 0) over
seeds. Every method runs with its own defaults: causal-align's training defaults
(normalize = total, align_batch 16, K = 5), hier-align's (the paper's α₁, α₂, λ₁, λ₂; its image
level with the same normalize/align_batch/K as causal-align). Runs are trained in this process
one after another (WORK/runs/<name>); a finished run (metrics.json present) is reused, so the
script can be interrupted and restarted. The JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from causalign.data.synth import SynthConfig
from causalign.engine import TrainConfig, train
from causalign.io import atomic_write_json, atomic_write_text
from causalign.report.tables import fmt_mean_std, markdown_table, mean_std

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import (  # noqa: E402
    check_finished_run,
    check_overrides,
    one_line_errors,
    synth_or_reuse,
)

VARIANTS = {
    "none": ("erm", {}),
    "flat": ("causal-align", {}),
    "hier": ("hier-align", {}),
    "hier-noalign": ("hier-align", {"lam1": 0.0, "lam2": 0.0}),
}
METRICS = (("CAM precision", "cam_precision"), ("accuracy", "accuracy"))


def run_one(data: Path, runs: Path, name: str, method: str, args: dict, seed: int,
            epochs: int, threads: int) -> dict:
    run = runs / name
    path = run / "metrics.json"
    cfg = TrainConfig(method=method, seed=seed, epochs=epochs, device="cpu",
                      threads=threads, method_args=dict(args))
    if path.exists():  # a finished run is reused only when it is the run asked for
        check_finished_run(run, cfg, "--work")
    if not path.exists():
        t0 = time.perf_counter()
        # an interrupted run continues; a new one is not a resume (train would warn)
        metrics = train(data, cfg, run, resume=(run / "checkpoint.pt").exists(),
                        progress=False)
        metrics["train_seconds"] = time.perf_counter() - t0
        atomic_write_json(path, metrics)
    return json.loads(path.read_text())


def summarise(results: dict[str, list[dict]]) -> dict:
    out = {}
    for variant, runs in results.items():
        entry: dict = {"n_seeds": len(runs)}
        for _, key in METRICS:
            vals = [r["test"][key] for r in runs]
            m, s = mean_std(vals)
            entry[key] = {"mean": m, "std": s, "values": vals}
        accs = [r["test"].get("attribute_accuracy", {}).get("mean") for r in runs]
        if any(a is not None for a in accs):
            m, s = mean_std(accs)
            entry["attribute_accuracy"] = {"mean": m, "std": s, "values": accs}
        entry["train_seconds"] = [r.get("train_seconds") for r in runs]
        out[variant] = entry
    return out


def tables(results: dict[str, list[dict]], sweeps: dict[str, list[dict]]) -> str:
    rows = []
    labels = {"none": ("×", "×"), "flat": ("✓", "×"), "hier": ("✓", "✓"),
              "hier-noalign": ("× (λ₁=λ₂=0)", "✓")}
    for variant, runs in results.items():
        la, hi = labels[variant]
        rows.append([variant, la, hi, str(len(runs)),
                     *[fmt_mean_std([r["test"][k] for r in runs]) for _, k in METRICS]])
    text = "Ablation (Table 2 shape), test split, mean (std) over seeds\n\n" + markdown_table(
        ["variant", "L_align", "hierarchical", "seeds", *[m for m, _ in METRICS]], rows)
    for param, entries in sweeps.items():
        srows = [[f"{e['value']:g}", f"{e['cam_precision']:.3f}", f"{e['accuracy']:.3f}"]
                 for e in sorted(entries, key=lambda e: e["value"])]
        text += f"\nSensitivity to {param} (hier-align, seed 0)\n\n" + markdown_table(
            [param, "CAM precision", "accuracy"], srows)
    return text


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/hier_ablation"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hier_ablation.json"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--variants", default="none,flat,hier,hier-noalign")
    ap.add_argument("--alpha1", default="0.005,0.02", help="α₁ values besides 0.01")
    ap.add_argument("--lam", default="0.8,1.2", help="λ = λ₁ = λ₂ values besides 1")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hier-set", action="append", default=[], metavar="KEY=VALUE",
                    help="hier-align setting for every hier run, e.g. balance=0 "
                         "attr_normalize=none (the defaults before the cap; README)")
    a = ap.parse_args(argv)
    if a.seeds < 1:  # a mean over no seed: a StatisticsError / IndexError, or an empty table
        ap.error(f"--seeds must be >= 1, got {a.seeds}")
    bad = [kv for kv in a.hier_set if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:  # was a ValueError traceback (unpacking)
        ap.error(f"--hier-set {bad[0]!r}: expected KEY=VALUE")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:  # before any data is made: it was a KeyError traceback after that
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    sweep_lists: dict[str, list[float]] = {}
    for flag, text in (("alpha1", a.alpha1), ("lam", a.lam)):
        try:  # here, not when the sweep starts: a typo was a ValueError traceback after
            # every ablation run had trained
            sweep_lists[flag] = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--{flag} {text!r}: expected comma-separated numbers")
    hier_extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.hier_set)}
    # an unknown key was refused only when the first hier run started, after ERM's
    check_overrides("hier-align", {f"method.{k}": v for k, v in hier_extra.items()})
    tag = "+" + ",".join(f"{k}={v}" for k, v in hier_extra.items()) if hier_extra else ""
    torch.set_num_threads(a.threads)

    data = a.work / "data"
    synth = SynthConfig(n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, size=a.size,
                        seed=a.data_seed)
    # reused data must be the data asked for, or old runs get the new sizes' labels
    synth_or_reuse(data, synth, "--work")
    runs = a.work / "runs"
    results: dict[str, list[dict]] = {v: [] for v in variants}
    sweeps: dict[str, list[dict]] = {}
    t0 = time.perf_counter()

    sweep_values = {"alpha1": a.alpha1, "lam": a.lam}
    n_runs = a.seeds * len(variants) + (0 if a.no_sweep else sum(
        len(v) for v in sweep_lists.values()))

    trained: list[str] = []  # the runs done so far, for the completeness note

    def write(complete: bool = False) -> None:
        # rewritten after every run: the settings and a completeness flag say what a
        # stopped script's file holds (it read like a finished result of other settings)
        done = len(trained)
        payload = {
            "benchmark": "plus-minus synthetic", "data": {**synth.__dict__},
            "epochs": a.epochs, "threads": a.threads, "std": "ddof=0",
            "seeds": a.seeds, "variants": variants, "hier_set": hier_extra,
            "sweep": None if a.no_sweep else sweep_values,
            "complete": complete, "runs_done": done, "runs_planned": n_runs,
            "ablation": summarise({k: v for k, v in results.items() if v}),
            "sweeps": sweeps, "elapsed_s": time.perf_counter() - t0,
            "runs": {k: [{"seed": r.get("seed"), "test": {m: r["test"].get(m) for m in
                                                         ("accuracy", "cam_precision",
                                                          "cam_mass_in_mask", "auc",
                                                          "attribute_accuracy")},
                          "best_epoch": r.get("best_epoch"),
                          "train_seconds": r.get("train_seconds")} for r in v]
                     for k, v in results.items()},
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out, payload)
        note = "" if complete else (f"INCOMPLETE: {done} of {n_runs} runs so far (stopped, or "
                                    f"still running)\n\n")
        extra = f"hier-align settings: {hier_extra}\n\n" if hier_extra else ""
        atomic_write_text(a.out.with_suffix(".md"), note + extra + tables(
            {k: v for k, v in results.items() if v}, sweeps))

    for seed in range(a.seeds):
        for v in variants:
            method, args = VARIANTS[v]
            name = f"{v}-seed{seed}"
            if method == "hier-align" and hier_extra:
                args, name = {**hier_extra, **args}, f"{v}{tag}-seed{seed}"
            m = run_one(data, runs, name, method, args, seed, a.epochs, a.threads)
            trained.append(name)
            m["seed"] = seed
            results[v].append(m)
            print(f"[{time.perf_counter() - t0:6.0f}s] {v} seed {seed}: "
                  f"acc {m['test']['accuracy']:.3f} cam {m['test']['cam_precision']:.3f}",
                  flush=True)
            write()
    if not a.no_sweep:
        base = results.get("hier", [None])[0] if results.get("hier") else None
        for param, default in (("alpha1", 0.01), ("lam", 1.0)):
            entries = []
            if base is not None:
                entries.append({"value": default, "cam_precision": base["test"]["cam_precision"],
                                "accuracy": base["test"]["accuracy"]})
            for val in sweep_lists[param]:
                args = {"alpha1": val} if param == "alpha1" else {"lam1": val, "lam2": val}
                m = run_one(data, runs, f"hier-{param}{val:g}{tag}-seed0", "hier-align",
                            {**hier_extra, **args}, 0, a.epochs, a.threads)
                trained.append(param)
                entries.append({"value": val, "cam_precision": m["test"]["cam_precision"],
                                "accuracy": m["test"]["accuracy"]})
                sweeps[param] = entries
                print(f"[{time.perf_counter() - t0:6.0f}s] {param}={val:g}: "
                      f"acc {m['test']['accuracy']:.3f} cam {m['test']['cam_precision']:.3f}",
                      flush=True)
                write()
    write(complete=True)
    print(tables({k: v for k, v in results.items() if v}, sweeps))


if __name__ == "__main__":
    main()
