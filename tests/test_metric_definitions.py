"""Each reported metric against DESIGN.md's definition, on cases small enough to compute by
hand (a 4x4 map and mask, a linear "model" whose score is a known pixel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from causalign.data.format import LesionDataset
from causalign.engine.evaluate import evaluate_split
from causalign.explain import get_explainer, saliency_map
from causalign.methods.base import build_method
from causalign.metrics import (
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    rank_accuracy,
)
from causalign.models import build_model

# Normalised (÷4): 0, .25, .5, .75, 1 → binarised at 0.5: (1,2), (2,1), (2,2).
MAP = torch.tensor([[[0., 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]]])
ANN = torch.zeros(1, 4, 4)
ANN[0, 1:3, 1] = 1  # (1,1) and (2,1)


class PixelModel(nn.Module):
    """Logits (0, 10·Σ w·x): class 1's score rests only on the pixels where w ≠ 0."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: Tensor) -> Tensor:
        s = 10 * (x.flatten(1) * self.w.flatten()).sum(1)
        return torch.stack([torch.zeros_like(s), s], 1)


def test_localisation_hand_values():
    # |CAM ∩ A| / |CAM| = 1/3; Σ s·M / Σ s = (1+3)/10; IoU 1/4, Dice 2/5; top-|A| = 1 of 2.
    torch.testing.assert_close(cam_precision(MAP, ANN), torch.tensor([1 / 3]))
    torch.testing.assert_close(mass_in_mask(MAP, ANN), torch.tensor([0.4]))
    iou, dice = iou_dice(MAP, ANN)
    torch.testing.assert_close((iou, dice), (torch.tensor([0.25]), torch.tensor([0.4])))
    torch.testing.assert_close(rank_accuracy(MAP, ANN), torch.tensor([0.5]))


@pytest.mark.parametrize("scale", [1e-14, 1e6])
def test_localisation_does_not_depend_on_map_scale(scale):
    # Was: an absolute 1e-12 "empty map" cut-off scored any map with values ~1e-14 as 0.
    torch.testing.assert_close(cam_precision(MAP * scale, ANN), torch.tensor([1 / 3]))
    torch.testing.assert_close(iou_dice(MAP * scale, ANN)[0], torch.tensor([0.25]))
    assert float(cam_precision(torch.zeros(1, 4, 4), ANN)) == 0.0  # constant map: empty


def test_deletion_hand_value_zero_fill_probability_drop():
    w = torch.zeros(16)
    w[5] = 1.0  # pixel (1,1)
    x = torch.full((1, 1, 4, 4), 0.5)
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 1] = 1.0
    maps[0, 3, 3] = 0.5
    out = deletion_scores(PixelModel(w), x, maps, 1, fractions=(1 / 16, 2 / 16))
    # p_1(x) = σ(5); zeroing pixel (1,1) (the top k = 1 of 16) leaves logit 0, p = 0.5.
    expected = torch.sigmoid(torch.tensor([5.0])) - 0.5
    torch.testing.assert_close(out[1 / 16], expected)
    torch.testing.assert_close(out[2 / 16], expected)


@pytest.mark.parametrize("scale", [1.0, 1e-12])
def test_deletion_ranking_does_not_depend_on_map_scale(scale):
    # Was: ties were broken by adding index·1e-12, which outranked a map whose values were
    # below ~numel·1e-12 and removed the top-left pixel instead of the salient one.
    n = 32 * 32
    w = torch.zeros(n)
    w[-1] = 1.0
    x = torch.ones(1, 1, 32, 32)
    maps = torch.zeros(1, 32, 32)
    maps[0, -1, -1] = scale
    drop = deletion_scores(PixelModel(w), x, maps, 1, fractions=(1 / n,))[1 / n]
    torch.testing.assert_close(drop, torch.sigmoid(torch.tensor([10.0])) - 0.5)


def test_deletion_ties_removed_in_a_fixed_shuffled_order():
    """A constant map removes the first pixel of the fixed tie order (not pixel 0: index
    order favoured the top-left corner, where the benchmark's shortcut symbol sits)."""
    from causalign.metrics.faithfulness import _tie_order

    w = torch.zeros(16)
    w[int(_tie_order(16)[0])] = 1.0
    x = torch.ones(1, 1, 4, 4)
    drop = deletion_scores(PixelModel(w), x, torch.ones(1, 4, 4), 1, fractions=(1 / 16,))
    torch.testing.assert_close(drop[1 / 16], torch.sigmoid(torch.tensor([10.0])) - 0.5)


def test_classification_hand_values():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    out = classification_metrics(probs, labels)
    # 3/4 right; recalls 1 and 2/3; every positive scores above the one negative.
    # Brier: mean (p1 − y)² = (.01 + .04 + .36 + .09)/4; ECE: each confidence (.9, .8, .6,
    # .7) alone in its 1/15 bin, so the mean |correct − confidence| = (.1 + .2 + .6 + .3)/4.
    recalls = out.pop("recall_per_class")
    assert recalls == pytest.approx([1.0, 2 / 3])
    assert out == pytest.approx({"accuracy": 0.75, "balanced_accuracy": 5 / 6, "auc": 1.0,
                                 "sensitivity": 2 / 3, "specificity": 1.0, "brier": 0.125,
                                 "ece": 0.3})


def test_evaluate_split_means_over_annotated_and_predicted_class(tiny_data):
    torch.manual_seed(0)
    ds = LesionDataset(tiny_data, "test")
    # Half the split unannotated: those samples must leave the localisation means, not add 0.
    ds.has_mask[::2] = False
    ds.has_box_or_mask[::2] = False
    model = build_model("cnn7", ds.image_shape[0], ds.num_classes, width=4).eval()
    method = build_method("erm")
    out = evaluate_split(model, method, ds, "cpu", saliency="gradient", fractions=(0.1,),
                         batch_size=5)
    batch = ds.batch(torch.arange(len(ds)))
    x = method.model_input(batch)
    pred = model(x).argmax(1)
    maps = saliency_map(get_explainer("gradient", model).attribute(x, target=pred)).detach()
    ann = batch["has_annotation"]
    assert out["n_annotated"] == int(ann.sum()) == len(ds) // 2
    assert out["cam_precision"] == pytest.approx(
        float(cam_precision(maps[ann], batch["box_mask"][ann, 0]).mean()), abs=1e-6)
    assert out["cam_mass_in_mask"] == pytest.approx(
        float(mass_in_mask(maps[ann], batch["mask"][ann, 0]).mean()), abs=1e-6)
    assert out["deletion"]["0.1"] == pytest.approx(
        float(deletion_scores(model, x, maps, pred, (0.1,))[0.1].mean()), abs=1e-6)
