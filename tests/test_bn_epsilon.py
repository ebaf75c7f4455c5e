"""BatchNorm ε breaks the scale symmetry exactly: ⟨g_A, θ_A⟩ = −2 ε ∂L/∂ε_c per channel (float64).

θ_A for channel c = (row c of the conv/linear weight, bias c) of the layer feeding the BN. Tolerances: the
residual ⟨g_A, θ_A⟩ + 2ε ∂L/∂ε_c is a difference of two round-off-accurate numbers, so its natural scale is
that of the inner product's summands, S = ‖g_A‖‖θ_A‖: we assert residual ≤ 1e-13·S (measured ≤ 5.2e-16·S
over all channels and configurations) and, with ε = 1e-3 where ⟨g_A, θ_A⟩ ≈ 5e-5–2.5e-2·S, residual ≤
1e-10·|⟨g_A, θ_A⟩| (measured ≤ 1.5e-12; ≤ 9e-11 with ε = 1e-5, where ⟨g_A, θ_A⟩ is 100× smaller).
Negative controls: ⟨g_A, θ_A⟩ alone is ε-sized, not zero (0.01·ε·S ≤ |⟨g_A, θ_A⟩| ≤ 100·ε·S; measured
0.05–25·ε·S); θ_A of the wrong channel; eval-mode (running-statistics) BatchNorm.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symtools.numeric.bn_epsilon import batch_norm_batch_stats, bn_epsilon_gradients, predicted_scale_breaking
from symtools.numeric.evaluation import loss_closure, parameter_dict
from symtools.numeric.hvp import gradient

DT = torch.float64


def conv_net(eps, seed=0, dtype=DT):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=eps), nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5, eps=eps), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(5 * 6 * 6, 3),
    ).to(dtype)
    with torch.no_grad():  # non-trivial BN affine parameters
        for m in (net[1], net[4]):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return net


def mlp(eps, seed=0, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, eps=eps), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


# (layer feeding the BN, BN name) pairs in each net.
SITES = {"conv": [("0", "1"), ("3", "4")], "mlp": [("0", "1")]}


def setup(kind, eps, seed=0, dtype=DT):
    net = conv_net(eps, seed, dtype) if kind == "conv" else mlp(eps, seed, dtype)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(8, *((3, 6, 6) if kind == "conv" else (5,)), generator=g, dtype=dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    return net, x, y


def per_channel(g, p, layer, channel_perm=None):
    """(⟨g_A, θ_A⟩ per channel, S = ‖g_A‖‖θ_A‖ per channel); θ_A optionally taken from permuted channels."""
    ga = torch.cat([g[f"{layer}.weight"].flatten(1), g[f"{layer}.bias"][:, None]], 1)
    ta = torch.cat([p[f"{layer}.weight"].flatten(1), p[f"{layer}.bias"][:, None]], 1)
    if channel_perm is not None:
        ta = ta[channel_perm]
    return (ga * ta).sum(1), ga.norm(dim=1) * ta.norm(dim=1)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (5, 3, 4, 4), (4, 3, 2, 3, 3)])
def test_manual_formula_matches_f_batch_norm(shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=DT) * 3 + 1).requires_grad_()
    w = torch.rand(3, generator=g, dtype=DT).add_(0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=DT).requires_grad_()
    seed_out = torch.randn(shape, generator=g, dtype=DT)
    ref = F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
    ours = batch_norm_batch_stats(x, w, b, torch.full((3,), 1e-3, dtype=DT))
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-14)
    grads_ref = torch.autograd.grad((ref * seed_out).sum(), (x, w, b))
    grads_ours = torch.autograd.grad((ours * seed_out).sum(), (x, w, b))
    for a, r in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    # Float ε and no affine parameters are accepted too.
    torch.testing.assert_close(batch_norm_batch_stats(x, None, None, 1e-3),
                               F.batch_norm(x, None, None, None, None, training=True, eps=1e-3),
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_epsilon_gradient_matches_finite_difference_in_eps(kind):
    """Σ_c ∂L/∂ε_c = dL/dε (all channels moved together), by central differences of module.eps."""
    net, x, y = setup(kind, 1e-3)
    eps_grads = bn_epsilon_gradients(net, x, y)
    p = parameter_dict(net)
    for _, bn in SITES[kind]:
        m = dict(net.named_modules())[bn]
        d = 1e-7
        with torch.no_grad():
            m.eps = 1e-3 + d
            up = loss_closure(net, x, y)(p)
            m.eps = 1e-3 - d
            down = loss_closure(net, x, y)(p)
            m.eps = 1e-3
        fd = float(up - down) / (2 * d)
        # FD error ~ ε_mach·|L|/d ≈ 1e-9 absolute.
        assert abs(float(eps_grads[bn].sum()) - fd) < 1e-7 * abs(fd) + 1e-8, (bn, float(eps_grads[bn].sum()), fd)


@pytest.mark.parametrize("kind,seed,eps", [("conv", 0, 1e-3), ("conv", 1, 1e-5), ("mlp", 0, 1e-3), ("mlp", 2, 1e-5)])
def test_epsilon_identity_per_channel(kind, seed, eps):
    net, x, y = setup(kind, eps, seed)
    p = parameter_dict(net)
    g = gradient(loss_closure(net, x, y), p)
    predicted = predicted_scale_breaking(net, bn_epsilon_gradients(net, x, y))
    for layer, bn in SITES[kind]:
        lhs, scale = per_channel(g, p, layer)
        residual = (lhs - predicted[bn]).abs()
        assert bool((residual <= 1e-13 * scale).all()), (bn, (residual / scale).max())
        # Negative control: the "symmetry" is broken; ⟨g_A, θ_A⟩ alone is ε-sized, far above the residual.
        ratio = lhs.abs() / (eps * scale)
        assert bool(((ratio >= 0.01) & (ratio <= 100)).all()), (bn, ratio)
        if eps == 1e-3:
            assert bool((residual <= 1e-10 * lhs.abs()).all()), (bn, (residual / lhs.abs()).max())


def test_epsilon_identity_negative_control_wrong_channel():
    net, x, y = setup("conv", 1e-3)
    p = parameter_dict(net)
    g = gradient(loss_closure(net, x, y), p)
    predicted = predicted_scale_breaking(net, bn_epsilon_gradients(net, x, y))
    for layer, bn in SITES["conv"]:
        n = p[f"{layer}.bias"].shape[0]
        wrong, scale = per_channel(g, p, layer, channel_perm=torch.roll(torch.arange(n), 1))
        residual = (wrong - predicted[bn]).abs()
        # 1e-6·S: 10⁷× the identity's tolerance (measured minimum over channels: 3e-4·S).
        assert bool((residual > 1e-6 * scale).all()), (bn, (residual / scale).min())


def test_epsilon_identity_negative_control_eval_mode_batchnorm():
    """With running statistics, scaling θ_A is no symmetry at all: ⟨g_A, θ_A⟩ is O(S), not ε-sized."""
    net, x, y = setup("conv", 1e-3)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn_like(x) * 2 + 1)
    p = parameter_dict(net)
    g = gradient(loss_closure(net, x, y, bn="eval"), p)
    predicted = predicted_scale_breaking(net, bn_epsilon_gradients(net, x, y))
    for layer, bn in SITES["conv"]:
        lhs, scale = per_channel(g, p, layer)
        assert float(((lhs - predicted[bn]).abs() / scale).max()) > 1e-2


def test_finite_scaling_law():
    """L(αθ_A; ε) = L(θ_A; ε/α²) for a whole layer (all channels), α = 2, to round-off."""
    net, x, y = setup("conv", 1e-3)
    p = parameter_dict(net)
    scaled = dict(p, **{"3.weight": 2 * p["3.weight"], "3.bias": 2 * p["3.bias"]})
    with torch.no_grad():
        a = loss_closure(net, x, y)(scaled)
        net[4].eps = 1e-3 / 4
        b = loss_closure(net, x, y)(p)
        net[4].eps = 1e-3
        c = loss_closure(net, x, y)(p)
    assert abs(float(a - b)) < 1e-14 * abs(float(a))
    assert abs(float(a - c)) > 1e-6  # control: the scaling does change the loss at fixed ε


def test_model_left_untouched():
    net, x, y = setup("conv", 1e-3)
    net.train()
    net[1].eval()
    state = copy.deepcopy(net.state_dict())
    versions = {k: b._version for k, b in net.named_buffers()}
    before = [m.training for m in net.modules()]
    with torch.no_grad():  # callers under no_grad get the same answer
        out = bn_epsilon_gradients(net, x, y)
    assert list(out) == ["1", "4"] and out["4"].shape == (5,) and out["4"].dtype == DT
    assert [m.training for m in net.modules()] == before
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {k: b._version for k, b in net.named_buffers()} == versions
    assert all(not m._forward_hooks for m in net.modules())
    assert net[1].eps == 1e-3 and net[1].track_running_stats


def test_unreached_batchnorm_gets_zeros():
    body, x, y = setup("mlp", 1e-3)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.unused = nn.BatchNorm1d(4).to(DT)

        def forward(self, inputs):
            return self.body(inputs)

    out = bn_epsilon_gradients(WithUnused(), x, y)
    assert list(out) == ["body.1", "unused"]
    assert torch.equal(out["unused"], torch.zeros(4, dtype=DT)) and bool(out["body.1"].abs().gt(0).all())


def test_float32_identity_and_agreement_with_float64():
    """float32: identity residual ≤ 1e-6·S (measured 7e-8·S, ~0.6 ε_32); ∂L/∂ε vs float64: measured 2.4e-7."""
    net64, x, y = setup("conv", 1e-3)
    net32, _, _ = setup("conv", 1e-3, dtype=torch.float32)
    net32.load_state_dict(net64.state_dict())
    e64 = bn_epsilon_gradients(net64, x, y)
    e32 = bn_epsilon_gradients(net32, x.float(), y)
    p = parameter_dict(net32)
    g = gradient(loss_closure(net32, x.float(), y), p)
    predicted = predicted_scale_breaking(net32, e32)
    for layer, bn in SITES["conv"]:
        assert e32[bn].dtype == torch.float32
        torch.testing.assert_close(e32[bn].double(), e64[bn], rtol=1e-5, atol=1e-5 * float(e64[bn].abs().max()))
        lhs, scale = per_channel(g, p, layer)
        assert bool(((lhs - predicted[bn]).abs() <= 1e-6 * scale).all())
