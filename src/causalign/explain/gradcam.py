"""Grad-CAM (Selvaraju et al. 2017) through Captum's LayerGradCam, upsampled to the input."""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import Tensor, nn

from ..errors import InputError
from ..models import find_cam_layer
from .base import (
    Explainer,
    Target,
    check_inputs,
    check_logits,
    check_no_batch_statistics,
    eval_mode,
    register_explainer,
    shape_errors,
    this_call_only,
)


def _named_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as `named_modules` and torchcam's ``target_layer``
    spell it): a name failed at the first map with "'str' object has no attribute
    'register_forward_hook'". A compiled model's names may keep their ``_orig_mod.``."""
    name = name.removeprefix("_orig_mod.")
    try:
        return model.get_submodule(name)
    except AttributeError:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise InputError(f"gradcam: {type(model).__name__} has no layer '{name}' (its "
                         f"convolutions: {', '.join(convs[-5:]) or 'none'})") from None


class ConstantMapError(InputError):
    """Grad-CAM's layer is a single pixel at this image size: its map would be a constant.
    Evaluation catches it to fall back to WBP without a forward pass of its own."""


@register_explainer("gradcam")
class GradCAM(Explainer):
    """ReLU(Σ_k α_k A_k) at `layer` (a module or its name, e.g. ``"layer4"`` of a ResNet; default:
    the model's `cam_layer` or last conv; when the forward never runs that conv, as
    GoogLeNet's eval-mode auxiliary heads, the last conv it does run), bilinearly upsampled
    to the input size; shape (N, 1, *spatial). Computed in eval mode (every module's flag
    restored afterwards).

    `create_graph=True` keeps it differentiable in the parameters (Captum `grad_kwargs`);
    otherwise the map is detached (Captum's keeps the forward graph alive through the layer's
    activations, and a backward from it would fill the parameters' `.grad`).
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str | None = None,
                 upsample: bool = True) -> None:
        super().__init__(model)
        if isinstance(layer, str):
            layer = _named_layer(self.model, layer)
        elif layer is not None and not isinstance(layer, nn.Module):
            # failed at the first map with "'int' object is not iterable" deep in Captum
            raise InputError(f"gradcam layer must be a module of the model or its name "
                             f"(e.g. 'layer4' of a ResNet), got {type(layer).__name__}")
        self.layer = layer if layer is not None else find_cam_layer(self.model)
        self._default_layer = layer is None
        self.upsample = upsample

    def attribute(self, inputs: Tensor, target: Target = None,
                  create_graph: bool = False) -> Tensor:
        with shape_errors(self.model, inputs, self.name):
            return self._attribute(inputs, target, create_graph)

    def _attribute(self, inputs: Tensor, target: Target, create_graph: bool) -> Tensor:
        check_inputs(inputs, target, self.model)
        if inputs.dim() != 4:
            # A volume model (multiview) runs its CNN on N·D slices: the layer's activations
            # no longer line up with the N inputs, and the upsampling would fail deep in torch.
            raise InputError(f"gradcam needs 2D images (N, C, H, W); "
                             f"{type(self.model).__name__} got inputs of shape "
                             f"{tuple(inputs.shape)} (use wbp, lrp-* or gradient for volumes)")
        check_no_batch_statistics(self.model, inputs, f"{self.name} map")
        target = self._target(inputs, target)
        create_graph = create_graph and torch.is_grad_enabled()  # no graph inside no_grad
        kwargs = {"grad_kwargs": {"create_graph": True}} if create_graph else {}
        try:
            with eval_mode(self.model):
                if getattr(self.model, "device_ids", None):
                    # a plain function hides a DataParallel model's devices from Captum: pass
                    # them on
                    cam = LayerGradCam(self._checked_model(target), self.layer,
                                       device_ids=self.model.device_ids).attribute(
                        inputs, target=target, relu_attributions=True, **kwargs)
                else:
                    cam = self._cam(inputs, target, create_graph)
        except AssertionError as exc:  # Captum's "Forward hook did not obtain any outputs"
            if "did not obtain any outputs" not in str(exc):
                raise
            self.layer = self._layer_that_runs(inputs)
            self._default_layer = False  # chosen now: a second miss is refused, no loop
            return self._attribute(inputs, target, create_graph)
        if cam.dim() != inputs.dim():
            # a layer without spatial output (layer='' is the model itself, a Linear, a
            # Flatten) failed in the upsampling: "Input and output must have the same
            # number of spatial dimensions", a ValueError traceback from torch
            name = next((n for n, m in self.model.named_modules() if m is self.layer), "?")
            convs = [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]
            raise InputError(f"gradcam: layer '{name}' ({type(self.layer).__name__}) has no "
                             f"spatial output (its map is {tuple(cam.shape)}); pick a "
                             f"convolutional layer (the model's last: "
                             f"{', '.join(convs[-5:]) or 'none'})")
        self._refuse_point_map(cam, inputs)
        cam = self._upsample(cam, inputs)
        return cam if create_graph else cam.detach()

    def _cam(self, inputs: Tensor, target: Tensor, create_graph: bool) -> Tensor:
        """Captum's LayerGradCam (ReLU of the channel sum of activations times their
        spatially averaged gradients; the layer's last output in the forward), with a hook that
        only this call runs: Captum's, on a model shared between threads, kept the activations
        of another thread's forward and failed ("differentiated Tensor ... not used in the
        graph")."""
        seen: list[Tensor] = []

        def keep(module: nn.Module, args: tuple, output: object) -> object:
            if not isinstance(output, Tensor):
                return None
            if not output.requires_grad:
                output.requires_grad_(True)  # frozen model: the activations are a leaf
            # as Captum: keep the layer's own output and pass a copy on, so a later in-place
            # op (ReLU(inplace=True)) changes the copy; keeping the copy it passed on gave
            # the ReLU's output (cam off by 2e-4 of 4e-4) and failed on a frozen model
            # ("a leaf Variable that requires grad is being used in an in-place operation")
            seen.append(output)
            return output.clone()

        handle = self.layer.register_forward_hook(this_call_only(self.layer, keep))
        try:
            with torch.enable_grad():
                logits = self._checked_model(target)(inputs)
        finally:
            handle.remove()
        if not seen:
            raise AssertionError("Forward hook did not obtain any outputs for given layer")
        acts = seen[-1]
        with torch.enable_grad():
            score = logits.gather(1, target[:, None]).sum()
        (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph)
        alpha = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
        return torch.relu((alpha * acts).sum(dim=1, keepdim=True))

    def _refuse_point_map(self, cam: Tensor, inputs: Tensor) -> None:
        """One line for a layer whose map is a single pixel: upsampled, it is a constant
        (resnet18's layer4 on 32 px, inception_v3's Mixed_7c at 75 px), so it localises
        nothing, and cam_precision / deletion ranked its pixels by float rounding noise."""
        if cam.dim() >= 3 and all(s == 1 for s in cam.shape[2:]) \
                and any(s > 1 for s in inputs.shape[2:]):
            name = next((n for n, m in self.model.named_modules() if m is self.layer), "?")
            raise ConstantMapError(
                f"gradcam: layer '{name}' of {type(self.model).__name__} is 1x1 at "
                f"{'x'.join(map(str, inputs.shape[2:]))} px, so its map is constant (no "
                f"localisation); use larger images or another saliency (wbp, gradient, lrp-*)")

    def constant_map(self, inputs: Tensor) -> bool:
        """Whether this layer's map is a single pixel for ``inputs`` (one eval forward)."""
        seen: list[tuple[int, ...]] = []
        handle = self.layer.register_forward_hook(
            lambda m, a, o: seen.append(tuple(o.shape[2:])) if isinstance(o, Tensor) else None)
        try:
            with torch.no_grad(), eval_mode(self.model):
                self.model(inputs[:1])
        finally:
            handle.remove()
        return bool(seen) and all(s == 1 for s in seen[-1]) \
            and any(s > 1 for s in inputs.shape[2:])

    def _layer_that_runs(self, inputs: Tensor) -> nn.Module:
        """The last Conv2d the forward runs, for a default layer it never runs (GoogLeNet's
        auxiliary heads come last in module order and run only in train mode); a layer the
        user chose is refused with one line instead of Captum's assertion."""
        name = next((n for n, m in self.model.named_modules() if m is self.layer), "?")
        ran: list[nn.Module] = []
        if self._default_layer:
            handles = [m.register_forward_hook(lambda m, a, o: ran.append(m))
                       for m in self.model.modules() if isinstance(m, nn.Conv2d)]
            try:
                with torch.no_grad(), eval_mode(self.model):
                    self.model(inputs)
            finally:
                for h in handles:
                    h.remove()
        if not ran:
            raise InputError(f"gradcam: {type(self.model).__name__}'s forward (eval mode) does "
                             f"not run layer '{name}'; pass GradCAM(model, layer=...) a layer "
                             f"it runs")
        return ran[-1]

    def _upsample(self, cam: Tensor, inputs: Tensor) -> Tensor:
        if self.upsample and cam.shape[2:] != inputs.shape[2:]:
            cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), "bilinear")
        return cam

    def predict_and_attribute(self, inputs: Tensor,
                              target: Target = None) -> tuple[Tensor, Tensor]:
        """(logits, Grad-CAM of the predicted class, or of ``target``'s) from ONE forward pass.

        Evaluation otherwise runs the model twice per batch (a no-grad forward for the
        prediction, then Captum's forward for the map of that prediction); here the layer's
        activations are kept by a hook, the prediction is read off the same logits and the
        target logits are differentiated w.r.t. the activations — Captum's formula
        (spatial mean of the gradients, channel sum, ReLU). A DataParallel model, a layer
        with a non-tensor output, one run more than once per forward or one whose output a
        later in-place op overwrites (``nn.ReLU(inplace=True)`` after the conv: the kept
        tensor would hold the ReLU's output, while Captum keeps the layer's own) takes the
        default two-pass path."""
        check_inputs(inputs, target, model=self.model)  # its shape, as `attribute`
        check_no_batch_statistics(self.model, inputs, f"{self.name} map")
        if inputs.dim() != 4 or getattr(self.model, "device_ids", None):
            return super().predict_and_attribute(inputs, target)
        seen: list[Tensor] = []
        versions: list[int | None] = []  # the outputs' version counters when kept

        def keep(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, Tensor) and not output.requires_grad:
                output.requires_grad_(True)  # frozen model: the activations are a leaf
            seen.append(output)  # type: ignore[arg-type]
            versions.append(getattr(output, "_version", None))

        handle = self.layer.register_forward_hook(this_call_only(self.layer, keep))
        try:
            with shape_errors(self.model, inputs, self.name), torch.enable_grad(), \
                    eval_mode(self.model):
                logits = self.model(inputs.detach())
        finally:
            handle.remove()
        if len(seen) != 1 or not isinstance(seen[0], Tensor) or seen[0].dim() < 3 \
                or seen[0]._version != versions[0]:
            return super().predict_and_attribute(inputs, target)
        check_logits(logits)
        acts = seen[0]
        self._refuse_point_map(acts, inputs)
        target = (logits.detach().argmax(1) if target is None
                  else self._given_target(logits.detach(), target))
        with torch.enable_grad():  # inside a caller's no_grad the score would be a constant
            score = logits.gather(1, target[:, None]).sum()
        (grads,) = torch.autograd.grad(score, acts)
        with torch.no_grad():
            alpha = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
            cam = torch.relu((alpha * acts).sum(dim=1, keepdim=True))
            cam = self._upsample(cam, inputs)
        return logits.detach(), cam.detach()
