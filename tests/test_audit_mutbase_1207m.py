"""Mutation audit of the paper-000 baselines (RRR, CDEP, Chang et al., ICNN, BagNet, oracle,
the shared annotation region and method plumbing): behaviours the earlier tests let slip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.engine import TrainConfig
from causalign.engine.distributed import GlobalStep
from causalign.errors import ConfigError
from causalign.methods import build_method
from causalign.methods._annotation import annotation_region
from causalign.methods.base import DataInfo
from causalign.methods.cdep import cd_propagate
from causalign.methods.chang import augment, infill
from causalign.methods.rrr import input_gradients
from causalign.models.icnn import ICNN, InterpretableConv, filter_loss, template_mask


def _batch(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, box: torch.Tensor | None = None,
           has_mask: torch.Tensor | None = None) -> dict:
    n = len(x)
    ones = torch.ones(n, dtype=torch.bool)
    return {"image": x, "label": y, "mask": mask, "box_mask": mask if box is None else box,
            "has_mask": ones if has_mask is None else has_mask, "has_annotation": ones}


def _small_cnn(classes: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


def _toy(n: int = 4, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 2:5, 2:5] = 1
    return _batch(x, torch.arange(n) % 2, mask)


# --- hyper-parameters -----------------------------------------------------------------------

@pytest.mark.parametrize("name,key", [("rrr", "lam"), ("cdep", "lam"), ("icnn", "lam"),
                                      ("chang", "cf_weight"), ("chang", "factual_weight")])
def test_a_zero_weight_is_accepted_and_a_negative_one_refused(name, key):
    """λ = 0 is a valid weight (the ERM end of a λ sweep); only λ < 0 is refused. Kills
    `lam > 0` in RRR's validate and a dropped factual_weight check in Chang's."""
    assert getattr(build_method(name, {key: 0.0}).params, key) == 0.0
    with pytest.raises(ConfigError, match=key):
        build_method(name, {key: -0.5})


# --- subset means: the term handed to data-parallel re-weighting is the one in `total` ---

@pytest.mark.parametrize("name,args", [("rrr", {"lam": 3.0}), ("cdep", {"lam": 3.0}),
                                       ("chang", {"cf_weight": 3.0, "factual_weight": 0.5})])
def test_subset_mean_terms_are_the_weighted_terms_of_the_total(name, args):
    """`reweight_subset_means` rescales each `LossOutput.means` term inside `total`: it must
    be exactly the term added there (λ·penalty), so total − CE = Σ means. Kills RRR handing
    over the unweighted penalty (re-weighted at λ = 1 under DDP) and Chang ignoring
    cf_weight in its total."""
    torch.manual_seed(0)
    # a linear model: input gradients of order 0.1, so RRR's penalty is far above rounding
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    out = build_method(name, args)(model, _toy())
    assert min(out.parts[k] for k in ("rrr", "cdep", "cf") if k in out.parts) > 1e-3
    terms = sum(t for t, _ in out.means.values())
    torch.testing.assert_close(out.total - out.parts["ce"], terms, rtol=1e-5, atol=0.0)
    assert all(k == 4 for _, k in out.means.values())
    if name == "chang":  # the weights act: the parts are the unweighted losses
        torch.testing.assert_close(terms, torch.tensor(3.0 * out.parts["cf"]
                                                       + 0.5 * out.parts["factual"]))


# --- RRR ------------------------------------------------------------------------------------

def test_rrr_input_gradient_of_an_eval_mode_batchnorm_model_uses_running_statistics():
    """In eval mode BatchNorm normalises with its running statistics: RRR's input gradient
    must be that model's own gradient (autograd on the plain forward). Kills patching every
    BatchNorm, eval ones included, to batch statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 1, 6, 6, requires_grad=True)
    (want,) = torch.autograd.grad(F.log_softmax(model(x), 1).sum(), x)
    _, got = input_gradients(model, x)
    torch.testing.assert_close(got, want)


# --- CDEP -----------------------------------------------------------------------------------

def test_cd_train_mode_dropout_keeps_the_expected_activation():
    """Dropout in train mode zeroes units in both parts and scales the kept ones by
    1/(1 − p), as nn.Dropout does, so E[β] is unchanged. Kills a dropped 1/(1 − p)."""
    torch.manual_seed(0)
    drop = nn.Dropout(0.5).train()
    rel, irrel = torch.ones(1, 20000), torch.full((1, 20000), 2.0)
    r, i = cd_propagate([drop], rel, irrel)
    assert torch.equal(r == 0, i == 0)  # the same units dropped in both parts
    assert abs(float(r.mean()) - 1.0) < 0.03 and abs(float(i.mean()) - 2.0) < 0.06


# --- Chang et al. ---------------------------------------------------------------------------

def test_chang_factual_background_is_never_the_images_own():
    """The factual pairing is a derangement for every draw: x_f of sample i always takes
    another sample's background. A guard over 12 seeds × n = 2, 3 (the existing check
    covers one draw); kills a shift drawn from 0..n−1 (self-pairing, x_f = x)."""
    x = torch.rand(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        for n in (2, 3):
            xs, ms = x.repeat(2, 1, 1, 1)[:n], mask.repeat(2, 1, 1, 1)[:n]
            aug = augment(xs, torch.zeros(n, dtype=torch.long), ms,
                          torch.ones(n, dtype=torch.bool), "blank", g)
            assert (aug["source"] != torch.arange(n)).all(), (seed, n, aug["source"])


def test_chang_one_annotated_sample_gets_no_factual_term():
    """With one annotated sample there is no other background: no `factual` part, and the
    total is CE + w_cf · L_cf. Kills `factual = k >= 1`."""
    torch.manual_seed(0)
    batch = _toy(3)
    batch["has_annotation"] = torch.tensor([True, False, False])
    batch["has_mask"] = batch["has_annotation"].clone()
    out = build_method("chang", {"cf_weight": 2.0})(_small_cnn(), batch)
    assert "factual" not in out.parts and set(out.means) == {"cf"}
    torch.testing.assert_close(out.total, torch.tensor(out.parts["ce"] + 2.0 * out.parts["cf"]))


def test_chang_noise_fill_lies_in_the_images_range():
    """`noise` in-fill is uniform in [min, max] of the image itself. Kills a lower bound of
    0 (a fill darker than any pixel of an image in [1, 2])."""
    x = 1.0 + torch.rand(3, 2, 8, 8)
    mask = torch.ones(3, 1, 8, 8)
    out = infill(x, mask, "noise", torch.Generator().manual_seed(0))
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    assert ((out >= lo) & (out <= hi)).all()
    assert float(out.std()) > 0.2  # uniform over [lo, hi], not a constant


# --- ICNN -----------------------------------------------------------------------------------

def test_icnn_label_mask_zeroes_other_categories_only_at_train_time():
    """`label_mask`: the interpretable layer's output for an image of another category than
    the filter's is zero (the paper's T⁻), the filter's own category keeps the μ̂ mask, and
    an eval-mode forward ignores it. Kills an inverted mask."""
    torch.manual_seed(0)
    layer = InterpretableConv(2)
    x = torch.rand(2, 2, 6, 6)
    plain = template_mask(layer.relu(layer.conv(x)), layer.beta)
    layer.negative = torch.tensor([[True, False], [False, True]])
    out = layer.train()(x)
    assert (out[0, 0] == 0).all() and (out[1, 1] == 0).all()
    torch.testing.assert_close(out[0, 1], plain[0, 1])
    torch.testing.assert_close(out[1, 0], plain[1, 0])
    torch.testing.assert_close(layer.eval()(x), plain)


def test_icnn_method_masks_filters_of_other_classes_and_weighs_its_terms():
    """ICNNMethod with label_mask marks filter f as negative for images whose label is not
    f mod C; the layer is built with method.beta, the filter loss uses it too, and the
    total is CE + λ · mean filter loss. Kills `==` for `!=` in the mask, a dropped beta
    (layer or loss) and λ left out of the total."""
    torch.manual_seed(0)
    method = build_method("icnn", {"lam": 1e4, "beta": 2.0, "label_mask": True})
    model = method.build_model(TrainConfig(method="icnn", width=1),
                               DataInfo(1, 2, (1, 32, 32), []))
    assert isinstance(model, ICNN) and model.interpretable.beta == 2.0
    seen, maps = [], []

    def hook(mod, args, out):
        seen.append(mod.negative.clone())
        maps.append(mod.last_maps.detach())

    model.interpretable.register_forward_hook(hook)
    y = torch.tensor([0, 1, 1])
    batch = {"image": torch.rand(3, 1, 32, 32), "label": y}
    out = method(model, batch)
    owner = torch.arange(4) % 2
    assert torch.equal(seen[0], y[:, None] != owner[None])
    share = torch.tensor([1 / 3, 2 / 3])[owner]
    floss = filter_loss(maps[0], share, 2.0).mean()
    assert out.parts["filter"] == pytest.approx(float(floss), rel=1e-5)
    assert float(floss) != pytest.approx(float(filter_loss(maps[0], share).mean()), rel=1e-3)
    torch.testing.assert_close(out.total, torch.tensor(out.parts["ce"] + 1e4 * float(floss)),
                               rtol=1e-5, atol=1e-5)


# --- BagNet ---------------------------------------------------------------------------------

def test_bagnet_patch_below_nine_is_refused_and_an_image_of_one_patch_is_taken():
    """q = 5 + 4m needs m ≥ 1 (q ≥ 9): q = 5 is refused. An image exactly q px wide holds
    one patch and is a valid input. Kills `patch < 5` and `<=` in the method's size check."""
    with pytest.raises(ConfigError, match="5 \\+ 4m"):
        build_method("bagnet", {"patch": 5})
    method = build_method("bagnet", {"patch": 9})
    model = method.build_model(TrainConfig(method="bagnet", width=2),
                               DataInfo(1, 2, (1, 9, 9), []))
    assert model.eval().patch_logits(torch.rand(1, 1, 9, 9)).shape[-2:] == (1, 1)


# --- the annotated region -------------------------------------------------------------------

def test_annotation_region_mask_falls_back_to_the_box_and_box_reads_the_box():
    """region="mask": the pixel mask, the box for a sample without one; region="box": the
    box of every sample. Kills dropping the box fallback and "box" reading the mask."""
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1, 1] = 1
    box = torch.zeros(2, 1, 4, 4)
    box[:, 0, :2, :2] = 1
    batch = _batch(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), mask, box,
                   has_mask=torch.tensor([True, False]))
    area, annotated = annotation_region(batch, "mask")
    torch.testing.assert_close(area[0], mask[0])
    torch.testing.assert_close(area[1], box[1])
    assert annotated.tolist() == [True, True]
    area, _ = annotation_region(batch, "box")
    torch.testing.assert_close(area, box)


# --- shared plumbing: the classification cross-entropy -------------------------------------

def test_a_subset_ce_stays_the_chunks_weighted_mean_under_data_parallel_training():
    """`ce(batch_term=False)` (Chang's factual rows, a subset) is the chunk's own weighted
    mean even when the subset has as many rows as the chunk; only a batch term divides by
    the global batch's weight sum. Kills dropping `not batch_term` from the test (a fully
    annotated chunk's factual term was then scaled by the global weights). The batch-term
    value is a guard."""
    method = build_method("erm")
    method.set_class_weight([1.0, 3.0])
    method.global_step = GlobalStep(rank=0, world=2, sizes=(2, 2),
                                    batch={"label": torch.tensor([0, 0, 1, 1])})
    torch.manual_seed(0)
    logits, y = torch.randn(2, 2), torch.tensor([0, 0])
    per = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(method.ce(logits, y, batch_term=False), per.mean())
    # batch term: Σ w_y·CE over (m/N)·Σ_global w_y = Σ CE / (0.5 · 8)
    torch.testing.assert_close(method.ce(logits, y), per.sum() / 4.0)
