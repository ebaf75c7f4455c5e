"""One first-order graph, many Hessian-vector products — with BatchNorm ε as extra variables.

:class:`SecondOrder` evaluates the loss once at θ on a fixed batch, with every BatchNorm's ε replaced by a
per-channel leaf ε_c (same math as ``F.batch_norm`` in training, see
:func:`symtools.numeric.bn_epsilon.batch_norm_batch_stats`), and keeps the graph of
(g_θ, g_ε) = ∂L/∂(θ, ε) (``create_graph=True``). Then

    hvp(V, w) = ∂/∂θ [ ⟨g_θ, V⟩ + ⟨g_ε, w⟩ ] = H V + ∂θ⟨∂L/∂ε, w⟩

costs one second backward pass each (counted in ``hvps``). The ε part is what makes BatchNorm's scale
identities exact: L(αθ_A; ε) = L(θ_A; ε/α²) gives ⟨g_A, θ_A⟩ + 2ε_c ∂L/∂ε_c = 0 and, differentiating in θ,
H θ_A + g_A + ∂θ(2ε_c ∂L/∂ε_c) = 0. LayerNorm's ε breaks the scale of the layer feeding it in the same way
(one scalar ε per LayerNorm, a leaf of shape (1,)); it is a leaf whatever ``bn`` is.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from symtools.errors import SymtoolsError
from symtools.numeric.bn_epsilon import batch_norm_batch_stats
from symtools.numeric.conv_hessian import fast_second_order
from symtools.numeric.evaluation import (
    _loss_function,
    batchnorm_modules,
    evaluation_mode,
)
from symtools.numeric.roundoff import TermMagnitudes, loss_terms


class SecondOrder:
    """Gradient and HVPs of ``loss(model_θ(inputs), targets) [+ wd/2·|θ|²]`` at the model's parameters.

    ``bn="batch"`` (training math, identities hold) or ``"eval"`` (running statistics; a negative control).
    The model's parameters, buffers and ``training`` flags are left as they were. ``create_graph=False``
    computes the gradients only (first order, about the cost of one training gradient); :meth:`hvp` then
    raises. ``magnitudes=True`` also records what the checker's round-off bounds need
    (:class:`~symtools.numeric.roundoff.TermMagnitudes`; :meth:`term_magnitudes`, :meth:`tangent_hvp`).
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, *, loss="cross_entropy",
                 bn: str = "batch", weight_decay: float = 0.0, params: Mapping[str, Tensor] | None = None,
                 create_graph: bool = True, magnitudes: bool = False):
        self.model = model
        base = dict(model.named_parameters()) if params is None else dict(params)
        self.params = {k: p.detach().requires_grad_(True) for k, p in base.items()}
        self.eps: dict[str, Tensor] = {}
        self.eps_value: dict[str, float] = {}
        loss_fn = _loss_function(loss)
        hooks = []
        if bn == "batch":
            for name, m in batchnorm_modules(model):
                hooks.append(m.register_forward_hook(self._make_hook(name)))
        for name, m in model.named_modules():
            if isinstance(m, nn.LayerNorm):
                hooks.append(m.register_forward_hook(self._make_ln_hook(name)))
            elif rms_epsilon(m) is not None:
                hooks.append(m.register_forward_hook(self._make_rms_hook(name)))
        self.magnitudes = None
        if magnitudes:  # after the normalisation hooks above: the sites see the outputs used
            self.magnitudes = TermMagnitudes(self.params, bn_batch=(bn == "batch"), weight_decay=weight_decay,
                                             eps_leaves=self.eps)
            hooks += self.magnitudes.hooks(model)
        self._loss, self._targets = loss, targets
        try:
            # a graph to differentiate twice: convolutions' second derivatives from the standard kernels
            twice = fast_second_order() if create_graph else contextlib.nullcontext()
            # attention through the math kernel: the fused CPU/GPU kernels have no double backward
            with evaluation_mode(model, bn), twice, sdpa_kernel([SDPBackend.MATH]):
                out = functional_call(model, self.params, (inputs,))
        finally:
            for h in hooks:
                h.remove()
        value = loss_fn(out, targets)
        if weight_decay:
            value = value + 0.5 * weight_decay * sum((p * p).sum() for p in self.params.values())
        self.loss = value.detach()
        self.outputs = out.detach()
        leaves = list(self.params.values()) + list(self.eps.values())
        if self.magnitudes is not None:
            self.magnitudes.watch_outputs(out)
            self.magnitudes.phase = "first"
        try:
            grads = torch.autograd.grad(value, leaves, create_graph=create_graph,
                                        retain_graph=create_graph or magnitudes, allow_unused=True)
        finally:
            if self.magnitudes is not None:
                self.magnitudes.phase = "off"
        n = len(self.params)
        self._g = dict(zip(self.params, grads[:n]))
        self._g_eps = dict(zip(self.eps, grads[n:]))
        self.hvps = 0
        self.create_graph = create_graph

    def _make_hook(self, name: str) -> Callable:
        def hook(mod, args, output):
            x = args[0]
            if name not in self.eps:
                self.eps[name] = torch.full((x.shape[1],), float(mod.eps), dtype=x.dtype, device=x.device,
                                            requires_grad=True)
                self.eps_value[name] = float(mod.eps)
            return batch_norm_batch_stats(x, mod.weight, mod.bias, self.eps[name])
        return hook

    def _make_ln_hook(self, name: str) -> Callable:
        def hook(mod, args, output):
            x = args[0]
            if name not in self.eps:
                self.eps[name] = torch.full((1,), float(mod.eps), dtype=x.dtype, device=x.device,
                                            requires_grad=True)
                self.eps_value[name] = float(mod.eps)
            return _layer_norm(x, len(mod.normalized_shape), mod.weight, mod.bias, self.eps[name])
        return hook

    def _make_rms_hook(self, name: str) -> Callable:
        def hook(mod, args, output):
            x = args[0]
            if name not in self.eps:
                eps = rms_epsilon(mod, x.dtype)
                self.eps[name] = torch.full((1,), eps, dtype=x.dtype, device=x.device, requires_grad=True)
                self.eps_value[name] = eps
            y = rms_norm(x, mod.weight, self.eps[name])
            if not torch.allclose(y.detach().to(output.dtype), output.detach(), rtol=1e-4, atol=1e-5):
                raise SymtoolsError(f"{name} ({type(mod).__name__}) is not x·rsqrt(mean(x²) + ε)·γ: its ε law "
                                    f"cannot be evaluated")
            return y.to(output.dtype) if output.dtype != x.dtype else y
        return hook

    @property
    def grad(self) -> dict[str, Tensor]:
        """g = ∂L/∂θ (detached; zeros for unused parameters)."""
        return {k: (torch.zeros_like(p) if self._g[k] is None else self._g[k].detach())
                for k, p in self.params.items()}

    @property
    def grad_eps(self) -> dict[str, Tensor]:
        """∂L/∂ε_c per BatchNorm (detached)."""
        return {k: (torch.zeros_like(self.eps[k]) if g is None else g.detach()) for k, g in self._g_eps.items()}

    def release(self) -> None:
        """Drop the graph and the magnitude hooks (see :meth:`TermMagnitudes.release`); no HVP afterwards."""
        if self.magnitudes is not None:
            self.magnitudes.release()
            self.magnitudes = None
        self._g = {k: (None if g is None else g.detach()) for k, g in self._g.items()}
        self._g_eps = {k: (None if g is None else g.detach()) for k, g in self._g_eps.items()}
        self.create_graph = False

    def term_magnitudes(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Round-off scales of the gradient (:meth:`TermMagnitudes.first_order`); needs ``magnitudes=True``."""
        first, _ = loss_terms(self._loss)
        d = first(self.outputs, self._targets) if first is not None else None
        return self.magnitudes.first_order(d)

    def tangent_hvp(self, direction: Mapping[str, Tensor]):
        """(H u, ∂ε⟨g_θ, u⟩ per ε leaf, A^H, E^H): one HVP along ``direction`` with the term magnitudes of
        its computation (:meth:`TermMagnitudes.second_order`); needs ``magnitudes=True``."""
        mags = self.magnitudes
        self.term_magnitudes()
        mags.reset_tangents()
        mags.phase = "tangent"
        try:
            hv, h_eps = self.hvp(direction, with_eps=True)
        finally:
            mags.phase = "off"
        _, tangent = loss_terms(self._loss)
        d = (tangent(self.outputs, self._targets, mags.out_dot) if tangent is not None and mags.out_dot is not None
             else None)
        a_h, e_h = mags.second_order(d, direction)
        return hv, h_eps, a_h, e_h

    def hvp(self, vector: Mapping[str, Tensor], eps_weights: Mapping[str, Tensor] | None = None,
            with_eps: bool = False):
        """H V + ∂θ⟨∂L/∂ε, w⟩ (all parameters; zeros where nothing depends). One second backward pass.
        ``with_eps``: also return ∂ε(⟨g_θ, V⟩ + ⟨∂L/∂ε, w⟩) per ε leaf (the mixed second derivatives)."""
        if not self.create_graph:
            raise RuntimeError("this SecondOrder was built with create_graph=False: gradients only, no HVPs")
        pairs = [(self._g[k], v) for k, v in vector.items()
                 if self._g.get(k) is not None and self._g[k].requires_grad]
        for k, w in (eps_weights or {}).items():
            g = self._g_eps.get(k)
            if g is not None and g.requires_grad:
                pairs.append((g, w))
        self.hvps += 1
        eps_names = list(self.eps) if with_eps else []
        if not pairs:
            zeros = {k: torch.zeros_like(p) for k, p in self.params.items()}
            return (zeros, {k: torch.zeros_like(self.eps[k]) for k in eps_names}) if with_eps else zeros
        # ∂/∂θ Σ⟨g, v⟩ as one vector-Jacobian product of the gradients with the vectors (no elementwise g·v)
        inputs = list(self.params.values()) + [self.eps[k] for k in eps_names]
        out = torch.autograd.grad([g for g, _ in pairs], inputs,
                                  grad_outputs=[v.to(g.dtype).expand_as(g) for g, v in pairs], retain_graph=True,
                                  allow_unused=True)
        n = len(self.params)
        hv = {k: (torch.zeros_like(p) if o is None else o) for (k, p), o in zip(self.params.items(), out[:n])}
        if not with_eps:
            return hv
        return hv, {k: (torch.zeros_like(self.eps[k]) if o is None else o.detach()) for k, o in zip(eps_names, out[n:])}


def rms_epsilon(module: nn.Module, dtype: torch.dtype = torch.float32) -> float | None:
    """ε of an RMSNorm module (torch's ``nn.RMSNorm``, or a module named ``…RMSNorm`` with a weight and a
    ``variance_epsilon``/``eps``, as Hugging Face writes them) for inputs of ``dtype``, or None for any other
    module."""
    torch_rms = isinstance(module, getattr(nn, "RMSNorm", ()))
    if torch_rms or type(module).__name__.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None and torch_rms:  # torch's default: the machine epsilon of the input's dtype
            eps = torch.finfo(dtype).eps
        if isinstance(eps, (int, float)) and (torch_rms or getattr(module, "weight", None) is not None):
            return float(eps)
    return None


def rms_norm(x: Tensor, weight: Tensor | None, eps: Tensor) -> Tensor:
    """``x·rsqrt(mean(x²) + ε)·γ`` over the last axis, in x's dtype (Hugging Face computes it in float32 even in a
    float64 model: evaluated here in float64, the identities hold to float64 round-off), ε differentiable."""
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _layer_norm(x: Tensor, dims: int, weight: Tensor | None, bias: Tensor | None, eps: Tensor) -> Tensor:
    """``F.layer_norm`` over the last ``dims`` axes (biased variance) with ε a differentiable tensor."""
    axes = tuple(range(x.dim() - dims, x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    centred = x - mean
    y = centred / torch.sqrt(centred.square().mean(dim=axes, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
