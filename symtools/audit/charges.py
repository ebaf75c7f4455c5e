"""Per-group charges of every symmetry group set of a model, and their distributions per layer.

For a family with generated code ``M`` (``symtools.codegen.generated.<family>``) the charge of group k is
``Q_k = Σ_slots Σ_elements M.CHARGE_DENSITY[slot](θ)`` over the elements of group k
(:func:`symtools.numeric.groupops.charges`: one generated call per slot and tensor, no loop over groups).
For the built-in families this is the translation sum Σθ_A, the scale norm |θ_A|² and the rescale imbalance
|θ_in|² − |θ_out|²; a declared family gets whatever charge its derivation found (none: it is skipped).

The same densities are summed with absolute values (``Σ|density|``): the size of the terms the charge adds,
which sets the round-off scale of a comparison (:mod:`symtools.audit.compare`). Everything is computed in
float64 from float64 copies of the weights, so charges of float32 weights are exact up to float64 round-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Iterable, Mapping

import torch
from torch import Tensor

from symtools.nn.groups import GroupSet
from symtools.numeric import groupops

__all__ = ["LayerCharges", "CHARGE_NAMES", "group_charges", "charge_scale", "distribution", "as_float64",
           "family_charge_modules"]

#: what each built-in charge is called in reports (a label only; the values come from the generated code)
CHARGE_NAMES = {"translation": "translation sum Σθ", "scale": "scale norm |θ|²",
                "rescale": "rescale imbalance |θ_in|² − |θ_out|²", "rescale2": "imbalance |θ_in|² − 2|θ_out|²"}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class LayerCharges:
    """The charges of the ``count`` groups of one group set (float64, on the CPU)."""

    family: str
    layer: str
    count: int
    params: list[str]
    values: Tensor
    scale: Tensor  # Σ|density| per group

    @property
    def key(self) -> tuple[str, str]:
        return self.family, self.layer


def as_float64(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached float64 CPU copies (exact for float32/bfloat16/float16 weights)."""
    return {k: v.detach().to(device="cpu", dtype=torch.float64) for k, v in params.items()}


def family_charge_modules(group_sets: Iterable[GroupSet], modules: Mapping[str, ModuleType] | None = None
                          ) -> tuple[dict[str, ModuleType], dict[str, str]]:
    """``({family: generated module with a charge}, {family: why it has none})`` for the families present."""
    found, skipped = {}, {}
    for gs in group_sets:
        if gs.family in found or gs.family in skipped:
            continue
        module = (modules or {}).get(gs.family) or groupops.family_module(gs.family)
        if getattr(module, "CHARGE_DENSITY", None) is None:
            skipped[gs.family] = getattr(module, "NO_CHARGE_REASON", None) or "the derivation found no charge"
        else:
            found[gs.family] = module
    return found, skipped


def charge_scale(module: ModuleType, gs: GroupSet, params: Mapping[str, Tensor]) -> Tensor:
    """Σ over the group's elements of |charge density| (float64, per group)."""
    total = torch.zeros(gs.count, dtype=torch.float64)
    for _, _, q in groupops.evaluate(module, "charge_density", gs, params):
        total += q.to(torch.float64).abs().sum(dim=1).cpu()
    return total


def group_charges(group_sets: Iterable[GroupSet], params: Mapping[str, Tensor],
                  modules: Mapping[str, ModuleType] | None = None) -> list[LayerCharges]:
    """The charge of every group, one :class:`LayerCharges` per group set (families without a charge skipped).

    ``params`` maps parameter names to tensors (any float dtype; they are copied to float64 first unless
    already float64 on the CPU).
    """
    sets = list(group_sets)
    p64 = {k: (v if v.dtype == torch.float64 and v.device.type == "cpu" else v.detach().to("cpu", torch.float64))
           for k, v in params.items()}
    mods, _ = family_charge_modules(sets, modules)
    out = []
    for gs in sets:
        module = mods.get(gs.family)
        if module is None:
            continue
        total = torch.zeros(gs.count, dtype=torch.float64)
        size = torch.zeros(gs.count, dtype=torch.float64)
        for _, _, q in groupops.evaluate(module, "charge_density", gs, p64):  # = groupops.charges, plus Σ|q|
            q = q.to(torch.float64)
            total += q.sum(dim=1).cpu()
            size += q.abs().sum(dim=1).cpu()
        out.append(LayerCharges(gs.family, gs.layer, gs.count, gs.params(), total, size))
    return out


def distribution(values: Tensor) -> dict[str, float]:
    """count, mean, std (population), min, max and the 5/25/50/75/95 % quantiles of a 1-D tensor."""
    v = values.detach().to(torch.float64).flatten()
    n = int(v.numel())
    if n == 0:
        return {"count": 0}
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64))
    out = {"count": n, "mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min()),
           "max": float(v.max())}
    out.update({f"q{int(round(p * 100)):02d}": float(x) for p, x in zip(QUANTILES, q)})
    return out
