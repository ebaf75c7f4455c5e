"""Noether charges under gradient flow θ' = −∇L, integrated with scipy's DOP853 (rtol 1e-10, atol 1e-12).

For a loss that truly has the symmetry (``symtools.testing.invariant_loss``), the generated ``charge`` must
stay constant; the charge of a *wrong* action (another symmetry, a perturbed exponent or coefficient) and
the charge under a loss without the symmetry must drift.

Tolerances (float64):
- CHARGE_TOL = 1e-8, relative to Σ|charge density| at t = 0 (the size of the terms in Q, so a Q that is
  near 0 by cancellation is not divided by ~0). The solver's local error is ≤ rtol·|θ| = 1e-10 per step
  over ~100–500 steps and Q is a smooth function of θ; measured drifts are ≤ 1e-12.
- DRIFT_MIN = 1e-4 for the negative controls (10⁴ × CHARGE_TOL; measured ≥ 3e-3).
- MOVE_MIN = 0.05: the flow must move θ by ≥ 5 % of |θ₀| (see ``flow``), so conservation is not passed
  by standing still.
"""

import importlib
import math

import pytest
import torch
from hypothesis import given

from symtools.symbolic import library
from symtools.symbolic.action import ElementwiseAction
from symtools.testing import (
    DrawnAction,
    RandomLoss,
    elementwise_actions,
    generated_module,
    gradient,
    gradient_flow,
    invariant_loss,
    perturbed,
    random_loss,
    random_point,
)

CHARGE_TOL = 1e-8
DRIFT_MIN = 1e-4
MOVE_MIN = 0.05
F64 = torch.float64


def norm(ts) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def flow(loss, theta0, fraction=0.3, rounds=4):
    """θ(T) under gradient flow; asserts that θ moved noticeably.

    Each round integrates for 0.3·|θ₀|/|∇L(θ)| from where the last one stopped, until θ has moved by
    2·MOVE_MIN (a flow that slows down near a minimum gets more time, at most ``rounds`` rounds).
    """
    theta, moved = theta0, 0.0
    for _ in range(rounds):
        _, _, g = gradient(loss, theta)
        t_end = fraction * norm(theta0) / norm(g)
        theta, _ = gradient_flow(loss, theta, t_end, rtol=1e-10, atol=1e-12, method="DOP853")
        moved = norm([a - b for a, b in zip(theta, theta0)]) / norm(theta0)
        if moved > 2 * MOVE_MIN:
            break
    assert moved > MOVE_MIN, moved
    return theta


def charge_drift(module, theta0, theta1) -> float:
    """|Q(θ₁) − Q(θ₀)| / Σ|density(θ₀)| with the generated charge of ``module``."""
    values = dict(zip(module.SLOTS, theta0))
    scale = sum(float(module.CHARGE_DENSITY[s](*[values[n] for n in module.ARGS["charge_density"][s]]).abs().sum())
                for s in module.SLOTS)
    return abs(float(module.charge(*theta1) - module.charge(*theta0))) / scale


def builtin(name):
    return importlib.import_module(f"symtools.codegen.generated.{name}")


# ------------------------------------------------------------------------------------------ elementwise
@pytest.mark.parametrize("name", sorted(library.ELEMENTWISE))
def test_builtin_charge_is_conserved_and_drifts_without_the_symmetry(name):
    module, act = builtin(name), library.elementwise(name)
    theta0 = random_point(act, seed=4)
    theta1 = flow(invariant_loss(act, seed=4, module=module), theta0)
    assert charge_drift(module, theta0, theta1) < CHARGE_TOL
    # negative control: the same charge along the flow of a loss without the symmetry
    theta1 = flow(random_loss(act, seed=4), theta0)
    assert charge_drift(module, theta0, theta1) > DRIFT_MIN


@pytest.mark.parametrize("spec", ["x -> x/(1 - a*x)", "x -> exp(a)*x; y -> y + 3*a", "x -> x + log(a); y -> a**2*y; a > 0"])
def test_nonlinear_and_mixed_charges_are_conserved(spec):
    act = ElementwiseAction.from_spec(spec)
    module = generated_module(act)
    theta0 = random_point(act, seed=6)
    theta1 = flow(invariant_loss(act, seed=6), theta0)
    assert charge_drift(module, theta0, theta1) < CHARGE_TOL


def test_exp_and_linear_parameterisations_conserve_the_same_charge():
    # x -> exp(a)x (identity 0) and x -> a·x (identity 1) are one group: the charge derived from either is
    # conserved by a loss built from the other.
    exp_act = ElementwiseAction.from_spec("x -> exp(2*a)*x; y -> exp(-a)*y")
    lin_act = ElementwiseAction.from_spec("x -> a**2*x; y -> y/a; a > 0")
    theta0 = random_point(exp_act, seed=8)
    theta1 = flow(invariant_loss(exp_act, seed=8), theta0)
    assert charge_drift(generated_module(lin_act), theta0, theta1) < CHARGE_TOL
    assert charge_drift(generated_module(exp_act), theta0, theta1) < CHARGE_TOL


def test_rescale_charge_drifts_for_a_scale_only_loss():
    # L invariant only under the joint scaling (x_in, x_out) -> (a x_in, a x_out): its own charge
    # |x_in|² + |x_out|² is conserved, rescale's |x_in|² − |x_out|² is not, nor is rescale2's.
    joint = ElementwiseAction.from_spec("x_in -> a*x_in; x_out -> a*x_out; a > 0")
    theta0 = random_point(joint, seed=9)
    theta1 = flow(invariant_loss(joint, seed=9), theta0)
    assert charge_drift(generated_module(joint), theta0, theta1) < CHARGE_TOL
    assert charge_drift(builtin("rescale"), theta0, theta1) > DRIFT_MIN
    # perturbed exponent: rescale2's charge along a rescale-invariant flow
    theta1 = flow(invariant_loss(library.elementwise("rescale"), seed=9, module=builtin("rescale")), theta0)
    assert charge_drift(builtin("rescale"), theta0, theta1) < CHARGE_TOL
    assert charge_drift(builtin("rescale2"), theta0, theta1) > DRIFT_MIN


@given(elementwise_actions(kinds=("scale", "translate")))
def test_drawn_charge_is_conserved_and_a_perturbed_one_drifts(drawn: DrawnAction):
    act = drawn.action
    theta0 = random_point(act, seed=12)
    theta1 = flow(invariant_loss(act, seed=12), theta0)
    assert charge_drift(generated_module(act), theta0, theta1) < CHARGE_TOL
    # Negative control: a wrong action (one slot's coefficient doubled, or its kind swapped) has a generator
    # not parallel to the true one, so its charge drifts at the rate ⟨v_wrong − λv, g⟩. Doubling slot s
    # drifts at a rate ∝ ⟨θ_s-part of v, g⟩, which one slot may show only weakly by chance (measured: a slot
    # whose |θ_s|² moved by 2e-4 relative while the others moved by 10 %); every slot cannot. So the
    # control is: some perturbed slot drifts by > DRIFT_MIN (tried lazily, first slot first).
    drifts = []
    for law in drawn.laws:
        if law.moves:
            wrong = perturbed(drawn, law.slot)
            drifts.append((charge_drift(generated_module(wrong.action), theta0, theta1), wrong.spec))
            if drifts[-1][0] > DRIFT_MIN:
                break
    assert max(drifts)[0] > DRIFT_MIN, drifts


# --------------------------------------------------------------------------------------- matrix (GL_h)
def matrix_drift(charge, theta0, theta1) -> float:
    """max |ΔQ| over the entries of the matrix charge, relative to Σ_s ‖θ_s‖²_F at t = 0 (the traces of the
    Gram terms UᵀU, VVᵀ …, which bound every entry of them)."""
    q0, q1 = charge(*theta0), charge(*theta1)
    return float((q1 - q0).abs().max()) / sum(float((t * t).sum()) for t in theta0)


def matrix_point(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=gen, dtype=F64) for s in shapes)


@pytest.mark.parametrize("name, shapes, product", [
    ("gl_linear_pair", [(4, 3), (3, 2)], lambda U, V: U @ V),
    ("attention_qk", [(4, 3), (4, 3)], lambda Q, K: Q @ K.mT),
    ("attention_vo", [(4, 3), (3, 2)], lambda V, O: V @ O),
])
def test_matrix_charge_is_conserved_for_a_loss_of_the_product(name, shapes, product):
    F = RandomLoss(("P",), shape=product(*[torch.zeros(s) for s in shapes]).shape, seed=2)
    theta0 = matrix_point(shapes, seed=5)
    theta1 = flow(lambda A, B: F(product(A, B)), theta0)
    assert matrix_drift(builtin(name).charge, theta0, theta1) < CHARGE_TOL


def test_gl_charge_drifts_with_a_nonlinearity_in_between():
    F = RandomLoss(("P",), shape=(4, 2), seed=2)
    theta0 = matrix_point([(4, 3), (3, 2)], seed=5)
    theta1 = flow(lambda U, V: F(U @ torch.tanh(V)), theta0)   # U σ(V): GL_h no longer acts
    assert matrix_drift(builtin("gl_linear_pair").charge, theta0, theta1) > DRIFT_MIN
