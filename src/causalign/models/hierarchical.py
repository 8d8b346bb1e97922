"""Hierarchical X → A → Y model f = f₂ ∘ f₁ (paper 000 §4.3)."""

from __future__ import annotations

from torch import Tensor, nn


class HierarchicalModel(nn.Module):
    """f₁: image → p attribute logits; f₂: attribute probabilities → class logits.

    `forward` returns class logits so every evaluation/explanation tool treats it like a flat
    classifier; `attributes(x)` returns the attribute logits.
    """

    def __init__(self, attribute_net: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.f1 = attribute_net
        self.f2 = head
        # a module, not Tensor.sigmoid(): WBP rescales and zennit applies LRP rules only to
        # activations they can hook; a functional sigmoid would pass its gradient σ' instead
        self.link = nn.Sigmoid()

    @property
    def cam_layer(self) -> nn.Module:
        return self.f1.cam_layer

    def attributes(self, x: Tensor) -> Tensor:
        return self.f1(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.f2(self.link(self.f1(x)))
