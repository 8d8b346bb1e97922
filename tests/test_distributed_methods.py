"""Data-parallel training per method: what each rank's share of a global batch must add up to.

The in-process tests feed the merge helpers a fake 2-rank split; the forked 2-process test
(gloo, like tests/test_distributed.py) trains causal-align with its default warm start for
two epochs and checks the weights, the warm-start cache and history's counts against one
process on the same global batches.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.distributed as dist
from test_distributed import join_gloo, rendezvous  # the same rendezvous and worker helpers
from torch import nn

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig, Trainer
from causalign.engine.distributed import (
    merge_method_states,
    merge_step_counts,
    reweight_subset_means,
    sum_counts,
)
from causalign.methods.base import method_class, register_method


def test_counts_are_summed_over_ranks_not_averaged():
    # step 0: global batch 16, chunks 8 + 8 with 5 and 3 aligned samples -> 8 for the step;
    # step 1: global batch 4, only rank 0 reported (rank 1 had no alignment) -> 2.
    rank0 = [(0, 16, "n_align", 5.0), (1, 4, "n_align", 2.0)]
    rank1 = [(0, 16, "n_align", 3.0)]
    sums, weights = merge_step_counts([rank0, rank1])
    assert weights == {"n_align": 20}
    assert sums["n_align"] / weights["n_align"] == pytest.approx((8 * 16 + 2 * 4) / 20)


def test_warm_start_cache_entries_come_from_the_rank_that_processed_them():
    # before the epoch both ranks held ids 0, 1, 2; rank 0 processed 0 and 3 (3 diverged, so
    # it is forgotten), rank 1 processed 1 (updated) and 4 (new); 2 was processed by none.
    pre = {0: 0.0, 1: 1.0, 2: 2.0}

    def cache(entries: dict[int, float]) -> dict:
        ids = sorted(entries)
        return {"ids": torch.tensor(ids),
                "offsets": torch.tensor([[entries[i]] for i in ids])}

    s0 = {"step": 7, "damping": 0.01, "cache": cache({**pre, 0: 10.0})}
    s1 = {"step": 6, "damping": 0.1, "cache": cache({**pre, 1: 11.0, 4: 14.0})}
    merged = merge_method_states([s0, s1], [torch.tensor([0, 3]), torch.tensor([1, 4])])
    got = dict(zip(merged["cache"]["ids"].tolist(), merged["cache"]["offsets"][:, 0].tolist(),
                   strict=True))
    assert got == {0: 10.0, 1: 11.0, 2: 2.0, 4: 14.0}
    assert merged["step"] == 7 and merged["damping"] == 0.1
    # the same from caches cut to each rank's own samples (what the trainer gathers), with
    # this rank's full state supplying the entries no rank touched
    from causalign.engine.distributed import touched_only

    cut = [touched_only(s0, torch.tensor([0, 3])), touched_only(s1, torch.tensor([1, 4]))]
    assert cut[0]["cache"]["ids"].tolist() == [0] and cut[1]["cache"]["ids"].tolist() == [1, 4]
    for own in (s0, s1):
        merged = merge_method_states(cut, [torch.tensor([0, 3]), torch.tensor([1, 4])], own=own)
        got = dict(zip(merged["cache"]["ids"].tolist(),
                       merged["cache"]["offsets"][:, 0].tolist(), strict=True))
        assert got == {0: 10.0, 1: 11.0, 2: 2.0, 4: 14.0}
    # a method without caches keeps rank 0's state
    assert merge_method_states([{"generator": 1}, {"generator": 2}],
                               [torch.tensor([0]), torch.tensor([1])]) == {"generator": 1}


def test_subset_mean_reweighting_gives_the_global_subset_mean():
    # fake 2-rank split of a global batch of 8: CE over every sample plus a term averaged
    # over the "annotated" ones, 1 in rank 0's chunk and 3 in rank 1's
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(8, 3)
    annotated = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)

    def loss(rows):
        ce = (x[rows] @ w).sigmoid().mean()
        sub = rows[annotated[rows]]
        term = (x[sub] @ w).square().mean()
        return ce + 0.5 * term, 0.5 * term, len(sub)

    (g_single,) = torch.autograd.grad(loss(torch.arange(8))[0], w)
    chunks = torch.tensor_split(torch.arange(8), 2)
    outs = [loss(c) for c in chunks]
    counts = sum_counts([{"t": k} for _, _, k in outs])
    assert counts == {"t": 4}
    g = torch.zeros(3)
    for c, (total, term, k) in zip(chunks, outs, strict=True):
        rank_loss = reweight_subset_means(total, {"t": (term, k)}, counts, len(c), 8)
        (gr,) = torch.autograd.grad(rank_loss * (len(c) * 2 / 8), w, retain_graph=True)
        g += gr / 2  # the all-reduce average
    assert torch.allclose(g, g_single, atol=1e-6)
    # without re-weighting the rank average is a mean of per-rank means: not the same
    naive = sum(torch.autograd.grad(t * (len(c) * 2 / 8), w)[0] / 2
                for c, (t, _, _) in zip(chunks, outs, strict=True))
    assert not torch.allclose(naive, g_single, atol=1e-4)


@pytest.fixture(scope="module")
def partly_annotated(tmp_path_factory):
    from causalign.data.format import LesionDataset

    data = tmp_path_factory.mktemp("part") / "data"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=3))
    train_set = LesionDataset(data, "train")
    batch = train_set.batch(torch.arange(8))
    # 1 annotated sample in the first chunk (rows 0-3), 3 in the second (rows 4-7)
    batch["has_annotation"] = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    batch["has_mask"] = batch["has_annotation"].clone()
    return train_set, batch


@pytest.mark.parametrize("name,args", [
    ("rrr", {"lam": 1e6}),  # its input-gradient penalty is ~1e-6 at initialisation
    ("cdep", {}),
    ("ppi", {"ad_weight": 0.0, "contrast_on": "positive", "saliency": "gradient"}),
    ("causal-align", {"warm_start": False, "steps": 2, "cg_iters": 3}),
    # a deterministic in-fill; the factual term's pairing is drawn per rank's chunk
    ("chang", {"fill": "mean", "factual_weight": 0.0}),
    # balance (a gradient-norm cap) and align_batch act per chunk: off here
    ("hier-align", {"warm_start": False, "steps": 2, "attr_steps": 3, "cg_iters": 3,
                    "balance": 0.0, "align_batch": 0}),
])
def test_method_subset_terms_split_over_two_ranks_match_the_global_batch(
        partly_annotated, name, args):
    """Fake 2-rank split of one global batch: the trainer's per-rank loss (chunk loss with
    `reweight_subset_means`, × m·world/N, averaged) has the single-process gradient."""
    from causalign.engine.trainer import data_info
    from causalign.methods.base import build_method

    train_set, batch = partly_annotated
    method = build_method(name, args)
    torch.manual_seed(0)
    model = method.build_model(TrainConfig(method=name, width=4), data_info(train_set))
    method.setup(train_set, model)
    method.on_epoch_start(1)
    model.eval()  # BatchNorm's running statistics: samples independent, as in one process
    assert method.subset_means
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    g_single = grads(method(model, batch).total)
    chunks = torch.tensor_split(torch.arange(8), 2)
    outs = [method(model, {k: v[c] for k, v in batch.items()}) for c in chunks]
    counts = sum_counts([{k: c for k, (_, c) in o.means.items()} for o in outs])
    assert counts, "the method reports no subset means"
    g_split = [torch.zeros_like(p) for p in params]
    for c, out in zip(chunks, outs, strict=True):
        rank_loss = reweight_subset_means(out.total, out.means, counts, len(c), 8)
        for acc, g in zip(g_split, grads(rank_loss * (len(c) * 2 / 8)), strict=True):
            if g is not None:
                acc += g / 2
    for a, b in zip(g_split, g_single, strict=True):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, (a - b).abs().max())


class _TinyNet(nn.Module):
    """No BatchNorm (per-rank batch statistics would make exact equality moot)."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4, k)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


NAME = "causal-align-ws-nobn"


def _register() -> None:
    from causalign.methods.base import _METHODS

    if NAME in _METHODS:
        return

    class CAWarm(method_class("causal-align")):
        def build_model(self, cfg, info):
            torch.manual_seed(cfg.seed)
            return _TinyNet(info.in_channels, info.num_classes)

    register_method(NAME)(CAWarm)


def _cfg() -> TrainConfig:
    # warm start on (the default); epoch 2 reuses epoch 1's solutions, which a sample meets
    # on whichever rank its chunk lands on. Few inner steps: the warm start matters.
    # align_on=positive: L_align averages a label-dependent subset, unequal across chunks.
    return TrainConfig(method=NAME, epochs=2, batch_size=6, seed=0, device="cpu", threads=1,
                       eval_saliency="gradient", deletion_fractions=[0.1], scheduler="none",
                       method_args={"steps": 2, "cg_iters": 3, "warm_start": True,
                                    "align_on": "positive"})


def _worker(rank: int, world: int, store: str, data: str, out: str) -> None:
    join_gloo(rank, world, store, _register)
    try:
        trainer = Trainer(data, _cfg(), out, progress=False)
        trainer.fit()
        torch.save(trainer.method.state_dict()["cache"], f"{out}.cache.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _history(path) -> list[dict[str, str]]:
    with open(path / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_process_causal_align_warm_start_matches_single_process(tmp_path):
    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=12, n_val=4, n_test=4, size=32, seed=3))
    _register()
    single = Trainer(data, _cfg(), tmp_path / "single", progress=False)
    single.fit()
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, rendezvous(tmp_path), str(data), str(tmp_path / "ddp")),
                       nprocs=2, join=True, start_method="fork")
    # every rank ends the epoch with the single process's warm-start cache
    ref = single.method.state_dict()["cache"]
    for r in (0, 1):
        got = torch.load(tmp_path / f"ddp.cache.rank{r}.pt", weights_only=False)
        order_ref, order_got = ref["ids"].argsort(), got["ids"].argsort()
        assert torch.equal(got["ids"][order_got], ref["ids"][order_ref]), r
        assert torch.allclose(got["offsets"][order_got], ref["offsets"][order_ref],
                              rtol=1e-3, atol=1e-5), r
    # the checkpoint (rank 0's) holds all of it, and the weights are the single process's
    ck_d = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    ck_s = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    assert len(ck_d["method_state"]["cache"]["ids"]) == len(ref["ids"])
    for k, v in ck_s["model"].items():
        assert torch.allclose(ck_d["model"][k], v, rtol=1e-4, atol=1e-5), k
    # counts are the global batch's, the other parts its means
    for row_d, row_s in zip(_history(tmp_path / "ddp"), _history(tmp_path / "single"),
                            strict=True):
        for key in ("train_n_align", "train_loss", "train_align", "train_cf_warm"):
            assert float(row_d[key]) == pytest.approx(float(row_s[key]), rel=1e-3,
                                                      abs=1e-5), key
