"""Parse a one-parameter elementwise action written as text.

Grammar (statements separated by ``;`` or new lines)::

    SLOT -> EXPRESSION          # the image of one slot; may use any slot and the group parameter
    a > 0                       # optional: restrict the group parameter to positive reals

Example: ``"w1 -> a*w1; b1 -> a*b1; w2 -> w2/a"``. Slots not given an image are not part of the action.
Every slot symbol and the group parameter are real. Any other name in an expression is an error
(SymPy's functions such as ``exp``, ``log``, ``sqrt`` are allowed).
"""

from __future__ import annotations

import keyword
import re

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

from symtools.errors import SpecError

_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED_PREFIXES = ("g_", "Hv_")
_TRANSFORMS = standard_transformations + (convert_xor, implicit_multiplication_application)
# Names SymPy may see in an expression besides slots and the parameter.
_FUNCTIONS = {
    name: getattr(sp, name)
    for name in (
        "exp", "log", "sqrt", "sin", "cos", "tan", "sinh", "cosh", "tanh", "asinh", "atan",
        "Abs", "sign", "pi", "E", "Rational",
    )
}


def check_slot_name(name: str, parameter: str) -> None:
    if not _IDENT.match(name):
        raise SpecError(f"slot name {name!r} is not an identifier (letters, digits, '_'; starting with a letter)")
    if keyword.iskeyword(name) or name in _FUNCTIONS:
        raise SpecError(f"slot name {name!r} is reserved; choose another name")
    if name == parameter:
        raise SpecError(f"{name!r} is the group parameter and cannot also be a slot")
    if name.startswith(_RESERVED_PREFIXES):
        raise SpecError(f"slot name {name!r} uses a reserved prefix ({', '.join(_RESERVED_PREFIXES)})")


def parse_spec(text: str, parameter: str = "a") -> tuple[dict[str, sp.Expr], sp.Symbol]:
    """Parse ``text`` into (slot name → image expression, group-parameter symbol)."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty symmetry declaration; write e.g. \"w1 -> a*w1; w2 -> w2/a\"")
    if "__" in text:
        raise SpecError("'__' is not allowed in a declaration")
    statements = [s.strip() for s in re.split(r"[;\n]", text) if s.strip()]
    positive = False
    pairs: list[tuple[str, str]] = []
    for stmt in statements:
        constraint = re.fullmatch(rf"{re.escape(parameter)}\s*>\s*0", stmt)
        if constraint:
            positive = True
            continue
        if "->" not in stmt:
            raise SpecError(f"cannot read {stmt!r}: expected 'SLOT -> EXPRESSION' or '{parameter} > 0'")
        lhs, rhs = (s.strip() for s in stmt.split("->", 1))
        if "->" in rhs:
            raise SpecError(f"cannot read {stmt!r}: one '->' per statement (separate statements with ';')")
        check_slot_name(lhs, parameter)
        if any(lhs == seen for seen, _ in pairs):
            raise SpecError(f"slot {lhs!r} is given two images")
        if not rhs:
            raise SpecError(f"slot {lhs!r} has an empty image")
        pairs.append((lhs, rhs))
    if not pairs:
        raise SpecError("no 'SLOT -> EXPRESSION' statement found")

    a = sp.Symbol(parameter, positive=True) if positive else sp.Symbol(parameter, real=True)
    symbols = {name: sp.Symbol(name, real=True) for name, _ in pairs}
    local = dict(_FUNCTIONS)
    local.update(symbols)
    local[parameter] = a
    images: dict[str, sp.Expr] = {}
    for name, rhs in pairs:
        try:
            expr = parse_expr(rhs, local_dict=local, global_dict={"__builtins__": {}, **_sympy_core()},
                              transformations=_TRANSFORMS, evaluate=True)
        except Exception as exc:  # SymPy raises many types on bad syntax
            raise SpecError(f"cannot parse the image of {name!r}: {rhs!r} ({type(exc).__name__})") from None
        if not isinstance(expr, sp.Expr):
            raise SpecError(f"the image of {name!r} is not an expression: {rhs!r}")
        unknown = sorted(str(s) for s in expr.free_symbols if s not in symbols.values() and s != a)
        if unknown:
            allowed = ", ".join(list(symbols) + [parameter])
            raise SpecError(f"unknown symbol {unknown[0]!r} in the image of {name!r}; expressions may use {allowed}")
        if expr.atoms(AppliedUndef):
            bad = sorted(str(f.func) for f in expr.atoms(AppliedUndef))[0]
            raise SpecError(f"unknown function {bad!r} in the image of {name!r}")
        images[name] = expr
    return images, a


def _sympy_core() -> dict:
    # What parse_expr's generated code needs to build expressions, and nothing else.
    return {name: getattr(sp, name) for name in ("Symbol", "Integer", "Float", "Rational", "Function")}
