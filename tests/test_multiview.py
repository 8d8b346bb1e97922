"""Multi-view volume model (seed 002, App. E.3): shapes, attention, slice sampling, WBP, PPI."""

from __future__ import annotations

import json

import pytest
import torch

from causalign.cli import main
from causalign.data.synth import SynthConfig, generate
from causalign.engine import TrainConfig
from causalign.errors import CausalignError
from causalign.explain import get_explainer
from causalign.explain.wbp import wbp_weights
from causalign.methods import DataInfo, build_method
from causalign.models import MultiViewCNN, build_model


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol") / "data"
    generate(root, SynthConfig(n_train=16, n_val=8, n_test=8, size=32, depth=4, seed=5))
    return root


def _model(**kw) -> MultiViewCNN:
    torch.manual_seed(0)
    return MultiViewCNN(1, 2, width=4, **kw)


def test_output_is_log_probability_of_attention_pooled_slices():
    model = _model().eval()
    x = torch.rand(3, 1, 6, 32, 32)
    out = model(x)
    assert out.shape == (3, 2)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-6)
    w = model.last_attention
    assert w.shape == (3, 6) and torch.allclose(w.sum(1), torch.ones(3), atol=1e-6)
    assert (w >= 0).all()
    # P = Σ_i w_i p_i with p_i the per-slice class probabilities.
    views = x.transpose(1, 2).reshape(18, 1, 32, 32)
    p = model.slice_cnn(views).softmax(1).view(3, 6, 2)
    assert torch.allclose(out.exp(), (w.unsqueeze(-1) * p).sum(1), atol=1e-6)


def test_attention_depends_on_slice_position():
    model = _model().eval()
    with torch.no_grad():
        model.position.weight.normal_(0, 3)
        model.attention.weight.normal_(0, 1)
    x = torch.rand(1, 1, 1, 32, 32).expand(1, 1, 5, 32, 32)  # identical slices
    model(x)
    w = model.last_attention[0]
    assert w.max() - w.min() > 1e-3  # only the position embedding tells them apart


def test_random_slice_subset_in_train_mode_only():
    model = _model(train_slices=0.5).train()
    x = torch.rand(8, 1, 10, 32, 32)
    model(x)
    used = model.last_slices
    assert used.shape == (8, 5)
    assert all(len(set(row.tolist())) == 5 for row in used)  # no repeats
    assert len({tuple(r.tolist()) for r in used}) > 1  # samples draw their own subsets
    assert torch.allclose(model.last_attention.sum(1), torch.ones(8), atol=1e-6)
    model.eval()
    model(x)
    assert torch.equal(model.last_slices, torch.arange(10).expand(8, 10))
    assert _model(train_slices=3).train().slices_used(2, 10, torch.device("cpu")).shape == (2, 3)


def test_wbp_and_ppi_on_volumes():
    model = _model().train()
    x = torch.rand(2, 1, 4, 32, 32)
    s = get_explainer("wbp", model).attribute(x, target=torch.tensor([0, 1]))
    assert s.shape == x.shape and torch.isfinite(s).all() and s.abs().sum() > 0
    assert model.training  # WBP maps in eval mode (all slices) and restores the flag
    w = wbp_weights(model, x, 1, create_graph=True)
    grads = torch.autograd.grad((x * w).clamp_min(0).sum(), list(model.parameters()),
                                allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    out = build_method("ppi")(model, {"image": x, "label": torch.tensor([0, 1])})
    assert torch.isfinite(out.total) and {"con", "ad", "reg"} <= set(out.parts)
    out.total.backward()
    assert model.attention.weight.grad is not None
    # The options that change the contrasts work on volumes too (per-volume mean fill).
    opts = {"contrast_on": "positive", "fill": "mean"}
    out = build_method("ppi", opts)(model, {"image": x, "label": torch.tensor([0, 1])})
    assert torch.isfinite(out.total) and {"con", "ad", "reg"} <= set(out.parts)
    with pytest.raises(CausalignError, match="gradcam needs 2D"):
        build_method("ppi", {"saliency": "gradcam"})(model, {"image": x,
                                                              "label": torch.tensor([0, 1])})


def test_delta_and_learned_tau_receive_gradient():
    model = _model(learn_tau=True, tau=0.5).eval()
    assert model.temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        model.attention.weight.normal_(0, 2)
        model.position.weight.normal_(0, 2)
    model.delta.data.fill_(0.0)  # some attention logits below −δ: the ReLU clips, δ matters
    x = torch.rand(2, 1, 6, 32, 32)
    out = model(x)
    out[:, 1].sum().backward()
    assert model.log_tau.grad is not None and model.log_tau.grad.abs() > 0
    assert model.delta.grad is not None and model.delta.grad.abs() > 0
    fixed = _model()
    assert "tau" in dict(fixed.named_buffers()) and not hasattr(fixed, "log_tau")


def test_model_choice_checks_dimensionality():
    info3 = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 4, 32, 32), attributes=[])
    info2 = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 32, 32), attributes=[])
    erm = build_method("erm")
    assert isinstance(erm.build_model(TrainConfig(model="multiview"), info3), MultiViewCNN)
    with pytest.raises(CausalignError, match="use --model multiview"):
        erm.build_model(TrainConfig(model="cnn7"), info3)
    with pytest.raises(CausalignError, match="takes volumes"):
        erm.build_model(TrainConfig(model="multiview"), info2)
    assert isinstance(build_model("multiview", 1, 3), MultiViewCNN)


def test_train_ppi_multiview_on_synthetic_volumes(volumes, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(volumes), "--method", "ppi", "--model", "multiview", "--out",
                 str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--set", "width=4"]) == 0
    test = json.loads((run / "metrics.json").read_text())["test"]
    # Grad-CAM (the default evaluation map) is 2D-only: evaluation says so and uses WBP.
    assert test["saliency"] == "wbp" and "2D" in test["saliency_note"]
    assert test["cam_precision"] is not None and test["deletion"]["0.01"] is not None
    out = tmp_path / "ex"
    assert main(["explain", str(run), "--saliency", "wbp", "--out", str(out), "--limit", "2",
                 "--device", "cpu"]) == 0
    assert main(["explain", str(run), "--saliency", "gradcam", "--out", str(out),
                 "--device", "cpu"]) == 2
    assert np_shape(next((out / "maps").glob("*.npy"))) == (4, 32, 32)


def np_shape(path) -> tuple[int, ...]:
    import numpy as np

    return tuple(np.load(path).shape)


def test_report_draws_cam_and_counterfactual_figures_for_volumes(volumes, tmp_path,
                                                                 monkeypatch):
    # Before: the report's CAM grid and counterfactual figure silently left volume datasets
    # out (no figure, no note). Now each case is cut at the slice with most annotation, and
    # the CAM grid uses WBP (Grad-CAM is 2D-only), as evaluation does.
    import causalign.report.figures as F
    from causalign.report.html import write_report

    out = tmp_path / "bench"
    run = out / "runs" / "vol" / "erm" / "seed0"
    assert main(["train", str(volumes), "--method", "erm", "--model", "multiview", "--out",
                 str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--set", "width=4", "--set", "threads=1"]) == 0
    rec = {"key": "vol/erm/seed0", "dataset": "vol", "method": "erm", "label": "erm",
           "setting": "default", "seed": 0, "run_dir": "runs/vol/erm/seed0",
           "status": "done", "metrics": json.loads((run / "metrics.json").read_text())}
    (out / "results.json").write_text(json.dumps(
        {"suite": "s", "description": "", "experiments": [], "runs": [rec]}))
    drawn = {}
    cam_grid, cf_grid = F.cam_grid, F.counterfactual_grid

    def spy_cam(images, boxes, maps, path, row_titles=None):
        drawn["cam"] = (images.shape, boxes, maps["erm"].shape, row_titles)
        return cam_grid(images, boxes, maps, path, row_titles=row_titles)

    def spy_cf(images, x_stars, regions, path, row_titles=None):
        drawn["cf"] = (images.shape, x_stars.shape, regions, row_titles)
        return cf_grid(images, x_stars, regions, path, row_titles=row_titles)

    monkeypatch.setattr(F, "cam_grid", spy_cam)
    monkeypatch.setattr(F, "counterfactual_grid", spy_cf)
    page = write_report(out).read_text()
    assert "class='failed'" not in page
    assert (out / "figures" / "cam_grid_vol.png").stat().st_size > 1000
    assert (out / "figures" / "counterfactuals_vol.png").stat().st_size > 1000
    images, boxes, cam, titles = drawn["cam"]
    assert images[1:] == (1, 32, 32) and boxes.shape[1:] == (32, 32) and cam[1:] == (32, 32)
    assert all(", slice " in t for t in titles)
    assert all(b.any() for b in boxes)  # cut where the lesion is, not at an empty slice
    cf_images, cf_stars, regions, cf_titles = drawn["cf"]
    assert cf_images[1:] == cf_stars[1:] == (1, 32, 32) and regions.shape[1:] == (32, 32)
    assert all(r.any() for r in regions) and all(", slice " in t for t in cf_titles)


def test_pc_features_of_a_multiview_run_are_one_row_per_volume(volumes, tmp_path, capsys,
                                                               monkeypatch):
    """`causal pc` on a multi-view run failed with "32 feature rows, 8 attribute rows": the
    Grad-CAM layer runs once per slice. Its rows are now pooled per volume with the model's
    slice attention."""
    import numpy as np

    from causalign.causal.pc import pooled_features
    from causalign.data.format import LesionDataset
    from causalign.engine import load_run

    run = tmp_path / "run"
    assert main(["train", str(volumes), "--method", "erm", "--model", "multiview", "--out",
                 str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                 "--no-progress", "--set", "width=4"]) == 0
    _, model, method, data = load_run(run, device="cpu")
    ds = LesionDataset(data, "test")
    feats = pooled_features(model, method, ds, batch_size=3)  # a last batch of 2
    assert feats.shape[0] == len(ds) == 8
    # by hand: the slice CNN's features of every slice, weighted by the attention
    x = ds.batch(torch.arange(len(ds)))["image"]
    from causalign.models import find_cam_layer

    seen = []
    with torch.no_grad():
        model.eval()(x)
        att = model.last_attention
        views = x.transpose(1, 2).reshape(-1, *x.shape[1:2], *x.shape[3:])
        hook = find_cam_layer(model).register_forward_hook(lambda m, i, o: seen.append(o))
        model.slice_cnn(views)  # the slices alone, one image each
        hook.remove()
    per_slice = seen[0].flatten(2).mean(2).view(len(ds), x.shape[2], -1)
    expected = (per_slice * att[..., None]).sum(1).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    # the command itself, past the row check: with the sample minimum lowered (it is now
    # checked before the features), 8 test volumes still stop at the Fisher-z test's size
    import causalign.causal.pc as pc

    monkeypatch.setattr(pc, "_MIN_SAMPLES", 4)
    assert main(["causal", "pc", str(run), "--out", str(tmp_path / "pc")]) == 2
    err = capsys.readouterr().err
    assert "for 8 samples" in err and "variables + 2" in err, err
