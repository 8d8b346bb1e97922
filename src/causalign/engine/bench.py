"""`causalign bench step`: time one training step of a method and of ERM in one process."""

from __future__ import annotations

import os
import statistics
import time
import warnings

import torch

from ..errors import ConfigError
from ..methods.base import DataInfo, build_method
from ..models import VOLUME_MODELS
from .config import TrainConfig
from .trainer import resolve_device


def synthetic_batch(batch_size: int, size: int, channels: int = 1, num_attributes: int = 6,
                    device: torch.device | str = "cpu", seed: int = 0,
                    depth: int = 1, num_classes: int = 2) -> dict[str, torch.Tensor]:
    """A random batch with square lesion masks, enough to exercise every method's step.
    ``depth`` > 1 gives (C, D, H, W) volumes whose lesion spans the middle half of the
    slices, for the volume models; labels are drawn uniformly from ``num_classes``."""
    g = torch.Generator().manual_seed(seed)
    spatial = (size, size) if depth == 1 else (depth, size, size)
    x = torch.rand(batch_size, channels, *spatial, generator=g)
    mask = torch.zeros(batch_size, 1, *spatial)
    lesion_slices = () if depth == 1 else (slice(depth // 4, depth - depth // 4),)
    for i in range(batch_size):
        c = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
        r = size // 8
        mask[(i, slice(None), *lesion_slices,
              slice(c[0] - r, c[0] + r), slice(c[1] - r, c[1] + r))] = 1.0
    attrs = (torch.rand(batch_size, num_attributes, generator=g) > 0.5).float()
    batch = {
        "image": x, "label": torch.randint(0, num_classes, (batch_size,), generator=g),
        "mask": mask,
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


class _TimedStep:
    """One method's model, optimizer and batch; each call runs one training step and returns
    its seconds, the device synchronised on both sides of the clock."""

    def __init__(self, method_name: str, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                 info: DataInfo, device: torch.device, method_args: dict | None = None):
        self.method_name, self.batch, self.cfg, self.device = method_name, batch, cfg, device
        self.method = build_method(method_name, method_args or {})
        # the same initial weights for every run of a method: a timed and a profiled run (or
        # two configurations) then start from one model, not two random ones
        # (the CPU generator only: models are built on the CPU, and torch.manual_seed would
        # also reseed every CUDA device's, which fork_rng restores only for the bench's own)
        torch.default_generator.manual_seed(cfg.seed)
        self.model = self.method.build_model(cfg, info).to(device)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)

    def __call__(self) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # no training split here: what setup() would fit comes from the batch, meant
                warnings.filterwarnings("ignore", message=r".*setup\(\) was not called")
                out = self.method(self.model, self.batch)
        except ValueError as exc:
            _one_value_per_channel(exc, self.method_name, self.cfg.model, self.batch)
            raise
        self.opt.zero_grad(set_to_none=True)
        out.total.backward()
        self.opt.step()
        synchronize(self.device)
        return time.perf_counter() - t0


def time_steps(method_name: str, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               info: DataInfo, device: torch.device, steps: int, warmup: int,
               method_args: dict | None = None, profile: dict | None = None) -> list[float]:
    """Seconds of each of ``steps`` training steps after ``warmup`` untimed ones. With a
    ``profile`` dict, the timed steps run under torch.profiler and it receives the milliseconds
    per step spent in each of `PROFILED_PARTS` that occurred (host time: on CUDA, kernels
    still queued when a part's host code returns are counted where they are waited for)."""
    step = _TimedStep(method_name, batch, cfg, info, device, method_args)
    for _ in range(warmup):
        step()
    if profile is None:
        return [step() for _ in range(steps)]
    # a CUDA build of torch on a machine without a GPU logs a kineto "ERROR" line
    # (gpuGetDeviceCount) on every profile, though nothing is wrong; 5 = fatal only. Only
    # while profiling: the caller's os.environ (a notebook's, its later subprocesses') kept it.
    ours = "KINETO_LOG_LEVEL" not in os.environ
    if ours:
        os.environ["KINETO_LOG_LEVEL"] = "5"
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            times = [step() for _ in range(steps)]
    finally:
        if ours:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    for event in prof.key_averages():
        if event.key in PROFILED_PARTS:
            profile[event.key.removeprefix("causalign.")] = event.cpu_time_total / 1e3 / steps
    return times


def time_steps_alternated(method_name: str, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                          info: DataInfo, device: torch.device, steps: int, warmup: int,
                          method_args: dict | None = None) -> tuple[list[float], list[float]]:
    """(ERM's, the method's) seconds per step, their steps alternated: ERM, method, ERM, ...
    A load change on a shared machine then falls on both alike, where timing every ERM step
    before every method step put it into the ratio."""
    erm = _TimedStep("erm", batch, cfg, info, device)
    other = _TimedStep(method_name, batch, cfg, info, device, method_args)
    for _ in range(warmup):
        erm()
        other()
    erm_times, other_times = [], []
    for _ in range(steps):
        erm_times.append(erm())
        other_times.append(other())
    return erm_times, other_times


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
               method_args: dict | None = None, profile: bool = False,
               depth: int = 1, classes: int = 2) -> dict:
    """Median seconds per training step for `method` and for ERM, same process and batch,
    their steps alternated.
    ``profile``: time the method's steps once more under torch.profiler and add
    ``profile_ms_per_step``, the milliseconds per step in each named part of the step
    (`PROFILED_PARTS`: counterfactual search, the implicit gradient's first derivative, CG
    and mixed product; the rest is the forward, backward and optimizer step) and
    ``profiled_step_ms`` (that run's mean step, profiler overhead included). ``depth`` > 1
    times (1, depth, size, size) volumes, which the volume models (`multiview`) need.
    ``classes``: the model's outputs and the labels' range (causal-align's search and CG
    budget depend on it)."""
    for name, value, least in (("size", size, 8), ("batch_size", batch_size, 1),
                               ("steps", steps, 1), ("warmup", warmup, 0), ("depth", depth, 1),
                               ("classes", classes, 2)):
        if value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if 1 < depth < 4:  # as `causalign data synth --depth`: multiview's views need 4 slices
        raise ConfigError(f"--depth {depth}: volumes need at least 4 slices (1: 2D images)")
    if (model in VOLUME_MODELS) != (depth > 1):
        raise ConfigError(f"model '{model}' takes volumes: give --depth >= 4" if depth == 1
                          else f"model '{model}' takes 2D images: leave --depth at 1 "
                               f"(volumes are for {', '.join(VOLUME_MODELS)})")
    dev = resolve_device(device)
    cfg = TrainConfig(method=method, model=model)
    shape = (1, size, size) if depth == 1 else (1, depth, size, size)
    info = DataInfo(in_channels=1, num_classes=classes, image_shape=shape,
                    attributes=[f"a{i}" for i in range(6)])
    batch = synthetic_batch(batch_size, size, device=dev, depth=depth, num_classes=classes)
    built = build_method(method, method_args or {})  # validate before timing anything
    check = getattr(built, "check_settings", None)
    if check is not None:
        # the steps skip setup(), and with it the refusal of method.dilate=100 at 64 px:
        # the bench timed an alignment term that was 0
        check(shape)
    # the runs seed torch's generator (`_TimedStep`): the caller's is restored after
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        result = _bench(method, batch, cfg, info, dev, steps, warmup, method_args, profile)
        # the network timed: bagnet and icnn build their own, so "model" (the setting,
        # cnn7) did not say what ran (a meta-device build: no weights allocated)
        with torch.device("meta"):
            timed = built.build_model(cfg, info)
        result["model_class"] = type(timed).__name__
        return result


def _bench(method: str, batch: dict[str, torch.Tensor], cfg: TrainConfig, info: DataInfo,
           dev: torch.device, steps: int, warmup: int, method_args: dict | None,
           profile: bool) -> dict:
    size, depth = batch["image"].shape[-1], (batch["image"].shape[2]
                                             if batch["image"].dim() == 5 else 1)
    if method == "erm":
        erm = other = time_steps("erm", batch, cfg, info, dev, steps, warmup)
    else:
        erm, other = time_steps_alternated(method, batch, cfg, info, dev, steps, warmup,
                                           method_args)
    m, e = statistics.median(other), statistics.median(erm)
    result = {
        "method": method, "seconds_per_step": m, "erm_seconds_per_step": e,
        "ratio_to_erm": m / e, "size": size, "depth": depth, "classes": info.num_classes,
        "batch_size": len(batch["label"]), "steps": steps,
        # the --set settings and warm-up: two results of one method were told apart only by
        # their file names
        "method_args": dict(method_args or {}), "warmup": warmup,
        "model": cfg.model, "device": str(dev), "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    if profile:  # a separate run: the profiler's overhead stays out of the timings above
        parts: dict[str, float] = {}
        profiled = time_steps(method, batch, cfg, info, dev, steps, warmup, method_args,
                              profile=parts)
        result["profile_ms_per_step"] = parts
        result["profiled_step_ms"] = 1e3 * statistics.fmean(profiled)
    return result
