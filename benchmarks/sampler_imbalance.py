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

from class_weight_imbalance import imbalanced_copy, parse_args, summarise

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, train

METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc")
SETTINGS = {"sampler=none": {}, "sampler=balanced": {"sampler": "balanced"},
            "class_weight=balanced": {"class_weight": "balanced"}}


def main() -> None:
    args = parse_args(__doc__, 0.1)
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
    summarise(summary, runs, args.seeds, METRICS, "setting", args.out)

if __name__ == "__main__":
    main()
