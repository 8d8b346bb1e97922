"""The seed's seven-layer CNN (paper 000, App. B): six 3×3 conv layers in three stages, each
conv followed by BatchNorm and ReLU, max-pooling after the first two stages, global average
pooling and one linear layer. Used as the classifier, and as the attribute predictor f₁
when `num_outputs` = p attributes.

The last conv stage keeps 1/4 of the input resolution so Grad-CAM maps (taken at
`cam_layer`) are fine enough to localise small lesions (16×16 for 64 px crops).
"""

from __future__ import annotations

from torch import Tensor, nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False)]


class SevenLayerCNN(nn.Module):
    """conv×2 → pool → conv×2 → pool → conv×2 → GAP → linear (7 weight layers)."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 2, width: int = 16,
                 dropout: float = 0.0) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            *_block(in_channels, w1), *_block(w1, w1), nn.MaxPool2d(2),
            *_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2),
            *_block(w2, w3), *_block(w3, w3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(w3, num_outputs)
        self.num_outputs = num_outputs

    @property
    def cam_layer(self) -> nn.Module:
        """Layer whose activations Grad-CAM uses (the last conv block's output)."""
        return self.features[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))
