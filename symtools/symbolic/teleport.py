"""What symmetry teleportation needs from a declared one-parameter action, derived with SymPy.

Teleportation moves θ along a group orbit, θ' = ψ(θ, a), to a point of the same loss where something else
(the gradient norm, a curvature) is better. For the elementwise action ψ of a family (its declaration, the
``SPEC`` of the generated module) this module derives:

* **the exponential map** — the group parameter as a function a(t) of a Lie-algebra coordinate t (t = 0 at
  the identity) such that ψ(·, a(t)) is the flow of the generator v for time t. For a one-parameter group,
  ψ(ψ(θ, a), b) = ψ(θ, m(a, b)); differentiating in b at the identity gives v(ψ(θ, a)) = ∂ₐψ(θ, a)·μ(a) with
  μ(a) = ∂_b m(a, b)|_(b=e), so μ = v(ψ)/∂ₐψ must come out free of θ (checked: otherwise the declaration is
  not a one-parameter group and only the local chart a = e + t is offered). Then t(a) = ∫ₑᵃ da'/μ(a'), and
  a(t) is its inverse: a = eᵗ for the rescale and scale actions (μ = a), a = t for translation (μ = 1).
  Gradient ascent runs on t, which is what "on the Lie algebra" means for a one-parameter group;
* **the per-slot Jacobian** J_s = ∂ψ_s/∂θ_s, when each slot's image reads only that slot (a diagonal action).
  Since L(ψ(θ, a)) = L(θ), the gradient at the new point is g' = g / J elementwise (chain rule); optimizer
  state of degree k in g (below) is carried along as state / J^k;
* **the charge after the action** — each slot's charge density at ψ_s(x, a), expanded as Σ_k c_k(a)·x^k, so the
  new charge of a group is predicted from sums over its elements *before* the action; the teleport compares
  this with the charge measured on the moved tensors (which catches an action applied to the wrong elements);
* **the degree of each optimizer state in the gradient** — for every declared optimizer (symbolic/optimizers.py)
  and state kind, the k with state_new(λg, λᵏ·state) = λᵏ·state_new(g, state) at weight decay 0 (momentum
  buffer, Adam's first moment: 1; second moments: 2), or None when the rule has no such homogeneity.

Nothing here imports torch; :mod:`symtools.numeric.teleport` prints these expressions with the codegen printer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import sympy as sp

from symtools.symbolic.action import ElementwiseAction

#: The Lie-algebra coordinate.
T = sp.Symbol("t", real=True)


@dataclass(frozen=True)
class ExponentialMap:
    """a(t): the group parameter along the one-parameter subgroup, a(0) = identity. ``chart`` is
    ``"exponential"`` when derived (μ(a) free of θ) or ``"local"`` (a = e + t) with ``reason``."""

    a_of_t: sp.Expr
    chart: str
    mu: sp.Expr | None
    reason: str = ""


@dataclass(frozen=True)
class TeleportForm:
    """Everything teleportation reads for one family (see the module docstring)."""

    family: str
    action: ElementwiseAction
    exp_map: ExponentialMap
    #: slot → ∂ψ_s/∂θ_s (in the slot symbol and a); None when some slot's image reads another slot
    jacobian: dict[str, sp.Expr] | None
    #: slot → ((power k, coefficient c_k(a)), …) with density_s(ψ_s(x, a)) = Σ c_k(a) x^k; None when some slot's
    #: density at the moved value is not a polynomial in x (or the family has no charge)
    charge_after: dict[str, tuple[tuple[int, sp.Expr], ...]] | None

    @property
    def diagonal(self) -> bool:
        return self.jacobian is not None


def exponential_map(action: ElementwiseAction) -> ExponentialMap:
    """Derive a(t) (module docstring). Falls back to the local chart a = e + t, saying why."""
    a, e = action.parameter, action.identity
    sym = {s: action.symbol(s) for s in action.slots}
    at_image = {sym[s]: img for s, img in action.images.items()}
    mus = []
    for img in action.images.values():
        v = sp.diff(img, a).subs(a, e)
        da = sp.diff(img, a)
        if sp.simplify(da) == 0:
            continue
        mus.append(sp.simplify(sp.together(v.xreplace(at_image) / da)))
    local = lambda why: ExponentialMap(e + T, "local", None, why)
    if not mus:
        return local("no slot moves with the parameter")
    mu = mus[0]
    if mu.free_symbols - {a}:
        return local(f"μ(a) = v(ψ)/∂ψ/∂a = {sp.sstr(mu)} depends on θ: the declaration is not a one-parameter group")
    if any(sp.simplify(m - mu) != 0 for m in mus[1:]):
        return local("μ(a) differs between slots: the declaration is not a one-parameter group")
    s_ = sp.Dummy("s", positive=bool(a.is_positive))
    t_of_a = sp.integrate(1 / mu.subs(a, s_), (s_, e, a))
    if t_of_a.has(sp.Integral):
        return local(f"∫ da/μ(a) with μ = {sp.sstr(mu)} has no closed form")
    try:
        sols = sp.solve(sp.Eq(T, t_of_a), a)
    except (NotImplementedError, ValueError):
        sols = []
    good = [sp.simplify(x) for x in sols if sp.simplify(x.subs(T, 0) - e) == 0]
    if len(good) != 1:
        return local(f"t(a) = {sp.sstr(t_of_a)} has no unique inverse with a(0) = {sp.sstr(e)}")
    return ExponentialMap(good[0], "exponential", mu)


def jacobian(action: ElementwiseAction) -> dict[str, sp.Expr] | None:
    """slot → ∂ψ_s/∂θ_s, or None when some image reads another slot (the Jacobian is then not diagonal)."""
    out = {}
    for s, img in action.images.items():
        others = {action.symbol(o) for o in action.slots if o != s}
        if img.free_symbols & others:
            return None
        out[s] = sp.simplify(sp.diff(img, action.symbol(s)))
    return out


def charge_after(action: ElementwiseAction, density: dict[str, sp.Expr] | None
                 ) -> dict[str, tuple[tuple[int, sp.Expr], ...]] | None:
    """slot → ((k, c_k(a)), …) with density_s(ψ_s(x, a)) = Σ_k c_k(a)·x^k (module docstring), or None."""
    if density is None or jacobian(action) is None:
        return None
    out = {}
    for s, img in action.images.items():
        x = action.symbol(s)
        moved = sp.expand(sp.sympify(density.get(s, 0)).xreplace({x: img}))
        try:
            poly = sp.Poly(moved, x)
        except sp.PolynomialError:
            return None
        if any(c.free_symbols - {action.parameter} for c in poly.coeffs()):
            return None
        out[s] = tuple((int(k[0]), sp.simplify(c)) for k, c in poly.terms())
    return out


def teleport_form(family: str, spec: str, parameter: str, charge_text: dict[str, str] | None) -> TeleportForm:
    """The :class:`TeleportForm` of a family from its declaration and charge density (as text)."""
    return _teleport_form(family, spec, parameter, tuple(sorted((charge_text or {}).items())), charge_text is None)


@cache
def _teleport_form(family, spec, parameter, charge_items, no_charge) -> TeleportForm:
    action = ElementwiseAction.from_spec(spec, parameter=parameter, name=family)
    density = None
    if not no_charge:
        symbols = {s: action.symbol(s) for s in action.slots}
        density = {s: sp.sympify(text, locals=symbols) for s, text in charge_items}
    return TeleportForm(family, action, exponential_map(action), jacobian(action), charge_after(action, density))


@cache
def state_degrees(optimizer: str) -> dict[str, int | None]:
    """State kind → its degree k in the gradient under the declared rule of ``optimizer`` at weight decay 0
    (module docstring); None where no k ∈ {1, 2} makes the rule homogeneous."""
    from symtools.symbolic.optimizers import DECLARATIONS, GRAD, LAMBDA, STATE_SYMBOLS

    decl = DECLARATIONS[optimizer]
    lam = sp.Symbol("scale", positive=True)
    out: dict[str, int | None] = {}
    for kind in decl.state:
        found = None
        for k in (1, 2):
            ok = True
            for rule in (decl.first, decl.rule):
                if kind not in rule.state:
                    continue
                expr = rule.state[kind].xreplace({LAMBDA: 0})
                rep = {GRAD: lam * GRAD, **{STATE_SYMBOLS[q][0]: lam ** k * STATE_SYMBOLS[q][0]
                                            for q in decl.state if q == kind}}
                if sp.simplify(expr.xreplace(rep) - lam ** k * expr) != 0:
                    ok = False
                    break
            if ok:
                found = k
                break
        out[kind] = found
    return out
