"""Multi-view CNN for volumes (seed 002, App. E.3, after Su et al.'s multi-view CNN).

Every slice x_i of a (C, D, H, W) volume goes through the same 2D CNN (the seed's 7-layer
CNN's convolutional features and global pooling), giving a feature f_i and per-slice class
probabilities p_i = softmax(FC₁(f_i)) (the paper's sigmoid, for any number of classes). A
six-dimensional embedding e_i of the slice index makes the pooling location-aware:

    a_i = FC₂([f_i, e_i]),    w_i = softmax_i(ReLU(a_i + δ) / τ),    P = Σ_i w_i p_i.

The forward returns log P, so softmax(output) = P and cross-entropy on the output is −log P_y:
the model plugs into every loss, metric and explainer that expects logits.

δ sits inside the ReLU. Written as in the paper, exp((ReLU(a_i) + δ)/τ) / Σ_k exp((ReLU(a_k)
+ δ)/τ), δ is a shift common to every slice and cancels in the softmax, so it could neither
stabilise nor be trained. Inside, a high initial δ keeps the ReLU open for every slice (all
attention logits get gradient early on); as attention logits spread, slices with a_i < −δ are
clipped to a common floor and δ receives gradient. τ is the temperature (small sharpens the
attention): fixed, as in the paper, or trainable with ``learn_tau=True`` (parametrised as
τ = exp(log τ), so it stays positive). In train mode each sample sees a random subset of its
slices (the paper: 10 of 100, to save compute); in eval mode every slice is used.

Inference without gradients (eval mode under ``torch.no_grad``, as in prediction) runs the
volumes through the slice CNN a few at a time, at most ``infer_floats`` first-layer activation
values per chunk: the CNN sees N·D slices at once, so a batch of 256 BraTS volumes
(4×32×128×128) needed ~27 GB. Eval-mode BatchNorm treats slices independently, so the result
is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .cnn import SevenLayerCNN


class MultiViewCNN(nn.Module):
    """Volumes (N, C, D, H, W) → log class probabilities (N, num_outputs)."""

    # First-layer activation values per no-grad inference chunk (256 MB in float32).
    infer_floats: int = 2 ** 26

    def __init__(self, in_channels: int = 1, num_outputs: int = 2, width: int = 16,
                 max_slices: int = 512, position_dim: int = 6, train_slices: float = 0.5,
                 tau: float = 0.25, delta_init: float = 3.0, learn_tau: bool = False) -> None:
        super().__init__()
        if not 0 < train_slices:
            raise ValueError(f"train_slices must be > 0, got {train_slices}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        # Per-slice features and FC₁ reuse the seed's 7-layer CNN (its classifier is FC₁).
        self.slice_cnn = SevenLayerCNN(in_channels, num_outputs, width=width)
        feat = self.slice_cnn.classifier.in_features
        self.position = nn.Embedding(max_slices, position_dim)
        self.attention = nn.Linear(feat + position_dim, 1)  # FC₂
        self.attention_act = nn.ReLU()
        self.delta = nn.Parameter(torch.tensor(float(delta_init)))
        if learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        else:
            self.register_buffer("tau", torch.tensor(float(tau)))
        self.learn_tau = learn_tau
        self.width = width
        self.max_slices = max_slices
        self.train_slices = train_slices
        self.num_outputs = num_outputs
        self.last_attention: Tensor | None = None  # (N, k) weights of the last forward
        self.last_slices: Tensor | None = None  # (N, k) slice indices of the last forward

    def slices_used(self, n: int, depth: int, device: torch.device) -> Tensor:
        """(n, k) slice indices: a random sorted subset per sample in train mode, all in eval.

        `train_slices` < 1 is a fraction of the depth, ≥ 1 a count.
        """
        if self.train_slices < 1:
            k = max(1, math.ceil(self.train_slices * depth))
        else:
            k = min(depth, int(self.train_slices))
        if not self.training or k >= depth:
            return torch.arange(depth, device=device).expand(n, depth)
        order = torch.rand(n, depth, device=device).argsort(dim=1)
        return order[:, :k].sort(dim=1).values

    def temperature(self) -> Tensor:
        """τ (a scalar tensor; differentiable when learned)."""
        return self.log_tau.exp() if self.learn_tau else self.tau

    def attention_weights(self, features: Tensor, slices: Tensor) -> Tensor:
        """w (N, k) from slice features (N, k, F) and slice indices (N, k); rows sum to 1."""
        return self._log_weights(features, slices).exp()

    def _log_weights(self, features: Tensor, slices: Tensor) -> Tensor:
        e = self.position(slices)
        a = self.attention(torch.cat([features, e], dim=-1)).squeeze(-1)
        return F.log_softmax(self.attention_act(a + self.delta) / self.temperature(), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        # InputError (a ValueError): a user's data problem, one line from the CLI
        if x.dim() != 5:
            raise InputError(f"MultiViewCNN takes volumes (N, C, D, H, W), got {tuple(x.shape)}")
        n, c, d, h, w = x.shape
        if d > self.max_slices:
            raise InputError(f"volume has {d} slices; this model embeds at most "
                             f"{self.max_slices} positions")
        # the mode tests first: torch.export traces with gradients on, and `n > per` on a
        # symbolic batch became a guard, a program refusing batches above 4096 (32 px)
        if (not self.training and not torch.is_grad_enabled()
                and n > (per := max(1, self.infer_floats // max(1, d * h * w * self.width)))):
            # Inference: a few volumes at a time bound the CNN's activation memory (and the
            # transposed copy of the input); eval mode uses every slice, no randomness.
            outs, att = [], []
            for chunk in x.split(per):
                outs.append(self._pool(chunk))
                att.append(self.last_attention)
            self.last_attention = torch.cat(att)
            self.last_slices = torch.arange(d, device=x.device).expand(n, d)
            return torch.cat(outs)
        return self._pool(x)

    def _pool(self, x: Tensor) -> Tensor:
        n, c, d, h, w = x.shape
        slices = self.slices_used(n, d, x.device)
        k = slices.shape[1]
        views = x.transpose(1, 2)  # (N, D, C, H, W)
        if k < d:
            views = views[torch.arange(n, device=x.device)[:, None], slices]
        views = views.reshape(n * k, c, h, w)
        cnn = self.slice_cnn
        f = cnn.flatten(cnn.pool(cnn.features(views)))  # (N·k, F)
        slice_logp = F.log_softmax(cnn.classifier(cnn.dropout(f)), dim=-1).view(n, k, -1)
        log_w = self._log_weights(f.view(n, k, -1), slices)
        self.last_attention = log_w.detach().exp()
        self.last_slices = slices.detach()
        # log Σ_i w_i p_i, computed in log space so confident slices cannot underflow.
        return torch.logsumexp(log_w.unsqueeze(-1) + slice_logp, dim=1)
