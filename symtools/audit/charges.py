"""Per-group charges of every symmetry group set of a model, and their distributions per layer.

For a family with generated code ``M`` (``symtools.codegen.generated.<family>``) the charge of group k is
``Q_k = Σ_slots Σ_elements M.CHARGE_DENSITY[slot](θ)`` over the elements of group k
(:func:`symtools.numeric.groupops.charges`: one generated call per slot and tensor, no loop over groups).
For the built-in families this is the translation sum Σθ_A, the scale norm |θ_A|² and the rescale imbalance
|θ_in|² − |θ_out|²; a declared family gets whatever charge its derivation found (none: it is skipped).
What a charge is called in reports and figures is written from the module's emitted ``CHARGE_TEXT``
(:func:`charge_formula`, :func:`charge_name`), so a new family is named without a table entry here.

The same densities are summed with absolute values (``Σ|density|``): the size of the terms the charge adds,
which sets the round-off scale of a comparison (:mod:`symtools.audit.compare`). Everything is computed in
float64 from float64 copies of the weights, so charges of float32 weights are exact up to float64 round-off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from symtools.errors import SymtoolsError
from symtools.nn.groups import GroupSet
from symtools.numeric import groupops

__all__ = [
    "CHARGE_WORDS",
    "LayerCharges",
    "as_float64",
    "charge_formula",
    "charge_name",
    "charge_scale",
    "distribution",
    "family_charge_modules",
    "group_charges",
    "matrix_group_charges",
]

#: optional words put before a charge's formula in reports (prose only: a family without an entry is named
#: "<family> charge" and its formula, which always comes from the generated module's CHARGE_TEXT)
CHARGE_WORDS = {"translation": "translation sum", "scale": "scale norm", "rescale": "rescale imbalance"}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _pretty(text: str) -> str:
    """SymPy text with integer powers as superscripts and products as centred dots (x_in**2 → x_in²)."""
    text = re.sub(r"\*\*(\d+)(?![\d.])", lambda m: m.group(1).translate(_SUPERSCRIPTS), text)
    return text.replace("**", "^").replace("*", "·")


def _is_sum(text: str) -> bool:
    return " + " in text or " - " in text


def charge_formula(texts: Mapping[str, str] | None) -> str | None:
    """The charge of a group written from a symmetry module's ``CHARGE_TEXT`` (slot → SymPy text of the charge
    density): one sum over the group's elements per slot, ``Σ x_in² − Σ x_out²`` for rescale,
    ``Σ x_in² − 2·Σ x_out²`` for rescale2. None when there is no text (no charge, or a module emitted before
    ``CHARGE_TEXT``)."""
    if not texts:
        return None
    parts = []
    for text in texts.values():
        if text == "0":
            continue
        sign, body = "+", text
        if body.startswith("-") and not _is_sum(body[1:]):
            sign, body = "−", body[1:]
        coeff = ""
        number = re.fullmatch(r"(\d+(?:\.\d+)?)\*(.+)", body)
        if number and not _is_sum(number.group(2)):
            coeff, body = number.group(1) + "·", number.group(2)
        body = f"({body})" if _is_sum(body) else body
        parts.append((sign, f"{coeff}Σ {_pretty(body)}"))
    if not parts:
        return "0"
    first_sign, first = parts[0]
    return ("−" if first_sign == "−" else "") + first + "".join(f" {sign} {term}" for sign, term in parts[1:])


def charge_name(family: str, module: ModuleType | None = None) -> str:
    """What the charge of ``family`` is called in reports: the optional words of :data:`CHARGE_WORDS` (else
    "<family> charge") and :func:`charge_formula` of its generated module (``module``, else
    ``symtools.codegen.generated.<family>``; no formula when it has no ``CHARGE_TEXT``)."""
    if module is None:
        try:
            module = groupops.family_module(family)
        except SymtoolsError:
            module = None
    formula = charge_formula(getattr(module, "CHARGE_TEXT", None))
    words = CHARGE_WORDS.get(family, f"{family} charge")
    return f"{words} {formula}" if formula else words


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


def matrix_group_charges(matrix_sets: Iterable, params: Mapping[str, Tensor],
                         modules: Mapping[str, ModuleType] | None = None) -> list[dict]:
    """The matrix charges of every :class:`~symtools.nn.groups.MatrixGroupSet` (attention heads, linear pairs),
    JSON-ready, one entry per set: :func:`symtools.numeric.matrix_checks.matrix_charges` in float64 (the
    generated charge Q per group, h×h, or its components ⟨Q, B_k⟩ on a given subalgebra basis with the mask of
    the conserved ones), plus the distribution of the conserved components over groups and entries
    (``charge``) and ``note`` for a family without a charge (rotations: antisymmetric generators)."""
    from symtools.numeric.matrix_checks import matrix_charges

    p64 = {k: (v if v.dtype == torch.float64 and v.device.type == "cpu" else v.detach().to("cpu", torch.float64))
           for k, v in params.items()}
    out = []
    for ms in matrix_sets:
        mc = matrix_charges(p64, ms, modules=modules)
        entry = mc.describe()
        if mc.values is not None:
            vals = mc.values if mc.conserved is None else mc.values[:, mc.conserved & ~mc.trivial]
            entry["charge"] = distribution(vals.reshape(-1))
        else:
            entry["note"] = mc.reason
        out.append(entry)
    return out

