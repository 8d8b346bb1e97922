"""Explicit layer-by-layer WBP (seed 002, Table 1), used only to check `causalign.explain.wbp`.

It runs the network forward once (no autograd), records every layer's input, then builds the
saliency matrix row W̃ for the target class backwards with the rules written out one by one:

    FC            W̃ˡ = W̃ˡ⁺¹ W
    activation    W̃ˡ = h ∘ W̃ˡ⁺¹,  h = (g(z) − g(0))/z   (g(z)/z when g(0) = 0; ReLU: 1{z>0})
    convolution   W̃ˡ = zero-inserted (stride − 1 zeros) W̃ˡ⁺¹ convolved with the flipped,
                  channel-transposed kernel (App. A), padded back to the input size
    BatchNorm     W̃ˡ = W̃ˡ⁺¹ γ/σ (running statistics; the shift β − γμ/σ is a bias, left out)
    max-pool      relocate each W̃ˡ⁺¹ entry to its window's argmax (summing collisions)
    avg-pool      distribute each W̃ˡ⁺¹ entry evenly over its window

Biases never enter. Nothing here differentiates the network: the two implementations share
only forward values, so agreement is not circular.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _layers(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _layers(child)]
    return [model]


def _where_zero(z: Tensor, ratio: Tensor, limit: float) -> Tensor:
    return torch.where(z == 0, torch.full_like(z, limit), ratio)


def _h(layer: nn.Module, z: Tensor) -> Tensor:
    """Rescale factor h of an activation, written out per function (float64 in the tests)."""
    zs = torch.where(z == 0, torch.ones_like(z), z)  # z == 0 takes the limit g'(0) below
    if isinstance(layer, nn.ReLU):
        return (z > 0).to(z.dtype)
    if isinstance(layer, nn.LeakyReLU):
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, layer.negative_slope))
    if isinstance(layer, nn.Sigmoid):
        return _where_zero(z, (1 / (1 + torch.exp(-z)) - 0.5) / zs, 0.25)
    if isinstance(layer, nn.Tanh):
        return _where_zero(z, torch.tanh(z) / zs, 1.0)
    if isinstance(layer, nn.GELU):
        if layer.approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)
            return 0.5 * (1 + torch.tanh(inner))
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # GELU(z)/z = Φ(z)
    if isinstance(layer, nn.SiLU):
        return 1 / (1 + torch.exp(-z))  # SiLU(z)/z = σ(z)
    if isinstance(layer, nn.Mish):
        return torch.tanh(torch.log1p(torch.exp(z)))  # Mish(z)/z = tanh(softplus(z))
    if isinstance(layer, nn.ELU):
        neg = layer.alpha * (torch.exp(z) - 1) / zs
        return torch.where(z > 0, torch.ones_like(z), _where_zero(z, neg, layer.alpha))
    if isinstance(layer, nn.Softplus):
        b = layer.beta
        soft = torch.log1p(torch.exp(b * z)) / b
        return _where_zero(z, (soft - math.log(2) / b) / zs, 0.5)
    if isinstance(layer, nn.Hardtanh):  # also ReLU6
        return _where_zero(z, torch.clamp(z, layer.min_val, layer.max_val) / zs, 1.0)
    raise NotImplementedError(f"no reference rule for {type(layer).__name__}")


def _conv_back(layer: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """App. A: zero-insert W̃ for strides, pad, convolve with the flipped transposed kernel."""
    nd = x.dim() - 2
    if layer.padding_mode != "zeros":
        raise NotImplementedError("only zero padding")
    k = _tuple(layer.kernel_size, nd)
    s = _tuple(layer.stride, nd)
    d = _tuple(layer.dilation, nd)
    if layer.padding == "valid":
        pad_lo = pad_hi = (0,) * nd
    elif layer.padding == "same":
        total = [dd * (kk - 1) for dd, kk in zip(d, k, strict=True)]
        pad_lo = tuple(t // 2 for t in total)
        pad_hi = tuple(t - t // 2 for t in total)
    else:
        pad_lo = pad_hi = _tuple(layer.padding, nd)
    out_size, in_size = w.shape[2:], x.shape[2:]
    # Strides: stride − 1 zeros between the entries of W̃ˡ⁺¹.
    up = w.new_zeros(*w.shape[:2], *[(o - 1) * st + 1 for o, st in zip(out_size, s, strict=True)])
    up[(slice(None), slice(None), *[slice(None, None, st) for st in s])] = w
    # Full padding d(k−1) minus the forward padding; the extra rows the forward stride skipped
    # at the far end get zeros too, so the result has the input's size (negative pads crop).
    pads: list[int] = []
    for i in reversed(range(nd)):
        reach = d[i] * (k[i] - 1)
        covered = (out_size[i] - 1) * s[i] + reach + 1 - pad_lo[i] - pad_hi[i]
        pads += [reach - pad_lo[i], reach - pad_hi[i] + (in_size[i] - covered)]
    padded = F.pad(up, pads)
    # Kernel: transpose in/out channels (per group) and flip the spatial axes.
    c_out, c_in_g = layer.weight.shape[:2]
    g = layer.groups
    kernel = layer.weight.reshape(g, c_out // g, c_in_g, *k).transpose(1, 2)
    kernel = kernel.reshape(g * c_in_g, c_out // g, *k).flip(dims=tuple(range(2, 2 + nd)))
    out = _CONV[nd](padded, kernel, dilation=d, groups=g)
    assert out.shape == x.shape, (out.shape, x.shape)
    return out


def _scatter_back(x: Tensor, w: Tensor, indices: Tensor) -> Tensor:
    """Relocate W̃ˡ⁺¹ to the argmax positions (flat spatial indices), adding collisions."""
    flat = w.new_zeros(*x.shape[:2], math.prod(x.shape[2:]))
    flat.scatter_add_(2, indices.flatten(2), w.flatten(2))
    return flat.reshape(x.shape)


def _avg_back(layer: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """Distribute every W̃ˡ⁺¹ entry evenly over its (zero-padded) window."""
    nd = x.dim() - 2
    if layer.ceil_mode or not layer.count_include_pad or getattr(layer, "divisor_override", None):
        raise NotImplementedError("only the default AvgPool settings")
    k = _tuple(layer.kernel_size, nd)
    s = _tuple(layer.stride or layer.kernel_size, nd)
    p = _tuple(layer.padding, nd)
    padded = w.new_zeros(*x.shape[:2], *[n + 2 * pp for n, pp in zip(x.shape[2:], p, strict=True)])
    share = w / math.prod(k)
    for offset in itertools.product(*[range(kk) for kk in k]):
        window = tuple(
            slice(o, o + st * (n - 1) + 1, st)
            for o, st, n in zip(offset, s, w.shape[2:], strict=True)
        )
        padded[(slice(None), slice(None), *window)] += share
    crop = tuple(slice(pp, pp + n) for pp, n in zip(p, x.shape[2:], strict=True))
    return padded[(slice(None), slice(None), *crop)]


def _adaptive_avg_back(x: Tensor, w: Tensor) -> Tensor:
    """Adaptive windows [⌊iI/O⌋, ⌈(i+1)I/O⌉) per axis; distribute evenly."""
    out = torch.zeros_like(x)
    in_size, out_size = x.shape[2:], w.shape[2:]
    for idx in itertools.product(*[range(o) for o in out_size]):
        window = tuple(
            slice((i * n) // o, -((-(i + 1) * n) // o))
            for i, n, o in zip(idx, in_size, out_size, strict=True)
        )
        count = math.prod(sl.stop - sl.start for sl in window)
        out[(slice(None), slice(None), *window)] += (
            w[(slice(None), slice(None), *idx)][(...,) + (None,) * len(idx)] / count
        )
    return out


def _back(layer: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """One step W̃ˡ = G(W̃ˡ⁺¹, gˡ) for the layer whose forward input was `x`."""
    nd = x.dim() - 2
    if isinstance(layer, nn.Linear):
        return w @ layer.weight
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_back(layer, x, w)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if layer.training or layer.running_var is None:
            raise ValueError("BatchNorm must be in eval mode with running statistics")
        scale = 1 / torch.sqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        return w * scale.reshape(1, -1, *([1] * max(nd, 0)))
    if isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        _, indices = _MAX_POOL[nd](
            x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            ceil_mode=layer.ceil_mode, return_indices=True,
        )
        return _scatter_back(x, w, indices)
    if isinstance(layer, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        _, indices = _ADAPTIVE_MAX[nd](x, layer.output_size, return_indices=True)
        return _scatter_back(x, w, indices)
    if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return _avg_back(layer, x, w)
    if isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return _adaptive_avg_back(x, w)
    if isinstance(layer, nn.Flatten):
        return w.reshape(x.shape)
    if isinstance(layer, (nn.Dropout, nn.Identity)):
        if layer.training:
            raise ValueError("Dropout must be in eval mode")
        return w
    return _h(layer, x) * w


def wbp_reference(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(W̃⁰[target], W̃⁰[target] ⊙ x) for a (nested) nn.Sequential in eval mode."""
    layers = _layers(model)
    with torch.no_grad():
        inputs = []
        a = x
        for layer in layers:
            inputs.append(a)
            a = layer(a)
        w = F.one_hot(target, a.shape[1]).to(a.dtype)  # W̃ᴸ = 1 for the target logit
        for layer, a_in in zip(reversed(layers), reversed(inputs), strict=True):
            w = _back(layer, a_in, w)
    return w, w * x
