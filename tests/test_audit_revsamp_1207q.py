"""Mutation audit of the `sampler` training setting (trainer.sampler_probabilities /
epoch_order, iterate_batches(order=), distributed.last_touched): behaviours the earlier
tests let slip."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_audit_balsamp_1207q import _cfg, _labels, _one_class_train

from causalign.data.format import LesionDataset
from causalign.engine import distributed as D
from causalign.engine import train
from causalign.engine.evaluate import iterate_batches
from causalign.engine.trainer import epoch_order, sampler_probabilities
from causalign.errors import ConfigError


def _ref_last_rank(batches: list[list[int]], world: int) -> dict[int, int]:
    """Independent reference of `last_touched`: contiguous chunks, sizes differing by at most
    one with the larger ones first (what `shard_indices` gives), the last rank wins."""
    last: dict[int, int] = {}
    for b in batches:
        q, r = divmod(len(b), world)
        start = 0
        for rank in range(world):
            size = q + (rank < r)
            for i in b[start:start + size]:
                last[i] = rank
            start += size
    return last


def test_a_class_with_a_single_training_sample_is_drawn_not_refused():
    """Only a class with NO training sample is refused; one sample is enough (it is drawn
    with probability 1/K). Kills `counts[i] == 0` -> `counts[i] <= 1`."""
    y = _labels([7, 1])
    p = sampler_probabilities(y, 2)
    assert float(p[7]) == 0.5
    assert torch.allclose(p[:7], torch.full((7,), 1 / 14, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([epoch_order(y, 2, "balanced", g) for _ in range(50)])
    assert 0.4 < float((draws == 7).double().mean()) < 0.6


def test_epoch_order_refuses_an_unknown_sampler_itself():
    """`epoch_order` is public: a sampler it does not know must not fall back to a plain
    shuffle (a typo'd config built without validate() trained unbalanced in silence). Kills
    `sampler == "none"` -> `sampler != "balanced"`."""
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="sampler must be none or balanced, got 'weighted'"):
        epoch_order(_labels([3, 3]), 2, "weighted", g)


@pytest.mark.parametrize("world", [3, 4])
def test_last_touched_uses_the_shard_chunks_for_any_world_size(world):
    """The merge owner must be computed with the same chunking as the ranks' batches
    (`shard_indices`, tensor_split): with 5 samples on 4 ranks, Tensor.chunk gives 3 chunks
    of sizes 2,2,1 and rank 3 would own nothing. Kills tensor_split -> chunk. Reference: an
    independent chunking written out in the test."""
    batches = [[0, 1, 2, 3, 4], [4, 5, 0, 6, 7, 1, 2], [3, 3, 8]]
    ref = _ref_last_rank(batches, world)
    for b in batches:  # the chunking really is shard_indices'
        q, r = divmod(len(b), world)
        sizes = [q + (k < r) for k in range(world)]
        assert [len(D.shard_indices(torch.tensor(b), k, world)) for k in range(world)] == sizes
    owned = []
    for rank in range(world):
        got = sorted(D.last_touched([torch.tensor(b) for b in batches], rank, world).tolist())
        assert got == sorted(i for i, r in ref.items() if r == rank), rank
        owned += got
    assert sorted(owned) == sorted(ref)  # every touched sample has exactly one owner


def test_iterate_batches_takes_its_length_from_the_given_order(tiny_data):
    """`order` may be shorter or longer than the split (a sampler draw, with repeats): the
    batches cover exactly ``order``, drop_last counted on its length. Kills n = len(dataset)."""
    ds = LesionDataset(tiny_data, "train")
    n = len(ds)
    assert n > 10
    short = torch.tensor([3, 3, 0, 5, 1, 2, 2])
    got = [b["index"].tolist() for b in iterate_batches(ds, 3, order=short)]
    assert got == [[3, 3, 0], [5, 1, 2], [2]]
    got = [b["index"].tolist() for b in iterate_batches(ds, 3, order=short, drop_last=True)]
    assert got == [[3, 3, 0], [5, 1, 2]]
    long = torch.arange(n).repeat(2)  # twice the split
    flat = [i for b in iterate_batches(ds, 8, order=long) for i in b["index"].tolist()]
    assert flat == long.tolist()


def test_refusal_names_the_missing_class_by_its_dataset_name(tiny_data, tmp_path):
    """The refusal names the class as the dataset declares it, not its index. Kills passing
    class_names=None from the trainer."""
    data = _one_class_train(tiny_data, tmp_path / "data")
    name = list(LesionDataset(data, "val").meta.classes)[1]
    assert name != "1"
    with pytest.raises(ConfigError, match=f"no sample of class {name}, which"):
        train(data, _cfg(epochs=1, sampler="balanced"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # two forked gloo workers (~15 s on 2 cores)
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_data_parallel_epoch_gives_each_repeated_sample_to_its_last_rank(tmp_path: Path,
                                                                        monkeypatch):
    """The torchrun epoch hands the cache merge, per rank, the samples whose LAST appearance
    in the epoch's balanced draw lies in that rank's chunks (reference computed here from the
    seeded draw). Kills the trainer passing every sample of the rank's chunks (the pre-sampler
    `touched`), which gives a repeated sample to two ranks and keeps an older cache entry."""
    import torch.multiprocessing as mp
    from test_audit_balsamp_1207q import _ddp_cfg, _ddp_worker
    from test_distributed import _register, rendezvous

    from causalign.data.synth import SynthConfig, generate
    from causalign.engine.trainer import Trainer

    merge = Trainer._merge_method_state
    epochs: dict[int, int] = {}

    def recording_merge(self, touched):  # the forked workers inherit the patch
        rank = self.dist.rank
        k = epochs[rank] = epochs.get(rank, -1) + 1
        # ownership, not repeats: a set
        torch.save(sorted(set(touched.tolist())), tmp_path / f"touched.rank{rank}.{k}.pt")
        return merge(self, touched)

    monkeypatch.setattr(Trainer, "_merge_method_state", recording_merge)

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=11, n_val=4, n_test=4, size=32, seed=3))
    _register()
    mp.start_processes(_ddp_worker, args=(2, rendezvous(tmp_path), str(data), str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    cfg = _ddp_cfg()
    ds = LesionDataset(data, "train")
    g = torch.Generator().manual_seed(cfg.seed)
    shared = False
    for epoch in range(cfg.epochs):
        order = epoch_order(ds.labels, ds.num_classes, "balanced", g).tolist()
        batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        ref = _ref_last_rank(batches, 2)
        on = [{i for b in batches for i in b[:3]}, {i for b in batches for i in b[3:5]}]
        shared |= bool(on[0] & on[1])  # some sample sits on both ranks in this epoch
        for rank in (0, 1):
            got = torch.load(tmp_path / f"touched.rank{rank}.{epoch}.pt")
            assert got == sorted(i for i, r in ref.items() if r == rank), (epoch, rank)
    assert shared  # else the old rule would pass too


def test_double_correction_warning_only_for_class_weight_balanced(tiny_data, tmp_path):
    """The 'corrects the imbalance twice' warning is for class_weight=balanced; explicit
    uniform weights [1, 1] correct nothing and must not warn. Kills the condition widened to
    `class_weight != "none"`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_data, _cfg(epochs=1, sampler="balanced", class_weight=[1.0, 1.0]),
              tmp_path / "r", progress=False)
    assert not [w for w in caught if "twice" in str(w.message)]
