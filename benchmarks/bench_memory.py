"""Peak memory of one training step per method at two image sizes, and the largest batch
that fits a stated memory budget.

    python benchmarks/bench_memory.py --out benchmarks/results/memory.json \
        [--methods erm,ppi,causal-align --sizes 32,64 --batches 8,32 --budget-mib 1024]

What is measured: the memory a step (forward, the method's extra passes, backward, Adam)
needs on top of the model, optimizer state and batch already in memory.

* CUDA: `torch.cuda.max_memory_allocated` minus the allocation before the step.
* CPU: the peak resident set size of the step (Linux VmHWM, reset through
  /proc/self/clear_refs just before the step) minus the RSS before it. Each measurement runs
  in a fresh process, because the allocator keeps freed memory and would hide the next
  step's peak; a first step on a batch of one loads the kernels' code beforehand.

Largest batch (at the larger size): memory grows about linearly in the batch, so a secant
search from the two `--batches` predicts the batch that meets the budget, measures it, and
refines (up to 4 rounds, or until a measured batch is within 5 % below the budget); the
largest *measured* batch under the budget is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_one(method_name: str, size: int, batch_size: int, device: str) -> dict:
    """Peak extra memory (MiB) of one training step, in this process."""
    from causalign.engine.bench import synthetic_batch
    from causalign.engine.config import TrainConfig
    from causalign.methods import build_method
    from causalign.methods.base import DataInfo

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    dev = torch.device(device)
    method = build_method(method_name)
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, size, size),
                    attributes=[f"a{i}" for i in range(6)])
    model = method.build_model(TrainConfig(method=method_name), info).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch) -> None:
        out = method(model, batch)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()

    step(synthetic_batch(2, size, device=dev, seed=1))  # kernels loaded, Adam state built
    batch = synthetic_batch(batch_size, size, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step(batch)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        kind = "cuda max_memory_allocated"
    else:
        before = _rss_kib()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        step(batch)
        peak = (_hwm_kib() - before) * 1024
        kind = "cpu peak RSS (VmHWM) increase"
    return {"method": method_name, "size": size, "batch_size": batch_size,
            "peak_step_mib": peak / 2**20, "measure": kind, "device": str(dev)}


def measure(method: str, size: int, batch: int, device: str) -> dict:
    if device.startswith("cuda"):
        return measure_one(method, size, batch, device)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--one", method, str(size), str(batch),
                          device], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:  # a failing configuration is recorded, the rest still run
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "size": size, "batch_size": batch, "error": tail[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(method: str, size: int, device: str, budget: float,
                  points: list[tuple[int, float]], rounds: int = 4) -> dict:
    """Secant search for the largest batch whose step peak fits ``budget`` (MiB): a line
    through the two measurements nearest the budget predicts the batch, which is measured
    and joins the points (peak memory is close to linear in the batch, slightly concave)."""
    best = max((b for b, m in points if m <= budget), default=None)
    tried = []
    for _ in range(rounds):
        pts = sorted(points, key=lambda p: abs(p[1] - budget))[:2]
        (b1, m1), (b2, m2) = sorted(pts)
        if b1 == b2 or m2 <= m1:
            break
        slope = (m2 - m1) / (b2 - b1)
        pred = int(b1 + (budget - m1) / slope)
        if pred < 1 or any(pred == b for b, _ in points):
            break
        r = measure(method, size, pred, device)
        if "peak_step_mib" not in r:
            tried.append({"batch_size": pred, "error": r.get("error")})
            break
        points.append((pred, r["peak_step_mib"]))
        tried.append({"batch_size": pred, "peak_step_mib": r["peak_step_mib"]})
        if r["peak_step_mib"] <= budget:
            best = max(best or 0, pred)
            if (budget - r["peak_step_mib"]) / budget < 0.05:  # within 5 % of the budget
                break
    first = sorted(points)[:2]
    (b1, m1), (b2, m2) = first
    return {"method": method, "size": size, "budget_mib": budget,
            "per_image_mib_small_batches": (m2 - m1) / (b2 - b1),
            "largest_batch_measured_to_fit": best, "search": tried}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--methods", default="erm,ppi,causal-align")
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--budget-mib", type=float, default=1024.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--one", nargs=4, metavar=("METHOD", "SIZE", "BATCH", "DEVICE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m, s, b, d = args.one
        print(json.dumps(measure_one(m, int(s), int(b), d)))
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from causalign.errors import unknown_name  # not at import: --one measures a bare process
    from causalign.methods import method_names

    for m in methods:  # was measured in every child, recorded as "error", and exit 0
        if m not in method_names():
            ap.error(str(unknown_name("method", m, method_names())))
    sizes = [int(s) for s in args.sizes.split(",")]
    b_lo, b_hi = (int(b) for b in args.batches.split(","))
    rows, fits = [], []
    for method in methods:
        for size in sizes:
            for b in (b_lo, b_hi):
                r = measure(method, size, b, device)
                print(json.dumps(r), file=sys.stderr)
                rows.append(r)
        size = sizes[-1]
        lo, hi = (next((r for r in rows if r["method"] == method and r["size"] == size
                        and r["batch_size"] == b and "peak_step_mib" in r), None)
                  for b in (b_lo, b_hi))
        if lo is None or hi is None:
            fits.append({"method": method, "size": size, "error": "measurement failed"})
            continue
        fit = largest_batch(method, size, device, args.budget_mib,
                            [(b_lo, lo["peak_step_mib"]), (b_hi, hi["peak_step_mib"])])
        fits.append(fit)
        print(json.dumps(fit), file=sys.stderr)
    report = {"device": device if device == "cpu" else torch.cuda.get_device_name(),
              "torch": str(torch.__version__), "model": "cnn7 (width 16)",
              "threads": int(os.environ.get("BENCH_THREADS", "1")),
              "method_settings": "defaults", "steps": rows, "largest_batch": fits}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from causalign.io import atomic_write_json

    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
