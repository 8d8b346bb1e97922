"""`evaluate --bootstrap` intervals of each attribute's accuracy (hierarchical models) and of
`cam_empty_fraction`, which it did not give: checked against `bootstrap_ci` run on
per-sample values computed here independently of `evaluate_split`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hier_align import FAST

from causalign.data.format import LesionDataset
from causalign.engine import TrainConfig, train
from causalign.engine.evaluate import attribute_hits, evaluate_split
from causalign.engine.evaluate import predict as predict_split
from causalign.engine.trainer import load_run
from causalign.explain import get_explainer, saliency_map
from causalign.metrics import bootstrap_ci, normalize_maps


# a 1-epoch run on 48 images: CG misses its tolerance at the image level (warned early)
@pytest.mark.filterwarnings("ignore::causalign.errors.TrainingTroubleWarning")
def test_attribute_accuracy_intervals(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="hier-align", epochs=1, batch_size=48, width=4,
                                 device="cpu", method_args=dict(FAST)), run, progress=False)
    _, model, method, _ = load_run(run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    names = ds.meta.attributes
    # reference: the model's attribute logits on the whole split at once
    batch = ds.batch(torch.arange(len(ds)))
    with torch.no_grad():
        model.eval()
        logits = model.attributes(method.model_input(batch))
    hit = ((logits > 0) == (batch["attributes"] > 0.5)).double().numpy()
    hit[~batch["attr_known"].numpy().astype(bool)] = np.nan
    np.testing.assert_array_equal(attribute_hits(model, method, ds, "cpu", batch_size=5), hit)
    m = evaluate_split(model, method, ds, "cpu", saliency="gradient", bootstrap=200,
                       fractions=(0.1,))
    acc = m["attribute_accuracy"]
    assert acc["per_attribute"] == pytest.approx(
        {n: float(np.nanmean(hit[:, j])) for j, n in enumerate(names)}, abs=1e-12)
    p, y, _ = predict_split(model, method, ds, "cpu")
    ref = bootstrap_ci(p, y, 200, 0, per_sample={n: hit[:, j] for j, n in enumerate(names)})
    assert set(m["ci95"]["attribute_accuracy"]) == set(names)
    for n in names:
        assert m["ci95"]["attribute_accuracy"][n] == pytest.approx(ref["ci95"][n], abs=1e-12)
    assert "mean" not in m["ci95"]["attribute_accuracy"]


def test_cam_empty_fraction_interval(tiny_data, tmp_path, monkeypatch):
    """The interval is that of the per-image "map is empty" flags. A 1-epoch ERM's Grad-CAM
    is empty on none of these images, so the flags' rule is replaced (map peak below the
    split's median peak) in both evaluate_split and the reference, to resample a mix."""
    import causalign.engine.evaluate as evaluate

    run = tmp_path / "run"
    train(tiny_data, TrainConfig(method="erm", epochs=1, batch_size=16, width=4, seed=1), run,
          progress=False)
    _, model, method, _ = load_run(run, device="cpu")
    ds = LesionDataset(tiny_data, "test")
    batch = ds.batch(torch.arange(len(ds)))
    x = method.model_input(batch)
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    maps = saliency_map(get_explainer("gradcam", model).attribute(x, target=pred)).float()
    ann = batch["has_annotation"].numpy().astype(bool)
    real = normalize_maps(maps[ann])[1]
    assert not real.any()  # why the rule is replaced
    cut = float(maps[ann].flatten(1).amax(1).median())

    def peak_below_cut(m):
        return m.flatten(1).amax(1) < cut

    monkeypatch.setattr(evaluate, "normalize_maps",
                        lambda m, *a, **k: (normalize_maps(m, *a, **k)[0], peak_below_cut(m)))
    m = evaluate_split(model, method, ds, "cpu", saliency="gradcam", bootstrap=300,
                       fractions=(0.1,))
    flags = np.full(len(ds), np.nan)
    flags[ann] = peak_below_cut(maps[ann]).double().numpy()
    assert 0 < np.nanmean(flags) < 1
    assert m["cam_empty_fraction"] == pytest.approx(np.nanmean(flags), abs=1e-6)
    p, y, _ = predict_split(model, method, ds, "cpu")
    ref = bootstrap_ci(p, y, 300, 0, per_sample={"cam_empty_fraction": flags})
    lo, hi = m["ci95"]["cam_empty_fraction"]
    assert [lo, hi] == pytest.approx(ref["ci95"]["cam_empty_fraction"], abs=1e-12)
    assert lo < hi
