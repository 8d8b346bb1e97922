"""Write saliency maps of a run to disk: maps (.npy), overlay PNGs and a summary grid."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.format import LesionDataset
from ..errors import CausalignError
from ..io import atomic_save_npy, atomic_write_json, folder_lock, remove_temporaries
from .base import get_explainer, saliency_map
from .counterfactual import eval_mode

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..methods.base import Method


def _relative_inside(name: str) -> bool:
    """Whether ``name`` is a relative path below its folder on POSIX and on Windows."""
    return not any(p.is_absolute() or p.anchor or ".." in p.parts
                   for p in (PurePosixPath(name), PureWindowsPath(name)))


class OwnedFiles:
    """The files one export command writes into OUT, recorded in ``OUT/<manifest>`` so that
    the next run into the same folder removes those it does not write again.

    Without it ``explain --limit 32`` then ``--limit 8`` left 24 stale maps beside a summary
    saying n=8. Only files listed in the manifest are ever removed, so other files in OUT
    (the user's, another command's) are left alone. Before anything is written the manifest
    is widened to every file this run may write, so a run killed midway still leaves no
    file the next run does not know about; the old summary.json is removed at the start
    (a killed run then has no summary describing files it replaced). A folder holding
    another export command's files of the same names (summary.json, grid.png) is refused.
    """

    def __init__(self, out: Path, manifest: str, planned: Iterable[str]) -> None:
        self.out, self.manifest = out, out / manifest
        self.previous = self._read()
        self.planned = set(planned)
        self.written: set[str] = set()
        self._refuse_other_exports()
        out.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        atomic_write_json(self.manifest, sorted(self.previous | self.planned))
        (out / "summary.json").unlink(missing_ok=True)

    def _refuse_other_exports(self) -> None:
        refuse_other_exports(self.out, self.manifest.name, self.planned)

    @staticmethod
    def read_manifest(manifest: Path, out: Path) -> set[str]:
        """The plain relative names inside ``out`` that ``manifest`` lists (none if
        unreadable)."""
        try:
            names = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or not ours to interpret: remove nothing
            return set()
        if not isinstance(names, list):
            return set()
        # only plain relative names inside OUT (an edited manifest must not reach outside),
        # read as Windows paths too (there '..\\victim' and 'C:\\victim' passed the POSIX
        # check), whose folder is OUT's own: through a linked subfolder (OUT/maps -> the
        # user's folder, in an export folder from elsewhere) the clean-up deleted files there
        root = os.path.realpath(out)
        return {n for n in names if isinstance(n, str) and n and _relative_inside(n)
                and _resolves_inside(os.path.realpath((out / n).parent), root)}

    def _remove_temporaries(self) -> None:
        """``.NAME.<random>.tmp`` files that a SIGKILL during an atomic write of one of this
        export's files left (no later write removes them), one listing per folder."""
        by_folder: dict[Path, set[str]] = {}
        for rel in self.previous | self.planned | {self.manifest.name, "summary.json"}:
            path = self.out / rel
            by_folder.setdefault(path.parent, set()).add(path.name)
        for folder, names in by_folder.items():
            remove_temporaries(folder, names)

    def _read(self) -> set[str]:
        return self.read_manifest(self.manifest, self.out)

    def path(self, rel: str) -> Path:
        """OUT/rel, recorded as written by this run."""
        self.written.add(rel)
        return self.out / rel

    def finish(self) -> None:
        """Remove the files of earlier runs (and planned ones) this run did not write."""
        for rel in sorted((self.previous | self.planned) - self.written):
            (self.out / rel).unlink(missing_ok=True)
        atomic_write_json(self.manifest, sorted(self.written))


def refuse_other_exports(out: Path, manifest: str, planned: Iterable[str]) -> None:
    """Another export command's files in OUT that this one (its manifest name, the files it
    plans) would overwrite: `explain` then `counterfactual` into one folder replaced
    explain's summary.json and grid.png and left its maps beside a summary describing
    counterfactuals (and the reverse). Callable before expensive preparation (a latent
    search's autoencoder), which was trained first and then refused."""
    planned = set(planned)
    older = _unlisted_export(Path(out), manifest)
    if older is not None:
        clash = sorted(n for n in planned & {"summary.json", "grid.png"}
                       if (Path(out) / n).exists())
        if clash:
            raise CausalignError(
                f"{out}: holds the output of `causalign {older}` (by an older causalign "
                f"version, without a manifest), whose {' and '.join(clash)} this export "
                f"would overwrite; choose another --out, or remove that output first")
    for other in sorted(Path(out).glob(".causalign-*.json")):
        if other.name == manifest or not other.is_file():
            continue
        clash = sorted(n for n in OwnedFiles.read_manifest(other, Path(out)) & planned
                       if (Path(out) / n).exists())
        if clash:
            command = other.name[len(".causalign-"):-len(".json")]
            raise CausalignError(
                f"{out}: holds the output of `causalign {command}` ({other.name}), "
                f"whose {' and '.join(clash[:3])} this export would overwrite; choose "
                f"another --out, or remove that output first")


# summary.json keys only one export command writes: OUT's files from a version before the
# manifests (2026-12-04) are recognised by them, as explain's then counterfactual's
_SUMMARY_KEYS = {".causalign-explain.json": ("explain", "saliency"),
                 ".causalign-counterfactual.json": ("counterfactual", "flip_rate")}


def _unlisted_export(out: Path, manifest: str) -> str | None:
    """The other export command whose output OUT holds with no manifest (an older version's:
    `explain` then, manifest-less, was overwritten by `counterfactual` without a word, and
    the reverse), by its summary.json; None when there is none or it is this command's."""
    summary = out / "summary.json"
    if (out / manifest).exists() or not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    for name, (command, key) in _SUMMARY_KEYS.items():
        if name != manifest and key in data and not (out / name).exists():
            return command
    return None


def _resolves_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def display_slice(region: np.ndarray | None, depth: int) -> int:
    """Slice of a volume to draw: the one with the most annotation in ``region`` (D, H, W),
    else the middle one. A box spans every slice equally (`LesionDataset._box_batch`), so
    its argmax was always slice 0, usually far from the lesion; pass the mask where there
    is one."""
    if region is None:
        return depth // 2
    per_slice = region.reshape(region.shape[0], -1).sum(1)
    if not per_slice.max() > per_slice.min():  # empty, or the same area on every slice
        return depth // 2
    # the middle of the slices tied at the most: a box with a slice range covers each of its
    # slices equally, and argmax chose the range's first slice, where the lesion is smallest
    best = np.flatnonzero(per_slice == per_slice.max())
    return int(best[(len(best) - 1) // 2])


def export_saliency(model: nn.Module, method: Method, dataset: LesionDataset, saliency: str,
                    out: str | Path, limit: int | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 32,
                    progress: Progress | None = None,
                    explainer_kwargs: dict[str, Any] | None = None,
                    labelled: bool = True, record: dict[str, Any] | None = None,
                    targets: Sequence[int] | np.ndarray | None = None) -> dict:
    """Maps for the predicted class of the first `limit` samples of `dataset`
    (``explainer_kwargs`` go to the explainer, e.g. a run's counterfactual search settings).
    ``labelled=False`` (`causalign predict` on plain files, whose temporary import holds the
    placeholder label 0): no "y=" in the titles and ``label`` None in the summary.
    ``record``: more keys for the summary, before ``samples`` (`causalign explain`: how the
    samples were picked and the provenance, which run, weights and dataset).
    ``targets``: the class each sample's map explains instead (one per sample of `dataset`;
    `causalign predict --threshold`: the called class); the summary's ``samples`` then also
    give it as ``explained``, beside the argmax ``prediction``.

    Writes OUT/maps/<id>.npy (float32, image's spatial shape), OUT/overlays/<id>.png
    (image + map + annotation box) and OUT/grid.png (up to 16 cases); returns the summary
    (also OUT/summary.json), whose ``samples`` give each map's id, label and the predicted
    class it explains. Maps and overlays an earlier export left in OUT and this one does not
    rewrite are removed (`OwnedFiles`); other files in OUT are kept.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:  # before anything in OUT changes; np.stack of no maps failed at the end
        raise CausalignError(f"split '{dataset.split}' has no samples to explain"
                             + (f" (limit {limit})" if limit is not None else ""))
    if targets is not None and len(targets) != len(dataset):
        raise ValueError(f"{len(targets)} targets for {len(dataset)} samples")
    # eval for the maps, then every submodule's own mode back (a caller's training loop)
    # one export at a time per folder: a second one removed the first's temporaries and
    # manifest entries under it (`folder_lock`)
    with folder_lock(out, f"causalign explain --out {out}"), eval_mode(model):
        return _export_saliency(model, method, dataset, saliency, Path(out), n, device,
                                batch_size, progress, explainer_kwargs or {}, labelled,
                                record or {}, targets)


def _export_saliency(model: nn.Module, method: Method, dataset: LesionDataset, saliency: str,
                     out: Path, n: int, device: torch.device | str, batch_size: int,
                     progress: Progress | None, explainer_kwargs: dict[str, Any],
                     labelled: bool = True, record: dict[str, Any] | None = None,
                     targets: Sequence[int] | np.ndarray | None = None) -> dict:
    from ..report.figures import cam_grid, class_name, overlay

    def truth(label: int) -> str:  # the title's true class; none for unlabelled images
        return f" y={class_name(dataset, label)}" if labelled else ""

    explainer = get_explainer(saliency, model, **explainer_kwargs)
    ids_n = [dataset.records[i].id for i in range(n)]
    files = OwnedFiles(out, ".causalign-explain.json",
                       [f"maps/{i}.npy" for i in ids_n] + [f"overlays/{i}.png" for i in ids_n]
                       + ["grid.png", "summary.json"])
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    images, boxes, maps_all, ids = [], [], [], []
    # each map's sample and the class it explains, as counterfactual's summary lists them:
    # checkable against predictions_<split>.csv (before, only the overlays' titles said it)
    samples: list[dict[str, Any]] = []
    volumes = len(dataset.image_shape) == 4
    task = progress.add_task(f"explaining ({saliency})", total=n) if progress else None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        batch = {k: v.to(device) for k, v in dataset.batch(idx).items()}
        x = method.model_input(batch)
        # one pass for prediction and map where the explainer can (Grad-CAM), and one copy
        # to the host per batch rather than three device syncs per sample
        # the given classes' maps (`predict --threshold`'s called class); the logits still
        # give the argmax beside them
        logits, maps = explainer.predict_and_attribute(
            x, None if targets is None
            else torch.as_tensor(np.asarray(targets)[idx.numpy()], device=x.device))
        maps = saliency_map(maps.detach()).float().cpu().numpy()
        preds = logits.argmax(1).cpu().tolist()
        shown = preds if targets is None else [int(targets[i]) for i in idx.tolist()]
        images_np = x.detach().cpu().numpy()
        boxes_np = batch["box_mask"][:, 0].cpu().numpy()
        masks_np = batch["mask"][:, 0].cpu().numpy() if volumes else None
        has_mask = batch["has_mask"].cpu().tolist()
        for j, i in enumerate(idx.tolist()):
            rec = dataset.records[i]
            samples.append({"id": rec.id, "label": int(rec.label) if labelled else None,
                            "prediction": preds[j]})
            if targets is not None:
                samples[-1]["explained"] = shown[j]
            m = maps[j]
            atomic_save_npy(files.path(f"maps/{rec.id}.npy"), m)
            img = images_np[j]
            box = boxes_np[j]
            where = ""  # a volume's figure names the slice it shows
            if m.ndim == 3:  # volume: the slice with the most lesion (mask, else box)
                z = display_slice(masks_np[j] if has_mask[j] else box, m.shape[0])
                img, m2, box = img[:, z], m[z], box[z]
                where = f", slice {z}"  # 0-based, as in the report
            else:
                m2 = m
            # a map of another class than the argmax says whose it is
            other = f" map={class_name(dataset, shown[j])}" if shown[j] != preds[j] else ""
            title = (f"{rec.id}{where}{truth(rec.label)} "
                     f"pred={class_name(dataset, preds[j])}{other}")
            overlay(img, m2, box, files.path(f"overlays/{rec.id}.png"), title=title)
            if len(images) < 16:
                images.append(img)
                boxes.append(box)
                maps_all.append(m2)
                ids.append(f"{rec.id}{where}{truth(rec.label)} "
                           f"p={class_name(dataset, preds[j])}{other}")
        if task is not None:
            progress.advance(task, len(idx))
    cam_grid(np.stack(images[:8]), np.stack(boxes[:8]), {saliency: np.stack(maps_all[:8])},
             files.path("grid.png"), row_titles=ids[:8])
    summary = {"saliency": saliency, "split": dataset.split, "n": n, "out": str(out)}
    settings = {k: v for k, v in explainer_kwargs.items() if isinstance(v, (int, float, str))}
    if settings:  # e.g. the counterfactual search's α and distance: they shape the maps
        summary["explainer_settings"] = settings
    summary.update(record or {})
    summary["samples"] = samples
    files.path("summary.json")
    files.finish()  # before the summary: a summary present means the folder matches it
    atomic_write_json(out / "summary.json", summary)
    return summary
