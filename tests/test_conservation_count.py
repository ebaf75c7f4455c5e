"""Counting every conservation law of gradient flow (symtools.numeric.conservation_count, `symtools laws`).

The numerical count (rank of the generated Lie algebra at θ) is compared with two things that know nothing of
it: (1) a closed-form derivation written HERE — for an MLP with consecutive layers W_l (with bias b_l,
W̃_l = [W_l | b_l]) and W_(l+1), f depends on W_(l+1) and W̃_l only through W_(l+1)·σ(W̃_l ·), and for a linear σ
the flow of any loss keeps M_l = W_(l+1)ᵀW_(l+1) − W̃_lW̃_lᵀ constant (d/dt M_l = −W_(l+1)ᵀG W̃_lᵀ… + its
transpose, which cancel since ∂L/∂W_(l+1) = G·(W̃_l z̃)ᵀ and ∂L/∂W̃_l = W_(l+1)ᵀG z̃ᵀ); for ReLU (positively
homogeneous, not linear) only the diagonal of M_l survives, one law per hidden neuron. The number of
*independent* closed-form laws at θ is the rank of their Jacobian, computed here by autograd; (2) the library's
charges (graph walk + generated densities). No expected count is written down.

Tolerances: |cos| between a conserved quantity's gradient and a field value ≤ ORTHO_TOL = 1e-9 (round-off of
float64 passes is ~1e-15; a non-conserved quantity gives ~1e-3…1, see the negative controls); singular
values of the closed-form Jacobian are counted above 1e-10 × the largest (they are ≥ 1e-4 here, round-off
≤ 1e-14). Every positive test has a negative control that must fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import jacrev

from symtools.cli.main import main
from symtools.nn.small import mlp
from symtools.numeric.conservation_count import (FlatModel, InputsNotSaturated, RankUnclear, compare_with_charges,
                                                 count_laws, decide_rank)
from symtools.numeric.conservation_count.count import ORTHO_TOL, SCREEN_TOL, _screen_ratios
from symtools.numeric.conservation_count.fields import nested_bracket_value


def net(widths, activation, bias, seed=0):
    torch.manual_seed(seed)
    return mlp(widths[0], widths[1:-1], widths[-1], activation=activation, bias=bias).double()


def closed_form(model: nn.Module, activation: str, theta: torch.Tensor, flat: FlatModel) -> torch.Tensor:
    """The known laws (module docstring) as a function of the flat θ."""
    p = flat.unflatten(theta)
    names = [n.rsplit(".", 1)[0] for n in p if n.endswith(".weight")]
    out = []
    for a, b in zip(names[:-1], names[1:]):
        w_in = p[f"{a}.weight"] if f"{a}.bias" not in p else torch.cat([p[f"{a}.weight"], p[f"{a}.bias"][:, None]], 1)
        m = p[f"{b}.weight"].T @ p[f"{b}.weight"] - w_in @ w_in.T
        if activation == "identity":
            i, j = torch.triu_indices(m.shape[0], m.shape[0])
            out.append(m[i, j])
        else:
            out.append(m.diagonal())
    return torch.cat(out)


def closed_form_rank(model, activation):
    flat = FlatModel(model)
    jac = jacrev(lambda t: closed_form(model, activation, t, flat))(flat.theta0)
    s = torch.linalg.svdvals(jac)
    return int((s > 1e-10 * s[0]).sum()), jac


def field_values(model, n_in, n=200, seed=5):
    flat = FlatModel(model)
    x = torch.randn(n, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    j = flat.jacobian(flat.theta0, x)
    return j[j.norm(dim=1) > 0] / j[j.norm(dim=1) > 0].norm(dim=1, keepdim=True)


def max_cos(grads, rows):
    g = grads / grads.norm(dim=1, keepdim=True)
    return float((g @ rows.T).abs().max())


# ---------------------------------------------------------------------------------------------------------
# the count against the closed form and the library's charges

CASES = [([3, 2, 3], "identity", False), ([4, 3, 2], "identity", True), ([2, 3, 2, 3], "identity", False),
         ([3, 4, 2], "relu", True), ([4, 3, 3, 2], "relu", True), ([3, 5, 2], "leaky_relu", True)]


@pytest.mark.parametrize("widths,activation,bias", CASES)
def test_count_matches_closed_form_and_charges(widths, activation, bias):
    model = net(widths, activation, bias)
    count = count_laws(model, (widths[0],))
    closed, jac = closed_form_rank(model, activation)
    assert count.laws == closed
    # the closed-form laws are conserved: their gradients are orthogonal to every field value
    rows = field_values(model, widths[0])
    assert max_cos(jac, rows) <= ORTHO_TOL
    # negative control: ‖θ‖² is not conserved
    flat = FlatModel(model)
    assert max_cos(2 * flat.theta0[None], rows) > 1e-3
    cmp = compare_with_charges(count, flat, (widths[0],))
    assert cmp.max_cosine <= ORTHO_TOL and not cmp.not_conserved
    assert cmp.max_outside <= 1e-8  # every charge gradient lies in the computed law complement
    hidden = sum(widths[1:-1])
    if activation == "identity":
        # the walk binds only the per-neuron rescale (the diagonal of GL(r)): the off-diagonal laws stay
        # unexplained; they live where M_l does (weights and hidden biases), never on the output bias
        assert cmp.explained_by_charges == hidden
        assert cmp.unexplained == count.laws - hidden > 0
        assert cmp.unexplained_location and "out.bias" not in cmp.unexplained_location
    else:
        assert cmp.explained_by_charges == count.laws and cmp.unexplained == 0


def test_symmetry_removed_tanh():
    """Negative control of the comparison: tanh has no rescale symmetry; the count drops to what the
    closed form of the positively homogeneous case would NOT give, and the library binds nothing."""
    relu = count_laws(net([3, 4, 2], "relu", True), (3,))
    tanh_model = net([3, 4, 2], "tanh", True)
    tanh = count_laws(tanh_model, (3,))
    cmp = compare_with_charges(tanh, FlatModel(tanh_model), (3,))
    assert tanh.laws == 0 < relu.laws
    assert cmp.charges == 0 and cmp.explained_by_charges == 0


def test_dead_relu_unit_adds_laws():
    """A unit of the 2nd hidden layer with all incoming weights ≤ 0 (no bias) sees only ReLU outputs ≥ 0 and
    never fires: every parameter of it (its row, its outgoing column) has zero gradient for any loss, so each
    is a law. Closed form: the diagonal laws plus those coordinates; the charges only know the diagonal."""
    model = net([3, 3, 3, 2], "relu", False, seed=1)
    with torch.no_grad():
        model.fc1.weight[0] = -model.fc1.weight[0].abs()
    flat = FlatModel(model)
    dead = torch.zeros(flat.dim, dtype=torch.bool)
    sl = flat.slices()
    dead[sl["fc1.weight"]] = (torch.arange(9) // 3 == 0)          # row 0 of fc1.weight (3 × 3)
    dead[sl["out.weight"]] = (torch.arange(6) % 3 == 0)           # column 0 of out.weight (2 × 3)
    laws = lambda t: torch.cat([closed_form(model, "relu", t, flat), t[dead]])  # noqa: E731
    s = torch.linalg.svdvals(jacrev(laws)(flat.theta0))
    closed = int((s > 1e-10 * s[0]).sum())
    count = count_laws(model, (3,))
    cmp = compare_with_charges(count, flat, (3,))
    assert count.laws == closed
    assert cmp.unexplained == count.laws - cmp.explained_by_charges > 0
    where = cmp.unexplained_location  # mass of the unexplained directions per tensor (sums to their number)
    assert where["fc1.weight"] + where["out.weight"] >= 0.95 * cmp.unexplained
    # negative control: the same net before the unit was killed has no unexplained law
    alive = net([3, 3, 3, 2], "relu", False, seed=1)
    assert compare_with_charges(count_laws(alive, (3,)), FlatModel(alive), (3,)).unexplained == 0


def test_cross_entropy_adds_softmax_translation():
    """Cross-entropy only sees logit differences: the output bias sum (library translation charge) becomes a
    law, and the count grows by exactly the translation charges the walk finds."""
    model = net([3, 4, 3], "relu", True)
    any_loss = count_laws(model, (3,))
    ce = count_laws(model, (3,), loss="cross_entropy")
    cmp = compare_with_charges(ce, FlatModel(model, centered=True), (3,), loss="cross_entropy")
    assert cmp.unexplained == 0 and cmp.families["translation"]["conserved"] > 0
    assert ce.laws - any_loss.laws == cmp.families["translation"]["independent"]


# ---------------------------------------------------------------------------------------------------------
# negative controls of the numerics

def test_screen_finds_missed_regions():
    """A deep, narrow ReLU net (4-7-3-4 with bias, seed 11) whose level 0 on 214 inputs misses activation
    regions: the screen finds inputs whose fields leave the span, adds them, and the count equals the closed
    form (the rank of the diagonal laws; the net has no dead unit and no two units of a layer with the same
    activity on the screened inputs, so the closed form is the diagonal alone — checked below from the
    added inputs' fields). Negative control: without the screen the same 214 inputs give a count above it."""
    widths = [4, 7, 3, 4]
    model = net(widths, "relu", True, seed=11)
    closed, jac = closed_form_rank(model, "relu")
    screened = count_laws(model, (4,), inputs=214)
    assert screened.laws == closed
    assert screened.screen_added > 0 and screened.screened >= 100_000
    assert screened.screen_max_below <= 1e-3 * SCREEN_TOL  # round-off stays far under the threshold
    # the diagonal laws are conserved on every sampled field value, the added inputs' included
    for rows in screened._sampled:
        if len(rows):
            assert max_cos(jac, rows) <= ORTHO_TOL
    unscreened = count_laws(model, (4,), inputs=214, screen=0)
    assert unscreened.laws > closed and unscreened.screened == 0
    small = count_laws(model, (4,), inputs=214, screen=8)  # too small a screen finds nothing either
    assert small.laws > closed


def test_screen_ratio_estimate():
    """The screening estimate of max_j ‖J_j C‖/‖J_j‖ against the exact value from the per-input Jacobian, for
    a random orthonormal C: within a factor 100 (it is a ratio of two χ²₂ norm estimates). The other side:
    for the exact complement of these inputs' rows it is round-off, far under SCREEN_TOL."""
    model = net([3, 4, 2], "relu", True, seed=4)
    flat = FlatModel(model)
    x = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    c = torch.linalg.qr(torch.randn(flat.dim, 5, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(9))).Q
    est = _screen_ratios(flat, c, x, torch.Generator().manual_seed(10))
    j = flat.jacobian(flat.theta0, x)
    exact = ((j @ c).norm(dim=1) / j.norm(dim=1).clamp_min(1e-300)).view(300, -1).max(dim=1).values
    live = exact > 0
    q = est[live] / exact[live]
    assert float(q.min()) > 1e-2 and float(q.max()) < 1e2
    # the other side: for the complement of the rows themselves the estimate is round-off
    _, s, vh = torch.linalg.svd(j, full_matrices=True)
    null = vh[int((s > 1e-10 * s[0]).sum()):].T
    assert float(_screen_ratios(flat, null, x, torch.Generator().manual_seed(11)).max()) < 1e-12


def test_too_few_inputs_detected(monkeypatch):
    """Two level-0 inputs on a 45-parameter net: the screen must add inputs one step after another; with the
    steps capped the count is refused (InputsNotSaturated), never returned."""
    import symtools.numeric.conservation_count.count as count_module

    monkeypatch.setattr(count_module, "SCREEN_ADD", 1)
    monkeypatch.setattr(count_module, "SCREEN_STEPS", 2)
    with pytest.raises(InputsNotSaturated):
        count_laws(net([4, 6, 3], "relu", True), (4,), inputs=2, screen=2000)


def test_unreachable_gap_refused():
    with pytest.raises(RankUnclear):
        count_laws(net([3, 2, 3], "identity", False), (3,), min_gap=1e30)


def test_decide_rank():
    clear = torch.tensor([1.0, 0.5, 1e-3, 1e-14, 1e-15], dtype=torch.float64)
    assert decide_rank(clear).rank == 3
    assert decide_rank(torch.tensor([1e-14, 1e-15], dtype=torch.float64)).rank == 0  # all round-off
    assert decide_rank(torch.tensor([0.9, 0.8], dtype=torch.float64)).rank == 2      # full rank
    # values below the float64 floor create no gap among themselves (a bug once counted them)
    assert decide_rank(torch.tensor([1e-15, 2e-16, 1e-31, 1e-48], dtype=torch.float64)).rank == 0
    with pytest.raises(RankUnclear):  # a geometric spectrum has no clear gap
        decide_rank(torch.logspace(0, -16, 33, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# brackets and the heavy-ball flow, against a hand derivation on f(θ; x) = u·w·x (θ = (u, w), 1-1-1 net)
#
# Gradient flow: one field X = x·(w, u); [X, X] = 0, so the rank is 1 and u² − w² is the D − 1 = 1 law.
# Heavy ball, z = (u, w, v_u, v_w): D0 = (v_u, v_w, −γv_u, −γv_w), Y = (0, 0, w, u) (x = 1). By hand:
#   [D0, Y] = DY·D0 − DD0·Y = (0, 0, v_w, v_u) − (w, u, −γw, −γu) = (−w, −u, v_w + γw, v_u + γu),
#   [Y, [D0, Y]] = (0, 0, u, w) − (0, 0, −u, −w) = (0, 0, 2u, 2w),
# and D0, Y, [D0, Y], [Y, [D0, Y]] span R⁴ at a generic z: no law survives.

def test_bracket_against_hand_derivation():
    g = 0.7
    z = torch.tensor([0.3, -1.2, 0.5, 0.8], dtype=torch.float64)
    d0 = lambda p: torch.stack([p[2], p[3], -g * p[2], -g * p[3]])  # noqa: E731
    y = lambda p: torch.stack([0 * p[0], 0 * p[0], p[1], p[0]])     # noqa: E731
    u, w, vu, vw = z.tolist()
    got, _ = nested_bracket_value([d0, y], z)
    assert torch.allclose(got, torch.tensor([-w, -u, vw + g * w, vu + g * u], dtype=torch.float64), atol=1e-15)
    got2, _ = nested_bracket_value([y, d0, y], z)
    assert torch.allclose(got2, torch.tensor([0, 0, 2 * u, 2 * w], dtype=torch.float64), atol=1e-15)
    # negative control: the opposite sign convention DX·Y − DY·X gives the negative
    assert not torch.allclose(-got, got, atol=1e-3)


def test_momentum_count_scalar_net():
    model = net([1, 1, 1], "identity", False, seed=3)
    assert count_laws(model, (1,)).laws == 1
    mom = count_laws(model, (1,), flow="momentum", gamma=0.7)
    assert mom.dimension == 4 and mom.laws == 0 and mom.levels >= 2


def test_momentum_relu_loses_its_laws():
    model = net([3, 3, 2], "relu", False)
    grad_flow = count_laws(model, (3,))
    mom = count_laws(model, (3,), flow="momentum")
    cmp = compare_with_charges(mom, FlatModel(model), (3,))
    assert grad_flow.laws == 3 and mom.laws == 0
    assert cmp.explained_by_charges == 0 and cmp.not_conserved  # the rescale charges are not heavy-ball laws


# ---------------------------------------------------------------------------------------------------------
# the command

def test_cli_json(capsys):
    assert main(["laws", "--model", "mlp:3-2-3", "--activation", "linear", "--no-bias", "--json", "--quiet",
                 "--flow", "gradient"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"parameters", "rank", "laws", "explained_by_charges", "levels", "gap"} <= set(rep)
    assert rep["parameters"] == rep["rank"] + rep["laws"] == 12
    closed, _ = closed_form_rank(net([3, 2, 3], "identity", False), "identity")
    assert rep["laws"] == closed


@pytest.mark.parametrize("spec", ["mlp:3-x-2", "mlp:3", "cnn:1-2", "resnet50", "vgg11"])
def test_cli_bad_model(spec, capsys):
    assert main(["laws", "--model", spec, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symtools laws:") and len(err.strip().splitlines()) == 1


def test_large_matrix_path_agrees_with_dense(monkeypatch):
    """The Gram/Cholesky/subspace-iteration path (used above DENSE_LIMIT parameters) on a small net: same
    count and complement as the dense SVD. Negative control: with too small a block and no doubling the
    path could not see past the null directions, so the block is checked to have been doubled here."""
    import symtools.numeric.conservation_count.count as count_module

    model = net([4, 6, 5, 2], "relu", True, seed=2)
    dense = count_laws(model, (4,), inputs=400, screen=2000)
    monkeypatch.setattr(count_module, "DENSE_LIMIT", 10)
    said = []
    monkeypatch.setattr(count_module, "complement_from_gram",
                        lambda *a, **k: __import__("symtools.numeric.conservation_count.rank", fromlist=["x"])
                        .complement_from_gram(*a[:4], block=4, progress=said.append))
    large = count_laws(model, (4,), inputs=400, screen=2000)
    assert large.laws == dense.laws
    assert any("doubling" in s for s in said)
    overlap = torch.linalg.svdvals(dense.complement.T @ large.complement)
    assert float(overlap.min()) > 1 - 1e-8  # the same subspace
