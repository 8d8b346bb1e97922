"""ICNN baseline (Zhang et al. 2018): the interpretable-CNN model (models/icnn.py) trained
with cross-entropy plus λ × the mean filter loss −MI(X; T) of its interpretable layer.

λ = 1 leaves the filter loss far below CE (−1.4e-5 against 0.69 at initialisation on the
32 px benchmark: with τ = 0.5/n², tr(x·T) is small and p(x | T) near uniform over the batch),
so the default trains the interpretable architecture by CE; see README "Baselines".

No annotation is used: ICNN makes filters part-like, it does not say which parts are the
right ones (paper 000 §5.2 lists it among the methods without an explicit alignment
constraint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import check_input_size
from ..models.icnn import ICNN, filter_loss
from .base import DataInfo, LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..engine.config import TrainConfig


@dataclass
class ICNNParams:
    lam: float = 1.0  # weight of the mean filter loss
    beta: float = 4.0  # template fall-off β
    label_mask: bool = False  # paper's train-time T⁻ mask for other categories' images

    def validate(self) -> None:
        if not self.lam >= 0 or not self.beta > 0:
            raise ConfigError("method.lam must be >= 0 and method.beta > 0")


@register_method("icnn")
class ICNNMethod(Method):
    Params = ICNNParams
    guidance_terms = ("filter",)  # −MI of the filters and their class templates (≤ 0)
    not_plain_reason = ("reads the maps its interpretable layer records during the forward "
                        "(module state a compiled or autocast forward does not keep as-is)")

    def build_model(self, cfg: TrainConfig, info: DataInfo) -> nn.Module:
        if len(info.image_shape) != 3:
            raise ConfigError("icnn takes 2D images (C, H, W)")
        if cfg.model != "cnn7":
            # ICNN is its own architecture (the 7-layer CNN with an interpretable layer):
            # silently training it under another --model would mislabel the run.
            raise ConfigError(f"method 'icnn' builds its own model (the 7-layer CNN with an "
                              f"interpretable layer); --model {cfg.model} is not supported "
                              f"(leave the default cnn7)")
        check_input_size("cnn7", info.image_shape)  # ICNN is the 7-layer CNN's body
        filters = 4 * cfg.width  # the interpretable layer's filters, filter f → class f mod C
        if filters < info.num_classes:
            # classes beyond the filter count would own no filter: their images get no part
            # template and no filter loss, silently unlike the paper's one-category filters
            need = -(-info.num_classes // 4)
            raise ConfigError(f"method 'icnn' gives each class its own interpretable filters: "
                              f"{info.num_classes} classes need at least {info.num_classes} "
                              f"filters, width {cfg.width} gives {filters} (4 × width); "
                              f"use --set width={need} or more")
        model = ICNN(info.in_channels, info.num_classes, width=cfg.width)
        model.interpretable.beta = self.params.beta
        return model

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x = self.model_input(batch)
        y = batch["label"]
        layer = model.interpretable
        owner = model.filter_class  # (C_filters,) category of each filter
        if self.params.label_mask:
            layer.negative = y[:, None] != owner[None]
        layer.record_maps = True
        try:
            logits = model(x)
            maps = layer.last_maps
        finally:
            layer.negative = None
            # The stored maps carry this step's autograd graph: left on the module they keep
            # it alive until the next forward and make the model impossible to deepcopy
            # (swa_utils.AveragedModel, copy.deepcopy: "Only Tensors created explicitly ...").
            layer.record_maps = False
            layer.last_maps = None
        ce = self.ce(logits, y)  # class_weight: the filter loss is no CE of y
        share = torch.stack([(y == k).float().mean() for k in range(model.num_outputs)])
        floss = filter_loss(maps, share[owner], self.params.beta).mean()
        total = ce + self.params.lam * floss
        return LossOutput(total, {"ce": float(ce.detach()), "filter": float(floss.detach())})
