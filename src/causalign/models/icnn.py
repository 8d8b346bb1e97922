"""Interpretable CNN (Zhang, Wu & Zhu, CVPR 2018): an interpretable conv layer whose filters
are pushed to respond to one object part at one location.

The layer sits on the last conv stage of the 7-layer CNN (n × n maps). For each filter:

* **templates** (Eq. 1 of the paper): one positive template per position μ of the n × n grid,
  T_μ(i, j) = τ · max(1 − β‖(i, j) − μ‖₁ / n, −1), and a negative template T⁻ = −τ
  (τ = 0.5 / n², β = 4); a non-square h × w map (non-square images) has one template per
  position of its own grid, with n = max(h, w) in the fall-off and τ = 0.5 / (h·w);
* **mask** (forward): x_masked = max(x ⊙ T_μ̂, 0) with μ̂ = argmax x, which keeps only the
  activation around the filter's strongest response (we use T_μ̂ / τ so the scale of the
  activations is kept; the positive constant τ does not change which units pass);
* **filter loss** (Eq. 2–3): Loss_f = −MI(X; T) over the feature maps X of the batch, with
  p(x | T) = exp(tr(x·T)) / Z_T (Z_T summed over the batch), priors p(T_μ) = α / n²,
  p(T⁻) = 1 − α, and p(x) = Σ_T p(T) p(x | T). A low loss means each map matches one
  template sharply (one part, one place) and maps of other images match T⁻.

In the multi-category case the paper assigns each filter to one category ĉ; here filter f
belongs to class f mod C and α is the share of ĉ's images in the batch. With
``label_mask=True`` the training-time mask of an image from another category is T⁻ (its
masked output is zero), as in the paper; by default the label-free μ̂ mask is used at train
and test time alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cnn import SevenLayerCNN

TAU_SCALE = 0.5
BETA = 4.0


def part_templates(n: int, beta: float = BETA, device: torch.device | str | None = None,
                   width: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(n·w, n, w) positive templates T_μ / τ = max(1 − β‖(i,j) − μ‖₁ / max(n, w), −1), one
    per position μ of the n × w map (w = ``width``, default n: the paper's n × n maps), in
    ``dtype`` (default: torch's default dtype).

    A non-square map gets templates centred on its own positions only: templates centred
    off the map are no part at any place of it, and they took prior mass α/n² each."""
    w = n if width is None else width
    dtype = dtype or torch.get_default_dtype()
    ii, jj = torch.meshgrid(torch.arange(n, device=device), torch.arange(w, device=device),
                            indexing="ij")
    # computed in ``dtype``: float32 templates cast up afterwards carry float32 rounding
    # (1 − 4/3 and the like) into a float64 loss
    pos = torch.stack([ii.flatten(), jj.flatten()], 1).to(dtype)  # (n·w, 2) = μ
    dist = (ii.flatten()[None].to(dtype) - pos[:, :1]).abs() + \
        (jj.flatten()[None].to(dtype) - pos[:, 1:]).abs()  # (n·w, n·w)
    return (1.0 - beta * dist / max(n, w)).clamp(min=-1.0).view(n * w, n, w)


def template_mask(x: Tensor, beta: float = BETA) -> Tensor:
    """max(x ⊙ T_μ̂ / τ, 0) per filter map, μ̂ = the arg-max position of each map."""
    n, c, h, w = x.shape
    flat = x.flatten(2)
    arg = flat.argmax(2)  # (N, C)
    ai, aj = arg // w, arg % w
    ii = torch.arange(h, device=x.device).view(1, 1, h, 1)
    jj = torch.arange(w, device=x.device).view(1, 1, 1, w)
    dist = (ii - ai[..., None, None]).abs() + (jj - aj[..., None, None]).abs()
    t = (1.0 - beta * dist.to(x.dtype) / max(h, w)).clamp(min=-1.0)
    return (x * t).clamp(min=0.0)


def filter_loss(x: Tensor, alpha: Tensor | float, beta: float = BETA) -> Tensor:
    """Per-filter −MI(X; T) for feature maps x (N, C, n, n) ≥ 0; alpha: scalar or (C,).

    Returns (C,) losses. tr(x·T) = Σ_ij x_ij T_ij."""
    n_img, c, h, w = x.shape
    tau = TAU_SCALE / (h * w)
    t_pos = part_templates(h, beta, device=x.device, width=w, dtype=x.dtype) * tau  # (M, h, w)
    m = t_pos.shape[0]
    flat = x.flatten(2)  # (N, C, P)
    s_pos = torch.einsum("ncp,mp->cmn", flat, t_pos.flatten(1))  # (C, M, N): tr(x·T_μ)
    s_neg = (-tau * flat.sum(2)).t()[:, None]  # (C, 1, N): tr(x·T⁻)
    scores = torch.cat([s_neg, s_pos], 1)  # (C, M+1, N)
    log_px_t = scores.log_softmax(dim=2)  # log p(x_i | T), normalised over the batch
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).clamp(1e-6, 1 - 1e-6)
    alpha = alpha.expand(c) if alpha.dim() == 0 else alpha
    # log M as a Python float: a float32 tensor here rounded it in a float64 loss
    log_prior = torch.cat([torch.log1p(-alpha)[:, None],
                           (torch.log(alpha) - math.log(m))[:, None]
                           .expand(c, m)], 1)  # (C, M+1)
    log_px = torch.logsumexp(log_prior[..., None] + log_px_t, dim=1)  # (C, N)
    mi = (log_prior.exp()[..., None] * log_px_t.exp() * (log_px_t - log_px[:, None])).sum((1, 2))
    return -mi


class InterpretableConv(nn.Module):
    """conv 3×3 → ReLU → template mask; remembers its pre-mask maps for the filter loss."""

    def __init__(self, channels: int, beta: float = BETA) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.beta = beta
        # Pre-mask maps of the last forward, kept only while `record_maps` is on (the ICNN
        # method turns it on around its forward): they carry the autograd graph, which would
        # otherwise stay alive on the module and make it impossible to deepcopy.
        self.record_maps = False
        self.last_maps: Tensor | None = None
        self.negative: Tensor | None = None  # (N, C) bool: mask with T⁻ (train label mask)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.conv(x))
        self.last_maps = a if self.record_maps else None
        out = template_mask(a, self.beta)
        if self.negative is not None and self.training:
            out = out * (~self.negative).to(out.dtype)[..., None, None]
        return out


class ICNN(nn.Module):
    """7-layer CNN with an interpretable conv layer on its last stage, then GAP + linear."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 2, width: int = 16) -> None:
        super().__init__()
        base = SevenLayerCNN(in_channels, num_outputs, width=width)
        self.features = base.features
        self.interpretable = InterpretableConv(4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * width, num_outputs)
        self.num_outputs = num_outputs
        self.register_buffer("filter_class",
                             torch.arange(4 * width) % num_outputs, persistent=False)

    @property
    def cam_layer(self) -> nn.Module:
        return self.interpretable

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.interpretable(self.features(x)))))
