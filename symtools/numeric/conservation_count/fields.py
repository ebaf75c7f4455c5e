"""The vector fields of gradient flow and of heavy-ball flow on a torch model, and their Lie brackets.

Gradient flow θ' = −∇L(θ) with L(θ) = Σ_x ℓ(f(θ; x), y_x): every such gradient is a combination, with
coefficients that are functions of θ, of the fields X_(x,j)(θ) = ∇_θ f_j(θ; x). A function h is conserved for
every loss iff ∇h ⊥ X_(x,j) for all x, j (Marcotte, Gribonval, Peyré 2023), so the fields are these
parameter-gradients of the outputs. A field with constant coefficients α is X_α(θ) = ∇_θ⟨α, F(θ)⟩ (F: all
outputs on all inputs), the gradient of the linear loss ⟨α, F⟩: one backward pass.

Brackets [X, Y](θ) = DY(θ)·X(θ) − DX(θ)·Y(θ), by forward-mode JVPs of the fields (``torch.func.jvp``); nested
brackets nest JVPs. Every bracket value comes with its *scale* ‖DY·X‖ + ‖DX·Y‖, the size of the terms whose
difference it is (its round-off is relative to that, not to its own, possibly tiny, norm).

Heavy-ball flow (the phase space z = (θ, v)): θ' = v, v' = −γ v − ∇L(θ). Its fields are the drift
D0(z) = (v, −γ v) plus, for the loss part, (0, −∇L(θ)); with the argument above, h(θ, v) is conserved for
every loss iff it is conserved by D0 and by every (0, X_α) (take L = 0, then linear losses; conversely a
combination with θ-dependent coefficients is annihilated too). See docs/commands/laws.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vmap

from symtools.errors import SymtoolsError

Field = Callable[[Tensor], Tensor]


class FlatModel:
    """A float64 copy of ``model`` as a function of one flat parameter vector θ (in ``named_parameters`` order)."""

    def __init__(self, model: torch.nn.Module, centered: bool = False):
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise SymtoolsError("models with BatchNorm are not supported: with batch statistics the outputs of "
                                "one input depend on the others, so the per-input fields are not defined")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).to(torch.float64)
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.centered = centered  # cross-entropy: only differences of logits matter (softmax shift)

    @property
    def dim(self) -> int:
        return int(self.theta0.numel())

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        parts = theta.split(self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, k in zip(self.names, self.numels):
            out[n] = slice(start, start + k)
            start += k
        return out

    def outputs(self, theta: Tensor, x: Tensor) -> Tensor:
        """The model's outputs on the batch ``x`` as an (N, m) matrix (centered per row for cross-entropy)."""
        y = functional_call(self.model, {**self.unflatten(theta), **self.buffers}, (x,))
        y = y.reshape(y.shape[0], -1)
        return y - y.mean(dim=1, keepdim=True) if self.centered else y

    def jacobian(self, theta: Tensor, x: Tensor, chunk: int = 256) -> Tensor:
        """∂f_j(θ; x_i)/∂θ for every input and output, as an (N·m, D) matrix (per-input, vmapped)."""
        single = lambda t, xi: self.outputs(t, xi.unsqueeze(0))[0]
        rows = [vmap(jacrev(single), in_dims=(None, 0))(theta, x[i:i + chunk]) for i in range(0, len(x), chunk)]
        return torch.cat(rows).reshape(-1, self.dim)

    def jvp_rows(self, theta: Tensor, x: Tensor, z: Tensor, chunk: int = 256) -> Tensor:
        """J·z for directions ``z`` (D × k), as (N·m) × k: forward mode, without forming J."""
        f = lambda t: self.outputs(t, x).reshape(-1)
        cols = [vmap(lambda c: jvp(f, (theta,), (c,))[1])(z[:, i:i + chunk].T).T for i in range(0, z.shape[1], chunk)]
        return torch.cat(cols, dim=1)

    def field(self, x: Tensor, alpha: Tensor) -> Field:
        """X_α(θ) = ∇_θ⟨α, F(θ)⟩ on the inputs ``x`` (α shaped like the (N, m) outputs)."""
        return grad(lambda t: (self.outputs(t, x) * alpha).sum())


def bracket_value(x_field: Field, y_field: Field, point: Tensor) -> tuple[Tensor, Tensor]:
    """([X, Y](point), ‖DY·X‖ + ‖DX·Y‖) with [X, Y] = DY·X − DX·Y."""
    xv = x_field(point)
    yv, dy_x = jvp(y_field, (point,), (xv,))
    _, dx_y = jvp(x_field, (point,), (yv,))
    return dy_x - dx_y, dy_x.norm() + dx_y.norm()


def bracket(x_field: Field, y_field: Field) -> Field:
    """The field [X, Y] as a function (for nesting)."""
    return lambda p: bracket_value(x_field, y_field, p)[0]


def nested_bracket_value(fields: list[Field], point: Tensor) -> tuple[Tensor, Tensor]:
    """[X_1, [X_2, … [X_k, X_(k+1)]]] at ``point`` with the scale of its outermost bracket (k ≥ 1)."""
    inner = fields[-1]
    for f in reversed(fields[1:-1]):
        inner = bracket(f, inner)
    return bracket_value(fields[0], inner, point)


def momentum_field(flat: FlatModel, x: Tensor, alpha: Tensor, c: Tensor, gamma: float) -> Field:
    """c·D0 + (0, X_α) on the phase space z = (θ, v): (c·v, −c·γ·v + X_α(θ))."""
    d = flat.dim
    xa = flat.field(x, alpha)

    def f(z: Tensor) -> Tensor:
        theta, v = z[:d], z[d:]
        return torch.cat([c * v, -c * gamma * v + xa(theta)])

    return f
