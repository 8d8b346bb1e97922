"""causal-align step time against ERM for several inner searches, stored (the README's table).

    python benchmarks/causal_align_step_table.py [--threads 2] [--rounds 2] [--steps 10]
        [--configs default,newton5,newton7,newton10] [--profile-threads 1,2]
        [--out benchmarks/results/causal_align_step_table.json]

Each configuration is `causalign bench step --method causal-align --steps S --threads T
[--set …]` (ERM timed in the same process, on the same batch). Configurations alternate
round by round, so load on a shared machine hits all of them; the JSON keeps every run
(``runs``) and the per-configuration median and range. ``--profile-threads`` adds, per thread count,
one ``--profile`` run of the default: milliseconds per step in the counterfactual search,
the implicit gradient's parts and the rest of the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from causalign.engine.bench import bench_step
from causalign.io import atomic_write_json

CONFIGS: dict[str, dict] = {
    "default": {},  # Adam K = 10, CG auto (3 on binary data)
    "newton3": {"inner_optimizer": "newton", "steps": 3},
    "newton5": {"inner_optimizer": "newton", "steps": 5},
    "newton7": {"inner_optimizer": "newton", "steps": 7},
    "newton10": {"inner_optimizer": "newton", "steps": 10},
    "adam40": {"steps": 40},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--configs", default="default,newton5,newton7,newton10")
    ap.add_argument("--profile-threads", default="1,2",
                    help="thread counts of the profiled default run ('' for none)")
    ap.add_argument("--out", default="benchmarks/results/causal_align_step_table.json")
    a = ap.parse_args(argv)
    names = [c for c in a.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        ap.error(f"--configs: unknown '{unknown[0] if unknown else ''}'; valid: "
                 f"{', '.join(CONFIGS)}")
    for name in ("threads", "rounds", "steps", "size", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    try:
        profile_threads = [int(t) for t in a.profile_threads.split(",") if t]
    except ValueError:
        ap.error(f"--profile-threads must be integers, got '{a.profile_threads}'")
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    runs = []
    for r in range(a.rounds):
        for name in names:
            res = bench_step("causal-align", size=a.size, batch_size=a.batch_size,
                             steps=a.steps, method_args=CONFIGS[name])
            runs.append({"config": name, "round": r, **res})
            print(f"{name} round {r}: {res['ratio_to_erm']:.2f}x ERM", flush=True)
    summary = {}
    for name in names:
        ratios = [x["ratio_to_erm"] for x in runs if x["config"] == name]
        # the median: one run can catch a load spike on a shared machine
        summary[name] = {"method_args": CONFIGS[name], "ratios": ratios,
                         "median": statistics.median(ratios), "min": min(ratios),
                         "max": max(ratios)}
    profiles = []
    for threads in profile_threads:
        torch.set_num_threads(threads)
        res = bench_step("causal-align", size=a.size, batch_size=a.batch_size, steps=a.steps,
                         profile=True)
        profiles.append(res)
        print(f"profile, {threads} thread(s): {res['profile_ms_per_step']}", flush=True)
    result = {"benchmark": "causal_align_step_table", "threads": a.threads,
              "rounds": a.rounds, "steps": a.steps, "size": a.size,
              "batch_size": a.batch_size, "torch": torch.__version__, "summary": summary,
              "runs": runs, "profiles": profiles, "elapsed_s": time.perf_counter() - t_start}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
