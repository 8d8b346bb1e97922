"""Audit of "nothing lost when a run is interrupted" for causal-align: a Trainer whose fit()
was interrupted before its first checkpoint and is fitted again, and a --resume whose best
epoch lives only in a damaged or missing best.pt."""

from __future__ import annotations

import pytest
import torch
from test_resume_equivalence import _history, _interrupt_mid_epoch, _Stop

from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.engine.trainer import Trainer, load_checkpoint
from causalign.io import atomic_torch_save
from causalign.methods.base import method_class


def _cfg(epochs: int = 2, **kw) -> TrainConfig:
    settings = dict(method="causal-align", width=4, batch_size=16, seed=3, deterministic=True,
                    threads=1, eval_saliency="gradient", deletion_fractions=[0.1],
                    method_args={"steps": 2})
    return TrainConfig(epochs=epochs, **{**settings, **kw})


def test_fit_again_after_an_interrupt_before_the_first_checkpoint_equals_a_fresh_run(
        tiny_data, tmp_path, monkeypatch):
    # Before: the second fit() kept the interrupted fit's method state (step counter, so
    # align_every's phase, and the warm-start cache of the steps it had taken), so its run
    # differed from an uninterrupted one: other weights, history and metrics.
    cfg = dict(method_args={"steps": 2, "align_every": 2})
    full = tmp_path / "full"
    train(tiny_data, _cfg(**cfg), full, progress=False)
    run = tmp_path / "run"
    trainer = Trainer(tiny_data, _cfg(**cfg), run, resume=True, progress=False)
    with monkeypatch.context() as m:
        _interrupt_mid_epoch(m, "causal-align", epoch=1, after_steps=2)
        with pytest.raises(_Stop), pytest.warns(UserWarning, match="found no checkpoint"):
            trainer.fit()
    assert not (run / "checkpoint.pt").exists()  # premise: nothing to resume from
    with pytest.warns(UserWarning, match="found no checkpoint.pt to continue"):
        trainer.fit()
    assert _history(run) == _history(full)
    assert (run / "metrics.json").read_text() == (full / "metrics.json").read_text()
    a, b = (torch.load(r / "checkpoint.pt", weights_only=False) for r in (full, run))
    assert a["method_state"]["step"] == b["method_state"]["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.fixture
def best_elsewhere(tiny_data, tmp_path, monkeypatch):
    """A run interrupted after epoch 2 of 3 whose best epoch is 1: only best.pt holds it."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_mid_epoch(m, "causal-align", epoch=3, after_steps=0)
        with pytest.raises(_Stop):
            train(tiny_data, _cfg(epochs=3), run, progress=False)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 2
    # epoch 1 the best one, and unbeatable (AUC <= 1); best.pt relabelled to match
    atomic_torch_save(run / "checkpoint.pt", {**ckpt, "best_epoch": 1, "best_score": 2.0})
    atomic_torch_save(run / "best.pt", {**load_checkpoint(run / "best.pt"), "epoch": 1})
    return run


@pytest.mark.parametrize("damage", ["truncated", "missing", "other-epoch"])
def test_resume_refuses_a_lost_best_epoch_before_training(best_elsewhere, tiny_data, damage,
                                                          capsys, monkeypatch):
    # Before: --resume trained every remaining epoch and only then failed in the final
    # evaluation (best.pt corrupt / not found), or evaluated best.pt's other epoch as the
    # best one; the checkpoint then held the last epoch and every later --resume failed
    # the same way, so the run could never finish.
    run = best_elsewhere
    best = run / "best.pt"
    if damage == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
    elif damage == "missing":
        best.unlink()
        (run / "best.pt.sha256").unlink()
    else:
        atomic_torch_save(best, {**load_checkpoint(best), "epoch": 2})
    before = (run / "checkpoint.pt").read_bytes()
    calls = {"n": 0}
    cls = method_class("causal-align")
    call = cls.__call__

    def counted(self, model, batch):
        calls["n"] += 1
        return call(self, model, batch)

    monkeypatch.setattr(cls, "__call__", counted)
    rc = main(["train", str(tiny_data), "--out", str(run), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert calls["n"] == 0, "trained before refusing"
    assert (run / "checkpoint.pt").read_bytes() == before
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "best.pt" in lines[0]
    assert "best epoch 1" in lines[0] and "new --out" in lines[0]
    assert not (run / "metrics.json").exists()


def test_resume_with_an_intact_earlier_best_epoch_finishes(best_elsewhere, tiny_data):
    # the check above must not refuse the ordinary case
    metrics = train(tiny_data, _cfg(epochs=3), best_elsewhere, resume=True, progress=False)
    assert metrics["epochs"] == 3 and metrics["best_epoch"] == 1


def test_an_autoencoder_file_with_non_finite_weights_is_one_line(tiny_data, tmp_path, capsys):
    # Before: accepted; every latent counterfactual decoded to NaN and was reset, so the run
    # trained plain CE under causal-align's name (train_cf_diverged 1.0, a warning at the end).
    from causalign.models.autoencoder import (
        ConvAutoencoder,
        autoencoder_state,
        load_autoencoder,
        save_autoencoder,
    )

    good = tmp_path / "ae.pt"
    save_autoencoder(good, ConvAutoencoder(1, 4, 2))
    load_autoencoder(good)  # a finite one loads
    state = autoencoder_state(ConvAutoencoder(1, 4, 2))
    state["state"]["decoder.0.bias"][0] = float("nan")
    bad = tmp_path / "nan.pt"
    atomic_torch_save(bad, state)
    run = tmp_path / "run"
    rc = main(["train", str(tiny_data), "--method", "causal-align", "--out", str(run),
               "--epochs", "1", "--set", "width=4", "--set", "threads=1",
               "--set", "method.space=latent", "--set", "method.steps=1",
               "--set", f"method.autoencoder={bad}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert lines == [f"error: {bad}: damaged autoencoder state (non-finite weights in "
                     f"decoder.0.bias)"]
    assert not (run / "checkpoint.pt").exists()
