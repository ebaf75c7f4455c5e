"""Which law advances each monitored column, step by step: param groups → classes → law matrices.

A *class* is a param group that holds a site with a law; its law matrices (:class:`~symtools.numeric.law_matrices.
LawBank`) follow that param group's hyper-parameters at this step (schedules and per-group settings), and
torch's first-step rule while the group's optimizer buffers do not exist yet. A group set whose tensors sit in
param groups that disagree at the start (law or hyper-parameters) is monitored as one part per param group
(:func:`split_by_param_group`); a site whose param groups come to disagree later, or whose group stops following
the run's law, is measured-only from then on. Everything here runs on the host, in Python, and remakes device
tensors only when something changed: the per-step path reads the attributes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from symtools.nn.groups import GroupSet
from symtools.numeric import optimizer_laws
from symtools.numeric.flat import ACC
from symtools.numeric.monitor_plan import FusedPlan, Site

HYPER = ("lr", "weight_decay", "momentum", "dampening")


def buffer_key(law: str) -> str | None:
    """torch's optimizer-state entry of the law's buffer b (None: the law keeps none)."""
    return optimizer_laws.state_entries(law).get("b")


def group_signature(optimizer, i: int, kind: str | None) -> tuple | None:
    """(law, hyper-parameters, first step?) of param group ``i``; None where it follows no closed law or not
    the run's law ``kind``."""
    pg = optimizer.param_groups[i]
    law = optimizer_laws.law_of_group(pg, type(optimizer).__name__)
    if law is None or law != kind:
        return None
    hyper = optimizer_laws.hyper_of_group(pg, law)
    key = buffer_key(law)
    first = key is not None and any(key not in optimizer.state.get(p, {}) for p in pg["params"]
                                    if p.grad is not None)
    return law, tuple(float(hyper.get(k, 0.0)) for k in HYPER), first


def split_by_param_group(gs: GroupSet, optimizer, params, kind: str | None) -> list[GroupSet]:
    """``gs`` itself, or — when its tensors sit in param groups whose law or hyper-parameters differ (a bias
    without weight decay next to decayed weights) — one part per param group, each with the tensors of that
    group (a slot may be empty in a part). The update is elementwise, so the per-step and accumulated laws hold
    exactly on any subset of a group's elements, each part with its own group's hyper-parameters; the
    continuous theory needs the whole group (its ⟨g, v⟩ = 0) and is not followed on parts. Parts are labelled
    ``LAYER [param group i]``."""
    where = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
    index = {ts: where.get(id(params[ts.param])) for slices in gs.slots.values() for ts in slices}
    groups = sorted({i for i in index.values() if i is not None})
    if len(groups) < 2 or None in index.values():
        return [gs]
    signatures = {(group_signature(optimizer, i, kind) or (None,))[:2] for i in groups}
    if len(signatures) < 2:
        return [gs]
    return [replace(gs, slots={slot: tuple(ts for ts in slices if index[ts] == i) for slot, slices in gs.slots.items()},
                    layer=f"{gs.layer} [param group {i}]") for i in groups]


class LawAssignment:
    """Per column: the law's class, and the per-column constants that follow from which sites have a law.

    Attributes the per-step path reads: ``A`` (classes, 3, out, in): per class the law on [state; measured],
    again (for the accumulated law), and |law| (for the size of its terms); ``C`` (classes, out, in): the
    continuous theory; ``onehot`` (classes, 1, K) or None for one class; ``law_nan`` / ``cont_nan`` (1 or NaN per
    column: has a law / a continuous theory); ``F3``, ``Fc`` (the charge factor, NaN where nothing is
    predicted); ``cont_weight``, ``static_drop``, ``site_nan``, ``nan_row``.
    """

    def __init__(self, sites: Sequence[Site], plan: FusedPlan, kind: str | None, optimizer, params,
                 warn: Callable[[str], None], exclude_single: bool):
        self.sites, self.plan, self.kind, self.warn = list(sites), plan, kind, warn
        self.exclude_single = exclude_single
        where = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
        self.site_groups = {s.index: sorted({where[id(params[p])] for p in s.gs.params() if id(params[p]) in where})
                            for s in self.sites}
        self.law_ok = {s.index: plan.layout.families[s.family].law is not None for s in self.sites}
        sigs = self._signatures_of(optimizer)
        for s in self.sites:
            if self.law_ok[s.index] and self._site_signature(sigs, s) is None:
                warn(f"{s.gs.layer}: its tensors sit in param groups with different hyper-parameters; "
                     f"measured-only there")
                self.law_ok[s.index] = False
        self.signatures: tuple | None = None
        self.classes: list[int] | None = None

    @property
    def law_sites(self) -> set[int]:
        return {i for i, ok in self.law_ok.items() if ok}

    def drop(self, indices) -> None:
        """Sites measured-only (e.g. as saved by a checkpoint)."""
        for i in indices:
            self.law_ok[int(i)] = False
        self.classes = None
        self.signatures = None

    # ------------------------------------------------------------------ signatures of param groups
    def _signatures_of(self, optimizer) -> tuple:
        return tuple(group_signature(optimizer, i, self.kind) for i in range(len(optimizer.param_groups)))

    def _site_signature(self, sigs: tuple, s: Site) -> tuple | None:
        mine = {sigs[i][:2] if sigs[i] else None for i in self.site_groups.get(s.index, [])}
        return next(iter(mine)) if len(mine) == 1 and None not in mine else None

    # ------------------------------------------------------------------ per step (host)
    def update(self, optimizer, step: int) -> None:
        """Check the param groups (Python only); remake the matrices when a signature changed, the constants when
        a site went measured-only."""
        sigs = self._signatures_of(optimizer)
        if sigs == self.signatures:
            return
        dropped = False
        for s in self.sites:
            if self.law_ok[s.index] and self._site_signature(sigs, s) is None:
                mine = {sigs[i][:2] if sigs[i] else None for i in self.site_groups.get(s.index, [])}
                why = ("its tensors now sit in param groups with different hyper-parameters" if len(mine) > 1
                       else f"its param group no longer follows {self.kind}")
                self.warn(f"{s.family} at {s.gs.layer}: {why} at step {step}; measured-only there from this step on")
                self.law_ok[s.index] = False
                dropped = True
        self.signatures = sigs
        if dropped or self.classes is None:
            self._layout_constants()
        bank = self.plan.bank
        A, C = [], []
        for pg in self.classes:
            a, c = bank.matrices(sigs[pg][1], sigs[pg][2])
            A.append(a)
            C.append(c)
        if not A:
            A = [np.zeros((bank.n_state, bank.n_state + bank.n_measured))]
            C = [np.zeros((bank.n_cont, bank.n_cont + bank.n_cont_measured))]
        A = np.stack(A)
        self.A = torch.from_numpy(np.stack([A, A, np.abs(A)], axis=1)).to(self.plan.device)
        self.C = torch.from_numpy(np.stack(C)).to(self.plan.device)

    def mix(self, per_class: Tensor) -> Tensor:
        """Each column from its own class's result (a single class: the only one)."""
        if self.onehot is None:
            return per_class[0]
        shape = (self.onehot.shape[0],) + (1,) * (per_class.dim() - 2) + (self.onehot.shape[-1],)
        return per_class.mul_(self.onehot.view(shape)).sum(0)

    def _layout_constants(self) -> None:
        plan = self.plan
        lay = plan.layout
        cls = {s.index: self.site_groups[s.index][0] for s in self.sites if self.law_ok[s.index]}
        self.classes = sorted(set(cls.values()))
        position = {pg: c for c, pg in enumerate(self.classes)}
        law_ok = {s.index: float(self.law_ok[s.index]) for s in self.sites}
        self.onehot = None
        if len(self.classes) > 1:
            column_class = lay.per_column({i: position[pg] for i, pg in cls.items()}, "cpu", torch.long)
            onehot = torch.nn.functional.one_hot(column_class, len(self.classes)).T.to(ACC)
            onehot *= lay.per_column(law_ok, "cpu")
            self.onehot = onehot.unsqueeze(1).to(plan.device)
        continuous = {s.index: law_ok[s.index] * float(bool(lay.families[s.family].law.CONTINUOUS_STATE))
                      * float(not s.part) if lay.families[s.family].law is not None else 0.0 for s in self.sites}
        dev = plan.device
        law = lay.per_column(law_ok, dev)
        cont = lay.per_column(continuous, dev)
        self.law_nan = _nan_where_zero(law)
        self.cont_nan = _nan_where_zero(cont)
        F = plan.factor
        self.F3 = torch.stack([F * self.law_nan, F * self.law_nan, F.abs()])  # predicted, accumulated, size
        self.Fc = F * self.cont_nan
        self.cont_weight = cont
        drop = cont == 0
        if self.exclude_single:
            drop |= plan.single > 0
        self.static_drop = drop
        site_cont = torch.tensor([continuous[s.index] for s in lay.sites], dtype=ACC, device=dev)
        self.site_nan = torch.where(site_cont > 0, 0.0, math.nan)  # added to the excluded counts
        self.nan_row = torch.full_like(F, math.nan)


def _nan_where_zero(x: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, math.nan))
