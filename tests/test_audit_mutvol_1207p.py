"""Mutation audit of the volume paths (multi-view CNN, explainers and faithfulness on 5-D
inputs, localisation on 3-D maps and boxes): behaviours the earlier tests let slip."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from causalign.errors import InputError
from causalign.explain import get_explainer
from causalign.metrics.faithfulness import deletion_scores
from causalign.metrics.localization import cam_precision, iou_dice, rank_accuracy
from causalign.models import MultiViewCNN


def _model(**kw) -> MultiViewCNN:
    torch.manual_seed(0)
    model = MultiViewCNN(1, 3, width=4, **kw)
    with torch.no_grad():  # attention logits spread enough that τ and δ matter
        model.attention.weight.normal_(0, 2)
        model.position.weight.normal_(0, 2)
        model.delta.fill_(2.0)
        model.slice_cnn.classifier.weight.mul_(3000)  # slices disagree: P ≠ geometric mean
    return model


def _reference(model: MultiViewCNN, x: Tensor, slices: Tensor) -> tuple[Tensor, Tensor]:
    """(log P, w) written out slice by slice from the paper's formula, for the slices
    `slices` (N, k) of each volume: p_i = softmax(FC₁(f_i)), a_i = FC₂([f_i, e_i]),
    w = softmax(ReLU(a + δ) / τ), P = Σ w_i p_i. The slice CNN runs in its current mode."""
    cnn = model.slice_cnn
    out, weights = [], []
    for i in range(x.shape[0]):
        feats = [cnn.flatten(cnn.pool(cnn.features(x[i:i + 1, :, int(j)])))[0]
                 for j in slices[i]]
        f = torch.stack(feats)  # (k, F)
        p = cnn.classifier(f).softmax(-1)  # (k, classes)
        e = model.position.weight[slices[i]]
        a = (torch.cat([f, e], -1) @ model.attention.weight.T)[:, 0] + model.attention.bias
        w = (torch.relu(a + model.delta) / model.temperature()).softmax(0)
        out.append((w[:, None] * p).sum(0).log())
        weights.append(w)
    return torch.stack(out), torch.stack(weights)


def test_multiview_output_and_attention_are_the_papers_formula_slice_by_slice():
    """Eval mode: log P and the attention weights equal the formula computed per slice
    (slice axis 2, position embedding of the slice index, δ inside the ReLU, divided by τ).
    Kills τ multiplying instead of dividing, softmax over the batch, δ outside the ReLU,
    the wrong slice axis and pooling of log-probabilities."""
    model = _model(tau=4.0).eval()
    x = torch.rand(3, 1, 5, 8, 8) * torch.linspace(0, 6, 5).view(1, 1, 5, 1, 1)  # unlike slices
    with torch.no_grad():
        out = model(x)
        ref, w = _reference(model, x, torch.arange(5).expand(3, 5))
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(model.last_attention, w, atol=1e-5)
    assert w.max() - w.min() > 0.05  # the weights are far from uniform: τ and δ matter
    p = model.slice_cnn(x.transpose(1, 2).reshape(15, 1, 8, 8)).softmax(1)
    assert p.std(0).max() > 0.05  # slices disagree on the class: pooling p ≠ pooling log p


def test_multiview_train_mode_pools_each_volumes_own_random_slices():
    """Train mode: each volume is pooled over ITS OWN sorted random subset of slices
    (`last_slices`), embedded at their original indices; ceil(0.5 · 5) = 3 slices.
    Kills indexing every volume with the first volume's subset, unsorted subsets, a floor
    instead of a ceil, and position indices 0..k−1 instead of the slice indices."""
    model = _model(train_slices=0.5).train()
    model.slice_cnn.eval()  # no batch statistics / dropout: the reference can match
    torch.manual_seed(3)
    x = torch.rand(6, 1, 5, 8, 8) * torch.linspace(0, 6, 5).view(1, 1, 5, 1, 1)
    with torch.no_grad():
        out = model(x)
        used = model.last_slices
        assert used.shape == (6, 3)
        assert torch.equal(used, used.sort(dim=1).values)
        assert len({tuple(r.tolist()) for r in used}) > 1
        ref, w = _reference(model, x, used)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(model.last_attention, w, atol=1e-5)


def test_multiview_accepts_exactly_max_slices():
    """A volume of exactly `max_slices` slices is embedded (positions 0..max−1); one more is
    refused. Kills `d >= max_slices`."""
    model = MultiViewCNN(1, 2, width=4, max_slices=4).eval()
    assert model(torch.rand(1, 1, 4, 8, 8)).shape == (1, 2)
    with pytest.raises(InputError, match="5 slices"):
        model(torch.rand(1, 1, 5, 8, 8))


def test_multiview_no_grad_in_train_mode_is_one_pass_with_random_slices():
    """Under no_grad in TRAIN mode the volumes are not chunked: one pass, random subsets
    reported in `last_slices` (N, k). Kills the chunked inference path taken in train mode
    (it reported every slice as used)."""
    model = _model(train_slices=0.5).train()
    model.infer_floats = 8 * 8 * 5 * 4  # one volume per chunk, were it chunked
    with torch.no_grad():
        model(torch.rand(4, 1, 5, 8, 8))
    assert model.last_slices.shape == (4, 3)


class _Locked(nn.Module):
    """A conv net that cannot be deep-copied (it holds a lock), so LRP explains it in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * 16, 2)
        self.lock = threading.Lock()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _HalfwayCanonizer:
    """Changes the model as zennit's BatchNorm merge does (rebinds a weight's ``.data``, adds
    a bias parameter), then fails before returning a handle."""

    def apply(self, root: nn.Module) -> list:
        root.conv.weight.data = root.conv.weight.data * 3.0
        root.conv.bias = nn.Parameter(torch.ones(2))
        raise RuntimeError("canonizer failed half-way")

    def copy(self) -> _HalfwayCanonizer:
        return self


def test_lrp_restores_parameters_of_an_uncopyable_model_after_a_failed_canonizer():
    """M35 of the last round: a canonizer failing half-way on a model explained in place
    (deepcopy fails) leaves the model exactly as it was: the same parameter objects, their
    original values, no added bias. Kills dropping the restore of ``.data`` or of the
    parameter dicts in `_restored_on_error`."""
    model = _Locked()
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    lrp = get_explainer("lrp-epsilon", model, canonizers=[_HalfwayCanonizer()])
    with pytest.raises(RuntimeError, match="half-way"):
        lrp.attribute(torch.rand(2, 1, 4, 4), target=0)
    assert model.conv.bias is None
    assert dict(model.named_parameters()).keys() == params.keys()
    for k, p in model.named_parameters():
        assert p is params[k] and torch.equal(p.detach(), values[k]), k


def test_gradcam_one_pass_refuses_volumes_in_one_line():
    """`predict_and_attribute` (evaluation's one-pass Grad-CAM) refuses a volume with the
    same one line as `attribute`. Kills dropping its 2-D check (it then failed inside the
    upsampling)."""
    model = MultiViewCNN(1, 2, width=4).eval()
    cam = get_explainer("gradcam", model)
    with pytest.raises(InputError, match="gradcam needs 2D"):
        cam.predict_and_attribute(torch.rand(2, 1, 3, 8, 8))


class _VoxelScore(nn.Module):
    """Logits (0, Σ v·x) of a volume (N, 1, D, H, W): the class-1 score is linear in every
    voxel, so a deletion's effect is known exactly."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        s = (x * self.weight).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_deletion_on_volumes_removes_the_top_fraction_of_the_whole_volume():
    """Deletion of a volume ranks voxels over the WHOLE volume (not per slice) and removes
    round(f · D·H·W) of them, at their own (z, y, x). Reference: the drop of p₁ after zeroing
    the top-k voxels found by an independent argsort. Kills a per-slice k, a 2-D spatial
    shape and a keep mask with its axes transposed."""
    torch.manual_seed(0)
    d, h, w = 3, 4, 5
    weight = torch.rand(1, 1, d, h, w)
    model = _VoxelScore(weight).eval()
    x = torch.rand(2, 1, d, h, w) + 0.5
    maps = torch.rand(2, d, h, w)  # distinct values: no ties
    fracs = (0.1, 0.25, 0.5)
    got = deletion_scores(model, x, maps, target=1, fractions=fracs)
    base = model(x).softmax(1)[:, 1].double()
    for f in fracs:
        k = round(f * d * h * w)
        xd = x.clone().flatten(1)
        top = maps.flatten(1).argsort(1, descending=True)[:, :k]
        xd.scatter_(1, top, 0.0)
        ref = base - model(xd.view_as(x)).softmax(1)[:, 1].double()
        assert torch.allclose(got[f].double(), ref, atol=1e-6), f


def test_localisation_scores_of_3d_maps_match_a_voxel_count():
    """cam_precision, IoU/Dice and rank accuracy on volumes (N, D, H, W) with N ≠ D, also with
    a singleton channel (N, 1, D, H, W), equal voxel counts done by hand. Kills a 2-D-only
    broadcast of the normalisation or of the empty-map mask, a per-slice count and a
    squeeze that only handles 2-D maps."""
    torch.manual_seed(1)
    n, d = 2, 3
    maps = torch.rand(n, d, 4, 4) * torch.tensor([1.0, 40.0]).view(2, 1, 1, 1)
    ann = torch.zeros(n, d, 4, 4)
    ann[0, 1, :2] = 1
    ann[1, 2, 1:] = 1
    norm = maps.flatten(1)
    norm = (norm - norm.min(1, keepdim=True).values) / (
        norm.max(1, keepdim=True).values - norm.min(1, keepdim=True).values)
    sel, a = norm >= 0.5, ann.flatten(1) > 0
    prec = (sel & a).sum(1).float() / sel.sum(1).float()
    iou = (sel & a).sum(1).float() / (sel | a).sum(1).float()
    dice = 2 * (sel & a).sum(1).float() / (sel.sum(1) + a.sum(1)).float()
    k = a.sum(1)
    top = maps.flatten(1).argsort(1, descending=True)
    rank = torch.stack([a[i, top[i, :k[i]]].float().mean() for i in range(n)])
    for m, y in ((maps, ann), (maps[:, None], ann[:, None]), (maps[:, None], ann)):
        assert torch.allclose(cam_precision(m, y), prec, atol=1e-6)
        got_iou, got_dice = iou_dice(m, y)
        assert torch.allclose(got_iou, iou, atol=1e-6)
        assert torch.allclose(got_dice, dice, atol=1e-6)
        assert torch.allclose(rank_accuracy(m, y), rank, atol=1e-6)
    # a constant volume map selects nothing: 0, whatever N and D
    flat = torch.ones(n, d, 4, 4)
    assert iou_dice(flat, ann)[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("box, covers", [
    ((0, 0, 6, 6, 0, 4), True),   # every voxel
    ((0, 0, 6, 6), True),         # 4 numbers: every slice
    ((0, 0, 6, 6, 1, 4), False),  # misses slice 0
    ((0, 0, 6, 6, 0, 3), False),  # misses the last slice (z1 exclusive)
])
def test_a_3d_box_covers_the_volume_only_with_every_slice(tmp_path, box, covers):
    """`regions_cover_image("box")` of a volume counts a box as covering the image only
    when its slice range is all D slices, and its box mask is 1 exactly on slices z0..z1−1.
    Kills a z-range off by one at either end (z0 ≤ 1, z1 ≥ D − 1, z ≤ z1, z > z0)."""
    from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset

    w = DatasetWriter(tmp_path, DatasetMeta("vol", ["a", "b"], ndim=3), image_format="npy")
    w.add(np.random.default_rng(0).random((4, 6, 6)).astype(np.float32), label=0,
          split="test", box=box, sample_id="v")
    w.close()
    ds = LesionDataset(tmp_path, "test")
    assert ds.regions_cover_image("box") is covers
    z0, z1 = box[4:] if len(box) == 6 else (0, 4)
    expect = torch.zeros(1, 1, 4, 6, 6)
    expect[:, :, z0:z1] = 1
    assert torch.equal(ds.box_masks, expect)


def test_lrp_on_the_multiview_model_is_the_rule_free_epsilon_map():
    """The multi-view CNN's attention pooling has no zennit rule: lrp-epsilon of a volume is
    the modified-gradient LRP-ε (x ⊙ ε-scaled gradient), other variants are refused in one
    line. Kills `_unruled_pooling` missing the model (zennit then pushed relevance through
    the log-softmax as a gradient)."""
    from causalign.explain.lrp import lrp_epsilon_modified_gradient

    model = _model().eval()
    x = torch.rand(2, 1, 3, 8, 8)
    got = get_explainer("lrp-epsilon", model, epsilon=0.01).attribute(x, target=1)
    ref = lrp_epsilon_modified_gradient(model, x, 1, 0.01)
    assert got.shape == x.shape and torch.allclose(got, ref, atol=1e-6)
    with pytest.raises(InputError, match="no rule for MultiViewCNN"):
        get_explainer("lrp-gamma", model).attribute(x, target=1)
