"""A small convolutional autoencoder for latent-space counterfactuals (seed 000 §3).

The paper searches counterfactuals in an autoencoder's latent space so that x* stays on the
image manifold ("realistic" counterfactuals, its Fig. 9). This one is deliberately small: two
stride-2 convolutions down to a (latent_channels, H/4, W/4) code and two transposed
convolutions back. No BatchNorm, so a batch of codes never mixes samples: the latent inner
problem stays a sum of independent per-sample problems, as the implicit gradient requires.

`train_autoencoder` fits it on training images (MSE); `save_autoencoder` / `load_autoencoder`
store it with its constructor arguments so a file is self-describing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CausalignError
from ..implicit.adjoint import no_autocast

__all__ = ["ConvAutoencoder", "autoencoder_from_state", "autoencoder_state", "load_autoencoder",
           "save_autoencoder", "train_autoencoder"]

_FACTOR = 4  # two stride-2 stages


class ConvAutoencoder(nn.Module):
    """conv s2 → conv s2 → 1×1 to the code; 1×1 → convT s2 → convT s2 → sigmoid.

    Inputs of any H, W are padded up to a multiple of 4 and the output cropped back.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, latent_channels: int = 8) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "width": width,
                       "latent_channels": latent_channels}
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * w, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, in_channels, 4, stride=2, padding=1),
        )

    def encode(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise CausalignError(
                f"the latent-space autoencoder takes 2D images (N,C,H,W), got shape "
                f"{tuple(x.shape)}")
        c = self.config["in_channels"]
        if x.shape[1] != c:  # else a bare conv RuntimeError (e.g. an RGB file on grey data)
            raise CausalignError(f"the autoencoder takes {c}-channel images, got "
                                 f"{x.shape[1]} channel(s) (shape {tuple(x.shape)}); train "
                                 f"one on this data")
        h, w = x.shape[-2:]
        ph, pw = (-h) % _FACTOR, (-w) % _FACTOR
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.encoder(x)

    def decode(self, z: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Image in [0, 1] from a code; ``size`` crops away the padding added by `encode`."""
        out = torch.sigmoid(self.decoder(z))
        if size is not None:
            out = out[..., : size[0], : size[1]]
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), tuple(x.shape[-2:]))


DEFAULT_AE_EPOCHS = 15
# the optimiser steps the default schedule gives at least: what 15 epochs of a 961-1024
# image split take (16 batches of 64). 15 epochs of a 64-image split were 15 steps: its
# MSE (0.0128) was above the mean image's (0.0086), and latent counterfactuals of a
# causal-align run on it flipped 0 of 8 (240 steps: MSE 0.0014, 4 of 8)
MIN_AE_STEPS = 240


class ImageSplit(Protocol):
    """A split that gives float images by index (`LesionDataset`): training reads it batch
    by batch instead of as one float32 tensor (4× a uint8 cache, on top of it)."""

    # read-only, as `LesionDataset.image_shape` (a property): a plain attribute here asks
    # for a settable one, so a type checker refused LesionDataset as an ImageSplit
    @property
    def image_shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def image_batch(self, idx: Tensor) -> Tensor: ...


def images_shape(images: Tensor | ImageSplit) -> tuple[int, ...]:
    """(N, C, *spatial) of a tensor or of a split."""
    return (tuple(images.shape) if isinstance(images, Tensor)
            else (len(images), *images.image_shape))


def image_chunks(images: Tensor | ImageSplit, chunk: int = 256) -> Iterator[Tensor]:
    """The images in order, ``chunk`` at a time: a split as float32 batches (its `.images`
    is a whole float32 copy, 4× a uint8 cache)."""
    n = images_shape(images)[0]
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n))
        yield images[idx] if isinstance(images, Tensor) else images.image_batch(idx)


def _mean_pixel(images: Tensor | ImageSplit) -> Tensor:
    """Mean pixel value, summed in float64 chunk by chunk (as float32): the same for a
    tensor and a split read by batches."""
    total = torch.zeros((), dtype=torch.float64)
    for x in image_chunks(images):
        total += x.sum(dtype=torch.float64)
    return (total / math.prod(images_shape(images))).float()


def train_autoencoder(images: Tensor | ImageSplit, *, epochs: int | None = None,
                      batch_size: int = 64,
                      lr: float = 5e-3, width: int = 16, latent_channels: int = 8,
                      seed: int = 0, device: torch.device | str = "cpu",
                      progress: Any = None) -> ConvAutoencoder:
    """Fit a `ConvAutoencoder` to ``images`` (N, C, H, W) in [0, 1] by mean squared error.
    ``images`` may also be a dataset split (`ImageSplit`, e.g. `LesionDataset`), read a
    batch at a time.

    ``epochs`` None (the default): 15, or more on a small split, so that training takes at
    least ``MIN_AE_STEPS`` optimiser steps; an explicit count is used as given.
    Returns the model in eval mode on ``device``; the final training MSE is stored in
    ``model.train_mse`` so callers can report reconstruction quality.
    """
    shape = images_shape(images)
    if isinstance(images, Tensor):
        take = images.__getitem__
        # the images' floating dtype (float64 for a float64 classifier, whose inner problem
        # encodes its own inputs): a float32 autoencoder fails there on the first conv
        dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    else:
        take, dtype = images.image_batch, torch.float32
    if len(shape) != 4 or shape[0] == 0:
        raise CausalignError(f"autoencoder training needs a non-empty (N,C,H,W) image batch, "
                             f"got shape {shape}")
    if epochs is None:
        per_epoch = math.ceil(len(images) / max(batch_size, 1))
        epochs = max(DEFAULT_AE_EPOCHS, math.ceil(MIN_AE_STEPS / per_epoch))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvAutoencoder(shape[1], width, latent_channels).to(device, dtype)
    # Start the output at the mean intensity (sigmoid⁻¹ of it) instead of 0.5: dark medical
    # crops otherwise spend the first epochs learning the background level.
    mean = _mean_pixel(images).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(float(torch.log(mean / (1 - mean))))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    n = shape[0]
    task = progress.add_task("training autoencoder", total=epochs) if progress else None
    mse = math.nan
    model.train()
    # grad on and autocast off whatever the caller's context: causal-align fits its
    # autoencoder lazily inside the first loss call, which a user loop may make under
    # torch.no_grad() (a validation pass first: "element 0 of tensors does not require
    # grad") or torch.autocast (an autoencoder trained in bfloat16, unlike setup()'s)
    with torch.enable_grad(), no_autocast():
        for _ in range(epochs):
            total: Tensor | float = 0.0
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                x = take(idx).to(device, dtype)
                loss = F.mse_loss(model(x), x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # summed on the device: one host sync per epoch, not one per batch
                total = total + loss.detach().double() * len(idx)
            sched.step()
            mse = float(total) / n
            if task is not None:
                progress.update(task, advance=1)
    model.eval()
    model.requires_grad_(False)  # a fixed generator: only the classifier is trained
    model.train_mse = mse
    return model


def check_autoencoder_destination(path: str | Path) -> Path:
    """Make sure a trained autoencoder can be saved at ``path`` *before* it is trained (35 s
    for 1000 images on one core): the folder is created if missing; a path that is a folder,
    or a folder that cannot be created or written, is refused in one line."""
    p = Path(path)
    if p.is_dir():
        raise CausalignError(f"{p}: is a folder; the autoencoder is saved to a file")
    for parent in p.parents:  # mkdir under a file said "File exists", naming no file
        if parent.exists():
            if not parent.is_dir():
                raise CausalignError(f"{p.parent}: cannot create the folder for the "
                                     f"autoencoder ({parent} is a file, not a folder)")
            break
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CausalignError(f"{p.parent}: cannot create the folder for the autoencoder "
                             f"({exc.strerror or type(exc).__name__})") from None
    if not os.access(p.parent, os.W_OK):
        raise CausalignError(f"{p.parent}: folder is not writable; the trained autoencoder "
                             f"could not be saved there")
    return p


def save_autoencoder(path: str | Path, model: ConvAutoencoder) -> None:
    """Write the autoencoder (config + weights, with a SHA-256 beside it) atomically."""
    from ..io import atomic_torch_save

    atomic_torch_save(path, autoencoder_state(model))


def autoencoder_from_state(data: dict, device: torch.device | str = "cpu") -> ConvAutoencoder:
    """Rebuild an autoencoder from what `save_autoencoder` (or a method state) stores."""
    if not isinstance(data, dict) or data.get("kind") != "causalign-autoencoder":
        raise CausalignError("not a causalign autoencoder file")
    try:
        model = ConvAutoencoder(**data["config"])
        # the stored weights' float dtype: load_state_dict would round a float64
        # autoencoder (fitted on float64 images) into the float32 module it copies into
        state = data["state"]
        dtypes = {v.dtype for v in state.values() if isinstance(v, Tensor)
                  and v.is_floating_point()} if isinstance(state, dict) else set()
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(data["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # a damaged or hand-edited file: one line naming the problem, not a traceback
        what = " ".join(str(exc).split())  # one line, however long torch's message is
        what = what if len(what) <= 160 else what[:157] + "..."
        raise CausalignError(f"damaged autoencoder state ({type(exc).__name__}: "
                             f"{what})") from None
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        # NaN/inf weights (a diverged fit) decode every code to NaN: each counterfactual was
        # reset and skipped, so a latent run trained ERM under its name, with a warning only
        raise CausalignError(f"damaged autoencoder state (non-finite weights in {bad[0]}"
                             + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
    model.train_mse = data.get("train_mse")
    model.to(device).eval().requires_grad_(False)
    return model


def autoencoder_state(model: ConvAutoencoder) -> dict:
    """Self-describing CPU state: what `save_autoencoder` writes and method checkpoints keep."""
    return {"kind": "causalign-autoencoder", "config": model.config,
            "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "train_mse": getattr(model, "train_mse", None)}


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> ConvAutoencoder:
    """Read a file written by `save_autoencoder` (checksum verified)."""
    from ..engine.trainer import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise CausalignError(f"{p}: autoencoder file not found")
    if p.is_dir():
        raise CausalignError(f"{p}: is a folder, not an autoencoder file")
    data = load_checkpoint(p, map_location=device)  # its errors already name the file
    try:
        return autoencoder_from_state(data, device)
    except CausalignError as exc:
        raise CausalignError(f"{p}: {exc}") from None
