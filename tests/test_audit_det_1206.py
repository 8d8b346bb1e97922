"""Audit 2026-12-06 (determinism and reproducibility): what a run folder records so a number
can be traced back and rerun exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from causalign.data.format import LesionDataset
from causalign.engine.trainer import dataset_digest, train


def _first_train_image(root: Path) -> Path:
    ds = LesionDataset(root, "train")
    return root / ds.records[0].image


def test_content_digest_sees_pixels_that_the_manifest_digest_misses(tiny_data, tmp_path):
    """data_digest hashes dataset.yaml and manifest.csv only: one image rewritten in place
    (same name, shape and dtype) left it unchanged, so a run folder could not tell which
    pixels its numbers came from."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    before = LesionDataset(copy, "train").content_digest()
    assert LesionDataset(tiny_data, "train").content_digest() == before  # a copy: the same
    path = _first_train_image(copy)
    img = np.array(Image.open(path))
    img.flat[0] = 255 - img.flat[0]  # one pixel
    Image.fromarray(img).save(path)
    assert dataset_digest(copy) == dataset_digest(tiny_data)  # the manifest digest is blind
    assert LesionDataset(copy, "train").content_digest() != before


@pytest.fixture(scope="module")
def det_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("det") / "run"
    train(tiny_data, {"method": "erm", "epochs": 1, "width": 4, "threads": 1, "seed": 2,
                      "deletion_fractions": [0.1]}, run, progress=False)
    return run


def test_run_records_environment_and_data_content(det_run, tiny_data, tmp_path):
    """config.yaml held the causalign and torch versions only: not the source commit, Python
    / NumPy versions, machine, resolved device, the thread count actually used (threads 0 =
    torch's default, machine-dependent), the world size nor a digest of the pixels. The run's
    own config.yaml still works as --config (the records are provenance, not settings)."""
    run = det_run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    env = cfg["environment"]
    assert env["device"] == "cpu" and env["threads"] == 1 and env["world_size"] == 1
    assert env["python"] and env["numpy"] == np.__version__ and env["platform"]
    assert "causalign_commit" in env
    assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    digest = cfg["data_content_digest"]
    assert isinstance(digest, str) and len(digest) == 16
    # the stored config is still a valid configuration (provenance keys are no settings)
    from causalign.engine.trainer import stored_config

    assert stored_config(run).seed == 2
    # a copy of the data in another folder: the same content digest
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    from causalign.engine.provenance import content_digest

    splits = [LesionDataset(copy, s) for s in ("train", "val", "test")]
    assert content_digest(splits) == digest


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_commit_of_a_checkout(tmp_path):
    """The commit causalign runs from, marked -dirty when src/ has uncommitted edits; None
    outside a causalign checkout (an installed wheel)."""
    from causalign.engine.provenance import source_commit

    root = tmp_path / "repo"
    (root / "src" / "causalign").mkdir(parents=True)
    f = root / "src" / "causalign" / "x.py"
    f.write_text("a = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    assert source_commit(root) is None  # no .git yet
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD")
    assert source_commit(root) == head
    f.write_text("a = 2\n")
    assert source_commit(root) == head + "-dirty"
    assert source_commit(tmp_path) is None  # not a checkout of causalign


def test_counterfactual_summary_names_its_weights_data_and_machine(det_run, tmp_path, capsys):
    """summary.json held the search settings only: not which run / weights file made x*, on
    which data, with which batch size (x* changes with it in float32), threads or versions."""
    from causalign.cli import main

    out = tmp_path / "cf"
    assert main(["counterfactual", str(det_run), "--limit", "2", "--steps", "2", "--out",
                 str(out), "--no-progress"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    prov = summary["provenance"]
    assert summary["batch_size"] == 32
    assert prov["run"] == str(det_run.resolve()) and prov["weights"] == "best.pt"
    # the digest atomic_torch_save wrote beside the weights
    assert prov["weights_sha256"] == (det_run / "best.pt.sha256").read_text().split()[0]
    test = LesionDataset(prov["data"], "test")
    from causalign.engine.provenance import content_digest

    assert prov["split_content_digest"] == content_digest([test])
    assert prov["environment"]["device"] == "cpu" and prov["environment"]["threads"] >= 1


def test_content_digest_of_a_dataset_without_attributes(tiny_data):
    # A dataset with no attribute columns holds an (N, 0) array; memoryview cannot cast a
    # view with a zero in its shape, so every run on such data failed at its start.
    from causalign.data.format import LesionDataset

    ds = LesionDataset(tiny_data, "train")
    full = ds.content_digest()
    ds.attributes = ds.attributes[:, :0]
    empty = ds.content_digest()
    assert len(empty) == 64 and empty != full
