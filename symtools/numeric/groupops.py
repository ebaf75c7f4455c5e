"""Evaluate generated symmetry code on bound tensors: every group of a family at once, no loop over neurons.

A :class:`~symtools.nn.groups.GroupSet` says which tensor each slot of a family is and along which axis
its groups run. :func:`group_view` turns a tensor into a ``(count, rest)`` matrix (group axis first, the
rest flattened); a generated elementwise function is applied to that whole matrix, and a per-group value is
its sum over ``rest``. Directions in parameter space (the generator of many groups combined with per-group
weights) are scattered back with :func:`scatter_back`. Reductions accumulate in float64.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Iterable, Mapping

import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet, TensorSlice

ACC = torch.float64  # accumulation dtype of every per-group reduction

#: Elements per block of :func:`reduce_terms` on the CPU. A block's temporaries (the density values, their
#: float64 sums: 0.5–1 MiB) stay in the cache instead of streaming through memory, and a block is large
#: enough that the per-op overhead (~10 µs of Python and dispatch, ~15,000 ops per step for VGG-16-BN with
#: 32,000-element blocks) does not dominate. Measured on VGG-16-BN, 2 idle cores, monitor hooks per step:
#: 32,000 → 131,072 elements took SGD 0.30 → 0.15 s and momentum 0.67 → 0.39 s; 262,144 was no better.
#: (Blocks below torch's intra-op grain, 32,768, avoid OpenMP fork/join, which helped only when the cores
#: were shared with other work.) Other devices reduce whole tensors.
CPU_BLOCK = 131_072


def family_module(family: str | ModuleType) -> ModuleType:
    """The generated torch module of a family (``symtools.codegen.generated.<family>``), or a given module."""
    if isinstance(family, ModuleType):
        return family
    try:
        return importlib.import_module(f"symtools.codegen.generated.{family}")
    except ModuleNotFoundError:
        from symtools.codegen.generated import NAMES

        raise SymtoolsError(f"no generated code for symmetry {family!r}; built-ins: {', '.join(NAMES)} "
                            f"(emit your own with `symtools derive SPEC --torch FILE`)") from None


def group_view(t: Tensor, ts: TensorSlice) -> Tensor:
    """``t`` as a ``(count, rest)`` matrix: reshaped to ``ts.shape``, group axis moved first, rest flattened."""
    x = t.reshape(ts.shape) if ts.shape is not None else t
    if ts.axis is None:
        return x.reshape(1, -1)
    return x.movedim(ts.axis, 0).reshape(x.shape[ts.axis], -1)


def scatter_back(values: Tensor, like: Tensor, ts: TensorSlice) -> Tensor:
    """Inverse of :func:`group_view`: a ``(count, rest)`` matrix back to the shape of ``like``."""
    shape = ts.shape if ts.shape is not None else tuple(like.shape)
    if ts.axis is None:
        return values.reshape(like.shape)
    moved = (shape[ts.axis],) + tuple(s for i, s in enumerate(shape) if i != ts.axis)
    return values.reshape(moved).movedim(0, ts.axis).reshape(like.shape)


#: Argument-name prefixes of generated functions and what they stand for (besides the slot values θ):
#: gradient, momentum buffer, displacement of the step, optimizer update direction.
PREFIXES = ("g_", "b_", "d_", "u_")


def _arguments(module: ModuleType, kind: str, gs: GroupSet, slot: str, index: int,
               params: Mapping[str, Tensor], grads: Mapping[str, Tensor] | None) -> list[Tensor]:
    """The views the generated function ``kind__slot`` needs for the ``index``-th tensor of ``slot``."""
    sources = {"": params} if grads is None else {"": params, "g_": grads}
    return ViewCache(sources).arguments(module.ARGS[kind][slot], gs, slot, index)


def evaluate(module: ModuleType, kind: str, gs: GroupSet, params, grads=None):
    """Yield ``(slot, TensorSlice, values as (count, rest))`` of ``kind`` for every bound tensor of ``gs``."""
    table = getattr(module, kind.upper())
    if table is None:
        raise SymtoolsError(f"symmetry {module.NAME!r} has no {kind.replace('_', ' ')}")
    for slot, tensors in gs.slots.items():
        if slot not in table:
            raise SymtoolsError(f"{gs.family} at {gs.layer}: the symmetry has no slot {slot!r} "
                                f"(slots: {', '.join(module.SLOTS)})")
        for i, ts in enumerate(tensors):
            yield slot, ts, table[slot](*_arguments(module, kind, gs, slot, i, params, grads))


def _row_blocks(src: Tensor, rows: int, width: int, step: int):
    """``src`` as a ``(rows, width)`` matrix in blocks of ``step`` rows."""
    return src.reshape(rows, width).split(step)


class ViewCache:
    """``(count, rest)`` views of the tensors of one moment (θ, g, buffers …), each made once.

    Many group sets share tensors (a conv weight is ``x_out`` of one rescale site, ``x_in`` of the next and
    ``x`` of a scale group), so the monitor evaluates all its densities through one cache per step.
    ``sources`` maps an argument prefix (``""`` values, ``"g_"`` gradients, ``"b_"`` buffers …) to tensors.
    Views keep the tensors' dtype when it is float32 or float64 (half precisions are widened to float32):
    densities are evaluated elementwise in that dtype and summed in float64 (see :func:`reduce_density`).
    """

    def __init__(self, sources: Mapping[str, Mapping[str, Tensor]]):
        self.sources = sources
        self._views: dict[tuple, Tensor] = {}

    def source(self, prefix: str, ts: TensorSlice) -> Tensor:
        """The whole tensor behind ``ts`` for ``prefix`` (values, gradient, buffer …), unchanged."""
        source = self.sources.get(prefix)
        if source is None or ts.param not in source:
            raise SymtoolsError(f"no {prefix or 'value'} tensor for {ts.param}")
        return source[ts.param]

    def get(self, prefix: str, ts: TensorSlice) -> Tensor:
        key = (prefix, ts.param, ts.axis, ts.shape)
        view = self._views.get(key)
        if view is None:
            view = _widen(group_view(self.source(prefix, ts), ts))
            self._views[key] = view
        return view

    def slices(self, names, gs: GroupSet, slot: str, index: int) -> list[tuple[str, TensorSlice]]:
        """``(prefix, TensorSlice)`` of each argument name (see :meth:`arguments`)."""
        out = []
        for name in names:
            prefix = next((p for p in PREFIXES if name.startswith(p) and name[len(p):] in gs.slots), "")
            tensors = gs.slots[name[len(prefix):]]
            if len(tensors) != len(gs.slots[slot]):
                raise SymtoolsError(f"{gs.family} at {gs.layer}: coupled slots need the same number of tensors")
            out.append((prefix, tensors[index]))
        return out

    def arguments(self, names, gs: GroupSet, slot: str, index: int) -> list[Tensor]:
        """The views for a generated function's argument ``names`` (from its module's ``ARGS``), for the
        ``index``-th tensor of ``slot``: a slot name means the values, ``g_<slot>`` the gradient,
        ``b_``/``d_``/``u_`` a buffer, displacement or update. A function of several slots (a coupled
        action) pairs the ``index``-th tensor of each slot."""
        return [self.get(prefix, ts) for prefix, ts in self.slices(names, gs, slot, index)]


def _widen(view: Tensor) -> Tensor:
    """Half precisions are evaluated in float32 (float32 and float64 are kept)."""
    return view if view.dtype in (torch.float32, ACC) else view.float()


def _layout(ts: TensorSlice, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(pre, count, post)``: the tensor (of ``shape``, viewed as ``ts.shape``) in its own memory order is
    ``pre`` blocks of ``count`` groups of ``post`` elements (``axis=None``: ``numel`` blocks of 1 group)."""
    shape = tuple(ts.shape) if ts.shape is not None else tuple(shape)
    if ts.axis is None:
        return math.prod(shape), 1, 1
    return math.prod(shape[:ts.axis]), shape[ts.axis], math.prod(shape[ts.axis + 1:])


def _block_rows(rows: int, row_size: int, device: torch.device) -> int:
    """Rows per block: about :data:`CPU_BLOCK` elements on the CPU, all rows elsewhere."""
    return rows if device.type != "cpu" else max(1, min(rows, CPU_BLOCK // max(row_size, 1)))


def reduce_terms(terms: Mapping[str, tuple[Mapping[str, object], Mapping[str, tuple[str, ...]]]], gs: GroupSet,
                 cache: "ViewCache", sized: Iterable[str] = ()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per group, for each term ``name``: Σ (and, for names in ``sized``, Σ|·|) over slots, tensors and
    elements of ``functions[slot](...)``, where ``terms[name] = (functions, args)``.

    ``functions``/``args`` are one term's tables of a generated module (e.g. ``DENSITY['Q']`` and
    ``ARGS['Q']`` of a law module, or ``CHARGE_DENSITY`` and ``ARGS['charge_density']``). Elementwise values
    are computed in the views' dtype and accumulated in float64: a float32 product carries a relative
    rounding of 2⁻²⁴ that averages out in the sum (it stays far below the 2⁻²⁴·Σ|terms| that the float32
    optimizer step itself leaves in the charge). The sum of absolute values is the scale that the sum's
    round-off is relative to.

    The functions are elementwise, so they are evaluated on the tensors in their own memory order (no copy
    to move a group axis first): a tensor is ``pre`` blocks of ``count`` groups of ``post`` elements
    (:func:`_layout`); with ``pre = 1`` each row of the ``(count, post)`` matrix is one group's, otherwise
    the column sums of the ``(pre, count·post)`` matrix are folded to groups at the end. All terms of a
    tensor are evaluated together, a block of rows at a time (:data:`CPU_BLOCK`). A function pairing
    tensors of different layouts (a coupled action) is evaluated on :meth:`ViewCache.get`'s views instead.
    """
    sized = set(sized)
    device = _device(cache.sources[""])
    totals = {name: torch.zeros(gs.count, dtype=ACC, device=device) for name in terms}
    sizes = {name: torch.zeros(gs.count, dtype=ACC, device=device) for name in terms if name in sized}
    for slot, tensors in gs.slots.items():
        calls = [(name, fns[slot], args[slot]) for name, (fns, args) in terms.items() if fns.get(slot) is not None]
        if not calls:
            continue
        for i in range(len(tensors)):
            slices = {n: sl for _, _, names in calls for n, sl in zip(names, cache.slices(names, gs, slot, i))}
            layouts = {_layout(ts, cache.source(prefix, ts).shape) for prefix, ts in slices.values()}
            if len(layouts) != 1:
                for name, fn, names in calls:
                    val = fn(*cache.arguments(names, gs, slot, i))
                    totals[name] += val.sum(dim=1, dtype=ACC)
                    if name in sizes:
                        sizes[name] += val.abs().sum(dim=1, dtype=ACC)
                continue
            pre, count, post = layouts.pop()
            # pre = 1: (count, post), one row per group, each block's row sums written to its groups;
            # otherwise (pre, count·post): column sums accumulated over the blocks, folded to groups at the end
            rows, width = (count, post) if pre == 1 else (pre, count * post)
            step = _block_rows(rows, width, device)
            parts = {n: _row_blocks(cache.source(prefix, ts), rows, width, step) for n, (prefix, ts) in slices.items()}
            acc = {(name, kind): torch.zeros(count if pre == 1 else width, dtype=ACC, device=device)
                   for name, _, _ in calls for kind in ("sum", "abs") if kind == "sum" or name in sizes}
            acc_rows = {key: buf.split(step) for key, buf in acc.items()} if pre == 1 else {}
            for b in range(-(-rows // step)):
                views = {n: _widen(p[b]) for n, p in parts.items()}
                for name, fn, names in calls:
                    val = fn(*[views[n] for n in names])
                    for kind in ("sum", "abs"):
                        if (name, kind) not in acc:
                            continue
                        x = val if kind == "sum" else val.abs()
                        if pre == 1:
                            torch.sum(x, dim=1, dtype=ACC, out=acc_rows[name, kind][b])
                        else:
                            acc[name, kind] += x.sum(dim=0, dtype=ACC)
            for (name, kind), buf in acc.items():
                (totals if kind == "sum" else sizes)[name] += buf if pre == 1 else buf.view(count, post).sum(dim=1)
    return totals, sizes


def reduce_density(functions: Mapping[str, object], args: Mapping[str, tuple[str, ...]], gs: GroupSet,
                   cache: "ViewCache", with_size: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per group: (Σ, Σ|·| or None) of one term (see :func:`reduce_terms`)."""
    totals, sizes = reduce_terms({"": (functions, args)}, gs, cache, ("",) if with_size else ())
    return totals[""], sizes.get("")


def elements_per_group(gs: GroupSet, params) -> int:
    """Parameter elements in one group of ``gs`` (all its slots and tensors)."""
    total = 0
    for slices in gs.slots.values():
        for ts in slices:
            n = params[ts.param].numel()
            total += n if ts.axis is None else n // max(gs.count, 1)
    return total


def gradient_terms(module: ModuleType, gs: GroupSet, params, grads,
                   g_typical: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per group: (⟨g, v⟩, its scale) summed over all slots and tensors.

    The scale is Σ|g·v| + g_typical·Σ|v|: the size of the terms, plus the size they would have with a
    typical gradient entry (``g_typical``, e.g. the RMS gradient of the model). The second part matters
    where the symmetry forces the gradient itself to vanish (a bias feeding BatchNorm): there Σ|g·v| is
    round-off, and a ratio to it alone would be meaningless. (The checker's verdicts use the round-off bounds
    of :mod:`symtools.numeric.roundoff` instead; this scale serves the audit.)
    """
    total = torch.zeros(gs.count, dtype=ACC, device=_device(params))
    scale = torch.zeros_like(total)
    for _, ts, v in evaluate(module, "generator", gs, params):
        v = v.to(ACC)
        prod = v * group_view(grads[ts.param], ts).to(ACC)
        total += prod.sum(dim=1)
        scale += prod.abs().sum(dim=1) + g_typical * v.abs().sum(dim=1)
    return total, scale


def charges(module: ModuleType, gs: GroupSet, params) -> Tensor:
    """Per-group conserved charge Q_k (the generated charge density summed over the group's elements)."""
    total = torch.zeros(gs.count, dtype=ACC, device=_device(params))
    for _, _, q in evaluate(module, "charge_density", gs, params):
        total += q.to(ACC).sum(dim=1)
    return total


def combine(module: ModuleType, kind: str, group_sets: Iterable[GroupSet], weights: Iterable[Tensor],
            params, grads=None) -> dict[str, Tensor]:
    """Σ_k w_k·(kind)_k as full parameter tensors: e.g. the direction Σ_k w_k v_k of many groups at once.

    ``weights`` holds one ``(count,)`` tensor per group set (0 leaves a group out). Parameters no group
    touches are absent from the result (zero).
    """
    out: dict[str, Tensor] = {}
    for gs, w in zip(group_sets, weights):
        for _, ts, val in evaluate(module, kind, gs, params, grads):
            like = params[ts.param]
            piece = scatter_back(val * w.to(val.dtype).reshape(-1, 1), like, ts).to(like.dtype)
            out[ts.param] = out[ts.param] + piece if ts.param in out else piece
    return out


def _device(params) -> torch.device:
    return next(iter(params.values())).device
