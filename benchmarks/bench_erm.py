"""Time an ERM training step and an evaluation pass (CPU or CUDA), write JSON.

    python benchmarks/bench_erm.py --out benchmarks/results/erm.json

Both timings come from this one process; medians over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine.bench import bench_step
from causalign.engine.evaluate import evaluate_split, quick_metrics
from causalign.errors import CausalignError
from causalign.io import atomic_write_json
from causalign.methods import build_method
from causalign.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/erm.json")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    try:  # --device bogus (or cuda without CUDA): one line, not a traceback
        step = bench_step("erm", size=args.size, batch_size=args.batch_size, steps=10,
                          warmup=3, device=args.device)
    except CausalignError as exc:
        raise SystemExit(f"error: {exc}") from None
    dev = torch.device(step["device"])
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "d", SynthConfig(n_train=8, n_val=8, n_test=256, size=args.size))
        test = LesionDataset(Path(tmp) / "d", "test")
        model = build_model("cnn7", 1, 2).to(dev).eval()
        method = build_method("erm")
        quick, full = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            quick_metrics(model, method, test, dev)
            quick.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            evaluate_split(model, method, test, dev)
            full.append(time.perf_counter() - t0)
    result = {
        "erm_step": step,
        "eval_images": len(test),
        "predict_seconds": statistics.median(quick),
        "full_eval_seconds": statistics.median(full),
        "full_eval_ms_per_image": 1000 * statistics.median(full) / len(test),
        "full_eval_over_predict": statistics.median(full) / statistics.median(quick),
        "note": "full eval = prediction + Grad-CAM + localisation + deletion at 5 fractions",
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
