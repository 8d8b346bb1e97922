"""Cost per image of every saliency method relative to one plain gradient map, same process.

    python benchmarks/bench_saliency.py [--models cnn7,resnet18 --batch-size 32 --size 64
                                         --repeats 7 --threads 1 --out benchmarks/results]

For each model (eval mode, random weights: cost does not depend on the weights), every
registered explainer (`causalign.explain.explainer_names()`) and a plain gradient map
(∂z_t/∂x by one backward pass, the unit) are timed round-robin, repeat by repeat, so load
changes on a shared machine hit every method alike; the median over repeats after warm-up is
reported, per image and as a ratio to the gradient map. The methods are called through the
same `get_explainer(name, model).attribute(x, target)` API users call (LRP includes applying
and removing zennit's composite and canonizer each call; Captum methods include Captum's
wrapping). Quality bar (DESIGN.md): WBP ≤ 1.5× one gradient map.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from causalign.errors import unknown_name
from causalign.explain import explainer_names, get_explainer
from causalign.io import atomic_write_json
from causalign.models import MODEL_NAMES, build_model


def gradient_map(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """One plain gradient map: ∂z_target/∂x by a single backward pass."""
    xg = x.detach().requires_grad_(True)
    score = model(xg).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, xg)
    return grad


def bench_model(model: nn.Module, x: Tensor, target: Tensor, names: list[str], repeats: int,
                warmup: int) -> dict:
    fns = {"gradient_map (unit)": lambda: gradient_map(model, x, target)}
    for name in names:
        explainer = get_explainer(name, model)
        fns[name] = (lambda e=explainer: e.attribute(x, target=target))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
    unit = statistics.median(times["gradient_map (unit)"])
    n = x.shape[0]
    return {
        key: {"seconds_per_image": statistics.median(ts) / n,
              "ratio_to_gradient_map": statistics.median(ts) / unit,
              "spread": [min(ts) / n, max(ts) / n]}
        for key, ts in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn7,resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    names = explainer_names()
    result = {
        "benchmark": "saliency_cost", "device": str(device), "threads": args.threads,
        "torch": str(torch.__version__), "cpu": platform.processor() or platform.machine(),
        "batch_size": args.batch_size, "size": args.size, "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median over repeats of seconds per image; ratio = median batch time / "
                     "median batch time of one plain gradient map",
        "models": {},
    }
    for name in args.models.split(","):
        if name not in MODEL_NAMES:  # was a traceback
            ap.error(str(unknown_name("model", name, MODEL_NAMES)))
    for name in args.models.split(","):
        model = build_model(name, 1, 2).to(device).eval()
        x = torch.rand(args.batch_size, 1, args.size, args.size, device=device)
        target = torch.randint(0, 2, (args.batch_size,), device=device)
        result["models"][name] = bench_model(model, x, target, names, args.repeats, args.warmup)
        print(name, json.dumps({k: round(v["ratio_to_gradient_map"], 3)
                                for k, v in result["models"][name].items()}), flush=True)
    result["wbp_ratio_max"] = max(m["wbp"]["ratio_to_gradient_map"]
                                  for m in result["models"].values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "saliency_cost.json", result)
    print(f"wrote {out / 'saliency_cost.json'}")


if __name__ == "__main__":
    main()
