"""Compare a checkpoint's charges with their initial values and with what the optimizer's laws predict.

Three comparisons, each per group (then summarised per layer):

* **vs init** — ΔQ_k = Q_k(θ_T) − Q_k(θ_0): plain differences, no judgement.
* **vs a law from init** — the per-step laws of :mod:`symtools.symbolic.laws`, emitted as
  ``symtools.codegen.generated.law_<family>_<optimizer>``, write the state after a step (the charge Q and,
  under momentum, the buffer's charge R …) as a linear map of the state before it plus *measured* drives
  (M1 = ⟨g, v⟩, G = ½gᵀSg, U1 = ⟨u, v⟩ …). When every drive of a law has a theoretical value (M1 = 0 by the
  gradient identity), the law is closed: the state at step T follows from the state at step 0 alone, e.g. for
  translation groups under SGD with weight decay s_T = Π_t(1 − η_tλ)·s_0, and under heavy-ball momentum the
  2×2 recurrence of (s, ⟨b, 1⟩). :func:`predicted_charges` builds that map from the generated ``first_step`` /
  ``step`` functions (applied to basis states, so no formula is copied here) and flags groups whose charge is
  further from the prediction than float round-off allows (``kind="exact"``).
  For an Adam-type optimizer the drive U1 = ⟨u, v⟩ has no theoretical value (preconditioning breaks the
  symmetry at first order); the same map with U1 = 0 is the *reference* of a conserved charge, and the
  distance to it is the accumulated breaking η·ΣU1 (``kind="reference"``; beyond round-off it is flagged).
  Under plain SGD the scale charge has the drive G = Σg² ≥ 0, so Q_T ≥ Π(1 − η_tλ)²·Q_0 up to the ε term
  (``kind="lower_bound"``, flagged when violated). Rescale imbalances (G indefinite) need the run's records.
* **vs the run's records** — the charges a training monitor recorded (:class:`symtools.audit.records.RecordedRun`):
  the recorded Q at step T (``kind="recorded"``), or Q at the init step propagated with the recorded drives
  (``kind="records+law"``). Without such records: "no prediction available", said so.

Tolerances (float round-off, stated per group; ``SAFETY`` = 10):

    exact, reference:  tol = SAFETY·[ε_w·T·(max(‖d(θ_0)‖₁, ‖d(θ_T)‖₁) + ‖d(θ_T) − d(θ_0)‖₁) + Σ_t η_t·m]
    lower bound:       same, with m the measured |⟨g, v⟩| including BatchNorm's ε term, counted twice
    recorded:          tol = SAFETY·ε_w·‖d(θ_T)‖₁

ε_w is the machine epsilon of the weights' dtype (float32 for a float32 checkpoint), d the charge density of
the quantity (θ itself for a translation sum), so the first term bounds the rounding of T element updates;
m = max(|M1(θ_0)|, |M1(θ_T)|) is the round-off of the gradient identity measured on the audit batch in the
weights' dtype, which enters every step as η·M1.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Callable, Mapping, Sequence

import numpy as np
import sympy as sp
import torch
from torch import Tensor

from symtools.codegen.emit_facts import linear_in
from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet
from symtools.numeric import groupops
from symtools.numeric.groupops import group_view
from symtools.numeric.law_matrices import apply_to_basis
from symtools.numeric.optimizer_laws import (CHOICES, closes, declaration, hyper_of_group, identify_class,
                                             law_of_group, law_of_state_dict, state_entries)
from symtools.symbolic.optimizers import DECLARATIONS, GRAD, STATE_SYMBOLS, THETA

__all__ = ["SAFETY", "Hyper", "Snapshot", "Prediction", "hyper_from_optimizer", "law_module", "measure",
           "predicted_charges", "transfer_matrix", "compare_prediction", "vs_init", "OPTIMIZERS", "same_density",
           "linear_states", "gradient_states", "buffer_entries"]

SAFETY = 10.0
OPTIMIZERS = CHOICES  # every declared optimizer law (symtools.symbolic.optimizers)
#: the laws that do not close (preconditioned updates: Adam, AdamW, RMSprop, Adagrad): their breaking drive U1 has
#: no theoretical value, so from init they give a reference, not a prediction
ADAM_FAMILY = tuple(n for n in CHOICES if not closes(n))
#: the hyper-parameters a :class:`Hyper` carries (the arguments of the generated laws' ``step``)
HYPER_FIELDS = ("lr", "weight_decay", "momentum", "dampening")
_LAW_BUFFER = "b"  # the optimizer-state kind the law modules read (as b_<slot>: STATE_SYMBOLS["b"])
_ARG_SOURCES = {"g_": "grads", STATE_SYMBOLS[_LAW_BUFFER][1]: "buffers", "u_": "updates", "d_": "updates"}


# ----------------------------------------------------------------------------------------------------------
# what the audit knows about one set of weights


@dataclass
class Snapshot:
    """Weights at one step as the comparisons see them.

    ``params``: float64 CPU copies by parameter name. ``buffers``: per-parameter optimizer state tensors by
    torch state entry (:func:`buffer_entries`: ``{"momentum_buffer": {name: T}, "exp_avg": {…}}``), float64.
    ``grads``: a gradient on the audit batch in the weights' own dtype (for the round-off of the gradient
    identity), or None.
    """

    step: int | None
    params: dict[str, Tensor]
    group_sets: list[GroupSet]
    buffers: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    grads: dict[str, Tensor] | None = None
    dtype: torch.dtype = torch.float32
    label: str = ""
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def eps(self) -> float:
        return float(torch.finfo(self.dtype).eps)

    @property
    def g_rms(self) -> float:
        """RMS entry of ``grads`` (computed once)."""
        if "g_rms" not in self.cache:
            total = sum(float(g.to(torch.float64).pow(2).sum()) for g in (self.grads or {}).values())
            count = sum(g.numel() for g in (self.grads or {}).values())
            self.cache["g_rms"] = math.sqrt(total / max(count, 1))
        return self.cache["g_rms"]


@dataclass
class Hyper:
    """The training hypothesis: optimizer, lr (or one lr per update), weight decay, momentum, steps.

    ``lr_schedule``: lr of param group 0 for updates ``start+1 … start+steps`` (from the run's ``train``
    records); otherwise ``lr`` every step. ``param_hyper``: per-parameter ``{"lr", "weight_decay", …}`` when the
    optimizer's param groups differ; a parameter's lr then follows the schedule scaled by its group's ratio.
    """

    optimizer: str = "sgd"
    lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    steps: int | None = None
    lr_schedule: list[float] | None = None
    param_hyper: dict[str, dict] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SymtoolsError(f"unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        for name in ("lr", "weight_decay", "momentum", "dampening"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SymtoolsError(f"{name} must be a finite number ≥ 0, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise SymtoolsError(f"steps must be a whole number ≥ 0, got {self.steps!r}")

    def for_params(self, names: Sequence[str]) -> tuple[dict, str]:
        """``({"lr": [η_1 … η_T], "weight_decay": λ, "momentum": μ, "dampening": τ}, "")`` for a group set, or
        ``({}, why not)`` when its tensors sit in param groups with different hyperparameters."""
        steps = self.steps or 0
        base = {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum,
                "dampening": self.dampening}
        if self.param_hyper:
            other = sorted({self.param_hyper.get(n, {}).get("law", self.optimizer) for n in names} - {self.optimizer})
            if other:
                return {}, (f"its tensors are in an optimizer param group that follows the {other[0]} law, not "
                            f"{self.optimizer}")
            found = {tuple(sorted((k, float(v)) for k, v in self.param_hyper.get(n, base).items() if k != "law"))
                     for n in names}
            if len(found) > 1:
                return {}, f"its tensors {list(names)} are in optimizer param groups with different hyperparameters"
            base = dict(next(iter(found))) if found else base
        if self.lr_schedule is not None:
            ratio = base["lr"] / self.lr if self.lr else 1.0
            lrs = [ratio * float(v) for v in self.lr_schedule]
        else:
            lrs = [float(base["lr"])] * steps
        return {"lr": lrs, "weight_decay": float(base["weight_decay"]), "momentum": float(base.get("momentum", 0.0)),
                "dampening": float(base.get("dampening", 0.0))}, ""

    def describe(self) -> dict:
        out = {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay,
               "momentum": self.momentum, "dampening": self.dampening, "steps": self.steps, "source": self.source,
               "lr_schedule": None if self.lr_schedule is None else
               {"steps": len(self.lr_schedule), "min": min(self.lr_schedule, default=math.nan),
                "max": max(self.lr_schedule, default=math.nan)},
               "param_groups_differ": bool(self.param_hyper), "notes": list(self.notes)}
        return out


def hyper_from_optimizer(optimizer: Mapping, names: Sequence[str], optimizer_class: str | None = None,
                         steps: int | None = None, source: str = "") -> Hyper:
    """A :class:`Hyper` from a ``torch.optim`` state_dict (its param groups) and the optimizer's class name.

    The law comes from :func:`symtools.numeric.optimizer_laws.law_of_state_dict`: the rules the training monitor
    applies, read off the optimizer declarations (SGD → ``sgd`` / ``momentum`` / ``nesterov`` by its
    ``momentum`` and ``nesterov`` entries; Adam → ``adam``, or ``adamw`` with ``decoupled_weight_decay``; …;
    without the class name the class is recognised from the group entries). Raises where no law applies
    (``maximize=True``, groups mixing plain SGD and momentum, an undeclared optimizer …). Param groups that
    differ give per-parameter hyper-parameters; a group following another law than the first group's (heavy
    ball and Nesterov) marks its parameters, whose predictions then say so.
    """
    groups = list(optimizer.get("param_groups") or [])
    where = source or "the optimizer state"
    if not groups:
        raise SymtoolsError(f"{where} has no param_groups to read hyperparameters from")
    kind, why = law_of_state_dict(optimizer, optimizer_class)
    if kind is None:
        raise SymtoolsError(f"{where}: {why}; give --lr/--wd/--momentum to state the hypothesis instead")
    cls = optimizer_class or identify_class(groups)
    per: dict[str, dict] = {}
    if len(groups) > 1:
        for g in groups:
            own = law_of_group(g, cls) or kind
            values = hyper_of_group(g, own)
            h: dict = {k: values[k] for k in HYPER_FIELDS}
            if own != kind:
                h["law"] = own
            for i in g.get("params", []):
                if 0 <= int(i) < len(names):
                    per[names[int(i)]] = h
    h0 = hyper_of_group(groups[0], kind)
    hyper = Hyper(optimizer=kind, steps=steps, param_hyper=per or None, source=source,
                  **{k: h0[k] for k in HYPER_FIELDS})
    rest = [n for n in declaration(kind).python_names if n not in HYPER_FIELDS and n in h0]
    if rest:
        hyper.notes.append(", ".join(f"{n} {h0[n]:g}" for n in rest) + f" (the {kind} law reads the applied update, "
                           "not these)")
    return hyper


# ----------------------------------------------------------------------------------------------------------
# generated laws


def law_module(family: str, optimizer: str) -> ModuleType | None:
    """``symtools.codegen.generated.law_<family>_<optimizer>``, or None when none was emitted."""
    try:
        return importlib.import_module(f"symtools.codegen.generated.law_{family}_{optimizer}")
    except ModuleNotFoundError:
        return None


def measure(law: ModuleType, quantity: str, gs: GroupSet, params: Mapping[str, Tensor],
            grads: Mapping[str, Tensor] | None = None, buffers: Mapping[str, Tensor] | None = None,
            *, absolute: bool = False, minus: Mapping[str, Tensor] | None = None, with_size: bool = False):
    """Per-group Σ of the law's density of ``quantity`` (float64); None when an argument is unavailable.

    Argument names in ``law.ARGS``: a slot name → the parameter view; ``g_<slot>`` → ``grads``; ``b_<slot>`` →
    ``buffers``. ``absolute``: Σ|density|. ``minus``: Σ|density(params) − density(minus)| (elementwise change,
    ``minus`` being other parameters with the same names; needs ``absolute``). ``with_size``: return
    ``(Σ density, Σ|density|)`` from one pass.
    """
    densities = law.DENSITY.get(quantity)
    if densities is None:
        return None
    sources = {"grads": grads, "buffers": buffers}
    total = torch.zeros(gs.count, dtype=torch.float64)
    size = torch.zeros(gs.count, dtype=torch.float64) if with_size else None
    for slot, tensors in gs.slots.items():
        fn = densities.get(slot)
        if fn is None:
            continue
        for i, _ in enumerate(tensors):
            def args_from(base: Mapping[str, Tensor]) -> list[Tensor] | None:
                out = []
                for name in law.ARGS[quantity][slot]:
                    prefix = name[:2]
                    if prefix in _ARG_SOURCES:
                        src = sources.get(_ARG_SOURCES[prefix])
                        other = name[2:]
                    else:
                        src, other = base, name
                    ts = gs.slots[other][i]
                    if src is None or ts.param not in src:
                        return None
                    out.append(group_view(src[ts.param], ts).to(torch.float64).cpu())
                return out
            a = args_from(params)
            if a is None:
                return (None, None) if with_size else None
            val = fn(*a)
            if with_size:
                size += val.abs().sum(dim=1)
            if minus is not None:
                b = args_from(minus)
                if b is None:
                    return None
                val = val - fn(*b)
            total += (val.abs() if absolute else val).sum(dim=1)
    return (total, size) if with_size else total


def transfer_matrix(law: ModuleType, lrs: Sequence[float], weight_decay: float, momentum: float = 0.0,
                    dampening: float = 0.0, from_step_zero: bool = True) -> tuple[np.ndarray, tuple, tuple]:
    """The linear map of a law with every measured drive set to 0, over the updates with learning rates ``lrs``.

    Returns ``(M, inputs, outputs)``: state_T[outputs] = M @ state_0[inputs]. With ``from_step_zero`` the first
    update uses the law's ``first_step`` (torch's first step: the momentum buffer starts as d), whose input is
    ``FIRST_STATE``; otherwise every update uses ``step`` on ``STATE``. Each one-step matrix is the generated
    function applied to the unit vectors (:func:`symtools.numeric.law_matrices.apply_to_basis`, as the monitor's
    law bank does), which is the map itself because code generation certified the law linear (``LINEAR``):
    nothing is re-derived or sampled. SymtoolsError for a law without that certificate.
    """
    if getattr(law, "LINEAR", None) is not True:
        raise SymtoolsError(_not_linear(law))
    zero = {m: 0.0 for m in set(law.MEASURED) | set(law.FIRST_MEASURED)}

    def one(fn: Callable, names_in: tuple, lr: float) -> np.ndarray:
        return apply_to_basis(lambda st, *h: fn(st, zero, *h), [names_in], state, lr, weight_decay, momentum,
                              dampening)

    state, first = tuple(law.STATE), tuple(law.FIRST_STATE)
    lrs = list(lrs)
    if not lrs:
        names = first if from_step_zero else state
        return np.eye(len(names)), names, names
    cache: dict[float, np.ndarray] = {}
    if from_step_zero:
        m = one(law.first_step, first, lrs[0])
        inputs, rest = first, lrs[1:]
    else:
        m = np.eye(len(state))
        inputs, rest = state, lrs
    if rest and all(v == rest[0] for v in rest):
        a = one(law.step, state, rest[0])
        return np.linalg.matrix_power(a, len(rest)) @ m, inputs, state
    for lr in rest:
        a = cache.get(lr)
        if a is None:
            a = cache[lr] = one(law.step, state, lr)
        m = a @ m
    return m, inputs, state


def _not_linear(law: ModuleType) -> str:
    name = law.__name__.rsplit(".", 1)[-1]
    return (f"{name} is not certified linear (its LINEAR is {getattr(law, 'LINEAR', 'missing')}): its updates cannot "
            f"be applied as a matrix from init (regenerate it with `python -m symtools.codegen.regenerate`)")


# ----------------------------------------------------------------------------------------------------------
# what the declarations say about an optimizer's state


def _states_linear_in(optimizer: str, with_theta: bool) -> dict[str, str]:
    decl = declaration(optimizer)
    out = {}
    for kind, entry in decl.state.items():
        variables = {GRAD, STATE_SYMBOLS[kind][0]} | ({THETA} if with_theta else set())
        rules = [r.state[kind] for r in (decl.first, decl.rule) if kind in r.state]
        if rules and all(linear_in(sp.expand(e), variables, decl.hyper) for e in rules):
            out[kind] = entry
    return out


@lru_cache(maxsize=None)
def linear_states(optimizer: str) -> dict[str, str]:
    """State kind → torch optimizer-state entry of the states of law ``optimizer`` that are running linear
    combinations of the element's gradients and weights: every update rule of the state (first step and later)
    is linear without a constant term in g, θ and the state itself, with coefficients set by the hyper-parameters
    (SGD's momentum buffer, Adam's first moment; not a second-moment accumulator of d²). Their projection ⟨·, v⟩
    on a generator is the per-group quantity the audit reports. Decided on the declarations' SymPy rules."""
    return _states_linear_in(optimizer, with_theta=True)


@lru_cache(maxsize=None)
def gradient_states(optimizer: str) -> dict[str, str]:
    """The :func:`linear_states` of law ``optimizer`` that are linear in the gradients and themselves alone (no θ:
    AdamW's first moment, whose weight decay is decoupled). Where ⟨g, v⟩ = 0 at every step (a constant generator)
    and the state starts at 0, ⟨state, v⟩ = 0."""
    return _states_linear_in(optimizer, with_theta=False)


def buffer_entries() -> tuple[str, ...]:
    """The torch optimizer-state entries the audit reads: every declared law's :func:`linear_states`, in
    declaration order (``momentum_buffer``, ``exp_avg``)."""
    return tuple(dict.fromkeys(e for name in DECLARATIONS for e in linear_states(name).values()))


# ----------------------------------------------------------------------------------------------------------
# predictions


@dataclass
class Prediction:
    """What one source predicts for the groups of one group set at the audited step.

    ``kind``: ``exact`` | ``reference`` | ``lower_bound`` | ``recorded`` | ``records+law`` | ``none``.
    ``values``: predicted per-group values of each quantity (``Q`` the charge; ``R``/``P`` buffer charges).
    ``tolerance_parts``: what the tolerance is built from (filled by :func:`compare_prediction`).
    """

    family: str
    layer: str
    kind: str
    source: str
    values: dict[str, Tensor] = field(default_factory=dict)
    note: str = ""
    lr_sum: float = 0.0
    steps: int = 0
    law: str | None = None
    momentum: float = 0.0
    optimizer: str | None = None  # the declared law ``law`` follows (its optimizer-state entries come from it)


def predicted_charges(init: Snapshot, hyper: Hyper | None, records=None, *, target_step: int | None = None
                      ) -> dict[int, list[Prediction]]:
    """Predictions of every group set's charges at the audited step, from each available source.

    ``init``: the weights (and buffers) at the start; ``hyper``: the training hypothesis (None: no law);
    ``records``: a :class:`~symtools.audit.records.RecordedRun` of the run (None: none). The audited step is
    ``target_step`` or ``init.step + hyper.steps``. Keys are the positions of the group sets in
    ``init.group_sets`` (two sets may share a layer label, e.g. a Linear's columns and its bias); each value lists
    the predictions found (law from init, run records), or one ``kind="none"`` entry saying why there is none.
    """
    start = init.step or 0
    steps = hyper.steps if hyper is not None and hyper.steps is not None else None
    if target_step is None and steps is not None:
        target_step = start + steps
    if steps is None and target_step is not None:
        steps = target_step - start
    out: dict[int, list[Prediction]] = {}
    seen: dict[tuple[str, str], int] = {}
    for index, gs in enumerate(init.group_sets):
        occurrence = seen.get((gs.family, gs.layer), 0)
        seen[(gs.family, gs.layer)] = occurrence + 1
        preds: list[Prediction] = []
        if steps is not None and steps < 0:
            out[index] = [Prediction(gs.family, gs.layer, "none", "", note=f"no prediction available: the init "
                                     f"(step {start}) comes after the audited step ({target_step})")]
            continue
        if hyper is not None and steps is not None:
            preds.append(_law_prediction(gs, init, hyper, steps, start))
        if records is not None and target_step is not None:
            preds.extend(_records_predictions(gs, init, hyper, records, start, target_step, occurrence))
        if not preds:
            why = ("no training hypothesis: give --run, --lr/--wd/--steps, or a checkpoint with optimizer state"
                   if hyper is None else "the number of steps between init and the checkpoint is unknown (--steps)")
            preds.append(Prediction(gs.family, gs.layer, "none", "", note=f"no prediction available: {why}"))
        out[index] = preds
    return out


def _law_prediction(gs: GroupSet, init: Snapshot, hyper: Hyper, steps: int, start: int) -> Prediction:
    fam = gs.family
    h, why = hyper.for_params(gs.params())
    if why:
        return Prediction(fam, gs.layer, "none", "law", note=f"no prediction available: {why}")
    lrs = h["lr"]
    if len(lrs) != steps:
        return Prediction(fam, gs.layer, "none", "law", note=f"no prediction available: the lr schedule has "
                                                            f"{len(lrs)} entries for {steps} steps")
    law = law_module(fam, hyper.optimizer)
    sgd = law_module(fam, "sgd")
    if steps == 0 and sgd is not None:
        q0 = measure(sgd, "Q", gs, init.params)
        return Prediction(fam, gs.layer, "exact", "no update between init and checkpoint (steps = 0): every charge "
                                                  "keeps its initial value", {"Q": q0}, lr_sum=0.0, steps=0,
                          law=sgd.__name__.rsplit(".", 1)[-1], optimizer="sgd")
    if law is None:
        return Prediction(fam, gs.layer, "none", "law",
                          note=f"no prediction available: no generated law for {fam} under {hyper.optimizer}")
    unpredicted = [m for m in law.MEASURED if m not in law.PREDICTED]
    sgd_closed = sgd is not None and all(m in sgd.PREDICTED for m in sgd.MEASURED)
    if not unpredicted:
        kind = "exact"
        source = f"law_{fam}_{hyper.optimizer} from init, drives {', '.join(law.MEASURED)} = 0 (gradient identity)"
    elif hyper.optimizer in ADAM_FAMILY and sgd_closed:
        kind = "reference"
        source = (f"law_{fam}_{hyper.optimizer} from init with its breaking drive {', '.join(unpredicted)} "
                  f"(⟨u, v⟩ of the preconditioned update) set to 0: the charge a symmetry-respecting update keeps")
    elif hyper.optimizer == "sgd" and set(unpredicted) == {"G"} and law.NONNEGATIVE.get("G") is True:
        kind = "lower_bound"
        source = f"law_{fam}_sgd from init: the drive G = ½·D²q[g] ≥ 0 only adds, so Q_T ≥ Π(1−η_tλ)²·Q_0"
    else:
        return Prediction(fam, gs.layer, "none", "law", law=law.__name__.rsplit(".", 1)[-1],
                          note=f"no prediction available from init alone: the {fam} law under {hyper.optimizer} is "
                               f"driven by {', '.join(unpredicted)} each step (needs the run's records)")
    if getattr(law, "LINEAR", None) is not True:
        return Prediction(fam, gs.layer, "none", "law", law=law.__name__.rsplit(".", 1)[-1],
                          note=f"no prediction available from init: {_not_linear(law)}")
    from_zero = start == 0
    m, inputs, outputs = transfer_matrix(law, lrs, h["weight_decay"], h["momentum"], h["dampening"], from_zero)
    state0 = {}
    buffers = _buffer_for(hyper.optimizer, init.buffers)
    for q in inputs:
        v = measure(law, q, gs, init.params, buffers=buffers)
        if v is None:
            return Prediction(fam, gs.layer, "none", "law", note=f"no prediction available: the init checkpoint (step "
                                                                 f"{start}) lacks the optimizer state for {q}")
        state0[q] = v
    x0 = torch.stack([state0[q] for q in inputs])  # (inputs, groups)
    xt = torch.from_numpy(m) @ x0
    values = {q: xt[i] for i, q in enumerate(outputs)}
    return Prediction(fam, gs.layer, kind, source, values, lr_sum=float(sum(lrs)), steps=steps,
                      law=law.__name__.rsplit(".", 1)[-1], momentum=h["momentum"], optimizer=hyper.optimizer)


def _buffer_for(optimizer: str | None, buffers: Mapping[str, Mapping[str, Tensor]] | None
                ) -> Mapping[str, Tensor] | None:
    """The optimizer-state tensors law ``optimizer`` reads as ``b_<slot>`` (state kind ``b`` of the declarations,
    SGD's momentum buffer), found under the torch entry its declaration names
    (:func:`symtools.numeric.optimizer_laws.state_entries`); None if absent or the law keeps no such state."""
    if optimizer is None or not buffers:
        return None
    entry = state_entries(optimizer).get(_LAW_BUFFER)
    return buffers.get(entry) if entry else None


def _no_buffer(optimizer: str | None) -> str:
    entry = state_entries(optimizer).get(_LAW_BUFFER) if optimizer else None
    return f"the checkpoint has no optimizer state {entry!r}" if entry else "the law reads no optimizer state"


def _records_predictions(gs: GroupSet, init: Snapshot, hyper: Hyper | None, records, start: int,
                         target: int, occurrence: int = 0) -> list[Prediction]:
    fam = gs.family
    found = records.quantities(fam, gs.layer, gs.count, occurrence)
    if not found:
        return [Prediction(fam, gs.layer, "none", "records",
                           note=f"no prediction available from the run records: {records.why_not(fam, gs.layer)}")]
    preds = []
    q = found.get("Q", {})
    if target in q:
        preds.append(Prediction(fam, gs.layer, "recorded", f"run records: Q at step {target}",
                                {"Q": torch.as_tensor(q[target], dtype=torch.float64)}))
        return preds
    optimizer = hyper.optimizer if hyper is not None else None
    law = law_module(fam, optimizer) if optimizer else None
    if law is None or hyper is None:
        return [Prediction(fam, gs.layer, "none", "records",
                           note=f"no prediction available: the records hold no Q at step {target} and no optimizer "
                                f"law is known to propagate them")]
    h, why = hyper.for_params(gs.params())
    need = [m for m in law.MEASURED]
    t0 = max([s for s in q if s <= target], default=None)
    if t0 is None:
        t0 = start
    missing = [(m, t) for m in need for t in range(t0, target) if t not in found.get(m, {})]
    if why or missing or (t0 != start and t0 not in q) or len(h.get("lr", [])) != (target - start):
        reason = why or (f"drive {missing[0][0]} not recorded at step {missing[0][1]}" if missing else
                         "lr schedule does not cover the steps")
        return [Prediction(fam, gs.layer, "none", "records", note=f"no prediction available from the records: {reason}")]
    if t0 == start and start == 0 and 0 not in q:
        state = {"Q": measure(law, "Q", gs, init.params)}
    else:
        state = {"Q": torch.as_tensor(q[t0], dtype=torch.float64)}
    if set(law.STATE) != {"Q"} and t0 != 0:
        return [Prediction(fam, gs.layer, "none", "records",
                           note=f"no prediction available: propagating {', '.join(law.STATE)} needs them recorded")]
    lrs = h["lr"][t0 - start:]
    for i, t in enumerate(range(t0, target)):
        measured = {m: torch.as_tensor(found[m][t], dtype=torch.float64) for m in need}
        fn = law.first_step if t == 0 else law.step
        state = fn(state, measured, lrs[i], h["weight_decay"], h["momentum"], h["dampening"])
    return [Prediction(fam, gs.layer, "records+law", f"records: Q at step {t0} and drives {', '.join(need)} through "
                                                      f"law_{fam}_{optimizer}", {"Q": state["Q"]},
                       lr_sum=float(sum(lrs)), steps=target - t0)]


# ----------------------------------------------------------------------------------------------------------
# judging


def vs_init(current: Tensor, initial: Tensor, scale_now: Tensor, scale_init: Tensor) -> dict[str, Tensor]:
    """ΔQ per group and ΔQ relative to the size of the terms (max of Σ|density| at both ends)."""
    delta = current - initial
    size = torch.maximum(scale_now, scale_init).clamp_min(1e-300)
    return {"delta": delta, "relative": delta / size}


def compare_prediction(pred: Prediction, gs: GroupSet, now: Snapshot, init: Snapshot | None,
                       law_sgd: ModuleType | None) -> dict:
    """Deviation of the audited values from ``pred`` per group, its tolerance, and which groups are flagged.

    Returns a JSON-ready dict: kind, source, quantities {name: {max_abs_deviation, max_ratio (deviation /
    tolerance), flagged (group indices), …}}, flagged (bool) and a one-line reason.
    """
    out = {"kind": pred.kind, "source": pred.source, "note": pred.note, "law": pred.law, "quantities": {},
           "flagged": False, "reason": ""}
    if pred.kind == "none":
        return out
    own = importlib.import_module(f"symtools.codegen.generated.{pred.law}") if pred.law else None
    m_now = _identity_roundoff(law_sgd, gs, now) if law_sgd is not None else None
    m_init = _identity_roundoff(law_sgd, gs, init) if (law_sgd is not None and init is not None) else None
    m = None
    if m_now is not None or m_init is not None:
        zeros = torch.zeros(gs.count, dtype=torch.float64)
        m = torch.maximum(m_now if m_now is not None else zeros, m_init if m_init is not None else zeros)
    eps = max(now.eps, init.eps if init is not None else 0.0)
    memory = 1.0 / max(1e-12, 1.0 - pred.momentum)  # how long a drive keeps acting through the momentum buffer
    optimizer = pred.optimizer  # the buffer its law reads is found under this declaration's torch entry
    buffers_now = _buffer_for(optimizer, now.buffers)
    buffers_init = _buffer_for(optimizer, init.buffers) if init is not None else None
    reasons = []
    for q, predicted in pred.values.items():
        src_law = own if (own is not None and q in own.DENSITY) else law_sgd
        cached = now.cache.get(("Q", id(gs))) if q == "Q" else None  # the charges already computed, if same density
        if cached is not None:
            actual, size_now = cached
        else:
            actual, size_now = (measure(src_law, q, gs, now.params, buffers=buffers_now, with_size=True)
                                if src_law is not None else (None, None))
        if actual is None:
            out["quantities"][q] = {"available": False,
                                    "why": _no_buffer(optimizer) if q != "Q" else "not measurable"}
            continue
        if pred.kind == "recorded":
            tol = SAFETY * eps * size_now
            parts = {"rounding": "SAFETY·ε_w·Σ|density(θ_T)|"}
        else:
            cached = init.cache.get(("Q", id(gs))) if (init is not None and q == "Q") else None
            size_init = cached[1] if cached is not None else (
                measure(src_law, q, gs, init.params, buffers=buffers_init, absolute=True) if init is not None else None)
            a = size_now if size_init is None else torch.maximum(size_now, size_init)
            change = (measure(src_law, q, gs, now.params, buffers=buffers_now, absolute=True, minus=init.params)
                      if init is not None and q == "Q" else None)
            if change is not None:
                a = a + change
            steps = max(pred.steps, 1)
            tol = SAFETY * eps * steps * a
            parts = {"rounding": "SAFETY·ε_w·T·(max‖d‖₁ + ‖Δd‖₁)"}
            if m is not None:
                if q == "Q":
                    factor = 2.0 if pred.kind == "lower_bound" else 1.0
                    tol = tol + SAFETY * factor * pred.lr_sum * memory * m
                    parts["identity"] = "SAFETY·Σ_t η_t·max|⟨g, v⟩|/(1 − μ)"
                else:
                    tol = tol + SAFETY * min(float(steps), memory) * m
                    parts["identity"] = "SAFETY·min(T, 1/(1 − μ))·max|⟨g, v⟩|"
        dev = actual - predicted
        if pred.kind == "lower_bound":
            bad = dev < -tol
            shown = torch.clamp(-dev, min=0.0)
        else:
            bad = dev.abs() > tol
            shown = dev.abs()
        ratio = shown / tol.clamp_min(1e-300)
        flagged = torch.nonzero(bad).flatten().tolist()
        out["quantities"][q] = {
            "available": True, "max_abs_deviation": float(shown.max()) if shown.numel() else 0.0,
            "max_ratio": float(ratio.max()) if ratio.numel() else 0.0,
            "max_relative_deviation": float((shown / size_now.clamp_min(1e-300)).max()) if shown.numel() else 0.0,
            "tolerance_max": float(tol.max()) if tol.numel() else 0.0, "flagged_groups": len(flagged),
            "flagged": flagged[:64], "tolerance": parts,
            "actual": actual, "predicted": predicted, "deviation": dev,
        }
        if flagged:
            what = {"exact": "moved beyond the exact law", "reference": "broke the conservation law (Adam-type "
                    "update: accumulated η·Σ⟨u, v⟩)", "lower_bound": "fell below the SGD lower bound",
                    "recorded": "differs from the value the run recorded", "records+law":
                    "differs from the law driven by the recorded terms"}[pred.kind]
            reasons.append(f"{q} of {len(flagged)}/{gs.count} groups {what} (worst {float(ratio.max()):.3g}× "
                           f"tolerance)")
    if reasons:
        out["flagged"] = True
        out["reason"] = "; ".join(reasons)
    return out


def same_density(a: Mapping[str, str] | None, b: Mapping[str, str] | None) -> bool:
    """Whether two density tables are the same function, decided on their emitted SymPy text: a symmetry
    module's ``CHARGE_TEXT`` or a law module's ``DENSITY_TEXT[term]`` (slot → ``sp.sstr(sp.expand(density))``,
    :mod:`symtools.codegen.emit_facts`). Equal text on every slot (a slot whose density is 0 may be absent)
    is the same expression in the same argument names, hence the same function. False when either table is
    missing (a module emitted before these constants) or any slot differs: not known to be the same, which a
    caller treats as "evaluate it separately" (two texts may differ for one function written two ways, never
    the other way round)."""
    if a is None or b is None:
        return False
    nonzero = lambda t: {s: x for s, x in t.items() if x != "0"}  # noqa: E731
    return nonzero(a) == nonzero(b)


def _identity_roundoff(law_sgd: ModuleType, gs: GroupSet, snap: Snapshot | None) -> Tensor | None:
    """Round-off size of the gradient identity's sum M1 = ⟨g, v⟩ for the groups of ``gs`` at ``snap``.

    Measured on the audit batch in the weights' dtype, and taken per *layer* (the largest |M1| of its groups:
    the round-off is a property of the layer's arithmetic, and one group's value can be 0 by chance), plus a
    floor ε_w·g_rms·Σ|v_k| with g_rms the RMS gradient entry of the model (where the identity forces g itself
    to vanish, e.g. a bias feeding BatchNorm, the rounding is relative to gradients of that typical size).
    """
    if snap is None or snap.grads is None or "M1" not in law_sgd.DENSITY:
        return None
    key = ("roundoff", id(gs))
    if key in snap.cache:
        return snap.cache[key]
    m1 = measure(law_sgd, "M1", gs, snap.params, grads=snap.grads)
    if m1 is None:
        return None
    charge = groupops.family_module(gs.family)
    v_abs = torch.zeros(gs.count, dtype=torch.float64)
    for _, _, v in groupops.evaluate(charge, "generator", gs, snap.params):
        v_abs += v.to(torch.float64).abs().sum(dim=1).cpu()
    out = snap.cache[key] = m1.abs().max().expand(gs.count) + snap.eps * snap.g_rms * v_abs
    return out
