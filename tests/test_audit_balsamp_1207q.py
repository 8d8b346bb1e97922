"""Audit: the `sampler` training setting (none | balanced), class-balanced resampling.

`balanced` draws len(train) samples with replacement per epoch, sample i with probability
1 / (classes × count of its class); `none` must leave the batch order bit-identical to the
shuffled pass the trainer always made."""

from __future__ import annotations

import csv
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_cli_edges import _assert_user_error, _run
from test_resume_equivalence import _check_method

from causalign.data.format import MANIFEST
from causalign.engine import TrainConfig, train
from causalign.engine import distributed as D
from causalign.engine.benchmark import _at_unkeyed_default
from causalign.engine.evaluate import iterate_batches
from causalign.engine.trainer import epoch_order, sampler_probabilities
from causalign.errors import ConfigError
from causalign.methods.base import method_class

# 5 standard deviations: a seeded draw is fixed, but the bound is what a correct sampler
# meets with probability 1 - 6e-7 per check, so a passing seed is not luck
Z = 5.0


def _cfg(**kw) -> TrainConfig:
    base = dict(method="erm", epochs=2, width=4, batch_size=16, seed=3, threads=1,
                eval_saliency="gradient", deletion_fractions=[0.1], bn_recalibrate=False)
    return TrainConfig(**{**base, **kw})


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])


def _recorded_batches(monkeypatch, data: Path, cfg: TrainConfig, out: Path) -> list[list[int]]:
    """The dataset indices of every training batch, in the order the trainer fed them."""
    seen: list[list[int]] = []
    cls = method_class(cfg.method)
    call = cls.__call__

    def __call__(self, model, batch):
        if model.training:
            seen.append(batch["index"].tolist())
        return call(self, model, batch)

    with monkeypatch.context() as m:
        m.setattr(cls, "__call__", __call__)
        train(data, cfg, out, progress=False)
    return seen


# ---------------------------------------------------------------- the draw itself


def test_probabilities_are_one_over_classes_times_class_count():
    y = _labels([90, 10])
    p = sampler_probabilities(y, 2)
    assert p.dtype == torch.float64
    assert torch.equal(p[:90], torch.full((90,), 1 / (2 * 90), dtype=torch.float64))
    assert torch.equal(p[90:], torch.full((10,), 1 / (2 * 10), dtype=torch.float64))
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    # the same rule written out per sample: 1 / (K * count(label))
    y3 = _labels([5, 3, 2])
    expected = torch.tensor([1 / (3 * [5, 3, 2][int(k)]) for k in y3], dtype=torch.float64)
    assert torch.equal(sampler_probabilities(y3, 3), expected)


def test_class_frequencies_over_many_epochs_are_equal_within_a_binomial_bound():
    """Each draw is class c with probability 1/K; over N draws the class share has standard
    deviation sqrt((1/K)(1 - 1/K)/N). 60 epochs of 200 samples (10 % positives) must give
    each class's share within Z of those of 1/K, where `none` keeps it at exactly 0.1."""
    y = _labels([180, 20])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([epoch_order(y, 2, "balanced", g) for _ in range(60)])
    assert len(draws) == 60 * 200  # the epoch length is the split's
    share = torch.bincount(y[draws], minlength=2).double() / len(draws)
    sd = math.sqrt(0.5 * 0.5 / len(draws))
    assert (share - 0.5).abs().max() <= Z * sd, share
    g = torch.Generator().manual_seed(0)
    plain = torch.cat([epoch_order(y, 2, "none", g) for _ in range(60)])
    assert float((y[plain] == 1).double().mean()) == 0.1
    # three classes, very unequal
    y3 = _labels([300, 60, 12])
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([epoch_order(y3, 3, "balanced", g) for _ in range(40)])
    share = torch.bincount(y3[draws], minlength=3).double() / len(draws)
    sd = math.sqrt((1 / 3) * (2 / 3) / len(draws))
    assert (share - 1 / 3).abs().max() <= Z * sd, share


def test_per_sample_frequencies_match_the_formula():
    """Sample i's draw count over N draws is Binomial(N, p_i): every sample's count within Z
    (a 1e-4 union bound over 50 samples at Z=5) of N p_i."""
    y = _labels([40, 10])
    p = sampler_probabilities(y, 2)
    g = torch.Generator().manual_seed(2)
    draws = torch.cat([epoch_order(y, 2, "balanced", g) for _ in range(800)])
    n = len(draws)
    counts = torch.bincount(draws, minlength=50).double()
    z = (counts - n * p) / torch.sqrt(n * p * (1 - p))
    assert z.abs().max() <= Z, z.abs().max()
    assert counts[40:].mean() > 3.5 * counts[:40].mean()  # minority drawn 4x as often


def test_draw_is_deterministic_from_the_seed_and_differs_between_seeds():
    y = _labels([30, 6])

    def two_epochs(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [epoch_order(y, 2, "balanced", g).tolist() for _ in range(2)]

    assert two_epochs(4) == two_epochs(4)
    assert two_epochs(4) != two_epochs(5)
    a, b = two_epochs(4)
    assert a != b  # a new draw each epoch
    assert len(set(a)) < len(a)  # with replacement


def test_none_is_the_permutation_iterate_batches_shuffle_gave():
    """Guard: sampler=none draws what `iterate_batches(shuffle=True)` drew before the
    setting existed, from the same generator state, epoch after epoch."""
    y = _labels([11, 26])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        assert torch.equal(epoch_order(y, 2, "none", g1), torch.randperm(37, generator=g2))


# ---------------------------------------------------------------- in the trainer


def test_trainer_batches_default_none_are_the_old_shuffled_passes(tiny_data, tmp_path,
                                                                  monkeypatch):
    """Guard (passes on the base commit too): the default run's training batches are the
    old `iterate_batches(shuffle=True, generator=Generator(seed))` batches, bit for bit."""
    cfg = _cfg()
    seen = _recorded_batches(monkeypatch, tiny_data, cfg, tmp_path / "run")
    from causalign.data.format import LesionDataset

    ds = LesionDataset(tiny_data, "train")
    g = torch.Generator().manual_seed(cfg.seed)
    expected = [b["index"].tolist() for _ in range(cfg.epochs)
                for b in iterate_batches(ds, cfg.batch_size, shuffle=True, generator=g)]
    assert seen == expected


def test_trainer_batches_under_balanced_are_the_seeded_weighted_draw(tiny_data, tmp_path,
                                                                     monkeypatch):
    cfg = _cfg(sampler="balanced")
    seen = _recorded_batches(monkeypatch, tiny_data, cfg, tmp_path / "run")
    from causalign.data.format import LesionDataset

    ds = LesionDataset(tiny_data, "train")
    g = torch.Generator().manual_seed(cfg.seed)
    orders = [epoch_order(ds.labels, ds.num_classes, "balanced", g) for _ in range(cfg.epochs)]
    expected = [o[s:s + cfg.batch_size].tolist() for o in orders
                for s in range(0, len(o), cfg.batch_size)]
    assert seen == expected
    flat = [i for b in seen for i in b]
    assert len(flat) == cfg.epochs * len(ds)  # same epoch length as without the sampler
    assert len(set(flat[:len(ds)])) < len(ds)  # drawn with replacement


def test_balanced_run_interrupted_mid_epoch_resumes_bitwise(tiny_data, tmp_path, monkeypatch):
    """Killed in epoch 2's second step and resumed: history, metrics, checkpoint (weights,
    optimiser, sampler RNG) and best.pt equal the uninterrupted run's."""
    _check_method("erm", tiny_data, tmp_path, monkeypatch, sampler="balanced")


def test_balanced_causal_align_resumes_bitwise_with_its_warm_cache(tiny_data, tmp_path,
                                                                   monkeypatch):
    """The warm-start cache is keyed by sample index, and a balanced draw repeats samples
    (in one batch too): the resumed run still equals the uninterrupted one."""
    _check_method("causal-align", tiny_data, tmp_path, monkeypatch, sampler="balanced",
                  batch_size=24, method_args={"steps": 2})


def test_default_sampler_stays_out_of_benchmark_run_identities():
    """sampler=none is how every run trained before the setting: a suite's OUT keeps its
    folders and config hashes; balanced is keyed."""
    assert _at_unkeyed_default("sampler", "none")
    assert not _at_unkeyed_default("sampler", "balanced")


def test_last_touched_gives_each_repeated_sample_to_the_rank_that_saw_it_last():
    """Data-parallel cache merge with repeats: sample 5 is on rank 1 in step 1 and on rank 0
    in step 2, so rank 0 holds its newest warm-start entry (before: rank 1's, the older)."""
    steps = [torch.tensor([1, 2, 5, 5]), torch.tensor([5, 3, 4])]  # chunks [1,2][5,5], [5,3][4]
    assert sorted(D.last_touched(steps, 0, 2).tolist()) == [1, 2, 3, 5]
    assert sorted(D.last_touched(steps, 1, 2).tolist()) == [4]
    # a permutation: each rank's own samples, as before
    perm = [torch.tensor([3, 0, 4]), torch.tensor([1, 2])]
    assert sorted(D.last_touched(perm, 0, 2).tolist()) == [0, 1, 3]
    assert sorted(D.last_touched(perm, 1, 2).tolist()) == [2, 4]


# ---------------------------------------------------------------- refusals


def test_unknown_sampler_is_refused_with_a_suggestion(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="sampler must be none or balanced, got 'balance'"):
        _cfg(sampler="balance").validate()
    rc, _, err = _run(capsys, "train", tiny_data, "--out", tmp_path / "r", "--no-progress",
                      "--set", "sampler=weighted")
    _assert_user_error(rc, err, "sampler must be none or balanced, got 'weighted'")
    assert not (tmp_path / "r").exists()


def _one_class_train(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with open(dst / MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if not (r["split"] == "train" and r["label"] == "1")]
    with open(dst / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return dst


def test_balanced_with_a_class_missing_from_train_is_refused(tiny_data, tmp_path, capsys):
    data = _one_class_train(tiny_data, tmp_path / "data")
    rc, _, err = _run(capsys, "train", data, "--out", tmp_path / "r", "--no-progress",
                      "--epochs", "1", "--set", "sampler=balanced", "--set", "width=4")
    _assert_user_error(rc, err, "sampler=balanced: the training split has no sample of class")
    assert not (tmp_path / "r").exists()  # refused before the run folder is made
    with pytest.raises(ConfigError, match="no sample of class b"):
        sampler_probabilities(_labels([4, 0]), 2, ["a", "b"])


def test_balanced_sampler_with_balanced_class_weight_warns_once(tiny_data, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_data, _cfg(epochs=1, sampler="balanced", class_weight="balanced"),
              tmp_path / "r", progress=False)
    twice = [w for w in caught if "corrects the class imbalance twice" in str(w.message)]
    assert len(twice) == 1
    assert "\n" not in str(twice[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_data, _cfg(epochs=1, sampler="balanced"), tmp_path / "r2", progress=False)
    assert not [w for w in caught if "twice" in str(w.message)]


# ---------------------------------------------------------------- data parallel


def _ddp_cfg() -> TrainConfig:
    return TrainConfig(method="erm-nobn", epochs=2, batch_size=5, seed=0, device="cpu",
                       threads=1, eval_saliency="gradient", deletion_fractions=[0.1],
                       sampler="balanced")


def _ddp_worker(rank: int, world: int, store: str, data: str, root: str) -> None:
    from test_distributed import RecordingTrainer, _register, join_gloo

    join_gloo(rank, world, store, _register)
    try:
        trainer = RecordingTrainer(data, _ddp_cfg(), f"{root}/ddp", progress=False)
        trainer.fit()
        torch.save(trainer.recorded, f"{root}/grads.rank{rank}.pt")
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.slow  # two forked gloo workers (~15 s on 2 cores)
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_two_processes_shard_the_same_balanced_draw(tmp_path):
    """Under data parallelism every rank draws the single process's balanced order and
    takes its chunk of each global batch: every step's reduced gradients and the final
    weights equal the single-process run's."""
    import torch.multiprocessing as mp
    from test_distributed import RecordingTrainer, _register, rendezvous

    from causalign.data.synth import SynthConfig, generate

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=11, n_val=4, n_test=4, size=32, seed=3))
    _register()
    single = RecordingTrainer(data, _ddp_cfg(), tmp_path / "single", progress=False)
    single.fit()
    mp.start_processes(_ddp_worker, args=(2, rendezvous(tmp_path), str(data), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    for r in (0, 1):
        grads = torch.load(tmp_path / f"grads.rank{r}.pt", weights_only=False)
        assert len(grads) == len(single.recorded) == 6  # 3 steps x 2 epochs
        for a, b in zip(grads, single.recorded, strict=True):
            for ga, gb in zip(a, b, strict=True):
                assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    ck_d = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    ck_s = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    for k, v in ck_s["model"].items():
        assert torch.allclose(ck_d["model"][k], v, rtol=1e-4, atol=1e-5), k


def test_a_run_from_before_the_setting_matches_the_default_and_a_change_is_named(tiny_data,
                                                                                   tmp_path):
    """Guard: a config.yaml without `sampler` (written before the setting) reads as
    sampler=none, so --resume and benchmark reuse see no difference; asking such a run for
    sampler=balanced is named as a changed setting."""
    from causalign.engine.trainer import settings_diff

    run = tmp_path / "run"
    train(tiny_data, _cfg(epochs=1), run, progress=False)
    cfg_file = run / "config.yaml"
    lines = cfg_file.read_text().splitlines(keepends=True)
    assert "sampler: none\n" in lines
    cfg_file.write_text("".join(line for line in lines if line != "sampler: none\n"))
    assert settings_diff(run, _cfg(epochs=1)) == []
    assert settings_diff(run, _cfg(epochs=1, sampler="balanced")) == \
        ["sampler 'none' -> 'balanced'"]
