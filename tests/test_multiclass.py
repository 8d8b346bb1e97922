"""More than two classes, end to end: methods' K-class behaviour (BUSI: 3 classes, CUB: 200
classes with attributes), on tiny in-memory batches and 32 px datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from causalign.data.format import DatasetMeta, DatasetWriter
from causalign.engine.config import TrainConfig
from causalign.engine.trainer import train
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.base import DataInfo
from causalign.methods.causal_align import auto_cg_iters


def _cnn(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)).train()


def _batch(n: int, classes: int, size: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 4: size // 2, size // 4: size // 2] = 1.0
    has = torch.ones(n, dtype=torch.bool)
    return {"image": x, "label": torch.arange(n) % classes, "mask": mask, "has_mask": has,
            "box_mask": mask, "has_annotation": has, "index": torch.arange(n)}


def test_causal_align_default_cg_budget_solves_a_ten_class_problem():
    """The preconditioned system is identity + rank C − 1: CG needs ~C iterations. A fixed
    default of 3 (tuned on binary data) left every sample of a 10-class problem unconverged,
    so the alignment gradient was dropped each step (cg_dropped 1.0: causal-align trained as
    ERM). The default budget now follows the number of classes."""
    classes = 10
    model = _cnn(classes)
    method = build_method("causal-align", {"steps": 3, "warm_start": False})
    out = method(model, _batch(8, classes))
    assert out.parts["n_align"] == 8
    assert out.parts["cg_dropped"] == 0.0 and out.parts["cg_converged"] == 1.0, out.parts
    # the budget follows the classes, C plus float32 slack (CG stops once every sample has
    # converged, so cg_iters reports the iterations run, 3 here, where a cap of 2 drops
    # samples)
    assert auto_cg_iters(classes, soft=False) == classes + 10
    assert out.parts["cg_iters"] <= classes


def test_causal_align_explicit_cg_iters_is_kept():
    """An explicit method.cg_iters stays the cap (here too small: samples are dropped)."""
    classes = 10
    out = build_method("causal-align", {"steps": 3, "warm_start": False, "cg_iters": 2})(
        _cnn(classes), _batch(8, classes))
    assert out.parts["cg_iters"] <= 2 * 3  # first solve + re-solve at most, 2 each
    assert out.parts["cg_dropped"] > 0.0


def _hier_batch(n: int, classes: int, attrs: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = _batch(n, classes, size=32, seed=seed)
    b["attributes"] = (torch.rand(n, attrs, generator=g) > 0.5).float()
    b["attr_known"] = torch.ones(n, attrs, dtype=torch.bool)
    return b


def _hier(classes: int, args: dict):
    method = build_method("hier-align", {"steps": 2, "attr_steps": 5, **args})
    torch.manual_seed(0)
    info = DataInfo(in_channels=1, num_classes=classes, image_shape=(1, 32, 32),
                    attributes=[f"a{i}" for i in range(4)])
    return method, method.build_model(TrainConfig(width=4), info)


def test_hier_align_refuses_a_silent_attribute_level_on_more_than_two_classes():
    """CCCE (r) is defined for a binary label: on 3 classes every sample had r unknown, so
    the attribute-level alignment (λ₂ > 0) silently never ran (n_align_attr 0 every step, in
    the training history too). Now one clear error naming method.lam2."""
    method, model = _hier(3, {})
    b = _hier_batch(6, 3)
    with pytest.raises(ConfigError, match=r"method\.lam2.*3 classes"):
        method.fit_attribution(b["attributes"], b["label"])  # what setup() runs
    with pytest.raises(ConfigError, match=r"method\.lam2.*3 classes"):
        method(model, b)  # without setup: the batch-local attribution
    # λ₂ = 0: the image level aligns, towards a* of the likeliest other class
    method, model = _hier(3, {"lam2": 0.0})
    method.fit_attribution(b["attributes"], b["label"])
    out = method(model, b)
    assert out.parts["n_align_attr"] == 0.0 and out.parts["n_align_img"] == 6.0
    assert torch.isfinite(out.total)


def test_hier_align_binary_attribute_level_still_aligns():
    method, model = _hier(2, {})
    b = _hier_batch(6, 2)
    method.fit_attribution(b["attributes"], b["label"])
    assert method(model, b).parts["n_align_attr"] > 0


BUSI = ["normal", "benign", "malignant"]


def _write_three_class(root: Path, size: int = 32) -> Path:
    """A BUSI-like 32 px dataset: 3 classes, lesion position and brightness by class, masks
    on most samples (some without: real data is partly annotated)."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root, DatasetMeta("busi-like", BUSI))
    for split, n in (("train", 24), ("val", 9), ("test", 9)):
        for i in range(n):
            y = i % 3
            img = rng.random((size, size)) * 0.2
            mask = np.zeros((size, size), np.uint8)
            c = 8 + 8 * y
            mask[12:20, c - 4:c + 4] = 1
            img[mask > 0] += 0.4 + 0.2 * y
            w.add(img.clip(0, 1), label=y, split=split, mask=mask if i % 4 else None)
    w.close()
    return root


@pytest.fixture(scope="module")
def three_class_bench(tmp_path_factory):
    """A benchmark folder holding one real 1-epoch ERM run on the 3-class dataset."""
    tmp = tmp_path_factory.mktemp("mc")
    data = _write_three_class(tmp / "data")
    out = tmp / "bench"
    run_dir = "runs/busi/erm/seed0"
    train(data, TrainConfig(method="erm", epochs=1, width=4, batch_size=8,
                            deletion_fractions=[0.1]), out / run_dir, progress=False)
    results = {"suite": "s", "description": "", "experiments": [], "runs": [
        {"key": "busi/erm/seed0", "dataset": "busi", "method": "erm", "label": "erm",
         "setting": "default", "seed": 0, "run_dir": run_dir, "status": "done",
         "metrics": {}}]}
    (out / "results.json").write_text(json.dumps(results))
    return out, results


def test_report_figures_name_the_classes_from_dataset_yaml(three_class_bench, tmp_path,
                                                           monkeypatch):
    """The CAM grid's rows read "y=2" and the counterfactuals' "0→2": on BUSI a reader had to
    know that 2 is malignant. Rows now carry dataset.yaml's class names."""
    from causalign.report import figures
    from causalign.report import html as report_html

    out, results = three_class_bench
    seen: dict[str, list[str]] = {}

    def spy(name):
        real = getattr(figures, name)

        def wrapped(*args, row_titles=None, **kw):
            seen[name] = list(row_titles or [])
            return real(*args, row_titles=row_titles, **kw)
        return wrapped

    monkeypatch.setattr(figures, "cam_grid", spy("cam_grid"))
    monkeypatch.setattr(figures, "counterfactual_grid", spy("counterfactual_grid"))
    assert report_html.cam_figure(out, results, "busi", tmp_path / "cam.png", n=3)
    assert report_html.counterfactual_figure(out, results, "busi", tmp_path / "cf.png", n=3)
    # one case per class (balanced), each row titled "<id> y=<label's name>"
    assert sorted(t.split(" ", 1)[1] for t in seen["cam_grid"]) == sorted(f"y={c}"
                                                                         for c in BUSI)
    rows = seen["counterfactual_grid"]  # "<id> y=<name>\n<pred name>→<target name>"
    pairs = [t.split("\n")[1].split(" ")[0].split("→") for t in rows]
    assert rows and all(t.split("\n")[0].split(" y=")[1] in BUSI for t in rows), rows
    assert all(p in BUSI and q in BUSI for p, q in pairs), rows


def test_class_names_in_figures_are_shortened(tmp_path):
    from causalign.report.html import class_name

    class DS:
        meta = DatasetMeta("cub", ["001.Black_footed_Albatross", "b"])

    assert class_name(DS(), 1) == "b"
    long = class_name(DS(), 0)
    assert len(long) == 20 and long.startswith("001.Black") and long.endswith("…")
    assert class_name(DS(), 5) == "5"  # no such name: the index


def test_saliency_comparison_rows_name_label_and_prediction(three_class_bench, tmp_path,
                                                             monkeypatch):
    """`explain --saliency all`'s figure titled rows "<id> y=2 p=0"; now with class names."""
    from causalign.data.format import LesionDataset
    from causalign.engine.trainer import load_run
    from causalign.report import figures
    from causalign.report.saliency import saliency_comparison

    out, _ = three_class_bench
    _, model, method, data = load_run(out / "runs/busi/erm/seed0", device="cpu")
    seen: list[str] = []
    real = figures.cam_grid

    def spy(*args, row_titles=None, **kw):
        seen.extend(row_titles or [])
        return real(*args, row_titles=row_titles, **kw)

    monkeypatch.setattr(figures, "cam_grid", spy)
    saliency_comparison(model, method, LesionDataset(data, "test"), tmp_path / "all.png",
                        names=["gradient"], limit=3)
    assert len(seen) == 3
    for title in seen:
        _, y, p = title.split(" ")
        assert y.removeprefix("y=") in BUSI and p.removeprefix("p=") in BUSI, title


def test_icnn_refuses_more_classes_than_interpretable_filters():
    """ICNN assigns filter f to class f mod C: with C above the 4 × width filters (CUB's 200
    classes at the default width 16: 64 filters) classes 64…199 owned no filter and trained
    without any part template, silently. Now a clear error naming the width to use."""
    method = build_method("icnn")
    info = DataInfo(in_channels=1, num_classes=10, image_shape=(1, 32, 32), attributes=[])
    with pytest.raises(ConfigError, match=r"10 classes.*width 2 gives 8.*width=3"):
        method.build_model(TrainConfig(width=2), info)
    model = method.build_model(TrainConfig(width=3), info)  # 12 filters: each class owns one
    assert set(model.filter_class.tolist()) == set(range(10))


def _pc_data(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    mid = (y == 1) ^ (rng.random(n) < 0.1)  # marks the middle class (10% noise)
    a = np.column_stack([mid.astype(float), rng.integers(0, 2, n).astype(float)])
    return rng.normal(size=(n, 4)), a, y


def test_pc_check_does_not_depend_on_the_class_order():
    """A 3-class label entered Fisher-z as the number 0/1/2: an attribute marking the middle
    class correlates 0 with that number, so its A–Y edge was missing under one class order
    and present under another. The label now enters as class indicators (group Y)."""
    pytest.importorskip("causallearn")
    from causalign.causal.pc import pc_check

    f, a, y = _pc_data()
    linked = []
    for order in ([0, 1, 2], [0, 2, 1], [2, 0, 1]):
        rep = pc_check(f, a, np.array(order)[y], ["a_mid", "noise"], n_components=2,
                       class_names=BUSI)
        linked.append(rep["attributes_linked_to_label"])
        assert rep["skeleton_consistent"], rep["edges"]
    assert linked == [["a_mid"]] * 3
    # binary labels: one column "Y", as before
    rep = pc_check(f, a[:, :1], (y == 1).astype(int), ["a_mid"], n_components=2)
    assert rep["attributes_linked_to_label"] == ["a_mid"]
    assert {e["to"] for e in rep["edges"]} | {e["from"] for e in rep["edges"]} <= {
        "X1", "X2", "a_mid", "Y"}


def test_pc_check_singular_data_is_one_clear_error():
    """An attribute equal to the label (or marking exactly one class) made causal-learn raise
    a bare ValueError ("correlation matrix is singular"): a traceback from `causal pc`."""
    pytest.importorskip("causallearn")
    from causalign.causal.pc import pc_check
    from causalign.errors import CausalignError

    f, a, y = _pc_data()
    a[:, 0] = (y == 1).astype(float)
    with pytest.raises(CausalignError, match=r"singular.*a_mid and Y=benign"):
        pc_check(f, a, y, ["a_mid", "noise"], n_components=2, class_names=BUSI)


def test_report_counterfactuals_stay_valid_images(three_class_bench, tmp_path, monkeypatch):
    """The report's Fig. 9 panel drew unbounded x* (values below 0 and above 1 on 8-bit
    data); it now bounds x* to the split's intensity range, as `causalign counterfactual`
    does by default."""
    from causalign.report import figures
    from causalign.report import html as report_html

    out, results = three_class_bench
    seen = {}
    real = figures.counterfactual_grid

    def spy(images, x_stars, *args, **kw):
        seen["x0"], seen["x_star"] = images, x_stars
        return real(images, x_stars, *args, **kw)

    monkeypatch.setattr(figures, "counterfactual_grid", spy)
    assert report_html.counterfactual_figure(out, results, "busi", tmp_path / "cf.png", n=6)
    assert np.abs(seen["x_star"] - seen["x0"]).max() > 0.05  # the search did move pixels
    assert seen["x_star"].min() >= 0.0 and seen["x_star"].max() <= 1.0


def test_split_range_streams_the_split(tmp_path):
    from causalign.data.format import LesionDataset
    from causalign.explain.counterfactual_export import data_range, split_range

    w = DatasetWriter(tmp_path / "f", DatasetMeta("float", ["a", "b"]), image_format="npy")
    rng = np.random.default_rng(0)
    for i in range(7):
        w.add((rng.normal(size=(8, 8)) * 300).astype(np.float32), label=i % 2, split="test")
    w.close()
    ds = LesionDataset(tmp_path / "f", "test")
    assert split_range(ds, batch_size=3) == pytest.approx(data_range(ds.images))
    assert split_range(ds)[0] < -100  # float data keeps its own range


def test_pc_check_keeps_a_continuous_label_as_one_variable():
    """A continuous score is not K classes: one indicator per distinct value made 2000
    variables and PC ran for many minutes (test_pc's X → A → Y data)."""
    from causalign.causal.pc import label_columns

    y = np.random.default_rng(0).normal(size=50)
    cols, names = label_columns(y)
    assert names == ["Y"] and cols.shape == (50, 1)
    cols, names = label_columns(np.arange(9) % 3, BUSI)
    assert names == ["Y=benign", "Y=malignant"] and cols.shape == (9, 2)


def test_cli_exports_title_rows_with_class_names(three_class_bench, tmp_path, monkeypatch):
    """`causalign counterfactual` and `causalign explain` titled their figures "0→2" and
    "y=2 p=0", as the report did; they now use dataset.yaml's names too."""
    from causalign.data.format import LesionDataset
    from causalign.engine.trainer import load_run
    from causalign.explain.counterfactual_export import export_counterfactuals, settings_for_run
    from causalign.explain.export import export_saliency
    from causalign.report import figures

    out, _ = three_class_bench
    _, model, method, data = load_run(out / "runs/busi/erm/seed0", device="cpu")
    test = LesionDataset(data, "test")
    seen: dict[str, list[str]] = {"grid": [], "single": []}
    real_grid, real_trip, real_overlay, real_cam = (
        figures.counterfactual_grid, figures.counterfactual_triptych, figures.overlay,
        figures.cam_grid)

    def grid(*a, row_titles=None, **kw):
        seen["grid"].extend(row_titles or [])
        return real_grid(*a, row_titles=row_titles, **kw)

    def trip(img, xs, reg, path, title, *a, **kw):
        seen["single"].append(title)
        return real_trip(img, xs, reg, path, title, *a, **kw)

    def cam(*a, row_titles=None, **kw):
        seen["grid"].extend(row_titles or [])
        return real_cam(*a, row_titles=row_titles, **kw)

    def over(*a, title=None, **kw):
        seen["single"].append(title)
        return real_overlay(*a, title=title, **kw)

    monkeypatch.setattr(figures, "counterfactual_grid", grid)
    monkeypatch.setattr(figures, "counterfactual_triptych", trip)
    monkeypatch.setattr(figures, "cam_grid", cam)
    monkeypatch.setattr(figures, "overlay", over)
    settings = settings_for_run(method, steps=3)
    export_counterfactuals(model, method, test, settings, tmp_path / "cf", limit=4)
    export_saliency(model, method, test, "gradient", tmp_path / "ex", limit=4)
    assert len(seen["grid"]) >= 6 and len(seen["single"]) >= 6, seen
    for title in seen["grid"] + seen["single"]:
        names = re.findall(r"(?:y=|p=|pred[= ]|→ ?)([A-Za-z]+)", title)
        assert names and all(n in BUSI for n in names), title
