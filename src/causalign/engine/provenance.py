"""What a run folder records beyond its settings, so a reported number can be traced back and
rerun: the source commit, the library versions, the machine and the thread count the run
actually used, and a digest of the data's content (`LesionDataset.content_digest`).

On one machine with the same settings, code and data, training is bit-identical; across
machines (another CPU's kernels sum in other orders), thread counts or library versions it is
not, so those are what a reviewer needs to know first.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# src/causalign/engine/provenance.py -> the checkout's root (src layout)
_CHECKOUT = Path(__file__).resolve().parents[3]


def source_commit(root: Path | None = None) -> str | None:
    """The git commit causalign runs from, with ``-dirty`` when tracked files under src/
    differ from it; None for an installed wheel (no checkout around the package), without
    git, or when git fails. Only a checkout whose src/causalign is this package counts: a
    site-packages inside some other repository is not causalign's history."""
    root = _CHECKOUT if root is None else Path(root)
    if not (root / ".git").exists() or not (root / "src" / "causalign").is_dir():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no", "--", "src"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    if not commit:
        return None
    return commit + ("-dirty" if status.stdout.strip() else "")


def content_digest(splits: Iterable[Any]) -> str:
    """One digest (16 hex digits, as `dataset_digest`) of the splits' contents, in order;
    None entries (a dataset without a test split) are skipped."""
    digest = hashlib.sha256()
    for ds in splits:
        if ds is not None:
            digest.update(ds.content_digest().encode())
    return digest.hexdigest()[:16]


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """The software and machine a run trains on (config.yaml's ``environment``).
    ``world_size``: the data-parallel processes (torchrun); each holds its own BatchNorm
    batch statistics and chunk of the global batch, so results depend on it."""
    env: dict[str, Any] = {
        "causalign_commit": source_commit(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": str(device),
        # threads=0 means torch's default, which depends on the machine: the count used
        "threads": torch.get_num_threads(),
        "world_size": int(world_size),
        # process-wide precision switches a caller's script may have changed ("high" or
        # "medium" lets float32 matmuls run in TF32/bfloat16 where the hardware has it)
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)  # True: torch's default
    return env


__all__ = ["content_digest", "environment", "source_commit"]


def output_provenance(run: Path, model: Any, data_path: Path, ds: Any,
                      device: Any) -> dict:
    """What a summary.json (counterfactual's, explain's, predict's maps) needs to say where
    its x* or maps came from: the run and the digest of the weights `load_run` read into
    ``model`` (best.pt, else checkpoint.pt), the data and its split's content digest, and
    the machine (`environment`): a summary alone named none of them (explain's, with --data
    another site, read as the run's own site)."""
    return {"run": str(Path(run).resolve()), **getattr(model, "causalign_weights", {}),
            "data": str(Path(data_path).resolve()),
            "split_content_digest": content_digest([ds]), "environment": environment(device)}
