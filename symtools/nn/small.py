"""Small networks for tests and examples: a multilayer perceptron and a plain CNN.

Both are ``nn.Sequential`` with readable layer names (``fc0``, ``norm0``, ``act0``, … ``out``), so the
symmetry groups the graph walk finds read as ``fc0 → fc1``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from symtools.errors import SymtoolsError


class Square(nn.Module):
    """The quadratic activation z ↦ z² (positively homogeneous of degree 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "identity": lambda: nn.Identity(),
    "quadratic": lambda: Square(),
    "tanh": lambda: nn.Tanh(),
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise SymtoolsError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_norm(norm: str | None, allowed: tuple[str, ...]) -> None:
    if norm is not None and norm not in allowed:
        raise SymtoolsError(f"unknown norm {norm!r}; choose None or one of {', '.join(allowed)}")


def mlp(in_features: int, widths: Sequence[int], out_features: int, activation: str = "relu",
        bias: bool = True, norm: str | None = None) -> nn.Sequential:
    """``fc_i → [norm_i] → act_i`` for each hidden width, then ``out`` (a Linear to ``out_features``).

    ``norm``: ``None``, ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm over the features).
    """
    _check_norm(norm, ("batch", "layer"))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width_in = in_features
    for i, width in enumerate(widths):
        layers[f"fc{i}"] = nn.Linear(width_in, width, bias=bias)
        if norm == "batch":
            layers[f"norm{i}"] = nn.BatchNorm1d(width)
        elif norm == "layer":
            layers[f"norm{i}"] = nn.LayerNorm(width)
        layers[f"act{i}"] = _activation(activation)
        width_in = width
    layers["out"] = nn.Linear(width_in, out_features, bias=bias)
    return nn.Sequential(layers)


def cnn(in_channels: int, channels: Sequence[int], classes: int, input_size: int, activation: str = "relu",
        bias: bool = True, norm: str | None = None, pool: bool = True) -> nn.Sequential:
    """``conv_i (3×3, padding 1) → [BatchNorm2d] → act_i → [MaxPool2d(2)]`` per entry, then ``flatten → out``.

    ``input_size`` is the side of the square input; with ``pool`` it must be divisible by 2**len(channels).
    """
    _check_norm(norm, ("batch",))
    side = input_size
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for i, c in enumerate(channels):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=bias)
        if norm == "batch":
            layers[f"norm{i}"] = nn.BatchNorm2d(c)
        layers[f"act{i}"] = _activation(activation)
        if pool:
            if side % 2:
                raise SymtoolsError(f"input size {input_size} cannot be halved {len(channels)} times")
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            side //= 2
        c_in = c
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(c_in * side * side, classes, bias=bias)
    return nn.Sequential(layers)
