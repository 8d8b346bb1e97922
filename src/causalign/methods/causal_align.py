"""Causal alignment (seed 000 §4.1–4.2, Alg. 1): L = CE + λ·L_align.

    L_align = mean_i ‖(x*_i − x_i) ⊙ (1 − m_i)‖₁                                   (Eq. 3)
    x*_i    = argmin_x T_i(x, θ),  T_i = CE(f_θ(x), y*_i) + α·d(x, x_i)            (Eq. 2)

The mean runs over samples that have an annotation (pixel mask, or box with
``region="box"``); samples without one are skipped, and a batch without any gets no
alignment term at all (L = CE exactly).

dL_align/dθ goes through the implicit adjoint (`causalign.implicit.implicit_gradient`): solve
(H + δI) v = ∇ₓL_align at x* by batched CG with Hessian-vector products, then
dL/dθ = −∂/∂θ(∇ₓT·v). The inner problem and the implicit step run the model in eval mode, so
BatchNorm never mixes samples and H is block-diagonal over the batch; the CE term uses the
model's own (train) mode.

Two engineering choices, both exact reformulations:

* **Jacobi preconditioning.** The l1 surrogate's curvature α·ε²/(δ²+ε²)^{3/2} ranges over
  orders of magnitude (1/ε at unchanged pixels, ~0 at changed ones), which would make plain CG
  crawl. The CG runs in w = S⁻¹(x − x*) with S = (α·diag ∇²d + δ)^{-1/2}: the damped system
  becomes S(H + δI)S. For a piecewise-linear classifier (ReLU, max-pool, eval BatchNorm — the
  seed CNN, ResNets, VGG) the CE part of H is the rank-(C−1) Gauss–Newton term, so the
  preconditioned matrix is identity + rank (C−1): CG converges in C iterations. The gradient
  is unchanged (v = S·ṽ); damping δ keeps its x-space meaning via a θ-free ½δ‖Sw‖² term.
* **One backward.** `implicit_gradient` returns dL_align/dθ while the loss is built, so the
  CG report lands in this step's parts and failed samples can be dropped. The trainer's single
  backward then picks it up through Σ_p ⟨p, g_p⟩ (value removed), so L.backward() gives
  ∇CE + λ·dL_align/dθ.

Failure handling: a counterfactual search that produced NaN/inf is reset to x0 and skipped;
a sample whose CG solve broke down or missed the tolerance is dropped from the gradient (the
solve is re-run with its right-hand side zeroed, warm-started from the other samples'
solutions). Both are counted in the step's parts (hence in history.csv).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CausalignError, ConfigError
from ..explain.counterfactual import (
    DISTANCES,
    OPTIMIZERS,
    SPACES,
    CounterfactualGenerator,
    CounterfactualResult,
    WarmStartCache,
    capture_bn_stats,
    counterfactual_targets,
    distance_scale,
    eval_mode,
)
from ..implicit import implicit_gradient
from .base import LossOutput, Method, coerce_params, grad_norm, register_method

if TYPE_CHECKING:
    from ..data.format import LesionDataset


@dataclass
class CausalAlignParams:
    """`method.<key>` settings of causal-align; defaults explained inline."""

    # Paper's α₁ for LIDC-IDRI (§5.2, its CBIS-DDSM value is 0.07; App. C.2 finds the result
    # insensitive over 0.05–0.09).
    alpha: float = 0.01
    lam: float = 1.0  # λ: the paper's value on both datasets (§5.2; Tab. 5 flat over 0.8–1.2)
    # K Adam steps for x*; with warm_start each sample keeps refining across epochs. K and the
    # CG iterations come from benchmarks/bench_causal_align.py (README): the cheapest K whose
    # implicit gradient has cosine >= 0.95 to a tightly solved reference once warm-started
    steps: int = 10
    inner_lr: float = 0.01  # Adam step in pixel units (images in [0, 1]); paper code: 0.01
    # adam (the paper's code) | ista: proximal gradient, a sparse x* for the l1 distances
    # (explain/counterfactual.py `_proximal_gradient`) | newton: damped Gauss-Newton with a
    # line search (`_gauss_newton`; inner_lr unused), a tight x* in a few steps
    inner_optimizer: str = "adam"
    cg_iters: int = 3  # preconditioned CG needs ~C iterations on piecewise-linear nets
    cg_tol: float = 1e-3  # relative residual in preconditioned coordinates
    damping: float = 1e-2  # δ in (H + δI)v = ∇ₓL
    # A step whose CG meets negative curvature (an input Hessian that is not positive
    # definite: multiview's slice attention, smooth activations) is solved again with δ × 10,
    # up to this cap, and later steps keep the raised δ (history: train_damping). On
    # piecewise-linear CNNs H is positive semi-definite and δ never moves. <= damping: off.
    damping_max: float = 10.0
    distance: str = "l1"  # l1 | scaled-l1 | l2 | scaled-l2 (paper Tab. 7: l1 best)
    eps: float = 1e-2  # smoothing of the l1 surrogate √(δ²+ε²)−ε, in pixel units
    # y* rule: "other" (binary 1−y, else most likely other class) | "predicted" (the same rule
    # on the model's prediction: a misclassified sample's x* heads for its label) | class k
    target: str = "other"
    align_every: int = 1  # alignment term every n-th step (plain CE in between)
    # at most this many annotated samples per batch enter L_align (0 = all): the alignment
    # cost scales with it while the CE term keeps the whole batch
    align_batch: int = 0
    warm_start: bool = True  # start each x* from the sample's previous solution
    hvp: str = "exact"  # exact (double backward) | finite-difference (the paper's variant)
    fd_eps: float = 1e-3  # relative step of the finite-difference Hessian-vector product
    region: str = "mask"  # mask: samples with a pixel mask | box: samples with a box (or mask)
    # grow the region by this many pixels (in H and W) before Eq. 3: a CNN's sensitivity to a
    # lesion spreads over its surroundings (docs/causal_align_investigation.md)
    dilate: int = 0
    # all: Eq. 3 over every annotated sample | positive: only samples whose label is not class
    # 0. A benign lesion's mask has no room for the spikes or blurred margin a counterfactual
    # towards malignant would add, so on negatives Eq. 3 penalises the causal change itself.
    align_on: str = "all"
    # none: Eq. 3 as printed, Σ|Δ| outside the region | total: divided by the sample's whole
    # change Σ|Δ| (the share of the counterfactual change outside the region, in [0, 1])
    normalize: str = "none"
    # pixel | latent (autoencoder code, L2 in the paper's code) | smooth (x0 + G_σ * u, below)
    space: str = "pixel"
    smooth_sigma: float = 1.0  # σ in pixels of the blur of space=smooth
    precondition: bool = True  # Jacobi-preconditioned CG (see module docstring)
    # > 0: cap the norm of λ·dL_align/dθ at this multiple of ‖∇_θ CE‖ (one extra CE backward)
    # so a large, noisy alignment gradient cannot drown the classification signal
    balance: float = 0.0
    # BatchNorm statistics of the inner problem: "batch" = this batch's, frozen as constants
    # (the function CE trains; see capture_bn_stats for why) | "running" = plain eval mode
    bn: str = "batch"
    # latent space: "" trains an autoencoder on the training images in setup and keeps it in
    # the checkpoint; a path loads it, or trains one and saves it there if the file is missing.
    autoencoder: str = ""

    def validate(self) -> None:
        self._coerce()
        checks = [
            (self.alpha >= 0, f"method.alpha must be >= 0, got {self.alpha}"),
            (self.lam >= 0, f"method.lam must be >= 0, got {self.lam}"),
            (self.steps >= 1, f"method.steps must be >= 1, got {self.steps}"),
            (self.inner_lr > 0, f"method.inner_lr must be > 0, got {self.inner_lr}"),
            (self.cg_iters >= 1, f"method.cg_iters must be >= 1, got {self.cg_iters}"),
            (self.cg_tol > 0, f"method.cg_tol must be > 0, got {self.cg_tol}"),
            (self.damping >= 0, f"method.damping must be >= 0, got {self.damping}"),
            (self.damping_max >= 0, f"method.damping_max must be >= 0, got "
                                    f"{self.damping_max}"),
            (self.eps > 0, f"method.eps must be > 0, got {self.eps}"),
            (self.fd_eps > 0, f"method.fd_eps must be > 0, got {self.fd_eps}"),
            (self.align_every >= 1, f"method.align_every must be >= 1, got {self.align_every}"),
            (self.align_batch >= 0, f"method.align_batch must be >= 0, got {self.align_batch}"),
            (self.dilate >= 0, f"method.dilate must be >= 0, got {self.dilate}"),
            (self.balance >= 0, f"method.balance must be >= 0, got {self.balance}"),
            (self.distance in DISTANCES,
             f"method.distance must be one of {', '.join(DISTANCES)}, got '{self.distance}'"),
            (self.hvp in ("exact", "finite-difference"),
             f"method.hvp must be exact or finite-difference, got '{self.hvp}'"),
            (self.bn in ("batch", "running"),
             f"method.bn must be batch or running, got '{self.bn}'"),
            (self.normalize in ("none", "total"),
             f"method.normalize must be none or total, got '{self.normalize}'"),
            (self.region in ("mask", "box"),
             f"method.region must be mask or box, got '{self.region}'"),
            (self.align_on in ("all", "positive"),
             f"method.align_on must be all or positive, got '{self.align_on}'"),
            (self.inner_optimizer in OPTIMIZERS,
             f"method.inner_optimizer must be one of {', '.join(OPTIMIZERS)}, "
             f"got '{self.inner_optimizer}'"),
            (self.space in SPACES,
             f"method.space must be one of {', '.join(SPACES)}, got '{self.space}'"),
            (self.smooth_sigma > 0,
             f"method.smooth_sigma must be > 0, got {self.smooth_sigma}"),
            (str(self.target) in ("other", "predicted") or str(self.target).isdigit(),
             f"method.target must be 'other', 'predicted' or a class index, "
             f"got '{self.target}'"),
            (not (self.space == "latent" and self.distance.startswith("scaled")),
             f"method.distance '{self.distance}' is per pixel; space latent takes l1 or l2"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def _coerce(self) -> None:
        # `--set method.alpha=1e-3` arrives as the string "1e-3" (YAML 1.1 wants "1.0e-3"), a
        # YAML `steps: 10.0` as a float: convert to each field's type or name the bad key.
        coerce_params(self)


@dataclass
class CausalAlignTrainingParams(CausalAlignParams):
    """The `causal-align` method's defaults: `CausalAlignParams` (Eq. 3 as printed, every
    annotated sample; what other methods such as hier-align build on) with two training
    choices measured on the demo benchmark (README, "Causal alignment"):

    * normalize = total: Eq. 3's raw sum scales with α, image size and intensity range; on the
      64 px benchmark its gradient is ~400x the CE gradient at λ = 1 and training collapses to
      a constant classifier, while the share of the change outside the region keeps λ = 1
      meaningful;
    * align_batch = 16: the alignment cost grows with the aligned samples; 16 of a batch of 64
      keeps a step at ~4x ERM with K = 10 (benchmarks/results/causal_align_sweep.json).
    """

    align_batch: int = 16
    normalize: str = "total"


def dilate_region(region: Tensor, pixels: int) -> Tensor:
    """Binary dilation of (N, 1, H, W) or (N, 1, D, H, W) regions by ``pixels`` in H and W
    (a square structuring element; slices of a volume are not mixed)."""
    if pixels <= 0:
        return region
    k = 2 * pixels + 1
    r = region.float()
    if r.dim() == 5:
        out = F.max_pool3d(r, (1, k, k), stride=1, padding=(0, pixels, pixels))
    else:
        out = F.max_pool2d(r, k, stride=1, padding=pixels)
    return out.to(region.dtype)


@register_method("causal-align")
class CausalAlign(Method):
    Params = CausalAlignTrainingParams
    uses_annotations = True
    subset_means = True  # L_align: a mean over the aligned samples (LossOutput.means)

    def __init__(self, params: CausalAlignParams | None = None) -> None:
        super().__init__(params)
        self.scale: Tensor | None = None
        self.autoencoder: nn.Module | None = None
        self.cache = WarmStartCache()
        self.step = 0
        self.damping = self.params.damping  # raised on negative curvature (damping_max)
        self._bn_stats: dict = {}
        # setup() refuses a training split where no sample has the configured region (the
        # trainer only checks for "a mask or a box"); hier-align's image level, whose masks
        # are optional, turns this off.
        self.require_region = True

    # ---------------------------------------------------------------- setup / state

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        """Per-pixel distance scales and (latent space) the autoencoder, from training data."""
        has_mask = getattr(train_set, "has_mask", None)
        if self.require_region and self.params.region == "mask" and has_mask is not None \
                and not bool(has_mask.any()):
            # Box-only data: every step would skip L_align, i.e. train ERM under this name.
            raise ConfigError("causal-align: method.region is 'mask' but no training sample "
                              "has a pixel mask (only boxes); use --set method.region=box")
        device = next(model.parameters()).device
        if self.params.distance.startswith("scaled") and self.scale is None:
            self.scale = distance_scale(train_set.images, self.params.distance).to(device)
        if self.params.space == "latent" and self.autoencoder is None:
            self.autoencoder = self._load_or_train_autoencoder(train_set.images, device)

    def _load_or_train_autoencoder(self, images: Tensor, device) -> nn.Module:
        from ..models.autoencoder import load_autoencoder, save_autoencoder, train_autoencoder

        path = self.params.autoencoder
        if path and Path(path).exists():
            ae = load_autoencoder(path, device)
            # A file fitted on other data (RGB vs grey) would fail deep inside a conv.
            c = ae.config.get("in_channels") if isinstance(getattr(ae, "config", None), dict) \
                else None
            if c is not None and c != images.shape[1]:
                raise CausalignError(f"{path}: autoencoder takes {c}-channel images; this "
                                     f"data has {images.shape[1]} channel(s) (method."
                                     f"autoencoder: train a new one, or give another file)")
            return ae
        ae = train_autoencoder(images, device=device)
        if path:
            save_autoencoder(path, ae)
        return ae

    def _lazy_setup(self, x: Tensor) -> None:
        # Without setup() (e.g. `bench step`, a bare objective call) the statistics come from
        # the first batch seen — rougher than the training split, but never a crash.
        if self.params.distance.startswith("scaled") and self.scale is None:
            self.scale = distance_scale(x.detach(), self.params.distance)
        if self.params.space == "latent" and self.autoencoder is None:
            self.autoencoder = self._load_or_train_autoencoder(x.detach(), x.device)

    def state_dict(self) -> dict:
        from ..models.autoencoder import autoencoder_state

        return {
            "step": self.step,
            "damping": self.damping,
            "cache": self.cache.state_dict(),
            "scale": None if self.scale is None else self.scale.cpu(),
            "autoencoder": None if self.autoencoder is None
            else autoencoder_state(self.autoencoder),
        }

    def load_state_dict(self, state: dict) -> None:
        from ..models.autoencoder import autoencoder_from_state

        self.step = int(state.get("step", 0))
        self.damping = float(state.get("damping", self.params.damping))
        self.cache.load_state_dict(state.get("cache", {}))
        if state.get("scale") is not None:
            self.scale = state["scale"]
        if state.get("autoencoder") is not None:
            self.autoencoder = autoencoder_from_state(state["autoencoder"])

    # ---------------------------------------------------------------- objective

    def generator(self, model: nn.Module) -> CounterfactualGenerator:
        """The counterfactual generator this method trains through (shares the cache)."""
        p = self.params
        scale = self.scale
        dev = next(model.parameters()).device
        if self.autoencoder is not None:
            self.autoencoder.to(dev)
        gen = CounterfactualGenerator(
            model, alpha=p.alpha, steps=p.steps, lr=p.inner_lr, distance=p.distance,
            scale=None if scale is None else scale.to(dev), eps=p.eps, space=p.space,
            autoencoder=self.autoencoder, warm_start=p.warm_start, target_rule=p.target,
            optimizer=p.inner_optimizer, smooth_sigma=p.smooth_sigma)
        gen.cache = self.cache
        return gen

    def annotation(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(region m, has) for the configured region; samples with has=False are skipped."""
        if self.params.region == "mask":
            region, has = batch["mask"], batch["has_mask"].bool()
        else:
            region, has = batch["box_mask"], batch["has_annotation"].bool()
        return dilate_region(region, self.params.dilate), has

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        x = self.model_input(batch)
        y = batch["label"]
        with capture_bn_stats(model) as bn_stats:
            logits = model(x)
        self._bn_stats = bn_stats if self.params.bn == "batch" else {}
        ce = F.cross_entropy(logits, y)
        parts: dict[str, float] = {"ce": float(ce.detach())}
        self.step += 1
        p = self.params
        if p.lam == 0 or (self.step - 1) % p.align_every != 0:
            parts["align_step"] = 0.0
            return LossOutput(ce, parts)
        parts["align_step"] = 1.0
        region, has = self.annotation(batch)
        target, valid = counterfactual_targets(y, logits.shape[1], p.target, logits)
        sel = has & valid
        if p.align_on == "positive":
            sel = sel & (y != 0)
        if not bool(sel.any()):
            parts["n_align"] = 0.0
            return LossOutput(ce, parts)
        idx = sel.nonzero().flatten()
        if p.align_batch and len(idx) > p.align_batch:
            idx = idx[: p.align_batch]  # batches are shuffled: the first ones are a random draw
        self._lazy_setup(x)
        ce_norm = None
        if p.balance > 0:
            ce_norm = grad_norm(ce, [q for q in model.parameters() if q.requires_grad])
        term, stats = self.alignment(model, x[idx], target[idx], region[idx],
                                     batch["index"][idx] if "index" in batch else None,
                                     grad_cap=None if ce_norm is None
                                     else float(p.balance * ce_norm / p.lam))
        parts.update(stats)
        # L_align is a mean over the samples whose counterfactual did not diverge: data-
        # parallel training weights it by the global batch's count (LossOutput.means)
        n_ok = round(stats["n_align"] * (1.0 - stats["cf_diverged"]))
        return LossOutput(ce + p.lam * term, parts, means={"align": (p.lam * term, n_ok)})

    def alignment(self, model: nn.Module, x: Tensor, target: Tensor, region: Tensor,
                  ids: Tensor | None, grad_cap: float | None = None
                  ) -> tuple[Tensor, dict[str, float]]:
        """L_align over these (annotated) samples: a tensor whose value is L_align and whose
        gradient w.r.t. the model's parameters is the implicit dL_align/dθ; plus stats."""
        p = self.params
        bn_stats = self._bn_stats
        res = self.generator(model).generate(x, target=target, ids=ids if p.warm_start else None,
                                             report=False, bn_stats=bn_stats)
        return self.implicit_term(model, res, region, bn_stats, grad_cap=grad_cap)

    def implicit_term(self, model: nn.Module, res: CounterfactualResult, region: Tensor,
                      bn_stats: dict | None = None, grad_cap: float | None = None
                      ) -> tuple[Tensor, dict[str, float]]:
        """Eq. 3 at the counterfactuals ``res`` with the implicit gradient attached;
        ``bn_stats`` as used to generate them; ``grad_cap`` caps the gradient's norm."""
        x = res.problem.x0
        n = len(x)
        ok = ~res.diverged
        outside = 1.0 - region.to(x.dtype)
        per_sample = self._per_sample(res.x_star - x, outside)
        n_ok = int(ok.sum())
        stats = {"n_align": float(n), "cf_diverged": float(res.diverged.float().mean()),
                 "cf_warm": float(res.warm.float().mean())}
        params = [q for q in model.parameters() if q.requires_grad]
        if n_ok == 0 or not params:
            stats.update(align=0.0, flip_rate=0.0, cg_converged=0.0, cg_iters=0.0,
                         cg_dropped=float(n_ok > 0))
            return x.new_zeros(()), stats
        value = per_sample[ok].mean()
        outer = self._outer_grad(res, x, outside, ok, n_ok)
        grads, more = self._implicit(model, res, outer, ok, params, bn_stats)
        stats.update(align=float(value), **more)
        if grad_cap is not None:
            norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
            factor = min(1.0, grad_cap / norm) if norm > 0 else 1.0
            grads = tuple(g * factor for g in grads)
            stats["align_grad_scale"] = factor
        surrogate = sum((q * g.detach()).sum() for q, g in zip(params, grads, strict=True))
        return value.detach() + surrogate - surrogate.detach(), stats

    def _per_sample(self, change: Tensor, outside: Tensor) -> Tensor:
        """Per-sample alignment loss of a change x* − x (differentiable in the change)."""
        a = change.abs()
        out = (a * outside).flatten(1).sum(1)
        if self.params.normalize == "total":
            # κ keeps 0/0 away; 1e-6 of a pixel's full range is far below any real change.
            out = out / (a.flatten(1).sum(1) + 1e-6)
        return out

    def _outer_grad(self, res: CounterfactualResult, x: Tensor, outside: Tensor, ok: Tensor,
                    n_ok: int) -> Tensor:
        """∇_u L_align at u* (rows of diverged samples zero). |δ| takes the subgradient
        sign(δ), 0 at unchanged pixels — what autograd gives for abs()."""
        u = res.u_star.detach().requires_grad_(True)
        with torch.enable_grad():
            per = self._per_sample(res.problem.image(u) - x, outside)
            (g,) = torch.autograd.grad(torch.where(ok, per, 0.0).sum() / n_ok, u)
        return g.detach()

    def _implicit(self, model: nn.Module, res: CounterfactualResult, outer: Tensor,
                  ok: Tensor, params: list[Tensor], bn_stats: dict | None
                  ) -> tuple[tuple[Tensor, ...], dict]:
        p = self.params
        prob = res.problem
        u_star = res.u_star.detach()
        n = len(u_star)
        shape = (-1,) + (1,) * (u_star.dim() - 1)
        seen: list[Tensor] = []  # logits at x*: the first evaluation is at the solution

        def terms(u: Tensor) -> Tensor:
            t, logits = prob.terms(u)
            if not seen:
                seen.append(logits.detach())
            return t.sum()

        def system(delta: float):
            """(inner objective, start, rhs, kwargs) of the adjoint solve at damping δ."""
            if p.precondition:
                m = prob.curvature(u_star) + delta
                s = m.clamp_min(torch.finfo(m.dtype).tiny).rsqrt()

                def inner(w: Tensor) -> Tensor:
                    t = terms(u_star + s * w)
                    return t + 0.5 * delta * (s * w).square().sum() if delta > 0 else t

                start, rhs, damping = torch.zeros_like(u_star), s * outer, 0.0
            else:
                inner, start, rhs, damping = terms, u_star, outer, delta
            return inner, start, rhs, dict(cg_max_iter=p.cg_iters, cg_tol=p.cg_tol,
                                           damping=damping, hvp=p.hvp, fd_eps=p.fd_eps)

        with eval_mode(model, fold_bn=True, bn_stats=bn_stats):
            delta = self.damping
            inner, start, rhs, kw = system(delta)
            out = implicit_gradient(inner, start, params, rhs, **kw)
            iters = out.cg.iterations
            # Negative curvature: H + δI is not positive definite, so the IFT's solve has no
            # meaning at this δ. Raise δ (Levenberg-Marquardt style) and solve again.
            while bool((ok & out.cg.breakdown).any()) and delta < p.damping_max:
                delta = min(max(10.0 * delta, 1e-3), p.damping_max)
                inner, start, rhs, kw = system(delta)
                out = implicit_gradient(inner, start, params, rhs, **kw)
                iters = iters + out.cg.iterations
            self.damping = delta
            cg = out.cg
            good = cg.converged & ~cg.breakdown & torch.isfinite(cg.solution).flatten(1).all(1)
            failed = ok & ~good
            grads = out.grads
            if bool(failed.any()):
                # Re-solve without the failed samples (their rhs zeroed), warm-started from the
                # others' solutions, so only well-solved samples shape the update.
                keep = (~failed).view(shape)
                rhs2 = torch.where(keep, rhs, torch.zeros_like(rhs))
                x0 = torch.where(keep, cg.solution, torch.zeros_like(rhs))
                out2 = implicit_gradient(inner, start, params, rhs2, cg_x0=x0, **kw)
                good2 = out2.cg.converged & ~out2.cg.breakdown
                iters += out2.cg.iterations
                if bool((good2 | failed).all()):
                    grads = out2.grads
                else:  # the re-solve failed too: no alignment gradient this step
                    grads = tuple(torch.zeros_like(q) for q in params)
                    failed = ok
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                grads = tuple(torch.zeros_like(q) for q in params)
                failed = ok
        n_ok = max(int(ok.sum()), 1)
        flipped = ok & prob.reached(seen[0])
        stats = {
            "flip_rate": float(flipped.float().mean()),
            "cg_converged": float((cg.converged & ok).sum()) / n_ok,
            "cg_iters": float(iters),
            "cg_dropped": float(failed.sum()) / n,
            "damping": delta,
        }
        return grads, stats

