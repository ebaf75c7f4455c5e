"""Drive the training monitor from a trainer that is not :func:`symtools.training.train`.

A :class:`MonitorDriver` owns a :class:`~symtools.numeric.monitor.Monitor`, the run's
:class:`~symtools.numeric.records.RecordWriter` and the context object the monitor reads (the
:class:`symtools.training.TrainContext` fields it uses), and calls the monitor's ``before_step`` /
``after_step`` from hooks on the **torch optimizer itself**:

- ``register_step_pre_hook`` fires when ``optimizer.step()`` is entered. The trainers call it after backward,
  gradient accumulation, AMP unscaling and clipping (Hugging Face Trainer; Lightning with a mixed-precision
  plugin), with the param groups' learning rates set by the schedulers for this very step. Lightning's
  default precision passes a *closure* to ``optimizer.step(closure)`` that runs forward, backward and clipping
  inside the optimizer's step; there the hook replaces the closure by one that calls it and then measures,
  so the monitor still reads the gradients the optimizer applies. (Lightning's ``on_before_optimizer_step``
  runs before its clipping: the wrong place.)
- ``register_step_post_hook`` fires after the update (θ_{n+1}), before the trainers step their schedulers.
- A step that a GradScaler skips (inf/NaN in the scaled gradients) never enters ``optimizer.step()``: neither
  hook fires, parameters and optimizer state are unchanged, and no law is advanced. The trainer still counts
  the step; :meth:`MonitorDriver.sync` (called by the integration once the trainer's step counter has moved)
  finds it and writes ``applied = 0`` for it in stream ``optimizer_steps`` (one row per optimizer step of the
  trainer: 1 applied, 0 skipped). The monitor's ``laws`` stream has no row for a skipped step.

Step numbers are the trainer's own (Lightning's ``global_step``, the Trainer's ``state.global_step``): row *n*
describes the update that took the trainer's counter from *n* − 1 to *n*, as in ``symtools.training``.

For an optimizer whose law does not close (AdamW, Adam, RMSprop, Adagrad) the monitor records measured charges
only; the driver adds stream ``breaking``: per site the breaking term U1 = ⟨u, v⟩ of the generated law
(u the update direction the optimizer applied: θ' = decay·θ − η·u, measured from θ before and after the
step), and the largest per-group residual of the law fed the measured U1 (and U2) — which closes to round-off —
and of the same law with U1 = 0, i.e. as if the symmetry's cancellation held (``residual_without_breaking``:
how far the law is broken, relative to the charge's size).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from symtools.errors import SymtoolsError
from symtools.nn.groups import SymmetryMap
from symtools.numeric import optimizer_laws
from symtools.numeric.monitor import Monitor
from symtools.numeric.records import RecordWriter

STATE_FORMAT = "symtools-monitor-state"
STEPS_STREAM = "optimizer_steps"
BREAKING_STREAM = "breaking"
BREAKING_QUANTITIES = ("breaking", "residual_with_breaking", "residual_without_breaking")


@dataclass
class DriverContext:
    """The fields of :class:`symtools.training.TrainContext` the monitor reads, kept by the driver."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    records: Any
    out_dir: Path
    steps: int
    start_step: int = 0
    step: int = 0
    scheduler: Any = None
    config: dict = field(default_factory=dict)
    batch: Any = None
    loss: Any = None
    logits: Any = None
    loss_fn: Any = None
    state: str = "running"
    rank: int = 0
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer under a trainer's wrapper (Lightning's ``LightningOptimizer._optimizer``,
    accelerate's ``AcceleratedOptimizer.optimizer``); the object itself when it is one."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.optim") and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SymtoolsError(f"{type(optimizer).__qualname__} is not a torch.optim.Optimizer: the symmetry monitor "
                            f"hooks the torch optimizer's step")
    return optimizer


class MonitorDriver:
    """One monitored run: ``start`` (after the optimizer exists, before its first step; resumed or not), the
    optimizer hooks, ``sync`` after each trainer step, ``checkpoint`` (returns the state to store in the
    trainer's checkpoint), ``scalars`` (for the trainer's logger) and ``end``. Only rank 0 monitors."""

    def __init__(self, symmetries: SymmetryMap, out_dir: str | Path, *, stride: int = 10,
                 families: tuple[str, ...] | None = None, reducer: str | None = None):
        if not isinstance(symmetries, SymmetryMap):
            raise SymtoolsError(f"symmetries must be a symtools SymmetryMap (from find_symmetries or built with "
                                f"symtools.nn.graph.bind), got {type(symmetries).__name__}")
        self.monitor = Monitor(symmetries, stride=stride, check_every=0, families=families, reducer=reducer)
        self.out_dir = Path(out_dir)
        self.ctx: DriverContext | None = None
        self.completed = 0           # the trainer's count of optimizer steps, as last synced
        self._applied: set[int] = set()
        self._handles: list = []
        self._breaking: _Breaking | None = None
        self._pending: int | None = None  # the step measured before the update, until the post-hook
        self.summary: dict | None = None

    # ------------------------------------------------------------------ set-up
    def start(self, model: torch.nn.Module, optimizer: Any, *, start_step: int, steps: int,
              saved: dict | None = None) -> None:
        """Open the records (cut back to ``start_step``, emptied for a new run), restore the monitor from
        ``saved`` (what :meth:`checkpoint` returned, kept in the trainer's checkpoint) when resuming, run the
        monitor's ``on_start`` and hook the torch optimizer."""
        opt = torch_optimizer(optimizer)
        names = dict(model.named_parameters())
        missing = next((p for gs in self.monitor.symmetries.group_sets for p in gs.params() if p not in names), None)
        if missing is not None:
            raise SymtoolsError(f"the symmetries name a parameter {missing!r} that {type(model).__name__} does not have "
                                f"(it has e.g. {next(iter(names), '-')!r}): bind them on the module that is trained, "
                                f"or name the submodule they were bound on (module=…)")
        records = RecordWriter(self.out_dir / "records")
        try:
            if start_step:
                if saved is not None:
                    self._write_saved(saved, start_step)
                records.truncate_to_step(start_step)
            else:
                records.truncate_to_step(-math.inf)
            self.ctx = DriverContext(model=model, optimizer=opt, records=records, out_dir=self.out_dir,
                                     steps=int(steps), start_step=int(start_step), step=int(start_step))
            self.completed = int(start_step)
            self._steps = records.stream(STEPS_STREAM, ["step", "applied"],
                                         "one row per optimizer step of the trainer: applied = 1 when "
                                         "optimizer.step() ran, 0 when it was skipped (a GradScaler found inf/NaN "
                                         "gradients: parameters and optimizer state unchanged, no law advanced, no "
                                         "laws row)")
            self.monitor.on_start(self.ctx)
            self._breaking = _Breaking.make(self.monitor, opt, records, names)
        except BaseException:
            records.close()
            raise
        self._handles = [opt.register_step_pre_hook(self._pre_hook), opt.register_step_post_hook(self._post_hook)]

    def _write_saved(self, saved: dict, step: int) -> None:
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT or "state" not in saved:
            raise SymtoolsError("cannot resume the symmetry monitor: the checkpoint's monitor entry is not a "
                                f"{STATE_FORMAT} (was it written by another tool?)")
        if int(saved.get("step", -1)) != step:
            raise SymtoolsError(f"cannot resume the symmetry monitor: the checkpoint is of step {step} but its "
                                f"monitor state is of step {saved.get('step')}")
        folder = self.out_dir / "monitor"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".state_{step:06d}.pt"
        torch.save(saved["state"], tmp)
        tmp.replace(folder / f"state_{step:06d}.pt")

    # ------------------------------------------------------------------ the optimizer's hooks
    def _pre_hook(self, optimizer, args, kwargs):
        # torch passes the step's own args: (optimizer, closure?) and kwargs
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._before()
            return None

        def measured_closure():  # the trainer's closure (forward, backward, clipping), then the monitor
            result = closure()
            self._before()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measured_closure}
        return (args[0], measured_closure, *args[2:]), kwargs

    def _before(self) -> None:
        ctx = self.ctx
        ctx.step = self.completed + 1
        with torch.no_grad():
            self.monitor.before_step(ctx)
            if self._breaking is not None:
                self._breaking.before(ctx.optimizer)
        self._pending = ctx.step

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if self._pending is None:  # the closure never ran (e.g. the trainer skipped backward)
            return
        ctx = self.ctx
        with torch.no_grad():
            self.monitor.after_step(ctx)
            if self._breaking is not None:
                self._breaking.after(ctx.step)
        self._applied.add(ctx.step)
        self._pending = None

    # ------------------------------------------------------------------ trainer events
    def sync(self, completed: int) -> list[int]:
        """The trainer has now completed ``completed`` optimizer steps: write their ``optimizer_steps`` rows;
        hands on the steps that were skipped (no hook fired)."""
        skipped = []
        for s in range(self.completed + 1, int(completed) + 1):
            applied = s in self._applied
            self._steps.append([float(s), 1.0 if applied else 0.0])
            if not applied:
                skipped.append(s)
            self._applied.discard(s)
        self.completed = max(self.completed, int(completed))
        return skipped

    def checkpoint(self, step: int) -> dict:
        """Flush the records and write the monitor's state of ``step`` (``out_dir/monitor/state_NNNNNN.pt``);
        hands on that state as a plain dict (tensors, numbers, lists) for the trainer's checkpoint."""
        self.sync(step)
        ctx = self.ctx
        ctx.step = step
        self.monitor.on_checkpoint(ctx)
        ctx.records.flush(fsync=True)
        path = self.out_dir / "monitor" / f"state_{step:06d}.pt"
        return {"format": STATE_FORMAT, "step": int(step), "state": torch.load(path, weights_only=True)}

    def scalars(self, prefix: str = "symtools/") -> dict[str, float]:
        """The last recorded step's worst per-step law residual and per-family charges, for a logger."""
        latest = self.monitor.latest()
        out: dict[str, float] = {}
        if latest is None:
            return out
        if latest["law_residual"] is not None:
            out[f"{prefix}law_residual"] = latest["law_residual"]
        for fam, q in latest["charges"].items():
            out[f"{prefix}charge/{fam}"] = q
        if self._breaking is not None and self._breaking.last is not None:
            out[f"{prefix}breaking_residual"] = self._breaking.last
        return out

    def end(self, state: str = "completed") -> dict:
        """Remove the hooks, close the records; hands on the monitor's summary (also ``out_dir/summary.json``)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.ctx is None:
            return {}
        ctx = self.ctx
        ctx.state = state
        try:
            summary = {"status": state, "steps": self.completed, **(self.monitor.on_end(ctx) or {})}
            if self._breaking is not None:
                summary["max_rel_residual_with_breaking"] = self._breaking.worst
            ctx.records.flush(fsync=True)
            summary["records"] = sorted(ctx.records.streams)
        finally:
            ctx.records.close()
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str, allow_nan=True) + "\n", encoding="utf-8")
        tmp.replace(self.out_dir / "summary.json")
        self.summary = summary
        self.ctx = None
        return summary


def warn_no_symmetries(what: str, detail: str = "") -> None:
    warnings.warn(f"symtools monitor: found no symmetry groups in {what}{': ' + detail if detail else ''}; "
                  f"nothing is monitored. Pass symmetries=… (a SymmetryMap: symtools.nn.graph.find_symmetries, or "
                  f"your own groups bound with symtools.nn.graph.bind)", stacklevel=3)


def find_or_warn(model: torch.nn.Module, example_input, what: str) -> SymmetryMap:
    """``find_symmetries(model, example_input)``, or an empty map and a warning (not a traceback) when the
    graph walk cannot trace the model or finds nothing."""
    from symtools.nn.graph import find_symmetries

    try:
        found = find_symmetries(model, example_input)
    except Exception as exc:  # fx cannot trace every model (e.g. transformers'): say so in one line
        warn_no_symmetries(what, f"the graph walk could not trace it ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})")
        return SymmetryMap()
    if not found.group_sets:
        warn_no_symmetries(what, "the graph walk found none")
    return found


class _Breaking:
    """Stream ``breaking`` for a law that does not close (module docstring): per site and step the breaking term
    U1 = ⟨u, v⟩ summed over its groups, and the largest per-group residual of the generated law fed the
    measured U1 (and U2) and fed U1 = 0. The residual's scale per group is Σ|q(θ_n)| + Σ_terms |the law applied to
    that term alone| (as the monitor's). Evaluated with the generated densities, θ and u in float64."""

    def __init__(self, name: str, sites: list, laws: dict, records, params: dict):
        self.name, self.sites, self.laws, self.params = name, sites, laws, params
        self.names = list(dict.fromkeys(p for s in sites for p in s.gs.params()))
        cols = ["step"] + [f"{s.family}|{s.index}|{s.gs.layer}|{q}" for s in sites for q in BREAKING_QUANTITIES]
        self.stream = records.stream(BREAKING_STREAM, cols,
                                     f"per site: Σ over groups of the breaking term U1 = <u, v> of the {name} law "
                                     f"(u: the applied update direction, θ' = decay·θ − η·u); the largest per-group "
                                     f"relative residual of the law fed the measured U1 (and U2), and with U1 = 0",
                                     meta={"optimizer": name})
        self.last: float | None = None
        self.worst: float | None = None
        self._before: dict | None = None

    @classmethod
    def make(cls, monitor: Monitor, optimizer, records, params: dict) -> _Breaking | None:
        from symtools.numeric.monitor_plan import law_module

        name, _ = optimizer_laws.law_of_optimizer(optimizer)
        if name is None or optimizer_laws.closes(name) or not monitor.sites:
            return None
        laws = {}
        for s in monitor.sites:
            if s.family not in laws:
                laws[s.family] = law_module(s.family, name)
        sites = [s for s in monitor.sites if laws.get(s.family) is not None and "U1" in laws[s.family].DENSITY]
        if not sites:
            return None
        return cls(name, sites, laws, records, params)

    def before(self, optimizer) -> None:
        where = {id(p): pg for pg in optimizer.param_groups for p in pg["params"]}
        theta = {n: self.params[n].detach().to(torch.float64, copy=True) for n in self.names}
        hyper = {}
        for n in self.names:
            pg = where.get(id(self.params[n]))
            if pg is None:
                hyper[n] = None
                continue
            h = optimizer_laws.hyper_of_group(pg, self.name)
            first = any(not optimizer.state.get(p) for p in pg["params"] if p.grad is not None)
            hyper[n] = (h["lr"], h["weight_decay"], optimizer_laws.decay(self.name, h), first)
        self._before = {"theta": theta, "hyper": hyper}

    def after(self, step: int) -> None:
        from symtools.numeric.groupops import ViewCache, reduce_terms

        if self._before is None:
            return
        theta, hyper = self._before["theta"], self._before["hyper"]
        self._before = None
        after = {n: self.params[n].detach().to(torch.float64) for n in self.names}
        u = {}
        for n in self.names:
            h = hyper[n]
            u[n] = (h[2] * theta[n] - after[n]) / h[0] if h is not None and h[0] else torch.zeros_like(theta[n])
        cache_before = ViewCache({"": theta, "u_": u})
        cache_after = ViewCache({"": after})
        row = [float(step)]
        worst = None
        for s in self.sites:
            law = self.laws[s.family]
            hs = {hyper[p] for p in s.gs.params()}
            if len(hs) != 1 or None in hs:
                row += [math.nan] * len(BREAKING_QUANTITIES)
                continue
            lr, wd, _, first = hs.pop()
            measured_names = law.FIRST_MEASURED if first else law.MEASURED
            terms = {k: (law.DENSITY[k], law.ARGS[k]) for k in ("Q", *measured_names)}
            tot, size = reduce_terms(terms, s.gs, cache_before, sized=terms)
            q_after, q_size = reduce_terms({"Q": (law.DENSITY["Q"], law.ARGS["Q"])}, s.gs, cache_after, sized={"Q"})
            advance = law.first_step if first else law.step
            measured = {k: tot[k] for k in measured_names}
            pred = advance({"Q": tot["Q"]}, measured, lr, wd)["Q"]
            closed = advance({"Q": tot["Q"]}, {**measured, "U1": torch.zeros_like(tot["U1"])}, lr, wd)["Q"]
            zero = torch.zeros_like(tot["Q"])
            scale = q_size["Q"].clone()  # Σ|q(θ_n)| + each term of the law alone, in absolute value
            for k in ("Q", *measured_names):
                alone = {j: (size[k] if j == k else zero) for j in ("Q", *measured_names)}
                scale += advance({"Q": alone["Q"]}, {j: alone[j] for j in measured_names}, lr, wd)["Q"].abs()
            scale = scale.clamp_min(1e-300)
            r_with = float(((q_after["Q"] - pred).abs() / scale).max())
            r_without = float(((q_after["Q"] - closed).abs() / scale).max())
            row += [float(tot["U1"].sum()), r_with, r_without]
            worst = r_with if worst is None else max(worst, r_with)
        self.stream.append(np.asarray(row, dtype=np.float64))
        if worst is not None:
            self.last = worst
            self.worst = worst if self.worst is None else max(self.worst, worst)
