#!/usr/bin/env python
"""Momentum turns the broken charges into (driven) harmonic oscillators (Kunin et al., ICLR 2021, §6, appendices
C, D.2, G, H).

The engine derives
  * the modified flow of torch's heavy-ball update, by eliminating the buffer and Taylor-expanding θ(t ± h)
    (``symtools.symbolic.continuous.momentum_modified_flow``): appendix G's equation of learning;
  * its projection on ∇Q for translation, scale and rescale — eqs. (33), (35), (38) with γ, ω and the forcing
    (``momentum_flow_law``) — and the solutions in the three damping regimes by ``sympy.dsolve`` — eqs. (34),
    (36), (37) and appendix H's Green's functions;
  * the exact discrete recurrences under torch.optim.SGD(momentum, dampening) (``symtools.symbolic.laws``): the
    translation sum is a damped two-step oscillator whose characteristic polynomial tends to that of eq. (33).
Each is compared with the formula typed in below (the paper's, with β = momentum, α = dampening; where the paper
has no discrete momentum formula, the design brief's). Writes ``<out>/momentum.md``; exit code 1 on a mismatch.

    python derivations/momentum.py [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, arguments, tex  # noqa: E402

from symtools.symbolic import library  # noqa: E402
from symtools.symbolic.continuous import (GAMMA, H, OMEGA, REGIMES, S, T, X0, characteristic, check_propagator,  # noqa: E402
                                          green_function, momentum_flow_law, momentum_modified_flow,
                                          oscillator_driven, oscillator_homogeneous, same_solution)
from symtools.symbolic.derive import derive  # noqa: E402
from symtools.symbolic.laws import momentum_law, quantity, show  # noqa: E402
from symtools.symbolic.optimizers import ETA, LAMBDA, MU, TAU  # noqa: E402

eta, lam = ETA, LAMBDA
beta, alpha = sp.symbols("beta alpha", nonnegative=True)   # the paper's momentum and dampening
PAPER_TO_TORCH = {beta: MU, alpha: TAU}
dt_x, dt_in, dt_out = sp.symbols("dt_x dt_x_in dt_x_out", real=True)   # dθ/dt per slot
g, w = GAMMA, OMEGA
f = sp.Function("f")
root_o, root_u = sp.sqrt(g**2 - w**2), sp.sqrt(w**2 - g**2)

# ------------------------------------------------------------------------------------------------------------
# The formulas compared against (paper; β momentum, α dampening)
# ------------------------------------------------------------------------------------------------------------
M = eta * (1 - alpha) * (1 + beta)
PAPER = {
    # appendix G: η(1−α)/2 (1+β) θ̈ + (1−β) θ̇ + λθ = −g
    "flow": {"mass": M / 2, "friction": 1 - beta, "spring": lam, "force": sp.Integer(1)},
    # eq. (33) and after: γ = (1−β)/(η(1−α)(1+β)), ω = √(2λ/(η(1−α)(1+β)))
    "gamma": (1 - beta) / M,
    "omega2": {"translation": 2 * lam / M, "scale": 4 * lam / M, "rescale": 4 * lam / M},
    # eq. (35)/(38): the forcing f(t) = 2|dθ_A/dt|² resp. 2(|dθ_A1/dt|² − |dθ_A2/dt|²)
    "forcing": {"translation": None, "scale": {"x": 2 * dt_x**2}, "rescale": {"x_in": 2 * dt_in**2, "x_out": -2 * dt_out**2}},
    # eq. (35) as printed: (M/4) Q̈ + (1−β)/2 Q̇ + λQ = (M/2)|θ̇|², i.e. these coefficients of (Q̈, Q̇, Q, |θ̇|²)
    "eq35": (M / 4, (1 - beta) / 2, lam, M / 2),
    # eq. (34) / (37): x(0) = x0, ẋ(0) = 0
    "homogeneous": {"overdamped": sp.exp(-g * T) * (sp.cosh(root_o * T) + g / root_o * sp.sinh(root_o * T)) * X0,
                    "critical": sp.exp(-g * T) * (1 + g * T) * X0,
                    "underdamped": sp.exp(-g * T) * (sp.cos(root_u * T) + g / root_u * sp.sin(root_u * T)) * X0},
    # appendix H.3: Green's functions (t > 0)
    "green": {"overdamped": sp.exp(-g * T) * sp.sinh(root_o * T) / root_o,
              "critical": sp.exp(-g * T) * T,
              "underdamped": sp.exp(-g * T) * sp.sin(root_u * T) / root_u},
}
# eq. (36): x(t) = x_h(t) + ∫₀ᵗ G(t − s) f(s) ds, regime by regime
PAPER["driven"] = {r: PAPER["homogeneous"][r] + sp.Integral(PAPER["green"][r].subs(T, T - S) * f(S), (S, 0, T))
                   for r in REGIMES}
# design brief (no discrete momentum formula in the paper): translation s_{n+1} = (1+β−ηλ)s_n − βs_{n−1} (τ = 0),
# and for S symmetric, (Q, P, R) = (θSθ, θSv, vSv):
#   R' = β²R + λ²Q + 2βλP + G + 2βC,  Q' = Q − 2η(βP + λQ) + η²R',  P' = βP + λQ − ηR'
z = sp.Symbol("z")
Qs, Ps, Rs, Gs, Cs = (quantity(k) for k in "QPRGC")
_R1 = MU**2 * Rs + LAMBDA**2 * Qs + 2 * MU * LAMBDA * Ps + Gs + 2 * MU * Cs
DESIGN = {"translation_charpoly": z**2 - (1 + MU - eta * lam) * z + MU,
          "triple": {"R": _R1, "Q": Qs - 2 * eta * (MU * Ps + LAMBDA * Qs) + eta**2 * _R1,
                     "P": MU * Ps + LAMBDA * Qs - eta * _R1}}
EQ = {"translation": "(33)", "scale": "(35)", "rescale": "(38)"}

TITLE = "Momentum: harmonic oscillators (engine vs paper)"
INTRO = (
    "With heavy-ball momentum μ (the paper's β) and dampening τ (the paper's α), torch.optim.SGD's update "
    "b' = μb + (1 − τ)(g + λθ), θ' = θ − ηb' is a two-step recurrence in θ. Its modified flow (Taylor-expanded "
    "around θ_n with time step h = η(1 − τ)) is a damped, driven oscillator; projected on the generator of each "
    "symmetry it gives the paper's eqs. (33)–(38). The engine derives each step below from the update rule and "
    "the identities; the solutions come from `sympy.dsolve` in each damping regime. The exact discrete laws "
    "(`symtools.symbolic.laws.momentum_law`) are the other half: no approximation, and for translation a "
    "two-step oscillator whose characteristic polynomial tends to eq. (33)'s.")


def _paper(e):
    return sp.sympify(e).xreplace(PAPER_TO_TORCH) if not isinstance(e, dict) else {k: _paper(v) for k, v in e.items()}


def _in_eta(e):
    return sp.sympify(e).subs(H, eta * (1 - TAU))


def main(argv=None) -> int:
    args = arguments(argv, "Derive the momentum oscillators and check them against the paper.")
    r = Report("momentum", TITLE, INTRO)

    flow = momentum_modified_flow()
    derived = {"mass": _in_eta(flow.mass), "friction": flow.friction, "spring": flow.spring, "force": flow.force}
    r.check("modified flow of heavy-ball momentum", "appendix G; appendices C, D.2",
            "Buffer eliminated, θ_{n±1} = θ(t ± h) expanded to second order, divided by h:\n\n"
            + "\n".join(f"- {p}" for p in flow.proof), derived, _paper(PAPER["flow"]))

    for family in ("translation", "scale", "rescale"):
        d = derive(library.elementwise(family))
        osc = momentum_flow_law(d)
        eq = EQ[family]
        r.note(f"{family}: projecting the modified flow on ∇Q", f"eq. {eq}",
               "The projection, matched against Q̈, Q̇, Q, ⟨g, v⟩ and ½θ̇ᵀ∇²Qθ̇:\n\n"
               + "\n".join(f"- {p}" for p in osc.proof[len(flow.proof):]))
        r.check(f"{family}: damping rate γ", f"eq. {eq}", "Half the coefficient of Q̇ over that of Q̈.",
                _in_eta(osc.gamma), _paper(PAPER["gamma"]))
        r.check(f"{family}: natural frequency ω²", f"eq. {eq}", "The coefficient of Q over that of Q̈ "
                "(λ times the degree of the charge, from Euler's ⟨θ, ∇Q⟩ = d·Q).", _in_eta(osc.omega2),
                _paper(PAPER["omega2"][family]))
        if PAPER["forcing"][family] is None:
            r.fact(f"{family}: no driving force", f"eq. {eq}", "∇²Q = 0 for a linear charge, and ⟨g, 1_A⟩ = 0.",
                   osc.forcing is None, "the engine finds no forcing term")
        else:
            fd = {s: sp.expand(osc.forcing_coefficient * e) for s, e in osc.forcing.density.items()}
            r.check(f"{family}: driving force f(t)", f"eq. {eq}", "f = θ̇ᵀ∇²Qθ̇ per element (the paper's footnote 7: "
                    "⟨θ̈, θ_A⟩ = ½ d²|θ_A|²/dt² − |θ̇_A|²).", fd, PAPER["forcing"][family])
        if family == "scale":
            scale = _paper(PAPER["eq35"][0])
            derived35 = (scale, sp.factor(2 * _in_eta(osc.gamma) * scale), sp.factor(_in_eta(osc.omega2) * scale),
                         sp.factor(osc.forcing_coefficient * scale))
            r.check("scale: eq. (35) as printed", "eq. (35)", "The normalised oscillator multiplied by "
                    "η(1−α)(1+β)/4: coefficients of (Q̈, Q̇, Q) and of |θ̇_A|² on the right.",
                    sp.Matrix(derived35), sp.Matrix([_paper(c) for c in PAPER["eq35"]]))

    for regime in REGIMES:
        hom = oscillator_homogeneous(regime)
        ok = sp.simplify((hom - PAPER["homogeneous"][regime]).rewrite(sp.exp)) == 0
        r.fact(f"homogeneous oscillator, {regime}", "eqs. (34), (37); appendix H.2",
               f"ẍ + 2γẋ + ω²x = 0, x(0) = x₀, ẋ(0) = 0, solved by dsolve with γ {'>' if regime == 'overdamped' else '=' if regime == 'critical' else '<'} ω.",
               ok, "difference (rewritten with exp) simplifies to 0" if ok else "MISMATCH",
               [rf"\text{{derived:}}\quad {tex(hom)}", rf"\text{{paper:}}\quad {tex(PAPER['homogeneous'][regime])}"])
        green = green_function(regime)
        ok = sp.simplify((green - PAPER["green"][regime]).rewrite(sp.exp)) == 0
        r.fact(f"Green's function, {regime}", "appendix H.3", "The homogeneous solution with G(0) = 0, Ġ(0) = 1.",
               ok, "difference simplifies to 0" if ok else "MISMATCH",
               [rf"\text{{derived:}}\quad G(t) = {tex(green)}", rf"\text{{paper:}}\quad G(t) = {tex(PAPER['green'][regime])}"])
        driven = oscillator_driven(regime)
        ok, detail = same_solution(driven, PAPER["driven"][regime])
        r.fact(f"driven oscillator, {regime}", "eq. (36)", "ẍ + 2γẋ + ω²x = f(t), x(0) = x₀, ẋ(0) = 0, by dsolve "
               "(variation of parameters; integrals taken over [0, t], constants from the initial conditions).",
               ok, detail, [rf"\text{{derived:}}\quad x(t) = {tex(driven)}",
                            rf"\text{{paper:}}\quad x(t) = {tex(PAPER['driven'][regime])}"])
    r.note("eq. (36), critical case, as typeset", "eq. (36)", "The extracted text reads \"(t − τ)2|dθ_A/dt|²\"; "
           "appendix H gives G(t) = t·e^{−γt}, so the integrand is e^{−γ(t−s)}·(t − s)·2|θ̇_A(s)|² (the factor 2 "
           "is the forcing's, not a square), which is what is checked above.")
    prop = check_propagator()
    r.fact("one-step propagator, all regimes", "eqs. (34), (36)", "The emitted `continuous_step` advances "
           "(Q, Q̇) with Φ(h) = e^{−γh}[[C + γhS, hS], [−ω²hS, C − γhS]], C = cosh√z, S = sinh√z/√z, "
           "z = (γ² − ω²)h² (entire in z: cos/sin for z < 0, 1 at z = 0); checked against dsolve with general "
           "initial data in each regime.", all(prop.values()), ", ".join(f"{k}: {'ok' if v else 'FAIL'}"
                                                                          for k, v in prop.items()))

    # --- exact discrete laws ---------------------------------------------------------------------------------
    lw = momentum_law(derive(library.elementwise("translation")))
    a, b = lw.matrix()
    cp = characteristic(a, z)
    r.note("translation: exact two-step recurrence", "discrete; appendix C",
           f"(Q, R) = (Σθ_A, Σb_A) under torch's later steps, with M1 = ⟨g, 1_A⟩ = 0: "
           f"{'; '.join(f'{k}′ = {show(v)}' for k, v in lw.update.items())}. Eliminating R: "
           f"s_{{n+1}} = (1 + μ − ηλ(1 − τ))·s_n − μ·s_{{n−1}}.",
           [rf"A = {tex(a)},\qquad \det(zI - A) = {tex(sp.collect(cp, z))}"])
    r.check("translation: characteristic polynomial", "design brief (discrete heavy ball)", "The brief's "
            "s_{n+1} = (1 + β − ηλ)s_n − βs_{n−1} is the engine's at τ = 0 (with dampening, ηλ → ηλ(1 − τ)).",
            cp.subs(TAU, 0), DESIGN["translation_charpoly"], labels=("engine (τ = 0)", "brief"))
    hh, rr = sp.symbols("h r", positive=True)
    limit = sp.series((cp.subs(ETA, hh / (1 - TAU)) * sp.exp(-rr * hh)).subs(z, sp.exp(rr * hh)) / hh, hh, 0, 2).removeO()
    cont_poly = _paper(PAPER["flow"]["mass"]).subs(ETA * (1 - TAU), hh) * rr**2 + (1 - MU) * rr + LAMBDA
    cont_poly = sp.expand(cont_poly.subs(ETA, hh / (1 - TAU)))
    r.check("translation: continuum limit", "eq. (33)", "With z = e^{rh}: det(zI − A)/(z·h) = (h/2)(1 + μ)r² + "
            "(1 − μ)r + λ + O(h²), the characteristic polynomial of eq. (33) — the modified flow is the "
            "discrete oscillator to second order.", sp.expand(limit), cont_poly, labels=("engine", "eq. (33)"))
    disc = sp.factor(sp.discriminant(cp, z))
    r.note("damping regimes, discrete vs continuous", "eq. (34)", "The discrete roots are complex (oscillation) "
           "when the discriminant below is negative; the continuous model oscillates when γ < ω, i.e. "
           "(1 − μ)² < 2λh(1 + μ) with h = η(1 − τ). They differ by the h²λ² term. When the roots are complex "
           "their product is μ, so |z| = √μ: the discrete envelope decays like μ^{n/2}.",
           [rf"\Delta_{{\rm discrete}} = {tex(sp.expand(disc))}",
            rf"\Delta_{{\rm continuous}}\,h^2(1+\mu)^2 = 4\,(\gamma^2 - \omega^2)\,h^2(1+\mu)^2/4 = "
            rf"{tex(sp.expand((1 - MU)**2 - 2 * LAMBDA * hh * (1 + MU)))}"])
    tri = momentum_law(derive(library.elementwise("scale")))
    derived_tri = {k: sp.expand(e.xreplace({quantity("M1"): 0}).subs(TAU, 0)) for k, e in tri.update.items()}
    r.check("scale: exact (Q, P, R) recurrence", "design brief (discrete heavy ball)", "θ' and b' expanded, "
            "q(θ'), B(θ', b'), q(b') matched against Q, P, R, G, C, M1 (engine, shown at τ = 0 with M1 = 0) vs the "
            "brief's R' = β²R + λ²Q + 2βλP + G + 2βC, Q' = Q − 2η(βP + λQ) + η²R', P' = βP + λQ − ηR'.",
            derived_tri, {k: sp.expand(v) for k, v in DESIGN["triple"].items()}, labels=("engine", "brief"))
    return r.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
