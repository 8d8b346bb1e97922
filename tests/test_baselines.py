"""Baselines of paper 000 §5.2: each one's defining mechanism, on small real computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from causalign.data.format import LesionDataset
from causalign.engine import TrainConfig, train
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods.cdep import contextual_decomposition
from causalign.methods.chang import augment, infill, not_class_loss
from causalign.methods.rrr import input_gradients
from causalign.models.bagnet import BagNet
from causalign.models.cnn import SevenLayerCNN
from causalign.models.icnn import filter_loss, part_templates, template_mask


def two_cue_batch(n: int = 32, size: int = 16) -> dict:
    """Label shown twice: a faint blob inside the annotation (the causal cue) and a bright
    "+"/"−" bar symbol outside it (the shortcut), on weak noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = 0.05 * torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 5:12, 1:8] = 1
    x[:, :, 7:10, 3:6] += 0.4 * y.view(-1, 1, 1, 1)
    x[y == 1, :, 0:5, 12] += 0.8  # "+" = vertical bar …
    x[:, :, 2, 10:15] += 0.8  # … over the "−" bar every image has
    ones = torch.ones(n, dtype=torch.bool)
    return {"image": x, "label": y, "mask": mask, "box_mask": mask, "has_mask": ones,
            "has_annotation": ones}


def _small_cnn() -> torch.nn.Sequential:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _fit_toy(method_name: str, batch: dict, steps: int = 50, **args):
    """Same init, data and optimiser for every method."""
    torch.manual_seed(0)
    method = build_method(method_name, args)
    model = _small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = method(model, batch)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(batch["image"]).argmax(1) == batch["label"]).float().mean())
    return model, out, acc


def test_rrr_removes_input_gradient_outside_the_mask():
    batch = two_cue_batch()
    outside = 1 - batch["mask"]

    def mass(model):  # Σ over background pixels of (∂ Σ_k log p_k / ∂x)², per image
        _, g = input_gradients(model, batch["image"])
        return float((g * outside).pow(2).flatten(1).sum(1).mean())

    erm, _, erm_acc = _fit_toy("erm", batch)
    rrr, out, rrr_acc = _fit_toy("rrr", batch, lam=10.0)
    assert {"ce", "rrr"} <= set(out.parts)
    assert erm_acc == 1.0 and rrr_acc == 1.0  # both fit the data …
    assert mass(rrr) < 0.05 * mass(erm), (mass(erm), mass(rrr))  # … RRR without background


def test_rrr_skips_unannotated_samples(tiny_data):
    ds = LesionDataset(tiny_data, "train")
    batch = ds.batch(torch.arange(8))
    batch["has_annotation"] = torch.zeros(8, dtype=torch.bool)
    model = SevenLayerCNN(1, 2, width=4)
    out = build_method("rrr")(model, batch)
    assert out.parts["rrr"] == 0.0
    assert torch.isclose(out.total, F.cross_entropy(model(batch["image"]), batch["label"]))
    with pytest.raises(ConfigError, match="method.lam"):
        build_method("rrr", {"lam": -1})


@pytest.mark.parametrize("train_mode", [False, True])
def test_cd_decomposition_sums_to_logits(train_mode):
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 3, width=4)
    model.classifier.bias.data.normal_()
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    model.train(train_mode)
    x = torch.rand(5, 1, 32, 32)
    region = (torch.rand(5, 1, 32, 32) > 0.6).float()
    rel, irrel = contextual_decomposition(model, x, region)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(rel + irrel, logits, atol=1e-4, rtol=1e-4)
    # S = everything: all evidence is β; S = ∅: all is γ (biases included)
    full, none = contextual_decomposition(model, x, torch.ones_like(region))
    torch.testing.assert_close(full, logits, atol=1e-4, rtol=1e-4)
    assert none.abs().max() < 1e-5


def test_cdep_penalty_lowers_background_importance():
    batch = two_cue_batch()

    def share(model):  # CD share of the logits' evidence that comes from the background
        with torch.no_grad():
            rel, irrel = contextual_decomposition(model, batch["image"], 1 - batch["mask"])
        return float(torch.stack([rel, irrel], -1).softmax(-1)[..., 0].mean())

    erm, _, erm_acc = _fit_toy("erm", batch, steps=80)
    cdep, out, cdep_acc = _fit_toy("cdep", batch, steps=80, lam=1.0)
    assert {"ce", "cdep"} <= set(out.parts)
    assert erm_acc == 1.0 and cdep_acc == 1.0
    assert share(cdep) < share(erm) - 0.15, (share(erm), share(cdep))


def test_chang_counterfactual_and_factual_images(tiny_data):
    ds = LesionDataset(tiny_data, "train")
    batch = ds.batch(torch.arange(12))
    x, y, m = batch["image"], batch["label"], batch["mask"]
    annotated = torch.ones(12, dtype=torch.bool)
    annotated[3] = False
    g = torch.Generator().manual_seed(0)
    aug = augment(x, y, m, annotated, "shuffle", g)
    idx = aug["index"]
    assert 3 not in idx.tolist() and len(idx) == 11
    xa, ma = x[idx], m[idx]
    # counterfactual: background untouched, causal region replaced (lesion gone) → label flips
    torch.testing.assert_close(aug["x_cf"] * (1 - ma), xa * (1 - ma))
    changed = ((aug["x_cf"] - xa).abs() * ma).flatten(1).sum(1)
    assert (changed > 0).all()
    # shuffle in-fill draws background pixels of the same image
    for k in range(len(idx)):
        bg = set(xa[k][ma[k] == 0].tolist())
        assert set(aug["x_cf"][k][ma[k] == 1].tolist()) <= bg
    assert torch.equal(aug["y_cf"], y[idx])  # the label it must *not* keep
    logits = torch.tensor([[2.0, -1.0]])
    assert torch.isclose(not_class_loss(logits, torch.tensor([0])),
                         F.cross_entropy(logits, torch.tensor([1])), atol=1e-5)
    # factual: causal region kept, background from another image → label kept
    src = aug["source"]
    assert (src != torch.arange(len(idx))).all()
    torch.testing.assert_close(aug["x_f"] * ma, xa * ma)
    torch.testing.assert_close(aug["x_f"] * (1 - ma), aug["background"] * (1 - ma))
    # … the other image's background, its own lesion in-filled (one lesion per image)
    torch.testing.assert_close(aug["background"], aug["x_cf"][src])
    torch.testing.assert_close(aug["background"] * (1 - ma[src]), xa[src] * (1 - ma[src]))
    assert torch.equal(aug["y_f"], y[idx])
    for fill in ("mean", "blank", "noise"):
        out = infill(xa, ma, fill, g)
        torch.testing.assert_close(out * (1 - ma), xa * (1 - ma))
    # the method runs all three batches
    out = build_method("chang")(SevenLayerCNN(1, 2, width=4), batch)
    assert {"ce", "cf", "factual"} <= set(out.parts)


def test_icnn_templates_mask_and_filter_loss():
    n = 8
    t = part_templates(n)
    assert t.shape == (n * n, n, n)
    mu = 3 * n + 5  # position (3, 5)
    assert t[mu, 3, 5] == 1.0 and t[mu].max() == 1.0
    assert t[mu, 3, 4] == pytest.approx(1 - 4 / n) and t[mu].min() == -1.0
    # the mask keeps the neighbourhood of the strongest response only
    x = torch.zeros(1, 1, n, n)
    x[0, 0, 2, 2] = 5.0
    x[0, 0, 7, 7] = 3.0  # a far-away second response is removed
    masked = template_mask(x)
    assert masked[0, 0, 2, 2] == 5.0 and masked[0, 0, 7, 7] == 0.0
    # −MI is lower for one-part-one-place maps than for diffuse ones of the same energy
    torch.manual_seed(0)
    peaks = torch.zeros(16, 4, n, n)
    for i in range(8):  # half the images: a sharp part at a varying place; the rest: silent
        peaks[i, :, i % n, (3 * i) % n] = 400.0
    diffuse = torch.full_like(peaks, 400.0 / (n * n))
    lp, ld = filter_loss(peaks, 0.5), filter_loss(diffuse, 0.5)
    assert lp.shape == (4,)
    assert (lp < ld - 0.1).all(), (lp, ld)
    # gradient descent on the loss sharpens random maps
    z = torch.randn(16, 2, n, n, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.2)
    first = float(filter_loss(F.softplus(z) * 50, 0.5).mean().detach())
    for _ in range(60):
        loss = filter_loss(F.softplus(z) * 50, 0.5).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.05


def test_icnn_method_trains(tiny_data, tmp_path):
    metrics = train(tiny_data, TrainConfig(method="icnn", epochs=1, batch_size=16, width=4),
                    tmp_path / "run", progress=False)
    assert metrics["test"]["cam_precision"] is not None
    hist = (tmp_path / "run" / "history.csv").read_text()
    assert "train_filter" in hist


@pytest.mark.parametrize("patch", [9, 17])
def test_bagnet_receptive_field_is_bounded(patch):
    torch.manual_seed(0)
    model = BagNet(1, 2, width=4, patch=patch).eval()
    x = torch.rand(1, 1, 48, 48, requires_grad=True)
    ev = model.patch_logits(x)
    h, w = ev.shape[-2:]
    for i, j in [(0, 0), (h // 2, w // 3), (h - 1, w - 1)]:
        (g,) = torch.autograd.grad(ev[0, 1, i, j], x, retain_graph=True)
        rows, cols = g[0, 0].abs().gt(0).nonzero(as_tuple=True)
        # the gradient lives in the q × q patch at stride 2: exactly, and nowhere else
        assert rows.min() == 2 * i and rows.max() == 2 * i + patch - 1
        assert cols.min() == 2 * j and cols.max() == 2 * j + patch - 1
    # image logits = mean of patch evidence; a far pixel does not change a patch's evidence
    torch.testing.assert_close(model(x), ev.mean((2, 3)))
    x2 = x.detach().clone()
    x2[..., -1, -1] += 1.0
    torch.testing.assert_close(model.patch_logits(x2)[..., 0, 0], ev[..., 0, 0].detach())
    # the Grad-CAM layer's grid tiles the image: 2 px per cell, patch (i, j) at cell
    # (i + pad, j + pad), centred on its patch
    grid = model.align(model.features(x))
    assert grid.shape[-1] * 2 == 48 and model.pad == (patch - 1) // 4
    with pytest.raises(ConfigError, match="5 \\+ 4m"):
        BagNet(1, 2, patch=10)


def test_bagnet_method_trains(tiny_data, tmp_path):
    metrics = train(tiny_data, TrainConfig(method="bagnet", epochs=1, batch_size=16, width=4,
                                           method_args={"patch": 9}),
                    tmp_path / "run", progress=False)
    assert 0 <= metrics["test"]["accuracy"] <= 1
