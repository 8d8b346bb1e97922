"""Device- and dtype-agnostic code, checked without a GPU.

CUDA-only bugs (a CPU tensor meeting a model's CUDA tensors) are reproduced on the ``meta``
device, which refuses CPU/meta mixing exactly as CUDA refuses CPU/CUDA mixing (0-dim CPU
tensors allowed on both). Hard-coded float32 is caught by running float64 models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_baseline_definitions import _mi_by_hand  # −MI(X; T) from the paper, with loops

from causalign.models.icnn import filter_loss, part_templates, template_mask


def _batch(n: int = 4, size: int = 16, dtype: torch.dtype = torch.float64) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, size, size, dtype=dtype)
    mask[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
    return {"image": torch.rand(n, 1, size, size, generator=g, dtype=dtype),
            "label": torch.arange(n) % 2, "mask": mask, "box_mask": mask.clone(),
            "has_mask": torch.ones(n, dtype=torch.bool),
            "has_annotation": torch.ones(n, dtype=torch.bool),
            "index": torch.arange(n)}


# --- ICNN filter loss: no float32 constants inside a float64 loss -------------------------

def test_icnn_filter_loss_in_float64_has_float64_precision():
    """filter_loss took log M from a float32 tensor and built its templates in float32
    (1 − 4/3 rounded) before casting them up: a float64 loss was only float32-exact
    (relative error ~1e-7 on this input, against 1e-16 in float64)."""
    torch.manual_seed(0)
    x = F.relu(torch.randn(5, 2, 3, 3, dtype=torch.float64)) * 20
    alpha = [0.4, 0.6]
    got = filter_loss(x, torch.tensor(alpha, dtype=torch.float64), beta=4.0)
    assert got.dtype == torch.float64
    want = torch.tensor([_mi_by_hand(x[:, c], alpha[c], 4.0, torch.float64)
                         for c in range(2)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    t = part_templates(3, beta=4.0, dtype=torch.float64)
    assert t.dtype == torch.float64 and float(t[4, 0, 1]) == 1 - 4 / 3
    assert part_templates(3).dtype == torch.get_default_dtype()


def test_icnn_helpers_run_on_the_inputs_device():
    """template_mask / filter_loss / part_templates create their index grids on the input's
    device (meta stands in for CUDA: a CPU tensor there raises)."""
    x = torch.empty(4, 3, 5, 6, device="meta")
    assert template_mask(x).device.type == "meta"
    assert filter_loss(x, torch.full((3,), 0.5, device="meta")).device.type == "meta"
    assert part_templates(5, device="meta", width=6).device.type == "meta"


# --- latent-space counterfactuals: the autoencoder follows the images' dtype -------------

def test_train_autoencoder_takes_the_images_float_dtype():
    """A float32 autoencoder on float64 images failed in its first conv ("Input type
    (double) and bias type (float) should be the same")."""
    from causalign.models.autoencoder import train_autoencoder

    images = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ae = train_autoencoder(images, epochs=2, batch_size=4)
    assert {p.dtype for p in ae.parameters()} == {torch.float64}
    assert math.isfinite(ae.train_mse)
    assert ae(images).dtype == torch.float64
    # float32 images keep a float32 autoencoder (the usual case, unchanged)
    ae32 = train_autoencoder(images.float(), epochs=1, batch_size=4)
    assert {p.dtype for p in ae32.parameters()} == {torch.float32}


def test_causal_align_latent_step_in_float64_without_setup():
    """causal-align with space=latent on a float64 model and batch, no setup(): its lazy
    autoencoder is fitted on the batch and must take its dtype."""
    from causalign.methods.base import build_method
    from causalign.models import build_model

    torch.manual_seed(0)
    method = build_method("causal-align", {"space": "latent", "steps": 2})
    model = build_model("cnn7", 1, 2, width=4).double()
    out = method(model, _batch())
    assert out.total.dtype == torch.float64 and torch.isfinite(out.total)
    out.total.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in model.parameters())


def test_causal_align_latent_step_in_float64_after_setup(tiny_data):
    """setup() fits the autoencoder on the float32 training images; a float64 model's
    inputs then met a float32 autoencoder in the latent inner problem's first conv."""
    from causalign.data.format import LesionDataset
    from causalign.methods.base import build_method
    from causalign.models import build_model
    from causalign.models.autoencoder import train_autoencoder

    torch.manual_seed(0)
    train = LesionDataset(tiny_data, "train")
    method = build_method("causal-align", {"space": "latent", "steps": 2})
    # what setup() does, with a short fit: the autoencoder follows the float32 images
    method.autoencoder = train_autoencoder(train.images, epochs=1)
    model = build_model("cnn7", 1, 2, width=4).double()
    batch = _batch(size=32)
    out = method(model, batch)
    assert out.total.dtype == torch.float64 and torch.isfinite(out.total)
    out.total.backward()


def test_ppi_gradcam_setup_with_a_float64_model(tiny_data):
    """PPI.setup's Grad-CAM layer probe moved a float32 training image to the model's device
    only: a float64 model failed there ("expected scalar type Float but found Double")."""
    from causalign.data.format import LesionDataset
    from causalign.methods.base import build_method
    from causalign.models import build_model

    torch.manual_seed(0)
    method = build_method("ppi", {"saliency": "gradcam"})
    model = build_model("cnn7", 1, 2, width=4).double()
    method.setup(LesionDataset(tiny_data, "train"), model)
    out = method(model, _batch(size=32))
    assert out.total.dtype == torch.float64 and torch.isfinite(out.total)


def test_autoencoder_state_round_trip_keeps_float64(tmp_path):
    """A float64 autoencoder saved and loaded came back float32 (load_state_dict copied its
    weights into a float32 module), so it no longer fit the float64 model it was fitted
    for; a float32 one stays float32."""
    from causalign.models.autoencoder import (
        autoencoder_from_state,
        autoencoder_state,
        load_autoencoder,
        save_autoencoder,
        train_autoencoder,
    )

    images = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ae = train_autoencoder(images, epochs=1, batch_size=4)
    save_autoencoder(tmp_path / "ae.pt", ae)
    loaded = load_autoencoder(tmp_path / "ae.pt")
    for back in (loaded, autoencoder_from_state(autoencoder_state(ae))):
        assert {p.dtype for p in back.parameters()} == {torch.float64}
        torch.testing.assert_close(back(images), ae(images), rtol=0, atol=0)
    ae32 = autoencoder_from_state(autoencoder_state(train_autoencoder(images.float(), epochs=1)))
    assert {p.dtype for p in ae32.parameters()} == {torch.float32}


def test_localization_metrics_take_annotations_from_another_device():
    """Maps computed on the GPU against masks straight from the (CPU) dataset failed with
    "Expected all tensors to be on the same device"; deletion_scores already accepts a
    target on another device."""
    from causalign.metrics import cam_precision, iou_dice, mass_in_mask, rank_accuracy

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    maps = torch.rand(3, 8, 8, device="cuda")
    mask = (torch.rand(3, 8, 8) > 0.5).float()
    for f in (cam_precision, mass_in_mask, rank_accuracy):
        torch.testing.assert_close(f(maps, mask).cpu(), f(maps.cpu(), mask))
    iou, dice = iou_dice(maps, mask)
    torch.testing.assert_close(iou.cpu(), iou_dice(maps.cpu(), mask)[0])


@pytest.mark.parametrize("name", ["cnn7", "bagnet9", "resnet18", "multiview", "icnn",
                                  "hierarchical"])
@pytest.mark.parametrize("train", [True, False])
def test_models_forward_on_the_inputs_device(name, train):
    """Every model creates its internal tensors (slice draws, position indices, filter
    owners, templates) on the input's device: meta stands in for CUDA."""
    from causalign.models import HierarchicalModel, MLPHead, build_model
    from causalign.models.backbones import BACKBONES
    from causalign.models.icnn import ICNN

    if name == "icnn":
        model = ICNN(1, 2, width=4)
    elif name == "hierarchical":
        model = HierarchicalModel(build_model("cnn7", 1, 3, width=4), MLPHead(3, 2, hidden=4))
    else:  # fixed-architecture backbones refuse a width
        model = build_model(name, 1, 2, **({} if name in BACKBONES else {"width": 4}))
    model = model.to("meta").train(train)
    shape = (2, 1, 4, 32, 32) if name == "multiview" else (2, 1, 32, 32)
    out = model(torch.empty(shape, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 2)


def test_bench_time_steps_synchronizes_the_device_it_times(monkeypatch):
    """`bench step --device cuda:1` synchronised with a bare torch.cuda.synchronize(), which
    waits for the current device (cuda:0), so the clock stopped before cuda:1's kernels ran.
    No GPU here: the method's model stays on the CPU and the synchronisations are recorded."""
    from torch import nn

    from causalign.engine import bench
    from causalign.engine.config import TrainConfig
    from causalign.methods.base import DataInfo, build_method

    class StaysOnCPU(nn.Linear):
        def to(self, *args, **kwargs):  # the "cuda:1" device exists only in name here
            return self

    erm = build_method("erm", {})
    erm.build_model = lambda cfg, info: StaysOnCPU(4, 2)
    monkeypatch.setattr(bench, "build_method", lambda name, args: erm)
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    batch = {"image": torch.rand(3, 4), "label": torch.tensor([0, 1, 0])}
    info = DataInfo(in_channels=1, num_classes=2, image_shape=(1, 2, 2), attributes=[])
    times = bench.time_steps("erm", batch, TrainConfig(), info, torch.device("cuda", 1),
                             steps=2, warmup=1)
    assert len(times) == 2
    assert calls == [torch.device("cuda", 1)] * 6
