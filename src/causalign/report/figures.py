"""Figures: example grids, saliency overlays, method × case CAM grids (paper 000 Fig. 4)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io import atomic_savefig

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(figsize: tuple[float, float] | None = None) -> Figure:
    """A figure drawn by its own Agg canvas, outside pyplot.

    ``matplotlib.use("Agg")`` + pyplot switched the *process's* backend: a notebook that
    called a figure writer (``causalign data synth``'s examples, a report) lost its inline
    or GUI backend for its own plots. A Figure with its own canvas needs no backend and never
    enters pyplot's registry, so nothing stays open either (a failed figure is garbage)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


@contextmanager
def _figure(*args, **kwargs) -> Iterator[tuple]:
    """``(fig, fig.subplots(*args, **kwargs))`` of an `agg_figure`."""
    fig = agg_figure(figsize=kwargs.pop("figsize", None))
    yield fig, fig.subplots(*args, **kwargs)


def _plain(text: str) -> str:
    """User text (sample ids, method labels, class and dataset names) shown as written:
    matplotlib reads "$…$" as math, so an id like ``P$_^$`` raised a ParseSyntaxException
    when the figure was saved and ``case$1$`` lost its dollars."""
    return text.replace("$", r"\$")


def _fit(label: str, inches: float, fontsize: float = 7) -> str:
    """Wrap a row or panel label into lines that fit `inches` (about 0.6 em per character):
    real sample ids (``Mass-Test_P_00016_LEFT_CC_1``, ``LIDC-IDRI-0002_01.2.2_n00``) have no
    spaces and ran into the next row's label or off the figure."""
    width = max(6, int(inches * 72 / (0.62 * fontsize)))
    return _plain("\n".join(textwrap.fill(part, width, break_long_words=True,
                                          break_on_hyphens=False)
                            for part in label.split("\n")))


def display_range(*images: np.ndarray) -> tuple[float, float]:
    """The intensity range to draw ``images`` in: [0, 1] when their finite values lie in it
    (PNGs, synthetic data), else their own finite min..max (CT in HU, z-scored MRI), which
    a fixed [0, 1] drew almost entirely black and white."""
    values = [np.asarray(im, dtype=np.float64) for im in images]
    finite = [v[np.isfinite(v)] for v in values]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    lo = min(float(f.min()) for f in finite)
    hi = max(float(f.max()) for f in finite)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _show_image(ax, image: np.ndarray, value_range: tuple[float, float] | None = None) -> None:
    """image (C,H,W) or (C,D,H,W): RGB for three channels, else gray — one channel as is,
    other counts (MRI modalities: 2 for `--modalities t1ce,flair`, 4 for BraTS) their mean,
    so every modality shows (an RGB of the first three dropped FLAIR; two channels were no
    image at all for matplotlib). Volumes show the slice with the most annotation (caller
    passes 2D) or the middle slice. Intensities are drawn over ``value_range`` (default:
    :func:`display_range` of this image; panels to compare, such as x and x*, share one)."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    lo, hi = value_range if value_range is not None else display_range(image)
    if image.shape[0] == 3:
        ax.imshow(np.clip((np.moveaxis(image, 0, -1) - lo) / (hi - lo), 0, 1))
    else:
        ax.imshow(image.mean(axis=0), cmap="gray", vmin=lo, vmax=hi)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_box(ax, box_mask: np.ndarray, color: str = "red") -> None:
    ys, xs = np.nonzero(box_mask)
    if len(xs) == 0:
        return
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1,
                           ys.max() - ys.min() + 1, fill=False, edgecolor=color, lw=1.0))


def _outline(ax, region: np.ndarray, color: str) -> None:
    """Outline of a 2D annotation ``region`` (nonzero = inside), closed at the image border.

    A plain contour stops at the outermost pixel centres: a mask touching the border lost
    the sides along it (its ends half a pixel short of the edge), and a mask covering the
    whole image drew nothing at all. Padded with zeros one pixel all round (at coordinates
    -1 and H/W), the outline closes on the image's edge."""
    r = np.pad(np.asarray(region, dtype=np.float64) > 0, 1).astype(np.float64)
    h, w = r.shape
    ax.contour(np.arange(-1, w - 1), np.arange(-1, h - 1), r, levels=[0.5], colors=color,
               linewidths=0.6)
    # the padding must not widen the panel: keep the image's own extent
    ax.set_xlim(-0.5, w - 2.5)
    ax.set_ylim(h - 2.5, -0.5)


def example_grid(images: np.ndarray, masks: np.ndarray, titles: Sequence[str], path: str | Path,
                 cols: int = 8) -> None:
    """Grid of examples with the lesion mask outlined."""
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    with _figure(rows, cols, figsize=(1.9 * cols, 2.05 * rows), squeeze=False) as (fig, axes):
        for ax in axes.flat:
            ax.axis("off")
        for i in range(n):
            ax = axes.flat[i]
            ax.axis("on")
            image, m = images[i], masks[i][0]
            if m.ndim == 3:  # a volume: show the slice with the most lesion (the middle
                # slice can miss a lesion that spans only a few slices)
                z = int(m.reshape(m.shape[0], -1).sum(1).argmax())
                image, m = image[:, z], m[z]
            _show_image(ax, image)
            if m.any():
                _outline(ax, m, "red")
            ax.set_title(_fit(titles[i], 1.6), fontsize=7)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)


def overlay(image: np.ndarray, saliency: np.ndarray, box_mask: np.ndarray | None,
            path: str | Path, title: str = "") -> None:
    """One image with its saliency map overlaid and the box (see `_overlay_ax`)."""
    with _figure(figsize=(2.6, 2.6)) as (fig, ax):
        _overlay_ax(ax, image, saliency, box_mask)
        if title:  # wrapped: a CBIS-DDSM id with "y=… pred=…" ran off both edges
            ax.set_title(_fit(title, 2.5, fontsize=8), fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)


BAD_COLOUR = "magenta"  # NaN pixels of a map: shown, not hidden as "no relevance"
SIGNED_BOX_COLOUR = "lime"  # the lesion box over a red/blue (signed) map


def _scaled_map(saliency: np.ndarray) -> tuple[np.ndarray, bool]:
    """A map scaled for display and whether it is signed.

    Unsigned maps (Grad-CAM, |gradient|) are min–max scaled to [0, 1]. Signed maps (WBP,
    LRP, input × gradient: any negative value) are divided by their largest |value|, so
    0 stays 0 and the scale is symmetric: min–max scaling put "no relevance" at a
    different colour in every image (mid-green of jet), and negative evidence looked
    like weak positive evidence. Scales come from the finite values only: one NaN or inf
    pixel made the whole map blank or raised "invalid value" warnings; ±inf is shown at
    the ends of the scale, NaN stays NaN (drawn in BAD_COLOUR)."""
    s = np.asarray(saliency, dtype=np.float64)
    finite = s[np.isfinite(s)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    signed = lo < 0 or bool(np.isneginf(s).any())
    if signed:
        lim = max(-lo, hi) or 1.0  # only ±inf beside zeros: they show at ±1
        return np.clip(s, -lim, lim) / lim, True
    if hi > lo:
        return (np.clip(s, lo, hi) - lo) / (hi - lo), False
    return np.where(np.isnan(s), np.nan, np.where(s > hi, 1.0, 0.0)), False


def _overlay_ax(ax, image: np.ndarray, saliency: np.ndarray, box_mask: np.ndarray | None):
    """Map over the image: jet for unsigned maps; for signed ones a diverging map centred
    at 0 (red positive, blue negative evidence), opacity growing with |value| so the white
    middle of the map does not veil the image. Weak pixels (< 5 % of the scale) are left
    transparent."""
    import matplotlib

    _show_image(ax, image)
    s, signed = _scaled_map(saliency)
    cmap = matplotlib.colormaps["bwr" if signed else "jet"].with_extremes(bad=BAD_COLOUR)
    strength = np.abs(np.nan_to_num(s))
    alpha = (0.8 * strength if signed else np.full_like(s, 0.45)) * (strength > 0.05)
    alpha = np.where(np.isnan(s), 0.9, alpha)
    ax.imshow(s, cmap=cmap, alpha=alpha, vmin=-1 if signed else 0, vmax=1)
    if box_mask is not None:  # a red box would read as positive evidence on a red/blue map
        _draw_box(ax, box_mask, color=SIGNED_BOX_COLOUR if signed else "red")


def cam_grid(images: np.ndarray, boxes: np.ndarray, maps: dict[str, np.ndarray],
             path: str | Path, row_titles: Sequence[str] | None = None) -> None:
    """Paper 000 Fig. 4: rows = cases, first column the input with its box, then one column
    per method (or saliency method) with its map overlaid."""
    def draw_input(ax, r: int) -> None:
        _show_image(ax, images[r])
        _draw_box(ax, boxes[r])

    _input_and_columns_grid(
        len(images), list(maps), path, row_titles, draw_input,
        lambda ax, r, name: _overlay_ax(ax, images[r], maps[name][r], boxes[r]))


def _input_and_columns_grid(n: int, names: list[str], path: str | Path,
                            row_titles: Sequence[str] | None, draw_input, draw_cell) -> None:
    """n rows × (input + one column per name) panels, titled on the first row;
    ``draw_input(ax, row)`` and ``draw_cell(ax, row, name)`` fill them."""
    _some_cases(n, path)
    with _figure(n, len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.85 * n),
                 squeeze=False) as (fig, axes):
        for r in range(n):
            draw_input(axes[r, 0], r)
            if row_titles:  # rows are 1.85 in high, the image part about 1.4 in
                axes[r, 0].set_ylabel(_fit(row_titles[r], 1.4), fontsize=7)
            for c, name in enumerate(names, start=1):
                draw_cell(axes[r, c], r, name)
        axes[0, 0].set_title("input", fontsize=8)
        for c, name in enumerate(names, start=1):
            # wrapped to the 1.8 in column: the paper suite's labels ("L_align, no
            # hierarchy (causal-align)") ran into the next column's
            axes[0, c].set_title(_fit(name, 1.7, fontsize=8), fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)


def _some_cases(n: int, path: str | Path) -> None:
    """A grid of no cases is a caller's mistake: say so instead of matplotlib's "Number of
    rows must be a positive integer, not 0"."""
    if n < 1:
        raise InputError(f"{path}: no cases to draw (0 images)")


def signed_change_map(change: np.ndarray) -> np.ndarray:
    """One signed value per pixel of a change x* − x, (C, H, W) or (H, W) → (H, W): the
    channel change of largest magnitude, with its sign (ties: the first channel).

    The sum over channels cancelled opposite changes: a pure hue change (R +0.5, G −0.5)
    drew as "unchanged". The largest-magnitude channel never hides a change, keeps its sign
    and units, and is the change itself for one channel."""
    c = np.asarray(change, dtype=np.float64)
    if c.ndim != 3:
        return c
    pick = np.argmax(np.nan_to_num(np.abs(c), nan=np.inf), axis=0)[None]  # NaN shows as NaN
    return np.take_along_axis(c, pick, axis=0)[0]


def _change_ax(ax, change: np.ndarray, region: np.ndarray | None, vmax: float | None = None):
    """Signed change x* − x (per pixel the largest channel change, `signed_change_map`): red
    = increase, blue = decrease (paper 000 Fig. 9); symmetric colour scale so white is
    exactly "unchanged". The scale is written under the panel: each panel has its own, and
    full red meant 0.5 in one row and 0.005 in the next with nothing to tell them apart."""
    import matplotlib

    c = signed_change_map(change)
    if vmax is None:  # from the finite values: one NaN made the limit NaN, the panel all blue
        finite = np.abs(c[np.isfinite(c)])
        lim = float(finite.max()) if finite.size else 0.0
    else:
        lim = vmax
    # x* = x (a search that left the image, e.g. ISTA under a large α) was labelled
    # "full colour = ±1e-08", a scale for a change that does not exist
    label = f"full colour = ±{scale_text(lim)}" if lim > 0 else "no change (x* = x)"
    lim = max(lim, 1e-8)
    cmap = matplotlib.colormaps["bwr"].with_extremes(bad=BAD_COLOUR)
    ax.imshow(np.clip(c, -lim, lim), cmap=cmap, vmin=-lim, vmax=lim)
    if region is not None and region.any():
        _outline(ax, region, "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=6, labelpad=2)


def scale_text(v: float) -> str:
    """A colour-scale limit in two significant digits, positional where that reads
    (0.0049, 0.28, 200, 1500: '.2g' wrote CT changes in HU as '2e+02', '1.5e+03'), with an
    exponent only below 1e-3 or from 1e5 on."""
    if v == 0 or not np.isfinite(v):
        return f"{v:g}"
    if 1e-3 <= abs(v) < 1e5:
        return np.format_float_positional(v, precision=2, unique=False, fractional=False,
                                          trim="-")
    return f"{v:.2g}"


def counterfactual_triptych(image: np.ndarray, x_star: np.ndarray, region: np.ndarray | None,
                            path: str | Path, title: str = "") -> None:
    """Original | counterfactual x* | signed change x* − x (red up, blue down), with the
    annotation outlined on the change map. ``image``/``x_star`` are (C, H, W)."""
    # one grey scale, so x* − x shows as it is: the original's. The range of both let one
    # diverged x* pixel (4.0 in a [0, 1] image: --bounds none) draw both panels near-black,
    # hiding the original and x*'s real change; x* values beyond it now saturate
    shared = display_range(image)
    # wrapped to the figure: a hierarchical model's list of changed attributes (and long
    # ids) ran off both edges; the figure grows by the title's lines and the image's aspect
    # (a fixed 6.6 × 2.5 in drew a 64 × 24 px image 0.7 in wide, with the rest blank)
    title = _fit(title, 6.3, fontsize=8) if title else ""
    lines = title.count("\n") + 1 if title else 0
    height = 2.1 * _aspect(image) + 0.25 + 0.15 * lines
    with _figure(1, 3, figsize=(6.6, height)) as (fig, axes):
        _show_image(axes[0], image, shared)
        _show_image(axes[1], x_star, shared)
        _change_ax(axes[2], x_star - image, region)
        for ax, name in zip(axes, ("original", "counterfactual x*", "x* − x"), strict=True):
            ax.set_title(name, fontsize=8)
        if title:
            fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)


def _aspect(image: np.ndarray) -> float:
    """Height / width of an image (C, H, W) or (C, D, H, W), within [0.35, 1.8]: a figure's
    panel height for a unit of width (beyond these the panels are left narrow or flat)."""
    h, w = image.shape[-2:]
    return float(np.clip(h / max(w, 1), 0.35, 1.8))


def change_comparison_grid(images: np.ndarray, changes: dict[str, np.ndarray],
                           regions: np.ndarray, path: str | Path,
                           row_titles: Sequence[str] | None = None) -> None:
    """One case per row: the input, then one signed change map x* − x per column of
    ``changes`` (name → (N, C, H, W)), each on its own symmetric scale with the annotation
    outlined, to compare where different searches or models put their change."""
    _input_and_columns_grid(
        len(images), list(changes), path, row_titles,
        lambda ax, r: _show_image(ax, images[r]),
        lambda ax, r, name: _change_ax(ax, changes[name][r], regions[r]))


def counterfactual_grid(images: np.ndarray, x_stars: np.ndarray, regions: np.ndarray,
                        path: str | Path, row_titles: Sequence[str] | None = None) -> None:
    """Several triptychs stacked, one case per row, for a quick look at a split."""
    n = len(images)
    _some_cases(n, path)
    # rows as high as the images' aspect needs (a wide image left most of each row blank)
    row = 1.6 * _aspect(images[0]) + 0.25
    with _figure(n, 3, figsize=(5.4, row * n), squeeze=False) as (fig, axes):
        for r in range(n):
            shared = display_range(images[r])  # the original's, as in the triptych
            _show_image(axes[r, 0], images[r], shared)
            _show_image(axes[r, 1], x_stars[r], shared)
            _change_ax(axes[r, 2], x_stars[r] - images[r], regions[r])
            if row_titles:  # wrapped to the image's height (less for a wide image)
                axes[r, 0].set_ylabel(_fit(row_titles[r], row - 0.45), fontsize=7)
        for ax, name in zip(axes[0], ("original", "x*", "x* − x"), strict=True):
            ax.set_title(name, fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)


def class_name(ds: object, k: int, width: int = 20) -> str:
    """Class ``k``'s name from dataset.yaml for a figure's row title (BUSI's "malignant"
    says more than "2"), shortened to ``width`` characters so many long names (CUB's
    "001.Black_footed_Albatross") stay readable; the index where no name is known."""
    names = list(getattr(getattr(ds, "meta", None), "classes", None) or [])
    name = str(names[k]) if 0 <= k < len(names) else str(k)
    return name if len(name) <= width else name[: width - 1] + "…"


def _number(text: Any) -> float:
    """A history.csv cell as a float (NaN for empty, "nan", or text that is no number)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _alignment_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The alignment-term columns of a history (causal-align's ``train_align``, hier-align's
    per level), not their step and sample counts."""
    keys = rows[0].keys() if rows else ()
    return [k for k in keys if k.startswith("train_") and k.endswith("align")
            and not k.endswith(("_n_align", "align_step"))]


def _guidance_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The guidance-term columns of a history, in its order: every registered method's
    `Method.guidance_terms` (RRR's ``train_rrr``, PPI's ``train_con``…) and the alignment
    columns. A history carries no method name; no two methods log a term of the same name."""
    from ..methods.base import method_class, method_names

    terms = {f"train_{t}" for m in method_names() for t in method_class(m).guidance_terms}
    aligned = set(_alignment_columns(rows))
    keys = rows[0].keys() if rows else ()
    # a column empty in every row (an old or cut history) drew an empty panel and a legend
    # entry without a line
    return [k for k in keys if (k in terms or k in aligned)
            and any(np.isfinite(_number(r.get(k))) for r in rows)]


def _epochs(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """A history's epoch column; 1, 2, … by row where it has none (an old or hand-made
    history.csv without 'epoch' drew every panel empty)."""
    epochs = [_number(r.get("epoch")) for r in rows]
    return epochs if any(np.isfinite(e) for e in epochs) else [float(i + 1) for i in
                                                                range(len(rows))]


_ALIGN_STYLES = ("-", "--", ":", "-.")  # the alignment columns' line styles and markers
_ALIGN_MARKERS = ("o", "s", "^", "D")


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                    title: str = "") -> None:
    """Per-epoch curves of one or more runs' history.csv rows (label → rows): training loss,
    validation AUC, training (dashed) and validation accuracy, and the guidance terms
    (`Method.guidance_terms`: causal-align's alignment term, RRR's, PPI's…) where a run has
    them. The best epoch is what the run keeps; the curves show how it got there."""
    if not histories or not any(histories.values()):
        raise InputError("training_curves: no history rows to draw")
    from matplotlib.ticker import MaxNLocator

    aligned = {label: _guidance_columns(rows) for label, rows in histories.items()}
    panels = ["loss", "auc", "accuracy"] + (["align"] if any(aligned.values()) else [])
    # only causal-align / hier-align terms: one 'alignment term L_align' panel; else each
    # line is named
    only_align = all(set(aligned[label]) <= set(_alignment_columns(rows))
                     for label, rows in histories.items())
    with _figure(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False
                 ) as (fig, axes):
        colours = {label: f"C{i % 10}" for i, label in enumerate(histories)}
        every = [e for rows in histories.values() for e in _epochs(rows) if np.isfinite(e)]
        span = (int(min(every)), int(max(every))) if every else None
        longest_run = max(len(rows) for rows in histories.values())
        for ax, panel in zip(axes[0], panels, strict=True):
            for label, rows in histories.items():
                if not rows:
                    continue
                epochs = _epochs(rows)
                kw = {"color": colours[label], "marker": "o" if len(rows) <= 20 else None,
                      "markersize": 3}
                if panel == "loss":
                    ax.plot(epochs, [_number(r.get("train_loss")) for r in rows],
                            label=_fit(label, 3.6 * len(panels) / min(3, len(histories))),
                            **kw)
                elif panel == "auc":
                    ax.plot(epochs, [_number(r.get("val_auc")) for r in rows], **kw)
                elif panel == "accuracy":
                    ax.plot(epochs, [_number(r.get("val_accuracy")) for r in rows], **kw)
                    # hollow markers: a dashed line through one epoch's point drew nothing
                    ax.plot(epochs, [_number(r.get("train_accuracy")) for r in rows],
                            linestyle="--", markerfacecolor="none", **kw)
                else:
                    # a marker per column too: after one epoch there is no line to style
                    for k, style, marker in zip(aligned[label], _ALIGN_STYLES, _ALIGN_MARKERS,
                                                strict=False):
                        ax.plot(epochs, [_number(r.get(k)) for r in rows], linestyle=style,
                                **{**kw, "marker": marker if kw["marker"] else None},
                                **({} if only_align else {"label": k.removeprefix("train_")}))
            if panel == "align" and not only_align:
                # the run's colour and the term's name (rrr, con, align…) tell each line apart
                if len(ax.get_legend_handles_labels()[1]) > _LEGEND_INSIDE:
                    # many terms (the demo's seven) covered the lines: beside the panel,
                    # the figure wider by the legend's room
                    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                              borderaxespad=0.0)
                    fig.set_figwidth(fig.get_figwidth() + 1.0)
                else:
                    ax.legend(fontsize=7)
                values = [v for ln in ax.get_lines() for v in ln.get_ydata()]
                finite = [v for v in values if np.isfinite(v)]
                if finite and min(finite) > 0 and max(finite) >= 10 * min(finite):
                    # the methods' terms differ in units and scale (demo: RRR 0.02, PPI's
                    # L_ad 0.8, causal-align 0.6): on a log axis each one's relative fall is
                    # a visible slope, where a linear one flattens the small ones
                    ax.set_yscale("log")
            elif panel == "align" and max(len(c) for c in aligned.values()) > 1:
                # the line style names the column (hier-align: image and attribute level)
                longest = max(aligned.values(), key=len)
                for k, style, marker in zip(longest, _ALIGN_STYLES, _ALIGN_MARKERS,
                                            strict=False):
                    ax.plot([], [], color="k", linestyle=style, markersize=3,
                            marker=marker if longest_run <= 20 else None,
                            label=k.removeprefix("train_"))
                ax.legend(fontsize=7)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if span is not None and span[1] - span[0] < 2:
                # one or two epochs: MaxNLocator falls back to fractional ticks that overlap
                # ("0.9450.960…"); the epochs themselves, with room either side
                ax.set_xticks(range(span[0], span[1] + 1))
                ax.set_xlim(span[0] - 0.5, span[1] + 0.5)
            ax.set_title({"loss": "training loss", "auc": "validation AUC",
                          "accuracy": "accuracy (val solid, train dashed, hollow)",
                          "align": "alignment term L_align (train)" if only_align else
                          "guidance terms (train" + (", log scale)" if ax.get_yscale() == "log"
                                                     else ")")}[panel], fontsize=9)
            ax.grid(alpha=0.3)
        # one legend of the runs under the panels: long run paths crowded the first panel
        handles, labels = axes[0][0].get_legend_handles_labels()
        rows_of_legend = -(-len(labels) // 3) + sum(t.count("\n") for t in labels[::3])
        fig.set_figheight(3.0 + 0.18 * rows_of_legend)
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7,
                   frameon=False)
        if title:
            fig.suptitle(_plain(title), fontsize=10)
        fig.tight_layout(rect=(0, 0.18 * rows_of_legend / fig.get_figheight() + 0.02, 1, 1))
        atomic_savefig(fig, path, dpi=100)


def reliability_diagram(panels: Mapping[str, tuple[Any, Any]], path: str | Path,
                        n_bins: int | None = None, kind: str = "confidence") -> list[dict]:
    """Reliability diagram of one or more models (label → (probs (N, C), labels (N,))), a
    panel each: per equal-width bin the observed frequency (bars) against the mean predicted
    probability (points), the diagonal of perfect calibration, each bin's sample count
    above its bar and in a histogram below, and the ECE in the title. ``kind`` "confidence"
    (the predicted class's probability against accuracy; its ECE is metrics.json's ``ece``)
    or "positive" (two classes: class 1's probability against the share of positives);
    ``n_bins`` defaults to `ECE_BINS` (15). Returns each panel's `reliability_bins`."""
    fig, bins = _reliability_figure(panels, n_bins, kind)
    atomic_savefig(fig, path, dpi=110)
    return bins


def _reliability_figure(panels: Mapping[str, tuple[Any, Any]], n_bins: int | None,
                        kind: str) -> tuple[Figure, list[dict]]:
    from ..metrics.classification import ECE_BINS, reliability_bins

    if not panels:
        raise InputError("reliability_diagram: no predictions to draw")
    # every panel's bins first: a bad input fails before any drawing
    bins = [reliability_bins(p, y, ECE_BINS if n_bins is None else n_bins, kind)
            for p, y in panels.values()]
    x_label = ("predicted probability of class 1" if kind == "positive"
               else "confidence (predicted class's probability)")
    y_label = "share of class 1" if kind == "positive" else "accuracy"
    k = len(panels)
    fig = agg_figure(figsize=(3.6 * k, 4.2))
    axes = fig.subplots(2, k, squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [3, 1]})
    for col, (label, b) in enumerate(zip(panels, bins, strict=True)):
        top, bottom = axes[0][col], axes[1][col]
        edges = np.asarray(b["edges"])
        width = np.diff(edges)
        full = [i for i, c in enumerate(b["count"]) if c]
        observed = [b["observed"][i] for i in full]
        top.bar(edges[full], observed, width=width[full], align="edge", color="C0",
                alpha=0.7, edgecolor="k", linewidth=0.4, label="observed")
        top.plot([b["mean_predicted"][i] for i in full], observed, "o", color="C3",
                 markersize=3, label="mean predicted")
        top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect")
        for i, o in zip(full, observed, strict=True):
            top.text(edges[i] + width[i] / 2, o + 0.01, str(b["count"][i]),
                     ha="center", va="bottom", fontsize=5)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.1)  # room for the counts above a full bar
        top.set_ylabel(y_label)
        top.set_title(f"{_fit(label, 3.4, 9)}\nECE {b['ece']:.3f} ({len(width)} bins, "
                      f"n={sum(b['count'])})", fontsize=8)
        top.grid(alpha=0.3)
        bottom.bar(edges[:-1], b["count"], width=width, align="edge", color="gray",
                   edgecolor="k", linewidth=0.4)
        bottom.set_xlabel(x_label, fontsize=8)
        bottom.set_ylabel("count", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return fig, bins


def short_path_labels(paths: Sequence[str | Path]) -> list[str]:
    """Legend labels of run folders or predictions CSVs: each path below the paths' common
    folder (``…/busi/erm/seed0`` and ``…/busi/rrr/seed0`` → ``erm/seed0``, ``rrr/seed0``;
    a run and a CSV inside it → ``seed0``, ``seed0/p.csv``; one path → its own name). Full
    paths repeated for every class of a three-class figure made the legend cover the
    curves. A bare benchmark seed folder keeps its method's folder (``oracle/seed0``). The
    same path twice keeps its name, numbered, so no two labels are equal."""
    import os

    # absolute, not resolved: a symlinked run keeps the name it was given by
    full = [Path(os.path.abspath(p)) for p in paths]
    if not full:
        return []
    common = Path(os.path.commonpath(full))
    if common in full:  # one path holds the others (or there is one): name it, too
        common = common.parent
    labels = [str(p.relative_to(common)) if p != common else p.name for p in full]
    # a benchmark's run folder is runs/<dataset>/<method>/seed<k>: "seed0" alone does not
    # say whose run it is, so it keeps its method's folder ("oracle/seed0")
    labels = [f"{common.name}/{label}"
              if re.fullmatch(r"seed\d+", label.split("/")[0]) and common.name else label
              for label in labels]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


# a class's line style where several runs' one-vs-rest curves share the axes (colour: run)
_CLASS_STYLES = ("-", "--", ":", "-.")


def roc_figure(curves: Mapping[str, tuple[Any, Any]], path: str | Path,
               points: Mapping[str, Sequence[tuple[str, float]]] | None = None,
               title: str | None = None,
               bands: Mapping[str, Mapping[str, Any]] | None = None,
               class_names: Mapping[str, Sequence[str]] | None = None
               ) -> dict[str, list[dict]]:
    """ROC curves of one or more models (label → (probs (N, C), labels (N,))) on one axes:
    for two classes class 1's curve, for more each present class against the rest (the
    curves `classification_metrics`' macro AUC averages), each with its AUC in the legend,
    and the chance diagonal. ``points``: per label, thresholds on class 1's probability to
    mark on its curve (name, threshold), e.g. the argmax's 0.5 and an operating point.
    ``bands``: per label, a pointwise confidence band of its class-1 curve to shade
    (`metrics.roc.roc_band`'s result; two-class labels only). ``class_names``: per label,
    its classes' names, so a one-vs-rest curve reads "label · malignant vs rest" (without,
    "label · class 2").
    Returns per label each curve's ``{"class", "auc", "fpr", "tpr", "points"}`` (what was
    drawn; ``points`` each mark's name, threshold, fpr and tpr)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from ..metrics.classification import _checked

    if not curves:
        raise InputError("roc_figure: no predictions to draw")
    drawn: dict[str, list[dict]] = {}
    checked = {}
    for label, (probs, labels) in curves.items():  # every input checked before drawing
        p, y = checked[label] = _checked(probs, labels)
        classes = [1] if p.shape[1] == 2 else [int(c) for c in np.unique(y)]
        if len(np.unique(y)) < 2:
            raise InputError(f"roc_figure: '{label}' holds one class only; a ROC curve needs "
                             f"positives and negatives")
        band = (bands or {}).get(label)
        if band is not None and (p.shape[1] != 2 or band.get("positive") != 1):
            raise InputError(f"roc_figure: the band of '{label}' must be class 1's curve of "
                             f"a two-class model")
        drawn[label] = []
        for c in classes:
            fpr, tpr, _ = roc_curve(y == c, p[:, c])
            drawn[label].append({"class": c, "auc": float(roc_auc_score(y == c, p[:, c])),
                                 "fpr": fpr, "tpr": tpr})
    fig = agg_figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="chance")
    # several runs' one-vs-rest curves (2 runs × 3 classes: six curves, six colours): the
    # run is the colour and the class the line style, so the runs' curves of one class
    # differ in colour only; runs (report methods) outnumber the 2-4 classes of these tasks
    grouped = len(drawn) > 1 and any(len(parts) > 1 for parts in drawn.values())
    colour = 0
    for run_index, (label, parts) in enumerate(drawn.items()):
        for part in parts:
            names = (class_names or {}).get(label)
            # a reader of a 3-class figure asks "which class?": its name, not its index
            name = (label if len(parts) == 1 else f"{label} · {names[part['class']]} vs rest"
                    if names else f"{label} · class {part['class']}")
            if grouped:
                colour = run_index
            style = _CLASS_STYLES[part["class"] % len(_CLASS_STYLES)] if grouped else "-"
            ax.plot(part["fpr"], part["tpr"], color=f"C{colour}", linewidth=1.4,
                    linestyle=style, label=f"{_fit(name, 2.6, 7)} (AUC {part['auc']:.3f})")
            band = (bands or {}).get(label)
            if band is not None:
                ax.fill_between(band["fpr"], band["lo"], band["hi"], color=f"C{colour}",
                                alpha=0.18, linewidth=0,
                                label=f"pointwise 95 % band ({band['n']} resamples)")
            part["points"] = []
            if len(parts) == 1:
                p, y = checked[label]
                for k, (what, t) in enumerate((points or {}).get(label, ())):
                    called = p[:, 1] >= t
                    sens, fall = float(called[y == 1].mean()), float(called[y == 0].mean())
                    part["points"].append({"name": what, "threshold": float(t),
                                           "fpr": fall, "tpr": sens})
                    ax.plot([fall], [sens], "osD^v"[k % 5], color=f"C{colour}", markersize=6,
                            markeredgecolor="k", label=_plain(f"{what}: sens {sens:.2f}, "
                                                              f"spec {1 - fall:.2f}"))
            colour += 1
    _finish_roc_axes(fig, ax, path, title, room=True)
    return drawn


def _finish_roc_axes(fig: Figure, ax: Any, path: str | Path, title: str | None,
                     room: bool = False) -> None:
    """The unit square, axis names, title, legend and save every ROC figure shares;
    ``room``: a legend of more than `_LEGEND_INSIDE` entries goes below the axes."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    if title:
        ax.set_title(_fit(title, 4.2, 8), fontsize=8)
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[1])
    if not room or entries <= _LEGEND_INSIDE:
        ax.legend(fontsize=6, loc="lower right")
    else:
        # a tall legend in the corner covered the curves (2 runs × 3 classes + chance):
        # below the axes, the figure taller by the legend's measured height (wrapped
        # labels take two rows; an estimate per entry cut the last ones off)
        # at the figure's foot, as `training_curves` lays its legend out (one in axes
        # coordinates slid off the figure: the equal-aspect axes sit mid-slot); still the
        # axes' legend, kept out of tight_layout, which makes room for it by `rect`
        legend = ax.legend(fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 0),
                           bbox_transform=fig.transFigure)
        legend.set_in_layout(False)
        # + 0.3 in: tight_layout placed the x label a few pixels into a flush legend
        height = legend.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi + 0.3
        fig.set_figheight(fig.get_figheight() + height)
        ax.set_anchor("N")  # centred in its taller slot, the x label ran into the legend
        fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))
        atomic_savefig(fig, path, dpi=110)
        return
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


# legend entries that still fit the ROC axes' empty lower-right corner
_LEGEND_INSIDE = 5


# the band of a method with several seeds: what is shaded, in words (legend, report caption)
SEED_BAND = "min–max of the seeds' curves"


def roc_seeds_figure(runs: Mapping[str, Sequence[tuple[Any, Any]]], path: str | Path,
                     title: str | None = None, n_boot: int = 1000, boot_seed: int = 0
                     ) -> dict[str, dict[str, Any]]:
    """Two-class ROC curves of several methods, each over its seeds (label → [(probs (N, 2),
    labels (N,)) per seed]), on one axes. Several seeds: the mean of the seeds' class-1
    curves at every 0.01 of false-positive rate (vertical averaging, `metrics.roc_at`),
    shaded between the seeds' lowest and highest curve there (`SEED_BAND`); one seed: its
    own curve (scikit-learn's points) with `metrics.roc_band`'s pointwise 95 % bootstrap
    band (``n_boot`` resamples, ``boot_seed``). Legend: "label (AUC mean (std) over n
    seeds)", scikit-learn's AUC per seed, std with ddof 0 as the results tables.
    Returns per label ``{"aucs", "fpr", "tpr" (the drawn curve), "band_fpr", "lo", "hi",
    "band" ("seeds" or "bootstrap")}``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from ..metrics.classification import _checked
    from ..metrics.roc import ROC_BAND_GRID, roc_at, roc_band
    from .tables import fmt_mean_std

    if not runs or not all(runs.values()):
        raise InputError("roc_seeds_figure: no predictions to draw")
    drawn: dict[str, dict[str, Any]] = {}
    for label, seeds in runs.items():  # every input checked before drawing
        checked = [_checked(p, y) for p, y in seeds]
        if any(p.shape[1] != 2 for p, _ in checked):
            raise InputError(f"roc_seeds_figure: '{label}' is not a two-class model; "
                             f"roc_figure draws each class against the rest")
        aucs = [float(roc_auc_score(y == 1, p[:, 1])) for p, y in checked]
        if len(checked) == 1:
            p, y = checked[0]
            band = roc_band(p, y, n=n_boot, seed=boot_seed)
            fpr, tpr, _ = roc_curve(y == 1, p[:, 1])
            drawn[label] = {"aucs": aucs, "fpr": fpr, "tpr": tpr, "band_fpr": band["fpr"],
                            "lo": band["lo"], "hi": band["hi"], "band": "bootstrap"}
        else:
            at = np.stack([roc_at(p, y) for p, y in checked])
            drawn[label] = {"aucs": aucs, "fpr": ROC_BAND_GRID, "tpr": at.mean(axis=0),
                            "band_fpr": ROC_BAND_GRID, "lo": at.min(axis=0),
                            "hi": at.max(axis=0), "band": "seeds"}
    fig = agg_figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="chance")
    for k, (label, d) in enumerate(drawn.items()):
        n = len(d["aucs"])
        ax.plot(d["fpr"], d["tpr"], color=f"C{k}", linewidth=1.4,
                label=f"{_fit(label, 2.6, 7)} (AUC {fmt_mean_std(d['aucs'])} over {n} "
                      f"seed{'s' if n > 1 else ''})")
        ax.fill_between(d["band_fpr"], d["lo"], d["hi"], color=f"C{k}", alpha=0.15,
                        linewidth=0)
    # the demo's six methods + chance: a legend over the curves, as in `roc_figure`
    _finish_roc_axes(fig, ax, path, title, room=True)
    return drawn
