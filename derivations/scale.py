#!/usr/bin/env python
"""Scale symmetry θ_A ↦ a·θ_A, a > 0 (Kunin et al., ICLR 2021, §3–4, appendices A–B).

The engine derives the library's ``scale`` declaration; ``_common.run_family`` re-derives the
transformation laws and identities from ψ with a generic loss and compares everything with the formulas
below, typed in from the paper. Writes ``<out>/scale.md``; exit code 1 on any mismatch.

    python derivations/scale.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_family  # noqa: E402

from symtools.symbolic.forms import GradientForm, grad_symbol, hv_symbol  # noqa: E402

# The paper's objects in the engine's slot notation: slot x is the set A.
x = sp.Symbol("x", real=True)
a = sp.Symbol("a", positive=True)             # the group is GL_1^+(R): a > 0
x1, x2, z = sp.symbols("x1 x2 z", real=True)  # θ = (θ_A, θ_{A^c}) with A = {x1, x2}
ELEMENTS, OUTSIDE = {"x": (x1, x2)}, (z,)
g_x, Hv_x = grad_symbol("x"), hv_symbol("x")
ALPHA_A = sp.diag(a, a, 1)                    # α_A = α·1_A + 1_{A^c}

PAPER = {
    # Table 2, row 2 / eq. (5): the gradient is orthogonal to θ_A, the generator.
    "generator": {"x": x},
    "gradient_identity": GradientForm({"x": x}),                        # ⟨g, θ_A⟩ = 0
    # Table 2, row 1: g(θ) = diag(α_A) g(ψ(θ, α)).
    "gradient_transform": ALPHA_A,
    # Table 3, row 1: H(θ) = diag(α_A²) H(ψ(θ, α)), read as diag(α_A) H diag(α_A) (see the page).
    "hessian_transform": lambda Ht: ALPHA_A * Ht * ALPHA_A,
    # ... and as printed, a one-sided product (shown on the page as a note, not checked).
    "hessian_transform_literal": lambda Ht: ALPHA_A**2 * Ht,
    # Table 3, row 2 / eq. (6): H θ_A + g_A = 0.
    "hessian_identity": {"x": Hv_x + g_x},
    # Table 3, row 3: θ_Aᵀ H θ_A = 0, i.e. vᵀHv plus a zero gradient part.
    "second_order": GradientForm({"x": sp.Integer(0)}),
    # Appendix B: ∂α∂θψ|e = I on A (0 on the complement).
    "theorem1_K": sp.diag(1, 1, 0),
    # Eq. (12): |θ_A|² is conserved.
    "conserved": {"x": x**2},
}

EQUATIONS = {
    "generator": "Table 2 row 2; eq. (5)",
    "gradient_identity_psi": "eqs. (1), (23)",
    "gradient_identity": "eq. (5); Table 2 row 2",
    "gradient_transform": "Table 2 row 1; eq. (22)",
    "hessian_transform": "Table 3 row 1; eq. (24)",
    "hessian_identity_psi": "eqs. (2), (25)",
    "hessian_identity": "eq. (6); Table 3 row 2",
    "second_order_psi": "eq. (26)",
    "second_order": "Table 3 row 3; eq. (26)",
    "theorem1_K": "appendix B",
    "theorem1": "Theorem 1, eq. (10); appendix B",
    "conserved": "eqs. (10), (12)",
}

TITLE = "Scale symmetry: engine vs paper"
INTRO = ("Parameters that feed a normalisation (the incoming weights and bias of a batch-normalised channel) can "
         "be multiplied by one positive constant without changing the output. The group is the positive reals "
         "under multiplication, acting by θ_A ↦ a·θ_A. Below, every result the engine derives for this action is "
         "compared with the paper's formula, and the transformation laws and identities are re-derived from ψ "
         "with an arbitrary loss.")


def main(argv=None) -> int:
    return run_family("scale", TITLE, INTRO, PAPER, EQUATIONS, ELEMENTS, OUTSIDE, argv)


if __name__ == "__main__":
    sys.exit(main())
