"""The audit of one set of weights: charges, identities, comparisons, flags — as one JSON-ready dict.

:func:`audit_model` takes a model that already holds the audited weights (any model the graph walk can
trace, not only VGG) and a batch of real data; everything about files lives in :mod:`symtools.audit.loading`
and the command line in :mod:`symtools.cli.audit`.
"""

from __future__ import annotations

import math
import time
from types import ModuleType
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from symtools.audit.charges import CHARGE_NAMES, as_float64, distribution, family_charge_modules, group_charges
from symtools.audit.compare import (SAFETY, Hyper, Snapshot, _identity_roundoff, compare_prediction, law_module,
                                    predicted_charges, same_density, vs_init)
from symtools.audit.loading import Checkpoint, optimizer_buffers
from symtools.errors import SymtoolsError
from symtools.nn.graph import find_symmetries
from symtools.nn.groups import GroupSet, SymmetryMap
from symtools.numeric import groupops
from symtools.numeric.evaluation import evaluation_mode

__all__ = ["audit_model", "FORMAT", "VERSION"]

FORMAT, VERSION = "symtools-audit", 1
BUFFER_KINDS = ("momentum_buffer", "exp_avg")


def _loss_and_grad(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: str,
                   want_grad: bool) -> tuple[float, Tensor, dict[str, Tensor] | None]:
    """Loss, logits and (optionally) the gradient at ``params`` in the model's own dtype (BN batch statistics)."""
    from torch.func import functional_call

    from symtools.numeric.evaluation import LOSSES

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    leaves = {k: v.detach().to(device=dev, dtype=dtype).requires_grad_(want_grad) for k, v in params.items()}
    with torch.set_grad_enabled(want_grad), evaluation_mode(model, "batch"):
        out = functional_call(model, leaves, (x.to(dev, dtype),))
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
    out: dict[str, dict[str, Tensor]] = {}
    for name, entry in per.items():
        for kind, t in entry.items():
            if kind in BUFFER_KINDS and isinstance(t, Tensor) and tuple(t.shape) == tuple(shapes[name]):
                out.setdefault(kind, {})[name] = t.detach().to("cpu", torch.float64)
    return out, ""


def _generator_is_constant(module: ModuleType) -> bool:
    """v does not depend on θ (translation-like): probed on two random arguments."""
    gen = torch.Generator().manual_seed(1)
    for slot, fn in module.GENERATOR.items():
        n = len(module.ARGS["generator"][slot])
        a = [torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(n)]
        b = [torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(n)]
        if not torch.equal(fn(*a), fn(*b)):
            return False
    return True


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
      :class:`~symtools.audit.records.RunRecords`; ``target_step``: the audited step (default
      init step + hyper.steps, else the checkpoint's step);
    * ``identities``: check the gradient and Hessian identities (:func:`symtools.numeric.checker.check`) in
      ``check_dtype`` (None: the model's dtype).

    The model's parameters, buffers and train/eval flags are left as they were. Schema: docs/commands/audit.md.
    """
    say = progress or (lambda msg: None)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    weight_dtype = next(model.parameters()).dtype
    notes: list[str] = []

    t = time.perf_counter()
    say("symmetry groups (graph walk)")
    if symmetries is None:
        symmetries = find_symmetries(model, inputs[:1].to(next(model.parameters()).device), loss=loss)
    sets: list[GroupSet] = list(symmetries.group_sets)
    if not sets:
        raise SymtoolsError(f"{type(model).__name__} has no symmetry groups the graph walk can find; nothing to audit")
    seconds["groups"] = time.perf_counter() - t

    t = time.perf_counter()
    say("charges")
    now_params = as_float64(dict(model.named_parameters()))
    charge_mods, no_charge = family_charge_modules(sets, modules)
    for fam, why in no_charge.items():
        notes.append(f"{fam}: no charge ({why}); its groups are checked but not charged")
    now_charges = _by_index(sets, group_charges(sets, now_params, modules))
    init_params = None
    init_ckpt: Checkpoint | None = None
    if init is not None:
        init_ckpt = init if isinstance(init, Checkpoint) else None
        sd = init.state_dict if isinstance(init, Checkpoint) else dict(init)
        missing = [n for n in names if n not in sd]
        wrong = [f"{n}: {tuple(sd[n].shape)} vs {shapes[n]}" for n in names if n in sd and tuple(sd[n].shape) != shapes[n]]
        if missing or wrong:
            raise SymtoolsError("the init checkpoint does not fit the audited model: "
                                + (f"missing {missing[:6]}" if missing else "")
                                + ("; " if missing and wrong else "") + (f"shape mismatches {wrong[:6]}" if wrong else ""))
        init_params = as_float64({n: sd[n] for n in names})
    init_charges = _by_index(sets, group_charges(sets, init_params, modules)) if init_params else {}
    seconds["charges"] = time.perf_counter() - t

    report_ident = None
    if identities:
        t = time.perf_counter()
        from symtools.numeric.checker import check

        say("gradient and Hessian identities")
        rep = check(model, inputs, targets, symmetries, loss=loss, dtype=check_dtype, seed=seed, modules=modules,
                    progress=lambda m: say(f"  {m}"))
        report_ident = rep.to_dict()
        seconds["identities"] = time.perf_counter() - t

    t = time.perf_counter()
    # gradients in the weights' dtype size the round-off of the gradient identity in the law tolerances; with no
    # update in between (steps = 0) no drive acts and none is needed
    want_grads = hyper is not None and hyper.steps != 0
    say("loss and gradients in the weights' dtype" if want_grads else "loss")
    loss_now, logits_now, grads_now = _loss_and_grad(model, now_params, inputs, targets, loss, want_grads)
    func_vs_init = None
    grads_init = None
    if init_params is not None:
        loss_init, logits_init, grads_init = _loss_and_grad(model, init_params, inputs, targets, loss, want_grads)
        scale = float(logits_init.abs().max()) or 1.0
        func_vs_init = {"loss_init": loss_init, "loss_now": loss_now, "loss_change": loss_now - loss_init,
                        "logits_max_abs_change": float((logits_now - logits_init).abs().max()),
                        "logits_max_rel_change": float((logits_now - logits_init).abs().max()) / scale,
                        "dtype": str(weight_dtype).replace("torch.", "")}
        eps = float(torch.finfo(weight_dtype).eps)
        func_vs_init["same_function"] = func_vs_init["logits_max_rel_change"] <= SAFETY * 100 * eps
    seconds["loss_and_gradients"] = time.perf_counter() - t

    t = time.perf_counter()
    buffers, buf_note = _buffers_by_kind(checkpoint, names, shapes)
    init_buffers, _ = _buffers_by_kind(init_ckpt, names, shapes)
    start = init_step if init_step is not None else (init_ckpt.step if init_ckpt is not None and init_ckpt.step is not None else 0)
    now_snap = Snapshot(checkpoint.step if checkpoint is not None else None, now_params, sets, buffers, grads_now,
                        weight_dtype, "checkpoint")
    for key, gs in enumerate(sets):  # let the comparisons reuse the charges when the law's Q is the same density
        sgd = law_module(gs.family, "sgd")
        mod = charge_mods.get(gs.family)
        if sgd is None or mod is None or key not in now_charges or not same_density(
                sgd, sgd.DENSITY["Q"], sgd.ARGS["Q"], mod, mod.CHARGE_DENSITY, mod.ARGS["charge_density"]):
            continue
        now_snap.cache[("Q", id(gs))] = (now_charges[key].values, now_charges[key].scale)
    predictions = {}
    if init_params is not None:
        init_snap = Snapshot(start, init_params, sets, init_buffers, grads_init, weight_dtype, "init")
        for key, gs in enumerate(sets):
            if ("Q", id(gs)) in now_snap.cache and key in init_charges:
                init_snap.cache[("Q", id(gs))] = (init_charges[key].values, init_charges[key].scale)
        if target_step is None and hyper is not None and hyper.steps is None and checkpoint is not None \
                and checkpoint.step is not None:
            target_step = checkpoint.step
        predictions = predicted_charges(init_snap, hyper, records, target_step=target_step)
    else:
        init_snap = None
        if hyper is not None:
            notes.append("a training hypothesis needs the initial weights (--init or --run): no law comparison")
    say("comparisons")
    layers = []
    flagged = []
    for key, gs in enumerate(sets):
        lc = now_charges.get(key)
        entry = {"family": gs.family, "layer": gs.layer, "groups": gs.count, "params": gs.params(),
                 "note": gs.note, "charge_name": CHARGE_NAMES.get(gs.family, f"{gs.family} charge"),
                 "charge": None, "values": None, "vs_init": None, "predictions": [], "buffers": {},
                 "flagged": False, "reasons": []}
        if lc is not None:
            entry["charge"] = distribution(lc.values)
            entry["values"] = lc.values
            entry["scale"] = distribution(lc.scale)
        ic = init_charges.get(key)
        if lc is not None and ic is not None:
            d = vs_init(lc.values, ic.values, lc.scale, ic.scale)
            entry["vs_init"] = {"init": distribution(ic.values), "delta": distribution(d["delta"]),
                                "relative": distribution(d["relative"]), "init_values": ic.values,
                                "delta_values": d["delta"]}
        if lc is not None:
            sgd = law_module(gs.family, "sgd")
            for pred in predictions.get(key, []):
                cmp = compare_prediction(pred, gs, now_snap, init_snap, sgd)
                entry["predictions"].append(cmp)
                if cmp["flagged"]:
                    entry["flagged"] = True
                    entry["reasons"].append(cmp["reason"])
        module = groupops.family_module(gs.family) if modules is None or gs.family not in modules else modules[gs.family]
        for kind, tensors in buffers.items():
            if not all(p in tensors for p in gs.params()):
                continue
            proj, size = groupops.gradient_terms(module, gs, now_params, tensors)
            b = {"projection": distribution(proj.cpu()), "what": f"⟨{kind}, v⟩ per group", "check": None}
            if kind == "exp_avg" and hyper is not None and hyper.optimizer == "adamw" and _generator_is_constant(module):
                sgd_law = law_module(gs.family, "sgd")
                m_round = _identity_roundoff(sgd_law, gs, now_snap) if sgd_law is not None else None
                if m_round is None:
                    m_round = torch.zeros(gs.count, dtype=torch.float64)
                tol = SAFETY * (now_snap.eps * size.cpu() + m_round)
                bad = torch.nonzero(proj.cpu().abs() > tol).flatten().tolist()
                b["check"] = {"law": "AdamW's first moment is an average of gradients (no weight decay in it) and "
                                     "⟨g, v⟩ = 0 with v constant, so ⟨exp_avg, v⟩ = 0 (tolerance: SAFETY·(ε_w·Σ|b·v| "
                                     "+ round-off of ⟨g, v⟩ as for the laws))",
                              "max_ratio": float((proj.cpu().abs() / tol.clamp_min(1e-300)).max()),
                              "flagged_groups": len(bad), "flagged": bad[:64]}
                if bad:
                    entry["flagged"] = True
                    entry["reasons"].append(f"⟨exp_avg, v⟩ ≠ 0 in {len(bad)} groups")
            entry["buffers"][kind] = b
        if entry["flagged"] and func_vs_init is not None and func_vs_init.get("same_function"):
            entry["reasons"].append("the function is unchanged from init on the audit batch: consistent with a "
                                    "symmetry action applied to the weights")
        if entry["flagged"]:
            flagged.append({"family": gs.family, "layer": gs.layer, "reason": "; ".join(entry["reasons"])})
        layers.append(entry)
    seconds["comparisons"] = time.perf_counter() - t

    families: dict[str, dict] = {}
    for fam in dict.fromkeys(gs.family for gs in sets):
        vals = [now_charges[i].values for i, g in enumerate(sets) if g.family == fam and i in now_charges]
        families[fam] = {"groups": sum(g.count for g in sets if g.family == fam),
                         "group_sets": sum(1 for g in sets if g.family == fam),
                         "charge_name": CHARGE_NAMES.get(fam, f"{fam} charge"),
                         "charge": distribution(torch.cat(vals)) if vals else None,
                         "has_charge": fam in charge_mods,
                         "flagged_layers": sum(1 for e in layers if e["family"] == fam and e["flagged"])}
    identities_pass = report_ident["pass"] if report_ident is not None else None
    ok = not flagged and identities_pass is not False
    seconds["total"] = time.perf_counter() - t_all
    out = {
        "format": FORMAT, "version": VERSION,
        "checkpoint": checkpoint.describe() if checkpoint is not None else None,
        "model": dict(info or {}, parameters=sum(p.numel() for p in model.parameters()),
                      dtype=str(weight_dtype).replace("torch.", "")),
        "batch": int(inputs.shape[0]), "loss": loss_now,
        "init": None if init_params is None else {"path": init_ckpt.path if init_ckpt else None, "step": start},
        "hyper": hyper.describe() if hyper is not None else None,
        "records": records.describe() if records is not None else None,
        "identities": report_ident,
        "function_vs_init": func_vs_init,
        "families": families,
        "layers": layers,
        "buffers": {"kinds": sorted(buffers), "note": buf_note if not buffers else ""},
        "flagged": flagged,
        "blocked": [{"node": b.node, "reason": b.reason} for b in symmetries.blocked],
        "notes": notes + (checkpoint.notes if checkpoint is not None else []),
        "pass": ok, "exit_code": 0 if ok else 1,
        "safety_factor": SAFETY,
        "seconds": seconds,
    }
    return _jsonable(out)
