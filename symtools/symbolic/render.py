"""Presentation of derivations: plain text, LaTeX and a JSON-ready dict (strings read back by ``sympify``)."""

from __future__ import annotations

import sympy as sp

from symtools.symbolic.derive import Derivation
from symtools.symbolic.forms import grad_symbol, hv_symbol
from symtools.symbolic.matrix import MatrixDerivation


def _s(expr) -> str:
    return sp.sstr(expr)


def to_dict(d: Derivation | MatrixDerivation) -> dict:
    if isinstance(d, MatrixDerivation):
        return {
            "kind": "matrix",
            "name": d.name,
            "algebra": d.algebra,
            "identity": "I",
            "generator": {s: _s(e) for s, e in d.generator.items()},
            "gradient_identity": _s(d.gradient_identity),
            "hessian_identity": {s: f"Hv_{s} + {_s(e)}" for s, e in d.hessian_coupling.items()},
            "conserved_quantity": None if d.charge is None else {"matrix": _s(d.charge)},
            "reason": d.reason,
            "checks": d.verification,
        }
    c, t = d.charge, d.theorem1
    return {
        "kind": "elementwise",
        "name": d.action.name or None,
        "spec": d.action.spec(),
        "parameter": str(d.action.parameter),
        "identity": _s(d.action.identity),
        "generator": {s: _s(e) for s, e in d.generator.items()},
        "generator_second": {s: _s(e) for s, e in d.generator_second.items()},
        "gradient_identity": _s(d.gradient_identity.expr()),
        "hessian_identity": {s: _s(e) for s, e in d.hessian_identity.items()},
        "second_order_identity": _s(d.second_order_identity),
        "theorem1": {
            "condition": _s(t.condition.expr()),
            "holds": t.holds,
            "multiple_of_gradient_identity": None if t.multiple is None else _s(t.multiple),
            "quantity": _s(t.quantity),
            "trivial": t.trivial,
        },
        "conserved_quantity": None if not c.exists else {s: _s(e) for s, e in c.density.items()},
        "charge_factor": None if c.factor is None else _s(c.factor),
        "proof": c.proof,
        "reason": c.reason,
    }


def to_text(d: Derivation | MatrixDerivation) -> str:
    if isinstance(d, MatrixDerivation):
        return d.to_text()
    act, c, t = d.action, d.charge, d.theorem1
    lines = [f"symmetry {act.name or ''}: {act.spec()}".replace("  ", " "),
             f"  identity element      {act.parameter} = {_s(act.identity)}"]
    lines += [f"  generator v_{s:<8} {_s(e)}" for s, e in d.generator.items()]
    lines.append(f"  gradient identity     {_s(d.gradient_identity.expr())} = 0")
    lines += [f"  Hessian identity [{s}]  {_s(e)} = 0" for s, e in d.hessian_identity.items()]
    lines.append(f"  second order          {_s(d.second_order_identity)} = 0")
    lines.append(f"  Theorem 1 condition   {_s(t.condition.expr())} "
                 + (f"= {_s(t.multiple)}·⟨g, v⟩ = 0: holds" if t.holds else "does not reduce to 0")
                 + (" (but ⟨θ, v⟩ ≡ 0, so it conserves nothing)" if t.trivial else ""))
    if c.exists:
        lines.append("  conserved quantity    Q = " + " + ".join(f"Σ({_s(e)})" for e in c.density.values() if e != 0))
        lines += [f"    {p}" for p in c.proof]
    else:
        lines.append(f"  no conserved quantity: {c.reason}")
    lines.append("  (Hv_s is the slot-s part of H·v, g_s the gradient, ⟨·,·⟩ sums over a slot's elements)")
    return "\n".join(lines)


def _latex_name(name: str) -> str:
    """``g_x_in`` → ``g_{x_{in}}``: SymPy would print every underscore after the first as a space."""
    head, *rest = name.split("_")
    if not rest:
        return head
    sub = rest[-1]
    for part in reversed(rest[:-1]):
        sub = f"{part}_{{{sub}}}"
    return f"{head}_{{{sub}}}"


def to_latex(d: Derivation | MatrixDerivation) -> str:
    def L(expr) -> str:
        names = {s: _latex_name(s.name) for s in getattr(expr, "free_symbols", ()) if s.name.count("_") > 1}
        return sp.latex(expr, symbol_names=names)

    if isinstance(d, MatrixDerivation):
        rows = [rf"v_{{{s}}}(X) &= {L(e)}" for s, e in d.generator.items()]
        rows.append(rf"0 &= {L(d.gradient_identity)}")
        rows += [rf"0 &= (Hv(X))_{{{s}}} + {L(e)}" for s, e in d.hessian_coupling.items()]
        rows.append(rf"Q &= {L(d.charge)}" if d.charge is not None else r"Q &\;\text{does not exist}")
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"
    act = d.action
    rows = [rf"{act.parameter} &= {L(act.identity)} \quad\text{{(identity)}}"]
    rows += [rf"v_{{{L(sp.Symbol(s))}}} &= {L(e)}" for s, e in d.generator.items()]
    rows.append(rf"0 &= {L(d.gradient_identity.expr())}")
    rows += [rf"0 &= {L(e)}" for e in d.hessian_identity.values()]
    rows.append(rf"0 &= {L(d.second_order_identity)}")
    if d.charge.exists:
        terms = [e for e in d.charge.density.values() if e != 0]
        body = ""
        for i, e in enumerate(terms):
            negative = e.could_extract_minus_sign()
            sign = (" - " if negative else (" + " if i else ""))
            body += sign + r"\sum " + L(-e if negative else e)
        rows.append(r"Q &= " + body.lstrip())
    else:
        rows.append(r"Q &\;\text{does not exist}")
    return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"


__all__ = ["to_dict", "to_text", "to_latex", "grad_symbol", "hv_symbol"]
