"""Report and figure quality: signed maps centred at 0, NaN/inf maps drawn without warnings
or blank panels, no matplotlib figures left open when a figure fails, malformed optional
inputs (cross_site.json) noted in report.html instead of a traceback, and the CAM grid and
counterfactual figures drawn when one run of a benchmark cannot be loaded."""

from __future__ import annotations

import json
import shutil
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from causalign.engine.config import TrainConfig  # noqa: E402
from causalign.engine.trainer import train  # noqa: E402
from causalign.errors import CausalignError, InputError  # noqa: E402
from causalign.report import figures  # noqa: E402
from causalign.report.html import cross_site_figure, write_report  # noqa: E402
from causalign.report.tables import fmt_mean_std  # noqa: E402


def _drawn(monkeypatch) -> list:
    """Capture the figures instead of writing PNGs: per saved figure, its images."""
    import causalign.io

    saved: list = []

    def capture(fig, path, **kwargs):
        fig.canvas.draw()  # warnings of the renderer surface here
        saved.append([im for ax in fig.axes for im in ax.images])

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    monkeypatch.setattr(causalign.io, "atomic_savefig", capture)  # html.py imports it late
    return saved


def _overlay_image(saved):
    (images,) = saved
    assert len(images) == 2  # the input, then the map
    return images[1]


def test_signed_map_overlay_is_centred_at_zero(monkeypatch, tmp_path):
    """A signed map (WBP, LRP, input × gradient) was min–max scaled into jet: 0 relevance
    got a different mid colour in every image and negative evidence looked like weak
    positive evidence. Now a diverging map with symmetric limits, 0 transparent."""
    saved = _drawn(monkeypatch)
    img = np.full((1, 8, 8), 0.5, np.float32)
    sal = np.zeros((8, 8))
    sal[:, :4] = 1.0  # positive half
    sal[:, 4:6] = -0.5  # weaker negative part
    figures.overlay(img, sal, None, tmp_path / "o.png")
    im = _overlay_image(saved)
    lo, hi = im.get_clim()
    assert lo == -hi  # symmetric: 0 in the middle of the map
    cmap = im.get_cmap()
    assert np.allclose(cmap(0.5)[:3], (1, 1, 1), atol=0.02)  # diverging, white at 0
    data = np.ma.getdata(im.get_array())
    norm = im.norm
    assert norm(data[0, 0]) > 0.95 and norm(data[0, 4]) == pytest.approx(0.25)
    assert norm(data[0, 7]) == pytest.approx(0.5)  # zero relevance → the centre
    alpha = np.asarray(im.get_alpha())
    assert alpha[0, 7] == 0 and alpha[0, 0] > alpha[0, 4] > 0  # zero is see-through


@pytest.mark.parametrize("signed,colour", [(True, "lime"), (False, "red")])
def test_the_lesion_box_is_not_red_on_a_red_blue_map(monkeypatch, tmp_path, signed, colour):
    """On a signed (red/blue) map a red lesion box read as positive evidence; unsigned jet
    maps keep the paper's red box."""
    import matplotlib.colors as mcolors

    boxes: list = []

    def capture(fig, path, **kwargs):
        boxes.extend(p.get_edgecolor() for ax in fig.axes for p in ax.patches)

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    sal = np.linspace(-1 if signed else 0, 1, 64).reshape(8, 8)
    box = np.zeros((8, 8))
    box[2:5, 2:5] = 1
    figures.overlay(np.zeros((1, 8, 8), np.float32), sal, box, tmp_path / "o.png")
    assert [mcolors.to_hex(c) for c in boxes] == [mcolors.to_hex(colour)]


def test_unsigned_map_overlay_keeps_jet(monkeypatch, tmp_path):
    saved = _drawn(monkeypatch)
    sal = np.linspace(0, 2, 64).reshape(8, 8)
    figures.overlay(np.zeros((1, 8, 8), np.float32), sal, None, tmp_path / "o.png")
    im = _overlay_image(saved)
    assert im.get_cmap().name.startswith("jet") and im.get_clim() == (0, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_pixel_neither_blanks_the_map_nor_warns(monkeypatch, tmp_path, bad):
    """One NaN pixel made max−min NaN and the whole overlay silently blank; an inf gave
    "invalid value encountered in divide" warnings and a blank map as well."""
    saved = _drawn(monkeypatch)
    sal = np.tile(np.linspace(0, 1, 8), (8, 1))
    sal[0, 0] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures.overlay(np.zeros((1, 8, 8), np.float32), sal, None, tmp_path / "o.png")
    im = _overlay_image(saved)
    alpha = np.asarray(im.get_alpha())
    # the finite part is drawn on its own scale: the strongest finite pixel is opaque-ish
    assert alpha[1, 7] > 0 and im.norm(np.ma.getdata(im.get_array())[1, 7]) == 1.0
    if np.isnan(bad):  # marked in the bad colour, not hidden
        assert alpha[0, 0] > 0 and np.ma.getdata(im.get_array())[0, 0] != \
            np.ma.getdata(im.get_array())[0, 0]


def test_change_map_with_a_nan_keeps_its_scale(monkeypatch, tmp_path):
    """One NaN in x* made the change panel's limit NaN: the whole panel came out blue."""
    saved = _drawn(monkeypatch)
    img = np.zeros((1, 8, 8), np.float32)
    xs = img.copy()
    xs[0, :, :4] = 0.2
    xs[0, 0, 7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures.counterfactual_triptych(img, xs, None, tmp_path / "t.png")
    change = saved[0][2]
    assert change.get_clim() == pytest.approx((-0.2, 0.2))


def test_a_failed_figure_is_closed(tmp_path, monkeypatch):
    """A figure whose saving or drawing failed stayed open in pyplot (write_report goes on
    after a failed figure: one leaked figure per failure)."""
    def fail(fig, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    import causalign.io
    from causalign.report.html import deletion_figure

    monkeypatch.setattr(figures, "atomic_savefig", fail)
    monkeypatch.setattr(causalign.io, "atomic_savefig", fail)  # html.py's figures
    cs = tmp_path / "cs.json"
    cs.write_text(json.dumps({"erm": {"auc": [[0.9, 0.6], [0.7, 0.8]]}}))
    results = {"runs": [{"status": "done", "setting": "default", "dataset": "pm",
                         "label": "erm", "metrics": {"test": {"deletion": {"0.1": 0.2}}}}]}
    img = np.zeros((2, 1, 8, 8), np.float32)
    box = np.zeros((2, 8, 8), bool)
    calls = [
        lambda: figures.overlay(img[0], img[0, 0], box[0], tmp_path / "a.png"),
        lambda: figures.cam_grid(img, box, {"m": img[:, 0]}, tmp_path / "b.png"),
        lambda: figures.counterfactual_triptych(img[0], img[0], box[0], tmp_path / "c.png"),
        lambda: figures.counterfactual_grid(img, img, box, tmp_path / "d.png"),
        lambda: figures.example_grid(img, img, ["x", "y"], tmp_path / "e.png"),
        lambda: figures.change_comparison_grid(img, {"m": img}, box, tmp_path / "f.png"),
        lambda: deletion_figure(results, tmp_path / "g.png"),
        lambda: cross_site_figure(cs, tmp_path / "h.png"),
    ]
    before = plt.get_fignums()
    for call in calls:
        with pytest.raises(OSError):
            call()
    assert plt.get_fignums() == before


def test_a_grid_of_no_cases_is_a_clear_error(tmp_path):
    before = plt.get_fignums()
    with pytest.raises(InputError, match="no cases to draw"):
        figures.cam_grid(np.zeros((0, 1, 8, 8)), np.zeros((0, 8, 8)), {"m": np.zeros((0, 8, 8))},
                         tmp_path / "g.png")
    assert plt.get_fignums() == before and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(("auc", "needle"), [
    ([[0.7, 0.8], [0.9]], "not a matrix of numbers"),
    ([[0.7, 0.8, 0.9], [0.6, 0.5, 0.4]], "must be a square"),
    ([0.7, 0.8], "not a matrix of numbers"),
    ([], "must be a square"),
])
def test_malformed_cross_site_json_is_noted_not_a_traceback(tmp_path, auc, needle):
    """A ragged "auc" ended `causalign benchmark` (which writes the report last) with numpy's
    "inhomogeneous shape" traceback and no report.html; a 1-D one with matplotlib's."""
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": []}))
    (out / "cross_site.json").write_text(json.dumps({"erm": {"auc": auc}}))
    before = plt.get_fignums()
    with pytest.raises(CausalignError, match=needle):
        cross_site_figure(out / "cross_site.json", out / "cs.png")
    page = write_report(out).read_text()
    assert "cross-site figure failed" in page and needle in page
    assert plt.get_fignums() == before


def test_cross_site_auc_below_half_is_not_drawn_as_half(tmp_path, monkeypatch):
    """The colour scale started at 0.5: an AUC of 0.28 (benchmarks/results/
    cross_site_seed1.json) had the colour of 0.5. Null cells read "–", not "nan"."""
    saved = _drawn(monkeypatch)
    src = tmp_path / "cs.json"
    src.write_text(json.dumps({"erm": {"auc": [[0.9, 0.28], [None, 0.8]]}, "seed": 1}))
    assert cross_site_figure(src, tmp_path / "cs.png")
    (im,) = saved[0]
    lo, hi = im.get_clim()
    assert lo <= 0.28 and hi == 1.0
    texts = [t.get_text() for t in im.axes.texts]
    assert texts == ["0.90", "0.28", "–", "0.80"]


def test_fmt_mean_std_counts_only_present_values():
    # one seed's value and one missing showed "0.500 (0.000)": a std over one number
    assert fmt_mean_std([0.5, None]) == "0.500"
    assert fmt_mean_std([0.5, 0.7]) == "0.600 (0.100)"


def test_report_dataset_names_that_slug_alike_keep_their_own_figures(tmp_path, monkeypatch):
    """"a/b" and "a b" both became cam_grid_a-b.png: the second grid overwrote the first in
    DIR/figures/."""
    from causalign.report import html as report_html

    def fake_figure(out, results, dataset, path, n=4):  # only the file names are tested
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + dataset.encode())
        return "erm"

    monkeypatch.setattr(report_html, "cam_figure", fake_figure)
    monkeypatch.setattr(report_html, "counterfactual_figure", fake_figure)
    out = tmp_path / "bench"
    out.mkdir()
    runs = [{"key": f"{d}/erm/seed0", "dataset": d, "method": "erm", "label": "erm",
             "setting": "default", "seed": 0, "run_dir": f"runs/{i}", "status": "done",
             "metrics": {}} for i, d in enumerate(("a/b", "a b"))]
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": runs}))
    write_report(out)
    grids = sorted(p.name for p in (out / "figures").glob("cam_grid_*.png"))
    assert grids == ["cam_grid_a-b-2.png", "cam_grid_a-b.png"]
    assert {(out / "figures" / g).read_bytes()[8:] for g in grids} == {b"a/b", b"a b"}


def _one_run_results(out):
    out.mkdir()
    runs = [{"key": "pm/erm/seed0", "dataset": "pm", "method": "erm", "label": "erm",
             "setting": "default", "seed": 0, "run_dir": "runs/0", "status": "done",
             "metrics": {}}]
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": runs}))


@pytest.mark.parametrize("figure", ["cam_figure", "counterfactual_figure"])
def test_report_ctrl_c_behind_a_figures_error_stops_the_report(tmp_path, monkeypatch, figure):
    """A Ctrl-C inside a figure whose clean-up then failed was written into the page as
    "figure failed" and the report went on; the interrupt must reach the caller (the CLI
    exits 130). An error with no interrupt behind it still only fails its figure."""
    from causalign.report import html as report_html

    def interrupted(out, results, dataset, path, n=4):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("clean-up failed") from None

    monkeypatch.setattr(report_html, figure, interrupted)
    out = tmp_path / "bench"
    _one_run_results(out)
    with pytest.raises(KeyboardInterrupt):
        write_report(out)
    assert not (out / "report.html").exists()

    def broken(out, results, dataset, path, n=4):
        raise RuntimeError("no model")

    monkeypatch.setattr(report_html, figure, broken)
    page = write_report(out).read_text(encoding="utf-8")
    assert "failed: no model" in page


def test_report_built_inside_a_handled_ctrl_c_keeps_figure_errors(tmp_path, monkeypatch):
    """A report built in a caller's `except KeyboardInterrupt:` block: its figure errors chain
    to that old, handled interrupt and must not be taken for a new one."""
    from causalign.report import html as report_html

    def broken(out, results, dataset, path, n=4):
        raise RuntimeError("no model")

    monkeypatch.setattr(report_html, "cam_figure", broken)
    out = tmp_path / "bench"
    _one_run_results(out)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        page = write_report(out).read_text(encoding="utf-8")
    assert "CAM grid for pm failed: no model" in page


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    """A benchmark folder with two real 1-epoch runs (erm first, then causal-align)."""
    out = tmp_path_factory.mktemp("rq") / "bench"
    runs = []
    for method in ("erm", "causal-align"):
        run_dir = f"runs/pm/{method}/seed0"
        train(tiny_data, TrainConfig(method=method, epochs=1, width=4, batch_size=16,
                                     deletion_fractions=[0.1]), out / run_dir, progress=False)
        runs.append({"key": f"pm/{method}/seed0", "dataset": "pm", "method": method,
                     "label": method, "setting": "default", "seed": 0, "run_dir": run_dir,
                     "status": "done", "metrics": {}})
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": runs}))
    return out


def test_cam_grid_and_counterfactuals_survive_one_unloadable_run(two_runs, tmp_path,
                                                                   monkeypatch):
    """The CAM grid loaded the dataset from the first run only: with that run's folder gone
    the whole grid failed ("run folder does not exist") although the other methods could be
    shown; the counterfactual figure likewise failed with its preferred run gone."""
    from causalign.report import html as report_html

    out = tmp_path / "bench"
    shutil.copytree(two_runs, out)
    shutil.rmtree(out / "runs/pm/erm")
    results = json.loads((out / "results.json").read_text())
    cams: list[list[str]] = []
    grid = figures.cam_grid

    def spy(images, boxes, maps, path, row_titles=None):
        cams.append(list(maps))
        return grid(images, boxes, maps, path, row_titles=row_titles)

    monkeypatch.setattr(figures, "cam_grid", spy)
    assert report_html.cam_figure(out, results, "pm", tmp_path / "cam.png", n=2)
    assert cams == [["causal-align"]] and (tmp_path / "cam.png").stat().st_size > 1000

    # the preferred run (causal-align) gone: the next one (erm) is shown
    out2 = tmp_path / "bench2"
    shutil.copytree(two_runs, out2)
    shutil.rmtree(out2 / "runs/pm/causal-align")
    label = report_html.counterfactual_figure(out2, results, "pm", tmp_path / "cf.png", n=1)
    assert label == "erm" and (tmp_path / "cf.png").stat().st_size > 1000

    # none loads: the first failure is what the page notes
    shutil.rmtree(out2 / "runs/pm/erm")
    with pytest.raises(CausalignError, match="erm"):
        report_html.cam_figure(out2, results, "pm", tmp_path / "cam2.png", n=2)


def test_report_cam_and_counterfactual_rows_name_their_cases(two_runs, tiny_data,
                                                            monkeypatch):
    """The report's counterfactual rows read only "benign→malignant" and the CAM grid's
    "y=benign": neither named the case, so the rows could not be matched to each other, to a
    sample, or (counterfactuals) to the true class."""
    from causalign.data.format import LesionDataset
    from causalign.report import html as report_html

    results = json.loads((two_runs / "results.json").read_text())
    rows: dict[str, list[str]] = {}
    monkeypatch.setattr(figures, "cam_grid", lambda *a, row_titles=None, **k:
                        rows.setdefault("cam", list(row_titles)))
    monkeypatch.setattr(figures, "counterfactual_grid", lambda *a, row_titles=None, **k:
                        rows.setdefault("cf", list(row_titles)))
    assert report_html.cam_figure(two_runs, results, "pm", two_runs / "cam.png", n=2)
    assert report_html.counterfactual_figure(two_runs, results, "pm", two_runs / "cf.png",
                                             n=2) == "causal-align"
    ids = {r.split(" ")[0] for r in rows["cam"]}
    assert len(ids) == 2 and ids <= {r.id for r in LesionDataset(tiny_data, "test").records}
    for title in rows["cf"]:  # "<id> y=<class>\n<pred>→<target>"
        sid, rest = title.split(" ", 1)
        assert sid in ids and rest.startswith("y=") and "→" in rest.split("\n")[1]


@pytest.mark.parametrize("text", ["P$_^$ y=1", "case$1$ y=0"])
def test_dollar_signs_in_ids_and_labels_are_shown_as_text(tmp_path, monkeypatch, text):
    """matplotlib read "$…$" in a sample id, method label or class name as math: ``P$_^$``
    raised "ParseSyntaxException" when the figure was saved (explain and the report
    failed), ``case$1$`` lost its dollar signs."""
    titles: list[str] = []
    save = figures.atomic_savefig

    def capture(fig, path, **kwargs):
        titles.extend(t.get_text() for ax in fig.axes
                      for t in (ax.title, ax.yaxis.label) if t.get_text())
        save(fig, path, **kwargs)  # the real save draws the text

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    img = np.zeros((1, 1, 8, 8), np.float32)
    box = np.zeros((1, 8, 8), bool)
    figures.overlay(img[0], img[0, 0], box[0], tmp_path / "o.png", title=text)
    figures.cam_grid(img, box, {text: img[:, 0]}, tmp_path / "g.png", row_titles=[text])
    figures.counterfactual_triptych(img[0], img[0], None, tmp_path / "t.png", title=text)
    assert (tmp_path / "o.png").exists() and (tmp_path / "g.png").exists()
    escaped = text.replace("$", r"\$")
    assert titles.count(escaped) == 3  # overlay title, grid column and row label


@pytest.mark.parametrize(("content", "needle"), [
    ('{"runs": [', "not valid JSON"),
    ('[1, 2]', "not a benchmark results file"),
    ('{"suite": "s"}', "not a benchmark results file"),
])
def test_a_broken_results_json_is_one_clear_error(tmp_path, content, needle):
    # Before: json.JSONDecodeError "Expecting value: line 1 column 12" (no file named), or
    # TypeError / KeyError 'runs'
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(CausalignError, match=needle) as info:
        write_report(tmp_path)
    assert "results.json" in str(info.value)
    assert not (tmp_path / "report.html").exists()


def test_datasets_beyond_the_cam_grids_shown_are_named(tmp_path, monkeypatch):
    """Only the first three datasets get a CAM grid; the others vanished from the page
    without a word."""
    from test_synth_report_edges import fake_model_figures

    out = fake_model_figures(monkeypatch, tmp_path)  # the page's text is tested here
    names = ["d1", "d2", "d3", "d4 <x>", "d5"]
    runs = [{"key": f"{d}/erm/seed0", "dataset": d, "method": "erm", "label": "erm",
             "setting": "default", "seed": 0, "run_dir": f"runs/{i}", "status": "done",
             "metrics": {}} for i, d in enumerate(names)]
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": runs}))
    page = write_report(out).read_text()
    assert "Not drawn (the first 3 datasets only): d4 &lt;x&gt;, d5." in page
    assert len(list((out / "figures").glob("cam_grid_*.png"))) == 3


def test_an_explicit_cross_site_file_that_is_missing_is_an_error(tmp_path):
    # write_report(out, cross_site=...) with a mistyped path left the section out silently
    (tmp_path / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": []}))
    with pytest.raises(CausalignError, match="cs.json: cross-site results file not found"):
        write_report(tmp_path, cross_site=tmp_path / "cs.json")
    assert not (tmp_path / "report.html").exists()
    src = tmp_path / "cs.json"
    src.write_text(json.dumps({"erm": {"auc": [[0.9, 0.6], [0.7, 0.8]]}}))
    assert "Cross-site generalisation" in write_report(tmp_path, cross_site=src).read_text()


def test_each_change_panel_states_its_scale(monkeypatch, tmp_path):
    """Every change panel has its own symmetric scale, which the figure did not show: a
    change of 0.5 and one of 0.005 were both full red."""
    labels: list[str] = []
    monkeypatch.setattr(figures, "atomic_savefig", lambda fig, path, **kw: labels.extend(
        ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()))
    img = np.zeros((2, 1, 8, 8), np.float32)
    xs = img.copy()
    xs[0, 0, 0, 0] = 0.5
    xs[1, 0, 0, 0] = -0.005
    figures.counterfactual_grid(img, xs, np.zeros((2, 8, 8)), tmp_path / "g.png")
    assert labels == ["full colour = ±0.5", "full colour = ±0.005"]


def test_a_long_overlay_title_stays_on_the_figure(monkeypatch, tmp_path):
    """`causalign explain` titles each overlay "<id> y=… pred=…": a CBIS-DDSM id ran off both
    edges of the 2.6 in figure."""
    seen: dict = {}

    def capture(fig, path, **kwargs):
        fig.canvas.draw()
        seen["title"] = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
        seen["fig"] = fig.bbox

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    figures.overlay(np.zeros((1, 16, 16), np.float32), np.ones((16, 16)), None,
                    tmp_path / "o.png", title="Calc-Training_P_00474_LEFT_MLO_1 y=1 pred=0")
    title, fig = seen["title"], seen["fig"]
    assert title.x0 >= fig.x0 - 0.5 and title.x1 <= fig.x1 + 0.5, (title, fig)
    assert title.y1 <= fig.y1 + 0.5


def test_long_method_labels_do_not_run_into_the_next_column(monkeypatch, tmp_path):
    """The paper suite's labels ("L_align, no hierarchy (causal-align)") are wider than a
    CAM grid column: the column titles overlapped."""
    seen: list = []

    def capture(fig, path, **kwargs):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        top = [ax for ax in fig.axes if ax.get_title()]
        top.sort(key=lambda ax: ax.get_position().x0)
        seen.extend(ax.title.get_window_extent(r) for ax in top)
        seen.append(fig.bbox)

    monkeypatch.setattr(figures, "atomic_savefig", capture)
    names = ["no L_align, no hierarchy (ERM)", "L_align, no hierarchy (causal-align)",
             "L_align + hierarchy (hier-align)"]
    img = np.zeros((1, 1, 8, 8), np.float32)
    figures.cam_grid(img, np.zeros((1, 8, 8)), {n: img[:, 0] for n in names},
                     tmp_path / "g.png")
    *titles, fig = seen
    assert len(titles) == 4  # input + three methods
    for left, right in zip(titles, titles[1:], strict=False):
        assert left.x1 <= right.x0 + 0.5, (left, right)
    assert titles[0].x0 >= fig.x0 - 0.5 and titles[-1].x1 <= fig.x1 + 0.5
