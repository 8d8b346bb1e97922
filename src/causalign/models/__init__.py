"""Models: the seed's 7-layer CNN, MLP head, hierarchical wrapper, torchvision backbones."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from ..errors import CausalignError, ConfigError, did_you_mean, unknown_name, wrong_level
from .backbones import BACKBONES, build_backbone
from .bagnet import BagNet
from .cnn import SevenLayerCNN
from .hierarchical import HierarchicalModel
from .mlp import MLPHead
from .multiview import MultiViewCNN

# BagNet-q backbones (local evidence, receptive field q) for any method, not only `bagnet`
BAGNET_MODELS = {"bagnet9": 9, "bagnet13": 13, "bagnet17": 17, "bagnet33": 33}
MODEL_NAMES = ("cnn7", *BACKBONES, *BAGNET_MODELS, "multiview")
VOLUME_MODELS = ("multiview",)  # take (C, D, H, W) volumes; the others take 2D images


# Smallest image height/width each model can classify (measured: below it a pooling or
# valid convolution has no output left). resnet18 has no minimum (adaptive pooling).
MIN_INPUT_SIZE = {"cnn7": 4, "multiview": 4, "vgg11": 32, "inception_v3": 75,
                  **BAGNET_MODELS}


def check_input_size(name: str, image_shape: tuple[int, ...]) -> None:
    """Refuse images too small for model ``name`` (spatial = the last two dims of
    ``image_shape``) with one clear line, instead of a torch error deep in the first step."""
    need = MIN_INPUT_SIZE.get(name, 1)
    spatial = tuple(image_shape[-2:])
    if len(spatial) == 2 and min(spatial) < need:
        raise CausalignError(f"model '{name}' needs images of at least {need}x{need} px; "
                             f"this data has {spatial[0]}x{spatial[1]} (choose another --model "
                             f"or larger images)")


# The multi-view model keeps τ and δ as float32 scalars: outside float32's range a value
# becomes 0 or inf there, and every output NaN (measured: tau=1e-300, delta_init=1e39).
_F32_TINY, _F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _real(value: Any) -> float:
    # `--set model.tau=1e-3` arrives as the string "1e-3" (YAML 1.1 reads only "1.0e-3" as a
    # number), as for method parameters
    if isinstance(value, bool | np.bool_):
        raise ValueError("must be a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("must be a number") from None


def _train_slices(value: Any) -> float | int:
    # < 1: a fraction of the depth; >= 1: a whole number of slices (MultiViewCNN.slices_used
    # truncates a count, so 2.5 would silently train on 2)
    value = _real(value)
    if not 0 < value < math.inf or (value >= 1 and not value.is_integer()):
        raise ValueError("must be a fraction in (0, 1) or a whole number of slices >= 1")
    return int(value) if value >= 1 else value


def _tau(value: Any) -> float:
    value = _real(value)
    if not _F32_TINY <= value <= _F32_MAX:
        raise ValueError(f"must be a number > 0 in float32's range [{_F32_TINY:.3g}, "
                         f"{_F32_MAX:.3g}]")
    return value


def _delta(value: Any) -> float:
    value = _real(value)
    if not abs(value) <= _F32_MAX:  # NaN fails too
        raise ValueError(f"must be a finite number in float32's range (|delta| <= "
                         f"{_F32_MAX:.3g})")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError("must be true or false")
    return bool(value)


def _dim(value: Any) -> int:
    msg = "must be a whole number >= 0 (0: no slice-position embedding)"
    try:
        number = _real(value)
    except ValueError:
        raise ValueError(msg) from None
    if not (number.is_integer() and 0 <= number <= 2**31 - 1):  # NaN/inf are no integers
        raise ValueError(msg)
    return int(number)


# Architecture options a config may set per model (`model_args`, `--set model.<option>=v`),
# each with its parser (normalised value, or ValueError saying what is expected). Models
# not listed take none: their architecture is fixed by the name (and `width`).
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "multiview": {"train_slices": _train_slices, "tau": _tau, "delta_init": _delta,
                  "learn_tau": _flag, "position_dim": _dim},
}


def check_model_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` validated for model ``name`` and normalised (NumPy scalars to Python values,
    a whole-number slice count to int); an unknown option or a bad value is a ConfigError
    naming it."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"model_args must be a mapping of model option names to values, "
                          f"got {args!r} ({type(args).__name__})")
    allowed = MODEL_OPTIONS.get(name, {})
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key not in allowed:
            valid = (f"valid: {', '.join(allowed)}" if allowed
                     else "it takes none")
            raise ConfigError(f"model '{name}' has no option {key!r} in model_args ({valid})"
                              + (wrong_level(key, "model") or did_you_mean(key, allowed, "model.")))
        try:
            out[key] = allowed[key](value)
        except ValueError as exc:
            raise ConfigError(f"model.{key} {exc}, got {value!r}") from None
    return out


def resolved_model_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of model ``name`` with its value: ``args`` over the defaults (so
    `model.tau=0.25`, multiview's default, compares equal to no option at all)."""
    import inspect

    out = check_model_args(name, args)
    if name == "multiview":
        params = inspect.signature(MultiViewCNN.__init__).parameters
        return {k: out.get(k, params[k].default) for k in MODEL_OPTIONS[name]}
    return out


def _check_fixed_width(name: str, width: int) -> None:
    """torchvision backbones have their own fixed channel counts: `width` used to be ignored
    silently (resnet18 had 11.17 M parameters at width 4 and at 64), so a run believed to be
    small was not. Any width but TrainConfig's default is refused. (The config cannot tell
    an explicit `width=16` from the default; 16 is accepted either way.)"""
    from ..engine.config import TrainConfig

    default = TrainConfig.width
    if width != default:
        raise ConfigError(f"model '{name}' has a fixed architecture: width does not apply "
                          f"(got width={width}; leave it at the default {default}, or choose "
                          f"cnn7, a bagnet or multiview to set it)")


def build_model(name: str, in_channels: int, num_outputs: int, width: int = 16,
                image_shape: tuple[int, ...] | None = None,
                options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a classifier by name: 'cnn7' (default), a torchvision backbone, 'bagnet9' …
    'bagnet33' (bag of local features) or 'multiview' (volumes, App. E.3 of seed 002).
    With ``image_shape`` ((C,) H, W or C, D, H, W), images too small for it are refused.
    ``options`` are the model's architecture options (see ``MODEL_OPTIONS``, e.g.
    ``{"train_slices": 10}`` for multiview; a run's ``cfg.model_args``); None = defaults."""
    options = {} if options is None else options
    if name in MODEL_NAMES:
        options = check_model_args(name, options)
    if image_shape is not None and name in MODEL_NAMES:
        check_input_size(name, image_shape)
    if name == "cnn7":
        return SevenLayerCNN(in_channels, num_outputs, width=width)
    if name == "multiview":
        # one position embedding per slice: deeper volumes than the default 512 get a
        # larger table instead of failing on the first batch
        depth = image_shape[1] if image_shape is not None and len(image_shape) == 4 else 0
        return MultiViewCNN(in_channels, num_outputs, width=width, max_slices=max(512, depth),
                            **options)
    if name in BACKBONES:
        _check_fixed_width(name, width)
        return build_backbone(name, in_channels, num_outputs)
    if name in BAGNET_MODELS:
        return BagNet(in_channels, num_outputs, width=width, patch=BAGNET_MODELS[name])
    raise unknown_name("model", name, list(MODEL_NAMES))


def find_cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM uses: `model.cam_layer` if defined, else the last Conv2d."""
    layer = getattr(model, "cam_layer", None)
    if isinstance(layer, nn.Module):
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


__all__ = ["SevenLayerCNN", "MLPHead", "HierarchicalModel", "MultiViewCNN", "build_model",
           "build_backbone", "find_cam_layer", "check_input_size", "MODEL_NAMES",
           "VOLUME_MODELS", "MIN_INPUT_SIZE", "MODEL_OPTIONS", "check_model_args",
           "resolved_model_args"]
