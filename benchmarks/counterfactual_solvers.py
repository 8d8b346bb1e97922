"""How well does each inner optimiser solve the counterfactual problem, per second?

    python benchmarks/counterfactual_solvers.py RUN [RUN ...] [--n 16] [--threads 1]
        [--solvers adam:10,adam:100,adam:900,newton:3,newton:10,newton:30] [--labels ...]
        [--out benchmarks/results/counterfactual_solvers.json]

For each run's last checkpoint, on N annotated training images of its dataset (the same
images as benchmarks/causal_align_grad_in_training.py probes), solves
x* = argmin CE(f(x), 1 − y) + α·d(x, x0) cold from x0 (pixel space, the run's α, distance
and ε; lr 0.01 for Adam) with each solver and reports the mean and max of the smooth
objective T the implicit gradient differentiates, the flip rate, the mean l1 change and the
wall time. The problem is not convex: a lower T is a better solve of the same problem, not
necessarily the same minimum. Writes JSON, a markdown table and a plot of T against seconds
(one panel per run) next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from causal_align_grad_in_training import probe_batch  # noqa: E402

from causalign.data.format import LesionDataset  # noqa: E402
from causalign.engine.trainer import CHECKPOINT, load_checkpoint, load_run  # noqa: E402
from causalign.errors import CausalignError  # noqa: E402
from causalign.explain.counterfactual import (  # noqa: E402
    OPTIMIZERS,
    CounterfactualGenerator,
    distance_scale,
    eval_mode,
)
from causalign.io import atomic_write_json, atomic_write_text  # noqa: E402
from causalign.methods import build_method  # noqa: E402


def solve_all(run: Path, n: int, solvers: list[tuple[str, int]], label: str) -> dict:
    cfg, model, _, data = load_run(run, device="cpu")
    state = load_checkpoint(run / CHECKPOINT)
    model.load_state_dict(state["model"])
    params = build_method("causal-align", cfg.method_args if cfg.method == "causal-align"
                          else {}).params
    train = LesionDataset(data, "train")
    batch = probe_batch(train, "cpu", n)
    x0, target = batch["image"], 1 - batch["label"]
    scale = distance_scale(train.images, params.distance)  # None unless a scaled distance
    rows = []
    for optimizer, steps in solvers:
        gen = CounterfactualGenerator(model, alpha=params.alpha, steps=steps, lr=0.01,
                                      distance=params.distance, scale=scale, eps=params.eps,
                                      optimizer=optimizer)
        t0 = time.perf_counter()
        res = gen.generate(x0, target=target)
        seconds = time.perf_counter() - t0
        with torch.no_grad(), eval_mode(model, fold_bn=True):
            value = res.problem.objective(res.u_star)
        rows.append({"optimizer": optimizer, "steps": steps, "seconds": seconds,
                     "objective_mean": float(value.mean()), "objective_max": float(value.max()),
                     "flip_rate": float(res.flipped.float().mean()),
                     "l1_change": float(res.distance.mean())})
        print(f"{run}: {optimizer} K={steps}: T {rows[-1]['objective_mean']:.4f} "
              f"({seconds:.2f} s)", flush=True)
    return {"run": label, "path": str(run), "method": cfg.method, "epoch": state["epoch"],
            "alpha": params.alpha, "distance": params.distance, "n": n, "rows": rows}


def plot(results: list[dict], path: Path) -> None:
    """T against wall time, log time axis, one line per optimiser, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for optimizer, style in (("adam", "o-"), ("newton", "s-"), ("ista", "^-")):
            rows = sorted((row for row in r["rows"] if row["optimizer"] == optimizer),
                          key=lambda row: row["seconds"])
            if rows:
                ax.plot([row["seconds"] for row in rows],
                        [row["objective_mean"] for row in rows], style, label=optimizer)
                for row in rows:
                    ax.annotate(str(row["steps"]), (row["seconds"], row["objective_mean"]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(r["run"], fontsize=9)
        ax.set_xlabel(f"seconds ({r['n']} images)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean T = CE(y*) + α·d (lower is better)")
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG


def table(results: list[dict]) -> str:
    out = ["| run | solver | K | seconds | T mean | T max | flip rate | Σ|Δ| |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            out.append(f"| {r['run']} | {row['optimizer']} | {row['steps']} | "
                       f"{row['seconds']:.2f} | {row['objective_mean']:.4f} | "
                       f"{row['objective_max']:.4f} | {row['flip_rate']:.2f} | "
                       f"{row['l1_change']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="0 = PyTorch's default")
    ap.add_argument("--solvers", default="adam:10,adam:100,adam:900,newton:3,newton:10,"
                                         "newton:30")
    ap.add_argument("--labels", nargs="*", help="one name per run for the table and plot")
    ap.add_argument("--out", default="benchmarks/results/counterfactual_solvers.json")
    a = ap.parse_args(argv)
    if a.n < 1:  # --n 0 was a RuntimeError traceback (max() of no samples)
        ap.error(f"--n must be >= 1, got {a.n}")
    if a.threads < 0:
        ap.error(f"--threads must be >= 0 (0: PyTorch's default), got {a.threads}")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    solvers = []
    for item in a.solvers.split(","):
        name, _, k = item.partition(":")
        # an unknown optimizer was a ConfigError traceback at its turn; K = 0 no search
        if name not in OPTIMIZERS or not k.isdigit() or int(k) < 1:
            ap.error(f"solver '{item}' is not OPTIMIZER:STEPS with OPTIMIZER one of "
                     f"{', '.join(OPTIMIZERS)} and STEPS >= 1")
        solvers.append((name, int(k)))
    labels = a.labels or a.runs
    if len(labels) != len(a.runs):
        ap.error(f"{len(labels)} labels for {len(a.runs)} runs")
    try:  # a missing or foreign run folder: one line, not a traceback
        results = [solve_all(Path(r), a.n, solvers, lab) for r, lab in zip(a.runs, labels,
                                                                            strict=True)]
    except CausalignError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(a.out)
    atomic_write_json(out, {"benchmark": "counterfactual_solvers", "threads": a.threads,
                            "n": a.n, "results": results})
    md = table(results)
    atomic_write_text(out.with_suffix(".md"), md)
    plot(results, out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()
