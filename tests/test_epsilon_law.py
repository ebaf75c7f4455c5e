"""The ε law of a normalisation fed by a path of homogeneity degree k (issue 11): derived, bound, checked.

* the engine (:mod:`symtools.symbolic.normalization`) solves y(a^k z; ε) = y(z; ε') on the norm's formula and
  finds ε' = ε·a^(−2k), hence ⟨g_A, θ_A⟩ = c·ε·∂L/∂ε with c = −2k, for BatchNorm and LayerNorm, k = 1, 2, 3
  (and k = 1/2: nothing is looked up in a table); it refuses degrees it cannot handle;
* the engine's op degrees (Euler's relation on each op's formula) equal the degrees the graph walk declares;
* ``find_symmetries`` binds the scale group of ``Linear → z² → BatchNorm1d → ReLU → Linear`` with
  ``epsilon_factor = −4`` (and −2 for the ReLU control, −4 for the LayerNorm variant);
* in float64 with ε = 1e-2 the law holds per group to round-off, the finite form L(a·θ_A; ε) = L(θ_A; ε'(a))
  holds at a = 1.7, and the wrong factor (−2 for k = 2) misses by a large margin;
* ``check`` passes the whole k = 2 network (it failed the scale family before: no ε term for k ≠ 1), and
  fails its scale family when the factor is replaced by −2;
* where the engine derives no law (a degree-0 path), no scale group is bound and the walk says why.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from fractions import Fraction

import pytest
import sympy as sp
import torch
from torch import nn

from symtools.nn.graph import FUNCTION_OPS, METHOD_OPS, MODULE_OPS, bind, find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.nn.small import Square
from symtools.numeric.checker import check
from symtools.numeric.second_order import SecondOrder
from symtools.symbolic.normalization import (A, EPSILON, OP_FORMULAS, EpsilonLawError, epsilon_factor,
                                             epsilon_law, homogeneity_degree)
from symtools.errors import SymtoolsError

DT = torch.float64
EPS_NORM = 1e-2  # large enough that the ε breaking is far above round-off
LAW_RTOL = 1e-12  # measured ≤ 1.5e-13 relative to max|⟨g_A, θ_A⟩| over 10 seeds (docs/checker.md § 5)
WRONG = 1e-3  # the wrong factor misses by more than this, relative (measured: 0.5 for the law, ≥ 0.04 in check)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# the engine


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_engine_derives_minus_two_k(k, norm):
    law = epsilon_law(k, norm)
    assert law.factor == -2 * k and isinstance(law.factor, sp.Rational)
    assert sp.simplify(law.epsilon_scaled - EPSILON * A ** (-2 * k)) == 0
    assert epsilon_factor(k, norm) == float(-2 * k)
    assert epsilon_law(k, norm) is law  # cached
    assert any("solve" in line for line in law.proof)


def test_engine_solves_rather_than_looks_up():
    """A degree no table would hold: k = 1/2 gives ε' = ε/a and c = −1."""
    law = epsilon_law(Fraction(1, 2))
    assert law.factor == -1 and sp.simplify(law.epsilon_scaled - EPSILON / A) == 0
    assert epsilon_law(sp.Rational(3, 2), "layer").factor == -3


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2", None])
def test_engine_refuses_what_it_cannot_derive(bad):
    with pytest.raises(EpsilonLawError):
        epsilon_law(bad)
    with pytest.raises(EpsilonLawError):
        epsilon_law(1, "group")
    assert issubclass(EpsilonLawError, SymtoolsError)


def test_op_degrees_derived_from_formulas_match_the_graph():
    ops = {op.name: op for table in (MODULE_OPS, FUNCTION_OPS, METHOD_OPS) for op in table.values()}
    assert set(ops) <= set(OP_FORMULAS)
    for name, op in ops.items():
        assert homogeneity_degree(OP_FORMULAS[name]) == op.degree, name
    z = sp.Symbol("z", real=True)
    assert homogeneity_degree(z**3, [z]) == 3 and homogeneity_degree(sp.sqrt(sp.Abs(z)), [z]) == sp.Rational(1, 2)
    for not_homogeneous in (sp.tanh(z), z + 1, sp.Piecewise((z, z >= 1), (2 * z, True)), sp.Integer(0)):
        assert homogeneity_degree(not_homogeneous, [z]) is None


# ----------------------------------------------------------------------------------------------------------
# networks


def network(activation: str, norm: str, seed: int = 0, width: int = 5):
    """``fc0 → act → norm0 → relu → out`` (float64, ε = 1e-2, generic γ, β) and a batch of 16."""
    torch.manual_seed(seed)
    act = {"square": Square, "relu": nn.ReLU}[activation]()
    norm_layer = nn.BatchNorm1d(width, eps=EPS_NORM) if norm == "batch" else nn.LayerNorm(width, eps=EPS_NORM)
    model = nn.Sequential(OrderedDict(fc0=nn.Linear(3, width), act=act, norm0=norm_layer, relu=nn.ReLU(),
                                      out=nn.Linear(width, 3))).to(DT)
    with torch.no_grad():
        norm_layer.weight.uniform_(0.5, 1.5)
        norm_layer.bias.normal_(0.0, 0.5)
        model.fc0.bias.normal_(0.0, 0.5)
    x = torch.randn(16, 3, dtype=DT)
    y = torch.randint(0, 3, (16,))
    return model, x, y


CASES = [("square", "batch", 2), ("relu", "batch", 1), ("square", "layer", 2), ("relu", "layer", 1)]


def scale_set(model, x):
    found = find_symmetries(model, x[:2])
    sets = found.of_family("scale")
    assert len(sets) == 1 and not found.blocked, (found.group_sets, found.blocked)
    return found, sets[0]


def per_group(gs, values):
    """Σ over the group's tensors of values[param], reduced to one number per group (axis 0 or whole)."""
    total = 0
    for ts in gs.slots["x"]:
        v = values[ts.param]
        total = total + (v.reshape(v.shape[0], -1).sum(1) if ts.axis == 0 else v.sum().reshape(1))
    return total


@pytest.mark.parametrize("activation,norm,k", CASES)
def test_graph_binds_the_derived_factor(activation, norm, k):
    model, x, _ = network(activation, norm)
    _, gs = scale_set(model, x)
    assert gs.epsilon_of == "norm0" and gs.epsilon_factor == -2.0 * k
    assert gs.count == (5 if norm == "batch" else 1)


@pytest.mark.parametrize("activation,norm,k", CASES)
def test_epsilon_law_holds_to_roundoff(activation, norm, k):
    """⟨g_A, θ_A⟩ = c·ε·∂L/∂ε per group, with c from the graph (the engine); the wrong c = −2 misses for k = 2."""
    model, x, y = network(activation, norm)
    _, gs = scale_set(model, x)
    so = SecondOrder(model, x, y, create_graph=False)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lhs = per_group(gs, {n: params[n] * so.grad[n] for n in params})  # ⟨g_A, θ_A⟩ per group
    d_eps = so.grad_eps["norm0"]
    rhs = gs.epsilon_factor * EPS_NORM * d_eps
    scale = lhs.abs().max()
    assert scale > 1e-4  # the ε breaking is real: far above round-off
    rel = float((lhs - rhs).abs().max() / scale)
    assert rel < LAW_RTOL, rel
    if k != 1:  # negative control: the degree-1 factor
        wrong = float((lhs - (-2.0) * EPS_NORM * d_eps).abs().max() / scale)
        assert wrong > WRONG, wrong


@pytest.mark.parametrize("activation,norm,k", CASES)
def test_finite_law_with_the_engines_epsilon(activation, norm, k):
    """L(a·θ_A; ε) = L(θ_A; ε'(a)) at a = 1.7 with ε'(a) the engine's solution (not just its derivative)."""
    model, x, y = network(activation, norm)
    _, gs = scale_set(model, x)
    a = 1.7
    eps_new = float(epsilon_law(k, norm).epsilon_scaled.subs({A: a, EPSILON: EPS_NORM}))

    def loss(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(x), y))

    scaled = copy.deepcopy(model).train()
    with torch.no_grad():
        for ts in gs.slots["x"]:
            scaled.get_parameter(ts.param).mul_(a)
    moved = copy.deepcopy(model).train()
    moved.norm0.eps = eps_new
    base = loss(copy.deepcopy(model).train())
    assert abs(loss(scaled) - base) > 1e-6  # scaling θ_A alone moves the loss (ε breaks the symmetry)
    assert abs(loss(scaled) - loss(moved)) < 1e-13 * abs(base)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_check_passes_the_degree_two_network_and_fails_the_wrong_factor(norm):
    model, x, y = network("square", norm)
    found = find_symmetries(model, x[:2])
    report = check(model, x, y, found)
    assert report.passed, {n: (f.gradient, f.hessian) for n, f in report.families.items()}
    scale = report.families["scale"]
    assert scale.epsilon is not None
    raw, resid = scale.epsilon["max_rel_breaking"], scale.gradient["max_rel_residual"]
    assert raw > 1e-4 and raw > 1e8 * resid, (raw, resid)
    # negative controls: the degree-1 factor, and no ε term at all — the scale family fails, the others pass
    for replace in ({"epsilon_factor": -2.0}, {"epsilon_of": None}):
        bad = SymmetryMap(group_sets=[dataclasses.replace(gs, **replace) if gs.family == "scale" else gs
                                      for gs in found.group_sets])
        r = check(model, x, y, bad)
        f = r.families["scale"]
        assert not f.gradient["pass"] and not f.hessian["pass"]
        assert f.gradient["max_rel_residual"] > WRONG  # relative to the terms T
        assert f.gradient["max_ratio"] > 1e6 and f.hessian["max_ratio"] > 1e6  # far above the round-off bound
        assert all(fam.passed for name, fam in r.families.items() if name != "scale")


def test_bind_takes_a_factor_and_checks_it():
    model, x, _ = network("square", "batch")
    gs = bind(model, "scale", "fc0 → norm0", {"x": [("fc0.weight", 0), ("fc0.bias", 0)]}, 5,
              epsilon_of="norm0", epsilon_factor=-4)
    assert gs.epsilon_factor == -4.0
    assert bind(model, "scale", "fc0 → norm0", {"x": [("fc0.weight", 0)]}, 5).epsilon_factor == -2.0
    for bad in (float("nan"), "4", True):
        with pytest.raises(SymtoolsError):
            bind(model, "scale", "fc0 → norm0", {"x": [("fc0.weight", 0)]}, 5, epsilon_of="norm0",
                 epsilon_factor=bad)


def test_no_group_where_the_engine_derives_no_law(monkeypatch):
    """A path the engine cannot derive an ε law for (degree 0 here: an op declared f(a·z) = f(z)) binds no
    scale group; the walk records why, and the translation groups are unaffected."""
    import symtools.nn.graph as graph

    class Flat(nn.Module):
        def forward(self, x):
            return x / x.abs().amax()

    monkeypatch.setitem(graph.MODULE_OPS, Flat, graph.Op("Flat", 0))
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc0=nn.Linear(3, 4), flat=Flat(), norm0=nn.BatchNorm1d(4),
                                      relu=nn.ReLU(), out=nn.Linear(4, 3))).to(DT)
    found = find_symmetries(model, torch.randn(2, 3, dtype=DT), walk="fx")  # (the op table patched is fx's)
    assert not found.of_family("scale")
    assert [b for b in found.blocked if b.node == "norm0" and "no scale symmetry" in b.reason
            and "degree 0" in b.reason], found.blocked
    assert found.of_family("rescale") and found.of_family("translation")
