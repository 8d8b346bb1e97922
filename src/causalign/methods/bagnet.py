"""BagNet baseline (Brendel & Bethge 2019): the bag-of-local-features model
(models/bagnet.py) trained with plain cross-entropy, as in the paper. It uses no annotation;
its evidence is local by construction, which is why a local shortcut symbol suits it well."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
        from ..models import BAGNET_MODELS

        if len(info.image_shape) != 3:
            raise ConfigError("bagnet takes 2D images (C, H, W)")
        patch = int(self.params.patch)
        # The method builds BagNet-q from method.patch: another --model (or a BagNet of
        # another q) would be silently ignored and the run mislabelled.
        if cfg.model in BAGNET_MODELS and BAGNET_MODELS[cfg.model] != patch:
            raise ConfigError(f"method 'bagnet' builds BagNet-{patch} (method.patch={patch}) "
                              f"but --model is {cfg.model}; set method.patch="
                              f"{BAGNET_MODELS[cfg.model]} or leave --model at cnn7")
        if cfg.model != "cnn7" and cfg.model not in BAGNET_MODELS:
            raise ConfigError(f"method 'bagnet' builds its own model (BagNet-{patch}); "
                              f"--model {cfg.model} is not supported (leave the default cnn7, "
                              f"or use --method erm --model bagnet9|13|17|33)")
        if min(info.image_shape[-2:]) < patch:
            raise ConfigError(f"bagnet: images {tuple(info.image_shape[-2:])} are smaller than "
                              f"its {patch} px patches (set a smaller method.patch)")
        return BagNet(info.in_channels, info.num_classes, width=cfg.width, patch=patch)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        logits = model(self.model_input(batch))
        ce = self.ce(logits, batch["label"])
        return LossOutput(ce, {"ce": float(ce.detach())})
