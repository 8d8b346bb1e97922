"""Data-parallel training across processes with PyTorch's own engine (torch.distributed).

`torchrun --nproc-per-node N -m causalign train ...` (or `torchrun --nnodes M
--rdzv-backend c10d --rdzv-endpoint HOST:PORT ...` across machines) starts N processes with
RANK / WORLD_SIZE / LOCAL_RANK in their environment; the trainer then joins the process group
(NCCL on CUDA, gloo on CPU) and trains data-parallel:

* **Sharding.** ``batch_size`` is the *global* batch. Every rank draws the same permutation
  from the trainer's seeded generator (so the global batch order is exactly the
  single-process order) and takes a contiguous chunk of each global batch
  (`shard_indices`) — DistributedSampler's job, done on the cached split.
* **Loss weighting.** Each rank's loss is a mean over its chunk; it is multiplied by
  ``n_local · world / n_global`` before backward, so the average over ranks is the mean over
  the global batch even when chunks differ in size (last batch, batch not divisible by world).
  With ``class_weight``, `Method.ce` divides a chunk's weighted CE by the global batch's
  weight sum (labels from ``method.global_step``), so this stays the single-process weighted
  mean; its subset terms (Chang's factual, PPI's L_ad) are combined by count (approximate).
* **Subset means.** A term averaged over part of the batch (annotated samples, converged
  counterfactuals, contrasted rows) is reported in ``LossOutput.means`` with its count; the
  ranks share those counts each step and re-weight the term (`reweight_subset_means`), so it
  is the mean over the global batch's subset, not a mean of per-rank means. Count parts in
  history (``n_align``, ``img_n_align``) are summed over ranks.
* **Caps and draws.** Each step the trainer sets ``method.global_step`` (`GlobalStep`: this
  rank's place in the global batch, the global batch's labels and annotation flags), so a
  cap or draw inside a method acts on the global batch: causal-align's ``align_batch``
  (no collective), ``balance`` (`global_mean_norms`: one all-reduce of the CE and alignment
  gradients) and PPI's ``fraction`` (rank 0's draw, broadcast). Still per rank: PPI's L_ad
  pairs, Chang's factual pairs (a pair across ranks needs an image-sized gather), ICNN's
  filter loss (a softmax over the batch's images); and ``balance`` and
  ``fraction`` on a global batch smaller than the world (the empty rank cannot join).
* **Method state.** After each epoch the ranks' method states are merged
  (`merge_method_states`): warm-start cache entries from the rank that processed the sample,
  step counters from rank 0, damping the largest; the checkpoint then holds all of it.
* **Gradients: two paths.** Methods whose loss is plain forwards of the classifier followed by
  the trainer's ``backward()`` (``Method.plain_forward``: ERM, oracle) get the model wrapped in
  `DistributedDataParallel`, whose autograd hooks all-reduce bucketed gradients while backward
  still runs. Every other method gets the bare module and its gradients are all-reduced after
  backward (`all_reduce_gradients`, coalesced buckets). Why: DDP's reducer is armed by
  *DDP's* forward and fires on the parameters' gradient accumulation during ``backward()``;
  gradients formed with ``torch.autograd.grad`` (causal-align's implicit adjoint,
  hier-align) or a double backward through a saliency map (PPI, input-gradient penalties) are
  not accumulated into ``.grad`` by that backward — DDP's documentation says it does not
  support ``autograd.grad`` or double backward — and these methods call the model many times
  per step (counterfactual inner loop, CG Hessian-vector products), read its submodules
  (Grad-CAM layer, BatchNorm folding) and switch its modes, none of which a DDP wrapper
  allows. Reducing ``.grad`` after the full backward is correct whatever produced it. It is
  also the safe default for a new method: it has to opt in to the DDP path.
* **BatchNorm.** DDP's default: batch statistics per rank (on CUDA, ``sync_bn`` converts to
  `SyncBatchNorm`, which has no CPU kernel). Running statistics are broadcast from rank 0 at
  the end of every epoch (and recalibrated on the full training split if configured), so
  every rank validates the same model.
* **Writing.** Only rank 0 writes the run folder; metrics are reduced across ranks (training
  loss/parts: sample-weighted sums; validation: each rank predicts a chunk of the split and the
  predictions are gathered before AUC/accuracy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import CausalignError

if TYPE_CHECKING:
    from ..data.format import LesionDataset

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


@dataclass
class DistContext:
    """Where this process sits in the job (world 1 = plain single-process training)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the group (and destroys it at the end)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            # Every rank past its last collective first: a rank that tore down its gloo
            # pairs while a peer was still in the final broadcast aborted that peer
            # ("terminate called without an active exception", exit -6 after a finished
            # run; seen in 2 of 10 CPU runs).
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CausalignError(f"WORLD_SIZE='{os.environ['WORLD_SIZE']}' is not an integer"
                             ) from None


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun described in the environment (or the one already
    initialised by the caller); world size 1 when neither."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise CausalignError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CausalignError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start "
                             f"distributed runs with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    # Long timeout: rank 0 alone runs the final evaluation (saliency, deletion) while the
    # others wait at a barrier; a crashed rank still ends the job (torchrun stops the rest).
    dist.init_process_group(backend=backend, timeout=timedelta(hours=4))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, True)


# How long a torchrun rank other than local rank 0 holds back a user error line. Every rank
# runs the same checks on the same inputs, so they all hit the same error; local rank 0
# prints it and exits, and torchrun then stops the other workers (SIGTERM, within its 0.1 s
# --monitor-interval) while they wait: the line appears once, not once per rank. Waiting
# (instead of exiting silently) matters twice: a silent rank that exited first would get
# rank 0 killed before it printed (the ranks reach the check at moments apart by their
# start-up jitter: seen with rank 0 four seconds late, no line at all), and a rank still
# running after the wait has an error rank 0 does not share, which must not be lost.
QUIET_RANK_GRACE_S = 10.0


def mark_rank_local(exc: BaseException) -> BaseException:
    """Mark ``exc`` as this rank's own error (from its chunk of a batch: a non-finite loss,
    a BatchNorm chunk of one sample), printed at once by `hold_back_user_error`."""
    exc.rank_local = True  # type: ignore[attr-defined]
    return exc


def hold_back_user_error(exc: BaseException, grace_s: float | None = None) -> None:
    """Call before printing ``exc`` as a one-line user error. Under torchrun, on any rank but
    local rank 0 (each node's first process: a node's own output may be all its user sees,
    and an error can be a node's own, such as a dataset missing there), wait ``grace_s``
    (default QUIET_RANK_GRACE_S) for local rank 0 to report it and torchrun to stop this
    process. Returns at once outside torchrun, on local rank 0 and for errors marked by
    `mark_rank_local`."""
    try:
        if env_world_size() <= 1:
            return
    except CausalignError:  # a malformed WORLD_SIZE: not a torchrun job
        return
    if getattr(exc, "rank_local", False) or \
            os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0":
        return
    time.sleep(QUIET_RANK_GRACE_S if grace_s is None else grace_s)


def shard_indices(idx: Tensor, rank: int, world: int) -> Tensor:
    """This rank's contiguous chunk of a global batch (sizes differ by at most one)."""
    return torch.tensor_split(idx, world)[rank]


# Per-sample fields a method may read about the whole global batch (`GlobalStep.batch`), with
# the LesionDataset attribute holding them: metadata only, no images, so every rank can hold
# the global batch's copy at no real cost.
GLOBAL_FIELDS = {"label": "labels", "has_mask": "has_mask", "has_annotation": "has_box_or_mask"}


@dataclass
class GlobalStep:
    """Where this rank's chunk sits in the current global batch.

    The data-parallel trainer sets it as ``method.global_step`` before each step (on every
    rank, also one with an empty chunk). Chunks are contiguous and in rank order
    (`shard_indices`), so "the first k annotated samples of the global batch" are, on rank r,
    the first k − (annotated samples of ranks < r) of its chunk: a method that knows the
    global batch's labels and annotation flags (`batch`) applies a per-batch cap exactly as
    one process would, without any collective."""

    rank: int
    world: int
    sizes: tuple[int, ...]  # each rank's chunk size, in rank order
    batch: dict[str, Tensor]  # the global batch's `GLOBAL_FIELDS` and "index" (CPU)

    @property
    def offset(self) -> int:
        """Row of the global batch where this rank's chunk starts."""
        return sum(self.sizes[: self.rank])

    @property
    def n_global(self) -> int:
        return sum(self.sizes)

    def before(self, t: Tensor) -> Tensor:
        """The rows of per-sample ``t`` (global batch) that lower ranks hold."""
        return t[: self.offset]

    def local(self, t: Tensor) -> Tensor:
        """This rank's rows of per-sample ``t`` (global batch)."""
        return t[self.offset: self.offset + self.sizes[self.rank]]


def global_step(dataset: Any, global_idx: Tensor, rank: int, world: int) -> GlobalStep:
    """The `GlobalStep` of the global batch ``global_idx`` (dataset indices) for this rank."""
    global_idx = global_idx.cpu()
    sizes = tuple(len(c) for c in torch.tensor_split(global_idx, world))
    batch: dict[str, Tensor] = {"index": global_idx}
    if all(hasattr(dataset, attr) for attr in GLOBAL_FIELDS.values()):
        for key, attr in GLOBAL_FIELDS.items():
            batch[key] = getattr(dataset, attr)[global_idx]
    else:  # another dataset type: its batch, keeping the metadata only
        full = dataset.batch(global_idx)
        batch.update({k: full[k].cpu() for k in GLOBAL_FIELDS if k in full})
    return GlobalStep(rank, world, sizes, batch)


def global_mean_norms(grads: list[tuple[Sequence[Tensor | None], float]],
                      params: Sequence[Tensor]) -> list[float]:
    """Norms of gradients averaged over every rank's share, as one process would see them.

    ``grads[j]`` is this rank's (gradient per parameter — None or empty: zero —, weight):
    a mean over w_r of its samples, e.g. the chunk's CE gradient with the chunk size. One
    process's gradient is Σ_r w_r·g_r / Σ_r w_r (0 where no rank has a sample). The norm of
    a sum is not a function of the ranks' norms, so the vectors themselves travel: a single
    all_reduce of len(grads) × (parameter count + 1) numbers. Every rank must call it."""
    return [float(g.norm()) for g in global_mean_grads(grads, params)]


def global_mean_grads(grads: list[tuple[Sequence[Tensor | None], float]],
                      params: Sequence[Tensor]) -> list[Tensor]:
    """The gradients of `global_mean_norms` themselves, flattened: Σ_r w_r·g_r / Σ_r w_r per
    entry of ``grads`` (zeros where no rank has a sample), from one all_reduce.

    For a norm of a *combination* of means with different sample counts, which a list of
    norms cannot give: hier-align's f₁ supervised gradient is ∇CE (a mean over the batch) +
    w·∇BCE (a mean over the known attributes). Every rank must call it."""
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    dev = params[0].device
    flats = []
    for g, w in grads:
        g = tuple(g) if g else (None,) * len(params)
        flats.append(torch.cat([(torch.zeros_like(q) if gi is None else gi.detach())
                                .reshape(-1).to(dtype) * w
                                for q, gi in zip(params, g, strict=True)]))
    weights = torch.tensor([float(w) for _, w in grads], dtype=dtype, device=dev)
    buf = torch.cat(flats + [weights])
    dist.all_reduce(buf)
    total = buf[-len(grads):].tolist()
    size = len(flats[0])
    return [buf[j * size:(j + 1) * size] / w if w > 0 else buf.new_zeros(size)
            for j, w in enumerate(total)]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every rank (in place)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    with torch.no_grad():
        for t in module.buffers():
            dist.broadcast(t.data, src)


def all_reduce_gradients(params: list[Tensor], world: int,
                         bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``.grad`` over ranks, whatever produced it (backward, autograd.grad surrogate,
    double backward). A parameter without a gradient on a rank counts as zero there; one
    without a gradient on *every* rank keeps ``grad = None`` (so Adam skips it, as in a
    single process)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
    dist.all_reduce(has)
    grads = []
    for p, h in zip(params, has.tolist(), strict=True):
        if h == 0:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[Tensor], world: int) -> None:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def gather_objects(obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def merge_sums(parts: list[tuple[dict[str, float], int]]) -> tuple[dict[str, float], int]:
    """Sample-weighted sums of every rank (keys present on some ranks only are summed where
    present)."""
    sums: dict[str, float] = {}
    count = 0
    for s, c in parts:
        count += c
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums, count


class Shard:
    """A contiguous chunk of a cached split with what `iterate_batches` and evaluation use."""

    def __init__(self, dataset: LesionDataset, rank: int, world: int) -> None:
        self.dataset = dataset
        self.indices = shard_indices(torch.arange(len(dataset)), rank, world)
        self.split = getattr(dataset, "split", "")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_shape(self) -> tuple[int, ...]:  # evaluation sizes its batches by it
        return self.dataset.image_shape

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        return self.dataset.batch(self.indices[idx])


def is_count_part(key: str) -> bool:
    """A loss part that counts samples of the step (``n_align``, ``n_align_img``, ...): a
    rank reports its chunk's count, the global batch's count is the sum over ranks."""
    return key.startswith("n_") or "_n_" in key  # hier-align: img_n_align, attr_n_align


def merge_step_counts(parts: list[list[tuple[int, int, str, float]]]
                      ) -> tuple[dict[str, float], dict[str, int]]:
    """Sample-weighted sums of count parts, as a single process would accumulate them.

    ``parts[r]`` lists rank r's (step, global batch size, key, count). A step's count is the
    sum over the ranks that reported it, weighted by the step's global batch size (once,
    however many ranks reported it): averaging the per-rank counts instead would read
    1/world of the single-process value."""
    per_step: dict[tuple[int, str], list[float]] = {}
    for rank_parts in parts:
        for step, n_global, key, value in rank_parts:
            entry = per_step.setdefault((step, key), [0.0, float(n_global)])
            entry[0] += value
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for (_, key), (total, n_global) in per_step.items():
        sums[key] = sums.get(key, 0.0) + total * n_global
        weights[key] = weights.get(key, 0) + int(n_global)
    return sums, weights


def _is_cache_state(v: Any) -> bool:
    return isinstance(v, dict) and "ids" in v and "offsets" in v


def _cache_rows(v: dict, keep: Tensor) -> dict:
    """The rows ``keep`` of a cache state: ids, offsets and, where stored, the class target
    each offset was solved for (`WarmStartCache`; dropped, the rows warm-started any y*)."""
    rows = {k: v[k][keep] for k in ("ids", "offsets", "targets") if k in v}
    return {**rows, "id_stride": v["id_stride"]} if "id_stride" in v else rows


def _sample_ids(v: dict) -> list[int]:
    """The dataset index of each row of a cache state: its ids are index × ``id_stride`` +
    a per-sample key where one sample holds several rows (the latent space under dihedral
    augmentation keeps each orientation apart); compared as they are, such ids matched no
    rank's samples, so each rank kept only its own rows and the checkpoint lost the rest."""
    stride = int(v.get("id_stride", 1))
    return [int(i) // stride for i in v["ids"].tolist()]


def last_touched(global_batches: Sequence[Tensor], rank: int, world: int) -> Tensor:
    """The dataset indices whose last appearance in an epoch's ``global_batches`` lies in
    this rank's chunk (`shard_indices`): the rank whose per-sample cache entry is the newest,
    as `merge_method_states` needs. Without repeats (a permutation) these are simply the
    rank's own samples; a sampler drawing with replacement (``sampler=balanced``) may give a
    sample to several ranks, and "the last rank listing it" would keep an older entry."""
    last: dict[int, int] = {}
    for idx in global_batches:
        for r, chunk in enumerate(torch.tensor_split(idx, world)):
            for i in chunk.tolist():
                last[i] = r
    return torch.tensor([i for i, r in last.items() if r == rank], dtype=torch.long)


def touched_only(state: dict, touched: Tensor) -> dict:
    """``state`` with each per-sample cache cut to the entries of the samples in ``touched``
    (what `merge_method_states` takes from this rank)."""
    wanted = set(touched.tolist())
    out = dict(state)
    for key, v in state.items():
        if _is_cache_state(v):
            keep = torch.tensor([i in wanted for i in _sample_ids(v)], dtype=torch.bool)
            out[key] = _cache_rows(v, keep)
    return out


def merge_method_states(states: list[dict], touched: list[Tensor],
                        own: dict | None = None) -> dict:
    """One method state for every rank after an epoch, from each rank's ``state_dict()``.

    Per-sample caches (warm-start offsets, ``{"ids", "offsets"}``) were updated on each rank
    only for the samples of its chunks: an entry is taken from the rank that processed that
    sample this epoch (``touched[r]``: the dataset indices of rank r's chunks), else from
    rank 0 (every rank held the same entry since the last merge). Without this, a sample
    that lands on another rank next epoch starts cold there, and the checkpoint (rank 0's)
    keeps only rank 0's half. ``own`` (default ``states[0]``) supplies the entries no rank
    touched, so ``states`` may hold only the touched ones (`touched_only`). A damping
    (``damping``, hier-align's ``attr_damping``: raised on negative curvature, on the rank
    that met it) takes the largest, as does a streak of Gauss-Newton fallbacks (``gn_streak``),
    and a switch to that solve (``gn_switched``) holds if any rank made it. Everything
    else is rank 0's (step counters: rank 0 never has an empty chunk)."""
    merged = dict(states[0])
    for key in states[0]:
        values = [s.get(key) for s in states]
        if key.endswith("damping") and all(isinstance(v, (int, float)) for v in values):
            merged[key] = max(values)
            continue
        # causal-align's switch to the Gauss-Newton solve (gn_switch): kept if any rank
        # switched, else rank 0's value reverted it at every epoch's end on the others
        if key.endswith("gn_switched") and all(isinstance(v, bool) for v in values):
            merged[key] = any(values)
            continue
        if key.endswith("gn_streak") and all(isinstance(v, int) for v in values):
            merged[key] = max(values)
            continue
        if not any(_is_cache_state(v) for v in values) or \
                not all(v == {} or _is_cache_state(v) for v in values):
            continue
        owner: dict[int, int] = {}
        for r, ids in enumerate(touched):
            for i in ids.tolist():
                owner[int(i)] = r
        parts: list[dict] = []
        base = (own if own is not None else states[0]).get(key)
        if _is_cache_state(base):  # entries no rank touched: equal on every rank
            keep = torch.tensor([i not in owner for i in _sample_ids(base)],
                                dtype=torch.bool)
            parts.append(_cache_rows(base, keep))
        for r, v in enumerate(values):
            if not v:
                continue
            keep = torch.tensor([owner.get(i) == r for i in _sample_ids(v)],
                                dtype=torch.bool)
            parts.append(_cache_rows(v, keep))
        # a part without targets (rows from a checkpoint written before they were kept, on
        # a rank that solved nothing since) gets -1, unknown, per row: dropping every part's
        # targets made rows solved for one class warm-start any other for the whole run
        if any("targets" in q for q in parts):
            parts = [q if "targets" in q else
                     {**q, "targets": torch.full((len(q["ids"]),), -1, dtype=torch.long)}
                     for q in parts]
        fields = [k for k in ("ids", "offsets", "targets") if all(k in q for q in parts)]
        strides = {q["id_stride"] for q in parts if "id_stride" in q}
        merged[key] = ({k: torch.cat([q[k] for q in parts]) for k in fields}
                       if sum(len(q["ids"]) for q in parts) else {})
        if merged[key] and strides:
            merged[key]["id_stride"] = max(strides)
    return merged


def sum_counts(per_rank: list[dict[str, int]]) -> dict[str, int]:
    """The global batch's subset sizes: each rank's `LossOutput.means` counts, added up."""
    out: dict[str, int] = {}
    for counts in per_rank:
        for k, c in counts.items():
            out[k] = out.get(k, 0) + int(c)
    return out


def reweight_subset_means(total: Tensor, means: dict[str, tuple[Tensor, int]],
                          global_counts: dict[str, int] | None, m: int, n_global: int
                          ) -> Tensor:
    """A rank's loss with each subset-mean term made a share of the global subset's mean.

    The trainer scales a rank's loss by m·world/N and averages over ranks, which turns a
    mean over the chunk into the mean over the global batch. A term averaged over k of the
    chunk's samples (of K in the global batch) would come out as a mean of per-rank means,
    weighted by chunk size instead of by k: rank 0 with 1 annotated sample and rank 1 with
    3 would give the first one half the weight, not a quarter. Scaled by k·N/(m·K) instead,
    the term contributes Σ(its samples)/K — the single-process mean over the global subset.
    """
    if not means or global_counts is None:
        return total
    for name, (term, k) in means.items():
        big_k = global_counts.get(name, 0)
        if big_k > 0:
            total = total + term * (k * n_global / (m * big_k) - 1.0)
    return total
