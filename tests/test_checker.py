"""The symmetry checker (``symtools.numeric.checker.check``): every group the graph walk finds passes, and
every deliberately broken identity fails for exactly the broken groups.

What the checker asserts, and why these tests trust its verdicts:

* every tested quantity (per group: the gradient identity ⟨g, v_k⟩, and the Hessian identity projected on
  random directions, ⟨Hu, v_k⟩ + ⟨u, K_k g⟩) is judged against its own round-off bound SAFETY·u·T_k, with
  T_k the magnitudes of the terms it sums (symtools.numeric.roundoff; tests/test_roundoff.py checks them).
* positive property (hypothesis, :func:`symtools.testing.networks`): on random MLPs/CNNs of depth 1–4 with
  ReLU / LeakyReLU / identity / z² activations, with or without biases, BatchNorm or LayerNorm, cross-entropy
  or MSE, every family found by ``find_symmetries`` passes, in float64 and in float32, with DIRECTIONS HVPs in
  all, and the largest residual/bound ratio is recorded (measured: ≤ 0.1 on 100 float64 and 30 float32
  networks, docs/checker.md).
* negative controls, each with an O(1) relative residual (1e-3–1, ≥ 10¹⁰ × the float64 bound) for exactly
  the groups the math says are broken, and PASS for every other group of the same model:

  ===========================  ============================================================================
  broken on purpose            fails (and why)
  ===========================  ============================================================================
  tanh swapped in at act0      rescale groups of that layer only: tanh(a·z) ≠ a·tanh(z)
  BatchNorm in eval mode       scale (running stats do not scale with θ_A) and the translations of the biases
                               feeding BN (running mean does not shift); rescale and softmax translations pass
  MSE on the logits            the softmax translations only (MSE is not shift-invariant); BN ones pass
  weight decay in the loss     every group of every family: ⟨∇(λ/2|θ|²), v⟩ = λ⟨θ, v⟩ is λΣθ_A
                               (translation), λ|θ_A|² (scale), λ(|θ_in|² − |θ_out|²) (rescale): nonzero
                               for generic θ; the failure equals that term exactly
  wrong declared generator     x_out → x_out/a² on a ReLU unit: ⟨g, v⟩ = −⟨g_out, θ_out⟩ ≠ 0; the correct
                               x_out → x_out/a on the same tensors passes
  ε correction removed         scale groups feeding a norm with ε = 1e-2: the raw breaking −2ε∂L/∂ε is
                               ~1e-4–1e-2 relative; with the exact ε term the family passes at round-off
  ===========================  ============================================================================

* locating: with f broken units among N groups (tanh on some units only), exactly those f fail, whatever f
  and N, with the same DIRECTIONS HVPs (no group testing).

The negative-control networks use LeakyReLU where the verdict must be "every group of this layer": a ReLU
unit that is dead on the whole batch has g = 0 and satisfies every identity trivially, which is correct but
would make "exactly these groups" depend on the seed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from symtools.codegen.emit import emit, load_module
from symtools.errors import SymtoolsError
from symtools.nn.graph import bind, find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.numeric import groupops
from symtools.numeric.checker import DIRECTIONS, GRAY, SAFETY, CheckReport, FamilyResult, check
from symtools.numeric.second_order import SecondOrder
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.derive import derive
from symtools.testing import Architecture, architectures, build_network, networks

DT = torch.float64
EPS = torch.finfo(DT).eps
UNIT = EPS / 2
BROKEN = 1e-5  # every negative control's residual for a broken group, relative to its terms T, is above this


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def net(kind="mlp", widths=(5, 4), activation="leaky_relu", norm="batch", bias=True, loss="cross_entropy",
        seed=0, batch=8, input_size=4):
    arch = Architecture(kind, tuple(widths), activation, bias, norm, loss, in_features=3, classes=3, batch=batch,
                        input_size=input_size)
    return build_network(arch, seed)


def located(report, family) -> set[tuple[int, int]]:
    """The groups failing the Hessian test, as (index of the group set in ``layers``, group index)."""
    return {(item["set"], item["group"]) for item in report.families[family].hessian["located"]}


def assert_passes(report, family):
    f = report.families[family]
    assert f.passed, (family, f.gradient, f.hessian)
    assert f.gradient["max_ratio"] <= 1 and f.hessian["max_ratio"] <= 1
    assert f.hessian["hvps"] == DIRECTIONS and not f.hessian["located"]
    assert all(not lr.failing for lr in f.layers), [(lr.layer, lr.failing) for lr in f.layers]


def assert_broken_exactly(report, family, broken_layers):
    """``family`` fails; every group of the group sets labelled by ``broken_layers`` fails, in the gradient
    and in the Hessian test (each per group); every other group of the family passes."""
    f = report.families[family]
    assert not f.gradient["pass"] and not f.hessian["pass"] and not f.passed
    assert f.gradient["max_rel_residual"] > BROKEN and f.hessian["rel_residual"] > BROKEN
    assert set(broken_layers) <= {lr.layer for lr in f.layers}
    expected = {(i, k) for i, lr in enumerate(f.layers) if lr.layer in broken_layers for k in range(lr.groups)}
    assert len(expected) <= 32  # MAX_LISTED: all are listed
    assert located(report, family) == expected
    assert {(i, k) for i, lr in enumerate(f.layers) for k in lr.failing} == expected
    assert f.gradient["failing_groups"] == f.hessian["failing_groups"] == len(expected)
    for lr in f.layers:
        if lr.layer in broken_layers:
            assert lr.gradient_max_rel > BROKEN and lr.hessian_rel > BROKEN, lr
        else:
            assert lr.gradient_max_ratio <= 1 and lr.hessian_max_ratio <= 1, lr


# ----------------------------------------------------------------------------------------------------------
# every detected group passes (property test)


@settings(max_examples=100)
@given(networks())
def test_every_detected_group_passes(network):
    model, x, y, loss = network
    found = find_symmetries(model, x[:1], loss=loss)
    assert found.group_sets and not found.blocked, network
    report = check(model, x, y, found, loss=loss)
    tol = report.tolerance
    assert tol["relative"] == tol["gradient"] == tol["hessian"] == SAFETY * UNIT and tol["gray_zone"] == 1
    counts = found.families()
    assert set(report.families) == set(counts)
    for name, f in report.families.items():
        assert_passes(report, name)
        assert f.groups == counts[name] == sum(lr.groups for lr in f.layers)
        for value in (f.gradient["max_rel_residual"], f.hessian["rel_residual"]):
            assert math.isfinite(value) and value >= 0
        assert f.gradient["max_ratio"] <= 1 and f.hessian["max_ratio"] <= 1
        assert all(lr.hessian_max_ratio <= 1 and lr.bound == "terms" for lr in f.layers)
        normed = [gs for gs in found.of_family(name) if gs.epsilon_of]
        if normed:  # scale groups feeding BatchNorm/LayerNorm: the ε breaking is predicted and reported
            assert f.epsilon is not None and 0 < f.epsilon["max_rel_breaking"] < 1
        else:
            assert f.epsilon is None
    assert report.hvps["verification"] == DIRECTIONS  # all families at once
    assert report.hvps["per_group_naive"] == sum(counts.values())
    assert report.passed and report.verdict == "pass" and math.isfinite(report.loss)
    json.dumps(report.to_dict())  # the CLI's --json output


@given(architectures())
def test_architectures_respect_their_ranges(arch):
    assert arch.kind in ("mlp", "cnn") and 1 <= arch.depth <= 4 and all(2 <= w <= 6 for w in arch.widths)
    assert arch.activation in ("relu", "leaky_relu", "identity", "quadratic")
    assert arch.norm in (None, "batch", "layer") and not (arch.kind == "cnn" and arch.norm == "layer")
    assert arch.loss in ("cross_entropy", "mse")


def test_build_network_is_seeded_and_leaves_the_global_rng_alone():
    arch = Architecture("cnn", (3, 2), "quadratic", True, "batch", "mse", in_features=2, batch=5, input_size=8)
    state = torch.random.get_rng_state()
    a, b, c = build_network(arch, 11), build_network(arch, 11), build_network(arch, 12)
    assert torch.equal(torch.random.get_rng_state(), state)
    model, x, y, loss = a
    assert loss == "mse" and x.shape == (5, 2, 8, 8) and y.shape == (5, 3) and y.dtype == DT
    assert all(p.dtype == DT for p in model.parameters())
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(SymtoolsError, match="layer"):
        Architecture("cnn", (3,), "relu", True, "layer", "mse")
    with pytest.raises(SymtoolsError, match="multiple of 2"):
        Architecture("cnn", (3, 3), "relu", True, None, "mse", input_size=6)


def test_model_is_left_untouched():
    network = net(kind="cnn", widths=(3, 4), norm="batch", seed=3)
    model, x, y, _ = network
    model.train()
    model.norm0.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    assert check(model, x, y, find_symmetries(model, x[:1])).passed
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, num_batches_tracked, θ
    assert [m.training for m in model.modules()] == modes


# ----------------------------------------------------------------------------------------------------------
# negative controls


@pytest.mark.parametrize("norm", [None, "batch"])
def test_tanh_breaks_exactly_the_rescale_groups_at_its_layer(norm):
    network = net(widths=(8, 6), activation="relu", norm=norm, seed=1)
    model, x, y, _ = network
    found = find_symmetries(model, x[:1])
    assert check(model, x, y, found).passed
    model.act0 = nn.Tanh()  # in place: the groups found for ReLU are kept
    report = check(model, x, y, found)
    layer = "norm0 → fc1" if norm else "fc0 → fc1"
    assert_broken_exactly(report, "rescale", {layer})
    for family in set(report.families) - {"rescale"}:
        assert_passes(report, family)
    assert not report.passed


def test_eval_mode_batchnorm_breaks_scale_and_the_bias_translations():
    model, x, y, _ = net(kind="cnn", widths=(3, 4), norm="batch", seed=2)
    g = torch.Generator().manual_seed(5)
    for m in (model.norm0, model.norm1):  # non-trivial running statistics
        m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
    found = find_symmetries(model, x[:1])
    assert check(model, x, y, found).passed
    report = check(model, x, y, found, bn="eval")
    assert_broken_exactly(report, "scale", {"conv0 → norm0", "conv1 → norm1"})
    assert_broken_exactly(report, "translation", {"conv0 → norm0", "conv1 → norm1"})
    assert_passes(report, "rescale")
    assert report.families["scale"].epsilon is None  # ε law of batch statistics: not applied in eval mode


def test_dense_failure_costs_no_extra_hvp():
    """Every group of two BatchNorm layers fails (eval mode): all are listed, per layer, with the same
    DIRECTIONS HVPs as a passing check (the per-group Hessian test needs no group testing)."""
    model, x, y, _ = net(kind="cnn", widths=(16, 24), norm="batch", seed=2)
    found = find_symmetries(model, x[:1])
    report = check(model, x, y, found, bn="eval")
    assert report.verdict == "fail" and report.hvps["verification"] == DIRECTIONS
    scale = report.families["scale"]
    assert not scale.passed and scale.groups == 40
    assert scale.gradient["failing_groups"] == scale.hessian["failing_groups"] == 40
    assert [sorted(lr.failing) for lr in scale.layers] == [list(range(16)), list(range(24))]
    translation = report.families["translation"]
    for lr in translation.layers:
        assert bool(lr.failing) == lr.layer.endswith(("norm0", "norm1")), lr
    assert_passes(report, "rescale")


@pytest.mark.parametrize("targets", ["one_hot", "class_indices"])
def test_mse_on_logits_breaks_only_the_softmax_translations(targets):
    model, x, y, _ = net(kind="cnn", widths=(3, 4), norm="batch", seed=2)
    found = find_symmetries(model, x[:1], loss="cross_entropy")
    t = F.one_hot(y, 3).to(DT) if targets == "one_hot" else y
    report = check(model, x, t, found, loss="mse")
    assert_broken_exactly(report, "translation", {"out → softmax"})  # each input column and the whole bias
    for family in ("scale", "rescale"):
        assert_passes(report, family)
    assert report.settings["loss"] == "mse"


def test_weight_decay_inside_the_loss_breaks_every_group():
    """∇(L + λ/2|θ|²) = g + λθ, so every gradient identity gains λ⟨θ, v_k⟩ ≠ 0 and every Hessian identity
    gains λ(v_k + K_k θ) ≠ 0 (translation: λ·1; scale: 2λθ_A; rescale: 2λ(θ_in, −θ_out)). Nothing survives."""
    lam = 1e-2
    model, x, y, _ = net(kind="mlp", widths=(5, 4), norm="batch", seed=4)
    found = find_symmetries(model, x[:1])
    assert check(model, x, y, found).passed
    report = check(model, x, y, found, weight_decay=lam)
    assert not report.passed
    for family, f in report.families.items():
        assert f.groups <= 32  # below MAX_LISTED: every failing group is listed
        assert not f.gradient["pass"] and not f.hessian["pass"], family
        assert f.gradient["max_rel_residual"] > BROKEN and f.hessian["rel_residual"] > BROKEN
        assert f.gradient["failing_groups"] == f.groups == len(f.hessian["located"])
        for lr in f.layers:
            assert sorted(lr.failing) == list(range(lr.groups)), (family, lr.layer)
    # The failure is exactly the weight-decay term: r_k(λ) − r_k(0) = λ⟨θ, v_k⟩ per group.
    with_wd, without = (SecondOrder(model, x, y, weight_decay=w) for w in (lam, 0.0))
    params = {k: p.detach() for k, p in model.named_parameters()}
    for gs in found.group_sets:
        module = groupops.family_module(gs.family)
        r1, _ = groupops.gradient_terms(module, gs, params, with_wd.grad)
        r0, _ = groupops.gradient_terms(module, gs, params, without.grad)
        term, size = groupops.gradient_terms(module, gs, params, {k: lam * p for k, p in params.items()})
        assert torch.all((r1 - r0 - term).abs() <= 1e-13 * size), gs.layer
        assert torch.all(term.abs() > 1e-3 * size), gs.layer  # and it is not small


def _custom(spec: str, name: str):
    return load_module(emit(derive(ElementwiseAction.from_spec(spec, name=name))), name)


def test_wrong_declared_generator_fails_and_the_right_one_passes():
    model, x, y, _ = net(kind="mlp", widths=(6,), activation="leaky_relu", norm=None, seed=5)
    slots = {"x_in": [("fc0.weight", 0), ("fc0.bias", 0)], "x_out": [("out.weight", 1)]}
    modules = {"right": _custom("x_in -> a*x_in; x_out -> x_out/a; a > 0", "right"),
               "wrong": _custom("x_in -> a*x_in; x_out -> x_out/a**2; a > 0", "wrong")}
    declared = SymmetryMap(group_sets=[bind(model, name, "fc0 → out", slots, count=6) for name in modules])
    report = check(model, x, y, declared, modules=modules)
    assert_passes(report, "right")
    assert_broken_exactly(report, "wrong", {"fc0 → out"})
    # The declared-by-hand "right" family gives the same numbers as the built-in rescale the graph finds.
    builtin = check(model, x, y, SymmetryMap(group_sets=find_symmetries(model, x[:1]).of_family("rescale")))
    assert builtin.families["rescale"].passed
    assert abs(builtin.families["rescale"].gradient["max_rel_residual"]
               - report.families["right"].gradient["max_rel_residual"]) <= 1e-15


@pytest.mark.parametrize("kind,norm", [("mlp", "batch"), ("cnn", "batch"), ("mlp", "layer")])
def test_norm_epsilon_breaking_is_predicted_exactly(kind, norm):
    """With ε = 1e-2 the raw ⟨g_A, θ_A⟩ is far from 0; adding −2ε ∂L/∂ε (exact) brings it to round-off."""
    model, x, y, _ = net(kind=kind, widths=(3, 4), norm=norm, seed=6)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.eps = 1e-2
    found = find_symmetries(model, x[:1])
    scale_sets = found.of_family("scale")
    assert scale_sets and all(gs.epsilon_of for gs in scale_sets)
    report = check(model, x, y, found)
    assert report.passed
    scale = report.families["scale"]
    raw = scale.epsilon["max_rel_breaking"]
    assert raw > 1e-4 and raw > 1e8 * scale.gradient["max_rel_residual"], (raw, scale.gradient)
    assert all(lr.epsilon_max_rel is not None for lr in scale.layers)
    # Negative control: the same groups without their ε term fail, gradient and Hessian, all of them.
    plain = SymmetryMap(group_sets=[dataclasses.replace(gs, epsilon_of=None) if gs.family == "scale" else gs
                                    for gs in found.group_sets])
    bad = check(model, x, y, plain)
    assert_broken_exactly(bad, "scale", {gs.layer for gs in scale_sets})
    assert bad.families["scale"].epsilon is None
    for family in set(bad.families) - {"scale"}:
        assert_passes(bad, family)


# ----------------------------------------------------------------------------------------------------------
# locating: f broken groups among N, the same HVPs whatever f and N


class PartialTanh(nn.Module):
    """ReLU on most units, tanh on the units in ``broken``: breaks the rescale symmetry of exactly those."""

    def __init__(self, width: int, broken: list[int]):
        super().__init__()
        mask = torch.zeros(width, dtype=torch.bool)
        mask[broken] = True
        self.register_buffer("broken", mask)

    def forward(self, x):
        return torch.where(self.broken, torch.tanh(x), torch.relu(x))


@pytest.mark.parametrize("width,broken", [(64, [17]), (64, [3, 40, 41]), (48, [0, 47]), (37, [1, 5, 9, 20, 36]),
                                          (1024, [500]), (1024, [1, 2, 900]), (64, list(range(0, 64, 2)))])
def test_every_broken_group_is_located_with_the_same_hvps(width, broken):
    model, x, y, _ = net(widths=(width,), activation="relu", norm=None, seed=7, batch=16)
    found = find_symmetries(model, x[:1])
    model.act0 = PartialTanh(width, broken)
    report = check(model, x, y, found)
    rescale = report.families["rescale"]
    assert rescale.groups == width  # N: the groups of the family
    assert located(report, "rescale") == {(0, k) for k in broken}, rescale.hessian["located"]
    assert sorted(rescale.layers[0].failing) == broken  # the per-group gradient check agrees
    assert report.hvps["verification"] == DIRECTIONS
    assert_passes(report, "translation")


def test_hessian_residual_is_the_derivative_of_the_gradient_residual():
    """ρ_k(u) = ⟨Hu, v_k⟩ + ⟨u, K_k g⟩ is d/dt ⟨g(θ + tu), v_k(θ + tu)⟩ at t = 0: checked against central finite
    differences of the per-group gradient residuals on a broken network (tanh), where ρ_k is O(1); the
    difference is the O(h²) truncation (h = 1e-4: ≤ 1e-6 relative). Control: a wrong sign of the K g term
    misses by O(1)."""
    from symtools.numeric import checker as ck

    model, x, y, _ = net(widths=(6,), activation="relu", norm="batch", seed=3)
    found = find_symmetries(model, x[:1])
    model.act0 = nn.Tanh()
    gs = found.of_family("rescale")[0]
    fam = ck._Family("rescale", [gs], groupops.family_module("rescale"), model, "batch")
    so = SecondOrder(model, x, y, magnitudes=True)
    params = {k: p.detach() for k, p in so.params.items()}
    gen = torch.Generator().manual_seed(1)
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    hv, h_eps, mags_h, eps_h = so.tangent_hvp(u)
    mags, _ = so.term_magnitudes()
    rho, terms = ck._hessian_residual(fam, gs, None, params, so.grad, hv, h_eps, u, mags, mags_h, eps_h, 0.0)

    def residual(t):
        shifted = {k: p + t * u[k] for k, p in params.items()}
        g = SecondOrder(model, x, y, params=shifted, create_graph=False).grad
        return ck._gradient_residual(fam, gs, None, shifted, g, {})[0]

    h = 1e-4
    fd = (residual(h) - residual(-h)) / (2 * h)
    assert rho.abs().max() > 1e-3 * terms.max()  # broken: far above any round-off
    assert torch.allclose(rho, fd, rtol=1e-6, atol=1e-9 * float(terms.max())), (rho, fd)
    wrong = rho - 2 * ck._weighted_sum(fam.module, "hessian_coupling", gs, params, so.grad, u)
    assert not torch.allclose(wrong, fd, rtol=1e-2)


def test_no_groups_is_its_own_verdict():
    model, x, y, _ = net(widths=(4,), activation="relu", norm=None, seed=1)
    report = check(model, x, y, SymmetryMap())
    assert report.verdict == "no_groups" and not report.passed and report.hvps["verification"] == 0
    assert report.to_dict()["verdict"] == "no_groups"


def test_verdict_of_ratios_between_one_and_the_gray_zone_is_inconclusive():
    """Below float64 a residual between 1 and GRAY bounds is "inconclusive" (rerun in float64), above GRAY a
    FAIL; a FAIL anywhere wins over inconclusive elsewhere."""
    def fam(fail=0, inconclusive=0):
        side = {"failing_groups": fail, "inconclusive_groups": inconclusive}
        return FamilyResult("f", 3, dict(side), dict(side), None, [])

    def report(*families):
        return CheckReport({f"f{i}": f for i, f in enumerate(families)}, {}, {}, {}, 0.0)

    assert report(fam(), fam()).verdict == "pass"
    assert report(fam(), fam(inconclusive=1)).verdict == "inconclusive"
    assert report(fam(fail=1), fam(inconclusive=2)).verdict == "fail"
    model, x, y, _ = net(widths=(8, 6), activation="relu", norm="batch", seed=1)
    r32 = check(model, x, y, find_symmetries(model, x[:1]), dtype=torch.float32)
    assert r32.tolerance["gray_zone"] == GRAY and r32.passed


# ----------------------------------------------------------------------------------------------------------
# float32 checks: the same bounds with float32's unit round-off

F32 = torch.float32


@settings(max_examples=30)
@given(networks())
def test_float32_check_passes_every_group(network):
    """The bounds hold in float32 too (no calibration run); the relative bound SAFETY·u stays 10× below a
    broken identity's relative residual (BROKEN)."""
    model, x, y, loss = network
    found = find_symmetries(model, x[:1], loss=loss)
    report = check(model, x, y, found, loss=loss, dtype=F32)
    tol = report.tolerance
    assert tol["dtype"] == "float32" and tol["relative"] == SAFETY * torch.finfo(F32).eps / 2 < BROKEN / 10
    assert report.passed, {n: (f.gradient, f.hessian) for n, f in report.families.items()}
    assert all(f.gradient["max_ratio"] <= 1 and f.hessian["max_ratio"] <= 1 for f in report.families.values())
    assert report.hvps["verification"] == DIRECTIONS and report.hvps["calibration"] == 0


@pytest.mark.parametrize("norm", ["batch", None])
def test_float32_negative_control_tanh_fails_exactly_its_rescale_groups(norm):
    model, x, y, _ = net(widths=(8, 6), activation="relu", norm=norm, seed=1)
    found = find_symmetries(model, x[:1])
    assert check(model, x, y, found, dtype=F32).passed
    model.act0 = nn.Tanh()
    report = check(model, x, y, found, dtype=F32)
    assert_broken_exactly(report, "rescale", {"norm0 → fc1" if norm else "fc0 → fc1"})
    for family in set(report.families) - {"rescale"}:
        assert_passes(report, family)


def test_float32_negative_control_eval_batchnorm():
    model, x, y, _ = net(kind="cnn", widths=(3, 4), norm="batch", seed=2)
    g = torch.Generator().manual_seed(5)
    for m in (model.norm0, model.norm1):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
    found = find_symmetries(model, x[:1])
    report = check(model, x, y, found, bn="eval", dtype=F32)
    assert_broken_exactly(report, "scale", {"conv0 → norm0", "conv1 → norm1"})
    assert_passes(report, "rescale")


def test_forced_zero_bias_is_judged_against_the_size_of_the_terms_it_sums():
    """A conv bias feeding BatchNorm forms translation groups of one element each: the symmetry forces its
    gradient to 0, so what is computed is round-off of a sum over batch and positions of ∂L/∂z (z the conv's
    output). Its bound uses the terms of that sum as BatchNorm's backward makes them, which are at least
    Σ|∂L/∂z| (checked against z's gradient taken independently); on a 16-core machine with torch 2.11 a
    permuted-batch floor once missed this round-off (VGG-11-BN at batch 2: residual 4.6e-14 > tolerance
    3.1e-14, a false FAIL). Control: the head's bias (not forced) has a gradient of the order of its terms."""
    from symtools.numeric.evaluation import evaluation_mode

    model, x, y, _ = net(kind="cnn", widths=(3, 4), norm="batch", seed=2)
    names = ["conv0.bias", "out.bias"]
    so = SecondOrder(model, x, y, magnitudes=True)
    mags, _ = so.term_magnitudes()
    seen = {}

    def keep(name):
        def hook(module, args, output):  # returns None: the output is left as it is
            output.retain_grad()
            seen[name] = output
        return hook
    hooks = [getattr(model, n.split(".")[0]).register_forward_hook(keep(n)) for n in names]
    with evaluation_mode(model, "batch"):
        F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    plain = seen["conv0.bias"].grad.abs().sum((0, 2, 3))
    assert torch.all(mags["conv0.bias"] >= plain * (1 - 1e-12))
    g = so.grad
    assert (g["conv0.bias"].abs() / mags["conv0.bias"]).max() < 1e-13  # forced zero: round-off
    assert (g["out.bias"].abs() / mags["out.bias"]).max() > 1e-3  # not forced: real terms
    report = check(model, x, y, find_symmetries(model, x[:1]))
    layer = next(lr for lr in report.families["translation"].layers if lr.layer == "conv0 → norm0")
    assert layer.gradient_max_ratio <= 1 and layer.bound == "terms"


def test_nan_weights_fail_instead_of_passing_quietly() -> None:
    """A NaN in the weights makes every residual NaN; NaN > bound is False, which once read as PASS (ratio 0)."""
    from symtools.nn.graph import find_symmetries
    from symtools.nn.small import mlp

    torch.manual_seed(0)
    model = mlp(5, [4], 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    found = find_symmetries(model, x[:2])
    assert check(model, x, y, found).verdict == "pass"
    with torch.no_grad():
        model.fc0.weight[0, 0] = float("nan")
    report = check(model, x, y, found)
    assert report.verdict == "fail" and all(f.verdict == "fail" for f in report.families.values())
