"""Models: the seed's 7-layer CNN, MLP head, hierarchical wrapper, torchvision backbones."""

from __future__ import annotations

from torch import nn

from ..errors import CausalignError, unknown_name
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


# Smallest image height/width each model can classify (measured: below it a pooling or
# valid convolution has no output left). resnet18 has no minimum (adaptive pooling).
MIN_INPUT_SIZE = {"cnn7": 4, "multiview": 4, "vgg11": 32, "inception_v3": 75,
                  **BAGNET_MODELS}


def check_input_size(name: str, image_shape: tuple[int, ...]) -> None:
    """Refuse images too small for model ``name`` (spatial = the last two dims of
    ``image_shape``) with one clear line, instead of a torch error deep in the first step."""
    need = MIN_INPUT_SIZE.get(name, 1)
    spatial = tuple(image_shape[-2:])
    if len(spatial) == 2 and min(spatial) < need:
        raise CausalignError(f"model '{name}' needs images of at least {need}x{need} px; "
                             f"this data has {spatial[0]}x{spatial[1]} (choose another --model "
                             f"or larger images)")


def build_model(name: str, in_channels: int, num_outputs: int, width: int = 16,
                image_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build a classifier by name: 'cnn7' (default), a torchvision backbone, 'bagnet9' …
    'bagnet33' (bag of local features) or 'multiview' (volumes, App. E.3 of seed 002).
    With ``image_shape`` ((C,) H, W or C, D, H, W), images too small for it are refused."""
    if image_shape is not None and name in MODEL_NAMES:
        check_input_size(name, image_shape)
    if name == "cnn7":
        return SevenLayerCNN(in_channels, num_outputs, width=width)
    if name == "multiview":
        # one position embedding per slice: deeper volumes than the default 512 get a
        # larger table instead of failing on the first batch
        depth = image_shape[1] if image_shape is not None and len(image_shape) == 4 else 0
        return MultiViewCNN(in_channels, num_outputs, width=width, max_slices=max(512, depth))
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
           "build_backbone", "find_cam_layer", "check_input_size", "MODEL_NAMES",
           "VOLUME_MODELS", "MIN_INPUT_SIZE"]
