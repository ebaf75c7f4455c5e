"""One-parameter elementwise group actions ψ(θ, a) on named slots, and their identity element."""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from symtools.errors import SpecError
from symtools.symbolic.spec import check_slot_name, parse_spec


@dataclass(frozen=True)
class ElementwiseAction:
    """θ_s ↦ ψ_s(θ, a) for each slot s, applied to every element of the slot's tensor alike.

    ``images`` maps slot name → ψ_s; slot symbols are real SymPy symbols named after the slot.
    ``identity`` is the group parameter value e with ψ(θ, e) = θ for all θ (found, not declared).
    """

    images: dict[str, sp.Expr]
    parameter: sp.Symbol
    identity: sp.Expr
    name: str = ""

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.images)

    def symbol(self, slot: str) -> sp.Symbol:
        return sp.Symbol(slot, real=True)

    @property
    def symbols(self) -> tuple[sp.Symbol, ...]:
        return tuple(self.symbol(s) for s in self.slots)

    def spec(self) -> str:
        """The declaration as text that :func:`parse_spec` reads back."""
        text = "; ".join(f"{s} -> {sp.sstr(e)}" for s, e in self.images.items())
        if self.parameter.is_positive:
            text += f"; {self.parameter} > 0"
        return text

    @classmethod
    def from_spec(cls, text: str, parameter: str = "a", name: str = "") -> "ElementwiseAction":
        images, a = parse_spec(text, parameter)
        return cls.build(images, a, name=name)

    @classmethod
    def build(cls, images: dict[str, sp.Expr], parameter: sp.Symbol, name: str = "") -> "ElementwiseAction":
        for slot in images:
            check_slot_name(slot, str(parameter))
        images = {s: sp.sympify(e) for s, e in images.items()}
        if not any(e.has(parameter) for e in images.values()):
            raise SpecError(f"no slot's image depends on the group parameter {parameter}; "
                            f"write e.g. \"x -> {parameter}*x\"")
        identity = find_identity(images, parameter)
        return cls(images=images, parameter=parameter, identity=identity, name=name)


def find_identity(images: dict[str, sp.Expr], a: sp.Symbol) -> sp.Expr:
    """Solve ψ_s(θ, a) = θ_s for every slot at once; the unique θ-independent solution is the identity."""
    symbols = {sp.Symbol(s, real=True) for s in images}
    moving = [(s, e) for s, e in images.items() if e.has(a)]
    candidates: set[sp.Expr] | None = None
    dependent: list[sp.Expr] = []
    for slot, image in moving:
        try:
            sols = sp.solve(sp.Eq(image, sp.Symbol(slot, real=True)), a, dict=False)
        except (NotImplementedError, ValueError) as exc:
            raise SpecError(f"cannot solve {sp.sstr(image)} = {slot} for {a}: {exc}") from None
        sols = [sp.simplify(x) for x in (sols if isinstance(sols, list) else [sols])]
        dependent += [x for x in sols if x.free_symbols & symbols]
        found = {x for x in sols if not (x.free_symbols & symbols)}
        # Union, not intersection: SymPy may return a θ-dependent root that contains the identity on part of
        # the domain (e.g. LambertW(y/x·e^{y/x}) − y/x for e^a(y + a x) = y) and omit a = 0 itself.
        candidates = found if candidates is None else candidates | found
    # Keep the candidates that fix every slot (each came from one slot's equation; check jointly).
    good = sorted(
        (e for e in (candidates or set())
         if all(sp.simplify(img.subs(a, e) - sp.Symbol(s, real=True)) == 0 for s, img in images.items())),
        key=sp.default_sort_key,
    )
    if len(good) == 1:
        return good[0]
    if not good:
        if dependent:
            raise SpecError(f"no identity element: ψ(θ, {a}) = θ only at {a} = {sp.sstr(dependent[0])}, "
                            f"which depends on θ")
        raise SpecError(f"no identity element: no value of {a} leaves every slot unchanged")
    listed = ", ".join(sp.sstr(e) for e in good)
    raise SpecError(f"several identity candidates {a} ∈ {{{listed}}}; restrict the parameter "
                    f"(e.g. add '; {a} > 0') or reparameterise")
