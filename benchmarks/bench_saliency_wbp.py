"""WBP saliency vs one plain gradient map, timed in the same process.

    python benchmarks/bench_saliency_wbp.py [--batch-size 32 --size 64 --repeats 10]

Models: the seed's 7-layer CNN shape (ReLU), the same with GELU (where the rescale hooks do
work), and torchvision resnet18 — eval mode, random weights, CPU by default. The two methods
are timed alternately, repeat by repeat, so load changes on a shared machine hit both; the
median of the repeats after warm-up is reported (one intra-op thread unless --threads says
otherwise). Quality bar (DESIGN.md): WBP ≤ 1.5× gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from causalign.explain.wbp import WBP
from causalign.io import atomic_write_json


def small_cnn(act: type[nn.Module] = nn.ReLU, in_channels: int = 1) -> nn.Sequential:
    """Conv-BN-act ×2, pool, ×2, pool, ×2, global average pool, linear (7 weight layers)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), act()]

    return nn.Sequential(
        *block(in_channels, 16), *block(16, 16), nn.MaxPool2d(2),
        *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )


def gradient_map(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """One plain gradient map: ∂z_target/∂x by a single backward pass."""
    xg = x.detach().requires_grad_(True)
    score = model(xg).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, xg)
    return grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(
    fns: dict[str, Callable[[], Tensor]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed alternately."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); 1 by default because "
                        "on a shared CPU spinning threads make timings erratic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "saliency_wbp.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    models: dict[str, tuple[nn.Module, int]] = {
        "small_cnn_relu": (small_cnn(nn.ReLU), 1),
        "small_cnn_gelu": (small_cnn(nn.GELU), 1),
        "resnet18": (torchvision.models.resnet18(weights=None, num_classes=2), 3),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (model, channels) in models.items():
        model = model.to(device).eval()
        x = torch.randn(args.batch_size, channels, args.size, args.size, device=device)
        target = torch.randint(0, 2, (args.batch_size,), device=device)
        explainer = WBP(model)
        secs = time_pair(
            {
                "gradient": lambda m=model, x=x, t=target: gradient_map(m, x, t),
                "wbp": lambda e=explainer, x=x, t=target: e.attribute(x, t),
            },
            device, args.repeats, args.warmup,
        )
        results[name] = {
            "gradient_seconds": secs["gradient"],
            "wbp_seconds": secs["wbp"],
            "ratio_to_gradient": secs["wbp"] / secs["gradient"],
        }

    report = {
        "benchmark": "saliency_wbp",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "size": args.size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median seconds per map (whole batch)",
        "models": results,
        "max_ratio_to_gradient": max(r["ratio_to_gradient"] for r in results.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
