"""Figures: example grids, saliency overlays, method × case CAM grids (paper 000 Fig. 4)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_savefig


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fit(label: str, inches: float, fontsize: float = 7) -> str:
    """Wrap a row or panel label into lines that fit `inches` (about 0.6 em per character):
    real sample ids (``Mass-Test_P_00016_LEFT_CC_1``, ``LIDC-IDRI-0002_01.2.2_n00``) have no
    spaces and ran into the next row's label or off the figure."""
    width = max(6, int(inches * 72 / (0.62 * fontsize)))
    return "\n".join(textwrap.fill(part, width, break_long_words=True, break_on_hyphens=False)
                     for part in label.split("\n"))


def _show_image(ax, image: np.ndarray) -> None:
    """image (C,H,W) or (C,D,H,W): RGB for three channels, else gray — one channel as is,
    other counts (MRI modalities: 2 for `--modalities t1ce,flair`, 4 for BraTS) their mean,
    so every modality shows (an RGB of the first three dropped FLAIR; two channels were no
    image at all for matplotlib). Volumes show the slice with the most annotation (caller
    passes 2D) or the middle slice."""
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    if image.shape[0] == 3:
        ax.imshow(np.clip(np.moveaxis(image, 0, -1), 0, 1))
    else:
        ax.imshow(image.mean(axis=0), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_box(ax, box_mask: np.ndarray, color: str = "red") -> None:
    ys, xs = np.nonzero(box_mask)
    if len(xs) == 0:
        return
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1,
                           ys.max() - ys.min() + 1, fill=False, edgecolor=color, lw=1.0))


def example_grid(images: np.ndarray, masks: np.ndarray, titles: Sequence[str], path: str | Path,
                 cols: int = 8) -> None:
    """Grid of examples with the lesion mask outlined."""
    plt = _plt()
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.05 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.axis("on")
        image, m = images[i], masks[i][0]
        if m.ndim == 3:  # a volume: show the slice with the most lesion (the middle slice
            # can miss a lesion that spans only a few slices)
            z = int(m.reshape(m.shape[0], -1).sum(1).argmax())
            image, m = image[:, z], m[z]
        _show_image(ax, image)
        if m.any():
            ax.contour(m, levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(_fit(titles[i], 1.6), fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def overlay(image: np.ndarray, saliency: np.ndarray, box_mask: np.ndarray | None,
            path: str | Path, title: str = "") -> None:
    """One image with its saliency map overlaid (jet, alpha by strength) and the box."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.6, 2.6))
    _overlay_ax(ax, image, saliency, box_mask)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _overlay_ax(ax, image: np.ndarray, saliency: np.ndarray, box_mask: np.ndarray | None):
    _show_image(ax, image)
    s = saliency.astype(np.float64)
    rng = s.max() - s.min()
    s = (s - s.min()) / rng if rng > 0 else np.zeros_like(s)
    ax.imshow(s, cmap="jet", alpha=0.45 * (s > 0.05), vmin=0, vmax=1)
    if box_mask is not None:
        _draw_box(ax, box_mask)


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
    plt = _plt()
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.8 * (len(names) + 1), 1.85 * n),
                             squeeze=False)
    for r in range(n):
        draw_input(axes[r, 0], r)
        if row_titles:  # rows are 1.85 in high, the image part about 1.4 in
            axes[r, 0].set_ylabel(_fit(row_titles[r], 1.4), fontsize=7)
        for c, name in enumerate(names, start=1):
            draw_cell(axes[r, c], r, name)
    axes[0, 0].set_title("input", fontsize=8)
    for c, name in enumerate(names, start=1):
        axes[0, c].set_title(name, fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _change_ax(ax, change: np.ndarray, region: np.ndarray | None, vmax: float | None = None):
    """Signed change x* − x summed over channels: red = increase, blue = decrease (paper 000
    Fig. 9); symmetric colour scale so white is exactly "unchanged"."""
    c = change.sum(axis=0) if change.ndim == 3 else change
    lim = float(np.abs(c).max()) if vmax is None else vmax
    ax.imshow(c, cmap="bwr", vmin=-max(lim, 1e-8), vmax=max(lim, 1e-8))
    if region is not None and region.any():
        ax.contour(region, levels=[0.5], colors="black", linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def counterfactual_triptych(image: np.ndarray, x_star: np.ndarray, region: np.ndarray | None,
                            path: str | Path, title: str = "") -> None:
    """Original | counterfactual x* | signed change x* − x (red up, blue down), with the
    annotation outlined on the change map. ``image``/``x_star`` are (C, H, W)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.5))
    _show_image(axes[0], image)
    _show_image(axes[1], x_star)
    _change_ax(axes[2], x_star - image, region)
    for ax, name in zip(axes, ("original", "counterfactual x*", "x* − x"), strict=True):
        ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


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
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.85 * n), squeeze=False)
    for r in range(n):
        _show_image(axes[r, 0], images[r])
        _show_image(axes[r, 1], x_stars[r])
        _change_ax(axes[r, 2], x_stars[r] - images[r], regions[r])
        if row_titles:
            axes[r, 0].set_ylabel(_fit(row_titles[r], 1.4), fontsize=7)
    for ax, name in zip(axes[0], ("original", "x*", "x* − x"), strict=True):
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
