"""Memory hygiene of long runs: what a checkpoint costs beyond the state it saves."""

from __future__ import annotations

import hashlib
import tracemalloc

import torch

from causalign.engine.trainer import load_checkpoint
from causalign.io import atomic_torch_save


def test_atomic_torch_save_streams_the_checkpoint_to_disk(tmp_path):
    """torch.save into a BytesIO held the whole serialised checkpoint in memory before the
    write: with causal-align's warm-start cache in it (C·H·W·4 bytes per training sample)
    an epoch's checkpoint peaked at twice the cache on top of the live state (574 MiB cache:
    +1148 MiB, now +574 MiB, the cache's gathered copy only)."""
    t = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MiB
    path = tmp_path / "checkpoint.pt"
    tracemalloc.start()
    try:
        atomic_torch_save(path, {"cache": t})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < t.nbytes // 8, f"{peak} bytes of Python memory for a {t.nbytes}-byte save"
    data = path.read_bytes()
    assert (tmp_path / "checkpoint.pt.sha256").read_text().strip() == \
        hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "checkpoint.pt.sha256.pending").exists()
    assert torch.equal(load_checkpoint(path)["cache"], t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt",
                                                           "checkpoint.pt.sha256"]


class _Interrupts:
    def __reduce__(self):
        raise KeyboardInterrupt  # Ctrl-C while torch.save is streaming


def test_an_interrupted_streaming_save_leaves_the_old_checkpoint_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"v": 1})
    try:
        atomic_torch_save(path, {"big": torch.zeros(2**16), "then": _Interrupts()})
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt",
                                                           "checkpoint.pt.sha256"]
    assert load_checkpoint(path)["v"] == 1
