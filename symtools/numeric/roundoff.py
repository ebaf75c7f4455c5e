"""Round-off bounds of the symmetry identities, from the magnitudes of the terms each quantity sums.

A symmetry makes ⟨g, v_k⟩ vanish by a cancellation at one place of the network: a BatchNorm or LayerNorm
projects the mean and the scale out of its input's gradient, the softmax's gradient sums to zero over the
classes, a ReLU unit's incoming and outgoing weight gradients carry the same ``Σ dh·h``. What a computer
returns for ⟨g, v_k⟩ is then not zero but the rounding errors made *from that place down to the
parameters*; errors made before it (further up the backward pass) reach every term of the cancellation
alike and drop out of it. So the round-off of ⟨g, v_k⟩ is bounded by the unit round-off times the
magnitudes of the terms summed from the cancelling operation down to the parameters:

    |fl(⟨g, v_k⟩)| ≤ C·u·T_k,   T_k = Σ_i |v_ki|·A_i,   A_θ = √n_θ · Σ_{samples, positions} D_z ⊗ |x|,

where z = layer(x; θ) is the output of the layer owning θ, and D_z ≥ 0 is the magnitude of the terms
that make up ∂L/∂z at the operation consuming z (through elementwise, pooling and reshaping operations,
which add no sums; :func:`torch.autograd.grad` carries D_z back through them):

- a Linear/Conv consumer y = W·t:         D_t = |W|ᵀ·|∂L/∂y|          (the products of the sum Wᵀ∂L/∂y)
- any other path (attention, products): at least |∂L/∂z| itself (the carry through signed Jacobians can cancel)
- a normalisation consumer x̂ = (t − μ)/σ: D_t = |γ|/σ·(|∂L/∂y| + mean|∂L/∂y| + X̂·mean(|∂L/∂y|·X̂)),
  X̂ = (|t| + |μ|)/σ the terms of t − μ (the three terms of the projection ∂L/∂t, and of its two means)
- the loss: cross-entropy (p − y)/N has terms (p + y)/N (a saturated softmax: p − y ≪ p + y);
  mean squared error 2(o − y)/n has terms 2(|o| + |y|)/n.

For the Hessian identity, projected on a direction u — ρ_k = ⟨Hu, v_k⟩ + ⟨u, K_k g⟩ (+ the ε term) —
the HVP differentiates the same computation along u, so its terms are the tangents of those above, each
product a·b giving |ȧ|·|b| + |a|·|ḃ|. The tangents come from the HVP itself: in the second backward pass
the adjoint of the first pass's ∂L/∂z is the forward tangent ż = ∂_u z, and z's own adjoint is ∂_u(∂L/∂z)
(tensor hooks record both). So the bound of the Hessian test costs no extra HVP.

n_θ is the number of terms summed into one entry of θ's gradient (samples × positions): a sum of n terms
computed in floating point has error ≤ λ·√n·u·Σ|terms| with a probability that grows quickly with λ
(rounding errors as independent random variables, Higham & Mary, SIAM J. Sci. Comput. 2019), where the
worst case n·u is never approached in practice. Measured here (float32 against float64, trained VGG-11-BN,
batch 32): the first convolution's weight gradient, 32,768 terms per entry, has errors up to 44·u·A
without the √n, 0.24·√n·u·A with it. C (the checker's ``SAFETY``) covers λ and the few roundings per
term. The bound is a first-order model, not a certificate; docs/checker.md states what it neglects and the
ratios residual/bound measured on trained VGG weights in float32 and float64.

Parameters of other layers (embeddings, raw parameters used functionally) get no term magnitudes:
``first_order`` leaves them out and the checker falls back to a gradient-sized scale for their groups,
marked as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (_BatchNorm, nn.LayerNorm)


@dataclass
class _Site:
    """One Linear, Conv, BatchNorm or LayerNorm call of the forward pass, with what the hooks saw."""

    name: str
    module: nn.Module
    x: Tensor
    z: Tensor
    batch_stats: bool = True
    dz: Tensor | None = None  # ∂L/∂z (first backward)
    z_dot: Tensor | None = None  # ∂_u z (second backward: adjoint of ∂L/∂z)
    x_dot: Tensor | None = None  # ∂_u x
    dz_dot: Tensor | None = None  # ∂_u (∂L/∂z) (second backward: adjoint of z)


def _abs(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().abs()


def _affine(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """The module's linear map (no bias) with another weight."""
    if isinstance(module, nn.Linear):
        return F.linear(x, w)
    return module._conv_forward(x, w, None)


_CONV_GRADS = {nn.Conv1d: (torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
               nn.Conv2d: (torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
               nn.Conv3d: (torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight)}


def _direct(module) -> tuple | None:
    """The convolution's own backward kernels (input, weight gradient) when it pads with zeros by numbers."""
    grads = _CONV_GRADS.get(type(module))
    if grads is None or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return grads


def _affine_input_terms(module, x: Tensor, w_abs: Tensor, upstream: Tensor) -> Tensor:
    """|W|ᵀ·upstream: the magnitudes of the products whose sum is the input gradient."""
    if isinstance(module, nn.Linear):
        return upstream @ w_abs
    direct = _direct(module)
    if direct is not None:
        return direct[0](x.shape, w_abs, upstream, module.stride, module.padding, module.dilation, module.groups)
    t = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(_affine(module, t, w_abs), t, upstream)
    return out


def _affine_weight_terms(module, x_abs: Tensor, w: Tensor, upstream: Tensor) -> Tensor:
    """Σ_{samples, positions} upstream ⊗ |x|: the magnitudes of the products whose sum is the weight gradient."""
    if isinstance(module, nn.Linear):
        return upstream.reshape(-1, upstream.shape[-1]).T @ x_abs.reshape(-1, x_abs.shape[-1])
    direct = _direct(module)
    if direct is not None:
        return direct[1](x_abs, w.shape, upstream, module.stride, module.padding, module.dilation, module.groups)
    wl = torch.zeros_like(w, requires_grad=True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(_affine(module, x_abs, wl), wl, upstream)
    return out


def _channel_sum(module, t: Tensor) -> Tensor:
    """Sum of an output-shaped tensor over everything but the output-unit axis (a bias's positions)."""
    axis = t.dim() - 1 if isinstance(module, nn.Linear) else 1
    return t.sum([d for d in range(t.dim()) if d != axis])


class _NormGeometry:
    """Reduction axes and parameter broadcasting of a BatchNorm (axis 1 kept) or LayerNorm (last k axes)."""

    def __init__(self, module, x: Tensor):
        if isinstance(module, nn.LayerNorm):
            k = len(module.normalized_shape)
            self.red = tuple(range(x.dim() - k, x.dim()))
            self.lead = tuple(range(x.dim() - k))
            self.view = lambda p: p
        else:
            self.red = tuple(d for d in range(x.dim()) if d != 1)
            self.lead = self.red
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
            self.view = lambda p: p.reshape(shape)

    def mean(self, t: Tensor) -> Tensor:
        return t.mean(self.red, keepdim=True)

    def param_sum(self, t: Tensor) -> Tensor:
        return t.sum(self.lead)


class TermMagnitudes:
    """Forward hooks and tensor hooks that record what the round-off bounds need (see the module docstring).

    Install with :meth:`hooks` around the forward pass of a :class:`~symtools.numeric.second_order.SecondOrder`
    (after its own BatchNorm hooks, so the sites see the outputs it uses); set :attr:`phase` to ``"first"``
    around the first backward and to ``"tangent"`` around the HVP whose bound is wanted.
    ``loss_terms(outputs, targets) -> D`` gives the magnitudes of the terms of ∂L/∂outputs (and
    ``loss_tangent_terms(outputs, targets, tangent)`` those of its derivative); None: |∂L/∂outputs| is used.
    """

    def __init__(self, params: Mapping[str, Tensor], *, bn_batch: bool, weight_decay: float = 0.0,
                 eps_leaves: Mapping[str, Tensor] | None = None):
        self.params = params
        self.bn_batch = bn_batch
        self.weight_decay = weight_decay
        self.eps_leaves = eps_leaves if eps_leaves is not None else {}
        self.sites: list[_Site] = []
        self.phase = "off"
        self.outputs: Tensor | None = None
        self.out_adjoint: Tensor | None = None
        self.out_dot: Tensor | None = None
        self.out_adjoint_dot: Tensor | None = None
        self.first: tuple[dict, dict] | None = None
        self._handles: list = []  # tensor hooks: they close over self, so they are removed by release()

    # -- recording
    def hooks(self, model: nn.Module) -> list:
        return [m.register_forward_hook(self._forward_hook(name)) for name, m in model.named_modules()
                if isinstance(m, AFFINE + NORMS)]

    def _forward_hook(self, name: str) -> Callable:
        def hook(mod, args, output):
            x = args[0]
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            batch = not isinstance(mod, _BatchNorm) or self.bn_batch or mod.training or mod.running_mean is None
            site = _Site(name, mod, x, output, batch_stats=batch)
            self.sites.append(site)
            self._handles.append(output.register_hook(self._adjoint_hook(site, "dz", "z_dot", "dz_dot")))
            if x.requires_grad:
                self._handles.append(x.register_hook(self._adjoint_hook(site, None, "x_dot", None)))
            return None
        return hook

    def _adjoint_hook(self, obj, first: str | None, tangent: str | None, second: str | None) -> Callable:
        """Hook on a forward tensor: in the first backward record its adjoint (``first``) and hook the adjoint
        itself, whose own adjoint in the second backward is the forward tangent (``tangent``); in the second
        backward record the tensor's adjoint again (``second``: the tangent of the first adjoint)."""
        def hook(grad):
            if self.phase == "first":
                if first is not None and getattr(obj, first) is None:
                    setattr(obj, first, grad.detach())
                if tangent is not None and grad.requires_grad:
                    self._handles.append(grad.register_hook(self._tangent_hook(obj, tangent)))
            elif self.phase == "tangent" and second is not None:
                setattr(obj, second, grad.detach())
            return None
        return hook

    def _tangent_hook(self, obj, attr: str) -> Callable:
        def hook(adjoint):
            if self.phase == "tangent":
                setattr(obj, attr, adjoint.detach())
            return None
        return hook

    def watch_outputs(self, outputs: Tensor) -> None:
        """The model's outputs (the loss's input): their adjoints in both passes."""
        self.outputs = outputs
        if outputs.requires_grad:
            self._handles.append(outputs.register_hook(self._adjoint_hook(self, "out_adjoint", "out_dot",
                                                                          "out_adjoint_dot")))

    def release(self) -> None:
        """Remove the tensor hooks and drop the recorded tensors. The hooks live in the autograd graph and
        close over this object, a cycle Python's collector cannot see: without this every check would keep
        its whole graph alive (measured: +300–600 MiB per VGG-11-BN check)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.sites.clear()
        self.outputs = self.out_adjoint = self.out_dot = self.out_adjoint_dot = None
        self.first = None
        self._first_out = {}

    def reset_tangents(self) -> None:
        for s in self.sites:
            s.z_dot = s.x_dot = s.dz_dot = None
        self.out_dot = self.out_adjoint_dot = None

    # -- magnitudes
    def first_order(self, loss_terms: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(A per parameter name, ε-gradient term magnitudes per normalisation name), after the first backward.

        ``loss_terms``: magnitudes of the terms of ∂L/∂outputs (None: |∂L/∂outputs|)."""
        if self.first is None:
            d_out = loss_terms if loss_terms is not None else _abs(self.out_adjoint)
            self.first = self._sweep(d_out, tangent=False, direction=None)
        return self.first

    def second_order(self, loss_tangent_terms: Tensor | None, direction: Mapping[str, Tensor]):
        """(A^H per parameter, E^H per normalisation) for the HVP just computed in ``direction``."""
        d_out = loss_tangent_terms if loss_tangent_terms is not None else _abs(self.out_adjoint_dot)
        return self._sweep(d_out, tangent=True, direction=direction)

    def _sweep(self, d_out: Tensor | None, *, tangent: bool, direction) -> tuple[dict, dict]:
        """Walk the sites from the loss down: D at each consumer's input, carried back to the producer's
        output, then the parameter magnitudes (tangent=False: D, A; tangent=True: D^H, A^H)."""
        mags: dict[str, Tensor] = {}
        eps_mags: dict[str, Tensor] = {}
        upstream = (self.outputs, d_out)  # (tensor, magnitudes of the terms of its adjoint)
        first = self._first_out if tangent else None
        outs: dict[int, Tensor] = {}
        for i in range(len(self.sites) - 1, -1, -1):
            site = self.sites[i]
            d_z = self._carry(upstream, site.z)
            own = site.dz_dot if tangent else site.dz  # the quantity itself: its terms are at least this large
            if d_z is None:  # no consumer seen (an output not reaching the loss through a known path)
                d_z = torch.zeros_like(site.z) if own is None else own.abs()
            elif own is not None:
                # the carry |Jᵀ·D| equals |J|ᵀ·D through masks and routings only; through an op with signed
                # Jacobian entries (attention: the softmax's rows sum to zero) it can cancel to nothing along the
                # very direction a symmetry makes vanish, so it is floored by the quantity's own size
                d_z = torch.maximum(d_z, own.detach().abs())
            outs[i] = d_z
            d_in = self._site(site, d_z, first[i] if first else None, mags, eps_mags, direction)
            upstream = (site.x, d_in)
        if not tangent:
            self._first_out = outs
        if self.weight_decay:  # the gradient of wd/2·|θ|² adds wd·θ (its tangent wd·u)
            for k in mags:
                extra = direction.get(k) if tangent else self.params[k]
                if extra is not None:
                    mags[k] = mags[k] + self.weight_decay * extra.detach().abs()
        return mags, eps_mags

    @staticmethod
    def _carry(upstream: tuple[Tensor | None, Tensor | None], z: Tensor) -> Tensor | None:
        """D at ``z`` from D at a later tensor t = path(z): |∂t/∂z|ᵀ·D through elementwise/pooling/reshape ops
        (their Jacobians are non-negative masks and routings, or diagonal: the absolute value is taken)."""
        t, d = upstream
        if t is None or d is None:
            return None
        if t is z:
            return d
        if not t.requires_grad:
            return None
        (out,) = torch.autograd.grad(t, z, d, retain_graph=True, allow_unused=True)
        return None if out is None else out.abs()

    def _site(self, site: _Site, d_z: Tensor, d_z_first, mags, eps_mags, direction) -> Tensor | None:
        if isinstance(site.module, AFFINE):
            return self._affine_site(site, d_z, d_z_first, mags, direction)
        return self._norm_site(site, d_z, d_z_first, mags, eps_mags, direction)

    def _affine_site(self, site: _Site, d_z, d_z_first, mags, direction) -> Tensor | None:
        m, x = site.module, site.x.detach()
        wname, bname = f"{site.name}.weight", f"{site.name}.bias"
        w = self.params.get(wname, m.weight).detach()
        tangent = d_z_first is not None
        if not tangent:
            a_w = _affine_weight_terms(m, x.abs(), w, d_z)
        else:
            a_w = _affine_weight_terms(m, x.abs(), w, d_z)
            if site.x_dot is not None:
                a_w = a_w + _affine_weight_terms(m, site.x_dot.abs(), w, d_z_first)
        n = math.sqrt(d_z.numel() / d_z.shape[-1 if isinstance(m, nn.Linear) else 1])  # √(terms per entry)
        mags[wname] = a_w * n
        if getattr(m, "bias", None) is not None:
            mags[bname] = _channel_sum(m, d_z) * n
        if not site.x.requires_grad:
            return None
        if not tangent:
            return _affine_input_terms(m, x, w.abs(), _abs(site.dz))
        d_in = torch.zeros_like(x)
        if site.dz_dot is not None:
            d_in = d_in + _affine_input_terms(m, x, w.abs(), site.dz_dot.abs())
        u_w = direction.get(wname)
        if u_w is not None and site.dz is not None:
            d_in = d_in + _affine_input_terms(m, x, u_w.detach().abs(), site.dz.abs())
        return d_in

    def _norm_site(self, site: _Site, d_z, d_z_first, mags, eps_mags, direction) -> Tensor | None:
        m, x = site.module, site.x.detach()
        geo = _NormGeometry(m, x)
        gamma = self.params.get(f"{site.name}.weight")
        g_abs = geo.view(gamma.detach().abs()) if gamma is not None else torch.ones((), dtype=x.dtype)
        dy = _abs(site.dz) if site.dz is not None else torch.zeros_like(x)
        eps = float(m.eps)
        if site.batch_stats:
            mu = geo.mean(x)
            sigma = torch.sqrt(geo.mean((x - mu).square()) + eps)
        else:
            mu = geo.view(m.running_mean.detach().to(x.dtype))
            sigma = geo.view(torch.sqrt(m.running_var.detach().to(x.dtype) + eps))
        xh = (x.abs() + mu.abs()) / sigma  # the terms of x − μ, over σ
        tangent = d_z_first is not None
        if not tangent:
            if site.batch_stats:
                k1 = dy + geo.mean(dy) + xh * geo.mean(dy * xh)
            else:
                k1 = dy
            d_in = g_abs / sigma * k1
            a_g = geo.param_sum(d_z * xh)
            a_b = geo.param_sum(d_z)
            eps_terms = dy * g_abs * xh / (2 * sigma.square())
        else:
            xd = site.x_dot.abs() if site.x_dot is not None else torch.zeros_like(x)
            dyd = site.dz_dot.abs() if site.dz_dot is not None else torch.zeros_like(x)
            gd = direction.get(f"{site.name}.weight")
            gd_abs = geo.view(gd.detach().abs()) if gd is not None else torch.zeros((), dtype=x.dtype)
            if site.batch_stats:
                s = geo.mean(xh * xd)  # ≥ |σ̇|/σ·σ … the terms of σ̇ = mean(x̂·ẋ)
                xh_dot = (xd + geo.mean(xd) + xh * s) / sigma
                k1 = dy + geo.mean(dy) + xh * geo.mean(dy * xh)
                d_in = ((gd_abs + g_abs * s / sigma) / sigma * k1
                        + g_abs / sigma * (dyd + geo.mean(dyd) + xh_dot * geo.mean(dy * xh)
                                           + xh * geo.mean(dyd * xh + dy * xh_dot)))
            else:
                s = torch.zeros_like(sigma)
                xh_dot = xd / sigma
                d_in = (gd_abs * dy + g_abs * dyd) / sigma
            a_g = geo.param_sum(d_z * xh + d_z_first * xh_dot)
            a_b = geo.param_sum(d_z)
            eps_terms = ((dyd * g_abs * xh + dy * gd_abs * xh + dy * g_abs * xh_dot) / (2 * sigma.square())
                         + dy * g_abs * xh * s / sigma.pow(3))
        n = math.sqrt(x.numel() / max(1, a_b.numel()))  # √(terms per parameter entry)
        if gamma is not None:
            mags[f"{site.name}.weight"] = a_g * n
        if self.params.get(f"{site.name}.bias") is not None:
            mags[f"{site.name}.bias"] = a_b * n
        if site.name in self.eps_leaves:
            leaf = self.eps_leaves[site.name]
            e = (geo.param_sum(eps_terms).reshape(leaf.shape) if leaf.numel() > 1
                 else eps_terms.sum().reshape(leaf.shape))
            eps_mags[site.name] = e * math.sqrt(x.numel() / leaf.numel())
        return d_in if site.x.requires_grad else None


# -- the loss's terms (data-driven: a loss name or a callable's ``term_magnitudes`` attribute)

def _cross_entropy_terms(out: Tensor, targets: Tensor) -> Tensor | None:
    """Classes on axis 1: (N, C) logits with (N,) targets, or (N, C, T…) with (N, T…) (a language model's
    (N, V, T)); the mean runs over every target."""
    if out.dim() < 2 or targets.dim() != out.dim() - 1 or targets.is_floating_point():
        return None
    p = torch.softmax(out.detach(), dim=1)
    one_hot = F.one_hot(targets, out.shape[1]).to(p.dtype).movedim(-1, 1)
    return (p + one_hot) / targets.numel()


def _cross_entropy_tangent(out: Tensor, targets: Tensor, out_dot: Tensor) -> Tensor | None:
    if out.dim() < 2:
        return None
    p = torch.softmax(out.detach(), dim=1)
    ld = out_dot.abs()
    return p * (ld + (p * ld).sum(1, keepdim=True)) / (out.numel() // out.shape[1])


def _mse_terms(out: Tensor, targets: Tensor) -> Tensor:
    y = targets if targets.is_floating_point() else F.one_hot(targets, out.shape[-1]).to(out.dtype)
    return 2 * (out.detach().abs() + y.abs()) / out.numel()


def _mse_tangent(out: Tensor, targets: Tensor, out_dot: Tensor) -> Tensor:
    return 2 * out_dot.abs() / out.numel()


LOSS_TERMS = {"cross_entropy": (_cross_entropy_terms, _cross_entropy_tangent), "mse": (_mse_terms, _mse_tangent)}


def loss_terms(loss) -> tuple[Callable | None, Callable | None]:
    """(first-order, tangent) term-magnitude functions of a loss name or a callable that declares them in
    a ``term_magnitudes`` attribute (e.g. ``"mse"``); (None, None) for an undeclared callable."""
    if isinstance(loss, str):
        return LOSS_TERMS.get(loss, (None, None))
    return getattr(loss, "term_magnitudes", (None, None))
