"""The exact ε law of a normalisation fed by a positively homogeneous path, derived with SymPy.

A scale group θ_A ↦ a·θ_A (a > 0) of the parameters feeding a BatchNorm channel (or a whole layer feeding a
LayerNorm) through elementwise ops that are positively homogeneous of degree k (f(a·z) = a^k·f(z); ReLU:
k = 1, z²: k = 2) multiplies every value the norm sees by a^k. The norm's ε breaks the symmetry, but only by
a change of ε: :func:`epsilon_law` finds ε'(a) with

    y(a^k·z; ε) = y(z; ε'(a))      for all values z,   y(z; ε)_i = γ (z_i − mean z)/sqrt(var z + ε) + β,

by solving that equation for ε' on the norm's formula (biased variance, as in PyTorch) and checking that
the solution holds for every output and is free of the data. Then L(a·θ_A; ε) = L(θ_A; ε'(a)) and, at a = 1,

    ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε,    c = (dε'/da at a = 1)/ε.

The engine finds ε' = ε·a^(−2k), so c = −2k: −2 for the usual degree-1 path, −4 for Linear → z² → BatchNorm.
Nothing here is looked up: the result is solved for, verified by substitution and cached per (k, norm).

:func:`homogeneity_degree` derives the degree k of an elementwise op from its formula (Euler's relation
a·∂_a f(a·z) = k·f(a·z), piece by piece for Piecewise/Max formulas with scale-invariant conditions);
:data:`OP_FORMULAS` holds the formulas of the ops the graph walk passes, so their declared degrees can be
checked against it (``tests/test_epsilon_law.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from numbers import Integral

import sympy as sp

from symtools.errors import SymtoolsError

__all__ = ["EpsilonLaw", "EpsilonLawError", "NORMS", "OP_FORMULAS", "epsilon_factor", "epsilon_law",
           "homogeneity_degree"]

#: norm kind → (samples, values normalised together per sample) of the symbolic model. BatchNorm: one channel
#: over a batch of 3 samples (per-channel ε); LayerNorm: 2 samples of 3 features each, one shared scalar ε
#: (so ε' must be the same for every sample: checked).
NORMS = {"batch": (1, 3), "layer": (2, 3)}


class EpsilonLawError(SymtoolsError):
    """No ε law can be derived (a degree that is not a positive exact number, an unknown norm, no solution)."""


@dataclass(frozen=True)
class EpsilonLaw:
    """L(a·θ_A; ε) = L(θ_A; ``epsilon_scaled``) and ⟨g_A, θ_A⟩ = ``factor``·ε·∂L/∂ε for a path of ``degree``."""

    norm: str
    degree: sp.Rational
    epsilon_scaled: sp.Expr  # ε'(a), in the symbols a and epsilon of this module
    factor: sp.Rational  # c
    proof: tuple[str, ...]

    def __float__(self) -> float:
        return float(self.factor)


A = sp.Symbol("a", positive=True)
EPSILON = sp.Symbol("epsilon", positive=True)
_EPSILON_NEW = sp.Symbol("epsilon_new", positive=True)
_GAMMA, _BETA = sp.Symbol("gamma", real=True), sp.Symbol("beta", real=True)


def _exact_degree(degree) -> sp.Rational:
    if isinstance(degree, bool):
        raise EpsilonLawError(f"homogeneity degree must be a number, got {degree!r}")
    if isinstance(degree, Integral):
        k = sp.Integer(int(degree))
    elif isinstance(degree, Fraction):
        k = sp.Rational(degree.numerator, degree.denominator)
    elif isinstance(degree, sp.Basic) and degree.is_Rational:
        k = sp.Rational(degree)
    else:
        raise EpsilonLawError(f"no ε law derived for homogeneity degree {degree!r}: only exact integer or "
                              f"rational degrees are handled")
    if k <= 0:
        raise EpsilonLawError(f"no ε law derived for homogeneity degree {k}: the path must carry the scale "
                              f"(degree > 0)")
    return k


def _normalise(values: list[sp.Expr], eps: sp.Expr) -> list[sp.Expr]:
    """γ (z_i − mean)/sqrt(var + ε) + β over ``values`` (biased variance, as torch's BatchNorm/LayerNorm)."""
    n = len(values)
    mean = sp.Add(*values) / n
    var = sp.Add(*[(v - mean) ** 2 for v in values]) / n
    return [_GAMMA * (v - mean) / sp.sqrt(var + eps) + _BETA for v in values]


@lru_cache(maxsize=None)
def _derive(k: sp.Rational, norm: str) -> EpsilonLaw:
    samples, width = NORMS[norm]
    z = [[sp.Symbol(f"z_{s}_{i}", real=True) for i in range(width)] for s in range(samples)]
    scaled = [_normalise([A**k * v for v in row], EPSILON) for row in z]  # y(a^k z; ε)
    plain = [_normalise(list(row), _EPSILON_NEW) for row in z]  # y(z; ε')
    sols = sp.solve(sp.Eq(scaled[0][0], plain[0][0]), _EPSILON_NEW)
    data = {v for row in z for v in row} | {_GAMMA, _BETA}
    sols = [sp.simplify(s) for s in sols if not (sp.sympify(s).free_symbols & data)]
    if len(sols) != 1:
        raise EpsilonLawError(f"{norm} norm, path of degree {k}: y(a^k z; ε) = y(z; ε') has "
                              f"{len(sols)} data-free solutions for ε' (need exactly one)")
    eps_new = sols[0]
    for s in range(samples):  # the same ε' for every output of every sample (LayerNorm: one scalar ε)
        for y_a, y_1 in zip(scaled[s], plain[s]):
            if sp.simplify(y_a - y_1.subs(_EPSILON_NEW, eps_new)) != 0:
                raise EpsilonLawError(f"{norm} norm, path of degree {k}: ε' = {eps_new} does not hold for "
                                      f"every output")
    if sp.simplify(eps_new.subs(A, 1) - EPSILON) != 0:
        raise EpsilonLawError(f"{norm} norm, path of degree {k}: ε'(1) = {eps_new.subs(A, 1)} ≠ ε")
    factor = sp.nsimplify(sp.simplify(sp.diff(eps_new, A).subs(A, 1) / EPSILON))
    if not factor.is_Rational:
        raise EpsilonLawError(f"{norm} norm, path of degree {k}: the ε factor {factor} is not a number")
    unit = "one channel over the batch" if norm == "batch" else "the features of each sample"
    proof = (f"y(z; ε)_i = γ (z_i − mean z)/sqrt(var z + ε) + β over {unit}",
             f"θ_A → a·θ_A scales the norm's input by a^{k} (path homogeneous of degree {k})",
             f"solve y(a^{k} z; ε) = y(z; ε') for ε': ε' = {sp.sstr(eps_new)} (checked for every output)",
             f"L(a·θ_A; ε) = L(θ_A; {sp.sstr(eps_new)})  ⇒  d/da at a = 1:  "
             f"⟨g_A, θ_A⟩ = ({sp.sstr(factor)})·ε·∂L/∂ε")
    return EpsilonLaw(norm=norm, degree=k, epsilon_scaled=eps_new, factor=sp.Rational(factor), proof=proof)


def epsilon_law(degree, norm: str = "batch") -> EpsilonLaw:
    """The derived ε law of a ``norm`` ("batch" or "layer") fed through a path of homogeneity ``degree``.

    ``degree``: an int, :class:`fractions.Fraction` or SymPy Rational > 0 (anything else raises
    :class:`EpsilonLawError`). Cached: each (degree, norm) is derived once per process (~1 s).
    """
    if norm not in NORMS:
        raise EpsilonLawError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return _derive(_exact_degree(degree), norm)


def epsilon_factor(degree, norm: str = "batch") -> float:
    """c in ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε (derived: −2·degree), as a float for the numeric code."""
    return float(epsilon_law(degree, norm).factor)


# ----------------------------------------------------------------------------------------------------------
# the homogeneity degree of an elementwise op, from its formula

_Z, _Z2 = sp.Symbol("z", real=True), sp.Symbol("z_2", real=True)
_SLOPE = sp.Symbol("s", positive=True)  # LeakyReLU's negative slope
_KEEP = sp.Symbol("m", positive=True)  # a dropout mask entry divided by the keep probability

#: formula of each op the graph walk passes (names of :class:`symtools.nn.graph.Op`), in the unit value z
#: (and z_2 for a pool over two positions)
OP_FORMULAS: dict[str, sp.Expr] = {
    "ReLU": sp.Max(0, _Z),
    "LeakyReLU": sp.Piecewise((_Z, _Z >= 0), (_SLOPE * _Z, True)),
    "Identity": _Z,
    "Dropout": _KEEP * _Z,
    "Square": _Z**2,
    "MaxPool": sp.Max(_Z, _Z2),
}


def _scale_invariant(cond, variables) -> bool:
    """Whether a Piecewise condition reads the same at a·z for a > 0: a sign test of a homogeneous expression."""
    if cond in (sp.true, sp.false):
        return True
    if isinstance(cond, (sp.And, sp.Or, sp.Not)):
        return all(_scale_invariant(c, variables) for c in cond.args)
    if isinstance(cond, sp.core.relational.Relational):
        diff = cond.lhs - cond.rhs
        return diff == 0 or _piece_degree(diff, variables) is not None
    return False


def _piece_degree(expr: sp.Expr, variables) -> sp.Rational | None:
    """k with e(a·z) = a^k e(z) for a > 0, from Euler's relation a·∂_a e(a·z) = k·e(a·z); None if none."""
    scaled = expr.subs({v: A * v for v in variables}, simultaneous=True)
    k = sp.simplify(A * sp.diff(scaled, A) / scaled)
    if k.free_symbols or not k.is_Rational:
        return None
    return sp.Rational(k)


def homogeneity_degree(expr, variables=None) -> sp.Rational | None:
    """The degree k of positive homogeneity of ``expr`` in ``variables`` (default: its real symbols named z…),
    f(a·z) = a^k·f(z) for every a > 0, or None if it is not positively homogeneous (tanh, z + 1, …).

    Piecewise formulas (Max/Min are rewritten to Piecewise) need every non-zero piece of the same degree and
    conditions that are sign tests of homogeneous expressions. A formula that is identically 0 has no degree.
    """
    expr = sp.sympify(expr)
    if variables is None:
        variables = sorted((s for s in expr.free_symbols if s.name.startswith("z")), key=str)
    variables = list(variables)
    expr = sp.piecewise_fold(expr.rewrite(sp.Piecewise))
    pieces = expr.args if isinstance(expr, sp.Piecewise) else ((expr, sp.true),)
    degrees = set()
    for e, cond in pieces:
        if not _scale_invariant(cond, variables):
            return None
        if sp.simplify(e) == 0:
            continue
        k = _piece_degree(e, variables)
        if k is None:
            return None
        degrees.add(k)
    return degrees.pop() if len(degrees) == 1 else None
