"""Resume audit of paths the earlier audits left out: an interrupted multi-view volume run
(ERM, PPI, causal-align) resumes bitwise; --resume of a volume run refuses changed settings,
changed data and a damaged checkpoint with one line; and a best.pt of another architecture
(copied from another run) no longer ends a resume in load_state_dict's traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_resume_audit import _cfg as _audit_cfg
from test_resume_audit import best_elsewhere  # noqa: F401 (fixture)
from test_resume_equivalence import _cfg, _check_method

from causalign.cli import main
from causalign.data.synth import SynthConfig, generate
from causalign.engine import train
from causalign.errors import CausalignError
from causalign.io import atomic_torch_save


@pytest.fixture(scope="module")
def vol_data(tmp_path_factory) -> Path:
    """48 / 16 / 16 volumes of 4 x 32 x 32."""
    root = tmp_path_factory.mktemp("vol") / "data"
    generate(root, SynthConfig(n_train=48, n_val=16, n_test=16, size=32, depth=4, seed=3))
    return root


# ---------------------------------------------------------------- volumes, bitwise


@pytest.mark.parametrize("method, method_args", [
    ("erm", {}),
    ("ppi", {}),
    ("causal-align", {"steps": 2, "align_every": 2}),
])
def test_multiview_run_interrupted_mid_epoch_resumes_bitwise(vol_data, tmp_path, monkeypatch,
                                                             method, method_args):
    """Guard (passes on the code): the multiview model draws its training slices from
    torch's global RNG, which the checkpoint restores. Killed in epoch 2's second step and
    resumed, metrics.json, history, checkpoint (model, optimiser, method state, RNG) and
    best.pt equal the uninterrupted run's."""
    _check_method(method, vol_data, tmp_path, monkeypatch, model="multiview",
                  method_args=method_args)


def test_multiview_balanced_sampler_resumes_bitwise(vol_data, tmp_path, monkeypatch):
    """Guard: the balanced sampler's draws with replacement on volumes, resumed."""
    _check_method("erm", vol_data, tmp_path, monkeypatch, model="multiview",
                  sampler="balanced")


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def vol_run(vol_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("volrun") / "run"
    train(vol_data, _cfg("ppi", epochs=1, model="multiview"), run, progress=False)
    (run / "metrics.json").unlink()  # as if killed in the final evaluation
    return run


ARGS = ["--method", "ppi", "--model", "multiview", "--epochs", "1", "--seed", "3",
        "--set", "width=4", "--set", "batch_size=16", "--set", "deterministic=true",
        "--set", "threads=1", "--set", "eval_saliency=gradient",
        "--set", "deletion_fractions=[0.1]", "--no-progress", "--resume"]


def _resume(data: Path, run: Path, *extra: str) -> int:
    return main(["train", str(data), "--out", str(run), *ARGS, *extra])


@pytest.mark.parametrize("extra, says", [
    (["--set", "model.train_slices=3"], "model_args"),
    (["--set", "lr=0.5"], "lr 0.001 -> 0.5"),
    (["--epochs", "3"], "epochs 1 -> 3"),
])
def test_volume_resume_refuses_changed_settings(vol_run, vol_data, tmp_path, capsys, extra,
                                                says):
    """Guard: one error line naming the setting, rc != 0, nothing written."""
    run = tmp_path / "run"
    shutil.copytree(vol_run, run)
    assert _resume(vol_data, run, *extra) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and says in err[0]
    assert not (run / "metrics.json").exists()


def test_volume_resume_refuses_edited_volume_and_damaged_checkpoint(vol_run, vol_data,
                                                                    tmp_path, capsys):
    """Guard: a volume edited in place (same manifest) and a truncated checkpoint.pt."""
    import numpy as np
    data = tmp_path / "data"
    shutil.copytree(vol_data, data)
    first = sorted((data / "images").glob("*.npy"))[0]
    np.save(first, np.load(first) * 0.5)
    run = tmp_path / "run"
    shutil.copytree(vol_run, run)
    assert _resume(data, run) != 0
    assert "read differently than when it started" in capsys.readouterr().err
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    assert _resume(vol_data, run) != 0
    assert "checkpoint is corrupt or truncated" in capsys.readouterr().err


# ---------------------------------------------------------------- a foreign best.pt


@pytest.fixture(scope="module")
def foreign_best(tiny_data, tmp_path_factory) -> dict:
    """A 2D cnn7 run's best.pt (epoch 1): valid file, digest, epoch; another architecture."""
    run = tmp_path_factory.mktemp("foreign") / "run"
    train(tiny_data, _cfg("ppi", epochs=1), run, progress=False)
    return torch.load(run / "best.pt", weights_only=False)


def test_resume_with_a_foreign_best_pt_of_the_same_epoch_rewrites_it(vol_run, vol_data,
                                                                     foreign_best, tmp_path,
                                                                     capsys):
    """The checkpoint holds the best epoch (1), so best.pt is rewritten from it, as for a
    missing one. Before: best.pt was taken on its epoch number alone and the final
    evaluation died in load_state_dict (rc 1, ~80 lines of missing/unexpected keys)."""
    run = tmp_path / "run"
    shutil.copytree(vol_run, run)
    atomic_torch_save(run / "best.pt", foreign_best)
    assert _resume(vol_data, run) == 0, capsys.readouterr().err[-400:]
    best = torch.load(run / "best.pt", weights_only=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert best["epoch"] == 1 and best["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(best["model"][k], ckpt["model"][k]) for k in best["model"])


def test_resume_with_a_foreign_best_pt_of_an_earlier_epoch_stops_before_training(
        best_elsewhere, tiny_data, vol_run):  # noqa: F811 (the fixture)
    """best.pt is the only copy of the earlier best epoch 1: one that does not fit the model
    (here a multiview run's, epoch 1) is refused before training, as a missing or damaged
    one is. Before: epoch 3 trained and the final evaluation died in load_state_dict."""
    atomic_torch_save(best_elsewhere / "best.pt",
                      torch.load(vol_run / "best.pt", weights_only=False))
    with pytest.raises(CausalignError, match="best.pt: does not fit the model"):
        train(tiny_data, _audit_cfg(epochs=3), best_elsewhere, resume=True, progress=False)
    ckpt = torch.load(best_elsewhere / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2  # nothing trained


@pytest.mark.parametrize("method", ["ppi", "hier-align"])
def test_ppi_and_hier_align_with_balanced_sampler_resume_bitwise(tiny_data, tmp_path,
                                                                 monkeypatch, method):
    """Guard: the balanced sampler's repeated samples with PPI's map terms and hier-align's
    warm-start cache (keyed by sample index), interrupted in epoch 2 and resumed."""
    _check_method(method, tiny_data, tmp_path, monkeypatch, sampler="balanced")
