"""Symbols for gradients and Hessian products, and linear forms in the gradient.

Elementwise actions are derived on one scalar symbol per slot; a quantity of the whole network is a sum
over slots of that slot's expression summed over its elements. ``Inner(g_s, c)`` denotes
``⟨g_s, c⟩ = Σ_elements g_s·c`` (an unevaluated SymPy function, so results stay readable and
``sympify`` can read them back).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp


class Inner(sp.Function):
    """⟨x, y⟩: the sum over a slot's elements of x·y (unevaluated)."""

    nargs = 2

    def _latex(self, printer):
        x, y = self.args
        return r"\left\langle %s, %s \right\rangle" % (printer._print(x), printer._print(y))


def grad_symbol(slot: str) -> sp.Symbol:
    """g_<slot>: the loss gradient with respect to a slot (elementwise)."""
    return sp.Symbol(f"g_{slot}", real=True)


def hv_symbol(slot: str) -> sp.Symbol:
    """Hv_<slot>: the slot's part of the Hessian-vector product H·v (elementwise)."""
    return sp.Symbol(f"Hv_{slot}", real=True)


VHV = sp.Symbol("vHv", real=True)  # vᵀ H v, a scalar


@dataclass(frozen=True)
class GradientForm:
    """A linear form in the gradient, Σ_s ⟨g_s, c_s(θ)⟩, kept as slot → elementwise coefficient."""

    coefficients: dict[str, sp.Expr]

    def expr(self) -> sp.Expr:
        """As a SymPy expression Σ_s k·Inner(g_s, c_s), numeric factors pulled out of the inner products."""
        total = sp.Integer(0)
        for slot, c in self.coefficients.items():
            c = sp.simplify(c)
            if c == 0:
                continue
            k, rest = c.as_coeff_Mul()
            total += k * Inner(grad_symbol(slot), rest)
        return total

    def pointwise(self) -> sp.Expr:
        """Σ_s g_s·c_s at one element (what each term looks like before summing over elements)."""
        return sp.Add(*[grad_symbol(s) * c for s, c in self.coefficients.items()])

    def reduce_modulo(self, identity: "GradientForm") -> tuple[bool, sp.Expr | None]:
        """Is this form a constant multiple λ of ``identity`` (so it vanishes wherever the identity does)?

        Returns (True, λ) or (False, None). λ must be free of every slot symbol: the identity only holds
        after summing over all elements, so an element-dependent multiplier would not be allowed.
        """
        slots = set(self.coefficients) | set(identity.coefficients)
        lam = None
        for s in slots:
            v = sp.simplify(identity.coefficients.get(s, sp.Integer(0)))
            if v != 0:
                lam = sp.simplify(self.coefficients.get(s, sp.Integer(0)) / v)
                break
        if lam is None:  # identity is empty: the form must vanish itself
            ok = all(sp.simplify(c) == 0 for c in self.coefficients.values())
            return ok, (sp.Integer(0) if ok else None)
        slot_symbols = {sp.Symbol(s, real=True) for s in slots}
        if lam.free_symbols & slot_symbols:
            return False, None
        for s in slots:
            diff = self.coefficients.get(s, sp.Integer(0)) - lam * identity.coefficients.get(s, sp.Integer(0))
            if sp.simplify(diff) != 0:
                return False, None
        return True, lam
