"""Attention heads' matrix symmetries (attention_qk, attention_vo) found in an ATen graph.

At every ``scaled_dot_product_attention`` the walk follows the queries, keys and values back to the projection
that wrote them (a Linear, or GPT-2's Conv1D ``addmm``) and the output forward to the projection that reads it.
Where only reshapes lie in between (views, transposes, the split of a fused QKV projection, the repeat of
key/value heads for grouped-query attention), pushing the projection's output-unit indices through those ops
shows which units form head h and which query heads share a key/value head. Then, for every key/value head j:

- ``attention_vo``: W_V of head j (its rows of the value projection and bias) ↦ W_V G, and the output
  projection's columns of every query head that reads head j ↦ G⁻¹·(those columns): the attention-weighted
  sum is linear in the values, so x W_V G G⁻¹ W_O = x W_V W_O;
- ``attention_qk``: the query heads of group j ↦ W_Q G and key head j ↦ W_K G⁻ᵀ: scores q·kᵀ are unchanged.
  A rotary embedding between the projections and the scores (position-dependent linear maps A_t on a query at
  position t, B_t on a key) restricts G to the matrices with G·A_t·B_sᵀ·G⁻¹ = A_t·B_sᵀ for all positions t, s.
  :mod:`symtools.nn.rotary_commutant` reads the maps A_t, B_t off the graph (evaluating the ops between the
  projection and the scores on unit vectors, verified on a dense vector) and derives that Lie subalgebra —
  for rotate-half RoPE with distinct frequencies, the 2×2 blocks a·I + b·J of each rotated pair (dimension d_h
  instead of d_h²). Nothing about the rotary code is assumed.

Attention is found as ``scaled_dot_product_attention`` or written out (``softmax(q·kᵀ·s + mask)·v`` with matmuls).

Biases transform with their weights (an extra row of the augmented matrix). A projection output read by anything
else than the attention, or a parameter also used elsewhere (tied), blocks the group.
"""

from __future__ import annotations

import torch
from torch import fx

from symtools.nn.aten_graph import ExportedGraph, op_name, shape_of
from symtools.nn.groups import Blocked, MatrixGroupSet, MatrixPiece, SymmetryMap
from symtools.nn.rotary_commutant import NotLinearPath, commutant, position_maps

RESHAPES = ("view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "expand", "contiguous",
            "clone", "split", "split_with_sizes", "getitem", "_to_copy", "to", "alias", "t", "flatten")


class _NotReshape(Exception):
    pass


def _back_to_projection(g: ExportedGraph, node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    """The chain of reshapes from a projection (linear/addmm with a parameter weight) to ``node``."""
    chain = []
    n = node
    while True:
        name = op_name(n)
        if name in ("linear", "addmm"):
            return list(reversed(chain)), n
        if name not in RESHAPES or not n.args or not isinstance(n.args[0], fx.Node):
            raise _NotReshape(name or n.op)
        chain.append(n)
        n = n.args[0]


def _push(labels: torch.Tensor, chain: list[fx.Node]) -> torch.Tensor:
    """Apply the reshape ops of ``chain`` to a tensor of unit indices shaped like the projection output."""
    t: object = labels
    for n in chain:
        name = op_name(n)
        rest = list(n.args[1:])
        if name == "getitem":
            t = t[rest[0]]
        elif name in ("view", "_unsafe_view", "reshape"):
            t = torch.reshape(t, rest[0])
        elif name in ("_to_copy", "to", "alias", "contiguous", "clone"):
            pass
        else:
            t = n.target(t, *rest, **{k: v for k, v in n.kwargs.items() if k not in ("dtype", "device")})
    return t  # type: ignore[return-value]


def _layout(g: ExportedGraph, proj: fx.Node, chain: list[fx.Node], end_shape: tuple[int, ...]) -> torch.Tensor:
    """Which projection unit sits at (head, dim) of the attention input: a (heads, dh) index tensor."""
    out_shape = shape_of(proj)
    units = out_shape[-1]
    idx = torch.arange(units).expand(out_shape).contiguous()
    pushed = _push(idx, chain)
    if tuple(pushed.shape) != tuple(end_shape):
        raise _NotReshape("shape")
    per_head = pushed[(0,) * (pushed.dim() - 3)] if pushed.dim() > 3 else pushed  # (H, T, dh)
    if not bool((per_head == per_head[:, :1, :]).all()):
        raise _NotReshape("mixes positions")
    return per_head[:, 0, :]


def _pieces(g: ExportedGraph, proj: fx.Node, units: torch.Tensor, as_rows: bool) -> tuple[MatrixPiece, ...]:
    """A head's units (consecutive) of projection ``proj`` as the d_in × dh matrix [W; b] (``as_rows``: the
    projection's input side) — or, for the output projection, as its dh × d_out input rows."""
    lo, hi = int(units[0]), int(units[-1]) + 1
    if not torch.equal(units, torch.arange(lo, hi)):
        raise _NotReshape("a head's units are not consecutive")
    name = op_name(proj)
    w = g.param_of.get(proj.args[1] if name == "linear" else proj.args[2])
    b_arg = (proj.args[2] if len(proj.args) > 2 else None) if name == "linear" else proj.args[0]
    b = g.param_of.get(b_arg) if isinstance(b_arg, fx.Node) else None
    if w is None:
        raise _NotReshape("weight is not a parameter")
    if as_rows:  # W_Q/W_K/W_V: x·W_head with x the projection input; linear weight (out, in): rows, transposed
        piece = MatrixPiece(w, rows=(lo, hi), transpose=True) if name == "linear" else MatrixPiece(w, cols=(lo, hi))
        return (piece,) + ((MatrixPiece(b, cols=(lo, hi)),) if b else ())
    # W_O: the rows of x·W_O read from the head's units; linear weight (out, in): columns, transposed
    return (MatrixPiece(w, cols=(lo, hi), transpose=True) if name == "linear" else MatrixPiece(w, rows=(lo, hi)),)


def _forward_to_projection(node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    chain, n = [], node
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise _NotReshape("the attention output feeds several ops")
        u = users[0]
        if op_name(u) in ("linear", "addmm"):
            return chain, u
        if op_name(u) not in RESHAPES:
            raise _NotReshape(op_name(u) or u.op)
        chain.append(u)
        n = u


def _cores(g: ExportedGraph) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(where, q, k, v, out) of every attention: an SDPA op, or softmax(q·kᵀ·s + mask)·v written with matmuls
    (k: the keys before their transposition)."""
    cores = []
    for node in g.graph.nodes:
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            cores.append((node, *node.args[:3], node))
        elif name == "matmul" and isinstance(node.args[0], fx.Node):
            p = _skip(node.args[0], ("dropout", "to", "_to_copy", "type_as"))
            if op_name(p) not in ("softmax", "_softmax"):
                continue
            s = _skip(p.args[0], ("mul", "div", "add", "to", "_to_copy"))  # scaling, the mask (2nd operand), casts
            if op_name(s) != "matmul" or op_name(s.args[1]) != "transpose":
                continue
            kt = s.args[1]
            nd = len(shape_of(kt) or ())
            if sorted(d % nd for d in kt.args[1:3]) != [nd - 2, nd - 1]:
                continue
            cores.append((node, s.args[0], kt.args[0], node.args[1], node))
    return cores


def _skip(node: fx.Node, ops: tuple[str, ...]) -> fx.Node:
    """Walk back from ``node`` through ``ops`` along their first input (scaling, masking, casts)."""
    while op_name(node) in ops and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _projection_behind(g: ExportedGraph, node: fx.Node) -> fx.Node:
    """The one projection (linear/addmm with a parameter weight) whose output reaches ``node``."""
    found, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        name = op_name(n)
        w = (n.args[1] if name == "linear" else n.args[2]) if name in ("linear", "addmm") else None
        if w is not None and g.param_of.get(w) is not None:
            found.append(n)
            continue
        stack.extend(n.all_input_nodes)
    if len(found) != 1:
        raise _NotReshape(f"{len(found)} projections reach it")
    return found[0]


def attention_groups(g: ExportedGraph, found: SymmetryMap) -> None:
    """Append the attention_qk / attention_vo groups of every attention in ``g`` to ``found``."""
    shared = {name for node, name in g.param_of.items() if len(node.users) > 1}
    algebras: dict = {}  # rotary maps and commutants already derived (every layer repeats them)
    for node, q, k, v, out in _cores(g):
        where = g.module_of(node)[0] or node.name
        heads, dh = shape_of(q)[-3], shape_of(q)[-1]
        try:
            v_chain, v_proj = _back_to_projection(g, v)
            v_lay = _layout(g, v_proj, v_chain, shape_of(v))
            o_chain, o_proj = _forward_to_projection(out)
            o_in = shape_of(o_proj.args[0] if op_name(o_proj) == "linear" else o_proj.args[1])
            o_idx = torch.arange(heads * dh).reshape(1, heads, 1, dh).expand(*shape_of(out)[:-3], heads,
                                                                              shape_of(out)[-2], dh)
            o_lay = _push(o_idx.contiguous(), o_chain)
            if tuple(o_lay.shape) != tuple(o_in):
                raise _NotReshape("output layout")
            o_units = torch.empty(heads * dh, dtype=torch.long)
            flat = o_lay.reshape(-1, o_lay.shape[-1])[0]  # o projection unit u reads (head, dim) flat[u]
            o_units[flat] = torch.arange(heads * dh)
        except _NotReshape as exc:
            found.blocked.append(Blocked(where, f"no attention_vo group: the values or the output pass "
                                                f"{exc} on their way (only reshapes are followed)"))
        else:
            vo = []
            for kv_units, q_heads in _kv_groups(v_lay):
                w_v = _pieces(g, v_proj, kv_units, True)
                w_o = tuple(p for h in q_heads for p in _pieces(g, o_proj, o_units.reshape(heads, dh)[h], False))
                vo.append({"W_V": w_v, "W_O": w_o})
            params = {p.param for grp in vo for ps in grp.values() for p in ps}
            if params & shared:
                found.blocked.append(Blocked(where, f"no attention_vo group: {min(params & shared)} is used "
                                                    f"elsewhere"))
            else:
                found.matrix_sets.append(MatrixGroupSet("attention_vo", f"{where} (values → output)", tuple(vo),
                                                        {"W_V": "rows", "W_O": "cols"}, None,
                                                        f"{len(vo)} key/value heads × GL({dh})"))
        try:
            qk, algebra, note = _qk_groups(g, q, k, dh, algebras)
        except (_NotReshape, NotLinearPath) as exc:
            found.blocked.append(Blocked(where, f"no attention_qk group: {exc}"))
            continue
        params = {p.param for grp in qk for ps in grp.values() for p in ps}
        if params & shared:
            found.blocked.append(Blocked(where, f"no attention_qk group: {min(params & shared)} is used "
                                                f"elsewhere"))
            continue
        found.matrix_sets.append(MatrixGroupSet("attention_qk", f"{where} (queries · keys)", tuple(qk),
                                                {"W_Q": "rows", "W_K": "rows"}, algebra, note))


def _qk_groups(g: ExportedGraph, q: fx.Node, k: fx.Node, dh: int, cache: dict):
    """The QK groups (one per key head) and their Lie algebra (None: all of gl)."""
    try:
        q_chain, q_proj = _back_to_projection(g, q)
        k_chain, k_proj = _back_to_projection(g, k)
        q_lay = _layout(g, q_proj, q_chain, shape_of(q))
        k_lay = _layout(g, k_proj, k_chain, shape_of(k))
        groups = [(units, heads, [q_lay[h] for h in heads]) for units, heads in _kv_groups(k_lay)]
        algebra, note = None, f"GL({dh}) per key head"
    except _NotReshape:  # something else lies between (a rotary embedding): read its maps off the graph
        q_proj, k_proj = _projection_behind(g, q), _projection_behind(g, k)
        a_maps, q_src = position_maps(g, q_proj, q, dh, cache.setdefault("maps", {}))
        b_maps, k_src = position_maps(g, k_proj, k, dh, cache.setdefault("maps", {}))
        if a_maps.shape[0] != b_maps.shape[0]:
            raise _NotReshape("queries and keys have different numbers of heads at the attention")
        groups = []
        for j in sorted(set(k_src.tolist())):
            att = [h for h in range(len(k_src)) if int(k_src[h]) == j]
            groups.append((torch.arange(j * dh, (j + 1) * dh), att,
                           [torch.arange(int(q_src[h]) * dh, (int(q_src[h]) + 1) * dh) for h in att]))
        algebra = _rotary_algebra(a_maps, b_maps, cache)
        if algebra.shape[0] == 0:
            raise _NotReshape("no transformation of the heads commutes with the maps between the projections and "
                              "the scores")
        note = (f"the {algebra.shape[0]}-dimensional subalgebra of gl({dh}) commuting with the position-dependent "
                f"maps (rotary embedding) read off the graph")
    qk = []
    for kv_units, _, q_units in groups:
        w_q = tuple(p for units in q_units for p in _pieces(g, q_proj, units, True))
        qk.append({"W_Q": w_q, "W_K": _pieces(g, k_proj, kv_units, True)})
    return qk, algebra, note


def _rotary_algebra(a_maps: torch.Tensor, b_maps: torch.Tensor, cache: dict) -> torch.Tensor:
    """The commutant of {A_t·B_sᵀ} over all heads and positions (heads with identical maps counted once)."""
    heads = [h for h in range(a_maps.shape[0]) if not any(
        torch.equal(a_maps[h], a_maps[e]) and torch.equal(b_maps[h], b_maps[e]) for e in range(h))]
    mats = torch.einsum("htij,hskj->htsik", a_maps[heads], b_maps[heads]).reshape(-1, *a_maps.shape[-2:])
    key = mats.numpy().tobytes()
    if key not in cache:
        cache[key] = commutant(mats)
    return cache[key]


def _kv_groups(layout: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
    """(units of one key/value head, the query heads reading it), from the (heads, dh) layout at the attention
    (grouped-query attention repeats a key/value head's units over several query heads)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for h in range(layout.shape[0]):
        groups.setdefault(tuple(layout[h].tolist()), []).append(h)
    return [(torch.tensor(units), heads) for units, heads in groups.items()]
