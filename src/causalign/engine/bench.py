"""`causalign bench step`: time one training step of a method and of ERM in one process."""

from __future__ import annotations

import statistics
import time

import torch

from ..errors import ConfigError
from ..methods.base import DataInfo, build_method
from .config import TrainConfig
from .trainer import resolve_device


def synthetic_batch(batch_size: int, size: int, channels: int = 1, num_attributes: int = 6,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch with square lesion masks, enough to exercise every method's step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, channels, size, size, generator=g)
    mask = torch.zeros(batch_size, 1, size, size)
    for i in range(batch_size):
        c = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
        r = size // 8
        mask[i, :, c[0] - r:c[0] + r, c[1] - r:c[1] + r] = 1.0
    attrs = (torch.rand(batch_size, num_attributes, generator=g) > 0.5).float()
    batch = {
        "image": x, "label": torch.randint(0, 2, (batch_size,), generator=g), "mask": mask,
        "has_mask": torch.ones(batch_size, dtype=torch.bool), "box_mask": mask,
        "has_annotation": torch.ones(batch_size, dtype=torch.bool), "attributes": attrs,
        "attr_known": torch.ones(batch_size, num_attributes, dtype=torch.bool),
        "site": torch.zeros(batch_size, dtype=torch.long), "index": torch.arange(batch_size),
    }
    return {k: v.to(device) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op off CUDA). The device itself, not the
    current one: a bare torch.cuda.synchronize() waits for cuda:0, so steps timed on cuda:1
    stopped the clock before their kernels had run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(method_name: str, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               info: DataInfo, device: torch.device, steps: int, warmup: int,
               method_args: dict | None = None) -> list[float]:
    method = build_method(method_name, method_args or {})
    model = method.build_model(cfg, info).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        try:
            out = method(model, batch)
        except ValueError as exc:
            _one_value_per_channel(exc, method_name, cfg.model, batch)
            raise
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _one_value_per_channel(exc: ValueError, method: str, model: str,
                           batch: dict[str, torch.Tensor]) -> None:
    """BatchNorm's train-mode ValueError on a single value per channel (one image whose
    feature map the model has pooled to 1x1: `--model resnet18 --size 16 --batch-size 1`)
    as one line naming the options; it was a traceback. Other ValueErrors pass through."""
    if "Expected more than 1 value per channel" not in str(exc):
        return
    n, size = len(batch["label"]), batch["image"].shape[-1]
    who = (f"method '{method}' fed a sub-batch of one image to the model" if n > 1
           else f"--batch-size {n} at --size {size} leaves one value per channel")
    raise ConfigError(f"{who}, but the BatchNorm layers of model '{model}' need more than one "
                      f"value per channel in training mode; use a larger --batch-size (or "
                      f"--size)") from None


def bench_step(method: str, size: int = 64, batch_size: int = 64, steps: int = 5,
               warmup: int = 2, device: str = "auto", model: str = "cnn7",
               method_args: dict | None = None) -> dict:
    """Median seconds per training step for `method` and for ERM, same process and batch."""
    for name, value, least in (("size", size, 8), ("batch_size", batch_size, 1),
                               ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    dev = resolve_device(device)
    cfg = TrainConfig(method=method, model=model)
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, size, size),
                    attributes=[f"a{i}" for i in range(6)])
    batch = synthetic_batch(batch_size, size, device=dev)
    build_method(method, method_args or {})  # validate before timing anything
    erm = time_steps("erm", batch, cfg, info, dev, steps, warmup)
    other = erm if method == "erm" else time_steps(method, batch, cfg, info, dev, steps, warmup,
                                                   method_args)
    m, e = statistics.median(other), statistics.median(erm)
    return {
        "method": method, "seconds_per_step": m, "erm_seconds_per_step": e,
        "ratio_to_erm": m / e, "size": size, "batch_size": batch_size, "steps": steps,
        "model": model, "device": str(dev), "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
