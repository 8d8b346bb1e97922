"""Leaner double-backward forms of convolution and ReLU for exact Hessian-vector products.

An exact Hessian-vector product backpropagates through the graph of a first backward pass
(`implicit_gradient`: g = ∇ₓT with ``create_graph=True``, then ∂(g·p)/∂x per CG iteration).
PyTorch's own double-backward formulas do work there that such a product throws away:

* convolution's (``_convolution_double_backward``) computes the weight term conv(ggI, gO)
  whenever the incoming gradient is defined, whatever the output mask says, so every
  Hessian-vector product w.r.t. x paid one weight-gradient convolution per layer (~40% of
  the product on the seed CNN, CPU), also with frozen parameters;
* ReLU's (threshold_backward's) returns ``zeros_like`` for the saved output, which the engine
  then fills and adds into the forward graph's gradients at every ReLU.

`double_backward_graph` (entered by `implicit_gradient` around the forward whose graph it
differentiates twice) makes the modules patched by `patch_modules` (causalign's
``eval_mode(fold_bn=True)``, the inner problem's mode) record `_Conv` / `_ReLU` instead.
They call the very same ATen kernels with the same arguments as the built-in nodes, so
every value and gradient is bit-identical (checked by tests/test_implicit_fastgrad.py); the
weight term of the double backward is computed only when the running backward pass needs
the weight (the mixed product ∂(g·v)/∂θ), as asked through the engine's
``_will_engine_execute_node``. Outside the context the patched modules run their own forward,
except that a plain ``nn.MaxPool2d`` on a contiguous CPU batch pools a channels_last copy
(`_MaxPool2d`: the same values, indices and gradients, ~2x cheaper; the counterfactual search
runs 10 forwards a step).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

__all__ = ["double_backward_graph", "patch_modules"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("causalign_double_backward",
                                                               default=False)


@contextmanager
def double_backward_graph() -> Iterator[None]:
    """Record the lean double-backward nodes in patched modules' forwards run inside."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _will_run(node: object) -> bool:
    """Will the running backward pass execute ``node`` (so a gradient towards it is used)?
    True when the engine cannot tell (a leaf under autograd.grad; an older torch)."""
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _ReLU(torch.autograd.Function):
    """relu(x) whose backward threshold_backward(g, out, 0) (ReluBackward0's) treats ``out`` as a
    constant: its double backward sends no zero gradient into the forward graph."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out.detach(), 0)


class _ConvInputGrad(torch.autograd.Function):
    """grad_input = convolution_backward(gO, x, w)[0]; its backward is
    _convolution_double_backward's: conv(ggI, w) for gO, and the weight term only when the
    running backward pass reaches the weight."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, weight: Tensor, x: Tensor, stride: list[int],  # type: ignore[override]
                padding: list[int], dilation: list[int]) -> Tensor:
        ctx.save_for_backward(grad_out, weight)
        ctx.conf = (stride, padding, dilation)
        zeros = [0] * len(stride)
        return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding,
                                                   dilation, False, zeros, 1,
                                                   [True, False, False])[0]

    @staticmethod
    def backward(ctx, gg: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        zeros = [0] * len(stride)
        d_out = d_weight = None
        if ctx.needs_input_grad[0]:
            d_out = torch.convolution(gg, weight, None, stride, padding, dilation, False, zeros, 1)
        if ctx.needs_input_grad[1] and _will_run(ctx.next_functions[1][0]):
            # gW = conv(ggI, gO) over the batch (stride and dilation swap), narrowed to w
            d_weight = torch.convolution(gg.transpose(0, 1), grad_out.transpose(0, 1), None,
                                         dilation, padding, stride, False, zeros, 1
                                         ).transpose(0, 1)
            for k in range(2, d_weight.dim()):
                if d_weight.shape[k] > weight.shape[k]:
                    d_weight = d_weight.narrow(k, 0, weight.shape[k])
        return d_out, d_weight, None, None, None, None


class _Conv(torch.autograd.Function):
    """convolution(x, w, b) (groups 1, zero padding) whose input gradient, taken with
    ``create_graph``, is a `_ConvInputGrad`; without it, one convolution_backward as
    ConvolutionBackward0 calls it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],  # type: ignore[override]
                padding: list[int], dilation: list[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return torch.convolution(x, weight, bias, stride, padding, dilation, False,
                                 [0] * len(stride), 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        need = [ctx.needs_input_grad[i] and _will_run(ctx.next_functions[i][0])
                for i in range(3)]
        grad_x = grad_w = grad_b = None
        if need[0] and torch.is_grad_enabled():
            grad_x = _ConvInputGrad.apply(grad, weight, x.detach(), stride, padding, dilation)
            need[0] = False
        if any(need):
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, stride, padding, dilation, False,
                [0] * len(stride), 1, need)
            grad_x = gx if need[0] else grad_x
            grad_w = gw if need[1] else None
            grad_b = gb if need[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class _MaxPool2d(torch.autograd.Function):
    """max_pool2d of a contiguous (N, C, H, W) CPU batch computed on a channels_last copy:
    ATen's contiguous CPU kernel is scalar per output (6.4 ms on 16 × 16 × 64 × 64, one
    thread), the channels_last one vectorised over channels (0.8 ms; the copy 1.9 ms). Both
    scan each window in the same order with the same rule (first maximum, NaN wins), so
    values and indices are equal; the backward is ATen's own op with those indices, so it is
    differentiated again as MaxPool2DWithIndicesBackward0's would be."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: list[int], stride: list[int],  # type: ignore[override]
                padding: list[int], dilation: list[int], ceil_mode: bool) -> Tensor:
        out, idx = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding,
            dilation, ceil_mode)
        idx = idx.contiguous()
        ctx.save_for_backward(x, idx)
        ctx.conf = (kernel, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, idx = ctx.saved_tensors
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.conf, idx),
                None, None, None, None, None)


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return list(v) if isinstance(v, tuple) else [v, v]


def _pool_forward(module: nn.MaxPool2d, orig: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    # the counterfactual search's forwards (10 a step); inside double_backward_graph the
    # built-in node, whose backward is itself differentiable
    if (not _ACTIVE.get() and x.dim() == 4 and x.device.type == "cpu"
            and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)):
        stride = module.stride if module.stride is not None else module.kernel_size
        return _MaxPool2d.apply(x, _pair(module.kernel_size), _pair(stride),
                                _pair(module.padding), _pair(module.dilation), module.ceil_mode)
    return orig(x)


def _relu_forward(orig: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    if _ACTIVE.get() and torch.is_grad_enabled():
        return _ReLU.apply(x)
    return orig(x)


def _conv_forward(module: nn.modules.conv._ConvNd, orig: Callable[[Tensor], Tensor],
                  x: Tensor) -> Tensor:
    n = len(module.kernel_size)
    if _ACTIVE.get() and torch.is_grad_enabled() and x.dim() == n + 2:
        # views of the parameters: nodes the engine can be asked about (a leaf's
        # accumulator cannot be, under autograd.grad); the gradient passes through unchanged
        weight = module.weight.view_as(module.weight)
        bias = None if module.bias is None else module.bias.view_as(module.bias)
        return _Conv.apply(x, weight, bias, list(module.stride), list(module.padding),
                           list(module.dilation))
    return orig(x)


def _eligible_conv(m: nn.Module) -> bool:
    # exact types: a subclass may have its own forward (weight standardisation, ...)
    return (type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def patch_modules(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Give ``model``'s plain ReLUs (not in place) and groups-1 zero-padded convolutions a
    forward that records `_ReLU` / `_Conv` inside `double_backward_graph`, and plain
    ``nn.MaxPool2d`` modules `_MaxPool2d` outside it. Returns (module,
    its instance-level ``forward`` before, or None) for the caller to restore.
    A module whose ``forward`` is already set on the instance keeps it: someone else's
    (a wrapper, a monkeypatch) may compute more than the class's forward, which the lean
    node would silently skip (a scaled conv, ReLU and BatchNorm: logits off by 0.66, the
    implicit gradient by 85 %); ours (an enclosing ``eval_mode``) already records the lean
    node."""
    patched: list[tuple[nn.Module, object]] = []
    for m in model.modules():
        if "forward" in m.__dict__:
            continue
        if type(m) is nn.ReLU and not m.inplace:
            fwd: Callable = partial(_relu_forward, m.forward)
        elif _eligible_conv(m):
            fwd = partial(_conv_forward, m, m.forward)
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            fwd = partial(_pool_forward, m, m.forward)
        else:
            continue
        patched.append((m, m.__dict__.get("forward")))
        m.forward = fwd
    return patched
