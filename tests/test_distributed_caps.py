"""Data-parallel training: per-batch caps inside a method act on the global batch.

In-process fake 2-rank splits in the style of tests/test_distributed_methods.py: each chunk
is given to the method with its `GlobalStep` (what the data-parallel trainer sets), and the
trainer's per-rank loss (`reweight_subset_means`, × m·world/N, averaged) must have the
single-process gradient on the global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import join_gloo, rendezvous  # the same rendezvous and worker helpers

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig
from causalign.engine.distributed import (
    GlobalStep,
    gather_objects,
    global_step,
    reweight_subset_means,
    shard_indices,
    sum_counts,
)

# annotated: 2 samples in rank 0's chunk (rows 0-3), 3 in rank 1's (rows 4-7); the synthetic
# labels are 0 0 0 1 0 1 1 1, so align_on=positive leaves rows 3 | 5, 6
ANNOTATED = [0, 0, 1, 1, 1, 1, 1, 0]


def _load(data):
    from causalign.data.format import LesionDataset

    train_set = LesionDataset(data, "train")
    # the flags live on the dataset, where `global_step` reads the global batch's
    train_set.has_mask = torch.tensor(ANNOTATED, dtype=torch.bool)
    train_set.has_box_or_mask = train_set.has_mask.clone()
    return train_set


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("caps") / "data"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=3))
    return data


@pytest.fixture(scope="module")
def partly_annotated(data_dir):
    return _load(data_dir)


def _method_and_model(train_set, args, name="causal-align"):
    from causalign.engine.trainer import data_info
    from causalign.methods.base import build_method

    method = build_method(name, args)
    torch.manual_seed(0)
    model = method.build_model(TrainConfig(method=name, width=4), data_info(train_set))
    method.setup(train_set, model)
    method.on_epoch_start(1)
    model.eval()  # BatchNorm's running statistics: samples independent, as in one process
    return method, model


def _split_grads(method, model, train_set, order, world):
    """The all-reduced gradient and the summed n_align of a fake ``world``-rank step."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(order)
    outs, chunks = [], []
    for rank in range(world):
        local = shard_indices(order, rank, world)
        method.global_step = global_step(train_set, order, rank, world)
        outs.append(method(model, train_set.batch(local)))
        chunks.append(local)
    method.global_step = None
    counts = sum_counts([{k: c for k, (_, c) in o.means.items()} for o in outs])
    g_split = [torch.zeros_like(p) for p in params]
    for local, out in zip(chunks, outs, strict=True):
        rank_loss = reweight_subset_means(out.total, out.means, counts, len(local), n)
        grads = torch.autograd.grad(rank_loss * (len(local) * world / n), params,
                                    allow_unused=True)
        for acc, g in zip(g_split, grads, strict=True):
            if g is not None:
                acc += g / world
    return g_split, sum(o.parts.get("n_align", 0.0) for o in outs)


@pytest.mark.parametrize("align_on", ["all", "positive"])
def test_align_batch_cap_takes_the_global_batchs_first_samples(partly_annotated, align_on):
    """align_batch = 2: one process aligns the first two alignable rows (2, 3; positive: 3,
    5). Split over two ranks, rank 1 must align 0 (positive: 1) of its own; capped per chunk
    it aligned 2, a step of up to W × align_batch samples."""
    train_set = partly_annotated
    args = {"warm_start": False, "steps": 2, "cg_iters": 3, "align_batch": 2,
            "align_on": align_on}
    method, model = _method_and_model(train_set, args)
    order = torch.arange(8)
    labels = train_set.labels[order]
    alignable = torch.tensor(ANNOTATED, dtype=torch.bool)
    if align_on == "positive":
        alignable &= labels != 0
    expected = min(2, int(alignable.sum()))
    assert expected == 2
    assert labels.tolist() == [0, 0, 0, 1, 0, 1, 1, 1]

    params = [p for p in model.parameters() if p.requires_grad]
    single = method(model, train_set.batch(order))
    assert single.parts["n_align"] == expected
    g_single = torch.autograd.grad(single.total, params, allow_unused=True)
    g_split, n_align = _split_grads(method, model, train_set, order, 2)
    assert n_align == expected
    for a, b in zip(g_split, g_single, strict=True):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_align_batch_cap_over_more_ranks_than_alignable_samples(partly_annotated):
    """Four ranks of two rows, cap 1: only the rank holding the global batch's first
    alignable sample aligns; the others train on CE alone."""
    train_set = partly_annotated
    method, model = _method_and_model(
        train_set, {"warm_start": False, "steps": 2, "cg_iters": 3, "align_batch": 1})
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])  # the first alignable row is sample 6
    n_align = []
    for rank in range(4):
        method.global_step = global_step(train_set, order, rank, 4)
        out = method(model, train_set.batch(shard_indices(order, rank, 4)))
        n_align.append(out.parts["n_align"])
        assert ("align" in out.means) == (rank == 0)
    assert n_align == [1.0, 0.0, 0.0, 0.0]


def test_global_step_layout_matches_the_shards():
    order = torch.tensor([5, 2, 9, 0, 7])  # chunks 2 + 2 + 1
    sizes = [len(shard_indices(order, r, 3)) for r in range(3)]
    for rank in range(3):
        gs = GlobalStep(rank, 3, tuple(sizes), {"index": order})
        assert torch.equal(gs.local(order), shard_indices(order, rank, 3))
        assert torch.equal(gs.before(order), order[: sum(sizes[:rank])])
        assert gs.n_global == 5


def test_global_step_reads_metadata_from_a_dataset_without_the_cached_fields(
        partly_annotated):
    """Another dataset type (only `batch`): the same fields, images left out."""

    class BatchOnly:
        def batch(self, idx):
            return partly_annotated.batch(idx)

    order = torch.tensor([6, 1, 4, 3, 0])
    ref = global_step(partly_annotated, order, 1, 2)
    got = global_step(BatchOnly(), order, 1, 2)
    assert set(got.batch) == {"index", "label", "has_mask", "has_annotation"}
    for k, v in ref.batch.items():
        assert torch.equal(got.batch[k], v), k
    assert got.sizes == (3, 2) and got.offset == 3 and got.n_global == 5


def test_a_stale_global_step_is_refused(partly_annotated):
    train_set = partly_annotated
    method, model = _method_and_model(
        train_set, {"warm_start": False, "steps": 1, "cg_iters": 1, "align_batch": 1})
    method.global_step = global_step(train_set, torch.arange(8), 0, 2)
    with pytest.raises(RuntimeError, match="another batch"):
        method(model, train_set.batch(torch.arange(4, 8)))


# λ = 1000, balance = 0.5: the cap binds on this batch (factor ~0.09, checked below) and the
# capped alignment gradient is half the CE gradient's norm, so a wrong factor shows; with
# align_batch = 2 the global batch's first two alignable rows are both rank 0's, so rank 1
# aligns nothing and must still join the exchange of gradients
BALANCE_CASES = [
    {"warm_start": False, "steps": 2, "cg_iters": 3, "lam": 1000.0, "balance": 0.5,
     "align_batch": 0},
    {"warm_start": False, "steps": 2, "cg_iters": 3, "lam": 1000.0, "balance": 0.5,
     "align_batch": 2},
]


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads, strict=True)])


# PPI: fraction 0.5 draws 4 of the global batch of 8 (per chunk: 2 + 2, another draw), 0.25
# draws 2 (per chunk: 2 + 2). ad_weight 0: L_ad's derangement is drawn per chunk, and would
# also move the random stream away from one process's.
PPI_CASES = [
    {"saliency": "gradient", "ad_weight": 0.0, "fraction": 0.5},
    {"saliency": "gradient", "ad_weight": 0.0, "fraction": 0.25},
]
CASES = {"causal-align": BALANCE_CASES, "ppi": PPI_CASES}


def _rank_step(method, model: torch.nn.Module, train_set, order: torch.Tensor, rank: int,
               world: int) -> tuple[torch.Tensor, object, dict]:
    """One data-parallel step as the trainer takes it, inside a process group: this rank's
    chunk of the global batch ``order`` with its `GlobalStep`, subset means re-weighted by
    the global counts, the gradient all-reduced. Returns (the global gradient, flattened;
    this rank's LossOutput; the global subset counts)."""
    local = shard_indices(order, rank, world)
    n = len(order)
    params = [p for p in model.parameters() if p.requires_grad]
    method.global_step = global_step(train_set, order, rank, world)
    res = method(model, train_set.batch(local))
    counts = sum_counts(gather_objects({k: c for k, (_, c) in res.means.items()}, world))
    rank_loss = reweight_subset_means(res.total, res.means, counts, len(local), n)
    g = _flat(torch.autograd.grad(rank_loss * (len(local) * world / n), params,
                                  allow_unused=True), params)
    dist.all_reduce(g)
    return g / world, res, counts


def _worker(rank: int, world: int, store: str, data: str, out: str, name: str) -> None:
    join_gloo(rank, world, store)
    try:
        train_set = _load(data)
        results = []
        for args in CASES[name]:
            method, model = _method_and_model(train_set, args, name)
            g, res, counts = _rank_step(method, model, train_set, torch.arange(8), rank, world)
            # the global batch's mapped samples (PPI's L_reg count)
            results.append((g, res.parts.get("align_grad_scale"), counts.get("reg")))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(data_dir, tmp_path, name):
    import torch.multiprocessing as mp

    out = tmp_path / f"{name}.pt"
    mp.start_processes(_worker, args=(2, rendezvous(tmp_path), str(data_dir), str(out), name),
                       nprocs=2, join=True, start_method="fork")
    return torch.load(out, weights_only=False)


def test_balance_cap_uses_the_global_batchs_gradients(data_dir, tmp_path):
    """2 processes (gloo): the capped gradient equals one process's on the global batch.
    Per rank, each chunk's alignment gradient was capped by its own CE gradient's norm."""
    split = _run_two_ranks(data_dir, tmp_path, "causal-align")
    train_set = _load(data_dir)
    for args, (g_split, scale_split, _) in zip(BALANCE_CASES, split, strict=True):
        method, model = _method_and_model(train_set, args)
        params = [p for p in model.parameters() if p.requires_grad]
        single = method(model, train_set.batch(torch.arange(8)))
        assert single.parts["align_grad_scale"] < 0.2, args  # the cap binds
        g_single = _flat(torch.autograd.grad(single.total, params, allow_unused=True), params)
        assert scale_split == pytest.approx(single.parts["align_grad_scale"], rel=1e-4)
        assert torch.allclose(g_split, g_single, rtol=1e-4, atol=1e-6), \
            (args, (g_split - g_single).abs().max())


def test_ppi_fraction_draws_from_the_global_batch(data_dir, tmp_path):
    """2 processes (gloo): ⌈fraction·N⌉ (at least 2) samples of the global batch get maps
    and contrasts, the very ones one process draws (rank 0's draw, broadcast), so the
    gradient is one process's."""
    split = _run_two_ranks(data_dir, tmp_path, "ppi")
    train_set = _load(data_dir)
    for args, (g_split, _, n_mapped) in zip(PPI_CASES, split, strict=True):
        method, model = _method_and_model(train_set, args, "ppi")
        params = [p for p in model.parameters() if p.requires_grad]
        single = method(model, train_set.batch(torch.arange(8)))
        assert n_mapped == single.means["reg"][1] == max(2, round(8 * args["fraction"]))
        g_single = _flat(torch.autograd.grad(single.total, params, allow_unused=True), params)
        assert torch.allclose(g_split, g_single, rtol=1e-4, atol=1e-6), \
            (args, (g_split - g_single).abs().max())


# --------------------------------------------------------------------- through the trainer

E2E = {
    "causal-align-nobn": {"warm_start": True, "steps": 2, "cg_iters": 3, "align_batch": 2,
                          "balance": 1e-3},
    "ppi-nobn": {"ad_weight": 0.0, "fraction": 0.5, "saliency": "gradient"},
}


def _trainer_sets_global_step() -> bool:
    import inspect

    from causalign.engine.trainer import Trainer

    return "global_step" in inspect.getsource(Trainer._train_epoch_distributed)


def _e2e_cfg(method: str) -> TrainConfig:
    # 13 samples, global batch 6: chunks 3+3, 3+3 and 1+0 (an empty rank: per-rank fallback)
    return TrainConfig(method=method, epochs=2, batch_size=6, seed=0, device="cpu",
                       threads=1, eval_saliency="gradient", deletion_fractions=[0.1],
                       scheduler="none", method_args=dict(E2E[method]))


def _e2e_worker(rank: int, world: int, store: str, data: str, root: str) -> None:
    from test_distributed import _register

    from causalign.engine import Trainer

    join_gloo(rank, world, store, _register)
    try:
        for method in E2E:
            Trainer(data, _e2e_cfg(method), f"{root}/{method}", progress=False).fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.skipif(not _trainer_sets_global_step(),
                    reason="engine/trainer.py does not set method.global_step yet")
def test_two_process_training_with_caps_matches_one_process(tmp_path):
    """The trainer's 2-process run with causal-align's align_batch and balance, and with PPI's
    fraction, ends at one process's weights (per rank: 7e-3 and 9e-3 apart)."""
    import torch.multiprocessing as mp
    from test_distributed import _register

    from causalign.engine import Trainer

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=13, n_val=4, n_test=4, size=32, seed=3))
    _register()
    mp.start_processes(_e2e_worker,
                       args=(2, rendezvous(tmp_path), str(data), str(tmp_path / "ddp")),
                       nprocs=2, join=True, start_method="fork")
    for method in E2E:
        Trainer(data, _e2e_cfg(method), tmp_path / method, progress=False).fit()
        ck_s = torch.load(tmp_path / method / "checkpoint.pt", weights_only=False)["model"]
        ck_d = torch.load(tmp_path / "ddp" / method / "checkpoint.pt",
                          weights_only=False)["model"]
        for k, v in ck_s.items():
            assert torch.allclose(ck_d[k], v, rtol=1e-4, atol=1e-6), (method, k)
