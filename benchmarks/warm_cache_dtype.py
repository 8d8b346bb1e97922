"""causal-align's warm-start cache in float32 / float16 / bfloat16: bytes and gradient accuracy.

    python benchmarks/warm_cache_dtype.py --seeds 0,1,2 [--dtypes float32,float16,bfloat16]
        [--shape 3,224,224] [--warm-visits 8] [--out FILE.json]

1. **Bytes per row** (exact): `WarmStartCache.nbytes` of a cache holding ``--rows`` rows of
   ``--shape`` (default RGB 224 px) in each dtype, divided by the rows: the offsets plus the
   index tables (row id 8 B, known flag 1 B, id → row 8 B, class target 8 B).
2. **Implicit gradient at fixed θ**: the setting of `bench_causal_align.py` (its `setup`: a
   plus-minus training set at --size px, the seed's CNN after --erm-steps ERM steps; the same
   --align-batch samples, the method's training defaults). One tight reference per seed
   (`reference_grad`: 3 × --ref-steps Adam stages + --ref-polish Gauss-Newton steps + CG to
   1e-8); per dtype the alignment gradient after --warm-visits warm visits whose offsets
   went through a cache of that dtype (`config_grad`), its cosine to the reference
   (``cosine_warm``, as the sweep's) and to float32's warm gradient, and L_align.
   ``float32-jitter`` (a control, in --dtypes): float32 rows, each value multiplied by
   1 + u, u uniform in ±2^-11 (float16's rounding, but random) as it is stored: how far
   the warm gradient moves under any perturbation of that size over the warm visits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import bench_causal_align as sweep
import torch
from bench_causal_align import config_grad, cosine, make_batch, reference_grad, setup

from causalign.explain.counterfactual import WarmStartCache
from causalign.io import atomic_write_json
from causalign.methods import build_method
from causalign.methods.causal_align import CACHE_DTYPES

JITTER = "float32-jitter"


@contextlib.contextmanager
def jittered_puts(seed: int, rel: float = 2.0 ** -11):
    """`WarmStartCache.put` multiplies each stored value by 1 + U(-rel, rel)."""
    g = torch.Generator().manual_seed(seed)
    put = WarmStartCache.put

    def noisy(self, ids, offsets, keep, *args, **kwargs):
        u = (torch.rand(offsets.shape, generator=g) * 2 - 1) * rel
        return put(self, ids, offsets * (1 + u.to(offsets)), keep, *args, **kwargs)

    WarmStartCache.put = noisy
    try:
        yield
    finally:
        WarmStartCache.put = put


def bytes_per_row(shape: tuple[int, ...], rows: int, dtype: str) -> dict:
    cache = WarmStartCache(capacity=rows, dtype=CACHE_DTYPES[dtype])
    x = torch.randn(rows, *shape)
    cache.put(torch.arange(rows), x, torch.ones(rows, dtype=torch.bool),
              target=torch.zeros(rows, dtype=torch.long))
    got, _ = cache.get(torch.arange(rows), x)
    return {"bytes_per_row": cache.nbytes / rows,
            "offset_bytes_per_row": cache.offsets[0].numel() * cache.offsets.element_size(),
            "stored_dtype": str(cache.offsets.dtype),
            # round trip of N(0, 1) rows: the dtype's rounding, relative to the row's norm
            "rel_l2_error_randn": float(((got - x).flatten(1).norm(dim=1)
                                         / x.flatten(1).norm(dim=1)).max()),
            "max_abs_error_randn": float((got - x).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/warm_cache_dtype_2026-12-06/"
                                      "warm_cache_dtype.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--shape", default="3,224,224", help="sample shape of the bytes figure")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--align-batch", type=int, default=16)
    ap.add_argument("--erm-steps", type=int, default=20)
    ap.add_argument("--warm-visits", type=int, default=8)
    ap.add_argument("--ref-steps", type=int, default=300)
    ap.add_argument("--ref-polish", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    dtypes = a.dtypes.split(",")
    bad = [d for d in dtypes if d not in CACHE_DTYPES and d != JITTER]
    if bad:
        ap.error(f"--dtypes: unknown '{bad[0]}'; valid: {', '.join(CACHE_DTYPES)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    shape = tuple(int(s) for s in a.shape.split(","))
    torch.set_num_threads(a.threads)
    sweep.REF_STAGES = tuple((a.ref_steps, lr) for _, lr in sweep.REF_STAGES)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "benchmark": "warm_cache_dtype", "complete": False,
        "settings": {k: v for k, v in sorted(vars(a).items()) if k != "out"},
        "torch": torch.__version__, "machine": platform.machine(), "device": "cpu",
        "bytes": {d: bytes_per_row(shape, a.rows, d) for d in dtypes if d != JITTER},
        "seeds": [],
    }
    print(json.dumps(result["bytes"]), flush=True)
    base = build_method("causal-align").params
    common = dict(align_batch=a.align_batch, normalize=base.normalize)
    for seed in seeds:
        ds, model = setup(a.size, 128, a.erm_steps, seed)
        sub = make_batch(ds, a.align_batch)
        ref, _ = reference_grad({}, model, sub, polish=a.ref_polish)
        row: dict = {"seed": seed}
        grads = {}
        for d in dtypes:
            args = dict(common) if d in ("float32", JITTER) else dict(common, cache_dtype=d)
            torch.manual_seed(seed)
            with jittered_puts(seed) if d == JITTER else contextlib.nullcontext():
                g, parts, _ = config_grad(args, model, sub, a.warm_visits)
            grads[d] = g
            row[d] = {"cosine_warm": cosine(g, ref), "align_warm": parts.get("align"),
                      "flip_rate_warm": parts.get("flip_rate")}
        if "float32" in grads:
            for d in dtypes:
                row[d]["cosine_to_float32_warm"] = cosine(grads[d], grads["float32"])
        result["seeds"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write_json(out, result)
    result["mean_cosine_warm"] = {
        d: sum(r[d]["cosine_warm"] for r in result["seeds"]) / len(result["seeds"])
        for d in dtypes}
    result["complete"] = True
    result["elapsed_s"] = time.perf_counter() - t0
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
