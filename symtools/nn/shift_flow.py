"""What adding a constant to some parameters does to every value of an ATen graph (translation groups).

A value's state is the set of axes along which its change Δ is constant (``None``: unchanged). A whole bias
shifted by c changes its layer's output by c everywhere (constant along all axes); one input column j of a
Linear weight shifted by c adds c·x_j to every output feature (constant along the feature axis only); one
embedding row adds c to every feature of the positions holding that token. A normalisation removes a change
constant along the axes it normalises over (BatchNorm with batch statistics: all but the channel axis;
LayerNorm: its feature axes; softmax and the cross-entropy loss: the class axis 1; attention: a shift of the keys
that is the same at every position, since it adds the same q·s to every score of a query). Anything else a
changed value meets (a nonlinearity, dropout, a product, an RMSNorm, a rotary embedding) breaks the translation
(:class:`~symtools.nn.scale_flow.Broken`).

The propagation is per *kind* of candidate (all columns of one Linear at once): every group of the kind moves
through the same ops in the same way.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from symtools.nn.aten_graph import ExportedGraph, forward_states, op_name, shape_of
from symtools.nn.scale_flow import Broken, _tensor_args, live_nodes

__all__ = ["live_nodes", "propagate_shift"]

CLASS_AXIS = 1  # cross-entropy's class axis: (N, C) image logits, (N, V, T) language-model logits


def _all(nd: int) -> frozenset[int]:
    return frozenset(range(nd))


class _Ctx:
    def __init__(self, g: ExportedGraph, params: dict[str, frozenset[int]]):
        self.g, self.params = g, params
        self.states: dict[fx.Node, Any] = {}

    def state(self, a: Any, nd: int | None = None) -> frozenset[int] | None:
        return self.states.get(a) if isinstance(a, fx.Node) else None

    def nd(self, node: Any) -> int:
        shape = shape_of(node)
        return len(shape) if shape is not None else 0

    def label(self, node: fx.Node) -> str:
        fqn, _ = self.g.module_of(node)
        return f"{op_name(node)} ({fqn})" if fqn else op_name(node)


def _meet(*states: frozenset[int] | None) -> frozenset[int] | None:
    present = [s for s in states if s is not None]
    if not present:
        return None
    out = present[0]
    for s in present[1:]:
        out = out & s
    return out


def _view_map(old: tuple[int, ...], new: tuple[int, ...], const: frozenset[int]) -> frozenset[int]:
    """Const axes after a reshape: a new axis is constant if every old axis merged or split into it is."""
    out: set[int] = set()
    i = j = 0
    while j < len(new):
        if new[j] == 1 and (i >= len(old) or old[i] != 1):
            out.add(j)
            j += 1
            continue
        group_old, group_new = [i], [j]
        po, pn = old[i] if i < len(old) else 1, new[j]
        while po != pn:
            if po < pn:
                i += 1
                group_old.append(i)
                po *= old[i]
            else:
                j += 1
                group_new.append(j)
                pn *= new[j]
        if all(d in const for d in group_old):
            out.update(group_new)
        i, j = i + 1, j + 1
    return frozenset(out)


def _rule(ctx: _Ctx, node: fx.Node) -> Any:
    name = op_name(node)
    args = node.args
    nd = ctx.nd(node)
    states = [ctx.state(a) for a in _tensor_args(node)]
    if all(s is None for s in states):
        return None
    what = ctx.label(node)
    if name in ("clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "neg", "lift_fresh_copy",
                "_assert_tensor_metadata") or (name == "dropout" and (args[1] == 0 or not args[2])):
        return ctx.state(args[0])  # (dropout with p = 0, or not training, is the identity)
    if name in ("add", "add_", "sub", "sub_"):
        return _meet(ctx.state(args[0]), ctx.state(args[1]) if isinstance(args[1], fx.Node) else None)
    if name in ("mul", "div") and not isinstance(args[1], fx.Node):
        return ctx.state(args[0])
    if name in ("transpose",):
        s = ctx.state(args[0])
        d0, d1 = args[1] % nd, args[2] % nd
        swap = {d0: d1, d1: d0}
        return frozenset(swap.get(d, d) for d in s)
    if name == "permute":
        s, perm = ctx.state(args[0]), [p % nd for p in args[1]]
        return frozenset(i for i, p in enumerate(perm) if p in s)
    if name in ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand"):
        s, old = ctx.state(args[0]), shape_of(args[0])
        new = shape_of(node)
        if name == "expand":
            return frozenset(d for d in range(nd) if d in s or old[d] == 1)
        return _view_map(old, new, s)
    if name in ("slice",):
        return ctx.state(args[0])
    if name in ("mean", "sum"):
        s = ctx.state(args[0])
        dims = args[1] if len(args) > 1 else list(range(ctx.nd(args[0])))
        dims = [d % ctx.nd(args[0]) for d in ([dims] if isinstance(dims, int) else dims)]
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        if keep:
            return frozenset(set(s) | set(dims))
        remaining = [d for d in range(ctx.nd(args[0])) if d not in dims]
        return frozenset(i for i, d in enumerate(remaining) if d in s)
    if name in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        s = ctx.state(args[0])
        if not set(range(2, nd)) <= s:
            raise Broken(node, f"{what} pools a change that varies over positions")
        return s
    if name in ("linear", "addmm"):
        x, w, b = (args[0], args[1], args[2] if len(args) > 2 else None) if name == "linear" else \
            (args[1], args[2], args[0])
        in_axis = 1 if name == "linear" else 0
        parts = []
        sx, sw, sb = ctx.state(x), ctx.state(w), ctx.state(b)
        if sx is not None:  # W·Δx varies along the output features
            parts.append(frozenset(sx - {ctx.nd(x) - 1}))
        if sw is not None:  # W + 1·tᵀ (constant along the output axis): Δ = (t·x)·1
            parts.append(frozenset({nd - 1}) if (1 - in_axis) in sw else frozenset())
        if sb is not None:
            parts.append(_all(nd) if 0 in sb else _all(nd) - {nd - 1})
        out = _meet(*parts)
        if not out:
            raise Broken(node, f"{what} turns the shift into a change that varies along every axis")
        return out
    if name in ("conv1d", "conv2d", "conv3d", "convolution"):
        if ctx.state(args[0]) is not None or ctx.state(args[1]) is not None:
            raise Broken(node, f"{what} mixes a shifted input or kernel")
        sb = ctx.state(args[2])
        return _all(nd) if 0 in sb else _all(nd) - {1}
    if name == "embedding":
        sw = ctx.state(args[0])
        if sw == _all(2):
            return _all(nd)
        if 1 in sw:
            return frozenset({nd - 1})
        if 0 in sw:
            return _all(nd) - {nd - 1}
        raise Broken(node, f"{what}: shifted entries vary along both axes")
    if name in ("batch_norm", "layer_norm", "native_layer_norm", "_native_batch_norm_legit_functional",
                "native_batch_norm"):
        x = args[0]
        sx = ctx.state(x)
        batch = "batch_norm" in name
        axes = _all(nd) - {1} if batch else frozenset(range(nd - len(args[1]), nd))
        if sx is not None and not (batch and args[5]) and batch:
            raise Broken(node, f"{what} uses running statistics (eval mode)")
        if sx is not None and not axes <= sx:
            raise Broken(node, f"{what} does not remove this change (not constant over the axes it normalises)")
        w = args[1] if batch else (args[2] if len(args) > 2 else None)
        b = args[2] if batch else (args[3] if len(args) > 3 else None)
        if ctx.state(w) is not None:
            raise Broken(node, f"{what}: its weight γ is shifted")
        sb = ctx.state(b)
        out = None if sb is None else (_all(nd) if 0 in sb else (_all(nd) - {1} if batch else
                                                                   _all(nd) - {nd - 1}))
        return out if name in ("batch_norm", "layer_norm") else (out, None, None)
    if name == "scaled_dot_product_attention":
        sq, sk, sv = (ctx.state(a) for a in args[:3])
        nd_k = ctx.nd(args[1])
        if sq is None and sv is None and sk is not None and (nd_k - 2) in sk:
            return None  # q·(k + s) = q·k + q·s, the same for every key: the softmax over keys removes it
        raise Broken(node, f"{what}: only a shift of the keys that is the same at every position is removed")
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        s = ctx.state(args[0])
        if args[1] % nd in s:
            return None
    if name == "getitem":
        s = ctx.state(args[0])
        return s[args[1]] if isinstance(s, tuple) else s
    raise Broken(node, f"{what} does not pass a shift (only additions, copies, reshapes, means and "
                       f"normalisations do)")


def propagate_shift(g: ExportedGraph, params: dict[str, frozenset[int]], live: set[fx.Node],
                    class_axis: int = CLASS_AXIS) -> None:
    """Push the candidate (parameter name → axes of the parameter along which its shift is constant) through
    ``g``; returns if every user output's change is constant along ``class_axis`` (the cross-entropy removes
    it), else raises :class:`Broken`."""
    ctx = _Ctx(g, params)
    forward_states(g, params, live, ctx.states, lambda node: _rule(ctx, node))
    for out in g.outputs:
        s = ctx.states.get(out)
        if s is not None and class_axis % max(ctx.nd(out), 1) not in s:
            raise Broken(out, "the logits change by an amount that varies across classes")


