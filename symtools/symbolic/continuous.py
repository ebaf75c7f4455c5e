"""The paper's continuous theory of how optimizers break a charge, derived by the engine.

Two continuous models of torch.optim.SGD (Kunin et al., ICLR 2021, §5–6 and appendices C–H):

* **modified loss with weight decay** (no momentum), eq. (27):
  dθ/dt = −∇L̃ = −(1 + ηλ/2) g − (λ + ηλ²/2) θ − (η/2)(H g + λ H θ).
  Projected on ∇Q = c·v and reduced with the engine's identities — gradient identity ⟨g, v⟩ = 0, Hessian
  identity H v = −K g (so ⟨∇Q, H g⟩ = c⟨H v, g⟩ = −c⟨K g, g⟩), Theorem 1's condition ⟨θ, K g⟩ ∝ ⟨g, v⟩ = 0,
  Euler's ⟨θ, ∇Q⟩ = d·Q for a charge homogeneous of degree d — it gives, exactly within the model,
      dQ/dt = −d(λ + ηλ²/2)·Q + η·F,   F = (c/2)⟨g, K g⟩  (= ½ gᵀ∇²Q g, the SGD law's measured G).
  The paper drops the O(ηλ²) rate (λ is as small as η); so do we, and say so: rate d·λ. Solved by
  ``sympy.dsolve``: Q(t) = e^{−dλt} Q(0) + η ∫₀ᵗ e^{−dλ(t−s)} F(s) ds — eqs. (18)–(20).
* **modified flow with momentum** (heavy ball; time step h = η(1 − τ), τ the dampening), derived here from the
  update rule by eliminating the buffer and Taylor-expanding θ(t ± h):
      (h/2)(1 + μ) θ̈ + (1 − μ) θ̇ + λ θ = −g        (appendix G, β ≡ μ, α ≡ τ).
  Projected on ∇Q: Q̈ + 2γ Q̇ + ω² Q = f with γ = (1 − μ)/(h(1 + μ)), ω² = 2dλ/(h(1 + μ)) and
  f = θ̇ᵀ∇²Q θ̇ (= 2|θ̇_A|² for scale) — eqs. (33)–(38); solved in the three damping regimes by ``dsolve``.

For codegen, :func:`continuous_step` turns either model into a one-step update of per-group tensors with the
learning rate and weight decay of that step (they may follow a schedule): a Riemann sum of the paper's integrals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from symtools.symbolic.derive import Derivation
from symtools.symbolic.forms import GradientForm, grad_symbol, hv_symbol
from symtools.symbolic.laws import (LawError, Term, _charge, _element_symbols, _reduces, _slot_symbols, _split,
                                    _taylor_terms, charge_degrees, fit, quantity, show)
from symtools.symbolic.optimizers import BUF, ETA, GRAD, LAMBDA, TAU, THETA, optimizer

T = sp.Symbol("t", nonnegative=True)          # continuous time
S = sp.Symbol("s", nonnegative=True)          # integration variable (the paper's τ; τ is the dampening here)
H = sp.Symbol("h", positive=True)             # time step of the momentum model, h = η(1 − τ)
GAMMA = sp.Symbol("gamma", positive=True)     # damping rate
OMEGA = sp.Symbol("omega", positive=True)     # natural frequency
KAPPA = sp.Symbol("kappa", positive=True)     # |γ² − ω²|^{1/2}
X0 = sp.Symbol("x_0", real=True)
V0 = sp.Symbol("v_0", real=True)
REGIMES = ("overdamped", "critical", "underdamped")   # γ > ω, γ = ω, γ < ω


def _dt_symbol(slot: str, order: int) -> sp.Symbol:
    return sp.Symbol(("d" * order) + "t_" + slot, real=True)  # dt_x = dθ_x/dt, ddt_x = d²θ_x/dt²


def displacement_symbol(slot: str) -> sp.Symbol:
    """d_<slot>: the change θ_{n+1} − θ_n of slot ``slot`` over one step (measured after the step)."""
    return sp.Symbol("d_" + slot, real=True)


# ---------------------------------------------------------------------------------------------------------
# integrals over [0, t]
# ---------------------------------------------------------------------------------------------------------


def definite(expr: sp.Expr, t: sp.Symbol = T, s: sp.Symbol = S) -> sp.Expr:
    """Each indefinite ∫ f(t) dt in ``expr`` → ∫₀ᵗ f(s) ds (the antiderivative that vanishes at 0)."""
    return expr.replace(lambda e: isinstance(e, sp.Integral) and len(e.limits[0]) == 1 and e.limits[0][0] == t,
                        lambda e: sp.Integral(e.function.subs(t, s), (s, 0, t)))


def merge_integrals(expr: sp.Expr, t: sp.Symbol = T, s: sp.Symbol = S) -> tuple[sp.Expr, sp.Expr]:
    """``expr`` = rest + ∫₀ᵗ integrand ds: factors free of s moved inside, integrals over [0, t] added up."""
    rest, integrand = sp.Integer(0), sp.Integer(0)
    for term in sp.Add.make_args(sp.expand(expr)):
        ints = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Integral)]
        if not ints:
            rest += term
            continue
        if len(ints) != 1 or ints[0].limits[0][1:] != (0, t):
            raise ValueError(f"cannot merge {term}")
        var = ints[0].limits[0][0]
        factor = sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not ints[0]])
        integrand += factor * ints[0].function.subs(var, s)
    return rest, integrand


def same_solution(a: sp.Expr, b: sp.Expr) -> tuple[bool, str]:
    """Are two expressions of the form rest + ∫₀ᵗ (…) ds equal (rests and integrands simplify to the same)?"""
    ra, ia = merge_integrals(a)
    rb, ib = merge_integrals(b)
    d_rest = sp.simplify((ra - rb).rewrite(sp.exp))
    d_int = sp.simplify(sp.expand((ia - ib).rewrite(sp.exp)))
    if d_rest == 0 and d_int == 0:
        return True, "the parts outside the integral and the integrands simplify to the same"
    return False, f"outside the integral they differ by {show(d_rest)}; integrands by {show(d_int)}"


# ---------------------------------------------------------------------------------------------------------
# modified loss with weight decay → first-order law (eqs. 18–21, 27–30)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FirstOrderLaw:
    """dQ/dt = −rate·Q + η·F (paper order); ``rate_exact`` keeps the O(ηλ²) part the paper drops.

    ``forcing`` is F as a per-slot density in g (None when it vanishes, e.g. translation).
    """

    derivation: Derivation
    degree: int
    rate: sp.Expr
    rate_exact: sp.Expr
    forcing: Term | None
    proof: list[str] = field(default_factory=list)

    def ode(self, exact: bool = False) -> sp.Eq:
        q = sp.Function("Q")(T)
        f = sp.Function(self.forcing.name)(T) if self.forcing else sp.Integer(0)
        return sp.Eq(q.diff(T), -(self.rate_exact if exact else self.rate) * q + ETA * f)

    def solution(self, q0: sp.Expr = sp.Symbol("Q_0", real=True)) -> sp.Expr:
        """Q(t) with Q(0) = q0, from ``sympy.dsolve`` (integrals written over [0, t] in the variable s)."""
        q = sp.Function("Q")(T)
        eq = self.ode()
        sol = sp.dsolve(eq, q, hint="1st_linear").rhs
        sol = definite(sol)
        (c1,) = [x for x in sol.free_symbols if x.name == "C1"]
        c = sp.solve(sp.Eq(sol.subs(T, 0).doit(), q0), c1)[0]
        return sol.subs(c1, c)


def modified_loss_law(d: Derivation) -> FirstOrderLaw:
    """Project eq. (27) on ∇Q and reduce it with the engine's identities (module docstring)."""
    parts = charge_degrees(d)
    if len(parts) != 1:
        raise LawError("the continuous law needs a charge homogeneous in θ (Euler: ⟨θ, ∇Q⟩ = d·Q); "
                       f"this one has degrees {sorted(parts)}")
    deg = next(iter(parts))
    q = _charge(d)
    c = d.charge.factor
    slots = _slot_symbols(d)
    v, g = d.generator, {s: grad_symbol(s) for s in d.slots}
    element = _element_symbols(d)
    proof = []
    # (1 + ηλ/2)⟨∇Q, g⟩ = (1 + ηλ/2)·c·⟨v, g⟩
    ok, lam = _reduces(GradientForm({s: sp.diff(q, x) for s, x in slots.items()}), d.gradient_identity, element)
    if not ok:
        raise LawError("⟨∇Q, g⟩ does not reduce modulo the gradient identity")
    proof.append(f"(1 + ηλ/2)⟨∇Q, g⟩ = (1 + ηλ/2)·{show(lam)}·⟨g, v⟩ = 0 (gradient identity)")
    # (λ + ηλ²/2)⟨∇Q, θ⟩ = (λ + ηλ²/2)·d·Q
    euler = sp.simplify(sp.Add(*[x * sp.diff(q, x) for x in slots.values()]) - deg * q)
    assert euler == 0
    proof.append(f"(λ + ηλ²/2)⟨∇Q, θ⟩ = (λ + ηλ²/2)·{deg}·Q (Euler: q is homogeneous of degree {deg})")
    # ⟨∇Q, H w⟩ = c⟨H v, w⟩ (H symmetric) and H v = −K g (Hessian identity)
    hv = {s: sp.solve(d.hessian_identity[s], hv_symbol(s))[0] for s in d.slots}
    kg = {s: d.hessian_coupling(s) for s in d.slots}
    assert all(sp.simplify(hv[s] + kg[s]) == 0 for s in d.slots)
    forcing_pointwise = sp.expand(sp.Rational(1, 2) * c * sp.Add(*[g[s] * kg[s] for s in d.slots]))
    proof.append(f"(η/2)⟨∇Q, H g⟩ = (η/2)·c·⟨H v, g⟩ = −(η/2)·c·⟨K g, g⟩ (Hessian identity), c = {show(c)}")
    # (ηλ/2)⟨∇Q, H θ⟩ = −(ηλ/2)·c·⟨K g, θ⟩: Theorem 1's condition
    cond = GradientForm({t: sp.expand(sp.Add(*[slots[s] * d.coupling[s].get(t, 0) for s in d.slots]))
                         for t in d.slots})
    ok, lam = _reduces(cond, d.gradient_identity, element)
    if not ok:
        raise LawError("⟨θ, K g⟩ (Theorem 1's condition) does not reduce modulo the gradient identity; the "
                       "modified-loss law would keep a measured ⟨θ, K g⟩ term")
    proof.append(f"(ηλ/2)⟨∇Q, H θ⟩ = −(ηλ/2)·c·⟨K g, θ⟩ = −(ηλ/2)·c·{show(lam)}·⟨g, v⟩ = 0 (Theorem 1)")
    rate_exact = sp.factor(deg * (LAMBDA + ETA * LAMBDA**2 / 2))
    rate = deg * LAMBDA
    forcing = None
    if forcing_pointwise != 0:
        # F = (c/2)⟨g, K g⟩ equals ½ gᵀ∇²q g, the second Taylor term the SGD law measures as G
        second = _taylor_terms(q, slots, g).get(2, sp.Integer(0))
        same = sp.simplify(forcing_pointwise - second) == 0
        forcing = Term("G" if same else "F", _split(forcing_pointwise, d),
                       "(c/2)⟨g, K g⟩ = ½ gᵀ∇²Q g" + (" (the SGD law's G)" if same else ""))
        proof.append(f"F = (c/2)⟨g, K g⟩ = {show(forcing_pointwise)}"
                     + (" = ½ gᵀ∇²q g, the SGD law's measured G" if same else ""))
    proof.append(f"dQ/dt = −{show(rate_exact)}·Q + η·F exactly within eq. (27); dropping the O(ηλ²) part of "
                 f"the rate (as the paper does): dQ/dt = −{show(rate)}·Q + η·F")
    return FirstOrderLaw(d, deg, rate, rate_exact, forcing, proof)


def stationary_angular_speed(d: Derivation) -> dict[str, sp.Expr]:
    """Angular speed |dθ/dt|/|θ| at the stationary state of a charge Q = |θ_A|² (scale-type).

    Returns ``continuous``: from dQ/dt = 0 in the paper-order law with |dθ/dt| ≈ |g| (the paper's √(2λ/η));
    ``discrete``: the exact SGD law at its fixed point (M1 = 0), measuring |θ' − θ|/(η|θ|) per unit time
    t = nη — which comes out as √(2λ/η) with no approximation.
    """
    from symtools.symbolic.laws import sgd_law

    q = _charge(d)
    slots = _slot_symbols(d)
    g = {s: grad_symbol(s) for s in d.slots}
    if sp.simplify(q - sp.Add(*[x**2 for x in slots.values()])) != 0:
        raise LawError(f"the angular speed is defined for a charge |θ_A|²; this one is {show(q)}")
    cont = modified_loss_law(d)
    qs, gs = sp.symbols("Q_s G_s", positive=True)     # |θ|², |g|² at the stationary state
    g_over_q = sp.solve(sp.Eq(-cont.rate * qs + ETA * gs, 0), gs)[0] / qs
    lw = sgd_law(d)
    a, b = lw.matrix()
    fixed = sp.solve(sp.Eq(qs, (a[0, 0] * qs + b[0, lw.measured_names.index("G")] * gs)), gs)[0] / qs
    # |θ' − θ|² = η²|g + λθ|², written in the law's per-group sums by fitting q(g + λθ) in {G, M1, Q}
    step = {s: g[s] + LAMBDA * x for s, x in slots.items()}
    basis = {t.name: t.pointwise() for t in lw.state + lw.measured}
    coeffs = fit(sp.expand(q.xreplace({x: step[s] for s, x in slots.items()})), basis, _element_symbols(d))
    speed2 = (coeffs["G"] * gs + coeffs["Q"] * qs) / qs   # M1 = 0 at the fixed point (gradient identity)
    return {"continuous": sp.sqrt(sp.simplify(g_over_q)),
            "continuous_g_over_theta": sp.simplify(g_over_q),
            "discrete_g_over_theta": sp.factor(sp.simplify(fixed)),
            "discrete": sp.sqrt(sp.simplify(speed2.subs(gs, fixed * qs)))}


# ---------------------------------------------------------------------------------------------------------
# momentum: the modified flow and the oscillators (eqs. 33–38, appendices C, D.2, G, H)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModifiedFlow:
    """mass·θ̈ + friction·θ̇ + spring·θ = −force·g, the modified flow of heavy-ball momentum (time step h)."""

    mass: sp.Expr
    friction: sp.Expr
    spring: sp.Expr
    force: sp.Expr
    recurrence: sp.Expr            # θ_{n+1} − θ_n − μ(θ_n − θ_{n−1}) + h(g + λθ_n) = 0 (the discrete form)
    proof: list[str]


def momentum_modified_flow() -> ModifiedFlow:
    """Eliminate the buffer from torch's heavy-ball rule and Taylor-expand θ_{n±1} = θ(t ± h), h = η(1 − τ)."""
    _, rule = optimizer("momentum")
    th_prev, th, th_next = sp.symbols("theta_prev theta_n theta_next", real=True)
    new_b = rule.state["b"]
    assert sp.simplify(rule.theta - (THETA - ETA * new_b)) == 0, "heavy ball: θ' = θ − η·b'"
    b_n = (th_prev - th) / ETA   # the previous step was θ_n = θ_{n−1} − η·b_n
    residual = th_next - rule.theta.xreplace({THETA: th, BUF: b_n})
    residual = sp.expand(sp.cancel(residual.subs(ETA, H / (1 - TAU))))
    x, x1, x2 = sp.symbols("X X1 X2", real=True)   # θ(t), θ̇(t), θ̈(t)
    taylor = {th_next: x + H * x1 + H**2 / 2 * x2, th_prev: x - H * x1 + H**2 / 2 * x2, th: x}
    ode = sp.expand(residual.xreplace(taylor) / H)
    mass, friction = sp.cancel(ode.coeff(x2)), sp.cancel(ode.coeff(x1))
    spring, force = sp.cancel(ode.coeff(x)), sp.cancel(ode.coeff(GRAD))
    assert sp.expand(ode - mass * x2 - friction * x1 - spring * x - force * GRAD) == 0
    proof = ["heavy ball: θ_{n+1} = θ_n − η·b_{n+1}, so b_n = (θ_{n−1} − θ_n)/η",
             f"substituting: {show(sp.factor(residual))} = 0 with h = η(1 − τ)",
             f"θ_{{n±1}} = θ ± hθ̇ + (h²/2)θ̈ + O(h³), divided by h: ({show(sp.factor(mass))})·θ̈ + "
             f"({show(sp.factor(friction))})·θ̇ + ({show(spring)})·θ = −({show(force)})·g + O(h²)"]
    return ModifiedFlow(sp.factor(mass), sp.factor(friction), spring, force, residual, proof)


@dataclass
class OscillatorLaw:
    """Q̈ + 2γ Q̇ + ω² Q = f under the momentum modified flow; f = forcing_coefficient·K2 with K2 the per-group
    sum of ``forcing`` (a density in the velocities dt_s), None when there is no driving force."""

    derivation: Derivation
    degree: int
    gamma: sp.Expr
    omega2: sp.Expr
    forcing_coefficient: sp.Expr
    forcing: Term | None
    flow: ModifiedFlow
    proof: list[str]

    def ode(self) -> sp.Eq:
        q = sp.Function("Q")(T)
        f = sp.Function("f")(T) if self.forcing else sp.Integer(0)
        return sp.Eq(q.diff(T, 2) + 2 * self.gamma * q.diff(T) + self.omega2 * q, f)


def momentum_flow_law(d: Derivation) -> OscillatorLaw:
    """Project the modified flow on ∇Q (derived by fitting, see the module docstring)."""
    parts = charge_degrees(d)
    if len(parts) != 1 or next(iter(parts)) > 2:
        raise LawError("the momentum oscillator is derived for homogeneous charges of degree 1 or 2")
    deg = next(iter(parts))
    q = _charge(d)
    flow = momentum_modified_flow()
    slots = _slot_symbols(d)
    g = {s: grad_symbol(s) for s in d.slots}
    v1 = {s: _dt_symbol(s, 1) for s in d.slots}
    v2 = {s: _dt_symbol(s, 2) for s in d.slots}
    dq = {s: sp.diff(q, x) for s, x in slots.items()}
    projected = sp.expand(sp.Add(*[dq[s] * (flow.mass * v2[s] + flow.friction * v1[s] + flow.spring * slots[s]
                                            + flow.force * g[s]) for s in d.slots]))
    q_dot = sp.Add(*[dq[s] * v1[s] for s in d.slots])
    q_ddot = sp.expand(sp.Add(*[dq[s] * v2[s] for s in d.slots])
                       + sp.Add(*[v1[s] * v1[t] * sp.diff(q, slots[s], slots[t]) for s in d.slots for t in d.slots]))
    k2 = _taylor_terms(q, slots, v1).get(2, sp.Integer(0))   # ½ θ̇ᵀ∇²q θ̇
    m1 = sp.Add(*[g[s] * d.generator[s] for s in d.slots])
    basis = {"Qdd": q_ddot, "Qd": q_dot, "Q": q, "M1": m1}
    if k2 != 0:
        basis["K2"] = k2
    variables = set(slots.values()) | set(g.values()) | set(v1.values()) | set(v2.values())
    coeffs = fit(projected, basis, variables)
    if coeffs is None:
        raise LawError("the projected modified flow is not a combination of Q̈, Q̇, Q, ⟨g, v⟩ and ½θ̇ᵀ∇²Qθ̇")
    mass = coeffs["Qdd"]
    gamma = sp.factor(coeffs["Qd"] / (2 * mass))
    omega2 = sp.factor(coeffs["Q"] / mass)
    fcoef = sp.factor(-coeffs.get("K2", 0) / mass)
    forcing = None
    if k2 != 0:
        forcing = Term("K2", _split(k2, d, ("dt_",)), "½ θ̇ᵀ∇²Q θ̇ (= q(θ̇) for a quadratic charge)")
    proof = flow.proof + [
        f"projected on ∇Q: ({show(sp.factor(mass))})·Q̈ + ({show(sp.factor(coeffs['Qd']))})·Q̇ + "
        f"({show(coeffs['Q'])})·Q + ({show(coeffs['M1'])})·⟨g, v⟩"
        + (f" − ({show(sp.factor(-coeffs['K2']))})·K2" if k2 != 0 else "") + " = 0 (fit; Q̈ = ⟨∇Q, θ̈⟩ + θ̇ᵀ∇²Qθ̇)",
        "⟨g, v⟩ = 0 (gradient identity; the noise is projected out too, appendix F)",
        f"γ = {show(gamma)}, ω² = {show(omega2)}" + (f", f = {show(fcoef)}·K2" if k2 != 0 else ", f = 0")]
    return OscillatorLaw(d, deg, gamma, omega2, fcoef, forcing, flow, proof)


def _regime_omega(regime: str) -> sp.Expr:
    return {"overdamped": sp.sqrt(GAMMA**2 - KAPPA**2), "critical": GAMMA,
            "underdamped": sp.sqrt(GAMMA**2 + KAPPA**2)}[regime]


def _kappa_of(regime: str) -> sp.Expr:
    return {"overdamped": sp.sqrt(GAMMA**2 - OMEGA**2), "critical": sp.Integer(0),
            "underdamped": sp.sqrt(OMEGA**2 - GAMMA**2)}[regime]


def _to_omega(expr: sp.Expr, regime: str) -> sp.Expr:
    """Write a regime's result in γ and ω (κ = √|γ² − ω²|)."""
    return expr.subs(KAPPA, _kappa_of(regime)) if regime != "critical" else expr


def oscillator_homogeneous(regime: str, x0: sp.Expr = X0, v0: sp.Expr = sp.Integer(0)) -> sp.Expr:
    """x(t) solving ẍ + 2γẋ + ω²x = 0 with x(0) = x0, ẋ(0) = v0 (``dsolve``; the paper's ẋ(0) = 0 by default)."""
    x = sp.Function("x")
    w2 = _regime_omega(regime) ** 2
    sol = sp.dsolve(x(T).diff(T, 2) + 2 * GAMMA * x(T).diff(T) + w2 * x(T), x(T),
                    ics={x(0): x0, x(T).diff(T).subs(T, 0): v0}).rhs
    return _to_omega(sol, regime)


def green_function(regime: str) -> sp.Expr:
    """G(t) for t ≥ 0: the homogeneous solution with G(0) = 0, Ġ(0) = 1 (the response to a unit impulse)."""
    return oscillator_homogeneous(regime, sp.Integer(0), sp.Integer(1))


def oscillator_driven(regime: str, x0: sp.Expr = X0, forcing: sp.Function | None = None) -> sp.Expr:
    """x(t) solving ẍ + 2γẋ + ω²x = f(t) with x(0) = x0, ẋ(0) = 0, by variation of parameters (``dsolve``)."""
    x = sp.Function("x")
    f = forcing or sp.Function("f")
    w2 = _regime_omega(regime) ** 2
    sol = sp.dsolve(x(T).diff(T, 2) + 2 * GAMMA * x(T).diff(T) + w2 * x(T) - f(T), x(T),
                    hint="nth_linear_constant_coeff_variation_of_parameters_Integral").rhs
    sol = definite(sol)
    consts = sorted((c for c in sol.free_symbols if c.name in ("C1", "C2")), key=lambda c: c.name)
    eqs = [sp.Eq(sol.subs(T, 0).doit(), x0), sp.Eq(sol.diff(T).subs(T, 0).doit(), 0)]
    cs = sp.solve(eqs, consts, dict=True)[0]
    return _to_omega(sol.subs(cs), regime)


def regime_conditions(law: OscillatorLaw) -> dict[str, sp.Expr]:
    """The damping regimes of ``law`` as conditions on the hyper-parameters (γ vs ω)."""
    disc = sp.factor(law.gamma**2 - law.omega2)
    return {"overdamped": disc > 0, "critical": sp.Eq(disc, 0), "underdamped": disc < 0, "gamma2_minus_omega2": disc}


# The propagator in all regimes at once: with z = (γ² − ω²)t², cosh(√z) and sinh(√z)/√z are entire in z
# (cos/sin of √−z for z < 0, 1 at z = 0), which is what the emitted code evaluates.
Z = sp.Symbol("z", real=True)
CH = sp.Piecewise((sp.cosh(sp.sqrt(Z)), Z > 0), (sp.cos(sp.sqrt(-Z)), True))
SH = sp.Piecewise((sp.sinh(sp.sqrt(Z)) / sp.sqrt(Z), Z > 0), (sp.sin(sp.sqrt(-Z)) / sp.sqrt(-Z), Z < 0), (1, True))


def propagator_parts(dt: sp.Expr = T, gamma: sp.Expr = GAMMA,
                     omega2: sp.Expr = OMEGA**2) -> tuple[list[tuple[sp.Symbol, sp.Expr]], sp.Matrix]:
    """Φ(dt) with (x, ẋ)(t + dt) = Φ(dt)·(x, ẋ)(t) for ẍ + 2γẋ + ω²x = 0, valid in every regime, as
    (auxiliary assignments in order, Φ in the auxiliary symbols).

    Φ = e^{−γdt}·[[CH + γdt·SH, dt·SH], [−ω²dt·SH, CH − γdt·SH]] with CH, SH at z = (γ² − ω²)dt²: read off the
    ``dsolve`` solution with general initial data; :func:`check_propagator` confirms it in each regime.
    """
    gdt, wdt2, z, ch, sh, decay = sp.symbols("gamma_dt omega2_dt2 z ch sh decay", real=True)
    aux = [(gdt, sp.factor(sp.cancel(gamma * dt))),        # γ·dt and ω²·dt² are dimensionless
           (wdt2, sp.factor(sp.cancel(omega2 * dt**2))),
           (z, gdt**2 - wdt2),
           (ch, CH.subs(Z, z)),
           (sh, SH.subs(Z, z)),
           (decay, sp.exp(-gdt))]
    phi = sp.Matrix([[decay * (ch + gdt * sh), decay * dt * sh],
                     [-decay * wdt2 / dt * sh, decay * (ch - gdt * sh)]])
    return aux, phi


def propagator(dt: sp.Expr = T, gamma: sp.Expr = GAMMA, omega2: sp.Expr = OMEGA**2) -> sp.Matrix:
    """Φ(dt) of :func:`propagator_parts` with the auxiliary symbols substituted."""
    aux, phi = propagator_parts(dt, gamma, omega2)
    values: dict[sp.Symbol, sp.Expr] = {}
    for sym, expr in aux:
        value = expr.subs(values)
        values[sym] = sp.factor(sp.expand(value)) if sym.name == "z" else value   # so the branch is decided
    return phi.subs(values)


def check_propagator() -> dict[str, bool]:
    """Φ(t)·(x0, v0) equals ``dsolve``'s solution (and its derivative) in each regime."""
    out = {}
    t = sp.Symbol("t", positive=True)   # t > 0 decides the Piecewise branches (z = ±κ²t²)
    for regime in REGIMES:
        w2 = _regime_omega(regime) ** 2
        sol = oscillator_homogeneous(regime, X0, V0)
        sol = (sol.subs(OMEGA, _regime_omega(regime)) if regime != "critical" else sol).subs(T, t)
        phi = propagator(t, GAMMA, w2)
        x = (phi * sp.Matrix([X0, V0]))
        ok = all(sp.simplify((a - b).rewrite(sp.exp)) == 0 for a, b in ((x[0], sol), (x[1], sol.diff(t))))
        out[regime] = bool(ok)
    return out


# ---------------------------------------------------------------------------------------------------------
# one step of the continuous theory, for codegen
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ContinuousStep:
    """The continuous theory advanced by one optimizer step, as expressions in :func:`quantity` symbols.

    ``start`` gives the continuous state at t = 0 from the law's state (the paper's initial conditions);
    ``update`` the state after one step from the state before, the measured terms of the step and η, λ, μ, τ.
    """

    model: str
    state: tuple[str, ...]
    measured: tuple[Term, ...]
    start: dict[str, sp.Expr]
    update: dict[str, sp.Expr]
    doc: str
    auxiliary: list[tuple[sp.Symbol, sp.Expr]] = field(default_factory=list)   # assignments before ``update``


def continuous_step(d: Derivation, optimizer_name: str) -> ContinuousStep | None:
    """The paper's theory for ``optimizer_name`` as a one-step update, or None where it gives none.

    sgd: Q_c ← e^{−rate·η} Q_c + η·(η·F) — the left-point Riemann sum of η∫e^{−rate(t−s)}F(s)ds on the grid
    t_n = Σ η_i, the kernel taken at the end of each step (the form of appendix I's discrete sums).
    momentum: (Q_c, V_c) ← Φ(h)·((Q_c, V_c) + (0, h·f)), h = η(1 − τ), f = forcing_coefficient·U/h² with
    U = Σ ½ Δθᵀ∇²q Δθ over the step's displacement Δθ = θ_{n+1} − θ_n (θ̇ ≈ Δθ/h): the Riemann sum of the
    Green's-function integral (36) with impulses at the start of each step.
    """
    if optimizer_name == "sgd":
        lw = modified_loss_law(d)
        qc = quantity("Qc")
        upd = sp.exp(-lw.rate * ETA) * qc
        measured = ()
        if lw.forcing is not None:
            upd += ETA * (ETA * quantity(lw.forcing.name))
            measured = (lw.forcing,)
        return ContinuousStep("modified loss with weight decay (eqs. 18–21)", ("Qc",), measured,
                              {"Qc": quantity("Q")}, {"Qc": upd},
                              f"dQ/dt = −{show(lw.rate)}·Q + η·F (paper order), one step of length η")
    if optimizer_name == "momentum":
        lw = momentum_flow_law(d)
        h = sp.Symbol("h", positive=True)
        qc, vc = quantity("Qc"), quantity("Vc")
        measured = ()
        kick = sp.Integer(0)
        if lw.forcing is not None:
            disp = {s: displacement_symbol(s) for s in d.slots}
            dens = {s: e.xreplace({_dt_symbol(t, 1): disp[t] for t in d.slots}) for s, e in lw.forcing.density.items()}
            u = Term("U", {s: sp.expand(e) for s, e in dens.items()},
                     "½ Δθᵀ∇²Q Δθ over the step's displacement Δθ = θ_{n+1} − θ_n (= q(Δθ) for a quadratic charge)")
            measured = (u,)
            kick = lw.forcing_coefficient * quantity("U") / h   # h·f with f = coef·U/h² (θ̇ ≈ Δθ/h)
        aux, phi = propagator_parts(h, lw.gamma, lw.omega2)
        new = phi * sp.Matrix([qc, vc + kick])
        return ContinuousStep("modified flow with momentum (eqs. 33–38)", ("Qc", "Vc"), measured,
                              {"Qc": quantity("Q"), "Vc": sp.Integer(0)}, {"Qc": new[0], "Vc": new[1]},
                              f"Q̈ + 2γQ̇ + ω²Q = f, γ = {show(lw.gamma)}, ω² = {show(lw.omega2)}, "
                              "one step of length h = η(1 − τ)", [(h, ETA * (1 - TAU))] + aux)
    return None


def characteristic(lw_matrix: sp.Matrix, z: sp.Symbol = sp.Symbol("z")) -> sp.Expr:
    """det(z·I − A): the characteristic polynomial of a law's homogeneous recurrence X' = A·X."""
    return sp.expand((z * sp.eye(lw_matrix.rows) - lw_matrix).det())


__all__ = ["FirstOrderLaw", "ModifiedFlow", "OscillatorLaw", "ContinuousStep", "modified_loss_law",
           "stationary_angular_speed", "momentum_modified_flow", "momentum_flow_law", "oscillator_homogeneous",
           "oscillator_driven", "green_function", "propagator", "propagator_parts", "check_propagator", "continuous_step",
           "regime_conditions", "characteristic", "definite", "merge_integrals", "same_solution",
           "displacement_symbol", "T", "S", "H", "GAMMA", "OMEGA", "KAPPA", "X0", "V0", "REGIMES"]
