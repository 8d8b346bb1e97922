"""Counterfactual figures as a reader sees them: the change panel of an x* equal to x, the
scale label of large (CT, HU) changes, a long triptych title kept on the figure, panels sized
by the image's aspect, and grid.png rows marking a search that did not flip."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import causalign.report.figures as figures  # noqa: E402
from causalign.data.format import DatasetMeta, DatasetWriter, LesionDataset  # noqa: E402
from causalign.explain.counterfactual_export import (  # noqa: E402
    CounterfactualSettings,
    export_counterfactuals,
)
from causalign.methods import build_method  # noqa: E402
from causalign.models import build_model  # noqa: E402


def _saved(monkeypatch) -> list:
    """Capture each figure, drawn, instead of writing a PNG: (figure, its renderer) (pyplot
    closes the figure after saving, which drops its Agg canvas)."""
    figs: list = []

    def capture(fig, path, **kwargs):
        fig.canvas.draw()
        figs.append((fig, fig.canvas.get_renderer()))

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    return figs


def _change_labels(saved) -> list[str]:
    fig = saved[0]
    return [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]


def test_an_unchanged_x_star_says_no_change(monkeypatch, tmp_path):
    """x* = x (e.g. ISTA under a large α) was labelled "full colour = ±1e-08": a scale for a
    change that does not exist."""
    figs = _saved(monkeypatch)
    img = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures.counterfactual_triptych(img, img.copy(), None, tmp_path / "t.png")
        figures.counterfactual_grid(img[None], img[None], np.zeros((1, 8, 8)), tmp_path / "g.png")
    assert _change_labels(figs[0]) == ["no change (x* = x)"]
    assert _change_labels(figs[1]) == ["no change (x* = x)"]
    # the panel is still white (0 at the centre of the symmetric scale), not a colour
    change = figs[0][0].axes[2].images[0]
    assert change.norm(0.0) == pytest.approx(0.5)


@pytest.mark.parametrize(("delta", "text"), [(200.0, "±200"), (1500.0, "±1500"),
                                             (0.28, "±0.28"), (0.0049, "±0.0049"),
                                             (2e-5, "±2e-05")])
def test_change_scale_is_written_without_needless_exponents(monkeypatch, tmp_path, delta,
                                                            text):
    """A CT change in HU read "full colour = ±2e+02" ('.2g')."""
    figs = _saved(monkeypatch)
    img = np.full((1, 8, 8), -500.0)
    xs = img.copy()
    xs[0, 2:4, 2:4] += delta
    figures.counterfactual_triptych(img, xs, None, tmp_path / "t.png")
    assert _change_labels(figs[0]) == [f"full colour = {text}"]


def test_a_long_triptych_title_stays_on_the_figure(monkeypatch, tmp_path):
    """A hierarchical model's triptych lists every changed attribute under the id: the line
    ran off both edges of the 6.6 in figure."""
    figs = _saved(monkeypatch)
    img = np.zeros((1, 16, 16), np.float32)
    title = ("Mass-Test_P_00016_LEFT_CC_1  pred malignant → benign  p=0.73\n"
             + ", ".join(f"{n} 0.91→0.12" for n in ("subtlety", "calcification", "margin",
                                                   "spiculation", "lobulation", "texture")))
    figures.counterfactual_triptych(img, img + 0.1, None, tmp_path / "t.png", title)
    fig, renderer = figs[0]
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    assert box.y1 <= fig.bbox.height
    # nothing was dropped: every attribute is still in the (wrapped) title
    assert all(n in fig._suptitle.get_text() for n in ("subtlety", "texture"))
    # the title clears the panel titles below it
    panel_tops = [ax.title.get_window_extent(renderer).y1 for ax in fig.axes[:3]]
    assert box.y0 >= max(panel_tops) - 1


@pytest.mark.parametrize("shape", [(24, 64), (64, 24)])
def test_triptych_panels_follow_the_image_aspect(monkeypatch, tmp_path, shape):
    """A fixed 6.6 × 2.5 in figure drew a 64 × 24 (tall) image 0.7 in wide, and a 24 × 64
    (wide) one in a third of the figure's height, the rest blank."""
    figs = _saved(monkeypatch)
    img = np.random.default_rng(0).random((1, *shape))
    figures.counterfactual_triptych(img, img + 0.05, None, tmp_path / "t.png", "t")
    fig, renderer = figs[0]
    w_in, h_in = fig.get_size_inches()
    panel = fig.axes[0].get_window_extent(renderer)
    pw, ph = panel.width / fig.dpi, panel.height / fig.dpi
    assert pw / ph == pytest.approx(shape[1] / shape[0], rel=0.05)  # pixels stay square
    if shape[0] > shape[1]:  # tall: wide enough to read (it was 0.7 in)
        assert pw >= 1.2
    else:  # wide: the image, not white space, fills the figure's height (it was a third)
        assert ph / h_in >= 0.5


def test_grid_row_of_an_unflipped_counterfactual_says_so(monkeypatch, tmp_path):
    """grid.png titled every row "<id> benign→malignant", flipped or not; the triptych of the
    same sample said "(not flipped)"."""
    root = tmp_path / "data"
    w = DatasetWriter(root, DatasetMeta("d", ["benign", "malignant"], ndim=2),
                      image_format="npy")
    rng = np.random.default_rng(0)
    for k in range(3):
        w.add(rng.random((32, 32)).astype(np.float32), label=k % 2, split="test",
              sample_id=f"s{k}")
    w.close()
    ds = LesionDataset(root, "test")
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    rows, tri = [], []
    monkeypatch.setattr(figures, "counterfactual_grid",
                        lambda *a, row_titles=None, **k: rows.extend(row_titles))
    monkeypatch.setattr(figures, "counterfactual_triptych",
                        lambda img, xs, reg, path, title="": tri.append(title))
    # no search steps: x* = x0, so nothing flips
    summary = export_counterfactuals(model, build_method("erm"), ds,
                                     CounterfactualSettings(steps=0), tmp_path / "cf")
    flipped = {r["id"]: r["flipped"] for r in summary["samples"] if "flipped" in r}
    assert flipped and not any(flipped.values())
    assert len(rows) == len(flipped)
    assert all(r.endswith("(not flipped)") for r in rows)
    assert all("(not flipped)" in t for t in tri)


def test_one_diverged_x_star_pixel_does_not_darken_the_image_panels(monkeypatch, tmp_path):
    """x and x* were drawn over the range of both: one x* pixel at 4.0 in a [0, 1] image (an
    unbounded search) drew both panels on [0, 4], the original near-black and x*'s real
    change (−0.2) invisible. They are drawn over the original's range; x* saturates."""
    figs = _saved(monkeypatch)
    img = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    xs = img.copy()
    xs[0, 2, 2] = 4.0
    xs[0, 8:11, 8:11] -= 0.2
    figures.counterfactual_triptych(img, xs, None, tmp_path / "t.png")
    figures.counterfactual_grid(img[None], xs[None], np.zeros((1, 16, 16)), tmp_path / "g.png")
    for fig, _ in figs:
        original, x_star = fig.axes[0].images[0], fig.axes[1].images[0]
        assert original.get_clim() == (0.0, 1.0) and x_star.get_clim() == (0.0, 1.0)
