"""Sanity checks for saliency maps (Adebayo et al. 2018): do the maps depend on the model?

    python benchmarks/saliency_sanity.py RUN [--label-run RUN2] [--n 32] [--split test]
        [--mode cascading|independent|both] [--methods all] [--seed 0]
        [--out benchmarks/results/saliency_sanity.json]

Cascading model-parameter randomisation: the trained model of RUN is explained, then its
weight layers are re-initialised from the logits down, one more at each step (a conv and the
BatchNorm after it count as one layer and are reset together, running statistics included;
a norm layer not after one, e.g. a pre-activation BatchNorm, is a step of its own; the
module's own ``reset_parameters``, seeded), until every layer is random. At each step
every registered explainer (`causalign.explain.explainer_names()`) maps the first ``--n``
images of the split for the class the *trained* model predicts, and the maps are compared
with the trained model's, image by image: Spearman rank correlation of |map| and of the
signed map (channels summed) and SSIM of the |map|s (each scaled to [0, 1]; 7×7 window as
scikit-image's default); ``rank_input`` is the rank correlation of |map| with the image
itself. Means over the images are reported; a map that is constant (no rank order, e.g. an
all-zero Grad-CAM) does not enter the correlations and is counted.

A method whose maps stay close to the trained model's (rank correlation > ``--threshold``,
default 0.8) after every layer is random does not explain the model: its map comes mostly
from the input. Adebayo et al. found this for guided backprop and guided Grad-CAM; input ×
gradient keeps some correlation with the trained map through its input factor.

Independent randomisation (``--mode independent`` or ``both``): step i re-initialises layer
i alone (same layers, order and random weights as cascading step i), every other layer
trained, and the layer is put back before the next step. Written under ``"independent"`` in
the JSON (cascading stays at the top level), with ``"insensitive"``: per method, the layers
whose randomisation alone leaves ρ(|map|) above ``--threshold`` (the map does not show them).

Data randomisation: ``--write-permuted DIR`` writes a copy of RUN's dataset whose training
and validation labels are permuted (test split unchanged) and exits; train a run on it with
RUN's settings and pass it as ``--label-run``: its maps (for the class RUN predicts) are
compared with RUN's in the same way.

Writes the JSON to --out and, beside it, ``<stem>_maps.png`` (rows: methods; columns: the
randomisation steps; one test image, |map| scaled per cell) and ``<stem>_curves.png`` (mean
rank correlation of |map| against the number of randomised layers); independent
randomisation's are ``<stem>_independent_maps.png`` and ``<stem>_independent_curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from causalign.data.format import MANIFEST, LesionDataset
from causalign.engine.evaluate import VOLUME_UNSUPPORTED
from causalign.engine.progress import progress_bar
from causalign.engine.trainer import load_run
from causalign.errors import CausalignError, InputError, unknown_name
from causalign.explain import explainer_names, get_explainer, saliency_map
from causalign.io import atomic_savefig, atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from _reuse import one_line_errors  # noqa: E402

# explainers that cost a search per image, not a backward pass: fewer steps here keep the
# check's cost near the others' while the map is still the search's change
COUNTERFACTUAL_KWARGS = {"steps": 50}
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm,)


# ------------------------------------------------------------------------------- layers


def cascade_layers(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) of `model`'s weight layers from the logits down: each conv or linear
    layer together with a BatchNorm that directly follows it in module order (reset with it:
    its running statistics belong to the old weights). Any other leaf with parameters or
    buffers that can be re-initialised (a BatchNorm before its conv, as in pre-activation
    blocks, or leading the network) is a layer of its own: else it stayed trained through
    "every layer random"."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layers: list[tuple[str, list[nn.Module]]] = []
    taken: set[int] = set()
    for i, (name, m) in enumerate(leaves):
        if id(m) in taken:
            continue
        if isinstance(m, _WEIGHTED):
            group = [m]
            if i + 1 < len(leaves) and isinstance(leaves[i + 1][1], _NORMS):
                group.append(leaves[i + 1][1])
        elif hasattr(m, "reset_parameters") and (
                list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
            group = [m]
        else:
            continue
        taken.update(id(g) for g in group)
        layers.append((name, group))
    return layers[::-1]


def randomise(modules: list[nn.Module], seed: int) -> None:
    """Re-initialise `modules` as at construction (``reset_parameters``), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in modules:
            m.reset_parameters()


# ------------------------------------------------------------------------------ metrics


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair (ties ranked by their mean); NaN where a row is
    constant (no rank order to compare)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _unit(m: Tensor) -> Tensor:
    """Each map scaled to [0, 1] (a constant map becomes 0)."""
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)


def ssim(a: Tensor, b: Tensor, win: int = 7) -> Tensor:
    """SSIM (Wang et al. 2004) of each pair of 2D maps (N, H, W) with data range 1, as
    scikit-image's default: a uniform win×win window, sample covariances, the mean over the
    windows that fit in the image."""
    a, b = a[:, None].double(), b[:, None].double()
    win = min(win, a.shape[-1], a.shape[-2])
    pool = lambda t: torch.nn.functional.avg_pool2d(t, win, stride=1)  # noqa: E731
    n = win * win
    cov = n / (n - 1) if n > 1 else 1.0
    ma, mb = pool(a), pool(b)
    va, vb = cov * (pool(a * a) - ma * ma), cov * (pool(b * b) - mb * mb)
    vab = cov * (pool(a * b) - ma * mb)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.flatten(1).mean(1).float()


def compare(ref: Tensor, maps: Tensor) -> dict[str, float | int | None]:
    """Mean similarities of `maps` to `ref` (both (N, *spatial), signed) over the images."""
    def mean(v: np.ndarray) -> float | None:
        v = v[np.isfinite(v)]
        return float(v.mean()) if len(v) else None

    ra, rm = ref.flatten(1).double().numpy(), maps.flatten(1).double().numpy()
    abs_rho = _spearman_rows(np.abs(ra), np.abs(rm))
    signed_rho = _spearman_rows(ra, rm)
    s = ssim(_unit(ref.abs()).reshape(-1, *ref.shape[-2:]),
             _unit(maps.abs()).reshape(-1, *maps.shape[-2:]))
    return {"rank_abs": mean(abs_rho), "rank_signed": mean(signed_rho),
            "ssim": float(s.mean()),
            "constant_maps": int(np.isnan(_spearman_rows(rm, rm)).sum())}


# ------------------------------------------------------------------------------ the check


def explain_all(model: nn.Module, x: Tensor, target: Tensor, names: list[str],
                make: Callable[[str, nn.Module], object] | None = None) -> dict[str, Tensor]:
    """{method: (N, *spatial) signed map} of `model` for `target`. Explainers are built anew
    for the model given (`make`, default `get_explainer`), so none reuses another model's."""
    make = make or (lambda name, m: get_explainer(
        name, m, **(COUNTERFACTUAL_KWARGS if name == "counterfactual" else {})))
    out = {}
    for name in names:
        torch.manual_seed(0)  # a search with random parts draws alike at every step
        out[name] = saliency_map(make(name, model).attribute(x, target=target)).detach()
    return out


MODES = ("cascading", "independent")


def cascading_randomisation(model: nn.Module, x: Tensor, target: Tensor, names: list[str],
                            seed: int = 0, progress=None,
                            make: Callable[[str, nn.Module], object] | None = None) -> dict:
    """Maps of `model` (left unchanged) and of a copy randomised one more layer a step,
    compared with the trained maps: {"layers": [...], "steps": {method: [metrics, ...]},
    "examples": {method: [map of image 0, ...]}, "reference": {method: trained maps}}
    (step 0 = the trained model)."""
    return layer_randomisation(model, x, target, names, "cascading", seed, progress, make)


def independent_randomisation(model: nn.Module, x: Tensor, target: Tensor, names: list[str],
                              seed: int = 0, progress=None,
                              make: Callable[[str, nn.Module], object] | None = None) -> dict:
    """As `cascading_randomisation`, but step i randomises layer i *alone* (every other
    layer trained; Adebayo et al.'s independent randomisation), with the same random
    weights as cascading step i (seed + i)."""
    return layer_randomisation(model, x, target, names, "independent", seed, progress, make)


def layer_randomisation(model: nn.Module, x: Tensor, target: Tensor, names: list[str],
                        mode: str = "cascading", seed: int = 0, progress=None,
                        make: Callable[[str, nn.Module], object] | None = None) -> dict:
    """The randomisation tests over `cascade_layers`, logits down; `mode` "cascading" keeps
    each step's layers random, "independent" restores a layer's trained state (parameters
    and buffers) before the next one is randomised."""
    if mode not in MODES:
        raise unknown_name("randomisation mode", mode, list(MODES))
    work = copy.deepcopy(model).eval()
    layers = cascade_layers(work)
    if not layers:
        raise InputError(f"{type(model).__name__} has no conv or linear layer to randomise")
    task = progress.add_task(f"randomising ({mode})", total=len(layers) + 1) if progress \
        else None
    ref = explain_all(work, x, target, names, make)
    image = x.detach().sum(1).flatten(1).double().numpy()

    def scored(ref_map: Tensor, m: Tensor) -> dict:
        # and how much the map's order is the input's own (Adebayo: maps that stay alike
        # after randomisation tend to look like the image)
        rho = _spearman_rows(np.abs(m.flatten(1).double().numpy()), image)
        rho = rho[np.isfinite(rho)]
        return {**compare(ref_map, m), "rank_input": float(rho.mean()) if len(rho) else None}

    steps = {n: [scored(ref[n], ref[n])] for n in names}
    examples = {n: [ref[n][0].abs().numpy()] for n in names}
    if progress:
        progress.advance(task)
    for i, (_, modules) in enumerate(layers):
        # independent: keep the trained state to put back (copies: reset_parameters may
        # write into the same tensors in place)
        trained = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules] \
            if mode == "independent" else None
        randomise(modules, seed + i)
        maps = explain_all(work, x, target, names, make)
        for n in names:
            steps[n].append(scored(ref[n], maps[n]))
            examples[n].append(maps[n][0].abs().numpy())
        if trained is not None:
            for m, state in zip(modules, trained, strict=True):
                m.load_state_dict(state)
        if progress:
            progress.advance(task)
    return {"layers": ["trained", *(name for name, _ in layers)], "steps": steps,
            "examples": examples, "reference": ref}


def suspects(steps: dict[str, list[dict]], threshold: float) -> list[str]:
    """Methods whose mean rank correlation of |map| stays above `threshold` with every layer
    random: their maps do not depend on the model."""
    return [n for n, s in steps.items()
            if s[-1]["rank_abs"] is not None and s[-1]["rank_abs"] > threshold]


def insensitive(layers: list[str], steps: dict[str, list[dict]],
                threshold: float) -> dict[str, list[str]]:
    """{method: layers whose randomisation alone leaves its maps' mean rank correlation of
    |map| above `threshold`} (independent randomisation): what the map does not show."""
    return {n: [layer for layer, st in zip(layers[1:], s[1:], strict=True)
                if st["rank_abs"] is not None and st["rank_abs"] > threshold]
            for n, s in steps.items()}


# ------------------------------------------------------------------------------ figures


def figures(result: dict, examples: dict, image: np.ndarray, stem: Path,
            mode: str = "cascading") -> None:
    """``<stem>_maps.png`` and ``<stem>_curves.png`` of `result` ({"layers", "steps",
    "threshold"}); independent randomisation's are ``<stem>_independent_*.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, layers = list(examples), result["layers"]
    rows, cols = len(names), len(layers) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.6),
                             squeeze=False)
    for r, name in enumerate(names):
        axes[r, 0].imshow(image, cmap="gray")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        for c, m in enumerate(examples[name], start=1):
            axes[r, c].imshow(m / max(float(m.max()), 1e-12), cmap="gray", vmin=0, vmax=1)
    for c, title in enumerate(["input", *layers]):
        axes[0, c].set_title(title, fontsize=6, rotation=45, ha="left")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    what = {"cascading": "cascading randomisation, logits down",
            "independent": "independent randomisation, one layer at a time"}[mode]
    fig.suptitle(f"{what} (|map|, scaled per cell)", fontsize=8)
    fig.tight_layout()
    suffix = "" if mode == "cascading" else f"_{mode}"
    atomic_savefig(fig, stem.with_name(f"{stem.name}{suffix}_maps.png"), dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    xs = np.arange(len(layers))
    for ax, key, title in ((axes[0], "rank_abs", "Spearman ρ of |map|"),
                           (axes[1], "ssim", "SSIM of |map|")):
        colours = plt.cm.tab20(np.linspace(0, 1, 20))  # more methods than tab10 has colours
        for i, name in enumerate(names):
            ys = [np.nan if s[key] is None else s[key] for s in result["steps"][name]]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=name, color=colours[(2 * i) % 20
                                                                                 + i // 10])
        ax.axhline(result["threshold"], color="gray", ls="--", lw=0.8)
        ax.set_xticks(xs, layers, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{title} to the trained model's map")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over images")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(what, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, stem.with_name(f"{stem.name}{suffix}_curves.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def write_permuted(data: Path, out: Path, seed: int) -> int:
    """Copy the dataset DATA to OUT with the labels of its train and val rows permuted within
    each split (seeded); the test split keeps its labels. Returns the rows permuted."""
    if out.exists() and any(out.iterdir()):
        raise CausalignError(f"{out}: exists and is not empty (--write-permuted writes a new "
                             f"dataset)")
    shutil.copytree(data, out, dirs_exist_ok=True)
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0]) if rows else []
    rng = np.random.default_rng(seed)
    n = 0
    for split in ("train", "val"):
        idx = [i for i, r in enumerate(rows) if r["split"] == split]
        labels = [rows[i]["label"] for i in idx]
        for i, j in zip(idx, rng.permutation(len(idx)), strict=True):
            rows[i]["label"] = labels[j]
        n += len(idx)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / MANIFEST, buf.getvalue())
    return n


def _images(run: Path, split: str, n: int) -> tuple[nn.Module, Tensor, Tensor, Path, dict]:
    cfg, model, method, data = load_run(run, device="cpu")
    ds = LesionDataset(data, split)
    if len(ds) == 0:
        raise InputError(f"{data}: split '{split}' holds no images")
    batch = ds.batch(torch.arange(min(n, len(ds))))
    x = method.model_input(batch)
    return model.eval(), x, batch["label"], data, {"method": cfg.method, "model": cfg.model,
                                                   "epochs": cfg.epochs}


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="finished run folder")
    ap.add_argument("--label-run", type=Path, default=None,
                    help="a run trained on the same images with permuted labels")
    ap.add_argument("--write-permuted", type=Path, default=None, metavar="DIR",
                    help="write RUN's dataset with permuted train/val labels to DIR and exit")
    ap.add_argument("--mode", choices=[*MODES, "both"], default="cascading",
                    help="cascading (logits down, layers stay random), independent (one "
                         "layer random at a time) or both")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=32, help="images compared (the split's first)")
    ap.add_argument("--methods", default="all", help="comma-separated explainers, or all")
    ap.add_argument("--seed", type=int, default=0, help="seed of the re-initialisations")
    ap.add_argument("--threshold", type=float, default=0.8,
                    help="rank correlation above which a fully randomised map is suspect")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "saliency_sanity.json")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n must be >= 1, got {a.n}")
    if not (math.isfinite(a.threshold) and -1 <= a.threshold <= 1):
        ap.error(f"--threshold must lie in [-1, 1], got {a.threshold}")
    names = explainer_names() if a.methods == "all" else a.methods.split(",")
    for name in names:
        if name not in explainer_names():
            ap.error(str(unknown_name("saliency method", name, explainer_names())))
    torch.set_num_threads(a.threads)
    if a.write_permuted is not None:
        _, _, _, data = load_run(a.run, device="cpu")
        n = write_permuted(Path(data), a.write_permuted, a.seed)
        print(f"wrote {a.write_permuted} ({n} train/val labels permuted); train it with "
              f"{a.run}'s settings, e.g. causalign train {a.write_permuted} --out RUN2, and "
              f"pass --label-run RUN2")
        return
    t0 = time.perf_counter()
    model, x, labels, data, info = _images(a.run, a.split, a.n)
    if x.dim() == 5 and a.methods == "all":  # 2D-only explainers, as in evaluation
        names = [n for n in names if n not in VOLUME_UNSUPPORTED]
    with torch.no_grad():
        target = model(x).argmax(1)  # the trained model's class at every step
    modes = list(MODES) if a.mode == "both" else [a.mode]
    with progress_bar(a.progress) as progress:
        runs = {m: layer_randomisation(model, x, target, names, m, a.seed, progress)
                for m in modes}
    reference = runs[modes[0]]["reference"]
    result = {
        "benchmark": "saliency_sanity", "run": str(a.run), "data": str(data), **info,
        "split": a.split, "n_images": int(x.shape[0]), "image_shape": list(x.shape[1:]),
        "target": "class predicted by the trained model",
        "accuracy": float((target == labels).float().mean()),
        "mode": a.mode, "seed": a.seed, "threshold": a.threshold,
    }
    if "cascading" in runs:  # at the top level, as before --mode existed
        cascade = runs["cascading"]
        result.update({
            "randomisation": "cascading, logits down; reset_parameters (BatchNorm with the "
                             "layer before it, running statistics reset)",
            "layers": cascade["layers"], "steps": cascade["steps"],
            "fully_random": {n: s[-1] for n, s in cascade["steps"].items()},
            "suspect": suspects(cascade["steps"], a.threshold)})
    if "independent" in runs:
        ind = runs["independent"]
        result["independent"] = {
            "randomisation": "one layer at a time, the others trained; the layer's random "
                             "weights are those of the cascading step of the same index",
            "layers": ind["layers"], "steps": ind["steps"],
            "insensitive": insensitive(ind["layers"], ind["steps"], a.threshold)}
    if a.label_run is not None:
        permuted, x2, _, data2, info2 = _images(a.label_run, a.split, a.n)
        if x2.shape != x.shape or not torch.equal(x2, x):
            raise SystemExit(f"{a.label_run}: not trained on the images of {a.run} "
                             f"({data2} vs {data})")
        other = explain_all(permuted, x, target, names)
        result["label_randomisation"] = {
            "run": str(a.label_run), "epochs": info2["epochs"],
            **{n: compare(reference[n], other[n]) for n in names}}
    result.update(seconds=time.perf_counter() - t0, threads=a.threads,
                  torch=str(torch.__version__), cpu=platform.processor() or platform.machine())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, result)
    for m, r in runs.items():
        figures({**r, "threshold": a.threshold}, r["examples"], x[0].sum(0).numpy(),
                a.out.with_suffix(""), m)
    summary = {}
    if "cascading" in runs:
        print(json.dumps({n: {k: None if v is None else round(v, 3) for k, v in s.items()}
                          for n, s in result["fully_random"].items()}, indent=1))
        summary["suspect"] = result["suspect"]
    if "independent" in runs:
        summary["insensitive"] = result["independent"]["insensitive"]
    print(json.dumps({**summary, "written": str(a.out)}))


if __name__ == "__main__":
    main()
