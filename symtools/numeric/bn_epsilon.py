"""The exact breaking of BatchNorm's scale symmetry by ε.

A BatchNorm channel c normalises its input x_c = (θ_A-linear map of the layer input), where θ_A are the
parameters feeding channel c (the conv/linear weight row c and bias c):

    y_c = γ_c (x_c − μ_c) / sqrt(σ²_c + ε_c) + β_c,   μ_c, σ²_c the batch mean and biased batch variance.

Scaling θ_A by α scales x_c, μ_c by α and σ²_c by α², so

    y_c(αθ_A; ε_c) = γ_c (x_c − μ_c) / sqrt(σ²_c + ε_c/α²) + β_c = y_c(θ_A; ε_c/α²),
    L(αθ_A; ε) = L(θ_A; ε/α²)   ⇒ (d/dα at α = 1)   ⟨g_A, θ_A⟩ = −2 ε_c ∂L/∂ε_c.

So the scale "identity" ⟨g_A, θ_A⟩ = 0 is broken by an exactly predictable, ε-sized term. To get ∂L/∂ε_c
each BatchNorm is evaluated (temporarily, through a forward hook) with :func:`batch_norm_batch_stats`, the
same math as ``F.batch_norm(training=True)`` but with ε a per-channel leaf tensor requiring grad. The
identity holds for batch statistics only: running statistics (eval mode) do not scale with θ_A.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from symtools.numeric.evaluation import LossSpec, batchnorm_modules, loss_closure, parameter_dict

__all__ = ["batch_norm_batch_stats", "bn_epsilon_gradients", "predicted_scale_breaking"]


def batch_norm_batch_stats(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Tensor | float) -> Tensor:
    """``γ (x − μ)/sqrt(σ² + ε) + β`` over channel axis 1, μ and σ² (biased, ÷N) over all other axes.

    ``eps`` is a float or a per-channel tensor of shape (C,). Equals ``F.batch_norm(x, None, None, weight,
    bias, training=True, eps=eps)`` to round-off for inputs (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W).
    """
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = centred.square().mean(dim=dims, keepdim=True)
    eps_t = eps.reshape(shape) if isinstance(eps, Tensor) else eps
    y = centred / torch.sqrt(var + eps_t)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def bn_epsilon_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss: LossSpec = "cross_entropy",
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{bn_module_name: ∂L/∂ε_c}`` (shape (C,)) at ε_c = ``module.eps`` for every BatchNorm of ``model``.

    L is the batch-statistics loss of :func:`symtools.numeric.evaluation.loss_closure` (``bn="batch"``) at
    θ = ``params`` (default: the model's parameters). Each BatchNorm's output is replaced, through a forward
    hook removed afterwards, by :func:`batch_norm_batch_stats` with a per-channel ε leaf; the model's
    buffers, ``eps`` and ``training`` flags are left as they were. A BatchNorm the forward pass never reaches
    gets zeros. Combine with :func:`predicted_scale_breaking` to get the predicted ⟨g_A, θ_A⟩.
    """
    bns = batchnorm_modules(model)
    leaves: dict[str, Tensor] = {}

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args, output):
            x = args[0]
            if name not in leaves:
                leaves[name] = torch.full((x.shape[1],), float(mod.eps), dtype=x.dtype, device=x.device,
                                          requires_grad=True)
            return batch_norm_batch_stats(x, mod.weight, mod.bias, leaves[name])
        return hook

    handles = [m.register_forward_hook(make_hook(name, m)) for name, m in bns]
    try:
        with torch.enable_grad():  # also works when called under torch.no_grad()
            f = loss_closure(model, inputs, targets, loss, bn="batch")
            value = f(parameter_dict(model) if params is None else params)
    finally:
        for h in handles:
            h.remove()
    names = list(leaves)
    grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True) if names else []
    result = {n: (torch.zeros_like(leaves[n]) if gr is None else gr) for n, gr in zip(names, grads)}
    for name, m in bns:
        if name not in result:
            p = next(iter(m.parameters()), next(iter(m.buffers()), None))
            kw = {} if p is None else {"dtype": p.dtype, "device": p.device}
            result[name] = torch.zeros(m.num_features, **kw)
    return {name: result[name] for name, _ in bns}


def predicted_scale_breaking(model: nn.Module, eps_grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The predicted value of ⟨g_A, θ_A⟩ per channel: ``−2 ε ∂L/∂ε_c`` for each BatchNorm in ``eps_grads``."""
    modules = dict(model.named_modules())
    return {name: -2.0 * float(modules[name].eps) * d for name, d in eps_grads.items()}
