"""Second derivatives of convolutions from the three standard kernels, for double-backward HVPs.

Autograd differentiates a convolution's backward (``convolution_backward``) with
``_convolution_double_backward``. That routine writes the derivative of the *weight* gradient as a
convolution with batch and channel axes swapped, whose "kernel" is a whole feature map (e.g. 32×32). cuDNN
has no fast algorithm for such shapes and falls back to generic ones (``implicit_convolve_sgemm``, FFT):
measured on an H100 for VGG-16-BN at 64×64, batch 128, float32, six such calls took 63 ms of one HVP's 185 ms,
while the whole gradient took 34 ms (docs/checker.md, section 7).

Every derivative involved is itself one of the three kernels a convolution layer already uses, with other
arguments. For y = conv(x, W) + b and upstream gradient ġ:

- forward: y = fprop(x, W)
- first backward: g_x = dgrad(ġ, W), g_W = wgrad(ġ, x), g_b = Σ ġ
- derivative of g_x = dgrad(ġ, W) against an adjoint a_x: ∂ġ = fprop(a_x, W), ∂W = wgrad(ġ, a_x)
- derivative of g_W = wgrad(ġ, x) against an adjoint a_W: ∂x = dgrad(ġ, a_W), ∂ġ = fprop(x, a_W)

(dgrad and wgrad are linear in each argument, and ⟨a, dgrad(ġ, W)⟩ = ⟨fprop(a, W), ġ⟩ etc.) Inside
:func:`fast_second_order` every ``conv1d/2d/3d`` call goes through :class:`Convolution`, whose backward is built
from :class:`InputGradient` and :class:`WeightGradient`, autograd functions with exactly these derivatives.
The result equals PyTorch's double backward to round-off (tests/test_hvp.py: 1e-15 relative in float64 on
a BatchNorm CNN), and the cost is the operation count of double backward, nine convolution-sized products per
layer, each on the kernel cuDNN/oneDNN tune for it. Convolutions with string padding (``"same"``) keep
PyTorch's own path; transposed convolutions are not intercepted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten

# (stride, padding, dilation, groups), each spatial entry a list with one value per spatial axis
Config = tuple[list[int], list[int], list[int], int]


def _fprop(x: Tensor, w: Tensor, bias: Tensor | None, c: Config) -> Tensor:
    stride, padding, dilation, groups = c
    return _aten.convolution(x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def _backward(grad_out: Tensor, x: Tensor, w: Tensor, c: Config, which: int) -> Tensor:
    """dgrad (``which`` 0: ∂/∂x, only ``x``'s shape matters) or wgrad (1: ∂/∂W, only ``w``'s shape matters)."""
    stride, padding, dilation, groups = c
    mask = [which == 0, which == 1, False]
    return _aten.convolution_backward(grad_out, x, w, None, stride, padding, dilation, False,
                                      [0] * len(stride), groups, mask)[which]


class InputGradient(torch.autograd.Function):
    """g_x = dgrad(ġ, W), differentiable in ġ and W by fprop and wgrad."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, w: Tensor, x_like: Tensor, c: Config) -> Tensor:
        ctx.save_for_backward(grad_out, w, x_like)
        ctx.config = c
        return _backward(grad_out, x_like, w, c, 0)

    @staticmethod
    def backward(ctx, a_x: Tensor):
        grad_out, w, _ = ctx.saved_tensors
        d_grad_out = _fprop(a_x, w, None, ctx.config) if ctx.needs_input_grad[0] else None
        d_w = _backward(grad_out, a_x, w, ctx.config, 1) if ctx.needs_input_grad[1] else None
        return d_grad_out, d_w, None, None


class WeightGradient(torch.autograd.Function):
    """g_W = wgrad(ġ, x), differentiable in x and ġ by dgrad and fprop.

    With ``value=False`` the forward skips wgrad and returns zeros of W's shape (a broadcast view, no memory):
    for an HVP from scratch the value of g_W is never read, only its derivative ⟨g_W, v⟩ → (dgrad(ġ, v),
    fprop(x, v)), which the backward computes in full. That saves one weight-sized product per layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, grad_out: Tensor, w_like: Tensor, c: Config, value: bool = True) -> Tensor:
        ctx.save_for_backward(x, grad_out, w_like)
        ctx.config = c
        if not value:
            return w_like.new_zeros(()).expand(w_like.shape)
        return _backward(grad_out, x, w_like, c, 1)

    @staticmethod
    def backward(ctx, a_w: Tensor):
        x, grad_out, _ = ctx.saved_tensors
        d_x = _backward(grad_out, x, a_w, ctx.config, 0) if ctx.needs_input_grad[0] else None
        d_grad_out = _fprop(x, a_w, None, ctx.config) if ctx.needs_input_grad[1] else None
        return d_x, d_grad_out, None, None, None


class Convolution(torch.autograd.Function):
    """y = conv(x, W) + b with a backward made of :class:`InputGradient` and :class:`WeightGradient`."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, c: Config, weight_values: bool = True) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.config = c
        ctx.weight_values = weight_values
        return _fprop(x, w, bias, c)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w = ctx.saved_tensors
        c = ctx.config
        g_x = InputGradient.apply(grad_out, w, x.detach(), c) if ctx.needs_input_grad[0] else None
        g_w = (WeightGradient.apply(x, grad_out, w.detach(), c, ctx.weight_values or not torch.is_grad_enabled())
               if ctx.needs_input_grad[1] else None)
        g_b = grad_out.sum([0] + list(range(2, grad_out.dim()))) if ctx.needs_input_grad[2] else None
        return g_x, g_w, g_b, None, None


def _spatial(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * n


_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _Intercept(TorchFunctionMode):
    def __init__(self, weight_values: bool):
        super().__init__()
        self.weight_values = weight_values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _CONVOLUTIONS.get(func)
        if n is not None:
            a = dict(zip(_ARGS, args), **kwargs)
            padding = a.get("padding", 0)
            if not isinstance(padding, str):
                c = (_spatial(a.get("stride", 1), n), _spatial(padding, n), _spatial(a.get("dilation", 1), n),
                     int(a.get("groups", 1)))
                return Convolution.apply(a["input"], a["weight"], a.get("bias"), c, self.weight_values)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_second_order(weight_gradients: bool = True) -> Iterator[None]:
    """Evaluate a forward pass whose graph will be differentiated twice: convolutions as :class:`Convolution`.

    ``weight_gradients=False``: the first backward (with ``create_graph=True``) returns zeros for the
    convolution weights instead of their gradients, keeping what their derivatives need — for an HVP whose
    gradient is not read. (A backward without ``create_graph`` always computes them.)
    """
    with _Intercept(weight_gradients):
        yield
