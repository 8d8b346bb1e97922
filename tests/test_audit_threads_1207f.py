"""One model shared between threads, one explainer re-used: concurrent maps equal the
single-threaded ones, plain predictions in another thread are not touched, repeated and failing
calls leave no hooks, modes or weights behind.

Races are made deterministic where possible: `_interleaved` runs another thread's work from a
hook *inside* the explainer's forward (so it overlaps the explainer's hooks and module changes
every time); the loop tests use a barrier and repeat counts (the lrp and counterfactual ones
failed in every run before the fixes)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from causalign.explain import get_explainer
from causalign.models import build_model

SIZE = 32


def _cnn7() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn7", 3, 2, width=4)
    model.train()
    with torch.no_grad():  # running statistics that differ from the identity
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


def _smooth() -> nn.Module:
    """Activations WBP rescales by hooks (SiLU in place, GELU), BatchNorm to fold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


def _images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def _snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "params": [id(p) for p in model.parameters()],
            "hooks": _hooks(model),
            "training": [m.training for m in model.modules()],
            "grad": [p.requires_grad for p in model.parameters()],
            "inplace": [getattr(m, "inplace", None) for m in model.modules()],
            "forward": [("forward" in m.__dict__) for m in model.modules()]}


def _assert_clean(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key in ("params", "hooks", "training", "grad", "inplace", "forward"):
        assert after[key] == before[key], key


KW = {"counterfactual": {"steps": 3}}


def _concurrent(name: str, model: nn.Module, calls: int) -> None:
    """2 threads x `calls` maps of different inputs from one model, each thread with its own
    explainer; every map must equal the single-threaded one and the model be left as it was."""
    xs = [_images(0), _images(1)]
    refs = [get_explainer(name, model, **KW.get(name, {})).attribute(x, target=1) for x in xs]
    before = _snapshot(model)
    barrier = threading.Barrier(2)
    wrong: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        explainer = get_explainer(name, model, **KW.get(name, {}))
        barrier.wait()
        for _ in range(calls):
            try:
                a = explainer.attribute(xs[i], target=1)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                continue
            if not torch.allclose(a, refs[i], rtol=1e-4, atol=1e-6):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of {2 * calls} concurrent maps differ"
    _assert_clean(model, before)


@pytest.mark.parametrize("name", ["lrp-epsilon", "lrp-gamma"])
def test_concurrent_lrp_maps_and_model_intact(name: str) -> None:
    """zennit composites canonize (fold BatchNorm into the weights) and hook the model in
    place: two threads left 60 hooks and extra bias parameters on the model, and 16 of 20
    maps were wrong."""
    _concurrent(name, _cnn7(), calls=8)


def test_concurrent_counterfactual_maps() -> None:
    """The search's eval_mode(fold_bn=True) patches BatchNorm's forward on the instance: two
    searches at once failed ("'BatchNorm2d' object has no attribute 'forward'")."""
    _concurrent("counterfactual", _cnn7(), calls=6)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam", "wbp"])
def test_concurrent_maps(name: str) -> None:
    """Guard for gradient, input-x-gradient and wbp (right with two threads before). gradcam
    failed in some runs before the fix ("differentiated Tensor ... not used in the graph":
    Captum's hook kept the other thread's activations)."""
    _concurrent(name, _smooth() if name == "wbp" else _cnn7(), calls=10)


def _interleaved(model: nn.Module, work, layer: nn.Module) -> list:
    """Run `work()` in another thread from a forward hook on `layer`, inside the first forward
    that reaches it in this thread (i.e. while an explainer's hooks and module changes are in
    place), and return what it returned (or raised)."""
    out: list = []
    me = threading.get_ident()

    def hook(_m: nn.Module, _a: tuple, _o: object) -> None:
        if threading.get_ident() != me or out:
            return

        def run() -> None:
            try:
                out.append(work())
            except Exception as exc:  # noqa: BLE001 - returned to the test
                out.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(timeout=30)
        assert not t.is_alive(), "the other thread is stuck"

    handle = layer.register_forward_hook(hook)
    return out, handle


@pytest.mark.parametrize("name", ["gradcam", "wbp", "lrp-epsilon", "lrp-flat", "counterfactual"])
def test_prediction_during_attribution(name: str) -> None:
    """A plain forward (with autograd, as training would) and its input gradient in another
    thread while a map is being computed equal those taken alone, and the map is the
    single-threaded one. Before the fix gradcam failed ("differentiated Tensor ... not used
    in the graph": Captum's hook kept the other thread's activations) and WBP rescaled the
    other thread's input gradient (a training step's gradient would have been WBP's); a guard
    for lrp-* and counterfactual (they passed here before; lrp-* now explain a copy)."""
    model = _smooth() if name == "wbp" else _cnn7()
    x, xp = _images(0), _images(1, n=8)
    ref = get_explainer(name, model, **KW.get(name, {})).attribute(x, target=1)
    ref_logits = model(xp).detach()
    ref_grad = get_explainer("gradient", model).attribute(xp, target=0)
    before = _snapshot(model)

    def predict() -> tuple:
        logits = model(xp)
        return logits.detach(), get_explainer("gradient", model).attribute(xp, target=0)

    layer = model[-1] if isinstance(model, nn.Sequential) else model.classifier
    out, handle = _interleaved(model, predict, layer)
    try:
        a = get_explainer(name, model, **KW.get(name, {})).attribute(x, target=1)
    finally:
        handle.remove()
    assert out and not isinstance(out[0], Exception), out
    logits, grad = out[0]
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(a, ref, rtol=1e-4, atol=1e-6)
    _assert_clean(model, before)


@pytest.mark.parametrize("name", ["gradient", "input-x-gradient", "gradcam", "wbp",
                                  "lrp-epsilon", "lrp-gamma", "counterfactual"])
def test_reused_explainer_leaves_nothing(name: str) -> None:
    """Guard: one explainer object, 100 calls (20 for counterfactual): no hooks, parameters,
    modes or flags accumulate on the model, and the last map equals the first."""
    model = _smooth() if name == "wbp" else _cnn7()
    before = _snapshot(model)
    explainer = get_explainer(name, model, **KW.get(name, {}))
    x = _images(2, n=2)
    first = explainer.attribute(x, target=1)
    for _ in range(19 if name == "counterfactual" else 99):
        last = explainer.attribute(x, target=1)
    assert torch.allclose(first, last)
    _assert_clean(model, before)


@pytest.mark.parametrize("name", ["gradient", "gradcam", "wbp", "lrp-epsilon", "lrp-zbox",
                                  "counterfactual"])
def test_failed_calls_leave_model_clean(name: str) -> None:
    """Guard: a NaN input or an out-of-range target fails with one clear error and leaves
    no hooks, mode, requires_grad or weight change behind (model in train mode, one frozen
    parameter, to see either restored)."""
    from causalign.errors import InputError

    model = _smooth() if name == "wbp" else _cnn7()
    model.train()
    next(model.parameters()).requires_grad_(False)
    before = _snapshot(model)
    explainer = get_explainer(name, model, **KW.get(name, {}))
    bad = _images(3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        explainer.attribute(bad, target=1)
    with pytest.raises(InputError):
        explainer.attribute(_images(3), target=5)
    _assert_clean(model, before)

