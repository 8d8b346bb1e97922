"""Side-by-side saliency maps of every method for the same images (seed 002, Fig. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.format import LesionDataset
from ..engine.evaluate import VOLUME_UNSUPPORTED
from ..explain import explainer_names, get_explainer, saliency_map
from ..explain.base import eval_mode
from ..explain.export import display_slice

if TYPE_CHECKING:
    from ..methods.base import Method


def saliency_names(volumes: bool = False) -> list[str]:
    """Every registered saliency method, WBP first (the paper's), the rest sorted."""
    names = sorted(n for n in explainer_names()
                   if not (volumes and n in VOLUME_UNSUPPORTED))
    return (["wbp"] if "wbp" in names else []) + [n for n in names if n != "wbp"]


def compute_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                 names: Sequence[str],
                 explainer_kwargs: Mapping[str, dict[str, Any]] | None = None
                 ) -> dict[str, np.ndarray]:
    """{name: (N, *spatial) float32 map} of the target class for each saliency method
    (``explainer_kwargs[name]``, where given, go to that explainer)."""
    out = {}
    kwargs = explainer_kwargs or {}
    with eval_mode(model):  # the caller's train/eval flags are restored
        for name in names:
            a = get_explainer(name, model, **kwargs.get(name, {})).attribute(x, target=target)
            out[name] = saliency_map(a).detach().float().cpu().numpy()
    return out


def saliency_comparison(model: nn.Module, method: Method, dataset: LesionDataset, path: str | Path,
                        names: Sequence[str] | None = None, limit: int = 6,
                        device: torch.device | str = "cpu",
                        explainer_kwargs: Mapping[str, dict[str, Any]] | None = None,
                        maps: Mapping[str, np.ndarray] | None = None) -> dict:
    """Write a figure: rows = the first `limit` cases, columns = the input (lesion box in red)
    and each method's map of the predicted class.

    ``maps``: {name: (≥ limit, *spatial) maps} of those cases already computed (`causalign
    explain --saliency all` has just exported them): used instead of computing them again,
    which doubled the command's cost (minutes for the counterfactual map on large models).

    Maps show positive evidence only (negative relevance clipped to 0) and are min–max
    scaled per map, so signed methods (WBP, LRP, input × gradient) and unsigned ones (gradient,
    Grad-CAM) read alike. Volumes show the slice with the most annotation.
    """
    from .figures import cam_grid

    volumes = len(dataset.image_shape) == 4
    names = list(names) if names is not None else saliency_names(volumes)
    n = min(limit, len(dataset))
    batch = {k: v.to(device) for k, v in dataset.batch(torch.arange(n)).items()}
    x = method.model_input(batch)
    with torch.no_grad(), eval_mode(model):
        pred = model(x).argmax(1)
    if maps is None:
        maps = compute_maps(model, x, pred, names, explainer_kwargs)
    else:
        maps = {k: np.asarray(maps[k][:n], dtype=np.float32) for k in names}
    images = x.detach().cpu().numpy()
    boxes = batch["box_mask"][:, 0].cpu().numpy()
    if volumes:
        # the slice with the most lesion: the mask where there is one (a 4-number box spans
        # every slice, and the argmax of such a box was always slice 0), else the box,
        # else the middle slice
        masks = batch["mask"][:, 0].cpu().numpy()
        has_mask = batch["has_mask"].cpu().tolist()
        z = [display_slice(masks[i] if has_mask[i] else boxes[i], boxes.shape[1])
             for i in range(n)]
        images = np.stack([images[i][:, z[i]] for i in range(n)])
        boxes = np.stack([boxes[i][z[i]] for i in range(n)])
        maps = {k: np.stack([v[i][z[i]] for i in range(n)]) for k, v in maps.items()}
    shown = {k: np.clip(v, 0, None) for k, v in maps.items()}
    from .figures import class_name  # dataset.yaml's names: "y=malignant", not "y=2"

    titles = [f"{dataset.records[i].id} y={class_name(dataset, int(batch['label'][i]))} "
              f"p={class_name(dataset, int(pred[i]))}" for i in range(n)]
    cam_grid(images, boxes, shown, path, row_titles=titles)
    return {"figure": str(path), "methods": names, "n": n}
