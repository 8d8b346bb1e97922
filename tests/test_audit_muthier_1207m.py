"""Mutation audit of hierarchical alignment and causal attribution (hier-align, CCCE, PC):
behaviours the earlier tests let slip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from causalign.causal import pc as pc_mod
from causalign.causal.ccce import (
    SmoothedFrequency,
    TrueProbit,
    attribution_report,
    causal_attribution,
    fit_label_model,
    monotonicity_check,
)
from causalign.errors import CausalignError
from causalign.methods import build_method
from causalign.methods.hier_align import HierAlignParams, SigmoidCode
from causalign.models.hierarchical import HierarchicalModel
from causalign.models.mlp import MLPHead

# --------------------------------------------------------------------------- CCCE


class _NoIndex:
    """A label model without `index_weights`: forces `causal_attribution`'s enumeration."""

    def __init__(self, model):
        self.model = model

    def prob(self, a):
        return self.model.prob(a)


def _brute_force(model, a, y, max_size, tol):
    """Independent reference: argmax_S CCCE(S) by the module docstring's rule, one subset
    at a time (smallest size among those within tol of the best and > 0, then the highest
    score, then the first in enumeration order). Returns (subset as a tuple or None, score)."""
    out = []
    p = a.shape[1]
    for row, lab in zip(a, y, strict=True):
        p1 = float(model.prob(row[None])[0])
        base = p1 if lab == 1 else 1 - p1
        cands = []
        for k in range(1, max_size + 1):
            for s in itertools.combinations(range(p), k):
                b = row.copy()
                b[list(s)] = 1 - lab
                q1 = float(model.prob(b[None])[0])
                q = q1 if lab == 1 else 1 - q1
                cands.append((s, 1 - q / base))
        best = max(c[1] for c in cands)
        if best <= 0:
            out.append((None, best))
            continue
        near = [c for c in cands if c[1] >= best - tol and c[1] > 0]
        size = min(len(c[0]) for c in near)
        top = max(c[1] for c in near if len(c[0]) == size)
        out.append(next(c for c in near if len(c[0]) == size and c[1] == top))
    return out


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.3])
def test_top_k_and_enumeration_agree_with_a_brute_force_argmax(tol):
    """Both search paths (top-k for w ≥ 0, enumeration otherwise) pick the brute-force
    argmax subset with the smallest-size-within-tol rule, and report its own score. Kills:
    top-k contribution c with a and 1 − a swapped, the largest near size taken instead of
    the smallest, a strict `>` at best − tol (nothing near at tol 0), the enumeration's
    largest size, and the reported score being the best instead of the chosen one's."""
    w = np.array([2.0, 1.1, 0.6, 0.0, 0.3])
    model = TrueProbit(w, threshold=1.8, noise=0.5)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, (24, 5)).astype(float)
    y = np.array([0, 1] * 12)
    want = _brute_force(model, a, y, 3, tol)
    for m in (model, _NoIndex(model)):
        res = causal_attribution(m, a, y, max_size=3, tol=tol)
        for i, (s, sc) in enumerate(want):
            if s is None:
                assert res.subset[i] == -1 and not res.r[i].any()
                assert res.score[i] == pytest.approx(sc, abs=1e-12)
            else:
                assert res.sets[res.subset[i]] == s, (type(m).__name__, i)
                assert res.r[i].tolist() == [j in s for j in range(5)]
                assert res.score[i] == pytest.approx(sc, abs=1e-12)
    assert any(s is not None and len(s) > 1 for s, _ in want)  # the case is not trivial


class _Pair:
    """Only the pair moves P(Y=1 | a): each attribute alone is redundant (y = 1, a = 1, 1)."""

    def prob(self, a):
        return np.where((a[:, 0] > 0.5) | (a[:, 1] > 0.5), 0.9, 0.1)


def test_enumeration_no_effect_rows_and_zero_scores_are_not_attributed():
    """A y = 1 row with every attribute at 0 has CCCE 0 for every S: no attribution (−1),
    score 0. And with tol above the best score, a subset with CCCE 0 is never "near" (only
    the pair, which has the effect, is named). Kills `effect = best >= 0` and dropping
    `& (scores > 0)` from the enumeration's near set."""
    a = np.array([[0.0, 0.0], [1.0, 1.0]])
    y = np.array([1, 1])
    res = causal_attribution(_Pair(), a, y, max_size=2, tol=0.95)
    assert res.subset[0] == -1 and not res.r[0].any() and res.score[0] == 0.0
    assert res.r[1].tolist() == [True, True]
    assert res.score[1] == pytest.approx(1 - 0.1 / 0.9)


def test_an_attribute_at_exactly_one_half_counts_as_absent():
    """`_binary`: values > 0.5 count as present (documented), 0.5 itself does not. Kills
    `>= 0.5`."""
    m = SmoothedFrequency(smoothing=0.0).fit(np.array([[0.5], [0.0], [1.0]]),
                                             np.array([1, 0, 1]))
    assert m.table == {(0,): (1.0, 2.0), (1,): (1.0, 1.0)}


def test_rows_with_one_missing_attribute_are_left_out_of_the_label_model():
    """`fit_label_model` drops every row with *any* NaN (not only all-NaN rows): a
    half-annotated row would enter as 0 in its missing cell. Kills `isnan(a).all(1)`."""
    a = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [np.nan, 1]], float)
    y = np.array([1, 1, 0, 0, 0])
    m = fit_label_model(a, y, "frequency", smoothing=0.0)
    ref = fit_label_model(a[:4], y[:4], "frequency", smoothing=0.0)
    assert m.table == ref.table and m.prior == ref.prior == 0.5


def test_an_attribute_without_variation_does_not_change_the_monotonicity_p_value():
    """The joint test's degrees of freedom are the attributes with a *negative*
    unconstrained weight: an all-zero column (weight exactly 0) adds none. Kills `w <= 0`."""
    rng = np.random.default_rng(0)
    a = (rng.random((300, 3)) < 0.5).astype(float)
    y = (rng.random(300) < 1 / (1 + np.exp(-(1.5 * a[:, 0] - 1.0 * a[:, 1])))).astype(int)
    names = ["a", "b", "c"]
    base = monotonicity_check(a, y, names)
    more = monotonicity_check(np.column_stack([a, np.zeros(300)]), y, [*names, "z"])
    assert base["p_value"] is not None and base["p_value"] < 0.05
    assert more["p_value"] == pytest.approx(base["p_value"], rel=1e-6)
    assert list(more["violating"]) == list(base["violating"]) == ["b"]


def test_report_fraction_only_truly_causal_counts_attributed_samples_only():
    """`fraction_subset_only_truly_causal` is over the samples that got a subset: an empty S
    (no effect) says nothing. Independent count here, with "b" declared non-causal so the
    fraction is below 1. Kills counting every known row."""
    rng = np.random.default_rng(2)
    a = (rng.random((200, 3)) < 0.5).astype(float)
    a[:40] = 0.0  # y = 1 rows among these have no subset with an effect
    y = (a @ np.array([2.0, 1.0, 0.0]) + rng.normal(0, 0.3, 200) > 0.8).astype(int)
    y[:20] = 1
    truth = {"causal_weights": {"a": 2.0, "b": 0.0, "c": 0.0}, "threshold": 0.8,
             "noise": 0.3}
    rep = attribution_report(a, y, ["a", "b", "c"], truth=truth)
    model = fit_label_model(a, y)
    res = causal_attribution(model, a, y)
    got = res.subset >= 0
    assert rep["n_no_effect"] == int((~got).sum()) >= 20
    want = float((~res.r[got][:, 1:]).all(1).mean())
    assert 0.1 < want < 0.9
    assert rep["fraction_subset_only_truly_causal"] == pytest.approx(want)


# --------------------------------------------------------------------------- PC check


def _stub_pc(monkeypatch):
    """pc_graph replaced by an empty graph (the check's own bookkeeping is under test, not
    causal-learn's search); records the data it was given."""
    seen = {}

    def fake(data, alpha=0.01, indep_test="fisherz", show_progress=False):
        seen["data"] = np.asarray(data)
        return np.zeros((data.shape[1], data.shape[1]))

    monkeypatch.setattr(pc_mod, "pc_graph", fake)
    return seen


def test_edges_of_reads_causal_learns_endpoint_convention():
    """G[j, i] = 1 and G[i, j] = −1 is i → j (causal-learn); both −1 undirected, both 1
    bidirected. Kills the arrow read the wrong way round."""
    g = np.zeros((4, 4))
    g[0, 1], g[1, 0] = -1, 1  # A → B
    g[2, 1], g[1, 2] = -1, 1  # C → B, listed as B <- C
    g[0, 3] = g[3, 0] = -1
    g[2, 3] = g[3, 2] = 1
    edges = pc_mod.edges_of(g, ["A", "B", "C", "D"])
    assert edges == [{"from": "A", "to": "B", "type": "->"},
                     {"from": "A", "to": "D", "type": "--"},
                     {"from": "B", "to": "C", "type": "<-"},
                     {"from": "C", "to": "D", "type": "<->"}]


def test_feature_components_are_those_of_the_centred_features(monkeypatch):
    """X = principal components of the *centred* features: a constant offset on every
    channel changes nothing, and the explained variance is that of the covariance's top
    eigenvalues (independent reference). Kills PCA on uncentred features."""
    seen = _stub_pc(monkeypatch)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    a = (rng.random((60, 2)) < 0.5).astype(float)
    y = (rng.random(60) < 0.5).astype(float)
    rep = pc_mod.pc_check(f + 50.0, a, y, ["a", "b"], n_components=2)
    ev = np.sort(np.linalg.eigvalsh(np.cov(f, rowvar=False)))[::-1]
    assert rep["explained_variance"] == pytest.approx(ev[:2].sum() / ev.sum(), rel=1e-9)
    pcs = seen["data"][:, :2]
    np.testing.assert_allclose(pcs.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(pcs.std(0), 1.0, rtol=1e-9)


def test_more_components_than_channels_gives_one_per_channel(monkeypatch):
    """n_components beyond the feature channels: one X node per channel (k = min). Kills
    naming n_components nodes for fewer columns."""
    seen = _stub_pc(monkeypatch)
    rng = np.random.default_rng(1)
    rep = pc_mod.pc_check(rng.normal(size=(40, 2)), (rng.random((40, 1)) < 0.5).astype(float),
                          (rng.random(40) < 0.5).astype(float), ["a"], n_components=3)
    assert rep["n_components"] == 2 and seen["data"].shape[1] == 2 + 1 + 1


def test_sample_count_boundaries(monkeypatch):
    """At least 20 fully annotated samples, and at least variables + 2 for Fisher-z: one
    fewer is refused, exactly the minimum runs. Kills `< 2` for the minimum and `+ 1` for
    the variables bound."""
    _stub_pc(monkeypatch)
    rng = np.random.default_rng(2)

    def call(n, p):
        a = (rng.random((n, p)) < 0.5).astype(float)
        a[0], a[1] = 0, 1  # every attribute varies
        return pc_mod.pc_check(rng.normal(size=(n, 3)), a, (rng.random(n) < 0.5) * 1.0,
                               [f"a{j}" for j in range(p)], n_components=1)

    with pytest.raises(CausalignError, match="only 19 fully annotated"):
        call(19, 2)
    assert call(20, 2)["n"] == 20
    # 1 component + 17 attributes + 1 label = 19 variables: 21 samples needed
    with pytest.raises(CausalignError, match="at least variables \\+ 2"):
        call(20, 17)
    assert call(21, 17)["n"] == 21


# --------------------------------------------------------------------------- hier-align

P = 3
DT = torch.float64


def _hier(seed=0):
    torch.manual_seed(seed)
    f1 = nn.Sequential(nn.Flatten(), nn.Linear(16, P)).to(DT)
    return HierarchicalModel(f1, MLPHead(P, 2, hidden=4).to(DT))


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, 4, 4, dtype=DT)
    mask[:, :, 1:3, 1:3] = 1
    return {"image": torch.rand(n, 1, 4, 4, generator=g, dtype=DT),
            "label": torch.tensor([0, 1] * (n // 2)), "mask": mask,
            "has_mask": torch.ones(n, dtype=torch.bool), "box_mask": mask,
            "has_annotation": torch.ones(n, dtype=torch.bool),
            "attributes": torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]] * (n // 3), dtype=DT),
            "attr_known": torch.ones(n, P, dtype=torch.bool), "index": torch.arange(n)}


FAST = dict(steps=2, attr_steps=5, cg_iters=2, warm_start=False, balance=0.0)


def test_sigmoid_code_clamps_before_the_logit():
    """encode(0) and encode(1) are the logits of 1e-6 and 1 − 1e-6, not ∓inf (a confident
    f₁ gives â of exactly 0 or 1 in float32). Kills dropping the clamp."""
    u = SigmoidCode().encode(torch.tensor([0.0, 1.0, 0.25], dtype=DT))
    want = torch.logit(torch.tensor([1e-6, 1 - 1e-6, 0.25], dtype=DT))
    torch.testing.assert_close(u, want)


def test_each_level_gets_its_own_alpha_and_lambda():
    """α₁, λ₁ drive the image level (Eq. 7), α₂, λ₂ the attribute level (Eq. 6). Kills
    α₂ passed to the image level."""
    p = HierAlignParams(alpha1=0.3, alpha2=0.02, lam1=0.7, lam2=1.9)
    assert (p.pixel_params().alpha, p.pixel_params().lam) == (0.3, 0.7)
    assert (p.attribute_params().alpha, p.attribute_params().lam) == (0.02, 1.9)
    m = build_method("hier-align", {"alpha1": 0.3, "alpha2": 0.02})
    assert m.pixel.params.alpha == 0.3 and m.attr.params.alpha == 0.02


def test_attribute_counterfactual_stays_a_probability_for_confident_attributes():
    """a* is clamped to [0, 1] (Eq. 7 uses it as a BCE target) even where â is exactly 0
    or 1. Kills returning the unclamped â + σ(u*) − σ(u₀)."""
    method = build_method("hier-align", FAST)
    model = _hier()
    a_hat = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=DT)
    res = method.attribute_counterfactual(model, a_hat, torch.tensor([0, 1]))
    assert float(res.x_star.min()) >= 0.0 and float(res.x_star.max()) <= 1.0


def test_align_batch_caps_the_image_level_at_exactly_that_many_samples():
    """align_batch = 2 of 6 masked samples: the image level aligns 2. Kills `[:cap + 1]`."""
    method = build_method("hier-align", dict(FAST, align_batch=2))
    b = _batch()
    method.fit_attribution(b["attributes"], b["label"])
    out = method(_hier().train(), b)
    assert out.parts["n_align_img"] == 2.0


def test_align_start_and_align_every_schedule():
    """align_start = 2: epoch 1 trains CE + BCE only, epoch 2 aligns. align_every = 2:
    steps 1, 3, 5 align, 2 and 4 do not. Kills `epoch <= align_start` and the schedule
    shifted by one step."""
    b = _batch()
    model = _hier().train()
    method = build_method("hier-align", dict(FAST, align_start=2, lam1=0.0))
    method.fit_attribution(b["attributes"], b["label"])
    method.on_epoch_start(1)
    assert method(model, b).parts["align_step"] == 0.0
    method.on_epoch_start(2)
    assert method(model, b).parts["align_step"] == 1.0
    every = build_method("hier-align", dict(FAST, align_every=2, lam1=0.0))
    every.fit_attribution(b["attributes"], b["label"])
    flags = [every(model, b).parts["align_step"] for _ in range(4)]
    assert flags == [1.0, 0.0, 1.0, 0.0]


def test_attribute_bce_is_the_mean_over_known_entries_only():
    """BCE(f₁(x), a) of Eq. 5 averages over the *known* attribute entries (4 of 18 unknown
    here), by hand. Kills dividing by every entry of the batch."""
    method = build_method("hier-align", {"lam1": 0.0, "lam2": 0.0})
    model = _hier()
    b = _batch()
    b["attr_known"][0] = False
    b["attr_known"][1, :1] = False
    out = method(model, b)
    z = model.f1(b["image"])
    el = torch.nn.functional.binary_cross_entropy_with_logits(z, b["attributes"],
                                                              reduction="none")
    want = el[b["attr_known"]].mean()
    assert out.parts["bce_attr"] == pytest.approx(float(want.detach()), rel=1e-12)


def test_nan_in_unknown_attribute_cells_leaves_the_gradient_finite():
    """Unknown cells may hold NaN (as LesionDataset yields them): the BCE target is filled
    before the loss, else the masked-out NaN still poisons the backward pass (0 · NaN).
    Kills using the raw attributes as the target."""
    method = build_method("hier-align", {"lam1": 0.0, "lam2": 0.0})
    model = _hier()
    b = _batch()
    b["attr_known"][0, 1] = False
    b["attributes"][0, 1] = float("nan")
    out = method(model, b)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_a_constant_attribute_at_a_non_binary_value_is_left_out(monkeypatch):
    """A constant 0.7 column (std ~1e-16 from the mean's rounding) is constant: listed and
    left out of the PC variables. Kills testing `std > 0` instead of max − min."""
    seen = _stub_pc(monkeypatch)
    rng = np.random.default_rng(3)
    a = np.column_stack([(rng.random(41) < 0.5) * 1.0, np.full(41, 0.7)])
    rep = pc_mod.pc_check(rng.normal(size=(41, 3)), a, (rng.random(41) < 0.5) * 1.0,
                          ["a", "flat"], n_components=1)
    assert rep["constant_attributes"] == ["flat"] and seen["data"].shape[1] == 1 + 1 + 1


def test_a_validation_loss_attributes_its_own_batch():
    """Under no_grad (a validation loss) r comes from the batch's own attributes, not the
    training table rows that share its indices: here the validation batch's sample 1
    (y = 1, every attribute 0) has no subset with an effect (nor, refitted, sample 0), so 4
    of 6 rows align at the attribute level (the batch's own CCCE, recomputed here), where the
    training table's rows would give 6. Kills reading the table."""
    method = build_method("hier-align", dict(FAST, lam1=0.0))
    train_b = _batch()
    # y = 1 rows hold two attributes, y = 0 rows one: every row has a subset with an effect
    train_b["attributes"] = torch.tensor([[0, 0, 1], [1, 1, 0], [1, 0, 0], [1, 0, 1],
                                          [0, 1, 0], [0, 1, 1]], dtype=DT)
    method.fit_attribution(train_b["attributes"], train_b["label"])
    assert bool(method.r_known.all())
    val = dict(train_b, attributes=train_b["attributes"].clone())
    val["attributes"][1] = 0.0
    with torch.no_grad():
        out = method(_hier().train(), val)
    own = causal_attribution(fit_label_model(val["attributes"].numpy(), val["label"].numpy()),
                             val["attributes"].numpy(), val["label"].numpy())
    assert out.parts["n_align_attr"] == float((own.subset >= 0).sum()) == 4.0
