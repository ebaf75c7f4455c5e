"""A torch printer for derived expressions: SymPy's ``TorchPrinter`` with its pitfalls fixed.

Fixes (each measured on SymPy 1.14, see DESIGN.md):
- ``Max(x, 0)`` printed as ``torch.max(0, x)`` (a TypeError) → ``torch.clamp`` / ``torch.maximum``;
  likewise ``Min``.
- ``Heaviside(x)`` printed as ``torch.heaviside(x, 1/2)`` (the second argument must be a tensor) →
  ``torch.heaviside(x, torch.full_like(x, h0))``.
- explicit ``Matrix`` became a float64 constant tensor that cuts autograd → ``torch.stack`` of the entries
  (numeric entries as ``torch.full_like`` of a symbolic one, since ``torch.stack`` takes only tensors).
- irrational constants such as ``sqrt(2)`` or ``log(2)`` printed as ``torch.sqrt(2)`` / ``torch.log(2)``
  (a TypeError: torch functions take tensors) → their float64 value.
- ``Transpose`` printed as ``torch.transpose(X).t()`` (wrong arity) and ``permute(1, 0)`` (breaks batches)
  → ``X.mT``; ``MatMul``/``MatAdd`` print with ``@`` and ``+`` so matrix code reads like the math.
- Integer powers print as ``x**k`` (exact, and clearer than ``torch.pow(x, k)``).
"""

from __future__ import annotations

import sympy as sp
from sympy.printing.pytorch import TorchPrinter


class SymtoolsTorchPrinter(TorchPrinter):
    printmethod = "_symtools_torchcode"

    def _print(self, expr, **kwargs):
        # A real constant other than an exact rational or a named one (pi, E): print its value, not a torch call.
        if (isinstance(expr, sp.Expr) and not isinstance(expr, (sp.Rational, sp.Float, sp.NumberSymbol))
                and expr.is_number and expr.is_real):
            return repr(float(expr.evalf(30)))  # the float64 nearest the value (shortest round-trip text)
        return super()._print(expr, **kwargs)

    def _print_Max(self, expr):
        return self._minmax(expr, "torch.maximum", "min")

    def _print_Min(self, expr):
        return self._minmax(expr, "torch.minimum", "max")

    def _minmax(self, expr, binary: str, clamp_kw: str) -> str:
        numbers = [a for a in expr.args if a.is_number]
        others = [a for a in expr.args if not a.is_number]
        out = self._print(others[0])
        for arg in others[1:]:
            out = f"{binary}({out}, {self._print(arg)})"
        if numbers:  # SymPy has already folded several numbers into one
            out = f"torch.clamp({out}, {clamp_kw}={self._print(numbers[0])})"
        return out

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        h0 = self._print(expr.args[1]) if len(expr.args) > 1 else "0.5"
        return f"torch.heaviside({x}, torch.full_like({x}, {h0}))"

    def _print_MatrixBase(self, expr):
        ref = next((e for e in expr if not e.is_number), None)
        if ref is None:  # a constant matrix: nothing to differentiate through
            return super()._print_MatrixBase(expr)
        like = self._print(ref)

        def entry(e):
            return f"torch.full_like({like}, {self._print(e)})" if e.is_number else self._print(e)

        rows = ["torch.stack([" + ", ".join(entry(e) for e in row) + "], dim=-1)" for row in expr.tolist()]
        return "torch.stack([" + ", ".join(rows) + "], dim=-2)"

    _print_ImmutableDenseMatrix = _print_MatrixBase
    _print_MutableDenseMatrix = _print_MatrixBase

    def _print_Transpose(self, expr):
        return f"{self.parenthesize(expr.arg, 100)}.mT"

    def _print_MatMul(self, expr):
        coeff, mats = expr.as_coeff_mmul()
        factors = mats.args if isinstance(mats, sp.MatMul) else (mats,)
        body = " @ ".join(self.parenthesize(f, 60) for f in factors)
        if coeff == 1:
            return body
        if coeff == -1:
            return f"-({body})" if len(factors) > 1 else f"-{body}"
        return f"{self._print(coeff)}*({body})"

    def _print_MatAdd(self, expr):
        parts = [self._print(a) for a in expr.args]
        out = parts[0]
        for p in parts[1:]:
            out += f" - {p[1:]}" if p.startswith("-") else f" + {p}"
        return out

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_Integer and exp > 0 and not base.is_Matrix:
            return f"{self.parenthesize(base, 60)}**{exp}"
        return super()._print_Pow(expr)


def torch_expr(expr: sp.Expr) -> str:
    return SymtoolsTorchPrinter().doprint(expr)
