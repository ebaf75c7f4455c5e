"""Convolutions' second derivatives from the standard kernels (symtools.numeric.conv_hessian).

The HVP through :func:`fast_second_order` must equal PyTorch's own double backward (``_convolution_double_backward``)
to round-off: in float64 the two differ by ~1e-16–1e-15 relative (measured); we assert 1e-12, 10⁹ below what
a dropped or wrong derivative term changes (≥ 1e-3 relative, the negative control below measures it).
Shapes cover what the derivation must get right: stride, padding, dilation, groups, no bias, 1-D and 3-D,
a first layer whose input needs no gradient, and BatchNorm in train mode between convolutions; a property
test draws random 2-D layers (channels, kernel, stride, padding, dilation, groups, bias, reflect padding).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from symtools.numeric import conv_hessian
from symtools.numeric.conv_hessian import fast_second_order
from symtools.numeric.evaluation import loss_closure, parameter_dict
from symtools.numeric.hvp import hvp, relative_difference

DT = torch.float64
ROUND_OFF = 1e-12
WRONG = 1e-3


def _native_hvp(f, params, v):
    """PyTorch's double backward, with no interception: the reference."""
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    hv = torch.autograd.grad(list(g), list(leaves.values()), grad_outputs=[v[k] for k in leaves])
    return dict(zip(leaves, hv))


NETS = {
    "2d: stride, dilation, groups, BN": lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2), bias=False), nn.Flatten(), nn.LazyLinear(3)),
    "1d": lambda: nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 4, 2, stride=2),
                                nn.Flatten(), nn.LazyLinear(3)),
    "3d": lambda: nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 2, padding=1),
                                nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)),
}
SHAPES = {"2d: stride, dilation, groups, BN": (3, 8, 8), "1d": (3, 9), "3d": (3, 4, 4, 4)}


def _setup(name, seed=0, device="cpu"):
    torch.manual_seed(seed)
    net = NETS[name]().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, *SHAPES[name], generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    net(x)  # materialise the lazy head
    net, x, y = net.to(device), x.to(device), y.to(device)
    params = parameter_dict(net)
    v = {k: torch.randn(p.shape, generator=g, dtype=DT).to(device) for k, p in params.items()}
    return net, loss_closure(net, x, y), params, v


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(NETS))
def test_hvp_equals_pytorchs_double_backward(name, device):
    net, f, params, v = _setup(name, device=device)
    ours = hvp(f, params, v)  # through fast_second_order
    assert relative_difference(ours, _native_hvp(f, params, v)) < ROUND_OFF


def test_every_convolution_is_intercepted_and_string_padding_is_left_alone():
    x = torch.randn(2, 3, 5, 5, dtype=DT, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, requires_grad=True)
    with fast_second_order():
        ours = nn.functional.conv2d(x, w, padding=1)
        same = nn.functional.conv2d(x, w, padding="same")
    assert type(ours.grad_fn).__name__ == "ConvolutionBackward"  # conv_hessian.Convolution
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"  # PyTorch's own node
    assert torch.equal(ours, same)
    assert type(nn.functional.conv2d(x, w, padding=1).grad_fn).__name__ == "ConvolutionBackward0"  # mode is gone


@pytest.mark.parametrize("term", ["input-gradient's weight term", "weight-gradient's input term"])
def test_negative_control_a_dropped_derivative_term_is_seen(monkeypatch, term):
    """The comparison above is sensitive: dropping one of the four second-derivative terms changes H v by far
    more than round-off (measured 0.52 and 0.56 relative on the 2-D net)."""
    if term.startswith("input"):
        orig = conv_hessian.InputGradient.backward

        def backward(ctx, a_x):
            d_grad_out, _, *rest = orig(ctx, a_x)
            return (d_grad_out, None, *rest)
        monkeypatch.setattr(conv_hessian.InputGradient, "backward", staticmethod(backward))
    else:
        orig = conv_hessian.WeightGradient.backward

        def backward(ctx, a_w):
            _, d_grad_out, *rest = orig(ctx, a_w)
            return (None, d_grad_out, *rest)
        monkeypatch.setattr(conv_hessian.WeightGradient, "backward", staticmethod(backward))
    net, f, params, v = _setup("2d: stride, dilation, groups, BN")
    assert relative_difference(hvp(f, params, v), _native_hvp(f, params, v)) > WRONG


def test_gradient_values_are_computed_wherever_they_are_returned():
    """hvp() skips the convolution weights' gradient values (placeholders of zeros in its first backward);
    grad_and_hvp() returns g, so it computes them: g equals a plain gradient, and both H v equal PyTorch's.
    Negative control: under ``weight_gradients=False`` a create_graph backward really returns zeros there."""
    from symtools.numeric.hvp import grad_and_hvp, gradient

    net, f, params, v = _setup("2d: stride, dilation, groups, BN")
    g, hv = grad_and_hvp(f, params, v)
    assert relative_difference(g, gradient(f, params)) < ROUND_OFF
    assert relative_difference(hv, _native_hvp(f, params, v)) < ROUND_OFF
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with fast_second_order(weight_gradients=False):
        loss = f(leaves)
    lazy = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=True)))
    conv_weights = [k for k, p in params.items() if p.dim() >= 3]
    assert conv_weights and all(not lazy[k].any() for k in conv_weights)
    assert all(g[k].abs().max() > 0 for k in conv_weights)


@st.composite
def _conv_configs(draw):
    """A random 2-D convolution layer between two others: channels, kernel, stride, padding, dilation, groups,
    bias, padding mode and input size (kept small: each example is a float64 HVP on the CPU)."""
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return dict(c_in=c_in, c_out=c_out, kernel=kernel, stride=draw(st.integers(1, 2)),
                padding=draw(st.integers(0, 2)), dilation=draw(st.integers(1, 2)), groups=groups,
                bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(["zeros", "reflect"])),
                size=draw(st.integers(6, 9)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(_conv_configs())
def test_property_any_convolution_layer_matches_pytorchs_double_backward(cfg):
    if cfg["padding_mode"] == "reflect" and cfg["padding"] >= cfg["size"] // 2:
        cfg["padding_mode"] = "zeros"  # reflection needs padding < the input side
    torch.manual_seed(cfg["seed"])
    mid = nn.Conv2d(cfg["c_in"], cfg["c_out"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                    dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
                    padding_mode=cfg["padding_mode"])
    net = nn.Sequential(nn.Conv2d(2, cfg["c_in"], 3, padding=1), nn.Tanh(), mid, nn.Tanh(), nn.Flatten(),
                        nn.LazyLinear(3)).to(DT)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.randn(4, 2, cfg["size"], cfg["size"], generator=g, dtype=DT)
    y = torch.randint(0, 3, (4,), generator=g)
    net(x)  # materialise the head
    params = parameter_dict(net)
    v = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()}
    f = loss_closure(net, x, y)
    assert relative_difference(hvp(f, params, v), _native_hvp(f, params, v)) < ROUND_OFF
