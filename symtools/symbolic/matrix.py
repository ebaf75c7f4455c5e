"""Linear actions with a matrix group parameter, declared by their Lie algebra.

A declaration gives the finite action θ_s ↦ ψ_s(θ, G) of an h×h group element G on matrix slots
(e.g. GL_h on consecutive linear maps: ``U ↦ U G⁻¹``, ``V ↦ G V``) and the Lie algebra the one-parameter
subgroups G = exp(aX) run through ('gl': all X; 'so': X antisymmetric).

Derivation (matrix expressions with symbolic sizes):
  generator        v_s(X) = d/da ψ_s(θ, exp(aX)) at a = 0  (G → I + aX, G⁻¹ → I − aX, Gᵀ → I + aXᵀ)
  gradient id.     Σ_s ⟨∂L/∂θ_s, v_s(X)⟩ = ⟨M_g, X⟩ = 0 for every X in the algebra → M_g = 0 (gl), M_g − M_gᵀ = 0 (so)
  Hessian id.      H v(X) + K_X g = 0 with (K_X g)_t = Σ_s (∂v_s/∂θ_t)ᵀ g_s (the adjoint of X ↦ v(X) on θ)
  charge           Q_X = ½ Σ_s ⟨θ_s, v_s(X)⟩ = ⟨M_Q, X⟩; Q = M_Q (projected on the algebra), normalised
The charge is then *verified* at concrete sizes with explicit entries: for every basis element E of the
algebra, ∇Q_E must be a constant combination of the generators v_F (so ⟨∇Q_E, g⟩ = 0 by the gradient
identities), and the curl test is run on each v_E. An antisymmetric action (rotations) has Q ≡ 0: no charge.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import sympy as sp

from symtools.errors import SpecError

Dims = tuple[object, object]


@dataclass
class MatrixDerivation:
    name: str
    algebra: str
    generator: dict[str, sp.MatrixExpr]          # slot → v_s(X)
    gradient_identity: sp.MatrixExpr             # M_g (must vanish, or its antisymmetric part for 'so')
    hessian_coupling: dict[str, sp.MatrixExpr]   # slot → (K_X g)_s
    charge: sp.MatrixExpr | None                 # M_Q, or None
    charge_factor: sp.Expr | None                # Σ_s ⟨θ_s, v_s(X)⟩ = 2 Q_X = factor · ⟨charge, X⟩
    reason: str | None
    verification: list[str] = field(default_factory=list)
    symbols: dict[str, sp.MatrixSymbol] = field(default_factory=dict)

    def to_text(self) -> str:
        lines = [f"{self.name} (Lie algebra {self.algebra})"]
        lines += [f"  v_{s}(X) = {sp.sstr(e)}" for s, e in self.generator.items()]
        lines.append(f"  gradient identity: {sp.sstr(self.gradient_identity)} = 0"
                     + ("  (antisymmetric part)" if self.algebra == "so" else ""))
        lines += [f"  Hessian identity [{s}]: (H v(X))_{s} + {sp.sstr(e)} = 0" for s, e in self.hessian_coupling.items()]
        lines.append(f"  conserved: {sp.sstr(self.charge)}" if self.charge is not None else f"  no charge: {self.reason}")
        lines += [f"  check: {v}" for v in self.verification]
        return "\n".join(lines)


class MatrixAction:
    """A linear action of an h×h matrix group on matrix slots (see the module docstring)."""

    def __init__(self, name: str, slots: Mapping[str, Dims], h: object,
                 action: Callable[..., Mapping[str, sp.MatrixExpr]], algebra: str = "gl",
                 concrete: Mapping[str, int] | None = None):
        if algebra not in ("gl", "so"):
            raise SpecError(f"unknown Lie algebra {algebra!r}; use 'gl' or 'so'")
        self.name, self.algebra, self.action = name, algebra, action
        self.slot_dims = dict(slots)
        self.h = h
        self.concrete = dict(concrete or {})

    def _symbols(self, subs: Mapping) -> tuple[dict[str, sp.MatrixSymbol], sp.MatrixSymbol, sp.MatrixSymbol]:
        size = lambda d: sp.sympify(d).subs(subs)  # noqa: E731
        mats = {s: sp.MatrixSymbol(s, size(r), size(c)) for s, (r, c) in self.slot_dims.items()}
        h = size(self.h)
        return mats, sp.MatrixSymbol("G", h, h), sp.MatrixSymbol("X", h, h)

    def generators(self, subs: Mapping = {}) -> tuple[dict, sp.MatrixSymbol, dict]:
        mats, G, X = self._symbols(subs)
        h = G.shape[0]
        a = sp.Symbol("a", real=True)
        images = self.action(G, **mats)
        if set(images) != set(mats):
            raise SpecError(f"the action must give an image for every slot {sorted(mats)}")
        eye = sp.Identity(h)
        linear = {G.T.I: eye - a * X.T, G.I.T: eye - a * X.T, G.I: eye - a * X, G.T: eye + a * X.T, G: eye + a * X}
        gens = {}
        for s, img in images.items():
            lin = sp.expand(_replace_group(img, linear))
            gens[s] = _simplify_mat(sp.expand(_diff_a(lin, a)))
            if self.algebra == "so":
                gens[s] = _simplify_mat(sp.expand(gens[s].xreplace({X.T: -X})))
        return gens, X, mats

    def derive(self) -> MatrixDerivation:
        gens, X, mats = self.generators()
        grads = {s: sp.MatrixSymbol(f"g_{s}", *m.shape) for s, m in mats.items()}
        grad_id = _simplify_mat(sp.Add(*[_coefficient(X, grads[s], gens[s]) for s in gens]))
        coupling = {t: _simplify_mat(sp.Add(*[_adjoint_part(mats[t], grads[s], gens[s]) for s in gens]))
                    for t in mats}
        if self.algebra == "so":
            coupling = {t: _simplify_mat(sp.expand(e.xreplace({X.T: -X}))) for t, e in coupling.items()}
        raw = sp.Add(*[_coefficient(X, mats[s], gens[s]) for s in gens])
        if self.algebra == "so":
            raw = (raw - raw.T)
        raw = _simplify_mat(sp.expand(raw))
        charge, factor, reason = _normalise(raw, next(iter(mats.values())))
        verification, ok = self.verify(charge is not None)
        if charge is not None and not ok:
            charge, factor, reason = None, None, "the candidate charge failed the explicit check: " + verification[-1]
        if charge is None and reason is None:
            reason = "⟨θ, v(X)⟩ vanishes for every X in the algebra: the action is antisymmetric (A_X* = −A_X)"
        return MatrixDerivation(self.name, self.algebra, gens, grad_id, coupling, charge, factor, reason,
                                verification, mats)

    def verify(self, expect_charge: bool) -> tuple[list[str], bool]:
        """Explicit check at concrete sizes: curl test per basis generator, and ∇Q_E ∈ span{v_F}."""
        subs = {sp.Symbol(k, integer=True, positive=True): v for k, v in self.concrete.items()}
        gens, X, mats = self.generators(subs)
        h = X.shape[0]
        entries = {s: sp.ImmutableMatrix(*m.shape, lambda i, j, s=s: sp.Symbol(f"{s}_{i}_{j}", real=True))
                   for s, m in mats.items()}
        variables = [x for s in mats for x in entries[s]]
        basis = _basis(int(h), self.algebra)

        def field_of(E):
            out = []
            for s in mats:
                val = gens[s].xreplace({X: E, **{mats[t]: entries[t] for t in mats}}).doit()
                out += list(sp.ImmutableMatrix(val))
            return out

        fields = [field_of(E) for E in basis]
        symmetric = []
        for E, v in zip(basis, fields):
            jac = sp.Matrix([[sp.diff(vi, x) for x in variables] for vi in v])
            symmetric.append(jac == jac.T)
        notes = [f"h={h}: {sum(symmetric)} of {len(basis)} basis generators pass the curl test "
                 f"(symmetric Jacobian)"]
        charges = [sp.expand(sum(x * vi for x, vi in zip(variables, v)) / 2) for v in fields]
        if all(q == 0 for q in charges):
            notes.append(f"h={h}: ½⟨θ, v_E⟩ ≡ 0 for every basis element E")
            return notes, not expect_charge
        coeffs = sp.symbols(f"c0:{len(basis)}")
        for k, q in enumerate(charges):
            grad = [sp.diff(q, x) for x in variables]
            combo = [sum(c * v[i] for c, v in zip(coeffs, fields)) for i in range(len(variables))]
            eqs = []
            for gi, ci in zip(grad, combo):
                eqs += sp.Poly(sp.expand(gi - ci), *variables).coeffs()
            sol = sp.solve(eqs, coeffs, dict=True)
            if not sol:
                notes.append(f"h={h}: ∇Q_E{k} is not a combination of the generators")
                return notes, False
        notes.append(f"h={h}: for all {len(basis)} basis elements E, ∇(½⟨θ, v_E⟩) is a constant combination of "
                     f"generators, so d/dt Q_E = −⟨∇Q_E, g⟩ = 0 by the gradient identities")
        return notes, True


def _replace_group(expr, linear):
    # Replace the largest group-element patterns first (G⁻ᵀ before G⁻¹ before G).
    for pattern, value in linear.items():
        expr = expr.xreplace({pattern: value})
    return expr


def _diff_a(expr, a):
    terms = sp.MatAdd.make_args(expr)
    out = []
    for t in terms:
        c, m = t.as_coeff_mmul()
        c = sp.sympify(c)
        factors = [f for f in (m.args if isinstance(m, sp.MatMul) else (m,))]
        scal = sp.Mul(*[f for f in factors if not getattr(f, "is_Matrix", False)]) * c
        mats = [f for f in factors if getattr(f, "is_Matrix", False)]
        d = sp.diff(scal, a)
        if d != 0:
            out.append(d.subs(a, 0) * sp.MatMul(*mats) if mats else d.subs(a, 0))
    return sp.MatAdd(*out) if out else sp.ZeroMatrix(*expr.shape)


def _terms(expr):
    """Expanded matrix expression → [(scalar, [matrix factors])]."""
    out = []
    for t in sp.MatAdd.make_args(sp.expand(expr)):
        if isinstance(t, sp.ZeroMatrix):
            continue
        c, m = t.as_coeff_mmul()
        factors = list(m.args) if isinstance(m, sp.MatMul) else [m]
        scalar = sp.Mul(*[f for f in factors if not getattr(f, "is_Matrix", False)]) * c
        out.append((scalar, [f for f in factors if getattr(f, "is_Matrix", False)]))
    return out


def _prod(factors, n):
    return sp.MatMul(*factors).doit() if factors else sp.Identity(n)


def _coefficient(X, theta, expr):
    """M with ⟨theta, expr⟩ = ⟨M, X⟩, for expr linear in X: P X R → Pᵀ θ Rᵀ; P Xᵀ R → R θᵀ P."""
    total = []
    for c, fs in _terms(expr):
        for i, f in enumerate(fs):
            if f == X:
                P, R = _prod(fs[:i], theta.shape[0]), _prod(fs[i + 1:], theta.shape[1])
                total.append(c * P.T * theta * R.T)
            elif f == X.T:
                P, R = _prod(fs[:i], theta.shape[0]), _prod(fs[i + 1:], theta.shape[1])
                total.append(c * R * theta.T * P)
    return sp.MatAdd(*total) if total else sp.ZeroMatrix(*X.shape)


def _adjoint_part(theta_t, g_s, expr):
    """The θ_t-gradient of ⟨g_s, expr⟩ for expr linear in θ_t: P θ R → Pᵀ g Rᵀ."""
    total = []
    for c, fs in _terms(expr):
        for i, f in enumerate(fs):
            if f == theta_t:
                P, R = _prod(fs[:i], g_s.shape[0]), _prod(fs[i + 1:], g_s.shape[1])
                total.append(c * P.T * g_s * R.T)
    return sp.MatAdd(*total) if total else sp.ZeroMatrix(*theta_t.shape)


def _simplify_mat(expr):
    try:
        return sp.simplify(expr.doit())
    except Exception:  # pragma: no cover - SymPy matrix simplification is best effort
        return expr.doit()


def _normalise(raw, lead):
    """Divide by the scalar of the term that involves the first slot (so that term reads +θᵀθ)."""
    terms = _terms(raw)
    if not terms:
        return None, None, None
    c0 = next((c for c, fs in terms if any(f.has(lead) for f in fs)), terms[0][0])
    if c0 == 0:
        return None, None, None
    return _simplify_mat(sp.expand(raw / c0)), sp.nsimplify(c0), None


def _basis(h: int, algebra: str) -> list[sp.ImmutableMatrix]:
    if algebra == "gl":
        return [sp.ImmutableMatrix(h, h, lambda r, c, i=i, j=j: int(r == i and c == j))
                for i, j in itertools.product(range(h), range(h))]
    return [sp.ImmutableMatrix(h, h, lambda r, c, i=i, j=j: int(r == i and c == j) - int(r == j and c == i))
            for i, j in itertools.combinations(range(h), 2)]
