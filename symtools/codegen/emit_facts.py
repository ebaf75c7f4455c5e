"""Facts about the emitted functions, decided symbolically when they are emitted and printed as constants.

Numeric code reads these constants instead of probing the generated functions on sample values:

* ``MONOMIALS`` — each elementwise density as a polynomial in the per-element variables of its own slot
  (value θ, gradient g, buffer b, displacement d, update u: :data:`VARIABLES`), as
  ``((exponent of θ, g, b, d, u), coefficient)`` pairs, or None where it is not such a polynomial. The fused
  monitor (:mod:`symtools.numeric.fused`) reduces every density of every family through the monomials they
  share, so a density is evaluated without calling its function;
* ``CHARGE_FACTOR`` — the charge density divided by the law's density of Q (a number on every slot, usually 1);
* ``NONNEGATIVE`` — per law term, whether its density is ≥ 0 for all real arguments (SymPy's assumptions);
* ``LINEAR`` — whether every update of a law (first step, later steps, continuous theory) is a linear map of
  the state and the measured terms, with coefficients set by the hyper-parameters alone; the fused monitor
  advances the laws as matrices, which is exact only then;
* ``GENERATOR_CONSTANT`` — whether the generator v does not depend on θ (a translation);
* ``DENSITY_TEXT`` / ``CHARGE_TEXT`` — the densities as SymPy text, so two tables are the same function when
  their texts are equal.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import sympy as sp

#: Argument-name prefixes of a slot's per-element variables, in the order of a monomial's exponents.
VARIABLES = ("", "g_", "b_", "d_", "u_")

Monomials = tuple[tuple[tuple[int, ...], float], ...]


def monomials(expr: sp.Expr, slot: str) -> Monomials | None:
    """``expr`` as Σ coefficient·Π variable^exponent over the per-element variables of ``slot``, or None when
    it reads another slot's variables, a hyper-parameter, or is not a polynomial with numeric coefficients."""
    expr = sp.expand(sp.sympify(expr))
    names = {p + slot: i for i, p in enumerate(VARIABLES)}
    symbols = sorted(expr.free_symbols, key=lambda s: names.get(s.name, -1))
    if any(s.name not in names for s in symbols):
        return None
    if not symbols:
        return (((0,) * len(VARIABLES), float(expr)),) if expr != 0 else ()
    try:
        poly = sp.Poly(expr, *symbols)
    except sp.PolynomialError:
        return None
    out = []
    for powers, coeff in poly.terms():
        if not coeff.is_number:
            return None
        exps = [0] * len(VARIABLES)
        for s, k in zip(symbols, powers):
            exps[names[s.name]] = int(k)
        out.append((tuple(exps), float(coeff)))
    return tuple(sorted(out))


def monomial_table(densities: Mapping[str, Mapping[str, sp.Expr]]) -> dict[str, dict[str, Monomials | None]]:
    """term → slot → :func:`monomials` of its density."""
    return {name: {s: monomials(e, s) for s, e in table.items()} for name, table in densities.items()}


def texts(density: Mapping[str, sp.Expr]) -> dict[str, str]:
    """slot → SymPy text of the density (equal texts: the same function)."""
    return {s: sp.sstr(sp.expand(sp.sympify(e))) for s, e in density.items()}


def charge_factor(charge: Mapping[str, sp.Expr], law_q: Mapping[str, sp.Expr]) -> float | None:
    """The number c with charge density = c · (law's Q density) on every slot, or None if there is none."""
    ratios = set()
    for s, e in charge.items():
        q = sp.sympify(law_q.get(s, 0))
        e = sp.sympify(e)
        if q == 0 and e == 0:
            continue
        if q == 0:
            return None
        r = sp.simplify(e / q)
        if not r.is_number:
            return None
        ratios.add(r)
    return float(ratios.pop()) if len(ratios) == 1 else (1.0 if not ratios else None)


def nonnegative(density: Mapping[str, sp.Expr]) -> bool:
    """Whether every slot's density is ≥ 0 for all real arguments (and there is one)."""
    return bool(density) and all(sp.sympify(e).is_nonnegative is True for e in density.values())


def linear_in(expr: sp.Expr, variables: Iterable[sp.Symbol], allowed: Iterable[sp.Symbol] | None = None) -> bool:
    """Whether ``expr`` is linear in ``variables``: no constant term, every second derivative 0. With ``allowed``,
    it may read nothing but ``variables`` and ``allowed`` (e.g. the hyper-parameters)."""
    expr = sp.sympify(expr)
    variables = list(variables)
    if allowed is not None and not expr.free_symbols <= set(variables) | set(allowed):
        return False
    if sp.simplify(expr.subs({v: 0 for v in variables})) != 0:
        return False
    vs = [v for v in variables if v in expr.free_symbols]
    return all(sp.simplify(sp.diff(expr, a, b)) == 0 for i, a in enumerate(vs) for b in vs[i:])


def linear(updates: Iterable[Mapping[str, sp.Expr]], variables: Iterable[sp.Symbol],
           auxiliary: Iterable[tuple[sp.Symbol, sp.Expr]] = ()) -> bool:
    """Whether each update expression is :func:`linear_in` ``variables``, with every auxiliary assignment a
    function of the hyper-parameters alone."""
    variables = list(variables)
    names = {v.name for v in variables}
    if any(names & {s.name for s in sp.sympify(e).free_symbols} for _, e in auxiliary):
        return False
    return all(linear_in(e, variables) for update in updates for e in update.values())


def generator_constant(generator: Mapping[str, sp.Expr], slots: Iterable[str]) -> bool:
    """Whether the generator reads no slot value (v is the same at every θ)."""
    names = set(slots)
    return not any(names & {s.name for s in sp.sympify(e).free_symbols} for e in generator.values())
