#!/usr/bin/env python
"""Translation symmetry θ_A ↦ θ_A + a·1_A (Kunin et al., ICLR 2021, §3–4, appendices A–B).

The engine derives the library's ``translation`` declaration; ``_common.run_family`` re-derives the
transformation laws and identities from ψ with a generic loss and compares everything with the formulas
below, typed in from the paper. Writes ``<out>/translation.md``; exit code 1 on any mismatch.

    python derivations/translation.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_family  # noqa: E402

from symtools.symbolic.forms import GradientForm, grad_symbol, hv_symbol  # noqa: E402

# The paper's objects in the engine's slot notation: slot x is the set A (every element of it).
x = sp.Symbol("x", real=True)
a = sp.Symbol("a", real=True)                 # the group is (R, +): no sign restriction
x1, x2, z = sp.symbols("x1 x2 z", real=True)  # θ = (θ_A, θ_{A^c}) with A = {x1, x2}
ELEMENTS, OUTSIDE = {"x": (x1, x2)}, (z,)
g_x, Hv_x = grad_symbol("x"), hv_symbol("x")

PAPER = {
    # Table 2, row 2 / eq. (3): the gradient is orthogonal to 1_A, the generator.
    "generator": {"x": sp.Integer(1)},
    "gradient_identity": GradientForm({"x": sp.Integer(1)}),            # ⟨g, 1_A⟩ = 0
    # Table 2, row 1: g(θ) = g(ψ(θ, α)) — the identity matrix acting on g(ψ).
    "gradient_transform": sp.eye(3),
    # Table 3, row 1: H(θ) = H(ψ(θ, α)).
    "hessian_transform": lambda Ht: Ht,
    # Table 3, row 2 / eq. (4): H 1_A = 0 (no gradient term).
    "hessian_identity": {"x": Hv_x},
    # Table 3, row 3: 1_Aᵀ H 1_A = 0, i.e. vᵀHv plus a zero gradient part.
    "second_order": GradientForm({"x": sp.Integer(0)}),
    # Appendix B: ∂α∂θψ|e = 0 for translation.
    "theorem1_K": sp.zeros(3, 3),
    # Eq. (11): ⟨θ_A, 1⟩ is conserved (density per element: the element itself).
    "conserved": {"x": x},
}

EQUATIONS = {
    "generator": "Table 2 row 2; eq. (3)",
    "gradient_identity_psi": "eqs. (1), (23)",
    "gradient_identity": "eq. (3); Table 2 row 2",
    "gradient_transform": "Table 2 row 1; eq. (22)",
    "hessian_transform": "Table 3 row 1; eq. (24)",
    "hessian_identity_psi": "eqs. (2), (25)",
    "hessian_identity": "eq. (4); Table 3 row 2",
    "second_order_psi": "eq. (26)",
    "second_order": "Table 3 row 3; eq. (26)",
    "theorem1_K": "appendix B",
    "theorem1": "Theorem 1, eq. (10); appendix B",
    "conserved": "eqs. (10), (11)",
}

TITLE = "Translation symmetry: engine vs paper"
INTRO = ("Parameters that feed a softmax (a column of the last weight matrix, or its bias) can all be shifted by "
         "the same constant without changing the output. The group is the real line under addition, acting by "
         "θ_A ↦ θ_A + a·1_A. Below, every result the engine derives for this action is compared with the paper's "
         "formula, and the transformation laws and identities are re-derived from ψ with an arbitrary loss.")


def main(argv=None) -> int:
    return run_family("translation", TITLE, INTRO, PAPER, EQUATIONS, ELEMENTS, OUTSIDE, argv)


if __name__ == "__main__":
    sys.exit(main())
