"""Review of the second wave (threads, batch statistics, predict follow-ups), 2026-12-07."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from causalign.explain.gradcam import GradCAM


class _InplaceAfterCam(nn.Module):
    """The CAM layer (c2) followed by ``ReLU(inplace=True)``, as a user-given conv of VGG."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("frozen", [False, True])
def test_gradcam_inplace_relu_after_layer_matches_captum(frozen: bool) -> None:
    """Grad-CAM's own hook kept the copy it passed on, which the in-place ReLU overwrote: the
    map used the ReLU's output (off by 2.2e-4 of 3.9e-4 vs Captum's LayerGradCam) and a
    frozen model failed ("a leaf Variable that requires grad is being used in an in-place
    operation")."""
    torch.manual_seed(0)
    model = _InplaceAfterCam().eval()
    if frozen:
        model.requires_grad_(False)
    x = torch.randn(3, 1, 12, 12)
    target = torch.tensor([0, 1, 1])
    ours = GradCAM(model, layer="c2").attribute(x, target=target)
    ref = LayerGradCam(model, model.c2).attribute(x, target=target, relu_attributions=True)
    assert torch.allclose(ours, ref.detach(), atol=1e-7, rtol=0)
    assert not any(m._forward_hooks for m in model.modules())


def test_predict_lists_a_file_given_twice_once(tmp_path) -> None:
    """A file given twice, or by name and inside a folder also given, was predicted twice
    (rows 'img0' and 'img0_1' of one image, `causalign predict RUN a/img0.png a/img0.png`);
    it is now listed once and the repeat counted as left out."""
    import numpy as np
    from PIL import Image

    from causalign.engine.inference import image_files

    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "a" / f"img{i}.png")
    one = tmp_path / "a" / "img0.png"
    files, skipped = image_files([one, one])
    assert [i for i, _ in files] == ["img0"]
    assert skipped == {"files given more than once (one row each)": 1}
    files, skipped = image_files([tmp_path / "a", one])
    assert [i for i, _ in files] == ["img0", "img1"] and sum(skipped.values()) == 1


def test_lrp_copy_shares_the_owners_of_method_hooks() -> None:
    """LRP explains a deep copy of the model; a forward hook that is a method of the user's
    recorder was copied with its recorder, so the user's recorder saw 1 of the map's 3
    forwards (the c769999 count, and what a plain-function hook still saw)."""
    from causalign.explain import get_explainer
    from causalign.models import build_model

    class Recorder:
        def __init__(self) -> None:
            self.calls = 0

        def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.calls += 1

    torch.manual_seed(0)
    model = build_model("cnn7", 1, 2, width=4).eval()
    rec, plain = Recorder(), []
    model.features[0].register_forward_hook(rec.hook)
    model.features[0].register_forward_hook(lambda m, a, o: plain.append(1))
    x = torch.rand(2, 1, 32, 32)
    before = get_explainer("lrp-epsilon", model).attribute(x)
    assert rec.calls == len(plain) == 3
    model.features[0]._forward_hooks.clear()
    assert torch.equal(before, get_explainer("lrp-epsilon", model).attribute(x))
