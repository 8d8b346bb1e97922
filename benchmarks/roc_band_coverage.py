"""Coverage of `metrics.roc_band`'s pointwise 95 % band, by simulation: binormal scores
(negatives N(0, 1), positives N(d, 1), so the true ROC curve is 1 − Φ(Φ⁻¹(1 − fpr) − d)),
many data sets, each's band from its own bootstrap resamples; at each false-positive rate
of the band's grid, the share of data sets whose band holds the true sensitivity.

    python benchmarks/roc_band_coverage.py --out benchmarks/results/roc_band_coverage.json
        [--n 300 --datasets 300 --resamples 1000 --d 1.2 --seed 0]

Also the share of data sets whose band holds the true curve at every rate of an interior
range at once (a pointwise band is not meant to: that is what a simultaneous band would
do). Writes JSON (per-rate coverage, a summary at chosen rates) and prints the summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from causalign.io import atomic_write_json
from causalign.metrics.roc import ROC_BAND_GRID, roc_band

SHOWN = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--n", type=int, default=300, help="samples per data set (half positive)")
    ap.add_argument("--datasets", type=int, default=300, help="simulated data sets")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples each")
    ap.add_argument("--d", type=float, default=1.2, help="binormal separation (AUC Φ(d/√2))")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 4 or args.datasets < 1 or args.resamples < 100:
        ap.error("--n must be >= 4, --datasets >= 1 and --resamples >= 100")
    return args


def coverage(n: int, datasets: int, resamples: int, d: float, seed: int) -> dict:
    grid = ROC_BAND_GRID
    true = 1 - norm.cdf(norm.ppf(1 - grid) - d)
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    held = np.zeros(len(grid))
    interior = (grid >= 0.05) & (grid <= 0.95)
    whole = 0
    width = np.zeros(len(grid))
    for k in range(datasets):
        score = rng.normal(size=n) + d * y
        p1 = 1 / (1 + np.exp(-score))
        band = roc_band(np.stack([1 - p1, p1], 1), y, resamples, seed=k)
        inside = (true >= band["lo"]) & (true <= band["hi"])
        held += inside
        whole += bool(inside[interior].all())
        width += band["hi"] - band["lo"]
    cov = held / datasets
    return {"fpr": grid.tolist(), "true_tpr": true.tolist(), "coverage": cov.tolist(),
            "mean_width": (width / datasets).tolist(),
            "mean_coverage_0.05_0.95": float(cov[interior].mean()),
            "whole_curve_coverage_0.05_0.95": whole / datasets,
            "at": {f"{f:g}": {"coverage": float(cov[int(round(f * 100))]),
                              "true_tpr": float(true[int(round(f * 100))]),
                              "mean_width": float(width[int(round(f * 100))] / datasets)}
                   for f in SHOWN}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    result = {"benchmark": "roc_band_coverage", "n": args.n, "datasets": args.datasets,
              "resamples": args.resamples, "d": args.d, "seed": args.seed,
              "auc_true": float(norm.cdf(args.d / np.sqrt(2))),
              **coverage(args.n, args.datasets, args.resamples, args.d, args.seed)}
    result["seconds"] = time.perf_counter() - start
    atomic_write_json(args.out, result)
    print(f"binormal d={args.d} (AUC {result['auc_true']:.3f}), n={args.n}, "
          f"{args.datasets} data sets x {args.resamples} resamples, {result['seconds']:.0f} s")
    for f, v in result["at"].items():
        print(f"  fpr {f:>4}: true sens {v['true_tpr']:.3f}, band holds it in "
              f"{v['coverage']:.3f} of data sets (mean width {v['mean_width']:.3f})")
    print(f"  mean over fpr 0.05-0.95: {result['mean_coverage_0.05_0.95']:.3f}; whole "
          f"curve (0.05-0.95) at once: {result['whole_curve_coverage_0.05_0.95']:.3f}")


if __name__ == "__main__":
    main()
