"""Data-parallel training: hier-align's `align_batch` and `balance` act on the global batch.

The pattern of tests/test_distributed_caps.py (causal-align, PPI), whose helpers these tests
import: a chunk is given to the method with its `GlobalStep` (what the data-parallel trainer
sets), and the trainer's per-rank loss must have one process's gradient on the global batch.
hier-align has two caps — the image level's (f₁: CE + BCE against L_align(θ₁), align_batch on
the annotated samples) and the attribute level's (f₂: CE against L_align(θ₂)) — so every rank
joins two exchanges per step, also a rank with nothing to align at a level or at all.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from test_distributed import join_gloo, rendezvous
from test_distributed_caps import (
    ANNOTATED,
    _flat,
    _load,
    _method_and_model,
    _rank_step,
    _split_grads,
)

from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig
from causalign.engine.distributed import (
    gather_objects,
    global_step,
    shard_indices,
)

# few inner iterations: the caps, not the counterfactuals, are under test
FAST = {"warm_start": False, "steps": 1, "attr_steps": 2, "cg_iters": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("hiercaps") / "data"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=3))
    return data


@pytest.fixture(scope="module")
def partly_annotated(data_dir):
    return _load(data_dir)  # masks on rows 2, 3 (rank 0's chunk) and 4, 5, 6 (rank 1's)


def _grads_close(g_split, g_single):
    for a, b in zip(g_split, g_single, strict=True):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_align_batch_takes_the_global_batchs_first_annotated_samples(partly_annotated, cap):
    """One process aligns the images of the first ``cap`` annotated rows (2, 3, 4). Split
    over two ranks, rank 0 aligns min(cap, 2) and rank 1 the rest; capped per chunk the
    ranks aligned cap + min(cap, 3) images, up to twice one process's."""
    train_set = partly_annotated
    method, model = _method_and_model(train_set, {**FAST, "balance": 0.0, "align_batch": cap},
                                      "hier-align")
    order = torch.arange(8)
    params = [p for p in model.parameters() if p.requires_grad]
    single = method(model, train_set.batch(order))
    assert single.parts["n_align_img"] == cap
    g_single = torch.autograd.grad(single.total, params, allow_unused=True)

    per_rank = []
    for rank in range(2):
        method.global_step = global_step(train_set, order, rank, 2)
        out = method(model, train_set.batch(shard_indices(order, rank, 2)))
        per_rank.append(out.parts["n_align_img"])
    method.global_step = None
    assert per_rank == [min(cap, 2), max(cap - 2, 0)]
    g_split, _ = _split_grads(method, model, train_set, order, 2)
    _grads_close(g_split, g_single)


def test_align_batch_over_more_ranks_than_annotated_samples(partly_annotated):
    """Four ranks of two rows, cap 1, reversed order: only the rank holding the global
    batch's first annotated sample (6) aligns an image; every rank still aligns attributes."""
    train_set = partly_annotated
    method, model = _method_and_model(train_set, {**FAST, "balance": 0.0, "align_batch": 1},
                                      "hier-align")
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    n_img = []
    for rank in range(4):
        method.global_step = global_step(train_set, order, rank, 4)
        out = method(model, train_set.batch(shard_indices(order, rank, 4)))
        n_img.append(out.parts["n_align_img"])
        assert ("img_align" in out.means) == (rank == 0)
        assert out.parts["n_align_attr"] == 2
    assert n_img == [1.0, 0.0, 0.0, 0.0]


def test_a_stale_global_step_is_refused(partly_annotated):
    train_set = partly_annotated
    method, model = _method_and_model(train_set, {**FAST, "align_batch": 1}, "hier-align")
    method.global_step = global_step(train_set, torch.arange(8), 0, 2)
    with pytest.raises(RuntimeError, match="another batch"):
        method(model, train_set.batch(torch.arange(4, 8)))


# λ₁ = 1000, λ₂ = 50, balance = 0.5: both levels' caps bind on this batch (checked below), so
# a factor from the chunk's gradients instead of the global batch's shows in the gradient.
# cg_iters 8, attr_steps 10: CG converges at the attribute level (an unconverged sample is
# dropped, and with all dropped no gradient is left to cap). ``r_rows``: the rows whose r is
# known (the attribute level aligns them; all 8 by default).
BALANCE = {**FAST, "attr_steps": 10, "cg_iters": 8, "lam1": 1000.0, "lam2": 50.0,
           "balance": 0.5}
BALANCE_CASES = [
    ({**BALANCE, "align_batch": 0}, None),  # both ranks align at both levels
    # the first annotated rows are rank 0's: rank 1 aligns no image, joins the f₁ exchange
    ({**BALANCE, "align_batch": 2}, None),
    # nothing to align on rank 1 at all (an early return): it joins both exchanges
    ({**BALANCE, "align_batch": 1}, [0, 1, 2, 3]),
    # rank 0 aligns images only: it joins the f₂ exchange with nothing
    ({**BALANCE, "align_batch": 0}, [4, 5, 6, 7]),
    # no training table (r fitted per chunk, as without setup): the attribute level's cap
    # stays per rank, the image level's is still global (its gradients do not involve r)
    ({**BALANCE, "align_batch": 0}, "untabled"),
]


def _setup(train_set, args, r_rows):
    method, model = _method_and_model(train_set, args, "hier-align")
    assert bool(method.r_known.all())  # this synthetic split: every row has a known r
    if r_rows == "untabled":
        method.r_table = method.r_known = None
    elif r_rows is not None:
        known = torch.zeros_like(method.r_known)
        known[r_rows] = True
        method.r_known = known
    return method, model


def _scales(parts):
    return parts.get("attr_align_grad_scale"), parts.get("img_align_grad_scale")


def _worker(rank: int, world: int, store: str, data: str, out: str) -> None:
    # a rank that skipped an exchange would leave the other waiting: fail instead
    join_gloo(rank, world, store, timeout=timedelta(seconds=60))
    try:
        train_set = _load(data)
        results = []
        for args, r_rows in BALANCE_CASES:
            method, model = _setup(train_set, args, r_rows)
            g, res, _ = _rank_step(method, model, train_set, torch.arange(8), rank, world)
            results.append((g, gather_objects(_scales(res.parts), world)))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_balance_caps_use_the_global_batchs_gradients(data_dir, tmp_path):
    """2 processes (gloo): both levels' capped gradients equal one process's on the global
    batch, and each rank that aligns a level reports one process's factor. Per rank, each
    chunk's alignment gradients were capped by its own supervised gradients' norms."""
    import torch.multiprocessing as mp

    out = tmp_path / "hier.pt"
    mp.start_processes(_worker, args=(2, rendezvous(tmp_path), str(data_dir), str(out)),
                       nprocs=2, join=True, start_method="fork")
    split = torch.load(out, weights_only=False)
    train_set = _load(data_dir)
    for (args, r_rows), (g_split, scales) in zip(BALANCE_CASES, split, strict=True):
        method, model = _setup(train_set, args, r_rows)
        params = [p for p in model.parameters() if p.requires_grad]
        single = method(model, train_set.batch(torch.arange(8)))
        ref = _scales(single.parts)
        assert ref[0] < 0.5 and ref[1] < 0.5, (args, ref)  # both caps bind
        if r_rows == "untabled":  # one process fits r on the global batch, the ranks per chunk
            assert all(s[1] == pytest.approx(ref[1], rel=1e-4) for s in scales)
            continue
        for rank_scales in scales:
            for got, want in zip(rank_scales, ref, strict=True):
                assert got is None or got == pytest.approx(want, rel=1e-4), (args, r_rows)
        g_single = _flat(torch.autograd.grad(single.total, params, allow_unused=True), params)
        assert torch.allclose(g_split, g_single, rtol=1e-4, atol=1e-6), \
            (args, r_rows, (g_split - g_single).abs().max())


def test_annotated_fixture_layout(partly_annotated):
    """The cases above assume masks on rows 2-6 (2 on rank 0, 3 on rank 1)."""
    assert partly_annotated.has_mask.tolist() == [bool(a) for a in ANNOTATED]


# --------------------------------------------------------------------- through the trainer

NAME = "hier-align-nobn"
E2E_ARGS = {"warm_start": True, "steps": 2, "attr_steps": 3, "cg_iters": 3, "align_batch": 2,
            "balance": 1e-3}


def _register() -> None:
    from test_distributed_methods import _TinyNet

    from causalign.methods.base import _METHODS, method_class, register_method
    from causalign.models import HierarchicalModel, MLPHead

    if NAME in _METHODS:
        return

    class HierNoBN(method_class("hier-align")):
        """f₁ without BatchNorm: per-rank batch statistics would make equality moot."""

        def build_model(self, cfg, info):
            torch.manual_seed(cfg.seed)
            return HierarchicalModel(_TinyNet(info.in_channels, len(info.attributes)),
                                     MLPHead(len(info.attributes), info.num_classes,
                                             hidden=self.params.hidden))

    register_method(NAME)(HierNoBN)


def _e2e_cfg() -> TrainConfig:
    # 13 samples, global batch 6: chunks 3+3, 3+3 and 1+0 (an empty rank: per-rank balance)
    return TrainConfig(method=NAME, epochs=2, batch_size=6, seed=0, device="cpu", threads=1,
                       eval_saliency="gradient", deletion_fractions=[0.1], scheduler="none",
                       method_args=dict(E2E_ARGS))


def _e2e_worker(rank: int, world: int, store: str, data: str, root: str) -> None:
    from causalign.engine import Trainer

    join_gloo(rank, world, store, _register, timeout=timedelta(seconds=120))
    try:
        Trainer(data, _e2e_cfg(), root, progress=False).fit()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_process_hier_align_training_with_caps_matches_one_process(tmp_path):
    """The trainer's 2-process hier-align run with align_batch and balance (binding: 1e-3)
    ends at one process's weights."""
    import torch.multiprocessing as mp

    from causalign.engine import Trainer

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=13, n_val=4, n_test=4, size=32, seed=3))
    _register()
    mp.start_processes(_e2e_worker,
                       args=(2, rendezvous(tmp_path), str(data), str(tmp_path / "ddp")),
                       nprocs=2, join=True, start_method="fork")
    Trainer(data, _e2e_cfg(), tmp_path / "single", progress=False).fit()
    ck_s = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)["model"]
    ck_d = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    diffs = {k: float((ck_d[k] - v).abs().max()) for k, v in ck_s.items()}
    print("max |weight difference|", max(diffs.values()))  # shown with -s
    for k, v in ck_s.items():
        assert torch.allclose(ck_d[k], v, rtol=1e-4, atol=1e-6), (k, diffs[k])
