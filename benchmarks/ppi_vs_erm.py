"""PPI vs ERM on the plus-minus synthetic benchmark (seed 002 §3.1 on seed 000's benchmark).

    python benchmarks/ppi_vs_erm.py [--data DIR | --synth-dir DIR] [--seeds 3 --epochs 12]
        [--n-train 1000 --n-val 300 --n-test 500] [--set method.key=value ...]
        [--runs DIR] [--erm-run 'DIR/erm-seed{seed}'] [--out benchmarks/results]

Trains ERM and PPI (WBP saliency, soft mask, paper defaults unless --set says otherwise) for
each seed on the same data (existing RUNS/<method>_seed<k>/metrics.json are reused; --erm-run
names existing ERM runs by a template, e.g. the demo's), then
reports on the test split, mean (std) over seeds: accuracy, AUC, Grad-CAM precision and
mass-in-mask (the metrics.json numbers), the same two for WBP maps, and deletion drops of
both maps at 1 % and 10 % of the pixels. The training images carry a "+"/"−" symbol that
gives the label away; test images carry a random one, so a model that uses it sits at chance.
Writes ppi_vs_erm.json and ppi_vs_erm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig
from causalign.engine import TrainConfig, evaluate_split, load_run, train
from causalign.engine.config import apply_overrides, parse_set
from causalign.io import atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import (  # noqa: E402
    check_finished_run,
    check_overrides,
    check_template_run,
    one_line_errors,
    synth_or_reuse,
)

ROWS = [
    ("accuracy", "gradcam", "accuracy"),
    ("AUC", "gradcam", "auc"),
    ("CAM precision (Grad-CAM)", "gradcam", "cam_precision"),
    ("mass in mask (Grad-CAM)", "gradcam", "cam_mass_in_mask"),
    ("precision (WBP)", "wbp", "cam_precision"),
    ("mass in mask (WBP)", "wbp", "cam_mass_in_mask"),
    ("deletion 1% (Grad-CAM)", "gradcam", "deletion.0.01"),
    ("deletion 1% (WBP)", "wbp", "deletion.0.01"),
    ("deletion 10% (WBP)", "wbp", "deletion.0.1"),
]


def _get(d: dict, key: str):
    if key.startswith("deletion."):
        return d["deletion"][key.split(".", 1)[1]]
    return d[key]


def run_one(data: Path, runs: Path, method: str, seed: int, epochs: int, sets: dict,
            threads: int = 1, template: str | None = None, run_dir: Path | None = None
            ) -> dict:
    """Train RUNS/<method>_seed<k> (or ``run_dir``) unless finished, then evaluate it;
    ``template`` names a finished run instead. A finished run of ours is collected only if
    its stored settings are the wanted ones."""
    run = Path(template.format(seed=seed)) if template else (
        run_dir or runs / f"{method}_seed{seed}")
    if template and not (run / "metrics.json").exists():
        raise SystemExit(f"{run}: no metrics.json (an --erm-run template names finished runs)")
    if template:  # tabled under this --data and --epochs: it must be a run of those
        check_template_run(run, method, epochs, data, "--erm-run")
    cfg = TrainConfig(method=method, epochs=epochs, seed=seed, device="cpu", threads=threads)
    if method == "ppi" and sets:
        cfg = apply_overrides(cfg, sets)
    if not template and (run / "metrics.json").exists():
        check_finished_run(run, cfg, "--runs", data)
    elif not template and (run / "checkpoint.pt").exists():
        check_finished_run(run, cfg, "--runs", data, state="interrupted")
    if not (run / "metrics.json").exists():
        t0 = time.perf_counter()
        train(data, cfg, run, resume=(run / "checkpoint.pt").exists(), progress=False)
        atomic_write_text(run / "wall_seconds.txt", f"{time.perf_counter() - t0:.1f}\n")
    metrics = json.loads((run / "metrics.json").read_text())
    _, model, meth, data_path = load_run(run, device="cpu")
    wbp = evaluate_split(model, meth, LesionDataset(data_path, "test"), torch.device("cpu"),
                         saliency="wbp")
    wall = run / "wall_seconds.txt"
    return {"gradcam": metrics["test"], "wbp": wbp, "best_epoch": metrics["best_epoch"],
            "wall_seconds": float(wall.read_text()) if wall.exists() else None}


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--synth-dir", default="/tmp/causalign_ppi/data")
    ap.add_argument("--runs", default="/tmp/causalign_ppi/runs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--erm-run", help="template of existing ERM runs to reuse, e.g. "
                    "DEMO/runs/plus-minus/erm/seed{seed} (trained with the same data and epochs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="PPI override, e.g. method.mask=box")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.seeds < 1:  # a mean over no seed: a StatisticsError / IndexError, or an empty table
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    check_overrides("ppi", parse_set(args.sets))  # before the data and ERM runs are made
    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else Path(args.synth_dir)
    if not args.data:  # a kept --synth-dir is reused only if made with these options
        synth_or_reuse(data, SynthConfig(n_train=args.n_train, n_val=args.n_val,
                                         n_test=args.n_test), "--synth-dir")
    sets = parse_set(args.sets)
    results: dict[str, list[dict]] = {"erm": [], "ppi": []}
    for seed in range(args.seeds):
        for method in results:
            template = args.erm_run if method == "erm" else None
            results[method].append(run_one(data, Path(args.runs), method, seed, args.epochs,
                                           sets, args.threads, template))
            r = results[method][-1]
            print(f"{method} seed {seed}: acc {r['gradcam']['accuracy']:.3f} "
                  f"auc {r['gradcam']['auc']:.3f} wbp-mass {r['wbp']['cam_mass_in_mask']:.3f}",
                  flush=True)
    table = {}
    for label, source, key in ROWS:
        table[label] = {}
        for method, rs in results.items():
            vals = [_get(r[source], key) for r in rs]
            table[label][method] = {"mean": statistics.fmean(vals),
                                    "std": statistics.pstdev(vals), "values": vals}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the sizes of the data actually used: with --data (or a reused --synth-dir) the
    # --n-* options are not what was trained and tested on
    splits = {s: LesionDataset(data, s) for s in ("train", "val", "test")}
    sizes = {s: len(ds) for s, ds in splits.items()}
    shape = list(splits["test"].image_shape)
    meta = {"benchmark": "ppi_vs_erm", "data": str(data), "seeds": args.seeds,
            "erm_runs": args.erm_run,
            "epochs": args.epochs, "ppi_overrides": sets,
            "sizes": sizes, "image_shape": shape,
            "table": table,
            "wall_seconds": {m: [r["wall_seconds"] for r in rs] for m, rs in results.items()},
            "best_epochs": {m: [r["best_epoch"] for r in rs] for m, rs in results.items()}}
    atomic_write_json(out / "ppi_vs_erm.json", meta)
    meta_yaml = (data / "dataset.yaml").read_text(encoding="utf-8")
    synth = (yaml.safe_load(meta_yaml).get("info") or {}).get("config")
    bench = (f"synthetic benchmark, shortcut {synth.get('shortcut')}" if isinstance(synth, dict)
             else f"dataset {data}")
    lines = [f"PPI (WBP, soft mask{', ' + str(sets) if sets else ''}) vs ERM, {bench}"
             f" ({sizes['train']}/{sizes['val']}/{sizes['test']} images, "
             f"{'×'.join(str(n) for n in shape[1:])} px, "
             f"{args.epochs} epochs), test split, mean (std) over {args.seeds} seeds.", "",
             "| metric | ERM | PPI |", "|---|---|---|"]
    for label, row in table.items():
        cells = [f"{row[m]['mean']:.3f} ({row[m]['std']:.3f})" for m in ("erm", "ppi")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "ppi_vs_erm.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
