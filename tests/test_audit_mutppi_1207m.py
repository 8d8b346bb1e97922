"""Mutation audit of Proactive Pseudo-Intervention (methods/ppi.py) and deletion faithfulness
(metrics/faithfulness.py): behaviours the earlier tests let slip."""

from __future__ import annotations

import math

import pytest
import torch

from causalign.methods.ppi import adaptive_sigma, box_mask, hard_mask


def _points(points: list[tuple[int, int]], size: int = 32, value: float = 1.0) -> torch.Tensor:
    s = torch.zeros(1, size, size)
    for r, c in points:
        s[0, r, c] = value
    return s


# ------------------------------------------------------------------ masks


def test_adaptive_sigma_scales_the_std_by_k():
    """σ = mean(s) + k·std(s) per image with the population std (App. B), for k ≠ 1: the
    old test used k = 1 only, so a σ = mean + std (k dropped) passed."""
    torch.manual_seed(0)
    s = torch.rand(3, 6, 6)
    flat = s.flatten(1).double()
    for k in (0.5, 2.0, 3.0):
        want = flat.mean(1) + k * (flat - flat.mean(1, keepdim=True)).pow(2).mean(1).sqrt()
        torch.testing.assert_close(adaptive_sigma(s, k).double(), want, rtol=1e-5, atol=1e-6)


def test_hard_mask_of_a_map_without_evidence_keeps_nothing():
    """1[s > k·std]: strict. A zero map has std 0, so `>=` would keep every pixel (a
    whole-image intervention from no evidence); kills the `>` → `>=` mutant."""
    assert torch.equal(hard_mask(torch.zeros(2, 8, 8), k=7.0), torch.zeros(2, 8, 8))
    assert torch.equal(hard_mask(torch.zeros(1, 8, 8), k=0.0), torch.zeros(1, 8, 8))


def test_box_centre_and_spread_come_from_the_kept_points_only():
    """The box is drawn around the hard-mask points (App. B); a weak salient point below
    k·std must not pull the centre of mass or widen the box (mutant: mass = all of s⁺)."""
    s = _points([(10, 10), (10, 14), (14, 10)])
    s[0, 28, 28] = 0.2  # below 7·std ≈ 0.38: not kept
    assert hard_mask(s, 7.0)[0, 28, 28] == 0
    expected = torch.zeros_like(s)
    expected[0, 9:15, 9:15] = 1  # the three kept points alone: rows/cols 9..14
    assert torch.equal(box_mask(s, k=7.0, box_std=1.2), expected)


def test_topn_fraction_rounds_to_the_nearest_count():
    """top_n < 1 keeps round(top_n·P) points, not the floor: 0.057 of 100 pixels is 6
    (mutant: int() truncation gives 5)."""
    from causalign.methods.ppi import n_points, topn_mask

    assert n_points((10, 10), 0.057) == 6 and n_points((10, 10), 0.054) == 5
    torch.manual_seed(0)
    s = 0.5 + 0.5 * torch.rand(1, 10, 10)  # every point above σ, distinct
    assert int((topn_mask(s, 0.057) > 0.5).sum()) == 6


def test_topn_of_exactly_one_is_a_count_of_one_point():
    """top_n ≥ 1 is a count (README, module doc): top_n = 1 keeps the single most salient
    point, not the fraction 1 = every pixel (mutant: `top_n <= 1` read as a fraction)."""
    from causalign.methods.ppi import n_points, topn_mask

    assert n_points((8, 8), 1.0) == 1 and n_points((8, 8), 3) == 3
    torch.manual_seed(0)
    s = 0.5 + 0.5 * torch.rand(2, 8, 8)
    t = topn_mask(s, 1.0)
    assert ((t > 0).flatten(1).sum(1) == 1).all()
    assert torch.equal((t > 0).flatten(1).float().argmax(1), s.flatten(1).argmax(1))


def test_shifted_masks_move_both_ways():
    """App. F rolls by a random offset of random sign; the old test measured the wrap-around
    distance only, so a shift that always went +d (sign dropped) passed."""
    from causalign.methods.ppi import shift_masks

    masks = torch.zeros(40, 64, 64)
    masks[:, 30, 30] = 1
    out = shift_masks(masks, 0.25, generator=torch.Generator().manual_seed(0))
    rows, cols = (out.flatten(1).argmax(1) // 64) - 30, (out.flatten(1).argmax(1) % 64) - 30
    for d in (rows, cols):  # offsets 8..16 with a sign: no wrap at 64 px
        assert ((d.abs() >= 8) & (d.abs() <= 16)).all()
        assert (d > 0).any() and (d < 0).any()


# ------------------------------------------------------------------ the loss, by hand


def _linear(c: int = 1, h: int = 3, w: int = 3, classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, classes))


def _soft_t(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            omega: float = 20.0, sigma: float = 0.3) -> torch.Tensor:
    """For f = W·vec(x) + b the WBP map is s_y = Σ_c W[y] ⊙ x (seed 002 Eq. 6, 7),
    normalised s⁺/max s⁺, then Eq. 2's soft mask."""
    s = (model[1].weight[y].view_as(x) * x).sum(1).clamp_min(0)
    s = s / s.flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (s.dim() - 1)))
    return torch.sigmoid(omega * (s - sigma))


def test_a_single_image_batch_gets_no_adversarial_contrast():
    """L_ad needs another image's mask (a derangement of ≥ 2): a batch of one (the last,
    short batch of an epoch) has no L_ad; with `n >= 1` it contrasted the image with its own
    mask, a second L_con with the opposite target."""
    from causalign.methods import build_method
    from causalign.methods.ppi import contrast_loss

    model = _linear()
    torch.manual_seed(1)
    x, y = torch.rand(1, 1, 3, 3), torch.tensor([1])
    out = build_method("ppi", {"omega": 20.0, "sigma": 0.3})(model, {"image": x, "label": y})
    assert "ad" not in out.parts and {"con", "reg"} <= set(out.parts)
    with torch.no_grad():
        t = _soft_t(model, x, y)
        l_con = contrast_loss(model(x - t.unsqueeze(1) * x), y)
    assert out.parts["con"] == pytest.approx(float(l_con), rel=1e-5)


def test_the_adversarial_contrast_uses_the_other_images_mask_on_this_image():
    """x' = x − T(s(x_π(i))) ⊙ x for the rows whose *partner's* mask removes something:
    image 0 (no positive evidence, no mask of its own) still gets image 1's mask; the
    mutant `ad_rows = masked` took image 1 with image 0's empty mask instead."""
    from causalign.methods import build_method

    model = _linear()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0] * 9, [1.0] * 4 + [-1.0] * 5]))
    torch.manual_seed(1)
    x, y = torch.rand(2, 1, 3, 3) + 0.1, torch.tensor([0, 1])  # class 0: all evidence < 0
    only_ad = {"cls_weight": 0.0, "con_weight": 0.0, "reg_weight": 0.0, "ad_weight": 1.0,
               "omega": 20.0, "sigma": 0.3}
    out = build_method("ppi", only_ad)(model, {"image": x, "label": y})
    assert out.parts["empty_mask"] == pytest.approx(0.5)
    with torch.no_grad():
        t1 = _soft_t(model, x[1:], y[1:])
        want = torch.nn.functional.cross_entropy(model(x[:1] - t1.unsqueeze(1) * x[:1]), y[:1])
    assert out.parts["ad"] == pytest.approx(float(want), rel=1e-5)


def test_contrast_on_positive_includes_every_class_but_zero():
    """contrast_on=positive applies L_con to labels ≠ 0, so in three classes to class 2 as
    well as class 1 (mutant: `y == 1`)."""
    from causalign.methods import build_method
    from causalign.methods.ppi import contrast_loss

    model = _linear(classes=3)
    torch.manual_seed(3)
    x, y = torch.rand(3, 1, 3, 3), torch.tensor([0, 2, 1])
    only_con = {"cls_weight": 0.0, "con_weight": 1.0, "reg_weight": 0.0, "ad_weight": 0.0,
                "omega": 20.0, "sigma": 0.3, "contrast_on": "positive"}
    out = build_method("ppi", only_con)(model, {"image": x, "label": y})
    with torch.no_grad():
        t = _soft_t(model, x, y)
        want = contrast_loss(model((x - t.unsqueeze(1) * x)[1:]), y[1:])
    assert out.parts["con"] == pytest.approx(float(want), rel=1e-5)


def test_mean_fill_is_the_mean_of_each_channel():
    """fill=mean sets a masked pixel to the image's mean intensity *per channel* (module
    doc); the earlier tests had one channel, where a mean over all channels is the same."""
    from causalign.methods import build_method
    from causalign.methods.ppi import contrast_loss

    model = _linear(c=3)
    torch.manual_seed(4)
    x, y = torch.rand(2, 3, 3, 3), torch.tensor([1, 1])
    x[:, 0] += 2.0  # channel means far apart
    only_con = {"cls_weight": 0.0, "con_weight": 1.0, "reg_weight": 0.0, "ad_weight": 0.0,
                "omega": 20.0, "sigma": 0.3, "fill": "mean"}
    out = build_method("ppi", only_con)(model, {"image": x, "label": y})
    with torch.no_grad():
        t = _soft_t(model, x, y).unsqueeze(1)
        x_star = x - t * (x - x.mean((2, 3), keepdim=True))
        want = contrast_loss(model(x_star), y)
    assert out.parts["con"] == pytest.approx(float(want), rel=1e-5)


def test_a_hard_mask_that_keeps_nothing_makes_no_contrast():
    """A map with evidence whose hard mask keeps no point (k·std above every value) removes
    nothing: no L_con / L_ad (x* = x would push f(x) away from y). Mutant: only the map's
    evidence was checked."""
    from causalign.methods import build_method

    model = _linear()
    torch.manual_seed(1)
    x, y = torch.rand(2, 1, 3, 3), torch.tensor([0, 1])
    out = build_method("ppi", {"mask": "hard", "hard_k": 50.0})(model, {"image": x, "label": y})
    assert out.parts["empty_mask"] == 1.0 and out.parts["mask_area"] == 0.0
    assert "con" not in out.parts and "ad" not in out.parts and "reg" in out.parts


def test_contrasts_are_classified_with_batch_statistics():
    """x*, x' go through the model in train mode, in one batch, with BatchNorm's running
    statistics frozen (module doc); mutant: classified in eval mode (running statistics),
    which the earlier BN test (it checks only that the statistics do not move) let pass."""
    import copy

    from causalign.methods import build_method
    from causalign.methods.ppi import contrast_loss, normalize_saliency, soft_mask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4),
                                torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2)).train()
    x, y = torch.rand(2, 1, 3, 3) * 3, torch.tensor([0, 1])
    method = build_method("ppi", {"omega": 20.0, "sigma": 0.3})
    out = method(model, {"image": x, "label": y})
    s = normalize_saliency(method.saliency(model, x, y, create_graph=False)).detach()
    t = soft_mask(s, 20.0, 0.3).unsqueeze(1)
    x_star, x_adv = x - t * x, x - t.flip(0) * x  # n = 2: the derangement is the swap
    con, ad = s.flatten(1).amax(1) > 0, (s.flatten(1).amax(1) > 0).flip(0)  # maps with evidence
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        o_con, o_ad = ref(torch.cat([x_star[con], x_adv[ad]])).split([int(con.sum()),
                                                                      int(ad.sum())])
    assert out.parts["con"] == pytest.approx(float(contrast_loss(o_con, y[con])), rel=1e-4)
    assert out.parts["ad"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(o_ad, y[ad])), rel=1e-4)


# ------------------------------------------------------------------ deletion faithfulness


def _deletion_reference(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor,
                        target: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """p_t(x) − p_t(x with the k highest-map pixels set to `fill` in every channel)."""
    keep = torch.ones_like(maps.flatten(1))
    keep.scatter_(1, maps.flatten(1).argsort(1, descending=True)[:, :k], 0.0)
    keep = keep.view(x.shape[0], 1, *x.shape[2:])
    with torch.no_grad():
        p = model(x).double().softmax(1)
        q = model(x * keep + fill * (1 - keep)).double().softmax(1)
    idx = target[:, None]
    return (p.gather(1, idx) - q.gather(1, idx)).squeeze(1)


def test_deletion_drop_matches_a_hand_reference_with_fill_channels_and_rounding():
    """Drop = p_t(x) − p_t(x̃), x̃ = x with the top-k pixels (k = round(frac·P), here 0.22·16
    = 3.52 → 4) set to `fill` in *all* channels. Earlier tests used one channel, fill 0 and
    fractions whose k was exact, so a floor k, an ignored fill or a pixel removed in one
    channel only passed; also pins the ranking (descending, mapped back from the tie order)
    and the sign of the drop."""
    from causalign.metrics import deletion_scores

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16, 3)).eval()
    x = torch.rand(4, 3, 4, 4)
    maps = torch.randperm(4 * 16).view(4, 4, 4).float()  # distinct values: no ties
    t = torch.tensor([0, 2, 1, 2])
    got = deletion_scores(model, x, maps, t, fractions=(0.22, 0.5), fill=0.5)
    torch.testing.assert_close(got[0.22].double(),
                               _deletion_reference(model, x, maps, t, 4, 0.5), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(got[0.5].double(),
                               _deletion_reference(model, x, maps, t, 8, 0.5), rtol=1e-5,
                               atol=1e-6)
    pred = model(x).argmax(1)
    torch.testing.assert_close(deletion_scores(model, x, maps, None, fractions=(0.22,))[0.22]
                               .double(), _deletion_reference(model, x, maps, pred, 4, 0.0),
                               rtol=1e-5, atol=1e-6)


def test_deletion_tie_order_ignores_the_global_random_state():
    """Ties (a flat map) are removed in one fixed order: the same drops whatever the global
    seed, and the global generator is not advanced (mutant: randperm from the global RNG)."""
    from causalign.metrics import deletion_scores

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    x, flat = torch.rand(2, 1, 4, 4), torch.ones(2, 4, 4)
    torch.manual_seed(1)
    a = deletion_scores(model, x, flat, 1, fractions=(0.25,))[0.25]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = deletion_scores(model, x, flat, 1, fractions=(0.25,))[0.25]
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    deletion_scores(model, x, flat, 1, fractions=(0.25,))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_deletion_refuses_a_non_finite_fill(fill: float):
    """A NaN/inf fill gave NaN drops without an error; it is a one-line InputError."""
    from causalign.errors import InputError
    from causalign.metrics import deletion_scores

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    with pytest.raises(InputError, match="fill value must be finite"):
        deletion_scores(model, torch.rand(1, 1, 4, 4), torch.rand(1, 4, 4), 0, fill=fill)


@pytest.mark.parametrize("setting", [{"omega": 0.0}, {"omega": -5.0}, {"shift_max": 1.0},
                                     {"top_n": 0.0}, {"box_std": 0.0}])
def test_degenerate_mask_settings_are_config_errors(setting: dict[str, float]):
    """ω = 0 makes the soft mask a constant ½ (half of every pixel removed, no threshold):
    refused as ω > 0 requires (Eq. 2); mutant `omega >= 0` accepted it. Guards the other
    boundaries too."""
    from causalign.errors import ConfigError
    from causalign.methods import build_method

    with pytest.raises(ConfigError, match=next(iter(setting))):
        build_method("ppi", setting)
