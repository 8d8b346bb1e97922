"""Training curves draw every explanation-guided method's guidance term (`Method.guidance_terms`),
not only causal-align's / hier-align's ``train_*align``: RRR's ``train_rrr``, PPI's
``train_con`` / ``train_ad`` / ``train_reg``, CDEP, Chang, ICNN were logged but never drawn."""

from __future__ import annotations

import csv

import pytest

from causalign.engine.trainer import TrainConfig, train
from causalign.methods.base import method_class, method_names
from causalign.report import figures


def _capture(monkeypatch) -> dict:
    """Keep the figure instead of saving it, and every `Axes.plot` call's label and y data."""
    got: dict = {"fig": None}

    def save(fig, path, **kw):
        fig.canvas.draw()
        got["fig"] = fig

    monkeypatch.setattr(figures, "atomic_savefig", save)
    return got


def _term_panel(fig):
    assert len(fig.axes) == 4, [ax.get_title() for ax in fig.axes]
    return fig.axes[3]


def _drawn(ax) -> list[tuple[str, list[float]]]:
    """(label, y values) of each line with data (legend proxies have none)."""
    return [(ln.get_label(), [float(v) for v in ln.get_ydata()]) for ln in ax.get_lines()
            if len(ln.get_xdata())]


def _base(e: int) -> dict:
    return {"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.6, "val_accuracy": 0.5,
            "val_auc": 0.6}


# columns as the demo's history.csv files log them (runs/plus-minus/<method>/seed0)
_RRR = [{**_base(e), "train_ce": 0.65, "train_rrr": r} for e, r in
        ((1, 0.0456511), (2, 0.0180781), (3, 0.0204749))]
_PPI = [{**_base(e), "train_cls": c, "train_con_weight": 1, "train_reg": g,
         "train_mask_area": 0.05, "train_empty_mask": 0, "train_con": n, "train_ad": a}
        for e, c, g, n, a in ((1, 0.57, 0.0578, 0.3609, 0.8442), (2, 0.44, 0.0430, 0.2451, 0.8338),
                              (3, 0.38, 0.0327, 0.2674, 0.6760))]
_CA = [{**_base(e), "train_ce": 0.64, "train_align_step": 1, "train_n_align": 16,
        "train_cf_diverged": 0, "train_align": v, "train_flip_rate": 0.86, "train_cg_iters": 2}
       for e, v in ((1, 0.778192), (2, 0.675841), (3, 0.627815))]


def test_every_method_declares_the_terms_it_logs():
    """The declared terms are exactly what each method puts into history.csv (its
    `LossOutput.parts`), checked on real runs in the slow test below; here the table."""
    want = {"causal-align": ("align",), "hier-align": ("img_align", "attr_align"),
            "rrr": ("rrr",), "cdep": ("cdep",), "chang": ("cf", "factual"),
            "icnn": ("filter",), "ppi": ("con", "ad", "reg"), "erm": (), "oracle": (),
            "bagnet": ()}
    assert {m: method_class(m).guidance_terms for m in method_names() if m in want} == want


def test_rrr_ppi_and_causal_align_terms_drawn_with_their_values_and_names(monkeypatch, tmp_path):
    got = _capture(monkeypatch)
    figures.training_curves({"rrr": _RRR, "ppi": _PPI, "causal-align": _CA}, tmp_path / "c.png")
    ax = _term_panel(got["fig"])
    drawn = _drawn(ax)
    assert [label for label, _ in drawn] == ["rrr", "reg", "con", "ad", "align"]
    values = dict(drawn)
    for rows, col in ((_RRR, "rrr"), (_PPI, "reg"), (_PPI, "con"), (_PPI, "ad"), (_CA, "align")):
        assert values[col] == pytest.approx([r[f"train_{col}"] for r in rows]), col
    # a run's colour: the figure legend's run, the same on every panel
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert lines[0].get_color() == got["fig"].axes[0].lines[0].get_color()
    assert len({ln.get_color() for ln in lines[1:4]}) == 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["rrr", "reg", "con", "ad", "align"]
    assert "guidance" in ax.get_title()
    # PPI's L_cls is its classification loss (as train_ce), counts and weights stay out
    assert not any(label in ("cls", "con_weight", "mask_area", "n_align", "align_step")
                   for label, _ in drawn)
    # 0.018 to 0.84: a log axis, so RRR's fall is not a flat line at the bottom
    assert ax.get_yscale() == "log"


def test_a_term_with_non_positive_values_stays_on_a_linear_axis(monkeypatch, tmp_path):
    """ICNN's filter loss is a −MI (negative): a log axis would drop it."""
    got = _capture(monkeypatch)
    icnn = [{**_base(e), "train_ce": 0.6, "train_filter": -3.0 / e} for e in (1, 2)]
    figures.training_curves({"icnn": icnn, "rrr": _RRR}, tmp_path / "c.png")
    ax = _term_panel(got["fig"])
    assert dict(_drawn(ax))["filter"] == pytest.approx([-3.0, -1.5])
    assert ax.get_yscale() == "linear"


def test_one_method_alone_gets_the_fourth_panel(monkeypatch, tmp_path):
    got = _capture(monkeypatch)
    chang = [{**_base(1), "train_ce": 0.6, "train_cf": 0.4, "train_factual": 0.7}]
    figures.training_curves({"chang": chang}, tmp_path / "c.png")
    ax = _term_panel(got["fig"])
    assert _drawn(ax) == [("cf", [0.4]), ("factual", [0.7])]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cf", "factual"]


def test_guard_causal_align_and_hier_align_panels_unchanged(monkeypatch, tmp_path):
    """Guard: alone, the alignment methods keep their columns, title and legend."""
    got = _capture(monkeypatch)
    figures.training_curves({"causal-align": _CA}, tmp_path / "c.png")
    ax = _term_panel(got["fig"])
    assert [v for _, v in _drawn(ax)] == [pytest.approx([0.778192, 0.675841, 0.627815])]
    assert ax.get_title() == "alignment term L_align (train)"
    assert ax.get_legend() is None and ax.get_yscale() == "linear"
    hier = [{**_base(1), "train_attr_align": 0.72, "train_attr_align_grad_scale": 0.9,
             "train_attr_n_align": 63, "train_img_align": 0.88, "train_img_n_align": 16}]
    figures.training_curves({"hier-align": hier}, tmp_path / "h.png")
    ax = _term_panel(got["fig"])
    assert [v for _, v in _drawn(ax)] == [[0.72], [0.88]]
    assert ax.get_title() == "alignment term L_align (train)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["attr_align", "img_align"]


def test_guard_a_history_without_terms_draws_three_panels(monkeypatch, tmp_path):
    """Guard: ERM / oracle / BagNet (only train_ce) and old histories: three panels."""
    got = _capture(monkeypatch)
    erm = [{**_base(e), "train_ce": 0.6, "train_n_align": 3} for e in (1, 2)]
    figures.training_curves({"erm": erm, "oracle": erm}, tmp_path / "c.png")
    assert len(got["fig"].axes) == 3


@pytest.mark.parametrize("method", ["rrr", "ppi", "cdep", "chang", "icnn", "causal-align",
                                    "hier-align"])
def test_a_real_runs_history_has_its_terms_and_they_are_drawn(method, tiny_data, tmp_path,
                                                             monkeypatch):
    """One epoch on the tiny data (~1 s each): each declared term is a history.csv column,
    and the panel draws exactly its values (a renamed part would silently drop out)."""
    params = {"ppi": {"warmup_epochs": 0}}.get(method, {})
    cfg = TrainConfig(method=method, epochs=1, batch_size=16, width=4, method_args=params,
                      threads=1)
    train(tiny_data, cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    terms = method_class(method).guidance_terms
    assert {f"train_{t}" for t in terms} <= set(rows[0]), sorted(rows[0])
    got = _capture(monkeypatch)
    figures.training_curves({method: rows}, tmp_path / "c.png")
    columns = [k for k in rows[0] if k.removeprefix("train_") in terms]
    assert [v for _, v in _drawn(_term_panel(got["fig"]))] == [
        pytest.approx([float(r[k]) for r in rows]) for k in columns]
