"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from causalign.metrics import (
    cam_precision,
    classification_metrics,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
    rank_accuracy,
)


def test_cam_precision_hand_case():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :2] = 1.0  # 2 px selected, 1 inside the annotation
    maps[0, 3, 3] = 0.4  # below threshold after normalisation
    ann = torch.zeros(2, 4, 4)
    ann[:, 0, 1] = 1
    prec = cam_precision(maps, ann)
    assert prec[0].item() == 0.5
    assert prec[1].item() == 0.0  # empty map points at nothing annotated


def test_mass_in_mask_and_iou():
    maps = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    ann = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert abs(mass_in_mask(maps, ann).item() - 0.25) < 1e-6
    iou, dice = iou_dice(maps, ann)  # normalised: [0, 1/3; 1, 0] → selected {(1,0)}
    assert iou.item() == 0.0 and dice.item() == 0.0
    maps2 = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    iou, dice = iou_dice(maps2, ann)
    assert abs(iou.item() - 0.5) < 1e-6 and abs(dice.item() - 2 / 3) < 1e-6


def test_rank_accuracy_hand_cases():
    """Top-|A| pixels against A: 2 of the 3 largest inside a 3-pixel annotation → 2/3; a map
    inside A scores 1 however faint; an empty annotation is NaN."""
    ann = torch.zeros(3, 3, 3)
    ann[:, 0, :] = 1  # |A| = 3 (top row)
    maps = torch.zeros(3, 3, 3)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 2, 2], maps[0, 0, 2] = 5.0, 4.0, 3.0, 0.5
    maps[1, 0, :] = 1e-6
    ann[2] = 0
    acc = rank_accuracy(maps, ann)
    assert abs(acc[0].item() - 2 / 3) < 1e-6
    assert acc[1].item() == 1.0
    assert torch.isnan(acc[2])
    # per-sample k: a 1-pixel annotation takes only the single largest pixel
    one = torch.zeros(1, 3, 3)
    one[0, 1, 1] = 1
    assert rank_accuracy(maps[:1], one).item() == 0.0


def test_normalize_flags_constant_maps():
    norm, empty = normalize_maps(torch.stack([torch.ones(3, 3), torch.arange(9.).view(3, 3)]))
    assert empty.tolist() == [True, False]
    assert norm[1].max() == 1 and norm[1].min() == 0 and norm[0].abs().sum() == 0


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(y * 0.3 + rng.random(50) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(probs, y)
    assert abs(m["auc"] - roc_auc_score(y, p1)) < 1e-12
    assert abs(m["accuracy"] - ((p1 > 0.5) == y).mean()) < 1e-12
    assert classification_metrics(probs[y == 1], y[y == 1])["auc"] is None


class _PixelModel(nn.Module):
    """Logit of class 1 = 10 * pixel (0, 0); a faithful map puts that pixel first."""

    def forward(self, x):
        z = 10 * x[:, 0, 0, 0]
        return torch.stack([-z, z], 1)


def test_deletion_rewards_faithful_maps():
    x = torch.ones(4, 1, 10, 10)
    target = torch.ones(4, dtype=torch.long)
    good = torch.zeros(4, 10, 10)
    good[:, 0, 0] = 1.0
    bad = torch.rand(4, 10, 10)
    bad[:, 0, 0] = -1.0
    d_good = deletion_scores(_PixelModel(), x, good, target, fractions=(0.01, 0.1))
    d_bad = deletion_scores(_PixelModel(), x, bad, target, fractions=(0.01, 0.1))
    assert (d_good[0.01] > 0.49).all()  # p drops from ~1 to 0.5
    assert (d_bad[0.1].abs() < 1e-6).all()
