#!/usr/bin/env python
"""Rescale symmetry θ_A1 ↦ a·θ_A1, θ_A2 ↦ θ_A2/a, a > 0 (Kunin et al., ICLR 2021, §3–4, appendices A–B).

The engine derives the library's ``rescale`` declaration; ``_common.run_family`` re-derives the
transformation laws and identities from ψ with a generic loss and compares everything with the formulas
below, typed in from the paper. Writes ``<out>/rescale.md``; exit code 1 on any mismatch.

    python derivations/rescale.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_family  # noqa: E402

from symtools.symbolic.forms import GradientForm, grad_symbol, hv_symbol  # noqa: E402

# The paper's objects in the engine's slot notation: slot x_in is A1 (incoming), x_out is A2 (outgoing).
x_in, x_out = sp.symbols("x_in x_out", real=True)
a = sp.Symbol("a", positive=True)             # the group is GL_1^+(R): a > 0
x_in1, x_in2, x_out1, x_out2, z = sp.symbols("x_in1 x_in2 x_out1 x_out2 z", real=True)
ELEMENTS, OUTSIDE = {"x_in": (x_in1, x_in2), "x_out": (x_out1, x_out2)}, (z,)
g_in, g_out = grad_symbol("x_in"), grad_symbol("x_out")
Hv_in, Hv_out = hv_symbol("x_in"), hv_symbol("x_out")
ALPHA = sp.diag(a, a, 1 / a, 1 / a, 1)        # α_A1 ⊙ α_A2⁻¹ (1 on the complement)

PAPER = {
    # Table 2, row 2 / eq. (7): the gradient is orthogonal to θ_A1 − θ_A2, the generator.
    "generator": {"x_in": x_in, "x_out": -x_out},
    "gradient_identity": GradientForm({"x_in": x_in, "x_out": -x_out}),  # ⟨g, θ_A1 − θ_A2⟩ = 0
    # Table 2, row 1: g(θ) = diag(α_A1 ⊙ α_A2⁻¹) g(ψ(θ, α)).
    "gradient_transform": ALPHA,
    # Table 3, row 1: H(θ) = diag(α_A1² ⊙ α_A2⁻²) H(ψ(θ, α)), read as a congruence (see the page).
    "hessian_transform": lambda Ht: ALPHA * Ht * ALPHA,
    # ... and as printed, a one-sided product (shown on the page as a note, not checked).
    "hessian_transform_literal": lambda Ht: ALPHA**2 * Ht,
    # Table 3, row 2 / eq. (8): H(θ_A1 − θ_A2) + g_A1 − g_A2 = 0.
    "hessian_identity": {"x_in": Hv_in + g_in, "x_out": Hv_out - g_out},
    # Table 3, row 3: (θ_A1 − θ_A2)ᵀ H (θ_A1 − θ_A2) + g_A1ᵀθ_A1 + g_A2ᵀθ_A2 = 0 — its gradient part.
    "second_order": GradientForm({"x_in": x_in, "x_out": x_out}),
    # Appendix B: ∂α∂θψ|e = [[I, 0], [0, −I]] (0 on the complement).
    "theorem1_K": sp.diag(1, 1, -1, -1, 0),
    # Eq. (13): |θ_A1|² − |θ_A2|² is conserved.
    "conserved": {"x_in": x_in**2, "x_out": -x_out**2},
}

EQUATIONS = {
    "generator": "Table 2 row 2; eq. (7)",
    "gradient_identity_psi": "eqs. (1), (23)",
    "gradient_identity": "eq. (7); Table 2 row 2",
    "gradient_transform": "Table 2 row 1; eq. (22)",
    "hessian_transform": "Table 3 row 1; eq. (24)",
    "hessian_identity_psi": "eqs. (2), (25)",
    "hessian_identity": "eq. (8); Table 3 row 2",
    "second_order_psi": "eq. (26)",
    "second_order": "Table 3 row 3; eq. (26)",
    "theorem1_K": "appendix B",
    "theorem1": "Theorem 1, eq. (10); appendix B",
    "conserved": "eqs. (10), (13)",
}

TITLE = "Rescale symmetry: engine vs paper"
INTRO = ("A hidden unit with a ReLU (or any degree-1 homogeneous activation) computes the same function when its "
         "incoming weights and bias (the set A1) are multiplied by a > 0 and its outgoing weights (A2) divided by "
         "a. The group is the positive reals under multiplication. Below, every result the engine derives for "
         "this action is compared with the paper's formula, and the transformation laws and identities are "
         "re-derived from ψ with an arbitrary loss.")


def main(argv=None) -> int:
    return run_family("rescale", TITLE, INTRO, PAPER, EQUATIONS, ELEMENTS, OUTSIDE, argv)


if __name__ == "__main__":
    sys.exit(main())
