"""Where does a model's counterfactual change go, and does the model use the corner symbol?

    python benchmarks/cf_localisation.py RUN [RUN ...] [--weights best|last] [--n 64]
        [--labels NAME ...] [--out benchmarks/results/cf_localisation.json] [--append]
        [--setting SPACE:OPTIMIZER:ALPHA[:EPS] ...] [--steps 100]
        [--figure PNG] [--figure-n 2]

Eq. 3 can only tell a model that uses the lesion from one that uses the "+"/"−" shortcut if
their counterfactuals put their change in different places. For each run, on the first N
training images of its dataset, this measures, for every counterfactual setting below
(100 steps from x0, no warm start, target = the other class):

* the flip rate, and the share of Σ|x* − x| inside the lesion mask, inside the lesion box and
  inside the 16×16 top-left corner that holds the symbol (6 % of a 64 px image), averaged
  over all N images, flipped or not (as Eq. 3 in training is);
* settings: pixel space with Adam (the training default) or ISTA; ``smooth`` space (x0 + G_σ*u,
  σ = 1) with Adam or ISTA; α = 0.01 and 0.05. ``--setting`` replaces them, e.g.
  ``pixel:newton:0.01:1e-4`` (EPS: the smoothing ε of the l1 surrogate √(δ²+ε²)−ε, default
  1e-2 as in training; ISTA uses the exact l1 and ignores it);
* the relevance rank accuracy of |x* − x| against the mask: of the |mask| most-changed
  pixels, the share inside it (area-matched, blind to faint spread; ~0.05 for a uniform
  change);
* the same shares over the positives only (label 1; ``align_on=positive`` aligns those) and
  the raw Eq. 3, Σ|x* − x| outside the mask per annotated image: its mean (Eq. 3 itself),
  median and 90th percentile (a few images can dominate the mean).

and, on the same images, how much the model follows the symbol: the share of predictions
that change when the symbol is swapped ("+" → "−" by filling the vertical bar with the corner's
median, "−" → "+" by drawing it; `causalign.data.synth.draw_symbol` geometry). On plus-minus
training images the symbol equals the label, so a shortcut model changes most predictions.

``--figure`` also draws, for the first few images of every run, the signed change x* − x of
each setting side by side with the mask outlined (one row per run and image).

Writes JSON and a markdown table next to it; ``--append`` keeps the runs already in the JSON
(a run measured again with the same weights replaces its old entry).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from causalign.data.format import LesionDataset
from causalign.data.synth import draw_symbol
from causalign.engine.trainer import load_checkpoint, load_run
from causalign.errors import CausalignError
from causalign.explain.counterfactual import SPACES, CounterfactualGenerator
from causalign.explain.counterfactual_export import change_in_region
from causalign.io import atomic_write_json, atomic_write_text
from causalign.metrics import rank_accuracy

SETTINGS = [(space, opt, alpha, 1e-2) for space in ("pixel", "smooth")
            for opt in ("adam", "ista") for alpha in (0.01, 0.05)]
LR = {"adam": 0.01, "ista": 0.05, "newton": 1.0}


def parse_setting(text: str) -> tuple[str, str, float, float]:
    """``SPACE:OPTIMIZER:ALPHA[:EPS]`` → (space, optimizer, alpha, eps)."""
    parts = text.split(":")
    # the space too: an unknown one failed only at its run's search, after earlier runs
    if len(parts) not in (3, 4) or parts[0] not in SPACES or parts[1] not in LR:
        raise SystemExit(f"--setting {text!r}: expected SPACE:OPTIMIZER:ALPHA[:EPS] with "
                         f"SPACE one of {', '.join(SPACES)} and OPTIMIZER one of "
                         f"{', '.join(LR)}")
    try:
        return parts[0], parts[1], float(parts[2]), float(parts[3]) if len(parts) == 4 else 1e-2
    except ValueError:
        raise SystemExit(f"--setting {text!r}: ALPHA and EPS must be numbers") from None


def corner_region(like: torch.Tensor, size: int = 16) -> torch.Tensor:
    region = torch.zeros_like(like)
    region[..., :size, :size] = 1.0
    return region


def swap_symbol(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images with the corner symbol swapped, which had a "+"). Geometry of draw_symbol."""
    size = images.shape[-1]
    plus_ref = np.zeros((size, size), np.float32)
    draw_symbol(plus_ref, True, size)
    minus_ref = np.zeros((size, size), np.float32)
    draw_symbol(minus_ref, False, size)
    vertical = torch.from_numpy((plus_ref > 0) & (minus_ref == 0))
    corner = corner_region(images[:1, :1])[0, 0].bool()
    had_plus = images[:, 0][:, vertical].mean(1) > 0.8
    out = images.clone()
    for i in range(len(images)):
        img = out[i, 0]
        if had_plus[i]:
            img[vertical] = img[corner & ~torch.from_numpy(plus_ref > 0)].median()
        else:
            arr = img.numpy()
            draw_symbol(arr, True, size)
            out[i, 0] = torch.from_numpy(arr)
    return out, had_plus


def _stat(values: torch.Tensor, reduce) -> float | None:
    """``reduce`` over the finite ``values``; None (JSON null, "–" in the table) when there
    are none: a sample of only negatives, or no annotated image, wrote NaN."""
    values = values[torch.isfinite(values)]
    return float(reduce(values)) if len(values) else None


def localisation(run: Path, weights: str, n: int,
                 settings: list[tuple[str, str, float, float]] = SETTINGS,
                 steps: int = 100, keep: int = 0) -> dict:
    """The measurements of one run; ``keep`` > 0 adds the first ``keep`` images, masks and
    changes (one per setting) under ``"examples"`` for the figure."""
    cfg, model, method, data_path = load_run(run, device="cpu")
    if weights == "last":
        model.load_state_dict(load_checkpoint(run / "checkpoint.pt", map_location="cpu")["model"])
        model.eval()
    ds = LesionDataset(data_path, "train")
    batch = ds.batch(torch.arange(min(n, len(ds))))
    x = method.model_input(batch)
    with torch.no_grad():
        pred = model(x).argmax(1)
        swapped, had_plus = swap_symbol(x)
        pred_swapped = model(swapped).argmax(1)
    regions = {"mask": batch["mask"], "box": batch["box_mask"], "corner": corner_region(x)}
    positive = batch["label"] == 1
    rows, kept_changes = [], {}
    for space, opt, alpha, eps in settings:
        gen = CounterfactualGenerator(model, alpha=alpha, steps=steps, lr=LR[opt], space=space,
                                      optimizer=opt, eps=eps)
        target, _ = gen.targets(x, pred)
        res = gen.generate(x, target=target)
        # Eq. 3 sums over annotated images only; an image without a mask has no "outside"
        outside = (res.change.abs() * (batch["mask"] == 0)).flatten(1).sum(1)[batch["has_mask"]]
        row = {"space": space, "optimizer": opt, "alpha": alpha, "eps": eps, "steps": steps,
               "flip_rate": float(res.flipped.float().mean()),
               "eq3_raw": _stat(outside, torch.mean),
               "eq3_raw_median": _stat(outside, torch.median),
               "eq3_raw_q90": _stat(outside, lambda t: t.quantile(0.9))}
        for name, region in regions.items():
            share = change_in_region(res.change, region)
            row[name] = _stat(share, torch.nanmean)
            row[name + "_positive"] = _stat(share[positive], torch.nanmean)
        # where the largest changes are, ignoring faint spread: of the |mask| most-changed
        # pixels, the share in the mask (a uniform change scores the mask's area, ~0.05)
        rank = rank_accuracy(res.change.abs().sum(1), batch["mask"][:, 0])
        row["rank_mask"] = _stat(rank, torch.nanmean)
        row["rank_mask_positive"] = _stat(rank[positive], torch.nanmean)
        rows.append(row)
        kept_changes[setting_name(space, opt, alpha, eps)] = res.change[:keep].numpy()
    examples = ({"images": x[:keep].numpy(), "masks": batch["mask"][:keep, 0].numpy(),
                 "labels": batch["label"][:keep].tolist(), "changes": kept_changes}
                if keep > 0 else None)
    return {
        "run": str(run), "method": cfg.method, "seed": cfg.seed, "weights": weights,
        "data": str(data_path), "n": len(x),
        "train_accuracy": float((pred == batch["label"]).float().mean()),
        "symbol_swap_changes": float((pred != pred_swapped).float().mean()),
        "symbol_present": bool(((x[:, 0][:, :16, :16] > 0.85).flatten(1).sum(1) >= 8).all()),
        "area": {k: float(v.flatten(1).mean(1).mean()) for k, v in regions.items()},
        "counterfactuals": rows,
        **({"examples": examples} if examples else {}),
    }


def setting_name(space: str, opt: str, alpha: float, eps: float) -> str:
    return f"{space} {opt} α={alpha:g}" + ("" if opt == "ista" else f" ε={eps:g}")


def draw_figure(results: list[dict], path: Path) -> None:
    """Rows: each run's kept images; columns: the input and each setting's signed change."""
    from causalign.report.figures import change_comparison_grid

    images, masks, titles = [], [], []
    changes: dict[str, list[np.ndarray]] = {}
    for r in results:
        ex = r["examples"]
        images.append(ex["images"])
        masks.append(ex["masks"])
        name = r.get("label") or Path(r["run"]).name
        titles += [f"{name}\ny={y}" for y in ex["labels"]]
        for setting, change in ex["changes"].items():
            changes.setdefault(setting, []).append(change)
    change_comparison_grid(np.concatenate(images), {k: np.concatenate(v)
                                                    for k, v in changes.items()},
                           np.concatenate(masks), path, row_titles=titles)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        swap = ("swapping the symbol" if r["symbol_present"]
                else 'drawing a "+" (this data has no symbol)')
        lines += [f"### {r.get('label') or r['run']} ({r['method']}, {r['weights']} weights)",
                  "", f"train accuracy {r['train_accuracy']:.3f}; predictions changed by "
                  f"{swap}: {r['symbol_swap_changes']:.3f}; area of mask / box / corner: "
                  f"{r['area']['mask']:.3f} / {r['area']['box']:.3f} / "
                  f"{r['area']['corner']:.3f}", "",
                  "| space | optimizer | α | ε | flip rate | change in mask | in box | in corner "
                  "| in mask, positives | in box, positives | in corner, positives "
                  "| rank accuracy (mask): all / positives | raw Eq. 3: mean / median / q90 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['space']} | {c['optimizer']} | {c['alpha']} | {c.get('eps', 1e-2):g} | "
                  f"{c['flip_rate']:.2f} | {_fmt(c['mask'])} | {_fmt(c['box'])} | "
                  f"{_fmt(c['corner'])} | {_fmt(c.get('mask_positive'))} | "
                  f"{_fmt(c.get('box_positive'))} | {_fmt(c.get('corner_positive'))} | "
                  f"{_fmt(c.get('rank_mask'))} / {_fmt(c.get('rank_mask_positive'))} | "
                  f"{_fmt(c.get('eq3_raw'), 2)} / "
                  f"{_fmt(c.get('eq3_raw_median'), 2)} / {_fmt(c.get('eq3_raw_q90'), 2)} |"
                  for c in r["counterfactuals"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--weights", choices=["best", "last"], default="best")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--labels", nargs="*", default=[], help="a display name per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cf_localisation.json"))
    ap.add_argument("--append", action="store_true", help="keep the runs already in --out")
    ap.add_argument("--setting", action="append", default=[], type=parse_setting,
                    help="SPACE:OPTIMIZER:ALPHA[:EPS], repeatable; replaces the default grid")
    ap.add_argument("--steps", type=int, default=100, help="search steps from x0")
    ap.add_argument("--figure", type=Path, help="PNG of the change maps, settings side by side")
    ap.add_argument("--figure-n", type=int, default=2, help="images per run in --figure")
    args = ap.parse_args(argv)
    # --steps 0 wrote NaN shares (not JSON) of an unchanged x*; --n 0 and --threads 0 were
    # tracebacks
    for name in ("n", "threads", "steps", "figure_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if len(args.labels) > len(args.runs):  # the extra names were dropped silently
        ap.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    torch.set_num_threads(args.threads)
    kept = []
    if args.append and args.out.exists():
        wanted = {(str(run), args.weights) for run in args.runs}
        kept = [r for r in json.loads(args.out.read_text())["results"]
                if (r["run"], r["weights"]) not in wanted]
    results = []
    for run in args.runs:
        try:  # a missing or foreign run, an unknown space: one line, not a traceback
            results.append(localisation(run, args.weights, args.n, args.setting or SETTINGS,
                                        args.steps, keep=args.figure_n if args.figure else 0))
        except CausalignError as exc:
            raise SystemExit(f"error: {exc}") from None
        if len(args.labels) > len(results) - 1:
            results[-1]["label"] = args.labels[len(results) - 1]
        print(json.dumps({k: v for k, v in results[-1].items()
                          if k not in ("counterfactuals", "examples")}))
    if args.figure:
        draw_figure(results, args.figure)
        print(f"figure: {args.figure}")
    for r in results:
        r.pop("examples", None)
    results = kept + results
    atomic_write_json(args.out, {"results": results})
    atomic_write_text(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
