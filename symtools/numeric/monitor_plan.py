"""What the monitor computes at every step, laid out once per (model, optimizer): the plan of the fused core.

Every monitored group of every family gets one *column* (families in name order, then their sites in the order
the graph walk found them, then the groups of a site). Each step then works on whole rows over those columns:

* the *terms* a family's law reads (its state Q, P, R … and measured terms M1, G, C …, and after the step the
  charge, Σ|q| and the continuous theory's U) are per-column sums of elementwise densities. The densities are
  polynomials in the slot's own θ, g, b, d (``MONOMIALS`` / ``CHARGE_MONOMIALS``, decided symbolically at code
  generation), so a pass evaluates each distinct monomial once over the flat vectors of all monitored tensors,
  adds it into per-(slot, column) sums with one ``index_add_`` per membership layer (:mod:`symtools.numeric.flat`),
  and one matrix product with the coefficients gives every term of every family (:class:`TermMatrix`);
* the laws advance all families with one batched product (:mod:`symtools.numeric.law_matrices`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet
from symtools.numeric import native
from symtools.numeric.compiled_sums import CompiledSums
from symtools.numeric.flat import (
    ACC,
    FlatLayout,
    FlatSources,
    MembershipLayers,
    Monomial,
    reduce_monomials,
)
from symtools.numeric.groupops import ViewCache, elements_per_group
from symtools.numeric.law_matrices import LawBank

#: How per-group sums are reduced: "flat" (monomials over flat copies, one scatter-add per layer: a fixed
#: handful of kernels, the device path), "sites" (the generated densities site by site over the live tensors
#: in cache-sized blocks, eager PyTorch) or "compiled" (each live tensor read once by a C loop emitted for its
#: monomials and compiled for this machine: :mod:`symtools.numeric.compiled_sums`, CPU only). The default is
#: "flat" on a GPU; on the CPU "compiled" where a C compiler works, "sites" where none does.
REDUCERS = ("flat", "sites", "compiled")
#: reducers that read the live tensors (and, for the displacement, the monitor's copy of θ before the step)
LIVE_REDUCERS = ("sites", "compiled")


def default_reducer(device: torch.device) -> str:
    """The reducer a monitor uses when none is asked for (see :data:`REDUCERS`)."""
    if device.type != "cpu":
        return "flat"
    return "compiled" if native.available() else "sites"


@dataclass
class Site:
    """One monitored group set; ``index`` is its position in the monitor's site list (the records' index)."""

    index: int
    gs: GroupSet
    family: str
    cols: slice = field(default_factory=lambda: slice(0, 0))
    single_element: bool = False
    #: one param group's part of a group set whose tensors sit in param groups with different hyper-parameters
    #: (:func:`symtools.numeric.monitor_laws.split_by_param_group`): laws yes, continuous theory no
    part: bool = False


@dataclass
class Family:
    """A family's modules, sites and columns."""

    name: str
    charge: ModuleType
    law: ModuleType | None
    sites: list[Site] = field(default_factory=list)
    cols: slice = field(default_factory=lambda: slice(0, 0))

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.charge.SLOTS)


def charge_module(family: str) -> ModuleType:
    return importlib.import_module(f"symtools.codegen.generated.{family}")


def law_module(family: str, law: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"symtools.codegen.generated.law_{family}_{law}")
    except ModuleNotFoundError:
        return None


class ColumnLayout:
    """Sites and families in column order, and per-column integer maps (family, site)."""

    def __init__(self, sites: Sequence[Site], laws: dict[str, ModuleType | None], params):
        self.families: dict[str, Family] = {}
        for s in sites:
            fam = self.families.get(s.family)
            if fam is None:
                fam = self.families[s.family] = Family(s.family, charge_module(s.family), laws.get(s.family))
            fam.sites.append(s)
        self.families = dict(sorted(self.families.items()))
        k = 0
        for fam in self.families.values():
            start = k
            for s in fam.sites:
                s.cols = slice(k, k + s.gs.count)
                s.single_element = elements_per_group(s.gs, params) == 1
                k += s.gs.count
            fam.cols = slice(start, k)
        self.columns = k
        self.sites = sorted(sites, key=lambda s: s.index)
        self.slot_max = max((len(f.slots) for f in self.families.values()), default=1)

    def column_order(self) -> list[Site]:
        return [s for fam in self.families.values() for s in fam.sites]

    def per_column(self, values_per_site: dict[int, float], device, dtype=ACC) -> torch.Tensor:
        """A per-site value repeated over the site's columns (built on the host in one piece)."""
        order = self.column_order()
        vals = np.repeat(np.array([float(values_per_site.get(s.index, 0.0)) for s in order]),
                         [s.gs.count for s in order])
        return torch.from_numpy(vals).to(device=device, dtype=dtype)

    def family_ids(self, device) -> torch.Tensor:
        ids = {s.index: i for i, fam in enumerate(self.families.values()) for s in fam.sites}
        return self.per_column(ids, device, torch.long)

    def site_ids(self, device) -> torch.Tensor:
        """Per column, the position of its site in :attr:`sites` (the records' order)."""
        return self.per_column({s.index: j for j, s in enumerate(self.sites)}, device, torch.long)


@dataclass
class TermMatrix:
    """Terms (rows) as coefficient × per-(slot, column) monomial sums: terms = (W @ R) * mask."""

    names: list[tuple[str, str]]          # (family, term) of each row
    monomials: list[Monomial]
    W: torch.Tensor                       # (rows, monomials · (slot_max + 1))
    mask: torch.Tensor                    # (rows, columns): 1 on the row's family's columns
    functions: list[tuple] = field(default_factory=list)  # (slot → generated function, slot → argument names)
    absolute: list[bool] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        return {src for m in self.monomials for src in m.sources()}


def term_matrix(layout: ColumnLayout, rows: Sequence[tuple[str, str, dict, bool, tuple]], device) -> TermMatrix:
    """``rows``: (family, term name, slot → monomial table, absolute, (functions, args)) — absolute: Σ|c|·|m|
    (a size, not a sum); the generated functions of the same density serve :func:`site_terms`."""
    monomials: dict[Monomial, int] = {}
    entries = []
    for r, (fam, name, table, absolute, _) in enumerate(rows):
        family = layout.families[fam]
        for s_idx, slot in enumerate(family.slots):
            terms = table.get(slot)
            if terms is None and slot in table:
                raise SymtoolsError(f"{fam}: the density of {name} on slot {slot} is not a polynomial in the slot's "
                                    "own θ, g, b, d: the fused monitor cannot reduce it")
            for exps, coeff in terms or ():
                odd = any(k % 2 for k in exps)
                m = Monomial(tuple(exps), absolute and odd)
                j = monomials.setdefault(m, len(monomials))
                entries.append((r, j, s_idx, abs(coeff) if absolute else coeff))
    width = layout.slot_max + 1
    W = torch.zeros((len(rows), len(monomials) * width), dtype=ACC)
    for r, j, s_idx, c in entries:
        W[r, j * width + s_idx] += c
    mask = torch.zeros((len(rows), layout.columns), dtype=ACC)
    for r, (fam, *_rest) in enumerate(rows):
        mask[r, layout.families[fam].cols] = 1.0
    return TermMatrix([(f, n) for f, n, *_ in rows], list(monomials), W.to(device), mask.to(device),
                      [r[4] for r in rows], [r[3] for r in rows])


def site_terms(tm: TermMatrix, layout: ColumnLayout, cache) -> torch.Tensor:
    """The same matrix as the flat reduction, site by site with the generated density functions
    (:func:`symtools.numeric.groupops.reduce_terms`: tensors in their own memory order, in cache-sized blocks,
    float32 products summed in float64) — the CPU's reducer where no C compiler works (scatter-adds are slow
    there; blocks stay in cache). An absolute row is Σ|density| (the sizes the reduction returns)."""
    from symtools.numeric.groupops import reduce_terms

    out = torch.zeros_like(tm.mask)
    by_family: dict[str, list[int]] = {}
    for r, (fam, _) in enumerate(tm.names):
        by_family.setdefault(fam, []).append(r)
    for fam, rows in by_family.items():
        todo, sized = {}, set()
        for r in rows:
            key = tm.names[r][1].strip("|")
            todo[key] = tm.functions[r]
            if tm.absolute[r]:
                sized.add(key)
        for site in layout.families[fam].sites:
            totals, sizes = reduce_terms(todo, site.gs, cache, sized=sized)
            for r in rows:
                key = tm.names[r][1].strip("|")
                out[r, site.cols] = sizes[key] if tm.absolute[r] else totals[key]
    return out


def compiled_sums(tm: TermMatrix, layout: ColumnLayout, params, copies=()) -> CompiledSums:
    """The compiled reducer of ``tm``: each slot of each site reads only the monomials its family's rows of
    ``tm.W`` use on that slot; its kernels also copy the values of ``copies`` (see :class:`CompiledSums`)."""
    width = layout.slot_max + 1
    W = tm.W.detach().cpu()
    memberships = []
    for fam in layout.families.values():
        rows = [r for r, (f, _) in enumerate(tm.names) if f == fam.name]
        if not rows:
            continue
        for s_idx, slot in enumerate(fam.slots):
            used = tuple(j for j in range(len(tm.monomials)) if bool(W[rows, j * width + s_idx].ne(0).any()))
            if not used:
                continue
            for site in fam.sites:
                for ts in site.gs.slots.get(slot, ()):
                    memberships.append((ts.param, ts.axis, ts.shape, s_idx * layout.columns + site.cols.start, used))
    sums = CompiledSums(tm.monomials, memberships, params, width * max(layout.columns, 1), copies)
    sums.tm = tm
    return sums


def membership(layout: ColumnLayout, flat: FlatLayout) -> MembershipLayers:
    """Element → reduction column ``slot · columns + group column``; elements of no slot go to the dump column."""
    entries = []
    for fam in layout.families.values():
        for s_idx, slot in enumerate(fam.slots):
            for site in fam.sites:
                for ts in site.gs.slots.get(slot, ()):
                    entries.append((ts, s_idx * layout.columns + site.cols.start))
    return MembershipLayers.build(flat, entries, layout.slot_max * layout.columns,
                                  (layout.slot_max + 1) * max(layout.columns, 1))


def monitored_params(sites: Sequence[Site]) -> list[str]:
    return list(dict.fromkeys(p for s in sites for p in s.gs.params()))


class FusedPlan:
    """The static part of the fused core for one (model, optimizer): layout, term matrices, law bank, buffers."""

    def __init__(self, sites: list[Site], laws: dict, params: dict[str, Tensor], reducer: str | None = None):
        self.layout = ColumnLayout(sites, laws, params)
        some = next(iter(params.values()))
        self.device = some.device
        self.reducer = reducer or default_reducer(self.device)
        if self.reducer not in REDUCERS:
            raise SymtoolsError(f"unknown reducer {self.reducer!r}; choose one of {', '.join(REDUCERS)}")
        if self.reducer == "compiled" and self.device.type != "cpu":
            raise SymtoolsError(f"the compiled reducer runs on the CPU, the model is on {self.device}: use the "
                                "flat reducer (the default there)")
        if self.reducer == "compiled" and not native.available():
            raise SymtoolsError(f"the compiled reducer needs a working C compiler ({native.unavailable_reason()}); "
                                "use the sites reducer")
        dev = self.device
        fams = self.layout.families
        self.bank = LawBank({f.name: f.law for f in fams.values() if f.law is not None})
        # before the step: the law's state rows, then its measured rows (the bank's order)
        rows = [(fam, n, fams[fam].law.MONOMIALS[n], False, _law_density(fams[fam].law, n))
                for fam, n in self.bank.state_names() + self.bank.measured_names()]
        self.before_rows = rows
        self.before = term_matrix(self.layout, rows, dev) if rows else None
        # after the step: per family the charge and Σ|q|; then what the continuous theories read after the step
        after = []
        for f in fams.values():
            q = (f.charge.CHARGE_DENSITY, f.charge.ARGS["charge_density"])
            after += [(f.name, "Q", f.charge.CHARGE_MONOMIALS, False, q), (f.name, "|Q|", f.charge.CHARGE_MONOMIALS, True, q)]
        measured_before = set(self.bank.measured_names())
        self.cont_after = [(fam, n) for fam, n in self.bank.cont_measured_names() if (fam, n) not in measured_before]
        after += [(fam, n, fams[fam].law.MONOMIALS[n], False, _law_density(fams[fam].law, n))
                  for fam, n in self.cont_after]
        self.after_rows = after
        self.after = term_matrix(self.layout, after, dev)
        # where each continuous measured term comes from: a before-measured row or an after-measured row
        # (the rows of cat([measured before the step, measured after]), in the bank's order)
        pool = self.bank.measured_names() + [(r[0], r[1]) for r in after]
        self.cont_rows = torch.tensor([pool.index(k) for k in self.bank.cont_measured_names()], dtype=torch.long,
                                      device=dev)
        nf = len(fams)
        sel = torch.zeros((2, len(after)), dtype=ACC)
        for i in range(nf):
            sel[0, 2 * i], sel[1, 2 * i + 1] = 1.0, 1.0
        self.charge_select = sel.to(dev)
        self.q_select = self._selector(self.bank.q_rows(), self.bank.n_state)
        self.qc_select = self._selector([r for r in self.bank.qc_rows() if r is not None], self.bank.n_cont)
        # per-column constants
        lay = self.layout
        self.family_id = lay.family_ids(dev)
        self.site_id = lay.site_ids(dev)
        factor = {s.index: (fams[s.family].law.CHARGE_FACTOR if fams[s.family].law is not None else 1.0)
                  for s in lay.sites}
        if any(v is None for v in factor.values()):
            raise SymtoolsError("a law's Q is not a constant multiple of its family's charge (CHARGE_FACTOR)")
        self.factor = lay.per_column(factor, dev)
        self.single = lay.per_column({s.index: float(s.single_element) for s in lay.sites}, dev)
        # flat buffers
        names = monitored_params(lay.sites)
        self.flat_layout = FlatLayout(params, names)
        used = (self.before.sources if self.before else set()) | self.after.sources
        kinds = ["theta", "theta_next", *(k for k in ("g", "b", "d") if k in used)]
        self.needs_displacement = "d" in used
        self.layers = None
        if self.reducer in LIVE_REDUCERS:  # the live tensors are read in place (displacement: Monitor._theta_before)
            kinds = []
        else:
            self.layers = membership(lay, self.flat_layout)
        if "u" in used:
            raise SymtoolsError("a law reads the applied update u: only laws that close are monitored")
        self.sources = FlatSources(self.flat_layout, kinds) if kinds else None
        self.scratch: dict = {}
        # the compiled reducer: one per term matrix; the kernels before the step also copy θ for the displacement
        self.compiled: dict[int, CompiledSums] = {}
        self.copied_by_kernels: set[str] = set()
        self._params = {n: params[n] for n in names}
        if self.reducer == "compiled":
            copies = names if self.needs_displacement else ()
            for tm in (self.before, self.after):
                if tm is not None:
                    self.compiled[id(tm)] = compiled_sums(tm, self.layout, self._params,
                                                          copies if tm is self.before else ())
            if self.before is not None:
                self.copied_by_kernels = self.compiled[id(self.before)].copied

    def _selector(self, rows: list[int], n: int) -> Tensor:
        out = torch.zeros((1, n), dtype=ACC)
        for r in rows:
            out[0, r] = 1.0
        return out.to(self.device)

    def terms(self, tm: TermMatrix, sources: dict[str, Tensor], live: dict | None = None) -> Tensor:
        """(rows of ``tm``, columns): every term of every family. The flat reducer: one reduction of the
        monomials over ``sources`` (flat vectors) and one product with the coefficients. The live reducers (the
        CPU's) read ``live`` (prefix → tensors by name, as :class:`ViewCache` reads): the compiled one each
        tensor's monomial sums in one C pass, then the same product; the sites one the generated densities."""
        if self.reducer == "sites":
            return site_terms(tm, self.layout, ViewCache(live))
        if self.reducer == "compiled":
            sums = self.compiled.get(id(tm))
            if sums is None or sums.tm is not tm:  # a term matrix other than the plan's own (e.g. a test's sizes)
                sums = compiled_sums(tm, self.layout, self._params)
            R = sums(live)
            return torch.mm(tm.W, R.view(-1, max(self.layout.columns, 1))).mul_(tm.mask)
        R = reduce_monomials(tm.monomials, sources, self.layers, self.sources.chunk, self.scratch)
        view = self.scratch.get(("R view", id(R)))
        if view is None:
            view = self.scratch[("R view", id(R))] = R.view(-1, max(self.layout.columns, 1))
        return torch.mm(tm.W, view).mul_(tm.mask)


def _law_density(law, name: str) -> tuple:
    return law.DENSITY[name], law.ARGS[name]
