"""Mutation audit of the training engine (trainer, config, inference, export): behaviours the
earlier tests let slip."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import causalign.engine.export as export_mod
from causalign.data.format import LesionDataset
from causalign.engine import TrainConfig, train
from causalign.engine.config import apply_overrides
from causalign.engine.trainer import (
    BEST,
    CHECKPOINT,
    Trainer,
    _accumulate,
    _epoch_means,
    _fmt,
    check_stand_in,
    dihedral_augment,
    history_columns,
    load_checkpoint,
    load_run,
    recalibrate_batchnorm,
)
from causalign.errors import CausalignError, ConfigError, NumericalError
from causalign.methods import build_method


def _cfg(**kw) -> TrainConfig:
    base = dict(method="erm", model="cnn7", epochs=1, width=4, batch_size=16, seed=0,
                device="cpu", deletion_fractions=[0.1], eval_saliency="gradient")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run2(tiny_data, tmp_path_factory):
    """A finished 2-epoch cnn7 run (BatchNorm, recalibrated) on the 32 px tiny dataset."""
    out = tmp_path_factory.mktemp("mutengine") / "run"
    train(tiny_data, _cfg(epochs=2), out, progress=False)
    return out


# ------------------------------------------------------------------ selection and means


def test_selection_score_falls_back_to_balanced_accuracy_and_negates_loss():
    """`_score`: AUC undefined (one class in val) falls back to balanced accuracy, not plain
    accuracy; `select_metric=loss` scores lower losses higher. Kills the mutant reading
    `accuracy` in the fallback."""
    me = SimpleNamespace(cfg=SimpleNamespace(select_metric="auc"))
    metrics = {"auc": None, "balanced_accuracy": 0.55, "accuracy": 0.9, "loss": 0.3}
    assert Trainer._score(me, metrics) == 0.55
    assert Trainer._score(me, {"auc": None}) == -math.inf
    me.cfg.select_metric = "loss"
    assert Trainer._score(me, metrics) == -0.3


def test_epoch_means_divide_each_part_by_its_own_weight():
    """history's train_* columns: a part reported on a subset of steps (or with its own
    `part_weights`) is averaged over those samples only. Kills mutants that divide every
    part by the loss's weight or ignore `part_weights`."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    _accumulate(sums, weights, torch.tensor(1.0), {"cg": 0.5}, 16, {"cg": 2})
    _accumulate(sums, weights, torch.tensor(3.0), {}, 16)
    _accumulate(sums, weights, torch.tensor(2.0), {"cg": 1.0}, 8, {"cg": 6})
    means = _epoch_means(sums, weights)
    assert means["train_loss"] == pytest.approx((16 * 1 + 16 * 3 + 8 * 2) / 40)
    assert means["train_cg"] == pytest.approx((2 * 0.5 + 6 * 1.0) / 8)


def test_history_columns_put_train_accuracy_after_the_parts_and_before_val():
    """history.csv's header groups: epoch, train_* parts, train_accuracy, val_*, other,
    seconds (a part first seen in a later epoch still lands among the parts)."""
    rows = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_auc": 0.6,
             "seconds": 1.0},
            {"epoch": 2, "train_loss": 1.0, "train_accuracy": 0.5, "val_auc": 0.6,
             "seconds": 1.0, "train_ce": 0.2, "other": 3}]
    assert history_columns(rows) == ["epoch", "train_loss", "train_ce", "train_accuracy",
                                     "val_auc", "other", "seconds"]


def test_history_cells_keep_six_significant_digits():
    """history.csv's floats: 6 significant digits (`_fmt`), None as an empty cell."""
    assert _fmt(0.123456789) == "0.123457"
    assert _fmt(None) == "" and _fmt(3) == "3"


def test_among_equally_scored_epochs_the_later_is_selected(tiny_data, tmp_path,
                                                            monkeypatch):
    """Best-epoch selection uses ">=": with every epoch scored alike, the last one is kept
    (best.pt and metrics.json's best_epoch). Kills ">" (the first epoch kept)."""
    import causalign.engine.trainer as trainer_mod

    real = trainer_mod.quick_metrics

    def constant(*a, **kw):
        out = real(*a, **kw)
        out.update(auc=0.7, accuracy=0.5, balanced_accuracy=0.5, loss=1.0)
        return out

    monkeypatch.setattr(trainer_mod, "quick_metrics", constant)
    metrics = train(tiny_data, _cfg(epochs=2), tmp_path / "r", progress=False)
    assert metrics["best_epoch"] == 2
    assert load_checkpoint(tmp_path / "r" / BEST)["epoch"] == 2


# ------------------------------------------------------------------ guards


def test_a_checkpoint_written_before_epoch_one_cannot_stand_in_for_best(tmp_path):
    """`check_stand_in`: a checkpoint.pt of epoch 0 (space=latent's, before training) holds
    the random initialisation: refused. Kills `epoch < 1` -> `epoch < 0`."""
    with pytest.raises(CausalignError, match="before the run's first epoch"):
        check_stand_in({"epoch": 0, "best_epoch": 0}, tmp_path / CHECKPOINT)
    check_stand_in({"epoch": 2, "best_epoch": 2}, tmp_path / CHECKPOINT)  # best itself: ok


def test_non_finite_batchnorm_statistics_are_refused():
    """`_check_finite_weights` checks floating buffers too (BatchNorm running statistics
    overflow on absurd intensities while every parameter stays finite). Kills the mutant
    that checks parameters only."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    Trainer._check_finite_weights(SimpleNamespace(model=model), 1)  # finite: passes
    model[1].running_var[0] = math.inf
    with pytest.raises(NumericalError, match="BatchNorm"):
        Trainer._check_finite_weights(SimpleNamespace(model=model), 1)


def test_a_fractional_integer_setting_is_refused():
    """`epochs=2.5` is a user error, not silently truncated to 2."""
    with pytest.raises(ConfigError, match="epochs"):
        apply_overrides(TrainConfig(), {"epochs": 2.5})
    assert apply_overrides(TrainConfig(), {"epochs": 3.0}).epochs == 3


# ------------------------------------------------------------------ augmentation


def test_dihedral_flips_each_sample_as_its_record_says():
    """`dihedral_augment`: sample i is flipped along H when dihedral[i, 0], along W when
    dihedral[i, 1], then transposed when dihedral[i, 2], the same for image and mask.
    Reference applied here sample by sample. Kills a W flip done along H."""
    n = 16
    image = torch.arange(n * 2 * 5 * 5, dtype=torch.float32).reshape(n, 2, 5, 5)
    mask = image[:, :1] * 2
    batch = {"image": image, "mask": mask, "label": torch.zeros(n, dtype=torch.long)}
    out = dihedral_augment(batch, torch.Generator().manual_seed(0))
    flags = out["dihedral"]
    assert flags[:, 0].any() and flags[:, 1].any() and flags[:, 2].any()
    for key in ("image", "mask"):
        for i in range(n):
            x = batch[key][i]
            if flags[i, 0]:
                x = x.flip(-2)
            if flags[i, 1]:
                x = x.flip(-1)
            if flags[i, 2]:
                x = x.transpose(-2, -1)
            assert torch.equal(out[key][i], x), (key, i, flags[i])


# ------------------------------------------------------------------ BatchNorm recalibration


def _bn_reference(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each BatchNorm's statistics of one train-mode pass over all images (momentum 1)."""
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = 1.0
    ref.train()
    with torch.no_grad():
        ref(images)
    return [m.running_mean.clone() for m in ref.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_recalibration_sets_batchnorm_statistics_to_the_training_split(tiny_data):
    """`recalibrate_batchnorm` with one batch holding the whole split gives every BatchNorm
    the split's own batch statistics, and leaves the model in the mode it was in. Kills a
    recalibration that returns early."""
    from causalign.models import build_model

    ds = LesionDataset(tiny_data, "train")
    torch.manual_seed(0)
    model = build_model("cnn7", in_channels=ds.image_shape[0], num_outputs=ds.num_classes,
                        width=4)
    model.eval()
    want = _bn_reference(model, ds.image_batch(torch.arange(len(ds))))
    recalibrate_batchnorm(model, build_method("erm"), ds, batch_size=len(ds),
                          device=torch.device("cpu"))
    got = [m.running_mean for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not model.training and len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_trained_run_keeps_recalibrated_statistics(run2, tiny_data):
    """bn_recalibrate=True (the default): best.pt's BatchNorm statistics are those of the
    final weights over the training split (recalibrating them again changes nothing), not the
    momentum averages of training. Kills a skipped or inverted `bn_recalibrate` in `_fit`."""
    _, model, method, _ = load_run(run2, device="cpu")
    before = [m.running_mean.clone() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    recalibrate_batchnorm(model, method, LesionDataset(tiny_data, "train"), batch_size=16,
                          device=torch.device("cpu"))
    after = [m.running_mean for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ load_run


def test_load_run_prefers_best_and_returns_an_eval_model(run2):
    """`load_run` loads best.pt (not checkpoint.pt) when both exist, in eval mode; its
    weights are best.pt's. Kills checkpoint-first and a dropped `model.eval()`."""
    _, model, _, _ = load_run(run2, device="cpu")
    assert model.causalign_weights["weights"] == BEST
    assert not model.training and not any(m.training for m in model.modules())
    best = load_checkpoint(run2 / BEST)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


# ------------------------------------------------------------------ resume of a finished run


def test_resume_of_finished_run_reevaluates_when_metrics_name_another_best_epoch(
        run2, tiny_data, tmp_path):
    """`_finished_metrics`: stored metrics.json is returned as is only when its epochs and
    best_epoch match the checkpoint's; a metrics.json naming another best epoch is evaluated
    again (and rewritten). Kills the mutant that ignores best_epoch."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run2, run)
    stored = json.loads((run / "metrics.json").read_text())
    true_best = load_checkpoint(run / CHECKPOINT)["best_epoch"]
    stored["best_epoch"] = 3 - true_best  # the other of the two epochs
    (run / "metrics.json").write_text(json.dumps(stored))
    metrics = train(tiny_data, _cfg(epochs=2), run, resume=True, progress=False)
    assert metrics["best_epoch"] == true_best
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == true_best
    with open(run / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


# ------------------------------------------------------------------ export


def _spy_load_run(monkeypatch, hook):
    real = export_mod.load_run

    def wrapped(*a, **kw):
        cfg, model, method, data = real(*a, **kw)
        hook(model)
        return cfg, model, method, data

    monkeypatch.setattr(export_mod, "load_run", wrapped)


def test_export_compares_logits_at_batch_sizes_one_and_three(run2, tmp_path, monkeypatch):
    """The eager/program comparison runs at batch sizes 1 and 3 (other than the example's
    2, so a batch axis traced as a constant is caught). Kills a check at batch size 2 only."""
    seen: list[int] = []

    def hook(model):
        def record(module, args, out):
            if type(args[0].shape[0]) is int:  # eager calls (export traces symbolic sizes)
                seen.append(args[0].shape[0])

        model.register_forward_hook(record)

    _spy_load_run(monkeypatch, hook)
    export_mod.export_run(run2, tmp_path / "m.pt2")
    assert {1, 3} <= set(seen)


def test_export_refuses_a_program_whose_logits_are_nan(run2, tmp_path, monkeypatch):
    """A NaN difference (a model that outputs NaN) is not "within tolerance": refused, no
    file written. Kills `not diff <= tol` -> `diff > tol` (False for NaN)."""
    def hook(model):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(math.nan)

    _spy_load_run(monkeypatch, hook)
    with pytest.raises(CausalignError, match="differ"):
        export_mod.export_run(run2, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("key,bad", [("epochs", 0), ("lr", 0.0)])
def test_zero_epochs_and_zero_learning_rate_are_refused(key, bad):
    """`validate`: epochs >= 1 and lr > 0 (0 trained nothing). Kills `epochs < 0` and
    `0 <= lr`."""
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**{key: bad}).validate()


def test_predict_on_a_dataset_defaults_to_its_test_split(run2, tiny_data):
    """`predict_images` on a dataset folder without `split`: the test split (ids and labels
    as its manifest lists them). Kills a default of "val"."""
    from causalign.engine.inference import predict_images

    pred = predict_images(run2, tiny_data, device="cpu")
    test = LesionDataset(tiny_data, "test")
    assert pred.ids == [r.id for r in test.records]
    assert pred.labels == [int(r.label) for r in test.records]
