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
- after the step: measures the new state and records the residuals
  ``|measured − predicted| / Σ|density|`` (the scale is the sum of absolute values of the charge density,
  so translation sums near zero are judged against the size of their terms).

Records (see docs/records.md): stream ``laws`` holds per-layer aggregates every step; streams
``groups_<family>`` hold per-group values every ``stride`` steps; stream ``identities`` holds the
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

import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric.groupops import ACC, CPU_BLOCK, ViewCache, reduce_terms

QUANTITIES = ("measured", "step", "accumulated", "continuous")


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """('sgd' | 'momentum' | 'nesterov' | None, reason): which derived law applies to this optimizer."""
    if type(optimizer) is torch.optim.SGD:
        g = optimizer.param_groups[0]
        if any(pg.get("maximize") for pg in optimizer.param_groups):
            return None, "SGD with maximize=True has no derived law"
        if all(pg["momentum"] == 0 for pg in optimizer.param_groups):
            return "sgd", ""
        if all(pg["momentum"] > 0 for pg in optimizer.param_groups):
            return ("nesterov" if g["nesterov"] else "momentum"), ""
        return None, "param groups mix momentum and plain SGD"
    name = type(optimizer).__name__
    return None, (f"no exact law is derived for {name}: its per-coordinate preconditioning breaks the "
                  f"gradient identity's cancellation (symtools derives the breaking term for Adam/AdamW in "
                  f"docs/laws.md); recording measured charges only")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel / DataParallel


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
        self.warnings: list[str] = []
        self._params: dict[str, torch.nn.Parameter] = {}
        self._before: dict[str, Tensor] = {}

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
                if law is not None and self._group_of(ctx.optimizer, gs) is None:
                    self._warn(f"{gs.layer}: its tensors sit in param groups with different hyper-parameters; "
                               f"measured-only there")
                    law = None
            self.sites.append(_Site(gs, law, charge, len(self.sites)))
        columns = ["step"]
        for s in self.sites:
            columns += [f"{s.gs.family}|{s.index}|{s.gs.layer}|{q}" for q in QUANTITIES]
            columns += [f"{s.gs.family}|{s.index}|{s.gs.layer}|residual_{q}" for q in QUANTITIES[1:]]
        self._laws = ctx.records.stream("laws", columns,
                                        "per-layer sums of the charge: measured, per-step law, accumulated law, "
                                        "continuous theory; and the max per-group relative residual of each",
                                        meta={"optimizer": self.kind, "families": sorted({s.gs.family for s in self.sites})})
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
            self._restore(ctx.start_step)

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

    # ------------------------------------------------------------------ per step
    def _sources(self, optimizer, with_buffer: bool) -> dict:
        values = {k: p.detach() for k, p in self._params.items()}
        out = {"": values, "g_": {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in self._params.items()}}
        if with_buffer:
            out["b_"] = {k: optimizer.state.get(p, {}).get("momentum_buffer") for k, p in self._params.items()}
            out["b_"] = {k: (v if v is not None else torch.zeros_like(self._params[k])) for k, v in out["b_"].items()}
        return out

    def _measure(self, law, names, gs, cache: ViewCache, known: dict | None = None) -> dict[str, Tensor]:
        known = known or {}
        totals, _ = reduce_terms({n: (law.DENSITY[n], law.ARGS[n]) for n in names if n not in known}, gs, cache)
        return {n: known[n] if n in known else totals[n] for n in names}

    def before_step(self, ctx) -> None:
        cache = ViewCache(self._sources(ctx.optimizer, with_buffer=self.kind in ("momentum", "nesterov")))
        for s in self.sites:
            if s.law is None:
                continue
            pg = self._group_of(ctx.optimizer, s.gs)
            hyper = (pg["lr"], pg["weight_decay"], pg.get("momentum", 0.0), pg.get("dampening", 0.0))
            buffers_exist = self.kind in ("momentum", "nesterov") and all(
                ctx.optimizer.state.get(self._params[p], {}).get("momentum_buffer") is not None for p in s.gs.params())
            use_first = self.kind in ("momentum", "nesterov") and not buffers_exist
            state_names = s.law.FIRST_STATE if use_first else s.law.STATE
            meas_names = s.law.FIRST_MEASURED if use_first else s.law.MEASURED
            advance = s.law.first_step if use_first else s.law.step
            # Q at θ_{n−1} was measured after the previous step (same weights): reuse it
            known = {"Q": s.last.pop("Q_law")} if "Q_law" in s.last else None
            found = self._measure(s.law, tuple(state_names) + tuple(meas_names), s.gs, cache, known)
            state = {n: found[n] for n in state_names}
            terms = {n: found[n] for n in meas_names}
            s.pred = advance(state, terms, *hyper)
            s.last["terms_scale"] = _terms_scale(advance, state, terms, hyper)
            if not s.acc:  # step 0 (on resume the accumulated state was restored)
                s.acc = dict(state)
                s.cont = s.law.continuous_start(state) if s.law.CONTINUOUS_STATE else {}
            s.acc = advance({k: s.acc[k] for k in state_names}, terms, *hyper)
            s.pending_cont = {"hyper": hyper, "terms": terms}
        if self.kind in ("momentum", "nesterov") and any(
                s.law is not None and "U" in s.law.CONTINUOUS_MEASURED for s in self.sites):
            self._before = {k: _blockwise(_copy, torch.empty_like(p, memory_format=torch.contiguous_format),
                                          p.detach()) for k, p in self._params.items()}

    def after_step(self, ctx) -> None:
        step = ctx.step
        sources = self._sources(ctx.optimizer, with_buffer=self.kind in ("momentum", "nesterov"))
        if self._before:  # the displacement θ_n − θ_{n−1}, written over the copy of θ_{n−1}
            sources["d_"] = {k: _blockwise(torch.sub, self._before[k], p.detach(), self._before[k])
                             for k, p in self._params.items()}
            self._before = {}
        cache = ViewCache(sources)
        row = [float(step)]
        per_group = {}
        for s in self.sites:
            q = s.charge
            # the charge (key "": no law term has that name) and the continuous theory's new terms, in one pass
            todo = {"": (q.CHARGE_DENSITY, q.ARGS["charge_density"])}
            if s.law is not None and s.law.CONTINUOUS_STATE:
                todo.update({n: (s.law.DENSITY[n], s.law.ARGS[n]) for n in s.law.CONTINUOUS_MEASURED
                             if n not in s.pending_cont["terms"]})
            totals, sizes = reduce_terms(todo, s.gs, cache, sized=("",))
            measured, scale = totals.pop(""), sizes[""]
            if s.law is not None:
                s.last["Q_law"] = measured / self._factor(s)
                scale = scale + s.last["terms_scale"]
            scale = scale.clamp_min(1e-300)
            if s.law is not None:
                factor = self._factor(s)
                pred = s.pred["Q"] * factor
                acc = s.acc["Q"] * factor
                if s.law.CONTINUOUS_STATE:
                    pend = s.pending_cont
                    cterms = {n: totals[n] if n in totals else pend["terms"][n] for n in s.law.CONTINUOUS_MEASURED}
                    s.cont = s.law.continuous_step(s.cont, cterms, *pend["hyper"])
                    cont = s.cont["Qc"] * factor
                else:
                    cont = torch.full_like(measured, float("nan"))
                res = [((measured - x).abs() / scale) for x in (pred, acc, cont)]
                # the law's own state (e.g. P, R) is re-measured each step; only Q is compared here
            else:
                pred = acc = cont = torch.full_like(measured, float("nan"))
                res = [torch.full_like(measured, float("nan"))] * 3
            values = (measured, pred, acc, cont)
            row += [float(v.sum()) for v in values]
            maxes = [float(r.max()) if r.numel() and not torch.isnan(r).all() else float("nan") for r in res]
            row += maxes
            self._track(s.gs.family, maxes)
            per_group[s.index] = values
        self._laws.append(row)
        if step % self.stride == 0 or step == ctx.steps:
            for fam, (stream, sites) in self._groups.items():
                parts = [float(step)]
                vals = [torch.cat([per_group[s.index][i] for s in sites]) for i in range(len(QUANTITIES))]
                stream.append(torch.cat([torch.tensor(parts, dtype=ACC)] + [v.cpu() for v in vals]))
        if self.check_every and step % self.check_every == 0:
            self._run_checks(ctx)

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
        report = check(model, x, y, sub, loss="cross_entropy", seed=self.seed + ctx.step, locate=False)
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
        torch.save({"step": ctx.step, "state": state, "worst": dict(self.worst)}, tmp)
        tmp.replace(self._state_dir / f"state_{ctx.step:06d}.pt")

    def _restore(self, step: int) -> None:
        path = self._state_dir / f"state_{step:06d}.pt"
        if not path.exists():
            raise SymtoolsError(f"cannot resume the monitor: {path} is missing")
        saved = torch.load(path, weights_only=True)
        for key, value in saved["state"].items():
            index, which, name = key.split("|")
            site = self.sites[int(index)]
            (site.acc if which == "acc" else site.cont)[name] = value
        self.worst.update(saved.get("worst", {}))

    def status(self) -> dict:
        return {"law residual": self.worst["step"]}

    def on_end(self, ctx) -> dict:
        return {
            "optimizer_law": self.kind,
            "max_rel_residual_discrete": self.worst["step"],
            "max_rel_residual_accumulated": self.worst["accumulated"],
            "max_rel_residual_continuous": self.worst["continuous"],
            "families": {f: {"groups": sum(s.gs.count for s in self.sites if s.gs.family == f),
                             "max_rel_residual_discrete": w["step"],
                             "max_rel_residual_accumulated": w["accumulated"],
                             "max_rel_residual_continuous": w["continuous"]}
                         for f, w in self.worst_family.items()},
            "monitor_warnings": self.warnings,
        }
