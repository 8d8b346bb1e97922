"""Counterfactual and invariant data generation (Chang, Adam & Goldenberg, CVPR 2021).

Given the annotated causal region m of each training image (lesion mask, or box):

* **counterfactual** image x_cf: the causal region is removed and in-filled, so the evidence
  for the label is gone and the label changes: x_cf = x ⊙ (1 − m) + fill ⊙ m, trained with
  L_cf = −log(1 − p_y(x_cf)) (the model must *not* say y; for two classes this is CE with the
  flipped label 1 − y);
* **factual** image x_f: the causal region is kept and the non-causal region is replaced from
  another training image of the batch (random pairing, that image's own lesion in-filled), so
  the label is kept: x_f = x ⊙ m + x_π,cf ⊙ (1 − m), trained with CE(f(x_f), y). This
  makes the model invariant to the background — including any shortcut placed there.

    L = CE(f(x), y) + w_cf · L_cf + w_f · CE(f(x_f), y)

In-fill of the counterfactual (``method.fill``): ``shuffle`` (pixels drawn at random from the
image's own non-causal region, the paper's "Shuffle"/"Tile" in-filling without a learned
model), ``mean`` (the non-causal region's mean), ``blank`` (zeros, the paper's "Ablation"),
``noise`` (uniform noise in the image's range). Samples without an annotation contribute CE
only; a batch with a single annotated sample has no other background, so no factual
image (no `factual` part that step). The three batches go through the model in one forward
pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, not_one_of
from ._annotation import annotation_region, check_region, refuse_full_regions
from .base import LossOutput, Method, register_method

if TYPE_CHECKING:
    from ..data.format import LesionDataset

FILLS = ("shuffle", "mean", "blank", "noise")


@dataclass
class ChangParams:
    cf_weight: float = 1.0  # w_cf
    factual_weight: float = 1.0  # w_f
    fill: str = "shuffle"  # counterfactual in-fill: shuffle | mean | blank | noise
    region: str = "mask"  # annotation: mask (box fallback) | box

    def validate(self) -> None:
        if self.fill not in FILLS:
            raise ConfigError(not_one_of("method.fill", self.fill, FILLS))
        check_region(self.region)
        if self.cf_weight < 0 or self.factual_weight < 0:
            raise ConfigError("method.cf_weight and method.factual_weight must be >= 0")


def infill(x: Tensor, region: Tensor, fill: str, generator: torch.Generator | None = None
           ) -> Tensor:
    """Replace the region (1 = causal) of each image by a fill that carries no lesion."""
    keep = 1.0 - region
    if fill == "blank":
        filler = torch.zeros_like(x)
    elif fill == "mean":
        w = keep.expand_as(x)
        m = (x * w).flatten(2).sum(2) / w.flatten(2).sum(2).clamp_min(1.0)
        filler = m.view(*m.shape, *[1] * (x.dim() - 2)).expand_as(x)
    elif fill == "noise":
        lo = x.flatten(1).min(1).values.view(-1, *[1] * (x.dim() - 1))
        hi = x.flatten(1).max(1).values.view(-1, *[1] * (x.dim() - 1))
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x)
        filler = lo + (hi - lo) * u
    elif fill == "shuffle":
        n, c = x.shape[:2]
        flat_x = x.flatten(2)  # (N, C, P)
        w = keep.expand_as(x)[:, :1].flatten(1)  # (N, P): background pixels
        # an image that is all region falls back to its own pixels
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        idx = torch.multinomial(w.cpu().float(), flat_x.shape[2], replacement=True,
                                generator=generator).to(x.device)
        filler = flat_x.gather(2, idx[:, None].expand(n, c, -1)).view_as(x)
    else:
        raise ConfigError(f"unknown fill '{fill}'")
    return x * keep + filler * region


def augment(x: Tensor, y: Tensor, region: Tensor, annotated: Tensor, fill: str = "shuffle",
            generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Counterfactual and factual images of the annotated samples.

    Returns x_cf (causal region in-filled) with y_cf (the label it must *not* get: the
    original y), and x_f (background from a random other annotated image) with y_f = y."""
    idx = annotated.nonzero().flatten()
    xa, ya, ra = x[idx], y[idx], region[idx]
    n = len(idx)
    if n > 1:  # a derangement: every sample takes another sample's background
        shift = int(torch.randint(1, n, (1,), generator=generator))
        order = torch.randperm(n, generator=generator).to(x.device)
        src = torch.empty_like(order)
        src[order] = order[(torch.arange(n, device=x.device) + shift) % n]
    else:
        src = torch.zeros(n, dtype=torch.long, device=x.device)
    x_cf = infill(xa, ra, fill, generator)
    # the other image's background, its own lesion in-filled, so x_f shows one lesion only
    background = x_cf[src]
    x_f = xa * ra + background * (1.0 - ra)
    return {"x_cf": x_cf, "y_cf": ya, "x_f": x_f, "y_f": ya, "source": src, "index": idx,
            "background": background}


def not_class_loss(logits: Tensor, y: Tensor) -> Tensor:
    """−log(1 − p_y): the prediction must move away from y (= CE with 1 − y for 2 classes).

    Computed as logsumexp_k z_k − logsumexp_{k≠y} z_k, exact at any confidence: through
    1 − p_y the loss saturated once p_y rounded to 1 (a logit gap of ≈ 14) and its gradient
    vanished, just when the model still says y on a counterfactual without the lesion."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


@register_method("chang")
class Chang(Method):
    Params = ChangParams
    uses_annotations = True
    guidance_terms = ("cf", "factual")
    plain_forward = True  # forward passes only; backward() makes every gradient
    subset_means = True  # both terms average the annotated samples (LossOutput.means)

    def __init__(self, params: ChangParams | None = None) -> None:
        super().__init__(params)
        self.generator = torch.Generator().manual_seed(0)

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        # a counterfactual would be the whole image in-filled yet told "not y", and a factual
        # image the image itself
        refuse_full_regions("chang", train_set, self.params.region,
                            "no counterfactual or factual image keeps any non-causal part")
        self.generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x = self.model_input(batch)
        y = batch["label"]
        area, annotated = annotation_region(batch, self.params.region)
        n = len(x)
        if not bool(annotated.any()):
            logits = model(x)
            ce = self.ce(logits, y)
            return LossOutput(ce, {"ce": float(ce.detach())})
        aug = augment(x, y, area, annotated, self.params.fill, self.generator)
        k = len(aug["index"])
        # A factual image needs another annotated image's background: with a single
        # annotated sample x_f is x itself, and its "factual" term would only re-weight CE.
        factual = k >= 2
        logits = model(torch.cat([x, aug["x_cf"], *([aug["x_f"]] if factual else [])]))
        # class_weight weighs the terms that classify an image as its true label: CE and the
        # factual term (x_f keeps the lesion, so its label is y). L_cf says "not y" of an image
        # whose evidence is removed: no class is being recognised, so no class prior to
        # correct; it stays the plain mean over the annotated samples.
        ce = self.ce(logits[:n], y)
        cf = not_class_loss(logits[n:n + k], aug["y_cf"])
        total = ce + self.params.cf_weight * cf
        parts = {"ce": float(ce.detach()), "cf": float(cf.detach())}
        means = {"cf": (self.params.cf_weight * cf, k)}
        if factual:
            fact = self.ce(logits[n + k:], aug["y_f"], batch_term=False)  # a subset
            total = total + self.params.factual_weight * fact
            parts["factual"] = float(fact.detach())
            means["factual"] = (self.params.factual_weight * fact, k)
        # history's train_cf / train_factual: means over the epoch's annotated samples
        # (weighted by this step's k, not by the batch size)
        return LossOutput(total, parts, means=means, part_weights={k_: k for k_ in means})
