"""Two-layer MLP head f₂ (attribute probabilities → label), paper 000 §5.1."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, a: Tensor) -> Tensor:
        return self.net(a)
