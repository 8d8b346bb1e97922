"""Metrics on edge cases the hand-value tests miss: ties in saliency maps (constant and
quantised maps), half-precision maps and probabilities, NaN annotations, logits passed as
probabilities. References are written here with plain NumPy / scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from causalign.errors import InputError
from causalign.metrics import (
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
    rank_accuracy,
)


class _Recorder(nn.Module):
    """Logits (0, Σx); keeps every input it sees, so a test can read which pixels deletion
    set to the fill value."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.clone())
        s = x.flatten(1).sum(1) / x[0].numel()
        return torch.stack([torch.zeros_like(s), s], 1)


def _deleted(maps: Tensor, frac: float) -> Tensor:
    """Boolean (N, H, W): the pixels `deletion_scores` removes from an all-ones image."""
    model = _Recorder()
    x = torch.ones(maps.shape[0], 1, *maps.shape[1:])
    deletion_scores(model, x, maps, 1, fractions=(frac,))
    return model.seen[-1][:, 0] == 0


def test_deletion_ties_favour_no_image_region():
    # Was: ties went in pixel-index order, so a constant map removed the top rows first
    # (all 128 of 1024 pixels at 1/8 were the top 4 rows, where the synthetic benchmark's
    # shortcut symbol sits; measured on a 2-epoch ERM: +0.13 drop at 20% for a constant map
    # against −0.07 for a random one).
    gone = _deleted(torch.zeros(1, 32, 32), 1 / 8)[0]
    assert int(gone.sum()) == 128
    quadrants = [gone[:16, :16], gone[:16, 16:], gone[16:, :16], gone[16:, 16:]]
    shares = [float(q.float().mean()) for q in quadrants]
    assert all(0.05 < s < 0.2 for s in shares), shares  # 1/8 each when spread fairly
    assert float(gone[:4].float().mean()) < 0.5


def test_deletion_tie_order_is_fixed_and_batch_independent():
    torch.manual_seed(0)
    quant = (torch.rand(3, 16, 16) * 3).floor()  # three levels: big plateaus
    state = torch.get_rng_state()
    alone = _deleted(quant[1:2], 0.2)
    in_batch = _deleted(quant, 0.2)
    assert torch.equal(alone[0], in_batch[1])  # a sample's pixels do not depend on its batch
    assert torch.equal(in_batch, _deleted(quant, 0.2))  # deterministic
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    # still exactly k pixels, and every pixel of the top level before any lower one
    k = round(0.2 * 256)
    assert in_batch.flatten(1).sum(1).tolist() == [k] * 3
    for m, g in zip(quant, in_batch, strict=True):
        top = m == m.max()
        if int(top.sum()) <= k:
            assert bool(g[top].all())
        else:
            assert bool(top[g].all())


def _rank_accuracy_reference(values: np.ndarray, ann: np.ndarray) -> float:
    """Mean over every order of the tied pixels of: share of A among the |A| first pixels."""
    n, k = values.size, int(ann.sum())
    scores = []
    for tie_key in itertools.permutations(range(n)):
        order = np.lexsort((np.array(tie_key), -values))  # by value, ties by tie_key
        scores.append(ann[order[:k]].sum() / k)
    return float(np.mean(scores))


@pytest.mark.parametrize("values", [
    [1, 1, 1, 1, 1, 1],  # constant
    [0, 0, 1, 1, 1, 0],  # quantised, |A| cuts through the top plateau
    [2, 1, 1, 0, 1, 1],  # one clear top, then a tie
])
@pytest.mark.parametrize("where", [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 1, 0]])
def test_rank_accuracy_shares_ties_fairly(values, where):
    # Was: argsort order decided ties, so a constant map scored 0 for an annotation at the
    # start of the image and 1/16 at its end instead of |A|/N (measured on an 8x8 map).
    v = np.array(values, dtype=np.float64)
    a = np.array(where, dtype=bool)
    got = rank_accuracy(torch.tensor(v).view(1, 2, 3), torch.tensor(a).view(1, 2, 3))
    assert float(got) == pytest.approx(_rank_accuracy_reference(v, a))


def test_rank_accuracy_constant_map_is_area_share_anywhere():
    ann = torch.zeros(2, 8, 8)
    ann[0, :2] = 1
    ann[1, -2:] = 1
    torch.testing.assert_close(rank_accuracy(torch.ones(2, 8, 8), ann),
                               torch.tensor([0.25, 0.25]))


def test_nan_annotation_is_an_error_not_unannotated():
    # Was: NaN > 0 is False, so a NaN mask scored 0 silently.
    ann = torch.zeros(1, 4, 4)
    ann[0, 0, 0] = float("nan")
    maps = torch.rand(1, 4, 4)
    for fn in (cam_precision, mass_in_mask, iou_dice, rank_accuracy):
        with pytest.raises(InputError, match="annotation holds 1 NaN"):
            fn(maps, ann)


def test_half_maps_normalise_in_float32():
    # Was: hi − lo overflowed in float16 (every pixel normalised to 0 or NaN, precision 0),
    # and half rounding moved pixels across the 0.5 threshold.
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 0, 1], m[0, 1, 1] = -40000, 40000, 30000
    ann = torch.zeros(1, 4, 4)
    ann[0, 0, 1] = ann[0, 1, 1] = 1
    torch.testing.assert_close(cam_precision(m.half(), ann), torch.tensor([2 / 15]))
    norm = normalize_maps(m.half())[0]
    assert norm.dtype == torch.float16 and bool(torch.isfinite(norm).all())
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(200, 16, 16, generator=g) * 3).half()
    anns = (torch.rand(200, 16, 16, generator=g) > 0.5).float()
    ref = cam_precision(maps.float(), anns)  # the same values, normalised in float32
    torch.testing.assert_close(cam_precision(maps, anns), ref)
    torch.testing.assert_close(iou_dice(maps, anns)[0], iou_dice(maps.float(), anns)[0])


def test_logits_are_not_taken_for_probabilities():
    # Was: a binary AUC over logits[:, 1] (here 0.5, the softmax's is 1.0) came back silently.
    logits = np.array([[3.0, 4.0], [0.0, 2.0], [-5.0, -4.5], [1.0, 0.5]])
    labels = np.array([0, 1, 1, 0])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert classification_metrics(probs, labels)["auc"] == pytest.approx(
        roc_auc_score(labels, probs[:, 1]))
    with pytest.raises(InputError, match="not logits"):
        classification_metrics(logits, labels)


def test_multiclass_auc_of_half_precision_softmax():
    # Was: scikit-learn's ValueError "Target scores need to be probabilities" (rows summed to
    # 1 only within ~3e-4).
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(300, 10, generator=g) * 3).half().softmax(1).float().numpy()
    labels = np.arange(300) % 10
    # scikit-learn's one-vs-rest macro AUC on the model's own probabilities
    want = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(10)])
    assert classification_metrics(probs, labels)["auc"] == pytest.approx(want)


def test_bool_labels_are_binary_classes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    assert classification_metrics(probs, labels.astype(bool)) == classification_metrics(
        probs, labels)


def test_classification_metrics_take_any_tensor():
    # Was: RuntimeError "Can't call numpy() on Tensor that requires grad" and TypeError
    # "Got unsupported ScalarType BFloat16" from np.asarray.
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    want = classification_metrics(probs.numpy(), labels.numpy())
    assert classification_metrics(probs.clone().requires_grad_(), labels) == want
    # bfloat16 rounds the probabilities (0.7 → 0.6992): the ranking metrics are unchanged,
    # the calibration ones (Brier, ECE) move by that rounding only
    got = classification_metrics(probs.bfloat16(), labels)
    for name in ("brier", "ece"):
        assert got.pop(name) == pytest.approx(want[name], abs=1e-2)
    assert got == {k: v for k, v in want.items() if k not in ("brier", "ece")}


def test_multiclass_auc_of_a_split_missing_a_class():
    # Was None (scikit-learn's "ovr" refuses a split without every class): the one-vs-rest
    # macro AUC over the classes present is defined.
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 60)
    labels = rng.integers(0, 3, 60)  # class 3 never occurs
    probs[np.arange(60), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)
    want = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    assert classification_metrics(probs, labels)["auc"] == pytest.approx(want)
    # with every class present it is scikit-learn's one-vs-rest macro AUC, as before
    full = np.concatenate([labels[:-1], [3]])
    assert classification_metrics(probs, full)["auc"] == pytest.approx(
        roc_auc_score(full, probs, multi_class="ovr"))
    assert classification_metrics(probs, np.zeros(60, int))["auc"] is None


@pytest.mark.parametrize("threshold", [float("nan"), 1.5, -0.1])
def test_binarisation_threshold_outside_unit_interval_is_an_error(threshold):
    # Was: a NaN threshold (or one above 1) selected nothing and scored every map 0 silently.
    maps, ann = torch.rand(2, 4, 4), torch.ones(2, 4, 4)
    with pytest.raises(InputError, match="threshold must lie in"):
        cam_precision(maps, ann, threshold=threshold)
    with pytest.raises(InputError, match="threshold must lie in"):
        iou_dice(maps, ann, threshold=threshold)


@pytest.mark.parametrize("scale", [1e-33, 1e-100, 1e37])
def test_mass_in_mask_does_not_depend_on_map_scale(scale):
    # Was: the total's clamp_min(1e-30) scaled the share of a map ~1e-33 by 0.03 (1e-70 at
    # 1e-100), and float32 sums of values ~1e37 overflowed to a NaN share.
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 16, 16, generator=g, dtype=torch.float64)
    ann = torch.zeros(2, 16, 16)
    ann[:, :4] = 1
    ref = (m * ann).sum((1, 2)) / m.sum((1, 2))  # plain reference, scale 1
    dtype = torch.float32 if scale > 1e30 else torch.float64  # 1e37 overflows only float32
    got = mass_in_mask((m * scale).to(dtype), ann)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
