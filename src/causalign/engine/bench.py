"""`causalign bench step`: time one training step of a method and of ERM in one process."""

from __future__ import annotations

import os
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


# the parts of a step that causalign names with torch.profiler.record_function
PROFILED_PARTS = ("causalign.counterfactual.search", "causalign.implicit.first_derivative",
                  "causalign.implicit.cg", "causalign.implicit.mixed_product")


def time_steps(method_name: str, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               info: DataInfo, device: torch.device, steps: int, warmup: int,
               method_args: dict | None = None, profile: dict | None = None) -> list[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` untimed ones. With a
    ``profile`` dict, the timed steps run under torch.profiler and it receives the milliseconds
    per step spent in each of `PROFILED_PARTS` that occurred (host time: on CUDA, kernels
    still queued when a part's host code returns are counted where they are waited for)."""
    method = build_method(method_name, method_args or {})
    model = method.build_model(cfg, info).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    times: list[float] = []
    prof = None
    for i in range(warmup + steps):
        if profile is not None and i == warmup:
            # a CUDA build of torch on a machine without a GPU logs a kineto "ERROR" line
            # (gpuGetDeviceCount) on every profile, though nothing is wrong; 5 = fatal only
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
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
    if prof is not None:
        prof.__exit__(None, None, None)
        for event in prof.key_averages():
            if event.key in PROFILED_PARTS:
                profile[event.key.removeprefix("causalign.")] = \
                    event.cpu_time_total / 1e3 / steps
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
               method_args: dict | None = None, profile: bool = False) -> dict:
    """Median seconds per training step for `method` and for ERM, same process and batch.
    ``profile``: time the method's steps once more under torch.profiler and add
    ``profile_ms_per_step``, the milliseconds per step in each named part of the step
    (`PROFILED_PARTS`: counterfactual search, the implicit gradient's first derivative, CG
    and mixed product; the rest is the forward, backward and optimizer step) and
    ``profiled_step_ms`` (that run's mean step, profiler overhead included)."""
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
    result = {
        "method": method, "seconds_per_step": m, "erm_seconds_per_step": e,
        "ratio_to_erm": m / e, "size": size, "batch_size": batch_size, "steps": steps,
        # the --set settings and warm-up: two results of one method were told apart only by
        # their file names
        "method_args": dict(method_args or {}), "warmup": warmup,
        "model": model, "device": str(dev), "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    if profile:  # a separate run: the profiler's overhead stays out of the timings above
        parts: dict[str, float] = {}
        profiled = time_steps(method, batch, cfg, info, dev, steps, warmup, method_args,
                              profile=parts)
        result["profile_ms_per_step"] = parts
        result["profiled_step_ms"] = 1e3 * statistics.fmean(profiled)
    return result
