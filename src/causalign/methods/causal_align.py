"""Causal alignment (seed 000 §4.1–4.2, Alg. 1): L = CE + λ·L_align.

    L_align = mean_i ‖(x*_i − x_i) ⊙ (1 − m_i)‖₁                                   (Eq. 3)
    x*_i    = argmin_x T_i(x, θ),  T_i = CE(f_θ(x), y*_i) + α·d(x, x_i)            (Eq. 2)

``normalize="none"`` is Eq. 3 as printed; the `causal-align` default (``normalize="total"``,
`CausalAlignTrainingParams`) divides each sample's term by its whole change ‖x*_i − x_i‖₁,
a deliberate deviation (README, "Causal alignment").
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
  preconditioned matrix is identity + rank (C−1): CG converges in at most C iterations (in
  practice far fewer: classes of small probability add eigenvalues near 1). The gradient
  is unchanged (v = S·ṽ); damping δ keeps its x-space meaning via a θ-free ½δ‖Sw‖² term.
* **One backward.** `implicit_gradient` returns dL_align/dθ while the loss is built, so the
  CG report lands in this step's parts and failed samples can be dropped. The trainer's single
  backward then picks it up through Σ_p ⟨p, g_p⟩ (value removed), so L.backward() gives
  ∇CE + λ·dL_align/dθ.

Where the classifier or the search space is curved (multiview's slice attention, the latent
decoder's sigmoid), H can be indefinite and CG breaks down. Such a step is solved with the
Gauss-Newton system JᵀSJ + α∇²d + δI instead (`negative_curvature="gauss-newton"`, the
default): positive definite, solved directly by Woodbury (`implicit/lowrank.py`), and
equal to H + δI on piecewise-linear classifiers. After `gn_switch` consecutive such steps
the run solves every later step that way, without trying CG first (on multiview CG broke
down on every step, and paid for the CG solve and the fallback's both). `hvp="gauss-newton"`
uses it for every step from the start; `negative_curvature="damping"` raises δ instead (up
to `damping_max`).

Failure handling: a counterfactual search that produced NaN/inf is reset to x0 and skipped;
a step where CG met negative curvature goes to the Gauss-Newton solve (above; under
`negative_curvature="damping"`, δ is raised until CG solves or δ reaches `damping_max`), and
so does a step on which CG missed the tolerance for most samples within the auto cap (a
smooth classifier, where the cap's piecewise-linear assumption fails; under damping δ is
raised for it too);
a sample whose CG solve still broke down or missed the tolerance, or whose Gauss-Newton
solve was not finite, is dropped from the gradient (CG's solve is re-run with its
right-hand side zeroed, warm-started from the other samples' solutions). Both are counted
in the step's parts (hence in history.csv), as are the steps solved by the Gauss-Newton
fallback (`gn_fallback`; with `hvp=finite-difference` also
`fd_fallback`, which the trainer warns about: on a ReLU network the finite differences cross
activation switches, are not the Hessian, and break CG on nearly every step,
benchmarks/fd_hvp_probe.py).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.format import as_training_split
from ..errors import (
    MAX_SETTING,
    CausalignError,
    ConfigError,
    DataError,
    InputError,
    not_one_of,
)
from ..explain.counterfactual import (
    DISTANCES,
    MIN_L1_EPS,
    OPTIMIZERS,
    SPACES,
    BNStats,
    CounterfactualGenerator,
    CounterfactualResult,
    InnerProblem,
    WarmStartCache,
    capture_bn_stats,
    counterfactual_targets,
    distance_scale,
    eval_mode,
    is_target_rule,
    logit_curvature,
)
from ..implicit import implicit_gradient, lowrank_diag_solve, no_autocast
from ._annotation import REGIONS
from .base import (
    LossOutput,
    Method,
    coerce_params,
    grad_norm,
    register_method,
    warn_unused_settings,
)

HVP_MODES = ("exact", "finite-difference", "gauss-newton")
# The smallest finite-difference step `implicit_gradient` takes for float32 images
FD_EPS_MIN_FLOAT32 = 10 * torch.finfo(torch.float32).eps
NEGATIVE_CURVATURE = ("gauss-newton", "damping")
BN_MODES = ("batch", "running")
NORMALIZE = ("none", "total")
ALIGN_ON = ("all", "positive")

if TYPE_CHECKING:
    from ..data.format import LesionDataset
    from ..models.autoencoder import ImageSplit

# method.cache_device -> `WarmStartCache`'s device (None: wherever the search runs)
CACHE_DEVICES = {"model": None, "cpu": "cpu"}
# method.cache_dtype -> `WarmStartCache`'s dtype (None: the searched offsets', float32)
CACHE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# `setup` warns above this warm-start cache size (bytes, at full growth)
CACHE_WARN_BYTES = 4 * 2**30
# `setup` warns when the training images span more than this many intensity units: inner_lr,
# eps and alpha are in units of a [0, 1] image, so on CT in HU (span ~4000) or 0..255 floats
# the search's x* hardly moves (z-scored MRI, span ~10, is fine and not warned about)
INTENSITY_SPAN_WARN = 100.0
# ... judged from this many training images (a whole-split pass would cost a large set dearly)
INTENSITY_SAMPLE = 64

# Data-parallel `balance`: (this rank's alignment gradient, the samples it averages) -> the
# factor one process would scale it by (`CausalAlign._global_balance`).
GradCap = Callable[[Sequence[Tensor], int], float]


@dataclass
class CausalAlignParams:
    """`method.<key>` settings of causal-align; defaults explained inline. These are Eq. 3 as
    printed (what hier-align's levels build on); the `causal-align` method itself trains with
    `CausalAlignTrainingParams`, which differ in ``normalize`` ("total") and ``align_batch``
    (16)."""

    # Paper's α₁ for LIDC-IDRI (§5.1, "Implementation Details"; its CBIS-DDSM value is 0.07;
    # App. C.2 finds the result insensitive over 0.05–0.09).
    alpha: float = 0.01
    lam: float = 1.0  # λ: the paper's value on both datasets (§5.1; Tab. 5 flat over 0.8–1.2)
    # K steps of inner_optimizer for x*; with warm_start each sample keeps refining across
    # epochs. K, the optimiser and the CG iterations come from benchmarks/bench_causal_align.py
    # (docs/causal_align_solvers.md, "Gauss-Newton at K = 7"): Adam at K = 10 (the paper
    # code's optimiser) has warm cosine >= 0.95 to a tight solve of its own minimum on one
    # seed of three; Gauss-Newton at K = 7 has it on all three at ~1.1x the step cost, but
    # trained worse models: in pixel space slightly (accuracy 0.589 / CAM 0.465 against
    # 0.596 / 0.520), in the latent space and on the multiview model clearly (the latent run
    # took the symbol), so it stays an option
    steps: int = 10
    inner_lr: float = 0.01  # Adam / ISTA step in pixel units (images in [0, 1]); paper code: 0.01
    # adam (the paper's code) | newton: damped Gauss-Newton with a line search
    # (`_gauss_newton`; inner_lr unused), a tight x* in a few steps | ista: proximal gradient,
    # a sparse x* for the l1 distances (explain/counterfactual.py `_proximal_gradient`)
    inner_optimizer: str = "adam"
    # Gauss-Newton steps after the K steps of inner_optimizer (0: none): their line search
    # never raises T, so they move x* towards the minimum of the basin the search reached
    # (docs/causal_align_solvers.md, "Speed and gradient accuracy": measured cosines)
    newton_polish: int = 0
    # CG iteration cap. Preconditioned CG needs at most C iterations on piecewise-linear nets
    # in exact arithmetic (the Gauss-Newton term has rank C-1, module docstring), so 0 =
    # auto: 3 for binary (as tuned on the benchmark), C + 10 for C > 2 classes (a fixed 3
    # dropped every sample of a 10-class problem, a cap of C 7 of 8 on resnet18: float32
    # needs a few more), p + 1 for p soft attribute targets (hier-align's Eq. 7); at least 10
    # in space latent, whose decoder is not piecewise linear (`auto_cg_iters`). A bound, not
    # the cost: CG stops once every sample has converged; cnn7 on random data needed 2-11
    # iterations at C = 200, resnet18 up to 43 (tol 1e-3, 32-64 px)
    cg_iters: int = 0
    cg_tol: float = 1e-3  # relative residual in preconditioned coordinates
    damping: float = 1e-2  # δ in (H + δI)v = ∇ₓL
    # With negative_curvature=damping, a step whose CG meets negative curvature (an input
    # Hessian that is not positive definite: multiview's slice attention, smooth
    # activations), or on which most samples miss the auto CG cap (cg_iters 0; a smooth
    # classifier), is solved again with δ × 10, up to this cap, and later steps keep the
    # raised δ (history: train_damping). On piecewise-linear CNNs H is positive
    # semi-definite and δ never moves. <= damping: off.
    damping_max: float = 10.0
    # what a step does when CG meets negative curvature: gauss-newton solves it with the
    # Gauss-Newton system instead (positive definite; δ stays), damping raises δ as above.
    # Measured on multiview: damping reached 10 within 3 epochs and the term stopped acting
    # (the run ended where ERM ends); gauss-newton kept δ at 0.01
    # (docs/causal_align_solvers.md, "Negative curvature")
    negative_curvature: str = "gauss-newton"
    # After this many consecutive aligned steps on which CG met negative curvature and the
    # Gauss-Newton system solved the step, solve every later step with it directly, as
    # hvp=gauss-newton does (kept in the checkpoint; 0: try CG on every step). Measured on
    # multiview: the fallback ran on 100 % of the steps of epochs 1-11, and a step paid the CG
    # solve and the fallback's: 9.35x ERM against 6.79x with the switch (batch 64,
    # benchmarks/results/gauss_newton_switch_2026-12-05/), the trained model unchanged
    gn_switch: int = 3
    distance: str = "l1"  # l1 | scaled-l1 | l2 | scaled-l2 (paper Tab. 7: l1 best)
    eps: float = 1e-2  # smoothing of the l1 surrogate √(δ²+ε²)−ε, in pixel units
    # y* rule: "other" (binary 1−y, else most likely other class) | "predicted" (the same rule
    # on the model's prediction: a misclassified binary sample's x* heads for its label; with
    # C > 2 classes for the runner-up class, which need not be the label) | class k
    target: str = "other"
    align_every: int = 1  # alignment term every n-th step (plain CE in between)
    # at most this many annotated samples per batch enter L_align (0 = all): the alignment
    # cost scales with it while the CE term keeps the whole batch (under torchrun: the first
    # of the global batch, as in one process; see `_capped`)
    align_batch: int = 0
    warm_start: bool = True  # start each x* from the sample's previous solution
    # where the warm-start cache keeps its offsets (one image per annotated training sample):
    # "model" = the model's device | "cpu" = host memory, for large splits on a GPU (10k RGB
    # 224 px images: 5.6 GiB); each step copies only its batch's rows. Same numbers either way
    cache_device: str = "model"
    # the warm-start cache's precision: float32 | float16 | bfloat16 (half the bytes; rows
    # are converted back for the search, so only the warm start's first iterate changes; a
    # row that overflows float16 starts cold). Changes numbers: a --resume refuses a change
    cache_dtype: str = "float32"
    # exact (double-backward products in CG) | finite-difference (the paper's variant) |
    # gauss-newton: solve (JᵀSJ + α∇²d + δI)v = ∇L directly (Woodbury, no CG): the exact
    # Hessian on piecewise-linear classifiers, positive definite on any (multiview, latent)
    hvp: str = "exact"
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
        """Coerce each setting to its type and refuse a bad one with one ConfigError line."""
        self._coerce()
        checks = [
            # α·d(x, x0) and λ·L_align overflowed float32 beyond it, reported as a diverged
            # search ("try a smaller method.inner_lr") or a non-finite loss ("lower --lr")
            (0 <= self.alpha <= MAX_SETTING,
             f"method.alpha must be in [0, {MAX_SETTING:g}], got {self.alpha}"),
            (0 <= self.lam <= MAX_SETTING,
             f"method.lam must be in [0, {MAX_SETTING:g}], got {self.lam}"),
            (self.steps >= 1, f"method.steps must be >= 1, got {self.steps}"),
            (self.newton_polish >= 0, f"method.newton_polish must be >= 0, got "
                                      f"{self.newton_polish}"),
            (self.inner_lr > 0, f"method.inner_lr must be > 0, got {self.inner_lr}"),
            (self.cg_iters >= 0, f"method.cg_iters must be >= 0 (0 = auto: from the number "
                                 f"of classes), got {self.cg_iters}"),
            # a relative residual: at >= 1 the zero vector meets it, so CG "converged" at
            # once and the alignment gradient was silently zero (history: converged, none
            # dropped)
            (0 < self.cg_tol < 1, f"method.cg_tol must be in (0, 1), got {self.cg_tol}"),
            (self.damping >= 0, f"method.damping must be >= 0, got {self.damping}"),
            (self.damping_max >= 0, f"method.damping_max must be >= 0, got "
                                    f"{self.damping_max}"),
            (self.gn_switch >= 0, f"method.gn_switch must be >= 0 (0: never), got "
                                  f"{self.gn_switch}"),
            (self.eps >= MIN_L1_EPS, f"method.eps must be >= {MIN_L1_EPS:g} (ε² underflows "
                                     f"float32 below ~1e-19: NaN at unchanged pixels), got "
                                     f"{self.eps}"),
            (self.fd_eps > 0, f"method.fd_eps must be > 0, got {self.fd_eps}"),
            (self.align_every >= 1, f"method.align_every must be >= 1, got {self.align_every}"),
            (self.align_batch >= 0, f"method.align_batch must be >= 0, got {self.align_batch}"),
            # 2^20: F.max_pool2d raised "Overflow when unpacking long long" on 1e20; the
            # image-size check is in setup()
            (0 <= self.dilate <= 2**20, f"method.dilate must be in 0..{2**20}, got "
                                        f"{self.dilate}"),
            (self.balance >= 0, f"method.balance must be >= 0, got {self.balance}"),
            (self.distance in DISTANCES, not_one_of("method.distance", self.distance, DISTANCES)),
            (self.negative_curvature in NEGATIVE_CURVATURE,
             not_one_of("method.negative_curvature", self.negative_curvature,
                        NEGATIVE_CURVATURE)),
            (self.hvp in HVP_MODES, not_one_of("method.hvp", self.hvp, HVP_MODES)),
            (self.bn in BN_MODES, not_one_of("method.bn", self.bn, BN_MODES)),
            (self.cache_device in CACHE_DEVICES,
             not_one_of("method.cache_device", self.cache_device, CACHE_DEVICES)),
            (self.cache_dtype in CACHE_DTYPES,
             not_one_of("method.cache_dtype", self.cache_dtype, CACHE_DTYPES)),
            (self.normalize in NORMALIZE, not_one_of("method.normalize", self.normalize,
                                                     NORMALIZE)),
            (self.region in REGIONS, not_one_of("method.region", self.region, REGIONS)),
            (self.align_on in ALIGN_ON, not_one_of("method.align_on", self.align_on, ALIGN_ON)),
            (self.inner_optimizer in OPTIMIZERS,
             not_one_of("method.inner_optimizer", self.inner_optimizer, OPTIMIZERS)),
            (self.space in SPACES, not_one_of("method.space", self.space, SPACES)),
            (self.smooth_sigma > 0,
             f"method.smooth_sigma must be > 0, got {self.smooth_sigma}"),
            (is_target_rule(str(self.target)),
             f"method.target must be 'other', 'predicted' or a class index, "
             f"got '{self.target}'"),
            (not (self.space == "latent" and self.distance.startswith("scaled")),
             f"method.distance '{self.distance}' is per pixel; space latent takes l1 or l2"),
            (not (self.autoencoder and self.space != "latent"),  # it was silently unused
             f"method.autoencoder is used only with method.space=latent (space is "
             f"'{self.space}')"),
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


# method.damping above this warns in setup: the largest δ negative_curvature=damping raises
# to by default, where on multiview the alignment term had stopped acting
# (docs/causal_align_solvers.md, "Negative curvature")
DAMPING_WARN = 10.0


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


# auto CG cap when the map from search variable to image is curved (space latent: the
# decoder ends in a sigmoid). Measured on the demo benchmark (64 px, 2 epochs, binary):
# a cap of 3 dropped 52 % / 61 % of the aligned samples; 10 dropped none, with 4–5
# iterations a solve on average (CG stops once every sample has converged).
CURVED_MAP_CG_ITERS = 10

# extra CG iterations over the exact-arithmetic bound C for C > 2 classes: float32 CG needs a
# few more where the Gauss-Newton eigenvalues are large and spread. resnet18 at 32 px (one
# step, 8 samples, random data) needed 5-6 iterations at C = 5 and 10-13 at C = 10, where a
# cap of C dropped 1 and 7 of the 8 samples; at C = 50 and 200 it needed at most 38 and 43.
# Binary data keeps 3 (as tuned, and the stored results) and soft targets p + 1.
MULTICLASS_CG_SLACK = 10


def refuse_autograd_context(name: str, x: Tensor, image_term: bool = True) -> None:
    """Refuse, before anything moves, the calls an alignment loss cannot serve: inside
    ``torch.inference_mode()`` (the search needs autograd; it failed only after the CE
    forward had updated BatchNorm's running statistics and the step counter had moved) and
    an image that requires grad (L_align depends on x through x* − x and x*(x), but the
    implicit gradient reaches the parameters only: the image's .grad held the supervised
    part alone, silently); ``image_term`` False: no image-level term, only the first check."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} needs autograd for its counterfactual search; call it "
                           f"outside torch.inference_mode() (under torch.no_grad() it gives "
                           f"the loss's value)")
    if image_term and x.requires_grad and torch.is_grad_enabled():
        raise InputError(f"{name}: batch['image'] requires grad, but the alignment term's "
                         f"gradient reaches only the model's parameters, not the image (its "
                         f".grad would miss it); pass batch['image'].detach()")


def auto_cg_iters(outputs: int, soft: bool, curved_map: bool = False) -> int:
    """CG iterations that `method.cg_iters` 0 (auto) allows: with Jacobi preconditioning the
    system is identity + the Gauss-Newton term, of rank C − 1 for cross-entropy over C
    classes and p for BCE over p soft attribute targets, so CG converges in rank + 1
    iterations (exact arithmetic), plus `MULTICLASS_CG_SLACK` for C > 2 classes (float32);
    never fewer than the binary default 3. That holds when
    the image is piecewise linear in the search variable (pixel and smooth spaces, with a
    piecewise-linear classifier). ``curved_map``: it is not (a decoder's sigmoid adds a
    full-rank term to the Hessian), so at least `CURVED_MAP_CG_ITERS`. CG stops once every
    sample has converged: the cap costs only where a sample does not."""
    rank = outputs if soft else outputs - 1
    slack = MULTICLASS_CG_SLACK if not soft and outputs > 2 else 0
    return max(CURVED_MAP_CG_ITERS if curved_map else 3, rank + 1 + slack)


def no_setup_message(name: str, what: str, n: int, each: bool = False) -> str:
    """The warning of a method that fits on a batch what setup() fits on the split."""
    return (f"{name}: setup() was not called: {what} fitted on {'each' if each else 'this'} "
            f"batch ({n} image{'s' if n != 1 else ''}), not on the training split; call "
            f"method.setup(train_set, model) before training")


def check_state_settings(name: str, state: dict, params: object) -> None:
    """Refuse a `state_dict` saved under another distance or search space (`settings`): its
    scales, autoencoder and warm-start offsets belong to those. Loaded into an l1 method,
    scaled-l1's per-pixel scales silently made its distance scaled; a pixel-space cache
    warm-started space smooth's search variable."""
    saved = state.get("settings") or {}
    diffs = [f"method.{k} {v!r} -> {getattr(params, k)!r}" for k, v in saved.items()
             if hasattr(params, k) and getattr(params, k) != v]
    distance = str(getattr(params, "distance", ""))
    if not saved and state.get("scale") is not None and not distance.startswith("scaled"):
        diffs.append(f"per-pixel distance scales -> method.distance {distance!r}")
    if diffs:
        raise ConfigError(f"{name}: this method state was saved with other settings "
                          f"({'; '.join(diffs)}); build the method with the saved settings "
                          f"to load it")


def never_fell_back(history: list[dict]) -> bool:
    """True when no history.csv row records a Gauss-Newton fallback (any level's
    ``*gn_fallback`` column): such a run trained as it would have with any `gn_switch`, which
    acts only after fallbacks (every 2D CNN run: CG never meets negative curvature there)."""
    return not any(float(v or 0) > 0 for row in history for k, v in row.items()
                   if k.endswith("gn_fallback"))


def never_met_negative_curvature(history: list[dict], damping: float) -> bool:
    """True when no history.csv row shows a step whose CG could have met negative curvature:
    no sample dropped (``*cg_dropped``: what runs from before `negative_curvature` did with
    such a sample), no damping raised above ``damping`` (``*damping``), no Gauss-Newton
    fallback. Such a run trained as it would have with any `negative_curvature` and
    `damping_max`, which act only on those steps (every 2D CNN run in pixel space)."""
    for row in history:
        for k, v in row.items():
            try:
                value = float(v or 0)
            except (TypeError, ValueError):
                return False  # unreadable: not shown to be without effect
            if k.endswith(("cg_dropped", "gn_fallback")) and value > 0:
                return False
            if k.endswith("damping") and value > damping * (1 + 1e-6):
                return False
    return True


def _all_finite(grads: Sequence[Tensor]) -> bool:
    """Every gradient finite? One host sync for all parameters (not one per tensor)."""
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _finite_or_dropped(grads: tuple[Tensor, ...], ok: Tensor, failed: Tensor
                       ) -> tuple[tuple[Tensor, ...], Tensor]:
    """(grads, failed), or zeros and every aligned sample failed when any gradient is not
    finite."""
    if _all_finite(grads):
        return grads, failed
    return tuple(torch.zeros_like(g) for g in grads), ok


def _curved(cg, ok: Tensor) -> Tensor:
    """Aligned samples whose CG met finite curvature <= 0: what a Gauss-Newton solve or more
    damping can fix. A NaN/inf product (``cg.nonfinite``) is no curvature: raising δ for it
    ran δ up to damping_max for the rest of the run, and it counted towards gn_switch."""
    return ok & cg.breakdown & ~cg.nonfinite


def _unconverged(cg, ok: Tensor) -> Tensor:
    """Aligned samples whose CG ran out of iterations: no breakdown, finite products, and
    the tolerance still missed."""
    return ok & ~cg.converged & ~cg.breakdown & ~cg.nonfinite


def _finite_or_subset(grads: tuple[Tensor, ...], prob: InnerProblem, u_star: Tensor,
                      outer: Tensor, adjoint: Callable[[], Tensor], ok: Tensor, failed: Tensor,
                      params: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], Tensor]:
    """`_finite_or_dropped`, per sample where possible. The mixed product −∂θ(∇ₓT·v) runs
    over the whole batch, so one sample whose terms are NaN/inf poisons every parameter's
    gradient even with its v zeroed (0·NaN = NaN in the backward): the product is taken
    again over the samples that are aligned, not failed, and whose v, T_i and ∇T_i are
    finite (H is block-diagonal, so their gradient is the same); only if that is not
    finite either, or no sample is left out, is every aligned sample dropped. Runs in the
    caller's eval_mode."""
    if _all_finite(grads):
        return grads, failed
    # the culprits: a v or a T_i or ∇T_i that is not finite (one more forward and backward,
    # only on such a step; ``adjoint`` gives v in u's space, built only here)
    v = adjoint()
    u = u_star.detach().requires_grad_(True)
    with torch.enable_grad():
        t = prob.terms(u)[0]
        (gu,) = torch.autograd.grad(t.sum(), u)
    keep = (ok & ~failed & torch.isfinite(v).flatten(1).all(1) & torch.isfinite(t)
            & torch.isfinite(gu).flatten(1).all(1))
    if bool(keep.any()) and bool((ok & ~keep).any()):
        idx = keep.nonzero().flatten()
        sub = prob.subset(idx)
        out = implicit_gradient(lambda u: sub.terms(u)[0].sum(), u_star[idx], params,
                                outer[idx], hvp="exact", adjoint=v[idx], check_finite=False)
        if _all_finite(out.grads):
            return out.grads, ok & ~keep
    return _finite_or_dropped(grads, ok, failed)


def share_weights(stats: dict[str, float], prefix: str = "") -> dict[str, int]:
    """`LossOutput.part_weights` of `implicit_term`'s stats (history.csv columns
    ``prefix + name``): its shares are of the step's aligned samples (cg_converged and the
    other solve shares of those not diverged), so the epoch's value is the share of the
    epoch's samples (per-step figures, cg_iters or damping, keep the batch weighting).
    Weighted by the batch size instead, a step with 1 aligned sample counted
    as much as one with 16 (4 of 8 diverged read 0.33, under the 0.5 warning line)."""
    n = round(stats.get("n_align", 0.0))
    n_ok = round(n * (1.0 - stats.get("cf_diverged", 0.0)))
    weights = {k: n for k in ("cf_diverged", "cf_warm", "cf_stuck", "flip_rate", "cg_dropped")}
    weights.update({k: n_ok for k in ("align", "cg_converged")})
    return {prefix + k: w for k, w in weights.items() if k in stats}


def _solve_stats(prob: InnerProblem, seen: list[Tensor], ok: Tensor, converged: Tensor,
                 failed: Tensor, iters: int | float, damping: float,
                 u_star: Tensor) -> dict[str, float]:
    """The adjoint solve's history columns: shares of the aligned samples (``ok``: not
    diverged) that flipped / whose solve converged / were dropped / whose search never left
    the start (cf_stuck: x* = x exactly and the target not reached; their L_align is 0)."""
    n_ok = max(int(ok.sum()), 1)
    reached = prob.reached(seen[0])
    flipped = ok & reached
    # an overshooting step (method.inner_lr=1e20 under ista: every iterate worse than the
    # start, so the best-iterate rule returned x) left x* = x on every step: train_align 0,
    # nothing diverged, and no counter said so
    unmoved = (u_star == prob.u0).flatten(1).all(1)
    return {
        "flip_rate": float(flipped.float().mean()),
        "cf_stuck": float((ok & ~reached & unmoved).float().mean()),
        "cg_converged": float((converged & ok).sum()) / n_ok,
        "cg_iters": float(iters),
        "cg_dropped": float(failed.sum()) / len(ok),
        "damping": damping,
        "gn_fallback": 0.0,
    }


@register_method("causal-align")
class CausalAlign(Method):
    """Causal alignment L = CE + λ·L_align (seed 000, Eq. 2-3; see the module docstring).

    ``CausalAlign(params)`` with `CausalAlignTrainingParams` (the ``method.*`` settings);
    `setup` fits what the settings need on the training split (per-pixel scales for a
    scaled distance, the autoencoder for ``space="latent"``), `loss` gives CE + λ·L_align
    with the implicit gradient attached, `generator` the counterfactual generator it trains
    through (sharing its warm-start cache). One object belongs to one run of one model."""

    Params = CausalAlignTrainingParams
    uses_annotations = True
    guidance_terms = ("align",)
    subset_means = True  # L_align: a mean over the aligned samples (LossOutput.means)
    # runs stored before gn_switch existed tried CG on every step; before damping_max a
    # step whose CG met negative curvature dropped those samples at δ = damping (a cap of
    # 0 = off), and before negative_curvature it raised δ (damping_max) instead of solving
    # the Gauss-Newton system
    params_before = {"gn_switch": 0, "damping_max": 0.0, "negative_curvature": "damping"}
    placement_params = ("cache_device",)  # the warm-start cache's device: same numbers

    def setting_had_no_effect(self, key: str, history: list[dict]) -> bool:
        if key in ("damping_max", "negative_curvature"):
            return never_met_negative_curvature(history, self.params.damping)
        return key == "gn_switch" and never_fell_back(history)

    def __init__(self, params: CausalAlignParams | None = None) -> None:
        super().__init__(params)
        self.scale: Tensor | None = None
        self.autoencoder: nn.Module | None = None
        self.cache = WarmStartCache(device=CACHE_DEVICES[self.params.cache_device],
                                    dtype=CACHE_DTYPES[self.params.cache_dtype])
        self.step = 0
        self.damping = self.params.damping  # raised on negative curvature (damping_max)
        # consecutive aligned steps solved by the Gauss-Newton fallback, and whether the run
        # has switched to solving every step that way (`gn_switch`)
        self.gn_streak = 0
        self.gn_switched = False
        self._overflow_warned = False  # warn_cache_overflow: once a run
        # (weak reference to the model, its outputs) for auto cg_iters; weak, not id(): a
        # new model can reuse a collected one's id
        self._outputs: tuple[weakref.ref, int] | None = None
        # setup() refuses a training split where no sample has the configured region (the
        # trainer only checks for "a mask or a box"); hier-align's image level, whose masks
        # are optional, turns this off.
        self.require_region = True
        # Who says the setup warnings on image-sized state, and the name of this object's
        # alpha there: hier-align's image level is this class under method.alpha1
        self.owner, self.alpha_key = "causal-align", "alpha"
        # the values `check_settings` counts as unchanged (None: Params' own defaults);
        # hier-align's image level sets its own (cg_iters 8, not causal-align's 0 = auto)
        self.setting_defaults: dict[str, Any] | None = None
        # The run this object's state belongs to: what setup() or the first aligned step
        # fitted itself ("scale", "autoencoder"; one assigned by the user is not refitted),
        # whether setup() ran, and whether load_state_dict() came after it (a resume: the
        # next setup() keeps that state, as the trainer relies on). A second setup() (another
        # split or model, or this one changed) starts a new run: it kept dataset A's warm-start
        # cache for B's sample i, A's scales and autoencoder, step counter and damping.
        self._fitted: set[str] = set()
        self._set_up = False
        self._restored = False

    def __getstate__(self) -> dict:
        # pickle / torch.save(method): the auto CG cap's weak reference to the model cannot be
        # pickled (a TypeError once a step had run); the next step finds it again
        state = self.__dict__.copy()
        state["_outputs"] = None
        return state

    def new_run(self) -> None:
        """Forget the training state of a previous run: warm-start cache, step counter,
        damping, Gauss-Newton switch, the auto CG cap's model, and the scales and
        autoencoder this object fitted (setup() fits them again)."""
        self.cache.clear()
        self.step, self.damping = 0, self.params.damping
        self.gn_streak, self.gn_switched = 0, False
        self._outputs = None
        if "scale" in self._fitted:
            self.scale = None
        if "autoencoder" in self._fitted:
            self.autoencoder = None
        self._fitted.clear()

    # ---------------------------------------------------------------- setup / state

    def setup(self, train_set: LesionDataset, model: nn.Module) -> None:
        """Per-pixel distance scales and (latent space) the autoencoder, from training data.
        Called again (another training split or model), it starts a new run (`new_run`),
        unless `load_state_dict` came in between (a resume keeps the loaded state).
        A ``torch.utils.data.Subset`` of a split (``random_split``) fits on its samples."""
        train_set = as_training_split(train_set)
        if (self._set_up or self.step) and not self._restored:
            self.new_run()
        self._restored = False
        # sample ids index the training split (a stand-in without a length: no bound)
        self.cache.capacity = len(train_set) if hasattr(train_set, "__len__") else None
        has_mask = getattr(train_set, "has_mask", None)
        if self.require_region and self.params.region == "mask" and has_mask is not None \
                and not bool(has_mask.any()):
            # Box-only data: every step would skip L_align, i.e. train ERM under this name.
            raise ConfigError("causal-align: method.region is 'mask' but no training sample "
                              "has a pixel mask (only boxes); use --set method.region=box")
        annotated = getattr(train_set, "has_box_or_mask", None)
        if self.require_region and self.params.region == "mask" and has_mask is not None \
                and annotated is not None:
            box_only = int((annotated & ~has_mask).sum())
            if box_only:
                # they skip L_align: a mixed mask/box import aligned only part of its
                # annotated samples, without a word
                warnings.warn(f"causal-align: {box_only} of {int(annotated.sum())} annotated "
                              f"training samples have only a box and get no alignment term "
                              f"under method.region=mask (method.region=box uses boxes, and "
                              f"masks' boxes)", stacklevel=2)
        covers = getattr(train_set, "regions_cover_image", None)
        if self.require_region and callable(covers) and covers(self.params.region):
            # outside = 1 − m is 0 everywhere: L_align is 0 for every sample and the run
            # trained ERM at the alignment's cost, history's train_align 0, without a word
            # (as method.dilate over the whole image, refused below)
            raise DataError(f"causal-align: every annotated training sample's "
                            f"{self.params.region} covers its whole image, so no pixel lies "
                            f"outside a region and L_align is 0 (the run would be ERM); check "
                            f"the annotations (an inverted or blank-filled export?)")
        target = str(self.params.target)
        n_classes = len(getattr(getattr(train_set, "meta", None), "classes", None) or [])
        if target.isdigit() and n_classes and int(target) >= n_classes:
            # was refused only at the first step, after loading (and a latent autoencoder)
            raise ConfigError(f"method.target={target} is no class of this data (classes "
                              f"0..{n_classes - 1})")
        self._refuse_nothing_alignable(train_set)
        self.check_settings(getattr(train_set, "image_shape", None))
        self._warn_cache_size(train_set)
        self._warn_intensity_range(train_set)
        device = next(model.parameters()).device
        if self.params.cache_device == "cpu" and self.params.warm_start \
                and device.type == "cpu":
            # "model" puts the cache on the CPU too: accepted and recorded in config.yaml as
            # if it moved something (warm_start false: check_settings' warning says more;
            # the wording avoids "warm-start cache", which names the cache-size warning)
            warnings.warn("method.cache_device=cpu has no effect here: the model is on the "
                          "CPU, so the default (model) keeps the cache in host memory too "
                          "(the setting moves it off a GPU)", stacklevel=2)
        need_scale = self.params.distance.startswith("scaled") and self.scale is None
        need_ae = self.params.space == "latent" and self.autoencoder is None
        # getattr_static: `images` is a property that builds the whole split as floats (the
        # memory setup avoids by reading the compact cache)
        if (need_scale or need_ae) and not any(
                inspect.getattr_static(train_set, k, None) is not None
                for k in ("images", "pixel_columns", "image_batch")):
            # a ConcatDataset or a user's own Dataset failed with "'ConcatDataset' object
            # has no attribute 'images'"
            what = "per-pixel distance scales" if need_scale else "latent autoencoder"
            raise InputError(f"{self.name}: setup fits its {what} on the training images, "
                             f"so it needs a LesionDataset split (or a Subset of one, or an "
                             f"object with .images (N, C, ...)); got "
                             f"{type(train_set).__name__}")
        if need_scale:
            # from the split's compact cache, a chunk of pixels at a time (a dataset object;
            # a plain split-like object gives its `.images`): `.images` then float64 took ~35x
            # the uint8 cache at once (3.9 GB for 5000 gray 128 px images)
            source = train_set if hasattr(train_set, "pixel_columns") else train_set.images
            self.scale = distance_scale(source, self.params.distance).to(device)
            self._fitted.add("scale")
        if need_ae:
            # a dataset split is read a batch at a time (its `.images` is a whole float32
            # copy, 4× a uint8 cache); a plain split-like object gives its `.images`
            source = train_set if hasattr(train_set, "image_batch") else train_set.images
            self.autoencoder = self._load_or_train_autoencoder(source, device)
            self._fitted.add("autoencoder")
        self._set_up = True

    def check_settings(self, image_shape: tuple[int, ...] | None) -> None:
        """The checks of `setup` that need no training split, only the images' shape (None:
        unknown): refusals of settings that leave no alignment term (method.dilate over the
        whole image) and warnings of unused or silencing ones. `causalign bench step` runs
        them too: it skips setup, and timed a zero alignment term under method.dilate=100."""
        shape = image_shape
        if shape is not None and len(shape) == 4 and self.params.space == "latent":
            # refused only inside the autoencoder's training, in words naming neither
            raise ConfigError(f"method.space=latent takes 2D images (its autoencoder is 2D); "
                              f"this data holds volumes {tuple(shape)}: use space pixel or "
                              f"smooth")
        if shape is not None and self.params.dilate >= max(shape[-2:]) - 1:
            # the grown region covers every image: L_align is 0 and the run is ERM. Any two
            # pixels lie within max(H, W) − 1 of each other (per axis), so from there on one
            # annotated pixel anywhere grows over the whole image (the bound was max(H, W),
            # which let max(H, W) − 1 through)
            raise ConfigError(f"method.dilate={self.params.dilate} grows the region over the "
                              f"whole {shape[-2]}×{shape[-1]} image: no alignment term left")
        if self.params.hvp == "finite-difference" and self.params.fd_eps < FD_EPS_MIN_FLOAT32:
            # implicit_gradient's own floor for the float32 images datasets hold (10 ulps):
            # 1e-6 stopped training at the first step with a ValueError traceback. Here, not
            # in validate: a float64 loop of one's own may take smaller steps
            raise ConfigError(f"method.fd_eps={self.params.fd_eps:g} is below what float32 "
                              f"images resolve (a smaller step leaves only rounding noise in "
                              f"the finite differences): use method.fd_eps >= "
                              f"{FD_EPS_MIN_FLOAT32:.2g} or method.hvp=exact")
        if self.params.hvp == "gauss-newton" and self.params.negative_curvature == "damping":
            # no CG runs, so none meets negative curvature: the escalation asked for is
            # unused (a warning, not a refusal: runs trained so stay loadable and resumable)
            warnings.warn("method.negative_curvature=damping has no effect with "
                          "method.hvp=gauss-newton: its direct solve is positive definite "
                          "and no CG runs to meet negative curvature", stacklevel=2)
        unused = [f"method.{k}={getattr(self.params, k)}" for k, default in
                  (("cache_device", "model"), ("cache_dtype", "float32"))
                  if getattr(self.params, k) != default]
        if unused and not self.params.warm_start:
            # no search reads the cache without a warm start: accepted and recorded in
            # config.yaml, yet unused (a warning, not a refusal, as smooth_sigma below)
            warnings.warn(f"{' and '.join(unused)} have no effect with "
                          f"method.warm_start=false: the warm-start cache they configure is "
                          f"never used", stacklevel=2)
        p = self.params
        cg = p.hvp != "gauss-newton"  # gauss-newton solves directly: no CG runs
        warn_unused_settings(p, (  # read by one mode only: accepted and recorded otherwise
            ("fd_eps", p.hvp == "finite-difference", "with method.hvp=finite-difference"),
            ("eps", p.distance in ("l1", "scaled-l1"),
             "with method.distance l1 or scaled-l1 (it smooths the l1)"),
            ("inner_lr", p.inner_optimizer != "newton",
             "with method.inner_optimizer adam or ista (newton takes no step size)"),
            *((k, cg, "with method.hvp exact or finite-difference (hvp=gauss-newton solves "
                      "without CG)") for k in ("cg_iters", "cg_tol", "precondition")),
            ("gn_switch", cg and p.negative_curvature == "gauss-newton",
             "with method.negative_curvature=gauss-newton and method.hvp exact or "
             "finite-difference"),
            ("damping_max", cg and p.negative_curvature == "damping",
             "with method.negative_curvature=damping and method.hvp exact or "
             "finite-difference (the default gauss-newton fallback keeps damping)"),
        ), self.setting_defaults)
        if self.params.damping > DAMPING_WARN:
            # the adjoint v ≈ ∇L/δ once δ dominates the curvature: measured on cnn7 (32 px),
            # the alignment gradient's norm fell from 2.0 at δ = 0.01 to 0.015 at 10, 1.5e-5
            # at 1e4 and exactly 0 at 1e30, while every column of history.csv looked healthy
            warnings.warn(f"method.damping={self.params.damping:g} is above {DAMPING_WARN:g} "
                          f"(the default method.damping_max): the alignment gradient shrinks "
                          f"as 1/damping, so L_align barely trains the model (default 0.01)",
                          stacklevel=2)
        if self.params.smooth_sigma != 1.0 and self.params.space != "smooth":
            # silently unused before (config.yaml recorded a blur never applied); a warning,
            # not a refusal, for the same reason as above
            warnings.warn(f"method.smooth_sigma={self.params.smooth_sigma:g} has no effect: "
                          f"it is used only with method.space=smooth (space is "
                          f"'{self.params.space}')", stacklevel=2)

    def _warn_cache_size(self, train_set: LesionDataset) -> None:
        """Warn when the warm-start cache would outgrow `CACHE_WARN_BYTES`: one image-sized
        offset per alignable training sample, on the model's device and in every
        checkpoint.pt. On volumes that is C·D·H·W floats a sample (BraTS-sized 4 × 155 ×
        240 × 240: 143 MB), which filled a GPU epochs into a run, without a word before."""
        p = self.params
        labels = getattr(train_set, "labels", None)
        has = getattr(train_set, "has_mask" if p.region == "mask" else "has_box_or_mask",
                      None)
        shape = getattr(train_set, "image_shape", None)
        # not gated on require_region: hier-align's image level (require_region off) keeps
        # the same image-sized cache; lam 0 never aligns, so never fills it
        if not (p.warm_start and p.lam > 0 and p.space != "latent") or \
                labels is None or has is None or not shape:
            return  # latent: the rows are codes, not images
        n = int(self.alignable(labels, has).sum())
        itemsize = 2 if CACHE_DTYPES[p.cache_dtype] is not None else 4
        size = n * math.prod(shape) * itemsize
        if size > CACHE_WARN_BYTES:
            where = "host memory" if p.cache_device == "cpu" else "the model's device"
            warnings.warn(f"{self.owner}: the warm-start cache will hold up to {n} offsets of "
                          f"shape {tuple(shape)} ({size / 2**30:.1f} GiB at {p.cache_dtype}) "
                          f"in {where} and in every checkpoint.pt; --set "
                          f"method.cache_device=cpu, method.cache_dtype=float16 or "
                          f"method.warm_start=false shrink or drop it", stacklevel=2)

    def _warn_intensity_range(self, train_set: LesionDataset) -> None:
        """Warn when the training images span far more than [0, 1]: the search's step
        (inner_lr), the l1's eps and alpha are in units of a [0, 1] image. On int16 CT in HU
        (-1000..1000) x* moved at most 0.004 HU in K = 10 steps and flipped only the samples
        the model already got wrong (4 of 32), L_align then a function of noise, without a
        word. Pixel and smooth spaces only (the latent search works on codes)."""
        batch = getattr(train_set, "image_batch", None)
        # not gated on require_region: hier-align's image level searches in the same
        # units and was never warned, though the README said it was (0..255 float images)
        if not (self.params.lam > 0 and self.params.space != "latent" and callable(batch)):
            return
        n = min(len(train_set), INTENSITY_SAMPLE)
        if n == 0:
            return
        lo, hi = torch.stack(batch(torch.arange(n)).float().aminmax()).tolist()
        if hi - lo > INTENSITY_SPAN_WARN:
            p = self.params
            warnings.warn(f"{self.owner}: training images span {lo:g}..{hi:g}, but "
                          f"method.inner_lr={p.inner_lr:g}, method.eps={p.eps:g} and "
                          f"method.{self.alpha_key}={p.alpha:g} are in units of [0, 1] "
                          f"images, so the counterfactual search hardly moves x*; rescale the "
                          f"images to [0, 1] (e.g. a fixed window for CT) or scale those "
                          f"settings with the range", stacklevel=2)

    def _refuse_nothing_alignable(self, train_set: LesionDataset) -> None:
        """Refuse a split in which annotated samples exist but `alignable` keeps none of them
        (align_on=positive with only negatives annotated, a fixed method.target that every
        annotated sample already has): every step skipped L_align, history's train_n_align
        0, and the run trained ERM under this name with exit 0."""
        p = self.params
        labels = getattr(train_set, "labels", None)
        has = getattr(train_set, "has_mask" if p.region == "mask" else "has_box_or_mask",
                      None)
        if not self.require_region or labels is None or has is None or not bool(has.any()):
            return  # nothing annotated: refused or warned about elsewhere
        if bool(self.alignable(labels, has).any()):
            return
        why = []
        if str(p.target).isdigit():
            why.append(f"method.target={p.target} skips the samples labelled {p.target}")
        if p.align_on == "positive":
            why.append("method.align_on=positive skips those labelled 0")
        raise ConfigError(f"causal-align: none of the {int(has.sum())} annotated training "
                          f"samples can align ({' and '.join(why)}), so L_align never acts "
                          f"and the run would be ERM")

    def _load_or_train_autoencoder(self, images: Tensor | ImageSplit, device) -> nn.Module:
        from ..models.autoencoder import (
            check_autoencoder_destination,
            load_autoencoder,
            save_autoencoder,
            train_autoencoder,
        )

        path = self.params.autoencoder
        if path and Path(path).exists():
            ae = load_autoencoder(path, device)
            # A file fitted on other data (RGB vs grey) would fail deep inside a conv.
            c = ae.config.get("in_channels") if isinstance(getattr(ae, "config", None), dict) \
                else None
            channels = images.shape[1] if isinstance(images, Tensor) else images.image_shape[0]
            if c is not None and c != channels:
                raise CausalignError(f"{path}: autoencoder takes {c}-channel images; this "
                                     f"data has {channels} channel(s) (method."
                                     f"autoencoder: train a new one, or give another file)")
            return ae
        if path:  # refuse an unwritable destination before the training, not after it
            check_autoencoder_destination(path)
        ae = train_autoencoder(images, device=device)
        if path:
            save_autoencoder(path, ae)
        self.checkpoint_after_setup = True
        return ae

    def _lazy_setup(self, x: Tensor, warn: bool = True) -> None:
        # Without setup() (e.g. `bench step`, a bare objective call) the statistics come from
        # the first batch seen — rougher than the training split, but never a crash. Said
        # once (a user loop that forgot setup() trained on them without a word).
        path = self.params.autoencoder  # an existing file is loaded, not fitted
        fit = [what for what, need in (
            ("its per-pixel distance scales", self.params.distance.startswith("scaled")
             and self.scale is None),
            ("its latent autoencoder", self.params.space == "latent" and self.autoencoder is None
             and not (path and Path(path).exists())))
            if need]
        if fit and warn:
            warnings.warn(no_setup_message(self.name, " and ".join(fit), len(x)), stacklevel=5)
        if self.params.distance.startswith("scaled") and self.scale is None:
            self.scale = distance_scale(x.detach(), self.params.distance)
            self._fitted.add("scale")
        if self.params.space == "latent" and self.autoencoder is None:
            self.autoencoder = self._load_or_train_autoencoder(x.detach(), x.device)
            self._fitted.add("autoencoder")

    def state_dict(self) -> dict:
        """What a checkpoint keeps so a resumed run continues exactly: step counter, damping,
        Gauss-Newton switch, warm-start cache, per-pixel scales and the latent autoencoder."""
        from ..models.autoencoder import ConvAutoencoder, autoencoder_state

        ae = self.autoencoder
        if ae is not None and not isinstance(ae, ConvAutoencoder):
            # a user-assigned module with encode/decode (the generator takes any): the
            # checkpoint format describes only ConvAutoencoder, and autoencoder_state failed
            # with "'MyAE' object has no attribute 'config'" at the first checkpoint
            warnings.warn(f"causal-align: the assigned autoencoder ({type(ae).__name__}) is "
                          f"not a ConvAutoencoder and is not kept in the state; assign it "
                          f"again when resuming", stacklevel=2)
            ae = None
        return {
            "step": self.step,
            "damping": self.damping,
            "gn_streak": self.gn_streak,
            "gn_switched": self.gn_switched,
            "cache": self.cache.state_dict(),
            "scale": None if self.scale is None else self.scale.cpu(),
            "autoencoder": None if ae is None else autoencoder_state(ae),
            # what the cache, scales and autoencoder were made for (`check_state_settings`)
            "settings": {"distance": self.params.distance, "space": self.params.space},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s contents (keys missing in older checkpoints: defaults)."""
        from ..models.autoencoder import autoencoder_from_state

        check_state_settings(self.name, state, self.params)
        self.step = int(state.get("step", 0))
        self.damping = float(state.get("damping", self.params.damping))
        self.gn_streak = int(state.get("gn_streak", 0))
        self.gn_switched = bool(state.get("gn_switched", False))
        self.cache.load_state_dict(state.get("cache", {}))
        if state.get("scale") is not None:
            self.scale = state["scale"]
            self._fitted.add("scale")
        if state.get("autoencoder") is not None:
            self.autoencoder = autoencoder_from_state(state["autoencoder"])
            self._fitted.add("autoencoder")
        self._restored = True

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
            optimizer=p.inner_optimizer, smooth_sigma=p.smooth_sigma, polish=p.newton_polish)
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
        """CE + λ·L_align (Eq. 3) on the annotated samples, every `align_every` steps; the
        alignment term's gradient is the implicit one (`implicit_term`).

        Under ``torch.no_grad()`` (a validation loss: nothing can be backpropagated) the call
        gives the whole loss's value (L_align included, whatever `align_every`) and leaves the
        training state alone: no warm start from or into the cache, whose rows are the
        training split's indices (a validation batch's index i is another image than training
        sample i), and the step counter, damping and Gauss-Newton switch stay as they were."""
        if torch.is_grad_enabled():
            return self._loss(model, batch, warm=True)
        state = (self.step, self.damping, self.gn_streak, self.gn_switched)
        try:
            return self._loss(model, batch, warm=False)
        finally:
            self.step, self.damping, self.gn_streak, self.gn_switched = state

    def _loss(self, model: nn.Module, batch: dict[str, Tensor], warm: bool) -> LossOutput:
        x = self.model_input(batch)
        y = batch["label"]
        p = self.params
        if p.lam != 0:
            refuse_autograd_context(self.name, x)
        # a validation loss (warm False) is the whole loss, whatever align_every's schedule
        aligns = p.lam != 0 and (not warm or self.step % p.align_every == 0)
        # the batch's BatchNorm statistics, for the inner problem (bn=batch); not gathered
        # on steps that do not align
        with capture_bn_stats(model) if aligns and p.bn == "batch" else nullcontext({}) \
                as bn_stats:
            logits = model(x)
        ce = self.ce(logits, y)  # class_weight; L_align (toward y*) is not weighted
        parts: dict[str, float] = {"ce": float(ce.detach())}
        self.step += 1
        if not aligns:
            parts["align_step"] = 0.0
            return LossOutput(ce, parts)
        parts["align_step"] = 1.0
        region, has = self.annotation(batch)
        target, valid = counterfactual_targets(y, logits.shape[1], p.target, logits)
        sel = has & valid
        if p.align_on == "positive":
            sel = sel & (y != 0)
        idx = sel.nonzero().flatten()
        if p.align_batch:
            idx = self._capped(idx, batch)
        global_cap = self._global_balance(model, ce, len(x)) if p.balance > 0 else None
        if len(idx) == 0:
            if global_cap is not None:  # the other ranks align: join their exchange
                global_cap((), 0)
            parts["n_align"] = 0.0
            return LossOutput(ce, parts)
        self._lazy_setup(x)
        cap: float | GradCap | None = global_cap
        if p.balance > 0 and cap is None:
            ce_norm = grad_norm(ce, [q for q in model.parameters() if q.requires_grad])
            cap = float(p.balance * ce_norm / p.lam)
        # augment=dihedral's per-sample transforms: the warm start maps cached offsets
        term, stats = self.alignment(model, x[idx], target[idx], region[idx],
                                     batch["index"][idx] if "index" in batch and warm
                                     else None,
                                     grad_cap=cap, dihedral=batch["dihedral"][idx]
                                     if "dihedral" in batch else None, bn_stats=bn_stats)
        parts.update(stats)
        # L_align is a mean over the samples whose counterfactual did not diverge: data-
        # parallel training weights it by the global batch's count (LossOutput.means)
        n_ok = round(stats["n_align"] * (1.0 - stats["cf_diverged"]))
        return LossOutput(ce + p.lam * term, parts, means={"align": (p.lam * term, n_ok)},
                          part_weights=share_weights(stats))

    def alignable(self, labels: Tensor, has: Tensor) -> Tensor:
        """Which samples L_align may use, from the data alone: annotated (``has``), with a
        valid y* (`counterfactual_targets`: only a fixed target class k excludes samples,
        those labelled k) and, for align_on=positive, a label other than 0."""
        sel = has.bool()
        if str(self.params.target).isdigit():
            sel = sel & (labels != int(self.params.target))
        if self.params.align_on == "positive":
            sel = sel & (labels != 0)
        return sel

    def _capped(self, idx: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The first ``align_batch`` of the alignable rows ``idx`` (batches are shuffled: the
        first ones are a random draw). Data-parallel (`global_step` set), the first of the
        *global* batch, as in one process: chunks are contiguous in rank order, so this rank
        keeps the first align_batch − (alignable samples of the lower ranks) of its own.
        Capped per chunk instead, W ranks aligned up to W × align_batch samples a step."""
        cap = self.params.align_batch
        gs = self.global_step
        if gs is None:
            return idx[:cap]
        g = gs.batch
        if "index" in batch and not torch.equal(gs.local(g["index"]), batch["index"].cpu()):
            raise RuntimeError("causal-align: method.global_step describes another batch than "
                               "the one this rank was given (set it before every step)")
        has = g["has_mask"] if self.params.region == "mask" else g["has_annotation"]
        before = int(self.alignable(gs.before(g["label"]), gs.before(has)).sum())
        return idx[: max(cap - before, 0)]

    def _global_balance(self, model: nn.Module, ce: Tensor, m: int) -> GradCap | None:
        """The `balance` cap of one process on the global batch, data-parallel.

        One process caps ‖λ·dL_align/dθ‖ at balance·‖∇CE‖ with both gradients of the whole
        global batch: Σ_r (m_r/N)·∇CE_r and Σ_r (k_r/K)·g_r over the ranks' chunks (k_r: the
        rank's aligned samples). Their norms need the vectors, so the returned cap, called with
        this rank's alignment gradient and k_r, all-reduces both (`global_mean_norms`) and
        gives every rank the same factor. None (the cap stays per rank, on the chunk's
        gradients) in a single process and on a step where some rank has an empty chunk (a
        global batch smaller than the world): that rank never calls the loss, so it cannot
        join. No rank aligns when the global batch has no alignable sample: no exchange then.
        """
        from ..engine.distributed import global_mean_norms

        gs = self.global_step
        params = [q for q in model.parameters() if q.requires_grad]
        if gs is None or gs.world < 2 or 0 in gs.sizes or not params:
            return None
        g = gs.batch
        has = g["has_mask"] if self.params.region == "mask" else g["has_annotation"]
        if not bool(self.alignable(g["label"], has).any()):
            return None
        ce_grads = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        limit = self.params.balance / self.params.lam

        def cap(grads: Sequence[Tensor], k: int) -> float:
            ce_norm, align_norm = global_mean_norms([(ce_grads, m), (grads, k)], params)
            return min(1.0, limit * ce_norm / align_norm) if align_norm > 0 else 1.0

        return cap

    def alignment(self, model: nn.Module, x: Tensor, target: Tensor, region: Tensor,
                  ids: Tensor | None, grad_cap: float | GradCap | None = None,
                  dihedral: Tensor | None = None, bn_stats: BNStats | None = None
                  ) -> tuple[Tensor, dict[str, float]]:
        """L_align over these (annotated) samples: a tensor whose value is L_align and whose
        gradient w.r.t. the model's parameters is the implicit dL_align/dθ; plus stats.
        ``dihedral``: the samples' augmentation (``batch["dihedral"]``), for the warm start.
        ``bn_stats``: BatchNorm statistics the inner problem uses (`capture_bn_stats` of the
        training forward, as `loss` passes them under bn=batch); None: running statistics."""
        p = self.params
        res = self.generator(model).generate(x, target=target, ids=ids if p.warm_start else None,
                                             report=False, bn_stats=bn_stats, dihedral=dihedral)
        self.warn_cache_overflow()
        return self.implicit_term(model, res, region, bn_stats, grad_cap=grad_cap)

    def warn_cache_overflow(self) -> None:
        """Once a run: some counterfactual offsets exceeded ``cache_dtype``'s range and were
        not cached (those samples start cold each visit; counted in ``cache.overflowed``)."""
        if self.cache.overflowed and not self._overflow_warned:
            self._overflow_warned = True
            warnings.warn(f"causal-align: {self.cache.overflowed} warm-start offset(s) exceeded "
                          f"method.cache_dtype={self.params.cache_dtype}'s range (|x* − x| > "
                          f"{torch.finfo(self.cache.dtype).max:g}) and were not cached: those "
                          f"samples start cold; cache_dtype bfloat16 or float32 keeps them",
                          stacklevel=2)

    def implicit_term(self, model: nn.Module, res: CounterfactualResult, region: Tensor,
                      bn_stats: dict | None = None, grad_cap: float | GradCap | None = None
                      ) -> tuple[Tensor, dict[str, float]]:
        """Eq. 3 at the counterfactuals ``res`` with the implicit gradient attached;
        ``bn_stats`` as used to generate them; ``grad_cap`` caps the gradient's norm: a
        number, or a function of (gradient, samples it averages) giving the factor (data-
        parallel `balance`: called exactly once, also when no sample is left)."""
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
            if callable(grad_cap):
                grad_cap((), 0)  # the other ranks' exchange needs this rank too
            if n_ok:  # a frozen model: no gradient for any sample
                stats.update(align=0.0, flip_rate=0.0, cg_converged=0.0, cg_iters=0.0,
                             cg_dropped=1.0)
            else:
                # every search diverged (cf_diverged 1): the shares of all aligned samples
                # are 0 (none flipped, none dropped by CG), but nothing was solved, so there
                # is no L_align, CG convergence or iteration count: their 0s pulled the
                # epoch's means in history.csv down as if CG had failed
                stats.update(flip_rate=0.0, cg_dropped=0.0)
            return x.new_zeros(()), stats
        value = per_sample[ok].mean()
        outer = self._outer_grad(res, x, outside, ok, n_ok)
        grads, more = self._implicit(model, res, outer, ok, params, bn_stats)
        stats.update(align=float(value), **more)
        if callable(grad_cap):
            factor = grad_cap(grads, n_ok)
            grads = tuple(g * factor for g in grads)
            stats["align_grad_scale"] = factor
        elif grad_cap is not None:
            norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
            factor = min(1.0, grad_cap / norm) if norm > 0 else 1.0
            grads = tuple(g * factor for g in grads)
            stats["align_grad_scale"] = factor
        # A parameter the model never uses has an all-zero implicit gradient: leave its .grad
        # None, as CE's backward does (a zero .grad made AdamW's or SGD's weight decay act on
        # it, unlike ERM). A used one gets CE's gradient anyway, to which + 0 changes nothing.
        nonzero = torch.stack([g.ne(0).any() for g in grads]).tolist()
        surrogate = sum((q * g.detach()).sum()
                        for q, g, nz in zip(params, grads, nonzero, strict=True) if nz)
        if not isinstance(surrogate, Tensor):  # every gradient zero (all samples dropped)
            surrogate = value.new_zeros(())
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
        # autocast off, as for the search and CG: under a caller's bf16 autocast the latent
        # decoder (and the smooth space's blur) ran in bfloat16 here, whose rounding of
        # D(u*) − D(u0) swamped the change: the alignment gradient was 69 % off (latent)
        with torch.enable_grad(), no_autocast():
            per = self._per_sample(res.problem.image(u) - x, outside)
            (g,) = torch.autograd.grad(torch.where(ok, per, 0.0).sum() / n_ok, u)
        return g.detach()

    def _auto_cg_iters(self, model: nn.Module, prob: InnerProblem, u_star: Tensor) -> int:
        """`auto_cg_iters` for this model's outputs: soft targets give their count, class
        targets need one forward (no grad), done once per model (the output width of a
        model does not change between steps)."""
        curved = self.params.space == "latent"  # smooth space's blur is linear
        if prob.target.is_floating_point():
            return auto_cg_iters(prob.target[0].numel(), soft=True, curved_map=curved)
        if self._outputs is None or self._outputs[0]() is not model:
            with torch.no_grad():
                self._outputs = (weakref.ref(model), int(prob.terms(u_star)[1].shape[1]))
        return auto_cg_iters(self._outputs[1], soft=False, curved_map=curved)

    def _implicit_gauss_newton(self, prob: InnerProblem, u_star: Tensor, outer: Tensor,
                               ok: Tensor, params: Sequence[Tensor],
                               terms: Callable[[Tensor], Tensor], seen: list[Tensor]
                               ) -> tuple[tuple[Tensor, ...], dict]:
        """`hvp=gauss-newton`: v = (JᵀSJ + α∇²d + δI)⁻¹∇L by Woodbury, then the exact mixed
        product. α∇²d + δ > 0, so the system is positive definite on any classifier and δ is
        never raised; a sample whose solve is not finite is dropped (its v zeroed). Runs
        inside the caller's eval_mode (folded BatchNorm)."""
        _, jac, _, curv = logit_curvature(prob, u_star)
        diag = (prob.curvature(u_star) + self.damping).flatten(1)
        v = lowrank_diag_solve(jac, curv, diag, outer)
        good = torch.isfinite(v).flatten(1).all(1)
        failed = ok & ~good
        v = torch.where(good.view((-1,) + (1,) * (v.dim() - 1)), v, 0.0)
        out = implicit_gradient(terms, u_star, params, outer, hvp="exact", adjoint=v,
                                check_finite=False)
        grads, failed = _finite_or_subset(out.grads, prob, u_star, outer, lambda: v, ok, failed,
                                          params)
        return grads, _solve_stats(prob, seen, ok, good, failed, 0, self.damping, u_star)

    def _count_fallback(self, stats: dict) -> dict:
        """Mark a step solved by the Gauss-Newton fallback; under hvp=finite-difference also
        as `fd_fallback`, since the products asked for were not the ones used (warned)."""
        stats["gn_fallback"] = 1.0
        if self.params.hvp == "finite-difference":
            stats["fd_fallback"] = 1.0
        return stats

    def _implicit(self, model: nn.Module, res: CounterfactualResult, outer: Tensor,
                  ok: Tensor, params: Sequence[Tensor], bn_stats: dict | None
                  ) -> tuple[tuple[Tensor, ...], dict]:
        p = self.params
        prob = res.problem
        u_star = res.u_star.detach()
        shape = (-1,) + (1,) * (u_star.dim() - 1)
        seen: list[Tensor] = []  # logits at x*: the first evaluation is at the solution

        def terms(u: Tensor) -> Tensor:
            t, logits = prob.terms(u)
            if not seen:
                seen.append(logits.detach())
            return t.sum()

        def system(delta: float):
            """(inner objective, point, rhs, kwargs) of the adjoint solve at damping δ: the
            Hessian is taken at `point` (x*, or w = 0 when preconditioned)."""
            if p.precondition:
                m = prob.curvature(u_star) + delta
                s = m.clamp_min(torch.finfo(m.dtype).tiny).rsqrt()

                def inner(w: Tensor) -> Tensor:
                    t = terms(u_star + s * w)
                    return t + 0.5 * delta * (s * w).square().sum() if delta > 0 else t

                point, rhs, damping = torch.zeros_like(u_star), s * outer, 0.0
            else:
                inner, point, rhs, damping = terms, u_star, outer, delta
            # check_finite=False: the generator reset diverged samples to x0 (no extra sync)
            return inner, point, rhs, dict(cg_max_iter=max_iter, cg_tol=p.cg_tol,
                                           damping=damping, hvp=p.hvp, fd_eps=p.fd_eps,
                                           check_finite=False)

        if p.hvp == "gauss-newton":
            with eval_mode(model, fold_bn=True, bn_stats=bn_stats):
                return self._implicit_gauss_newton(prob, u_star, outer, ok, params,
                                                   terms, seen)
        if self.gn_switched:  # CG met negative curvature on gn_switch steps in a row
            with eval_mode(model, fold_bn=True, bn_stats=bn_stats):
                grads, stats = self._implicit_gauss_newton(prob, u_star, outer, ok, params,
                                                           terms, seen)
            # still the fallback's solve, counted as such (no CG ran: cg_iters 0)
            return grads, self._count_fallback(stats)
        with eval_mode(model, fold_bn=True, bn_stats=bn_stats):
            max_iter = p.cg_iters if p.cg_iters > 0 else self._auto_cg_iters(model, prob, u_star)
            delta = self.damping
            inner, point, rhs, kw = system(delta)
            out = implicit_gradient(inner, point, params, rhs, **kw)
            iters = out.cg.iterations
            # Negative curvature: H + δI is not positive definite, so the IFT's solve has no
            # meaning at this δ. Solve the step with the Gauss-Newton system instead, or raise
            # δ (Levenberg-Marquardt style) and solve again. The same Gauss-Newton solve takes
            # a step on which most samples ran out of the auto cap, which assumes a
            # piecewise-linear classifier: on a smooth one (tanh MLP) CG missed it on every
            # step and every sample was dropped, a zero alignment term. A few float32 misses
            # (hier-align's image level: 0-2 % of a step's samples) stay dropped samples, and
            # a cap the user set is kept as asked.
            # Under negative_curvature=damping both raise δ instead: a larger δ also brings
            # the preconditioned system nearer the identity, which the auto cap then solves
            # (tanh MLP: every sample dropped at δ 0.01, 7-8 of 8 converged at 0.1, cosine
            # 0.967 to a tight solve). One host sync for both tests (the hot path).
            def needs_fallback(cg) -> bool:
                return bool(_curved(cg, ok).any()
                            | ((p.cg_iters == 0) & (2 * _unconverged(cg, ok).sum() > ok.sum())))

            if p.negative_curvature == "gauss-newton" and needs_fallback(out.cg):
                self.gn_streak += 1
                self.gn_switched = 0 < p.gn_switch <= self.gn_streak
                grads, stats = self._implicit_gauss_newton(prob, u_star, outer, ok,
                                                           params, terms, seen)
                stats["cg_iters"] = float(iters)
                return grads, self._count_fallback(stats)
            self.gn_streak = 0
            while delta < p.damping_max and needs_fallback(out.cg):
                delta = min(max(10.0 * delta, 1e-3), p.damping_max)
                inner, point, rhs, kw = system(delta)
                out = implicit_gradient(inner, point, params, rhs, **kw)
                iters = iters + out.cg.iterations
            self.damping = delta
            cg = out.cg
            good = cg.converged & ~cg.breakdown & torch.isfinite(cg.solution).flatten(1).all(1)
            failed = ok & ~good
            grads = out.grads
            v = cg.solution
            if bool(failed.any()):
                # Re-solve without the failed samples (their rhs zeroed), warm-started from the
                # others' solutions, so only well-solved samples shape the update.
                keep = (~failed).view(shape)
                rhs2 = torch.where(keep, rhs, torch.zeros_like(rhs))
                x0 = torch.where(keep, cg.solution, torch.zeros_like(rhs))
                out2 = implicit_gradient(inner, point, params, rhs2, cg_x0=x0, **kw)
                good2 = out2.cg.converged & ~out2.cg.breakdown
                iters += out2.cg.iterations
                if bool((good2 | failed).all()):
                    grads, v = out2.grads, out2.cg.solution
                else:  # the re-solve failed too: no alignment gradient this step
                    grads = tuple(torch.zeros_like(q) for q in params)
                    failed = ok
            w = v

            def adjoint() -> Tensor:
                if not p.precondition:
                    return w
                # CG solved for w = S⁻¹(u − u*): the adjoint in u is S·w
                m = prob.curvature(u_star) + delta
                return m.clamp_min(torch.finfo(m.dtype).tiny).rsqrt() * w

            grads, failed = _finite_or_subset(grads, prob, u_star, outer, adjoint, ok, failed,
                                              params)
        stats = _solve_stats(prob, seen, ok, cg.converged, failed, iters, delta, u_star)
        if p.hvp == "finite-difference":
            stats["fd_fallback"] = 0.0
        return grads, stats

