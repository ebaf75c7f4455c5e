"""Find the symmetry groups of a model's loss by walking its ``torch.fx`` graph.

Every *source* of hidden units, a Linear/Conv layer (units: output channels; their parameters: weight rows
and bias) or an affine BatchNorm/LayerNorm (units: channels; parameters: γ and β), is followed forward
through the ops that act on each unit by itself until the walk meets a *consumer*:

==========================  ===================================================================================
consumer met                groups bound (slots; one group per unit unless said otherwise)
==========================  ===================================================================================
Linear/Conv ``Q``           ``rescale`` (path homogeneous of degree 1) or ``rescale2`` (degree 2, e.g. z²):
                            ``x_in`` = the unit's parameters (axis 0), ``x_out`` = ``Q.weight`` along its input
                            axis 1, viewed as ``(out, C, H·W)`` after a flatten of C channels of H×W maps.
BatchNorm (batch stats)     ``scale``: ``x`` = the unit's parameters (axis 0), since BN(a·z_c) = BN(z_c) for a > 0;
                            ``translation``: ``x`` = the bias (β) of each unit, if the path passes shifts.
LayerNorm over features     ``scale``: the whole source (weight and bias) is ONE group, since LN(a·z) = LN(z);
                            ``translation`` (path passes shifts): each input column of a Linear source
                            (weight axis 1; adding c to column j adds c·x_j to every feature) and the whole
                            bias (one group): both shift all features of a sample by the same amount.
softmax (cross-entropy)     ``translation`` on the logits' source, as for LayerNorm: softmax(z + c·1) = softmax(z).
==========================  ===================================================================================

The ops passed on the way are data (:data:`MODULE_OPS`, :data:`FUNCTION_OPS`, :data:`METHOD_OPS`): each states
its degree of positive homogeneity (f(a·z) = a^k f(z) for a > 0), whether it passes a per-unit shift
(f(z + c) = f(z) + c) and whether it pools over positions. Flatten/view/reshape to ``(N, C·H·W)`` is
recognised from the shapes of a run of ``example_input``. Having no activation at all (a Linear/Conv feeding
the next one) is a linear map of the unit, so the per-unit rescale holds (it is the diagonal part of the
larger GL(h) symmetry, which is not recorded here).

Everything else stops the walk and is reported as :class:`~symtools.nn.groups.Blocked`: unknown ops (tanh,
sigmoid, average pools, custom code, residual adds, …), a unit feeding several ops, and parameters used at
more than one place. No group is ever guessed from parameter names; names only label what the graph shows.

The BatchNorm groups hold for batch statistics (train mode), which is where the identities are checked; in
eval mode BN is a fixed affine map and has none of them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from symtools.errors import SymtoolsError
from symtools.nn.groups import Blocked, GroupSet, SymmetryMap, TensorSlice
from symtools.nn.small import Square

LOSSES = ("cross_entropy", "mse")
RESCALE_BY_DEGREE = {1: "rescale", 2: "rescale2"}  # family of x_in → a·x_in, x_out → x_out / a^k


@dataclass(frozen=True)
class Op:
    """How an op acts on the values of one unit (a channel or a feature), for a > 0 and a constant c.

    ``degree``: f(a·z) = a^degree·f(z). ``shifts``: f(z + c) = f(z) + c (a per-unit shift passes through).
    ``pools``: it combines positions of one channel (needs the channel on axis 1 and spatial axes after it).
    """

    name: str
    degree: int
    shifts: bool = False
    pools: bool = False


RELU, LEAKY_RELU = Op("ReLU", 1), Op("LeakyReLU", 1)
IDENTITY, DROPOUT, SQUARE = Op("Identity", 1, shifts=True), Op("Dropout", 1), Op("Square", 2)
MAX_POOL = Op("MaxPool", 1, shifts=True, pools=True)

MODULE_OPS: dict[type, Op] = {
    nn.ReLU: RELU, nn.LeakyReLU: LEAKY_RELU, nn.Identity: IDENTITY, Square: SQUARE,
    nn.Dropout: DROPOUT, nn.Dropout1d: DROPOUT, nn.Dropout2d: DROPOUT, nn.Dropout3d: DROPOUT,
    nn.MaxPool1d: MAX_POOL, nn.MaxPool2d: MAX_POOL, nn.MaxPool3d: MAX_POOL,
}
FUNCTION_OPS: dict[Any, Op] = {
    F.relu: RELU, torch.relu: RELU, F.relu_: RELU, torch.relu_: RELU, F.leaky_relu: LEAKY_RELU,
    F.dropout: DROPOUT, F.max_pool1d: MAX_POOL, F.max_pool2d: MAX_POOL, F.max_pool3d: MAX_POOL,
}
METHOD_OPS: dict[str, Op] = {"relu": RELU, "relu_": RELU}
RESHAPES = (nn.Flatten, torch.flatten, torch.reshape, "flatten", "view", "reshape")

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Tracer(fx.Tracer):
    """fx tracer that keeps the modules of :data:`MODULE_OPS` (e.g. :class:`Square`) as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_OPS or super().is_leaf_module(m, module_qualified_name)


# ----------------------------------------------------------------------------------------------------------
# binding groups by hand


def _as_slice(item: Any) -> TensorSlice:
    if isinstance(item, TensorSlice):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str):
        return TensorSlice(item[0], item[1], tuple(item[2]) if len(item) == 3 and item[2] is not None else None)
    raise SymtoolsError(f"a slot entry must be TensorSlice(param, axis[, shape]) or (param, axis[, shape]), "
                        f"got {item!r}")


def bind(model: nn.Module, family: str, layer: str, slots: Mapping[str, Sequence[Any]], count: int,
         note: str = "", epsilon_of: str | None = None, epsilon_factor: float = -2.0) -> GroupSet:
    """A :class:`GroupSet` of ``count`` groups of ``family``, checked against ``model``'s parameters.

    ``slots`` maps each slot name to its tensors: :class:`TensorSlice` or ``(param, axis[, shape])``.
    Checked: every param is in ``model.named_parameters()``; ``shape`` has the tensor's number of elements;
    ``axis`` is an axis of that view whose size is ``count`` (``axis=None``, the whole tensor, needs
    ``count == 1``). Example: ``bind(model, "rescale", "fc0 → fc1", {"x_in": [("fc0.weight", 0),
    ("fc0.bias", 0)], "x_out": [("fc1.weight", 1)]}, count=16)``. ``epsilon_of``: the BatchNorm (or LayerNorm)
    whose ε breaks a scale group, and ``epsilon_factor`` the c of its law ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε (−2 for a
    path of degree 1; :func:`symtools.symbolic.normalization.epsilon_factor` derives it for degree k: −2k);
    see :class:`GroupSet`.
    """
    if not isinstance(family, str) or not family:
        raise SymtoolsError(f"family must be a non-empty name, got {family!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SymtoolsError(f"count must be a positive integer, got {count!r}")
    if not slots:
        raise SymtoolsError(f"{family} at {layer}: no slots given")
    if isinstance(epsilon_factor, bool) or not isinstance(epsilon_factor, (int, float)) \
            or not math.isfinite(epsilon_factor):
        raise SymtoolsError(f"{family} at {layer}: epsilon_factor must be a finite number, got {epsilon_factor!r}")
    if epsilon_of is not None and not isinstance(dict(model.named_modules()).get(epsilon_of),
                                                 BATCH_NORMS + (nn.LayerNorm,)):
        raise SymtoolsError(f"{family} at {layer}: epsilon_of={epsilon_of!r} is not a BatchNorm or LayerNorm "
                            f"module of the model")
    params = dict(model.named_parameters())
    bound: dict[str, tuple[TensorSlice, ...]] = {}
    for slot, items in slots.items():
        if isinstance(items, (TensorSlice, str)) or (isinstance(items, tuple) and items and isinstance(items[0], str)):
            items = [items]
        tensors = tuple(_as_slice(item) for item in items)
        if not tensors:
            raise SymtoolsError(f"{family} at {layer}: slot {slot!r} has no tensors")
        for ts in tensors:
            _check_slice(ts, params, count, f"{family} at {layer}, slot {slot!r}")
        bound[slot] = tensors
    return GroupSet(family=family, layer=layer, count=count, slots=bound, note=note, epsilon_of=epsilon_of,
                    epsilon_factor=float(epsilon_factor))


def _check_slice(ts: TensorSlice, params: Mapping[str, torch.Tensor], count: int, where: str) -> None:
    if ts.param not in params:
        close = [name for name in params if ts.param.split(".")[-1] == name.split(".")[-1]][:5]
        raise SymtoolsError(f"{where}: model has no parameter {ts.param!r}"
                            + (f" (parameters with that ending: {', '.join(close)})" if close else ""))
    shape = tuple(params[ts.param].shape)
    if ts.shape is not None:
        if math.prod(ts.shape) != math.prod(shape):
            raise SymtoolsError(f"{where}: {ts.param} of shape {shape} cannot be viewed as {ts.shape}")
        shape = tuple(ts.shape)
    if ts.axis is None:
        if count != 1:
            raise SymtoolsError(f"{where}: axis=None makes all of {ts.param} one group, but count is {count}")
        return
    if isinstance(ts.axis, bool) or not isinstance(ts.axis, int) or not 0 <= ts.axis < len(shape):
        raise SymtoolsError(f"{where}: axis {ts.axis!r} is not an axis of {ts.param} viewed as {shape}")
    if shape[ts.axis] != count:
        raise SymtoolsError(f"{where}: {ts.param} has {shape[ts.axis]} entries along axis {ts.axis} "
                            f"(viewed as {shape}), not count={count}")


# ----------------------------------------------------------------------------------------------------------
# the graph walk


@dataclass(frozen=True)
class _Source:
    """Units produced by one module: ``channels`` units on axis ``axis`` of its output."""

    node: fx.Node
    name: str
    channels: int
    axis: int
    rows: tuple[str, ...]  # parameters scaled per unit along axis 0 (weight, bias, or γ, β)
    shift: tuple[str, ...]  # parameters whose per-unit shift shifts the unit's value (bias, or β)
    columns: str | None = None  # a Linear's weight: shifting input column j adds c·x_j to every unit
    in_features: int = 0


@dataclass
class _Path:
    """What the ops passed so far do to one unit's values."""

    axis: int
    ops: list[str] = field(default_factory=list)
    degree: int = 1
    shifts: bool = True
    spatial: int | None = None  # after a flatten: the number of columns each channel became

    def describe(self) -> str:
        return " → ".join(self.ops) if self.ops else "nothing in between"


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores the shape of every tensor value in ``node.meta["symtools_shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["symtools_shape"] = tuple(result.shape)
        return result


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("symtools_shape")


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(…)``, ``x.dim()``, ``x.shape``: uses of a value that read only its shape (``x.view(x.size(0), -1)``)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


class _Walk:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, loss: str) -> None:
        self.model, self.gm, self.loss = model, gm, loss
        self.found = SymmetryMap()
        self._blocked: set[tuple[str, str]] = set()

    # -- bookkeeping
    def block(self, node: fx.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else _label(node)
        if (name, reason) not in self._blocked:
            self._blocked.add((name, reason))
            self.found.blocked.append(Blocked(name, reason))

    def add(self, family: str, layer: str, count: int, slots: dict[str, list[TensorSlice]], note: str,
            epsilon_of: str | None = None, epsilon_factor: float = -2.0) -> None:
        self.found.group_sets.append(bind(self.model, family, layer, slots, count, note, epsilon_of,
                                          epsilon_factor))

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def describe(self, node: fx.Node) -> str:
        m = self.module(node)
        if m is not None:
            return f"{type(m).__name__} ({node.target})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {node.target}"

    # -- sources
    def source(self, node: fx.Node) -> _Source | None:
        m, name = self.module(node), str(node.target)
        shape = _shape(node)
        if m is None or shape is None:
            return None
        bias = (f"{name}.bias",) if getattr(m, "bias", None) is not None else ()
        if isinstance(m, nn.Linear):
            return _Source(node, name, m.out_features, len(shape) - 1, (f"{name}.weight",) + bias, bias,
                           f"{name}.weight", m.in_features)
        if isinstance(m, LAYERS):
            return _Source(node, name, m.out_channels, 1, (f"{name}.weight",) + bias, bias)
        if isinstance(m, BATCH_NORMS) and m.affine:
            return _Source(node, name, m.num_features, 1, (f"{name}.weight", f"{name}.bias"), (f"{name}.bias",))
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine and len(m.normalized_shape) == 1:
            return _Source(node, name, m.normalized_shape[0], len(shape) - 1, (f"{name}.weight",) + bias, bias)
        return None

    # -- following one source
    def follow(self, src: _Source) -> None:
        node, path = src.node, _Path(axis=src.axis)
        while True:
            users = [u for u in node.users if not _is_shape_query(u)]
            if not users:
                return
            if len(users) > 1:
                self.block(node, f"no symmetry assumed through the branch after {_label(node)} "
                                 f"(its output feeds {len(users)} ops)")
                return
            nxt = users[0]
            if nxt.op == "output":
                self.at_output(src, path, nxt, node)
                return
            if not nxt.args or nxt.args[0] is not node:
                self.block(nxt, f"no symmetry assumed through {self.describe(nxt)} (unit value is not its input)")
                return
            m = self.module(nxt)
            if isinstance(m, LAYERS):
                self.at_layer(src, path, nxt, m)
                return
            if isinstance(m, BATCH_NORMS + (nn.LayerNorm,)):
                self.at_norm(src, path, nxt, m)
                return
            if self.is_reshape(nxt):
                if not self.reshape(path, node, nxt):
                    return
            elif (op := self.op(nxt)) is not None:
                if not self.elementwise(path, node, nxt, op):
                    return
            else:
                self.block(nxt, f"no symmetry assumed through {self.describe(nxt)}")
                return
            node = nxt

    def op(self, node: fx.Node) -> Op | None:
        if len(node.all_input_nodes) != 1:
            return None  # residual adds, products of two tensors, ...
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d) and m.return_indices:
                return None
            return MODULE_OPS.get(type(m))
        if node.op == "call_function":
            if node.kwargs.get("return_indices"):
                return None
            return FUNCTION_OPS.get(node.target)
        if node.op == "call_method":
            return METHOD_OPS.get(node.target)
        return None

    def is_reshape(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.module(node), nn.Flatten)
        return node.op in ("call_function", "call_method") and node.target in RESHAPES

    def elementwise(self, path: _Path, node: fx.Node, nxt: fx.Node, op: Op) -> bool:
        shape = _shape(node)
        if op.pools and (path.spatial is not None or path.axis != 1 or shape is None or len(shape) < 3):
            self.block(nxt, f"no symmetry assumed through {self.describe(nxt)}: it would pool across units")
            return False
        path.ops.append(op.name)
        path.degree *= op.degree
        path.shifts = path.shifts and op.shifts
        return True

    def reshape(self, path: _Path, node: fx.Node, nxt: fx.Node) -> bool:
        """Accept only a flatten of everything after the batch axis: (N, C, *S) → (N, C·prod(S))."""
        before, after = _shape(node), _shape(nxt)
        if before is not None and before == after:
            return True
        if (before is None or after is None or len(before) < 2 or path.spatial is not None or path.axis != 1
                or after != (before[0], math.prod(before[1:]))):
            self.block(nxt, f"no symmetry assumed through {self.describe(nxt)} from {before} to {after}")
            return False
        spatial = math.prod(before[2:])
        path.ops.append("flatten")
        path.spatial = spatial if spatial > 1 else None
        return True

    # -- consumers
    def at_layer(self, src: _Source, path: _Path, nxt: fx.Node, q: nn.Module) -> None:
        name = str(nxt.target)
        family = RESCALE_BY_DEGREE.get(path.degree)
        if family is None:
            self.block(nxt, f"no rescale family declared for homogeneity of degree {path.degree} "
                            f"({src.name} → {name} through {path.describe()})")
            return
        shape = _shape(nxt.args[0])
        if isinstance(q, nn.Linear):
            if path.spatial is not None:
                out_slice = TensorSlice(f"{name}.weight", 1, (q.out_features, src.channels, path.spatial))
            elif shape is not None and path.axis == len(shape) - 1 and q.in_features == src.channels:
                out_slice = TensorSlice(f"{name}.weight", 1)
            else:
                self.block(nxt, f"no symmetry assumed: the units of {src.name} are not the input features of {name}")
                return
        else:
            if path.spatial is not None or path.axis != 1 or q.groups != 1 or q.in_channels != src.channels:
                self.block(nxt, f"no symmetry assumed: the units of {src.name} are not the input channels of "
                                f"{name}" + (" (grouped convolution)" if q.groups != 1 else ""))
                return
            out_slice = TensorSlice(f"{name}.weight", 1)
        self.add(family, f"{src.name} → {name}", src.channels,
                 {"x_in": [TensorSlice(p, 0) for p in src.rows], "x_out": [out_slice]},
                 f"through {path.describe()}; x_in·a, x_out/a^{path.degree}")

    def at_norm(self, src: _Source, path: _Path, nxt: fx.Node, norm: nn.Module) -> None:
        label = f"{src.name} → {nxt.target}"
        shape = _shape(nxt)
        if isinstance(norm, BATCH_NORMS):
            if path.spatial is not None or path.axis != 1 or norm.num_features != src.channels:
                self.block(nxt, f"no symmetry assumed: {nxt.target} does not normalise the units of {src.name}")
                return
            # BN's ε breaks the scale exactly: L(a·θ_A; ε) = L(θ_A; ε/a^(2k)) for a path of degree k, so
            # ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε with c = −2k, derived by the engine (no ε law: no scale group)
            factor = self.epsilon_factor(src, path, nxt, "batch")
            if factor is not None:
                self.add("scale", label, src.channels, {"x": [TensorSlice(p, 0) for p in src.rows]},
                         f"per channel, through {path.describe()}; BN with batch statistics removes the scale",
                         epsilon_of=str(nxt.target), epsilon_factor=factor)
            if path.shifts and src.shift:
                self.add("translation", label, src.channels, {"x": [TensorSlice(p, 0) for p in src.shift]},
                         "per channel; BN with batch statistics removes the channel mean")
            return
        if (tuple(norm.normalized_shape) != (src.channels,) or path.spatial is not None or shape is None
                or path.axis != len(shape) - 1):
            self.block(nxt, f"no symmetry assumed through {self.describe(nxt)}: it does not normalise exactly "
                            f"the units of {src.name}")
            return
        factor = self.epsilon_factor(src, path, nxt, "layer")  # LN's ε breaks it like BN's
        if factor is not None:
            self.add("scale", label, 1, {"x": [TensorSlice(p, None) for p in src.rows]},
                     f"the whole layer, through {path.describe()}; LayerNorm removes a common scale",
                     epsilon_of=str(nxt.target), epsilon_factor=factor)
        if path.shifts:
            self.uniform_translation(src, label, "LayerNorm removes the per-sample mean")

    def epsilon_factor(self, src: _Source, path: _Path, nxt: fx.Node, norm: str) -> float | None:
        """c of the ε law ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε of a scale group reaching norm ``nxt`` through ``path``,
        derived by :func:`symtools.symbolic.normalization.epsilon_law` (cached); None (and the walk blocked
        there) when the engine cannot derive one."""
        from symtools.symbolic.normalization import (  # SymPy only when needed
            EpsilonLawError,
            epsilon_factor,
        )

        try:
            return epsilon_factor(path.degree, norm)
        except EpsilonLawError as exc:
            self.block(nxt, f"no scale symmetry assumed for {src.name} → {nxt.target} through "
                            f"{path.describe()}: {exc}")
            return None

    def at_output(self, src: _Source, path: _Path, out: fx.Node, node: fx.Node) -> None:
        if self.loss != "cross_entropy":
            return  # the MSE loss has no symmetry in the outputs
        shape = _shape(node)
        if out.args[0] is not node:
            self.block(out, "no translation symmetry assumed: the model does not return a single logits tensor")
        elif not path.shifts:
            self.block(node, f"no translation symmetry assumed: the logits pass through {path.describe()}")
        elif shape is None or len(shape) != 2 or path.axis != 1 or path.spatial is not None:
            self.block(node, f"no translation symmetry assumed for logits of shape {shape} from {src.name}")
        else:
            self.uniform_translation(src, f"{src.name} → softmax", "softmax removes a shift common to all logits")

    def uniform_translation(self, src: _Source, label: str, why: str) -> None:
        """Groups that shift every unit of one sample by the same amount: Linear input columns, whole bias."""
        if src.columns is not None:
            self.add("translation", label, src.in_features, {"x": [TensorSlice(src.columns, 1)]},
                     f"each input column of {src.columns}; {why}")
        if src.shift:
            self.add("translation", label, 1, {"x": [TensorSlice(p, None) for p in src.shift]},
                     f"the whole bias; {why}")

    # -- parameters used at several places
    def drop_shared(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Remove groups on parameters that act at more than one place (shared tensors, repeated calls)."""
        unsafe: dict[str, str] = {}
        by_tensor: dict[int, list[str]] = {}
        for name, p in named:
            by_tensor.setdefault(id(p), []).append(name)
        for names in by_tensor.values():
            if len(names) > 1:
                for name in names:
                    unsafe[name] = f"parameter shared by {', '.join(names)}"
        calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                unsafe[str(node.target)] = f"{node.target} is also used directly by the forward code"
            elif node.op == "call_module" and calls[node.target] > 1:
                for pname, _ in self.module(node).named_parameters():
                    unsafe[f"{node.target}.{pname}"] = f"module {node.target} is called {calls[node.target]} times"
        kept = []
        for gs in self.found.group_sets:
            bad = [unsafe[p] for p in gs.params() if p in unsafe]
            if bad:
                self.block(gs.layer, f"no {gs.family} symmetry assumed: {bad[0]}")
            else:
                kept.append(gs)
        self.found.group_sets = kept


def trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """The fx graph of ``model`` with the shape of every tensor value, from a no-grad eval-mode run.

    The runs use eval mode so that BatchNorm running statistics are not touched; every module's
    ``training`` flag is restored afterwards.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise SymtoolsError(f"torch.fx cannot trace {type(model).__name__}: {exc}; bind its symmetries by hand "
                            f"with symtools.nn.graph.bind()") from exc
    gm = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            try:  # a plain forward first: its errors are short (fx's interpreter decorates them, slowly)
                model(example_input)
            except Exception as exc:
                first = (str(exc).splitlines() or [""])[0]
                raise SymtoolsError(f"example input of shape {tuple(getattr(example_input, 'shape', ()))} does "
                                    f"not run through {type(model).__name__}: {first}") from exc
            _ShapeRecorder(gm).run(example_input)
    finally:
        for m, training in modes.items():
            m.training = training
    return gm


def find_symmetries(model: nn.Module, example_input: torch.Tensor, loss: str = "cross_entropy",
                    walk: str = "auto") -> SymmetryMap:
    """All translation, scale and rescale groups of ``loss(model(x), y)`` that the graph shows (module docstring),
    and the attention heads' matrix groups.

    ``loss``: ``"cross_entropy"`` (softmax of the returned logits over axis 1) or ``"mse"`` (no symmetry of
    its own). Groups come in graph order; :attr:`SymmetryMap.blocked` lists where the walk stopped.
    ``walk``: ``"fx"`` (this module's walk over modules), ``"aten"`` (:mod:`symtools.nn.aten_walk`, over the
    ``torch.export`` graph: residual streams, transformers, normalisations written as ops), or ``"auto"``: fx
    where it sees the whole model without stopping (the same groups, faster), the ATen walk otherwise (and for
    Hugging Face models); the ATen walk's :attr:`~SymmetryMap.blocked` then says where its candidates broke.
    """
    if loss not in LOSSES:
        raise SymtoolsError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if walk not in WALKS:
        raise SymtoolsError(f"unknown walk {walk!r}; choose one of {', '.join(WALKS)}")
    if walk == "aten" or (walk == "auto" and _needs_aten(model)):
        return _aten_symmetries(model, example_input, loss)
    gm = trace(model, example_input)  # fx's errors stand: export would silently specialise `if x.sum() > 0`
    fx_walk = _Walk(model, gm, loss)
    for node in gm.graph.nodes:
        src = fx_walk.source(node) if node.op == "call_module" else None
        if src is not None:
            fx_walk.follow(src)
    fx_walk.drop_shared(model.named_parameters(remove_duplicate=False))
    if walk == "auto" and fx_walk.found.blocked:  # fx stopped somewhere: see through modules (and say why there)
        return _aten_symmetries(model, example_input, loss)
    return fx_walk.found


WALKS = ("auto", "fx", "aten")


def _needs_aten(model: nn.Module) -> bool:
    """Models fx cannot follow: Hugging Face models (and anything on the meta device)."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "meta") or any(
        type(m).__module__.startswith("transformers.") for m in model.modules())


def _aten_symmetries(model: nn.Module, example_input: torch.Tensor, loss: str) -> SymmetryMap:
    from symtools.nn.aten_graph import export
    from symtools.nn.aten_walk import find_from_graph
    from symtools.nn.attention_groups import attention_groups

    g = export(model, example_input)
    # a transformers model called directly returns its logits as (N, T, V); symtools' CausalLM (and every image
    # model) puts the classes on axis 1
    raw_hf = type(model).__module__.startswith("transformers.")
    found = find_from_graph(g, loss, class_axis=-1 if raw_hf else 1)
    attention_groups(g, found)
    return found
