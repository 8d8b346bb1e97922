"""Models: the seed's 7-layer CNN, MLP head, hierarchical wrapper, torchvision backbones."""

from __future__ import annotations

from torch import nn

from ..errors import unknown_name
from .backbones import BACKBONES, build_backbone
from .bagnet import BagNet
from .cnn import SevenLayerCNN
from .hierarchical import HierarchicalModel
from .mlp import MLPHead
from .multiview import MultiViewCNN

# BagNet-q backbones (local evidence, receptive field q) for any method, not only `bagnet`
BAGNET_MODELS = {"bagnet9": 9, "bagnet13": 13, "bagnet17": 17, "bagnet33": 33}
MODEL_NAMES = ("cnn7", *BACKBONES, *BAGNET_MODELS, "multiview")
VOLUME_MODELS = ("multiview",)  # take (C, D, H, W) volumes; the others take 2D images


def build_model(name: str, in_channels: int, num_outputs: int, width: int = 16) -> nn.Module:
    """Build a classifier by name: 'cnn7' (default), a torchvision backbone, 'bagnet9' …
    'bagnet33' (bag of local features) or 'multiview' (volumes, App. E.3 of seed 002)."""
    if name == "cnn7":
        return SevenLayerCNN(in_channels, num_outputs, width=width)
    if name == "multiview":
        return MultiViewCNN(in_channels, num_outputs, width=width)
    if name in BACKBONES:
        return build_backbone(name, in_channels, num_outputs)
    if name in BAGNET_MODELS:
        return BagNet(in_channels, num_outputs, width=width, patch=BAGNET_MODELS[name])
    raise unknown_name("model", name, list(MODEL_NAMES))


def find_cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM uses: `model.cam_layer` if defined, else the last Conv2d."""
    layer = getattr(model, "cam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


__all__ = ["SevenLayerCNN", "MLPHead", "HierarchicalModel", "MultiViewCNN", "build_model",
           "build_backbone", "find_cam_layer", "MODEL_NAMES", "VOLUME_MODELS"]
