"""What a positive rescaling of some parameters does to every value of an ATen graph.

A *candidate* scales entries of parameters: entry e of parameter P is multiplied by a_ℓ^k, where ℓ = label[e]
names one of the group's factors a_0, a_1, … (one per unit: a channel, a feature, or a single factor for a
whole layer) and k = exp[e] (−1 where P is not touched). :func:`propagate` pushes this through the graph, op by
op, as the same kind of state on every value: value entry e is multiplied by a_label[e]^exp[e]. Labels and
exponents are kept *compact*: tensors broadcastable to the value's shape, so a per-channel factor of a
(N, C, H, W) activation is a (1, C, 1, 1) tensor.

Each op has a rule (:data:`RULES`); where an op would mix factors in a way that is not a rescaling of its
output, the candidate is not a symmetry there and :class:`Broken` says why (the first such op). Two kinds of
op instead ask the caller to grow the candidate (:class:`NeedWriters`: a residual add whose other operand is not
scaled yet; :class:`NeedReader`: a layer reading scaled inputs with weights that do not undo it). A
normalisation whose input is scaled uniformly along the axes it normalises undoes the scale up to its ε; these
places are collected in :attr:`Flow.eps` (the ε law is then derived and checked exactly).

Rules (x scaled, a > 0): ReLU, LeakyReLU, dropout, max/average pooling, neg, copies: pass (degree 1);
``pow(x, p)``: degree p; ``rsqrt``: −½; ``mul``/``div``: exponents add/subtract; ``add``: both sides must be
scaled alike; ``mean``/``sum``/``amax`` over axes the factor does not vary along; views, transposes, slices,
concatenations: applied to the labels themselves; Linear/Conv/matmul: a contraction whose terms must all carry
the same factor; BatchNorm (batch statistics), LayerNorm, RMSNorm: remove a factor uniform over the axes they
normalise; attention: the values' per-channel factors pass, queries and keys must be unscaled (the matrix
families cover them); SiLU, GELU, tanh, sigmoid, softmax, exp and every op without a rule: not positively
homogeneous, the scale breaks there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from symtools.nn.aten_graph import ExportedGraph, forward_states, op_name, shape_of


@dataclass
class Scaled:
    """Value entry e is multiplied by a_{label[e]}^{exp[e]} (label −1, exp 0: untouched); compact tensors."""

    label: Tensor
    exp: Tensor

    @classmethod
    def along(cls, ndim: int, axis: int | None, labels: Tensor, exp: float = 1.0) -> Scaled:
        """Factor ``labels[i]`` at index i of ``axis`` (all entries: ``labels`` of one element) of an ndim tensor."""
        shape = [1] * ndim
        if axis is not None:
            shape[axis] = labels.numel()
        label = labels.reshape(shape).to(torch.int64)
        return cls(label, torch.where(label >= 0, float(exp), 0.0).to(torch.float64))


class Broken(Exception):
    """The candidate is not a symmetry: ``node`` turns the rescaling into something else (``reason``)."""

    def __init__(self, node: fx.Node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


class NeedWriters(Exception):
    """``node`` adds a scaled operand to an unscaled one (``operand``): its writers must be scaled too."""

    def __init__(self, node: fx.Node, operand: fx.Node, state: Scaled, axis: int):
        super().__init__(f"{node.name} needs the writers of {operand.name}")
        self.node, self.operand, self.state, self.axis = node, operand, state, axis


class NeedReader(Exception):
    """Layer ``node`` contracts scaled inputs (factor ``labels``/``exp`` along its input features) with the
    unscaled weight ``param``: dividing the weight's input axis ``axis`` by the factors would undo it."""

    def __init__(self, node: fx.Node, param: str, axis: int, labels: Tensor, exp: Tensor):
        super().__init__(f"{node.name} reads scaled inputs")
        self.node, self.param, self.axis, self.labels, self.exp = node, param, axis, labels, exp


@dataclass
class EpsSite:
    """A normalisation that removes the factor up to its ε: the ε-add or norm ``node``, its module, the
    exponent of the factor on its input and the kind of normalisation (``batch``, ``layer``, ``rms``)."""

    node: fx.Node
    module: str
    module_class: str
    exp: float
    kind: str


@dataclass
class Flow:
    states: dict[fx.Node, Any] = field(default_factory=dict)
    eps: list[EpsSite] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# state algebra


def _full(s: Scaled, shape: tuple[int, ...]) -> Scaled:
    return Scaled(s.label.expand(shape), s.exp.expand(shape))


def _unscaled(shape_len: int) -> Scaled:
    one = [1] * shape_len
    return Scaled(torch.full(one, -1, dtype=torch.int64), torch.zeros(one, dtype=torch.float64))


def _clean(s: Scaled | None) -> Scaled | None:
    if s is None:
        return None
    if bool((s.exp == 0).all()):
        return None
    label = torch.where(s.exp == 0, torch.full_like(s.label, -1), s.label)
    return Scaled(label, s.exp)


def _combine(a: Scaled | None, b: Scaled | None, node: fx.Node, what: str, sign: float = 1.0) -> Scaled | None:
    """The factor of a product (``sign`` −1: a quotient) of values scaled by ``a`` and ``b``."""
    if b is None:
        return a
    if a is None:
        return _clean(Scaled(b.label, sign * b.exp))
    la, lb = torch.broadcast_tensors(a.label, b.label)
    if bool(((la >= 0) & (lb >= 0) & (la != lb)).any()):
        raise Broken(node, f"{what} multiplies different units' factors together")
    label = torch.where(la >= 0, la, lb)
    return _clean(Scaled(label, a.exp + sign * b.exp))


def _equal(a: Scaled | None, b: Scaled | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        la, lb = torch.broadcast_tensors(a.label, b.label)
        ea, eb = torch.broadcast_tensors(a.exp, b.exp)
    except RuntimeError:
        return False
    return bool((la == lb).all()) and bool((ea == eb).all())


def _reduce(s: Scaled, dims: list[int], keepdim: bool, node: fx.Node, what: str) -> Scaled:
    """The factor of a reduction over ``dims``: the factor must not vary along them."""
    dims = sorted(d % s.label.dim() for d in dims)
    label, exp = s.label, s.exp
    for d in dims:
        if label.shape[d] > 1 and not (bool((label.amin(d) == label.amax(d)).all())
                                       and bool((exp.amin(d) == exp.amax(d)).all())):
            raise Broken(node, f"{what} combines entries with different factors")
        label, exp = label.narrow(d, 0, 1), exp.narrow(d, 0, 1)
    if not keepdim:
        for d in reversed(dims):
            label, exp = label.squeeze(d), exp.squeeze(d)
    return Scaled(label, exp)


def along_axis(s: Scaled, axis: int, node: fx.Node, what: str) -> Scaled:
    """The factor along ``axis`` only: it must not vary along the other axes."""
    axis %= s.label.dim()
    return _reduce(s, [d for d in range(s.label.dim()) if d != axis], True, node, what)


# ----------------------------------------------------------------------------------------------------------
# rules: rule(flow, node, state_of) -> state (Scaled, None, or a tuple of them for multi-output ops)


Rule = Callable[["_Ctx", fx.Node], Any]


class _Ctx:
    def __init__(self, g: ExportedGraph, flow: Flow, params: dict[str, Scaled]):
        self.g, self.flow, self.params = g, flow, params

    def state(self, arg: Any) -> Any:
        return self.flow.states.get(arg) if isinstance(arg, fx.Node) else None

    def param(self, arg: Any) -> str | None:
        return self.g.param_of.get(arg) if isinstance(arg, fx.Node) else None

    def ndim(self, node: fx.Node) -> int:
        shape = shape_of(node)
        return len(shape) if shape is not None else 0

    def label(self, node: fx.Node) -> str:
        fqn, _ = self.g.module_of(node)
        return f"{op_name(node)} ({fqn})" if fqn else op_name(node)


def _same(ctx: _Ctx, node: fx.Node) -> Any:
    return ctx.state(node.args[0])


def _degree(k: float) -> Rule:
    def rule(ctx: _Ctx, node: fx.Node) -> Any:
        s = ctx.state(node.args[0])
        return None if s is None else Scaled(s.label, s.exp * k)
    return rule


def _pow(ctx: _Ctx, node: fx.Node) -> Any:
    s = ctx.state(node.args[0])
    if s is None:
        return None
    p = node.args[1]
    if not isinstance(p, (int, float)):
        raise Broken(node, "pow with a tensor exponent")
    return Scaled(s.label, s.exp * float(p))


def _pool(ctx: _Ctx, node: fx.Node) -> Any:
    s = ctx.state(node.args[0])
    if s is None:
        return None
    return _reduce(s, list(range(2, s.label.dim())), True, node, f"{ctx.label(node)} pools over positions that")


def _reduction(k: float) -> Rule:
    def rule(ctx: _Ctx, node: fx.Node) -> Any:
        s = ctx.state(node.args[0])
        if s is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or dims == []:
            dims = list(range(s.label.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        keepdim = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else \
            bool(node.kwargs.get("keepdim", False))
        r = _reduce(s, dims, keepdim, node, f"{ctx.label(node)}")
        return Scaled(r.label, r.exp * k)
    return rule


def _shape_op(ctx: _Ctx, node: fx.Node) -> Any:
    """Apply the op itself to the labels and the exponents (materialised to the input's shape)."""
    name = op_name(node)
    if name == "cat":
        items = node.args[0]
        states = [ctx.state(a) for a in items]
        if all(s is None for s in states):
            return None
        full = [_full(s if s is not None else _unscaled(len(shape_of(a))), shape_of(a)) for s, a in zip(states, items)]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return Scaled(torch.cat([f.label for f in full], dim), torch.cat([f.exp for f in full], dim))
    s = ctx.state(node.args[0])
    if s is None:
        return None
    rest = list(node.args[1:])
    if name in ("transpose", "permute", "t", "unsqueeze", "squeeze", "expand", "numpy_T"):
        src = s  # reorders or inserts axes: works on the compact tensors
    else:
        src = _full(s, shape_of(node.args[0]))
    fn = {"view": torch.reshape, "_unsafe_view": torch.reshape, "view_copy": torch.reshape}.get(name, node.target)
    if fn is torch.reshape:
        return Scaled(torch.reshape(src.label, rest[0]), torch.reshape(src.exp, rest[0]))
    out_l, out_e = fn(src.label, *rest, **node.kwargs), fn(src.exp, *rest, **node.kwargs)
    if isinstance(out_l, (list, tuple)):
        return tuple(Scaled(a, b) for a, b in zip(out_l, out_e))
    return Scaled(out_l, out_e)


def _getitem(ctx: _Ctx, node: fx.Node) -> Any:
    s = ctx.state(node.args[0])
    return None if s is None else s[node.args[1]]


def _mul(ctx: _Ctx, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    return _combine(ctx.state(a), ctx.state(b), node, ctx.label(node))


def _div(ctx: _Ctx, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    return _combine(ctx.state(a), ctx.state(b), node, ctx.label(node), sign=-1.0)


def _add(ctx: _Ctx, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.state(a), ctx.state(b)
    if not isinstance(b, fx.Node):  # a constant
        if sa is None or b == 0:
            return sa
        users = [op_name(u) for u in node.users]
        if users and all(u in ("rsqrt", "sqrt") for u in users) and bool((sa.exp == sa.exp.reshape(-1)[0]).all()):
            fqn, cls = ctx.g.module_of(node)  # var(a^k·x) = a^(2k)·var(x): the input's degree is k
            ctx.flow.eps.append(EpsSite(node, fqn, cls, float(sa.exp.reshape(-1)[0]) / 2, "rms"))
            return sa
        raise Broken(node, f"{ctx.label(node)} adds a constant to a scaled value")
    if sa is None and sb is None:
        return None
    if _equal(sa, sb):
        return sa
    if sa is None or sb is None:
        scaled, other = (sb, a) if sa is None else (sa, b)
        raise NeedWriters(node, other, scaled, _channel_axis(scaled))
    raise Broken(node, f"{ctx.label(node)} adds values with different factors")


def _channel_axis(s: Scaled) -> int:
    varying = [d for d in range(s.label.dim()) if s.label.shape[d] > 1]
    return varying[-1] if varying else -1


def _terms(node: fx.Node, vx: Scaled | None, w_io: Scaled | None, param: str | None, what: str) -> Scaled | None:
    """Factor per output o of Σ_i x_i·W_io, from x's factor over i (``vx``, shape (i,)) and W's factor laid out
    as (i, o) (``w_io``, compact); every term of one sum must carry the same factor. A scaled x against an
    untouched weight parameter asks for the reader compensation (:class:`NeedReader`). Result: (o,) or (1,)."""
    lx = None if vx is None else Scaled(vx.label.reshape(-1, 1), vx.exp.reshape(-1, 1))
    try:
        terms = _combine(lx, w_io, node, what)
        uniform = terms is None or terms.label.shape[0] == 1 or (
            bool((terms.label.amin(0) == terms.label.amax(0)).all())
            and bool((terms.exp.amin(0) == terms.exp.amax(0)).all()))
    except Broken:
        uniform = False
    if not uniform:
        if w_io is None and param is not None and vx is not None:
            raise NeedReader(node, param, -1, vx.label.reshape(-1), vx.exp.reshape(-1))
        raise Broken(node, f"{what} sums terms with different factors")
    if terms is None:
        return None
    return _clean(Scaled(terms.label[0].reshape(-1), terms.exp[0].reshape(-1)))


def _placed(s: Scaled | None, nd: int, axis: int) -> Scaled | None:
    """A factor over one axis (shape (n,) or (1,)) placed on ``axis`` of an nd value."""
    if s is None:
        return None
    shape = [1] * nd
    shape[axis] = s.label.numel()
    return Scaled(s.label.reshape(shape), s.exp.reshape(shape))


def _with_bias(node: fx.Node, out: Scaled | None, sb: Scaled | None, nd: int, axis: int, what: str,
               has_bias: bool = True) -> Scaled | None:
    if not has_bias:
        return out
    b = _placed(None if sb is None else Scaled(sb.label.reshape(-1), sb.exp.reshape(-1)), nd, axis)
    if not _equal(out, b):
        raise Broken(node, f"{what}: its bias is not scaled like the rest of its output")
    return out


def _contract(ctx: _Ctx, node: fx.Node, x: Any, w: Any, w_in_axis: int, bias: Any, what: str) -> Any:
    """Output factor of y[..., o] = Σ_i x[..., i]·W[o, i] (+ b[o]); W's input axis is ``w_in_axis`` (0 or 1)."""
    sx, sw, sb = ctx.state(x), ctx.state(w), ctx.state(bias)
    if sx is None and sw is None and sb is None:
        return None
    nd = ctx.ndim(node)
    vx = None if sx is None else along_axis(sx, -1, node, f"{what}: its input's factor varies over positions and")
    vx = None if vx is None else Scaled(vx.label.reshape(-1), vx.exp.reshape(-1))
    w_io = None if sw is None else (sw if w_in_axis == 0 else Scaled(sw.label.t(), sw.exp.t()))
    try:
        r = _terms(node, vx, w_io, ctx.param(w), what)
    except NeedReader as need:
        raise NeedReader(node, need.param, w_in_axis, need.labels, need.exp) from None
    return _with_bias(node, _placed(r, nd, nd - 1), sb, nd, nd - 1, what, isinstance(bias, fx.Node))


def _linear(ctx: _Ctx, node: fx.Node) -> Any:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _contract(ctx, node, node.args[0], node.args[1], 1, bias, ctx.label(node))


def _addmm(ctx: _Ctx, node: fx.Node) -> Any:  # bias + x @ W, W of shape (in, out) (GPT-2's Conv1D)
    return _contract(ctx, node, node.args[1], node.args[2], 0, node.args[0], ctx.label(node))


def _matmul(ctx: _Ctx, node: fx.Node) -> Any:
    x, y = node.args[0], node.args[1]
    if ctx.param(y) is not None and len(shape_of(y) or ()) == 2:
        return _contract(ctx, node, x, y, 0, None, ctx.label(node))
    if ctx.state(x) is None and ctx.state(y) is None:
        return None
    raise Broken(node, f"{ctx.label(node)} multiplies two activations (attention scores): the matrix families "
                       f"cover attention")


def _conv(ctx: _Ctx, node: fx.Node) -> Any:
    """A convolution as a linear map over channels: the factors must not vary over positions or kernel taps."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[8] if op_name(node) == "convolution" else (node.args[6] if len(node.args) > 6 else 1)
    sx, sw, sb = ctx.state(x), ctx.state(w), ctx.state(bias)
    if sx is None and sw is None and sb is None:
        return None
    what = ctx.label(node)
    if groups != 1:
        raise Broken(node, f"{what} is a grouped convolution")
    nd = ctx.ndim(node)
    vx = None
    if sx is not None:
        r = along_axis(sx, 1, node, f"{what}: its input's factor varies over positions and")
        vx = Scaled(r.label.reshape(-1), r.exp.reshape(-1))
    w_io = None
    if sw is not None:
        r = _reduce(sw, list(range(2, sw.label.dim())), True, node, f"{what}: its kernel's factor varies over taps and")
        w_io = Scaled(r.label.reshape(r.label.shape[:2]).t(), r.exp.reshape(r.exp.shape[:2]).t())
    try:
        out = _terms(node, vx, w_io, ctx.param(w), what)
    except NeedReader as need:
        raise NeedReader(node, need.param, 1, need.labels, need.exp) from None
    return _with_bias(node, _placed(out, nd, 1), sb, nd, 1, what, isinstance(bias, fx.Node))


def _embedding(ctx: _Ctx, node: fx.Node) -> Any:
    sw = ctx.state(node.args[0])
    if sw is None:
        return None
    v = along_axis(sw, 1, node, f"{ctx.label(node)}: its rows carry different factors, so its output")
    nd = ctx.ndim(node)
    return Scaled(v.label.reshape([1] * (nd - 1) + [-1]), v.exp.reshape([1] * (nd - 1) + [-1]))


def _affine(ctx: _Ctx, node: fx.Node, n: Scaled | None, w: Any, b: Any, axes: list[int], what: str) -> Any:
    """n·w + b with w, b laid along ``axes`` of the output (their own shape)."""
    nd = ctx.ndim(node)
    shape_w = [1] * nd

    def placed(s: Scaled | None) -> Scaled | None:
        if s is None:
            return None
        shape = list(shape_w)
        for ax, size in zip(axes, s.label.shape):
            shape[ax] = size
        return Scaled(s.label.reshape(shape), s.exp.reshape(shape))

    out = _combine(n, placed(ctx.state(w)), node, what)
    if b is not None and not _equal(out, placed(ctx.state(b))):
        raise Broken(node, f"{what}: its shift β is not scaled like γ·x̂")
    return out


def _batch_norm(ctx: _Ctx, node: fx.Node) -> Any:
    x, w, b = node.args[0], node.args[1], node.args[2]
    training = node.args[5]
    sx = ctx.state(x)
    if sx is not None:
        if not training:
            raise Broken(node, f"{ctx.label(node)} uses running statistics (eval mode): a fixed affine map")
        v = along_axis(sx, 1, node, f"{ctx.label(node)} normalises per channel, but the factor")
        fqn, cls = ctx.g.module_of(node)
        exps = v.exp.unique()
        if exps.numel() != 1:
            raise Broken(node, f"{ctx.label(node)}: channels scaled with different exponents")
        ctx.flow.eps.append(EpsSite(node, fqn, cls, float(exps[0]), "batch"))
    out = _affine(ctx, node, None, w, b, [1], ctx.label(node))
    if op_name(node) != "batch_norm":
        return (out, None, None, None, None)
    return out


def _layer_norm(ctx: _Ctx, node: fx.Node) -> Any:
    x, shape = node.args[0], node.args[1]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 and op_name(node) != "rms_norm" else None
    sx, k = ctx.state(x), len(shape)
    nd = ctx.ndim(node)
    if sx is not None:
        r = _reduce(sx, list(range(nd - k, nd)), True, node, f"{ctx.label(node)} normalises whole positions, but "
                                                              f"the factor varies across the features it")
        fqn, cls = ctx.g.module_of(node)
        exps = r.exp.unique()
        if exps.numel() != 1:
            raise Broken(node, f"{ctx.label(node)}: positions scaled with different exponents")
        ctx.flow.eps.append(EpsSite(node, fqn, cls, float(exps[0]), "layer" if op_name(node) != "rms_norm" else "rms"))
    out = _affine(ctx, node, None, w, b, list(range(nd - k, nd)), ctx.label(node))
    return (out, None, None) if op_name(node) == "native_layer_norm" else out


def _attention(ctx: _Ctx, node: fx.Node) -> Any:
    q, k, v = node.args[:3]
    if ctx.state(q) is not None or ctx.state(k) is not None:
        raise Broken(node, "attention scores of scaled queries or keys (the attention_qk family covers these)")
    if ctx.state(v) is not None:  # per-channel value factors pass, but they are the diagonal of attention_vo
        raise Broken(node, "attention of scaled values: the attention_vo family covers these (its diagonal)")
    return None


def _breaks(why: str) -> Rule:
    def rule(ctx: _Ctx, node: fx.Node) -> Any:
        if any(ctx.state(a) is not None for a in _tensor_args(node)):
            raise Broken(node, f"{ctx.label(node)}: {why}")
        return None
    return rule


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
    visit(node.args)
    visit(list(node.kwargs.values()))
    return out


NOT_HOMOGENEOUS = "not positively homogeneous (f(a·z) ≠ a^k·f(z)), so no rescale passes it"
_PASS = ("relu", "relu_", "leaky_relu", "leaky_relu_", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
         "neg", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "lift_fresh_copy",
         "_assert_tensor_metadata", "abs", "hardshrink_never")
_SHAPE = ("view", "_unsafe_view", "view_copy", "reshape", "flatten", "unflatten", "transpose", "permute", "t",
          "unsqueeze", "squeeze", "expand", "slice", "select", "narrow", "cat", "split", "split_with_sizes",
          "chunk", "unbind", "repeat_interleave", "numpy_T")
RULES: dict[str, Rule] = {
    **{name: _same for name in _PASS},
    **{name: _shape_op for name in _SHAPE},
    "native_dropout": lambda ctx, node: (ctx.state(node.args[0]), None),
    "pow": _pow, "square": _degree(2.0), "sqrt": _degree(0.5), "rsqrt": _degree(-0.5), "reciprocal": _degree(-1.0),
    "mul": _mul, "mul_": _mul, "div": _div, "div_": _div, "add": _add, "add_": _add,
    "sub": lambda ctx, node: _add(ctx, node),
    "mean": _reduction(1.0), "sum": _reduction(1.0), "amax": _reduction(1.0), "amin": _reduction(1.0),
    "var": _reduction(2.0), "std": _reduction(1.0),
    "max_pool1d": _pool, "max_pool2d": _pool, "max_pool3d": _pool, "avg_pool1d": _pool, "avg_pool2d": _pool,
    "avg_pool3d": _pool, "adaptive_avg_pool1d": _pool, "adaptive_avg_pool2d": _pool, "adaptive_avg_pool3d": _pool,
    "adaptive_max_pool2d": lambda ctx, node: (_pool(ctx, node), None),
    "max_pool2d_with_indices": lambda ctx, node: (_pool(ctx, node), None),
    "linear": _linear, "addmm": _addmm, "mm": _matmul, "matmul": _matmul, "bmm": _matmul,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _conv,
    "embedding": _embedding,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_functional": _batch_norm, "native_batch_norm": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm,
    "layer_norm": _layer_norm, "native_layer_norm": _layer_norm, "rms_norm": _layer_norm,
    "scaled_dot_product_attention": _attention,
    "getitem": _getitem,
    **{name: _breaks(NOT_HOMOGENEOUS) for name in ("silu", "silu_", "gelu", "gelu_", "tanh", "sigmoid", "exp",
                                                   "log", "softmax", "_softmax", "log_softmax", "_log_softmax",
                                                   "sin", "cos", "erf", "softplus", "elu", "selu", "mish",
                                                   "hardswish", "hardsigmoid", "hardtanh", "celu")},
}


def propagate(g: ExportedGraph, params: dict[str, Scaled], live: set[fx.Node]) -> Flow:
    """Push the candidate ``params`` (parameter name → factor) through ``g``; the user outputs must end
    unscaled. Raises :class:`Broken`, :class:`NeedWriters` or :class:`NeedReader`."""
    flow = Flow()
    ctx = _Ctx(g, flow, params)

    def rule(node: fx.Node) -> Any:
        found = RULES.get(op_name(node))
        if found is None:
            if any(ctx.state(a) is not None for a in _tensor_args(node)):
                raise Broken(node, f"{ctx.label(node)}: no rule for this op, so no symmetry is assumed through it")
            return None
        return found(ctx, node)

    forward_states(g, params, live, flow.states, rule)
    for out in g.outputs:
        if ctx.state(out) is not None:
            raise Broken(out, "the scale reaches the logits: the loss is not invariant to it")
    return flow


def live_nodes(g: ExportedGraph) -> set[fx.Node]:
    """The nodes the user outputs depend on (buffer updates and shape queries left out)."""
    seen: set[fx.Node] = set()
    stack = list(g.outputs)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(_tensor_args(n))
    return seen
