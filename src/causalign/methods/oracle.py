"""Oracle classifier (paper 000 §5.2): the input is restricted to the expert-annotated area,
x·m, at training and test time. It shows what the annotated evidence alone supports, and the
CAM precision ceiling on a dataset.

The annotated area is the pixel mask when the sample has one, else its box; a sample with
neither keeps the full image (it cannot be restricted), which `evaluate` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ._annotation import check_region, refuse_full_regions
from .base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..data.format import LesionDataset


@dataclass
class OracleParams:
    region: str = "mask"  # "mask" (pixel mask, box as fallback) or "box"

    def validate(self) -> None:
        check_region(self.region)


@register_method("oracle")
class Oracle(Method):
    Params = OracleParams
    uses_annotations = True
    annotated_input = True
    plain_forward = True

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        refuse_full_regions("oracle", train_set, self.params.region,
                            "x·m is the full image (the run would be ERM, not the oracle)")

    def model_input(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["image"]
        region = batch["mask"] if self.params.region == "mask" else batch["box_mask"]
        has = batch["has_mask"] if self.params.region == "mask" else batch["has_annotation"]
        # Box fallback for samples without a pixel mask; full image when nothing is annotated.
        region = region.where(has.view(-1, *[1] * (region.dim() - 1)), batch["box_mask"])
        annotated = batch["has_annotation"].view(-1, *[1] * (region.dim() - 1))
        region = region.where(annotated, region.new_ones(()))
        return x * region

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        logits = model(self.model_input(batch))
        ce = self.ce(logits, batch["label"])
        return LossOutput(ce, {"ce": float(ce.detach())})
