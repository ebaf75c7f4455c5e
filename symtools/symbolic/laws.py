"""Exact per-step laws of a symmetry's charge under an optimizer, derived from the optimizer's update rule.

Setting (notation of :mod:`symtools.symbolic.derive`): an elementwise symmetry with polynomial charge
Q = Σ_slots Σ_elements q(θ) and ∇Q = c·v. An optimizer moves every element by the same rule
(:mod:`symtools.symbolic.optimizers`), so the charge after one step is a sum over elements of q evaluated at the
updated element. Each law below writes that sum EXACTLY as

    X'_i = Σ_j a_ij(η, λ, μ, τ) · X_j + Σ_k b_ik(η, λ, μ, τ) · M_k

with X the tracked state quantities (the charge and, under momentum, its bilinear companions) and M_k
*measured* terms — each a per-group sum of an elementwise density in θ, the gradient g and the optimizer state.
Nothing is dropped: a law holds to float64 round-off on a real run.

How each law is derived (all on one element, with SymPy):

* SGD (θ' = (1 − ηλ)θ − ηg): q(θ') is a terminating Taylor sum. For the part of q of degree d,
  q_d((1−ηλ)θ − ηg) = Σ_k (−η)^k (1 − ηλ)^{d−k} T_k with T_k = the g-degree-k part of q_d(θ + g)
  (T_0 = q_d, T_1 = ⟨g, ∇q_d⟩, T_2 = ½ gᵀ∇²q_d g …). T_1 is reduced modulo the gradient identity with
  :meth:`GradientForm.reduce_modulo`: ⟨g, ∇q⟩ = c·⟨g, v⟩ = c·M1. M1 vanishes by the identity — EXCEPT for
  scale groups feeding BatchNorm, where ⟨g, v⟩ = −2ε ∂L/∂ε — so it stays in the law as a measured term whose
  predicted value is 0 (or that ε term). The coefficients are then found by solving the polynomial identity
  q(θ') = Σ coeff·basis (:func:`fit`), which also proves that the law closes.
* Heavy-ball momentum and Nesterov, charges of degree 2 (q(θ) = θᵀSθ per element): with B the bilinear form
  of q, the triple Q = B(θ,θ), P = B(θ,b), R = B(b,b) closes exactly, driven by G = B(g,g), C = B(b,g) (b the
  buffer BEFORE the step) and M1 (B(θ,g) = (c/2)·M1). Degree 1 (translation): Q = q(θ), R = q(b), driven by
  M1 only. torch's first step (b₁ = g + λθ, no dampening) is a law of its own.
* Preconditioned updates (Adam, AdamW, RMSprop, Adagrad — any declaration with ``law_kind="preconditioned"``):
  the update u is scaled per coordinate, so ⟨u, ∇Q⟩ is not a multiple of ⟨g, v⟩ (:func:`first_order_breaking`
  shows it on the declared rule). The law is then the Taylor form in u, exact, with the breaking term
  U1 = ⟨u, v⟩ exposed as a measured density (:func:`preconditioned_law`, one derivation for all of them).

Which derivation an optimizer gets is declared in :mod:`symtools.symbolic.optimizers` (``OptimizerDecl.law_kind``);
:func:`law` dispatches on it, so a new optimizer needs no code here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import sympy as sp

from symtools.errors import SymtoolsError
from symtools.symbolic.derive import Derivation
from symtools.symbolic.forms import GradientForm, grad_symbol
from symtools.symbolic.optimizers import (ETA, LAMBDA, STATE_SYMBOLS, STEP, UpdateRule, declaration, optimizer,
                                          state_symbol)

__all__ = ["LawError", "Term", "Law", "law", "sgd_law", "momentum_law", "preconditioned_law", "adam_law", "fit",
           "first_order_breaking",
           "quantity", "show", "update_symbol", "charge_degrees", "unroll_first_order", "satisfies_law"]

UPDATE_PREFIX = "u_"          # u_x: the update direction applied to slot x (Adam laws)
PREDICTED_IDENTITY = ("0 by the gradient identity ⟨g, v⟩ = 0; for a scale group feeding BatchNorm "
                      "−2ε·∂L/∂ε (symtools.numeric.bn_epsilon)")


class LawError(SymtoolsError):
    """The per-step law asked for does not exist in closed form (or the charge is unsuitable)."""


_GREEK = {"eta": "η", "lambda": "λ", "mu": "μ", "tau": "τ", "beta_1": "β₁", "beta_2": "β₂", "epsilon": "ε",
          "gamma": "γ", "omega": "ω", "kappa": "κ", "rho": "ρ"}


def show(expr) -> str:
    """Plain text of an expression for proofs and docs, hyper-parameters in Greek (``sstr`` otherwise)."""
    text = sp.sstr(expr)
    return re.sub(r"\b(" + "|".join(sorted(_GREEK, key=len, reverse=True)) + r")\b", lambda m: _GREEK[m.group(1)], text)


def quantity(name: str) -> sp.Symbol:
    """The symbol standing for a per-group quantity (state or measured term) in a law's update."""
    return sp.Symbol(name, real=True)


def update_symbol(slot: str) -> sp.Symbol:
    """u_<slot>: the update direction the optimizer applied to slot ``slot`` (θ' = (1−ηλ)θ − η·u, AdamW)."""
    return sp.Symbol(UPDATE_PREFIX + slot, real=True)


@dataclass(frozen=True)
class Term:
    """A per-group quantity Σ_slots Σ_elements density_s (a state quantity or a measured term).

    ``density`` maps slot → elementwise expression in the slot symbols θ_s, gradients g_s, buffers b_s or update
    directions u_s. ``predicted`` is what theory says a measured term equals (None: nothing, it is a drive).
    """

    name: str
    density: dict[str, sp.Expr]
    meaning: str
    predicted: str | None = None

    def pointwise(self) -> sp.Expr:
        return sp.Add(*self.density.values())


@dataclass
class Law:
    """The exact per-step law of one symmetry's charge under one optimizer.

    ``update[X]`` is X after a later step, ``first_update[X]`` after torch's first step, both expressions in
    :func:`quantity` symbols (state before the step, measured terms of the step) and the hyper-parameters
    η, λ, μ, τ of :mod:`symtools.symbolic.optimizers`. ``first_state`` / ``first_measured`` name what the first
    step reads (the optimizer state does not exist before it). ``closed`` is False when the law is only the
    Taylor form in the applied update (Adam): exact, but its first-order term is not removed by the identity.
    """

    derivation: Derivation
    optimizer: str
    rules: tuple[UpdateRule, UpdateRule]
    state: tuple[Term, ...]
    measured: tuple[Term, ...]
    update: dict[str, sp.Expr]
    first_update: dict[str, sp.Expr]
    first_state: tuple[str, ...]
    first_measured: tuple[str, ...]
    closed: bool = True
    proof: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.derivation.action.name or "symmetry"

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.state)

    @property
    def measured_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.measured)

    def term(self, name: str) -> Term:
        return next(t for t in self.state + self.measured if t.name == name)

    def equations(self, first: bool = False) -> dict[str, sp.Eq]:
        """``X' = …`` as SymPy equations (the primed symbol on the left)."""
        upd = self.first_update if first else self.update
        return {k: sp.Eq(sp.Symbol(k + "'", real=True), e) for k, e in upd.items()}

    def matrix(self) -> tuple[sp.Matrix, sp.Matrix]:
        """(A, B) with X' = A·X + B·M for a later step (X = state, M = measured terms, in declaration order)."""
        xs = [quantity(n) for n in self.state_names]
        ms = [quantity(n) for n in self.measured_names]
        rows = [sp.expand(self.update[n]) for n in self.state_names]
        a = sp.Matrix([[r.coeff(x) for x in xs] for r in rows])
        b = sp.Matrix([[r.coeff(m) for m in ms] for r in rows])
        return a, b


# ---------------------------------------------------------------------------------------------------------
# the algebra: polynomial charges, Taylor terms, fitting a target in a basis of densities
# ---------------------------------------------------------------------------------------------------------


def _slot_symbols(d: Derivation) -> dict[str, sp.Symbol]:
    return {s: d.action.symbol(s) for s in d.slots}


def _charge(d: Derivation) -> sp.Expr:
    if not d.charge.exists:
        raise LawError(f"symmetry {d.action.name or d.action.spec()!r} has no charge ({d.charge.reason}); "
                       "there is no charge law to derive")
    return sp.expand(d.charge.pointwise())


def charge_degrees(d: Derivation) -> dict[int, sp.Expr]:
    """The charge density split into homogeneous parts, degree → part (a polynomial charge is required)."""
    q = _charge(d)
    syms = list(_slot_symbols(d).values())
    if not q.is_polynomial(*syms):
        raise LawError(f"the charge density {show(q)} is not a polynomial in the slots, so q(θ − η·u) is an "
                       "infinite Taylor series and no finite per-step law exists")
    parts: dict[int, sp.Expr] = {}
    for monom, coeff in sp.Poly(q, *syms).terms():
        deg = sum(monom)
        if deg == 0:
            continue  # a constant carries no information
        parts[deg] = parts.get(deg, sp.Integer(0)) + coeff * sp.Mul(*[x**k for x, k in zip(syms, monom)])
    return dict(sorted(parts.items()))


def _check_names(d: Derivation, prefixes: tuple[str, ...]) -> None:
    """Per-slot symbols b_x, u_x … must not be slots themselves."""
    for s in d.slots:
        for p in prefixes:
            if p + s in d.slots:
                raise LawError(f"slot {p + s!r} collides with the symbol {p}{s} that the law uses for slot {s!r}; "
                               "rename the slot")


def _taylor_terms(q: sp.Expr, slots: Mapping[str, sp.Symbol], direction: Mapping[str, sp.Expr]) -> dict[int, sp.Expr]:
    """k → the part of q(θ + direction) homogeneous of degree k in the direction: (1/k!) D^k q(θ)[direction]^k."""
    t = sp.Dummy("t")
    shifted = sp.expand(q.xreplace({x: x + t * direction[s] for s, x in slots.items()}))
    poly = sp.Poly(shifted, t)
    return {k: sp.expand(poly.coeff_monomial(t**k)) for k in range(poly.degree() + 1)
            if poly.coeff_monomial(t**k) != 0}


def _split(pointwise: sp.Expr, d: Derivation, extra_prefixes: tuple[str, ...] = ("g_", "b_", "u_")) -> dict[str, sp.Expr]:
    """A pointwise density as slot → density: each additive term goes to the first slot whose θ, g, b or u it
    contains (declaration order). Every slot gets an entry (0 where nothing is assigned)."""
    out = {s: sp.Integer(0) for s in d.slots}
    names = {s: {s} | {p + s for p in extra_prefixes} for s in d.slots}
    for term in sp.Add.make_args(sp.expand(pointwise)):
        used = {str(x) for x in term.free_symbols}
        owner = next((s for s in d.slots if used & names[s]), None)
        if owner is None:
            raise LawError(f"term {show(term)} of a density involves no slot")
        out[owner] += term
    return out


def fit(target: sp.Expr, basis: Mapping[str, sp.Expr], variables) -> dict[str, sp.Expr] | None:
    """Constants k_j with target ≡ Σ_j k_j·basis_j as polynomials in ``variables`` (the element symbols), or None.

    The k_j may depend on anything else (hyper-parameters) but not on an element: only then does the
    pointwise identity sum to a law between per-group totals. None means the target is not in the span: the
    law does not close in this basis.
    """
    ks = {name: sp.Dummy(f"k_{name}") for name in basis}
    residual = sp.expand(target - sp.Add(*[ks[n] * sp.sympify(b) for n, b in basis.items()]))
    variables = list(variables)
    try:
        poly = sp.Poly(residual, *variables)
    except sp.PolynomialError:
        return None
    if any(c.free_symbols & set(variables) for c in poly.coeffs()):  # not polynomial in the element symbols
        return None
    unknowns = list(ks.values())
    matrix, rhs = sp.linear_eq_to_matrix(poly.coeffs(), unknowns)
    sols = sp.linsolve((matrix, rhs), unknowns)
    if not sols:
        return None
    (sol,) = sols
    free = [n for n, v in zip(ks, sol) if v.free_symbols & set(unknowns)]
    if free:
        raise LawError(f"the basis terms {', '.join(free)} are linearly dependent; the law is not unique")
    return {n: sp.factor(v) for n, v in zip(ks, sol)}


def _element_symbols(d: Derivation, kinds: tuple[str, ...] = ("g", "b")) -> set[sp.Symbol]:
    out = set(_slot_symbols(d).values())
    for s in d.slots:
        if "g" in kinds:
            out.add(grad_symbol(s))
        if "b" in kinds:
            out.add(state_symbol("b", s))
        if "u" in kinds:
            out.add(update_symbol(s))
    return out


def _reduces(form: GradientForm, identity: GradientForm, element: set[sp.Symbol]) -> tuple[bool, sp.Expr | None]:
    """``reduce_modulo`` plus: the multiple must not depend on ANY element symbol (g, buffers, preconditioners),
    since the identity only holds after summing over elements."""
    ok, lam = form.reduce_modulo(identity)
    if ok and lam.free_symbols & element:
        return False, None
    return ok, lam


def _identity_term(d: Derivation) -> Term:
    g = {s: grad_symbol(s) for s in d.slots}
    return Term("M1", {s: sp.expand(g[s] * d.generator[s]) for s in d.slots},
                "⟨g, v⟩: the gradient identity's sum", PREDICTED_IDENTITY)


def _apply(rule: UpdateRule, d: Derivation) -> tuple[dict[str, sp.Expr], dict[str, dict[str, sp.Expr]]]:
    """(slot → θ'_slot, slot → new optimizer state) of one step of ``rule`` on every slot."""
    theta, state = {}, {}
    for s in d.slots:
        theta[s], state[s] = rule.on_slot(s)
    return theta, state


def _at(expr: sp.Expr, d: Derivation, values: Mapping[str, sp.Expr]) -> sp.Expr:
    syms = _slot_symbols(d)
    return sp.expand(expr.xreplace({syms[s]: values[s] for s in d.slots}))


def _fit_all(targets: Mapping[str, sp.Expr], basis: Mapping[str, sp.Expr], variables, what: str) -> dict[str, sp.Expr]:
    out = {}
    for name, target in targets.items():
        coeffs = fit(target, basis, variables)
        if coeffs is None:
            raise LawError(f"{what}: {name}' is not a combination of {', '.join(basis)} with element-independent "
                           "coefficients; the law does not close")
        out[name] = sp.Add(*[c * quantity(n) for n, c in coeffs.items() if c != 0])
    return out


# ---------------------------------------------------------------------------------------------------------
# SGD: the terminating Taylor form
# ---------------------------------------------------------------------------------------------------------


def _taylor_name(k: int, prefix: str = "G") -> str:
    return {2: prefix}.get(k, f"{prefix}{k}")


def sgd_law(d: Derivation, name: str = "sgd") -> Law:
    """Q' = Σ_k coeff_k(η, λ)·T_k exactly under torch.optim.SGD without momentum (see the module docstring);
    ``name``: a declared optimizer of law kind ``taylor`` (a stateless rule, linear in g)."""
    rules = optimizer(name)
    rule = rules[1]
    slots = _slot_symbols(d)
    g = {s: grad_symbol(s) for s in d.slots}
    parts = charge_degrees(d)
    multi = len(parts) > 1
    proof = [f"rule: {rule.text}", f"charge density q = {show(_charge(d))} (degrees {sorted(parts)})"]
    state, measured, basis_of = [], [], {}
    m1 = _identity_term(d)
    for deg, qd in parts.items():
        qname = f"Q_d{deg}" if multi else "Q"
        state.append(Term(qname, _split(qd, d), f"Σ q{'_' + str(deg) if multi else ''}(θ): the charge"
                          + (f"'s degree-{deg} part" if multi else "")))
        basis = {qname: qd}
        for k, tk in _taylor_terms(qd, slots, g).items():
            if k == 0:
                continue
            if k == 1:
                ok, c = _reduces(GradientForm({s: sp.diff(qd, x) for s, x in slots.items()}), d.gradient_identity,
                                 _element_symbols(d))
                if ok and not multi:
                    proof.append(f"first-order term ⟨g, ∇q⟩ = {show(c)}·⟨g, v⟩ = {show(c)}·M1 "
                                 "(GradientForm.reduce_modulo): 0 by the gradient identity, kept as measured M1")
                    if m1.name not in [t.name for t in measured]:
                        measured.append(m1)
                    basis[m1.name] = m1.pointwise()
                    continue
                term_name = f"M1_d{deg}" if multi else "M1"
                proof.append(f"first-order term of degree {deg} kept as measured {term_name} (reduces modulo the identity "
                             "only summed over degrees)")
                term = Term(term_name, _split(tk, d), f"⟨g, ∇q_{deg}⟩", None)
            else:
                term_name = _taylor_name(k) + (f"_d{deg}" if multi else "")
                term = Term(term_name, _split(tk, d), f"(1/{k}!)·D^{k}q{'_' + str(deg) if multi else ''}(θ)[g]^{k}"
                            + (": the charge density at g" if k == deg == 2 else ""))
            measured.append(term)
            basis[term.name] = term.pointwise()
        basis_of[qname] = (qd, basis)
    theta_new, _ = _apply(rule, d)
    update = {}
    for qname, (qd, basis) in basis_of.items():
        update.update(_fit_all({qname: _at(qd, d, theta_new)}, basis, _element_symbols(d), "SGD"))
    proof.append("Q' = q(θ') expanded and matched term by term (fit): "
                 + "; ".join(f"{k}' = {show(v)}" for k, v in update.items()))
    names = tuple(t.name for t in measured)
    return Law(d, name, rules, tuple(state), tuple(measured), update, dict(update),
               tuple(t.name for t in state), names, True, proof)


# ---------------------------------------------------------------------------------------------------------
# heavy-ball momentum and Nesterov: the closed linear recurrences of degree-1 and degree-2 charges
# ---------------------------------------------------------------------------------------------------------


def _bilinear(q: sp.Expr, d: Derivation, x: Mapping[str, sp.Expr], y: Mapping[str, sp.Expr]) -> sp.Expr:
    """B(x, y) = ½ Σ_s y_s ∂q/∂θ_s at θ = x, the symmetric bilinear form with B(θ, θ) = q(θ) (q quadratic)."""
    slots = _slot_symbols(d)
    return sp.expand(sp.Rational(1, 2) * sp.Add(*[y[s] * _at(sp.diff(q, slots[s]), d, x) for s in d.slots]))


def momentum_law(d: Derivation, nesterov: bool = False, name: str | None = None) -> Law:
    """Closed recurrences under torch.optim.SGD with momentum (heavy ball, or ``nesterov``) for charges of degree
    1 (state Q, R) and 2 (state Q, P, R); see the module docstring. ``name``: a declared optimizer of law kind
    ``momentum`` (default: "nesterov" or "momentum" by ``nesterov``)."""
    name = name or ("nesterov" if nesterov else "momentum")
    first_rule, rule = optimizer(name)
    _check_names(d, ("b_",))
    parts = charge_degrees(d)
    q = _charge(d)
    if len(parts) != 1 or next(iter(parts)) > 2:
        raise LawError(f"under momentum the charge law closes for homogeneous charges of degree 1 or 2; "
                       f"q = {show(q)} has degrees {sorted(parts)}: q(θ − η·b') brings products of θ and b of "
                       "every order, so no finite set of per-group sums is carried from step to step "
                       "(use the SGD law, or track the Taylor form in the update with adam_law-like measurement)")
    deg = next(iter(parts))
    slots = _slot_symbols(d)
    th = dict(slots)
    g = {s: grad_symbol(s) for s in d.slots}
    b = {s: state_symbol("b", s) for s in d.slots}
    m1 = _identity_term(d)
    variables = _element_symbols(d)
    if deg == 1:
        state = (Term("Q", _split(q, d), "Σ q(θ): the charge"),
                 Term("R", _split(_at(q, d, b), d), "Σ q(b): the charge of the momentum buffer"))
        measured = (m1,)
        first_state, first_measured = ("Q",), ("M1",)
        targets = lambda th1, b1: {"Q": _at(q, d, th1), "R": _at(q, d, b1)}  # noqa: E731
    else:
        bil = lambda x, y: _bilinear(q, d, x, y)  # noqa: E731
        state = (Term("Q", _split(q, d), "Σ q(θ) = B(θ, θ): the charge"),
                 Term("P", _split(bil(th, b), d), "Σ B(θ, b): the charge's bilinear form between θ and the buffer"),
                 Term("R", _split(bil(b, b), d), "Σ B(b, b) = q(b): the charge of the momentum buffer"))
        measured = (m1,
                    Term("G", _split(bil(g, g), d), "Σ B(g, g) = q(g): the charge density at the gradient"),
                    Term("C", _split(bil(b, g), d), "Σ B(b, g): buffer (before the step) against the gradient"))
        first_state, first_measured = ("Q",), ("M1", "G")
        targets = lambda th1, b1: {"Q": bil(th1, th1), "P": bil(th1, b1), "R": bil(b1, b1)}  # noqa: E731
    basis = {t.name: t.pointwise() for t in state + measured}
    th1, st1 = _apply(rule, d)
    update = _fit_all(targets(th1, {s: st1[s]["b"] for s in d.slots}), basis, variables, name)
    th0, st0 = _apply(first_rule, d)
    first_basis = {n: basis[n] for n in first_state + first_measured}
    first_update = _fit_all(targets(th0, {s: st0[s]["b"] for s in d.slots}), first_basis, variables,
                            f"{name} (first step)")
    proof = [f"rule (later steps): {rule.text}", f"rule (first step): {first_rule.text}",
             f"charge density q = {show(q)} (degree {deg})",
             "targets q(θ'), " + ("B(θ', b'), q(b')" if deg == 2 else "q(b')")
             + " expanded and matched in the basis " + ", ".join(basis) + " (fit): closed"]
    return Law(d, name, (first_rule, rule), state, measured, update, first_update, first_state, first_measured,
               True, proof)


# ---------------------------------------------------------------------------------------------------------
# preconditioned updates (Adam, AdamW, RMSprop, Adagrad): the law does not close; expose the breaking term
# ---------------------------------------------------------------------------------------------------------


def first_order_breaking(d: Derivation, optimizer_name: str) -> tuple[GradientForm, bool, str]:
    """The first-order (in η) change of Q on torch's FIRST step of ``optimizer_name`` from zero optimizer state,
    at λ = 0, as a linear form in g; whether it reduces modulo the gradient identity; and why.

    On its first step Adam's update is u = g/(|g| + ε) per element (m = (1−β₁)g, s = (1−β₂)g², bias-corrected);
    RMSprop's u = g/(√(1−ρ)|g| + ε), Adagrad's (from a zero accumulator) g/(|g| + ε). Writing u = p·g with
    p the per-element factor, the change −η⟨∇Q, u⟩ is the form Σ_s g_s·(p_s ∂q/∂θ_s): its multiple of ⟨g, v⟩
    would be c·p_s, which differs from element to element, so it does not vanish. For SGD p = 1.
    """
    first_rule, _ = optimizer(optimizer_name)
    slots = _slot_symbols(d)
    q = _charge(d)
    coeff, element = {}, _element_symbols(d)
    for s, x in slots.items():
        theta1, _ = first_rule.on_slot(s)
        rep = {STEP: 1, LAMBDA: 0, **{state_symbol(k, s): 0 for k in STATE_SYMBOLS}}
        theta1 = sp.simplify(theta1.xreplace(rep))
        u = sp.simplify(-sp.diff(theta1, ETA))  # θ' = θ − η·u
        p = sp.simplify(u / grad_symbol(s))     # u = p·g
        if p.has(grad_symbol(s)):
            p_sym = sp.Symbol(f"p_{s}", positive=True)
            element.add(p_sym)
            note = f"u_{s} = p_{s}·g_{s} with p_{s} = {show(p)} (per coordinate)"
            p = p_sym
        else:
            note = f"u_{s} = {show(p)}·g_{s}"
        coeff[s] = (sp.expand(p * sp.diff(q, x)), note)
    form = GradientForm({s: c for s, (c, _) in coeff.items()})
    ok, lam = _reduces(form, d.gradient_identity, element)
    notes = "; ".join(n for _, n in coeff.values())
    if ok:
        why = f"{notes}: ⟨∇Q, u⟩ = {show(lam)}·⟨g, v⟩, which vanishes by the gradient identity"
    else:
        why = (f"{notes}: ⟨∇Q, u⟩ = {show(form.expr())} is not a constant multiple of ⟨g, v⟩ = "
               f"{show(d.gradient_identity.expr())} (the multiplier would depend on the element), so the "
               "first-order term survives: the optimizer breaks the law at first order")
    return form, ok, why


def preconditioned_law(d: Derivation, optimizer_name: str) -> Law:
    """Exact Taylor form in the APPLIED update direction u under a preconditioned optimizer (Adam, AdamW,
    RMSprop, Adagrad: any declaration with law kind ``preconditioned``).

    The rule's ``decay`` defines u: θ' = decay·θ − η·u (AdamW: decay = 1 − ηλ; Adam, RMSprop, Adagrad: 1, the
    weight decay is inside u). With u_s measured per element (from θ before and after the step) Q' is a finite
    sum of measured terms U_k = (1/k!)·D^k q[u]^k; the first-order one is exposed as U1 = ⟨u, v⟩
    (⟨u, ∇Q⟩ = c·U1), the term SGD's identity would remove. :func:`first_order_breaking` must show on the
    declared rule that it does not vanish, else the declaration is wrong (LawError).
    """
    rules = optimizer(optimizer_name)
    rule = rules[1]
    _check_names(d, (UPDATE_PREFIX,))
    parts = charge_degrees(d)
    slots = _slot_symbols(d)
    u = {s: update_symbol(s) for s in d.slots}
    decay = sp.sympify(rule.decay)
    theta_new = {s: decay * x - ETA * u[s] for s, x in slots.items()}
    form, reduces, why = first_order_breaking(d, optimizer_name)
    if reduces:
        raise LawError(f"{optimizer_name} is declared preconditioned but its first-order term reduces modulo the "
                       f"gradient identity ({why}); declare it with a closing law kind")
    multi = len(parts) > 1
    state, measured, update = [], [], {}
    breaking = Term("U1", {s: sp.expand(u[s] * d.generator[s]) for s in d.slots},
                    "⟨u, v⟩: the breaking term (⟨u, ∇Q⟩ = c·U1); u = the applied update direction", None)
    variables = _element_symbols(d, ("u",))
    for deg, qd in parts.items():
        qname = f"Q_d{deg}" if multi else "Q"
        state.append(Term(qname, _split(qd, d), "Σ q(θ): the charge"))
        basis = {qname: qd}
        for k, tk in _taylor_terms(qd, slots, u).items():
            if k == 0:
                continue
            if k == 1 and not multi:
                ok, c = _reduces(GradientForm({s: sp.diff(qd, x) for s, x in slots.items()}),
                                 GradientForm(dict(d.generator)), variables)
                assert ok  # ∇q = c·v, so ⟨u, ∇q⟩ = c·⟨u, v⟩
                measured.append(breaking)
                basis[breaking.name] = breaking.pointwise()
                continue
            tname = (f"U{k}" if k > 1 else "U1") + (f"_d{deg}" if multi else "")
            term = Term(tname, _split(tk, d), f"(1/{k}!)·D^{k}q(θ)[u]^{k}")
            measured.append(term)
            basis[tname] = term.pointwise()
        update.update(_fit_all({qname: _at(qd, d, theta_new)}, basis, variables, optimizer_name))
    proof = [f"rule: {rule.text}", f"first step: {why}",
             f"Q' = q(θ') with θ' = {'θ' if decay == 1 else '(' + show(decay) + ')θ'} − η·u"
             + " expanded and matched (fit): " + "; ".join(f"{k}' = {show(v)}" for k, v in update.items())]
    return Law(d, optimizer_name, rules, tuple(state), tuple(measured), update, dict(update),
               tuple(t.name for t in state), tuple(t.name for t in measured), False, proof)


def adam_law(d: Derivation, decoupled: bool = True) -> Law:
    """:func:`preconditioned_law` under Adam (``decoupled=False``) or AdamW."""
    return preconditioned_law(d, "adamw" if decoupled else "adam")


_DERIVATIONS = {"taylor": sgd_law, "momentum": lambda d, name: momentum_law(d, name=name),
                "preconditioned": preconditioned_law}


def law(d: Derivation, optimizer_name: str) -> Law:
    """The per-step law of ``d``'s charge under a declared optimizer (``symtools.symbolic.optimizers.DECLARATIONS``:
    sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad), by the derivation its declaration names."""
    decl = declaration(optimizer_name)
    return _DERIVATIONS[decl.law_kind](d, decl.name)


# ---------------------------------------------------------------------------------------------------------
# unrolling a one-state law (appendix I)
# ---------------------------------------------------------------------------------------------------------


def _canonical_base(a: sp.Expr) -> sp.Expr:
    """(ηλ − 1)² → (1 − ηλ)²: an even power's base signed so that it is positive at η = 0."""
    a = sp.factor(a)
    if a.is_Pow and a.exp.is_even and (-a.base).subs(ETA, 0).is_positive:
        return sp.Pow(sp.expand(-a.base), a.exp)
    return a


def unroll_first_order(lw: Law, n: sp.Symbol, i: sp.Symbol, initial: sp.Expr,
                       drives: Mapping[str, sp.Function], drop: tuple[str, ...] = ()) -> sp.Expr:
    """X_n for a law with a single state X' = A·X + Σ_k b_k·M_k: A^n X_0 + Σ_{i<n} A^{n−1−i} Σ_k b_k M_k(i).

    ``drives`` maps each measured name to a SymPy function of the step index; names in ``drop`` are set to 0
    (e.g. M1 by the gradient identity). :func:`satisfies_law` proves such a closed form by induction.
    """
    if len(lw.state) != 1:
        raise LawError(f"unrolling needs a single-state law; {lw.optimizer} tracks {', '.join(lw.state_names)}")
    x = quantity(lw.state_names[0])
    rhs = sp.expand(lw.update[lw.state_names[0]])
    a = _canonical_base(rhs.coeff(x))
    forcing = sp.Add(*[sp.factor(rhs.coeff(quantity(m))) * drives[m](i) for m in lw.measured_names if m not in drop])
    return a**n * initial + sp.Sum(a**(n - 1 - i) * forcing, (i, 0, n - 1))


def _split_sum(expr: sp.Expr, n: sp.Symbol) -> tuple[sp.Expr, sp.Expr, sp.Symbol]:
    """expr = P(n) + Σ_{i=0}^{n−1} s(i, n): returns (P, s, i); constant factors of the sum moved inside."""
    rest, summand, var = sp.Integer(0), sp.Integer(0), None
    for term in sp.Add.make_args(sp.expand(expr, deep=False, mul=True, multinomial=False, power_exp=False,
                                           power_base=False, log=False)):
        sums = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Sum)]
        if not sums:
            rest += term
            continue
        (sm,) = sums
        (v, lo, hi), = sm.limits
        if lo != 0 or sp.simplify(hi - (n - 1)) != 0:
            raise LawError(f"the sum {sm} does not run over i = 0 … n − 1")
        var = var or v
        summand += sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not sm]) * sm.function.subs(v, var)
    return rest, summand, var


def satisfies_law(lw: Law, closed_form: sp.Expr, n: sp.Symbol, initial: sp.Expr,
                  drives: Mapping[str, sp.Function], drop: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Induction proof that X_n = closed_form (of the form P(n) + Σ_{i<n} s(i, n)) obeys the single-state law.

    Base: P(0) = X_0. Step: X_{n+1} − (A·X_n + f(n)) splits into P(n+1) − A·P(n), s(n, n+1) − f(n) and, inside the
    common sum over i < n, s(i, n+1) − A·s(i, n); each must simplify to 0. λ is written as (1 − ρ)/η first, so
    that powers of (1 − ηλ) and (ηλ − 1) compare.
    """
    x = quantity(lw.state_names[0])
    rhs = sp.expand(lw.update[lw.state_names[0]])
    a = rhs.coeff(x)
    f = sp.Add(*[rhs.coeff(quantity(m)) * drives[m](n) for m in lw.measured_names if m not in drop])
    p, s, i = _split_sum(closed_form, n)
    rho = sp.Dummy("rho", positive=True)

    def zero(e):
        e = sp.sympify(e).subs(LAMBDA, (1 - rho) / ETA)
        return sp.simplify(sp.powsimp(sp.expand(e), force=True)) == 0

    checks = {"base case P(0) = X_0": zero(p.subs(n, 0) - initial),
              "P(n+1) = A·P(n)": zero(p.subs(n, n + 1) - a * p),
              "newest summand s(n, n+1) = the drive f(n)": zero(s.subs(n, n + 1).subs(i, n) - f) if i else zero(f),
              "older summands s(i, n+1) = A·s(i, n)": zero(s.subs(n, n + 1) - a * s) if i else True}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        return False, "induction fails: " + "; ".join(bad)
    return True, "induction: " + "; ".join(checks)
