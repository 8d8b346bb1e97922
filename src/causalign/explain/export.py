"""Write saliency maps of a run to disk: maps (.npy), overlay PNGs and a summary grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..data.format import LesionDataset
from ..io import atomic_write_json
from .base import get_explainer, saliency_map

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..methods.base import Method


def export_saliency(model: nn.Module, method: Method, dataset: LesionDataset, saliency: str,
                    out: str | Path, limit: int | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 32,
                    progress: Progress | None = None) -> dict:
    """Maps for the predicted class of the first `limit` samples of `dataset`.

    Writes OUT/maps/<id>.npy (float32, image's spatial shape), OUT/overlays/<id>.png
    (image + map + annotation box) and OUT/grid.png (up to 16 cases); returns a summary.
    """
    from ..report.figures import cam_grid, overlay

    out = Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    explainer = get_explainer(saliency, model)
    model.eval()
    images, boxes, maps_all, ids = [], [], [], []
    task = progress.add_task(f"explaining ({saliency})", total=n) if progress else None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        batch = {k: v.to(device) for k, v in dataset.batch(idx).items()}
        x = method.model_input(batch)
        with torch.no_grad():
            pred = model(x).argmax(1)
        maps = saliency_map(explainer.attribute(x, target=pred)).detach().float().cpu()
        for j, i in enumerate(idx.tolist()):
            rec = dataset.records[i]
            m = maps[j].numpy().astype(np.float32)
            np.save(out / "maps" / f"{rec.id}.npy", m)
            img = x[j].detach().cpu().numpy()
            box = batch["box_mask"][j, 0].cpu().numpy()
            if m.ndim == 3:  # volume: show the slice with the most annotation
                z = int(box.reshape(box.shape[0], -1).sum(1).argmax())
                img, m2, box = img[:, z], m[z], box[z]
            else:
                m2 = m
            title = (f"{rec.id} y={rec.label} pred={int(pred[j])}")
            overlay(img, m2, box, out / "overlays" / f"{rec.id}.png", title=title)
            if len(images) < 16:
                images.append(img)
                boxes.append(box)
                maps_all.append(m2)
                ids.append(f"{rec.id} y={rec.label} p={int(pred[j])}")
        if task is not None:
            progress.advance(task, len(idx))
    cam_grid(np.stack(images[:8]), np.stack(boxes[:8]), {saliency: np.stack(maps_all[:8])},
             out / "grid.png", row_titles=ids[:8])
    summary = {"saliency": saliency, "split": dataset.split, "n": n, "out": str(out)}
    atomic_write_json(out / "summary.json", summary)
    return summary
