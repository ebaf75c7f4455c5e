"""Teleportation along matrix groups: GL_h acting on a pair of linear layers with nothing nonlinear between them.

For consecutive ``nn.Linear`` layers V (h×m, bias c) and U (n×h) joined only by ``nn.Identity``, the map
x ↦ U(Vx + c) is unchanged by the declared action of ``gl_linear_pair`` (:data:`symtools.symbolic.library.MATRIX`:
U ↦ U G⁻¹, V ↦ G V, the bias moving with V as the last column of [V c]). The group element is G = exp(X) for X
in the Lie algebra gl_h (``torch.linalg.matrix_exp``), and the ascent runs on X. The declared action is applied
as written — its SymPy lambda is called on torch matrices (:class:`_Mat`: ``*`` is the matrix product, ``.I`` the
inverse, ``.T`` the transpose) — so nothing about the group is restated here.

Charge: the derived matrix charge M_Q (``MatrixDerivation.charge``: UᵀU − [V c][V c]ᵀ) at the moved point is
predicted by substituting the action into its SymPy expression and evaluating it on the tensors *before* the
move (:func:`_evaluate`); the teleport compares it with the charge measured on the moved tensors.

Optimizer state: the gradient transforms contragrediently (U' = U A ⇒ g_U' = g_U A⁻ᵀ; V' = B V ⇒ g_V' = B⁻ᵀ
g_V), so state of degree 1 in the gradient (a momentum buffer, Adam's first moment) is carried that way; state
of degree 2 (Adam's second moment) has no such transform and is reset, with a warning.

The graph walk does not bind matrix families yet (issue 12); :func:`linear_pairs` finds these pairs in an
``nn.Sequential`` (the MLPs of :mod:`symtools.nn.small` with ``activation="identity"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import sympy as sp
import torch
from torch import Tensor, nn

from symtools.errors import SymtoolsError

ACC = torch.float64
FAMILY = "gl_linear_pair"


class _Mat:
    """A torch matrix that speaks the SymPy matrix dialect of the declared actions."""

    def __init__(self, t: Tensor):
        self.t = t

    def __mul__(self, other: _Mat) -> _Mat:
        return _Mat(self.t @ other.t)

    @property
    def I(self) -> _Mat:
        return _Mat(torch.linalg.inv(self.t))

    @property
    def T(self) -> _Mat:
        return _Mat(self.t.mT)


def _evaluate(expr: sp.Basic, env: Mapping[str, Tensor]) -> Tensor:
    """A SymPy matrix expression (MatAdd, MatMul, Transpose, Inverse, symbols, numbers) evaluated on tensors."""
    if isinstance(expr, sp.MatrixSymbol):
        return env[expr.name]
    if isinstance(expr, sp.MatAdd):
        parts = [_evaluate(a, env) for a in expr.args]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    if isinstance(expr, sp.MatMul):
        scalar, mats = 1.0, []
        for a in expr.args:
            if a.is_number:
                scalar *= float(a)
            else:
                mats.append(_evaluate(a, env))
        out = mats[0]
        for m in mats[1:]:
            out = out @ m
        return scalar * out
    if isinstance(expr, sp.Transpose):
        return _evaluate(expr.arg, env).mT
    if isinstance(expr, sp.Inverse):
        return torch.linalg.inv(_evaluate(expr.arg, env))
    raise SymtoolsError(f"cannot evaluate {type(expr).__name__} in a matrix charge")


@cache
def _declared():
    """(declared action, derivation) of gl_linear_pair; the derivation takes ~3 s of SymPy, once."""
    from symtools.symbolic.library import MATRIX

    action = MATRIX[FAMILY][0]
    return action, action.derive()


@cache
def _moved_charge() -> sp.MatrixExpr:
    """M_Q with the declared action substituted: M_Q(U G⁻¹, G V) as a SymPy expression in U, V, G."""
    action, derivation = _declared()
    mats = derivation.symbols or {s: sp.MatrixSymbol(s, *dims) for s, dims in action.slot_dims.items()}
    G = sp.MatrixSymbol("G", action.h, action.h)
    images = action.action(G, **mats)
    return derivation.charge.xreplace({mats[s]: images[s] for s in images})


@dataclass(frozen=True)
class LinearPair:
    """U = ``u`` (a Linear's name) after V = ``v`` (a Linear's name; its bias, if any, moves with it)."""

    v: str
    u: str
    hidden: int
    bias: bool

    @property
    def layer(self) -> str:
        return f"{self.v} → {self.u}"


def linear_pairs(model: nn.Module) -> list[LinearPair]:
    """Consecutive Linear layers of an ``nn.Sequential`` with only ``nn.Identity`` between them."""
    if not isinstance(model, nn.Sequential):
        return []
    items = list(model.named_children())
    pairs = []
    for i, (name, mod) in enumerate(items):
        if not isinstance(mod, nn.Linear):
            continue
        j = i + 1
        while j < len(items) and isinstance(items[j][1], nn.Identity):
            j += 1
        if j < len(items) and isinstance(items[j][1], nn.Linear):
            pairs.append(LinearPair(name, items[j][0], mod.out_features, mod.bias is not None))
    return pairs


class MatrixChart:
    """One X ∈ gl_h per linear pair; the same interface as :class:`symtools.numeric.teleport.OrbitChart`."""

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]):
        self.pairs = linear_pairs(model)
        device = next(iter(params.values())).device
        self.t = [torch.zeros(p.hidden, p.hidden, dtype=ACC, device=device, requires_grad=True) for p in self.pairs]
        self.skipped: list[str] = []
        self._inverse_t: dict[str, Tensor] = {}

    @property
    def families(self) -> dict[str, int]:
        return {FAMILY: len(self.pairs)} if self.pairs else {}

    def group_parameters(self, ts: Sequence[Tensor] | None = None) -> list[Tensor]:
        return [torch.linalg.matrix_exp(X) for X in (self.t if ts is None else ts)]

    def _slots(self, pair: LinearPair, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        V = params[f"{pair.v}.weight"]
        if pair.bias:
            V = torch.cat([V, params[f"{pair.v}.bias"].unsqueeze(1)], 1)
        return params[f"{pair.u}.weight"], V

    def move(self, params: Mapping[str, Tensor], ts: Sequence[Tensor] | None = None,
             trace: Callable | None = None) -> dict[str, Tensor]:
        action, _ = _declared()
        out = dict(params)
        for pair, G in zip(self.pairs, self.group_parameters(ts)):
            before = dict(out) if trace is not None else None
            U, V = self._slots(pair, out)
            images = action.action(_Mat(G), U=_Mat(U.to(G.dtype)), V=_Mat(V.to(G.dtype)))
            U2, V2 = images["U"].t.to(U.dtype), images["V"].t.to(V.dtype)
            out[f"{pair.u}.weight"] = U2
            out[f"{pair.v}.weight"] = V2[:, :V2.shape[1] - pair.bias] if pair.bias else V2
            if pair.bias:
                out[f"{pair.v}.bias"] = V2[:, -1]
            if trace is not None:
                trace(pair, before, out, G)
        return out

    def charge_check(self, pair: LinearPair, before, after, G: Tensor) -> tuple[float, float]:
        """(worst |measured − predicted| / (size · ε₆₄), trace of the charge change), float64."""
        U, V = (t.detach().to(ACC) for t in self._slots(pair, before))
        U1, V1 = (t.detach().to(ACC) for t in self._slots(pair, after))
        G = G.detach()
        pred = _evaluate(_moved_charge(), {"U": U, "V": V, "G": G})
        measured = _evaluate(_declared()[1].charge, {"U": U1, "V": V1})
        q0 = _evaluate(_declared()[1].charge, {"U": U, "V": V})
        Gi = torch.linalg.inv(G)
        size = (Gi.abs().mT @ (U.abs().mT @ U.abs()) @ Gi.abs() + G.abs() @ (V.abs() @ V.abs().mT) @ G.abs().mT)
        resid = (measured - pred).abs() / (size.clamp_min(1e-300) * torch.finfo(ACC).eps)
        return float(resid.max()), float(torch.diagonal(measured - q0).sum())

    def prepare_state(self, ts: Sequence[Tensor]) -> None:
        """Remember A⁻ᵀ and B⁻ᵀ of the chosen move for :meth:`carry`."""
        self._carry: dict[str, list[tuple[str, Tensor]]] = {}
        for pair, G in zip(self.pairs, self.group_parameters(ts)):
            G = G.detach()
            Gi = torch.linalg.inv(G)
            # U' = U G⁻¹: g_U' = g_U (G⁻¹)⁻ᵀ = g_U Gᵀ;  V' = G V: g_V' = G⁻ᵀ g_V. A tensor can be the U of one pair
            # and the V of the next (a chain of linear layers): its transforms compose.
            self._carry.setdefault(f"{pair.u}.weight", []).append(("right", G.mT))
            self._carry.setdefault(f"{pair.v}.weight", []).append(("left", Gi.mT))
            if pair.bias:
                self._carry.setdefault(f"{pair.v}.bias", []).append(("left", Gi.mT))

    def moved_names(self) -> set[str]:
        return set(getattr(self, "_carry", {}))

    def can_carry(self, name: str, degree: int) -> bool:
        return name not in self.moved_names() or degree == 1

    def carry(self, name: str, value: Tensor, degree: int) -> Tensor:
        if name not in self.moved_names():
            return value
        v = value.to(ACC)
        for side, M in self._carry[name]:
            v = v @ M if side == "right" else M @ v
        return v.to(value.dtype)
