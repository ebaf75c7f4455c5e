"""The subgroup of GL(d_h) that survives a position-dependent map between the projections and the scores.

Between a query projection's output and the attention scores a model may apply per-position linear maps (a
rotary embedding: q_t ↦ q_t·A_t, k_s ↦ k_s·B_s). The scores are then q_t·A_t·B_sᵀ·k_sᵀ, and W_Q ↦ W_Q·G,
W_K ↦ W_K·G⁻ᵀ keeps them iff G commutes with every M = A_t·B_sᵀ; the Lie algebra of that group is the commutant
{X : X·M = M·X for all M}.

:func:`position_maps` reads the maps off the graph: it evaluates the ops between the projection and the scores
(the *path*) with the side inputs they use (cos/sin tables computed from buffers and positions — never from
parameters or the input values) on the d_h unit vectors of a head, all heads and positions at once, and verifies
the result on one dense deterministic vector (the path must be linear and act on each head and position by
itself). Which projection head lands on which attention head (grouped-query repeats) is found by pushing head
indices through the same ops.

:func:`commutant` solves X·M − M·X = 0 exactly block by block: the coordinates the maps couple form blocks (a
rotated pair), every M is block diagonal in them, and the entries of X between blocks B₁, B₂ satisfy
Y·M[B₂,B₂] − M[B₁,B₁]·Y = 0 — a small linear system per block pair, solved by SVD; directions whose residual
is below 1e-9 of the maps' scale are in the algebra (exact commuting directions have residual ~1e-16 even with
float32 cos/sin tables, since rounding keeps each 2×2 rotation's structure; the nearest non-commuting ones,
between rotary frequencies a few percent apart over the traced positions, ~1e-5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from symtools.nn.aten_graph import ExportedGraph, op_name, shape_of

TOLERANCE = 1e-9
ELEMENTWISE = ("mul", "add", "sub", "neg", "div", "_to_copy", "to", "clone", "contiguous", "alias", "type_as")
MOVES = ("view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "expand", "slice", "cat",
         "flatten", "squeeze", "split", "split_with_sizes", "getitem", "select", "t")


class NotLinearPath(Exception):
    """The ops between a projection and the attention are not a per-head, per-position linear map we can read."""


def _args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def path_nodes(proj: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes on paths from ``proj`` to ``end`` (both included), in graph order."""
    back: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n in back:
            continue
        back.add(n)
        if n is not proj:
            stack.extend(_args(n))
    on = {proj}
    for n in proj.graph.nodes:
        if n in back and n is not proj and any(a in on for a in _args(n)):
            on.add(n)
    if end not in on:
        raise NotLinearPath("the attention input does not come from the projection")
    return [n for n in proj.graph.nodes if n in on]


def _run(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """Run one op on concrete values; a ``device`` argument naming the meta device (a model traced on meta: its
    positions are made ``arange(T, device=meta)``) is read as the CPU, where the values are."""
    def val(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        if isinstance(a, torch.device) and a.type == "meta":
            return torch.device("cpu")
        return a
    return node.target(*val(node.args), **{k: val(v) for k, v in node.kwargs.items()})


def side_values(g: ExportedGraph, path: list[fx.Node]) -> dict[fx.Node, Any]:
    """Values of the inputs the path takes from outside it (cos/sin tables): computed from buffers, constants and
    positions only."""
    on = set(path)
    needed = [a for n in path[1:] for a in _args(n) if a not in on]
    buffers = dict(g.model.named_buffers(remove_duplicate=False))
    env: dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        if n in env:
            return env[n]
        if n.op == "placeholder":
            if n in (g.buffer_of or {}):
                t = buffers.get(g.buffer_of[n])
                if t is None or t.device.type == "meta":
                    raise NotLinearPath(f"buffer {g.buffer_of[n]} has no values (meta device)")
                env[n] = t
            elif n in (g.constants or {}):
                env[n] = g.constants[n]
            else:
                raise NotLinearPath(f"the map depends on {'a parameter' if n in g.param_of else 'the input values'}")
            return env[n]
        for a in _args(n):
            value(a)
        env[n] = _run(n, env)
        return env[n]

    for n in needed:
        value(n)
    return env


def _evaluate(path: list[fx.Node], side: dict[fx.Node, Any], z: torch.Tensor) -> torch.Tensor:
    env = dict(side)
    env[path[0]] = z
    for n in path[1:]:
        if op_name(n) == "_assert_tensor_metadata":
            continue
        env[n] = _run(n, env)
    return env[path[-1]]


def _head_labels(path: list[fx.Node], side: dict[fx.Node, Any], heads: torch.Tensor) -> torch.Tensor:
    """Push the projection-head index of every unit through the path: reshapes move it; an elementwise op of two
    path values must combine the same head (no mixing across heads)."""
    env: dict[fx.Node, Any] = {path[0]: heads}
    for n in path[1:]:
        name = op_name(n)
        if name == "_assert_tensor_metadata":
            continue
        ins = [a for a in _args(n) if a in env]
        if name in MOVES:
            env[n] = _run(n, {**{a: side.get(a) for a in _args(n) if a not in env}, **env})
        elif name in ELEMENTWISE:
            vals = [env[a] for a in ins]
            shape = tuple(shape_of(n) or ())
            vals = [v.expand(shape) if tuple(v.shape) != shape else v for v in vals]
            if any(not torch.equal(vals[0], v) for v in vals[1:]):
                raise NotLinearPath(f"{name} combines different heads")
            env[n] = vals[0]
        else:
            raise NotLinearPath(f"{name} on the way to the attention")
    return env[path[-1]]


def _fingerprint(path: list[fx.Node], side: dict[fx.Node, Any]) -> tuple:
    """The path's ops, their non-tensor arguments and the side tensors' values: equal fingerprints, equal maps
    (every layer of a model repeats the same rotary ops on the same tables)."""
    index = {n: i for i, n in enumerate(path)}
    out: list[Any] = [tuple(shape_of(path[0]) or ())]
    for n in path[1:]:
        args = []
        for a in list(n.args) + list(n.kwargs.values()):
            for x in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(x, fx.Node) and x in index:
                    args.append(("path", index[x]))
                elif isinstance(x, fx.Node):
                    v = side[x]
                    args.append(("side", tuple(v.shape), str(v.dtype), v.detach().cpu().numpy().tobytes())
                                if isinstance(v, torch.Tensor) else ("side", repr(v)))
                else:
                    args.append(repr(x))
        out.append((op_name(n), tuple(args)))
    return tuple(out)


def position_maps(g: ExportedGraph, proj: fx.Node, end: fx.Node, dh: int,
                  cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, source): maps[h, t] is the d_h × d_h matrix A with (attention input)[h, t, :] = z[t, head] @ A for
    the projection's output z, and source[h] the projection head feeding attention head h. ``cache``: maps of
    paths already read (keyed by :func:`_fingerprint`)."""
    path = path_nodes(proj, end)
    side = side_values(g, path)
    key = None
    if cache is not None:
        key = (_fingerprint(path, side), dh)
        if key in cache:
            return cache[key]
    result = _read_maps(path, side, proj, end, dh)
    if key is not None:
        cache[key] = result
    return result


def _read_maps(path: list[fx.Node], side: dict[fx.Node, Any], proj: fx.Node, end: fx.Node,
               dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = shape_of(proj)
    units = shape[-1]
    if units % dh:
        raise NotLinearPath("the projection's width is not a multiple of the head size")
    heads = (torch.arange(units) // dh).expand(shape).contiguous()
    labels = _head_labels(path, side, heads)
    out_shape = shape_of(end)
    if labels.dim() != 4 or tuple(labels.shape) != tuple(out_shape) or out_shape[-1] != dh:
        raise NotLinearPath(f"the attention input has shape {out_shape}, not (batch, heads, positions, {dh})")
    first = labels[0]
    if not bool((first == first[:, :1, :1]).all()):
        raise NotLinearPath("an attention head takes units of several projection heads")
    source = first[:, 0, 0]
    dtype = torch.float64
    side64 = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in side.items()}
    cols = []
    for i in range(dh):
        z = torch.zeros(shape, dtype=dtype)
        z[..., i::dh] = 1.0
        cols.append(_evaluate(path, side64, z)[0])  # (H, T, dh): row i of every A
    maps = torch.stack(cols, dim=-2)  # (H, T, dh, dh)
    dense = torch.sin(torch.arange(torch.Size(shape).numel(), dtype=dtype) * 0.7 + 1.0).reshape(shape)
    got = _evaluate(path, side64, dense)[0]
    zin = dense[0].reshape(shape[-2], units // dh, dh)  # (T, heads_in, dh)
    want = torch.einsum("thi,htij->htj", zin[:, source, :], maps)
    if not torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(got.abs().max().clamp_min(1.0))):
        raise NotLinearPath("the map is not linear per head and position")
    return maps, source


def commutant(mats: torch.Tensor) -> torch.Tensor:
    """A basis (r, d, d) of {X : X·M = M·X for every M in ``mats`` (k, d, d)} (module docstring)."""
    d = mats.shape[-1]
    support = (mats != 0).any(0)
    support = support | support.T
    parent = list(range(d))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in support.nonzero().tolist():
        parent[find(i)] = find(j)
    blocks: dict[int, list[int]] = {}
    for i in range(d):
        blocks.setdefault(find(i), []).append(i)
    blist = list(blocks.values())
    scale = float(mats.abs().max().clamp_min(1e-300))
    basis = []
    by_size: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for b1 in blist:
        for b2 in blist:
            by_size.setdefault((len(b1), len(b2)), []).append((b1, b2))
    for (n1, n2), pairs in by_size.items():
        i1 = torch.tensor([b1 for b1, _ in pairs])
        i2 = torch.tensor([b2 for _, b2 in pairs])
        m1 = mats[:, i1[:, :, None], i1[:, None, :]].transpose(0, 1)  # (P, k, n1, n1)
        m2 = mats[:, i2[:, :, None], i2[:, None, :]].transpose(0, 1)  # (P, k, n2, n2)
        eye1, eye2 = torch.eye(n1, dtype=mats.dtype), torch.eye(n2, dtype=mats.dtype)
        # row-major vec: vec(Y·M2) = (I ⊗ M2ᵀ) vec(Y), vec(M1·Y) = (M1 ⊗ I) vec(Y)
        k_op = (torch.einsum("ab,pkcd->pkacbd", eye1, m2.transpose(-1, -2))
                - torch.einsum("pkab,cd->pkacbd", m1, eye2)).reshape(len(pairs), -1, n1 * n2)
        _, sv, vh = torch.linalg.svd(k_op, full_matrices=False)  # rows ≥ columns: vh is all of ℝ^(n1·n2)
        sv_full = torch.zeros(len(pairs), n1 * n2, dtype=mats.dtype)
        sv_full[:, : sv.shape[1]] = sv
        for p, (b1, b2) in enumerate(pairs):
            for r in range(n1 * n2):
                if sv_full[p, r] <= TOLERANCE * scale:
                    x = torch.zeros(d, d, dtype=mats.dtype)
                    x[torch.tensor(b1)[:, None], torch.tensor(b2)[None, :]] = vh[p, r].reshape(n1, n2)
                    basis.append(x)
    return torch.stack(basis) if basis else torch.zeros(0, d, d, dtype=mats.dtype)
