"""BagNet baseline (Brendel & Bethge 2019): the bag-of-local-features model
(models/bagnet.py) trained with plain cross-entropy, as in the paper. It uses no annotation;
its evidence is local by construction, which is why a local shortcut symbol suits it well."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.bagnet import BagNet, n_extra_convs
from .base import DataInfo, LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..engine.config import TrainConfig


@dataclass
class BagNetParams:
    patch: int = 17  # receptive field q (BagNet-q): 9, 13, 17, 21, …

    def validate(self) -> None:
        n_extra_convs(int(self.patch))


@register_method("bagnet")
class BagNetMethod(Method):
    Params = BagNetParams
    plain_forward = True  # forward passes only; backward() makes every gradient

    def build_model(self, cfg: TrainConfig, info: DataInfo) -> nn.Module:
        if len(info.image_shape) != 3:
            raise ConfigError("bagnet takes 2D images (C, H, W)")
        return BagNet(info.in_channels, info.num_classes, width=cfg.width,
                      patch=int(self.params.patch))

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        logits = model(self.model_input(batch))
        ce = F.cross_entropy(logits, batch["label"])
        return LossOutput(ce, {"ce": float(ce.detach())})
