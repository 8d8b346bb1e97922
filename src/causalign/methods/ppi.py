"""Proactive Pseudo-Intervention (seed 002, §3.1, App. B, D, F).

For each training image x with label y, a saliency map s of the true class (WBP by default)
is normalised per image to [0, 1] and turned into a mask T(s). Then

    x*  = x − T(s(x)) ⊙ x                 negative contrast: the evidence is removed
    x'  = x − T(s(x_π(i))) ⊙ x            adversarial contrast: another image's mask
    L   = w_cls·CE(f(x), y) + w_con·L_con + w_reg·L_reg + w_ad·CE(f(x'), y)

with L_con = −log(1 − p_y(x*)) (= CE(f(x*), ¬y) for two classes; the one-vs-others reading
for more) and L_reg = mean |s| of the normalised map. The map is computed with
``create_graph=True``, so L_con and L_reg train the model *through* its saliency.

Masks (``method.mask``):

* ``soft``  T = sigmoid(ω(s − σ)), ω = 100, σ = 0.25; ``adaptive_k`` > 0 sets σ per image to
  mean(s) + k·std(s) (App. B's image-adaptive threshold).
* ``hard``  keep the points with s > k·std(s), k = ``hard_k`` = 7 (App. B).
* ``box``   the box centred on the kept points' centre of mass, ± 1.2·std of their
  coordinates along every spatial axis (App. B, which reports ≥ 90 % of the kept points
  inside on its data; not a guarantee: a uniform square of kept points gets 49 %).
* ``topn``  the soft mask restricted to the N most salient points (App. D: every saliency
  backend then removes at most the same number of points). ``top_n`` < 1 is a fraction of
  the pixels, ≥ 1 a count.

Hard and box masks are binary, so with them the map gets gradient only from L_reg.

Choices, and why:

* Normalisation is s⁺ / max(s⁺) per image: negative WBP/LRP evidence speaks *against* the
  class, so it is not removed; a min–max scaling would put zero-evidence pixels mid-range and
  mask them.
* The map is computed in eval mode (every backend; WBP does so itself): samples stay
  independent and the saliency pass does not move BatchNorm running statistics. The contrast
  images x*, x' are classified in train mode in one batch, with BatchNorm running statistics
  frozen, so the statistics used at test time stay those of real images.
* The adversarial mask is detached: L_ad asks f to ignore a false intervention; it is not a
  training signal for the other image's map. An adaptive σ is detached for the same reason
  (a threshold, not a quantity to optimise).
* ``shift_masks`` (App. F) rolls each adversarial mask by a random offset of
  ``shift_max``/2 … ``shift_max`` of the image size per spatial axis, so that when lesions
  sit at the same place in every image, the positive contrast does not remove the lesion too.
* The L_con schedule (App. D) multiplies w_con by ``con_boost`` from epoch
  ``con_boost_epoch`` + 1 on; ``con_boost`` = 1 (default) switches it off, 100 is App. D's.
* ``contrast_on`` = ``positive`` (not in the paper's Eq. 3, which contrasts every sample)
  applies L_con to samples whose label is not class 0 only. In a diagnosis task class 0 is
  "no finding"/benign: removing the evidence of a malignant lesion should give benign, but
  removing a benign lesion's evidence gives no reason to predict malignant, and asking for it
  gives the lesion-free contrasts of both classes opposite targets.
* ``fill`` = ``mean`` (not in the paper, whose Eq. 1 sets the masked pixels to zero) sets
  them to the image's mean intensity per channel. On images whose background is far from
  0 a zero-filled cut-out is a dark silhouette that the classifier can learn to read ("a
  hole means negative"), which is the intervention-detection shortcut L_ad is meant to stop.
* ``warmup_epochs`` W (not in the paper, whose backbones start from ImageNet weights):
  epochs 1…W train L_cls alone, so the maps PPI intervenes on come from a model that has
  learnt something. From scratch the first maps are noise, and removing them, or another
  image's, with weight 1 each can hold L_cls at chance for the whole run (measured).
* An image whose map has no positive evidence for its label (Grad-CAM zeroes a class the
  image speaks against) or whose hard/box mask keeps no point gets no contrast: x* would
  be x itself, and L_con would then push f(x) away from y (history: ``empty_mask``, the
  share of such images; their masks are not used for L_ad either).
* ``fraction`` < 1 (speed option, not in the paper) computes the maps and both contrasts for a
  random ⌈fraction·N⌉ of the batch each step (L_cls always uses the whole batch). L_con, L_reg
  and L_ad are batch means, so this is an unbiased estimate of the same loss at about
  ``fraction`` of the saliency and contrast cost. Data-parallel, the sample is drawn over the
  global batch (rank 0's draw, broadcast; `PPI._global_fraction`), not per rank's chunk.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..data.format import as_training_split
from ..errors import ConfigError, not_one_of
from ..explain.base import eval_mode
from .base import LossOutput, Method, register_method, warn_unused_settings

if TYPE_CHECKING:
    from ..data.format import LesionDataset

__all__ = ["PPI", "PPIParams", "soft_mask", "hard_mask", "box_mask", "topn_mask",
           "normalize_saliency", "contrast_loss", "shift_masks"]

BACKENDS = ("wbp", "gradcam", "lrp-epsilon", "gradient", "input-x-gradient")
MASKS = ("soft", "hard", "box", "topn")
CONTRAST_ON = ("all", "positive")
FILLS = ("zero", "mean")


@dataclass
class PPIParams:
    saliency: str = "wbp"  # backend: wbp | gradcam | lrp-epsilon | gradient | input-x-gradient
    mask: str = "soft"  # soft | hard | box | topn
    omega: float = 100.0  # soft mask slope ω
    sigma: float = 0.25  # soft mask threshold σ on the normalised map
    adaptive_k: float = 0.0  # > 0: σ = mean + k·std per image
    hard_k: float = 7.0  # hard/box: keep s > k·std
    box_std: float = 1.2  # box half-size in coordinate std's
    top_n: float = 0.02  # topn: fraction (< 1) or count (≥ 1) of points
    cls_weight: float = 1.0
    con_weight: float = 1.0
    reg_weight: float = 1.0
    ad_weight: float = 1.0
    con_boost: float = 1.0  # App. D: 100
    con_boost_epoch: int = 20
    shift_masks: bool = False  # App. F mask shifting for the adversarial contrasts
    shift_max: float = 0.25
    fraction: float = 1.0  # share of the batch that gets maps and contrasts (speed option)
    contrast_on: str = "all"  # all (Eq. 3) | positive: L_con only for labels != 0
    warmup_epochs: int = 0  # epochs of L_cls alone before the PPI terms start
    fill: str = "zero"  # what masked pixels become: zero (Eq. 1) | mean (the image's mean)

    def validate(self) -> None:
        if self.saliency not in BACKENDS:
            raise ConfigError(not_one_of("method.saliency", self.saliency, BACKENDS))
        if self.mask not in MASKS:
            raise ConfigError(not_one_of("method.mask", self.mask, MASKS))
        if not self.omega > 0:
            raise ConfigError(f"method.omega must be > 0, got {self.omega}")
        if not 0 <= self.sigma <= 1:
            raise ConfigError(f"method.sigma must lie in [0, 1], got {self.sigma}")
        if self.adaptive_k < 0 or self.hard_k < 0 or self.box_std <= 0:
            raise ConfigError("method.adaptive_k and method.hard_k must be >= 0, "
                              "method.box_std > 0")
        if not self.top_n > 0:
            raise ConfigError(f"method.top_n must be > 0, got {self.top_n}")
        for name in ("cls_weight", "con_weight", "reg_weight", "ad_weight", "con_boost"):
            if getattr(self, name) < 0:
                raise ConfigError(f"method.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.shift_max < 1:
            raise ConfigError(f"method.shift_max must lie in (0, 1), got {self.shift_max}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"method.fraction must lie in (0, 1], got {self.fraction}")
        if self.con_boost_epoch < 0:
            raise ConfigError(f"method.con_boost_epoch must be >= 0, got {self.con_boost_epoch}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.fill not in FILLS:
            raise ConfigError(not_one_of("method.fill", self.fill, FILLS))
        if self.contrast_on not in CONTRAST_ON:
            raise ConfigError(not_one_of("method.contrast_on", self.contrast_on, CONTRAST_ON))


# ------------------------------------------------------------------ masks (pure functions)


def _per_image(t: Tensor) -> Tensor:
    """View (N, *spatial) as (N, P)."""
    return t.flatten(1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def normalize_saliency(s: Tensor, eps: float = 1e-12) -> Tensor:
    """s⁺ / max(s⁺) per image, in [0, 1]; an image without positive evidence maps to zeros."""
    pos = s.clamp_min(0)
    peak = _per_image(pos).max(dim=1).values
    return pos / _bcast(peak.clamp_min(eps), pos)


def soft_mask(s: Tensor, omega: float = 100.0, sigma: float | Tensor = 0.25) -> Tensor:
    """T(s) = sigmoid(ω(s − σ)); σ a number or a per-image tensor (N,)."""
    if isinstance(sigma, Tensor):
        sigma = _bcast(sigma, s)
    return torch.sigmoid(omega * (s - sigma))


def adaptive_sigma(s: Tensor, k: float) -> Tensor:
    """Per-image threshold mean(s) + k·std(s) (App. B), detached."""
    flat = _per_image(s.detach())
    return flat.mean(1) + k * flat.std(1, unbiased=False)


def hard_mask(s: Tensor, k: float = 7.0) -> Tensor:
    """1[s > k·std(s)] per image (App. B); binary, no gradient."""
    flat = _per_image(s.detach())
    thr = k * flat.std(1, unbiased=False)
    return (s.detach() > _bcast(thr, s)).to(s.dtype)


def box_mask(s: Tensor, k: float = 7.0, box_std: float = 1.2) -> Tensor:
    """Box around the hard-mask points: centre of mass ± box_std·std along each spatial axis.

    Mass = saliency of the kept points. Images without kept points get an empty mask; a
    single kept point gives a one-pixel box.
    """
    keep = hard_mask(s, k)
    mass = s.detach().clamp_min(0) * keep
    total = _per_image(mass).sum(1)
    spatial = s.shape[1:]
    inside = torch.ones_like(s, dtype=torch.bool)
    for axis, size in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = size
        coord = torch.arange(size, device=s.device, dtype=s.dtype).view(1, *shape)
        denom = _bcast(total.clamp_min(1e-30), s)
        centre = _bcast(_per_image(mass * coord).sum(1), s) / denom
        var = _bcast(_per_image(mass * (coord - centre) ** 2).sum(1), s) / denom
        half = box_std * var.sqrt() + 0.5  # +0.5: the pixel holding the centre is inside
        inside &= (coord - centre).abs() <= half
    inside &= _bcast(total > 0, s)
    return inside.to(s.dtype)


def topn_mask(s: Tensor, n: float, omega: float = 100.0, sigma: float | Tensor = 0.25
              ) -> Tensor:
    """Soft mask restricted to the top-n points of each image (n < 1: fraction of points)."""
    flat = _per_image(s)
    idx = flat.detach().topk(n_points(tuple(s.shape[1:]), n), dim=1).indices
    top = torch.zeros_like(flat).scatter_(1, idx, 1.0).view_as(s)
    return top * soft_mask(s, omega, sigma)


def shift_masks(masks: Tensor, max_fraction: float = 0.25,
                generator: torch.Generator | None = None) -> Tensor:
    """Roll each mask by a random offset of max_fraction/2 … max_fraction of the size (random
    sign) along every spatial axis (App. F), so it rarely covers its original place."""
    out = []
    spatial = masks.shape[1:]
    dims = tuple(range(len(spatial)))
    for m in masks:
        shifts = []
        for size in spatial:
            lo, hi = max(1, int(size * max_fraction / 2)), max(1, int(size * max_fraction))
            mag = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            sign = 1 if float(torch.rand(1, generator=generator)) < 0.5 else -1
            shifts.append(sign * mag)
        out.append(torch.roll(m, shifts=tuple(shifts), dims=dims))
    return torch.stack(out)


def contrast_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean −log(1 − p_y): CE towards ¬y for two classes, one-vs-others for more (stable)."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


def derangement(n: int, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """A random permutation π with π(i) ≠ i (n ≥ 2): shuffle, then map each to its successor."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm.to(device)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Train-mode BatchNorm (batch statistics) that leaves the running statistics untouched."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0  # running = (1 − 0)·running + 0·batch
    try:
        yield model
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# ------------------------------------------------------------------ the method


@register_method("ppi")
class PPI(Method):
    """L_cls + L_con + L_reg + L_ad with differentiable saliency (see module doc)."""

    Params = PPIParams
    # L_cls (train_cls) is the classification loss, drawn as train_loss like others' CE
    guidance_terms = ("con", "ad", "reg")
    # L_reg, L_con, L_ad average subsets of the batch (fraction, masked/contrasted rows):
    # data-parallel training weights them by the global batch's counts (LossOutput.means)
    subset_means = True

    def __init__(self, params: PPIParams | None = None) -> None:
        super().__init__(params)
        self.epoch = 0
        self._said_no_epoch = False

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        """Refuse Grad-CAM saliency whose layer is one pixel at this image size (resnet18 at
        32 px): its upsampled map is constant, so every intervention mask would cover the whole
        image and PPI would train on nothing."""
        self.check_settings()
        train_set = as_training_split(train_set)  # a Subset has no `batch`
        if self.params.saliency != "gradcam" or len(train_set) == 0:
            return
        from ..models import find_cam_layer

        seen: dict[str, tuple[int, ...]] = {}

        def record(_m: nn.Module, _i: object, out: Tensor) -> None:
            seen.setdefault("shape", tuple(out.shape[2:]))

        handle = find_cam_layer(model).register_forward_hook(record)
        param = next(model.parameters())
        # the model's device and float dtype: float32 images failed in a float64 model
        batch = {k: v.to(param.device, param.dtype) if v.is_floating_point()
                 else v.to(param.device) for k, v in train_set.batch(torch.arange(1)).items()}
        try:
            with torch.no_grad(), eval_mode(model):
                model(self.model_input(batch))
        finally:
            handle.remove()
        cam = seen.get("shape", ())
        if cam and min(cam) < 2:
            size = "x".join(str(d) for d in batch["image"].shape[2:])
            raise ConfigError(f"method.saliency=gradcam: this model's Grad-CAM layer is "
                              f"{'x'.join(map(str, cam))} at {size} px images, so every map is "
                              f"constant; use method.saliency=wbp or larger images")

    def check_settings(self, image_shape: tuple[int, ...] | None = None) -> None:
        """Warn of settings the chosen mask or schedule never reads (`setup`; `causalign
        bench step` calls it too): `--set method.hard_k=3` with the default soft mask, or
        shift_max without shift_masks, trained exactly as without them."""
        p = self.params
        thresholded = p.mask in ("soft", "topn")  # sigmoid(ω(s − σ)) masks
        warn_unused_settings(p, (
            ("omega", thresholded, "with method.mask soft or topn"),
            ("adaptive_k", thresholded, "with method.mask soft or topn"),
            ("sigma", thresholded and p.adaptive_k == 0,
             "with method.mask soft or topn and method.adaptive_k=0 (adaptive_k > 0 sets "
             "sigma per image)"),
            ("hard_k", p.mask in ("hard", "box"), "with method.mask hard or box"),
            ("box_std", p.mask == "box", "with method.mask=box"),
            ("top_n", p.mask == "topn", "with method.mask=topn"),
            ("shift_max", p.shift_masks, "with method.shift_masks=true"),
            ("con_boost_epoch", p.con_boost != 1, "with method.con_boost other than 1"),
        ))

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def _warn_no_epoch(self) -> None:
        """A loop that never calls `on_epoch_start` (a user's own, a notebook's) left epoch
        at 0: warmup_epochs and con_boost count epochs from it, so the warm-up was skipped
        and the boost never came, without a word. Said once."""
        p = self.params
        schedule = [what for what, on in (
            (f"method.warmup_epochs={p.warmup_epochs}", p.warmup_epochs > 0),
            (f"method.con_boost={p.con_boost:g}", p.con_boost != 1)) if on]
        if schedule and not self._said_no_epoch:
            self._said_no_epoch = True
            warnings.warn(f"ppi: {' and '.join(schedule)} count epochs from "
                          f"on_epoch_start(epoch), which this loop has not called: call "
                          f"method.on_epoch_start(epoch) (1-based) before each epoch, or the "
                          f"schedule does not apply", stacklevel=3)

    def con_weight_now(self) -> float:
        p = self.params
        boost = p.con_boost if self.epoch > p.con_boost_epoch else 1.0
        return p.con_weight * boost

    def _global_fraction(self, m: int, device: torch.device) -> Tensor | None:
        """Data-parallel `fraction`: this rank's rows of one draw over the global batch.

        One process maps max(2, ⌈fraction·N⌉) samples of the global batch; drawn per chunk,
        each of W ranks took max(2, ⌈fraction·m⌉) of its own, up to 2W in all (at W = 8 and
        8 samples a rank, fraction 1/8 mapped 16 samples of 64 instead of 8). Rank 0 draws
        the permutation one process would (`torch.randperm(N)` from its generator) and
        broadcasts it (one collective of ≤ N integers); each rank keeps the drawn rows of its
        chunk, in drawn order. None (the draw stays per chunk): a single process, a batch
        that is all drawn, or a step where a rank has an empty chunk (it never calls the
        loss, so it cannot join the broadcast)."""
        import torch.distributed as dist

        gs = self.global_step
        if gs is None or gs.world < 2 or 0 in gs.sizes:
            return None
        if gs.sizes[gs.rank] != m:
            raise RuntimeError(f"ppi: method.global_step gives this rank {gs.sizes[gs.rank]} "
                               f"samples, the batch holds {m} (set it before every step)")
        big_n = gs.n_global
        k = max(2, math.ceil(self.params.fraction * big_n))
        if k >= big_n:
            return torch.arange(m, device=device)
        drawn = torch.randperm(big_n, device=device)[:k] if gs.rank == 0 else \
            torch.empty(k, dtype=torch.long, device=device)
        dist.broadcast(drawn, 0)
        mine = (drawn >= gs.offset) & (drawn < gs.offset + m)
        return drawn[mine] - gs.offset

    def saliency(self, model: nn.Module, x: Tensor, target: Tensor,
                 create_graph: bool = True) -> Tensor:
        """Raw map (N, *spatial) of the target class, differentiable in θ if create_graph."""
        name = self.params.saliency
        if name == "gradcam" and x.dim() == 5:
            raise ConfigError("method.saliency=gradcam needs 2D images; use wbp for volumes")
        if name == "wbp":
            from ..explain.wbp import wbp_weights

            w = wbp_weights(model, x, target, create_graph=create_graph)
            return (x * w).sum(1)
        from ..explain import get_explainer

        with eval_mode(model):
            a = get_explainer(name, model).attribute(x, target=target, create_graph=create_graph)
        return a.sum(1)

    def mask(self, s: Tensor) -> Tensor:
        """T(s) for a normalised map s (N, *spatial)."""
        p = self.params
        sigma: float | Tensor = p.sigma
        if p.adaptive_k > 0:
            sigma = adaptive_sigma(s, p.adaptive_k)
        if p.mask == "soft":
            return soft_mask(s, p.omega, sigma)
        if p.mask == "hard":
            return hard_mask(s, p.hard_k)
        if p.mask == "box":
            return box_mask(s, p.hard_k, p.box_std)
        return topn_mask(s, p.top_n, p.omega, sigma)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        p = self.params
        x = self.model_input(batch)
        y = batch["label"]
        n = x.shape[0]
        logits = model(x)
        l_cls = self.ce(logits, y)
        if self.epoch == 0:
            self._warn_no_epoch()
        w_con = self.con_weight_now()
        if p.fraction < 1:  # maps and contrasts for a random subset (unbiased batch means)
            idx = self._global_fraction(n, x.device)
            if idx is None:
                k = max(2, math.ceil(p.fraction * n))
                if k < n:
                    idx = torch.randperm(n, device=x.device)[:k]
            if idx is not None:
                x, y, n = x[idx], y[idx], len(idx)
        w_ad = p.ad_weight if n >= 2 else 0.0  # a derangement needs two images
        parts = {"cls": float(l_cls.detach()), "con_weight": w_con}
        total = p.cls_weight * l_cls
        if (w_con == 0 and w_ad == 0 and p.reg_weight == 0) or \
                0 < self.epoch <= p.warmup_epochs or n == 0:  # n = 0: none drawn here
            return LossOutput(total, parts)
        s = normalize_saliency(self.saliency(model, x, y, create_graph=True))
        l_reg = s.flatten(1).mean(1).mean()
        total = total + p.reg_weight * l_reg
        parts["reg"] = float(l_reg.detach())
        means = {"reg": (p.reg_weight * l_reg, n)}
        contrasts, kinds, targets = [], [], []
        if w_con > 0 or w_ad > 0:
            t = self.mask(s)
            parts["mask_area"] = float(t.detach().flatten(1).mean(1).mean())
            # A map without positive evidence for y (Grad-CAM's ReLU zeroes every point of a
            # class the image speaks against), or a hard/box mask that keeps no point, removes
            # nothing: its contrast is x itself, so L_con would push f(x) away from y against
            # L_cls, and L_ad would repeat L_cls. Such masks take part in neither contrast.
            masked = (s.detach().flatten(1).amax(1) > 0) & (t.detach().flatten(1).amax(1) > 0)
            parts["empty_mask"] = float((~masked).float().mean())
            con_rows = (y != 0) if p.contrast_on == "positive" else torch.ones_like(y, dtype=bool)
            con_rows = con_rows & masked
            # x − T ⊙ (x − f): Eq. 1 for f = 0; f = the image's mean hides the cut-out's outline.
            fill: Tensor | float = x.flatten(2).mean(2).view(n, -1, *([1] * (x.dim() - 2))) \
                if p.fill == "mean" else 0.0
            if w_con > 0 and bool(con_rows.any()):
                contrasts.append((x - t.unsqueeze(1) * (x - fill))[con_rows])
                kinds.append("con")
                targets.append(y[con_rows])
            if w_ad > 0:
                perm = derangement(n, device=x.device)
                t_ad = t.detach()[perm]
                if p.shift_masks:
                    t_ad = shift_masks(t_ad, p.shift_max)
                ad_rows = masked[perm]  # the other image's mask must remove something
                if bool(ad_rows.any()):
                    contrasts.append((x - t_ad.unsqueeze(1) * (x - fill))[ad_rows])
                    kinds.append("ad")
                    targets.append(y[ad_rows])
        if contrasts:
            with frozen_bn_stats(model):
                out = model(torch.cat(contrasts)).split([len(c) for c in contrasts])
            for kind, o, target in zip(kinds, out, targets, strict=True):
                if kind == "con":
                    l_con = contrast_loss(o, target)
                    total = total + w_con * l_con
                    parts["con"] = float(l_con.detach())
                    means["con"] = (w_con * l_con, len(target))
                else:
                    # class_weight: L_ad is CE of the true label on an image with another
                    # image's (non-evidence) region removed, a classification of y like
                    # L_cls, so weighted; L_con pushes away from y and is not
                    l_ad = self.ce(o, target, batch_term=False)  # a subset of the rows
                    total = total + w_ad * l_ad
                    parts["ad"] = float(l_ad.detach())
                    means["ad"] = (w_ad * l_ad, len(target))
        # history's train_reg / train_con / train_ad: each the mean over the epoch's samples
        # it averaged (contrast_on=positive: the positives, few on imbalanced data), not
        # weighted by the batch size
        return LossOutput(total, parts, means=means,
                          part_weights={k: c for k, (_, c) in means.items()})


def n_points(spatial: tuple[int, ...], top_n: float) -> int:
    """How many points the topn mask keeps for an image of this spatial shape."""
    total = math.prod(spatial)
    return max(1, min(total, int(round(top_n * total)) if top_n < 1 else int(top_n)))
