"""Boundary values of hier-align / causal-align settings and data shapes (edge audit)."""

from __future__ import annotations

import pytest
import torch

from causalign.engine.config import TrainConfig
from causalign.methods import build_method
from causalign.methods.base import DataInfo

P = 4
INFO = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32),
                attributes=[f"a{i}" for i in range(P)])
FAST = dict(steps=2, attr_steps=10, cg_iters=3)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 32, 32)
    mask[:, :, 10:22, 10:22] = 1
    return {
        "image": torch.rand(n, 1, 32, 32, generator=g),
        "label": torch.tensor([0, 1] * (n // 2)),
        "mask": mask, "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
        "has_annotation": torch.ones(n, dtype=torch.bool),
        "attributes": (torch.rand(n, P, generator=g) > 0.5).float(),
        "attr_known": torch.ones(n, P, dtype=torch.bool),
        "index": torch.arange(n),
    }


def test_hier_align_saturated_attributes_keep_a_star_a_probability():
    """A confident f₁ (|z| > 17: â is exactly 0 or 1 in float32) made Eq. 6's a* =
    â + σ(u*) − σ(u₀) (u₀ the clamped logit) leave [0, 1] by ~1e-7, and the image-level
    search refused it as a target: training stopped with "soft counterfactual target must
    hold probabilities in [0, 1]", blaming the target for a rounding of the method's own."""
    torch.manual_seed(0)
    method = build_method("hier-align", FAST)
    model = method.build_model(TrainConfig(width=4), INFO)
    model.f1.register_forward_hook(lambda _m, _i, out: out * 1e3)  # saturated attributes
    out = method.loss(model, _batch())
    assert torch.isfinite(out.total)
    assert out.parts["n_align_img"] > 0 and "img_align" in out.parts
