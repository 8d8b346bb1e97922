"""The training curves' guidance panel: more than five named terms (the demo's six runs
give seven: rrr, align, attr_align, img_align, reg, con, ad) put their legend beside the
panel, the figure wider, where it covered the lines; five or fewer stay inside."""

from __future__ import annotations

import pytest
from test_audit_mutfig_1207n import _saved

import causalign.report.figures as figures


def _history(terms: dict[str, list[float]]) -> list[dict]:
    return [{"epoch": str(e + 1), "train_loss": "0.7", "val_auc": "0.6",
             "val_accuracy": "0.6", "train_accuracy": "0.6",
             **{f"train_{k}": str(v[e]) for k, v in terms.items()}} for e in range(3)]


@pytest.mark.parametrize(("n_ppi_terms", "beside"), [(1, False), (3, True)])
def test_guidance_legend_goes_beside_the_panel_past_five_terms(monkeypatch, tmp_path,
                                                              n_ppi_terms, beside):
    figs = _saved(monkeypatch)
    ppi = dict(list({"con": [0.3, 0.2, 0.1], "ad": [0.8, 0.7, 0.6],
                     "reg": [0.05, 0.04, 0.03]}.items())[:n_ppi_terms])
    histories = {"rrr": _history({"rrr": [0.04, 0.02, 0.01]}),
                 "ppi": _history(ppi),
                 "causal-align": _history({"align": [0.9, 0.8, 0.7]}),
                 "hier-align": _history({"attr_align": [0.9, 0.8, 0.7],
                                         "img_align": [0.8, 0.7, 0.6]})}
    figures.training_curves(histories, tmp_path / "c.png")
    (fig,) = figs
    ax = fig.axes[3]
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 4 + n_ppi_terms
    renderer = fig.canvas.get_renderer()
    outside = legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    assert outside == beside
    assert (fig.get_figwidth() > 3.6 * 4 + 0.5) == beside
    # the legend stays inside the figure
    assert legend.get_window_extent(renderer).x1 <= fig.bbox.x1 + 1
