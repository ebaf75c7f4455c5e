"""Random one-parameter elementwise actions, and random losses that have (or lack) their symmetry.

Three things a property test needs, usable from any test suite (``hypothesis`` is only imported by
:func:`elementwise_actions`):

1. :func:`elementwise_actions` — a hypothesis strategy of random *declarations* (spec strings, parsed by
   the engine into an :class:`~symtools.symbolic.action.ElementwiseAction`) that are genuine one-parameter
   groups with a unique identity element.
2. :class:`InvariantLoss` — a random smooth loss of float64 torch tensors (one tensor per slot) that *has*
   the symmetry exactly, built through the engine's emitted torch ``ACTION`` functions; and
   :class:`RandomLoss`, the same kind of random function without the symmetry (a negative control).
3. :func:`identity_residuals` — the gradient, Hessian and second-order identities of a generated module
   evaluated with autograd (gradient and double-backward Hessian-vector products), each with its scale.

How a drawn action is guaranteed to be a one-parameter group
-------------------------------------------------------------
Every slot gets a vector field in a canonical *additive* parameter b, and its image is the exact flow of
that field (so ψ(ψ(θ, b₁), b₂) = ψ(θ, b₁ + b₂) by construction, and b = 0 is the identity):

=============  =====================  ==========================================================
kind           field v (in b)         flow ψ(θ, b)
=============  =====================  ==========================================================
``scale``      k·x                    x·e^{k b}
``translate``  c                      x + c b
``fixed``      0                      x                     (only useful as a shear source)
``shear``      c·x_src                y + c ∫₀ᵇ ψ_src(θ, s) ds   (x_src a scale/translate/fixed slot)
=============  =====================  ==========================================================

The shear row is the "sum of slots" form: y moves by a multiple of another slot. Its field depends only
on the source slot, whose own flow is autonomous, so the integral is the exact flow (for a fixed source it
is ``y + c*b*x``; for a translating source ``y + c*b*x + c*d*b**2/2``; for a scaling one
``y + c*x*(e^{k b} - 1)/k``). Writing ``y -> y + c*a*x`` next to a *moving* x would not be a group.

The declaration is then written in one of two parameterisations of the same group, never mixed:
*additive* (``a`` real, b = a, identity 0: ``exp(k*a)*x``, ``x + c*a``) or *multiplicative*
(``a > 0``, b = log a, identity 1: ``a**k*x``, ``x + c*log(a)``). A power ``a**k`` cannot sit beside a
plain ``x + c*a`` (that pair has no common identity); the conversion b = log a makes them compatible.
The identity is unique because at least one slot moves and every moving flow is injective in b.
:func:`group_law_residual` checks the composition law symbolically for any action.

Why :class:`InvariantLoss` is exactly invariant
-----------------------------------------------
Pick a reference element r (element 0 of a slot with a nonzero generator) and a level C. SymPy solves the
slice equation ψ_r(θ, a) = C for a in closed form, a*(θ) (or |ψ_r| = C, written log ψ_r² = log C² or
ψ_r² = C², which reaches every orbit of a scaling slot whatever the sign of θ_r). A root is kept only if it
is real, finite and solves the equation at random points, and if it sends θ and ψ(θ, b) to the same point
for several group elements b (both checked numerically through the emitted code: SymPy's roots are not
trusted blindly). Then

    L(θ) = F(ψ(θ, a*(θ)))                 F a random smooth function (tanh MLP + quadratic)

is the value of F at the point where θ's orbit crosses the slice. For any group element b, ψ(θ, b) lies on
the same orbit; ψ(ψ(θ, b), a*(ψ(θ, b))) = ψ(θ, a*(ψ(θ, b))∘b) is on that orbit and on the slice. Along an
orbit ψ_r is strictly monotone in the parameter (the reference element's generator is nonzero: a
translation, a scaling of a nonzero element, a shear with a nonzero source), so the orbit meets the slice
once (once per sign of ψ_r for the squared equation, and that sign is invariant), and both points are the
same: L(ψ(θ, b)) = L(θ). This holds for composed parameters a∘b of any group law, as only "same orbit"
is used. Hence L has exactly the declared symmetry and, F being generic, no other continuous one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import sympy as sp
import torch

from symtools.codegen.emit import emit, load_module
from symtools.codegen.printer import torch_expr
from symtools.errors import SpecError
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.derive import derive

__all__ = [
    "SlotLaw",
    "DrawnAction",
    "build_action",
    "elementwise_actions",
    "group_law_residual",
    "generated_module",
    "find_slice",
    "Slice",
    "InvariantLoss",
    "RandomLoss",
    "invariant_loss",
    "random_loss",
    "random_point",
    "gradient",
    "hvp",
    "identity_residuals",
    "perturbed",
    "derivation",
    "apply_action",
    "gradient_flow",
]

SCALE, TRANSLATE, FIXED, SHEAR = "scale", "translate", "fixed", "shear"
KINDS = (SCALE, TRANSLATE, FIXED, SHEAR)
# Small exponents and coefficients, integers and simple fractions (nonzero: a zero would not move the slot).
EXPONENTS = tuple(sp.Rational(p) for p in ("1", "-1", "2", "-2", "3", "1/2", "-1/2", "3/2", "-2/3"))
COEFFICIENTS = tuple(sp.Rational(p) for p in ("1", "-1", "2", "-3", "1/2", "-3/2"))
SLOT_NAMES = ("x", "y", "z", "w1", "b_in", "u2", "theta", "W_out")


# --------------------------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class SlotLaw:
    """The field of one slot in the canonical additive parameter b (see the module docstring)."""

    slot: str
    kind: str
    coeff: sp.Rational = sp.Integer(0)
    source: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown slot kind {self.kind!r}; one of {KINDS}")
        if (self.kind == SHEAR) != (self.source is not None):
            raise ValueError("a shear slot needs a source slot, and only a shear slot has one")
        if self.kind != FIXED and self.coeff == 0:
            raise ValueError(f"slot {self.slot!r}: a {self.kind} needs a nonzero coefficient")

    @property
    def moves(self) -> bool:
        return self.kind != FIXED


@dataclass(frozen=True)
class DrawnAction:
    """A random declaration: the spec text, the engine's parse of it, and how it was built."""

    spec: str
    action: ElementwiseAction
    laws: tuple[SlotLaw, ...]
    multiplicative: bool

    @property
    def identity(self) -> int:
        return 1 if self.multiplicative else 0

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"DrawnAction({self.spec!r})"


def build_action(laws: Sequence[SlotLaw], multiplicative: bool, name: str = "") -> DrawnAction:
    """Write the flows of ``laws`` as a declaration in the chosen parameterisation, and parse it."""
    b = sp.Symbol("b", real=True)
    a = sp.Symbol("a", positive=True) if multiplicative else sp.Symbol("a", real=True)
    to_a = sp.log(a) if multiplicative else a
    flows: dict[str, sp.Expr] = {}
    by_slot: dict[str, SlotLaw] = {}
    for law in laws:
        x = sp.Symbol(law.slot, real=True)
        if law.kind == SCALE:
            flows[law.slot] = x * sp.exp(law.coeff * b)
        elif law.kind == TRANSLATE:
            flows[law.slot] = x + law.coeff * b
        elif law.kind == FIXED:
            flows[law.slot] = x
        else:  # y + c ∫₀ᵇ ψ_src(θ, s) ds for the source's flow (declared earlier)
            flows[law.slot] = x + law.coeff * _flow_integral(by_slot[law.source], b)
        by_slot[law.slot] = law
    images = {slot: sp.powsimp(sp.expand(f.subs(b, to_a))) for slot, f in flows.items()}
    spec = "; ".join(f"{slot} -> {sp.sstr(img)}" for slot, img in images.items())
    if multiplicative:
        spec += "; a > 0"
    return DrawnAction(spec, ElementwiseAction.from_spec(spec, name=name), tuple(laws), multiplicative)


def _flow_integral(source: SlotLaw, b: sp.Symbol) -> sp.Expr:
    """∫₀ᵇ ψ_src(θ, s) ds in closed form for a fixed, translating or scaling source slot."""
    x = sp.Symbol(source.slot, real=True)
    if source.kind == FIXED:
        return x * b
    if source.kind == TRANSLATE:
        return x * b + source.coeff * b**2 / 2
    if source.kind == SCALE:
        return x * (sp.exp(source.coeff * b) - 1) / source.coeff
    raise ValueError(f"a shear's source must be fixed, translating or scaling, not {source.kind}")


def elementwise_actions(max_slots: int = 3, kinds: Sequence[str] = KINDS, multiplicative: bool | None = None):
    """Hypothesis strategy of :class:`DrawnAction`: 1–``max_slots`` slots, each a power/exponential scaling,
    a translation, a shear by an earlier slot ("sum of slots") or fixed, in one parameterisation.

    ``kinds`` restricts the slot kinds (e.g. ``("scale", "translate")`` for actions that have a Noether
    charge: a shear's Jacobian is never symmetric). ``multiplicative`` forces the parameterisation
    (``a > 0``, identity 1) or the additive one (identity 0); ``None`` draws it. Every drawn action is a
    one-parameter group with a unique identity; the module docstring says why.
    """
    from hypothesis import strategies as st

    kinds = tuple(kinds)
    if not set(kinds) <= set(KINDS) or not ({SCALE, TRANSLATE, SHEAR} & set(kinds)):
        raise ValueError(f"kinds must be a subset of {KINDS} containing a moving kind")

    @st.composite
    def draw_action(draw):
        n = draw(st.integers(1, max_slots))
        names = draw(st.permutations(SLOT_NAMES))[:n]
        mult = draw(st.booleans()) if multiplicative is None else multiplicative
        laws: list[SlotLaw] = []
        for i, slot in enumerate(names):
            sources = [law.slot for law in laws if law.kind != SHEAR]
            allowed = [k for k in kinds if (k != SHEAR or sources)]
            last = i == n - 1
            if last and not any(law.moves for law in laws):
                allowed = [k for k in allowed if k != FIXED]  # something must move
            kind = draw(st.sampled_from(allowed))
            if kind == SCALE:
                laws.append(SlotLaw(slot, SCALE, draw(st.sampled_from(EXPONENTS))))
            elif kind == FIXED:
                laws.append(SlotLaw(slot, FIXED))
            else:
                coeff = draw(st.sampled_from(COEFFICIENTS))
                source = draw(st.sampled_from(sources)) if kind == SHEAR else None
                laws.append(SlotLaw(slot, kind, coeff, source))
        return build_action(laws, mult)

    return draw_action()


def group_law_residual(action: ElementwiseAction) -> dict[str, sp.Expr]:
    """ψ_s(ψ(θ, b), a) − ψ_s(θ, a∘b) per slot, simplified; all zero iff the composition law holds.

    The law is read off the identity: a∘b = a + b for identity 0, a·b for identity 1 (the two
    parameterisations :func:`elementwise_actions` draws). Other identities raise ``ValueError``.
    """
    a = action.parameter
    b = sp.Symbol("b", **a.assumptions0)
    if action.identity == 0:
        composed = a + b
    elif action.identity == 1:
        composed = a * b
    else:
        raise ValueError(f"no standard composition law for identity {action.identity}")
    inner = {action.symbol(s): img.xreplace({a: b}) for s, img in action.images.items()}
    out = {}
    for s, img in action.images.items():
        diff = img.xreplace(inner) - img.xreplace({a: composed})
        out[s] = sp.simplify(sp.expand_log(sp.expand(diff)))
    return out


def perturbed(drawn: DrawnAction, slot: str | None = None) -> DrawnAction:
    """A *wrong* action for negative controls: its generator is not parallel to ``drawn``'s.

    ``slot`` (default: the first moving slot) is changed: with two or more moving slots its coefficient is
    doubled; with one, its kind is swapped (scale ↔ translate; a shear becomes a scaling). Fixed slots
    stay fixed. Perturbing different slots gives different wrong actions: a negative control that must
    not pass by a coincidence on one slot can try each (see ``tests/test_conservation.py``).
    """
    laws = list(drawn.laws)
    moving = [i for i, law in enumerate(laws) if law.moves]
    i = moving[0] if slot is None else next(j for j, law in enumerate(laws) if law.slot == slot)
    law = laws[i]
    if not law.moves:
        raise ValueError(f"slot {law.slot!r} is fixed by the action; perturb a moving slot")
    if len(moving) >= 2:
        laws[i] = SlotLaw(law.slot, law.kind, 2 * law.coeff, law.source)
    elif law.kind == SCALE:
        laws[i] = SlotLaw(law.slot, TRANSLATE, law.coeff)
    else:
        laws[i] = SlotLaw(law.slot, SCALE, law.coeff)
    return build_action(laws, drawn.multiplicative)


# ------------------------------------------------------------------------------------ generated code
_DERIVATIONS: dict[tuple, object] = {}
_MODULES: dict[tuple, object] = {}


def _key(action: ElementwiseAction) -> tuple:
    return (action.spec(), str(action.parameter), action.name)


def derivation(action: ElementwiseAction):
    """``derive(action)``, cached by declaration (a derivation is a pure function of the declaration)."""
    key = _key(action)
    if key not in _DERIVATIONS:
        _DERIVATIONS[key] = derive(action)
    return _DERIVATIONS[key]


def generated_module(action: ElementwiseAction):
    """The emitted torch module of ``action`` (derive → emit → load; cached by declaration)."""
    key = _key(action)
    if key not in _MODULES:
        _MODULES[key] = load_module(emit(derivation(action)), name=f"symtools_generated_{action.name or 'symmetry'}")
    return _MODULES[key]


def _call(module, kind: str, slot: str, values: dict):
    return getattr(module, kind.upper())[slot](*[values[n] for n in module.ARGS[kind][slot]])


def apply_action(module, thetas: Sequence[torch.Tensor], a) -> tuple[torch.Tensor, ...]:
    """ψ(θ, a) through the module's generated ``ACTION`` functions (slots in ``module.SLOTS`` order)."""
    values = dict(zip(module.SLOTS, thetas))
    # Generated code calls torch functions on the parameter (torch.exp(2*a)): give it a tensor.
    values[module.PARAMETER] = a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=thetas[0].dtype)
    return tuple(_call(module, "action", s, values) for s in module.SLOTS)


# ------------------------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class Slice:
    """a*(θ_r): the parameter that moves the reference element r (element 0 of ``slot``) onto the slice."""

    slot: str
    equation: sp.Expr
    solution: sp.Expr
    source: str
    fn: Callable

    def __call__(self, *refs: torch.Tensor) -> torch.Tensor:
        return self.fn(*refs)


def _torch_function(args: Sequence[str], expr: sp.Expr) -> Callable:
    text = f"def f({', '.join(args)}):\n    return {torch_expr(expr)}\n"
    namespace = {"torch": torch}
    exec(compile(text, "<slice>", "exec"), namespace)
    return namespace["f"]


def _check_points(slots: Sequence[str], count: int = 24, seed: int = 12345) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: _away_from_zero(torch.randn(count, generator=gen, dtype=torch.float64)) for s in slots}


def _group_elements(a: sp.Symbol, identity: sp.Expr, count: int = 3) -> list[float]:
    """A few parameter values away from the identity, inside the parameter's domain."""
    e = float(identity)
    return [e * f for f in (1.7, 0.6, 2.5)][:count] if a.is_positive else [e + d for d in (0.7, -0.4, 1.1)][:count]


_SLICES: dict[tuple, Slice] = {}


def _slice_for(action: ElementwiseAction, level: float) -> Slice:
    module = generated_module(action)
    a = action.parameter
    slots = action.slots
    gens = derivation(action).generator
    C = sp.Symbol("C", positive=True)
    points = _check_points(slots)
    refs = [points[t] for t in slots]
    moved = [apply_action(module, refs, b) for b in _group_elements(a, action.identity)]
    level_ = sp.nsimplify(level)
    # Slots with a moving reference element, simplest image first. Per slot: the plain equation ψ_r = C,
    # and |ψ_r| = C written as log(ψ_r²) = log(C²) (SymPy solves this in a form valid for either sign of
    # θ_r; tried first when ψ_r is a pure rescaling f(a)·θ_r, whose orbits never cross 0) or ψ_r² = C².
    order = sorted((t for t in slots if gens[t] != 0), key=lambda t: (sp.count_ops(action.images[t]), slots.index(t)))
    for s in order:
        psi, i, x = action.images[s], slots.index(s), action.symbol(s)
        plain, logsq, square = psi - C, sp.expand_log(sp.log(psi**2)) - sp.log(C**2), psi**2 - C**2
        rescaling = not sp.simplify(psi / x).free_symbols - {a}
        for eq in ((logsq, plain, square) if rescaling else (plain, logsq, square)):
            try:
                # Unchecked and unsimplified (10× faster): every root is validated numerically below.
                sols = sp.solve(eq, a, check=False, simplify=False)
            except (NotImplementedError, ValueError):
                continue
            sols = [sol.subs(C, level_) for sol in sols]
            sols = [sol for sol in sols if not sol.has(a) and not sol.has(sp.I) and sol.free_symbols
                    and sol.free_symbols <= set(action.symbols)]
            for sol in sorted(sols, key=sp.count_ops):
                try:
                    fn = _torch_function(slots, sol)
                except Exception:  # noqa: BLE001 - a root the printer cannot write is skipped
                    continue
                if _slice_ok(fn, module, refs, moved, i, a.is_positive, eq is plain, level):
                    return Slice(s, eq.subs(C, level_), sol, torch_expr(sol), fn)
    raise SpecError(f"no closed-form slice a*(θ) found for {action.spec()!r}; build the invariant loss from "
                    f"explicit invariants instead (ratios, differences) for this action")


def _slice_ok(fn, module, refs, moved, i, positive, plain, level) -> bool:
    """Numerical acceptance of a candidate a*: real, finite, in the parameter's domain, solves the slice
    equation, and sends θ and ψ(θ, b) to the same canonical point for several group elements b."""
    def canonical(thetas):
        astar = fn(*thetas)
        if not isinstance(astar, torch.Tensor) or astar.shape != thetas[0].shape:
            raise ValueError("the slice must be a function of θ")
        if not torch.isfinite(astar).all() or (positive and not (astar > 0).all()):
            raise ValueError("outside the parameter's domain")
        return apply_action(module, thetas, astar)

    try:
        base = canonical(refs)
        others = [canonical(m) for m in moved]
    except Exception:  # noqa: BLE001 - a candidate that torch cannot evaluate here is rejected
        return False
    miss = (base[i] if plain else base[i].abs()) - level
    if not miss.abs().max() < 1e-9 * level:
        return False
    return all(float((o - p).abs().max()) <= 1e-9 * (1 + float(p.abs().max()))
               for other in others for o, p in zip(other, base))


def find_slice(action: ElementwiseAction, level: float = 1.0) -> Slice:
    """The closed-form slice a*(θ) of ``action`` at level C = ``level`` (cached by declaration)."""
    key = (*_key(action), float(level))
    if key not in _SLICES:
        _SLICES[key] = _slice_for(action, float(level))
    return _SLICES[key]


# -------------------------------------------------------------------------------------------- losses
def _away_from_zero(u: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    return u + margin * torch.where(u >= 0, 1.0, -1.0).to(u.dtype)


def random_point(slots: Sequence[str] | ElementwiseAction, shape=(4,), seed: int = 0,
                 margin: float = 0.5) -> tuple[torch.Tensor, ...]:
    """One float64 tensor per slot, N(0, 1) entries pushed ``margin`` away from zero (|θ_i| ≥ margin).

    Scalings and shears divide by the reference element; keeping elements away from zero keeps the
    slice well conditioned.
    """
    slots = slots.slots if isinstance(slots, ElementwiseAction) else tuple(slots)
    gen = torch.Generator().manual_seed(seed)
    return tuple(_away_from_zero(torch.randn(*shape, generator=gen, dtype=torch.float64), margin) for _ in slots)


class _SmoothFunction:
    """F(z) = w₂ᵀ tanh(W₁ z + b₁) + ¼ zᵀ S z / dim, random (seeded) weights, z the flattened slot tensors."""

    def __init__(self, dim: int, seed: int, hidden: int = 8):
        gen = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        self.W1 = r(hidden, dim) / math.sqrt(dim)
        self.b1 = 0.5 * r(hidden)
        self.w2 = r(hidden) / math.sqrt(hidden)
        A = r(dim, dim) / math.sqrt(dim)
        self.S = (A @ A.T + 0.5 * torch.eye(dim, dtype=torch.float64)) / (4 * dim)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.w2 @ torch.tanh(self.W1 @ z + self.b1) + z @ self.S @ z


class RandomLoss:
    """A random smooth loss F(θ) of the slot tensors with no symmetry at all (the negative control)."""

    def __init__(self, slots: Sequence[str] | ElementwiseAction, shape=(4,), seed: int = 0, hidden: int = 8):
        self.slots = slots.slots if isinstance(slots, ElementwiseAction) else tuple(slots)
        self.shape = tuple(shape)
        self.F = _SmoothFunction(len(self.slots) * math.prod(self.shape), seed, hidden)

    def __call__(self, *thetas: torch.Tensor) -> torch.Tensor:
        return self.F(torch.cat([t.reshape(-1) for t in thetas]))


class InvariantLoss(RandomLoss):
    """L(θ) = F(ψ(θ, a*(θ))): a random smooth loss that has the symmetry ``action`` exactly.

    ψ is applied by the generated module's ``ACTION`` functions (default: emitted from ``action`` now;
    pass ``module=`` to test a checked-in generated module). See the module docstring for the proof.
    """

    def __init__(self, action: ElementwiseAction, shape=(4,), seed: int = 0, hidden: int = 8,
                 module=None, level: float = 1.0):
        super().__init__(action.slots, shape, seed, hidden)
        self.action = action
        self.module = module if module is not None else generated_module(action)
        if tuple(self.module.SLOTS) != action.slots:
            raise ValueError(f"module slots {self.module.SLOTS} differ from the action's {action.slots}")
        self.slice = find_slice(action, level)

    def canonical(self, *thetas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ψ(θ, a*(θ)): the point where θ's orbit crosses the slice."""
        astar = self.slice(*[t.reshape(-1)[0] for t in thetas])
        return apply_action(self.module, thetas, astar)

    def __call__(self, *thetas: torch.Tensor) -> torch.Tensor:
        return super().__call__(*self.canonical(*thetas))


def invariant_loss(action: ElementwiseAction, shape=(4,), seed: int = 0, **kw) -> InvariantLoss:
    return InvariantLoss(action, shape, seed, **kw)


def random_loss(slots: Sequence[str] | ElementwiseAction, shape=(4,), seed: int = 0, **kw) -> RandomLoss:
    return RandomLoss(slots, shape, seed, **kw)


# ----------------------------------------------------------------------------- autograd and residuals
def gradient(loss: Callable, thetas: Sequence[torch.Tensor], create_graph: bool = False):
    """(L, g) with g = ∇L by autograd; with ``create_graph`` g is differentiable again (for HVPs)."""
    params = tuple(t.detach().clone().requires_grad_(True) for t in thetas)
    value = loss(*params)
    grads = torch.autograd.grad(value, params, create_graph=create_graph)
    return params, value, grads


def hvp(params, grads) -> Callable:
    """H·u by double backward, from ``(params, _, grads) = gradient(..., create_graph=True)``."""

    def product(directions):
        return torch.autograd.grad(grads, params, grad_outputs=tuple(d.detach() for d in directions),
                                   retain_graph=True)

    return product


def _norm(tensors) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def identity_residuals(module, loss: Callable, thetas: Sequence[torch.Tensor],
                       seed: int = 0) -> dict[str, tuple[float, float]]:
    """The three identities of ``module`` for ``loss`` at θ: name → (|residual|, scale of its terms).

    With g = ∇L and H = ∇²L by autograd (double backward), v = generator, w = ``GENERATOR_SECOND``,
    K g = ``HESSIAN_COUPLING``, and ‖H‖ estimated as ‖H u‖ for a random unit vector u:

    - gradient:     |⟨g, v⟩| (generated ``gradient_identity``);         scale Σ_i |g_i v_i|
    - hessian:      ‖H v + K g‖ (generated ``hessian_identity_residual``); scale ‖H‖‖v‖ + ‖K g‖
    - second_order: |vᵀHv + ⟨g, w⟩|;                                   scale ‖H‖‖v‖² + Σ_i |g_i w_i|

    Each scale is the size of the terms that cancel, so residual/scale is round-off (≈1e-15·depth) for a
    loss with the symmetry and O(1) for one without. (Each scale stays nonzero when one of its terms
    vanishes identically, e.g. H v = 0 for a translation.)
    """
    params, _, grads = gradient(loss, thetas, create_graph=True)
    slots = tuple(module.SLOTS)
    th = {s: p.detach() for s, p in zip(slots, params)}
    gd = {s: g.detach() for s, g in zip(slots, grads)}
    gvals = {**th, **{f"g_{s}": gd[s] for s in slots}}
    prod = hvp(params, grads)
    v = module.generator(*th.values())
    w = tuple(_call(module, "generator_second", s, th) for s in slots)
    kg = tuple(_call(module, "hessian_coupling", s, gvals) for s in slots)
    gen = torch.Generator().manual_seed(seed)
    u = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in th.values())
    h_norm = _norm(prod(u)) / _norm(u)
    hv = prod(v)
    v_norm = _norm(v)
    out = {}
    gi = module.gradient_identity(*th.values(), *gd.values())
    out["gradient"] = (abs(float(gi)), sum(float((g * vi).abs().sum()) for g, vi in zip(gd.values(), v)))
    res = module.hessian_identity_residual(*th.values(), *gd.values(), prod)
    out["hessian"] = (_norm(res), h_norm * v_norm + _norm(kg))
    vhv = sum(float((vi * h).sum()) for vi, h in zip(v, hv))
    gw = sum(float((g * wi).sum()) for g, wi in zip(gd.values(), w))
    out["second_order"] = (abs(vhv + gw),
                           h_norm * v_norm**2 + sum(float((g * wi).abs().sum()) for g, wi in zip(gd.values(), w)))
    return out


# -------------------------------------------------------------------------------------- gradient flow
def gradient_flow(loss: Callable, thetas: Sequence[torch.Tensor], t_end: float, rtol: float = 1e-10,
                  atol: float = 1e-12, method: str = "DOP853"):
    """Integrate θ' = −∇L(θ) from ``thetas`` to ``t_end`` with ``scipy.integrate.solve_ivp``.

    Returns (θ(t_end) as a tuple of float64 tensors shaped like ``thetas``, the ``OdeResult``). Raises
    ``RuntimeError`` if the solver fails. The gradient comes from autograd in float64.
    """
    import numpy as np
    from scipy.integrate import solve_ivp

    shapes = [t.shape for t in thetas]
    sizes = [t.numel() for t in thetas]

    def unflatten(y):
        parts = torch.split(torch.from_numpy(np.asarray(y, dtype=np.float64)), sizes)
        return tuple(p.reshape(s) for p, s in zip(parts, shapes))

    def rhs(_t, y):
        _, _, grads = gradient(loss, unflatten(y))
        return -torch.cat([g.reshape(-1) for g in grads]).numpy()

    y0 = torch.cat([t.detach().reshape(-1) for t in thetas]).numpy()
    sol = solve_ivp(rhs, (0.0, t_end), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"gradient flow failed: {sol.message}")
    return unflatten(sol.y[:, -1]), sol
