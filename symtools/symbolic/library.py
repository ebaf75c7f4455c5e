"""The built-in library of named symmetries: each entry is a *declaration* the engine derives from.

Elementwise entries are spec strings (the same text a user gives ``symtools derive``); matrix entries
are :class:`MatrixAction` declarations by their finite action and Lie algebra. Nothing here states a
generator, an identity or a charge: those come from :func:`symtools.symbolic.derive.derive`.
"""

from __future__ import annotations

import sympy as sp

from symtools.errors import SpecError
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.matrix import MatrixAction

# name → (declaration, where it arises)
ELEMENTWISE: dict[str, tuple[str, str]] = {
    "translation": ("x -> x + a",
                    "parameters feeding a softmax (columns and bias of the last linear layer) or a mean subtraction"),
    "scale": ("x -> a*x; a > 0",
              "parameters feeding a normalisation (BatchNorm per channel, LayerNorm per layer)"),
    "rescale": ("x_in -> a*x_in; x_out -> x_out/a; a > 0",
                "incoming and outgoing parameters of a hidden unit with a degree-1 homogeneous activation (ReLU)"),
    "rescale2": ("x_in -> a*x_in; x_out -> x_out/a**2; a > 0",
                 "hidden unit with the degree-2 homogeneous activation z² (quadratic networks)"),
}

_n, _h, _m = sp.symbols("n h m", integer=True, positive=True)

MATRIX: dict[str, tuple[MatrixAction, str]] = {
    "gl_linear_pair": (MatrixAction("gl_linear_pair", {"U": (_n, _h), "V": (_h, _m)}, _h,
                                    lambda G, U, V: {"U": U * G.I, "V": G * V}, "gl",
                                    concrete={"n": 3, "h": 3, "m": 3}),
                       "consecutive linear maps x ↦ U V x with nothing nonlinear in between (GL_h)"),
    "attention_qk": (MatrixAction("attention_qk", {"W_Q": (_n, _h), "W_K": (_n, _h)}, _h,
                                  lambda G, W_Q, W_K: {"W_Q": W_Q * G, "W_K": W_K * G.I.T}, "gl",
                                  concrete={"n": 3, "h": 2}),
                     "attention scores x W_Q W_Kᵀ xᵀ are unchanged by W_Q → W_Q A, W_K → W_K A⁻ᵀ"),
    "attention_vo": (MatrixAction("attention_vo", {"W_V": (_n, _h), "W_O": (_h, _m)}, _h,
                                  lambda G, W_V, W_O: {"W_V": W_V * G, "W_O": G.I * W_O}, "gl",
                                  concrete={"n": 2, "h": 2, "m": 2}),
                     "value/output projections x W_V W_O are unchanged by W_V → W_V A, W_O → A⁻¹ W_O"),
    "rotation_pair": (MatrixAction("rotation_pair", {"U": (_n, _h), "V": (_h, _m)}, _h,
                                   lambda G, U, V: {"U": U * G.T, "V": G * V}, "so",
                                   concrete={"n": 2, "h": 3, "m": 2}),
                      "O(h) acting on consecutive linear maps (a subgroup of GL_h; antisymmetric generators)"),
}


def elementwise(name: str) -> ElementwiseAction:
    """The named elementwise declaration, parsed (identity found by the engine)."""
    if name not in ELEMENTWISE:
        raise SpecError(f"unknown symmetry {name!r}; built-ins: {', '.join(sorted(ELEMENTWISE))}")
    return ElementwiseAction.from_spec(ELEMENTWISE[name][0], name=name)


def matrix(name: str) -> MatrixAction:
    if name not in MATRIX:
        raise SpecError(f"unknown matrix symmetry {name!r}; built-ins: {', '.join(sorted(MATRIX))}")
    return MATRIX[name][0]


def names() -> list[str]:
    return sorted(ELEMENTWISE) + sorted(MATRIX)
