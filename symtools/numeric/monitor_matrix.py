"""Per-step laws of the matrix families' charges (attention heads), beside the monitor's elementwise families.

A matrix family's charge is a matrix C(θ) per group (attention_qk: W_QᵀW_Q − W_KᵀW_K), and its conserved
components are Q_k(θ) = ⟨C(θ), S_k⟩ for the symmetric elements S_k of the group's Lie algebra (all symmetric
S for the whole gl; for a rotary commutant, its symmetric part — the antisymmetric elements have Q ≡ 0). Each
Q_k is a quadratic form of θ; write B_k(x, y) for its bilinear form (B_k(x, x) = Q_k(x)).

The per-step law of a quadratic charge under a linear optimizer step depends on the charge only through that
bilinear form: θ' is a linear combination of θ, g and the optimizer's buffer b, so Q(θ') is a combination of
B(θ, θ), B(θ, g), B(g, g), B(θ, b), … with coefficients of the hyper-parameters alone. Those coefficients are the
ones SymPy derived for the elementwise quadratic charge of the ``rescale`` family (its law module
``law_rescale_<optimizer>``): each of that law's terms is, slot by slot, one degree-2 monomial of two sources
with the sign of the charge's own density on that slot, i.e. c·B(s_i, s_j) — which :func:`quadratic_terms`
verifies on the generated module rather than assumes. The matrix laws evaluate the same terms with the matrix
family's bilinear form (polarisation of the generated ``charge``: B(x, y) = ½[C(x + y) − C(x) − C(y)]) and
advance them with the same generated ``step``/``first_step``.

Per step, for every set: the law's state and measured terms from θ, g, b before the step, the prediction, the
charge measured after it, and the residual |measured − predicted| / scale, where the scale is the size of the
products the charge sums (its generated formula on |θ|, slot by slot) plus the law's terms (|A|·|inputs|). With
every term measured the law is an identity of the optimizer's step for any quadratic charge (it tests that the
step is the declared one); the symmetry's content is that the terms the generated law lists in ``PREDICTED``
(⟨g, v⟩: the gradient identity) vanish, so a second prediction sets them to 0 — its residual is round-off for a
symmetry and large for a broken one. Records: stream ``matrix_laws`` (step, then both residuals of each set). A set whose tensors sit in param
groups with different hyper-parameters (a bias without weight decay), or an optimizer without a closed law, is
not followed (a warning says so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from symtools.nn.groups import MatrixGroupSet
from symtools.numeric import record_schema as schema
from symtools.numeric.flat import ACC, SOURCES
from symtools.numeric.law_matrices import apply_to_basis
from symtools.numeric.matrix_slots import SlotLayout, slot_layout
from symtools.numeric.monitor_laws import (  # hyper in monitor_laws.HYPER order
    buffer_key,
    group_signature,
)
from symtools.numeric.monitor_plan import law_module

QUADRATIC_LAW_FAMILY = "rescale"  # the elementwise family whose derived laws are read as quadratic-charge laws


def quadratic_terms(law: ModuleType) -> dict[str, tuple[float, str, str]] | None:
    """name → (c, source_i, source_j) with term = c·B(s_i, s_j), for every state and measured term of ``law``;
    None when some term is not of that form (then the law is not a law of a quadratic charge's bilinear form)."""
    q = law.MONOMIALS["Q"]
    sign = {}
    for slot, monos in q.items():
        if len(monos) != 1 or tuple(monos[0][0]) != (2, 0, 0, 0, 0):
            return None
        sign[slot] = float(monos[0][1])
    out = {}
    for name in dict.fromkeys(tuple(law.STATE) + tuple(law.MEASURED) + tuple(law.FIRST_STATE)
                              + tuple(law.FIRST_MEASURED)):
        found = None
        for slot, monos in law.MONOMIALS[name].items():
            if len(monos) != 1 or sum(monos[0][0]) != 2:
                return None
            exps, coef = tuple(monos[0][0]), float(monos[0][1])
            pair = tuple(s for s, k in zip(SOURCES, exps) for _ in range(k))
            c = coef / sign[slot]
            if found is None:
                found = (c, pair)
            elif found != (c, pair):
                return None
        if found is None or any(s not in ("theta", "g", "b") for s in found[1]):
            return None
        out[name] = (found[0], *found[1])
    return out


@dataclass
class _Set:
    """Matrix sets of one family, shapes, algebra and param group, merged: one batched pass for all their
    groups (every layer of a transformer: no loop over layers on the per-step path)."""

    ms: MatrixGroupSet      # the merged set (groups of every member, in order)
    layout: SlotLayout
    module: ModuleType
    components: Tensor      # (r, h, h): the symmetric elements S_k whose Q_k is recorded
    group: int              # index of the param group all its tensors sit in
    members: list[int]      # indices (into MatrixLaws.members) of the sets merged here
    member_of: Tensor       # (groups,): the member index of every group


def _components(layout: SlotLayout) -> Tensor:
    """The symmetric elements S_k: the upper-triangle unit matrices (E_ij + E_ji, E_ii) for the whole algebra,
    else the linearly independent symmetric parts of the basis (antisymmetric ones give Q ≡ 0)."""
    h = layout.h
    if layout.basis is None:
        idx = torch.triu_indices(h, h)
        s = torch.zeros(idx.shape[1], h, h, dtype=ACC)
        s[torch.arange(idx.shape[1]), idx[0], idx[1]] = 1.0
        s[torch.arange(idx.shape[1]), idx[1], idx[0]] = 1.0
        return s
    sym = (layout.basis + layout.basis.mT).to(ACC) / 2
    flat = sym.reshape(sym.shape[0], -1)
    _, sv, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = sv > 1e-9 * float(sv.max().clamp_min(1e-300)) if sv.numel() else sv > 0
    return vh[keep].reshape(-1, h, h)


class MatrixLaws:
    """The matrix sets' per-step laws for one run (see the module docstring)."""

    def __init__(self, matrix_sets, optimizer, params: Mapping[str, Tensor], kind: str | None,
                 warn: Callable[[str], None], records=None):
        self.sets: list[_Set] = []
        self.worst: dict[str, float | None] = {}
        self.worst_symmetry: dict[str, float | None] = {}
        self._pred: list = []
        self._law_rows: dict[tuple, np.ndarray] = {}
        self._warn = warn
        self.law = law_module(QUADRATIC_LAW_FAMILY, kind) if kind is not None else None
        self.terms = quadratic_terms(self.law) if self.law is not None and getattr(self.law, "LINEAR", False) else None
        if not matrix_sets:
            return
        if self.terms is None:
            warn(f"matrix families (attention heads) are measured by the checker only: no linear law of a quadratic "
                 f"charge under {kind}")
            return
        owner = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
        found: list[tuple[MatrixGroupSet, SlotLayout, Tensor, int]] = []
        for ms in matrix_sets:
            layout = slot_layout(ms, params)
            if not getattr(layout.module, "HAS_CHARGE", False):
                continue
            groups = {owner.get(id(params[n])) for n in layout.params}
            if len(groups) != 1 or None in groups:
                warn(f"{ms.family} at {ms.layer}: its tensors sit in {len(groups)} param groups (e.g. biases without "
                     f"weight decay); its per-step law is not followed")
                continue
            found.append((ms, layout, _components(layout), groups.pop()))
        self.members = [ms for ms, *_ in found]
        for key, idx in _batches(found).items():
            merged = MatrixGroupSet(key[0], f"{len(idx)} sets", tuple(g for i in idx for g in found[i][0].groups),
                                    found[idx[0]][0].stack, found[idx[0]][0].algebra)
            member_of = torch.tensor([i for i in idx for _ in found[i][0].groups])
            layout = slot_layout(merged, params)
            self.sets.append(_Set(merged, layout, layout.module, found[idx[0]][2], key[1], idx, member_of))
            self.worst.setdefault(key[0], None)
        self.stream = None
        if records is not None and self.members:
            columns = schema.matrix_law_columns((ms.family, i, ms.layer) for i, ms in enumerate(self.members))
            self.stream = records.stream(schema.MATRIX_LAWS_STREAM, columns,
                                         "per matrix set: the largest relative residual of the per-step law of its "
                                         "conserved charge components, with every measured term (exact for any "
                                         "quadratic charge: it tests the optimizer's step), and with the terms the "
                                         "gradient identity makes vanish set to 0 (tests the symmetry)")

    # -- the quadratic form
    def _charge(self, s: _Set, x: tuple[Tensor, ...]) -> Tensor:
        return s.module.charge(*x)

    def _bilinear(self, s: _Set, slots: Mapping[str, tuple[Tensor, ...]], i: str, j: str,
                  memo: dict[str, Tensor]) -> Tensor:
        """B(s_i, s_j) by polarisation; ``memo`` keeps C(s) of each single source for the step's other terms."""
        def single(k: str) -> Tensor:
            if k not in memo:
                memo[k] = self._charge(s, slots[k])
            return memo[k]
        if i == j:
            return single(i)
        both = tuple(x + y for x, y in zip(slots[i], slots[j]))
        return (self._charge(s, both) - single(i) - single(j)) / 2

    def _project(self, s: _Set, c: Tensor) -> Tensor:
        return torch.einsum("gij,kij->gk", c, s.components.to(c.device))

    def _scale(self, s: _Set, theta: tuple[Tensor, ...]) -> Tensor:
        zeros = [torch.zeros_like(t) for t in theta]
        total = sum(self._charge(s, tuple(theta[i].abs() if i == j else zeros[i] for i in range(len(theta)))).abs()
                    for j in range(len(theta)))
        return torch.einsum("gij,kij->gk", total, s.components.abs().to(total.device))

    # -- per step
    def before(self, optimizer, params: Mapping[str, Tensor]) -> None:
        self._pred = []
        if not self.sets:
            return
        key = buffer_key(self.law.OPTIMIZER) if self.law is not None else None
        for s in self.sets:
            sig = group_signature(optimizer, s.group, self.law.OPTIMIZER)
            if sig is None:
                self._pred.append(None)
                continue
            _, hyper, first = sig
            src = {"theta": {n: params[n].detach() for n in s.layout.params},
                   "g": {n: (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                         for n in s.layout.params},
                   "b": {n: optimizer.state.get(params[n], {}).get(key, torch.zeros_like(params[n])) if key else
                         torch.zeros_like(params[n]) for n in s.layout.params}}
            slots = {k: tuple(t.detach().to(ACC) for t in s.layout.assemble_tuple(v)) for k, v in src.items()}
            names_s = self.law.FIRST_STATE if first else self.law.STATE
            names_m = self.law.FIRST_MEASURED if first else self.law.MEASURED
            values, memo = {}, {}
            for name in tuple(names_s) + tuple(names_m):
                c, i, j = self.terms[name]
                values[name] = c * self._project(s, self._bilinear(s, slots, i, j, memo))
            fn = self.law.first_step if first else self.law.step
            state = {n: values[n] for n in names_s}
            pred = fn(state, {n: values[n] for n in names_m}, *hyper)["Q"]
            # the symmetry's prediction: the terms the gradient identity makes vanish (law.PREDICTED) set to 0
            zeroed = {n: (torch.zeros_like(values[n]) if n in getattr(self.law, "PREDICTED", {}) else values[n])
                      for n in names_m}
            pred_sym = fn(state, zeroed, *hyper)["Q"]
            if (first, hyper) not in self._law_rows:  # the law's coefficients: once per hyper-parameters
                self._law_rows[(first, hyper)] = apply_to_basis(fn, [list(names_s), list(names_m)], ["Q"], *hyper)[0]
            a = self._law_rows[(first, hyper)]
            sizes = sum(abs(float(a[k])) * values[n].abs() for k, n in enumerate(tuple(names_s) + tuple(names_m)))
            self._pred.append((pred, sizes, pred_sym))

    def after(self, step: int, params: Mapping[str, Tensor]) -> None:
        if not self.sets or not self._pred:
            return
        per_member = torch.full((2, len(self.members)), float("nan"), dtype=ACC)
        for s, pred in zip(self.sets, self._pred):
            if pred is None:
                continue
            theta = tuple(t.detach().to(ACC) for t in s.layout.assemble_tuple({n: params[n] for n in s.layout.params}))
            measured = self._project(s, self._charge(s, theta))
            scale = (self._scale(s, theta) + pred[1]).clamp_min(1e-300)
            res = torch.stack([((measured - p).abs() / scale).amax(dim=1) for p in (pred[0], pred[2])]).cpu()
            into = s.member_of.expand(2, -1)
            per_member.scatter_reduce_(1, into, res, "amax", include_self=False)  # the largest of each member set
            fam = s.ms.family
            for d, key in ((self.worst, 0), (self.worst_symmetry, 1)):
                worst = float(res[key].max()) if res.numel() else 0.0
                d[fam] = worst if d.get(fam) is None else max(d[fam], worst)
        self._pred = []
        if self.stream is not None:
            self.stream.append(np.concatenate([[float(step)], per_member.T.reshape(-1).numpy()]))

    def summary(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for s in self.sets:
            entry = out.setdefault(s.ms.family, {"sets": 0, "groups": 0, "components": 0,
                                                 "max_rel_residual_discrete": None, "max_rel_residual_symmetry": None})
            entry["sets"] += len(s.members)
            entry["groups"] += s.ms.count
            entry["components"] += s.ms.count * s.components.shape[0]
            entry["max_rel_residual_discrete"] = self.worst.get(s.ms.family)
            entry["max_rel_residual_symmetry"] = self.worst_symmetry.get(s.ms.family)
        return out



def _batches(found) -> dict[tuple, list[int]]:
    """Indices of the sets that can share one batched pass, keyed by (family, param group, …): the same family,
    param group, slot shapes and stacking, and the same conserved components."""
    out: dict[tuple, list[int]] = {}
    reps: dict[tuple, Tensor] = {}
    for i, (ms, layout, comps, group) in enumerate(found):
        key = (ms.family, group, tuple(sorted(layout.shapes.items())), tuple(sorted(ms.stack.items())),
               tuple(comps.shape))
        n = 0
        while (key + (n,)) in reps and not torch.equal(reps[key + (n,)], comps):
            n += 1
        reps.setdefault(key + (n,), comps)
        out.setdefault(key + (n,), []).append(i)
    return out
