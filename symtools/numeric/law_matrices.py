"""The derived per-step laws of many families as matrices: one matrix product advances every group of every family.

A law module (``symtools.codegen.generated.law_<family>_<optimizer>``) certifies with ``LINEAR = True`` that each
of its updates — ``first_step``, ``step``, ``continuous_start``, ``continuous_step`` — is a linear map of the state
and the measured terms whose coefficients depend on the hyper-parameters only (decided symbolically by
:mod:`symtools.codegen.emit_facts`). The map's matrix is then read off by applying the generated function once to
the unit vectors (a batch of basis inputs): no coefficient is re-derived or written here, and the result is exact
up to the rounding of the coefficients themselves.

:class:`LawBank` stacks the laws of several families block-diagonally over global rows: the state rows of all
families, then their measured rows; the continuous theory's state rows, then its measured rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import torch

from symtools.errors import SymtoolsError

HYPER = ("lr", "weight_decay", "momentum", "dampening")


def apply_to_basis(fn: Callable, groups: Sequence[Sequence[str]], outputs: Sequence[str], *hyper) -> np.ndarray:
    """The matrix of the linear ``fn(group_0 dict, group_1 dict, …, *hyper)`` from the concatenated inputs of
    ``groups`` to ``outputs`` (rows), by evaluating it on the unit vectors, all at once."""
    names = [n for g in groups for n in g]
    eye = torch.eye(len(names), dtype=torch.float64)
    args, j = [], 0
    for g in groups:
        args.append({n: eye[j + i] for i, n in enumerate(g)})
        j += len(g)
    out = fn(*args, *hyper)
    return np.stack([torch.as_tensor(out[o], dtype=torch.float64).expand(len(names)).numpy() for o in outputs]) \
        if outputs else np.zeros((0, len(names)))


@dataclass
class FamilyLaw:
    """One family's law module and where its rows sit in the bank."""

    family: str
    law: ModuleType
    state: slice        # its rows among the bank's state rows
    measured: slice     # among the measured rows
    cont_state: slice   # among the continuous state rows (empty without a continuous theory)
    cont_measured: slice

    @property
    def continuous(self) -> bool:
        return bool(self.law.CONTINUOUS_STATE)


class LawBank:
    """Block-diagonal matrices of the laws of ``laws`` (family → module), in that order."""

    def __init__(self, laws: dict[str, ModuleType]):
        self.families: list[FamilyLaw] = []
        s = m = cs = cm = 0
        for fam, law in laws.items():
            if not getattr(law, "LINEAR", False):
                raise SymtoolsError(f"the law of {fam} under {law.OPTIMIZER} is not certified linear (LINEAR): "
                                    "it cannot be advanced as a matrix")
            missing = set(law.FIRST_STATE) - set(law.STATE) | set(law.FIRST_MEASURED) - set(law.MEASURED)
            if missing:
                raise SymtoolsError(f"law of {fam}: the first step reads {sorted(missing)}, which later steps do not")
            ns, nm = len(law.STATE), len(law.MEASURED)
            ncs, ncm = len(law.CONTINUOUS_STATE), len(law.CONTINUOUS_MEASURED)
            self.families.append(FamilyLaw(fam, law, slice(s, s + ns), slice(m, m + nm), slice(cs, cs + ncs),
                                           slice(cm, cm + ncm)))
            s, m, cs, cm = s + ns, m + nm, cs + ncs, cm + ncm
        self.n_state, self.n_measured, self.n_cont, self.n_cont_measured = s, m, cs, cm
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def state_names(self) -> list[tuple[str, str]]:
        return [(f.family, n) for f in self.families for n in f.law.STATE]

    def measured_names(self) -> list[tuple[str, str]]:
        return [(f.family, n) for f in self.families for n in f.law.MEASURED]

    def cont_measured_names(self) -> list[tuple[str, str]]:
        return [(f.family, n) for f in self.families for n in f.law.CONTINUOUS_MEASURED]

    def q_rows(self) -> list[int]:
        """Index of each family's Q among the state rows."""
        return [f.state.start + list(f.law.STATE).index("Q") for f in self.families]

    def qc_rows(self) -> list[int | None]:
        return [f.cont_state.start + list(f.law.CONTINUOUS_STATE).index("Qc") if f.continuous else None
                for f in self.families]

    def matrices(self, hyper: tuple[float, ...], first: bool) -> tuple[np.ndarray, np.ndarray]:
        """(A, C): state' = A @ [state; measured] for one step with these hyper-parameters (torch's first step
        when ``first``), and cont' = C @ [cont; cont measured] (the continuous theory over the same step)."""
        key = (tuple(float(h) for h in hyper), bool(first))
        if key not in self._cache:
            A = np.zeros((self.n_state, self.n_state + self.n_measured))
            C = np.zeros((self.n_cont, self.n_cont + self.n_cont_measured))
            for f in self.families:
                law = f.law
                names_in = list(law.FIRST_STATE if first else law.STATE)
                meas_in = list(law.FIRST_MEASURED if first else law.MEASURED)
                block = apply_to_basis(law.first_step if first else law.step, [names_in, meas_in], law.STATE, *key[0])
                cols = [f.state.start + list(law.STATE).index(n) for n in names_in]
                cols += [self.n_state + f.measured.start + list(law.MEASURED).index(n) for n in meas_in]
                A[f.state, cols] = block
                if f.continuous:
                    cblock = apply_to_basis(law.continuous_step, [law.CONTINUOUS_STATE, law.CONTINUOUS_MEASURED],
                                            law.CONTINUOUS_STATE, *key[0])
                    ccols = list(range(f.cont_state.start, f.cont_state.stop))
                    ccols += [self.n_cont + f.cont_measured.start + i for i in range(len(law.CONTINUOUS_MEASURED))]
                    C[f.cont_state, ccols] = cblock
            self._cache[key] = (A, C)
        return self._cache[key]

    def start_matrix(self) -> np.ndarray:
        """cont_0 = S @ state_0 (the paper's initial conditions)."""
        S = np.zeros((self.n_cont, self.n_state))
        for f in self.families:
            if f.continuous:
                block = apply_to_basis(lambda st: f.law.continuous_start(st), [f.law.STATE], f.law.CONTINUOUS_STATE)
                S[f.cont_state, f.state] = block
        return S
