"""The graph walk: every group it finds is a symmetry of the loss, checked by applying the finite action.

The ORACLE below knows nothing of the graph walk: it reads a GroupSet's tensors and axes, applies the finite
group action with factor(s) a, and compares the cross-entropy loss before and after, in float64.

Loss evaluation: BatchNorm in train mode (batch statistics; the identities are about them), dropout left
ACTIVE but with the same mask in every evaluation (the RNG is reseeded before each forward). The symmetries
hold for any fixed dropout mask, since dropout multiplies each unit by a constant; this keeps dropout in the
tested graph instead of switching it off. Norm layers get eps = 1e-30: eps breaks the scale symmetry
explicitly (L(a·θ_A; ε) = L(θ_A; ε/a²)), and 1e-30 is below float64 resolution of the variances here.

Tolerance: 1e-12 relative. The action changes the rounding of every forward op; with ~20 layers and float64
(unit round-off 1.1e-16) the measured differences are ~1e-15. Each positive check has a negative control
(an action that is *not* a symmetry) that must move the loss by far more than the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from symtools.errors import SymtoolsError
from symtools.nn.graph import bind, find_symmetries
from symtools.numeric.checker import check
from symtools.nn.groups import GroupSet, TensorSlice
from symtools.nn.small import cnn, mlp
from symtools.nn.vgg import vgg

RTOL = 1e-12  # see the module docstring
MOVED = 1e-8  # a negative control must change the loss by more than this (relative)
BATCH = 6

# The finite actions, per (family, slot): new value of the slot's elements for group factor a.
ACTIONS = {
    ("translation", "x"): lambda v, a: v + a,
    ("scale", "x"): lambda v, a: v * a,
    ("rescale", "x_in"): lambda v, a: v * a,
    ("rescale", "x_out"): lambda v, a: v / a,
    ("rescale2", "x_in"): lambda v, a: v * a,
    ("rescale2", "x_out"): lambda v, a: v / a**2,
}


def apply_action(model: nn.Module, gs: GroupSet, a: torch.Tensor, slots: tuple[str, ...] | None = None) -> None:
    """ORACLE: act on ``model``'s tensors in place with factor ``a[i]`` on group ``i`` (``a`` has ``gs.count`` entries)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot, tensors in gs.slots.items():
            if slots is not None and slot not in slots:
                continue
            for ts in tensors:
                view = params[ts.param].view(ts.shape) if ts.shape else params[ts.param]
                if ts.axis is None:
                    factor = a.reshape(())
                else:
                    factor = a.reshape([-1 if i == ts.axis else 1 for i in range(view.ndim)])
                view.copy_(ACTIONS[gs.family, slot](view, factor))


def random_factors(gs: GroupSet, generator: torch.Generator, one: bool) -> torch.Tensor:
    """Independent random group parameters (positive for multiplicative actions); ``one``: only one group moves."""
    identity = 0.0 if gs.family == "translation" else 1.0
    if gs.family == "translation":
        a = torch.randn(gs.count, generator=generator, dtype=torch.float64)
    else:
        a = torch.exp(0.5 * torch.randn(gs.count, generator=generator, dtype=torch.float64))
    if one:
        keep = torch.randint(gs.count, (1,), generator=generator)
        mask = torch.zeros(gs.count, dtype=torch.bool)
        mask[keep] = True
        a = torch.where(mask, a, torch.full_like(a, identity))
    return a


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy",
            train: bool = True) -> float:
    model.train(train)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1234)  # same dropout mask in every evaluation
        out = model(x)
        if loss == "mse":
            return F.mse_loss(out, y).item()
        return F.cross_entropy(out, y).item()


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64 copy with generic parameters (no zero biases, no unit γ) and eps = 1e-30 in every norm."""
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "eps"):
                m.eps = 1e-30
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, (2 / m.weight[0].numel()) ** 0.5, generator=g)  # He init: O(1) activations
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3, generator=g)
    return model


def data(shape: tuple[int, ...], classes: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randint(classes, (shape[0],), generator=g))


def relative_change(model: nn.Module, x, y, act, loss: str = "cross_entropy", train: bool = True,
                    before: float | None = None) -> float:
    """|L(ψ(θ)) − L(θ)| / |L(θ)| for the in-place action ``act(model_copy)`` (``train``: BN batch statistics).

    ``before``: L(θ) when already known (train mode), to save a forward on big models.
    """
    before = loss_of(model, x, y, loss, train) if before is None else before
    moved = copy.deepcopy(model)
    act(moved)
    return abs(loss_of(moved, x, y, loss, train) - before) / abs(before)


def single_elements(model: nn.Module, gs: GroupSet) -> bool:
    """Translation groups of one scalar per tensor (per-channel biases): every change of them is the action."""
    params = dict(model.named_parameters())
    return gs.family == "translation" and all(params[ts.param].numel() == gs.count for ts in gs.slots["x"])


def negative_control(model: nn.Module, gs: GroupSet, x, y, g: torch.Generator, before: float | None = None) -> float:
    """Relative loss change under a perturbation of the same tensors that is not a symmetry.

    Translation of single scalars (a bias before BatchNorm): any change of them is the action, so the
    control is the same action with BN using running statistics (eval mode), where it is no symmetry.
    """
    if single_elements(model, gs):
        a = random_factors(gs, g, one=False)
        return relative_change(model, x, y, lambda m: apply_action(m, gs, a), train=False)
    return relative_change(model, x, y, lambda m: break_group(m, gs, g), before=before)


def break_group(model: nn.Module, gs: GroupSet, g: torch.Generator) -> None:
    """A perturbation of the same tensors that is not the group action.

    rescale: act on x_in only, each group its own factor (one common factor can be a symmetry when a
    normalisation follows the next layer); translation: add independent noise to every element; scale: multiply every
    element by its own factor.
    """
    if gs.family.startswith("rescale"):
        apply_action(model, gs, random_factors(gs, g, one=False), slots=("x_in",))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ts in gs.slots["x"]:
            p = params[ts.param]
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(p + noise if gs.family == "translation" else p * torch.exp(0.5 * noise))


# ----------------------------------------------------------------------------------------------------------
# small models: every GroupSet separately

class _ViewIdiom(nn.Module):
    """conv → relu → ``x.view(x.size(0), -1)`` → Linear: the flatten written by hand."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


SMALL = {
    "view_idiom": (_ViewIdiom, (BATCH, 2, 4, 4), 4),
    "mlp_relu": (lambda: mlp(5, [7, 6], 4), (BATCH, 5), 4),
    "mlp_leaky_nobias": (lambda: mlp(5, [7, 6], 4, activation="leaky_relu", bias=False), (BATCH, 5), 4),
    "mlp_identity": (lambda: mlp(5, [7], 4, activation="identity"), (BATCH, 5), 4),
    "mlp_quadratic": (lambda: mlp(5, [7, 6], 4, activation="quadratic"), (BATCH, 5), 4),
    "mlp_batchnorm": (lambda: mlp(5, [7, 6], 4, norm="batch"), (BATCH, 5), 4),
    "mlp_layernorm": (lambda: mlp(5, [7, 6], 4, norm="layer"), (BATCH, 5), 4),
    "mlp_layernorm_quadratic": (lambda: mlp(5, [7, 6], 4, activation="quadratic", norm="layer"), (BATCH, 5), 4),
    "cnn_relu_pool": (lambda: cnn(3, [4, 5], 3, 8), (BATCH, 3, 8, 8), 3),
    "cnn_batchnorm": (lambda: cnn(3, [4, 5], 3, 8, norm="batch"), (BATCH, 3, 8, 8), 3),
    "cnn_quadratic_nopool": (lambda: cnn(2, [3, 4], 3, 4, activation="quadratic", pool=False), (BATCH, 2, 4, 4), 3),
    "cnn_leaky_nobias_bn": (lambda: cnn(2, [3, 4], 3, 8, activation="leaky_relu", bias=False, norm="batch"),
                            (BATCH, 2, 8, 8), 3),
}

CASES = []
for _name, (_build, _shape, _classes) in SMALL.items():
    _model = _build()
    for _i, _gs in enumerate(find_symmetries(_model, torch.zeros(_shape)).group_sets):
        CASES.append(pytest.param(_name, _i, id=f"{_name}-{_i}-{_gs.family}-{_gs.layer}"))


@pytest.mark.parametrize("name,index", CASES)
def test_every_group_set_is_a_symmetry(name: str, index: int) -> None:
    build, shape, classes = SMALL[name]
    model = randomize(build())
    gs = find_symmetries(model, torch.zeros(shape, dtype=torch.float64)).group_sets[index]
    x, y = data(shape, classes)
    g = torch.Generator().manual_seed(index)
    for one in (True, False):
        a = random_factors(gs, g, one)
        assert relative_change(model, x, y, lambda m: apply_action(m, gs, a)) < RTOL, (gs, one)
    assert negative_control(model, gs, x, y, g) > MOVED, gs


@pytest.mark.parametrize("name", list(SMALL))
def test_all_groups_at_once(name: str) -> None:
    """The composition of all actions (independent factors on every group of every set) is a symmetry too."""
    build, shape, classes = SMALL[name]
    model = randomize(build(), seed=3)
    found = find_symmetries(model, torch.zeros(shape, dtype=torch.float64))
    assert found.group_sets and not found.blocked
    x, y = data(shape, classes)
    g = torch.Generator().manual_seed(7)
    factors = [random_factors(gs, g, one=False) for gs in found.group_sets]

    def act(m):
        for gs, a in zip(found.group_sets, factors):
            apply_action(m, gs, a)

    assert relative_change(model, x, y, act) < RTOL


# ----------------------------------------------------------------------------------------------------------
# expected structure of the small models (counts from the architecture: one group per unit)


def test_mlp_counts_without_norm() -> None:
    found = find_symmetries(mlp(5, [7, 6], 4), torch.zeros(2, 5))
    assert found.families() == {"rescale": 7 + 6, "translation": 6 + 1}
    assert [gs.layer for gs in found.of_family("rescale")] == ["fc0 → fc1", "fc1 → out"]
    assert [gs.count for gs in found.of_family("translation")] == [6, 1]  # input columns of `out`, its bias


def test_mlp_counts_with_norms() -> None:
    bn = find_symmetries(mlp(5, [7, 6], 4, norm="batch"), torch.zeros(2, 5)).families()
    assert bn == {"scale": 7 + 6, "translation": 7 + 6 + 6 + 1, "rescale": 7 + 6}
    ln = find_symmetries(mlp(5, [7, 6], 4, norm="layer"), torch.zeros(2, 5))
    assert ln.families() == {"scale": 2, "translation": (5 + 1) + (7 + 1) + (6 + 1), "rescale": 7 + 6}
    whole = [gs for gs in ln.of_family("scale")]
    assert all(gs.count == 1 and {t.axis for ts in gs.slots.values() for t in ts} == {None} for gs in whole)
    assert whole[0].params() == ["fc0.bias", "fc0.weight"]


def test_quadratic_gives_rescale2_and_cnn_flatten_view() -> None:
    found = find_symmetries(cnn(2, [3, 4], 5, 4, activation="quadratic"), torch.zeros(2, 2, 4, 4))
    assert found.families() == {"rescale2": 3 + 4, "translation": 4 + 1}
    last = found.of_family("rescale2")[-1]
    assert last.layer == "conv1 → out"
    assert last.slots["x_out"] == (TensorSlice("out.weight", 1),)  # 4×4 input pooled twice: 1×1 maps, no view


def test_flatten_slice_groups_channels() -> None:
    found = find_symmetries(cnn(3, [4], 2, 8), torch.zeros(2, 3, 8, 8))
    (gs,) = found.of_family("rescale")
    assert gs.layer == "conv0 → out" and gs.count == 4
    assert gs.slots["x_out"] == (TensorSlice("out.weight", 1, (2, 4, 16)),)  # 4 channels of 4×4 maps


# ----------------------------------------------------------------------------------------------------------
# VGG at small input: all groups of one family at once (each group its own factor)

VGG_CASES = {"vgg16_bn": True}  # VGG-16 without BN shares every rescale/translation site; see test_models


@pytest.fixture(scope="module", params=list(VGG_CASES))
def small_vgg(request):
    torch.manual_seed(0)
    model = vgg(16, batch_norm=VGG_CASES[request.param], input_size=32, classes=7)
    found = find_symmetries(model, torch.zeros(1, 3, 32, 32))  # the graph does not depend on the values
    x, y = data((2, 3, 32, 32), 7)
    return request.param, randomize(model, seed=5), found, x, y


def test_vgg_every_family_is_a_symmetry(small_vgg) -> None:
    name, model, found, x, y = small_vgg
    assert not found.blocked
    expected = {"rescale", "translation"} | ({"scale"} if VGG_CASES[name] else set())
    assert set(found.families()) == expected
    g = torch.Generator().manual_seed(11)
    before = loss_of(model, x, y)
    for family in sorted(expected):
        sets = found.of_family(family)
        factors = [random_factors(gs, g, one=False) for gs in sets]

        def act(m, sets=sets, factors=factors):
            for gs, a in zip(sets, factors):
                apply_action(m, gs, a)

        assert relative_change(model, x, y, act, before=before) < RTOL, family
    # negative control on the deepest set of each family: the same tensors, not the group action
    for family in sorted(expected):
        gs = found.of_family(family)[-1]
        assert negative_control(model, gs, x, y, g, before=before) > MOVED, family


def test_vgg_bn_conv_before_bn_has_scale_not_rescale(small_vgg) -> None:
    name, model, found, x, y = small_vgg
    if not VGG_CASES[name]:
        pytest.skip("BN model only")
    rescale_params = {t.param for gs in found.of_family("rescale") for t in gs.slots["x_in"]}
    assert "features.0.weight" not in rescale_params and "features.1.weight" in rescale_params
    # the rescale of features.0's rows against features.3's columns is NOT a symmetry: BN undoes the scale
    wrong = bind(model, "rescale", "features.0 → features.3 (across BN)",
                 {"x_in": [("features.0.weight", 0), ("features.0.bias", 0)], "x_out": [("features.3.weight", 1)]},
                 count=64)
    a = random_factors(wrong, torch.Generator().manual_seed(2), one=False)  # one common a would be undone
    assert relative_change(model, x, y, lambda m: apply_action(m, wrong, a)) > MOVED  # by features.4 too


# ----------------------------------------------------------------------------------------------------------
# negative controls and blocked ops


def test_tanh_blocks_rescale_and_the_rescale_action_changes_the_loss() -> None:
    model = randomize(mlp(5, [7], 4, activation="tanh"))
    found = find_symmetries(model, torch.zeros(2, 5, dtype=torch.float64), walk="fx")
    assert not found.of_family("rescale")
    assert [(b.node, b.reason) for b in found.blocked] == [("act0", "no symmetry assumed through Tanh (act0)")]
    assert found.families() == {"translation": 7 + 1}  # the softmax groups of `out` remain
    aten = find_symmetries(model, torch.zeros(2, 5, dtype=torch.float64))  # (auto: fx stopped, so ATen)
    assert aten.families() == found.families()
    assert [b.node for b in aten.blocked] == ["act0"] and "not positively homogeneous" in aten.blocked[0].reason
    x, y = data((BATCH, 5), 4)
    across = bind(model, "rescale", "fc0 → out (across tanh)",
                  {"x_in": [("fc0.weight", 0), ("fc0.bias", 0)], "x_out": [("out.weight", 1)]}, count=7)
    g = torch.Generator().manual_seed(0)
    for one in (True, False):
        a = random_factors(across, g, one)
        assert relative_change(model, x, y, lambda m: apply_action(m, across, a)) > MOVED


def test_shifting_a_hidden_column_is_not_a_symmetry() -> None:
    model = randomize(mlp(5, [7, 6], 4))
    x, y = data((BATCH, 5), 4)
    wrong = bind(model, "translation", "fc1 (hidden, no softmax)", {"x": [("fc1.weight", 1)]}, count=7)
    a = torch.zeros(7, dtype=torch.float64)
    a[3] = 0.8
    assert relative_change(model, x, y, lambda m: apply_action(m, wrong, a)) > MOVED
    # while the same column shift on the softmax layer is one (positive control of the same oracle)
    right = bind(model, "translation", "out → softmax", {"x": [("out.weight", 1)]}, count=6)
    assert relative_change(model, x, y, lambda m: apply_action(m, right, a[:6])) < RTOL


def test_mse_has_no_translation_and_the_shift_changes_it() -> None:
    model = randomize(mlp(5, [7], 4))
    found = find_symmetries(model, torch.zeros(2, 5, dtype=torch.float64), loss="mse")
    assert found.families() == {"rescale": 7}
    x, _ = data((BATCH, 5), 4)
    target = torch.randn(BATCH, 4, dtype=torch.float64)
    shift = bind(model, "translation", "out", {"x": [("out.bias", None)]}, count=1)
    one = torch.ones(1, dtype=torch.float64)
    assert relative_change(model, x, target, lambda m: apply_action(m, shift, one), loss="mse") > MOVED


@pytest.mark.parametrize("name", ["mlp_batchnorm", "cnn_batchnorm", "cnn_leaky_nobias_bn"])
def test_scale_groups_name_the_batchnorm_whose_eps_breaks_them(name: str) -> None:
    """L(a·θ_A; ε) = L(θ_A; ε/a²): with a real ε, scaling a set by a is undone by ε → a²·ε in ``epsilon_of``."""
    build, shape, classes = SMALL[name]
    model = randomize(build())
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.eps = 1e-3
    x, y = data(shape, classes)
    found = find_symmetries(model, torch.zeros(shape, dtype=torch.float64))
    assert all(gs.epsilon_of is None for gs in found.group_sets if gs.family != "scale")
    for gs in found.of_family("scale"):
        bn = dict(model.named_modules())[gs.epsilon_of]
        assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and gs.layer.endswith(f"→ {gs.epsilon_of}")
        a = torch.full((gs.count,), 1.7, dtype=torch.float64)

        def act(m, gs=gs, a=a, with_eps=True):
            apply_action(m, gs, a)
            if with_eps:
                dict(m.named_modules())[gs.epsilon_of].eps *= 1.7**2

        assert relative_change(model, x, y, act) < RTOL
        assert relative_change(model, x, y, lambda m: act(m, with_eps=False)) > MOVED


def test_eval_mode_batchnorm_breaks_scale() -> None:
    """The BN groups are about batch statistics: with running statistics (eval mode) the loss moves."""
    model = randomize(mlp(5, [7], 4, norm="batch"))
    gs = find_symmetries(model, torch.zeros(2, 5, dtype=torch.float64)).of_family("scale")[0]
    x, y = data((BATCH, 5), 4)
    moved = copy.deepcopy(model)
    apply_action(moved, gs, torch.full((7,), 2.0, dtype=torch.float64))
    model.eval(), moved.eval()
    with torch.no_grad():
        before, after = F.cross_entropy(model(x), y).item(), F.cross_entropy(moved(x), y).item()
    assert abs(after - before) / before > MOVED


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.out(h + self.fc1(h))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


class _AvgPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.out = nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Linear(12, 2)

    def forward(self, x):
        return self.out(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_residual_add_is_blocked() -> None:
    found = find_symmetries(_Residual(), torch.zeros(2, 4), walk="fx")
    assert not found.of_family("rescale")
    reasons = " | ".join(b.reason for b in found.blocked)
    assert "branch" in reasons and "add" in reasons
    # the default walk sees through the add (ATen graph): fc0's units are read by fc1 and added to fc1's own
    # output, which only a joint similarity D·W·D⁻¹ of fc1 would undo (not an elementwise family): no group
    found = find_symmetries(_Residual(), torch.zeros(2, 4))
    assert not found.of_family("rescale") and found.families() == {"translation": 4 + 1}
    assert any("fc0's units" in b.reason and "D·W·D⁻¹" in b.reason for b in found.blocked)


def test_shared_module_is_blocked() -> None:
    found = find_symmetries(_Shared(), torch.zeros(2, 4), walk="fx")
    assert all("fc." not in p for gs in found.group_sets for p in gs.params())
    assert any("called 2 times" in b.reason for b in found.blocked)
    assert found.families() == {"translation": 4 + 1}  # only the softmax groups of `out` remain
    # the ATen walk transforms the shared tensor at both calls, and finds the same (nothing through fc)
    aten = find_symmetries(_Shared(), torch.zeros(2, 4))
    assert aten.families() == {"translation": 4 + 1} and aten.blocked


def test_avgpool_is_blocked_by_fx_and_passed_by_the_aten_walk() -> None:
    found = find_symmetries(_AvgPool(), torch.zeros(2, 2, 4, 4), walk="fx")
    assert not found.of_family("rescale")
    assert any(b.reason == "no symmetry assumed through AvgPool2d (pool)" for b in found.blocked)
    # average pooling is linear per channel, so the conv → ReLU → pool → Linear rescale holds: the ATen walk
    # (the default once fx stops) finds it, and the float64 check confirms it
    model = _AvgPool().double()
    found = find_symmetries(model, torch.zeros(2, 2, 4, 4, dtype=torch.float64))
    assert [gs.count for gs in found.of_family("rescale")] == [3]
    x, y = data((BATCH, 2, 4, 4), 2)
    assert check(model, x, y, found, dtype=torch.float64).verdict == "pass"




def test_untraceable_model_and_bad_input_raise() -> None:
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(SymtoolsError, match="cannot trace"):
        find_symmetries(Branchy(), torch.zeros(2, 3))
    with pytest.raises(SymtoolsError, match="does not run"):
        find_symmetries(mlp(5, [3], 2), torch.zeros(2, 6))
    with pytest.raises(SymtoolsError, match="cross_entropy, mse"):
        find_symmetries(mlp(5, [3], 2), torch.zeros(2, 5), loss="hinge")


def test_find_symmetries_keeps_modes_and_buffers() -> None:
    model = mlp(5, [3], 2, norm="batch")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_symmetries(model, torch.randn(4, 5))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------
# bind


def test_bind_validates() -> None:
    model = mlp(5, [7], 4)
    gs = bind(model, "rescale", "fc0 → out", {"x_in": [("fc0.weight", 0), TensorSlice("fc0.bias", 0)],
                                               "x_out": ("out.weight", 1)}, count=7)
    assert gs.params() == ["fc0.bias", "fc0.weight", "out.weight"] and gs.slots["x_out"][0].axis == 1
    bad = [
        ({"x": [("fc9.weight", 0)]}, 7, "no parameter 'fc9.weight'"),
        ({"x": [("fc0.weight", 1)]}, 7, "5 entries along axis 1"),
        ({"x": [("fc0.weight", 2)]}, 7, "not an axis"),
        ({"x": [("fc0.weight", None)]}, 7, "axis=None"),
        ({"x": [("fc0.weight", 1, (7, 2, 3))]}, 2, "cannot be viewed"),
        ({"x": []}, 7, "no tensors"),
        ({}, 7, "no slots"),
        ({"x": [("fc0.weight", 0)]}, 0, "positive integer"),
        ({"x": ["fc0.weight"]}, 7, "must be TensorSlice"),
    ]
    with pytest.raises(SymtoolsError, match="not a BatchNorm"):
        bind(model, "scale", "fc0", {"x": [("fc0.weight", 0)]}, 7, epsilon_of="act0")
    for slots, count, message in bad:
        with pytest.raises(SymtoolsError, match=message):
            bind(model, "scale", "fc0", slots, count)


# ----------------------------------------------------------------------------------------------------------
# random architectures (hypothesis)


@st.composite
def small_models(draw):
    activation = draw(st.sampled_from(["relu", "leaky_relu", "identity", "quadratic"]))
    bias = draw(st.booleans())
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))
        norm = draw(st.sampled_from([None, "batch", "layer"]))
        if activation == "quadratic" and norm is None:
            widths = widths[:2]  # z² of z² of ... grows fast; keep the loss in a sane range
        return mlp(4, widths, 3, activation=activation, bias=bias, norm=norm), (BATCH, 4)
    channels = draw(st.lists(st.integers(2, 4), min_size=1, max_size=2))
    norm = draw(st.sampled_from([None, "batch"]))
    pool = draw(st.booleans())
    return cnn(2, channels, 3, 4, activation=activation, bias=bias, norm=norm, pool=pool), (BATCH, 2, 4, 4)


@settings(max_examples=15)
@given(small_models(), st.integers(0, 2**16))
def test_random_architectures(built, seed) -> None:
    model, shape = built
    model = randomize(model, seed)
    found = find_symmetries(model, torch.zeros(shape, dtype=torch.float64))
    assert not found.blocked and found.of_family("translation")
    x, y = data(shape, 3, seed)
    g = torch.Generator().manual_seed(seed)
    factors = [random_factors(gs, g, one=False) for gs in found.group_sets]

    def act(m):
        for gs, a in zip(found.group_sets, factors):
            apply_action(m, gs, a)

    assert relative_change(model, x, y, act) < RTOL
