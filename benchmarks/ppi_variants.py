"""PPI variants against ERM on one dataset: which departure from Eq. 1/3 matters.

    python benchmarks/ppi_variants.py --data DIR --erm-run 'RUNS/erm_seed{seed}'
        [--runs DIR] [--seeds 3] [--epochs 12] [--threads 1] [--only NAME,...]
        [--set method.fraction=0.25 ...] [--out benchmarks/results/ppi_variants]

Every variant is PPI (WBP, soft mask) with the common --set overrides plus its own:

    paper            Eq. 1 and 3 as written: every sample contrasted, zero fill
    warmup           3 epochs of L_cls alone first (the paper starts from ImageNet weights)
    positive         L_con only for label != 0 (removing a benign lesion's evidence gives
                     no reason to predict malignant)
    positive-mean    positive, and masked pixels set to the image mean instead of zero
    positive-warmup  positive with the 3-epoch warm-up
    positive-warmup-mean  all three

Runs live in RUNS/<variant>_seed<k>; a finished run is collected only if its stored settings
equal the wanted ones (else the script stops and names the difference), an unfinished one is
trained. ERM runs come from --erm-run. Reports on the test split, mean (std) over seeds:
accuracy, AUC, Grad-CAM precision, WBP mass in the lesion mask, and the best epoch.
Writes ppi_variants.json and ppi_variants.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from causalign.engine.config import parse_set
from causalign.io import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import check_overrides, one_line_errors  # noqa: E402
from ppi_vs_erm import run_one  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "paper": {},
    "warmup": {"method.warmup_epochs": 3},
    "positive": {"method.contrast_on": "positive"},
    "positive-mean": {"method.contrast_on": "positive", "method.fill": "mean"},
    "positive-warmup": {"method.contrast_on": "positive", "method.warmup_epochs": 3},
    "positive-warmup-mean": {"method.contrast_on": "positive", "method.warmup_epochs": 3,
                             "method.fill": "mean"},
}
COLUMNS = [("accuracy", "gradcam", "accuracy"), ("AUC", "gradcam", "auc"),
           ("CAM precision", "gradcam", "cam_precision"),
           ("WBP mass in mask", "wbp", "cam_mass_in_mask")]


def collect(data: Path, runs: Path, name: str, sets: dict, seed: int, epochs: int,
            threads: int) -> dict:
    return run_one(data, runs, "ppi", seed, epochs, sets, threads,
                   run_dir=runs / f"{name}_seed{seed}")


def summary(results: list[dict]) -> dict:
    out = {}
    for label, source, key in COLUMNS:
        vals = [r[source][key] for r in results]
        out[label] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals),
                      "values": vals}
    out["best epoch"] = {"values": [r["best_epoch"] for r in results]}
    return out


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--erm-run", required=True,
                    help="template of finished ERM runs, e.g. RUNS/erm_seed{seed}")
    ap.add_argument("--runs", default="/tmp/causalign_ppi_variants")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="override common to every variant, e.g. method.fraction=0.25")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppi_variants"))
    args = ap.parse_args(argv)
    if args.seeds < 1:  # a mean over no seed: a StatisticsError / IndexError, or an empty table
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    data, runs = Path(args.data), Path(args.runs)
    common = parse_set(args.sets)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in names:
        check_overrides("ppi", {**common, **VARIANTS[name]})
    runs.mkdir(parents=True, exist_ok=True)
    table = {"ERM": summary([run_one(data, runs, "erm", s, args.epochs, {}, args.threads,
                                     args.erm_run) for s in range(args.seeds)])}
    for name in names:
        sets = {**common, **VARIANTS[name]}
        rs = [collect(data, runs, name, sets, s, args.epochs, args.threads)
              for s in range(args.seeds)]
        table[name] = summary(rs)
        print(f"{name}: acc {table[name]['accuracy']['mean']:.3f} "
              f"auc {table[name]['AUC']['mean']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "ppi_variants", "data": str(data), "seeds": args.seeds,
            "epochs": args.epochs, "common_overrides": common, "erm_runs": args.erm_run,
            "variants": {n: VARIANTS[n] for n in names}, "table": table}
    atomic_write_json(out / "ppi_variants.json", meta)
    lines = [f"PPI variants vs ERM on {data} ({args.epochs} epochs, common overrides "
             f"{common or 'none'}), test split, mean (std) over {args.seeds} seeds.", "",
             "| variant | " + " | ".join(c[0] for c in COLUMNS) + " | best epochs |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for name, row in table.items():
        cells = [f"{row[c[0]]['mean']:.3f} ({row[c[0]]['std']:.3f})" for c in COLUMNS]
        best = "/".join(str(v) for v in row["best epoch"]["values"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best} |")
    atomic_write_text(out / "ppi_variants.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
