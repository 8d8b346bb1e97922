"""torchvision backbones by name, adapted to any input channel count and class count."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import unknown_name


def _adapt_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():  # keep the mean filter so pretrained-style init transfers
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
    return new


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18 as tv

    m = tv(weights=None, num_classes=num_classes)
    m.conv1 = _adapt_conv(m.conv1, in_channels)
    m.cam_layer = m.layer4  # type: ignore[assignment]
    return m


def vgg11(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import vgg11_bn as tv

    m = tv(weights=None, num_classes=num_classes)
    m.features[0] = _adapt_conv(m.features[0], in_channels)
    m.cam_layer = m.features[-2]  # last ReLU before the final max-pool
    return m


def inception_v3(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import inception_v3 as tv

    m = tv(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True,
           transform_input=False)
    m.Conv2d_1a_3x3.conv = _adapt_conv(m.Conv2d_1a_3x3.conv, in_channels)
    m.cam_layer = m.Mixed_7c
    return m


BACKBONES = {"resnet18": resnet18, "vgg11": vgg11, "inception_v3": inception_v3}


def build_backbone(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name not in BACKBONES:
        raise unknown_name("backbone", name, list(BACKBONES))
    return BACKBONES[name](in_channels, num_classes)
