"""Every training method against the 2D models it accepts: each either trains with its own
term active or refuses with one clear line; regression tests for the defects found there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.data.format import LesionDataset
from causalign.methods.base import build_method
from causalign.methods.ppi import contrast_loss, normalize_saliency, soft_mask
from causalign.models import SevenLayerCNN
from causalign.models.backbones import BACKBONES


def _only_annotated(batch: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The batch with every annotation but those of samples ``keep`` removed."""
    out = dict(batch)
    has = torch.zeros_like(batch["has_annotation"])
    has[keep] = True
    out["has_annotation"] = has
    out["has_mask"] = batch["has_mask"] & has
    shape = (-1, *[1] * (batch["mask"].dim() - 1))
    out["mask"] = batch["mask"] * has.view(shape)
    out["box_mask"] = batch["box_mask"] * has.view(shape)
    return out


def test_chang_single_annotated_sample_has_no_factual_term(tiny_data):
    # With one annotated sample there is no other background: x_f was x itself and the
    # "factual" part was CE on x again (a silent re-weighting of CE, not the method's term).
    batch = LesionDataset(tiny_data, "train").batch(torch.arange(4))
    method = build_method("chang")
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4)
    for sub in (_only_annotated(batch, [2]), {k: v[2:3] for k, v in batch.items()}):
        out = method(model, sub)
        assert set(out.parts) == {"ce", "cf"}, out.parts
        torch.testing.assert_close(float(out.total.detach()), out.parts["ce"] + out.parts["cf"],
                                   rtol=1e-5, atol=1e-6)
    # two annotated samples: a real factual image (another one's background) and its term
    out = method(model, _only_annotated(batch, [0, 2]))
    assert set(out.parts) == {"ce", "cf", "factual"}


def _class1_has_no_evidence() -> nn.Module:
    """Positive conv features and a class-1 weight that is negative on each: Grad-CAM's map of
    class 1 is ReLU(negative) = 0 at every point (what bagnet9 at init gave for one class)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.1, -0.1]).view(2, 1, 1, 1).expand(2, 1, 3, 3))
        model[0].bias.fill_(1.0)
        model[4].weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, -0.5]]))
        model[4].bias.zero_()
    return model


def test_ppi_skips_contrasts_whose_mask_removes_nothing():
    # Before: an empty map gave x* = x, so L_con asked f(x) to *not* say y on the unchanged
    # image (against L_cls) and L_ad repeated L_cls, silently.
    torch.manual_seed(0)
    model = _class1_has_no_evidence()
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    method = build_method("ppi", {"saliency": "gradcam"})
    s = normalize_saliency(method.saliency(model, x, y, create_graph=False))
    assert (s[y == 1] == 0).all() and (s[y == 0].flatten(1).amax(1) > 0).all()
    out = method(model, {"image": x, "label": y})
    rows = y == 0  # L_con over the images whose mask removes something
    x_star = x - soft_mask(s).unsqueeze(1) * x
    with torch.no_grad():
        assert out.parts["con"] == pytest.approx(float(contrast_loss(model(x_star[rows]),
                                                                     y[rows])), rel=1e-5)
    assert out.parts["empty_mask"] == 0.5
    # no image with evidence: neither contrast, the step trains on L_cls and L_reg only
    only = method(model, {"image": x[~rows], "label": y[~rows]})
    assert not {"con", "ad"} & set(only.parts) and only.parts["empty_mask"] == 1.0
    torch.testing.assert_close(float(only.total.detach()),
                               only.parts["cls"] + only.parts["reg"], rtol=1e-5, atol=1e-6)


# The method's own term(s) in LossOutput.parts: a step that trains must report them non-zero.
OWN_TERMS = {"erm": (), "oracle": (), "bagnet": (), "cdep": ("cdep",), "rrr": ("rrr",),
             "chang": ("cf", "factual"), "ppi": ("reg", "con", "ad"), "icnn": ("filter",),
             "causal-align": ("align",), "hier-align": ("attr_align", "img_align")}
# (method, model) pairs that refuse before training, and the start of their one line.
REFUSES = {("cdep", "resnet18"): "cdep: contextual decomposition supports",
           ("icnn", "bagnet9"): "method 'icnn' builds its own model",
           ("icnn", "resnet18"): "method 'icnn' builds its own model",
           ("bagnet", "bagnet9"): "method 'bagnet' builds BagNet-17",
           ("bagnet", "resnet18"): "method 'bagnet' builds its own model"}


@pytest.mark.parametrize("model_name", ["cnn7", "bagnet9", "resnet18"])
@pytest.mark.parametrize("method_name", sorted(OWN_TERMS))
def test_every_method_trains_or_refuses_on_each_small_2d_model(tiny_data, method_name,
                                                              model_name):
    from causalign.engine.config import TrainConfig
    from causalign.engine.trainer import data_info
    from causalign.errors import CausalignError

    train_set = LesionDataset(tiny_data, "train")
    cfg = TrainConfig(method=method_name, model=model_name,  # backbones refuse a width
                      width=TrainConfig.width if model_name in BACKBONES else 4)
    method = build_method(method_name)
    torch.manual_seed(0)
    refusal = REFUSES.get((method_name, model_name))
    if refusal is not None:  # the trainer's order: build the model, then the method's setup
        with pytest.raises(CausalignError, match=refusal.replace("(", r"\(")):
            method.setup(train_set, method.build_model(cfg, data_info(train_set)))
        return
    model = method.build_model(cfg, data_info(train_set)).train()
    method.setup(train_set, model)
    method.on_epoch_start(1)
    out = method(model, train_set.batch(torch.arange(8)))
    assert torch.isfinite(out.total)
    out.total.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    for term in OWN_TERMS[method_name]:
        assert term in out.parts and out.parts[term] != 0.0, (term, out.parts)


@pytest.mark.parametrize("name,size", [("bagnet9", 20), ("bagnet33", 36),
                                       pytest.param("vgg11", 32, marks=pytest.mark.slow)])
def test_cdep_decomposes_bagnet_and_vgg(name, size):
    # Before: cdep refused every model but cnn7 ("... not BagNet" / "... not VGG"), although
    # both are chains of layers CD has rules for. β + γ must equal the logits in both modes.
    from causalign.methods.cdep import contextual_decomposition
    from causalign.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 1, 2, **({} if name in BACKBONES else {"width": 4}))
    for m in model.modules():  # dropout draws its own mask in CD: compare without it
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.rand(3, 1, size, size)
    region = (torch.rand(3, 1, size, size) > 0.5).float()
    for train in (False, True):
        model.train(train)
        rel, irrel = contextual_decomposition(model, x, region)
        with torch.no_grad():
            torch.testing.assert_close(rel + irrel, model(x), rtol=1e-4, atol=1e-5)
    # the method's penalty trains through it
    out = build_method("cdep")(model.train(), {
        "image": x, "label": torch.tensor([0, 1, 0]), "mask": region,
        "has_mask": torch.ones(3, dtype=torch.bool), "box_mask": region,
        "has_annotation": torch.ones(3, dtype=torch.bool)})
    assert 0 < out.parts["cdep"] < 1
    out.total.backward()
