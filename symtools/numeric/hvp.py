"""Gradients and Hessian-vector products of a scalar loss ``f(params)``, by double backward.

Notation: θ the parameters (a ``{name: tensor}`` dict, flattened in its order), L = f(θ), g = ∇L,
H = ∇²L. A *vector* v is a dict with the same names and shapes as θ (names may be missing: zero there).

- :func:`gradient`: g = ∂L/∂θ.
- :func:`hvp`: H v = ∂⟨g(θ), v⟩/∂θ with v held constant (Pearlmutter's trick): one backward pass with
  ``create_graph=True`` builds g as a differentiable function of θ, a second backward pass of the scalar
  ⟨g, v⟩ gives H v. Several vectors reuse the one first-order graph (``retain_graph``): each extra vector
  costs one more second backward pass, not a new forward pass.
- :func:`grad_and_hvp`: g and H v from the same graph. Its forward pass runs under
  :func:`symtools.numeric.conv_hessian.fast_second_order`, so convolutions are differentiated twice with the
  standard convolution kernels (PyTorch's own double backward of a convolution sends part of it through slow
  generic cuDNN kernels: a whole HVP of VGG-16-BN took 1.6× as long on an H100, docs/checker.md section 7).
- :func:`hvp_finite_difference`: (g(θ + h v) − g(θ − h v)) / (2h), a reference for tests. Its error is
  truncation ≈ h² ‖∇³L[v,v,v]‖/6 plus round-off ≈ ε_mach ‖g‖ / h; both are balanced near
  h ≈ ε_mach^(1/3) (relative to ‖θ‖/‖v‖), the default. Only valid where L is smooth on [θ − hv, θ + hv]
  (no ReLU / max-pool kink crossed).
- :func:`roundoff_floor`: a measured estimate of the relative round-off in H v (see its docstring).

Why double backward and not ``torch.func``: double backward is exact (to round-off) through train-mode
BatchNorm, while ``torch.func.hessian`` and ``jacrev(jacrev(f))`` (an inner ``jacrev``, i.e. a vmapped
vjp, differentiated again) give second derivatives of train-mode BatchNorm that are wrong by 10⁻³–10⁻²
relative, even in float64 (measured in torch 2.13; ``tests/test_hvp.py`` documents it). For the same reason
no vmap (``is_grads_batched``) is used over vectors here. Everything runs in the dtype and on the device
of the given tensors; nothing needs CUDA.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from symtools.numeric.conv_hessian import fast_second_order
from symtools.numeric.evaluation import LossSpec, loss_closure, parameter_dict

__all__ = [
    "default_fd_step",
    "grad_and_hvp",
    "gradient",
    "hvp",
    "hvp_finite_difference",
    "relative_difference",
    "roundoff_floor",
]

Params = Mapping[str, Tensor]
Loss = Callable[[Params], Tensor]
Vectors = Union[Params, Sequence[Params]]


def _leaves(params: Params) -> dict[str, Tensor]:
    """Fresh autograd leaves with the values of ``params`` (sharing storage; the caller's tensors untouched)."""
    return {k: p.detach().requires_grad_(True) for k, p in params.items()}


def _as_list(vectors: Vectors) -> tuple[list[Params], bool]:
    if isinstance(vectors, Mapping):
        return [vectors], True
    return list(vectors), False


def _zeros_if_none(grads, leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (torch.zeros_like(p) if gk is None else gk) for (k, p), gk in zip(leaves.items(), grads)}


def gradient(f: Loss, params: Params) -> dict[str, Tensor]:
    """g = ∂f/∂θ at θ = ``params``; a dict with the keys of ``params`` (zeros for unused parameters)."""
    leaves = _leaves(params)
    with torch.enable_grad():  # also works when called under torch.no_grad()
        loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return _zeros_if_none(grads, leaves)


def grad_and_hvp(f: Loss, params: Params, vectors: Vectors) -> tuple[dict[str, Tensor], dict[str, Tensor] | list[dict[str, Tensor]]]:
    """(g, H v) at θ = ``params`` by double backward; one forward and one first-order backward in all.

    g = ∂f/∂θ is computed with ``create_graph=True``; then for each v, H v = ∂/∂θ ⟨g(θ), v⟩ (v constant),
    computed as the vector-Jacobian product of g with v, retaining the first-order graph between vectors.
    ``vectors`` is one dict (returns one dict) or a sequence of dicts (returns a list). Missing names in a
    vector count as zero. All results are detached.
    """
    return _double_backward(f, params, vectors, gradient_values=True)


def hvp(f: Loss, params: Params, vectors: Vectors) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """H v at θ = ``params`` by double backward (see :func:`grad_and_hvp`); one dict or a list, like ``vectors``.

    The gradient is not returned, so the first backward skips the convolution weights' gradient values
    (only their derivatives enter H v; :func:`symtools.numeric.conv_hessian.fast_second_order`): one
    weight-sized product per convolution less than :func:`grad_and_hvp`, same H v.
    """
    return _double_backward(f, params, vectors, gradient_values=False)[1]


def _double_backward(f: Loss, params: Params, vectors: Vectors, gradient_values: bool):
    vlist, single = _as_list(vectors)
    leaves = _leaves(params)
    out: list[dict[str, Tensor]] = []
    with torch.enable_grad():  # also works when called under torch.no_grad()
        with fast_second_order(weight_gradients=gradient_values):  # convolutions: standard kernels only
            loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        # Gradients that do not depend on θ (None, or constant) contribute nothing to H v.
        live = [(k, gk) for k, gk in zip(leaves, grads) if gk is not None and gk.requires_grad]
        for i, v in enumerate(vlist):
            pairs = [(gk, v[k]) for k, gk in live if k in v]
            if not pairs:
                out.append({k: torch.zeros_like(p) for k, p in leaves.items()})
                continue
            # ∂⟨g, v⟩/∂θ as a vector-Jacobian product of g with v (no elementwise g·v and its backward)
            hv = torch.autograd.grad([gk for gk, _ in pairs], list(leaves.values()),
                                     grad_outputs=[vk.to(gk.dtype) for gk, vk in pairs],
                                     retain_graph=i < len(vlist) - 1, allow_unused=True)
            out.append(_zeros_if_none(hv, leaves))
    g = ({k: (torch.zeros_like(p) if gk is None else gk.detach()) for (k, p), gk in zip(leaves.items(), grads)}
         if gradient_values else None)
    return g, (out[0] if single else out)


def _norm(d: Params) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in d.values()))


def default_fd_step(params: Params, vector: Params) -> float:
    """h = ε_mach^(1/3) · max(‖θ‖, 1) / ‖v‖ (ε_mach of the parameters' dtype; 1.0 if v = 0).

    Balances FD truncation (∝ h²) and round-off (∝ ε_mach/h): both ≈ ε_mach^(2/3) relative, ~1e-10 in float64.
    """
    eps = torch.finfo(next(iter(params.values())).dtype).eps
    nv = _norm({k: vector[k] for k in params if k in vector})
    if nv == 0.0:
        return 1.0
    return eps ** (1.0 / 3.0) * max(_norm(params), 1.0) / nv


def hvp_finite_difference(f: Loss, params: Params, vectors: Vectors, h: float | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """H v ≈ (g(θ + h v) − g(θ − h v)) / (2h), central differences of :func:`gradient`.

    Error O(h²) (truncation, ∝ third derivatives) + O(ε_mach/h) (round-off). ``h=None`` uses
    :func:`default_fd_step` per vector. A reference for tests only: it is wrong where a kink (ReLU,
    max-pool) lies within ±h v of θ.
    """
    vlist, single = _as_list(vectors)
    out = []
    for v in vlist:
        step = default_fd_step(params, v) if h is None else h
        plus = {k: p + step * v[k] if k in v else p for k, p in params.items()}
        minus = {k: p - step * v[k] if k in v else p for k, p in params.items()}
        gp, gm = gradient(f, plus), gradient(f, minus)
        out.append({k: (gp[k] - gm[k]) / (2 * step) for k in params})
    return out[0] if single else out


def relative_difference(a: Params, b: Params) -> float:
    """‖a − b‖ / ‖b‖ over all entries of two dicts with the same keys (float64 accumulation); ‖a‖ if b = 0."""
    diff = _norm({k: a[k].double() - b[k].double() for k in b})
    nb = _norm(b)
    return diff / nb if nb > 0 else diff


def roundoff_floor(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    vectors: Vectors | None = None,
    *,
    loss: LossSpec = "cross_entropy",
    bn: str = "batch",
    params: Params | None = None,
    trials: int = 2,
    seed: int = 0,
) -> float:
    """Measured relative round-off of H v: max over ``trials`` of ‖Hv(batch) − Hv(permuted batch)‖ / ‖Hv(batch)‖.

    The loss of a mean-reduced criterion with batch-statistics BatchNorm is a symmetric function of the
    samples, so in exact arithmetic permuting the batch changes nothing; in floating point it changes the
    order of every reduction over the batch (BN statistics, the loss mean, the weight-gradient sums). The
    difference is therefore pure round-off, of the size that any identity residual computed from these
    HVPs carries. It is an *estimate* (one reordering; typically within a small factor of the true error,
    and it can come out 0 for a tiny batch whose reductions are reordered exactly) — callers should set
    tolerances as ``safety · max(floor, ε_mach)``.

    ``vectors=None`` uses one standard-normal vector drawn with ``torch.Generator().manual_seed(seed)``
    (on CPU, then moved); ``params=None`` uses the model's parameters. With several vectors the maximum
    relative difference is returned. The model is not modified.
    """
    if params is None:
        params = parameter_dict(model)
    if vectors is None:
        gen = torch.Generator().manual_seed(seed)
        vectors = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in params.items()}
    vlist, _ = _as_list(vectors)
    reference = hvp(loss_closure(model, inputs, targets, loss, bn), params, vlist)
    n = inputs.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for _ in range(trials):
        perm = torch.randperm(n, generator=gen)
        if n > 1 and bool((perm == torch.arange(n)).all()):
            perm = torch.roll(perm, 1)
        perm = perm.to(inputs.device)
        permuted = hvp(loss_closure(model, inputs[perm], targets[perm], loss, bn), params, vlist)
        worst = max([worst] + [relative_difference(b, a) for a, b in zip(reference, permuted)])
    return worst
