"""Proactive Pseudo-Intervention: masks, losses, gradients through the map, schedule, CLI."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.cli import main
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.ppi import (
    adaptive_sigma,
    box_mask,
    contrast_loss,
    derangement,
    frozen_bn_stats,
    hard_mask,
    normalize_saliency,
    shift_masks,
    soft_mask,
    topn_mask,
)
from causalign.models import SevenLayerCNN


def points_map(points: list[tuple[int, int]], size: int = 32, value: float = 1.0):
    s = torch.zeros(1, size, size)
    for r, c in points:
        s[0, r, c] = value
    return s


# ------------------------------------------------------------------ masks


def test_normalize_saliency_clips_negatives_and_scales_to_one():
    s = torch.tensor([[[-3.0, 0.0], [1.0, 2.0]], [[0.0, 0.0], [-1.0, 0.0]]])
    n = normalize_saliency(s)
    assert torch.equal(n[0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))  # no positive evidence: nothing to mask


def test_soft_mask_threshold_and_adaptive_sigma():
    s = torch.tensor([[0.0, 0.2, 0.25, 0.3, 1.0]])
    t = soft_mask(s, omega=100, sigma=0.25)
    assert t[0, 0] < 1e-10 and t[0, 4] == pytest.approx(1.0, abs=1e-7)
    assert t[0, 2] == pytest.approx(0.5)
    assert t[0, 1] == pytest.approx(1 / (1 + math.exp(5)))
    per_image = soft_mask(torch.cat([s, s]), 100, torch.tensor([0.25, 0.95]))
    assert per_image[1, 3] < 1e-10 and per_image[1, 4] == pytest.approx(1 / (1 + math.exp(-5)))
    # adaptive σ = mean + k·std per image: [0, 0, 0, 1] → 0.25 + 1·0.433
    four = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert adaptive_sigma(four, 1.0).item() == pytest.approx(0.25 + math.sqrt(0.1875))
    method = build_method("ppi", {"adaptive_k": 1.0})
    assert torch.allclose(method.mask(four), soft_mask(four, 100, adaptive_sigma(four, 1.0)))


def test_hard_mask_keeps_points_above_k_std():
    s = points_map([(3, 4), (20, 21), (5, 30)])
    s[0, 10, 10] = 0.2  # weak point: below 7·std (std ≈ 0.054 → threshold ≈ 0.38)
    keep = hard_mask(s, k=7)
    assert keep.sum() == 3 and keep[0, 3, 4] == keep[0, 20, 21] == keep[0, 5, 30] == 1
    assert keep[0, 10, 10] == 0
    assert hard_mask(s, k=1)[0, 10, 10] == 1  # a looser k keeps it


def test_box_mask_is_centre_of_mass_plus_minus_1_2_std():
    # Three kept points: rows 10, 10, 14 → mean 11.33, std 1.886 → |r − 11.33| ≤ 1.2·1.886 + ½
    # keeps rows 9..14; the same for columns.
    s = points_map([(10, 10), (10, 14), (14, 10)])
    box = box_mask(s, k=7, box_std=1.2)
    expected = torch.zeros_like(s)
    expected[0, 9:15, 9:15] = 1
    assert torch.equal(box, expected)
    assert torch.equal(box_mask(torch.zeros(1, 8, 8)), torch.zeros(1, 8, 8))  # nothing kept
    one = box_mask(points_map([(4, 5)], size=8))
    assert one.sum() == 1 and one[0, 4, 5] == 1
    vol = box_mask(torch.zeros(1, 4, 8, 8).index_put_((torch.tensor([0]), torch.tensor([2]),
                                                        torch.tensor([3]), torch.tensor([3])),
                                                       torch.tensor(1.0)))
    assert vol.shape == (1, 4, 8, 8) and vol.sum() == 1 and vol[0, 2, 3, 3] == 1


def test_topn_mask_keeps_exactly_n_points():
    torch.manual_seed(0)
    s = 0.5 + 0.5 * torch.rand(2, 10, 10)  # all above σ, distinct
    t = topn_mask(s, 7, omega=100, sigma=0.25)
    assert ((t > 0).flatten(1).sum(1) == 7).all()
    top = s.flatten(1).topk(7, dim=1).indices
    assert torch.equal((t.flatten(1) > 0).nonzero()[:, 1].view(2, 7).sort(1).values,
                       top.sort(1).values)
    assert ((topn_mask(s, 0.05) > 0).flatten(1).sum(1) == 5).all()  # fraction of 100 points
    low = torch.full((1, 10, 10), 0.1)
    assert topn_mask(low, 7).max() < 1e-6  # restricted *soft* mask: below σ stays unmasked


def test_shift_masks_moves_every_mask():
    masks = torch.zeros(4, 32, 32)
    masks[:, 10:14, 10:14] = 1
    g = torch.Generator().manual_seed(0)
    shifted = shift_masks(masks, 0.25, generator=g)
    assert torch.equal(shifted.flatten(1).sum(1), masks.flatten(1).sum(1))
    for m in shifted:
        r, c = (m > 0).nonzero().min(0).values.tolist()
        dr, dc = min(abs(r - 10), 32 - abs(r - 10)), min(abs(c - 10), 32 - abs(c - 10))
        assert 4 <= dr <= 8 and 4 <= dc <= 8


def test_contrast_loss_and_derangement():
    logits = torch.randn(5, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    assert contrast_loss(logits, y) == pytest.approx(float(F.cross_entropy(logits, 1 - y)))
    logits3 = torch.randn(4, 3)
    y3 = torch.tensor([0, 2, 1, 2])
    p = logits3.softmax(1).gather(1, y3[:, None]).squeeze(1)
    assert contrast_loss(logits3, y3) == pytest.approx(float(-(1 - p).log().mean()), rel=1e-5)
    for n in (2, 3, 17):
        perm = derangement(n)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()


# ------------------------------------------------------------------ the loss


def _batch(n: int = 6, size: int = 32):
    torch.manual_seed(0)
    return {"image": torch.rand(n, 1, size, size), "label": torch.tensor([0, 1] * (n // 2))}


def _model():
    torch.manual_seed(0)
    return SevenLayerCNN(1, 2, width=4).train()


@pytest.mark.parametrize("mask", ["soft", "hard", "box", "topn"])
def test_loss_parts_finite(mask):
    out = build_method("ppi", {"mask": mask, "adaptive_k": 1.0 if mask == "soft" else 0.0})(
        _model(), _batch())
    assert {"cls", "con", "reg", "ad", "mask_area"} <= set(out.parts)
    assert torch.isfinite(out.total) and all(math.isfinite(v) for v in out.parts.values())


@pytest.mark.parametrize("backend", ["wbp", "gradcam", "lrp-epsilon", "gradient"])
def test_gradient_reaches_parameters_through_the_saliency(backend):
    # With only L_reg (a function of the map alone) any parameter gradient must have come
    # through the saliency computation, i.e. create_graph=True worked.
    model = _model()
    method = build_method("ppi", {"saliency": backend, "cls_weight": 0.0, "con_weight": 0.0,
                                  "ad_weight": 0.0, "reg_weight": 1.0})
    out = method(model, _batch())
    grads = torch.autograd.grad(out.total, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # L_con also trains through the soft mask: detaching the map changes the gradient.
    method = build_method("ppi", {"saliency": backend, "cls_weight": 0.0, "reg_weight": 0.0,
                                  "ad_weight": 0.0})
    conv = model.features[0].weight
    torch.manual_seed(1)
    (g_through,) = torch.autograd.grad(method(model, _batch()).total, conv)
    original = method.saliency
    method.saliency = lambda *a, **k: original(*a, **k).detach()
    torch.manual_seed(1)
    (g_detached,) = torch.autograd.grad(method(model, _batch()).total, conv)
    assert not torch.allclose(g_through, g_detached)


def test_contrasts_do_not_move_batchnorm_running_stats():
    model, batch = _model(), _batch()
    reference = _model()
    reference(batch["image"])  # one train-mode forward of the real images
    build_method("ppi")(model, batch)
    for a, b in zip(model.modules(), reference.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean)
            assert torch.allclose(a.running_var, b.running_var)
            assert a.num_batches_tracked == b.num_batches_tracked
            assert a.momentum == 0.1
    with frozen_bn_stats(model):
        model(torch.rand(4, 1, 32, 32) * 5)
    bn = model.features[1]
    assert torch.allclose(bn.running_mean, reference.features[1].running_mean)


def test_con_weight_schedule_switches_after_epoch():
    method = build_method("ppi", {"con_boost": 100.0, "con_boost_epoch": 20})
    method.on_epoch_start(20)
    assert method.con_weight_now() == 1.0
    assert method(_model(), _batch()).parts["con_weight"] == 1.0
    method.on_epoch_start(21)
    assert method.con_weight_now() == 100.0
    assert method(_model(), _batch()).parts["con_weight"] == 100.0
    assert build_method("ppi").con_weight_now() == 1.0  # off by default


def test_fraction_maps_and_contrasts_a_subset_of_the_batch():
    model, batch = _model(), _batch(n=8)
    method = build_method("ppi", {"fraction": 0.5})
    seen = []
    original = method.saliency

    def recording(m, x, target, **kw):
        seen.append((x.shape[0], target.clone()))
        return original(m, x, target, **kw)

    method.saliency = recording
    out = method(model, batch)
    assert seen[0][0] == 4  # ⌈0.5·8⌉ images get a map and contrasts
    with torch.no_grad():
        full_ce = F.cross_entropy(model(batch["image"]), batch["label"])
    assert out.parts["cls"] == pytest.approx(float(full_ce), rel=1e-5)  # L_cls: whole batch
    assert {"con", "ad", "reg"} <= set(out.parts)
    # The subset's labels travel with its images: the map is of each image's own class.
    assert seen[0][1].shape == (4,)
    with pytest.raises(ConfigError, match="fraction"):
        build_method("ppi", {"fraction": 0.0})


def test_contrast_on_positive_and_mean_fill():
    # No BatchNorm: the contrast batch's make-up must not change each image's logits.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 16 * 16, 2))
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 1, 0, 1, 0])

    def by_hand(rows: torch.Tensor, fill: torch.Tensor | float = 0.0) -> float:
        method = build_method("ppi")
        s = normalize_saliency(method.saliency(model, x, y, create_graph=False))
        x_star = x - soft_mask(s).unsqueeze(1) * (x - fill)
        with torch.no_grad():
            return float(contrast_loss(model(x_star[rows]), y[rows]))

    torch.manual_seed(1)  # the same derangement for L_ad in both calls
    pos = build_method("ppi", {"contrast_on": "positive"})(model, {"image": x, "label": y})
    torch.manual_seed(1)
    every = build_method("ppi")(model, {"image": x, "label": y})
    assert pos.parts["con"] == pytest.approx(by_hand(y == 1), rel=1e-5)
    assert every.parts["con"] == pytest.approx(by_hand(torch.ones(6, dtype=bool)), rel=1e-5)
    # fill=mean: masked pixels move to the image's mean instead of to zero.
    mean_fill = build_method("ppi", {"fill": "mean"})(model, {"image": x, "label": y})
    assert mean_fill.parts["con"] == pytest.approx(
        by_hand(torch.ones(6, dtype=bool), fill=x.mean((1, 2, 3), keepdim=True)), rel=1e-5)
    assert mean_fill.parts["con"] != pytest.approx(every.parts["con"], rel=1e-3)
    assert pos.parts["con"] != pytest.approx(every.parts["con"], rel=1e-3)
    assert pos.parts["ad"] == pytest.approx(every.parts["ad"], rel=1e-5)  # L_ad: every image
    # A batch without positives has no contrastive term, and still trains through L_reg/L_ad.
    none = build_method("ppi", {"contrast_on": "positive"})(
        model, {"image": x[y == 0], "label": y[y == 0]})
    assert "con" not in none.parts and {"reg", "ad"} <= set(none.parts)
    none.total.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    with pytest.raises(ConfigError, match="method.contrast_on must be all or positive"):
        build_method("ppi", {"contrast_on": "negative"})
    with pytest.raises(ConfigError, match="method.fill must be zero or mean"):
        build_method("ppi", {"fill": "blur"})


def test_warmup_epochs_train_l_cls_alone_first():
    model, batch = _model(), _batch()
    method = build_method("ppi", {"warmup_epochs": 2})
    method.on_epoch_start(2)
    out = method(model, batch)
    assert set(out.parts) == {"cls", "con_weight"}
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["image"]), batch["label"])
    assert float(out.total.detach()) == pytest.approx(float(ce), rel=1e-5)
    method.on_epoch_start(3)
    assert {"con", "reg", "ad"} <= set(method(model, batch).parts)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_method("ppi", {"warmup_epochs": -1})


def test_a_loop_without_on_epoch_start_is_told_its_schedule_does_not_apply():
    """A user's loop that never called on_epoch_start skipped warmup_epochs (and never
    reached con_boost) without a word; it is said once. Defaults (no schedule) stay quiet."""
    model, batch = _model(), _batch()
    method = build_method("ppi", {"warmup_epochs": 2, "con_boost": 100})
    with pytest.warns(UserWarning, match=r"ppi: method.warmup_epochs=2 and method.con_boost="
                                         r"100 count epochs from on_epoch_start\(epoch\)"):
        method(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method(model, batch)  # once
        build_method("ppi")(model, batch)  # no schedule: nothing to say
        scheduled = build_method("ppi", {"warmup_epochs": 1})
        scheduled.on_epoch_start(1)  # the trainer's way
        scheduled(model, batch)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="method.mask must be one of"):
        build_method("ppi", {"mask": "blob"})
    with pytest.raises(ConfigError, match="method.saliency must be one of"):
        build_method("ppi", {"saliency": "lrp-gamma"})
    with pytest.raises(ConfigError, match="sigma"):
        build_method("ppi", {"sigma": 2.0})


# ------------------------------------------------------------------ end to end


def test_train_ppi_end_to_end_with_schedule_and_explain_all(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", str(tiny_data), "--method", "ppi", "--out", str(run), "--epochs", "2",
               "--batch-size", "16", "--device", "cpu", "--no-progress", "--set", "width=4",
               "--set", "method.con_boost=100", "--set", "method.con_boost_epoch=1"])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "ppi" and metrics["test"]["n"] == 16
    assert set(metrics["test"]["deletion"]) == {"0.002", "0.01", "0.02", "0.1", "0.2"}
    header, e1, e2 = (run / "history.csv").read_text().strip().splitlines()
    col = header.split(",").index("train_con_weight")
    assert float(e1.split(",")[col]) == 1.0 and float(e2.split(",")[col]) == 100.0
    out = tmp_path / "ex"
    assert main(["explain", str(run), "--saliency", "all", "--out", str(out), "--limit", "3",
                 "--device", "cpu"]) == 0
    assert (out / "all_saliency.png").stat().st_size > 0
    for name in ("wbp", "gradcam", "lrp-zbox", "lrp-w-square"):
        assert len(list((out / name / "maps").glob("*.npy"))) == 3


def test_bench_step_ppi(capsys):
    assert main(["bench", "step", "--method", "ppi", "--size", "32", "--batch-size", "4",
                 "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "ppi" and result["ratio_to_erm"] > 0


def test_gradcam_saliency_on_a_one_pixel_cam_layer_is_refused(tiny_data, tmp_path):
    """resnet18 at 32 px ends in a 1x1 feature map: its Grad-CAM is constant, so PPI's mask
    would cover every image (mask_area 1.0) and train on nothing."""
    from causalign.engine import TrainConfig, train

    cfg = TrainConfig(method="ppi", model="resnet18", epochs=1, batch_size=16,
                      method_args={"saliency": "gradcam"})
    with pytest.raises(ConfigError, match="Grad-CAM layer is 1x1 at 32x32 px"):
        train(tiny_data, cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "history.csv").exists()
