"""Training-loop edge cases: a final batch of one sample, per-part history means, and the
order of checkpoint.pt and best.pt under a kill."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import causalign.engine.trainer as trainer_mod
from causalign.cli import main
from causalign.engine import TrainConfig, train
from causalign.engine.trainer import load_checkpoint
from causalign.errors import CausalignError, TrainingTroubleWarning


def _cfg(**kw) -> TrainConfig:
    base = dict(method="erm", epochs=1, width=4, batch_size=16, seed=0, device="cpu",
                deletion_fractions=[0.1], eval_saliency="gradcam")
    base.update(kw)
    return TrainConfig(**base)


def _rows(run) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ a batch of one sample


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from causalign.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("d16") / "data"
    generate(root, SynthConfig(n_train=16, n_val=4, n_test=4, size=32, seed=3))
    return root


def test_final_batch_of_one_sample_is_dropped_for_batchnorm(data16, tmp_path, monkeypatch):
    """16 training samples in batches of 15 left a last batch of one: resnet18's BatchNorm
    at 1x1 raised "Expected more than 1 value per channel when training" (a traceback).
    The drop applies to every BatchNorm model; cnn7 (which has BatchNorm) shows it without
    resnet18's 180 MB of checkpoints, which once filled a CI machine's disk."""
    seen: list[torch.Tensor] = []
    real_batches = trainer_mod.iterate_batches

    def recording(dataset, batch_size, shuffle=False, **kw):
        for batch in real_batches(dataset, batch_size, shuffle=shuffle, **kw):
            # the training epochs pass their sampler's order (`epoch_order`); BatchNorm
            # recalibration and evaluation run in split order
            if shuffle or kw.get("order") is not None:
                seen.append(batch["index"].clone())
            yield batch

    monkeypatch.setattr(trainer_mod, "iterate_batches", recording)
    cfg = _cfg(model="cnn7", batch_size=15, epochs=2, eval_saliency="gradient")
    metrics = train(data16, cfg, tmp_path / "r", progress=False)
    assert metrics["epochs"] == 2
    assert [len(i) for i in seen] == [15, 15]  # one step per epoch, none of one sample
    # reshuffled every epoch: over the epochs every sample is still trained on
    assert set(torch.cat(seen).tolist()) == set(range(16))
    assert len(_rows(tmp_path / "r")) == 2


def test_batch_size_one_with_batchnorm_at_1x1_is_one_clear_line(tiny_data, tmp_path, capsys):
    rc = main(["train", str(tiny_data), "--model", "resnet18", "--batch-size", "1",
               "--epochs", "1", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / "r")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: batch_size 1 gives a training batch of one sample"), err
    assert "resnet18" in err[0] and "Traceback" not in err[0]


def test_single_sample_training_split_with_batchnorm_at_1x1_is_one_clear_line(tmp_path):
    from causalign.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=1, n_val=4, n_test=4, size=32, seed=3))
    with pytest.raises(CausalignError, match="training split holds a single sample"), \
            pytest.warns(UserWarning, match="training split holds only class"):
        train(data, _cfg(model="resnet18", width=16), tmp_path / "r", progress=False)


def test_batch_size_one_trains_where_batchnorm_allows(tiny_data, tmp_path):
    """cnn7's BatchNorm layers all see more than one pixel: a batch of one is legitimate."""
    metrics = train(tiny_data, _cfg(batch_size=1), tmp_path / "r", progress=False)
    assert metrics["epochs"] == 1
    row = _rows(tmp_path / "r")[0]
    assert float(row["train_loss"]) > 0


# ------------------------------------------------------------------ history means per part


def test_epoch_means_average_each_part_over_the_steps_that_reported_it():
    from causalign.engine.trainer import _accumulate, _epoch_means

    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    one = torch.tensor(1.0)
    _accumulate(sums, weights, one, {"ce": 1.0, "align_step": 0.0}, 10)
    _accumulate(sums, weights, one, {"ce": 3.0, "align_step": 1.0, "cg_converged": 1.0}, 10)
    # a step that ran alignment but dropped every sample reports a real 0: it counts
    _accumulate(sums, weights, one, {"ce": 2.0, "align_step": 1.0, "cg_converged": 0.0}, 20)
    means = _epoch_means(sums, weights)
    assert means["train_loss"] == 1.0
    assert means["train_ce"] == pytest.approx((10 + 30 + 40) / 40)
    assert means["train_align_step"] == pytest.approx(30 / 40)
    assert means["train_cg_converged"] == pytest.approx(10 / 30)  # not 10 / 40
    assert "train_flip_rate" not in means  # never reported: stays absent


def test_history_cg_converged_is_not_diluted_by_steps_without_alignment(tiny_data, tmp_path):
    """causal-align with align_every=2 on 3 steps per epoch: CG converged on both aligned
    steps, but history.csv read train_cg_converged 0.667 (averaged over all 3 steps)."""
    cfg = _cfg(method="causal-align", method_args={"align_every": 2})
    train(tiny_data, cfg, tmp_path / "r", progress=False)
    row = _rows(tmp_path / "r")[0]
    assert float(row["train_align_step"]) == pytest.approx(2 / 3, abs=1e-5)
    assert float(row["train_cg_converged"]) == 1.0
    assert float(row["train_flip_rate"]) == 1.0
    assert float(row["train_n_align"]) == 16.0  # every sample of an aligned step annotated


def test_erm_history_has_no_columns_for_parts_it_never_reports(tiny_data, tmp_path):
    train(tiny_data, _cfg(), tmp_path / "r", progress=False)
    header = (tmp_path / "r" / "history.csv").read_text().splitlines()[0].split(",")
    assert not any(k.startswith("train_cg") or k == "train_align_step" for k in header)


# ------------------------------------------------------------------ best.pt vs checkpoint.pt


def test_kill_between_checkpoint_and_best_then_resume_keeps_them_consistent(
        tiny_data, tmp_path, monkeypatch):
    """A kill between the two saves of an improving epoch must never leave a best.pt from an
    epoch the checkpoint does not record (resume would rerun that epoch, on a GPU not
    identically), and after --resume best.pt must be the checkpoint's best epoch."""
    cfg = _cfg(epochs=2, select_metric="loss", deterministic=True)
    full = tmp_path / "full"
    train(tiny_data, cfg, full, progress=False)
    full_best = load_checkpoint(full / "best.pt")
    assert full_best["epoch"] == 2  # premise: the last epoch improves (so saves best.pt)

    run = tmp_path / "run"
    real_save = trainer_mod.atomic_torch_save
    saved_epochs: list[int] = []

    def save_then_die(path, obj):
        # the second file written for the last epoch: the process dies before writing it
        if obj["epoch"] == cfg.epochs and cfg.epochs in saved_epochs:
            raise KeyboardInterrupt
        saved_epochs.append(obj["epoch"])
        real_save(path, obj)

    monkeypatch.setattr(trainer_mod, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, cfg, run, progress=False)
    monkeypatch.setattr(trainer_mod, "atomic_torch_save", real_save)

    ckpt = load_checkpoint(run / "checkpoint.pt")
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] <= ckpt["epoch"], "best.pt holds an epoch the checkpoint lacks"

    metrics = train(tiny_data, cfg, run, resume=True, progress=False)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == ckpt["best_epoch"] == metrics["best_epoch"] == 2
    for k, v in full_best["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 2


# ------------------------------------------------------------------ process-wide settings


def test_train_restores_torch_threads_and_deterministic_mode(tiny_data, tmp_path):
    """`threads` and `deterministic` used to stay in force after train() returned."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    want_threads = 1 if before[0] != 1 else 2
    train(tiny_data, _cfg(deterministic=not before[1], threads=want_threads), tmp_path / "r",
          progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


# ------------------------------------------------------------------ an exploding loss


def test_exploding_loss_names_the_epochs_and_suggests_a_smaller_lr():
    from causalign.engine.trainer import exploding_loss

    history = [{"epoch": 1, "train_ce": 118.6}, {"epoch": 2, "train_ce": 6.2},
               {"epoch": 3, "train_cls": "inf"}, {"epoch": 4, "train_ce": ""}]
    (line,) = exploding_loss(history, num_classes=2, lr=1e-3)
    # 10 x ln 2 = 6.93: epochs 1 and 3 (a non-finite mean counts), not 2 (6.2 is below)
    assert "in 2 epoch(s), first epoch 1 (worst inf)" in line
    assert "try a smaller --lr (this run: 0.001)" in line
    # the bound scales with ln C: 12 is below 10 x ln 5 = 16.1
    assert exploding_loss([{"epoch": 1, "train_ce": 12.0}], num_classes=5, lr=1e-3) == []
    assert exploding_loss([{"epoch": 1, "train_ce": 12.0}], num_classes=2, lr=1e-3) != []


def test_an_exploding_loss_is_warned_at_once_and_kept_in_metrics(data16, tmp_path, capfd):
    """Adam at lr 3 overshoots on this data in epoch 1 (mean training CE 35 against ln 2) and
    then recovers (4.4, 2.5): the run finishes with finite weights, so the warning is all that
    tells the user; it comes on stderr in that epoch, once, and again in metrics.json."""
    with pytest.warns(TrainingTroubleWarning) as caught:
        metrics = train(data16, _cfg(epochs=3, lr=3.0, batch_size=8), tmp_path / "run",
                        progress=False)
    lines = [str(w.message) for w in caught if w.category is TrainingTroubleWarning]
    assert len(lines) == 1 and lines[0].startswith("epoch 1: exploding loss"), lines
    assert any(w.startswith("exploding loss") for w in metrics.get("warnings", []))
    # the same settings at the default lr give no such warning
    ok = train(data16, _cfg(epochs=3, batch_size=8), tmp_path / "ok", progress=False)
    assert not any("exploding" in w for w in ok.get("warnings", []))
    assert "exploding" not in capfd.readouterr().err


def test_training_trouble_can_stop_a_run_and_the_run_resumes(data16, tmp_path):
    """Turned into an error, the early warning stops the run after its epoch is saved: the
    run resumes from that epoch. Before 1207f the warning was a print that no filter could
    catch, so a script could not stop a run at the first sign of trouble."""
    import warnings

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingTroubleWarning)
        with pytest.raises(TrainingTroubleWarning, match="epoch 1: exploding loss"):
            train(data16, _cfg(epochs=3, lr=3.0, batch_size=8), run, progress=False)
    assert [r["epoch"] for r in _rows(run)] == ["1"]  # epoch 1 written before the warning
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingTroubleWarning)
        metrics = train(data16, _cfg(epochs=3, lr=3.0, batch_size=8), run, resume=True,
                        progress=False)
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]
    assert any(w.startswith("exploding loss") for w in metrics.get("warnings", []))


def test_the_command_line_shows_training_trouble_as_one_line(data16, tmp_path, capfd):
    """Guard: as a Python warning, the trainer's early warning still reaches `causalign
    train`'s stderr as one `warning: epoch E: …` line, not Python's file:line format."""
    from causalign import cli

    code = cli.main([ "train", str(data16), "--method", "erm", "--out", str(tmp_path / "run"),
                     "--epochs", "1", "--lr", "3", "--batch-size", "8", "--set", "width=4",
                     "--no-progress"])
    err = capfd.readouterr().err
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "exploding loss" in ln]
    assert lines and lines[0].startswith("warning: epoch 1: exploding loss"), err
    assert "TrainingTroubleWarning" not in err and "trainer.py" not in err, err
