"""GPU throughput and peak memory of one training step: ERM, PPI and causal-align, float32
and bf16 autocast (`--set amp=true`), plus torch.compile for ERM.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json [--size 128 --batch-size 64]

Needs CUDA: without it the script prints why it skipped and exits 0 without writing (the CPU
figures are in bench_erm.py / bench_memory.py). Every variant runs in this one process, same
batch; images/s = batch / median step time over `--steps` after `--warmup`; peak memory is
`torch.cuda.max_memory_allocated` over the timed steps. A variant that fails (out of memory,
compile error) is recorded with its error and the rest still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from causalign.engine.bench import synthetic_batch
from causalign.engine.config import TrainConfig
from causalign.errors import unknown_name
from causalign.io import atomic_write_json
from causalign.methods import build_method, method_names
from causalign.methods.base import DataInfo
from causalign.models import MODEL_NAMES


def run_variant(method_name: str, *, size: int, batch_size: int, steps: int, warmup: int,
                amp: bool, compile_model: bool, model_name: str, device: torch.device) -> dict:
    method = build_method(method_name)
    cfg = TrainConfig(method=method_name, model=model_name)
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, size, size),
                    attributes=[f"a{i}" for i in range(6)])
    model = method.build_model(cfg, info).to(device).train()
    call_model = model
    if compile_model:
        if not method.plain_forward:
            return {"skipped": "torch.compile applies to plain-forward methods only"}
        call_model = torch.compile(model)
    method.amp_dtype = torch.bfloat16 if amp else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = synthetic_batch(batch_size, size, device=device)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and method.plain_forward
           else contextlib.nullcontext())
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with ctx:
            out = method(call_model, batch)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"seconds_per_step": sec, "images_per_second": batch_size / sec,
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "amp_applies_to": "whole loss" if method.plain_forward
            else "the method's classifier_autocast regions (float32 inner loop/CG/saliency)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--methods", default="erm,ppi,causal-align")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="cnn7")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    # checked before the CUDA check: a typo must not read as 'skipped' (exit 0) here and
    # as a row of errors on the GPU machine
    for m in (m.strip() for m in args.methods.split(",") if m.strip()):
        if m not in method_names():
            ap.error(str(unknown_name("method", m, method_names())))
    if args.model not in MODEL_NAMES:
        ap.error(str(unknown_name("model", args.model, MODEL_NAMES)))
    if not torch.cuda.is_available():
        print("bench_gpu: skipped, no CUDA device (torch.cuda.is_available() is False); "
              "CPU step timings: benchmarks/bench_erm.py, memory: benchmarks/bench_memory.py",
              file=sys.stderr)
        return 0
    device = torch.device("cuda")
    results = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for amp, comp in ((False, False), (True, False), (False, True)):
            if comp and name != "erm":
                continue
            entry = {"method": name, "amp": amp, "compile": comp}
            try:
                entry.update(run_variant(name, size=args.size, batch_size=args.batch_size,
                                         steps=args.steps, warmup=args.warmup, amp=amp,
                                         compile_model=comp, model_name=args.model,
                                         device=device))
            except Exception as exc:  # OOM, compile failure: record it, keep going
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
            print(json.dumps(entry), file=sys.stderr)
            results.append(entry)
    erm = next((r for r in results if r["method"] == "erm" and not r["amp"]
                and not r["compile"] and "seconds_per_step" in r), None)
    for r in results:
        if erm is not None and "seconds_per_step" in r:
            r["ratio_to_erm_fp32"] = r["seconds_per_step"] / erm["seconds_per_step"]
    report = {"device": torch.cuda.get_device_name(device), "torch": str(torch.__version__),
              "size": args.size, "batch_size": args.batch_size, "model": args.model,
              "steps": args.steps, "warmup": args.warmup, "results": results}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
