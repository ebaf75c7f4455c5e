"""Per-group monomial sums with one pass over each monitored tensor: the monitor's "compiled" reducer (CPU).

The fused core's terms are ``(W @ R) ⊙ mask``, where ``R[m, slot·columns + column]`` is the sum of monomial
``m`` over the elements that slot of that column's group reads (:mod:`symtools.numeric.monitor_plan`). The flat
reducer builds ``R`` from float64 copies of every tensor and scatter-adds, the sites reducer from the generated
densities in eager PyTorch; on the CPU both make many passes over the parameters per hook (eager float32 →
float64 sums also run far below the memory bandwidth: docs/monitor.md, "The fused core").

Here each monitored tensor is read **once per hook**. A tensor is seen as a matrix ``(A, B)`` in its own memory
order: ``(count, post)`` where its groups run along its first axis (one group per row), ``(pre, count·post)``
otherwise (a group is a set of columns). One C function, emitted for the monomials that tensor's slots need
(:mod:`symtools.codegen.emit_c`) and compiled for this machine (:mod:`symtools.numeric.native`), widens the
elements to double, evaluates the monomials and writes their row and/or column sums. Products of two float32
numbers are exact in float64, so the sums carry float64 round-off only, as with the flat reducer. One
``index_add_`` then puts every sum into its place in ``R`` (column ``b`` of ``(pre, count·post)`` belongs to
group ``b // post``).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from symtools.codegen.emit_c import kernel_arguments, sums_source
from symtools.errors import SymtoolsError
from symtools.numeric import native
from symtools.numeric.flat import ACC, Monomial

#: Live-source prefix of each kernel argument (as :class:`symtools.numeric.groupops.ViewCache` reads them, and
#: ``p_`` for θ before the step, from which the kernel forms the displacement).
PREFIX = {"theta": "", "g": "g_", "b": "b_", "theta_prev": "p_"}
DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def layout_of(axis: int | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(pre, count, post)``: a tensor of ``shape`` is ``pre`` blocks of ``count`` groups of ``post`` elements
    along ``axis`` (``None``: one group of every element)."""
    if axis is None:
        return 1, 1, math.prod(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


@dataclass
class _Call:
    """One tensor seen as ``(A, B)``: its kernel, the sources it reads, and where its sums go in the output."""

    param: str
    shape: tuple[int, int]
    sources: tuple[str, ...]
    monomials: tuple[tuple[tuple[int, ...], bool], ...]
    rows: slice | None
    cols: slice | None
    copy: bool = False


class CompiledSums:
    """``R`` of one term matrix from the live tensors: one C call per (tensor, matrix view) and one
    ``index_add_`` (a second one, after an ``index_select``, for the sums two families read).

    ``memberships``: (parameter, axis, shape the slice views it as or None, first column in ``R``, indices of
    the monomials this slot needs). ``width``: the row length of ``R`` ((slots + 1) × columns). ``copies``:
    parameters whose values the kernels also write, as they read them, into ``live["p_"]`` (the monitor's θ
    before the step, for the displacement; :attr:`copied` says which of them a kernel reads, the caller copies
    the others).
    """

    def __init__(self, monomials: Sequence[Monomial], memberships: Sequence[tuple[str, int | None, tuple | None,
                 int, tuple[int, ...]]], params: Mapping[str, Tensor], width: int, copies: Sequence[str] = ()):
        self.monomials = list(monomials)
        self.width = width
        self.device = next(iter(params.values())).device
        if self.device.type != "cpu":
            raise SymtoolsError(f"the compiled reducer runs on the CPU; the parameters are on {self.device} "
                                "(use the flat reducer there)")
        views: dict[tuple[str, tuple[int, int]], dict] = {}
        for param, axis, shape, first, mons in memberships:
            shape = tuple(shape) if shape is not None else tuple(params[param].shape)
            pre, count, post = layout_of(axis, shape)
            view = (count, post) if pre == 1 else (pre, count * post)
            entry = views.setdefault((param, view), {"mons": set(), "rows": [], "cols": []})
            entry["mons"].update(mons)
            entry["rows" if pre == 1 else "cols"].append((first, post, mons))
        self.calls: list[_Call] = []
        self.copied: set[str] = set()
        src, dst = [], []
        offset = 0
        for (param, (a, b)), entry in views.items():
            order = sorted(entry["mons"])
            pos = {j: u for u, j in enumerate(order)}
            mons = tuple((m.exponents, m.absolute) for m in (self.monomials[j] for j in order))
            spans = {}
            for kind, length in (("rows", a), ("cols", b)):
                if not entry[kind]:
                    spans[kind] = None
                    continue
                spans[kind] = slice(offset, offset + len(order) * length)
                for first, post, wanted in entry[kind]:
                    for j in wanted:
                        start = offset + pos[j] * length
                        src.append(torch.arange(start, start + length))
                        group = torch.arange(length) if kind == "rows" else torch.arange(length) // post
                        dst.append(j * width + first + group)
                offset += len(order) * length
            copy = param in copies and param not in self.copied and params[param].dtype in DTYPES
            if copy:
                self.copied.add(param)
            self.calls.append(_Call(param, (a, b), kernel_arguments(mons, copy), mons, spans["rows"], spans["cols"],
                                    copy))
        self.size = offset
        self.R = torch.zeros(len(self.monomials) * width + 1, dtype=ACC)  # the last element: sums no one reads
        self.out = torch.empty(offset, dtype=ACC)
        self.place, self.extra_src, self.extra_dst = _places(src, dst, offset, self.R.numel() - 1)
        self.widest = max((len(c.monomials) * c.shape[1] for c in self.calls if c.cols is not None), default=0)
        self.scratch = torch.empty(0, dtype=ACC)
        self._functions: dict[tuple, ctypes._CFuncPtr] = {}
        self.tm = None  # the term matrix these sums serve (set by the plan)

    def _function(self, call: _Call, dtype: str):
        """The compiled C function of ``call`` for elements of ``dtype`` (a parameter's gradient, buffer and copy
        share its dtype). All of this reducer's kernels of one dtype are built in one library, on first use."""
        key = (call.monomials, call.rows is not None, call.cols is not None, call.copy, dtype)
        fn = self._functions.get(key)
        if fn is None:
            kernels, names = [], {}
            for c in self.calls:
                k = (c.monomials, c.rows is not None, c.cols is not None, c.copy, dtype)
                if k not in names:
                    names[k] = f"symtools_sums_{len(names)}"
                    kernels.append((names[k], c.monomials, dict.fromkeys(c.sources, dtype), *k[1:4]))
            lib = native.load(sums_source(kernels))
            for k, name in names.items():
                f = getattr(lib, name)
                f.restype = ctypes.c_int
                f.argtypes = [ctypes.c_void_p] * (len(kernel_arguments(k[0], k[3])) + 1) + [
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                self._functions[k] = f
            fn = self._functions[key]
        return fn

    def __call__(self, live: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """(monomials, width) float64: ``R`` from ``live`` (prefix → parameter name → tensor)."""
        threads = torch.get_num_threads()
        out = self.out
        need = threads * self.widest
        if self.scratch.numel() < need:  # each thread's column sums, kept from call to call
            self.scratch = torch.empty(need, dtype=ACC)
        scratch = self.scratch.data_ptr()
        base, item = out.data_ptr(), out.element_size()
        with torch.no_grad():
            for call in self.calls:
                xs = [live[PREFIX[s]][call.param] for s in call.sources]
                dtype = xs[0].dtype
                if dtype not in DTYPES or not all(x.dtype == dtype and x.is_contiguous() for x in xs):
                    xs, dtype = _prepared(call, xs)
                fn = self._function(call, DTYPES[dtype])
                rows = base + call.rows.start * item if call.rows is not None else None
                cols = base + call.cols.start * item if call.cols is not None else None
                copy = None
                if call.copy:
                    target = live["p_"][call.param]
                    if target.dtype != dtype or not target.is_contiguous() or target.numel() != xs[0].numel():
                        raise SymtoolsError(f"{call.param}: the copy of θ must be a contiguous {dtype} tensor")
                    copy = target.data_ptr()
                if fn(*[x.data_ptr() for x in xs], copy, call.shape[0], call.shape[1], rows, cols, scratch, threads):
                    raise SymtoolsError(f"{call.param}: the monitor's kernel got no scratch for its column sums")
            R = self.R.zero_()
            if self.size:
                R.index_add_(0, self.place, out)
            if self.extra_src is not None:
                R.index_add_(0, self.extra_dst, out.index_select(0, self.extra_src))
        return R[:-1].view(len(self.monomials), self.width)


def _prepared(call: _Call, xs: list[Tensor]) -> tuple[list[Tensor], torch.dtype]:
    """The kernel's arguments as contiguous tensors of one dtype the kernels read (half precisions widened
    exactly to float32); the fast path skips this for contiguous float32/float64 tensors of one dtype."""
    dtype = torch.promote_types(xs[0].dtype, torch.float32)
    if dtype not in DTYPES or any(x.dtype != xs[0].dtype for x in xs):
        raise SymtoolsError(f"{call.param}: the compiled reducer reads float32 or float64 tensors of one dtype, "
                            f"got {', '.join(str(x.dtype) for x in xs)}")
    return [x.to(dtype).reshape(call.shape).contiguous() for x in xs], dtype


def _places(src: list[Tensor], dst: list[Tensor], size: int, dump: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Where each output sum goes in ``R``: ``place[i]`` for the first use of output ``i`` (``dump`` for an output
    no slot reads), and the pairs (output, place) of any further uses (a sum two families read), or None."""
    if not src:
        return torch.full((size,), dump, dtype=torch.long), None, None
    s, d = torch.cat(src), torch.cat(dst)
    order = torch.argsort(s, stable=True)
    s, d = s[order], d[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    place = torch.full((size,), dump, dtype=torch.long)
    place[s[first]] = d[first]
    if bool(first.all()):
        return place, None, None
    return place, s[~first], d[~first]
