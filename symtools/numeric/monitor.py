"""Watch every symmetry's charge during training: measured vs the exact per-step law vs the paper's theory.

:class:`Monitor` is a callback of :func:`symtools.training.train`. For every group set of the model's
:class:`~symtools.nn.groups.SymmetryMap` and the optimizer actually used, it reads the generated law module
``symtools.codegen.generated.law_<family>_<law>`` (derived by :mod:`symtools.symbolic.laws`; no formula is
written here) and, at every step, for all groups of all families at once, in float64:

- before ``optimizer.step()``: measures the law's state (e.g. Q, or Q, P, R with momentum) and its driving
  terms (e.g. M1 = ⟨g, v⟩, G = Σ c g²) from θ, g and the optimizer's buffer; predicts the next state with the
  law for the hyper-parameters of each group's param group at this step (schedules and param groups are
  honoured); advances the *accumulated* prediction (the law applied to its own previous prediction, from step 0);
- after the step: measures the new charge, advances the paper's *continuous* theory (its integrals as Riemann
  sums over the measured terms) and records the residuals ``|measured − predicted| / scale``, where a group's
  scale is the size of what was added up: Σ|q(θ_n)| over its elements plus Σ|each term of the law's
  prediction of Q| (the laws are linear: |A_Q|·|inputs|);
- the continuous theory's worst residual leaves out groups whose scale is round-off next to the rest of their
  family (:data:`CONTINUOUS_EXCLUDE_REL`) and groups of one element, and says how many it left out.

The per-step work is the fused core (docs/monitor.md, "Fused core"): a plan built once per (model,
optimizer) (:mod:`symtools.numeric.monitor_plan`) turns every density into shared monomials, summed over flat
copies of the tensors on a GPU (:mod:`symtools.numeric.flat`) and by one generated C pass per tensor on the CPU
(:mod:`symtools.numeric.compiled_sums`), and every law into a matrix (:mod:`symtools.numeric.law_matrices`),
so a step costs a fixed handful of tensor operations whatever the depth of the model, with no host
synchronisation: rows are kept on the device and handed to the records every
``stride`` steps (and at a checkpoint and at the end).

Records (docs/records.md): stream ``laws`` holds per-site aggregates every step, from step 0 (the initial
charges); streams ``groups_<family>`` hold per-group values every ``stride`` steps (also from step 0);
stream ``identities`` holds the checker's residuals every ``check_every`` steps. Nothing the monitor does
touches the model's RNG use, its BatchNorm statistics or its gradients.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from symtools.checkpoints import unwrap_model as _unwrap
from symtools.errors import SymtoolsError
from symtools.nn.groups import SymmetryMap
from symtools.numeric import optimizer_laws
from symtools.numeric import record_schema as schema
from symtools.numeric.flat import ACC
from symtools.numeric.monitor_laws import (
    LawAssignment,
    buffer_key,
    split_by_param_group,
)
from symtools.numeric.monitor_matrix import MatrixLaws
from symtools.numeric.monitor_plan import (
    LIVE_REDUCERS,
    FusedPlan,
    Site,
    charge_module,
    law_module,
)

QUANTITIES = schema.LAW_QUANTITIES

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
STATE_VERSION = 2


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str | None, str]:
    """(law name or None, reason): the closed law this optimizer follows (see :mod:`symtools.numeric.optimizer_laws`)."""
    name, reason = optimizer_laws.law_of_optimizer(optimizer)
    if name is not None and not optimizer_laws.closes(name):
        return None, reason or (f"no exact law closes for {type(optimizer).__name__}: its per-coordinate "
                                f"preconditioning breaks the gradient identity's cancellation (the breaking term is "
                                f"derived in docs/laws.md); recording measured charges only")
    return name, reason


class Monitor:
    """Training callback recording every group's charge against its laws (see the module docstring)."""

    def __init__(self, symmetries: SymmetryMap, *, stride: int = 10, check_every: int = 0, seed: int = 0,
                 families: tuple[str, ...] | None = None, name: str = "monitor", reducer: str | None = None):
        if stride < 1:
            raise SymtoolsError(f"stride must be at least 1, got {stride}")
        self.symmetries = symmetries
        self.stride, self.check_every, self.seed = stride, check_every, seed
        self.families = families
        self.name = name
        self.reducer = reducer
        self.kind: str | None = None
        self.sites: list[Site] = []
        self.worst: dict[str, float | None] = {"step": None, "accumulated": None, "continuous": None}
        self.worst_family: dict[str, dict[str, float | None]] = {}
        self.excluded_family: dict[str, int | None] = {}
        self.warnings: list[str] = []
        self._plan: FusedPlan | None = None
        self._theta_before: list[Tensor] | None = None  # live reducers: θ_n, for the step's displacement
        self._copy_rest: list[tuple[Tensor, Tensor]] = []  # (copy, parameter) that no compiled kernel copies
        self._pending: list[tuple[int, Tensor]] = []
        self._pending_groups: list[tuple[int, Tensor]] = []

    @property
    def law_sites(self) -> set[int]:
        """Indices of the sites whose law is followed (the others are measured only)."""
        return self._assign.law_sites if getattr(self, "_assign", None) is not None else set()

    # ------------------------------------------------------------------ set-up
    def on_start(self, ctx) -> None:
        model = _unwrap(ctx.model)
        self._params = dict(model.named_parameters())
        kind, reason = optimizer_kind(ctx.optimizer)
        self.kind = kind
        if kind is None:
            self._warn(f"measured-only mode: {reason}")
        self.sites, laws = [], {}
        for gs in self.symmetries.group_sets:
            if self.families and gs.family not in self.families:
                continue
            charge = charge_module(gs.family)
            if charge.CHARGE_DENSITY is None:
                continue
            if kind is not None and gs.family not in laws:
                laws[gs.family] = law_module(gs.family, kind)
                if laws[gs.family] is None:
                    self._warn(f"no law derived for {gs.family} under {kind}: measured-only for that family")
            parts = split_by_param_group(gs, ctx.optimizer, self._params, kind) if kind is not None else [gs]
            if len(parts) > 1:
                self._warn(f"{gs.family} at {gs.layer}: its tensors sit in param groups with different "
                           f"hyper-parameters; followed as {len(parts)} parts (one per param group: per-step and "
                           f"accumulated laws, no continuous theory)")
            for part in parts:
                self.sites.append(Site(len(self.sites), part, gs.family, part=len(parts) > 1))
        self._plan = FusedPlan(self.sites, laws, self._params, self.reducer) if self.sites else None
        self._assign = (LawAssignment(self.sites, self._plan, kind, ctx.optimizer, self._params, self._warn,
                                      EXCLUDE_SINGLE_ELEMENT) if self._plan is not None else None)
        self._acc: Tensor | None = None
        self._cont: Tensor | None = None
        self._open_streams(ctx)
        wanted = [ms for ms in self.symmetries.matrix_sets if not self.families or ms.family in self.families]
        self._matrix = MatrixLaws(wanted, ctx.optimizer, self._params, kind, self._warn, ctx.records)
        self._state_dir = Path(ctx.out_dir) / "monitor"
        if ctx.start_step:
            self._restore(ctx, ctx.start_step)
        elif not _rows(self._laws):  # a run resumed from its step-0 checkpoint has the row already
            self._record_initial(ctx)
        if self._assign is not None:  # the per-column constants exist from the start (also when resumed)
            self._assign.update(ctx.optimizer, ctx.start_step)

    def _open_streams(self, ctx) -> None:
        sites = [(s.family, s.index, s.gs.layer, s.gs.count) for s in self.sites]
        self._columns = schema.law_columns(sites)
        self._laws = ctx.records.stream(schema.LAWS_STREAM, self._columns,
                                        "per-layer sums of the charge: measured, per-step law, accumulated law, "
                                        "continuous theory; the max per-group relative residual of each (the "
                                        "continuous one over the groups not left out); the number of groups "
                                        "left out of the continuous one. Step 0: the initial charges",
                                        meta={"optimizer": self.kind,
                                              "families": sorted({s.family for s in self.sites}),
                                              "continuous_exclusion": EXCLUSION_RULE})
        self._groups = {}
        for fam in sorted({s.family for s in self.sites}):
            fsites = [x for x in sites if x[0] == fam]
            self._groups[fam] = ctx.records.stream(schema.groups_stream(fam), schema.group_columns(fsites),
                                                   f"per-group {fam} charges every {self.stride} steps",
                                                   meta=schema.groups_meta(fsites))
        if self.check_every:
            self._checks = ctx.records.stream(
                schema.IDENTITIES_STREAM, schema.identity_columns(sorted({s.family for s in self.sites})),
                "checker residuals on the live weights and the current batch")

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(f"symtools monitor: {msg}", stacklevel=3)

    # ------------------------------------------------------------------ per step
    def _before_sources(self, ctx) -> tuple[dict[str, Tensor], dict]:
        """(flat sources, live sources) of θ, g and the optimizer's buffer before the step."""
        src = self._plan.sources
        key = buffer_key(self.kind) if self.kind else None
        flat = src.flat if src is not None else {}
        state = ctx.optimizer.state
        grads = _OrZeros(self._params, lambda n: self._params[n].grad)
        buffers = _OrZeros(self._params, lambda n: state.get(self._params[n], {}).get(key) if key else None)
        if "theta" in flat:  # θ_n: the flat reducer's source, and the displacement's start
            src.fill("theta", self._params)
        if self._plan.reducer in LIVE_REDUCERS:
            live = {"": self._live_params(), "g_": grads, "b_": buffers}
            if self._plan.needs_displacement:  # θ_n in the parameters' dtype: Δθ = θ_{n+1} − θ_n after the step
                names = self._plan.flat_layout.names
                if self._theta_before is None:
                    self._theta_before = [torch.empty_like(self._params[n]) for n in names]
                    # the compiled reducer's kernels copy the tensors they read as they read them; the rest here
                    self._copy_rest = [(c, self._params[n]) for c, n in zip(self._theta_before, names)
                                       if n not in self._plan.copied_by_kernels]
                if self._copy_rest:
                    with torch.no_grad():
                        torch._foreach_copy_([c for c, _ in self._copy_rest], [p for _, p in self._copy_rest])
                live["p_"] = dict(zip(names, self._theta_before))
            return {}, live
        if "g" in flat:
            src.fill("g", {n: p.grad for n, p in self._params.items()})
        if "b" in flat:
            src.fill("b", {n: state.get(p, {}).get(key) if key else None for n, p in self._params.items()})
        return {k: v for k, v in flat.items() if k in ("theta", "g", "b")}, {}

    def _after_sources(self, initial: bool = False) -> tuple[dict[str, Tensor], dict]:
        """(flat sources, live sources) of θ after the step and its displacement d (0 before any step)."""
        plan, src = self._plan, self._plan.sources
        buffers = src.flat if src is not None else {}
        flat = {}
        live = {"": self._live_params()} if plan.reducer in LIVE_REDUCERS else {}
        if "theta_next" in buffers:
            src.fill("theta_next", self._params)
            flat["theta"] = buffers["theta_next"]
        if "d" in buffers:
            d = buffers["d"]
            flat["d"] = d.zero_() if initial else torch.sub(buffers["theta_next"], buffers["theta"], out=d)
        if plan.reducer == "compiled" and plan.needs_displacement:  # d = θ − θ_prev inside its kernels
            live["p_"] = live[""] if initial else dict(zip(plan.flat_layout.names, self._theta_before))
        elif plan.reducer == "sites" and plan.needs_displacement:
            names = plan.flat_layout.names
            with torch.no_grad():
                if initial:
                    moved = [torch.zeros_like(self._params[n]) for n in names]
                else:  # d = θ_{n+1} − θ_n, in place in the copy of θ_n (no allocation per step)
                    moved = self._theta_before
                    torch._foreach_sub_(moved, [self._params[n] for n in names])
                    torch._foreach_neg_(moved)
            live["d_"] = dict(zip(names, moved))
        return flat, live

    def _live_params(self) -> dict[str, Tensor]:
        """θ as the live reducers read it: the compiled one reads memory (no autograd), the sites one computes
        with torch, on detached tensors."""
        if self._plan.reducer == "compiled":
            return self._params
        return {n: p.detach() for n, p in self._params.items()}

    def _record_initial(self, ctx) -> None:
        """Row of step 0 in ``laws`` and ``groups_<family>``: the charges at the initial weights θ_0. The
        accumulated law and the continuous theory start there (their value is the measured one); the per-step
        law has made no prediction yet (NaN), and no residual exists (NaN)."""
        if self._plan is None:
            self._laws.append([0.0])
            return
        plan = self._plan
        after = plan.terms(plan.after, *self._after_sources(initial=True))
        measured = (plan.charge_select @ after)[0]
        self._assign.update(ctx.optimizer, ctx.step)
        nan = torch.full_like(measured, math.nan)
        values = torch.stack([measured, nan, measured * self._assign.law_nan, measured * self._assign.cont_nan])
        row = torch.cat([self._site_sums(values), torch.full((4, len(self.sites)), math.nan, dtype=ACC,
                                                             device=plan.device)])
        self._push(0, row, values, groups=True)
        self._flush()

    def before_step(self, ctx) -> None:
        if getattr(self, "_matrix", None) is not None:
            self._matrix.before(ctx.optimizer, self._params)
        if self._plan is None or self._plan.before is None:
            return
        plan = self._plan
        self._assign.update(ctx.optimizer, ctx.step)
        X = plan.terms(plan.before, *self._before_sources(ctx))      # (state + measured rows, K)
        ns = plan.bank.n_state
        measured = X[ns:]
        if self._acc is None:  # step 0 (on resume the accumulated state was restored)
            self._acc = X[:ns].clone()
            S = torch.tensor(plan.bank.start_matrix(), dtype=ACC, device=plan.device)
            self._cont = S @ X[:ns]
        inputs = torch.stack([X, torch.cat([self._acc, measured]), X.abs()])   # law, accumulated law, sizes
        out = self._assign.mix(torch.matmul(self._assign.A, inputs))                          # (3, out, K)
        self._acc = out[1].clone()  # not a view: the (3, out, K) result is not kept alive
        self._pred = torch.matmul(plan.q_select, out).squeeze_(1).mul_(self._assign.F3)  # Q: predicted, accumulated, size
        self._measured_before = measured

    def after_step(self, ctx) -> None:
        step = ctx.step
        if getattr(self, "_matrix", None) is not None:
            self._matrix.after(step, self._params)
        if self._plan is None:
            self._laws.append([float(step)])
            return
        plan = self._plan
        after = plan.terms(plan.after, *self._after_sources())
        mq = torch.mm(plan.charge_select, after)                          # (2, K): Q(θ_n), Σ|q(θ_n)|
        pred = getattr(self, "_pred", None)
        if pred is not None:
            scale = mq[1].add(pred[2]).clamp_min_(1e-300)
            if plan.bank.n_cont:
                pool = torch.cat([self._measured_before, after])
                xc = torch.cat([self._cont, pool.index_select(0, plan.cont_rows)])
                self._cont = self._assign.mix(torch.matmul(self._assign.C, xc))
                cont = torch.mm(plan.qc_select, self._cont).mul_(self._assign.Fc)
            else:
                cont = self._assign.nan_row.unsqueeze(0)
            values = torch.cat([mq[:1], pred[:2], cont])
        else:
            scale = mq[1].clamp_min(1e-300)
            values = torch.cat([mq[:1], self._assign.nan_row.expand(3, -1)])
        self._pred = None
        residual = (values[1:] - values[:1]).abs_().div_(scale)           # (3, K)
        drop = self._dropped(scale)
        maxima = self._site_max(residual, drop)
        excluded = torch.zeros((1, len(self.sites)), dtype=ACC, device=plan.device)
        excluded.index_add_(1, plan.site_id, drop.to(ACC).unsqueeze_(0)).add_(self._assign.site_nan)
        row = torch.cat([self._site_sums(values), maxima, excluded])
        groups = step % self.stride == 0 or step == ctx.steps
        self._push(step, row, values, groups=groups)
        config = getattr(ctx, "config", None)
        every = config.get("checkpoint_every") if isinstance(config, dict) else None
        if groups or (every and step % every == 0):
            self._flush()
        if self.check_every and step % self.check_every == 0:
            self._run_checks(ctx)

    def _dropped(self, scale: Tensor) -> Tensor:
        """Groups left out of the continuous residual (module docstring, :data:`CONTINUOUS_EXCLUDE_REL`): no
        continuous theory, one element, or a scale below the fraction of its family's largest."""
        plan = self._plan
        fam_max = torch.zeros(len(plan.layout.families), dtype=ACC, device=plan.device)
        fam_max.scatter_reduce_(0, plan.family_id, scale * self._assign.cont_weight, "amax")
        return torch.lt(scale, fam_max[plan.family_id].mul_(CONTINUOUS_EXCLUDE_REL)).logical_or_(self._assign.static_drop)

    def _site_sums(self, values: Tensor) -> Tensor:
        out = torch.zeros((values.shape[0], len(self.sites)), dtype=ACC, device=values.device)
        return out.index_add_(1, self._plan.site_id, values)

    def _site_max(self, residual: Tensor, drop: Tensor) -> Tensor:
        """Per site, the largest residual of each kind over its groups (the continuous one over the groups not
        dropped), NaN where none is a number."""
        r = torch.nan_to_num(residual, nan=-math.inf)
        r[2].masked_fill_(drop, -math.inf)
        out = torch.full((r.shape[0], len(self.sites)), -math.inf, dtype=ACC, device=r.device)
        out.scatter_reduce_(1, self._plan.site_id.expand_as(r), r, "amax")
        return out.nan_to_num_(neginf=math.nan)

    # ------------------------------------------------------------------ records (one host transfer per flush)
    def _push(self, step: int, row: Tensor, values: Tensor, groups: bool) -> None:
        """Keep the step's row (and per-group values) on the device until the next flush."""
        self._pending.append((step, row))
        self._last = (step, row)
        if groups:
            self._pending_groups.append((step, values))

    def _flush(self) -> None:
        """Hand the pending rows to the records: one device → host copy for all of them."""
        if not self._pending and not self._pending_groups:
            return
        rows = [r.T.reshape(-1) for _, r in self._pending]
        groups = [v.reshape(-1) for _, v in self._pending_groups]
        host = torch.cat(rows + groups).cpu().numpy() if rows or groups else np.zeros(0)
        pos = 0
        if rows:
            width = rows[0].numel()
            table = host[:width * len(rows)].reshape(len(rows), width)
            pos = table.size
            table = np.hstack([np.array([[float(s)] for s, _ in self._pending]), table])
            self._laws.append(table)
            self._track(table)
        K = self._plan.layout.columns
        for step, _ in self._pending_groups:
            values = host[pos:pos + 4 * K].reshape(4, K)
            pos += 4 * K
            for fam, stream in self._groups.items():
                cols = self._plan.layout.families[fam].cols
                stream.append(np.concatenate([[float(step)], values[:, cols].reshape(-1)]))
        self._pending, self._pending_groups = [], []

    def _track(self, table: np.ndarray) -> None:
        """Worst residuals so far (None while a quantity has no prediction), per family and overall."""
        fam, overall, excluded = schema.worst_residuals(self._columns, table, math.inf)
        for f, entry in fam.items():
            mine = self.worst_family.setdefault(f, {"step": None, "accumulated": None, "continuous": None})
            for k, v in entry.items():
                if v is not None:
                    mine[k] = v if mine[k] is None else max(mine[k], v)
        for k, v in overall.items():
            if v is not None:
                self.worst[k] = v if self.worst[k] is None else max(self.worst[k], v)
        for f, n in excluded.items():
            if n is not None:
                self.excluded_family[f] = max(self.excluded_family.get(f) or 0, n)

    def _run_checks(self, ctx) -> None:
        from symtools.numeric.checker import check

        x, y = ctx.batch
        model = _unwrap(ctx.model)
        sub = SymmetryMap([s.gs for s in self.sites], [])
        loss = getattr(ctx, "loss_fn", None) or "cross_entropy"  # the run's own loss
        report = check(model, x, y, sub, loss=loss, seed=self.seed + ctx.step, locate=False)
        row = [float(ctx.step)]
        for fam in sorted({s.family for s in self.sites}):
            f = report.families.get(fam)
            row += [f.gradient["max_rel_residual"], f.hessian["rel_residual"], float(f.passed)] if f else [math.nan] * 3
        self._checks.append(row)

    def rebase(self) -> None:
        """The weights were moved between steps by something other than the optimizer (a symmetry teleport):
        the accumulated law and the continuous theory restart from the charges measured before the next step
        (as at step 0). The per-step law needs nothing: it starts from measured values at every step."""
        self._acc = None
        self._cont = None

    # ------------------------------------------------------------------ persistence
    def on_checkpoint(self, ctx) -> None:
        self._flush()
        for stream in [self._laws, *self._groups.values()]:
            flush = getattr(stream, "flush", None)
            if callable(flush):
                flush()
        self._state_dir.mkdir(parents=True, exist_ok=True)
        state = {"acc": self._acc.cpu() if self._acc is not None else None,
                 "cont": self._cont.cpu() if self._cont is not None else None}
        tmp = self._state_dir / f".state_{ctx.step:06d}.pt"
        dropped = sorted(set(s.index for s in self.sites) - self.law_sites)
        torch.save({"version": STATE_VERSION, "step": ctx.step, "state": state, "worst": dict(self.worst),
                    "measured_only": dropped}, tmp)
        tmp.replace(self._state_dir / f"state_{ctx.step:06d}.pt")

    def _restore(self, ctx, step: int) -> None:
        path = self._state_dir / f"state_{step:06d}.pt"
        if not path.exists():
            raise SymtoolsError(f"cannot resume the monitor: {path} is missing")
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as exc:  # a torn or foreign file: one line, not a traceback
            raise SymtoolsError(f"cannot resume the monitor: {path} is not a readable monitor state ({exc})") from None
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
            raise SymtoolsError(f"cannot resume the monitor from {path}: it was written by another version of "
                                f"symtools (state version {saved.get('version') if isinstance(saved, dict) else '?'}, "
                                f"this one reads {STATE_VERSION})")
        if self._assign is not None:
            self._assign.drop(saved.get("measured_only", []))
        dev = self._plan.device if self._plan else torch.device("cpu")
        st = saved["state"]
        self._acc = st["acc"].to(dev) if st.get("acc") is not None else None
        self._cont = st["cont"].to(dev) if st.get("cont") is not None else None
        self.worst.update(saved.get("worst", {}))
        self._restore_worst(ctx, step)

    def _restore_worst(self, ctx, step: int) -> None:
        """The worst residuals per family (and overall), and the most groups left out of the continuous
        residual, from the ``laws`` rows of steps ≤ ``step`` (the records as they stood at the checkpoint):
        the resumed run's summary then covers the whole run, as an uninterrupted one's."""
        from symtools.numeric.records import read_stream

        directory = getattr(ctx.records, "directory", None)
        try:
            cols, rows = read_stream(directory, schema.LAWS_STREAM)
        except (SymtoolsError, OSError, TypeError):
            return  # no records to read (the saved overall worst stays)
        rows = rows[rows[:, 0] <= step]  # another rank may not have cut them back yet
        if not len(rows):
            return
        fam, overall, excluded = schema.worst_residuals(cols, rows, step)
        self.worst_family = {f: dict(v) for f, v in fam.items()}
        self.worst = dict(overall)
        self.excluded_family = {f: n for f, n in excluded.items() if n is not None}

    def latest(self) -> dict | None:
        """The last recorded step's figures, for a trainer's logger (one small device → host copy; None before
        any row): ``{"step": n, "law_residual": worst per-group residual of the per-step law over all sites
        (None where nothing is predicted: measured-only), "charges": {family: Σ of its measured charges}}``."""
        last = getattr(self, "_last", None)
        if last is None or self._plan is None:
            return None
        step, row = last
        host = row.detach().cpu().numpy()              # (8, sites): sums of the 4 quantities, 3 maxima, excluded
        residual = host[4][~np.isnan(host[4])]
        charges: dict[str, float] = {}
        for j, s in enumerate(self.sites):
            charges[s.family] = charges.get(s.family, 0.0) + float(host[0, j])
        return {"step": int(step), "law_residual": float(residual.max()) if residual.size else None,
                "charges": charges}

    def status(self) -> dict:
        out = {"law residual": self.worst["step"]}
        if self.excluded_family:
            out["cont. residual"] = self.worst["continuous"]
            out["cont. excluded"] = sum(n or 0 for n in self.excluded_family.values())
        return out

    def on_end(self, ctx) -> dict:
        self._flush()
        families = {}
        for f, w in self.worst_family.items():
            families[f] = {"groups": sum(s.gs.count for s in self.sites if s.family == f),
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
            "matrix_families": self._matrix.summary() if getattr(self, "_matrix", None) is not None else {},
            "monitor_warnings": self.warnings,
            "monitor_reducer": self._plan.reducer if self._plan is not None else None,
        }


class _OrZeros:
    """Read-only mapping name → ``get(name)``, or zeros shaped like the parameter where that is None; the
    zeros are made only for a name that is read."""

    def __init__(self, params: dict[str, Tensor], get):
        self._params, self._get = params, get

    def __contains__(self, name) -> bool:
        return name in self._params

    def __getitem__(self, name: str) -> Tensor:
        value = self._get(name)
        return value if value is not None else torch.zeros_like(self._params[name])


def _rows(stream) -> int:
    """Rows already in a record stream (0 for a stream that keeps none, e.g. on a rank that does not write)."""
    rows = getattr(stream, "rows", None)
    return rows() if callable(rows) else 0
