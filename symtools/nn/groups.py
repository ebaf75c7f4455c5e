"""Symmetry groups bound to real parameter tensors.

A *family* (translation, scale, rescale, or any declared symmetry) is an elementwise action on a few
named *slots* (``x`` for translation/scale; ``x_in``/``x_out`` for rescale). In a model, one
:class:`GroupSet` says which tensors each slot is, and along which axis the groups run. A per-group
quantity is then ``reduce(f(tensor, ...), all axes but the group axis)``: one call per slot and tensor,
no loop over neurons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class TensorSlice:
    """One parameter tensor seen by a slot.

    ``param`` is the name in ``model.named_parameters()``. The tensor is first reshaped to ``shape``
    (``None``: keep its shape) and groups run along ``axis`` of that view; ``axis=None`` means the whole
    tensor is a single group. Example: a Linear layer after ``flatten`` of C channels of H×W maps,
    weight (out, C·H·W), seen per input channel: ``shape=(out, C, H*W), axis=1``.
    """

    param: str
    axis: int | None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GroupSet:
    """``count`` groups of one family at one site of a model (e.g. the 64 hidden units after conv 0)."""

    family: str
    layer: str
    count: int
    slots: Mapping[str, tuple[TensorSlice, ...]]
    note: str = ""
    #: name of the BatchNorm (or LayerNorm) module whose ε breaks this group's symmetry exactly (scale groups
    #: feeding a norm), or None. The checker (and the monitor through it) adds the predicted ε term.
    epsilon_of: str | None = None
    #: c of that ε law, ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε_c: scaling θ_A by a scales the norm's input by a^k (k the
    #: path's homogeneity degree), which ε' = ε·a^(−2k) undoes, so c = −2k, derived by
    #: :func:`symtools.symbolic.normalization.epsilon_factor` (−2 for the usual degree-1 path, −4 for
    #: Linear → z² → BatchNorm). Read only where ``epsilon_of`` is set.
    epsilon_factor: float = -2.0

    def params(self) -> list[str]:
        return sorted({t.param for ts in self.slots.values() for t in ts})


@dataclass
class Blocked:
    """A place where the graph walk stopped: no symmetry is assumed through ``node``."""

    node: str
    reason: str


@dataclass
class SymmetryMap:
    """Everything found in one model: the bound group sets and the places the walk refused to pass."""

    group_sets: list[GroupSet] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)

    def families(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for gs in self.group_sets:
            out[gs.family] = out.get(gs.family, 0) + gs.count
        return out

    def of_family(self, family: str) -> list[GroupSet]:
        return [gs for gs in self.group_sets if gs.family == family]
