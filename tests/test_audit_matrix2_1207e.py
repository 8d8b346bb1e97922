"""Audit (matrix 2, 1207e): every command × every model type, the report's figures."""

from __future__ import annotations

import numpy as np
import pytest

from causalign.report import figures


def _capture(monkeypatch):
    got = {}

    def save(fig, path, **kw):
        fig.canvas.draw()
        got["fig"] = fig

    monkeypatch.setattr(figures, "atomic_savefig", save)
    return got


def _one_epoch(acc: float) -> list[dict]:
    return [{"epoch": 1, "train_loss": 0.7, "train_accuracy": acc, "val_accuracy": 0.4,
             "val_auc": 0.6}]


def test_one_epoch_curves_have_integer_ticks_and_a_visible_train_accuracy(monkeypatch, tmp_path):
    """A 1-epoch run (the quick suite, any smoke test) drew its epoch axis as
    "0.9450.9600.975…" (overlapping fractional ticks) and no training accuracy at all: a
    dashed line without a marker through one point draws nothing."""
    got = _capture(monkeypatch)
    figures.training_curves({"a": _one_epoch(0.9), "b": _one_epoch(0.5)}, tmp_path / "c.png")
    axes = got["fig"].axes
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    acc = axes[2]
    train = [ln for ln in acc.get_lines() if ln.get_linestyle() == "--"]
    assert len(train) == 2
    for ln in train:  # one point each: it must carry a marker to be seen
        assert ln.get_marker() not in (None, "None", "", " ")
        assert np.isfinite(np.asarray(ln.get_ydata(), float)).all()


def _run(label: str, saliency: str, drop: float) -> dict:
    return {"status": "done", "setting": "default", "dataset": "pm", "label": label, "seed": 0,
            "metrics": {"test": {"saliency": saliency,
                                 "deletion": {"0.01": drop, "0.1": drop * 2}}}}


def test_deletion_legend_names_the_saliency_where_a_dataset_mixes_them(monkeypatch, tmp_path):
    """resnet18 at 32 px is evaluated with WBP (its Grad-CAM layer is 1x1) next to Grad-CAM
    runs: the deletion curves shared one axis with nothing saying which curve is WBP (the
    CAM grid marks that column "(WBP)"), so the WBP curve read as a far more faithful model."""
    import matplotlib.figure

    got = {}
    monkeypatch.setattr("causalign.io.atomic_savefig",
                        lambda fig, path, **kw: got.setdefault("fig", fig))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: None)
    from causalign.report.html import deletion_figure

    results = {"runs": [_run("erm", "gradcam", 0.01), _run("erm-resnet", "wbp", 0.3)]}
    assert deletion_figure(results, tmp_path / "d.png")
    labels = [t.get_text() for t in got["fig"].axes[0].get_legend().get_texts()]
    assert labels == ["erm (Grad-CAM)", "erm-resnet (WBP)"], labels


def test_pc_refusal_names_the_minimum_and_a_way_out():
    """`causalign causal pc RUN` on a small test split said only "PC check: only 16 fully
    annotated samples": not how many it needs, nor that --split train has more."""
    from causalign.causal.pc import pc_check
    from causalign.errors import CausalignError

    rng = np.random.default_rng(0)
    with pytest.raises(CausalignError) as e:
        pc_check(rng.normal(size=(16, 8)), rng.integers(0, 2, (16, 3)).astype(float),
                 rng.integers(0, 2, 16), ["a", "b", "c"])
    msg = str(e.value)
    assert "only 16 fully annotated samples" in msg and "at least 20" in msg and "split" in msg
    assert "\n" not in msg


def test_report_says_which_datasets_have_no_counterfactual_figure(monkeypatch, tmp_path):
    """A suite over a 2D and a volume dataset drew counterfactuals of the first dataset only,
    and the page did not say the second was left out (the CAM grids do say it)."""
    import json

    from causalign.report import html as rep

    def png(path):
        from PIL import Image
        Image.new("L", (4, 4), 128).save(path)

    def cam(out, results, d, p):
        png(p)
        return True

    def cf(out, results, d, p):
        png(p)
        return "erm"

    monkeypatch.setattr(rep, "cam_figure", cam)
    monkeypatch.setattr(rep, "counterfactual_figure", cf)
    monkeypatch.setattr(rep, "curves_figure", lambda out, results, d, p: False)
    monkeypatch.setattr(rep, "deletion_figure", lambda results, p: False)
    runs = [{"key": f"{d}/erm/seed0", "dataset": d, "method": "erm", "label": "erm",
             "setting": "default", "seed": 0, "experiments": [], "run_dir": f"runs/{d}",
             "status": "done", "metrics": {"test": {}}} for d in ("pm", "vol")]
    (tmp_path / "results.json").write_text(json.dumps({"suite": "s", "runs": runs,
                                                       "experiments": []}))
    page = rep.write_report(tmp_path).read_text()
    section = page.split("Counterfactuals (Fig. 9)")[1].split("<h2>")[0]
    assert "vol" in section and "not drawn" in section.lower(), section


def test_one_epoch_alignment_levels_are_told_apart(monkeypatch, tmp_path):
    """hier-align's two alignment terms (image, attribute level) were told apart by line
    style only: after one epoch, two dots of one colour and a legend of line styles."""
    got = _capture(monkeypatch)
    rows = [{**_one_epoch(0.5)[0], "train_img_align": 0.9, "train_attr_align": 0.7}]
    figures.training_curves({"hier-align": rows}, tmp_path / "c.png")
    align = got["fig"].axes[3]
    drawn = [ln for ln in align.get_lines() if len(ln.get_xdata())]
    assert len(drawn) == 2 and drawn[0].get_marker() != drawn[1].get_marker()
    proxies = {t.get_text(): h for t, h in zip(align.get_legend().get_texts(),
                                                align.get_legend().legend_handles, strict=True)}
    assert proxies["img_align"].get_marker() != proxies["attr_align"].get_marker()


def test_explain_all_draws_its_figure_from_the_exported_maps(tiny_data, tmp_path,
                                                             monkeypatch):
    """`explain --saliency all` computed every method's maps twice: once per method for the
    export, then again for all_saliency.png (minutes for the counterfactual map on large
    models). The figure now takes the exported maps of its cases."""
    import numpy as np

    from causalign.cli import main
    from causalign.engine import TrainConfig, train
    from causalign.report import figures
    from causalign.report import saliency as report_saliency

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=0), run,
          progress=False)

    def recompute(*a, **k):
        raise AssertionError("the figure's maps were computed again")

    drawn = {}
    monkeypatch.setattr(report_saliency, "compute_maps", recompute)
    monkeypatch.setattr(figures, "cam_grid", lambda images, boxes, maps, path, **k:
                        drawn.update(maps))
    out = tmp_path / "ex"
    assert main(["explain", str(run), "--saliency", "all", "--limit", "4", "--out", str(out),
                 "--no-progress"]) in (0, None)
    assert "gradient" in drawn and drawn["gradient"].shape[0] == 4
    from causalign.data.format import LesionDataset

    ids = [r.id for r in LesionDataset(tiny_data, "test").records[:4]]
    saved = np.stack([np.load(out / "gradient" / "maps" / f"{i}.npy") for i in ids])
    np.testing.assert_array_equal(drawn["gradient"], np.clip(saved, 0, None))
