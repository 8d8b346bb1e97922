"""Mutation audit of CDEP's decomposition through VGG-style and nested chains, hier-align's
data-parallel caps and Subset remapping, and PPI's `fraction` draw (global and per batch):
behaviours the earlier tests let slip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.cdep import cd_layers, contextual_decomposition

# --- CDEP: contextual decomposition through VGG-style and nested chains ----------------------


def _tiny_vgg() -> nn.Module:
    """A torchvision `VGG` whose parts are tiny (VGG's own __init__ would allocate the
    120M-parameter classifier): features → avgpool(2) → flatten → classifier, as in VGG."""
    from torchvision.models import VGG

    vgg = VGG.__new__(VGG)
    nn.Module.__init__(vgg)
    vgg.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    vgg.avgpool = nn.AdaptiveAvgPool2d(2)
    vgg.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5),
                                   nn.Linear(8, 3))
    return vgg


def _nested_chain() -> nn.Sequential:
    """Nested nn.Sequential blocks with the layer types whose CD rule takes the layer's own
    settings: padded/ceil-mode max-pooling, AvgPool2d, BatchNorm without running statistics,
    a p > 0 dropout, Identity."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(3, stride=2, padding=1)),  # 9 → 5
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                      nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)),  # 5 → 3
        nn.Sequential(nn.AvgPool2d(3), nn.Identity(), nn.Flatten(), nn.Dropout(0.5),
                      nn.Linear(4, 2)))


@pytest.mark.parametrize("build,size", [(_tiny_vgg, 8), (_nested_chain, 9)])
def test_cd_of_vgg_style_and_nested_chains_sums_to_the_eval_logits(build, size):
    """β + γ = f(x) in eval mode for a torchvision VGG (features, avgpool, flatten,
    classifier; the only VGG test is marked slow) and for nested chains (padded and ceil-mode
    max-pooling, AvgPool2d, eval-mode BatchNorm without running statistics, an eval-mode
    p = 0.5 dropout). Kills: VGG's avgpool or last classifier layer dropped, nested
    Sequentials not flattened, max-pooling without the module's padding or ceil_mode, no
    rule for AvgPool2d, BatchNorm without running stats read as having them, dropout applied
    in eval mode."""
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(3, 1, size, size, dtype=torch.float64)
    region = (torch.rand(3, 1, size, size) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        want = model(x)
    torch.testing.assert_close(rel + irrel, want, atol=1e-10, rtol=0)
    assert not torch.allclose(rel, torch.zeros_like(rel))  # both parts carry evidence
    assert not torch.allclose(irrel, torch.zeros_like(irrel))


def test_nested_chains_flatten_to_their_layers_in_order():
    """`cd_layers` of nested Sequentials is the flat layer list in order (VGG: features,
    avgpool, a Flatten, classifier). Guard of the flattening; kills not recursing into a
    nested Sequential (then refused: no CD rule for Sequential)."""
    chain = _nested_chain()
    flat = cd_layers(chain)
    assert flat == [m for block in chain for m in block]
    vgg = _tiny_vgg()
    layers = cd_layers(vgg)
    assert layers[:6] == list(vgg.features) and layers[6] is vgg.avgpool
    assert isinstance(layers[7], nn.Flatten) and layers[8:] == list(vgg.classifier)


def test_cd_of_a_blank_image_puts_no_evidence_in_the_region():
    """A zero image: both parts are 0 at the first conv, so its whole bias (and every later
    bias) goes to γ and β stays exactly 0 at the logits (`_share_bias`: where a = b = 0, γ
    takes the bias). Kills the conv's bias share computed with β and γ swapped (equal
    wherever a part is non-zero, but β = bias on the blank units)."""
    torch.manual_seed(0)
    model = _nested_chain().double().eval()
    x = torch.zeros(2, 1, 9, 9, dtype=torch.float64)
    region = (torch.rand(2, 1, 9, 9) > 0.5).double()
    with torch.no_grad():
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(irrel, model(x), atol=1e-12, rtol=0)
    assert torch.equal(rel, torch.zeros_like(rel))


def test_a_chain_with_a_nested_unsupported_layer_is_refused_at_setup():
    """The check runs over the flattened layers: a LeakyReLU inside a nested block is
    refused by `setup`, naming it. Guard."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU()),
                          nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="no contextual-decomposition rule for LeakyReLU"):
        build_method("cdep").setup(None, model)


# --- PPI: `fraction` < 1, one process and data-parallel (`_global_fraction`) -----------------

def _ppi_batch(n: int = 8, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, size, size, generator=g),
            "label": torch.tensor([0, 1] * (n // 2))}


def _ppi_model() -> nn.Module:
    from causalign.models import SevenLayerCNN

    torch.manual_seed(0)
    return SevenLayerCNN(1, 2, width=4).train()


def _mapped_images(method, model, batch) -> tuple[torch.Tensor, object]:
    """The images `saliency` was given on one loss call (the rows that got maps)."""
    seen = []
    original = method.saliency

    def recording(m, x, target, **kw):
        seen.append(x.detach().clone())
        return original(m, x, target, **kw)

    method.saliency = recording
    out = method(model, batch)
    return (seen[0] if seen else None), out


@pytest.mark.parametrize("fraction,k", [(0.3, 3), (0.1, 2)])
def test_fraction_maps_the_first_k_rows_of_one_permutation(fraction, k):
    """One process: max(2, ⌈fraction·n⌉) rows get maps, those of `torch.randperm(n)[:k]`
    drawn right after the forward, in drawn order (8 rows: 0.3 → 3, 0.1 → 2; the earlier
    test used 0.5·8, an exact product above 2). Kills ⌈⌉ → floor and a floor of 1."""
    batch, model = _ppi_batch(), _ppi_model()
    method = build_method("ppi", {"fraction": fraction, "saliency": "gradient",
                                  "ad_weight": 0.0})
    torch.manual_seed(5)
    state = torch.get_rng_state()  # the reference: the same stream (the forward draws nothing)
    want = batch["image"][torch.randperm(8)[:k]]
    torch.set_rng_state(state)
    got, out = _mapped_images(method, model, batch)
    assert got is not None and got.shape[0] == k
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert out.means["reg"][1] == k


class _FakeBroadcast:
    """`dist.broadcast` of a single-process stand-in: rank 0's draw stays as drawn (None), or
    every rank receives ``value`` (the draw rank 0 sent)."""

    def __init__(self, value: list[int] | None = None) -> None:
        self.value, self.calls = value, 0

    def __call__(self, t: torch.Tensor, src: int) -> None:
        assert src == 0
        self.calls += 1
        if self.value is not None:
            t.copy_(torch.tensor(self.value))


def _gs(rank: int, sizes: tuple[int, ...]):
    from causalign.engine.distributed import GlobalStep

    n = sum(sizes)
    return GlobalStep(rank, len(sizes), sizes, {"index": torch.arange(n)})


def test_global_fraction_rank_zero_draws_what_one_process_draws(monkeypatch):
    """Rank 0 of two (4 + 4 rows), fraction 0.3: k = max(2, ⌈0.3·8⌉) = 3 of the *global*
    batch, `torch.randperm(8)[:3]` (one process's draw), then its own rows of it, in drawn
    order. Kills ⌈⌉ → floor (k = 2), a floor of 1 at fraction 0.1 (k = 1) and sorting the
    kept rows."""
    import torch.distributed as dist

    fake = _FakeBroadcast()
    monkeypatch.setattr(dist, "broadcast", fake)
    for fraction, k in [(0.3, 3), (0.1, 2)]:
        method = build_method("ppi", {"fraction": fraction})
        method.global_step = _gs(0, (4, 4))
        torch.manual_seed(11)
        drawn = torch.randperm(8)[:k]
        torch.manual_seed(11)
        got = method._global_fraction(4, torch.device("cpu"))
        assert torch.equal(got, drawn[drawn < 4]), (fraction, got, drawn)
    # the whole global batch drawn: every local row, in order, with no draw or collective
    method = build_method("ppi", {"fraction": 0.9})  # ⌈7.2⌉ = 8 = N
    method.global_step = _gs(0, (4, 4))
    state = torch.get_rng_state()
    assert torch.equal(method._global_fraction(4, torch.device("cpu")), torch.arange(4))
    assert torch.equal(torch.get_rng_state(), state) and fake.calls == 2


def test_global_fraction_each_rank_keeps_its_rows_of_the_broadcast_draw(monkeypatch):
    """Every rank keeps the drawn global rows that fall in its chunk [offset, offset + m),
    as local rows (global − offset), in drawn order: draw [4, 3, 7, 0] gives rank 0 rows
    [3, 0] and rank 1 rows [0, 3]. Kills `<=` at the chunk's end (rank 0 taking row 4 of
    rank 1), a missing − offset and sorting."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "broadcast", _FakeBroadcast([4, 3, 7, 0]))
    method = build_method("ppi", {"fraction": 0.5})  # k = 4 of 8
    got = []
    for rank in range(2):
        method.global_step = _gs(rank, (4, 4))
        got.append(method._global_fraction(4, torch.device("cpu")).tolist())
    assert got == [[3, 0], [0, 3]]


def test_global_fraction_falls_back_or_refuses_per_the_global_step(monkeypatch):
    """None (the per-chunk draw) with an empty rank (it cannot join the broadcast) or a
    single process; a global step describing another chunk size is refused. Kills dropping
    the `0 in sizes` fallback and the size check."""
    import torch.distributed as dist

    fake = _FakeBroadcast([0, 1])
    monkeypatch.setattr(dist, "broadcast", fake)
    method = build_method("ppi", {"fraction": 0.25})
    method.global_step = _gs(0, (8, 0))
    assert method._global_fraction(8, torch.device("cpu")) is None
    method.global_step = _gs(0, (8,))
    assert method._global_fraction(8, torch.device("cpu")) is None
    method.global_step = _gs(0, (4, 4))
    with pytest.raises(RuntimeError, match="gives this rank 4 samples, the batch holds 6"):
        method._global_fraction(6, torch.device("cpu"))
    assert fake.calls == 0


def test_a_rank_with_none_of_the_drawn_rows_trains_cls_only(monkeypatch):
    """Rank 1 when the broadcast draw lies all in rank 0's chunk: no row is mapped here, so
    the loss is cls_weight·CE of the whole chunk, without a saliency or contrast term (the
    n = 0 early return). Kills dropping `or n == 0` (a map of an empty batch)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    monkeypatch.setattr(dist, "broadcast", _FakeBroadcast([1, 2]))
    batch, model = _ppi_batch(4), _ppi_model()
    method = build_method("ppi", {"fraction": 0.25, "saliency": "gradient"})
    method.global_step = _gs(1, (4, 4))
    got, out = _mapped_images(method, model, batch)
    assert got is None and "reg" not in out.parts and not out.means
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["image"]), batch["label"])
    assert float(out.total.detach()) == pytest.approx(float(ce), rel=1e-6)


# --- hier-align: the data-parallel caps' global flags and exchanges -------------------------

@pytest.fixture(scope="module")
def hier_split(tmp_path_factory):
    """The 8-sample split of tests/test_distributed_caps.py (masks on rows 2-6) with boxes
    also on rows 0 and 1 (box-only samples: has_mask ≠ has_box_or_mask)."""
    from test_distributed_caps import _load

    from causalign.data.synth import SynthConfig, generate

    data = tmp_path_factory.mktemp("mutmeth2") / "data"
    generate(data, SynthConfig(n_train=8, n_val=4, n_test=4, size=32, seed=3))
    train_set = _load(data)
    train_set.has_box_or_mask = train_set.has_mask.clone()
    train_set.has_box_or_mask[[0, 1]] = True
    return train_set


@pytest.mark.filterwarnings("ignore:hier-align.*have only a box:UserWarning")  # by design
def test_global_alignable_flags_are_the_global_batchs_rows(hier_split):
    """`_global_alignable`: the attribute level's flags are r_known at the global batch's
    dataset indices (not its first N rows), the image level's the global batch's has_mask
    (region mask) or has_annotation (region box), and None (per-rank r) once an index lies
    past the table — index = len(table) included. Kills r_known[:N], the box flags read for
    region mask, and `>` for `>=` at the table's end (an IndexError)."""
    from test_distributed_caps import _method_and_model

    from causalign.engine.distributed import global_step

    order = torch.tensor([5, 4, 1, 0, 7, 6, 3, 2])
    known = torch.zeros(8, dtype=torch.bool)
    known[[1, 5]] = True
    for region, flags in [("mask", hier_split.has_mask), ("box", hier_split.has_box_or_mask)]:
        method, _ = _method_and_model(hier_split, {"region": region}, "hier-align")
        method.r_known = known.clone()
        attr, img = method._global_alignable(global_step(hier_split, order, 1, 2))
        assert torch.equal(attr, known[order]) and torch.equal(img, flags[order].bool())
    method.r_known = known[:7]  # a table without row 7, which the batch holds
    attr, _ = method._global_alignable(global_step(hier_split, order, 0, 2))
    assert attr is None


class _MirrorAllReduce:
    """`dist.all_reduce` of a stand-in rank 1 that holds a copy of rank 0's chunk: every
    sum is twice rank 0's, so each global mean is the chunk's own, and a global cap must
    equal the single-process cap on the chunk. Counts the exchanges."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t: torch.Tensor, *args, **kwargs) -> None:
        self.calls += 1
        t.mul_(2)


_BAL = {"warm_start": False, "steps": 1, "attr_steps": 10, "cg_iters": 8, "lam1": 1000.0,
        "lam2": 50.0, "balance": 0.5, "align_batch": 0}


def _mirrored(train_set, chunk, sizes=None):
    from causalign.engine.distributed import GlobalStep, global_step

    if sizes is None:
        return global_step(train_set, torch.cat([chunk, chunk]), 0, 2)
    return GlobalStep(0, 2, sizes, global_step(train_set, chunk, 0, 1).batch)


@pytest.mark.filterwarnings("ignore:hier-align.*have only a box:UserWarning")  # by design
@pytest.mark.parametrize("args", [{"lam1": 0.0}, {"attr_weight": 3.0}],
                         ids=["attribute-level-only", "attr-weight-3"])
def test_global_balance_caps_equal_one_process_on_a_mirrored_chunk(hier_split, monkeypatch,
                                                                   args):
    """Both ranks holding the same 4 rows, the global caps are one process's caps on them
    (each binds: scale < 1). With λ₁ = 0 only the attribute level exchanges (one
    all_reduce); the image level's supervised norm is ‖∇CE + w·∇BCE‖ with w = attr_weight.
    Kills CE's f₂ gradients sliced after f₁'s count when f₁ takes no part (a zero norm, a
    scale of 0) and attr_weight dropped from the image level's supervised norm."""
    import torch.distributed as dist
    from test_distributed_caps import _method_and_model

    chunk = torch.tensor([2, 3, 4, 5])
    params = {**_BAL, **args}
    method, model = _method_and_model(hier_split, params, "hier-align")
    single = method(model, hier_split.batch(chunk)).parts
    mirror = _MirrorAllReduce()
    monkeypatch.setattr(dist, "all_reduce", mirror)
    method, model = _method_and_model(hier_split, params, "hier-align")
    method.global_step = _mirrored(hier_split, chunk)
    split = method(model, hier_split.batch(chunk)).parts
    for key in ("attr_align_grad_scale", "img_align_grad_scale"):
        if params["lam1"] == 0 and key.startswith("img"):
            assert key not in single and key not in split
            continue
        assert single[key] < 1.0, (key, single[key])
        assert split[key] == pytest.approx(single[key], rel=1e-4), key
    assert mirror.calls == (1 if params["lam1"] == 0 else 2)


@pytest.mark.filterwarnings("ignore:hier-align.*have only a box:UserWarning")  # by design
def test_global_balance_joins_no_exchange_it_does_not_need(hier_split, monkeypatch):
    """No exchange for a level with nothing alignable in the global batch (rows 0, 1, 7
    carry no mask: only the attribute level's), none at all with an empty rank (it never
    calls the loss, so it could not join: per-rank caps). Kills `use1` without
    `global_img.any()` and dropping the `0 in sizes` fallback."""
    import torch.distributed as dist
    from test_distributed_caps import _method_and_model

    mirror = _MirrorAllReduce()
    monkeypatch.setattr(dist, "all_reduce", mirror)
    method, model = _method_and_model(hier_split, _BAL, "hier-align")
    method.global_step = _mirrored(hier_split, torch.tensor([0, 1, 7]))
    method(model, hier_split.batch(torch.tensor([0, 1, 7])))
    assert mirror.calls == 1
    mirror.calls = 0
    method, model = _method_and_model(hier_split, _BAL, "hier-align")
    method.global_step = _mirrored(hier_split, torch.arange(8), sizes=(8, 0))
    parts = method(model, hier_split.batch(torch.arange(8))).parts
    assert mirror.calls == 0 and parts["img_align_grad_scale"] < 1.0
