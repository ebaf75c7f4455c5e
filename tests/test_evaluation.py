"""Side-effect-free evaluation: batch-statistics BatchNorm without touching the model (float64)."""

import copy

import pytest
import torch
from torch import nn

from symtools.errors import SymtoolsError
from symtools.numeric.bn_epsilon import bn_epsilon_gradients
from symtools.numeric.evaluation import evaluation_mode, loss_closure, parameter_dict
from symtools.numeric.hvp import grad_and_hvp, gradient, hvp, hvp_finite_difference, roundoff_floor

DT = torch.float64


def conv_net() -> nn.Sequential:
    """Conv → BN2d → ReLU(inplace) → Dropout → Linear head; BN buffers made non-trivial by a few train steps."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).to(DT)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(6, 3, 5, 5, dtype=DT) + 1.0)
    return net


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 2)).to(DT)


def batch(n=8, shape=(3, 5, 5), classes=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def snapshot(model):
    """Buffers by value and by version counter (an in-place write bumps ``_version`` even if values repeat)."""
    return {k: (b.clone(), b._version) for k, b in model.named_buffers()}


def assert_untouched(model, snap):
    now = dict(model.named_buffers())
    assert set(now) == set(snap)
    for k, (value, version) in snap.items():
        assert torch.equal(now[k], value), k
        assert now[k]._version == version, f"{k} was written in place"


def flags(model):
    return [(n, m.training) for n, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_buffers_and_flags_untouched_by_every_evaluation(mode):
    net = conv_net()
    if mode == "eval":
        net.eval()
    elif mode == "mixed":
        net.train()
        net[3].eval()  # dropout already off, BN still training
    net[1].momentum = None  # cumulative average: num_batches_tracked would be read *and* written
    before_flags, snap = flags(net), snapshot(net)
    tracking = net[1].track_running_stats
    x, y = batch()
    f = loss_closure(net, x, y)
    p = parameter_dict(net)
    v = {k: torch.ones_like(t) for k, t in p.items()}
    gradient(f, p)
    hvp(f, p, v)
    grad_and_hvp(f, p, [v, v])
    hvp_finite_difference(f, p, v)
    bn_epsilon_gradients(net, x, y)
    roundoff_floor(net, x, y)
    loss_closure(net, x, y, bn="eval")(p)
    assert_untouched(net, snap)
    assert flags(net) == before_flags
    assert net[1].track_running_stats is tracking
    assert net[1]._forward_hooks == {}


def test_flags_restored_after_an_exception():
    net = conv_net()
    before, snap = flags(net), snapshot(net)
    x, _ = batch()
    bad_targets = torch.zeros(3, dtype=torch.long)  # wrong batch size: cross_entropy raises after the forward
    with pytest.raises((ValueError, RuntimeError)):
        gradient(loss_closure(net, x, bad_targets), parameter_dict(net))
    with pytest.raises(RuntimeError):
        with evaluation_mode(net):
            raise RuntimeError("boom")
    assert flags(net) == before
    assert net[1].track_running_stats
    assert_untouched(net, snap)


def test_batch_mode_is_the_training_loss_and_eval_mode_is_not():
    """bn='batch' equals a train-mode forward (on a copy, dropout off); bn='eval' equals model.eval()."""
    net = conv_net()
    x, y = batch()
    p = parameter_dict(net)
    reference = copy.deepcopy(net).train()
    reference[3].eval()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(reference(x), y)
        eval_loss = nn.functional.cross_entropy(copy.deepcopy(net).eval()(x), y)
        batch_loss = loss_closure(net, x, y, bn="batch")(p)
        running_loss = loss_closure(net, x, y, bn="eval")(p)
    # Same kernel (F.batch_norm, training=True) on the same data: equal up to at most a few ulps.
    torch.testing.assert_close(batch_loss, train_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(running_loss, eval_loss, rtol=1e-14, atol=0)
    # Negative control: the running statistics (after 3 shifted batches) give a different loss.
    assert abs(float(batch_loss - running_loss)) > 1e-3


def test_dropout_is_off_and_evaluation_is_deterministic():
    net = conv_net()
    net.train()
    x, y = batch()
    f = loss_closure(net, x, y)
    p = parameter_dict(net)
    with torch.no_grad():
        assert torch.equal(f(p), f(p))
        with evaluation_mode(net):
            assert not net[3].training and net[1].training and not net[1].track_running_stats
        assert net[3].training and net[1].track_running_stats


def test_mlp_batchnorm1d_and_mse():
    net = mlp()
    x, _ = batch(n=10, shape=(5,))
    t = torch.randn(10, 2, dtype=DT)
    snap = snapshot(net)
    value = loss_closure(net, x, t, loss="mse")(parameter_dict(net))
    with torch.no_grad():
        ref = copy.deepcopy(net).train()
        ref[3].eval()
        torch.testing.assert_close(value, nn.functional.mse_loss(ref(x), t), rtol=1e-14, atol=0)
    custom = loss_closure(net, x, t, loss=lambda out, tgt: (out - tgt).abs().mean())(parameter_dict(net))
    assert custom.ndim == 0
    assert_untouched(net, snap)


def test_parameter_dict_order_and_partial_params():
    net = conv_net()
    p = parameter_dict(net)
    assert list(p) == [n for n, _ in net.named_parameters()]
    assert all(not t.requires_grad for t in p.values())
    assert p["0.weight"].data_ptr() == net[0].weight.data_ptr()
    c = parameter_dict(net, clone=True)
    assert c["0.weight"].data_ptr() != net[0].weight.data_ptr() and torch.equal(c["0.weight"], p["0.weight"])
    x, y = batch()
    f = loss_closure(net, x, y)
    # Names left out keep the model's values: a partial dict gives the same loss.
    with torch.no_grad():
        torch.testing.assert_close(f({"5.bias": p["5.bias"]}), f(p), rtol=0, atol=0)


def test_bad_arguments_say_what_to_write():
    net = conv_net()
    x, y = batch()
    with pytest.raises(SymtoolsError, match="bn='batch'"):
        loss_closure(net, x, y, bn="train")
    with pytest.raises(SymtoolsError, match="cross_entropy"):
        loss_closure(net, x, y, loss="hinge")
