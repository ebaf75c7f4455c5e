"""Evaluate a model's loss for identity checks, without side effects on the model.

The symmetry identities (⟨g, v⟩ = 0, H v + K g = 0, the BatchNorm ε law) hold for the loss the network
computes *in training*, i.e. with BatchNorm normalising by the statistics of the current batch. Calling
``model.train()`` gives that math but also (a) updates ``running_mean``, ``running_var`` and
``num_batches_tracked`` at every forward pass and (b) turns dropout on. This module gives the train-mode
BatchNorm math with neither side effect:

- :func:`evaluation_mode` — a context manager: every module in eval mode (dropout off), every BatchNorm
  normalising by batch statistics (``bn="batch"``) or by its running statistics (``bn="eval"``, a negative
  control: the identities do not hold there). On exit each module's ``training`` flag is restored; the
  BatchNorm buffers are never written (not even rewritten with the same value: their ``_version`` counters
  stay unchanged).
- :func:`parameter_dict` — the parameters by name, in ``model.named_parameters()`` order.
- :func:`loss_closure` — ``f(params) -> L(params)`` on one fixed batch, built on
  ``torch.func.functional_call``; ordinary autograd flows through it, so double backward works.

How ``bn="batch"`` is done: a ``_BatchNorm`` module with ``training=True`` and
``track_running_stats=False`` passes ``running_mean=None, running_var=None`` to ``F.batch_norm`` with
``training=True``: normalisation by the biased batch variance, exactly as in training, and no buffer update.
Both attributes are restored on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from symtools.errors import SymtoolsError

__all__ = [
    "BN_MODES",
    "LOSSES",
    "batchnorm_modules",
    "evaluation_mode",
    "loss_closure",
    "parameter_dict",
]

#: Loss functions by name; each maps ``(outputs, targets)`` to the batch mean (PyTorch's default reduction).
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}

#: ``"batch"``: BatchNorm uses batch statistics (the training loss). ``"eval"``: running statistics.
BN_MODES = ("batch", "eval")

LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]


def batchnorm_modules(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``model`` (any ``_BatchNorm`` subclass: 1d/2d/3d, Sync, Lazy), by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise SymtoolsError(f"bn={bn!r} is not a BatchNorm mode; write bn='batch' (batch statistics, the "
                            f"training loss) or bn='eval' (running statistics)")


@contextmanager
def evaluation_mode(model: nn.Module, bn: str = "batch") -> Iterator[nn.Module]:
    """Put ``model`` in the state used to evaluate identities; restore it on exit.

    Inside the block: all modules are in eval mode (dropout and other train-only noise off). With
    ``bn="batch"`` every BatchNorm computes ``y = γ (x − μ_B)/sqrt(σ²_B + ε) + β`` with the batch mean μ_B
    and *biased* batch variance σ²_B (exactly ``F.batch_norm(..., training=True)``) and writes nothing to
    its buffers. With ``bn="eval"`` BatchNorm uses ``running_mean``/``running_var`` (unless the layer was
    built with ``track_running_stats=False``, in which case PyTorch always uses batch statistics).

    On exit, even on an exception: every module's ``training`` flag and every BatchNorm's
    ``track_running_stats`` are restored. Nesting is fine.
    """
    _check_bn(bn)
    training = [(m, m.training) for m in model.modules()]
    bns = [m for _, m in batchnorm_modules(model)]
    tracking = [(m, m.track_running_stats) for m in bns]
    try:
        for m, _ in training:
            m.training = False
        if bn == "batch":
            for m in bns:
                m.training = True
                m.track_running_stats = False
        yield model
    finally:
        for m, flag in tracking:
            m.track_running_stats = flag
        for m, flag in training:
            m.training = flag


def parameter_dict(model: nn.Module, *, clone: bool = False) -> dict[str, Tensor]:
    """``{name: tensor}`` for ``model.named_parameters()``, in that order, detached from autograd.

    Without ``clone`` the tensors share storage with the model (a snapshot of *names*, not of values: an
    optimizer step changes them). With ``clone=True`` they are copies.
    """
    return {name: (p.detach().clone() if clone else p.detach()) for name, p in model.named_parameters()}


def _loss_function(loss: LossSpec) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise SymtoolsError(f"unknown loss {loss!r}; write one of {sorted(LOSSES)} or pass a callable "
                            f"(outputs, targets) -> scalar") from None


def loss_closure(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    loss: LossSpec = "cross_entropy",
    bn: str = "batch",
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """The loss on one fixed batch as a function of the parameters: ``f(params) = loss(model_θ(inputs), targets)``.

    ``params`` maps parameter names (as in ``model.named_parameters()``) to tensors; names left out keep the
    model's own values. The forward pass runs under :func:`evaluation_mode` ``(model, bn)`` through
    ``torch.func.functional_call`` (which only swaps the tensors: ordinary autograd, so
    ``torch.autograd.grad(..., create_graph=True)`` and double backward work). ``loss`` is ``"cross_entropy"``
    (``targets`` are class indices), ``"mse"`` (``targets`` shaped like the outputs), or a callable
    ``(outputs, targets) -> scalar``. With ``bn="batch"`` and a mean-reduced loss, ``f`` is invariant to a
    permutation of the samples of the batch (used by :func:`symtools.numeric.hvp.roundoff_floor`).
    """
    _check_bn(bn)
    loss_fn = _loss_function(loss)
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)

    def f(params: Mapping[str, Tensor]) -> Tensor:
        with evaluation_mode(model, bn):
            outputs = functional_call(model, dict(params), args)
        return loss_fn(outputs, targets)

    return f
