"""The monitored tensors of one moment as flat float64 vectors, and per-group sums of monomials over them.

:class:`FlatLayout` orders every parameter a monitored group touches into one vector (grouped by dtype) and
fixes, once, which group column each element adds to (:class:`MembershipLayers`). :class:`FlatSources`
holds static buffers for the values θ, gradients g, optimizer buffers b and the step's displacement d and
fills them with one ``torch._foreach_copy_`` per source and dtype. :func:`reduce_monomials` then evaluates a
set of monomials of (θ, g, b, d) elementwise on those vectors and adds each element into its group with one
``index_add_`` per membership layer — a fixed number of kernels whatever the depth of the model.

Sums are float64 (the copies widen exactly), so a float32 model's per-group sums carry no float32 rounding.
On the CPU the vectors are processed in chunks of :data:`CPU_CHUNK` elements (bounded scratch memory); on
other devices in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import TensorSlice

ACC = torch.float64

#: Elements per chunk on the CPU: the scratch rows of one chunk (a few MiB) stay in cache-friendly sizes and the
#: monomial scratch does not grow with the model. Other devices take the whole vector at once (fewest kernels).
CPU_CHUNK = 1 << 20

#: Source letters of a monomial's exponents, in the order of ``symtools.codegen.emit_facts.VARIABLES``.
SOURCES = ("theta", "g", "b", "d", "u")


@dataclass(frozen=True)
class Monomial:
    """Π source^exponent over (θ, g, b, d, u), or its absolute value."""

    exponents: tuple[int, ...]
    absolute: bool = False

    @property
    def degree(self) -> int:
        return sum(self.exponents)

    def sources(self) -> list[str]:
        return [s for s, k in zip(SOURCES, self.exponents) for _ in range(k)]


class FlatLayout:
    """Where each monitored parameter sits in the flat vector (offset, numel), grouped by dtype."""

    def __init__(self, params: Mapping[str, Tensor], names: Sequence[str]):
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n in names:
            by_dtype.setdefault(params[n].dtype, []).append(n)
        self.names: list[str] = [n for group in by_dtype.values() for n in group]
        self.offset: dict[str, int] = {}
        self.dtype_groups: list[tuple[torch.dtype, list[str], int, int]] = []
        pos = 0
        for dtype, group in by_dtype.items():
            start = pos
            for n in group:
                self.offset[n] = pos
                pos += params[n].numel()
            self.dtype_groups.append((dtype, group, start, pos))
        self.numel = pos
        self.shapes = {n: tuple(params[n].shape) for n in self.names}
        self.device = next(iter(params.values())).device if params else torch.device("cpu")


def _group_ids(ts: TensorSlice, shape: tuple[int, ...], device) -> Tensor:
    """The group index of every element of a tensor of ``shape`` (its row-major order) seen through ``ts``."""
    view = tuple(ts.shape) if ts.shape is not None else tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    if ts.axis is None:
        return torch.zeros(numel, dtype=torch.long, device=device)
    count = view[ts.axis]
    ids = torch.arange(count, device=device).reshape([count if i == ts.axis else 1 for i in range(len(view))])
    return ids.expand(view).reshape(-1)


@dataclass
class MembershipLayers:
    """Element → reduction column, in as few layers as needed so that no element has two columns in a layer.

    ``columns`` is the number of real columns; every layer maps the elements it does not cover to one extra
    dump column (index ``columns``); sums are kept in ``width`` ≥ columns + 1 columns (so that a caller can view
    them as a matrix). ``ids[l]`` is an index vector over the flat layout.
    """

    columns: int
    width: int
    ids: list[Tensor] = field(default_factory=list)

    @classmethod
    def build(cls, layout: FlatLayout, entries: Sequence[tuple[TensorSlice, int]], columns: int,
              width: int | None = None) -> "MembershipLayers":
        """``entries``: (tensor slice, first column of its groups); a tensor may appear in several entries."""
        width = columns + 1 if width is None else width
        layers: list[set[str]] = []
        ids: list[Tensor] = []
        for ts, first in entries:
            if ts.param not in layout.offset:
                raise SymtoolsError(f"{ts.param} is not in the monitored layout")
            k = next((i for i, used in enumerate(layers) if ts.param not in used), len(layers))
            if k == len(layers):
                layers.append(set())
                ids.append(torch.full((layout.numel,), columns, dtype=torch.long, device=layout.device))
            layers[k].add(ts.param)
            o, shape = layout.offset[ts.param], layout.shapes[ts.param]
            n = ids[k][o:o + _numel(shape)]
            n.copy_(_group_ids(ts, shape, layout.device) + first)
        return cls(columns, width, ids)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


class FlatSources:
    """Static float64 flat buffers of θ (and of θ after the step), g, b and d, filled by foreach copies."""

    def __init__(self, layout: FlatLayout, kinds: Sequence[str], chunk: int | None = None):
        self.layout = layout
        dev = layout.device
        self.flat = {k: torch.zeros(layout.numel, dtype=ACC, device=dev) for k in kinds}
        # staging in each dtype: the foreach copy stays on its fast same-dtype path; one widening copy follows
        self._staging = []
        for dtype, names, start, stop in layout.dtype_groups:
            stage = torch.empty(stop - start, dtype=dtype, device=dev) if dtype != ACC else None
            self._staging.append((dtype, names, start, stop, stage))
        self._views: dict[tuple[str, int], list[Tensor]] = {}
        self.chunk = chunk if chunk is not None else (CPU_CHUNK if dev.type == "cpu" else layout.numel)
        self.chunk = max(1, min(self.chunk, max(layout.numel, 1)))

    def _targets(self, kind: str, g: int) -> list[Tensor]:
        key = (kind, g)
        if key not in self._views:
            dtype, names, start, stop, stage = self._staging[g]
            base = stage if stage is not None else self.flat[kind][start:stop]
            self._views[key] = [base[self.layout.offset[n] - start:self.layout.offset[n] - start + _numel(self.layout.shapes[n])]
                                .view(self.layout.shapes[n]) for n in names]
        return self._views[key]

    def fill(self, kind: str, tensors: Mapping[str, Tensor | None]) -> None:
        """Copy ``tensors[name]`` (None: zeros) into buffer ``kind``."""
        out = self.flat[kind]
        with torch.no_grad():
            for g, (dtype, names, start, stop, stage) in enumerate(self._staging):
                targets = self._targets(kind, g)
                pairs = [(t, tensors.get(n)) for t, n in zip(targets, names)]
                present = [(t, s) for t, s in pairs if s is not None]
                if len(present) == len(pairs):
                    torch._foreach_copy_([t for t, _ in present], [s for _, s in present])
                else:
                    for t, s in pairs:
                        t.zero_() if s is None else t.copy_(s)
                if stage is not None:
                    out[start:stop].copy_(stage)


def reduce_monomials(monomials: Sequence[Monomial], sources: Mapping[str, Tensor], layers: MembershipLayers,
                     chunk: int, scratch: dict) -> Tensor:
    """(len(monomials), layers.width) float64: per reduction column, Σ over its elements of each monomial
    (column ``layers.columns`` collects what no group reads). ``sources`` maps 'theta', 'g', 'b', 'd' to flat vectors."""
    numel = next(iter(sources.values())).numel() if sources else 0
    dev = next(iter(sources.values())).device if sources else torch.device("cpu")
    rows = len(monomials)
    out = scratch.get(("out", rows, layers.width))
    if out is None:
        out = scratch[("out", rows, layers.width)] = torch.zeros((rows, layers.width), dtype=ACC, device=dev)
    else:
        out.zero_()
    if not rows or not numel:
        return out
    chunk = min(chunk, numel)
    buf = scratch.get(("rows", rows, chunk))
    if buf is None:
        buf = scratch[("rows", rows, chunk)] = torch.empty((rows, chunk), dtype=ACC, device=dev)
        scratch[("row views", rows, chunk)] = buf.unbind(0)
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        whole = n == numel  # one piece (other devices): no slicing, row views made once
        block = buf if n == chunk else buf[:, :n]
        views = scratch[("row views", rows, chunk)] if n == chunk else block.unbind(0)
        src = sources if whole else {k: v[start:start + n] for k, v in sources.items()}
        for m, row in zip(monomials, views):
            _evaluate(m, src, row)
        for ids in layers.ids:
            out.index_add_(1, ids if whole else ids[start:start + n], block)
    return out


def _evaluate(m: Monomial, src: Mapping[str, Tensor], out: Tensor) -> None:
    names = m.sources()
    if not names:
        out.fill_(1.0)
    elif len(names) == 1:
        torch.abs(src[names[0]], out=out) if m.absolute else out.copy_(src[names[0]])
    else:
        torch.mul(src[names[0]], src[names[1]], out=out)
        for extra in names[2:]:
            out.mul_(src[extra])
        if m.absolute:
            out.abs_()
