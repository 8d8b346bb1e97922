"""The annotated region of a batch, shared by the annotation-guided baselines.

The annotated area is the pixel mask when a sample has one, else its box (as in the oracle);
samples with neither are reported by ``annotated`` so a method can skip them (never treated
as an all-zero annotation).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import ConfigError, DataError, not_one_of

REGIONS = ("mask", "box")  # method.region of every annotation-guided method


def check_region(region: str) -> None:
    """ConfigError naming method.region's choices (and the closest) for an unknown one."""
    if region not in REGIONS:
        raise ConfigError(not_one_of("method.region", region, REGIONS))


def annotation_region(batch: dict[str, Tensor], region: str = "mask") -> tuple[Tensor, Tensor]:
    """(region (N, 1, ...) in {0, 1}, annotated (N,) bool).

    ``region="mask"``: the pixel mask, the box for samples without one; ``"box"``: the box
    (the mask for samples that only have a mask: ``box_mask`` already holds it)."""
    shape = (-1, *[1] * (batch["mask"].dim() - 1))
    if region == "mask":
        area = batch["mask"].where(batch["has_mask"].view(shape), batch["box_mask"])
    else:
        area = batch["box_mask"]
    return area.float(), batch["has_annotation"].bool()


def refuse_full_regions(method: str, train_set: Any, region: str, consequence: str) -> None:
    """DataError when every annotated training sample's region (`annotation_region`: the
    mask, the box without one) covers its whole image: no pixel lies outside the annotation,
    so the method's annotation term has nothing to act on (``consequence`` says what the run
    would be) — as causal-align refuses such data. Datasets without the check pass."""
    covers = getattr(train_set, "regions_cover_image", None)
    if callable(covers) and covers(region, box_fallback=True):
        raise DataError(f"{method}: every annotated training sample's {region} covers its "
                        f"whole image, so no pixel lies outside the annotation and "
                        f"{consequence}; check the annotations (an inverted or blank-filled "
                        f"export?)")
