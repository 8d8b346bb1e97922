"""The evaluation hot path gives the numbers of the straightforward implementation while
running the model fewer times; dtype agnosticism of the metrics and explainers (float64 in,
float64 out), checked on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.data.format import LesionDataset
from causalign.engine.evaluate import evaluate_split, iterate_batches
from causalign.errors import InputError
from causalign.explain import get_explainer
from causalign.methods import build_method
from causalign.metrics import (
    cam_precision,
    deletion_scores,
    iou_dice,
    mass_in_mask,
    normalize_maps,
)
from causalign.models import build_model

FRACTIONS = (0.01, 0.1, 0.2)


def _bench_module():
    """benchmarks/bench_eval_hotpath.py, whose `before_evaluate` is the evaluation as written
    before the fused pass: a prediction pass over the split, then per batch the prediction
    again, the map of that prediction (its own forward) and deletion (its own baseline)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_eval_hotpath.py"
    spec = importlib.util.spec_from_file_location("bench_eval_hotpath", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(ds, seed=0):
    torch.manual_seed(seed)
    model = build_model("cnn7", ds.image_shape[0], ds.num_classes, width=4)
    # non-trivial BatchNorm statistics, so eval and train mode differ
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("saliency", ["gradcam", "gradient"])
def test_evaluate_split_matches_the_reference_implementation(tiny_data, saliency):
    ds = LesionDataset(tiny_data, "test")
    ds.has_mask[::3] = False  # some samples without mask, so the subsets differ
    model = _model(ds)
    method = build_method("erm")
    out = evaluate_split(model, method, ds, "cpu", saliency=saliency, fractions=FRACTIONS,
                         batch_size=5)
    ref = _bench_module().before_evaluate(model, method, ds, "cpu", saliency, FRACTIONS,
                                          batch_size=5)
    for key, want in ref.items():
        if key == "deletion":
            assert out[key] == pytest.approx(want, abs=1e-6)
        elif want is None:
            assert out[key] is None, key
        else:
            assert out[key] == pytest.approx(want, abs=1e-6), key
    assert out["n"] == len(ds)


def test_evaluate_split_runs_the_model_once_per_fraction_plus_one(tiny_data):
    """Before: 4 + len(fractions) forwards per batch (separate prediction pass, prediction
    again, Grad-CAM's own forward, the deletion baseline); now 1 + len(fractions)."""
    ds = LesionDataset(tiny_data, "test")
    model = _model(ds)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        evaluate_split(model, build_method("erm"), ds, "cpu", saliency="gradcam",
                       fractions=FRACTIONS, batch_size=len(ds))
    finally:
        handle.remove()
    assert len(calls) == 1 + len(FRACTIONS)
    assert sum(calls) == (1 + len(FRACTIONS)) * len(ds)


def test_evaluate_split_restores_train_mode(tiny_data):
    ds = LesionDataset(tiny_data, "test")
    model = _model(ds).train()
    model.features[1].eval()  # a submodule with its own flag
    evaluate_split(model, build_method("erm"), ds, "cpu", fractions=(0.1,))
    assert model.training and not model.features[1].training
    assert all(m.training for i, m in enumerate(model.features) if i != 1)


def test_evaluate_split_reports_non_finite_logits_as_such(tiny_data):
    ds = LesionDataset(tiny_data, "test")
    model = _model(ds)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    with pytest.raises(InputError, match="outputs are not finite"):
        evaluate_split(model, build_method("erm"), ds, "cpu", fractions=(0.1,))


def _gradcam_reference(model, x):
    with torch.no_grad():
        logits = model.eval()(x)
    return logits, get_explainer("gradcam", model).attribute(x, target=logits.argmax(1))


@pytest.mark.parametrize("frozen", [False, True])
def test_gradcam_predict_and_attribute_matches_captum(frozen):
    model = build_model("cnn7", 1, 3, width=4)
    model.requires_grad_(not frozen)
    x = torch.rand(6, 1, 32, 32)
    model.train()
    hooks = (len(model.features[-1]._forward_hooks), len(model._forward_hooks))
    logits, cam = get_explainer("gradcam", model).predict_and_attribute(x)
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert (len(model.features[-1]._forward_hooks), len(model._forward_hooks)) == hooks
    assert not logits.requires_grad and not cam.requires_grad
    assert all(p.grad is None for p in model.parameters())
    ref_logits, ref_cam = _gradcam_reference(model, x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert cam.shape == ref_cam.shape == (6, 1, 32, 32)
    torch.testing.assert_close(cam, ref_cam, rtol=1e-4, atol=1e-6)


def test_default_predict_and_attribute_is_the_map_of_the_argmax():
    model = build_model("cnn7", 1, 2, width=4).eval()
    x = torch.rand(3, 1, 16, 16)
    logits, maps = get_explainer("gradient", model).predict_and_attribute(x)
    ref = get_explainer("gradient", model).attribute(x, target=model(x).argmax(1))
    torch.testing.assert_close(maps, ref)
    with pytest.raises(InputError, match="NaN/inf"):
        get_explainer("gradcam", model).predict_and_attribute(x * float("nan"))


def test_deletion_with_given_logits_equals_its_own_baseline():
    model = build_model("cnn7", 1, 2, width=4).eval()
    x = torch.rand(4, 1, 16, 16)
    maps = torch.rand(4, 16, 16)
    t = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        logits = model(x)
    a = deletion_scores(model, x, maps, t, FRACTIONS)
    b = deletion_scores(model, x, maps, t, FRACTIONS, logits=logits)
    for f in FRACTIONS:
        torch.testing.assert_close(a[f], b[f])
    with pytest.raises(InputError, match="logits"):
        deletion_scores(model, x, maps, t, FRACTIONS, logits=logits[:2])


class _PixelSum(nn.Module):
    """Logits (0, Σ w·x): the drop of class 1's probability follows the deleted pixels."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) * self.w.flatten()).sum(1)
        return torch.stack([torch.zeros_like(z), z], 1)


def test_deletion_ranks_float64_maps_at_their_own_precision():
    """Map values 1 + k·1e-10 are distinct in float64 but all 1.0 in float32: ranked in
    float32 they tie and the stable sort deletes the first pixels instead of the top ones."""
    n = 16
    w = torch.zeros(n, dtype=torch.float64)
    w[-1] = 5.0  # only the last pixel matters to the model
    model = _PixelSum(w)
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    maps = (1 + 1e-10 * torch.arange(n, dtype=torch.float64)).view(1, 4, 4)  # last = top
    drop = deletion_scores(model, x, maps, 1, fractions=(1 / n,))[1 / n]
    assert drop.dtype == torch.float64
    assert float(drop) == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item() - 0.5)


def test_localisation_keeps_float64():
    maps = torch.rand(3, 8, 8, dtype=torch.float64)
    ann = torch.zeros(3, 8, 8)
    ann[:, 2:5, 2:5] = 1
    assert cam_precision(maps, ann).dtype == torch.float64
    assert mass_in_mask(maps, ann).dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in iou_dice(maps, ann))


@pytest.mark.parametrize("name", ["gradcam", "gradient", "input-x-gradient", "wbp",
                                  "lrp-epsilon"])
def test_explainers_work_in_float64(name):
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).double().eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    explainer = get_explainer(name, model)
    a = explainer.attribute(x, target=torch.tensor([0, 1]))
    assert a.dtype == torch.float64 and torch.isfinite(a).all()
    logits, maps = explainer.predict_and_attribute(x)
    assert logits.dtype == maps.dtype == torch.float64


def test_evaluate_split_of_a_float64_model(tiny_data):
    ds = LesionDataset(tiny_data, "test")
    model = _model(ds).double()

    class Float64Input(type(build_method("erm"))):
        def model_input(self, batch):
            return batch["image"].double()

    out = evaluate_split(model, Float64Input(), ds, "cpu", fractions=(0.1,))
    assert np.isfinite(out["loss"]) and out["n"] == len(ds)
    assert np.isfinite(out["deletion"]["0.1"]) and out["cam_precision"] is not None


def test_mass_in_mask_of_a_large_half_map():
    """A half-precision sum of 90 000 unit pixels is inf (half tops out at 65 504): the share
    came out 0 instead of 0.5."""
    maps = torch.ones(1, 300, 300, dtype=torch.float16)
    ann = torch.zeros(1, 300, 300)
    ann[:, :150] = 1
    assert float(mass_in_mask(maps, ann)[0]) == pytest.approx(0.5)


def test_quick_metrics_and_attribute_accuracy_restore_modes_and_match_a_reference(tiny_data):
    from causalign.engine.evaluate import attribute_accuracy, quick_metrics
    from causalign.models import HierarchicalModel, MLPHead

    ds = LesionDataset(tiny_data, "test")
    p = len(ds.meta.attributes)
    torch.manual_seed(0)
    model = HierarchicalModel(build_model("cnn7", ds.image_shape[0], p, width=4),
                              MLPHead(p, ds.num_classes)).train()
    method = build_method("erm")
    q = quick_metrics(model, method, ds, "cpu")
    acc = attribute_accuracy(model, method, ds, "cpu", batch_size=5)
    assert all(m.training for m in model.modules())  # both left the model in eval mode
    model.eval()
    with torch.no_grad():
        b = ds.batch(torch.arange(len(ds)))
        logits = model(b["image"])
        a_logits = model.attributes(b["image"])
    assert q["loss"] == pytest.approx(float(F.cross_entropy(logits, b["label"])), abs=1e-6)
    assert q["accuracy"] == pytest.approx(float((logits.argmax(1) == b["label"]).double().mean()))
    known = b["attr_known"]
    hit = ((a_logits > 0) == (b["attributes"] > 0.5)) & known
    for j, name in enumerate(ds.meta.attributes):
        k = int(known[:, j].sum())
        want = None if k == 0 else float(hit[:, j].sum()) / k
        assert acc["per_attribute"][name] == (None if want is None else pytest.approx(want))


def test_bench_eval_hotpath_script_runs_and_agrees(tmp_path, monkeypatch):
    """benchmarks/bench_eval_hotpath.py at a tiny size: same metrics before and after, fewer
    model runs (its timings are not checked: tests do not time)."""
    import json
    import sys

    mod = _bench_module()
    out = tmp_path / "hot.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(out), "--n", "12", "--size", "32",
                                      "--repeats", "1"])
    mod.main()
    res = json.loads(out.read_text())
    assert res["max_abs_metric_difference"] <= 1e-6
    # one batch: before 1 prediction pass + (pred + Grad-CAM + baseline + 5 fractions)
    assert res["model_runs"] == {"before": 9, "after": 6}
    assert res["seconds_min"]["after"] > 0


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_iterate_batches_refuses_a_bad_batch_size(tiny_data, bad):
    """-1 yielded no batch at all (evaluation then failed far away in torch.cat), 0 a bare
    range() error."""
    ds = LesionDataset(tiny_data, "test")
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        list(iterate_batches(ds, bad))
    with pytest.raises(InputError, match="batch_size"):
        evaluate_split(_model(ds), build_method("erm"), ds, "cpu", batch_size=bad)


def test_localisation_of_boolean_maps():
    """A binary (thresholded) map crashed cam_precision/iou_dice/normalize_maps inside torch
    (bool − bool is not defined); it scores like the same map as 0/1 floats."""
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[:, :4] = True
    m[1] = False  # an empty map too
    ann = torch.zeros(2, 8, 8)
    ann[:, :2] = 1
    torch.testing.assert_close(cam_precision(m, ann), cam_precision(m.float(), ann))
    for got, want in zip(iou_dice(m, ann), iou_dice(m.float(), ann), strict=True):
        torch.testing.assert_close(got, want)
    assert float(cam_precision(m, ann)[0]) == pytest.approx(0.5)
    torch.testing.assert_close(normalize_maps(m)[0], m.float())


def test_deletion_of_a_bfloat16_model_is_not_quantised():
    """The drop was computed from bfloat16 probabilities (spacing 2⁻⁸ near 0.54): deleting
    one pixel of weight 0.01 came out 0 instead of ≈ 0.0024."""
    n = 16
    model = _PixelSum(torch.full((n,), 0.01)).to(torch.bfloat16)
    x = torch.ones(1, 1, 4, 4, dtype=torch.bfloat16)
    maps = torch.arange(n, dtype=torch.float32).view(1, 4, 4)
    drop = deletion_scores(model, x, maps, 1, fractions=(1 / n,))[1 / n]
    deleted = x.clone()
    deleted.view(-1)[-1] = 0  # the top pixel of the map
    with torch.no_grad():  # the model's own bfloat16 logits, their softmax in float64
        z0, z1 = model(x)[0].double(), model(deleted)[0].double()
    want = float(z0.softmax(0)[1] - z1.softmax(0)[1])
    assert want > 0.002
    assert drop.dtype == torch.float32
    assert float(drop) == pytest.approx(want, rel=1e-5)
