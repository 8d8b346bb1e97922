"""Concurrent use of one folder: readers of a run that is still training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _save_during(monkeypatch, path: Path, hook_on: str, new) -> None:
    """Run one whole `atomic_torch_save` of ``new`` right after the reader's first read of
    the file whose name ends in ``hook_on`` (a trainer saving while `load_run` reads)."""
    from causalign.io import atomic_torch_save

    real_bytes, real_text = Path.read_bytes, Path.read_text
    fired = []

    def fire(self) -> None:
        if not fired and self.name.endswith(hook_on):
            fired.append(self)
            atomic_torch_save(path, new)

    def read_bytes(self):
        data = real_bytes(self)
        fire(self)
        return data

    def read_text(self, *a, **k):
        text = real_text(self, *a, **k)
        fire(self)
        return text

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "read_text", read_text)


def test_checkpoint_replaced_while_read_is_not_reported_corrupt(tmp_path, monkeypatch):
    # before: the old bytes were checked against the digest of the new file saved
    # meanwhile: "checkpoint is corrupt or truncated" for a whole, valid file
    import torch

    from causalign.engine.trainer import load_checkpoint
    from causalign.io import atomic_torch_save

    path = tmp_path / "best.pt"
    atomic_torch_save(path, {"epoch": 1})
    _save_during(monkeypatch, path, "best.pt", {"epoch": 2})
    assert load_checkpoint(path)["epoch"] in (1, 2)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 2
    torch.save({"epoch": 3}, path)  # a real corruption (digest of another file) still fails
    with pytest.raises(Exception, match="corrupt"):
        load_checkpoint(path)


def test_pending_digest_renamed_while_read_is_not_reported_corrupt(tmp_path, monkeypatch):
    # the writer between its two renames: data new, digest old, pending = new digest. Its
    # last rename landed between the reader's two digest reads: the pending one was gone
    # (a FileNotFoundError, or "corrupt" when its exists() came after the rename)
    from causalign.io import atomic_torch_save, verified_bytes

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"epoch": 1})
    old_sha = (tmp_path / "checkpoint.pt.sha256").read_text()
    atomic_torch_save(path, {"epoch": 2})
    pending = tmp_path / "checkpoint.pt.sha256.pending"
    os.replace(tmp_path / "checkpoint.pt.sha256", pending)
    (tmp_path / "checkpoint.pt.sha256").write_text(old_sha)
    real_text = Path.read_text

    def read_text(self, *a, **k):
        text = real_text(self, *a, **k)
        if self.name == "checkpoint.pt.sha256" and pending.exists():
            os.replace(pending, self)  # the writer's last step
        return text

    monkeypatch.setattr(Path, "read_text", read_text)
    assert verified_bytes(path) == path.read_bytes()
