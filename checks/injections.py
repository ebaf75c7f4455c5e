"""Controlled breakings of one symmetry group (or many), shared by checks/campaign_verdicts.py and
checks/sensitivity.py. Each keeps the model's parameter names, so groups found on the clean model still bind.

- :class:`MixedActivation` replaces an activation: on the channels ``units`` it computes
  ``(1 − s)·relu(x) + s·tanh(x)`` (``s = 1``: tanh), elsewhere ReLU. Breaks the rescale groups of those
  units (tanh(a·z) ≠ a·tanh(z)); nothing else.
- :class:`PartialEvalBN` replaces the activation right after a BatchNorm: on channel ``c`` the BatchNorm's
  output becomes ``(1 − s)·BN_batch(x)_c + s·BN_eval(x)_c`` (running statistics), then ReLU. It reads the
  BatchNorm's input through a forward pre-hook, because the checker swaps the BatchNorm's own output for its
  batch-statistics computation (a forward hook with a differentiable ε) and a change inside the BatchNorm
  would be lost. Breaks the scale and translation groups of channel ``c`` of the layer feeding that
  BatchNorm (running statistics neither scale nor shift with the conv's output); the rescale group of the
  BatchNorm's affine parameters stays exact (the mix is linear in γ_c, β_c).
- :func:`wrong_rescale` is a family module (the format of ``symtools/codegen/generated/*.py``) for a
  rescale set whose declared action on ``x_out`` is ``x_out·a^-(1+s)`` instead of ``x_out/a`` for the
  groups ``rows`` (all groups when ``None``): generator ``v + s·w`` with ``w = (0, −θ_out)`` and the matching
  coupling ``K g``. ⟨g, v + s·w⟩ = −s·⟨g_out, θ_out⟩ ≠ 0. The checker evaluates a family's generator on the
  ``(count, rest)`` view of each tensor (one row per group, ``symtools.numeric.groupops.evaluate``); the
  functions refuse any other shape rather than break the wrong rows.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from symtools.codegen.generated import rescale as _rescale


def _channel_mask(x: torch.Tensor, units, dim: int = 1) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    mask = torch.zeros(x.shape[dim], dtype=torch.bool, device=x.device)
    mask[list(units)] = True
    return mask.reshape(shape)


class MixedActivation(nn.Module):
    """ReLU, except ``(1 − s)·relu + s·tanh`` on the channels ``units`` (all channels when ``None``)."""

    def __init__(self, units=None, s: float = 1.0):
        super().__init__()
        self.units, self.s = units, float(s)

    def forward(self, x):
        mixed = (1 - self.s) * torch.relu(x) + self.s * torch.tanh(x)
        if self.units is None:
            return mixed
        return torch.where(_channel_mask(x, self.units), mixed, torch.relu(x))

    def extra_repr(self) -> str:
        return f"units={self.units}, s={self.s:g}"


class PartialEvalBN(nn.Module):
    """ReLU after ``bn`` whose channel ``c`` is ``(1 − s)·BN_batch + s·BN_eval`` (see the module docstring).
    Holds ``bn`` without registering it (no second name for its parameters)."""

    def __init__(self, bn: _BatchNorm, c: int, s: float):
        super().__init__()
        self._bn = [bn]
        self.c, self.s = int(c), float(s)
        self._x = [None]
        bn.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module, args):
        self._x[0] = args[0]

    def forward(self, y):
        bn, x, c = self._bn[0], self._x[0], self.c
        self._x[0] = None  # no graph kept on the module (the checker deep-copies models)
        xc = x[:, c]
        ev = (xc - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps) * bn.weight[c] + bn.bias[c]
        yc = (1 - self.s) * y[:, c] + self.s * ev
        y = torch.cat([y[:, :c], yc.unsqueeze(1), y[:, c + 1:]], dim=1)
        return torch.relu(y)

    def extra_repr(self) -> str:
        return f"c={self.c}, s={self.s:g}"


def wrong_rescale(s: float, rows=None, count: int | None = None, name: str = "rescale_wrong"):
    """A rescale family module whose ``x_out`` generator is ``−(1 + s)·x_out`` on ``rows`` (see above)."""
    mod = types.ModuleType(name)
    mod.__dict__.update({k: v for k, v in vars(_rescale).items() if not k.startswith("__")})
    mod.NAME = name
    mod.SPEC = f"x_in -> a*x_in; x_out -> x_out*a**(-(1+{s:g})) on groups {rows if rows is not None else 'all'}"

    def factor(x):
        if rows is None:
            return torch.full((x.shape[0], 1), 1.0 + s, dtype=x.dtype, device=x.device)
        if count is not None and x.shape[0] != count:
            raise RuntimeError(f"{name}: expected a ({count}, rest) view, got {tuple(x.shape)}")
        f = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        f[list(rows)] = 1.0 + s
        return f

    def generator__x_out(x_out):
        return -factor(x_out) * x_out

    def hessian_coupling__x_out(x_out, g_x_out):
        return -factor(x_out) * g_x_out  # ∂v_out/∂θ_out = −(1 + s) on the wrong rows

    mod.GENERATOR = {**_rescale.GENERATOR, "x_out": generator__x_out}
    mod.HESSIAN_COUPLING = {**_rescale.HESSIAN_COUPLING, "x_out": hessian_coupling__x_out}
    return mod


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model`` (in place)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def module_order(model: nn.Module) -> list[str]:
    """Names of the leaf modules in definition order (forward order for the VGG Sequentials)."""
    return [n for n, m in model.named_modules() if n and not list(m.children())]


def between(model: nn.Module, layer: str, kinds=(nn.ReLU, MixedActivation, PartialEvalBN, nn.Tanh)) -> list[str]:
    """The modules of type ``kinds`` strictly between the two ends of a group set's ``layer`` ("A → B")."""
    a, _, b = layer.partition(" → ")
    order = module_order(model)
    if a not in order:
        return []
    i = order.index(a)
    j = order.index(b) if b in order else len(order)
    mods = dict(model.named_modules())
    return [n for n in order[i + 1:j] if isinstance(mods[n], kinds)]
