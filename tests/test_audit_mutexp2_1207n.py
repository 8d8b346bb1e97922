"""Mutation audit of the explainers (explain/base, gradient, gradcam, wbp, lrp,
counterfactual_map) and methods/base's parameter comparison, second round: behaviours the
earlier tests let slip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from causalign.errors import InputError
from causalign.explain import get_explainer


def bn_net() -> nn.Sequential:
    """Conv → BN (non-trivial running statistics) → ReLU → conv → ReLU → 3 classes, 8x8."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net


def _explainer(name: str, net: nn.Module):
    return get_explainer(name, net, layer=net[3]) if name == "gradcam" \
        else get_explainer(name, net)


@pytest.mark.parametrize("name", ["gradient", "gradcam", "lrp-epsilon"])
def test_mixed_train_eval_flags_are_restored_one_by_one(name):
    """A training model with a frozen (eval) BatchNorm keeps exactly those flags after a map,
    and the frozen BN's statistics are untouched. Kills `eval_mode` restoring every module
    to the top-level flag instead of its own."""
    net = bn_net().train()
    net[1].eval()
    modes = [m.training for m in net.modules()]
    stats = copy.deepcopy(net[1].state_dict())
    _explainer(name, net).attribute(torch.rand(2, 1, 8, 8), target=1)
    assert [m.training for m in net.modules()] == modes
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize("name", ["gradient", "gradcam", "lrp-epsilon"])
def test_a_submodule_left_in_train_mode_under_an_eval_model_is_mapped_in_eval_mode(name):
    """``model.eval()`` then one BN put back in train mode (top-level flag False): the map is
    the all-eval map, the BN's running statistics do not move and its flag is restored.
    Kills `eval_mode` looking only at the top-level ``model.training`` for its fast path."""
    net = bn_net().eval()
    x = torch.rand(3, 1, 8, 8)
    want = _explainer(name, net).attribute(x, target=torch.tensor([0, 1, 2]))
    net[1].train()
    stats = net[1].running_mean.clone()
    got = _explainer(name, net).attribute(x, target=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got, want)
    assert net[1].training and not net.training
    assert torch.equal(net[1].running_mean, stats)


@pytest.mark.parametrize("name", ["gradient", "gradcam", "wbp", "lrp-epsilon"])
def test_a_bool_tensor_target_is_refused(name):
    """A bool tensor is a mask, not classes: refused in one line, as bool lists are. Kills
    dropping the bool check on tensors in `as_target` (True/False became classes 1/0)."""
    net = bn_net().eval()
    with pytest.raises(InputError, match="integer class indices"):
        _explainer(name, net).attribute(torch.rand(2, 1, 8, 8),
                                        target=torch.tensor([True, False]))


def test_a_per_call_hook_is_passed_by_in_another_thread():
    """`this_call_only`: the hook runs for the registering thread's forwards and not for a
    forward of the same module in another thread. Kills dropping the thread check."""
    import threading

    from causalign.explain.base import this_call_only

    lin = nn.Linear(2, 2)
    calls: list[int] = []
    handle = lin.register_forward_hook(
        this_call_only(lin, lambda m, a, o: calls.append(threading.get_ident())))
    try:
        lin(torch.rand(1, 2))
        t = threading.Thread(target=lambda: lin(torch.rand(1, 2)))
        t.start()
        t.join()
    finally:
        handle.remove()
    assert calls == [threading.get_ident()]


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient"])
def test_create_graph_gradient_map_equals_the_plain_map_per_sample(name):
    """With ``create_graph=True`` each sample's map is its own target logit's gradient (the
    summed score), equal to Captum's plain map for a batch of 3. Kills ``.mean()`` for
    ``.sum()`` in `_input_gradient` (every map 1/N of it)."""
    net = bn_net().eval()
    x = torch.rand(3, 1, 8, 8)
    target = torch.tensor([0, 1, 2])
    plain = get_explainer(name, net).attribute(x, target=target)
    graph = get_explainer(name, net).attribute(x, target=target, create_graph=True)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam"])
def test_create_graph_inside_no_grad_gives_the_plain_map(name):
    """Inside ``torch.no_grad()`` nothing is recorded, so ``create_graph=True`` gives the
    plain map (not an autograd error). Kills dropping ``torch.is_grad_enabled()`` from the
    create_graph branch of `_gradient_map_checked`."""
    net = bn_net().eval()
    x = torch.rand(2, 1, 8, 8)
    want = _explainer(name, net).attribute(x, target=1)
    with torch.no_grad():
        got = _explainer(name, net).attribute(x, target=1, create_graph=True)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam"])
def test_batch_statistics_batchnorm_is_refused_for_a_batch_only(name):
    """A BatchNorm with ``track_running_stats=False`` mixes a batch's samples even in eval
    mode: a batch of 2 is refused in one line, one sample is mapped. Kills dropping
    `check_no_batch_statistics` from `_gradient_map`."""
    net = bn_net()
    net[1] = nn.BatchNorm2d(4, track_running_stats=False)
    net.eval()
    with pytest.raises(InputError, match="no running statistics"):
        _explainer(name, net).attribute(torch.rand(2, 1, 8, 8), target=0)
    assert _explainer(name, net).attribute(torch.rand(1, 1, 8, 8), target=0).shape[0] == 1


def test_gradcam_refuses_volumes_in_one_line():
    """Grad-CAM needs (N, C, H, W): a 5-D volume into a Conv3d model is refused with one
    line naming the alternatives. Kills narrowing the ``inputs.dim() != 4`` check."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 64, 2)).eval()
    with pytest.raises(InputError, match="gradcam needs 2D images"):
        get_explainer("gradcam", net, layer=net[0]).attribute(torch.rand(2, 1, 4, 4, 4),
                                                              target=0)


def test_gradcam_of_a_one_row_layer_is_not_a_point_map():
    """A CAM layer of 1x4 on 2x8 images localises along the row: it is mapped (upsampled to
    2x8, not constant), not refused as a 1x1 map. Kills ``any`` for ``all`` over the layer's
    spatial sizes in `_refuse_point_map`."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(12, 2)).eval()
    cam = get_explainer("gradcam", net, layer=net[3]).attribute(torch.rand(3, 1, 2, 8),
                                                                target=1)
    assert cam.shape == (3, 1, 2, 8)


class _Twice(nn.Module):
    """A shared conv run twice per forward (its two outputs give different maps)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleDict({"stem": nn.Conv2d(1, 3, 3, padding=1),
                                     "shared": nn.Conv2d(3, 3, 3, padding=1)})
        self.head = nn.Linear(3 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.layers["shared"]
        h = shared(torch.relu(self.layers["stem"](x))).sigmoid()
        return self.head(shared(h).sigmoid().flatten(1))


def test_gradcam_one_pass_of_a_layer_run_twice_is_the_two_pass_map():
    """`predict_and_attribute` on a layer the forward runs twice falls back to the two-pass
    path (the layer's last output): its map equals ``attribute`` of the predicted class.
    Kills accepting more than one kept output (``len(seen) < 1``), which used the first."""
    net = _Twice().eval()
    x = torch.rand(4, 1, 6, 6)
    explainer = get_explainer("gradcam", net, layer="layers.shared")
    logits, cam = explainer.predict_and_attribute(x)
    want = explainer.attribute(x, target=logits.argmax(1))
    torch.testing.assert_close(cam, want, rtol=1e-5, atol=1e-7)


class _AuxLast(nn.Module):
    """Two convs the eval forward runs, then an auxiliary conv (last in module order, the
    default CAM layer) it runs only in train mode, as GoogLeNet's auxiliary heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 36, 2)
        self.aux = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        if self.training:
            h = self.aux(h)
        return self.head(torch.relu(self.c2(h)).flatten(1))


def test_gradcam_default_layer_the_forward_skips_falls_back_to_the_last_conv_it_runs():
    """The default layer never run in eval mode: the map is of the last conv the forward
    does run (c2), not the first (c1). Kills ``ran[0]`` in `_layer_that_runs`."""
    net = _AuxLast().eval()
    x = torch.rand(2, 1, 6, 6)
    explainer = get_explainer("gradcam", net)
    got = explainer.attribute(x, target=1)
    assert explainer.layer is net.c2
    want = get_explainer("gradcam", net, layer=net.c2).attribute(x, target=1)
    other = get_explainer("gradcam", net, layer=net.c1).attribute(x, target=1)
    assert (want - other).abs().max() > 1e-4
    torch.testing.assert_close(got, want)


def test_wbp_single_class_tensor_target_applies_to_the_whole_batch():
    """A one-element tensor target names the class of every input, as an int does. Kills
    dropping its expansion in `wbp._resolve_target` (then refused as 1 entry for 3 inputs)."""
    net = bn_net().eval()
    x = torch.rand(3, 1, 8, 8)
    want = get_explainer("wbp", net).attribute(x, target=2)
    torch.testing.assert_close(get_explainer("wbp", net).attribute(x, target=torch.tensor([2])),
                               want)


class _FunctionalTrainingBN(nn.Module):
    """``F.batch_norm(..., training=True)`` with running statistics in its forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("mean", torch.zeros(2))
        self.register_buffer("var", torch.ones(2))
        self.head = nn.Linear(2 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.batch_norm(self.conv(x), self.mean, self.var, training=True)
        return self.head(torch.relu(h).flatten(1))


def test_wbp_refuses_functional_batch_norm_over_batch_statistics():
    """A functional BatchNorm with ``training=True`` normalises over the batch even though it
    has running statistics: WBP refuses it in one line. Kills checking only for missing
    running statistics in `_batch_statistics`."""
    with pytest.raises(InputError, match="batch_norm over the batch"):
        get_explainer("wbp", _FunctionalTrainingBN().eval()).attribute(
            torch.rand(2, 1, 4, 4), target=0)


def _plain_net() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 36, 2)).eval()


def _zennit_map(net: nn.Module, composite, x: torch.Tensor, target: torch.Tensor):
    """The LRP map straight from a zennit composite (R at the output = the target logit)."""
    x = x.clone().requires_grad_(True)
    with composite.context(net) as modified:
        logits = modified(x)
        onehot = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
        (rel,) = torch.autograd.grad(logits, x, grad_outputs=onehot * logits.detach())
    return rel.detach()


def _composite_cases():
    import zennit.composites as zc
    import zennit.rules as zr
    import zennit.types as zt

    base = [(nn.Mish, zr.Pass())] + zc.layer_map_base(1e-6)
    return [
        ("lrp-gamma", {"gamma": 1.5}, zc.LayerMapComposite(
            base + [(zt.Convolution, zr.Gamma(gamma=1.5, stabilizer=1e-6)),
                    (nn.Linear, zr.Epsilon(epsilon=1e-6))])),
        ("lrp-alpha-beta", {"epsilon": 0.3}, zc.EpsilonAlpha2Beta1(epsilon=0.3)),
        ("lrp-flat", {"epsilon": 0.3}, zc.EpsilonPlusFlat(epsilon=0.3)),
        ("lrp-w-square", {}, zc.SpecialFirstLayerMapComposite(
            layer_map=base + [(zt.Convolution, zr.ZPlus(stabilizer=1e-6)),
                              (nn.Linear, zr.Epsilon(epsilon=1e-6))],
            first_map=[(zt.Linear, zr.WSquare(stabilizer=1e-6))])),
        ("lrp-zbox", {"low": -1.0, "high": 2.0}, zc.EpsilonGammaBox(low=-1.0, high=2.0)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_lrp_variants_apply_their_rules_with_the_given_settings(case):
    """Each LRP variant with a non-default setting equals zennit's own composite built with
    that setting (a net without BatchNorm, so no canonizer is involved), and the setting
    changes the map. Kills a variant ignoring its gamma / epsilon / low-high, and w-square's
    first layer taking z⁺ instead of w²."""
    name, kw, composite = _composite_cases()[case]
    net = _plain_net()
    x = torch.rand(2, 1, 6, 6)
    target = torch.tensor([0, 1])
    got = get_explainer(name, net, **kw).attribute(x, target=target)
    want = _zennit_map(net, composite, x, target)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    if kw:
        default = get_explainer(name, net).attribute(x, target=target)
        assert (default - got).abs().max() > 1e-4 * got.abs().max()


def test_a_diverged_search_warns_once_per_explainer_but_marks_every_call(monkeypatch):
    """The divergence warning comes once per explainer (a command maps batch after batch);
    ``.diverged`` is set after every call. Kills never setting ``_warned_diverged``."""
    import types
    import warnings

    from causalign.explain import CounterfactualSaliency
    from causalign.explain.counterfactual import CounterfactualResult
    from causalign.models import SevenLayerCNN

    model = SevenLayerCNN(1, 2, width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    e = CounterfactualSaliency(model, steps=2)
    real = e.generator.generate

    def diverging(x0, **kw):
        r = real(x0, **kw)
        fields = {f: getattr(r, f) for f in CounterfactualResult.__dataclass_fields__}
        return CounterfactualResult(**{**fields, "diverged": torch.tensor([False, True])})

    monkeypatch.setattr(e, "generator", types.SimpleNamespace(generate=diverging))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            e.attribute(x, target=torch.tensor([0, 1]))
            assert e.diverged.tolist() == [False, True]
    assert sum("diverged" in str(w.message) for w in caught) == 1


def test_params_diff_compares_new_keys_with_their_default_or_earlier_value():
    """`params_diff`: a key the stored run lacks differs only when the wanted value is not
    its default; with an earlier behaviour (``before``) it is compared with that, unless
    ``no_effect`` says the setting could not act; ``ignore`` keys never differ. Kills
    dropping the default comparison, the ``no_effect`` exemption and ``ignore``."""
    from causalign.methods.base import params_diff

    stored = {"lam": 1.0, "device_batch": 8}
    assert params_diff(stored, {"lam": 1.0, "device_batch": 8, "new": 2},
                       defaults={"new": 2}) == []
    assert params_diff(stored, {"lam": 1.0, "device_batch": 8, "new": 3},
                       defaults={"new": 2}) == ["method.new None -> 3"]
    assert params_diff(stored, {"lam": 1.0, "device_batch": 8, "new": 3},
                       defaults={"new": 3}, before={"new": 2}) == [
        "method.new 2 (before the setting existed) -> 3"]
    assert params_diff(stored, {"lam": 1.0, "device_batch": 8, "new": 3},
                       defaults={"new": 3}, before={"new": 2},
                       no_effect=lambda k: k == "new") == []
    assert params_diff(stored, {"lam": 2.0, "device_batch": 16}, ignore=("device_batch",)) \
        == ["method.lam 1.0 -> 2.0"]


def test_unused_settings_warn_only_when_changed_from_their_default():
    """`warn_unused_settings`: one warning per setting this combination never reads, and
    only when it differs from its default (a default is no choice of the user's). Kills
    dropping the default comparison (a warning for every unread setting)."""
    import dataclasses
    import warnings

    from causalign.methods.base import warn_unused_settings

    @dataclasses.dataclass
    class P:
        a: float = 0.5
        b: bool = False
        c: int = 3

    rows = [("a", False, "with x"), ("b", False, "with y"), ("c", True, "always")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unused_settings(P(), rows)
        assert caught == []
        warn_unused_settings(P(a=0.25, b=True, c=9), rows)
    assert [str(w.message) for w in caught] == [
        "method.a=0.25 has no effect: it is used only with x",
        "method.b=true has no effect: it is used only with y"]


class _ShiftedTanh(nn.Module):
    """tanh(z) + 0.3: g(0) ≠ 0 and no closed form (RescaleRule's generic branch)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) + 0.3


def test_generic_rescale_rule_takes_the_limit_for_tiny_pre_activations_in_float32():
    """For g(0) ≠ 0 without a closed form, (g(z) − g(0))/z loses all digits for |z| ~ 1e-7
    in float32; the rule takes its limit g'(0) = 1 there (tanh(z)/z → 1), and the exact
    value away from it. Kills dropping the cancellation threshold (eps = 0)."""
    from causalign.explain.wbp import RescaleRule

    rule = RescaleRule(_ShiftedTanh())
    z = torch.tensor([1e-7, -3e-7, 0.0, 0.5, -2.0])
    h = rule(z, torch.tanh(z) + 0.3)
    want = torch.tensor([1.0, 1.0, 1.0, float(torch.tanh(torch.tensor(0.5)) / 0.5),
                         float(torch.tanh(torch.tensor(2.0)) / 2.0)])
    torch.testing.assert_close(h, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gradient", "gradcam", "wbp", "lrp-epsilon"])
def test_float64_inputs_into_a_float32_model_are_refused_in_one_line(name):
    """float64 images into a float32 model: one line naming both dtypes (torch's own
    message comes from deep inside Captum/zennit); the float64 model takes them. Kills
    dropping the dtype comparison in `check_model_dtype`."""
    net = bn_net().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(InputError, match="inputs are torch.float64 but .* torch.float32"):
        _explainer(name, net).attribute(x, target=0)
    net64 = bn_net().double().eval()
    want = _explainer(name, bn_net().eval()).attribute(x.float(), target=0)
    got = _explainer(name, net64).attribute(x, target=0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-5)
