"""Independent layer randomisation (Adebayo et al. 2018) in benchmarks/saliency_sanity.py:
one layer random at a time, the others trained, the layer put back afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from test_audit_sanity_1207e import S  # the benchmark module, loaded once
from torch import nn

from causalign.models import build_model


@pytest.fixture(scope="module")
def tiny():
    """An untrained width-4 cnn7, 6 random 16 px images, its own predictions."""
    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    x = torch.rand(6, 1, 16, 16)
    return model, x, model(x).argmax(1).detach()


def test_independent_randomises_exactly_one_layer_per_step(tiny):
    """Guard: at step i only layer i differs from the trained model (every other parameter
    and buffer equal), and its random weights are cascading step i's; the model passed in is
    left untouched."""
    model, x, target = tiny
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in S.cascade_layers(model)]
    seen: list[set[str]] = []
    first_conv: list[torch.Tensor] = []

    class Probe:
        def __init__(self, m: nn.Module) -> None:
            self.m = m

        def attribute(self, inputs, target=None):
            now = self.m.state_dict()
            changed = {k.rsplit(".", 1)[0] for k, v in now.items()
                       if not torch.equal(v, trained[k])}
            seen.append(changed)
            first_conv.append(now["features.0.weight"].clone())
            return inputs.clone()

    res = S.independent_randomisation(model, x, target, ["probe"],
                                      make=lambda name, m: Probe(m))
    assert res["layers"] == ["trained", *names]
    assert seen[0] == set()
    for i, (name, mods) in enumerate(S.cascade_layers(model)):
        own = {k for k, m in model.named_modules() if any(m is g for g in mods)}
        assert seen[i + 1] and seen[i + 1] <= own, (name, seen[i + 1])
    # the same random weights as the cascading step of that index (seed + i)
    casc_seen: list[torch.Tensor] = []

    class Probe2(Probe):
        def attribute(self, inputs, target=None):
            casc_seen.append(self.m.state_dict()["features.0.weight"].clone())
            return inputs.clone()

    S.cascading_randomisation(model, x, target, ["probe"], make=lambda name, m: Probe2(m))
    assert torch.equal(first_conv[-1], casc_seen[-1])
    assert not torch.equal(first_conv[-1], trained["features.0.weight"])
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["gradient", "gradcam", "wbp"])
def test_independent_randomisation_changes_gradient_maps(tiny, name):
    """Guard: re-initialising any single layer changes a gradient-type map (ρ < 1 at every
    step), the trained step is ρ = 1, and the step count matches the layers."""
    model, x, target = tiny
    res = S.independent_randomisation(model, x, target, [name])
    steps = res["steps"][name]
    assert len(steps) == len(S.cascade_layers(model)) + 1
    assert steps[0]["rank_abs"] == pytest.approx(1.0)
    assert all(s["rank_abs"] is None or s["rank_abs"] < 0.999 for s in steps[1:]), \
        [s["rank_abs"] for s in steps]
    # the classifier's re-initialisation alone moves the map as much as in the cascade
    casc = S.cascading_randomisation(model, x, target, [name])["steps"][name]
    assert steps[1] == casc[1]


def test_insensitive_lists_layers_above_threshold():
    steps = {"a": [{"rank_abs": 1.0}, {"rank_abs": 0.9}, {"rank_abs": 0.2}],
             "b": [{"rank_abs": 1.0}, {"rank_abs": None}, {"rank_abs": 0.85}]}
    assert S.insensitive(["trained", "fc", "conv"], steps, 0.8) == {"a": ["fc"],
                                                                     "b": ["conv"]}


def test_unknown_mode_is_one_clear_error(tiny):
    model, x, target = tiny
    with pytest.raises(S.CausalignError, match="sideways"):
        S.layer_randomisation(model, x, target, ["gradient"], "sideways")


@pytest.mark.slow
def test_script_mode_both_writes_both_sets(tmp_path):
    """--mode both: cascading at the top level as before, independent under its key, four
    figures."""
    from causalign.data.synth import SynthConfig, generate
    from causalign.engine import TrainConfig, train

    data = tmp_path / "data"
    generate(data, SynthConfig(n_train=16, n_val=8, n_test=4, size=32, shortcut="none"))
    run = tmp_path / "run"
    train(data, TrainConfig(epochs=1, batch_size=8, width=4, device="cpu"), run,
          progress=False)
    out = tmp_path / "res" / "s.json"
    S.main([str(run), "--mode", "both", "--methods", "gradient", "--n", "3",
            "--no-progress", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["mode"] == "both" and len(res["steps"]["gradient"]) == 8
    ind = res["independent"]
    assert ind["layers"] == res["layers"] and len(ind["steps"]["gradient"]) == 8
    assert ind["steps"]["gradient"][1] == res["steps"]["gradient"][1]
    assert set(ind["insensitive"]) == {"gradient"}
    for f in ("s_maps.png", "s_curves.png", "s_independent_maps.png",
              "s_independent_curves.png"):
        assert (tmp_path / "res" / f).stat().st_size > 0
    out2 = tmp_path / "res" / "i.json"
    S.main([str(run), "--mode", "independent", "--methods", "gradient", "--n", "2",
            "--no-progress", "--out", str(out2)])
    res2 = json.loads(out2.read_text())
    assert "steps" not in res2 and "independent" in res2
    assert not (tmp_path / "res" / "i_maps.png").exists()


def test_bagnet_maps_follow_references_and_lose_order_inside_full_coverage():
    """Guard (the BagNet finding): at every cascading step of a BagNet-9, `gradient` is
    autograd's |∂z/∂x| and `gradcam` a hand-written Grad-CAM at `cam_layer`; the rank
    correlation the gradient keeps with every layer random comes from the patch coverage of
    the border, so on the fully covered centre it is near 0 (measured: ρ 0.41 over the image,
    0.00 on the 64 central pixels)."""
    import copy

    import numpy as np
    import torch.nn.functional as F

    from causalign.explain import get_explainer

    torch.manual_seed(0)
    model = build_model("bagnet9", 1, 2, width=4).eval()
    x = torch.rand(6, 1, 32, 32)
    t = model(x).argmax(1).detach()

    def grad(m):
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(m(xx).gather(1, t[:, None]).sum(), xx)[0]

    def cam(m):
        acts = {}
        h = m.cam_layer.register_forward_hook(lambda mod, i, o: acts.__setitem__("a", o))
        z = m(x).gather(1, t[:, None]).sum()
        h.remove()
        g = torch.autograd.grad(z, acts["a"])[0]
        c = F.relu((g.mean((2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True))
        return F.interpolate(c, size=x.shape[-2:], mode="bilinear").detach()

    work = copy.deepcopy(model)
    trained = get_explainer("gradient", model).attribute(x, target=t).abs()
    for i, (_, mods) in enumerate(S.cascade_layers(work)):
        S.randomise(mods, i)
        assert torch.equal(get_explainer("gradient", work).attribute(x, target=t),
                           grad(work).abs())
        assert torch.allclose(get_explainer("gradcam", work).attribute(x, target=t),
                              cam(work), atol=1e-6)
    rand = get_explainer("gradient", work).attribute(x, target=t).abs()
    h = model.patch_logits(x).shape[-1]
    cov1 = np.zeros(32)
    for j in range(h):
        cov1[2 * j: 2 * j + model.patch] += 1
    inner = torch.from_numpy(np.outer(cov1, cov1) == cov1.max() ** 2).flatten()
    a, b = trained.flatten(1).double().numpy(), rand.flatten(1).double().numpy()
    whole = np.nanmean(S._spearman_rows(a, b))
    centre = np.nanmean(S._spearman_rows(a[:, inner], b[:, inner]))
    assert whole > centre + 0.2 and abs(centre) < 0.3, (whole, centre)
