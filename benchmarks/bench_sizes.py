"""Realistic image sizes on the CPU: training-step cost of each method relative to ERM, and
where evaluation / explanation time goes, at several image sizes; writes JSON.

    python benchmarks/bench_sizes.py [--models cnn7,resnet18 --sizes 64,128,224
        --methods erm,causal-align,rrr,cdep,chang,ppi --threads 1
        --out benchmarks/results/bench_sizes.json]

Users bring BUSI / CBIS-DDSM crops at 128-256 px, not the 64 px benchmark; this answers
whether any method's cost or memory grows with the image side faster than ERM's.

* step: each method's training step (forward, loss, backward, Adam step) on one synthetic
  batch (`causalign.engine.bench.synthetic_batch`), timed against ERM on the same batch, model
  and size. Each (model, size, method) runs in a forked child so its peak RSS is its own:
  ``extra_peak_rss_mb`` is the child's peak RSS minus its RSS when forked (the interpreter,
  torch and the batch). Reported: median wall and process-CPU seconds over --steps after
  --warmup, the CPU-time ratio to ERM (robust on a shared machine), and the extra peak RSS.
  A method that refuses a model (cdep on ResNet) records its one-line error.
* eval: `evaluate_split` (Grad-CAM) on --eval-n synthetic test images with a randomly
  initialised model (cost does not depend on the weights), in the CPU's batches
  (``batch_size``, capped by EVAL_VALUES_PER_BATCH_CPU) and again in the GPU's
  (``batch_size_gpu_cap``: what the CPU used before that cap), then each phase alone as
  evaluation runs it: prediction (`predict`), each --saliency method's
  `predict_and_attribute`, deletion (`deletion_scores`) and the CAM metrics (cam_precision,
  mass, IoU/Dice). ``deletion_forwards_per_batch`` counts the model calls of the deletion
  phase per batch: it must equal the number of fractions, not grow with the pixels.
* explain: `export_saliency` (what `causalign explain` runs: maps, .npy files and overlay
  PNGs) for gradcam; compare with the gradcam saliency phase to see the writing's share.

Timings are process CPU time unless named ``wall``: the machine this ran on is shared.
``--skip step`` or ``--skip eval`` runs one part.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import causalign.engine.evaluate as ev
from causalign.data.format import LesionDataset
from causalign.data.synth import SynthConfig, generate
from causalign.engine.bench import synthetic_batch
from causalign.engine.config import TrainConfig
from causalign.engine.evaluate import eval_batch_size, evaluate_split, iterate_batches, predict
from causalign.errors import CausalignError, unknown_name
from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.explain.export import export_saliency
from causalign.io import atomic_write_json
from causalign.methods import build_method, method_names
from causalign.methods.base import DataInfo
from causalign.metrics import (
    DELETION_FRACTIONS,
    cam_precision,
    deletion_scores,
    iou_dice,
    mass_in_mask,
)
from causalign.models import MODEL_NAMES


def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _step_child(conn, method_name: str, model_name: str, size: int, batch_size: int,
                steps: int, warmup: int) -> None:
    """In a forked child: time `steps` training steps, send (wall, cpu, extra peak RSS)."""
    try:
        _malloc_trim()  # the parent's freed heap would be reused without counting
        base = _rss_mb()
        cfg = TrainConfig(method=method_name, model=model_name)
        info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, size, size),
                        attributes=[f"a{i}" for i in range(6)])
        batch = synthetic_batch(batch_size, size)
        method = build_method(method_name, {})
        model = method.build_model(cfg, info)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        walls, cpus = [], []
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = method(model, batch)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()
            if i >= warmup:
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        conn.send({"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                   "extra_peak_rss_mb": round(_peak_rss_mb() - base, 1)})
    except CausalignError as exc:  # a method that refuses the model: its one line
        conn.send({"error": str(exc)})
    finally:
        conn.close()


def _warm_step(model_name: str) -> None:
    """One ERM step at 32 px in this process (pages the children then share)."""
    parent, child = mp.Pipe(duplex=False)
    _step_child(child, "erm", model_name, 32, 2, 1, 0)
    parent.recv()


def bench_step(method: str, model: str, size: int, batch_size: int, steps: int,
               warmup: int) -> dict:
    ctx = mp.get_context("fork")  # torch is imported already: a fork starts in milliseconds
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_step_child,
                       args=(child, method, model, size, batch_size, steps, warmup))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        result = {"error": f"child exited with code {proc.exitcode}"}
    proc.join()
    return result


def _timed(fn):
    """(result, process-CPU seconds) of fn()."""
    c0 = time.process_time()
    out = fn()
    return out, time.process_time() - c0


class _CountCalls:
    """Counts forward calls of a model (a forward pre-hook, removed by `close`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def bench_eval(model_name: str, size: int, n: int, saliencies: list[str], tmp: Path) -> dict:
    data = tmp / f"data{size}"
    if not data.exists():
        generate(data, SynthConfig(n_train=4, n_val=4, n_test=n, size=size, seed=0))
    ds = LesionDataset(data, "test")
    method = build_method("erm", {})
    torch.manual_seed(0)
    info = DataInfo(in_channels=1, num_classes=2, image_shape=tuple(ds.image_shape),
                    attributes=list(ds.meta.attributes))
    model = method.build_model(TrainConfig(method="erm", model=model_name), info).eval()
    out: dict = {"n": len(ds), "batch_size": eval_batch_size(ds, 128, "cpu")}
    # untimed: first calls import Captum / zennit and build their wrappers
    x1 = method.model_input(ds.batch(torch.arange(1)))
    for name in {"gradcam", *saliencies}:
        get_explainer(name, model).predict_and_attribute(x1)
    t0 = time.perf_counter()
    _, out["evaluate_split_gradcam_cpu_s"] = _timed(
        lambda: evaluate_split(model, method, ds, "cpu", saliency="gradcam"))
    out["evaluate_split_gradcam_wall_s"] = time.perf_counter() - t0
    # the same with the GPU's batch cap (what the CPU ran before EVAL_VALUES_PER_BATCH_CPU)
    cpu_cap = ev.EVAL_VALUES_PER_BATCH_CPU
    ev.EVAL_VALUES_PER_BATCH_CPU = ev.EVAL_VALUES_PER_BATCH
    try:
        out["batch_size_gpu_cap"] = eval_batch_size(ds, 128, "cpu")
        _, out["evaluate_split_gradcam_gpu_cap_cpu_s"] = _timed(
            lambda: evaluate_split(model, method, ds, "cpu", saliency="gradcam"))
    finally:
        ev.EVAL_VALUES_PER_BATCH_CPU = cpu_cap
    _, out["predict_cpu_s"] = _timed(lambda: predict(model, method, ds, "cpu"))
    phases: dict[str, float] = {f"saliency_{s}": 0.0 for s in saliencies}
    phases.update({"deletion": 0.0, "cam_metrics": 0.0})
    forwards = []
    for batch in iterate_batches(ds, eval_batch_size(ds, 128, "cpu")):
        x = method.model_input(batch)
        gradcam = None
        for name in saliencies:
            explainer = get_explainer(name, model)
            c0 = time.process_time()
            logits, maps = explainer.predict_and_attribute(x)
            phases[f"saliency_{name}"] += time.process_time() - c0
            if name == "gradcam":
                gradcam = (logits, maps)
        if gradcam is None:
            gradcam = get_explainer("gradcam", model).predict_and_attribute(x)
        logits, maps = gradcam
        maps = saliency_map(maps)  # (N, H, W), as evaluation reduces it
        box, mask = batch["box_mask"][:, 0], batch["mask"][:, 0]
        counter = _CountCalls(model)
        c0 = time.process_time()
        try:
            deletion_scores(model, x, maps, logits.argmax(1), DELETION_FRACTIONS, logits=logits)
        finally:
            counter.close()
        phases["deletion"] += time.process_time() - c0
        forwards.append(counter.n)
        c0 = time.process_time()
        cam_precision(maps, box)
        cam_precision(maps, mask)
        mass_in_mask(maps, mask)
        iou_dice(maps, mask)
        phases["cam_metrics"] += time.process_time() - c0
    out["phases_cpu_s"] = phases
    out["deletion_forwards_per_batch"] = forwards
    out["deletion_fractions"] = len(DELETION_FRACTIONS)
    # explain: maps + .npy + overlay PNGs for gradcam, and the maps alone
    (_, t_export) = _timed(lambda: export_saliency(model, method, ds, "gradcam",
                                                   tmp / f"explain{size}", limit=n))
    out["explain_gradcam_export_cpu_s"] = t_export
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn7,resnet18")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--methods", default="erm,causal-align,rrr,cdep,chang,ppi")
    ap.add_argument("--step-batch", type=int, default=4, help="images per training step")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=24, help="test images for evaluation")
    ap.add_argument("--saliency", default="gradcam,wbp,gradient,lrp-epsilon",
                    help="saliency methods timed in the evaluation phases")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: step,eval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sizes.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    models = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    if "erm" not in methods:
        methods = ["erm", *methods]
    saliencies = args.saliency.split(",")
    # an unknown name was recorded as that row's "error" and the script exited 0 with a
    # result that looked measured; a refusal of a *known* method (cdep on ResNet) still is
    for kind, names, valid in (("model", models, MODEL_NAMES), ("method", methods, method_names()),
                               ("saliency method", saliencies, explainer_names())):
        for n in names:
            if n not in valid:
                ap.error(str(unknown_name(kind, n, valid)))
    result: dict = {
        "benchmark": "bench_sizes", "device": "cpu", "threads": args.threads,
        "torch": str(torch.__version__), "cpu": platform.processor() or platform.machine(),
        "step_batch": args.step_batch, "steps": args.steps, "warmup": args.warmup,
        "eval_n": args.eval_n, "statistic": "process CPU seconds (median over steps); "
        "ratio = method CPU s / ERM CPU s, same model, size and batch", "models": {},
    }
    start = time.perf_counter()
    if "step" not in skip:
        # untimed, before any fork: the first step loads kernels and libraries that would
        # otherwise count in the first child's peak RSS
        _warm_step(models[0])
    for model in models:  # every step first: the evaluations grow this process's heap
        result["models"][model] = {str(size): {} for size in sizes}
        for size in sizes if "step" not in skip else []:
            step = {m: bench_step(m, model, size, args.step_batch, args.steps, args.warmup)
                    for m in methods}
            erm = step["erm"].get("cpu_s")
            for r in step.values():
                if erm and "cpu_s" in r:
                    r["ratio_to_erm"] = round(r["cpu_s"] / erm, 3)
            result["models"][model][str(size)]["step"] = step
            print(model, size, "step ratios",
                  {m: r.get("ratio_to_erm", "error") for m, r in step.items()}, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_sizes_") as tmp:
        for model in models:
            for size in sizes if "eval" not in skip else []:
                row = bench_eval(model, size, args.eval_n, saliencies, Path(tmp))
                result["models"][model][str(size)]["eval"] = row
                print(model, size, "eval", {k: round(v, 3) for k, v in
                                            row["phases_cpu_s"].items()}, flush=True)
    result["total_wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out} in {result['total_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
