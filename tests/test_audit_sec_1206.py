"""Untrusted files (audit 'sec', 2026-12-06): checkpoints, planted symlinks, crafted manifests
and decompression bombs must end in one clear error, never run code or touch files outside."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from causalign.errors import CausalignError


class _Payload:
    """Unpickling this creates a folder: stands in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _plant_checkpoint(path: Path, obj: object) -> None:
    """What an attacker ships: the pickle and a matching .sha256 beside it."""
    torch.save(obj, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(str(path) + ".sha256").write_text(digest + "\n")


def test_malicious_checkpoint_runs_no_code(tmp_path: Path) -> None:
    from causalign.engine.trainer import load_checkpoint

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "best.pt"
    _plant_checkpoint(ckpt, {"epoch": 1, "model": {"w": torch.zeros(1)},
                             "x": _Payload(marker)})
    with pytest.raises(CausalignError, match="best.pt.*refused"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_own_checkpoint_state_loads_weights_only(tmp_path: Path) -> None:
    """The trainer's checkpoint (RNG states included) loads under weights_only, and so does
    one written before (NumPy's RNG state as an ndarray), so resume keeps working."""
    import random

    from causalign.engine.trainer import load_checkpoint

    old = tmp_path / "old.pt"
    _plant_checkpoint(old, {"rng": {"numpy": np.random.get_state(),
                                    "python": random.getstate()}})
    state = load_checkpoint(old)
    np.random.set_state(state["rng"]["numpy"])
    assert pickle.dumps(state)  # plain data


def test_trainer_checkpoint_has_no_numpy_objects() -> None:
    """The RNG state is stored as tensors: the checkpoint needs no allow-list at all."""
    import io

    from causalign.engine.trainer import _numpy_rng_from_tensor, _numpy_rng_to_tensor

    np.random.seed(3)
    state = np.random.get_state()
    buf = io.BytesIO()
    torch.save({"numpy": _numpy_rng_to_tensor(state)}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["numpy"]  # no safe_globals needed
    np.random.set_state(_numpy_rng_from_tensor(back))
    a = np.random.rand(3)
    np.random.set_state(state)
    np.testing.assert_array_equal(a, np.random.rand(3))


def test_planted_lock_symlink_leaves_its_target_alone(tmp_path: Path) -> None:
    """RUN/.causalign.lock -> a user's file: the lock truncated the target, wrote its pid line
    into it and deleted it on release (`train --resume` of a received run folder)."""
    from causalign.io import check_folder_free, folder_lock

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    (run / ".causalign.lock").symlink_to(victim)
    with pytest.raises(CausalignError, match=r"\.causalign\.lock.*symbolic link"):
        with folder_lock(run, "train"):
            pass
    check_folder_free(run)  # a read-only check: nothing to refuse, nothing touched
    assert victim.read_text() == "precious\n"
    assert (run / ".causalign.lock").is_symlink()


def test_dataset_writer_replaces_planted_links(tmp_path: Path) -> None:
    """`data synth OUT --overwrite` of a received folder: a link at a sample's file name had
    its target overwritten by np.save / PIL; now the link itself is replaced."""
    from causalign.data import DatasetMeta, DatasetWriter

    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    out = tmp_path / "data"
    w = DatasetWriter(out, DatasetMeta("t", ["a", "b"]))
    (out / "images" / "s0.png").symlink_to(victim)
    (out / "masks" / "s0.png").symlink_to(victim)
    (out / "images" / "s1.npy").symlink_to(victim)
    img = np.zeros((8, 8), np.float32)
    w.add(img, label=0, split="train", mask=np.ones((8, 8)), sample_id="s0")
    w.add(np.zeros((2, 8, 8), np.float32), label=1, split="train", sample_id="s1")
    w.close()
    assert victim.read_bytes() == b"keep"
    for rel in ("images/s0.png", "masks/s0.png", "images/s1.npy"):
        assert not (out / rel).is_symlink()
    assert not [p for p in (out / "images").iterdir() if p.name.endswith(".tmp")]


def test_import_output_ignores_links_at_temporary_names(tmp_path: Path) -> None:
    """The importers wrote `.NAME.tmp` by that fixed name: a link planted there (a resumed
    import in a received folder) had its target overwritten before the rename."""
    from causalign.data.importers.run import _save_npy, _save_png

    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    (tmp_path / ".a.png.tmp").symlink_to(victim)
    (tmp_path / ".b.npy.tmp").symlink_to(victim)
    _save_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _save_npy(tmp_path / "b.npy", np.zeros((4, 4), np.float32))
    assert victim.read_bytes() == b"keep"
    assert np.load(tmp_path / "b.npy").shape == (4, 4)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w × h but holds one row of pixels (bytes, not GB)."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))


def test_images_over_pils_pixel_limit_are_refused(tmp_path: Path, monkeypatch) -> None:
    """PIL only warns between MAX_IMAGE_PIXELS and twice that, and decodes: a 657 KB PNG of
    13000 x 13000 RGBA took 2.8 GB. Scaled down here: limit 1000 px, a 40 x 40 image."""
    from PIL import Image

    from causalign.data.format import load_array
    from causalign.data.importers.util import SkipItem, read_image, read_mask
    from causalign.errors import DataError

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"big\.png: refused as a possible decompression bomb"):
        load_array(path)
    with pytest.raises(SkipItem, match="image too large"):
        read_image(path)
    with pytest.raises(SkipItem, match="mask too large"):
        read_mask(path)


def test_huge_png_header_is_one_line(tmp_path: Path) -> None:
    from causalign.data.format import load_array
    from causalign.errors import DataError

    path = tmp_path / "bomb.png"
    _png_header_only(path, 60000, 60000)
    with pytest.raises(DataError, match=r"bomb\.png: refused") as info:
        load_array(path)
    assert "\n" not in str(info.value)


def test_nifti_header_over_voxel_limit_is_skipped_before_reading(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A 1.1 KB .nii.gz declaring 1000^3 float32 took 28 s and 4.4 GB before it was found
    damaged; the header's shape is now checked first (limit lowered for the test)."""
    nib = pytest.importorskip("nibabel")
    from causalign.data.importers import util
    from causalign.data.importers.brats import load_volume

    path = tmp_path / "s_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(path))
    monkeypatch.setattr(util, "MAX_VOXELS", 500, raising=False)
    with pytest.raises(util.SkipItem, match=r"NIfTI too large.*\(8, 8, 8\)"):
        load_volume(nib, path)


def test_dicom_header_over_voxel_limit_is_skipped_before_decoding(tmp_path: Path,
                                                                   monkeypatch) -> None:
    pydicom = pytest.importorskip("pydicom")
    from fixtures_real import write_dicom

    from causalign.data.importers import util
    from causalign.data.importers.dicom import read_pixels

    path = tmp_path / "a.dcm"
    write_dicom(path, np.zeros((8, 8), np.uint16), SOPInstanceUID="1.2.3.4")
    monkeypatch.setattr(util, "MAX_VOXELS", 32, raising=False)
    with pytest.raises(util.SkipItem, match=r"DICOM too large.*\(1, 8, 8, 1\)"):
        read_pixels(pydicom, path)


@pytest.mark.parametrize("column,value", [("image", "../secret.png"),
                                          ("image", "images/../../secret.png"),
                                          ("mask", "/etc/hostname")])
def test_manifest_paths_outside_the_dataset_are_refused(tmp_path: Path, column: str,
                                                        value: str) -> None:
    """A received dataset's manifest read any file it named (absolute, or '..' out of it)."""
    from causalign.data import DatasetMeta, DatasetWriter
    from causalign.data.format import MANIFEST, read_manifest
    from causalign.errors import DataError

    data = tmp_path / "data"
    w = DatasetWriter(data, DatasetMeta("t", ["a", "b"]))
    w.add(np.zeros((8, 8), np.float32), label=0, split="train", mask=np.ones((8, 8)))
    w.close()
    (tmp_path / "secret.png").write_bytes(b"x")
    text = (data / MANIFEST).read_text()
    old = "images/000000.png" if column == "image" else "masks/000000.png"
    (data / MANIFEST).write_text(text.replace(old, value))
    with pytest.raises(DataError, match=rf"manifest.csv:2: {column} path .* is outside the "
                                        rf"dataset folder"):
        read_manifest(data)


def test_manifest_paths_through_links_inside_the_dataset_still_work(tmp_path: Path) -> None:
    """Datasets assembled from links (images/ -> shared storage) keep working."""
    from causalign.data import DatasetMeta, DatasetWriter, LesionDataset

    store = tmp_path / "store"
    w = DatasetWriter(store, DatasetMeta("t", ["a", "b"]))
    w.add(np.zeros((8, 8), np.float32), label=0, split="train")
    w.close()
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dataset.yaml", "manifest.csv"):
        (data / name).write_bytes((store / name).read_bytes())
    (data / "images").symlink_to(store / "images")
    assert len(LesionDataset(data, "train")) == 1


def test_report_escapes_a_crafted_run_status(tmp_path: Path) -> None:
    """write_report(DIR) on a received benchmark folder: the run status went into the page
    unescaped, so a results.json could put a script into report.html."""
    import json

    from causalign.report.html import write_report

    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": [
        {"key": "k", "status": "x'><script>alert(1)</script>", "error": "e"}]}))
    page = Path(write_report(tmp_path, progress=False)).read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)" in page


def test_resumed_import_does_not_append_through_a_journal_link(tmp_path: Path) -> None:
    from PIL import Image

    from causalign.data.importers import run_import
    from causalign.errors import DataError

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(src / cls / f"{i}.png")
    out = tmp_path / "out"
    run_import("folder", src, out, {"size": 8})
    victim = tmp_path / "victim.txt"
    victim.write_text("")
    journal = out / ".import" / "journal.jsonl"
    journal.unlink()
    journal.symlink_to(victim)
    with pytest.raises(DataError, match=r"journal.jsonl: is a symbolic link"):
        run_import("folder", src, out, {"size": 8})
    assert victim.read_text() == ""


def test_export_cleanup_does_not_delete_through_a_linked_subfolder(tmp_path: Path) -> None:
    """An export folder from elsewhere: its file list names maps/notes.txt and maps/ links
    to a folder of the user's; the next export's clean-up deleted that file."""
    import json

    from causalign.explain.export import OwnedFiles

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "maps").symlink_to(mine)
    (out / ".causalign-explain.json").write_text(json.dumps(["maps/notes.txt"]))
    files = OwnedFiles(out, ".causalign-explain.json", planned=[])
    files.finish()
    assert (mine / "notes.txt").read_text() == "keep"
