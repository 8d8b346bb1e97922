"""DIR/report.html: one self-contained page (every image embedded as base64 PNG) for a
benchmark folder — the tables (mean (std), best in bold), runs that failed or were skipped,
a CAM overlay grid method × case (paper 000 Fig. 4), counterfactual triptychs (Fig. 9),
training curves, reliability diagrams and ROC curves per dataset (history.csv,
predictions_test.csv), deletion curves, and a cross-site AUC heat-map when
DIR/cross_site.json exists (written by benchmarks/cross_site.py).

Figures are also kept as PNG files in DIR/figures/.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..data.format import balanced_pick
from ..errors import CausalignError, interrupt_behind
from ..io import atomic_write_text
from .figures import class_name

if TYPE_CHECKING:
    from ..data.format import LesionDataset

CASES = 6
CAM_DATASETS = 3  # CAM grids per page: each costs a model load per method
CF_CASES = 4
CF_PREFERENCE = ("causal-align", "hier-align", "ppi", "erm")
ROC_RESAMPLES = 500  # bootstrap band of a method with one seed (the ROC figure)


def _file_slug(name: str) -> str:
    """A suite's dataset name as a file-name part: a "/" or "../" in it made nested folders
    under DIR/figures/ or wrote outside it (same characters as the runs' folder names)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-.") or "dataset"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(t) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = []
    for row, bold in zip(t.rows, t.bold, strict=True):
        cells = [f"<th>{html.escape(row[0])}</th>"]
        for c, b in zip(row[1:], bold, strict=True):
            cells.append(f"<td><b>{html.escape(c)}</b></td>" if b else
                         f"<td>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in t.notes)
    return (f"<h3>{html.escape(t.title)}</h3><table class='results'><thead><tr>{head}</tr>"
            f"</thead><tbody>{''.join(body)}</tbody></table><ul class='notes'>{notes}</ul>")


def _reference_html(ref: dict | None) -> str:
    if not ref:
        return ""
    cols = ref.get("columns", [])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["", *cols])
    rows = "".join("<tr><th>" + html.escape(str(k)) + "</th>" +
                   "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>"
                   for k, vals in (ref.get("rows") or {}).items())
    return (f"<p class='ref'>Paper's numbers, for reference only "
            f"({html.escape(str(ref.get('source', 'paper')))}):</p>"
            f"<table class='reference'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>"
            f"</table>")


def _finished(results: dict) -> list[dict]:
    return [r for r in results["runs"] if r["status"] == "done"]


def _pick_runs(results: dict, dataset: str) -> dict[str, dict]:
    """One finished run per method label on a dataset: default setting, lowest seed."""
    out: dict[str, dict] = {}
    for r in sorted(_finished(results), key=lambda r: (r["setting"] != "default", r["seed"])):
        if r["dataset"] == dataset and r["label"] not in out:
            out[r["label"]] = r
    return out


def _lesion_slices(region: Tensor) -> Tensor:
    """Per case of a (N, D, H, W) annotation (the mask where a case has one, else its box),
    the slice holding most of it, the middle slice when no slice holds more than another
    (none, or a box spanning every slice: its argmax was always slice 0): where a volume's
    figure panel is cut (`causalign.explain.export.display_slice`)."""
    from ..explain.export import display_slice

    r = region.detach().cpu().numpy()
    return torch.tensor([display_slice(c, r.shape[1]) for c in r], dtype=torch.long)


def _cut(volumes: Tensor, z: Tensor) -> Tensor:
    """(N, C, D, H, W) or (N, D, H, W) → the slice z[i] of each case, (N, C, H, W) or
    (N, H, W)."""
    rows = torch.arange(len(z))
    return volumes[rows, :, z] if volumes.dim() == 5 else volumes[rows, z]


def cam_figure(out: Path, results: dict, dataset: str, path: Path, n: int = CASES) -> bool:
    """Grad-CAM of the predicted class, method × the same test cases (paper 000 Fig. 4).
    Volumes: WBP (Grad-CAM's upsampling is 2D-only, as in evaluation), each case cut at the
    slice with most annotation; a model whose Grad-CAM layer is 1x1 at this image size: WBP,
    its column titled so."""
    from ..engine.trainer import load_run
    from ..explain import get_explainer, saliency_map
    from .figures import cam_grid

    runs = _pick_runs(results, dataset)
    if not runs:
        return False
    # the dataset from the first run that loads: a missing or corrupt first run (the
    # suite's first method) sank the whole grid while any other one was just left out
    data, first_error = None, None
    for r in runs.values():
        try:
            _, _, _, data = load_run(out / r["run_dir"], device="cpu")
            break
        except CausalignError as exc:
            first_error = first_error or exc
    if data is None:
        raise first_error
    test = _figure_split(data)
    volume = len(test.image_shape) == 4
    saliency = "wbp" if volume else "gradcam"
    n = min(n, len(test))
    # cases with a lesion annotation, both classes when possible
    order = [i for i in range(len(test)) if bool(test.has_box_or_mask[i])] or \
        list(range(len(test)))
    idx = torch.tensor(balanced_pick(test.labels, n, order))
    batch = test.batch(idx)
    maps, titles = {}, None
    for label, r in runs.items():
        try:
            _, model, method, _ = load_run(out / r["run_dir"], device="cpu", data=data)
        except CausalignError:
            continue
        x = method.model_input(batch)
        with torch.no_grad():
            pred = model(x).argmax(1)
        explainer = get_explainer(saliency, model)
        if saliency == "gradcam" and explainer.constant_map(x):
            # a 1x1 Grad-CAM layer (resnet18 under 33 px) is refused as a constant map: that
            # column shows WBP, named in its title, rather than the grid failing
            explainer, label = get_explainer("wbp", model), f"{label} (WBP)"
        cam = saliency_map(explainer.attribute(x, target=pred))
        maps[label] = cam.detach().float()
        if titles is None:
            # the sample id: the same cases head the counterfactual figure, whose rows
            # (and this grid's) could not be matched to each other or to a sample
            titles = [f"{test.records[int(i)].id} "
                      f"y={class_name(test, int(batch['label'][k]))}{_split_tag(test)}"
                      for k, i in enumerate(idx)]
    if not maps:
        return False
    images, boxes = batch["image"], batch["box_mask"][:, 0]
    if volume:
        z = _lesion_slices(torch.where(batch["has_mask"].view(-1, 1, 1, 1), batch["mask"][:, 0],
                                       boxes))
        images, boxes = _cut(images, z), _cut(boxes, z)
        maps = {k: _cut(v, z) for k, v in maps.items()}
        titles = [f"{t}, slice {int(k)}" for t, k in zip(titles, z, strict=True)]
    cam_grid(images.numpy(), boxes.numpy(), {k: v.numpy() for k, v in maps.items()}, path,
             row_titles=titles)
    return True


def _figure_split(data: Path) -> LesionDataset:
    """The test split, or val when the dataset has no test split (allowed: training then
    reports val metrics only), so the report still shows the models instead of an error."""
    from ..data.format import LesionDataset
    from ..engine.trainer import _optional_split

    split = _optional_split(data, "test")
    return split if split is not None else LesionDataset(data, "val")


def _split_tag(ds: LesionDataset) -> str:
    return "" if ds.split == "test" else f" ({ds.split})"


def counterfactual_figure(out: Path, results: dict, dataset: str, path: Path,
                          n: int = CF_CASES) -> str | None:
    """Triptychs original | x* | x* − x for the preferred method's run (paper 000 Fig. 9);
    returns the label of the run shown."""
    from ..engine.trainer import load_run
    from ..explain.counterfactual import CounterfactualGenerator
    from ..explain.counterfactual_export import settings_for_run, split_range
    from .figures import counterfactual_grid

    runs = _pick_runs(results, dataset)
    if not runs:
        return None
    # preferred methods first, then the rest in order; a run that does not load (folder
    # gone, checkpoint corrupt) passes to the next instead of sinking the figure
    rank = {m: i for i, m in enumerate(CF_PREFERENCE)}
    candidates = sorted(runs.items(), key=lambda kv: rank.get(kv[1]["method"], len(rank)))
    first_error = None
    for cand, r in candidates:
        try:
            _, model, method, data = load_run(out / r["run_dir"], device="cpu")
        except CausalignError as exc:
            first_error = first_error or exc
            continue
        label = cand
        break
    else:
        raise first_error
    settings = settings_for_run(method)
    if settings.space != "pixel" or settings.distance.startswith("scaled"):
        settings.space, settings.distance = "pixel", "l1"  # no extra training for a figure
    test = _figure_split(data)
    order = [i for i in range(len(test)) if bool(test.has_box_or_mask[i])] or \
        list(range(len(test)))
    idx = torch.tensor(balanced_pick(test.labels, min(n, len(test)), order))
    batch = test.batch(idx)
    x = method.model_input(batch)
    gen = CounterfactualGenerator(model, alpha=settings.alpha, steps=settings.steps,
                                  lr=settings.lr, distance=settings.distance, eps=settings.eps,
                                  target_rule=settings.target,
                                  # as `causalign counterfactual --bounds data`: x* stays a
                                  # valid image (unbounded, 0.5 % of its values fell outside)
                                  bounds=split_range(test))
    with torch.no_grad():
        pred = model(x).argmax(1)
    target, valid = gen.targets(x, pred)
    if not bool(valid.any()):
        return None
    res = gen.generate(x[valid], target=target[valid])
    # the flag viewed to the mask's rank: (N, 1, 1, 1) against a volume's (N, 1, D, H, W)
    # broadcast case 0's flag to every case (box-only cases got their empty mask)
    has_mask = batch["has_mask"].view(-1, *[1] * (batch["mask"].dim() - 1))
    region = torch.where(has_mask, batch["mask"], batch["box_mask"])[valid][:, 0]
    # id and true class as in the CAM grid, then prediction → target: the rows said only
    # "benign→malignant", with nothing to tell which case or what its label was
    ids = [test.records[int(i)].id for i in idx[valid.cpu()]]
    labels = batch["label"][valid.cpu()]
    titles = [f"{sid} y={class_name(test, int(y))}{_split_tag(test)}\n"
              f"{class_name(test, int(p))}→{class_name(test, int(t))}"
              + ("" if bool(f) else " (no flip)")
              for sid, y, p, t, f in zip(ids, labels, pred[valid], res.target, res.flipped,
                                         strict=True)]
    x0, x_star = x[valid], res.x_star
    if x0.dim() == 5:  # a volume: each case cut at the slice with most annotation
        z = _lesion_slices(region)
        x0, x_star, region = _cut(x0, z), _cut(x_star, z), _cut(region, z)
        titles = [f"{t}, slice {int(k)}" for t, k in zip(titles, z, strict=True)]
    counterfactual_grid(x0.numpy(), x_star.numpy(), region.numpy(), path, row_titles=titles)
    return label


def _deletion_saliency(results: dict) -> str:
    """The saliency the deletion curves deleted by, from the runs' test metrics: "Grad-CAM"
    said for every page, while volumes are evaluated with WBP (and a suite may set
    eval_saliency); per dataset where they differ."""
    names = {"gradcam": "Grad-CAM", "wbp": "WBP"}
    per: dict[str, set[str]] = {}
    for r in _finished(results):
        test = (r.get("metrics") or {}).get("test") or {}
        if r.get("setting") == "default" and test.get("deletion"):
            per.setdefault(str(r["dataset"]), set()).add(
                names.get(str(test.get("saliency")), str(test.get("saliency") or "Grad-CAM")))
    kinds = {k for v in per.values() for k in v}
    if len(kinds) <= 1:
        return next(iter(kinds), "Grad-CAM")
    return "salient (" + "; ".join(f"{d}: {', '.join(sorted(v))}"
                                   for d, v in per.items()) + ")"


def curves_figure(out: Path, results: dict, dataset: str, path: Path) -> bool:
    """Training curves of one run per method on ``dataset`` (`_pick_runs`), from their
    history.csv; False when none has rows (runs collected from elsewhere, deleted)."""
    from ..engine.trainer import _stored_history
    from .figures import training_curves

    histories = {label: rows for label, r in _pick_runs(results, dataset).items()
                 if (rows := _stored_history(out / r["run_dir"]))}
    if not histories:
        return False
    training_curves(histories, path, title=dataset)
    return True


def reliability_figure(out: Path, results: dict, dataset: str, path: Path) -> bool:
    """Test-split reliability diagrams of one run per method on ``dataset`` (`_pick_runs`),
    from their predictions_test.csv (no model runs: ~1 s); False when no run has one."""
    from .figures import reliability_diagram

    panels = _test_predictions(out, results, dataset)
    if panels:
        reliability_diagram({k: v[:2] for k, v in panels.items()}, path)
    return bool(panels)


def roc_figure_of(out: Path, results: dict, dataset: str, path: Path) -> bool | str:
    """Test-split ROC curves of every method on ``dataset`` on one axes, from their
    predictions_test.csv; False when no run has one. Two classes: each method's seeds
    (`_seed_runs`) averaged (`roc_seeds_figure`), returned as the note naming each curve's
    band; more classes: each class against the rest of one run per method (`_pick_runs`)."""
    from ..engine.evaluate import Predictions, read_predictions
    from .figures import SEED_BAND, roc_figure, roc_seeds_figure

    read = {label: [(r["seed"], read_predictions(c)) for r in runs
                    if (c := out / r["run_dir"] / "predictions_test.csv").is_file()]
            for label, runs in _seed_runs(results, dataset).items()}
    seeds = {label: [pred for _, pred in preds] for label, preds in read.items() if preds}
    if not seeds:
        return False
    two_class = all(pred.probs.shape[1] == 2 for preds in seeds.values() for pred in preds)

    def has_curve(pred: Predictions) -> bool:
        # two classes: class 1 against the rest; more: some present class against the rest
        return len(np.unique(pred.labels == 1 if two_class else pred.labels)) >= 2

    # a seed whose test split holds one class has no ROC curve: left out and named (one
    # such seed made the whole figure fail for every method)
    one_class = [f"{label} seed {seed}" for label, preds in read.items()
                 for seed, pred in preds if not has_curve(pred)]
    seeds = {label: kept for label, preds in read.items()
             if (kept := [pred for _, pred in preds if has_curve(pred)])}
    if not seeds:
        return False
    left_out = ("not drawn (a test split of one class, no ROC curve)", one_class)
    if not two_class:
        curves = {label: preds[0] for label, preds in seeds.items()}  # the lowest seed
        # the title says whose curves these are: the table beside it gives every seed
        roc_figure({k: (v.probs, v.labels) for k, v in curves.items()}, path,
                   title=f"{dataset}: test split, each method's lowest seed with a curve",
                   class_names={k: v.classes for k, v in curves.items()})
        return f"{left_out[0]}: {', '.join(one_class)}." if one_class else True
    drawn = roc_seeds_figure({k: [(v.probs, v.labels) for v in preds]
                              for k, preds in seeds.items()}, path,
                             title=f"{dataset}: test split", n_boot=ROC_RESAMPLES)
    kinds = {"seeds": [], "bootstrap": []}
    for label, d in drawn.items():
        kinds[d["band"]].append(label)
    # which band each curve has, said under its figure (a reader compares them)
    return "; ".join(
        f"{what}: {', '.join(labels)}" for what, labels in (
            (f"mean of the seeds' curves, band the {SEED_BAND}", kinds["seeds"]),
            (f"one seed, band pointwise bootstrap 95 % ({ROC_RESAMPLES} resamples)",
             kinds["bootstrap"]),
            left_out) if labels) + "."


def _seed_runs(results: dict, dataset: str) -> dict[str, list[dict]]:
    """Per method label, its finished runs on ``dataset`` of the setting `_pick_runs`
    picks (default where there is one), by seed."""
    picked = _pick_runs(results, dataset)
    return {label: sorted((r for r in _finished(results) if r["dataset"] == dataset
                           and r["label"] == label and r["setting"] == p["setting"]),
                          key=lambda r: r["seed"]) for label, p in picked.items()}


def _test_predictions(out: Path, results: dict, dataset: str) -> dict[str, tuple]:
    """label → (probs, labels, classes) of each picked run's predictions_test.csv
    (`_pick_runs`)."""
    from ..engine.evaluate import read_predictions

    found = {}
    for label, r in _pick_runs(results, dataset).items():
        csv_path = out / r["run_dir"] / "predictions_test.csv"
        if csv_path.is_file():
            pred = read_predictions(csv_path)
            found[label] = (pred.probs, pred.labels, pred.classes)
    return found


def deletion_figure(results: dict, path: Path) -> bool:
    """Mean drop of the predicted class's probability after deleting the top-k salient pixels
    (k as a fraction of the image), per method (default setting, mean over seeds)."""
    from ..io import atomic_savefig
    from .figures import _figure, _plain

    curves: dict[tuple[str, str], dict[str, list[float]]] = {}
    saliency: dict[tuple[str, str], str] = {}
    for r in _finished(results):
        if r["setting"] != "default":
            continue
        test = (r.get("metrics") or {}).get("test") or {}
        dele = test.get("deletion") or {}
        for k, v in dele.items():
            if v is not None:
                curves.setdefault((r["dataset"], r["label"]), {}).setdefault(k, []).append(v)
                saliency[(r["dataset"], r["label"])] = str(test.get("saliency") or "gradcam")
    if not curves:
        return False
    # a dataset whose runs deleted by different saliencies (resnet18 under 33 px falls back
    # to WBP next to Grad-CAM runs) names each curve's, as the CAM grid's "(WBP)" column does
    mixed = {d for d, _ in curves
             if len({s for (dd, _), s in saliency.items() if dd == d}) > 1}
    names = {"gradcam": "Grad-CAM", "wbp": "WBP"}
    datasets = sorted({d for d, _ in curves})
    with _figure(1, len(datasets), figsize=(4.6 * len(datasets), 3.4),
                 squeeze=False) as (fig, axes):
        for ax, d in zip(axes[0], datasets, strict=True):
            for (dd, label), pts in sorted(curves.items()):
                if dd != d:
                    continue
                ks = sorted(pts, key=float)
                name = _plain(label)
                if d in mixed:
                    s = saliency[(dd, label)]
                    name += f" ({names.get(s, s)})"
                ax.plot([float(k) for k in ks], [float(np.mean(pts[k])) for k in ks],
                        marker="o", label=name)
            ax.set_xscale("log")
            ax.set_xlabel("fraction of pixels deleted (top-k salient)")
            ax.set_ylabel("drop of predicted-class probability")
            ax.set_title(_plain(d), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=100)
    return True


def _cross_site_matrices(src: Path) -> dict[str, np.ndarray]:
    """{method: square (sites × sites) AUC matrix, NaN where undefined} from a
    cross_site.json; a file that is not one raises a CausalignError naming it (a ragged or
    non-square "auc" used to end `causalign benchmark` with numpy's traceback and no
    report)."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CausalignError(f"{src}: unreadable cross-site results ({exc})") from exc
    if not isinstance(data, dict):
        raise CausalignError(f"{src}: not a cross-site results object "
                             f"(top level is a JSON {type(data).__name__})")
    mats = {}
    for name, v in data.items():
        if not (isinstance(v, dict) and isinstance(v.get("auc"), list)):
            continue  # other keys: settings, sizes, timings
        try:
            # null (a one-class test site, no AUC) → NaN
            m = np.array([[np.nan if c is None else c for c in row] for row in v["auc"]],
                         dtype=float)
        except (TypeError, ValueError) as exc:
            raise CausalignError(f"{src}: '{name}.auc' is not a matrix of numbers ({exc})"
                                 ) from exc
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise CausalignError(f"{src}: '{name}.auc' must be a square train site × test "
                                 f"site matrix, got shape {m.shape}")
        mats[name] = m
    return mats


def cross_site_figure(src: Path, path: Path) -> bool:
    """Heat-maps of a cross_site.json (train site × test site AUC), one per method, on one
    colour scale (from 0.5, lower when an AUC is below it: those were drawn as 0.5);
    undefined cells (null) are grey and marked "–". False when the file holds no AUC
    matrix; CausalignError when it is malformed."""
    from ..io import atomic_savefig
    from .figures import _figure, _plain

    mats = _cross_site_matrices(src)
    if not mats:
        return False
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    vmin = min(0.5, np.floor(float(finite.min()) * 10) / 10) if finite.size else 0.5
    mid = (vmin + 1.0) / 2
    with _figure(1, len(mats), figsize=(3.6 * len(mats), 3.2), squeeze=False) as (fig, axes):
        for ax, (name, m) in zip(axes[0], mats.items(), strict=True):
            im = ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
            ax.set_facecolor("lightgrey")  # NaN cells are transparent
            k = len(m)
            names = [chr(ord("A") + i) for i in range(k)]
            ax.set_xticks(range(k), names)
            ax.set_yticks(range(k), names)
            ax.set_xlabel("test site")
            ax.set_ylabel("train site")
            ax.set_title(_plain(name), fontsize=9)
            for i in range(k):
                for j in range(k):
                    v = m[i, j]
                    ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center",
                            va="center", fontsize=7,
                            color="white" if np.isfinite(v) and v < mid else "black")
            fig.colorbar(im, ax=ax, fraction=0.046, label="AUC")
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=100)
    return True


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:right;font-size:13px}
thead th{background:#eee}tbody th{text-align:left;background:#f7f7f7}
ul.notes{font-size:12px;color:#555}p.ref{font-size:13px;color:#555}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}
.failed{color:#a00}.skipped{color:#a60}
"""


def write_report(out: str | Path, progress: bool = False, cross_site: Path | None = None
                 ) -> Path:
    """Build OUT/report.html from OUT/results.json (and the runs' checkpoints)."""
    from ..engine.benchmark import (
        experiment_table,
        experiments_from_results,
    )

    # what was being handled when the report began: an interrupt behind a figure's error is
    # re-raised, but not one a caller had already handled (errors.interrupt_behind)
    handled = sys.exc_info()[1]
    out = Path(out)
    res_path = out / "results.json"
    if not res_path.exists():
        raise CausalignError(f"{res_path}: missing (run `causalign benchmark` first)")
    if cross_site is not None and not Path(cross_site).is_file():
        # asked for by name: silently leaving the section out hid a mistyped path
        raise CausalignError(f"{cross_site}: cross-site results file not found")
    try:  # a truncated or hand-edited file: one line naming it, not a JSONDecodeError
        results = json.loads(res_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CausalignError(f"{res_path}: not valid JSON ({exc})") from exc
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise CausalignError(f"{res_path}: not a benchmark results file (no list of 'runs')")
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    n = {s: sum(r["status"] == s for r in runs) for s in ("done", "failed", "skipped")}
    parts = [f"<h1>causalign benchmark — {html.escape(results.get('suite', ''))}</h1>",
             f"<p>{html.escape(results.get('description', ''))}</p>",
             f"<p>{n['done']} runs done, {n['failed']} failed, {n['skipped']} skipped; "
             f"generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
             "<h2>Tables</h2>"]
    for e in experiments_from_results(results):
        parts.append(_table_html(experiment_table(e, runs)))
        parts.append(_reference_html(e.reference))
    problems = [r for r in runs if r["status"] != "done"]
    if problems:
        parts.append("<h2>Runs not finished</h2><ul>")
        for r in problems:
            # escaped like every other field: results.json may come from elsewhere, and a
            # status of "x'><script>…" ran in the browser opening report.html
            status = html.escape(str(r["status"]))
            parts.append(f"<li class='{status}'>{html.escape(str(r['key']))}: {status} — "
                         f"{html.escape(str(r.get('error') or r.get('reason')))}</li>")
        parts.append("</ul>")
    shown: set[str] = set()  # figure files the page embeds
    datasets = []
    for r in _finished(results):
        if r["dataset"] not in datasets:
            datasets.append(r["dataset"])
    parts += _clinical_section(out, results, datasets, handled)
    if datasets:
        parts.append("<h2>CAM overlays (Fig. 4)</h2><p>Grad-CAM of the predicted class at "
                     "the last conv layer (WBP on volumes, cut at the slice with most "
                     "annotation, and for a model whose last conv layer is 1x1 at this "
                     "image size, its column marked \"(WBP)\"); the red box is the annotated "
                     "lesion. Rows: test cases, columns: methods (default setting, lowest "
                     "seed).</p>")
    slugs: dict[str, str] = {}  # "a/b" and "a b" both slug to "a-b": keep both grids
    for d in datasets:
        slug = base = _file_slug(d)
        k = 2
        while slug in slugs.values():
            slug, k = f"{base}-{k}", k + 1
        slugs[d] = slug
    for d in datasets[:CAM_DATASETS]:
        p = figs / f"cam_grid_{slugs[d]}.png"
        try:
            if cam_figure(out, results, d, p):
                parts.append(f"<h3>{html.escape(d)}</h3>" + _img(p, f"CAM grid {d}"))
                shown.add(p.name)
        except Exception as exc:  # a figure must not sink the report
            _raise_interrupt_behind(exc, handled)
            parts.append(f"<p class='failed'>CAM grid for {html.escape(d)} failed: "
                         f"{html.escape(str(exc))}</p>")
    if len(datasets) > CAM_DATASETS:  # said, not silently dropped
        rest = ", ".join(html.escape(d) for d in datasets[CAM_DATASETS:])
        parts.append(f"<p>Not drawn (the first {CAM_DATASETS} datasets only): {rest}.</p>")
    if datasets:
        d = datasets[0]
        p = figs / f"counterfactuals_{slugs[d]}.png"
        try:
            label = counterfactual_figure(out, results, d, p)
            if label:
                parts.append(f"<h2>Counterfactuals (Fig. 9)</h2><p>{html.escape(label)} on "
                             f"{html.escape(d)}: original | counterfactual x* (the model's "
                             f"prediction, left of the arrow, moved to the class right of it) "
                             f"| x* − x (red: brighter, blue: darker; "
                             f"black outline: annotation).</p>" + _img(p, "counterfactuals"))
                if len(datasets) > 1:  # said, as for the CAM grids, not silently dropped
                    rest = ", ".join(html.escape(x) for x in datasets[1:])
                    parts.append(f"<p>Not drawn (the first dataset only): {rest}.</p>")
                shown.add(p.name)
        except Exception as exc:
            _raise_interrupt_behind(exc, handled)
            parts.append(f"<p class='failed'>counterfactual figure failed: "
                         f"{html.escape(str(exc))}</p>")
    per_dataset = (
        ("curves", curves_figure, "training curves",
         "<h2>Training curves</h2><p>Per epoch (history.csv): training loss, validation AUC, "
         "accuracy (validation solid, training dashed) and the alignment term where a method "
         "has one; default setting, lowest seed.</p>"),
        ("reliability", reliability_figure, "reliability diagrams",
         "<h2>Calibration</h2><p>Reliability diagrams on the test split "
         "(predictions_test.csv): accuracy per bin of the predicted class's probability (15 "
         "bins, counts above the bars), the diagonal of perfect calibration, ECE in each "
         "title; default setting, lowest seed; <code>causalign compare</code> tests two "
         "runs.</p>"),
        ("roc", roc_figure_of, "ROC curves",
         "<h2>ROC curves</h2><p>Test split (predictions_test.csv), default setting. Two "
         "classes: per method the mean of its seeds' curves (sensitivity averaged at every "
         "0.01 of false-positive rate), shaded between the seeds' lowest and highest curve; "
         "a method with one seed: its curve with the pointwise bootstrap 95 % band; legend: "
         "AUC mean (std) over the seeds. More than two classes: each class against the rest, "
         "lowest seed. <code>causalign compare --roc</code> adds DeLong's test of two "
         "runs.</p>"))
    for prefix, draw, what, heading in per_dataset:
        for d in datasets[:CAM_DATASETS]:
            p = figs / f"{prefix}_{slugs[d]}.png"
            try:
                drawn = draw(out, results, d, p)
            except Exception as exc:  # a figure must not sink the report
                _raise_interrupt_behind(exc, handled)
                parts.append(f"<p class='failed'>{what} for {html.escape(d)} failed: "
                             f"{html.escape(str(exc))}</p>")
                continue
            if drawn:
                if not any(f.startswith(f"{prefix}_") for f in shown):
                    parts.append(heading)
                parts.append(f"<h3>{html.escape(d)}</h3>" + _img(p, f"{what} {d}"))
                if isinstance(drawn, str):  # a figure's own note (the ROC bands' kinds)
                    parts.append(f"<p>{html.escape(drawn)}</p>")
                shown.add(p.name)
    p = figs / "deletion.png"
    if deletion_figure(results, p):
        parts.append("<h2>Deletion curves</h2><p>Faithfulness: mean drop of the predicted "
                     f"class's probability after zeroing the top-k "
                     f"{html.escape(_deletion_saliency(results))} pixels (higher = the "
                     "saliency points at what the model uses); test split, default setting, "
                     # the figures beside it show the lowest seed: this one is averaged
                     "mean over the test images, then the seeds (metrics.json's "
                     "deletion).</p>" + _img(p, "deletion"))
        shown.add(p.name)
    cs = Path(cross_site) if cross_site is not None else out / "cross_site.json"
    p = figs / "cross_site.png"
    if cs.exists():
        try:
            if cross_site_figure(cs, p):
                parts.append("<h2>Cross-site generalisation</h2><p>Test AUC, model trained "
                             "on the row's site and tested on the column's site.</p>"
                             + _img(p, "cross-site"))
                shown.add(p.name)
        except CausalignError as exc:  # a malformed optional input must not sink the page
            parts.append(f"<h2>Cross-site generalisation</h2><p class='failed'>cross-site "
                         f"figure failed: {html.escape(str(exc))}</p>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>causalign report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    atomic_write_text(path, page)
    path.chmod(0o644)  # a page to share: readable like any other output file
    _remove_stale_figures(figs, shown)
    return path


def _clinical_section(out: Path, results: dict, datasets: list[str],
                      handled: BaseException | None) -> list[str]:
    """"Operating points and calibration": per dataset, `report.clinical.clinical_table`
    (from the predictions CSVs only, every dataset: no model runs, ~0.1 s a run)."""
    from .clinical import CLINICAL_CAPTION, CLINICAL_TITLE, caption_html, clinical_table

    if not datasets:
        return []
    # the caption tables.md carries too (report.clinical.clinical_markdown)
    parts = [f"<h2>{CLINICAL_TITLE}</h2><p>{caption_html(CLINICAL_CAPTION)}</p>"]
    for d in datasets:
        try:
            t = clinical_table(out, results, d)
        except Exception as exc:  # a table must not sink the report, as a figure
            _raise_interrupt_behind(exc, handled)
            parts.append(f"<p class='failed'>operating points for {html.escape(d)} failed: "
                         f"{html.escape(str(exc))}</p>")
            continue
        if t is not None:
            parts.append(_table_html(t))
    return parts


_FIGURE_PATTERNS = ("cam_grid_*.png", "counterfactuals_*.png", "curves_*.png",
                    "reliability_*.png", "roc_*.png", "deletion.png", "cross_site.png")


def _raise_interrupt_behind(exc: Exception, handled: BaseException | None) -> None:
    """A Ctrl-C inside a figure whose clean-up then failed (the counterfactual figure runs a
    model search) was written into the page as "figure failed", and the report went on:
    the interrupt is what happened, so raise it."""
    interrupt = interrupt_behind(exc, handled)
    if interrupt is not None:
        raise interrupt from None


def _remove_stale_figures(figs: Path, shown: set[str]) -> None:
    """Delete figures an earlier report wrote that this one does not show (a figure that now
    fails, a dataset or cross_site.json gone), so DIR/figures/ matches report.html. Done
    after the page is written: an interrupted rebuild keeps the old page's figures."""
    for pattern in _FIGURE_PATTERNS:
        for f in figs.glob(pattern):
            if f.name not in shown:
                f.unlink(missing_ok=True)
