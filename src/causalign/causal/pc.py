"""PC-algorithm check of the X → A → Y diagram (seed 000 App. C.5, Fig. 8).

Variables: X = the first ``n_components`` principal components of a trained model's pooled
image features (global average of its Grad-CAM layer), A = the annotated attributes, Y = the
label. causal-learn's PC (`causallearn.search.ConstraintBased.PC.pc`, Fisher-z test by
default) recovers a graph under Markov + faithfulness; the check compares its *skeleton* with
the paper's diagram (Fig. 3):

* every edge must be X–X, X–A or A–Y: no X–Y edge (Y ⊥ X | A) and no A–A edge (attributes
  independent given the image);
* with known causal weights (the synthetic benchmark), the A–Y edges should be exactly the
  attributes with non-zero weight.

causal-learn is an optional dependency (``pip install causalign[causal]``).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import CausalignError, ConfigError, InputError

if TYPE_CHECKING:
    from ..data.format import LesionDataset
    from ..methods.base import Method

__all__ = ["pc_graph", "pc_check", "pooled_features", "skeleton_check", "plot_graph"]


def _require_causallearn():
    try:
        from causallearn.search.ConstraintBased.PC import pc
    except ImportError:  # pragma: no cover - depends on the environment
        raise CausalignError("the PC check needs causal-learn: pip install 'causalign[causal]' "
                             "(or pip install causal-learn)") from None
    return pc


@torch.no_grad()
def pooled_features(model: nn.Module, method: Method, dataset: LesionDataset,
                    device: torch.device | str = "cpu", batch_size: int = 128) -> np.ndarray:
    """Global-average-pooled activations of the model's Grad-CAM layer, (n, channels).

    A multi-view model runs that layer once per slice: its rows are combined into one per
    volume with the slice attention of the same forward (`last_attention`), the weights
    the model pools its slices' predictions with. They came out as one row per slice, and
    the check failed with "128 feature rows, 16 attribute rows"."""
    from ..engine.evaluate import iterate_batches
    from ..explain.base import eval_mode
    from ..models import find_cam_layer

    layer = find_cam_layer(model)
    store: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    handle = layer.register_forward_hook(
        lambda m, i, o: store.append(o.detach().float().flatten(2).mean(2).cpu()))
    try:
        with eval_mode(model):  # the caller's train/eval flags are restored
            for batch in iterate_batches(dataset, batch_size, device=device):
                store.clear()
                model(method.model_input(batch))
                feats = torch.cat(store)
                n = len(batch["label"])
                att = getattr(model, "last_attention", None)
                if len(feats) != n and isinstance(att, torch.Tensor) and att.dim() == 2 \
                        and att.shape[0] == n and len(feats) == att.numel():
                    att = att.float().cpu()
                    feats = (feats.view(n, att.shape[1], -1) * att[..., None]).sum(1)
                rows.append(feats)
    finally:
        handle.remove()
    return torch.cat(rows).numpy()


def _check_alpha(alpha: float) -> None:
    # causal-learn only asserts it: a bare AssertionError without a message
    if not (isinstance(alpha, numbers.Real) and 0 < alpha < 1):
        raise ConfigError(f"PC significance level alpha must lie in (0, 1), got {alpha!r}")


# causal-learn's conditional-independence tests that fit these variables: Fisher-z (partial
# correlation: linear-Gaussian, fast) and KCI (kernel: no linearity assumption, O(n³) per
# test). Its chisq / gsq need discrete data, and the feature components are continuous.
PC_TESTS = ("fisherz", "kci")


def _check_test(indep_test: str) -> None:
    if indep_test not in PC_TESTS:
        raise ConfigError(f"PC check: unknown independence test {indep_test!r}; choose "
                          f"{' or '.join(PC_TESTS)}")


def _check_settings(alpha: float, n_components: int, indep_test: str = "fisherz") -> None:
    _check_alpha(alpha)
    _check_test(indep_test)
    # 0 or negative left no (or, by slicing from the end, the wrong) feature nodes and failed
    # later as causal-learn's "correlation matrix is singular"
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) \
            or n_components < 1:
        raise ConfigError(f"PC check needs n_components >= 1 (an integer), got "
                          f"{n_components!r}")


def _check_inputs(features: np.ndarray, attributes: np.ndarray, labels: np.ndarray,
                  names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes agree and values are finite (attributes may be NaN = missing): otherwise numpy
    or causal-learn failed later with an IndexError, "SVD did not converge", a bare
    AssertionError or a misleading "correlation matrix is singular"."""
    f = np.asarray(features, np.float64)
    a = np.asarray(attributes, np.float64)
    y = np.asarray(labels, np.float64)
    if f.ndim != 2 or a.ndim != 2 or y.ndim != 1:
        raise InputError(f"PC check needs features (n, channels), attributes (n, attributes) "
                         f"and labels (n,); got shapes {f.shape}, {a.shape}, {y.shape}")
    if not len(f) == len(a) == len(y):
        raise InputError(f"PC check: {len(f)} feature rows, {len(a)} attribute rows and "
                         f"{len(y)} labels")
    if a.shape[1] != len(names):
        raise InputError(f"PC check: {len(names)} attribute names for {a.shape[1]} "
                         f"attribute columns")
    for what, v in (("features", f), ("labels", y), ("attributes", a[~np.isnan(a)])):
        if not np.isfinite(v).all():
            raise InputError(f"PC check: {what} hold NaN/inf values"
                             + (" (NaN marks a missing attribute; inf is not allowed)"
                                if what == "attributes" else ""))
    return f, a, y


def pc_graph(data: np.ndarray, alpha: float = 0.01, indep_test: str = "fisherz",
             show_progress: bool = False) -> np.ndarray:
    """PC on the columns of ``data``; returns causal-learn's endpoint matrix G where
    G[j, i] = 1 and G[i, j] = −1 means i → j, both −1 an undirected edge, both 1 ↔.
    ``show_progress``: causal-learn's own progress bar (tqdm, on stderr: the depth and node
    it works on), for the KCI test's minutes."""
    _check_alpha(alpha)
    _check_test(indep_test)
    pc = _require_causallearn()
    cg = pc(np.asarray(data, np.float64), alpha=alpha, indep_test=indep_test,
            show_progress=bool(show_progress))
    return np.asarray(cg.G.graph)


def edges_of(graph: np.ndarray, names: list[str]) -> list[dict]:
    out = []
    k = len(names)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = graph[i, j], graph[j, i]
            if a == 0 and b == 0:
                continue
            if a == -1 and b == 1:
                kind = "->"
            elif a == 1 and b == -1:
                kind = "<-"
            elif a == -1 and b == -1:
                kind = "--"
            else:
                kind = "<->"
            out.append({"from": names[i], "to": names[j], "type": kind})
    return out


def skeleton_check(edges: list[dict], groups: dict[str, str],
                   causal_attributes: list[str] | None = None) -> dict:
    """Compare a skeleton with X → A → Y. ``groups`` maps a variable name to 'X', 'A', 'Y'."""
    pairs = [(groups[e["from"]], groups[e["to"]], e) for e in edges]
    kinds: dict[str, list[str]] = {}
    for ga, gb, e in pairs:
        key = "–".join(sorted((ga, gb)))
        kinds.setdefault(key, []).append(f"{e['from']} {e['type']} {e['to']}")
    forbidden = kinds.get("X–Y", []) + kinds.get("A–A", [])
    a_y = sorted({e["from"] if groups[e["from"]] == "A" else e["to"]
                  for ga, gb, e in pairs if {ga, gb} == {"A", "Y"}})
    attrs = sorted(n for n, g in groups.items() if g == "A")
    a_x = sorted({e["from"] if groups[e["from"]] == "A" else e["to"]
                  for ga, gb, e in pairs if {ga, gb} == {"A", "X"}})
    out = {
        "n_edges": len(edges), "edges_by_kind": {k: len(v) for k, v in kinds.items()},
        "forbidden_edges": forbidden, "attributes_linked_to_label": a_y,
        "attributes_linked_to_image": a_x,
        "attributes_without_image_edge": [a for a in attrs if a not in a_x],
        "skeleton_consistent": not forbidden,
    }
    if causal_attributes is not None:
        out["truly_causal"] = sorted(causal_attributes)
        out["label_edges_match_truth"] = a_y == sorted(causal_attributes)
        out["missed_causal"] = sorted(set(causal_attributes) - set(a_y))
        out["spurious_label_edges"] = sorted(set(a_y) - set(causal_attributes))
    return out


def plot_graph(edges: list[dict], groups: dict[str, str], path: str | Path,
               title: str = "") -> None:
    """X nodes left, A middle, Y right; arrows for oriented edges, lines for undirected."""
    from ..report.figures import agg_figure  # not pyplot: the caller's backend stays

    cols = {"X": 0.0, "A": 1.0, "Y": 2.0}
    colors = {"X": "#9ecae1", "A": "#fdae6b", "Y": "#a1d99b"}
    pos = {}
    for g, x in cols.items():
        names = [n for n, gg in groups.items() if gg == g]
        for k, n in enumerate(names):
            pos[n] = (x, (len(names) - 1) / 2 - k)
    fig = agg_figure(figsize=(7, max(3, 0.7 * max(len(pos), 4))))
    ax = fig.subplots()
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["from"]], pos[e["to"]]
        bad = {groups[e["from"]], groups[e["to"]]} in ({"X", "Y"}, {"A"})
        color = "crimson" if bad else "0.3"
        style = {"->": "-|>", "<-": "<|-", "--": "-", "<->": "<|-|>"}[e["type"]]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle=style, color=color, lw=1.4,
                                    shrinkA=14, shrinkB=14,
                                    connectionstyle="arc3,rad=0.25" if x0 == x1 else None))
    for n, (x, y) in pos.items():
        ax.scatter([x], [y], s=900, color=colors[groups[n]], zorder=3, edgecolors="k")
        ax.text(x, y, n, ha="center", va="center", fontsize=7, zorder=4)
    ax.set_xticks(list(cols.values()), ["image features X", "attributes A", "label Y"])
    ax.set_yticks([])
    ax.set_xlim(-0.5, 2.5)
    for s in ("top", "right", "left"):
        ax.spines[s].set_visible(False)
    ax.set_title(title or "PC algorithm (red: edge forbidden by X → A → Y)", fontsize=9)
    fig.tight_layout()
    from ..io import atomic_savefig

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=120)


def label_columns(labels: np.ndarray, class_names: list[str] | None = None
                  ) -> tuple[np.ndarray, list[str]]:
    """The label as PC variables: one column "Y" for two classes or a continuous (non-integer)
    score; with more integer classes present, one 0/1 indicator "Y=<class>" per class but
    the first present one (all K would sum to 1: a singular correlation matrix). A K-class
    label as one number 0…K−1 made Fisher-z read the arbitrary class order as a quantity: an
    attribute marking exactly the middle class of three correlates 0 with it, and its A–Y
    edge came and went with the class order."""
    y = np.asarray(labels, np.float64)
    present = np.unique(y)
    if len(present) <= 2 or not np.all(present == np.round(present)):
        # binary, or a continuous score (not classes: one indicator per distinct value
        # would give thousands of variables)
        return y[:, None], ["Y"]

    def name(c: float) -> str:
        k = int(c)
        return str(class_names[k]) if class_names is not None and 0 <= k < len(class_names) \
            and c == k else f"{c:g}"

    cols = np.column_stack([(y == c).astype(np.float64) for c in present[1:]])
    return cols, [f"Y={name(c)}" for c in present[1:]]


def _dependent(data: np.ndarray, names: list[str]) -> str:
    """Which variables are exact copies of each other (|correlation| 1), for the message."""
    corr = np.corrcoef(data, rowvar=False)
    pairs = [f"{names[i]} and {names[j]}" for i in range(len(names))
             for j in range(i + 1, len(names)) if abs(corr[i, j]) > 1 - 1e-9]
    if pairs:
        return f"{', '.join(pairs[:3])} are perfectly correlated (drop one, e.g. an " \
               f"attribute that equals the label or marks exactly one class)"
    return "some variable is a linear combination of others (e.g. attributes that sum to " \
           "a constant)"


_MIN_SAMPLES = 20  # fewer rows leave the conditional-independence tests no power


def pc_check(features: np.ndarray, attributes: np.ndarray, labels: np.ndarray,
             attribute_names: list[str], *, n_components: int = 3, alpha: float = 0.01,
             indep_test: str = "fisherz", causal_attributes: list[str] | None = None,
             figure: str | Path | None = None, class_names: list[str] | None = None,
             select: list[str] | None = None, show_progress: bool = False) -> dict:
    """PCs of ``features`` + attributes + label → PC graph → skeleton check (+ figure).
    ``select``: only these attributes (by name; default all). Rows with a missing (selected)
    attribute are dropped. A label of more than two classes enters as class indicators
    (`label_columns`), all in the group Y. ``show_progress``: `pc_graph`'s."""
    _check_settings(alpha, n_components, indep_test)
    features, attributes, labels = _check_inputs(features, attributes, labels, attribute_names)
    attributes, attribute_names, causal_attributes, keep = _annotated(
        attributes, attribute_names, causal_attributes, select)
    f = features[keep]
    f = f - f.mean(0)
    # PCA by SVD; components scaled to unit variance
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    k = min(n_components, f.shape[1])
    pcs = u[:, :k] * np.sqrt(len(f))
    xnames = [f"X{i + 1}" for i in range(k)]
    ycols, ynames = label_columns(labels[keep], class_names)
    # an attribute constant on the split (real data: no calcified nodule among the test
    # patients) is independent of every variable, so it has no edge: it is left out and
    # listed. It used to stop the whole check ("constant variable(s) calcification"), with
    # no way to leave the attribute out from the command line
    a_keep = attributes[keep]
    # max - min, not std: a constant 0.7 column has std 1e-16 (rounding in the mean), so it
    # was kept and the Fisher-z test met a singular correlation matrix
    varies = np.ptp(a_keep, 0) > 0
    constant = [n for n, v in zip(attribute_names, varies, strict=True) if not v]
    if not varies.any():
        raise CausalignError(f"PC check: every attribute is constant on these "
                             f"{int(keep.sum())} samples ({', '.join(constant)}), so there is "
                             f"no X -> A -> Y to check")
    attribute_names = [n for n, v in zip(attribute_names, varies, strict=True) if v]
    if causal_attributes is not None:
        causal_attributes = [n for n in causal_attributes if n in attribute_names]
    data = np.column_stack([pcs, a_keep[:, varies], ycols])
    # Fisher-z's statistic is √(n − |S| − 3)·z with conditioning sets up to all but two
    # variables: with n ≤ variables + 1 it is undefined, and causal-learn only warned and
    # ran on (CUB's 312 attributes on 34 samples: no result after minutes)
    if len(data) < data.shape[1] + 2:
        raise CausalignError(
            f"PC check: {data.shape[1]} variables ({k} feature components, "
            f"{int(varies.sum())} attributes, {len(ynames)} label) for {len(data)} samples; "
            f"the {indep_test} test needs at least variables + 2 samples: select fewer "
            f"attributes (--attributes)")
    # constant columns break the Fisher-z test (singular correlation): jitter-free removal
    names = [*xnames, *attribute_names, *ynames]
    std = data.std(0)
    if np.any(std == 0):
        const = [n for n, sd in zip(names, std, strict=True) if sd == 0]
        raise CausalignError(f"PC check: constant variable(s) {', '.join(const)}")
    try:
        graph = pc_graph(data, alpha=alpha, indep_test=indep_test,
                         show_progress=show_progress)
    except ValueError as exc:  # causal-learn's Fisher-z: "correlation matrix is singular"
        if "singular" not in str(exc):
            raise
        raise CausalignError(f"PC check: the variables' correlation matrix is singular, "
                             f"so the {indep_test} test cannot run: "
                             f"{_dependent(data, names)}") from None
    edges = edges_of(graph, names)
    groups = {**{n: "X" for n in xnames}, **{n: "A" for n in attribute_names},
              **{n: "Y" for n in ynames}}
    out = {"n": int(keep.sum()), "alpha": alpha, "indep_test": indep_test,
           "n_components": k,
           "explained_variance": float((s[:k] ** 2).sum() / (s ** 2).sum()),
           "edges": edges, **skeleton_check(edges, groups, causal_attributes),
           # the attribute nodes (after --attributes and the constant ones): the graph's A
           "attributes": attribute_names, "constant_attributes": constant}
    if figure is not None:
        plot_graph(edges, groups, figure)
        out["figure"] = str(figure)
    return out



def _annotated(attributes: np.ndarray, attribute_names: list[str],
               causal_attributes: list[str] | None, select: list[str] | None,
               ) -> tuple[np.ndarray, list[str], list[str] | None, np.ndarray]:
    """`pc_check`'s attribute columns after ``select``, and its rows: the fully annotated
    samples, or an error when fewer than `_MIN_SAMPLES` are. Needs no features, so
    `run_pc_check` asks before it computes them (seconds on a large split)."""
    if select is not None:
        unknown = [n for n in select if n not in attribute_names]
        if unknown or not select:
            given = ", ".join(unknown) or "(none given)"
            known = ", ".join(attribute_names[:8]) + (
                f", … ({len(attribute_names)} in all)" if len(attribute_names) > 8 else "")
            raise InputError(f"PC check: unknown attribute(s) {given}; the data's: {known}")
        cols = [attribute_names.index(n) for n in dict.fromkeys(select)]
        attributes = attributes[:, cols]
        attribute_names = [attribute_names[j] for j in cols]
        if causal_attributes is not None:
            causal_attributes = [n for n in causal_attributes if n in attribute_names]
    keep = ~np.isnan(attributes).any(1)
    if keep.sum() < _MIN_SAMPLES:
        raise CausalignError(f"PC check: only {int(keep.sum())} fully annotated samples, at "
                             f"least {_MIN_SAMPLES} needed (a larger split, e.g. "
                             f"`causalign causal pc RUN --split train`)")
    return attributes, attribute_names, causal_attributes, keep


def run_pc_check(run: str | Path, *, split: str = "test", data: str | Path | None = None,
                 n_components: int = 3, alpha: float = 0.01, indep_test: str = "fisherz",
                 out: str | Path | None = None, device: str = "cpu",
                 attributes: list[str] | None = None, show_progress: bool = False) -> dict:
    """`pc_check` on a trained run: its pooled features on ``split`` with the split's
    annotated attributes and labels; writes OUT/pc_graph.png and OUT/pc_check.json.
    ``show_progress``: causal-learn's progress bar during the search (`pc_graph`)."""
    from ..data.format import LesionDataset
    from ..engine.trainer import load_run
    from ..io import atomic_write_json

    _check_settings(alpha, n_components, indep_test)  # before loading the run
    _require_causallearn()
    _, model, method, data_path = load_run(run, device=device, data=data)
    ds = LesionDataset(data_path, split)
    if not ds.meta.attributes:
        raise CausalignError(f"{data_path}: the dataset declares no attributes")
    _annotated(ds.attributes.numpy(), list(ds.meta.attributes), None, attributes)
    feats = pooled_features(model, method, ds, device=next(model.parameters()).device)
    weights = (ds.meta.info or {}).get("causal_weights")
    causal = [n for n in ds.meta.attributes if weights and float(weights.get(n, 0)) > 0] \
        if weights else None
    out = Path(out) if out is not None else Path(run) / "pc"
    rep = pc_check(feats, ds.attributes.numpy(), ds.labels.numpy(), list(ds.meta.attributes),
                   n_components=n_components, alpha=alpha, indep_test=indep_test,
                   causal_attributes=causal, figure=out / "pc_graph.png",
                   class_names=list(ds.meta.classes), select=attributes,
                   show_progress=show_progress)
    # the dataset read: `--data` another one gave a record that read as the run's own
    rep.update(run=str(run), data=str(data_path), split=split)
    atomic_write_json(out / "pc_check.json", rep)
    return rep
