"""Grad-CAM (Selvaraju et al. 2017) through Captum's LayerGradCam, upsampled to the input."""

from __future__ import annotations

from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from ..models import find_cam_layer
from .base import Explainer, check_inputs, register_explainer


@register_explainer("gradcam")
class GradCAM(Explainer):
    """ReLU(Σ_k α_k A_k) at `layer` (default: the model's `cam_layer` or last conv),
    bilinearly upsampled to the input size; shape (N, 1, *spatial).

    `create_graph=True` keeps it differentiable in the parameters (Captum `grad_kwargs`).
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None,
                 upsample: bool = True) -> None:
        super().__init__(model)
        self.layer = layer if layer is not None else find_cam_layer(model)
        self.upsample = upsample
        self._cam = LayerGradCam(model, self.layer)

    def attribute(self, inputs: Tensor, target: Tensor | int | None = None,
                  create_graph: bool = False) -> Tensor:
        check_inputs(inputs, target)
        target = self._target(inputs, target)
        kwargs = {"grad_kwargs": {"create_graph": True}} if create_graph else {}
        cam = self._cam.attribute(inputs, target=target, relu_attributions=True, **kwargs)
        if self.upsample and cam.shape[2:] != inputs.shape[2:]:
            cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), "bilinear")
        return cam
