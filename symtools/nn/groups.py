"""Symmetry groups bound to real parameter tensors.

A *family* (translation, scale, rescale, or any declared symmetry) is an elementwise action on a few
named *slots* (``x`` for translation/scale; ``x_in``/``x_out`` for rescale). In a model, one
:class:`GroupSet` says which tensors each slot is, and along which axis the groups run. A per-group
quantity is then ``reduce(f(tensor, ...), all axes but the group axis)``: one call per slot and tensor,
no loop over neurons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    epsilon_of: str | tuple[str, ...] | None = None  # several: a residual stream read by several norms
    #: c of that ε law, ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε_c: scaling θ_A by a scales the norm's input by a^k (k the
    #: path's homogeneity degree), which ε' = ε·a^(−2k) undoes, so c = −2k, derived by
    #: :func:`symtools.symbolic.normalization.epsilon_factor` (−2 for the usual degree-1 path, −4 for
    #: Linear → z² → BatchNorm). Read only where ``epsilon_of`` is set.
    epsilon_factor: float = -2.0

    def params(self) -> list[str]:
        return sorted({t.param for ts in self.slots.values() for t in ts})


@dataclass(frozen=True)
class MatrixPiece:
    """A block of one parameter seen as a matrix, for a matrix-family slot.

    A 2-D parameter is its own matrix; a 1-D parameter (a bias) is one row ``(1, n)``. ``rows``/``cols`` are
    half-open ranges ``(start, stop)`` of that matrix (``None``: all of them); ``transpose`` transposes the
    block afterwards. Example: head i of a torch ``nn.Linear`` query projection seen as the d_model × d_head
    matrix W_Q of ``x W_Q``: ``MatrixPiece("q_proj.weight", rows=(i*dh, (i+1)*dh), transpose=True)``; its bias
    as the extra row of an augmented ``[W_Q; b_Q]``: ``MatrixPiece("q_proj.bias", cols=(i*dh, (i+1)*dh))``.
    """

    param: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class MatrixGroupSet:
    """``len(groups)`` groups of a matrix family (``symtools.symbolic.library.MATRIX``: attention_qk,
    attention_vo, gl_linear_pair, rotation_pair) at one site of a model.

    ``groups[k]`` maps each slot of the family (e.g. ``W_Q``, ``W_K``) to its pieces; the pieces of a slot are
    joined along ``stack[slot]``: ``"rows"`` (stacked vertically: the bias row under a weight, or the query
    heads that share one key/value head) or ``"cols"`` (side by side: the output-projection blocks of those
    query heads). Every group of a set has the same piece shapes, so a quantity of all groups is one batched
    matrix product. ``algebra``: a ``(r, h, h)`` float64 basis of the Lie subalgebra the group runs through
    (e.g. the matrices that commute with a rotary embedding's rotations), or ``None`` for the family's whole
    algebra (gl_h: dimension h², so_h: h(h−1)/2).
    """

    family: str
    layer: str
    groups: tuple[Mapping[str, tuple[MatrixPiece, ...]], ...]
    stack: Mapping[str, str]
    algebra: Any = None
    note: str = ""

    @property
    def count(self) -> int:
        return len(self.groups)

    def params(self) -> list[str]:
        return sorted({p.param for g in self.groups for pieces in g.values() for p in pieces})


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
    #: groups of matrix families (attention heads); checked by :mod:`symtools.numeric.matrix_checks`
    matrix_sets: list[MatrixGroupSet] = field(default_factory=list)

    def families(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for gs in self.group_sets:
            out[gs.family] = out.get(gs.family, 0) + gs.count
        return out

    def of_family(self, family: str) -> list[GroupSet]:
        return [gs for gs in self.group_sets if gs.family == family]
