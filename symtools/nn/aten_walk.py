"""Find the translation, scale and rescale groups of a model from its ATen graph.

Every *writer* of units — a Linear/Conv/addmm output (weight rows and bias), an affine BatchNorm/LayerNorm/RMSNorm
(γ, β), a per-feature weight multiplying a value (RMSNorm written as ops), an embedding (its columns) — starts a
candidate, which :mod:`symtools.nn.scale_flow` pushes through the graph and grows until it is a symmetry or
breaks:

- a residual add whose other operand is not scaled pulls in every writer of that operand (through ReLU,
  pooling and further adds): the units of a residual stream are one group written by all of them;
- a Linear/Conv reading scaled units with untouched weights is a *reader*: its input columns are divided by the
  factor (``x_out`` of ``rescale``, or of ``rescale2`` after z²);
- a normalisation removing the factor (up to its ε) ends it: with no reader, a ``scale`` group whose ε law
  names every such normalisation.

Per-unit factors are tried first (one group per channel); where a normalisation over the features stops them
(LayerNorm, RMSNorm), one factor for all units of the writers (one group: a whole residual stream of a
transformer, read only by norms). Translations (:mod:`symtools.nn.shift_flow`): a writer's bias per unit or as
a whole, a Linear's input columns, an embedding's rows, each kept when the loss removes the shift (softmax, a
mean-removing norm). A parameter used at several places (tied embeddings) is transformed at all of them, so the
groups it breaks are simply not found; every op without a rule breaks what reaches it. Nothing is assumed
from parameter names. Attention heads' matrix groups: :mod:`symtools.nn.attention_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from symtools.nn.aten_graph import ExportedGraph, op_name, shape_of
from symtools.nn.groups import Blocked, GroupSet, SymmetryMap, TensorSlice
from symtools.nn.scale_flow import (
    Broken,
    EpsSite,
    NeedReader,
    NeedWriters,
    Scaled,
    along_axis,
    live_nodes,
    propagate,
)
from symtools.nn.shift_flow import propagate_shift

RESCALE_BY_DEGREE = {1: "rescale", 2: "rescale2"}
MAX_GROWTH = 400  # candidate extensions before giving up (a residual stream of a 100-block network is ~200)


@dataclass
class Writer:
    """An op whose output units are scaled by scaling ``params`` (name, axis) along ``axis`` of each."""

    node: fx.Node
    params: list[tuple[str, int]]
    channels: int
    out_axis: int
    bias: str | None = None
    columns: tuple[str, int] | None = None  # a Linear weight's input axis (translation of input columns)
    rows_shift: str | None = None           # an embedding: shifting a row shifts the token's features


def _param_shape(g: ExportedGraph, name: str) -> tuple[int, ...]:
    return tuple(g.placeholder_of[name].meta["val"].shape)


def writers(g: ExportedGraph) -> list[Writer]:
    out: list[Writer] = []
    for node in g.graph.nodes:
        name = op_name(node)
        p = _param_arg(g, node)
        shape = shape_of(node)
        if shape is None and name not in ("batch_norm", "layer_norm", "rms_norm"):
            continue
        nd = len(shape) if shape is not None else 0
        if name == "linear" and p(1):
            bias = p(2)
            out.append(Writer(node, [(p(1), 0)] + ([(bias, 0)] if bias else []), _param_shape(g, p(1))[0], nd - 1,
                              bias, (p(1), 1)))
        elif name == "addmm" and p(2):
            bias = p(0)
            out.append(Writer(node, [(p(2), 1)] + ([(bias, 0)] if bias else []), _param_shape(g, p(2))[1], nd - 1,
                              bias, (p(2), 0)))
        elif name in ("conv1d", "conv2d", "conv3d", "convolution") and p(1):
            bias = p(2)
            out.append(Writer(node, [(p(1), 0)] + ([(bias, 0)] if bias else []), _param_shape(g, p(1))[0], 1, bias))
        elif name in ("batch_norm", "_native_batch_norm_legit_functional", "native_batch_norm") and p(1):
            params = [(p(1), 0)] + ([(p(2), 0)] if p(2) else [])
            out.append(Writer(node, params, _param_shape(g, p(1))[0], 1, p(2)))
        elif name in ("layer_norm", "native_layer_norm", "rms_norm") and len(node.args[1]) == 1 and p(2):
            bias = p(3) if name != "rms_norm" else None
            params = [(p(2), 0)] + ([(bias, 0)] if bias else [])
            out.append(Writer(node, params, _param_shape(g, p(2))[0], nd - 1, bias))
        elif name == "mul" and nd:
            for i in (0, 1):
                q = p(i)
                if q and len(_param_shape(g, q)) == 1 and _param_shape(g, q)[0] == shape[-1] > 1:
                    out.append(Writer(node, [(q, 0)], shape[-1], nd - 1))
        elif name == "embedding" and p(0):
            out.append(Writer(node, [(p(0), 1)], _param_shape(g, p(0))[1], nd - 1, rows_shift=p(0)))
    return out


def _param_arg(g: ExportedGraph, node: fx.Node):
    """``p(i)``: the parameter name of ``node``'s i-th argument, or None."""
    def p(i: int) -> str | None:
        a = node.args
        return g.param_of.get(a[i]) if len(a) > i and isinstance(a[i], fx.Node) else None
    return p


def _labels_param(g: ExportedGraph, name: str, axis: int | None, labels: torch.Tensor, exp: float = 1.0) -> Scaled:
    return Scaled.along(len(_param_shape(g, name)), axis, labels, exp)


@dataclass
class _Candidate:
    writers: list[Writer]
    params: dict[str, Scaled] = field(default_factory=dict)
    roles: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # param → (x_in | x_out, axis)
    readers: list[tuple[str, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _Walk:
    def __init__(self, g: ExportedGraph, loss: str, class_axis: int = 1):
        self.g, self.loss, self.class_axis = g, loss, class_axis
        self.live = live_nodes(g)
        self.found = SymmetryMap()
        self.writers = [w for w in writers(g) if w.node in self.live]
        self.by_node = {w.node: w for w in self.writers}
        self._blocked: set[tuple[str, str]] = set()

    def label(self, node: fx.Node) -> str:
        fqn, _ = self.g.module_of(node)
        return fqn or node.name

    def block(self, where: str, reason: str) -> None:
        if (where, reason) not in self._blocked:
            self._blocked.add((where, reason))
            self.found.blocked.append(Blocked(where, reason))

    # -- scale and rescale
    def scale_groups(self) -> None:
        done: set[fx.Node] = set()
        for w in self.writers:
            if w.node in done:
                continue
            per_unit = self._grow(w, per_unit=True)
            result, members = per_unit
            if isinstance(result, Broken):
                whole, members_whole = self._grow(w, per_unit=False)
                if not isinstance(whole, Broken):
                    result, members = whole, members_whole
            done.update(m.node for m in members)
            if isinstance(result, Broken):
                if result.node not in self.g.outputs:  # (a last layer's units reaching the logits is no news)
                    self.block(self.label(result.node), f"no rescale or scale of {self.label(w.node)}'s units: "
                                                        f"{result.reason}")
            else:
                self._emit(*result)

    def _grow(self, first: Writer, per_unit: bool):
        """Grow the candidate started at ``first`` to a fixpoint: ((candidate, eps sites) or Broken, writers)."""
        n = first.channels
        labels = torch.arange(n) if per_unit else torch.zeros(1, dtype=torch.int64)
        cand = _Candidate([first])
        self._add_writer(cand, first, labels if per_unit else None)
        for _ in range(MAX_GROWTH):
            try:
                flow = propagate(self.g, cand.params, self.live)
            except NeedWriters as need:
                new = self._writers_of(need.operand)
                if isinstance(new, Broken):
                    return new, cand.writers
                vec = None
                if per_unit:
                    vec = along_axis(need.state, need.axis, need.node, "the residual add").label.reshape(-1)
                for w in new:
                    if any(w.node is c.node for c in cand.writers):
                        return Broken(need.node, "a residual stream feeds back into itself"), cand.writers
                    if any(name in cand.params for name, _ in w.params):  # (h + W·h: W reads and writes the units)
                        return Broken(need.node, f"{self.label(w.node)} both reads the units and writes them back: "
                                                 f"only a similarity D·W·D⁻¹ would undo it"), cand.writers
                    if per_unit and (w.channels != vec.numel() or not torch.equal(vec, torch.arange(n))):
                        return Broken(need.node, f"{self.label(w.node)} adds units in another order"), cand.writers
                    cand.writers.append(w)
                    self._add_writer(cand, w, vec)
                continue
            except NeedReader as need:
                if need.param in cand.params:
                    return Broken(need.node, f"{need.param} would be scaled twice"), cand.writers
                view = [1] * len(_param_shape(self.g, need.param))
                view[need.axis] = -1  # compact: the factor varies along the input axis only
                cand.params[need.param] = Scaled(need.labels.reshape(view), (-need.exp).reshape(view))
                cand.readers.append((need.param, need.axis, need.labels, need.exp))
                continue
            except Broken as exc:
                return exc, cand.writers
            return (cand, flow.eps), cand.writers
        return Broken(first.node, "the candidate kept growing"), cand.writers

    def _add_writer(self, cand: _Candidate, w: Writer, labels: torch.Tensor | None) -> None:
        for name, axis in w.params:
            if labels is None:
                cand.params[name] = Scaled.along(len(_param_shape(self.g, name)), None, torch.zeros(1, dtype=torch.int64))
                cand.roles[name] = ("x_in", None)
            else:
                cand.params[name] = _labels_param(self.g, name, axis, labels)
                cand.roles[name] = ("x_in", axis)

    def _writers_of(self, node: fx.Node) -> list[Writer] | Broken:
        """The writers whose units reach ``node`` through ops that pass units unchanged (ReLU, pooling, adds)."""
        found: list[Writer] = []
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.by_node:
                found.append(self.by_node[n])
                continue
            name = op_name(n)
            if name in ("relu", "relu_", "leaky_relu", "clone", "contiguous", "alias", "_to_copy", "to", "dropout",
                        "max_pool1d", "max_pool2d", "max_pool3d", "getitem", "avg_pool2d"):
                stack.append(n.args[0])
            elif name in ("add", "add_"):
                stack.extend(a for a in n.args[:2] if isinstance(a, fx.Node))
            elif name in ("view", "reshape", "_unsafe_view") and (shape_of(n) or (0,))[-1] == \
                    (shape_of(n.args[0]) or (1,))[-1]:
                stack.append(n.args[0])  # (N·T, d) ↔ (N, T, d): the units stay on the last axis
            elif n.op == "placeholder":
                return Broken(node, "the residual stream carries the model's input, which cannot be rescaled")
            else:
                return Broken(node, f"the residual branch through {name or n.op} is not made of units of a writer")
        return found

    def _emit(self, cand: _Candidate, eps: list[EpsSite]) -> None:
        first = cand.writers[0]
        names = ", ".join(dict.fromkeys(self.label(w.node) for w in cand.writers))
        whole = all(axis is None for role, axis in cand.roles.values() if role == "x_in")
        count = 1 if whole else first.channels
        x_in = [TensorSlice(p, axis) for p, (role, axis) in cand.roles.items() if role == "x_in"]
        if cand.readers:
            degrees = {float(e) for _, _, _, exps in cand.readers for e in exps.unique().tolist() if e != 0}
            if len(degrees) != 1 or eps:
                self.block(names, "units read with different degrees, or both read and normalised: no family declared")
                return
            degree = degrees.pop()
            family = RESCALE_BY_DEGREE.get(int(degree)) if degree == int(degree) else None
            if family is None:
                self.block(names, f"no rescale family declared for homogeneity of degree {degree:g}")
                return
            x_out = []
            for param, axis, labels, _ in cand.readers:
                ts = _slice_for(param, axis, labels, count, _param_shape(self.g, param))
                if ts is None:
                    self.block(names, f"{param} reads the units in an order no tensor view expresses")
                    return
                x_out.append(ts)
            readers = ", ".join(dict.fromkeys(self.label(n) for n in self._reader_nodes(cand)))
            self.found.group_sets.append(GroupSet(family, f"{names} → {readers}", count, {"x_in": tuple(x_in),
                                                                                         "x_out": tuple(x_out)},
                                                  f"x_in·a, x_out/a^{int(degree)}"))
            return
        if not eps:
            self.block(names, "scaling these units changes nothing the graph shows, yet no norm removes it")
            return
        exps = {site.exp for site in eps}
        if len(exps) != 1:
            self.block(names, "normalised at different degrees")
            return
        from symtools.symbolic.normalization import EpsilonLawError, epsilon_factor

        try:
            factor = epsilon_factor(int(exps.pop()), "batch" if eps[0].kind == "batch" else "layer")
        except EpsilonLawError as exc:
            self.block(names, f"no scale symmetry assumed: {exc}")
            return
        norms = tuple(dict.fromkeys(site.module for site in eps))
        label = f"{names} → {', '.join(norms)}" if len(norms) <= 3 else f"{names} → {len(norms)} norms"
        what = "per unit" if not whole else "all units together"
        self.found.group_sets.append(GroupSet("scale", label, count, {"x": tuple(x_in)},
                                              f"{what}; {', '.join(sorted({s.module_class for s in eps}))} "
                                              f"removes the scale", epsilon_of=norms[0] if len(norms) == 1 else norms,
                                              epsilon_factor=factor))

    def _reader_nodes(self, cand: _Candidate) -> list[fx.Node]:
        out = []
        for param, *_ in cand.readers:
            out += [u for u in self.g.uses(param)]
        return out

    # -- translations
    def translation_groups(self) -> None:
        if self.loss != "cross_entropy":
            return
        for w in self.writers:
            if w.bias:
                if self._shifts({w.bias: frozenset()}):
                    self._translation(w, [TensorSlice(w.bias, 0)], w.channels, "per unit: its shift is removed")
                elif self._shifts({w.bias: frozenset({0})}):
                    self._translation(w, [TensorSlice(w.bias, None)], 1, "the whole bias: a common shift is removed")
            if w.columns:
                param, axis = w.columns
                shape = _param_shape(self.g, param)
                if self._shifts({param: frozenset({1 - axis})}):
                    self._translation(w, [TensorSlice(param, axis)], shape[axis],
                                      "each input feature's weights: adds c·x_j to every unit, which is removed")
            if w.rows_shift:
                shape = _param_shape(self.g, w.rows_shift)
                if self._shifts({w.rows_shift: frozenset({1})}):
                    self._translation(w, [TensorSlice(w.rows_shift, 0)], shape[0],
                                      "each embedding row: shifts its token's features, which is removed")

    def _shifts(self, params: dict[str, frozenset[int]]) -> bool:
        try:
            propagate_shift(self.g, params, self.live, self.class_axis)
        except Broken:  # most writers have no translation (a ReLU follows): not worth a "blocked" line each
            return False
        return True

    def _translation(self, w: Writer, slices: list[TensorSlice], count: int, note: str) -> None:
        self.found.group_sets.append(GroupSet("translation", self.label(w.node), count, {"x": tuple(slices)}, note))


def _slice_for(param: str, axis: int, labels: torch.Tensor, count: int, shape: tuple[int, ...]) -> TensorSlice | None:
    """The view of ``param`` in which its ``axis`` runs over the groups in order: labels 0..C−1, each repeated r
    times in a row (a flatten of C channels of r positions: view (…, C, r, …))."""
    n = labels.numel()
    if n % count or bool((labels < 0).any()):
        return None
    r = n // count
    if not torch.equal(labels.cpu(), torch.arange(count).repeat_interleave(r)):
        return None
    if r == 1:
        return TensorSlice(param, axis)
    view = shape[:axis] + (count, r) + shape[axis + 1:]
    return TensorSlice(param, axis, view)


def find_from_graph(g: ExportedGraph, loss: str = "cross_entropy", class_axis: int = 1) -> SymmetryMap:
    """The elementwise groups of ``loss(model(x), y)``; ``class_axis``: the logits' class axis (1: symtools'
    convention, (N, C) or (N, V, T); −1: a Hugging Face model's own (N, T, V) logits)."""
    walk = _Walk(g, loss, class_axis)
    walk.scale_groups()
    walk.translation_groups()
    return walk.found
