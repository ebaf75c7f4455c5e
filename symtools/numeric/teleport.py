"""Symmetry teleportation (Zhao, Dehmamy, Walters, Yu, NeurIPS 2022): move θ along a group orbit of the loss to a
point of the same loss where the gradient is steeper (their Prop. 5.1), or where a curvature is lower/higher.

For every bound group set of the chosen families the orbit is parameterised by one Lie-algebra coordinate
per group, t_k (t = 0: θ itself), through the exponential map a(t) derived from the family's declaration
(:mod:`symtools.symbolic.teleport`); θ'(t) applies the generated finite action ``ACTION`` of every group set
in turn (a composition of symmetries is a symmetry). ``steps`` ascent steps on t maximise the objective on a
teleport batch (Adam on t: a normalised step of about lr; each |t_k| is kept ≤ steps·lr, i.e. a rescale factor
within e^(±steps·lr)), the best iterate is kept (the identity when nothing improves), and every teleport is then
checked before it is committed:

* the loss on the teleport batch is unchanged to round-off (the model's dtype; bound :func:`loss_bound`);
* the network's function is unchanged on held-out inputs, in eval mode (largest logit change / largest logit);
* each group's charge moved by exactly what the action implies: predicted from sums over the group's elements
  before the move (the derived Σ_k c_k(a)·Σ x^k) and measured on the moved tensors, in float64;
* the optimizer state is carried covariantly: gradient-like state of degree k (derived from the declared
  update rule) is divided by J^k, J = ∂ψ/∂θ elementwise; state with no such degree is reset, with a warning.

A check that fails raises :class:`TeleportError` and leaves the model and optimizer untouched.
Groups whose symmetry is only approximate (a scale group whose norm's ε breaks it: ``epsilon_of``) and actions
that are not diagonal (a slot's image reading another slot) are left out, with the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import sympy as sp
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from symtools.codegen.printer import torch_expr
from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric.groupops import charges, family_module, group_view, scatter_back
from symtools.symbolic.teleport import T, TeleportForm, state_degrees, teleport_form

ACC = torch.float64

#: Objectives: name → (what is maximised, help). ``curvature`` is κ = gᵀHg / gᵀg, the loss's curvature along
#: the gradient (one Hessian-vector product); it sets how much of a gradient step's first-order decrease the
#: second order takes back: L(θ − ηg) ≈ L − η‖g‖² (1 − ηκ/2).
OBJECTIVES = {
    "grad_norm": "maximise ‖∇L‖² on the teleport batch (steeper descent, Prop. 5.1)",
    "curvature_min": "minimise κ = gᵀHg/gᵀg, the curvature along the gradient (one HVP per step)",
    "curvature_max": "maximise κ = gᵀHg/gᵀg",
    "curvature=K": "bring κ to the target K (maximise −(κ − K)²)",
}


def check_objective(objective: str) -> str:
    """``objective`` if it names an objective (:data:`OBJECTIVES`, ``curvature=K`` with a number K), else a
    SymtoolsError that lists them."""
    if objective in OBJECTIVES and objective != "curvature=K":
        return objective
    if objective.startswith("curvature="):
        try:
            if math.isfinite(float(objective.partition("=")[2])):
                return objective
        except ValueError:
            pass
    raise SymtoolsError(f"unknown teleport objective {objective!r}; choose grad_norm, curvature_min, curvature_max "
                        f"or curvature=K (a target value K of the curvature along the gradient, e.g. curvature=2.5)")

#: The loss may change by this many units of round-off of the model's dtype, relative to |L| (see
#: :func:`loss_bound`; measured figures in docs/commands/teleport.md).
LOSS_ROUNDOFF_UNITS = 256
#: Charge check: |measured − predicted| ≤ CHARGE_UNITS · ε(float64) · Σ|terms| per group.
CHARGE_UNITS = 64


class TeleportError(SymtoolsError):
    """A teleport's guarantee failed (the move is not a symmetry of this loss, or was applied wrongly)."""


@dataclass
class TeleportResult:
    """What one teleport did and what was checked (``to_dict`` for JSON)."""

    objective: str
    families: dict[str, int]
    skipped: list[str]
    steps: int
    lr: float
    history: list[float]
    chosen_step: int
    objective_before: float
    objective_after: float
    loss_before: float
    loss_after: float
    loss_change_rel: float
    loss_bound_rel: float
    grad_norm_before: float
    grad_norm_after: float
    function_change_rel: float | None
    charge_residual_max: float
    charge_change: dict[str, float]
    coordinate_max: float
    optimizer_state: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        return self.chosen_step > 0

    def to_dict(self) -> dict:
        return asdict(self)


def _compile(expr: sp.Expr, names: Sequence[str]) -> Callable:
    """The expression as a torch function of ``names`` through the codegen printer (constants broadcast)."""
    code = torch_expr(sp.sympify(expr))
    return eval(f"lambda {', '.join(names)}: {code}", {"torch": torch, "math": math})


@dataclass
class _Bound:
    """One group set of a teleported family, with its compiled pieces."""

    gs: GroupSet
    module: object
    form: TeleportForm
    a_of_t: Callable
    jac: dict[str, Callable]
    after: dict[str, list[tuple[int, Callable]]] | None


def _as(value, like: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else torch.full_like(like, float(value))


class OrbitChart:
    """The teleport's coordinates: one t per group of every usable group set (module docstring)."""

    def __init__(self, symmetries: SymmetryMap, families: Sequence[str], params: Mapping[str, Tensor]):
        self.bound: list[_Bound] = []
        self.skipped: list[str] = []
        for gs in symmetries.group_sets:
            if gs.family not in families:
                continue
            where = f"{gs.family} at {gs.layer}"
            if gs.epsilon_of is not None:
                self.skipped.append(f"{where}: only approximate (ε of {gs.epsilon_of} breaks it; its running "
                                    f"statistics would also move)")
                continue
            module = family_module(gs.family)
            form = teleport_form(gs.family, module.SPEC, module.PARAMETER,
                                 module.CHARGE_TEXT if module.HAS_CHARGE else None)
            if not form.diagonal:
                self.skipped.append(f"{where}: a slot's image reads another slot (not supported by teleport)")
                continue
            a = str(form.action.parameter)
            jac = {s: _compile(e, (s, a)) for s, e in form.jacobian.items()}
            after = None
            if form.charge_after is not None:
                after = {s: [(k, _compile(c, (a,))) for k, c in terms] for s, terms in form.charge_after.items()}
            self.bound.append(_Bound(gs, module, form, _compile(form.exp_map.a_of_t, (str(T),)), jac, after))
        device = next(iter(params.values())).device
        self.t = [torch.zeros(b.gs.count, dtype=ACC, device=device, requires_grad=True) for b in self.bound]

    @property
    def families(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.bound:
            out[b.gs.family] = out.get(b.gs.family, 0) + b.gs.count
        return out

    def group_parameters(self, ts: Sequence[Tensor] | None = None) -> list[Tensor]:
        """a_k per group set (float64), at the given coordinates (default: the current ones)."""
        ts = self.t if ts is None else ts
        return [_as(b.a_of_t(t), t) for b, t in zip(self.bound, ts)]

    def move(self, params: Mapping[str, Tensor], ts: Sequence[Tensor] | None = None,
             trace: Callable | None = None) -> dict[str, Tensor]:
        """θ'(t): the actions applied group set after group set (differentiable in t). ``params`` is not
        modified. ``trace(bound, before, after, a)`` is called around each group set (for the checks)."""
        out = dict(params)
        for b, a in zip(self.bound, self.group_parameters(ts)):
            before = out if trace is None else dict(out)
            for slot, slices in b.gs.slots.items():
                act = b.module.ACTION[slot]
                for ts_ in slices:
                    p = out[ts_.param]
                    view = group_view(p, ts_)
                    moved = act(view.to(a.dtype), a.reshape(-1, 1)).to(p.dtype)
                    out[ts_.param] = scatter_back(moved, p, ts_)
            if trace is not None:
                trace(b, before, out, a)
        return out

    # -- the chart protocol teleport() composes (MatrixChart has the same) --------------------------------------
    def charge_check(self, b: _Bound, before, after, a: Tensor) -> tuple[float, float]:
        return _charge_check(b, before, after, a)

    def prepare_state(self, params: Mapping[str, Tensor], ts: Sequence[Tensor]) -> None:
        self._jac = self.jacobians(params, ts)

    def moved_names(self) -> set[str]:
        return set(getattr(self, "_jac", {}))

    def can_carry(self, name: str, degree: int) -> bool:
        return True

    def carry(self, name: str, value: Tensor, degree: int) -> Tensor:
        if name not in self.moved_names():
            return value
        return (value.to(ACC) / self._jac[name] ** degree).to(value.dtype)

    def jacobians(self, params: Mapping[str, Tensor], ts: Sequence[Tensor]) -> dict[str, Tensor]:
        """param → J = ∂θ'/∂θ elementwise (float64) for the composed move, for the optimizer state."""
        jac: dict[str, Tensor] = {}
        cur = {n: p.detach().to(ACC) for n, p in params.items()}
        for b, a in zip(self.bound, self.group_parameters(ts)):
            a = a.detach().reshape(-1, 1)
            nxt = dict(cur)
            for slot, slices in b.gs.slots.items():
                for ts_ in slices:
                    x = group_view(cur[ts_.param], ts_)
                    j = _as(b.jac[slot](x, a), x) * torch.ones_like(x)
                    full = scatter_back(j, cur[ts_.param], ts_)
                    jac[ts_.param] = jac[ts_.param] * full if ts_.param in jac else full
                    nxt[ts_.param] = scatter_back(b.module.ACTION[slot](x, a), cur[ts_.param], ts_)
            cur = nxt
        return jac


# -- objectives ----------------------------------------------------------------------------------------------

def _loss_and_grads(model, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch, loss_fn,
                    seed: int, create_graph: bool):
    x, y = batch
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout (if any) draws the same mask at every evaluation
        out = functional_call(model, ({**params}, {k: v.clone() for k, v in buffers.items()}), (x,))
    loss = loss_fn(out, y)
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
    return loss, names, grads


def objective_value(name: str, model, params, buffers, batch, loss_fn, seed: int = 0,
                    create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(objective to maximise, loss, ‖∇L‖²) at ``params``."""
    params = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
    loss, names, grads = _loss_and_grads(model, params, buffers, batch, loss_fn, seed,
                                         create_graph=create_graph or name != "grad_norm")
    gg = sum((g.to(ACC) ** 2).sum() for g in grads)
    if name == "grad_norm":
        return gg, loss, gg
    hg = torch.autograd.grad(grads, [params[n] for n in names], grad_outputs=[g.detach() if not create_graph else g
                                                                              for g in grads],
                             create_graph=create_graph, allow_unused=True)
    ghg = sum((g.to(ACC) * h.to(ACC)).sum() for g, h in zip(grads, hg) if h is not None)
    kappa = ghg / gg.clamp_min(1e-300)
    if name.startswith("curvature="):
        return -(kappa - float(name.partition("=")[2])) ** 2, loss, gg
    return (-kappa if name == "curvature_min" else kappa), loss, gg


def loss_bound(dtype: torch.dtype) -> float:
    """The largest relative loss change called round-off: LOSS_ROUNDOFF_UNITS units of the dtype's ε
    (float32: 3.1e-5; float64: 5.7e-14)."""
    return LOSS_ROUNDOFF_UNITS * torch.finfo(dtype).eps


# -- the teleport ---------------------------------------------------------------------------------------------

def _charts(model, symmetries: SymmetryMap, families: Sequence[str], params) -> Charts:
    from symtools.numeric.teleport_matrix import FAMILY as MATRIX_FAMILY
    from symtools.numeric.teleport_matrix import MatrixChart

    charts = [OrbitChart(symmetries, tuple(f for f in families if f != MATRIX_FAMILY), params)]
    if MATRIX_FAMILY in families:
        charts.append(MatrixChart(model, params))
    composite = Charts(charts)
    if not composite.t:
        fams = ", ".join(families)
        skipped = [s for c in charts for s in c.skipped]
        raise SymtoolsError(f"no group of the families {fams} can be teleported in this model"
                            + (f" ({'; '.join(skipped[:3])})" if skipped else "")
                            + f"; it has: {', '.join(f'{f} ({n})' for f, n in symmetries.families().items()) or 'none'}"
                            + (" (gl_linear_pair: consecutive Linear layers of an nn.Sequential with only "
                               "nn.Identity between them)" if MATRIX_FAMILY in families else ""))
    return composite


class Charts:
    """Several charts applied in turn (elementwise groups, then matrix groups): one list of coordinates."""

    def __init__(self, charts: Sequence):
        self.charts = [c for c in charts if c.t]
        self.skipped = [s for c in charts for s in c.skipped]

    @property
    def t(self) -> list[Tensor]:
        return [t for c in self.charts for t in c.t]

    @property
    def families(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.charts:
            for f, n in c.families.items():
                out[f] = out.get(f, 0) + n
        return out

    def split(self, ts: Sequence[Tensor]) -> list[Sequence[Tensor]]:
        out, i = [], 0
        for c in self.charts:
            out.append(ts[i:i + len(c.t)])
            i += len(c.t)
        return out

    def move(self, params, ts, trace: Callable | None = None) -> dict[str, Tensor]:
        for c, part in zip(self.charts, self.split(ts)):
            params = c.move(params, part, trace=None if trace is None else
                            (lambda b, bef, aft, a, c=c: trace(c, b, bef, aft, a)))
        return params


def teleport(model: torch.nn.Module, batch: tuple[Tensor, Tensor], *, symmetries: SymmetryMap | None = None,
             families: Sequence[str] = ("rescale",), objective: str = "grad_norm", steps: int = 10, lr: float = 0.05,
             optimizer: torch.optim.Optimizer | None = None, held_out: Tensor | None = None,
             loss_fn: Callable = F.cross_entropy, seed: int = 0, progress: Callable | None = None) -> TeleportResult:
    """Teleport ``model`` in place (module docstring); returns what was done and checked.

    ``families``: elementwise families bound by ``symmetries`` (default :func:`symtools.nn.graph.find_symmetries`
    on the batch), and ``gl_linear_pair`` (:mod:`symtools.numeric.teleport_matrix`). ``optimizer``: its state is
    carried along (covariantly) or reset. ``held_out``: inputs on which the function (eval mode) must not change.
    Raises :class:`TeleportError` (model untouched) when a guarantee fails.
    """
    import time

    check_objective(objective)
    if steps < 0 or not lr > 0:
        raise SymtoolsError(f"teleport needs steps ≥ 0 and lr > 0 (got steps={steps}, lr={lr})")
    start = time.perf_counter()
    if symmetries is None:
        from symtools.nn.graph import find_symmetries

        symmetries = find_symmetries(model, batch[0][:2])
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise SymtoolsError(f"cannot teleport: {len(bad)} parameter tensors hold NaN or inf (e.g. {bad[0]}): the "
                            f"run diverged")
    charts = _charts(model, symmetries, families, params)
    base = {n: p.detach() for n, p in params.items()}
    was_training = model.training
    model.train()
    try:
        ts, history = _ascend(charts, model, base, buffers, batch, loss_fn, objective, steps, lr, seed, progress)
    finally:
        model.train(was_training)
    best = max(range(len(history)), key=lambda i: history[i])
    result = _commit(charts, model, base, buffers, batch, loss_fn, objective, ts[best], optimizer, held_out, seed)
    result.history, result.chosen_step, result.steps, result.lr = history, best, steps, lr
    result.objective_before, result.objective_after = history[0], history[best]
    result.families, result.skipped = charts.families, charts.skipped
    result.seconds = time.perf_counter() - start
    return result


def _ascend(charts, model, base, buffers, batch, loss_fn, objective, steps, lr, seed, progress):
    """Adam ascent on the coordinates; returns the iterates (as detached copies) and the objective at each."""
    coords = charts.t
    opt = torch.optim.Adam(coords, lr=lr, maximize=True)
    iterates, history = [], []
    for i in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        value, _, _ = objective_value(objective, model, charts.move(base, coords), buffers, batch, loss_fn, seed,
                                      create_graph=True)
        iterates.append([t.detach().clone() for t in coords])
        history.append(value.item())
        if progress is not None:
            progress(i, steps, history[-1])
        if i == steps or not math.isfinite(history[-1]):
            break
        value.backward()
        opt.step()
        with torch.no_grad():  # Adam's step is about lr, but not at most lr: the stated bound is enforced
            for t in coords:
                t.clamp_(-steps * lr, steps * lr)
    return iterates, history


def _charge_check(b, before, after, a) -> tuple[float, float]:
    """(worst |measured − predicted| / (Σ|terms| · ε), total charge change) of one group set's move, float64."""
    if b.after is None or not b.module.HAS_CHARGE:
        return 0.0, 0.0
    a = a.detach().reshape(-1)
    pred = torch.zeros(b.gs.count, dtype=ACC, device=a.device)
    size = torch.zeros_like(pred)
    for slot, slices in b.gs.slots.items():
        for ts_ in slices:
            x = group_view(before[ts_.param], ts_).to(ACC)
            for k, coef in b.after[slot]:
                term = _as(coef(a), a) * (x ** k).sum(dim=1)
                pred += term
                size += term.abs()
    measured = charges(b.module, b.gs, after)
    q0 = charges(b.module, b.gs, before)
    resid = (measured - pred).abs() / (size.clamp_min(1e-300) * torch.finfo(ACC).eps)
    return float(resid.max()), float((measured - q0).sum())


def _commit(charts, model, base, buffers, batch, loss_fn, objective, chosen, optimizer, held_out, seed):
    was_training = model.training
    dtype = next(iter(base.values())).dtype
    with torch.no_grad():
        wide = {n: p.to(ACC) for n, p in base.items()}
        checks: list[tuple[float, float, str]] = []
        moved = charts.move(wide, chosen, trace=lambda c, b, bef, aft, a: checks.append(
            (*c.charge_check(b, bef, aft, a), getattr(getattr(b, "gs", None), "family", None) or "gl_linear_pair")))
        new = {n: moved[n].to(dtype) for n in base}
        coordinate = max((float(t.abs().max()) for t in chosen), default=0.0)
        for c, part in zip(charts.charts, charts.split(chosen)):
            c.prepare_state(base, part) if isinstance(c, OrbitChart) else c.prepare_state(part)
    model.train()
    try:
        v0, l0, gg0 = objective_value(objective, model, base, buffers, batch, loss_fn, seed)
        v1, l1, gg1 = objective_value(objective, model, new, buffers, batch, loss_fn, seed)
        change_fn = None
        if held_out is not None:
            model.eval()
            with torch.no_grad():
                o0 = functional_call(model, (base, buffers), (held_out,))
                o1 = functional_call(model, (new, buffers), (held_out,))
            change_fn = float((o1 - o0).abs().max() / o0.abs().max().clamp_min(1e-300))
    finally:
        model.train(was_training)
    l0f, l1f = l0.item(), l1.item()
    rel = abs(l1f - l0f) / max(abs(l0f), 1e-300)
    bound = loss_bound(dtype)
    worst_charge = max((c[0] for c in checks), default=0.0)
    problems = []
    if not rel <= bound:
        problems.append(f"the loss changed by {rel:.3g} of itself (round-off bound {bound:.2g})")
    if change_fn is not None and not change_fn <= bound:
        problems.append(f"the function changed on held-out inputs by {change_fn:.3g} of the largest logit "
                        f"(bound {bound:.2g})")
    if not worst_charge <= CHARGE_UNITS:
        problems.append(f"a charge moved {worst_charge:.3g} units of round-off away from the derived prediction "
                        f"(bound {CHARGE_UNITS})")
    if problems:
        raise TeleportError("teleport refused, the model is unchanged: " + "; ".join(problems)
                            + ". The declared groups are not symmetries of this loss, or were bound to the wrong "
                              "tensors; check them with `symtools check`")
    charge_change: dict[str, float] = {}
    for _, dq, fam in checks:
        charge_change[fam] = charge_change.get(fam, 0.0) + dq
    notes: list[str] = []
    state_note = _carry_state(optimizer, model, charts, notes) if optimizer is not None else "no optimizer given"
    moved_names = set().union(*(c.moved_names() for c in charts.charts))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in moved_names:
                p.copy_(new[n])
    for w in notes:
        warnings.warn(f"symtools teleport: {w}", stacklevel=3)
    return TeleportResult(objective, {}, [], 0, 0.0, [], 0, v0.item(), v1.item(), l0f, l1f, rel, bound,
                          math.sqrt(gg0.item()), math.sqrt(gg1.item()), change_fn, worst_charge, charge_change,
                          coordinate, state_note, warnings=notes)


def _carry_state(optimizer: torch.optim.Optimizer, model, charts: Charts, notes: list[str]) -> str:
    """Transform the optimizer state of the moved parameters as the gradient transforms (state of degree k in
    the gradient: k = 1 contragrediently, k = 2 elementwise only), chart after chart; reset what cannot be."""
    from symtools.numeric import optimizer_laws

    name, _ = optimizer_laws.law_of_optimizer(optimizer)
    by_param = {p: n for n, p in model.named_parameters()}
    entries = optimizer_laws.state_entries(name) if name is not None else {}
    degrees = {entries[k]: d for k, d in state_degrees(name).items()} if name is not None else {}
    moved = set().union(*(c.moved_names() for c in charts.charts))
    reset, carried = [], set()
    with torch.no_grad():
        for p, st in list(optimizer.state.items()):
            n = by_param.get(p)
            if n is None or n not in moved or not st:
                continue
            keys = [k for k, v in st.items() if isinstance(v, Tensor) and v.shape == p.shape]
            if any(degrees.get(k) is None or not all(c.can_carry(n, degrees[k]) for c in charts.charts) for k in keys):
                optimizer.state.pop(p)
                reset.append(n)
                continue
            for k in keys:
                value = st[k]
                for c in charts.charts:
                    value = c.carry(n, value, degrees[k])
                st[k].copy_(value)
                carried.add(k)
    if reset:
        notes.append(f"optimizer state of {len(reset)} moved tensors reset (no covariant form derived for "
                     f"{type(optimizer).__name__}{' ' + name if name else ''} under this group): e.g. {reset[0]}")
        return "reset" if not carried else f"carried covariantly ({', '.join(sorted(carried))}), some reset"
    return f"carried covariantly ({', '.join(sorted(carried))})" if carried else "no state yet"
