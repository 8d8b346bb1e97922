"""causal-align step time against ERM for several inner searches, stored (the README's table).

    python benchmarks/causal_align_step_table.py [--threads 2] [--rounds 2] [--steps 10]
        [--configs default,newton5,newton7,newton10] [--profile-threads 1,2]
        [--model cnn7 --depth 1] [--set key=value ...]
        [--out benchmarks/results/causal_align_step_table.json]

Each configuration is `causalign bench step --method causal-align --steps S --threads T
[--set …]` (ERM timed in the same process, on the same batch). Configurations alternate
round by round, so load on a shared machine hits all of them; the JSON keeps every run
(``runs``) and the per-configuration median and range; it is rewritten after every run
(``"complete": false`` until the end), so an interrupt keeps the finished runs.
``--profile-threads`` adds, per thread count, one ``--profile`` run of the first
configuration (``--profile-all``: of each): milliseconds per step in the counterfactual
search, the implicit gradient's parts and the rest of the step. ``--model multiview
--depth 8`` times volumes; ``--set`` settings apply to every configuration
(``--set space=latent --set distance=l2``: the latent space).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from causalign.engine.bench import bench_step
from causalign.engine.config import parse_set
from causalign.errors import CausalignError, ConfigError
from causalign.io import atomic_write_json
from causalign.methods.base import build_method
from causalign.models import MODEL_NAMES, VOLUME_MODELS

CONFIGS: dict[str, dict] = {
    "default": {},  # Adam K = 10, CG auto (3 on binary data)
    "newton3": {"inner_optimizer": "newton", "steps": 3},
    "newton5": {"inner_optimizer": "newton", "steps": 5},
    "newton7": {"inner_optimizer": "newton", "steps": 7},
    "newton10": {"inner_optimizer": "newton", "steps": 10},
    "adam40": {"steps": 40},
    # the moonshot's candidates: half the search's cost a step (every2: the mean of an
    # aligning and a plain step; batch8: half the aligned samples)
    "every2": {"align_every": 2},
    "batch8": {"align_batch": 8},
    # the adjoint solve on curved models (multiview, latent): CG on every step with the
    # Gauss-Newton fallback (as before gn_switch), against the direct solve from the start
    "no_switch": {"gn_switch": 0},
    "gn_direct": {"hvp": "gauss-newton"},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first (gn_switch's switch: 3 fallback steps)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--configs", default="default,newton5,newton7,newton10")
    ap.add_argument("--model", default="cnn7")
    ap.add_argument("--depth", type=int, default=1, help="slices per volume (multiview: >= 4)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="method key=value for every configuration (repeatable)")
    ap.add_argument("--profile-threads", default="1,2",
                    help="thread counts of the profiled run of the first configuration "
                         "('' for none)")
    ap.add_argument("--profile-all", action="store_true",
                    help="profile every configuration, not only the first")
    ap.add_argument("--out", default="benchmarks/results/causal_align_step_table.json")
    a = ap.parse_args(argv)
    names = [c for c in a.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        ap.error(f"--configs: unknown '{unknown[0] if unknown else ''}'; valid: "
                 f"{', '.join(CONFIGS)}")
    # --size as `bench_step` takes it: --size 4 was its ConfigError traceback
    for name, least in (("threads", 1), ("rounds", 1), ("steps", 1), ("size", 8),
                        ("batch_size", 1)):
        if getattr(a, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(a, name)}")
    try:
        profile_threads = [int(t) for t in a.profile_threads.split(",") if t]
    except ValueError:
        profile_threads = [0]
    if any(t < 1 for t in profile_threads):  # 0 failed in torch.set_num_threads, after the rounds
        ap.error(f"--profile-threads must be integers >= 1, got '{a.profile_threads}'")
    out = Path(a.out)
    if out.is_dir():  # the JSON's write failed after every round had run
        ap.error(f"--out {out}: is a folder; give a file path for the JSON")
    for parent in out.parents:  # under a file: a traceback from its folder's mkdir
        if parent.exists():
            if not parent.is_dir():
                ap.error(f"--out {out}: {parent} is a file, not a folder")
            break
    try:
        common = {k.removeprefix("method."): v for k, v in parse_set(a.sets).items()}
    except CausalignError as exc:
        ap.error(f"--set: {exc}")
    clash = [(name, k) for name in names for k in CONFIGS[name]
             if k in common and common[k] != CONFIGS[name][k]]
    if clash:  # the configuration's own value would silently win
        ap.error(f"--set {clash[0][1]}={common[clash[0][1]]} contradicts configuration "
                 f"'{clash[0][0]}' ({clash[0][1]}={CONFIGS[clash[0][0]][clash[0][1]]})")
    configs = {name: {**common, **CONFIGS[name]} for name in names}
    try:  # a bad setting or model fails here, in one line, before any timing
        for name in names:
            build_method("causal-align", configs[name])
        if a.model not in MODEL_NAMES:
            raise ConfigError(f"--model: unknown '{a.model}'; valid: {', '.join(MODEL_NAMES)}")
        if a.depth < 1 or 1 < a.depth < 4:
            raise ConfigError(f"--depth must be 1 or >= 4, got {a.depth}")
        if (a.model in VOLUME_MODELS) != (a.depth > 1):
            raise ConfigError(f"--model {a.model} with --depth {a.depth}: volumes (--depth >= "
                              f"4) are for {', '.join(VOLUME_MODELS)} only")
    except CausalignError as exc:
        ap.error(str(exc))
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    shape = {"model": a.model, "depth": a.depth, "warmup": a.warmup}
    settings = {"threads": a.threads, "rounds": a.rounds, "steps": a.steps, "size": a.size,
                "batch_size": a.batch_size, **shape, "set": common,
                "torch": torch.__version__}
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(a.rounds):
        for name in names:
            res = bench_step("causal-align", size=a.size, batch_size=a.batch_size,
                             steps=a.steps, method_args=configs[name], **shape)
            runs.append({"config": name, "round": r, **res})
            print(f"{name} round {r}: {res['ratio_to_erm']:.2f}x ERM", flush=True)
            # an interrupt kept none of the finished runs (minutes at 64 px); rewritten
            # whole after each, "complete": false until the end
            atomic_write_json(out, {"benchmark": "causal_align_step_table",
                                    "complete": False, **settings, "runs": runs})
    summary = {}
    for name in names:
        ratios = [x["ratio_to_erm"] for x in runs if x["config"] == name]
        # the median: one run can catch a load spike on a shared machine
        summary[name] = {"method_args": configs[name], "ratios": ratios,
                         "median": statistics.median(ratios), "min": min(ratios),
                         "max": max(ratios)}
    profiles = []
    for threads in profile_threads:
        torch.set_num_threads(threads)
        for name in names if a.profile_all else names[:1]:
            res = bench_step("causal-align", size=a.size, batch_size=a.batch_size,
                             steps=a.steps, profile=True, method_args=configs[name], **shape)
            profiles.append({"config": name, **res})
            print(f"profile {name}, {threads} thread(s): {res['profile_ms_per_step']}",
                  flush=True)
    result = {"benchmark": "causal_align_step_table", "complete": True, **settings,
              "summary": summary, "runs": runs, "profiles": profiles,
              "elapsed_s": time.perf_counter() - t_start}
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
