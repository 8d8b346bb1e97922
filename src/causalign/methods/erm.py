"""Empirical risk minimisation: plain cross-entropy, the unaligned reference."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LossOutput, Method, register_method


@register_method("erm")
class ERM(Method):
    plain_forward = True
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        logits = model(self.model_input(batch))
        ce = self.ce(logits, batch["label"])
        return LossOutput(ce, {"ce": float(ce.detach())})
