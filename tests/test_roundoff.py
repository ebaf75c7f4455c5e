"""Term magnitudes behind the checker's round-off bounds (``symtools.numeric.roundoff``).

* the hooks read the right quantities: in the HVP's second backward, the adjoint of ∂L/∂z is the forward
  tangent ż = J_z u and z's own adjoint is the tangent of ∂L/∂z (both against central finite differences);
* the magnitudes are those of the formulas: the head's A_W = √N·((p + y)/N)ᵀ|x| for cross-entropy, the
  saturated-softmax case the old gradient-sized scale got wrong (a false FAIL in float32), and BatchNorm's
  D ≥ |∂L/∂z|;
* a loss without declared term magnitudes falls back to |∂L/∂outputs|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from symtools.nn.graph import find_symmetries
from symtools.numeric.checker import SAFETY, check
from symtools.numeric.second_order import SecondOrder

DT = torch.float64


def mlp(norm: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if norm else []) + [nn.ReLU(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=DT) * 0.7
    x = torch.randn(8, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, x, y


def test_tangent_hooks_are_the_forward_tangent_and_the_tangent_of_the_adjoint():
    model, x, y = mlp(norm=True)
    so = SecondOrder(model, x, y, magnitudes=True)
    gen = torch.Generator().manual_seed(3)
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in so.params.items()}
    so.tangent_hvp(u)
    first = so.magnitudes.sites[0]  # the first Linear: z = W x + b
    params = {k: p.detach() for k, p in so.params.items()}

    def at(t):
        shifted = {k: (p + t * u[k]).requires_grad_() for k, p in params.items()}
        seen = {}
        h = model[0].register_forward_hook(lambda m, a, out: (out.retain_grad(), seen.setdefault("z", out))[0])
        try:
            out = torch.func.functional_call(model.train(), shifted, (x,))
            F.cross_entropy(out, y).backward()
        finally:
            h.remove()
        return seen["z"].detach(), seen["z"].grad.detach()

    h = 1e-5
    (zp, dzp), (zm, dzm) = at(h), at(-h)
    assert torch.allclose(first.z_dot, (zp - zm) / (2 * h), rtol=1e-7, atol=1e-9)
    assert torch.allclose(first.dz_dot, (dzp - dzm) / (2 * h), rtol=1e-5, atol=1e-9)
    # control: the first-pass adjoint is not its own tangent
    assert not torch.allclose(first.dz_dot, first.dz, rtol=1e-2)


def test_head_magnitudes_are_those_of_the_cross_entropy_terms():
    """A_W of the last Linear = √N·((p + y)/N)ᵀ|h| (N samples summed per entry): the terms of (p − y)/N, not
    the difference."""
    model, x, y = mlp()
    so = SecondOrder(model, x, y, magnitudes=True)
    mags, _ = so.term_magnitudes()
    h = torch.relu(model[0](x)).detach()
    p = torch.softmax(model(x), 1).detach()
    d = (p + F.one_hot(y, 3).to(DT)) / x.shape[0]
    n = math.sqrt(x.shape[0])
    assert torch.allclose(mags["2.weight"], n * d.T @ h.abs(), rtol=1e-13)
    assert torch.allclose(mags["2.bias"], n * d.sum(0), rtol=1e-13)
    # the gradient itself is smaller than its terms wherever the softmax is confident
    assert torch.all(so.grad["2.bias"].abs() <= mags["2.bias"] / n * (1 + 1e-12))


def test_saturated_softmax_in_float32_passes_and_a_gradient_sized_scale_would_fail_it():
    """A confident network (logits ×40): (p − y)/N is tiny next to its terms (p + y)/N, so the float32
    round-off of Σ_c ∂L/∂b_c (the head's translation) is large *relative to the gradient*. The bound built
    from the terms passes it; the old gradient-sized scale Σ|g·v| + g_rms·Σ|v| puts the residual far above
    SAFETY·u — the false FAIL seen on the demo checkpoint."""
    model, x, y = mlp(seed=4)
    with torch.no_grad():
        model[2].weight.mul_(40.0)
        model[2].bias.mul_(40.0)
        y = model(x).argmax(1)  # confident and right: p_y ≈ 1
    found = find_symmetries(model, x[:1])
    report = check(model, x, y, found, dtype=torch.float32)
    assert report.passed, {n: (f.gradient, f.hessian) for n, f in report.families.items()}
    so = SecondOrder(model.float(), x.float(), y, create_graph=False)
    g = so.grad
    r = float(g["2.bias"].double().sum())  # the whole-bias translation group (v = 1 on the bias)
    g_rms = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g.values()) / sum(t.numel() for t in g.values()))
    old_scale = float(g["2.bias"].double().abs().sum()) + g_rms * 3
    assert abs(r) > SAFETY * torch.finfo(torch.float32).eps / 2 * old_scale, (r, old_scale)


def test_batchnorm_input_terms_cover_the_gradient_and_the_eval_mode_path():
    model, x, y = mlp(norm=True, seed=2)
    for bn_mode in ("batch", "eval"):
        so = SecondOrder(model, x, y, magnitudes=True, bn=bn_mode)
        mags, eps_mags = so.term_magnitudes()
        assert torch.all(mags["0.bias"] >= so.grad["0.bias"].abs())
        assert (("1" in eps_mags) == (bn_mode == "batch"))  # the ε leaf exists with batch statistics only


def test_a_loss_without_declared_terms_falls_back_to_the_gradient_of_the_outputs():
    model, x, y = mlp()

    def my_loss(out, t):
        return F.cross_entropy(out, t)

    so = SecondOrder(model, x, y, loss=my_loss, magnitudes=True)
    mags, _ = so.term_magnitudes()
    h = torch.relu(model[0](x)).detach()
    dout = (torch.softmax(model(x), 1) - F.one_hot(y, 3).to(DT)).detach() / x.shape[0]
    assert torch.allclose(mags["2.weight"], math.sqrt(8) * dout.abs().T @ h.abs(), rtol=1e-12)


def test_float64_check_of_a_batchnorm_mlp_passes_with_margin():
    model, x, y = mlp(norm=True, seed=5)
    report = check(model, x, y, find_symmetries(model, x[:1]))
    assert report.passed
    assert max(max(f.gradient["max_ratio"], f.hessian["max_ratio"]) for f in report.families.values()) < 0.5
