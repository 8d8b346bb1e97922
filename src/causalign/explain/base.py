"""One explainer interface for every saliency method, shaped like Captum's.

    explainer = get_explainer("gradcam", model)
    maps = explainer.attribute(images, target=labels)   # (N, C or 1, *spatial)

`attribute` returns a map with the input's spatial shape (channel dimension C for pixel
methods, 1 for CAM-style methods). `saliency_map` reduces it to (N, *spatial) for metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError, unknown_name

_EXPLAINERS: dict[str, Callable[..., Explainer]] = {}


class Explainer:
    """Base class: `Explainer(model).attribute(inputs, target=...)`."""

    name: str = "base"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def attribute(
        self, inputs: Tensor, target: Tensor | int | None = None, create_graph: bool = False
    ) -> Tensor:
        raise NotImplementedError

    def _target(self, inputs: Tensor, target: Tensor | int | None) -> Tensor:
        """Resolve `target`: None means the predicted class."""
        if target is None:
            with torch.no_grad():
                return self.model(inputs).argmax(dim=1)
        if isinstance(target, int):
            return torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
        return target.to(inputs.device).long().reshape(-1).expand(inputs.shape[0])


def check_inputs(inputs: Tensor, target: Tensor | int | None = None) -> None:
    """Fail with one clear line on inputs no saliency method can explain.

    `inputs` must be a floating-point batch (N, C, *spatial) of finite values (a NaN pixel
    turns Grad-CAM and WBP maps into NaN without an error); a tensor `target` needs one
    non-negative class per input (or one for all)."""
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        kind = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise InputError(f"inputs must be a floating-point tensor (N, C, *spatial), got {kind}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InputError(f"inputs must be a non-empty batch (N, C, *spatial), got shape "
                         f"{tuple(inputs.shape)}")
    counts = [(~torch.isfinite(inputs.detach())).sum()]
    if isinstance(target, Tensor):
        if target.dim() > 1 or target.numel() not in (1, inputs.shape[0]):
            raise InputError(f"target must hold one class per input ({inputs.shape[0]}), got "
                             f"shape {tuple(target.shape)}")
        if target.is_floating_point():
            raise InputError("target must hold non-negative integer class indices")
        counts.append((target < 0).sum().to(counts[0].device))
    # One device sync for both counts: attribute() runs inside training steps (PPI).
    n_bad, n_negative = (torch.stack(counts).tolist() + [0])[:2]
    if n_bad:
        raise InputError(f"inputs hold {n_bad} NaN/inf value(s); a saliency map of a "
                         f"non-finite image is undefined")
    if n_negative:
        raise InputError("target must hold non-negative integer class indices")
    if isinstance(target, int) and target < 0:
        raise InputError(f"target class must be >= 0, got {target}")


def register_explainer(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    def deco(cls: type[Explainer]) -> type[Explainer]:
        cls.name = name
        _EXPLAINERS[name] = cls
        return cls

    return deco


def explainer_names() -> list[str]:
    _load_builtin()
    return sorted(_EXPLAINERS)


def get_explainer(name: str, model: nn.Module, **kwargs) -> Explainer:
    """Build the explainer called `name` for `model` (unknown names list the valid ones)."""
    _load_builtin()
    if name not in _EXPLAINERS:
        raise unknown_name("saliency method", name, list(_EXPLAINERS))
    return _EXPLAINERS[name](model, **kwargs)


def saliency_map(attribution: Tensor) -> Tensor:
    """Reduce an attribution (N, C, *spatial) to a map (N, *spatial) by summing channels."""
    return attribution.sum(dim=1)


def _load_builtin() -> None:
    # Import modules that register explainers; optional ones may be absent while in progress.
    import importlib

    for mod in ("gradient", "gradcam", "wbp", "lrp"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise
