"""Watch every symmetry's charge during training: measured vs the exact per-step law vs the paper's theory.

:class:`Monitor` is a callback of :func:`symtools.training.train`. For every group set of the model's
:class:`~symtools.nn.groups.SymmetryMap` and the optimizer actually used, it loads the generated law module
``symtools.codegen.generated.law_<family>_<optimizer>`` (derived by :mod:`symtools.symbolic.laws`; no
formula is written here) and, at every step, for all groups at once, in float64:

- before ``optimizer.step()``: measures the law's state (e.g. Q, or Q, P, R with momentum) and its driving
  terms (e.g. M1 = ⟨g, v⟩, G = Σ c g²) from θ, g and the momentum buffer; predicts the next state with the
  law's ``step`` using the learning rate, weight decay, momentum and dampening of the parameter group at
  this step (schedules and param groups are honoured); advances the *accumulated* prediction (the same law
  applied to its own previous prediction, from step 0) and the *continuous* theory (``continuous_step``:
  the paper's ODE solutions, integrals as Riemann sums over the measured terms);
- after the step: measures the new state and records the residuals ``|measured − predicted| / scale``,
  where a group's scale is the size of what was added up: Σ|q(θ_n)| over its elements (the absolute values
  of the charge density) plus Σ|each term of the law's prediction| (the law applied to each of its state
  and measured inputs alone, :func:`_terms_scale`). Translation sums near zero, and charges whose terms
  cancel (a bias feeding BatchNorm), are so judged against the size of their terms, not against the sum.
- the continuous theory's worst residual leaves out groups whose scale is round-off next to the rest of
  their family (:data:`CONTINUOUS_EXCLUDE_REL`), and says how many it left out.

Records (see docs/records.md): stream ``laws`` holds per-layer aggregates every step, from step 0 (the
initial charges); streams ``groups_<family>`` hold per-group values every ``stride`` steps (also from
step 0); stream ``identities`` holds the
checker's residuals every ``check_every`` steps. Nothing the monitor does touches the model's RNG use,
its BatchNorm statistics or its gradients: the identity checks draw from their own ``torch.Generator``
and evaluate BatchNorm with batch statistics without writing buffers.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from symtools.checkpoints import unwrap_model as _unwrap
from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric.groupops import ACC, CPU_BLOCK, Combination, ViewCache, elements_per_group, reduce_terms
from symtools.numeric.records import read_stream

QUANTITIES = ("measured", "step", "accumulated", "continuous")

#: Groups of one parameter element are left out of the continuous theory's worst residual (their gradient
#: is 0 analytically; in float32 the round-off of BatchNorm's backward, ~1e-2 of a typical gradient entry,
#: still drives them, which the theory omits: measured on VGG-16-BN, 200 SGD steps, the 1e-6 scale rule
#: below left most out but not all, and the worst residual stayed 0.5). Also, a group is left out (summary, progress, the ``laws`` stream's
#: ``residual_continuous``) at a step where its scale (the residual's denominator: Σ|q(θ_n)| + Σ|law terms|)
#: is below this fraction of the largest scale of its family at that step. Such a group's charge is
#: round-off (a conv bias feeding BatchNorm: its gradient is 0 analytically), the theory predicts 0 for it,
#: and its residual is ≈ 0.5 whatever the theory's quality. The reference is the family's largest scale,
#: not its median: in VGG-16-BN 4,224 of the 5,249 translation groups are such biases, so the median is
#: itself round-off. How many groups were left out is recorded (``excluded_continuous``) and reported.
CONTINUOUS_EXCLUDE_REL = 1e-6
EXCLUDE_SINGLE_ELEMENT = True
EXCLUSION_RULE = (f"continuous residual: groups of a single parameter element (the symmetry forces its gradient to "
                  f"vanish: a bias feeding BatchNorm, moved only by weight decay and gradient round-off, which the "
                  f"theory omits) and groups with scale < {CONTINUOUS_EXCLUDE_REL:g} × the largest scale of their "
                  f"family at that step are left out")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """('sgd' | 'momentum' | 'nesterov' | None, reason): which derived law applies to this optimizer."""
    if type(optimizer) is torch.optim.SGD:
        if any(pg.get("maximize") for pg in optimizer.param_groups):
            return None, "SGD with maximize=True has no derived law"
        kinds = {_group_kind(pg) for pg in optimizer.param_groups}
        if kinds == {"sgd"}:
            return "sgd", ""
        if "sgd" not in kinds:
            return ("nesterov" if optimizer.param_groups[0]["nesterov"] else "momentum"), ""
        return None, "param groups mix momentum and plain SGD"
    name = type(optimizer).__name__
    return None, (f"no exact law is derived for {name}: its per-coordinate preconditioning breaks the "
                  f"gradient identity's cancellation (symtools derives the breaking term for Adam/AdamW in "
                  f"docs/laws.md); recording measured charges only")


def _group_kind(pg: dict) -> str | None:
    """The law kind one SGD param group follows ('sgd', 'momentum', 'nesterov'; None with maximize=True)."""
    if pg.get("maximize"):
        return None
    if pg.get("momentum", 0) == 0:
        return "sgd"
    return "nesterov" if pg.get("nesterov") else "momentum"


def _blockwise(fn, out: Tensor, *inputs: Tensor) -> Tensor:
    """``fn(*inputs, out=out)`` for same-shaped contiguous tensors, on the CPU in blocks of
    :data:`~symtools.numeric.groupops.CPU_BLOCK` elements (each op on the calling thread, as the reductions)."""
    if out.device.type != "cpu":
        return fn(*inputs, out=out)
    for parts in zip(out.view(-1).split(CPU_BLOCK), *(t.reshape(-1).split(CPU_BLOCK) for t in inputs)):
        fn(*parts[1:], out=parts[0])
    return out


def _copy(x: Tensor, out: Tensor) -> Tensor:
    return out.copy_(x)


class _OrZeros:
    """Read-only mapping name → ``get(name)``, or zeros shaped like the parameter where that is None; the
    zeros are made only for a name that is read (no full-size zeros for tensors no density needs)."""

    def __init__(self, params: dict[str, Tensor], get):
        self._params, self._get = params, get

    def __contains__(self, name) -> bool:
        return name in self._params

    def __getitem__(self, name: str) -> Tensor:
        value = self._get(name)
        return value if value is not None else torch.zeros_like(self._params[name])


@dataclass
class _Site:
    """One group set with its law module and the hyper-parameters' param group."""

    gs: GroupSet
    law: ModuleType | None
    charge: ModuleType
    index: int
    acc: dict[str, Tensor] = field(default_factory=dict)
    cont: dict[str, Tensor] = field(default_factory=dict)
    pred: dict[str, Tensor] = field(default_factory=dict)
    pending_cont: dict[str, Tensor] = field(default_factory=dict)
    last: dict[str, Tensor] = field(default_factory=dict)
    #: each group is one parameter element: ⟨g, v⟩ = 0 then forces that element's gradient to vanish, so
    #: its charge moves only by weight decay and the round-off of the gradient (a conv bias feeding BatchNorm)
    single_element: bool = False

    @property
    def continuous(self) -> bool:
        """Whether the site has a continuous theory (a law with a continuous state)."""
        return self.law is not None and bool(self.law.CONTINUOUS_STATE)

    @property
    def needs_displacement(self) -> bool:
        return self.continuous and "U" in self.law.CONTINUOUS_MEASURED


def _terms_scale(advance, state: dict, terms: dict, hyper) -> Tensor:
    """Σ of |each term of the law's prediction of Q|, per group.

    The laws are linear in their state and measured terms (with coefficients set by the hyper-parameters),
    so the contribution of one input is the law applied to that input alone. Summing their absolute values
    gives the size of what the prediction adds up, which is the scale its round-off is relative to (the
    terms can cancel: a bias that BatchNorm makes irrelevant has θ' = (1 − ηλ)θ − ηg ≈ 0). The laws are
    elementwise, so all inputs go through one call: row j of each stacked input holds input j, 0 elsewhere.
    """
    inputs = {**{("state", k): v for k, v in state.items()}, **{("terms", k): v for k, v in terms.items()}}
    alone = {}
    for j, (key, v) in enumerate(inputs.items()):
        alone[key] = torch.zeros((len(inputs),) + tuple(v.shape), dtype=v.dtype, device=v.device)
        alone[key][j] = v
    parts = advance({k: alone[("state", k)] for k in state}, {k: alone[("terms", k)] for k in terms}, *hyper)["Q"]
    return parts.abs().sum(dim=0)


def _masked_max(r: Tensor, keep: Tensor | None = None) -> float:
    """The largest entry of ``r`` (over ``keep`` only, if given); NaN when there is none or all are NaN."""
    if keep is not None:
        r = r[keep]
    if not r.numel() or bool(torch.isnan(r).all()):
        return math.nan
    return float(r.max())


class Monitor:
    """Training callback recording every group's charge against its laws (see the module docstring)."""

    def __init__(self, symmetries: SymmetryMap, *, stride: int = 10, check_every: int = 0, seed: int = 0,
                 families: tuple[str, ...] | None = None, name: str = "monitor"):
        if stride < 1:
            raise SymtoolsError(f"stride must be at least 1, got {stride}")
        self.symmetries = symmetries
        self.stride, self.check_every, self.seed = stride, check_every, seed
        self.families = families
        self.name = name
        self.kind: str | None = None
        self.sites: list[_Site] = []
        self.worst: dict[str, float | None] = {"step": None, "accumulated": None, "continuous": None}
        self.worst_family: dict[str, dict[str, float]] = {}
        self.excluded_family: dict[str, int | None] = {}  # most groups left out of the continuous residual at one step
        self.warnings: list[str] = []
        self._params: dict[str, torch.nn.Parameter] = {}
        self._before: dict[str, Tensor] = {}  # copies of θ_{n−1}, only where Δθ cannot be had from the optimizer

    # ------------------------------------------------------------------ set-up
    def on_start(self, ctx) -> None:
        model = _unwrap(ctx.model)
        self._params = dict(model.named_parameters())
        kind, reason = optimizer_kind(ctx.optimizer)
        self.kind = kind
        if kind is None:
            self._warn(f"measured-only mode: {reason}")
        self.sites = []
        for gs in self.symmetries.group_sets:
            if self.families and gs.family not in self.families:
                continue
            charge = importlib.import_module(f"symtools.codegen.generated.{gs.family}")
            if charge.CHARGE_DENSITY is None:
                continue
            law = None
            if kind is not None:
                try:
                    law = importlib.import_module(f"symtools.codegen.generated.law_{gs.family}_{kind}")
                except ModuleNotFoundError:
                    self._warn(f"no law derived for {gs.family} under {kind}: measured-only for that family")
                pg = self._group_of(ctx.optimizer, gs) if law is not None else None
                if law is not None and pg is None:
                    self._warn(f"{gs.layer}: its tensors sit in param groups with different hyper-parameters; "
                               f"measured-only there")
                    law = None
                elif law is not None and _group_kind(pg) != kind:
                    self._warn(f"{gs.layer}: its param group follows {_group_kind(pg)}, not {kind}; measured-only there")
                    law = None
            self.sites.append(_Site(gs, law, charge, len(self.sites), single_element=elements_per_group(gs, self._params) == 1))
        columns = ["step"]
        for s in self.sites:
            columns += [f"{s.gs.family}|{s.index}|{s.gs.layer}|{q}" for q in QUANTITIES]
            columns += [f"{s.gs.family}|{s.index}|{s.gs.layer}|residual_{q}" for q in QUANTITIES[1:]]
            columns += [f"{s.gs.family}|{s.index}|{s.gs.layer}|excluded_continuous"]
        self._laws = ctx.records.stream("laws", columns,
                                        "per-layer sums of the charge: measured, per-step law, accumulated law, "
                                        "continuous theory; the max per-group relative residual of each (the "
                                        "continuous one over the groups not left out); the number of groups "
                                        "left out of the continuous one. Step 0: the initial charges",
                                        meta={"optimizer": self.kind,
                                              "families": sorted({s.gs.family for s in self.sites}),
                                              "continuous_exclusion": EXCLUSION_RULE})
        self._groups = {}
        for fam in sorted({s.gs.family for s in self.sites}):
            sites = [s for s in self.sites if s.gs.family == fam]
            cols = ["step"] + [f"{q}|{s.index}|{k}" for q in QUANTITIES for s in sites for k in range(s.gs.count)]
            self._groups[fam] = (ctx.records.stream(f"groups_{fam}", cols,
                                                    f"per-group {fam} charges every {self.stride} steps",
                                                    meta={"sites": [[s.index, s.gs.layer, s.gs.count] for s in sites]}),
                                 sites)
        if self.check_every:
            self._checks = ctx.records.stream(
                "identities", ["step"] + [f"{f}|{k}" for f in sorted({s.gs.family for s in self.sites})
                                          for k in ("gradient", "hessian", "pass")],
                "checker residuals on the live weights and the current batch")
        self._state_dir = Path(ctx.out_dir) / "monitor"
        if ctx.start_step:
            self._restore(ctx, ctx.start_step)
        elif not _rows(self._laws):  # a run resumed from its step-0 checkpoint has the row already
            self._record_initial(ctx)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(f"symtools monitor: {msg}", stacklevel=3)

    def _group_of(self, optimizer, gs: GroupSet) -> dict | None:
        """The param group holding all of ``gs``'s tensors, or None when they are spread over differing ones."""
        ids = {id(self._params[p]) for p in gs.params()}
        found = []
        for pg in optimizer.param_groups:
            if ids & {id(p) for p in pg["params"]}:
                found.append(pg)
        keys = ("lr", "weight_decay", "momentum", "dampening", "nesterov")
        if not found or any(any(pg.get(k) != found[0].get(k) for k in keys) for pg in found[1:]):
            return None
        return found[0]

    def _drop_law(self, s: _Site, step: int, why: str) -> None:
        """Measured-only for ``s`` from this step on (its hyper-parameters no longer fit its law)."""
        self._warn(f"{s.gs.family} at {s.gs.layer}: {why} at step {step}; measured-only there from this step on")
        s.law = None
        s.acc, s.cont, s.pred, s.pending_cont = {}, {}, {}, {}
        s.last.pop("Q_law", None)
        s.last.pop("terms_scale", None)

    # ------------------------------------------------------------------ per step
    def _sources(self, optimizer, with_buffer: bool) -> dict:
        values = {k: p.detach() for k, p in self._params.items()}
        out = {"": values, "g_": _OrZeros(self._params, lambda k: self._params[k].grad)}
        if with_buffer:
            out["b_"] = _OrZeros(self._params,
                                 lambda k: optimizer.state.get(self._params[k], {}).get("momentum_buffer"))
        return out

    def _record_initial(self, ctx) -> None:
        """Row of step 0 in ``laws`` and ``groups_<family>``: the charges at the initial weights θ_0. The
        accumulated law and the continuous theory start there (their value is the measured one); the per-step
        law has made no prediction yet (NaN), and no residual exists (NaN)."""
        cache = ViewCache(self._sources(ctx.optimizer, with_buffer=False))
        row, per_group = [0.0], {}
        for s in self.sites:
            measured, _ = self._charge(s, cache)
            nan = torch.full_like(measured, math.nan)
            values = (measured, nan, measured if s.law is not None else nan, measured if s.continuous else nan)
            row += [float(v.sum()) for v in values] + [math.nan] * 4
            per_group[s.index] = values
        self._laws.append(row)
        self._append_groups(0, per_group)

    def _charge(self, s: _Site, cache: ViewCache, extra: dict | None = None) -> tuple[Tensor, dict]:
        """(per-group charge Σ q(θ), {"scale": Σ|q(θ)|, extra terms …}) in one pass over the tensors; for a site
        with a law, remembers Q in the law's units for the next ``before_step`` (same weights)."""
        todo = {"": (s.charge.CHARGE_DENSITY, s.charge.ARGS["charge_density"]), **(extra or {})}
        totals, sizes = reduce_terms(todo, s.gs, cache, sized=("",))
        measured = totals.pop("")
        if s.law is not None:
            s.last["Q_law"] = measured / self._factor(s)
        return measured, {"scale": sizes[""], **totals}

    def before_step(self, ctx) -> None:
        cache = ViewCache(self._sources(ctx.optimizer, with_buffer=self.kind in ("momentum", "nesterov")))
        for s in self.sites:
            if s.law is None:
                continue
            pg = self._group_of(ctx.optimizer, s.gs)
            if pg is None:
                self._drop_law(s, ctx.step, "its tensors now sit in param groups with different hyper-parameters")
                continue
            if _group_kind(pg) != self.kind:
                self._drop_law(s, ctx.step, f"its param group now follows {_group_kind(pg)}, not {self.kind}")
                continue
            hyper = (pg["lr"], pg["weight_decay"], pg.get("momentum", 0.0), pg.get("dampening", 0.0))
            buffers_exist = self.kind in ("momentum", "nesterov") and all(
                ctx.optimizer.state.get(self._params[p], {}).get("momentum_buffer") is not None for p in s.gs.params())
            use_first = self.kind in ("momentum", "nesterov") and not buffers_exist
            state_names = s.law.FIRST_STATE if use_first else s.law.STATE
            meas_names = s.law.FIRST_MEASURED if use_first else s.law.MEASURED
            advance = s.law.first_step if use_first else s.law.step
            # Q at θ_{n−1} was measured after the previous step (same weights): reuse it
            known = {"Q": s.last.pop("Q_law")} if "Q_law" in s.last else {}
            todo = {n: (s.law.DENSITY[n], s.law.ARGS[n]) for n in (*state_names, *meas_names) if n not in known}
            found = {**reduce_terms(todo, s.gs, cache)[0], **known}  # every term in one pass over the tensors
            state = {n: found[n] for n in state_names}
            terms = {n: found[n] for n in meas_names}
            s.pred = advance(state, terms, *hyper)
            s.last["terms_scale"] = _terms_scale(advance, state, terms, hyper)
            if not s.acc:  # step 0 (on resume the accumulated state was restored)
                s.acc = dict(state)
                s.cont = s.law.continuous_start(state) if s.law.CONTINUOUS_STATE else {}
            s.acc = advance({k: s.acc[k] for k in state_names}, terms, *hyper)
            s.pending_cont = {"hyper": hyper, "terms": terms}
        # The continuous theory's U needs the displacement θ_n − θ_{n−1}: after the step it is rebuilt from the
        # optimizer's state (_displacement); a copy of θ_{n−1} is kept only for a tensor where it cannot be.
        pg_of = self._param_groups(ctx.optimizer)
        self._before = {}
        for k in self._displaced():
            p = self._params[k]
            if self._needs_copy(p, pg_of.get(id(p))):
                self._before[k] = _blockwise(_copy, torch.empty_like(p, memory_format=torch.contiguous_format),
                                             p.detach())

    def _displaced(self) -> list[str]:
        """Names of the tensors whose step displacement a continuous theory reads (its ``d_`` arguments)."""
        names = dict.fromkeys(p for s in self.sites if s.needs_displacement for p in s.gs.params())
        return list(names)

    def _param_groups(self, optimizer) -> dict[int, dict]:
        return {id(p): pg for pg in optimizer.param_groups for p in pg["params"]}

    def _needs_copy(self, p: Tensor, pg: dict | None) -> bool:
        """Whether Δθ of ``p`` cannot be rebuilt from the optimizer's state after the step (see
        :meth:`_displacement`; only ``torch.optim.SGD`` runs have a law): a sparse gradient, ``maximize``, or
        1 − ηλ too close to 0 to divide by (the rebuilt Δθ's round-off grows as 1/(1 − ηλ))."""
        if pg is None or p.grad is None:
            return False  # torch leaves it alone: Δθ = 0
        if _group_kind(pg) is None or p.grad.is_sparse:
            return True
        if _group_kind(pg) in ("sgd", "nesterov") and pg["weight_decay"] != 0:
            return abs(1.0 - float(pg["lr"]) * float(pg["weight_decay"])) < 0.5
        return False

    def _displacement(self, optimizer, p: Tensor, pg: dict | None) -> Combination:
        """Δθ = θ_n − θ_{n−1} of ``p`` from ``torch.optim.SGD``'s state after its step, as a
        :class:`~symtools.numeric.groupops.Combination` (never formed whole). torch's update (sgd.py) is
        d = g + λθ_{n−1}; with momentum b' = μb + (1 − τ)d (b' = d at the first step); then
        θ_n = θ_{n−1} − η·u with u = d (plain), b' (heavy ball) or d + μb' (Nesterov). So Δθ = −η·b' for the
        heavy ball, exactly; where u holds d, θ_{n−1} = θ_n − Δθ gives Δθ = −η(g + λθ_n [+ μb'])/(1 − ηλ).
        A tensor without a gradient (or in no param group) is not updated: Δθ = 0."""
        if pg is None or p.grad is None:
            return Combination(p)
        lr, wd = float(pg["lr"]), float(pg["weight_decay"])
        kind = _group_kind(pg)
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if kind in ("momentum", "nesterov") else None
        if kind in ("momentum", "nesterov") and buf is None:
            raise SymtoolsError("SGD with momentum left no momentum buffer after its step: cannot rebuild Δθ")
        if kind == "momentum":
            return Combination(p, [(-lr, buf)])
        den = 1.0 - lr * wd
        terms = [(-lr / den, p.grad), (-lr * wd / den, p.detach())]
        if kind == "nesterov":
            terms.append((-lr * float(pg["momentum"]) / den, buf))
        return Combination(p, terms)

    def after_step(self, ctx) -> None:
        step = ctx.step
        sources = self._sources(ctx.optimizer, with_buffer=self.kind in ("momentum", "nesterov"))
        names = self._displaced()
        if names:  # the displacement θ_n − θ_{n−1}: from the optimizer's state, or over the copy of θ_{n−1}
            pg_of = self._param_groups(ctx.optimizer)
            moved = {}
            for k in names:
                p = self._params[k]
                if k in self._before:
                    moved[k] = _blockwise(torch.sub, self._before[k], p.detach(), self._before[k])
                else:
                    moved[k] = self._displacement(ctx.optimizer, p, pg_of.get(id(p)))
            sources["d_"] = moved
        self._before = {}
        cache = ViewCache(sources)
        results = []
        for s in self.sites:
            # the charge and the continuous theory's new terms, in one pass
            extra = {}
            if s.continuous:
                extra = {n: (s.law.DENSITY[n], s.law.ARGS[n]) for n in s.law.CONTINUOUS_MEASURED
                         if n not in s.pending_cont["terms"]}
            measured, found = self._charge(s, cache, extra)
            scale = found.pop("scale")
            nan = torch.full_like(measured, math.nan)
            pred = acc = cont = nan
            if s.law is not None:
                scale = scale + s.last["terms_scale"]
                factor = self._factor(s)
                pred, acc = s.pred["Q"] * factor, s.acc["Q"] * factor
                if s.continuous:
                    pend = s.pending_cont
                    cterms = {n: found[n] if n in found else pend["terms"][n] for n in s.law.CONTINUOUS_MEASURED}
                    s.cont = s.law.continuous_step(s.cont, cterms, *pend["hyper"])
                    cont = s.cont["Qc"] * factor
            results.append((s, measured, scale.clamp_min(1e-300), pred, acc, cont))
        # the continuous residual's reference: the largest scale of each family (CONTINUOUS_EXCLUDE_REL)
        largest: dict[str, float] = {}
        for s, _, scale, *_ in results:
            if s.continuous and scale.numel():
                largest[s.gs.family] = max(largest.get(s.gs.family, 0.0), float(scale.max()))
        row = [float(step)]
        per_group, excluded = {}, {}
        for s, measured, scale, pred, acc, cont in results:
            # the law's own state (e.g. P, R) is re-measured each step; only Q is compared here
            maxes = [_masked_max((measured - x).abs() / scale) for x in (pred, acc)]
            if s.continuous:
                keep = scale >= CONTINUOUS_EXCLUDE_REL * largest.get(s.gs.family, 0.0)
                if s.single_element and EXCLUDE_SINGLE_ELEMENT:
                    keep = torch.zeros_like(keep)
                maxes.append(_masked_max((measured - cont).abs() / scale, keep))
                left_out = int((~keep).sum())
                excluded[s.gs.family] = excluded.get(s.gs.family, 0) + left_out
            else:
                maxes.append(math.nan)
                left_out = math.nan
            values = (measured, pred, acc, cont)
            row += [float(v.sum()) for v in values] + maxes + [float(left_out)]
            self._track(s.gs.family, maxes)
            per_group[s.index] = values
        for fam, n in excluded.items():
            self.excluded_family[fam] = max(self.excluded_family.get(fam) or 0, n)
        self._laws.append(row)
        if step % self.stride == 0 or step == ctx.steps:
            self._append_groups(step, per_group)
        if self.check_every and step % self.check_every == 0:
            self._run_checks(ctx)

    def _append_groups(self, step: int, per_group: dict) -> None:
        for fam, (stream, sites) in self._groups.items():
            vals = [torch.cat([per_group[s.index][i] for s in sites]) for i in range(len(QUANTITIES))]
            stream.append(torch.cat([torch.tensor([float(step)], dtype=ACC)] + [v.cpu() for v in vals]))

    def _factor(self, s: _Site) -> float:
        """Ratio of the charge module's density to the law module's Q density (both derived; usually 1)."""
        if "factor" not in s.last:
            x = torch.linspace(0.3, 1.7, 5, dtype=ACC)
            slot = s.gs.slots and next(iter(s.gs.slots))
            q = s.charge.CHARGE_DENSITY[slot]
            law_q = s.law.DENSITY["Q"][slot]
            a = q(*[x for _ in s.charge.ARGS["charge_density"][slot]])
            b = law_q(*[x for _ in s.law.ARGS["Q"][slot]])
            ratio = (a / b)
            if not torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12, atol=0):
                raise SymtoolsError(f"{s.gs.family}: the law's Q is not a multiple of the charge")
            s.last["factor"] = ratio[0]
        return float(s.last["factor"])

    def _track(self, family: str, maxes: list[float]) -> None:
        """Worst residuals so far (None while a quantity has no prediction, e.g. no continuous model)."""
        fam = self.worst_family.setdefault(family, {"step": None, "accumulated": None, "continuous": None})
        for key, value in zip(("step", "accumulated", "continuous"), maxes):
            if not math.isnan(value):
                self.worst[key] = value if self.worst[key] is None else max(self.worst[key], value)
                fam[key] = value if fam[key] is None else max(fam[key], value)

    def _run_checks(self, ctx) -> None:
        from symtools.numeric.checker import check

        x, y = ctx.batch
        model = _unwrap(ctx.model)
        sub = SymmetryMap([s.gs for s in self.sites], [])
        loss = getattr(ctx, "loss_fn", None) or "cross_entropy"  # the run's own loss
        report = check(model, x, y, sub, loss=loss, seed=self.seed + ctx.step, locate=False)
        row = [float(ctx.step)]
        for fam in sorted({s.gs.family for s in self.sites}):
            f = report.families.get(fam)
            row += [f.gradient["max_rel_residual"], f.hessian["rel_residual"], float(f.passed)] if f else [math.nan] * 3
        self._checks.append(row)

    # ------------------------------------------------------------------ persistence
    def on_checkpoint(self, ctx) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        state = {f"{s.index}|acc|{k}": v.cpu() for s in self.sites for k, v in s.acc.items()}
        state.update({f"{s.index}|cont|{k}": v.cpu() for s in self.sites for k, v in s.cont.items()})
        tmp = self._state_dir / f".state_{ctx.step:06d}.pt"
        dropped = [s.index for s in self.sites if s.law is None]
        torch.save({"step": ctx.step, "state": state, "worst": dict(self.worst), "measured_only": dropped}, tmp)
        tmp.replace(self._state_dir / f"state_{ctx.step:06d}.pt")

    def _restore(self, ctx, step: int) -> None:
        path = self._state_dir / f"state_{step:06d}.pt"
        if not path.exists():
            raise SymtoolsError(f"cannot resume the monitor: {path} is missing")
        saved = torch.load(path, weights_only=True)
        for index in saved.get("measured_only", []):  # sites whose law was dropped before the checkpoint
            site = self.sites[int(index)]
            site.law = None
        for key, value in saved["state"].items():
            index, which, name = key.split("|")
            site = self.sites[int(index)]
            (site.acc if which == "acc" else site.cont)[name] = value
        self.worst.update(saved.get("worst", {}))
        self._restore_worst(ctx, step)

    def _restore_worst(self, ctx, step: int) -> None:
        """The worst residuals per family (and overall), and the most groups left out of the continuous
        residual, from the ``laws`` rows of steps ≤ ``step`` (the records as they stood at the checkpoint):
        the resumed run's summary then covers the whole run, as an uninterrupted one's."""
        directory = getattr(ctx.records, "directory", None)
        try:
            cols, rows = read_stream(directory, "laws")
        except (SymtoolsError, OSError, TypeError):
            return  # no records to read (the saved overall worst stays)
        rows = rows[rows[:, 0] <= step]  # another rank may not have cut them back yet
        if not len(rows):
            return
        where = {c: j for j, c in enumerate(cols)}
        worst = {"step": None, "accumulated": None, "continuous": None}
        for fam in sorted({s.gs.family for s in self.sites}):
            sites = [s for s in self.sites if s.gs.family == fam]
            entry = {}
            for key in ("step", "accumulated", "continuous"):
                vals = rows[:, [where[f"{fam}|{s.index}|{s.gs.layer}|residual_{key}"] for s in sites]]
                vals = vals[~np.isnan(vals)]
                entry[key] = float(vals.max()) if vals.size else None
                if entry[key] is not None:
                    worst[key] = entry[key] if worst[key] is None else max(worst[key], entry[key])
            self.worst_family[fam] = entry
            counts = rows[:, [where[f"{fam}|{s.index}|{s.gs.layer}|excluded_continuous"] for s in sites]]
            counted = ~np.isnan(counts).all(axis=1)  # rows with a continuous residual (not step 0)
            if counted.any():
                self.excluded_family[fam] = int(np.nansum(counts[counted], axis=1).max())
        self.worst = worst

    def status(self) -> dict:
        out = {"law residual": self.worst["step"]}
        if self.excluded_family:
            out["cont. residual"] = self.worst["continuous"]
            out["cont. excluded"] = sum(n or 0 for n in self.excluded_family.values())
        return out

    def on_end(self, ctx) -> dict:
        families = {}
        for f, w in self.worst_family.items():
            families[f] = {"groups": sum(s.gs.count for s in self.sites if s.gs.family == f),
                           "max_rel_residual_discrete": w["step"],
                           "max_rel_residual_accumulated": w["accumulated"],
                           "max_rel_residual_continuous": w["continuous"],
                           "continuous_excluded_groups": self.excluded_family.get(f)}
        return {
            "optimizer_law": self.kind,
            "max_rel_residual_discrete": self.worst["step"],
            "max_rel_residual_accumulated": self.worst["accumulated"],
            "max_rel_residual_continuous": self.worst["continuous"],
            "continuous_excluded_groups": (sum(n or 0 for n in self.excluded_family.values())
                                           if self.excluded_family else None),
            "continuous_exclusion_rule": EXCLUSION_RULE,
            "families": families,
            "monitor_warnings": self.warnings,
        }


def _rows(stream) -> int:
    """Rows already in a record stream (0 for a stream that keeps none, e.g. on a rank that does not write)."""
    rows = getattr(stream, "rows", None)
    return rows() if callable(rows) else 0
