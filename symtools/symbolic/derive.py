"""What a one-parameter symmetry implies: generator, identities, Theorem 1 and the Noether charge.

Notation (one element of every slot; a network quantity sums over slots and elements):
  v_s  = ∂ψ_s/∂a at a = e                      (the generator)
  w_s  = ∂²ψ_s/∂a² at a = e
  K[s][t] = ∂v_t/∂θ_s                           (so (K g)_s = Σ_t K[s][t] g_t)
From L(ψ(θ, a)) = L(θ) for all a:
  d/da at e:            ⟨g, v⟩ = 0                              (gradient identity)
  ∂θ then d/da at e:    H v + K g = 0                           (Hessian identity)
  d²/da² at e:          vᵀHv + ⟨g, w⟩ = 0                       (second-order identity)
Gradient flow θ' = −g conserves Q whenever ∇Q = c·v (then Q' = −c⟨v, g⟩ = 0); such Q exists iff the
Jacobian of v is symmetric (curl-free), and is found by integrating v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.forms import VHV, GradientForm, Inner, grad_symbol, hv_symbol


@dataclass
class Theorem1:
    """The paper's Theorem 1: if ⟨θ, Dv·g⟩ = 0 then ⟨θ, v⟩ is conserved under gradient flow."""

    condition: GradientForm          # ⟨θ, Dv g⟩ written as Σ_t ⟨g_t, Σ_s θ_s ∂v_s/∂θ_t⟩
    holds: bool                      # reduces to a multiple of the gradient identity
    multiple: sp.Expr | None         # λ with condition = λ·⟨g, v⟩
    quantity: sp.Expr                # Σ_s Inner(θ_s, v_s)
    trivial: bool                    # ⟨θ, v⟩ ≡ 0 (conserved, but says nothing)


@dataclass
class Charge:
    """Noether charge Q = Σ_slots Σ_elements density_s, with ∇Q = factor · v; or why none exists."""

    density: dict[str, sp.Expr] | None
    factor: sp.Expr | None
    reason: str | None
    proof: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.density is not None

    def pointwise(self) -> sp.Expr:
        return sp.Add(*self.density.values()) if self.density else sp.Integer(0)


@dataclass
class Derivation:
    action: ElementwiseAction
    generator: dict[str, sp.Expr]
    generator_second: dict[str, sp.Expr]
    coupling: dict[str, dict[str, sp.Expr]]
    gradient_identity: GradientForm
    hessian_identity: dict[str, sp.Expr]
    second_order_identity: sp.Expr
    theorem1: Theorem1
    charge: Charge

    @property
    def slots(self) -> tuple[str, ...]:
        return self.action.slots

    def hessian_coupling(self, slot: str) -> sp.Expr:
        """(K g)_slot as an elementwise expression in slot symbols and gradient symbols."""
        return sp.Add(*[k * grad_symbol(t) for t, k in self.coupling[slot].items()])


def derive(action: ElementwiseAction) -> Derivation:
    """Derive everything the symmetry implies (see the module docstring for the math)."""
    a, e = action.parameter, action.identity
    sym = {s: action.symbol(s) for s in action.slots}
    v = {s: sp.simplify(sp.diff(img, a).subs(a, e)) for s, img in action.images.items()}
    if all(x == 0 for x in v.values()):
        from symtools.errors import SpecError

        raise SpecError(f"the generator ∂ψ/∂{a} at {a} = {sp.sstr(e)} is identically zero; "
                        f"the declaration does not move θ to first order (reparameterise)")
    w = {s: sp.simplify(sp.diff(img, a, 2).subs(a, e)) for s, img in action.images.items()}
    coupling = {s: {t: sp.simplify(sp.diff(v[t], sym[s])) for t in action.slots} for s in action.slots}
    coupling = {s: {t: k for t, k in row.items() if k != 0} for s, row in coupling.items()}
    grad_id = GradientForm(dict(v))
    hess = {s: hv_symbol(s) + sp.Add(*[k * grad_symbol(t) for t, k in coupling[s].items()]) for s in action.slots}
    second = VHV + GradientForm(dict(w)).expr()
    thm = _theorem1(action, v, coupling, grad_id)
    charge = _charge(action, v, grad_id)
    return Derivation(action, v, w, coupling, grad_id, hess, second, thm, charge)


def _theorem1(action, v, coupling, grad_id) -> Theorem1:
    sym = {s: action.symbol(s) for s in action.slots}
    # ⟨θ, Dv g⟩ = Σ_s θ_s Σ_t ∂v_s/∂θ_t g_t = Σ_t g_t Σ_s θ_s K[t][s]
    cond = GradientForm({t: sp.simplify(sp.Add(*[sym[s] * coupling[t].get(s, 0) for s in action.slots]))
                         for t in action.slots})
    holds, lam = cond.reduce_modulo(grad_id)
    quantity = sp.Add(*[k * Inner(sym[s], rest) for s in action.slots
                        for k, rest in [sp.simplify(v[s]).as_coeff_Mul()] if v[s] != 0])
    trivial = sp.simplify(sp.Add(*[sym[s] * v[s] for s in action.slots])) == 0
    return Theorem1(cond, holds, lam, quantity, trivial)


def _charge(action, v, grad_id) -> Charge:
    slots = action.slots
    sym = {s: action.symbol(s) for s in slots}
    for i, s in enumerate(slots):
        for t in slots[i + 1:]:
            d_st, d_ts = sp.diff(v[s], sym[t]), sp.diff(v[t], sym[s])
            if sp.simplify(d_st - d_ts) != 0:
                return Charge(None, None, (
                    f"the generator's Jacobian is not symmetric: ∂v_{s}/∂{t} = {sp.sstr(sp.simplify(d_st))} but "
                    f"∂v_{t}/∂{s} = {sp.sstr(sp.simplify(d_ts))} (curl ≠ 0), so no Q with ∇Q = c·v exists; "
                    + ("Theorem 1's ⟨θ, v⟩ is identically 0 here, which conserves nothing"
                       if sp.simplify(sum(sym[x] * v[x] for x in slots)) == 0 else
                       "gradient flow conserves no quantity of this kind")))
    q = sp.Integer(0)
    for s in slots:
        rest = sp.simplify(v[s] - sp.diff(q, sym[s]))
        if rest == 0:
            continue
        part = sp.integrate(rest, sym[s])
        if part.has(sp.Integral):
            return Charge(None, None, f"could not integrate the generator component v_{s} = {sp.sstr(v[s])} in closed form")
        q += part
    q = sp.simplify(q)
    content, primitive = q.as_content_primitive()
    q = sp.expand(primitive) if primitive.is_polynomial(*sym.values()) else primitive
    factor = sp.nsimplify(1 / content)  # ∇q_normalised = v / content
    for s in slots:  # ∇Q = factor · v, checked symbolically
        assert sp.simplify(sp.diff(q, sym[s]) - factor * v[s]) == 0, "potential does not integrate the generator"
    density = _split_by_slot(q, slots, sym)
    flow = GradientForm({s: -sp.diff(q, sym[s]) for s in slots})  # dQ/dt = ⟨∇Q, θ'⟩ = −⟨∇Q, g⟩
    ok, lam = flow.reduce_modulo(grad_id)
    assert ok, "dQ/dt does not reduce modulo the gradient identity"
    proof = [
        f"curl test: ∂v_s/∂θ_t = ∂v_t/∂θ_s for all slot pairs, so v is a gradient field",
        f"Q = Σ {sp.sstr(q)} with ∇Q = {sp.sstr(factor)}·v",
        f"dQ/dt = −⟨∇Q, g⟩ = {sp.sstr(flow.expr())} = {sp.sstr(lam)}·({sp.sstr(grad_id.expr())}) = 0",
    ]
    return Charge(density, factor, None, proof)


def _split_by_slot(q: sp.Expr, slots, sym) -> dict[str, sp.Expr]:
    """Assign each additive term of q to the first slot (in declaration order) it involves."""
    density = {s: sp.Integer(0) for s in slots}
    for term in sp.Add.make_args(q):
        owner = next((s for s in slots if term.has(sym[s])), None)
        if owner is not None:  # constants carry no information: Q is defined up to one
            density[owner] += term
    return density
