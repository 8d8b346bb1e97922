"""Memory footprint of `LesionDataset` at a real size, and the cost of its per-batch conversion.

    python benchmarks/bench_dataset_memory.py make /tmp/memory_data [--n-train 2000 --size 224]
    python benchmarks/bench_dataset_memory.py construct /tmp/memory_data      # one JSON line
    python benchmarks/bench_dataset_memory.py batches [--size 64 --batch-size 64]
    python benchmarks/bench_dataset_memory.py all /tmp/memory_data --out \
        benchmarks/results/dataset_memory.json

`make` writes a dataset in the on-disk format like paper 002's CUB crops: RGB 8-bit PNGs,
masks for half the training samples, boxes for a quarter. `construct` reads the training
split in a fresh process and reports its peak resident set size (Linux VmHWM) and the size
of the cached tensors. `batches` times `LesionDataset.batch` (compact cache, float32 made per
batch) against indexing a float32 copy of the same split (what the cache was before), in one
process, at the training size of the demo (64 px, batch 64); medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make(root: Path, n_train: int, n_eval: int, size: int, seed: int = 0) -> None:
    """RGB 8-bit PNG dataset, masks for half the samples, boxes for a quarter."""
    from PIL import Image

    from causalign.data.format import DatasetMeta, SampleRecord, write_manifest

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    splits = ["train"] * n_train + ["val"] * n_eval + ["test"] * n_eval
    for k, split in enumerate(splits):
        sid = f"{k:06d}"
        # smooth colour field + noise: compresses like a photo, not like white noise
        base = rng.integers(0, 256, 3)[:, None, None] * (xx + yy)[None] / (2 * size)
        img = np.clip(base + rng.normal(0, 12, (3, size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(np.moveaxis(img, 0, -1)).save(root / "images" / f"{sid}.png")
        mask_rel, box = None, None
        if k % 2 == 0:
            cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 6]
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8) * 255
            Image.fromarray(m).save(root / "masks" / f"{sid}.png")
            mask_rel = f"masks/{sid}.png"
        if k % 4 == 1:
            box = (size // 8, size // 8, size // 2, size // 2)
        rows.append(SampleRecord(id=sid, split=split, label=k % 2, site="0",
                                 image=f"images/{sid}.png", mask=mask_rel, box=box))
    write_manifest(root, DatasetMeta("memory-bench", ["a", "b"], ndim=2, channels=3,
                                     info={"generator": "bench_dataset_memory"}), rows)


def construct(root: Path, split: str = "train") -> dict:
    """Peak RSS of reading one split (this process; call in a fresh one)."""
    import causalign.data.format as fmt

    before = _rss_mib()
    t0 = time.perf_counter()
    ds = fmt.LesionDataset(root, split)
    seconds = time.perf_counter() - t0
    cached = sum(t.numel() * t.element_size() for t in vars(ds).values()
                 if isinstance(t, torch.Tensor))
    return {"split": split, "n": len(ds), "image_shape": list(ds.image_shape),
            "rss_before_mib": round(before, 1), "peak_rss_mib": round(_hwm_mib(), 1),
            "rss_after_mib": round(_rss_mib(), 1), "cached_tensors_mib": round(cached / 2**20, 1),
            "construct_seconds": round(seconds, 2)}


def batches(size: int, batch_size: int, repeats: int, n: int = 1024) -> dict:
    """Seconds per `batch()` call: compact cache vs indexing a float32 copy (the old cache)."""
    from causalign.data.format import LesionDataset
    from causalign.data.synth import SynthConfig, generate

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "d", SynthConfig(n_train=n, n_val=8, n_test=8, size=size))
        ds = LesionDataset(Path(tmp) / "d", "train")
    old = {"image": ds.images, "mask": ds.masks, "box_mask": ds.box_masks}  # float32 copies
    g = torch.Generator().manual_seed(0)
    orders = [torch.randperm(n, generator=g) for _ in range(repeats)]

    def epoch(fn) -> float:
        t0 = time.perf_counter()
        for order in orders:
            for s in range(0, n, batch_size):
                fn(order[s:s + batch_size])
        return (time.perf_counter() - t0) / (repeats * -(-n // batch_size))

    def old_batch(idx: torch.Tensor) -> dict:  # the old `LesionDataset.batch`, verbatim
        attrs = ds.attributes[idx]
        return {
            "image": old["image"][idx],
            "label": ds.labels[idx],
            "mask": old["mask"][idx],
            "has_mask": ds.has_mask[idx],
            "box_mask": old["box_mask"][idx],
            "has_annotation": ds.has_box_or_mask[idx],
            "attributes": torch.nan_to_num(attrs, nan=0.0),
            "attr_known": ~torch.isnan(attrs),
            "site": ds.site_index[idx],
            "index": idx,
        }

    new_s, old_s = [], []
    for _ in range(5):  # interleaved, so a slow moment of the machine hits both
        new_s.append(epoch(ds.batch))
        old_s.append(epoch(old_batch))
    return {"size": size, "batch_size": batch_size, "n": n, "threads": 1,
            "new_ms_per_batch": round(1000 * statistics.median(new_s), 3),
            "old_ms_per_batch": round(1000 * statistics.median(old_s), 3)}


def _fresh(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["make", "construct", "batches", "all"])
    ap.add_argument("data", nargs="?", default="/tmp/memory_data")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/dataset_memory.json")
    args = ap.parse_args()
    root = Path(args.data)
    if args.mode == "make":
        make(root, args.n_train, args.n_eval, args.size)
    elif args.mode == "construct":
        print(json.dumps(construct(root)))
    elif args.mode == "batches":
        print(json.dumps(batches(64 if args.size == 224 else args.size, args.batch_size,
                                 args.repeats)))
    else:
        if not (root / "manifest.csv").exists():
            make(root, args.n_train, args.n_eval, args.size)
        from causalign.io import atomic_write_json

        result = {"torch": torch.__version__, "data": str(root),
                  "construct": _fresh("construct", str(root)),
                  "batches": _fresh("batches", "--size", "64", "--batch-size",
                                    str(args.batch_size), "--repeats", str(args.repeats))}
        atomic_write_json(args.out, result)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
