"""The audit of one set of weights: charges, identities, comparisons, flags — as one JSON-ready dict.

:func:`audit_model` takes a model that already holds the audited weights (any model the graph walk can
trace, not only VGG) and a batch of real data; everything about files lives in :mod:`symtools.audit.loading`
and the command line in :mod:`symtools.cli.audit`.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from symtools.audit.charges import (LayerCharges, matrix_group_charges, as_float64, charge_name, distribution, family_charge_modules,
                                    group_charges)
from symtools.audit.compare import (SAFETY, Hyper, Snapshot, _identity_roundoff, buffer_entries, compare_prediction,
                                    gradient_states, law_module, predicted_charges, same_density, vs_init)
from symtools.audit.loading import Checkpoint, optimizer_buffers
from symtools.errors import SymtoolsError
from symtools.nn.graph import find_symmetries
from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric import groupops
from symtools.numeric.evaluation import evaluation_mode
from symtools.numeric.optimizer_laws import declaration

__all__ = ["audit_model", "FORMAT", "VERSION"]

FORMAT, VERSION = "symtools-audit", 1


def _loss_and_grad(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: str,
                   want_grad: bool) -> tuple[float, Tensor, dict[str, Tensor] | None]:
    """Loss, logits and (optionally) the gradient at ``params`` in the model's own dtype (BN batch statistics)."""
    from torch.func import functional_call

    from symtools.numeric.evaluation import LOSSES

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    leaves = {k: v.detach().to(device=dev, dtype=dtype).requires_grad_(want_grad) for k, v in params.items()}
    with torch.set_grad_enabled(want_grad), evaluation_mode(model, "batch"):
        out = functional_call(model, leaves, (x.to(dev, dtype) if x.is_floating_point() else x.to(dev),))  # ids stay ints
        value = LOSSES[loss](out, y.to(dev))
    grads = None
    if want_grad:
        g = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        grads = {k: (torch.zeros_like(p) if gi is None else gi.detach()).cpu() for (k, p), gi in zip(leaves.items(), g)}
    return float(value.detach()), out.detach().cpu(), grads


def _buffers_by_kind(ckpt: Checkpoint | None, names: list[str], shapes: dict) -> tuple[dict, str]:
    if ckpt is None or ckpt.optimizer is None:
        return {}, "no optimizer state"
    per, why = optimizer_buffers(ckpt.optimizer, names, shapes)
    if why:
        return {}, why
    kinds = buffer_entries()  # the declared optimizer states that are linear in g and θ (compare.linear_states)
    out: dict[str, dict[str, Tensor]] = {}
    for name, entry in per.items():
        for kind, t in entry.items():
            if kind in kinds and isinstance(t, Tensor) and tuple(t.shape) == tuple(shapes[name]):
                out.setdefault(kind, {})[name] = t.detach().to("cpu", torch.float64)
    return out, ""


def _generator_is_constant(module: ModuleType) -> bool | None:
    """Whether v does not depend on θ (translation-like): ``GENERATOR_CONSTANT``, which the emitter derives
    symbolically. None for a module emitted before that constant existed (a ``symtools derive --torch`` file of
    an older symtools): unknown, so whatever rests on it is skipped and said so (:func:`_old_module_note`)."""
    value = getattr(module, "GENERATOR_CONSTANT", None)
    return None if value is None else bool(value)


def _old_module_note(family: str, what: str) -> str:
    return (f"{family}: {what} not checked: its generated module has no GENERATOR_CONSTANT (emitted by an older "
            f"symtools); re-emit it with `symtools derive SPEC --torch FILE`")


def _by_index(sets: list[GroupSet], charges: list) -> dict[int, object]:
    """Charges by position of their group set (families without a charge have none)."""
    it = iter(charges)
    out, nxt = {}, next(it, None)
    for i, gs in enumerate(sets):
        if nxt is not None and nxt.family == gs.family and nxt.layer == gs.layer and nxt.count == gs.count:
            out[i] = nxt
            nxt = next(it, None)
    return out


def _jsonable(x):
    if isinstance(x, Tensor):
        return [float(v) for v in x.flatten().tolist()]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def audit_model(model: nn.Module, inputs: Tensor, targets: Tensor, *, checkpoint: Checkpoint | None = None,
                init: Checkpoint | Mapping[str, Tensor] | None = None, init_step: int | None = None,
                hyper: Hyper | None = None, records=None, loss: str = "cross_entropy",
                identities: bool = True, check_dtype: torch.dtype | None = torch.float64, seed: int = 0,
                symmetries: SymmetryMap | None = None, modules: Mapping[str, ModuleType] | None = None,
                target_step: int | None = None, progress: Callable[[str], None] | None = None,
                info: dict | None = None) -> dict:
    """Audit the weights ``model`` holds on the batch ``(inputs, targets)``; return the report as a dict.

    * ``checkpoint``: where the weights came from (step, optimizer state for the buffer checks);
    * ``init``: the initial weights (a :class:`Checkpoint` or a state_dict) for "vs init" and the laws;
      ``init_step`` overrides its step (default: the checkpoint's step, else 0);
    * ``hyper``: the training hypothesis (:class:`~symtools.audit.compare.Hyper`); ``records``: the run's
      :class:`~symtools.audit.records.RecordedRun`; ``target_step``: the audited step (default
      init step + hyper.steps, else the checkpoint's step);
    * ``identities``: check the gradient and Hessian identities (:func:`symtools.numeric.checker.check`) in
      ``check_dtype`` (None: the model's dtype).

    The model's parameters, buffers and train/eval flags are left as they were. Schema: docs/commands/audit.md.
    """
    say = progress or (lambda msg: None)
    clock = _StepClock()
    layout = _Layout.of(model)
    notes: list[str] = []
    with clock.step("groups"):
        symmetries, sets = _symmetry_groups(model, inputs, loss, symmetries, say)
    with clock.step("charges"):
        charges = _charges(model, sets, init, layout, modules, notes, say)
    report_ident = None
    if identities:
        with clock.step("identities"):
            report_ident = _identity_report(model, inputs, targets, symmetries, loss, check_dtype, seed, modules, say)
    with clock.step("loss_and_gradients"):
        losses = _losses(model, inputs, targets, loss, hyper, charges, layout, say)
    with clock.step("comparisons"):
        buffers = _Buffers.of(checkpoint, charges.init_ckpt, layout)
        start = _init_step(init_step, charges.init_ckpt)
        now_snap = _now_snapshot(checkpoint, sets, charges, buffers, losses, layout)
        init_snap = _init_snapshot(start, sets, charges, buffers, losses, layout, now_snap)
        predictions = _predictions(init_snap, hyper, records, target_step, checkpoint, notes)
        say("comparisons")
        layers = [_layer_report(key, gs, charges, predictions.get(key, []), now_snap, init_snap, buffers.now, hyper,
                                modules, losses.func_vs_init, notes) for key, gs in enumerate(sets)]
    return _jsonable(_report(
        model=model, inputs=inputs, info=info, checkpoint=checkpoint, layout=layout, charges=charges, start=start,
        hyper=hyper, records=records, report_ident=report_ident, losses=losses, sets=sets, layers=layers,
        buffers=buffers, symmetries=symmetries, notes=notes, seconds=clock.total()))


class _StepClock:
    """Seconds per audit step, in the order the steps ran, and the total since the clock was made (the
    report's ``seconds``)."""

    def __init__(self) -> None:
        self.t_all = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t

    def total(self) -> dict[str, float]:
        """The per-step seconds with ``total`` added."""
        self.seconds["total"] = time.perf_counter() - self.t_all
        return self.seconds


@dataclass
class _Layout:
    """The audited model's parameter names (in order), their shapes, and the weights' dtype."""

    names: list[str]
    shapes: dict[str, tuple]
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> "_Layout":
        return cls([n for n, _ in model.named_parameters()], {n: tuple(p.shape) for n, p in model.named_parameters()},
                   next(model.parameters()).dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _symmetry_groups(model: nn.Module, inputs: Tensor, loss: str, symmetries: SymmetryMap | None,
                     say: Callable[[str], None]) -> tuple[SymmetryMap, list[GroupSet]]:
    """The symmetry map (found by the graph walk unless given) and its group sets; refuses a model with none."""
    say("symmetry groups (graph walk)")
    if symmetries is None:
        symmetries = find_symmetries(model, inputs[:1].to(next(model.parameters()).device), loss=loss)
    sets: list[GroupSet] = list(symmetries.group_sets)
    if not sets:
        raise SymtoolsError(f"{type(model).__name__} has no symmetry groups the graph walk can find; nothing to audit")
    return symmetries, sets


@dataclass
class _Charges:
    """What the charges step hands on: float64 copies of the audited and the initial weights, the generated
    modules of the families with a charge, and the charges by position of their group set (now, at init)."""

    now_params: dict[str, Tensor]
    modules: dict[str, ModuleType]
    now: dict[int, LayerCharges]
    init_params: dict[str, Tensor] | None
    init_ckpt: Checkpoint | None
    init: dict[int, LayerCharges]


def _charges(model: nn.Module, sets: list[GroupSet], init: Checkpoint | Mapping[str, Tensor] | None, layout: _Layout,
             modules: Mapping[str, ModuleType] | None, notes: list[str], say: Callable[[str], None]) -> _Charges:
    """The charge of every group now and, when ``init`` is given, at init (after checking that the initial
    weights fit the model). A family without a charge gets a line in ``notes``."""
    say("charges")
    now_params = as_float64(dict(model.named_parameters()))
    charge_mods, no_charge = family_charge_modules(sets, modules)
    for fam, why in no_charge.items():
        notes.append(f"{fam}: no charge ({why}); its groups are checked but not charged")
    now_charges = _by_index(sets, group_charges(sets, now_params, modules))
    init_params, init_ckpt = _initial_weights(init, layout)
    init_charges = _by_index(sets, group_charges(sets, init_params, modules)) if init_params else {}
    return _Charges(now_params, charge_mods, now_charges, init_params, init_ckpt, init_charges)


def _initial_weights(init: Checkpoint | Mapping[str, Tensor] | None,
                     layout: _Layout) -> tuple[dict[str, Tensor] | None, Checkpoint | None]:
    """``(float64 copies of the initial parameters, the init Checkpoint or None)``; refuses initial weights that
    miss a parameter or have another shape."""
    if init is None:
        return None, None
    init_ckpt = init if isinstance(init, Checkpoint) else None
    sd = init.state_dict if isinstance(init, Checkpoint) else dict(init)
    names, shapes = layout.names, layout.shapes
    missing = [n for n in names if n not in sd]
    wrong = [f"{n}: {tuple(sd[n].shape)} vs {shapes[n]}" for n in names if n in sd and tuple(sd[n].shape) != shapes[n]]
    if missing or wrong:
        raise SymtoolsError("the init checkpoint does not fit the audited model: "
                            + (f"missing {missing[:6]}" if missing else "")
                            + ("; " if missing and wrong else "") + (f"shape mismatches {wrong[:6]}" if wrong else ""))
    return as_float64({n: sd[n] for n in names}), init_ckpt


def _identity_report(model: nn.Module, inputs: Tensor, targets: Tensor, symmetries: SymmetryMap, loss: str,
                     check_dtype: torch.dtype | None, seed: int, modules: Mapping[str, ModuleType] | None,
                     say: Callable[[str], None]) -> dict:
    """The gradient and Hessian identities of every group (:func:`symtools.numeric.checker.check`) as a dict."""
    from symtools.numeric.checker import check

    say("gradient and Hessian identities")
    rep = check(model, inputs, targets, symmetries, loss=loss, dtype=check_dtype, seed=seed, modules=modules,
                progress=lambda m: say(f"  {m}"))
    return rep.to_dict()


@dataclass
class _Losses:
    """What the loss step hands on: the loss now, the gradients in the weights' dtype (now, at init; None when
    not needed) and the change of the function since init (None without init)."""

    loss_now: float
    grads_now: dict[str, Tensor] | None
    grads_init: dict[str, Tensor] | None
    func_vs_init: dict | None


def _losses(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str, hyper: Hyper | None, charges: _Charges,
            layout: _Layout, say: Callable[[str], None]) -> _Losses:
    """Loss and logits at the audited and the initial weights, in the weights' dtype. Gradients are taken only
    when a hypothesis has updates to compare (they size the round-off of the gradient identity in the law
    tolerances; with steps = 0 no drive acts and none is needed)."""
    want_grads = hyper is not None and hyper.steps != 0
    say("loss and gradients in the weights' dtype" if want_grads else "loss")
    loss_now, logits_now, grads_now = _loss_and_grad(model, charges.now_params, inputs, targets, loss, want_grads)
    func_vs_init = None
    grads_init = None
    if charges.init_params is not None:
        loss_init, logits_init, grads_init = _loss_and_grad(model, charges.init_params, inputs, targets, loss,
                                                            want_grads)
        func_vs_init = _function_vs_init(loss_init, loss_now, logits_init, logits_now, layout)
    return _Losses(loss_now, grads_now, grads_init, func_vs_init)


def _function_vs_init(loss_init: float, loss_now: float, logits_init: Tensor, logits_now: Tensor,
                      layout: _Layout) -> dict:
    """How much the loss and logits changed since init; ``same_function`` when the logits moved by no more than
    the weights' round-off (SAFETY·100·ε relative)."""
    scale = float(logits_init.abs().max()) or 1.0
    out = {"loss_init": loss_init, "loss_now": loss_now, "loss_change": loss_now - loss_init,
           "logits_max_abs_change": float((logits_now - logits_init).abs().max()),
           "logits_max_rel_change": float((logits_now - logits_init).abs().max()) / scale,
           "dtype": layout.dtype_name}
    eps = float(torch.finfo(layout.dtype).eps)
    out["same_function"] = out["logits_max_rel_change"] <= SAFETY * 100 * eps
    return out


@dataclass
class _Buffers:
    """Optimizer buffers by torch state entry (those of :func:`~symtools.audit.compare.buffer_entries`:
    ``momentum_buffer``, ``exp_avg``) and parameter, float64: of the audited checkpoint (with a
    note why there are none) and of the init checkpoint."""

    now: dict[str, dict[str, Tensor]]
    note: str
    init: dict[str, dict[str, Tensor]]

    @classmethod
    def of(cls, checkpoint: Checkpoint | None, init_ckpt: Checkpoint | None, layout: _Layout) -> "_Buffers":
        now, note = _buffers_by_kind(checkpoint, layout.names, layout.shapes)
        init, _ = _buffers_by_kind(init_ckpt, layout.names, layout.shapes)
        return cls(now, note, init)


def _init_step(init_step: int | None, init_ckpt: Checkpoint | None) -> int:
    """The step of the initial weights: ``init_step`` if given, else the init checkpoint's step, else 0."""
    if init_step is not None:
        return init_step
    return init_ckpt.step if init_ckpt is not None and init_ckpt.step is not None else 0


def _now_snapshot(checkpoint: Checkpoint | None, sets: list[GroupSet], charges: _Charges, buffers: _Buffers,
                  losses: _Losses, layout: _Layout) -> Snapshot:
    """The audited weights as the comparisons see them; a law's Q that is the charge density itself (the same
    emitted text: :func:`~symtools.audit.compare.same_density`) reuses the charges already computed."""
    snap = Snapshot(checkpoint.step if checkpoint is not None else None, charges.now_params, sets, buffers.now,
                    losses.grads_now, layout.dtype, "checkpoint")
    for key, gs in enumerate(sets):
        sgd = law_module(gs.family, "sgd")
        mod = charges.modules.get(gs.family)
        if sgd is None or mod is None or key not in charges.now or not same_density(
                sgd.DENSITY_TEXT["Q"], getattr(mod, "CHARGE_TEXT", None)):
            continue
        snap.cache[("Q", id(gs))] = (charges.now[key].values, charges.now[key].scale)
    return snap


def _init_snapshot(start: int, sets: list[GroupSet], charges: _Charges, buffers: _Buffers, losses: _Losses,
                   layout: _Layout, now_snap: Snapshot) -> Snapshot | None:
    """The initial weights at step ``start`` as the comparisons see them (None without init), reusing the init
    charges where the audited snapshot reuses its own."""
    if charges.init_params is None:
        return None
    snap = Snapshot(start, charges.init_params, sets, buffers.init, losses.grads_init, layout.dtype, "init")
    for key, gs in enumerate(sets):
        if ("Q", id(gs)) in now_snap.cache and key in charges.init:
            snap.cache[("Q", id(gs))] = (charges.init[key].values, charges.init[key].scale)
    return snap


def _predictions(init_snap: Snapshot | None, hyper: Hyper | None, records, target_step: int | None,
                 checkpoint: Checkpoint | None, notes: list[str]) -> dict:
    """The charges predicted from init by the laws and the records, by group set position
    (:func:`~symtools.audit.compare.predicted_charges`). The audited step defaults to the checkpoint's when the
    hypothesis leaves the number of steps open. Without init: none, and a note if a hypothesis was given."""
    if init_snap is None:
        if hyper is not None:
            notes.append("a training hypothesis needs the initial weights (--init or --run): no law comparison")
        return {}
    if target_step is None and hyper is not None and hyper.steps is None and checkpoint is not None \
            and checkpoint.step is not None:
        target_step = checkpoint.step
    return predicted_charges(init_snap, hyper, records, target_step=target_step)


def _layer_report(key: int, gs: GroupSet, charges: _Charges, predictions: list, now_snap: Snapshot,
                  init_snap: Snapshot | None, buffers: dict[str, dict[str, Tensor]], hyper: Hyper | None,
                  modules: Mapping[str, ModuleType] | None, func_vs_init: dict | None, notes: list[str]) -> dict:
    """The report entry of one group set: its charges and their change since init, each prediction compared,
    each optimizer buffer projected on the generator (checked where the declarations say it vanishes);
    ``flagged`` with the reasons when any of them broke. A check skipped for want of a derived fact adds a line
    to ``notes`` (once)."""
    lc, ic = charges.now.get(key), charges.init.get(key)
    entry = _charge_entry(gs, lc, ic, charges.modules.get(gs.family))
    if lc is not None:
        sgd = law_module(gs.family, "sgd")
        for pred in predictions:
            cmp = compare_prediction(pred, gs, now_snap, init_snap, sgd)
            entry["predictions"].append(cmp)
            if cmp["flagged"]:
                _flag(entry, cmp["reason"])
    module = groupops.family_module(gs.family) if modules is None or gs.family not in modules else modules[gs.family]
    for kind, tensors in buffers.items():
        if not all(p in tensors for p in gs.params()):
            continue
        b = entry["buffers"][kind] = _buffer_report(kind, tensors, gs, module, charges.now_params, hyper, now_snap)
        if b.get("note") and b["note"] not in notes:
            notes.append(b["note"])
        if b["check"] is not None and b["check"]["flagged_groups"]:
            _flag(entry, f"⟨{kind}, v⟩ ≠ 0 in {b['check']['flagged_groups']} groups")
    if entry["flagged"] and func_vs_init is not None and func_vs_init.get("same_function"):
        entry["reasons"].append("the function is unchanged from init on the audit batch: consistent with a "
                                "symmetry action applied to the weights")
    return entry


def _flag(entry: dict, reason: str) -> None:
    entry["flagged"] = True
    entry["reasons"].append(reason)


def _charge_entry(gs: GroupSet, lc: LayerCharges | None, ic: LayerCharges | None,
                  module: ModuleType | None) -> dict:
    """A layer entry with the group set's description, its charge distribution now and vs init (no predictions,
    buffers or flags yet)."""
    entry = {"family": gs.family, "layer": gs.layer, "groups": gs.count, "params": gs.params(),
             "note": gs.note, "charge_name": charge_name(gs.family, module),
             "charge": None, "values": None, "vs_init": None, "predictions": [], "buffers": {},
             "flagged": False, "reasons": []}
    if lc is not None:
        entry["charge"] = distribution(lc.values)
        entry["values"] = lc.values
        entry["scale"] = distribution(lc.scale)
    if lc is not None and ic is not None:
        d = vs_init(lc.values, ic.values, lc.scale, ic.scale)
        entry["vs_init"] = {"init": distribution(ic.values), "delta": distribution(d["delta"]),
                            "relative": distribution(d["relative"]), "init_values": ic.values,
                            "delta_values": d["delta"]}
    return entry


def _buffer_report(kind: str, tensors: Mapping[str, Tensor], gs: GroupSet, module: ModuleType,
                   now_params: Mapping[str, Tensor], hyper: Hyper | None, now_snap: Snapshot) -> dict:
    """⟨buffer, v⟩ per group; checked to vanish (:func:`_vanishing_check`) when the hypothesis' law keeps this
    buffer as a running combination of gradients alone (:func:`~symtools.audit.compare.gradient_states`: AdamW's
    ``exp_avg``) and the generator is constant (``GENERATOR_CONSTANT``)."""
    proj, size = groupops.gradient_terms(module, gs, now_params, tensors)
    b = {"projection": distribution(proj.cpu()), "what": f"⟨{kind}, v⟩ per group", "check": None}
    states = gradient_states(hyper.optimizer) if hyper is not None else {}
    if kind in states.values():
        constant = _generator_is_constant(module)
        if constant is None:
            b["note"] = _old_module_note(gs.family, f"⟨{kind}, v⟩ = 0")
        elif constant:
            b["check"] = _vanishing_check(kind, hyper.optimizer, proj, size, gs, now_snap)
    return b


def _vanishing_check(kind: str, optimizer: str, proj: Tensor, size: Tensor, gs: GroupSet,
                     now_snap: Snapshot) -> dict:
    """A state that combines gradients alone (its declared update reads only g and itself, e.g. AdamW's first
    moment) has ⟨state, v⟩ = 0 where ⟨g, v⟩ = 0 every step (v constant): the groups above SAFETY·(ε_w·Σ|b·v| +
    the round-off of ⟨g, v⟩ as for the laws)."""
    sgd_law = law_module(gs.family, "sgd")
    m_round = _identity_roundoff(sgd_law, gs, now_snap) if sgd_law is not None else None
    if m_round is None:
        m_round = torch.zeros(gs.count, dtype=torch.float64)
    tol = SAFETY * (now_snap.eps * size.cpu() + m_round)
    bad = torch.nonzero(proj.cpu().abs() > tol).flatten().tolist()
    decl = declaration(optimizer)
    return {"law": f"{decl.label}'s {kind} is a running linear combination of gradients alone (its declared update "
                   f"reads only g and itself: {decl.rule.text}) and ⟨g, v⟩ = 0 with v constant, so ⟨{kind}, v⟩ = 0 "
                   "(tolerance: SAFETY·(ε_w·Σ|b·v| + round-off of ⟨g, v⟩ as for the laws))",
            "max_ratio": float((proj.cpu().abs() / tol.clamp_min(1e-300)).max()),
            "flagged_groups": len(bad), "flagged": bad[:64]}


def _family_summaries(sets: list[GroupSet], charges: _Charges, layers: list[dict]) -> dict[str, dict]:
    """Per family, in order of first appearance: group counts, the charge distribution over all its groups,
    and how many of its layers are flagged."""
    families: dict[str, dict] = {}
    for fam in dict.fromkeys(gs.family for gs in sets):
        vals = [charges.now[i].values for i, g in enumerate(sets) if g.family == fam and i in charges.now]
        families[fam] = {"groups": sum(g.count for g in sets if g.family == fam),
                         "group_sets": sum(1 for g in sets if g.family == fam),
                         "charge_name": charge_name(fam, charges.modules.get(fam)),
                         "charge": distribution(torch.cat(vals)) if vals else None,
                         "has_charge": fam in charges.modules,
                         "flagged_layers": sum(1 for e in layers if e["family"] == fam and e["flagged"])}
    return families


def _report(*, model: nn.Module, inputs: Tensor, info: dict | None, checkpoint: Checkpoint | None, layout: _Layout,
            charges: _Charges, start: int, hyper: Hyper | None, records, report_ident: dict | None, losses: _Losses,
            sets: list[GroupSet], layers: list[dict], buffers: _Buffers, symmetries: SymmetryMap, notes: list[str],
            seconds: dict[str, float]) -> dict:
    """The report (schema: docs/commands/audit.md): passes when no layer is flagged and no identity fails."""
    flagged = [{"family": e["family"], "layer": e["layer"], "reason": "; ".join(e["reasons"])}
               for e in layers if e["flagged"]]
    identities_pass = report_ident["pass"] if report_ident is not None else None
    ok = not flagged and identities_pass is not False
    init_ckpt = charges.init_ckpt
    return {
        "format": FORMAT, "version": VERSION,
        "checkpoint": checkpoint.describe() if checkpoint is not None else None,
        "model": dict(info or {}, parameters=sum(p.numel() for p in model.parameters()), dtype=layout.dtype_name),
        "batch": int(inputs.shape[0]), "loss": losses.loss_now,
        "init": None if charges.init_params is None else {"path": init_ckpt.path if init_ckpt else None, "step": start},
        "hyper": hyper.describe() if hyper is not None else None,
        "records": records.describe() if records is not None else None,
        "identities": report_ident,
        "function_vs_init": losses.func_vs_init,
        "families": _family_summaries(sets, charges, layers),
        "matrix_charges": matrix_group_charges(symmetries.matrix_sets, dict(model.named_parameters())),
        "layers": layers,
        "buffers": {"kinds": sorted(buffers.now), "note": buffers.note if not buffers.now else ""},
        "flagged": flagged,
        "blocked": [{"node": b.node, "reason": b.reason} for b in symmetries.blocked],
        "notes": notes + (checkpoint.notes if checkpoint is not None else []),
        "pass": ok, "exit_code": 0 if ok else 1,
        "safety_factor": SAFETY,
        "seconds": seconds,
    }
