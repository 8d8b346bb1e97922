"""The baselines of paper 000 §5.2 against their original definitions, on cases small enough
to check by hand: RRR (Ross et al. 2017), CDEP's contextual decomposition (Rieger et al. 2020),
ICNN's templates, mask and filter loss (Zhang et al. 2018), BagNet's q × q receptive field
(Brendel & Bethge 2019), Chang et al.'s (2021) counterfactual/factual images and the oracle's
input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from causalign.methods import build_method
from causalign.methods.cdep import cd_propagate, contextual_decomposition
from causalign.methods.chang import augment, infill, not_class_loss
from causalign.methods.rrr import input_gradients
from causalign.models.bagnet import BagNet
from causalign.models.cnn import SevenLayerCNN
from causalign.models.icnn import filter_loss, part_templates, template_mask


def _batch(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
           annotated: torch.Tensor | None = None) -> dict:
    n = len(x)
    annotated = torch.ones(n, dtype=torch.bool) if annotated is None else annotated
    return {"image": x, "label": y, "mask": mask, "box_mask": mask, "has_mask": annotated,
            "has_annotation": annotated}


# --- RRR: L = CE + λ Σ_d (A_d ∂/∂x_d Σ_k log p_k)², A = 1 outside the annotation ----------

def test_rrr_loss_matches_hand_computation_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))  # 3 classes on a 2 × 2 image
    w, b = model[1].weight.detach(), model[1].bias.detach()
    x = torch.randn(2, 1, 2, 2)
    y = torch.tensor([0, 2])
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1  # sample 0: only pixel (0, 0) annotated
    mask[1, 0, 1, :] = 1  # sample 1: the bottom row
    # ∂/∂x Σ_k log p_k = Σ_k W_k − K Σ_j p_j W_j for logits Wx + b
    p = (x.flatten(1) @ w.t() + b).softmax(1)
    grad = (w.sum(0) - 3 * p @ w).view(2, 1, 2, 2)
    _, g = input_gradients(model, x)
    torch.testing.assert_close(g, grad)
    penalty = ((1 - mask) * grad).pow(2).flatten(1).sum(1)  # Σ over background pixels
    ce = F.cross_entropy(x.flatten(1) @ w.t() + b, y)
    out = build_method("rrr", {"lam": 7.0})(model, _batch(x, y, mask))
    torch.testing.assert_close(out.total, ce + 7.0 * penalty.mean())
    # a sample without annotation contributes CE only (not an all-background penalty)
    out = build_method("rrr", {"lam": 7.0})(model, _batch(x, y, mask, torch.tensor([1, 0]).bool()))
    torch.testing.assert_close(out.total, ce + 7.0 * penalty[0])


def test_rrr_batchnorm_gradient_is_the_per_sample_one():
    """Train-mode BatchNorm: the input gradient is that of the model normalising with the
    batch's statistics held fixed (no cross-sample terms), i.e. an eval-mode model whose
    running statistics are the batch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).train()
    x = torch.randn(4, 1, 5, 5)
    _, g = input_gradients(model, x)
    with torch.no_grad():
        z = model[0](x)
    bn = model[1]
    running = (bn.running_mean.clone(), bn.running_var.clone())
    bn.running_mean.copy_(z.mean((0, 2, 3)))
    bn.running_var.copy_(z.var((0, 2, 3), unbiased=False))
    model.eval()
    _, g_eval = input_gradients(model, x)
    torch.testing.assert_close(g, g_eval)
    # the penalty's forward did not touch the running statistics
    bn.running_mean.copy_(running[0])
    bn.running_var.copy_(running[1])
    model.train()
    input_gradients(model, x)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])


# --- CDEP: contextual decomposition β + γ = forward, CDEP's layer rules -------------------

def test_cd_layer_rules_by_hand():
    conv = nn.Conv2d(1, 1, (1, 2), bias=True)
    conv.weight.data = torch.tensor([[[[2.0, -1.0]]]])
    conv.bias.data = torch.tensor([0.6])
    x = torch.tensor([[[[3.0, 1.0]]]])
    s = torch.tensor([[[[1.0, 0.0]]]])  # S = the first pixel
    rel, irrel = cd_propagate([conv], x * s, x * (1 - s))
    # Wβ = 6, Wγ = −1: the bias is shared 6/7 : 1/7
    torch.testing.assert_close(rel.flatten(), torch.tensor([6 + 0.6 * 6 / 7]))
    torch.testing.assert_close(irrel.flatten(), torch.tensor([-1 + 0.6 * 1 / 7]))
    # ReLU: β' = ReLU(β), γ' = ReLU(β + γ) − ReLU(β)
    r, i = cd_propagate([nn.ReLU()], torch.tensor([-2.0, 1.0, 3.0]), torch.tensor([3.0, -4.0, 1.0]))
    torch.testing.assert_close(r, torch.tensor([0.0, 1.0, 3.0]))
    torch.testing.assert_close(i, torch.tensor([1.0, -1.0, 1.0]))
    # max-pool: the arg-max of β + γ picks the unit, not that of β or γ alone
    rel = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]]]])
    irrel = torch.tensor([[[[-5.0, 1.0], [0.0, 0.5]]]])
    r, i = cd_propagate([nn.MaxPool2d(2)], rel, irrel)
    assert r.item() == 0.0 and i.item() == 1.0


@pytest.mark.parametrize("train_mode", [False, True])
def test_cd_sums_to_logits_on_a_zero_background(train_mode):
    """Images with an exactly-zero background (background-removed mammograms, zero-padded
    CT crops, the oracle's restricted input): where β and γ are both 0, the bias of a
    BatchNorm / conv / linear layer must still be assigned to one of them. It used to be
    dropped (a / (a + b + ε) with a = b = 0), so β + γ missed the forward pass by up to
    5e-2 on the 7-layer CNN and CDEP penalised a decomposition of another function."""
    torch.manual_seed(0)
    model = SevenLayerCNN(1, 2, width=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    model.train(train_mode)
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, 4:10, 4:10] = 1
    x = torch.randn(3, 1, 16, 16) * mask  # the lesion, on an exact-zero background
    with torch.no_grad():
        logits = model(x)
    for region in (1 - mask, mask):
        rel, irrel = contextual_decomposition(model, x, region)
        torch.testing.assert_close(rel + irrel, logits, atol=1e-5, rtol=1e-5)
    # S = ∅ still carries no evidence (biases of empty units go to γ)
    none, rest = contextual_decomposition(model, x, torch.zeros_like(mask))
    assert none.abs().max() == 0.0
    torch.testing.assert_close(rest, logits, atol=1e-5, rtol=1e-5)


def test_cdep_penalty_is_the_background_share_of_cd_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 2))
    x = torch.rand(3, 1, 6, 6)
    mask = torch.zeros(3, 1, 6, 6)
    mask[:, :, 1:4, 1:4] = 1
    y = torch.tensor([0, 1, 1])
    rel, irrel = contextual_decomposition(model, x, 1 - mask)  # β = the background's evidence
    share = torch.exp(rel) / (torch.exp(rel) + torch.exp(irrel))
    out = build_method("cdep", {"lam": 3.0})(model, _batch(x, y, mask))
    torch.testing.assert_close(out.total, F.cross_entropy(model(x), y) + 3.0 * share.mean())


# --- ICNN: templates T_μ = τ max(1 − β‖(i,j) − μ‖₁/n, −1), mask, −MI(X; T) ----------------

def _mi_by_hand(x: torch.Tensor, alpha: float, beta: float,
                dtype: torch.dtype | None = None) -> float:
    """−MI(X; T) of one filter, straight from Eq. 2–3 of Zhang et al., with loops: one
    positive template per position μ of the h × w map (n² of them for n × n maps); templates
    in ``dtype`` (default: torch's default), each entry a Python float."""
    n_img, h, w = x.shape
    n = max(h, w)
    tau = 0.5 / (h * w)
    templates = [(1 - alpha, torch.full((h, w), -tau, dtype=dtype))]  # T⁻
    for mi in range(h):
        for mj in range(w):
            t = torch.empty(h, w, dtype=dtype)
            for i in range(h):
                for j in range(w):
                    t[i, j] = tau * max(1 - beta * (abs(i - mi) + abs(j - mj)) / n, -1)
            templates.append((alpha / (h * w), t))
    p_x_t = []
    for _, t in templates:
        e = torch.stack([torch.exp((x[k] * t).sum()) for k in range(n_img)])
        p_x_t.append(e / e.sum())
    p_x = sum(pt * px for (pt, _), px in zip(templates, p_x_t, strict=True))
    mi = sum(pt * (px * torch.log(px / p_x)).sum()
             for (pt, _), px in zip(templates, p_x_t, strict=True))
    return -float(mi)


def test_icnn_filter_loss_matches_the_paper_formula():
    torch.manual_seed(0)
    x = F.relu(torch.randn(5, 2, 3, 3)) * 20  # 5 images, 2 filters, 3 × 3 maps
    alpha = torch.tensor([0.4, 0.6])
    got = filter_loss(x, alpha, beta=4.0)
    want = torch.tensor([_mi_by_hand(x[:, c], float(alpha[c]), 4.0) for c in range(2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # templates: T_μ / τ with the paper's fall-off and floor −1
    t = part_templates(3, beta=4.0)
    assert t[4, 1, 1] == 1.0 and t[4, 0, 1] == pytest.approx(1 - 4 / 3)
    assert t[0, 2, 2] == -1.0


def test_icnn_filter_loss_on_non_square_maps_uses_templates_on_the_map():
    """Non-square images give non-square maps (h ≠ w): the positive templates are one per
    position of the h × w map. They used to be the n × n templates (n = max(h, w)) cropped,
    so n² − hw templates centred off the map took prior mass and changed −MI."""
    torch.manual_seed(0)
    x = F.relu(torch.randn(6, 1, 2, 4)) * 20
    torch.testing.assert_close(filter_loss(x, 0.5, beta=4.0),
                               torch.tensor([_mi_by_hand(x[:, 0], 0.5, 4.0)]),
                               atol=1e-5, rtol=1e-4)
    assert part_templates(2, width=4).shape == (8, 2, 4)


def test_icnn_mask_keeps_the_template_of_the_strongest_response():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 2.0
    x[0, 0, 1, 3] = 1.0  # one step from the peak: scaled by T = 1 − β·1/n
    x[0, 0, 2, 2] = 1.0
    out = template_mask(x, beta=2.0)  # 1 − 2·1/4 = ½ at distance 1
    assert out[0, 0, 1, 2] == 2.0 and out[0, 0, 1, 3] == 0.5 and out[0, 0, 2, 2] == 0.5
    x[0, 0, 3, 0] = 1.5  # distance 4: template −1 → removed by the ReLU
    assert template_mask(x, beta=2.0)[0, 0, 3, 0] == 0.0


# --- BagNet: every patch logit sees exactly one q × q patch ------------------------------

@pytest.mark.parametrize("patch", [9, 13])
def test_bagnet_pixel_perturbation_changes_only_the_patches_containing_it(patch):
    torch.manual_seed(0)
    model = BagNet(1, 2, width=4, patch=patch).eval()
    size = patch + 8
    x = torch.rand(1, 1, size, size)
    with torch.no_grad():
        ev = model.patch_logits(x)
        for r, c in [(0, 0), (size // 2, 3), (size - 1, size - 2)]:
            x2 = x.clone()
            x2[..., r, c] += 5.0
            changed = (model.patch_logits(x2) - ev).abs().amax(1)[0] > 0  # (h, w)
            h, w = changed.shape
            i = torch.arange(h)[:, None]
            j = torch.arange(w)[None]
            q = patch - 1
            inside = (2 * i <= r) & (r <= 2 * i + q) & (2 * j <= c) & (c <= 2 * j + q)
            assert torch.equal(changed, inside), (r, c)
        torch.testing.assert_close(model(x), ev.mean((2, 3)))


# --- Chang et al.: counterfactual (causal region in-filled, "not y") and factual images ---

def test_chang_images_and_labels_by_hand():
    x = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4) + 1
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1
    mask[1, 0, 2:, 2:] = 1
    y = torch.tensor([1, 0])
    g = torch.Generator().manual_seed(0)
    aug = augment(x, y, mask, torch.ones(2, dtype=torch.bool), "blank", g)
    # counterfactual: the lesion removed ("Ablation" fill = 0), everything else kept
    torch.testing.assert_close(aug["x_cf"], x * (1 - mask))
    assert torch.equal(aug["y_cf"], y)  # the label the model must move away from
    # factual: own lesion + the other image's background (its lesion ablated), label kept
    assert aug["source"].tolist() == [1, 0]
    want0 = x[0] * mask[0] + (x[1] * (1 - mask[1])) * (1 - mask[0])
    torch.testing.assert_close(aug["x_f"][0], want0)
    assert torch.equal(aug["y_f"], y)
    # −log(1 − p_y) for three classes
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    p = logits.softmax(1)[0]
    assert not_class_loss(logits, torch.tensor([0])).item() == pytest.approx(-math.log(1 - p[0]))
    # mean fill = the mean of the image's non-causal region
    out = infill(x, mask, "mean")
    bg_mean = (x[0] * (1 - mask[0])).sum() / (1 - mask[0]).sum()
    torch.testing.assert_close(out[0, 0, 0, 0], bg_mean)


def test_chang_counterfactual_loss_keeps_its_gradient_when_confidently_wrong():
    """A model that still says y on the counterfactual with a large margin (the shortcut it
    keeps in the background) is the case the loss must correct. Through 1 − p_y, clamped,
    the loss stopped at 13.8 and its gradient was exactly 0 from a logit gap of ≈ 14."""
    y = torch.tensor([0, 1])
    for gap in (5.0, 16.0, 40.0):
        z = torch.tensor([[gap, 0.0], [0.0, gap]], requires_grad=True)
        loss = not_class_loss(z, y)
        (g,) = torch.autograd.grad(loss, z)
        ref = torch.tensor([[gap, 0.0], [0.0, gap]], requires_grad=True)
        ce = F.cross_entropy(ref, 1 - y)  # two classes: −log(1 − p_y) = CE with 1 − y
        (g_ref,) = torch.autograd.grad(ce, ref)
        torch.testing.assert_close(loss, ce)
        torch.testing.assert_close(g, g_ref)
        assert g.abs().sum() > 0.9


# --- Oracle: the classifier sees x ⊙ annotation ------------------------------------------

def test_oracle_input_is_the_annotated_region():
    x = torch.rand(3, 2, 4, 4)
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, 0, 1:3, 1:3] = 1
    box = torch.zeros(3, 1, 4, 4)
    box[0, 0, 0:3, 0:3] = 1
    box[1, 0, 2:, :] = 1
    batch = {"image": x, "label": torch.zeros(3, dtype=torch.long), "mask": mask,
             "box_mask": box, "has_mask": torch.tensor([True, False, False]),
             "has_annotation": torch.tensor([True, True, False])}
    got = build_method("oracle").model_input(batch)
    torch.testing.assert_close(got[0], x[0] * mask[0])  # pixel mask, both channels
    torch.testing.assert_close(got[1], x[1] * box[1])  # box fallback
    torch.testing.assert_close(got[2], x[2])  # nothing annotated: the full image
    got = build_method("oracle", {"region": "box"}).model_input(batch)
    torch.testing.assert_close(got[0], x[0] * box[0])
