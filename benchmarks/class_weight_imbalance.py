"""ERM with `class_weight=none` vs `balanced` on an imbalanced synthetic dataset.

    python benchmarks/class_weight_imbalance.py --out DIR [--seeds 0 1 2 --epochs 8
        --minority 0.15 --n-train 1200 --n-val 400 --n-test 600 --size 32 --threads 1]

The synthetic benchmark's label rule gives about half malignant; this script writes it
(`causalign data synth`, shortcut none: no cue but the lesion) to DIR/data_full and a copy,
DIR/data, whose manifest keeps every benign sample and only the first malignant ones of each
split, so that malignant (class 1) is the `--minority` fraction of every split. Then ERM is
trained per seed with each class_weight into DIR/runs/{none,balanced}-seedS and the test
split's accuracy, balanced accuracy, sensitivity (class 1's recall), specificity and AUC are
written as mean (std, ddof 0) over seeds to DIR/summary.json, and as a Markdown table to
DIR/summary.md and stdout. DIR must not exist yet (no reuse of other settings' runs).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
from pathlib import Path

from causalign.data.format import MANIFEST
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train
from causalign.io import atomic_write_json, atomic_write_text

METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
RULES = ("none", "balanced")


def imbalanced_copy(src: Path, dst: Path, minority: float,
                    splits: tuple[str, ...] | None = None) -> dict[str, dict[str, int]]:
    """``src`` copied to ``dst`` with malignant (label 1) cut to ``minority`` of each split
    in ``splits`` (None: every split; the first ones in manifest order); returns the counts
    per split and label."""
    shutil.copytree(src, dst)
    with open(src / MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    benign = {s: sum(r["split"] == s and r["label"] == "0" for r in rows)
              for s in {r["split"] for r in rows}}
    cap = {s: round(n * minority / (1 - minority)) for s, n in benign.items()}
    kept, taken = [], dict.fromkeys(benign, 0)
    for r in rows:
        if r["label"] == "1" and (splits is None or r["split"] in splits):
            taken[r["split"]] += 1
            if taken[r["split"]] > cap[r["split"]]:
                continue
        kept.append(r)
    with open(dst / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return {s: {label: sum(r["split"] == s and r["label"] == label for r in kept)
                for label in ("0", "1")} for s in sorted(benign)}


def parse_args(doc: str, minority: float) -> argparse.Namespace:
    """The options this script and sampler_imbalance.py share (`--minority` defaulting to
    ``minority``), checked: a minority fraction in (0, 0.5) and a new --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--minority", type=float, default=minority)
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
    args.parser = ap
    return args


def summarise(summary: dict, runs: dict[str, dict[int, dict]], seeds: list[int],
              metrics: tuple[str, ...], head: str, out: Path) -> None:
    """Mean (std, ddof 0) over seeds per setting and metric into ``summary`` ("mean",
    "std"), written to OUT/summary.json and as a Markdown table to OUT/summary.md and
    stdout."""
    lines = [f"| {head} | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in runs:
        cells = []
        for k in metrics:
            values = [runs[name][s][k] for s in seeds]
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            summary["mean"].setdefault(name, {})[k] = mean
            summary["std"].setdefault(name, {})[k] = std
            cells.append(f"{mean:.3f} ({std:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args(__doc__, 0.15)
    ap = args.parser
    generate(args.out / "data_full", SynthConfig(n_train=args.n_train, n_val=args.n_val,
                                                 n_test=args.n_test, size=args.size,
                                                 shortcut="none", seed=0))
    counts = imbalanced_copy(args.out / "data_full", args.out / "data", args.minority)
    # a split without one of the classes has no AUC (None) nor sensitivity/specificity:
    # the summary's mean over seeds crashed in statistics.fmean after all the training
    lacking = [f"{s} ({'no malignant' if not c['1'] else 'no benign'})"
               for s, c in counts.items() if not c["0"] or not c["1"]]
    if lacking:
        shutil.rmtree(args.out)  # made by this call (it did not exist): a rerun may use it
        ap.exit(2, f"{ap.prog}: error: --minority {args.minority} leaves {', '.join(lacking)}"
                   f" at these sizes; raise --n-train/--n-val/--n-test or --minority\n")
    runs: dict[str, dict[int, dict]] = {rule: {} for rule in RULES}
    for rule in RULES:
        for seed in args.seeds:
            cfg = TrainConfig(method="erm", epochs=args.epochs, seed=seed,
                              threads=args.threads, class_weight=rule)
            metrics = train(args.out / "data", cfg, args.out / "runs" / f"{rule}-seed{seed}",
                            progress=False)
            runs[rule][seed] = {k: metrics["test"].get(k) for k in METRICS}
    summary = {"benchmark": "class_weight_imbalance", "seeds": args.seeds,
               "epochs": args.epochs, "minority": args.minority, "counts": counts,
               "runs": runs, "mean": {}, "std": {}}
    summarise(summary, runs, args.seeds, METRICS, "class_weight", args.out)

if __name__ == "__main__":
    main()
