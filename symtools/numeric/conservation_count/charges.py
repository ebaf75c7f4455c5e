"""The library's Noether charges of a model as functions of the flat θ, and their gradients at θ.

The groups come from the graph walk (:func:`symtools.nn.graph.find_symmetries`), each group's charge from its
family's generated module (:func:`symtools.numeric.groupops.charges`): nothing here restates a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from symtools.nn.graph import find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.numeric.groupops import charges, family_module

from .fields import FlatModel


@dataclass
class LibraryCharges:
    found: SymmetryMap
    labels: list[tuple[str, str, int]]   # (family, layer, index in the group set), one per charge
    gradients: Tensor                    # (c, D): ∇Q_i at θ
    skipped: list[str]                   # group sets whose family declares no charge


def library_charges(flat: FlatModel, example_input: Tensor, loss: str) -> LibraryCharges:
    """All charges of the groups the graph walk binds in ``flat.model`` for ``loss``, with ∇Q at ``flat.theta0``."""
    found = find_symmetries(flat.model, example_input, loss=loss)
    sets, labels, skipped = [], [], []
    for gs in found.group_sets:
        module = family_module(gs.family)
        if getattr(module, "CHARGE_DENSITY", None) is None:
            skipped.append(f"{gs.family} at {gs.layer}")
            continue
        sets.append((module, gs))
        labels += [(gs.family, gs.layer, i) for i in range(gs.count)]
    if not sets:
        return LibraryCharges(found, [], torch.zeros(0, flat.dim, dtype=torch.float64), skipped)
    theta = flat.theta0.clone().requires_grad_(True)
    params = flat.unflatten(theta)
    q = torch.cat([charges(module, gs, params) for module, gs in sets])
    rows = [torch.autograd.grad(q[i], theta, retain_graph=True, allow_unused=True)[0] for i in range(len(q))]
    grads = torch.stack([r if r is not None else torch.zeros_like(theta) for r in rows]).detach()
    return LibraryCharges(found, labels, grads, skipped)
