"""Every registered explainer on the models `build_model` makes (2D images and volumes).

Each map must have the documented shape ((N, C, *spatial), or (N, 1, *spatial) for Grad-CAM),
be finite, and leave the model as it was: same state_dict, every module's train/eval flag,
no hooks, no ``.grad``. A combination that cannot work fails with one clear line naming the
explainer and the model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from causalign.errors import InputError
from causalign.explain import explainer_names, get_explainer
from causalign.explain.lrp import lrp_epsilon_modified_gradient
from causalign.explain.wbp import wbp_weights
from causalign.models import build_model
from causalign.models.backbones import BACKBONES

# Small inputs each model accepts (bagnet9 needs ≥ 9 px; multiview takes (N, C, D, H, W)).
MODELS = {"cnn7": (12, 12), "resnet18": (40, 40), "bagnet9": (12, 12),  # resnet18 at 16 px: 1x1
          "multiview": (3, 8, 8)}


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_explainer_on_every_model(model_name, channels):
    torch.manual_seed(0)
    width = {} if model_name in BACKBONES else {"width": 4}  # backbones refuse a width
    model = build_model(model_name, channels, 2, **width).train()
    x = torch.rand(2, channels, *MODELS[model_name])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in explainer_names():
        if x.dim() == 5 and (name == "gradcam" or name.startswith("lrp-")
                             and name != "lrp-epsilon"):
            with pytest.raises(InputError, match=f"{name}.*MultiViewCNN|{name} has no rule "
                                                 f"for MultiViewCNN"):
                get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
            continue
        a = get_explainer(name, model).attribute(x, target=torch.tensor([0, 1]))
        want = (2, 1, *x.shape[2:]) if name == "gradcam" else tuple(x.shape)
        assert tuple(a.shape) == want, (model_name, name)
        assert torch.isfinite(a).all(), (model_name, name)
        assert not a.requires_grad, (model_name, name)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_refuses_volumes_with_one_clear_line():
    # Before: a torch interpolate ValueError about spatial dimensions, deep inside Captum's
    # upsampling, because the multiview CNN's cam layer sees N·D slices, not N volumes.
    model = build_model("multiview", 1, 2, width=4)
    x = torch.rand(2, 1, 3, 8, 8)
    with pytest.raises(InputError, match=r"gradcam needs 2D images.*MultiViewCNN.*\(2, 1, 3, 8"):
        get_explainer("gradcam", model).attribute(x, target=1)
    with pytest.raises(InputError, match="gradcam needs 2D"):
        get_explainer("gradcam", model).attribute(x, target=1, create_graph=True)


def test_lrp_on_multiview_is_the_map_ppi_trains_on():
    # Before: zennit pushed relevance through the attention pooling's log-softmax/logsumexp as
    # if it were a gradient, so `lrp-epsilon` maps (explain, evaluation) differed by > 100 %
    # from the modified-gradient LRP-ε that PPI trains through (create_graph=True), and the
    # other rules returned similar nonsense silently.
    torch.manual_seed(0)
    model = build_model("multiview", 1, 2, width=4).double().eval()
    x = torch.rand(2, 1, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1])
    lrp = get_explainer("lrp-epsilon", model)
    ours = lrp.attribute(x, target=t)
    trained = lrp.attribute(x, target=t, create_graph=True).detach()
    assert torch.allclose(ours, trained, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours, lrp_epsilon_modified_gradient(model, x, t))
    with pytest.raises(InputError, match="lrp-gamma has no rule for MultiViewCNN"):
        get_explainer("lrp-gamma", model).attribute(x, target=t)


def test_wbp_of_linear_and_sigmoid_models_matches_the_definition():
    # Linear model: W̃⁰ is the weight matrix itself (biases never enter).
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(4, 1, 4, 4)
    t = torch.tensor([0, 1, 2, 1])
    assert torch.allclose(wbp_weights(lin, x, t).flatten(1), lin[1].weight[t])
    # One sigmoid layer: W̃⁰ = W₂ diag(h) W₁ with h = (σ(z) − σ(0))/z (seed 002, Table 1).
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    x = x.double()
    z = mlp[1](x.flatten(1))
    h = (torch.sigmoid(z) - 0.5) / z
    want = (mlp[3].weight[1] * h) @ mlp[1].weight
    assert torch.allclose(wbp_weights(mlp, x, 1).flatten(1), want.detach())
    s = get_explainer("wbp", mlp).attribute(x, target=1)
    assert torch.allclose(s.flatten(1), (want * x.flatten(1)).detach())
