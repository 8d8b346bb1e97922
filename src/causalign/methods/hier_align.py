"""Hierarchical causal alignment X → A → Y (seed 000 §4.3, Eq. 5–7).

f = f₂ ∘ f₁: f₁ (seed CNN) maps the image to p attribute logits z, â = σ(z); f₂ (2-layer MLP)
maps attribute probabilities to the label. Trained end to end with Eq. 5:

    L = CE(f₂(â), y) + BCE(z, a) + λ₂·L_align(θ₂) + λ₁·L_align(θ₁)

* BCE(z, a) averages over the *known* attribute entries of the batch (``attr_known``); a
  sample without attribute annotations gets no attribute loss.
* Eq. 6, attribute counterfactual: a* = argmin_a' CE(f₂(a'), y*) + α₂·d(a', â). The search
  runs on attribute logits u (a' = σ(u), distance l1 on u − z): a* stays a probability vector —
  Eq. 7 uses it as a BCE target — and the minimiser is finite even for the paper's tiny
  α₂ = 0.0005 (a distance on probabilities is bounded, so CE would push a' to ±∞).
  L_align(θ₂) = mean_i ‖(a*_i − â_i) ⊙ (1 − r_i)‖₁ over samples with a CCCE annotation r
  (fully annotated attributes); its gradient w.r.t. θ₂ is the implicit adjoint (â constant).
* Eq. 7, image counterfactual explaining â → a*: x* = argmin_x' Σ_k BCE(f₁(x')_k, a*_k) +
  α₁·d(x', x); L_align(θ₁) is Eq. 3 on the pixel mask, gradient w.r.t. θ₁ by the implicit
  adjoint (a* constant), over samples with a mask.

Both alignment terms reuse causal-align's machinery unchanged (`CausalAlign.implicit_term`:
counterfactual generator, Jacobi-preconditioned batched CG, failure handling): the attribute
level is causal-align on f₂ in a "latent" space whose decoder is the sigmoid (`SigmoidCode`),
the image level is causal-align on f₁ with soft attribute targets.

r comes from CCCE attribution (`causalign.causal.ccce`) fitted in `setup` on the training
annotations: P(Y | A) by a monotone logistic model (or smoothed frequencies), argmax CCCE
over |S| ≤ 3.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.format import as_training_split
from ..errors import MAX_SETTING, CausalignError, ConfigError, InputError, not_one_of
from ..explain.counterfactual import (
    DISTANCES,
    MIN_L1_EPS,
    CounterfactualResult,
    capture_bn_stats,
    counterfactual_targets,
)
from .base import DataInfo, LossOutput, Method, grad_norm, register_method
from .causal_align import (
    NORMALIZE,
    CausalAlign,
    CausalAlignParams,
    GradCap,
    never_fell_back,
    never_met_negative_curvature,
    no_setup_message,
    refuse_autograd_context,
    share_weights,
)

if TYPE_CHECKING:
    from ..causal.ccce import CCCEResult
    from ..data.format import LesionDataset
    from ..engine.config import TrainConfig
    from ..engine.distributed import GlobalStep


CCCE_MODELS = ("logistic", "frequency")
_HIDDEN_MAX = 2**31 - 1  # method.hidden: f₂'s hidden width


class SigmoidCode(nn.Module):
    """'Autoencoder' between attribute probabilities and logits: encode = logit,
    decode = σ. Lets the generator search Eq. 6 on logits while x* is a probability."""

    def __init__(self, clamp: float = 1e-6) -> None:
        super().__init__()
        self.clamp = clamp

    def encode(self, a: Tensor) -> Tensor:
        """Logits of the probabilities ``a`` (clamped away from 0 and 1)."""
        return torch.logit(a.clamp(self.clamp, 1 - self.clamp))

    def decode(
        self, u: Tensor,
        shape: tuple[int, int] | None = None,  # noqa: ARG002 - generator's signature
    ) -> Tensor:
        """Probabilities σ(u); ``shape`` is unused."""
        return u.sigmoid()


@dataclass
class HierAlignParams:
    """`method.<key>` settings of hier-align (paper defaults where it gives them)."""

    alpha1: float = 0.01  # α₁, Eq. 7 (paper, LIDC-IDRI; CBIS-DDSM 0.07)
    alpha2: float = 0.0005  # α₂, Eq. 6 (paper, both datasets)
    lam1: float = 1.0  # λ₁ (paper)
    lam2: float = 1.0  # λ₂ (paper)
    attr_weight: float = 1.0  # weight of BCE(f₁(x), a) (Eq. 5: 1)
    hidden: int = 32  # f₂ hidden width
    # image level (Eq. 7): causal-align's training defaults (README "Causal alignment"):
    # normalize = total divides Eq. 3 by the sample's whole change (the share outside the
    # mask; "none" = Eq. 3 as printed, whose gradient dwarfs CE's and collapsed f₁ to a
    # constant in our runs), at most align_batch samples per batch enter L_align(θ₁)
    steps: int = 5
    inner_lr: float = 0.01
    distance: str = "l1"
    eps: float = 1e-2
    warm_start: bool = True
    cache_device: str = "model"  # the warm-start cache's device (causal-align's setting)
    cache_dtype: str = "float32"  # its precision (causal-align's setting)
    region: str = "mask"
    normalize: str = "total"
    align_batch: int = 16
    bn: str = "batch"
    # attribute level (Eq. 6): Adam on attribute logits
    attr_steps: int = 50
    attr_lr: float = 0.3
    attr_eps: float = 1e-2  # l1 smoothing in logit units
    # total: L_align(θ₂) as the share of the attribute change Σ|a* − â| that falls on
    # attributes CCCE did not attribute | none: the raw sum as printed in the paper, which f₂
    # can drive to 0 by sitting on its decision boundary (a* ≈ â flips it): measured, training
    # then collapsed to a constant label head (CE > ln 2, val AUC 0.40)
    attr_normalize: str = "total"
    # shared implicit-gradient settings
    cg_iters: int = 8  # the BCE Gauss-Newton term has rank p (6): CG needs ~p+1 iterations
    cg_tol: float = 1e-3
    damping: float = 1e-2
    hvp: str = "exact"
    negative_curvature: str = "gauss-newton"  # as causal-align's
    gn_switch: int = 3  # as causal-align's, per level
    fd_eps: float = 1e-3
    precondition: bool = True
    align_every: int = 1
    # first epoch with the alignment terms (1 = from the start, the paper's Eq. 5);
    # later = the X→A→Y model first learns attributes and label by CE + BCE alone
    align_start: int = 1
    # > 0: cap each level's alignment gradient at this multiple of the norm of the supervised
    # gradient of the same parameters (θ₁: CE + BCE, θ₂: CE). Measured on the plus-minus
    # benchmark, λ₁·dL_align(θ₁)/dθ₁ is 10–50x the BCE gradient and points against it
    # (cosine −0.4), which kept f₁ from learning the attributes (README); 0 = uncapped, Eq. 5
    # as printed
    balance: float = 1.0
    # CCCE attribution (r)
    ccce_model: str = "logistic"  # logistic | frequency
    ccce_max_size: int = 3
    ccce_tol: float = 0.01  # smallest subset within tol of the best CCCE

    def validate(self) -> None:
        """Coerce each setting to its type and refuse a bad one with one ConfigError line."""
        CausalAlignParams._coerce(self)  # same string → field-type coercion
        checks = [
            (all(0 <= v <= MAX_SETTING for v in (self.alpha1, self.alpha2)),
             f"method.alpha1/alpha2 must be in [0, {MAX_SETTING:g}]"),
            (all(0 <= v <= MAX_SETTING for v in (self.lam1, self.lam2)),
             f"method.lam1/lam2 must be in [0, {MAX_SETTING:g}]"),
            # a width past torch's int64 sizes failed in nn.Linear with an "Overflow when
            # unpacking long long" TypeError traceback; 2^31 - 1 is already beyond any memory
            (1 <= self.hidden <= _HIDDEN_MAX,
             f"method.hidden must be in 1..{_HIDDEN_MAX}, got {self.hidden}"),
            (self.attr_steps >= 1 and self.attr_lr > 0 and self.attr_eps > 0,
             "method.attr_steps must be >= 1, attr_lr and attr_eps > 0"),
            # checked here: attribute_params() passes it on as `eps`, whose message named
            # method.eps (the image level's key) for a bad method.attr_eps
            (self.attr_eps >= MIN_L1_EPS,
             f"method.attr_eps must be >= {MIN_L1_EPS:g} (ε² underflows float32 below "
             f"~1e-19), got {self.attr_eps}"),
            (self.ccce_model in CCCE_MODELS,
             not_one_of("method.ccce_model", self.ccce_model, CCCE_MODELS)),
            (self.ccce_max_size >= 1, "method.ccce_max_size must be >= 1"),
            (self.align_start >= 1, "method.align_start must be >= 1"),
            # not in the levels' checks (_shared passes them align_every=1): 0 failed with a
            # ZeroDivisionError traceback on the first step, a negative value was accepted
            (self.align_every >= 1, f"method.align_every must be >= 1, got {self.align_every}"),
            # hier-align's own weight of Eq. 5 (alpha/lam are capped): 1e40 overflowed
            # float32 and stopped training on its first step with "non-finite loss"
            (0 <= self.attr_weight <= MAX_SETTING,
             f"method.attr_weight must be in [0, {MAX_SETTING:g}], got {self.attr_weight}"),
            (self.balance >= 0, f"method.balance must be >= 0, got {self.balance}"),
            (self.align_batch >= 0, "method.align_batch must be >= 0"),
            (self.ccce_tol >= 0, "method.ccce_tol must be >= 0"),
            # checked here: attribute_params() passes it on as `normalize`, whose message
            # named method.normalize for a bad method.attr_normalize
            (self.attr_normalize in NORMALIZE,
             not_one_of("method.attr_normalize", self.attr_normalize, NORMALIZE)),
            (self.distance in DISTANCES, not_one_of("method.distance", self.distance, DISTANCES)),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        self.pixel_params().validate()
        self.attribute_params().validate()

    def _shared(self) -> dict:
        return dict(cg_iters=self.cg_iters, cg_tol=self.cg_tol, damping=self.damping,
                    hvp=self.hvp, negative_curvature=self.negative_curvature,
                    gn_switch=self.gn_switch, fd_eps=self.fd_eps, precondition=self.precondition,
                    align_every=1)

    def pixel_params(self) -> CausalAlignParams:
        """causal-align settings of the image level (Eq. 7)."""
        return CausalAlignParams(alpha=self.alpha1, lam=self.lam1, steps=self.steps,
                                 inner_lr=self.inner_lr, distance=self.distance, eps=self.eps,
                                 warm_start=self.warm_start, region=self.region,
                                 normalize=self.normalize, bn=self.bn,
                                 cache_device=self.cache_device,
                                 cache_dtype=self.cache_dtype, **self._shared())

    def attribute_params(self) -> CausalAlignParams:
        """causal-align settings of the attribute level (Eq. 6, logit space)."""
        return CausalAlignParams(alpha=self.alpha2, lam=self.lam2, steps=self.attr_steps,
                                 inner_lr=self.attr_lr, distance="l1", eps=self.attr_eps,
                                 warm_start=False, space="latent", bn="running",
                                 normalize=self.attr_normalize,
                                 **self._shared())


def _subset(res: CounterfactualResult, keep: Tensor) -> CounterfactualResult:
    """Rows ``keep`` of a counterfactual result (and of its inner problem)."""
    sub = res.problem.subset(keep)
    return CounterfactualResult(
        x_star=res.x_star[keep], u_star=res.u_star[keep], target=res.target[keep],
        diverged=res.diverged[keep], warm=res.warm[keep], distance=res.distance[keep],
        problem=sub)


def _trainable(module: nn.Module) -> list[Tensor]:
    return [q for q in module.parameters() if q.requires_grad]


@register_method("hier-align")
class HierAlign(Method):
    """Hierarchical causal alignment X → A → Y (seed 000, Eq. 5-7; see the module docstring).

    ``HierAlign(params)`` with `HierAlignParams`; `build_model` gives f₂ ∘ f₁
    (`HierarchicalModel`), `setup` fits the CCCE attribution r on the training annotations
    and the image level's distance scales, `loss` gives Eq. 5 with both alignment terms'
    implicit gradients attached (``pixel`` and ``attr``: the image- and attribute-level
    `CausalAlign`). One object belongs to one run of one model."""

    Params = HierAlignParams
    # Masks/boxes are optional: without any, only the attribute level (Eq. 6) aligns.
    uses_annotations = False
    guidance_terms = ("img_align", "attr_align")
    subset_means = True  # BCE over known attributes, both alignment terms (see loss)
    # as causal-align's; before negative_curvature both levels raised δ (up to 10; runs from
    # before 2026-12-05 01:15 dropped the samples instead, which no setting reproduces)
    params_before = {"gn_switch": 0, "negative_curvature": "damping"}
    placement_params = ("cache_device",)  # the warm-start cache's device: same numbers

    def setting_had_no_effect(self, key: str, history: list[dict]) -> bool:
        if key == "negative_curvature":
            return never_met_negative_curvature(history, self.params.damping)
        return key == "gn_switch" and never_fell_back(history)

    def __init__(self, params: HierAlignParams | None = None) -> None:
        super().__init__(params)
        self.pixel = CausalAlign(self.params.pixel_params())
        self.pixel.require_region = False  # masks are optional here (attribute level only)
        # its setup warnings (intensity range, cache size) name this method's settings
        self.pixel.owner, self.pixel.alpha_key = "hier-align", "alpha1"
        self.pixel.setting_defaults = dataclasses.asdict(HierAlignParams().pixel_params())
        self.attr = CausalAlign(self.params.attribute_params())
        self.attr.autoencoder = SigmoidCode()
        self.step = 0
        self.epoch = 1
        # on_epoch_start() called at all: align_start > 1 counts epochs only through it
        # (never called, epoch stayed 1 and the run never aligned, without a word)
        self._epochs_told = False
        # as causal-align's: a second setup() starts a new run unless load_state_dict()
        # came in between; the no-setup warning is given once
        self._set_up = False
        self._restored = False
        self._warned_no_setup = False
        self.r_table: Tensor | None = None  # (n_train, p) bool: CCCE-causal attributes
        self.r_known: Tensor | None = None  # (n_train,) bool: r defined (evidence, an effect)
        self.attribution: CCCEResult | None = None  # on the training split

    # ---------------------------------------------------------------- model / setup

    def build_model(self, cfg: TrainConfig, info: DataInfo) -> nn.Module:
        """f₂ ∘ f₁: ``cfg.model`` predicting the attributes, an MLP head the label (2D only)."""
        from ..models import VOLUME_MODELS, HierarchicalModel, MLPHead, build_model

        if not info.attributes:
            raise CausalignError("method 'hier-align' needs attribute annotations; this "
                                 "dataset declares none (attributes: [] in dataset.yaml)")
        if len(info.image_shape) == 4:
            # the data and the way out named: the line said only "takes 2D images"
            raise CausalignError(f"method 'hier-align' takes 2D images (C,H,W); this dataset "
                                 f"holds volumes of shape {tuple(info.image_shape)} (for "
                                 f"volumes: --method causal-align --model multiview)")
        if cfg.model in VOLUME_MODELS:  # f₁ would fail on the first 2D batch
            raise CausalignError(f"model '{cfg.model}' takes volumes (C,D,H,W); method "
                                 f"'hier-align' takes 2D images (use a 2D --model)")
        p = len(info.attributes)
        f1 = build_model(cfg.model, info.in_channels, p, width=cfg.width,
                         image_shape=info.image_shape, options=cfg.model_args)
        f2 = MLPHead(p, info.num_classes, hidden=self.params.hidden)
        return HierarchicalModel(f1, f2)

    def check_settings(self, image_shape: tuple[int, ...] | None) -> None:
        """The image level's data-independent checks (`CausalAlign.check_settings`)."""
        self.pixel.check_settings(image_shape)

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        """CCCE attribution r on the training annotations; pixel-distance statistics. A
        ``torch.utils.data.Subset`` of a split (``random_split``) fits on its samples."""
        train_set = as_training_split(train_set)
        if not all(isinstance(getattr(train_set, k, None), Tensor)
                   for k in ("attributes", "labels")):
            # was "'ConcatDataset' object has no attribute 'attributes'"
            raise InputError(f"hier-align: setup fits the CCCE attribution on the training "
                             f"split's attributes and labels, so it needs a LesionDataset "
                             f"split (or a Subset of one, or an object with .attributes and "
                             f".labels); got {type(train_set).__name__}")
        attrs = getattr(train_set, "attributes", None)
        if attrs is not None and attrs.numel() and bool(torch.isnan(attrs).all()):
            # declared but never annotated (all attr_ cells empty): no BCE term and no
            # attribute-level alignment, so f₁'s "attributes" were unsupervised logits and
            # the run trained without a word (a dataset declaring none is refused)
            raise CausalignError("method 'hier-align' needs attribute annotations; no "
                                 "training sample has one (every attr_ cell is empty)")
        if (self._set_up or self.step) and not self._restored:
            # another split or model: a new run (each level's cache, scales, damping and
            # Gauss-Newton switch; the CCCE attribution is fitted again below)
            self.step = 0
            self.pixel.new_run()
            self.attr.new_run()
        self._restored = False
        self.pixel.setup(train_set, getattr(model, "f1", model))
        self._warn_no_region(train_set)
        covers = getattr(train_set, "regions_cover_image", None)
        if self.params.lam1 > 0 and callable(covers) and covers(self.params.region):
            # no pixel lies outside a region: Eq. 7 is 0 for every sample, and the image
            # level trained nothing without a word. Only warned (causal-align refuses): the
            # attribute level still aligns
            warnings.warn(f"hier-align: every annotated training sample's {self.params.region} "
                          f"covers its whole image, so the image-level alignment "
                          f"(method.lam1) is 0; check the annotations (an inverted or "
                          f"blank-filled export?)", stacklevel=2)
        self.fit_attribution(train_set.attributes, train_set.labels)
        rows = getattr(train_set, "source_positions", None)
        if rows is not None and self.r_table is not None and self.r_known is not None:
            # a Subset's batches carry the full split's positions as `index` (`_r` looks
            # the table up by them): its rows go back to those positions, the others unknown
            table = torch.zeros((train_set.source_len, *self.r_table.shape[1:]),
                                dtype=self.r_table.dtype)
            known = torch.zeros(train_set.source_len, dtype=self.r_known.dtype)
            table[rows], known[rows] = self.r_table, self.r_known
            self.r_table, self.r_known = table, known
        self._warn_one_class(train_set.attributes, train_set.labels)
        self._warn_not_monotone(train_set)
        self._set_up = True

    def _warn_no_region(self, train_set: LesionDataset) -> None:
        """The image level (Eq. 7) aligns only samples with a region: a pixel mask under
        method.region=mask (a box does not stand in), a mask or box under region=box. Data
        without any (or box-only data under region=mask) ran method.lam1 as 0, history's
        train_n_align_img 0, without a word (causal-align refuses it; here the attribute
        level still aligns, so it is a warning)."""
        if self.params.lam1 <= 0:
            return
        has_mask = getattr(train_set, "has_mask", None)
        annotated = getattr(train_set, "has_box_or_mask", None)
        if not isinstance(has_mask, Tensor) or not isinstance(annotated, Tensor):
            return
        region = self.params.region
        usable = has_mask if region == "mask" else annotated
        if bool(usable.any()):
            box_only = int((annotated & ~has_mask).sum()) if region == "mask" else 0
            if box_only:
                warnings.warn(f"hier-align: {box_only} of {int(annotated.sum())} annotated "
                              f"training samples have only a box and get no image-level "
                              f"alignment under method.region=mask (method.region=box uses "
                              f"boxes, and masks' boxes)", stacklevel=3)
            return
        what = ("a pixel mask" + (" (only boxes; use --set method.region=box)"
                                  if bool(annotated.any()) else "")
                if region == "mask" else "a mask or box")
        warnings.warn(f"hier-align: no training sample has {what}, so the image-level "
                      f"alignment (method.lam1={self.params.lam1:g}) never applies; only "
                      f"the attribute level aligns (set method.lam1=0 to say so)",
                      stacklevel=3)

    def _warn_one_class(self, attributes: Tensor, labels: Tensor) -> None:
        """A training split whose fully annotated samples share one class ran with no
        attribute-level alignment (CCCE attributes nothing) and no word about it. Only for
        the split in `setup`: a batch-local attribution (no setup) sees one batch."""
        full = ~torch.isnan(attributes.detach().cpu().double()).any(1)
        classes = labels.detach().cpu()[full].unique()
        if len(classes) == 1 and self.params.lam2 > 0:
            warnings.warn(f"hier-align: every fully annotated training sample has label "
                          f"{int(classes[0])}, so CCCE attributes nothing and the attribute "
                          f"level (method.lam2) never aligns", stacklevel=2)

    def _warn_not_monotone(self, train_set: LesionDataset) -> None:
        """An attribute whose presence lowers P(Y=1) in the training annotations (LIDC's
        calcification as imported) breaks CCCE's monotonicity: r never marks it, so the
        attribute level penalises every change of it, without a word."""
        from ..causal.ccce import monotonicity_check

        if self.params.lam2 == 0 or self.attribution is None:
            return
        names = list(getattr(getattr(train_set, "meta", None), "attributes", None) or [])
        a = train_set.attributes.detach().cpu().double().numpy()
        if len(names) != a.shape[1]:
            names = [f"attribute {j}" for j in range(a.shape[1])]
        check = monotonicity_check(a, train_set.labels.detach().cpu().numpy(), names)
        if check["violating"]:
            warnings.warn(f"hier-align: in the training annotations "
                          f"{', '.join(check['violating'])} lower P(Y=1) when present "
                          f"(p = {check['p_value']:.2g}), against CCCE's monotonicity: "
                          f"CCCE never attributes them (recode each as 1 - value; "
                          f"`causalign causal ccce` shows the table)", stacklevel=3)

    def fit_attribution(self, attributes: Tensor, labels: Tensor) -> None:
        """r for every row (NaN = missing attribute; rows with any NaN get no r)."""
        from ..causal.ccce import causal_attribution, fit_label_model

        a = attributes.detach().cpu().double().numpy()
        y = labels.detach().cpu().numpy()
        n, p = a.shape
        full = ~np.isnan(a).any(1)
        if len(y) and int(y.max()) > 1:
            self._check_binary(int(y.max()) + 1)
        if not full.any() or set(np.unique(y[full]).tolist()) - {0, 1} \
                or len(np.unique(y[full])) < 2:
            # nothing to fit (no complete rows, one class, or not a binary label)
            self.r_table = torch.zeros(n, p, dtype=torch.bool)
            self.r_known = torch.zeros(n, dtype=torch.bool)
            self.attribution = None
            return
        pm = self.params
        model = fit_label_model(a, y, pm.ccce_model)
        res = causal_attribution(model, a, y, max_size=pm.ccce_max_size, tol=pm.ccce_tol)
        self.attribution = res
        self.r_table = torch.from_numpy(res.r)
        # a row where no subset has a causal effect (subset −1) has no r to align to: leave it
        # out rather than penalise every attribute change of its counterfactual
        self.r_known = torch.from_numpy(res.known & (res.subset >= 0))

    def _check_binary(self, classes: int) -> None:
        """CCCE (seed 000 §4.3) is defined for a binary label: with more classes no sample
        gets an attribution r, so the attribute level (λ₂) would silently never align."""
        if classes > 2 and self.params.lam2 > 0:
            raise ConfigError(f"hier-align: the attribute-level alignment (CCCE attribution, "
                              f"method.lam2) needs a binary label; this data has {classes} "
                              f"classes (set method.lam2=0 to align the image level only)")

    def _r(self, batch: dict[str, Tensor], local: bool = False) -> tuple[Tensor, Tensor]:
        """(r, r_known) for the batch's rows; without setup, for indices outside the
        training table, or ``local``, attribution on this batch (the table is kept)."""
        known_attr = batch["attr_known"].bool().all(1) if "attr_known" in batch else \
            torch.ones_like(batch["label"], dtype=torch.bool)
        idx = batch.get("index")
        if local or self.r_table is None or idx is None or int(idx.max()) >= len(self.r_table):
            attrs = batch["attributes"].float()
            if "attr_known" in batch:
                attrs = torch.where(batch["attr_known"].bool(), attrs, torch.nan)
            table = (self.r_table, self.r_known, self.attribution)
            self.fit_attribution(attrs, batch["label"])
            r, rk = self.r_table, self.r_known
            # batch-local: the training table stays (it was set to None, so a batch with an
            # index past the table lost it for every later training step)
            self.r_table, self.r_known, self.attribution = table
        else:
            i = idx.cpu().long()
            r, rk = self.r_table[i], self.r_known[i]
        dev = batch["label"].device
        return r.to(dev), rk.to(dev) & known_attr

    def on_epoch_start(self, epoch: int) -> None:
        if epoch < 1:
            # 0-based epochs (`for epoch in range(E)`) silently left out the alignment terms
            # for the whole first epoch (epoch 0 < align_start 1)
            raise InputError(f"hier-align: on_epoch_start takes 1-based epochs (the first "
                             f"is 1, as method.align_start counts them), got {epoch}")
        self.epoch = epoch
        self._epochs_told = True

    def state_dict(self) -> dict:
        # each level's CG damping, raised on negative curvature and kept for later steps
        # (as causal-align keeps it): without it a resumed run restarted both levels at
        # method.damping. "damping" (image level) is the key data-parallel merging maxes.
        return {"step": self.step, "cache": self.pixel.cache.state_dict(),
                "scale": None if self.pixel.scale is None else self.pixel.scale.cpu(),
                "r": self.r_table, "r_known": self.r_known,
                "damping": self.pixel.damping, "attr_damping": self.attr.damping,
                # each level's switch to the Gauss-Newton solve (causal-align's gn_switch)
                "gn_streak": self.pixel.gn_streak, "gn_switched": self.pixel.gn_switched,
                "attr_gn_streak": self.attr.gn_streak,
                "attr_gn_switched": self.attr.gn_switched,
                # what the cache and scales were made for (`check_state_settings`)
                "settings": {"distance": self.params.distance}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s contents (keys missing in older checkpoints: defaults)."""
        from .causal_align import check_state_settings

        check_state_settings(self.name, state, self.params)
        self.step = int(state.get("step", 0))
        self.pixel.cache.load_state_dict(state.get("cache", {}))
        # older checkpoints hold no damping: the configured one, as before
        self.pixel.damping = float(state.get("damping", self.params.damping))
        self.attr.damping = float(state.get("attr_damping", self.params.damping))
        for level, prefix in ((self.pixel, ""), (self.attr, "attr_")):
            level.gn_streak = int(state.get(prefix + "gn_streak", 0))
            level.gn_switched = bool(state.get(prefix + "gn_switched", False))
        if state.get("scale") is not None:
            self.pixel.scale = state["scale"]
            self.pixel._fitted.add("scale")
        if state.get("r") is not None:
            self.r_table, self.r_known = state["r"], state["r_known"]
        self._restored = self.pixel._restored = True  # the next setup() keeps this state

    # ---------------------------------------------------------------- objective

    def attribute_counterfactual(self, model: nn.Module, a_hat: Tensor,
                                 target: Tensor) -> CounterfactualResult:
        """Eq. 6: a* (``x_star`` of the result, probabilities) for attribute vectors â."""
        # â in f₂'s own dtype: under a caller's autocast f₁ gave bfloat16 probabilities, and
        # the search (run without autocast, as causal-align's) failed in f₂'s first Linear
        dtype = next((q.dtype for q in model.f2.parameters() if q.is_floating_point()),
                     a_hat.dtype)
        res = self.attr.generator(model.f2).generate(a_hat.detach().to(dtype), target=target,
                                                     report=False)
        # a* = â + σ(u*) − σ(u₀) with u₀ the logit of â clamped to [1e-6, 1 − 1e-6]: where f₁
        # is confident (â exactly 0 or 1 in float32) it left [0, 1] by up to ~1e-6, and Eq. 7's
        # search refused it as a BCE target, stopping training mid-run
        return dataclasses.replace(res, x_star=res.x_star.clamp(0.0, 1.0))

    def image_counterfactual(self, model: nn.Module, x: Tensor, a_star: Tensor,
                             ids: Tensor | None = None, bn_stats: dict | None = None,
                             report: bool = False, dihedral: Tensor | None = None
                             ) -> CounterfactualResult:
        """Eq. 7: x* whose predicted attributes move from f₁(x) to a*. ``dihedral``: the
        images' augmentation (``batch["dihedral"]``), for the warm start's cached offsets.
        (Eq. 6 searches attribute vectors, orientation-free, and never warm-starts.)"""
        ids = ids if self.params.warm_start else None
        res = self.pixel.generator(model.f1).generate(
            # a* in the images' dtype: .float() rounded a float64 model's targets to float32
            x, target=a_star.detach().to(x.dtype), ids=ids, report=report, bn_stats=bn_stats,
            dihedral=dihedral)
        self.pixel.warn_cache_overflow()
        return res

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        """CE + BCE on the attributes + λ₁·image-level + λ₂·attribute-level alignment.

        Under ``torch.no_grad()`` (a validation loss) it gives the whole loss's value and
        leaves the training state alone, as causal-align does: no warm start from or into
        the cache, the batch's own CCCE attribution instead of the training table's rows
        (both are keyed by training indices), step counter, damping and Gauss-Newton
        switches unchanged."""
        if torch.is_grad_enabled():
            return self._loss(model, batch, warm=True)
        levels = (self.pixel, self.attr)
        saved = (self.step, [(lv.damping, lv.gn_streak, lv.gn_switched) for lv in levels])
        try:
            return self._loss(model, batch, warm=False)
        finally:
            self.step = saved[0]
            for lv, (damping, streak, switched) in zip(levels, saved[1], strict=True):
                lv.damping, lv.gn_streak, lv.gn_switched = damping, streak, switched

    def _loss(self, model: nn.Module, batch: dict[str, Tensor], warm: bool) -> LossOutput:
        p = self.params
        # a user's own model or batch (Method.__call__ checks image, label and the logits):
        # an AttributeError 'f1' / KeyError 'attributes' said nothing of what is needed
        if not all(isinstance(getattr(model, k, None), nn.Module) for k in ("f1", "f2")):
            raise InputError(f"hier-align needs a hierarchical model with modules f1 (image -> "
                             f"attribute logits) and f2 (attributes -> class logits), as "
                             f"causalign.models.HierarchicalModel; got {type(model).__name__}")
        if "attributes" not in batch:
            raise InputError("hier-align needs batch['attributes'] (N, attributes) float, NaN "
                             "or attr_known False where unknown, as LesionDataset yields it")
        x = self.model_input(batch)
        y = batch["label"]
        if p.lam1 != 0 or p.lam2 != 0:
            refuse_autograd_context(self.name, x, image_term=p.lam1 != 0)
        if p.align_start > 1 and not self._epochs_told and (p.lam1 != 0 or p.lam2 != 0):
            # epoch stayed 1 < align_start: the run never aligned, without a word (refused
            # before the forward, which would move BatchNorm's running statistics)
            raise InputError(f"hier-align: method.align_start={p.align_start} counts epochs, "
                             f"which method.on_epoch_start(epoch) gives it (1-based); call it "
                             f"before each epoch, as the trainer does")
        with capture_bn_stats(model) as bn_stats:
            z = model.f1(x)
            a_hat = z.sigmoid()
            logits = model.f2(a_hat)
        bn_stats = bn_stats if p.bn == "batch" else {}
        self._check_binary(logits.shape[1])
        ce = self.ce(logits, y)  # class_weight; the attribute BCE is not weighted
        known = batch["attr_known"].bool() if "attr_known" in batch else \
            torch.ones_like(z, dtype=torch.bool)
        a = torch.where(known, batch["attributes"].to(z.dtype), 0.0)
        bce_el = F.binary_cross_entropy_with_logits(z, a, reduction="none")
        n_known = known.sum()
        bce = torch.where(known, bce_el, 0.0).sum() / n_known.clamp_min(1)
        total = ce + p.attr_weight * bce
        parts: dict[str, float] = {"ce": float(ce.detach()), "bce_attr": float(bce.detach()),
                                   "attr_known": float(known.float().mean())}
        # subset means (known attributes, aligned samples): data-parallel training weights
        # them by the global batch's counts (LossOutput.means)
        means = {"bce_attr": (p.attr_weight * bce, int(n_known))}
        # history's train_bce_attr: the mean over the epoch's known attribute entries, so a
        # step without any (its 0) does not dilute it, as it did weighted by the batch size
        weights = {"bce_attr": int(n_known)}
        self.step += 1
        # a validation loss (warm False) is the whole loss, whatever align_every's schedule
        if (p.lam1 == 0 and p.lam2 == 0) or (warm and (self.step - 1) % p.align_every != 0) \
                or self.epoch < p.align_start:
            parts["align_step"] = 0.0
            return LossOutput(total, parts, means=means, part_weights=weights)
        parts["align_step"] = 1.0
        if warm and self.r_table is None and not self._warned_no_setup:
            self._warned_no_setup = True
            what = "its CCCE attribution r" + (
                " (and, on the first, its per-pixel distance scales)"
                if self.pixel.params.distance.startswith("scaled") and self.pixel.scale is None
                else "")
            warnings.warn(no_setup_message(self.name, what, len(x), each=True), stacklevel=4)
        # rule "other" (1 − y; multi-class the likeliest other class) makes every sample valid:
        # which samples align depends on the data alone, so the data-parallel caps below can
        # read the global batch's flags instead of the other ranks' predictions
        target, valid = counterfactual_targets(y, logits.shape[1], "other", logits)
        gs = self._global_batch(batch)
        # before `_r`: its fallback (rows outside the table) may drop the table on one rank
        global_attr, global_img = self._global_alignable(gs) if gs is not None else (None, None)
        r, r_known = self._r(batch, local=not warm)
        region, has_region = self.pixel.annotation(batch)
        need_attr = valid & r_known if p.lam2 > 0 else torch.zeros_like(valid)
        need_img = valid & has_region if p.lam1 > 0 else torch.zeros_like(valid)
        if p.align_batch:
            need_img = self._capped(need_img, gs, global_img)
        rows = (need_attr | need_img).nonzero().flatten()
        parts["n_align_attr"] = float(need_attr.sum())
        parts["n_align_img"] = float(need_img.sum())
        # data-parallel balance: caps from the global batch's gradients (every rank joins)
        gcap2 = gcap1 = None
        if p.balance > 0 and gs is not None:
            gcap2, gcap1 = self._global_balance(model, ce, bce, len(x), int(n_known), gs,
                                                global_attr, global_img)
        if len(rows) == 0:
            for cap in (gcap2, gcap1):  # the other ranks align: join their exchanges, in order
                if cap is not None:
                    cap((), 0)
            return LossOutput(total, parts, means=means, part_weights=weights)
        self.pixel._lazy_setup(x, warn=False)  # said above
        cap1: float | GradCap | None = None
        cap2: float | GradCap | None = None
        if p.balance > 0:
            cap1 = gcap1 if gcap1 is not None else \
                p.balance * float(grad_norm(total, _trainable(model.f1))) / max(p.lam1, 1e-12)
            cap2 = gcap2 if gcap2 is not None else \
                p.balance * float(grad_norm(ce, _trainable(model.f2))) / max(p.lam2, 1e-12)
        res_a = self.attribute_counterfactual(model, a_hat[rows], target[rows])
        parts["attr_change"] = float((res_a.x_star - res_a.problem.x0).abs().sum(1).mean())
        with torch.no_grad():
            parts["attr_cf_flip"] = float((model.f2(res_a.x_star).argmax(1)
                                           == target[rows]).float().mean())
        # history.csv: shares of the rows searched, not of the batch (`share_weights`)
        shares = {**weights, "attr_change": len(rows), "attr_cf_flip": len(rows)}
        sel_a = need_attr[rows]
        if bool(sel_a.any()):
            term2, stats = self.attr.implicit_term(model.f2, _subset(res_a, sel_a),
                                                   r[rows][sel_a].to(z.dtype), None,
                                                   grad_cap=cap2)
            total = total + p.lam2 * term2
            parts.update({f"attr_{k}": v for k, v in stats.items()})
            shares.update(share_weights(stats, "attr_"))
            means["attr_align"] = (p.lam2 * term2, _n_ok(stats))
        elif gcap2 is not None:  # nothing to align here: still join the exchange
            gcap2((), 0)
        sel_x = need_img[rows]
        if bool(sel_x.any()):
            ii = rows[sel_x]
            ids = batch["index"][ii] if "index" in batch and warm else None
            dihedral = batch["dihedral"][ii] if "dihedral" in batch else None
            res_x = self.image_counterfactual(model, x[ii], res_a.x_star[sel_x], ids, bn_stats,
                                              dihedral=dihedral)
            term1, stats = self.pixel.implicit_term(model.f1, res_x, region[ii], bn_stats,
                                                    grad_cap=cap1)
            total = total + p.lam1 * term1
            parts.update({f"img_{k}": v for k, v in stats.items()})
            shares.update(share_weights(stats, "img_"))
            means["img_align"] = (p.lam1 * term1, _n_ok(stats))
        elif gcap1 is not None:
            gcap1((), 0)
        return LossOutput(total, parts, means=means, part_weights=shares)

    # ---------------------------------------------------------------- data-parallel caps

    def _global_batch(self, batch: dict[str, Tensor]) -> GlobalStep | None:
        """`global_step` when the caps must act on the global batch (data-parallel), after
        checking that it describes this batch; None in a single process."""
        gs = self.global_step
        if gs is None or not (self.params.align_batch or self.params.balance > 0):
            return None
        if "index" in batch and not torch.equal(gs.local(gs.batch["index"]),
                                                batch["index"].cpu()):
            raise RuntimeError("hier-align: method.global_step describes another batch than "
                               "the one this rank was given (set it before every step)")
        return gs

    def _global_alignable(self, gs: GlobalStep) -> tuple[Tensor | None, Tensor]:
        """Which samples of the global batch each level may align, from the data alone (every
        rank computes the same flags; rule "other" leaves every sample valid): attribute
        level r_known (None: unknown — no training table row for some sample, then `_r` fits
        r per chunk and the level's cap stays per rank), image level an annotation."""
        p, g = self.params, gs.batch
        n = len(g["index"])
        img = g["has_mask"] if self.pixel.params.region == "mask" else g["has_annotation"]
        img = img.bool() if p.lam1 > 0 else torch.zeros(n, dtype=torch.bool)
        if p.lam2 == 0:
            return torch.zeros(n, dtype=torch.bool), img
        idx = g["index"].long()
        if self.r_known is None or n == 0 or int(idx.max()) >= len(self.r_known):
            return None, img
        # r_known already requires every attribute known (`fit_attribution`), as _r does
        return self.r_known[idx].bool(), img

    def _capped(self, need_img: Tensor, gs: GlobalStep | None,
                global_img: Tensor | None) -> Tensor:
        """The first ``align_batch`` samples of ``need_img`` (batches are shuffled: the first
        annotated ones are a random draw). Data-parallel, the first of the *global* batch, as
        in one process: chunks are contiguous in rank order, so this rank keeps the first
        align_batch − (alignable samples of the lower ranks) of its own (no collective)."""
        cap = self.params.align_batch
        if gs is None or global_img is None:
            if int(need_img.sum()) <= cap:
                return need_img
        else:
            cap = max(cap - int(gs.before(global_img).sum()), 0)
        keep = need_img.nonzero().flatten()[:cap]
        need_img = torch.zeros_like(need_img)
        need_img[keep] = True
        return need_img

    def _global_balance(self, model: nn.Module, ce: Tensor, bce: Tensor, m: int,
                        n_known: int, gs: GlobalStep, global_attr: Tensor | None,
                        global_img: Tensor) -> tuple[GradCap | None, GradCap | None]:
        """(attribute-level, image-level) `balance` caps of one process on the global batch.

        One process caps ‖λ₂·dL_align(θ₂)/dθ₂‖ at balance·‖∇_θ₂ CE‖ and ‖λ₁·dL_align(θ₁)/dθ₁‖
        at balance·‖∇_θ₁ (CE + w·BCE)‖, all gradients of the global batch: CE a mean over its
        N samples, BCE over its known attributes, each alignment term over its aligned
        samples. Each returned cap, called with this rank's alignment gradient and its sample
        count, all-reduces the vectors once and gives every rank the same factor. Every rank
        calls a non-None cap exactly once per step, attribute level first, also with nothing
        to align (``cap((), 0)``). None (per rank, on the chunk's gradients): a global batch
        smaller than the world (an empty rank never calls the loss, so it cannot join), no
        alignable sample at that level in the global batch, unknown r (`_global_alignable`),
        or no trainable parameter there."""
        from ..engine.distributed import global_mean_grads, global_mean_norms

        p = self.params
        if gs.world < 2 or 0 in gs.sizes:
            return None, None
        f1, f2 = _trainable(model.f1), _trainable(model.f2)
        use2 = global_attr is not None and bool(global_attr.any()) and bool(f2)
        use1 = bool(global_img.any()) and bool(f1)
        if not (use1 or use2):
            return None, None
        # one backward of CE for both levels (f₁ for level 1, f₂ for level 2)
        wanted = (f1 if use1 else []) + (f2 if use2 else [])
        ce_grads = torch.autograd.grad(ce, wanted, retain_graph=True, allow_unused=True)
        ce1 = ce_grads[: len(f1)] if use1 else ()
        ce2 = ce_grads[len(wanted) - len(f2):] if use2 else ()
        bce1 = torch.autograd.grad(bce, f1, retain_graph=True, allow_unused=True) \
            if use1 and bce.requires_grad else ()
        limit1, limit2 = p.balance / max(p.lam1, 1e-12), p.balance / max(p.lam2, 1e-12)

        def cap2(grads: Sequence[Tensor], k: int) -> float:
            ce_norm, align_norm = global_mean_norms([(ce2, m), (grads, k)], f2)
            return min(1.0, limit2 * ce_norm / align_norm) if align_norm > 0 else 1.0

        def cap1(grads: Sequence[Tensor], k: int) -> float:
            g_ce, g_bce, g_align = global_mean_grads([(ce1, m), (bce1, n_known), (grads, k)],
                                                     f1)
            # the norm of a combination of means: CE's over the N samples, BCE's over the
            # known attributes (a list of separate norms could not give it)
            sup_norm = float((g_ce + p.attr_weight * g_bce).norm())
            align_norm = float(g_align.norm())
            return min(1.0, limit1 * sup_norm / align_norm) if align_norm > 0 else 1.0

        return (cap2 if use2 else None), (cap1 if use1 else None)


def _n_ok(stats: dict[str, float]) -> int:
    """How many samples `CausalAlign.implicit_term`'s mean runs over (not diverged)."""
    return round(stats["n_align"] * (1.0 - stats["cf_diverged"]))
