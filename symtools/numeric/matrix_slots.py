"""The slots of a matrix family's groups as batched matrices: gather from parameters, scatter back.

A :class:`~symtools.nn.groups.MatrixGroupSet` binds the slots of a matrix family (``attention_qk``:
``W_Q``, ``W_K``; ``attention_vo``: ``W_V``, ``W_O``; …) to blocks of parameters (:class:`MatrixPiece`: a
row/column range of a 2-D parameter, or of a bias seen as one row, optionally transposed), joined per slot
along ``stack[slot]`` (``"rows"``: stacked vertically, ``"cols"``: side by side). Every group of a set has
the same piece shapes, so each slot of every group is one ``(groups, rows, cols)`` tensor and every quantity
of the family is one batched matrix product of the generated functions (``A @ B`` broadcasts over groups).

:func:`slot_layout` validates a set against a model's parameter shapes once and turns it into integer
indices into the concatenation of the parameters it uses (:class:`SlotLayout`), so

- :meth:`SlotLayout.assemble` ``(tensors) -> {slot: (G, R, C)}`` is ONE gather per slot, differentiable,
  and works on any dict of parameter-shaped tensors: parameters, gradients, HVP results, directions;
- :meth:`SlotLayout.scatter` ``({slot: (G, R, C)}) -> {param: tensor}`` is its adjoint, an ``index_add``
  into parameter-shaped zeros: ⟨assemble(p), S⟩ = ⟨p, scatter(S)⟩ for every p and S (pieces that overlap,
  e.g. one key head shared by several groups, accumulate), which is what an HVP direction Σ_k v_k needs.

:func:`attention_matrix_sets` writes the binding of one attention layer with ``nn.Linear`` projections
(grouped-query heads stacked per key/value head, bias rows under their weights) and
:func:`rotate_half_commutant` the Lie subalgebra left by rotate-half rotary embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import MatrixGroupSet, MatrixPiece

STACKS = ("rows", "cols")

__all__ = ["SlotLayout", "attention_matrix_sets", "matrix_module", "rotate_half_commutant", "slot_layout"]


def matrix_module(family: str | ModuleType, modules: Mapping[str, ModuleType] | None = None) -> ModuleType:
    """The generated code of a matrix family (``modules`` first, then ``symtools.codegen.generated``),
    checked to be a matrix module (``SLOTS``, ``ALGEBRA``, ``gradient_identity``, ``generator``)."""
    from symtools.numeric.groupops import family_module

    module = family if isinstance(family, ModuleType) else ((modules or {}).get(family) or family_module(family))
    missing = [a for a in ("SLOTS", "ALGEBRA", "gradient_identity", "generator", "hessian_identity_residual")
               if not hasattr(module, a)]
    if missing:
        raise SymtoolsError(f"symmetry {getattr(module, 'NAME', family)!r} is not a matrix family (its generated "
                            f"code has no {', '.join(missing)}); matrix families: attention_qk, attention_vo, "
                            f"gl_linear_pair, rotation_pair")
    return module


@dataclass
class SlotLayout:
    """A validated :class:`MatrixGroupSet`: per slot, a ``(groups, rows, cols)`` index into the flat
    concatenation of :attr:`params` (in that order, each flattened row-major).

    ``h``: the size of the group's matrices (the generated ``gradient_identity`` is ``(groups, h, h)``);
    ``basis``: the set's algebra basis as a float64 ``(r, h, h)`` tensor, or None (the family's whole algebra).
    """

    matrix_set: MatrixGroupSet
    module: ModuleType
    params: tuple[str, ...]
    param_shapes: dict[str, tuple[int, ...]]
    index: dict[str, Tensor]
    h: int
    basis: Tensor | None
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return self.matrix_set.count

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.module.SLOTS)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{slot: (rows, cols)}`` of one group's slot matrix."""
        return {s: tuple(ix.shape[1:]) for s, ix in self.index.items()}

    @property
    def offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for name in self.params:
            out[name] = at
            at += _numel(self.param_shapes[name])
        return out

    def _index(self, slot: str, device: torch.device) -> Tensor:
        key = (slot, device)
        if key not in self._on:
            self._on[key] = self.index[slot].to(device)
        return self._on[key]

    def flat(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The tensors of :attr:`params` flattened and concatenated (differentiable)."""
        try:
            parts = [tensors[n].reshape(-1) for n in self.params]
        except KeyError as exc:
            raise SymtoolsError(f"{_where(self.matrix_set)}: no tensor for parameter {exc.args[0]!r}") from None
        return torch.cat(parts)

    def assemble(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{slot: (groups, rows, cols)}`` gathered from parameter-shaped ``tensors`` (one gather per slot)."""
        flat = self.flat(tensors)
        return {s: flat[self._index(s, flat.device)] for s in self.slots}

    def assemble_tuple(self, tensors: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        """:meth:`assemble` in ``SLOTS`` order (the argument order of the generated functions)."""
        slots = self.assemble(tensors)
        return tuple(slots[s] for s in self.slots)

    def scatter(self, values: Mapping[str, Tensor], like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The adjoint of :meth:`assemble`: ``{param: tensor}`` with every slot entry added at its place
        (zeros elsewhere; entries that several groups share are summed). ``like`` gives dtype and device
        (default: those of the values)."""
        first = next(iter(values.values()))
        ref = next(iter(like.values())) if like else first
        total = sum(_numel(self.param_shapes[n]) for n in self.params)
        flat = torch.zeros(total, dtype=ref.dtype, device=ref.device)
        for s, v in values.items():
            if s not in self.index:
                raise SymtoolsError(f"{_where(self.matrix_set)}: no slot {s!r} (slots: {', '.join(self.slots)})")
            ix = self._index(s, flat.device)
            if tuple(v.shape) != tuple(ix.shape):
                raise SymtoolsError(f"{_where(self.matrix_set)}: slot {s} values shaped {tuple(v.shape)}, "
                                    f"expected {tuple(ix.shape)} (groups, rows, cols)")
            flat = flat.index_add(0, ix.reshape(-1), v.reshape(-1).to(flat.dtype))
        out, at = {}, 0
        for n in self.params:
            k = _numel(self.param_shapes[n])
            out[n] = flat[at:at + k].reshape(self.param_shapes[n])
            at += k
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _where(ms: MatrixGroupSet) -> str:
    return f"matrix set {ms.family} at {ms.layer!r}"


def _shapes_of(params: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in params.items()}


def _piece_index(ms: MatrixGroupSet, k: int, slot: str, j: int, piece: MatrixPiece,
                 shapes: Mapping[str, tuple[int, ...]], offset: int) -> Tensor:
    """The flat indices of one piece as its matrix (after the transpose)."""
    where = f"{_where(ms)}, group {k}, slot {slot}, piece {j} ({piece.param})"
    if not isinstance(piece, MatrixPiece):
        raise SymtoolsError(f"{where}: expected a MatrixPiece, got {type(piece).__name__}")
    if piece.param not in shapes:
        close = [n for n in shapes if n.endswith(piece.param.split(".")[-1])][:4]
        raise SymtoolsError(f"{where}: the model has no parameter {piece.param!r}"
                            + (f" (parameters with that suffix: {', '.join(close)})" if close else ""))
    shape = shapes[piece.param]
    if len(shape) == 1:
        rows, cols = 1, shape[0]
    elif len(shape) == 2:
        rows, cols = shape
    else:
        raise SymtoolsError(f"{where}: parameter of shape {shape}; a piece is a block of a 2-D parameter or of a "
                            f"bias (1-D, one row)")
    r0, r1 = _range(piece.rows, rows, "rows", where, shape)
    c0, c1 = _range(piece.cols, cols, "cols", where, shape)
    ix = offset + torch.arange(r0, r1).unsqueeze(1) * cols + torch.arange(c0, c1).unsqueeze(0)
    return ix.T if piece.transpose else ix


def _range(rng, size: int, what: str, where: str, shape) -> tuple[int, int]:
    if rng is None:
        return 0, size
    try:
        a, b = (int(rng[0]), int(rng[1]))
    except (TypeError, ValueError, IndexError):
        raise SymtoolsError(f"{where}: {what} must be a (start, stop) pair, got {rng!r}") from None
    if not 0 <= a < b <= size:
        raise SymtoolsError(f"{where}: {what} ({a}, {b}) do not fit: the parameter seen as a matrix is "
                            f"{'1 × ' + str(shape[0]) if len(shape) == 1 else ' × '.join(map(str, shape))} "
                            f"(a half-open range inside 0…{size} with start < stop is needed)")
    return a, b


def slot_layout(matrix_set: MatrixGroupSet, params: Mapping[str, object],
                modules: Mapping[str, ModuleType] | None = None) -> SlotLayout:
    """Validate ``matrix_set`` against ``params`` (name → tensor or shape) and build its :class:`SlotLayout`.

    Raises :class:`SymtoolsError` when: the family has no generated matrix code; a group's slots are not the
    family's ``SLOTS``; ``stack`` does not say ``"rows"`` or ``"cols"`` for every slot; a piece names a
    parameter the model lacks, or a range outside it; the pieces of a slot do not join (rows-stacked pieces
    with different column counts, …); groups differ in piece shapes; the generated ``gradient_identity``
    refuses the slot shapes or is not square; ``algebra`` is not an ``(r, h, h)`` basis of independent
    matrices (antisymmetric for an 'so' family).
    """
    ms = matrix_set
    module = matrix_module(ms.family, modules)
    slots = tuple(module.SLOTS)
    shapes = _shapes_of(params)
    if not ms.groups:
        raise SymtoolsError(f"{_where(ms)}: no groups")
    stack = dict(ms.stack)
    for s in slots:
        if stack.get(s) not in STACKS:
            raise SymtoolsError(f"{_where(ms)}: stack[{s!r}] must be 'rows' or 'cols', got {stack.get(s)!r} "
                                f"(stack: {stack})")
    names = sorted({p.param for g in ms.groups for pieces in g.values() for p in pieces
                    if isinstance(p, MatrixPiece)})
    offsets, at = {}, 0
    for n in names:
        offsets[n] = at
        at += _numel(shapes[n]) if n in shapes else 0
    per_slot: dict[str, list[Tensor]] = {s: [] for s in slots}
    first_shapes = None
    for k, group in enumerate(ms.groups):
        if set(group) != set(slots):
            raise SymtoolsError(f"{_where(ms)}, group {k}: slots {sorted(group)}, but {ms.family} has slots "
                                f"{list(slots)}")
        piece_shapes = {}
        for s in slots:
            pieces = tuple(group[s])
            if not pieces:
                raise SymtoolsError(f"{_where(ms)}, group {k}, slot {s}: no pieces")
            blocks = [_piece_index(ms, k, s, j, p, shapes, offsets.get(p.param, 0)) for j, p in enumerate(pieces)]
            axis = 0 if stack[s] == "rows" else 1
            other = {b.shape[1 - axis] for b in blocks}
            if len(other) > 1:
                what = "columns" if axis == 0 else "rows"
                raise SymtoolsError(f"{_where(ms)}, group {k}, slot {s}: pieces stacked as {stack[s]} must have the "
                                    f"same number of {what}; their shapes are {[tuple(b.shape) for b in blocks]}")
            piece_shapes[s] = [tuple(b.shape) for b in blocks]
            per_slot[s].append(torch.cat(blocks, dim=axis))
        if first_shapes is None:
            first_shapes = piece_shapes
        elif piece_shapes != first_shapes:
            bad = next(s for s in slots if piece_shapes[s] != first_shapes[s])
            raise SymtoolsError(f"{_where(ms)}: every group must have the same piece shapes; slot {bad} of group "
                                f"{k} has {piece_shapes[bad]}, group 0 has {first_shapes[bad]}")
    index = {s: torch.stack(per_slot[s]) for s in slots}
    h = _square_size(ms, module, {s: tuple(ix.shape[1:]) for s, ix in index.items()})
    basis = _basis(ms, module, h)
    return SlotLayout(ms, module, tuple(names), {n: shapes[n] for n in names}, index, h, basis)


def _square_size(ms: MatrixGroupSet, module: ModuleType, shapes: Mapping[str, tuple[int, int]]) -> int:
    """h from the generated gradient identity on zero slots of these shapes (it must be (1, h, h))."""
    zeros = [torch.zeros((1,) + tuple(shapes[s]), dtype=torch.float64) for s in module.SLOTS]
    try:
        m = module.gradient_identity(*zeros, *zeros)
    except RuntimeError as exc:
        raise SymtoolsError(f"{_where(ms)}: the slot shapes {dict(shapes)} do not fit {ms.family}'s action "
                            f"({getattr(module, '__doc__', '').splitlines()[0] if module.__doc__ else ''}): "
                            f"{str(exc).splitlines()[0]}") from None
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise SymtoolsError(f"{_where(ms)}: the gradient identity of {ms.family} on slots {dict(shapes)} is shaped "
                            f"{tuple(m.shape[1:])}, not square")
    return int(m.shape[-1])


def _basis(ms: MatrixGroupSet, module: ModuleType, h: int) -> Tensor | None:
    if ms.algebra is None:
        return None
    try:
        b = torch.as_tensor(ms.algebra, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SymtoolsError(f"{_where(ms)}: algebra must be an (r, {h}, {h}) array of basis matrices: {exc}") from None
    if b.dim() == 2 and b.shape == (h, h):
        b = b.unsqueeze(0)
    if b.dim() != 3 or tuple(b.shape[1:]) != (h, h) or b.shape[0] == 0:
        raise SymtoolsError(f"{_where(ms)}: algebra must be an (r, {h}, {h}) basis (h = {h}, the size of the group's "
                            f"matrices for these slots), got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise SymtoolsError(f"{_where(ms)}: algebra basis has non-finite entries")
    flat = b.reshape(b.shape[0], -1)
    rank = int(torch.linalg.matrix_rank(flat, atol=1e-10 * float(flat.abs().max())))
    if rank < b.shape[0]:
        raise SymtoolsError(f"{_where(ms)}: the {b.shape[0]} algebra basis matrices are linearly dependent "
                            f"(rank {rank}); give a basis")
    if module.ALGEBRA == "so" and float((b + b.mT).abs().max()) > 1e-12 * float(b.abs().max()):
        raise SymtoolsError(f"{_where(ms)}: {ms.family} runs through antisymmetric generators (so_h); its algebra "
                            f"basis must be antisymmetric")
    return b


# -- bindings

def rotate_half_commutant(h: int) -> Tensor:
    """A basis ``(h, h, h)`` of the matrices commuting with every rotate-half rotary rotation of a head of size
    ``h`` (pairs (i, i + h/2), distinct frequencies): for each pair, E_ii + E_jj (a scaling) and E_ij − E_ji
    (a rotation), the Lie algebra of the scaled rotations of each pair."""
    if h % 2:
        raise SymtoolsError(f"rotary embeddings rotate pairs: the head size must be even, got {h}")
    out = []
    for i in range(h // 2):
        j = i + h // 2
        s = torch.zeros(h, h, dtype=torch.float64)
        s[i, i] = s[j, j] = 1.0
        r = torch.zeros(h, h, dtype=torch.float64)
        r[i, j], r[j, i] = 1.0, -1.0
        out += [s, r]
    return torch.stack(out)


def attention_matrix_sets(layer: str, q: str, k: str, v: str, o: str, *, heads: int, kv_heads: int,
                          head_dim: int, bias: bool = True, o_bias: bool | None = None,
                          qk_algebra=None) -> tuple[MatrixGroupSet, MatrixGroupSet]:
    """The attention_qk and attention_vo sets of one attention layer whose projections are ``nn.Linear`` modules
    named ``q``, ``k``, ``v``, ``o`` (``heads`` query heads, ``kv_heads`` key/value heads, query head i reading
    key/value head i // (heads / kv_heads), as ``repeat_interleave`` does).

    QK group j: W_Q = the query heads of key/value head j stacked as rows, each as its weight block (transposed:
    d_model × head_dim) followed by its bias row when ``bias``; W_K = key head j (+ bias row). VO group j:
    W_V = value head j (+ bias row), W_O = the output-projection column blocks of those query heads
    (transposed: head_dim × d_model) side by side. ``qk_algebra``: e.g. :func:`rotate_half_commutant` with rotary
    embeddings (None: all of gl). The output projection's bias is not part of any group (``o_bias`` ignored).
    """
    if heads % kv_heads:
        raise SymtoolsError(f"{heads} query heads cannot share {kv_heads} key/value heads evenly")
    r, dh = heads // kv_heads, head_dim

    def head(name: str, i: int) -> tuple[MatrixPiece, ...]:
        w = MatrixPiece(f"{name}.weight", rows=(i * dh, (i + 1) * dh), transpose=True)
        return (w, MatrixPiece(f"{name}.bias", cols=(i * dh, (i + 1) * dh))) if bias else (w,)

    qk, vo = [], []
    for j in range(kv_heads):
        members = range(j * r, (j + 1) * r)
        qk.append({"W_Q": tuple(p for i in members for p in head(q, i)), "W_K": head(k, j)})
        vo.append({"W_V": head(v, j),
                   "W_O": tuple(MatrixPiece(f"{o}.weight", cols=(i * dh, (i + 1) * dh), transpose=True)
                                for i in members)})
    note = f"{heads} query heads, {kv_heads} key/value heads of size {dh}"
    return (MatrixGroupSet("attention_qk", layer, tuple(qk), {"W_Q": "rows", "W_K": "rows"}, qk_algebra, note),
            MatrixGroupSet("attention_vo", layer, tuple(vo), {"W_V": "rows", "W_O": "cols"}, None, note))
