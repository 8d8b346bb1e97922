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


def _gray_cnn(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "wbp", "lrp-epsilon",
                                  "lrp-gamma", "counterfactual"])
def test_explainers_name_grayscale_images_without_channel_axis(name):
    """(N, H, W) grayscale images, the usual medical layout, failed inside the model's first
    conv with torch's "expected input[1, 4, 16, 16] to have 1 channels, but got 4 channels"
    (the batch read as channels), a RuntimeError traceback through Captum/zennit/WBP. Now one
    InputError line naming the layer and the fix; the model is left as it was."""
    from causalign.explain import get_explainer

    model = _gray_cnn().train()
    kwargs = {"steps": 1} if name == "counterfactual" else {}
    with pytest.raises(InputError, match=r"\(4, 16, 16\) do not fit .*first layer '0' "
                                         r"\(Conv2d\) takes \(N, 1, H, W\).*unsqueeze\(1\)"):
        get_explainer(name, model, **kwargs).attribute(torch.rand(4, 16, 16), target=0)
    assert all(m.training for m in model.modules()) and _hooks(model) == 0


def test_gradcam_and_search_name_channels_last_shape_and_channel_count():
    """A (N, H, W, C) NumPy-order batch and an RGB batch for a grayscale model: one line
    each, from Grad-CAM (Captum), the counterfactual generator and deletion."""
    from causalign.explain import CounterfactualGenerator, get_explainer
    from causalign.metrics import deletion_scores

    model = _gray_cnn()
    with pytest.raises(InputError, match=r"channels-last .*movedim\(-1, 1\)"):
        get_explainer("gradcam", model).attribute(torch.rand(2, 16, 16, 1), target=0)
    with pytest.raises(InputError, match=r"counterfactual: .*3 channel\(s\), not 1"):
        CounterfactualGenerator(model, steps=1).generate(torch.rand(2, 3, 16, 16))
    with pytest.raises(InputError, match=r"deletion: .*3 channel\(s\), not 1"):
        deletion_scores(model, torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16), 0)


def test_deletion_blames_channelless_inputs_not_the_maps():
    """Right maps (N, H, W) for channel-less inputs (N, H, W) were called "16-channel
    attributions: reduce them to one map per sample"; the inputs are named instead."""
    from causalign.metrics import deletion_scores

    with pytest.raises(InputError) as info:
        deletion_scores(_gray_cnn(), torch.rand(2, 16, 16), torch.rand(2, 16, 16), 0)
    assert "unsqueeze(1)" in str(info.value) and "channel attributions" not in str(info.value)


def test_methods_name_an_image_without_channel_axis():
    """In a user's loop, erm failed in the conv (RuntimeError) and rrr blamed the mask
    ("batch['mask'] must have shape (4, 1, 16)") for an image without its channel axis."""
    from causalign.methods import build_method

    n, img = 4, torch.rand(4, 16, 16)
    batch = {"image": img, "label": torch.zeros(n, dtype=torch.long),
             "mask": torch.zeros(n, 1, 16, 16), "box_mask": torch.zeros(n, 1, 16, 16),
             "has_mask": torch.ones(n, dtype=torch.bool),
             "has_annotation": torch.ones(n, dtype=torch.bool)}
    model = _gray_cnn().train()
    with pytest.raises(InputError, match=r"erm: .*\(N, 1, H, W\).*unsqueeze\(1\)"):
        build_method("erm", {})(model, batch)
    with pytest.raises(InputError, match=r"rrr: batch\['image'\] \(4, 16, 16\) has no channel"):
        build_method("rrr", {})(model, batch)
    assert _hooks(model) == 0


def test_other_model_failures_keep_their_own_exception():
    """Guard: only torch's shape complaints on inputs that do not fit the first conv are
    rephrased; a model that fails otherwise (here: on fitting inputs) keeps its error."""
    from causalign.explain import get_explainer

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("custom failure: bad input")

    with pytest.raises(RuntimeError, match="custom failure") as info:
        get_explainer("gradient", Broken()).attribute(torch.rand(2, 1, 8, 8), target=0)
    assert not isinstance(info.value, InputError)


def test_a_leading_batchnorm_gets_the_channel_hint():
    """A network starting with a BatchNorm, given 3-channel images for 1, failed with torch's
    "running_mean should contain 3 elements not 1", which the shape filter did not know."""
    from causalign.explain import get_explainer

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Conv2d(1, 4, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match=r"3 channel\(s\), not 1"):
        get_explainer("gradient", model).attribute(torch.rand(2, 3, 16, 16), target=0)
