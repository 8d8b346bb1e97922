"""Cross-site generalisation with and without PPI (seed 002, Table 4).

    python benchmarks/cross_site.py [--sites 4 --n-train 800 --n-val 200 --n-test 400]
        [--epochs 12 --seed 0 --shortcut none] [--set method.key=value ...]
        [--work DIR] [--out benchmarks/results]

One synthetic dataset with K acquisition sites (contrast gain, noise, blur and label
prevalence differ by site; `causalign data synth --sites K`) is split into K per-site
datasets (same images, manifest filtered by site). For each site a model is trained on that
site's training split with ERM and with PPI (WBP, soft mask), and tested on every site's test
split: the diagonal is same-site hold-out data, as in the paper. Reports the AUC matrix, the
mean and std of each row (over test sites), and the mean in-site minus cross-site gap.
Writes cross_site.json, cross_site.md and cross_site.png (two heat maps). Existing runs in
--work are reused.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig
from causalign.engine import TrainConfig, load_run, quick_metrics, train
from causalign.engine.config import apply_overrides, parse_set
from causalign.io import atomic_savefig, atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import (  # noqa: E402
    check_finished_run,
    check_overrides,
    one_line_errors,
    synth_or_reuse,
)

METHODS = ("erm", "ppi")


def split_by_site(full: Path, work: Path, sites: int) -> list[Path]:
    """Per-site dataset folders sharing the full dataset's image files (symlinks)."""
    with open(full / "manifest.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    out = []
    for k in range(sites):
        root = work / f"site{k}"
        if not (root / "manifest.csv").exists():
            root.mkdir(parents=True, exist_ok=True)
            shutil.copy(full / "dataset.yaml", root / "dataset.yaml")
            for sub in ("images", "masks"):
                link = root / sub
                if not link.exists():
                    link.symlink_to((full / sub).resolve(), target_is_directory=True)
            with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(r for r in rows if r["site"] == str(k))
        out.append(root)
    return out


def _cell(v: float | None) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.3f}"


def heatmaps(matrices: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # undefined (NaN) cells are drawn blank and labelled n/a; they must not set the scale
    finite = [float(np.nanmin(m)) for m in matrices.values() if np.isfinite(m).any()]
    lo = min(finite) if finite else 0.0
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8))
    names = [chr(ord("A") + i) for i in range(next(iter(matrices.values())).shape[0])]
    for ax, (title, m) in zip(np.atleast_1d(axes), matrices.items(), strict=True):
        im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=1.0)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, _cell(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < (lo + 1) / 2 else "black")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("test site")
        ax.set_ylabel("train site")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)  # a crash mid-write keeps the previous PNG whole
    plt.close(fig)


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--shortcut", default="none")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="PPI override, e.g. method.mask=box")
    ap.add_argument("--work", default="/tmp/causalign_cross_site")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    sets = parse_set(args.sets)
    check_overrides("ppi", sets)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work)
    full = work / "full"
    synth = SynthConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                        size=args.size, shortcut=args.shortcut, sites=args.sites, seed=args.seed)
    # the data and runs in --work are reused: refused when made with other options, or the
    # tables would label old results with the new sizes
    synth_or_reuse(full, synth, "--work")
    site_data = split_by_site(full, work, args.sites)
    tests = [LesionDataset(d, "test") for d in site_data]
    matrices = {method: np.full((args.sites, args.sites), np.nan) for method in METHODS}
    for i, data in enumerate(site_data):  # site by site, both methods: partial runs pair up
        for method in METHODS:
            m = matrices[method]
            run = work / "runs" / f"{method}_site{i}_seed{args.seed}"
            cfg = TrainConfig(method=method, epochs=args.epochs, seed=args.seed,
                              device="cpu", threads=args.threads)
            if method == "ppi" and sets:
                cfg = apply_overrides(cfg, sets)
            if not (run / "metrics.json").exists():
                train(data, cfg, run, progress=False)
            else:  # a finished run is reused only as asked
                check_finished_run(run, cfg, "--work")
            _, model, meth, _ = load_run(run, device="cpu")
            for j, ds in enumerate(tests):
                auc = quick_metrics(model, meth, ds, torch.device("cpu"))["auc"]
                m[i, j] = np.nan if auc is None else auc  # None: one class in that split
            print(f"{method} train site {i}: " + " ".join(f"{v:.3f}" for v in m[i]), flush=True)

    def _num(v: float) -> float | None:
        return None if np.isnan(v) else float(v)  # JSON null, not the non-standard NaN

    def summary(m: np.ndarray) -> dict:
        # a test site whose split holds one class has no AUC (NaN cell): the figures average
        # the defined cells and say how many were left out instead of turning NaN
        off = m[~np.eye(len(m), dtype=bool)]
        diag = np.diag(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN → null
            in_site, cross = np.nanmean(diag), np.nanmean(off)
            return {
                "auc": [[_num(v) for v in row] for row in m],
                "row_mean": [_num(v) for v in np.nanmean(m, 1)],
                "row_std": [_num(v) for v in np.nanstd(m, 1)],
                "mean": _num(np.nanmean(m)), "in_site_mean": _num(in_site),
                "cross_site_mean": _num(cross),
                "gap_in_minus_cross": _num(in_site - cross),
                "undefined_cells": int(np.isnan(m).sum()),
            }

    result = {
        "benchmark": "cross_site", "sites": args.sites, "seed": args.seed,
        "epochs": args.epochs, "shortcut": args.shortcut, "ppi_overrides": sets,
        # the image side too: cross_site_seeds.py compares it (seeds run at --size 32 and 64
        # were averaged under one label)
        "image_size": args.size,
        "sizes": {"train": args.n_train, "val": args.n_val, "test": args.n_test,
                  "per_site_test": [len(t) for t in tests]},
        "rows": "train site", "columns": "test site",
        # which manifest `site` each row/column is, and its letter in cross_site.md / .png:
        # the matrices' order was implied only
        "site_ids": [str(k) for k in range(args.sites)],
        "site_names": [chr(ord("A") + k) for k in range(args.sites)],
        "erm": summary(matrices["erm"]), "ppi": summary(matrices["ppi"]),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "cross_site.json", result)
    names = result["site_names"]
    lines = [f"Test AUC, model trained on the row's site, tested on the column's site "
             f"(synthetic, {args.sites} sites, {args.n_train}/{args.n_val}/{args.n_test} "
             f"images in all, seed {args.seed}, {args.epochs} epochs).", ""]
    for method, title in (("ppi", "+PPI"), ("erm", "No PPI")):
        m = matrices[method]
        lines += [f"| {title} | " + " | ".join(names) + " | Mean | STD |",
                  "|---" * (args.sites + 3) + "|"]
        for i in range(args.sites):
            s = result[method]
            lines.append(f"| {names[i]} | " + " | ".join(_cell(v) for v in m[i])
                         + f" | {_cell(s['row_mean'][i])} | {_cell(s['row_std'][i])} |")
        s = result[method]
        lines += ["", f"{title}: mean {_cell(s['mean'])}, in-site {_cell(s['in_site_mean'])}, "
                  f"cross-site {_cell(s['cross_site_mean'])}, gap "
                  f"{_cell(s['gap_in_minus_cross'])}", ""]
        if s["undefined_cells"]:
            lines += [f"{title}: {s['undefined_cells']} cell(s) n/a (a test split with one "
                      "class has no AUC); the figures average the others.", ""]
    atomic_write_text(out / "cross_site.md", "\n".join(lines))
    heatmaps({"+PPI": matrices["ppi"], "No PPI": matrices["erm"]}, out / "cross_site.png")
    print("\n".join(lines))
    print(f"one run per cell; {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
