"""ERM with `sampler=none`, `sampler=balanced` and `class_weight=balanced` on a synthetic
dataset whose training split alone is imbalanced.

    python benchmarks/sampler_imbalance.py --out DIR [--seeds 0 1 2 --epochs 8
        --minority 0.1 --n-train 1200 --n-val 400 --n-test 600 --size 32 --threads 1]

Writes the synthetic benchmark (shortcut none) to DIR/data_full and a copy, DIR/data, whose
training split keeps every benign sample and only the first malignant ones, so that malignant
(class 1) is the `--minority` fraction of train; val and test keep the generator's balance.
Trains ERM per seed and setting into DIR/runs/SETTING-seedS and writes the test split's
balanced accuracy, sensitivity, specificity and AUC (the final evaluation `causalign
evaluate` repeats) as mean (std, ddof 0) over seeds to DIR/summary.json, DIR/summary.md and
stdout. DIR must not exist yet.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from class_weight_imbalance import imbalanced_copy

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train
from causalign.io import atomic_write_json, atomic_write_text

METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc")
SETTINGS = {"sampler=none": {}, "sampler=balanced": {"sampler": "balanced"},
            "class_weight=balanced": {"class_weight": "balanced"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--minority", type=float, default=0.1)
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not 0 < args.minority < 0.5:
        ap.error(f"--minority must be in (0, 0.5), got {args.minority}")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new --out (its runs may have other settings)")
    generate(args.out / "data_full", SynthConfig(n_train=args.n_train, n_val=args.n_val,
                                                 n_test=args.n_test, size=args.size,
                                                 shortcut="none", seed=0))
    counts = imbalanced_copy(args.out / "data_full", args.out / "data", args.minority,
                             splits=("train",))
    runs: dict[str, dict[int, dict]] = {name: {} for name in SETTINGS}
    for name, setting in SETTINGS.items():
        for seed in args.seeds:
            cfg = TrainConfig(method="erm", epochs=args.epochs, seed=seed,
                              threads=args.threads, **setting)
            slug = name.replace("=", "-")
            metrics = train(args.out / "data", cfg, args.out / "runs" / f"{slug}-seed{seed}",
                            progress=False)
            runs[name][seed] = {k: metrics["test"].get(k) for k in METRICS}
    summary = {"benchmark": "sampler_imbalance", "seeds": args.seeds, "epochs": args.epochs,
               "minority": args.minority, "counts": counts, "runs": runs, "mean": {},
               "std": {}}
    lines = ["| setting | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in SETTINGS:
        cells = []
        for k in METRICS:
            values = [runs[name][s][k] for s in args.seeds]
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            summary["mean"].setdefault(name, {})[k] = mean
            summary["std"].setdefault(name, {})[k] = std
            cells.append(f"{mean:.3f} ({std:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
