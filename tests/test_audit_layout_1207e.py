"""Audit (tensor layouts and Python API inputs): channels_last, non-contiguous and
grad-requiring inputs, targets of every form, frozen/train-mode/DataParallel models, and
bad inputs that must fail in one clear line."""

from __future__ import annotations

import pytest
import torch

from causalign.errors import InputError
from causalign.metrics import cam_precision


@pytest.mark.parametrize("maps_shape, ann_shape", [((4, 12, 12), (2, 12, 12)),
                                                   ((4, 12, 12), (4, 13, 12))])
def test_localisation_shape_mismatch_is_not_blamed_on_channels(maps_shape, ann_shape):
    """(N, H, W) maps against an annotation of another batch size or height were told
    "these are 12-channel attributions: reduce them to one map per sample first": the hint
    read the annotation's last axis as the maps' spatial shape."""
    maps, ann = torch.rand(maps_shape), torch.rand(ann_shape) > 0.5
    with pytest.raises(InputError) as info:
        cam_precision(maps, ann)
    assert "must have the same shape" in str(info.value)
    assert "channel" not in str(info.value)


def test_localisation_multichannel_maps_keep_their_hint():
    """Guard: (N, C, H, W) attributions of an RGB input still get the reduce-channels hint."""
    with pytest.raises(InputError, match="3-channel attributions"):
        cam_precision(torch.rand(4, 3, 12, 12), torch.rand(4, 1, 12, 12) > 0.5)
