"""Audit: every command × every model type (1207e).

ResNet-18's Grad-CAM layer (layer4) is 1x1 on images under 33 px (MedMNIST's 28 px, the
32 px synthetic data): the upsampled map was a constant plus rounding noise, and evaluate /
train reported cam_precision and deletion from pixels ranked by that noise; explain wrote
flat overlays with a few noise pixels."""

from __future__ import annotations

import pytest
import torch

from causalign.data import LesionDataset, SynthConfig, generate
from causalign.engine.evaluate import evaluate_split
from causalign.errors import InputError
from causalign.explain import get_explainer
from causalign.methods import build_method
from causalign.models import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm") / "d"
    generate(root, SynthConfig(n_train=4, n_val=4, n_test=6, size=32))
    return root


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 1, 2).eval()


def test_gradcam_refuses_a_1x1_layer():
    model = _resnet()
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(InputError, match="1x1 at 32x32 px"):
        get_explainer("gradcam", model).attribute(x, target=torch.tensor([0, 1]))
    with pytest.raises(InputError, match="constant"):
        get_explainer("gradcam", model).predict_and_attribute(x)


def test_gradcam_keeps_a_2x2_layer():  # guard: 64 px gives layer4 2x2, a real map
    cam = get_explainer("gradcam", _resnet()).attribute(torch.rand(2, 1, 64, 64), target=0)
    assert cam.shape == (2, 1, 64, 64)


def test_evaluate_falls_back_to_wbp_on_a_1x1_layer(data):
    model = _resnet()
    out = evaluate_split(model, build_method("erm", {}), LesionDataset(data, "test"), "cpu",
                         saliency="gradcam", fractions=(0.1,))
    assert out["saliency"] == "wbp"
    assert "1x1" in out["saliency_note"]
    assert out["cam_precision"] == out["cam_precision"]  # finite, from a real map
