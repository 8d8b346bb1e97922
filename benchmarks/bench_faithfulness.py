"""Deletion faithfulness of every saliency method (seed 002, Table 2).

    python benchmarks/bench_faithfulness.py [--data DIR | --synth-dir DIR] [--seeds 3]
        [--method erm --epochs 12 --n-train 400 --n-val 100 --n-test 200 --size 64]
        [--shortcut none] [--runs DIR | --run-template 'DIR/erm-seed{seed}']
        [--out benchmarks/results]

For each seed a classifier is trained (or loaded: a finished RUNS/<method>_seed<k> is
reused, and an existing --synth-dir dataset, only if made with the options asked for now;
--run-template names existing runs, e.g. the demo's) on the synthetic lesion
benchmark; then, for every registered saliency method and a
random-map baseline, the top-k pixels of each test image's map of the *predicted* class are
set to 0 and the drop of that class's probability is averaged over the test split
(`causalign.metrics.deletion_scores`), at the fractions of DESIGN.md (0.2 % … 20 % of the
pixels ≈ the paper's k = 100 … 10000 of 224²). Larger drop = the map found more of what the
decision rests on. Writes faithfulness.json, faithfulness.md (mean (std) over seeds) and
faithfulness_curves.png (deletion curves) to --out.

The default data has no shortcut (`--shortcut none`), so the model decides from the lesion;
`--shortcut plus-minus` measures faithfulness to a shortcut model instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig
from causalign.engine import TrainConfig, load_run, train
from causalign.engine.evaluate import iterate_batches
from causalign.engine.trainer import same_dataset
from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.io import atomic_savefig, atomic_write_json, atomic_write_text
from causalign.metrics import DELETION_FRACTIONS, deletion_scores

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import check_finished_run, one_line_errors, synth_or_reuse  # noqa: E402

RANDOM = "random (baseline)"


def ensure_data(args) -> Path:
    if args.data:
        return Path(args.data)
    root = Path(args.synth_dir)
    synth_or_reuse(root, SynthConfig(n_train=args.n_train, n_val=args.n_val,
                                     n_test=args.n_test, size=args.size,
                                     shortcut=args.shortcut, seed=args.data_seed),
                   "--synth-dir")
    return root


def ensure_run(data: Path, run: Path, method: str, epochs: int, seed: int) -> dict:
    cfg = TrainConfig(method=method, epochs=epochs, seed=seed, device="cpu")
    if (run / "metrics.json").exists():
        # reused only when it is the run asked for, or old results get the new labels
        check_finished_run(run, cfg, "--runs", data)
        return json.loads((run / "metrics.json").read_text())
    resume = (run / "checkpoint.pt").exists()
    if resume:  # an interrupted run is continued, if it is the run asked for
        check_finished_run(run, cfg, "--runs", data, state="interrupted")
    return train(data, cfg, run, resume=resume, progress=False)


def deletion_table(model, method, ds: LesionDataset, names: list[str],
                   fractions: tuple[float, ...], seed: int) -> dict[str, dict[str, float]]:
    """{saliency: {fraction: mean drop}} over the split."""
    model.eval()
    sums = {n: {f: 0.0 for f in fractions} for n in [*names, RANDOM]}
    count = 0
    g = torch.Generator().manual_seed(seed)
    explainers = {n: get_explainer(n, model) for n in names}
    for batch in iterate_batches(ds, 64):
        x = method.model_input(batch)
        with torch.no_grad():
            pred = model(x).argmax(1)
        maps = {n: saliency_map(e.attribute(x, target=pred)).detach()
                for n, e in explainers.items()}
        maps[RANDOM] = torch.rand(x.shape[0], *x.shape[2:], generator=g)
        for n, m in maps.items():
            for f, drop in deletion_scores(model, x, m, pred, fractions).items():
                sums[n][f] += float(drop.sum())
        count += x.shape[0]
    return {n: {f"{f:g}": v / count for f, v in per.items()} for n, per in sums.items()}


def summarise(per_seed: list[dict], fractions) -> dict:
    out = {}
    for name in per_seed[0]:
        out[name] = {}
        for f in fractions:
            key = f"{f:g}"
            vals = [s[name][key] for s in per_seed]
            out[name][key] = {"mean": statistics.fmean(vals),
                              "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                              "values": vals}
    return out


def markdown(summary: dict, fractions, n_pixels: int, caption: str) -> str:
    head = "| saliency | " + " | ".join(
        f"{f:g} ({round(f * n_pixels)} px)" for f in fractions) + " |"
    lines = [caption, "", head, "|---" * (len(fractions) + 1) + "|"]
    order = sorted(summary, key=lambda n: -summary[n][f"{fractions[0]:g}"]["mean"])
    for name in order:
        cells = [f"{summary[name][f'{f:g}']['mean']:.3f} ({summary[name][f'{f:g}']['std']:.3f})"
                 for f in fractions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves(summary: dict, fractions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = np.array(fractions) * 100
    for name in sorted(summary, key=lambda n: -summary[n][f"{fractions[-1]:g}"]["mean"]):
        m = np.array([summary[name][f"{f:g}"]["mean"] for f in fractions])
        s = np.array([summary[name][f"{f:g}"]["std"] for f in fractions])
        style = dict(lw=2.4, color="black") if name == "wbp" else dict(lw=1.2)
        if name == RANDOM:
            style = dict(lw=1.2, ls="--", color="gray")
        ax.plot(xs, m, marker="o", ms=3, label=name, **style)
        ax.fill_between(xs, m - s, m + s, alpha=0.12, color=style.get("color"))
    ax.set_xscale("log")
    ax.set_xlabel("pixels removed (% of image, top-k of the map)")
    ax.set_ylabel("mean drop of the predicted class probability")
    ax.set_title("Deletion faithfulness (higher = more faithful)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)  # a crash mid-write keeps the previous PNG whole
    plt.close(fig)


def check_template_runs(template: str, seeds: int) -> None:
    """Stop unless every run ``template`` names for seeds 0..seeds-1 is finished and has
    seed 0's method, epochs and dataset (or a copy), before any is explained: checked in
    the loop, a later seed's run was refused only after seed 0's deletion table (every
    explainer over the test split). Loading each run's weights once more costs little."""
    first: tuple[str, int, Path] | None = None
    for seed in range(seeds):
        run = Path(template.format(seed=seed))
        if not (run / "metrics.json").is_file():
            raise SystemExit(f"{run}: no metrics.json (--run-template names finished runs)")
        cfg, _, _, data_path = load_run(run, device="cpu")
        if first is None:
            first = (cfg.method, cfg.epochs, Path(data_path))
            continue
        diffs = [f"{k} {a} -> {b}" for k, a, b in (("method", first[0], cfg.method),
                                                  ("epochs", first[1], cfg.epochs)) if a != b]
        if not same_dataset(first[2], Path(data_path)):
            diffs.append(f"data {first[2]} -> {data_path}")
        if diffs:
            raise SystemExit(f"{run}: not a run of seed 0's settings ({'; '.join(diffs)})")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="existing dataset (default: synthesise into --synth-dir)")
    ap.add_argument("--synth-dir", default="/tmp/causalign_faithfulness/data")
    ap.add_argument("--runs", default="/tmp/causalign_faithfulness/runs")
    ap.add_argument("--run-template", help="existing runs to explain, e.g. "
                    "DEMO/runs/plus-minus/erm/seed{seed} (their data is used; nothing is trained)")
    ap.add_argument("--method", default="erm")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--size", type=int, default=64, help="synthetic image side (px)")
    ap.add_argument("--shortcut", default="none")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.seeds < 1:  # a mean over no seed: a StatisticsError / IndexError, or an empty table
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.run_template:
        check_template_runs(args.run_template, args.seeds)
    data = None if args.run_template else ensure_data(args)
    fractions = tuple(DELETION_FRACTIONS)
    names = explainer_names()
    per_seed, models = [], []
    for seed in range(args.seeds):
        if args.run_template:
            run = Path(args.run_template.format(seed=seed))
            if not (run / "metrics.json").is_file():
                raise SystemExit(f"{run}: no metrics.json (--run-template names finished runs)")
            metrics = json.loads((run / "metrics.json").read_text())
        else:
            run = Path(args.runs) / f"{args.method}_seed{seed}"
            metrics = ensure_run(data, run, args.method, args.epochs, seed)
        models.append({"run": str(run), "test_accuracy": metrics["test"]["accuracy"],
                       "test_auc": metrics["test"]["auc"]})
        cfg, model, method, data_path = load_run(run, device="cpu")
        if per_seed:  # one table of one setting: a templated run of another is refused
            diffs = [f"{k} {a} -> {b}" for k, a, b in (("method", args.method, cfg.method),
                                                      ("epochs", args.epochs, cfg.epochs))
                     if a != b]
            if not same_dataset(Path(data), Path(data_path)):
                diffs.append(f"data {data} -> {data_path}")
            if diffs:
                raise SystemExit(f"{run}: not a run of seed 0's settings ({'; '.join(diffs)})")
        data = data or data_path
        args.method, args.epochs = cfg.method, cfg.epochs  # what the explained runs are
        ds = LesionDataset(data_path, "test")
        per_seed.append(deletion_table(model, method, ds, names, fractions, seed))
        print(f"seed {seed}: wbp {per_seed[-1]['wbp']}", flush=True)
    summary = summarise(per_seed, fractions)
    shortcut = ds.meta.info.get("config", {}).get("shortcut", args.shortcut)
    n_pixels = int(np.prod(ds.image_shape[1:]))
    smallest = f"{fractions[0]:g}"
    ranking = sorted(summary, key=lambda n: -summary[n][smallest]["mean"])
    result = {
        "benchmark": "faithfulness_deletion", "data": str(data), "method": args.method,
        "epochs": args.epochs, "seeds": args.seeds, "n_test": len(ds), "shortcut": shortcut,
        "image_shape": list(ds.image_shape), "fractions": list(fractions),
        "target": "predicted class", "fill": 0.0, "models": models,
        "drop": summary, "ranking_at_smallest_k": ranking,
        "wbp_rank_at_smallest_k": ranking.index("wbp") + 1,
        "seconds": time.perf_counter() - t0, "threads": args.threads,
        "torch": str(torch.__version__), "cpu": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "faithfulness.json", result)
    caption = (f"Mean drop of the predicted-class probability after zeroing the top-k pixels "
               f"of each map (mean (std) over {args.seeds} seeds; {args.method}, "
               f"{len(ds)} test images of {ds.image_shape[1]}×{ds.image_shape[2]} px, "
               f"shortcut={shortcut}).")
    atomic_write_text(out / "faithfulness.md", markdown(summary, fractions, n_pixels, caption))
    curves(summary, fractions, out / "faithfulness_curves.png")
    print((out / "faithfulness.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
