"""Start-up costs of a training run that grow with the dataset, phase by phase (JSON).

    python benchmarks/bench_startup_scale.py /tmp/startup_data [--n-train 2000 --size 128
        --channels 1] [--out benchmarks/results/startup_scale.json]

Writes (once, if the folder is missing) a dataset of 8-bit PNGs with a mask each, then runs
every phase in one process (one thread) and reports its seconds and its peak resident set
size above the process's size before the phase (Linux VmHWM, reset between phases through
/proc/self/clear_refs, so torch's allocations count): reading the training split (decode
and validation into the compact cache), its pixel digest (`content_digest`, config.yaml's
data_content_digest), and the per-pixel scales of the scaled distances, as
`distance_scale` computes them now (from the split's cache, in pixel chunks; 8-bit MAD by
level counts) and as it did before (the whole split as float32, then float64, then medians
over it). Ratios old/new compare the two scale computations, measured in the same process
on the same split. The latent space's autoencoder is trained (``--ae-epochs``) from the split
read a batch at a time (now) and from its whole float32 ``.images`` (before), each in a fresh
process after reading the split: in this one, memory freed by the earlier phases stays
resident and hides a new allocation of the same size.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def make(root: Path, n_train: int, size: int, channels: int, seed: int = 0) -> None:
    """8-bit PNGs (gray or RGB): a smooth field plus noise, a square mask each."""
    from PIL import Image

    from causalign.data.format import DatasetMeta, SampleRecord, write_manifest

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    n_eval = max(16, n_train // 25)
    yy, xx = np.mgrid[:size, :size] / size
    rows = []
    for k, split in enumerate(["train"] * n_train + ["val"] * n_eval + ["test"] * n_eval):
        field = 0.5 + 0.25 * np.sin(6 * xx + k) * np.cos(4 * yy - k)
        noise = rng.normal(0, 0.08, (size, size) if channels == 1 else (size, size, channels))
        img = field if channels == 1 else field[..., None]
        img = (np.clip(img + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(img).save(root / f"images/{k:06d}.png", compress_level=1)
        mask = np.zeros((size, size), np.uint8)
        c = rng.integers(size // 4, 3 * size // 4, 2)
        mask[c[0] - size // 8:c[0] + size // 8, c[1] - size // 8:c[1] + size // 8] = 255
        Image.fromarray(mask).save(root / f"masks/{k:06d}.png")
        rows.append(SampleRecord(id=f"{k:06d}", split=split, label=k % 2, site="0",
                                 image=f"images/{k:06d}.png", mask=f"masks/{k:06d}.png",
                                 box=None, attributes=[]))
    write_manifest(root, DatasetMeta("startup-scale", ["a", "b"], [], 2, channels), rows)


def _old_scale(images, distance: str):
    """`distance_scale` before it read the cache in chunks (the same numbers)."""
    import torch

    from causalign.explain.counterfactual import _median0

    x = images.double()
    if int((~torch.isfinite(x)).sum()):
        raise ValueError("NaN/inf pixels")
    if distance == "scaled-l1":
        s = _median0((x - _median0(x)).abs())
    else:
        s = x.std(dim=0) if len(x) > 1 else torch.ones_like(x[0])
    s = s / s.mean()
    s = s.clamp_min(0.05)
    return (s / s.mean()).to(images.dtype)


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns that RSS in MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def run_phases(root: Path, ae_epochs: int = 1) -> dict:
    """Every phase in this process, one after another, each with its own peak."""
    import torch

    torch.set_num_threads(1)
    from causalign.data.format import LesionDataset
    from causalign.explain.counterfactual import distance_scale

    out: dict = {}
    base = _reset_peak()
    t0 = time.perf_counter()
    ds = LesionDataset(root, "train")
    out["load"] = {"seconds": time.perf_counter() - t0,
                   "peak_mib_above_start": _status("VmHWM") - base,
                   "cache_mib": (ds._images.numel() * ds._images.element_size()
                                 + ds._masks.numel()) / 2**20,
                   "n": len(ds), "image_shape": list(ds.image_shape)}
    phases = {"digest": ds.content_digest}
    for d in ("scaled-l1", "scaled-l2"):
        phases[f"new-{d}"] = lambda d=d: _sha(distance_scale(ds, d))
        phases[f"old-{d}"] = lambda d=d: _sha(_old_scale(ds.images, d))
    if ae_epochs > 0:
        for name in ("new-latent-ae", "old-latent-ae"):
            run = subprocess.run([sys.executable, __file__, str(root), "--ae-phase", name,
                                  "--ae-epochs", str(ae_epochs)], capture_output=True,
                                 text=True)
            if run.returncode:  # the child's last line, not a CalledProcessError traceback
                last = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
                raise SystemExit(f"error: autoencoder phase {name}: {last}")
            phases[name] = lambda out=run.stdout: json.loads(out)
    for name, fn in phases.items():
        if name.endswith("latent-ae"):
            out[name] = fn()
            continue
        base = _reset_peak()
        t0 = time.perf_counter()
        value = fn()
        out[name] = {"seconds": time.perf_counter() - t0,
                     "peak_mib_above_start": _status("VmHWM") - base}
        if name != "digest":
            out[name]["ae_sha" if "latent" in name else "scale_sha"] = value
    return out


def ae_phase(root: Path, name: str, ae_epochs: int) -> dict:
    """One autoencoder phase in this (fresh) process, after reading the split."""
    import torch

    torch.set_num_threads(1)
    from causalign.data.format import LesionDataset
    from causalign.models.autoencoder import train_autoencoder

    ds = LesionDataset(root, "train")
    base = _reset_peak()
    t0 = time.perf_counter()
    model = train_autoencoder(ds if name.startswith("new") else ds.images, epochs=ae_epochs)
    return {"seconds": time.perf_counter() - t0,
            "peak_mib_above_start": _status("VmHWM") - base, "ae_sha": _ae_sha(model),
            "epochs": ae_epochs}


def _ae_sha(model) -> str:
    import torch

    return _sha(torch.cat([v.flatten().float() for v in model.state_dict().values()]))


def _sha(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--channels", type=int, default=1, choices=(1, 3))
    ap.add_argument("--ae-epochs", type=int, default=1,
                    help="epochs of the latent autoencoder phases (0: skip them)")
    ap.add_argument("--ae-phase", help=argparse.SUPPRESS)  # internal: one phase, JSON out
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    # checked before a dataset is written: --n-train 0 wrote one and then stopped on a
    # traceback ("split 'train' is empty"); the scales need two images
    if a.n_train < 2 or a.size < 8 or a.ae_epochs < 0:
        ap.error("--n-train must be at least 2, --size at least 8, --ae-epochs at least 0")
    if a.ae_phase:
        print(json.dumps(ae_phase(a.root, a.ae_phase, a.ae_epochs)))
        return
    if not (a.root / "manifest.csv").exists():
        make(a.root, a.n_train, a.size, a.channels)
    results = run_phases(a.root, a.ae_epochs)
    for d in ("scaled-l1", "scaled-l2", "latent-ae"):
        if f"new-{d}" not in results:
            continue
        old, new = results[f"old-{d}"], results[f"new-{d}"]
        results[f"{d}_ratio_old_over_new"] = {
            "seconds": old["seconds"] / new["seconds"],
            "peak_mib": old["peak_mib_above_start"] / max(new["peak_mib_above_start"], 1.0),
            **({"same_autoencoder": old["ae_sha"] == new["ae_sha"]} if d == "latent-ae"
               else {"same_scale": old["scale_sha"] == new["scale_sha"]})}
    text = json.dumps(results, indent=1)
    if a.out:
        from causalign.io import atomic_write_text  # a crash mid-write keeps the old file

        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.out, text + "\n")
    print(text)


if __name__ == "__main__":
    from _reuse import one_line_errors  # a dataset the loader refuses: one line, not a traceback

    one_line_errors(main)()
