"""CPU seconds to open a training split (`LesionDataset`: read, validate, cache) and to make
one pass of float32 batches over it, each in a fresh process, for one or more source trees
(e.g. a baseline worktree's ``src`` and this checkout's), their runs alternated so that a
load change on a shared machine falls on all alike.

    python benchmarks/bench_dataset_open.py DATA [--src src /tmp/base/src] [--repeats 5] \
        [--out benchmarks/results/dataset_open.json]

DATA: a dataset folder (e.g. ``causalign data synth DATA --n-train 5000 --size 64``).
Process CPU time, not wall time: on a shared machine other processes inflate the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from causalign.data.format import LesionDataset
c0 = time.process_time()
ds = LesionDataset(sys.argv[1], "train")
c1 = time.process_time()
for i in range(0, len(ds), 64):
    ds.batch(torch.arange(i, min(len(ds), i + 64)))
c2 = time.process_time()
print(c1 - c0, c2 - c1, len(ds))
"""


def _child(src: str, data: Path, env: dict) -> list[str]:
    """One child's output; a failing child (not a dataset folder, an empty training split,
    a source tree that does not import) stops the script with its last stderr line: it
    printed a traceback per repeat, then the parent's CalledProcessError."""
    run = subprocess.run([sys.executable, "-c", _CHILD, str(data)], env=env,
                         capture_output=True, text=True)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        raise SystemExit(f"error: {data} with --src {src}: {last}")
    return run.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--src", nargs="+", default=[str(Path(__file__).parents[1] / "src")])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if not args.data.is_dir():  # else each child's traceback, then CalledProcessError's
        ap.error(f"{args.data}: dataset folder does not exist")
    for src in args.src:  # else the child imported the installed causalign, no word said
        if not (Path(src) / "causalign" / "__init__.py").is_file():
            ap.error(f"--src {src}: no causalign/__init__.py there (give a checkout's src "
                     f"folder)")
    times: dict[str, dict[str, list[float]]] = {s: {"open": [], "pass": []} for s in args.src}
    n = 0
    for r in range(args.repeats):
        for src in args.src if r % 2 == 0 else args.src[::-1]:
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            out = _child(src, args.data, env)
            times[src]["open"].append(float(out[0]))
            times[src]["pass"].append(float(out[1]))
            n = int(out[2])
    result = {"data": str(args.data), "train_samples": n, "repeats": args.repeats,
              "unit": "process CPU seconds", "sources": {
                  src: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                        for k, v in t.items()} for src, t in times.items()}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        # whole or not at all (the parent imports no causalign, so not causalign.io): a
        # crash mid-write left a truncated result in place of the previous one
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
