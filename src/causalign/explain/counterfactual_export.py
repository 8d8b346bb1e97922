"""`causalign counterfactual`: x* for a run's predictions, written as files and figures.

Per image: OUT/cf/<id>.npy (x*, float32, the image's shape), OUT/triptychs/<id>.png
(original | x* | signed change, red = increase, blue = decrease, like seed 000 Fig. 9; for
several channels per pixel the channel change of largest magnitude), and
OUT/summary.json (flip rate, mean distance, share of the change inside the annotation, how
many pixels of x* lie outside the images' intensity range, one record per sample). For a
hierarchical X→A→Y model each record also holds the predicted
attributes at x and at x* (â → a*) and which of them flipped, shown under the triptych.
The counterfactual flips the model's *prediction* (y = predicted class): it explains what
the model decided, which is what a reader of the figure asks about.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.format import LesionDataset
from ..errors import CausalignError
from ..io import atomic_save_npy, atomic_write_json, folder_lock, remove_temporaries
from ..models.autoencoder import image_chunks, images_shape
from .counterfactual import CounterfactualGenerator, distance_scale, eval_mode
from .export import OwnedFiles, display_slice, refuse_other_exports

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..methods.base import Method


@dataclass
class CounterfactualSettings:
    """Generator settings for export; a causal-align run lends its α, distance, ε, space,
    target rule, optimiser, polish and smooth σ (`settings_for_run`), not steps or lr."""

    alpha: float = 0.01
    steps: int = 100  # no warm start here, so more steps than a training step uses
    lr: float = 0.01
    distance: str = "l1"
    eps: float = 1e-2
    space: str = "pixel"
    target: str = "other"
    optimizer: str = "adam"
    polish: int = 0  # Gauss-Newton steps after the search (method.newton_polish)
    smooth_sigma: float = 1.0
    # latent space: where its autoencoder came from (`resolve_autoencoder`), for summary.json
    autoencoder: str = ""
    # x* intensity range (lo, hi), see CounterfactualGenerator; None = unbounded (what
    # causal-align trains with). `causalign counterfactual` passes the data's range.
    bounds: tuple[float, float] | None = None


def settings_for_run(method: Method, **overrides: Any) -> CounterfactualSettings:
    """Defaults, then the run's causal-align parameters (a hier-align run: those of its
    image level, Eq. 7), then explicit overrides."""
    known = [f.name for f in fields(CounterfactualSettings)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:  # setattr took a misspelt name (alpah=0.5) as a new attribute, unused
        raise TypeError(f"settings_for_run got unknown setting {unknown[0]!r}; known: "
                        f"{', '.join(known)}")
    s = CounterfactualSettings()
    params = getattr(method, "params", None)
    if getattr(method, "name", "") == "hier-align" and hasattr(params, "pixel_params"):
        # its α₁, distance and ε were ignored: the image's x* used the generic defaults
        params = params.pixel_params()
    if getattr(method, "name", "") in ("causal-align", "hier-align") and params is not None:
        s.alpha, s.distance, s.eps = params.alpha, params.distance, params.eps
        s.space, s.target = params.space, str(params.target)
        s.optimizer, s.polish = params.inner_optimizer, params.newton_polish
        s.smooth_sigma = params.smooth_sigma
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    return s


COUNTERFACTUAL_MANIFEST = ".causalign-counterfactual.json"


def counterfactual_files(dataset: LesionDataset, n: int) -> list[str]:
    """The files an export of the first ``n`` samples writes into OUT."""
    ids = [dataset.records[i].id for i in range(n)]
    return ([f"cf/{i}.npy" for i in ids] + [f"triptychs/{i}.png" for i in ids]
            + ["grid.png", "summary.json"])


def check_counterfactual_folder(out: Path, dataset: LesionDataset, limit: int | None) -> None:
    """Refuse OUT when it holds another export's files this one would overwrite, before any
    work (the check `export_counterfactuals` makes when it starts writing)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    refuse_other_exports(out, COUNTERFACTUAL_MANIFEST, counterfactual_files(dataset, n))


def explainer_options_for_run(run: Path, method: Method, data_path: Path,
                              device: torch.device | str) -> dict[str, Any]:
    """`CounterfactualSaliency` keyword arguments for a run's model: the search
    `causalign counterfactual RUN` runs (`settings_for_run`: a causal-align run's α,
    distance, ε, space, optimiser, polish and smooth σ, with 100 steps at lr 0.01), so that
    `explain`/`evaluate --saliency counterfactual` show the change the run was trained to put
    inside the lesion, not the generic defaults' (α 0.01, l1, pixels). A scaled distance takes
    its per-pixel scale from the run's training split (`run_training_data`); the latent
    space the run's own autoencoder (from checkpoint.pt). x* is unbounded, as in training."""
    s = settings_for_run(method)
    options: dict[str, Any] = {
        "alpha": s.alpha, "steps": s.steps, "lr": s.lr, "distance": s.distance, "eps": s.eps,
        "space": s.space, "optimizer": s.optimizer, "polish": s.polish,
        "smooth_sigma": s.smooth_sigma}
    if s.distance.startswith("scaled"):
        train = LesionDataset(run_training_data(Path(run), data_path), "train")
        options["scale"] = distance_scale(train, s.distance).to(device)
    if s.space == "latent":
        from ..models.autoencoder import autoencoder_from_state

        ae_state = run_autoencoder_state(Path(run))
        if ae_state is None:  # a newly trained one would explain another search space
            raise CausalignError(f"{run}: a space=latent run's counterfactual map needs its "
                                 f"autoencoder, which {Path(run) / 'checkpoint.pt'} does not "
                                 f"hold; use `causalign counterfactual {run} --autoencoder "
                                 f"FILE`")
        options["autoencoder"] = autoencoder_from_state(ae_state, device)
    return options


def run_training_data(run: Path, data_path: Path) -> Path:
    """The dataset whose training split gives the run's per-pixel distance scale: the one
    it trained on (as its search did) while that folder is still there unchanged, else
    ``data_path``. With --data OTHER the other site's training split gave it: the same
    test images' maps then depended on that site (correlation down to 0.73, one image's
    mass in the lesion 0.41 -> 0.33), and a test-only site was refused."""
    from ..engine.trainer import dataset_digest_matches, read_run_config

    try:
        raw = read_run_config(run)
    except CausalignError:  # no readable config.yaml (a bare folder from the API)
        return data_path
    stored, digest = raw.get("data"), raw.get("data_digest")
    if isinstance(stored, str) and stored and Path(stored).is_dir() and (
            not isinstance(digest, str) or dataset_digest_matches(Path(stored), digest)) \
            and _same_image_shape(Path(stored), data_path):
        return Path(stored)
    return data_path


def recorded_training_range(run: Path, data_path: Path) -> tuple[float, float] | None:
    """The training split's (min, max) pixel value that RUN recorded (`data_intensity`), when
    ``data_path`` is still that dataset (its dataset.yaml and manifest.csv digest): what the
    default pixel search reads the whole training split for, its x* bounds (7.9 s to open
    20,000 images of 32 px, for a range taken in 0.19 s). None: read the split."""
    from ..engine.trainer import dataset_digest_matches, read_run_config

    try:
        raw = read_run_config(run)
    except CausalignError:
        return None
    rng, digest = raw.get("data_intensity"), raw.get("data_digest")
    if not (isinstance(rng, list) and len(rng) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in rng)
            and rng[0] <= rng[1] and isinstance(digest, str)
            and dataset_digest_matches(data_path, digest)):
        return None
    return float(rng[0]), float(rng[1])


def _same_image_shape(a: Path, b: Path) -> bool:
    """Whether datasets A and B hold images of one shape. A per-pixel scale is one image's
    shape: the run's 32 px scale refused a 48 px site's search ('distance scale (1, 32, 32)
    must have the shape of one image of x0 (1, 48, 48)'), which --data's own split served."""
    from ..engine.trainer import data_info_from_disk

    try:
        return data_info_from_disk(a).image_shape == data_info_from_disk(b).image_shape
    except CausalignError:  # unreadable here: the caller's reading of B names the problem
        return True


def run_autoencoder_state(run: Path) -> dict | None:
    """The latent autoencoder a causal-align run kept in RUN/checkpoint.pt (None without)."""
    from ..engine.trainer import load_checkpoint

    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        return None
    state = load_checkpoint(ckpt, map_location="cpu")
    return (state.get("method_state") or {}).get("autoencoder")


def data_range(*images: Tensor) -> tuple[float, float]:
    """The images' intensity range for bounding x*: (0, 1) when every value lies there (what
    `to_float_image` gives 8/16-bit PNGs, and synthetic images), else the observed
    (min, max) (float or int16 images, e.g. CT in HU, keep their own values)."""
    vals = [torch.stack(t.detach().float().aminmax()).tolist() for t in images if t.numel()]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(v[0] for v in vals), max(v[1] for v in vals)
    if 0.0 <= lo and hi <= 1.0:
        return 0.0, 1.0
    if not lo < hi:  # one constant value outside [0, 1]: [0, 1] widened to hold it
        return min(float(lo), 0.0), max(float(hi), 1.0)
    return float(lo), float(hi)


def split_range(dataset: LesionDataset, batch_size: int = 256) -> tuple[float, float]:
    """`data_range` of one split, read batch by batch: a split's `.images` is a whole float32
    copy (3.6 GB for CUB's 6000 RGB crops), too much for bounding a report figure."""
    return splits_range(dataset, batch_size=batch_size)


def splits_range(*datasets: LesionDataset, batch_size: int = 256,
                 also: tuple[float, float] | None = None) -> tuple[float, float]:
    """`data_range` of the values of all ``datasets`` together, read batch by batch, and of
    the (min, max) ``also`` (a split's range known without reading it)."""
    lo, hi = also if also is not None else (math.inf, -math.inf)
    for dataset in datasets:
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(dataset)))
            x = dataset.batch(idx)["image"]
            b_lo, b_hi = torch.stack(x.float().aminmax()).tolist()
            lo, hi = min(lo, b_lo), max(hi, b_hi)
    if lo > hi:  # empty splits
        return 0.0, 1.0
    return data_range(torch.tensor([lo, hi]))


def out_of_range(x: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Per sample: how many values of ``x`` (N, ...) lie outside [lo, hi]."""
    lo, hi = bounds
    return ((x < lo) | (x > hi)).flatten(1).sum(1)


def change_in_region(change: Tensor, region: Tensor) -> Tensor:
    """Per-sample share of Σ|x* − x| inside the annotation (NaN when nothing changed). The
    sum runs over channels too, of magnitudes: opposite channel changes (a hue change) add
    up instead of cancelling."""
    a = change.abs()
    # one-channel annotation, C-channel change (RGB, MRI modalities): broadcast it
    inside = (a * (region > 0).to(a.dtype).expand_as(a)).flatten(1).sum(1)
    a = a.flatten(1)
    total = a.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.nan)


def attribute_changes(model: nn.Module, x: Tensor, x_star: Tensor,
                      names: list[str]) -> list[dict] | None:
    """Hierarchical models (``model.attributes(x)`` → attribute logits): per sample the
    predicted attributes â at x and a* at x*, and the attributes whose thresholded value
    changed (e.g. "spiculation 0.91→0.12"). None for flat classifiers."""
    if not callable(getattr(model, "attributes", None)) or not names or len(x) == 0:
        return None
    with torch.no_grad():
        before = model.attributes(x).float().sigmoid().cpu()
        after = model.attributes(x_star).float().sigmoid().cpu()
    out = []
    for b, a in zip(before, after, strict=True):
        changed = [f"{n} {_crossing(float(bv), float(av))}"
                   for n, bv, av in zip(names, b, a, strict=True) if (bv > 0.5) != (av > 0.5)]
        out.append({"attributes_before": {n: float(v) for n, v in zip(names, b, strict=True)},
                    "attributes_after": {n: float(v) for n, v in zip(names, a, strict=True)},
                    "attributes_changed": changed})
    return out


def _crossing(before: float, after: float) -> str:
    """'0.91→0.12'; with more digits when two digits would hide the crossing of 0.5 (a
    change 0.5004 → 0.4996 read '0.50→0.50' under the triptych)."""
    for digits in range(2, 7):
        b, a = f"{before:.{digits}f}", f"{after:.{digits}f}"
        if b != a and (float(b) > 0.5) != (float(a) > 0.5):
            break
    return f"{b}→{a}"


def transition_rates(done: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per "prediction→target" pair (class indices, e.g. "2→0"): how many counterfactuals
    were searched, their flip rate, mean target probability and mean distance. With many
    classes one overall flip rate hides a pair the search cannot reach."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in done:
        groups.setdefault((r["prediction"], r["target"]), []).append(r)
    return {f"{src}→{dst}": {
        "n": len(rs),
        "flip_rate": float(np.mean([r["flipped"] for r in rs])),
        "mean_target_prob": float(np.mean([r["target_prob"] for r in rs])),
        "mean_distance": float(np.mean([r["distance"] for r in rs])),
    } for (src, dst), rs in sorted(groups.items())}


def attribute_change_rates(records: list[dict], names: list[str]) -> dict:
    """Share of counterfactuals in which each attribute's thresholded prediction flipped."""
    rows = [r for r in records if "attributes_changed" in r]
    if not rows:
        return {}
    return {"attribute_change_rate": {
        # "<name> 0.91→0.12": the name is all before the last space (names may hold
        # spaces; split(" ")[0] credited "bill shape"'s changes to "bill", or to none)
        n: float(np.mean([any(c.rsplit(" ", 1)[0] == n for c in r["attributes_changed"])
                          for r in rows])) for n in names}}


AUTOENCODER_SOURCE = "autoencoder.json"  # beside OUT/autoencoder.pt: what it was trained on


def _images_fingerprint(images: Tensor | LesionDataset) -> str:
    """sha256 of the images' shape, dtype and values (a few ms for 1000 64 px images); a
    split hashes as its float32 `.images` would, chunk by chunk."""
    dtype = images.dtype if isinstance(images, Tensor) else torch.float32
    h = hashlib.sha256(f"{images_shape(images)} {str(dtype).removeprefix('torch.')}".encode())
    for x in image_chunks(images):
        h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


def mean_pixel_variance(images: Tensor | LesionDataset) -> float:
    """Per-pixel variance over the images (ddof 1), averaged over pixels: the MSE of
    reconstructing every image by the mean image. Summed in float64, chunk by chunk."""
    total = total_sq = None
    for x in image_chunks(images):
        x = x.double().flatten(1)
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
    n = images_shape(images)[0]
    if total is None or total_sq is None or n < 2:
        return math.nan
    return float(((total_sq - total * total / n) / (n - 1)).clamp_min(0).mean())


def resolve_autoencoder(run: Path | None, train_images: Tensor | LesionDataset,
                        device: torch.device | str,
                        path: Path | None, out: Path,
                        progress: Progress | None = None) -> tuple[nn.Module, str]:
    """(autoencoder, where it came from) for the latent space: --autoencoder FILE if it
    exists; else the one a causal-align run kept in its checkpoint (saved to FILE when
    given); else OUT/autoencoder.pt when an earlier call trained it on these same training
    images; else train one on the training images and save it (to FILE if given, else
    OUT/autoencoder.pt) so the next call reuses it. The second item, for summary.json, names
    the file or says "run checkpoint"."""
    from ..models.autoencoder import (
        autoencoder_from_state,
        check_autoencoder_destination,
        load_autoencoder,
        save_autoencoder,
        train_autoencoder,
    )

    if path is not None and path.exists():
        return _fits(load_autoencoder(path, device), train_images, str(path)), str(path)
    if run is not None:
        ae_state = run_autoencoder_state(run)
        if ae_state is not None:
            ae = _fits(autoencoder_from_state(ae_state, device), train_images,
                       f"{run / 'checkpoint.pt'} (its autoencoder)")
            if path is None:
                return ae, f"run checkpoint ({run / 'checkpoint.pt'})"
            # FILE missing: the run's own (the one its model was trained with) is saved
            # there, as --autoencoder promises; nothing was written before
            save_autoencoder(check_autoencoder_destination(path), ae)
            return ae, f"{path} (saved from the run checkpoint)"
    # Without --autoencoder every call retrained (35 s for 1000 64 px images on one core)
    # and overwrote OUT/autoencoder.pt. It is reused only when its recorded training images
    # are these: one trained for another dataset into the same OUT is not.
    source = out / AUTOENCODER_SOURCE
    if path is None:  # what a SIGKILL while saving them left in OUT (one export at a time)
        remove_temporaries(out, [AUTOENCODER_SOURCE, "autoencoder.pt", "autoencoder.pt.sha256",
                                 "autoencoder.pt.sha256.pending"])
    fingerprint = _images_fingerprint(train_images)
    if path is None and (out / "autoencoder.pt").exists():
        try:
            recorded = json.loads(source.read_text(encoding="utf-8")).get("train_images_sha256")
        except (OSError, ValueError, AttributeError):  # none, or not ours: train anew
            recorded = None
        if recorded == fingerprint:
            return load_autoencoder(out / "autoencoder.pt", device), str(out / "autoencoder.pt")
    if path is None:  # a run killed between the two writes must not vouch for the new file
        source.unlink(missing_ok=True)
    destination = check_autoencoder_destination(path if path is not None
                                                else out / "autoencoder.pt")
    ae = train_autoencoder(train_images, device=device, progress=progress)
    save_autoencoder(destination, ae)
    if path is None:
        atomic_write_json(source, {"train_images_sha256": fingerprint,
                                   "train_images_shape": list(images_shape(train_images))})
    return ae, f"{destination} (trained on the training split)"


def _fits(ae: nn.Module, train_images: Tensor | LesionDataset, where: str) -> nn.Module:
    """``ae`` if it takes the images' channels. An RGB file on grey data failed only inside
    the first search, in words naming no file, after OUT's earlier summary.json was gone."""
    c = ae.config.get("in_channels") if isinstance(getattr(ae, "config", None), dict) else None
    shape = images_shape(train_images)
    if c is not None and len(shape) == 4 and c != shape[1]:
        raise CausalignError(f"{where}: autoencoder takes {c}-channel images; this data has "
                             f"{shape[1]} channel(s) (--autoencoder: give another "
                             f"file, or a new path to train one)")
    return ae


def export_counterfactuals(model: nn.Module, method: Method, dataset: LesionDataset,
                           settings: CounterfactualSettings, out: str | Path, *,
                           limit: int | None = None, device: torch.device | str = "cpu",
                           batch_size: int = 32, train_images: Tensor | LesionDataset | None = None,
                           autoencoder: nn.Module | None = None,
                           progress: Progress | None = None,
                           valid_range: tuple[float, float] | None = None,
                           provenance: dict[str, Any] | None = None) -> dict:
    """Generate and write counterfactuals for the first ``limit`` samples; returns the summary.

    ``train_images`` (a tensor, or the training `LesionDataset`, read chunk by chunk) supply
    the per-pixel scales of a scaled distance; ``autoencoder`` is
    needed for ``settings.space == "latent"``. The summary counts the x* values outside
    ``valid_range`` (default: ``settings.bounds``, else (0, 1), the stored images' range;
    0 when x* is bounded to it). x* and triptychs an earlier export left in OUT
    and this one does not rewrite (fewer samples, or now skipped) are removed (`OwnedFiles`).
    ``provenance`` (which weights, data and machine; `causalign counterfactual` passes them)
    is stored in the summary as given, and ``batch_size`` with it: x* can change in the last
    float32 digits, amplified by the search, with the batch it is solved in.
    """
    # eval for the search and the figures, then every submodule's own mode back
    # one export at a time per folder (`folder_lock`): two into one OUT removed each other's
    # temporaries and x* files (`OwnedFiles`) and crashed or mixed their summaries
    with folder_lock(out, f"causalign counterfactual --out {out}"), eval_mode(model):
        return _export_counterfactuals(model, method, dataset, settings, Path(out), limit,
                                       device, batch_size, train_images, autoencoder,
                                       progress, valid_range, provenance)


def _export_counterfactuals(model: nn.Module, method: Method, dataset: LesionDataset,
                            settings: CounterfactualSettings, out: Path, limit: int | None,
                            device: torch.device | str, batch_size: int,
                            train_images: Tensor | LesionDataset | None,
                            autoencoder: nn.Module | None,
                            progress: Progress | None,
                            valid_range: tuple[float, float] | None = None,
                            provenance: dict[str, Any] | None = None) -> dict:
    from ..report.figures import class_name, counterfactual_grid, counterfactual_triptych

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:  # name the limit: "split 'test' has no samples" misled for limit=0
        raise CausalignError(f"split '{dataset.split}' has no samples to explain"
                             + (f" (limit {limit})" if limit is not None else ""))
    scale = None
    if settings.distance.startswith("scaled"):
        if train_images is None:
            raise CausalignError(f"distance '{settings.distance}' needs the training images")
        scale = distance_scale(train_images, settings.distance).to(device)
    gen = CounterfactualGenerator(model, alpha=settings.alpha, steps=settings.steps,
                                  lr=settings.lr, distance=settings.distance, scale=scale,
                                  eps=settings.eps, space=settings.space,
                                  autoencoder=autoencoder, target_rule=settings.target,
                                  optimizer=settings.optimizer, polish=settings.polish,
                                  smooth_sigma=settings.smooth_sigma, bounds=settings.bounds)
    if valid_range is None:
        valid_range = gen.bounds if gen.bounds is not None else (0.0, 1.0)
    files = OwnedFiles(out, COUNTERFACTUAL_MANIFEST, counterfactual_files(dataset, n))
    (out / "cf").mkdir(parents=True, exist_ok=True)
    (out / "triptychs").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    n_values = 1  # values per image (set from the first x*)
    grid: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    task = progress.add_task("counterfactuals", total=n) if progress else None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        batch = {k: v.to(device) for k, v in dataset.batch(idx).items()}
        x = method.model_input(batch)
        with torch.no_grad():
            logits = model(x)
        finite = torch.isfinite(logits).all(1)
        if not bool(finite.all()):  # argmax of NaN logits read as a prediction of class 0
            bad = dataset.records[int(idx[~finite.cpu()][0])].id
            raise CausalignError(f"the model's outputs are not finite on sample '{bad}' "
                                 f"({int((~finite).sum())} of {len(idx)} in its batch): "
                                 f"NaN/inf weights in the checkpoint, or such input values")
        pred = logits.argmax(1)
        target, valid = gen.targets(x, pred)
        res = gen.generate(x[valid], target=target[valid])
        region = torch.where(batch["has_mask"].view(-1, *[1] * (x.dim() - 1)), batch["mask"],
                             batch["box_mask"])
        share = change_in_region(res.change, region[valid])
        # on the float32 x* as written to cf/<id>.npy
        n_out = out_of_range(res.x_star.float(), valid_range).tolist()
        n_values = res.x_star[0].numel() if len(res.x_star) else n_values
        attrs = attribute_changes(model, x[valid], res.x_star,
                                  list(dataset.meta.attributes))
        j = 0
        for k, i in enumerate(idx.tolist()):
            rec = dataset.records[i]
            entry: dict[str, Any] = {"id": rec.id, "label": int(rec.label),
                                     "prediction": int(pred[k])}
            if not bool(valid[k]):
                entry["skipped"] = "already the target class"
                records.append(entry)
                continue
            xs = res.x_star[j].float().cpu().numpy()
            atomic_save_npy(files.path(f"cf/{rec.id}.npy"), xs.astype(np.float32))
            annotated = bool(batch["has_annotation"][k])
            entry.update(
                target=int(res.target[j]), flipped=bool(res.flipped[j]),
                target_prob=float(res.target_prob[j]), distance=float(res.distance[j]),
                diverged=bool(res.diverged[j]), n_out_of_range=int(n_out[j]),
                **(attrs[j] if attrs is not None else {}),
                change_in_mask=float(share[j]) if annotated and bool(share[j].isfinite())
                else None)
            img = x[k].float().cpu().numpy()
            reg = region[k, 0].float().cpu().numpy() if annotated else None
            where = ""  # which slice a volume's figure shows (the report says it; these
            # figures did not, and a reader could not tell slice 0 from the lesion's)
            if img.ndim == 4:  # volume: the slice with the most annotation (or the middle)
                z = display_slice(reg, img.shape[1])
                img, xs, reg = img[:, z], xs[:, z], (reg[z] if reg is not None else None)
                where = f", slice {z}"  # 0-based, as in the report
            src, dst = class_name(dataset, int(pred[k])), class_name(dataset, int(res.target[j]))
            title = (f"{rec.id}{where}  pred {src} → {dst}  "
                     f"p={float(res.target_prob[j]):.2f}"
                     + ("" if bool(res.flipped[j]) else "  (not flipped)"))
            if attrs is not None and attrs[j]["attributes_changed"]:
                title += "\n" + ", ".join(attrs[j]["attributes_changed"])
            counterfactual_triptych(img, xs, reg, files.path(f"triptychs/{rec.id}.png"), title)
            if len(grid) < 8:  # a row whose search failed says so, as its triptych does
                # (grid.png read "benign→malignant" for an x* that did not flip)
                grid.append((img, xs, reg if reg is not None else np.zeros(img.shape[1:]),
                             f"{rec.id}{where} {src}→{dst}"
                             + ("" if bool(res.flipped[j]) else " (not flipped)")))
            records.append(entry)
            j += 1
        if task is not None:
            progress.advance(task, len(idx))
    if grid:
        counterfactual_grid(np.stack([g[0] for g in grid]), np.stack([g[1] for g in grid]),
                            np.stack([g[2] for g in grid]), files.path("grid.png"),
                            row_titles=[g[3] for g in grid])
    done = [r for r in records if "flipped" in r]
    shares = [r["change_in_mask"] for r in done if r.get("change_in_mask") is not None]
    summary = {
        "split": dataset.split, "n": n, "n_generated": len(done),
        "flip_rate": float(np.mean([r["flipped"] for r in done])) if done else None,
        "mean_target_prob": float(np.mean([r["target_prob"] for r in done])) if done else None,
        "mean_distance": float(np.mean([r["distance"] for r in done])) if done else None,
        "change_in_mask": float(np.mean(shares)) if shares else None,
        "n_diverged": int(sum(r["diverged"] for r in done)),
        # x* values outside the images' range (a bounded search: 0), and their share
        "valid_range": [float(v) for v in valid_range],
        "n_out_of_range": int(sum(r["n_out_of_range"] for r in done)),
        "out_of_range_share": (sum(r["n_out_of_range"] for r in done)
                               / (len(done) * n_values) if done else None),
        **attribute_change_rates(done, list(dataset.meta.attributes)),
        "by_transition": transition_rates(done),
        "settings": asdict(settings), "batch_size": batch_size,
        **({"provenance": dict(provenance)} if provenance is not None else {}),
        "out": str(out), "samples": records,
    }
    files.path("summary.json")
    files.finish()  # before the summary: a summary present means the folder matches it
    atomic_write_json(out / "summary.json", summary)
    return summary
