"""Evaluation hot path: the fused pass of `evaluate_split` against the straightforward one it
replaced, in one process, interleaved, on the same model and split; writes JSON.

    python benchmarks/bench_eval_hotpath.py --out benchmarks/results/eval_hotpath.json

"before" is the evaluation as written until the fused pass (kept here verbatim in behaviour):
a prediction pass over the split, then per batch the prediction again, Grad-CAM's own
forward and deletion's own baseline forward — 4 + len(fractions) model runs per batch.
"after" is `causalign.engine.evaluate.evaluate_split`: 1 + len(fractions). Both give the same
numbers (tests/test_hotpaths.py); here the largest difference is reported too. Timings are
minima over interleaved repeats (the machine is shared; the minimum is the least disturbed),
of wall-clock and of this process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine.evaluate import evaluate_split, iterate_batches
from causalign.errors import unknown_name
from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.io import atomic_write_json
from causalign.methods import build_method
from causalign.metrics import (
    DELETION_FRACTIONS,
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
)
from causalign.models import build_model


def before_evaluate(model, method, ds, device, saliency="gradcam",
                    fractions=DELETION_FRACTIONS, batch_size=128) -> dict:
    """The evaluation before the fused pass (same metrics, extra model runs)."""
    model.eval()
    probs, labels, loss = [], [], 0.0
    with torch.no_grad():
        for b in iterate_batches(ds, 256, device=device):
            logits = model(method.model_input(b)).float()
            loss += float(F.cross_entropy(logits, b["label"], reduction="sum"))
            probs.append(logits.softmax(1).cpu())
            labels.append(b["label"].cpu())
    out = classification_metrics(torch.cat(probs).numpy(), torch.cat(labels).numpy())
    out["loss"] = loss / len(ds)
    explainer = get_explainer(saliency, model)
    parts: dict[str, list] = {k: [] for k in ("box", "mask", "mass", "iou", "dice", "empty")}
    dele: dict[float, list] = {f: [] for f in fractions}
    for b in iterate_batches(ds, batch_size, device=device):
        x = method.model_input(b)
        with torch.no_grad():
            pred = model(x).argmax(1)
        maps = saliency_map(explainer.attribute(x, target=pred)).detach().float()
        if maps.dim() == b["mask"].dim():
            maps = maps[:, 0]
        ann, hm = b["has_annotation"], b["has_mask"]
        box, mask = b["box_mask"][:, 0], b["mask"][:, 0]
        if ann.any():
            parts["box"].append(cam_precision(maps[ann], box[ann]).cpu())
            parts["empty"].append(normalize_maps(maps[ann])[1].cpu())
        if hm.any():
            parts["mask"].append(cam_precision(maps[hm], mask[hm]).cpu())
            parts["mass"].append(mass_in_mask(maps[hm], mask[hm]).cpu())
            i, d = iou_dice(maps[hm], mask[hm])
            parts["iou"].append(i.cpu())
            parts["dice"].append(d.cpu())
        for f, drop in deletion_scores(model, x, maps, pred, fractions).items():
            dele[f].append(drop.cpu())

    def mean(p):
        return float(torch.cat(p).float().mean()) if p else None

    out.update({"cam_precision": mean(parts["box"]), "cam_precision_mask": mean(parts["mask"]),
                "cam_mass_in_mask": mean(parts["mass"]), "saliency_iou": mean(parts["iou"]),
                "saliency_dice": mean(parts["dice"]), "cam_empty_fraction": mean(parts["empty"]),
                "deletion": {f"{f:g}": mean(v) for f, v in dele.items()}})
    return out


def _max_diff(a: dict, b: dict) -> float:
    diffs = []
    for k, v in a.items():
        if isinstance(v, dict):
            diffs.append(_max_diff(v, b[k]))
        elif isinstance(v, float):
            diffs.append(abs(v - b[k]))
    return max(diffs, default=0.0)


def _forwards(model, fn) -> int:
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/eval_hotpath.json")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=256, help="test images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--saliency", default="gradcam")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.saliency not in explainer_names():  # was a traceback after making the data
        ap.error(str(unknown_name("saliency method", args.saliency, explainer_names())))
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "d", SynthConfig(n_train=8, n_val=8, n_test=args.n, size=args.size))
        ds = LesionDataset(Path(tmp) / "d", "test")
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2).to(dev).eval()
    method = build_method("erm")

    def before():
        return before_evaluate(model, method, ds, dev, saliency=args.saliency)

    def after():
        return evaluate_split(model, method, ds, dev, saliency=args.saliency)

    ref, new = before(), after()  # warm-up, and the numbers to compare
    times: dict[str, list[float]] = {"predict": [], "before": [], "after": []}
    cpu: dict[str, list[float]] = {"predict": [], "before": [], "after": []}

    def predict():
        with torch.no_grad():
            for b in iterate_batches(ds, 256, device=dev):
                model(method.model_input(b)).argmax(1).cpu()

    for _ in range(args.repeats):
        for name, fn in (("predict", predict), ("before", before), ("after", after)):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    result = {
        "images": len(ds), "size": args.size, "saliency": args.saliency,
        "fractions": list(DELETION_FRACTIONS), "device": str(dev),
        "threads": torch.get_num_threads(), "torch": str(torch.__version__),
        "repeats": args.repeats,
        # model forward calls over the whole split (batches of 128; prediction pass: 256)
        "model_runs": {"before": _forwards(model, before), "after": _forwards(model, after)},
        "seconds_min": best,
        "seconds_median": {k: statistics.median(v) for k, v in times.items()},
        "ms_per_image": {k: 1000 * v / len(ds) for k, v in best.items()},
        "before_over_after": best["before"] / best["after"],
        # CPU time of this process: less disturbed by other processes on a shared machine
        "cpu_seconds_min": best_cpu,
        "cpu_before_over_after": best_cpu["before"] / best_cpu["after"],
        "over_predict": {"before": best["before"] / best["predict"],
                         "after": best["after"] / best["predict"]},
        "max_abs_metric_difference": _max_diff(ref, new),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
