"""BagNet (Brendel & Bethge, ICLR 2019): a bag-of-local-features classifier.

Every output position sees only one q × q patch of the input (q = ``patch``, e.g. BagNet-9/
17/33), a linear classifier (1 × 1 conv) turns each patch's features into class evidence, and
the image's logits are the *average* of the patch evidence over all patches — no interaction
between distant parts of the image. As in the paper, only a few convolutions are 3 × 3
(valid, unpadded, so each output is one whole patch inside the image); all the others are
1 × 1 and do not grow the receptive field.

Receptive field: 3 × 3 conv (stride 1) → 3, 3 × 3 conv (stride 2) → 5, then each further 3 × 3
conv adds 4: q = 5 + 4m, so q ∈ {9, 13, 17, 21, …, 33, …}. Patch centres are 2 px apart.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError


def _unit(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=0, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU()]


def n_extra_convs(patch: int) -> int:
    if patch < 9 or (patch - 5) % 4:
        raise ConfigError(f"bagnet patch must be 9, 13, 17, 21, … (5 + 4m, m ≥ 1), got {patch}")
    return (patch - 5) // 4


class BagNet(nn.Module):
    """Patch features → per-patch class evidence (``patch_logits``) → mean over patches."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 2, width: int = 16,
                 patch: int = 17) -> None:
        super().__init__()
        m = n_extra_convs(patch)
        w1, w2, w3 = width, 2 * width, 4 * width
        layers = [*_unit(in_channels, w1, 3), *_unit(w1, w1, 1),
                  *_unit(w1, w2, 3, stride=2), *_unit(w2, w2, 1)]
        c = w2
        for i in range(m):
            c_out = w3 if i >= m // 2 else w2
            layers += [*_unit(c, c_out, 3), *_unit(c_out, c_out, 1)]
            c = c_out
        layers += _unit(c, w3, 1)
        self.features = nn.Sequential(*layers)
        # Patch centres lie 2 px apart from (q−1)/2 to H−1−(q−1)/2: zero-padding the patch
        # grid by (q−1)/4 cells makes it tile the whole image, so a Grad-CAM map taken here
        # and upsampled lines up with the input. The padding is cropped before the evidence
        # is averaged: the logits are the mean over real patches only.
        self.pad = (patch - 1) // 4
        self.align = nn.ZeroPad2d(self.pad)
        self.classifier = nn.Conv2d(w3, num_outputs, 1)  # linear evidence of each patch
        self.patch = patch
        self.num_outputs = num_outputs

    @property
    def cam_layer(self) -> nn.Module:
        return self.align

    def patch_logits(self, x: Tensor) -> Tensor:
        """(N, classes, h, w): class evidence of each q × q patch (the BagNet heat-map)."""
        if min(x.shape[-2:]) < self.patch:
            raise ConfigError(f"bagnet: image {tuple(x.shape[-2:])} is smaller than its "
                              f"{self.patch} px patches")
        ev = self.classifier(self.align(self.features(x)))
        p = self.pad
        return ev[..., p:ev.shape[-2] - p, p:ev.shape[-1] - p]

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_logits(x).mean((2, 3))
