"""Symmetry teleportation: derived exponential maps and state degrees, the guarantees checked at every teleport
(loss, function, charges, optimizer state), the data-dependent two-layer action, training and the CLI.

Tolerances: float64 throughout except the CLI test. A kept loss is compared at 1e-12 relative (a non-symmetry
moved by the same group elements changes it by ≥ 1e-3: the negative controls); the charge check's own bound is
CHARGE_UNITS units of float64 round-off of the summed terms.
"""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import sympy as sp
import torch

from symtools.cli.main import main
from symtools.errors import SymtoolsError
from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn, mlp
from symtools.numeric import optimizer_laws
from symtools.numeric.teleport import (
    CHARGE_UNITS,
    OrbitChart,
    TeleportError,
    _charge_check,
    teleport,
)
from symtools.numeric.teleport_nonlinear import invertible, teleport_two_layer
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.teleport import T, exponential_map, state_degrees, teleport_form
from symtools.training import train

LIBRARY = ("translation", "scale", "rescale", "rescale2")


def _data(n=48, d=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _mlp(activation="leaky_relu", seed=0):
    torch.manual_seed(seed)
    return mlp(16, [12, 10], 5, activation=activation).double()


def _flow_error(action: ElementwiseAction, a_of_t: sp.Expr) -> float:
    """max over samples of |ψ(ψ(x, a(s)), a(u)) − ψ(x, a(s + u))|: 0 for a one-parameter group's a(t)."""
    s, u = sp.Symbol("s"), sp.Symbol("u")
    worst = 0.0
    for slot, img in action.images.items():
        x = action.symbol(slot)
        a = action.parameter
        twice = img.xreplace({a: a_of_t.subs(T, u)}).xreplace({x: img.xreplace({a: a_of_t.subs(T, s)})})
        once = img.xreplace({a: a_of_t.subs(T, s + u)})
        for xv, sv, uv in ((0.7, 0.3, -0.2), (-1.3, 0.1, 0.25), (2.0, -0.15, 0.05)):
            worst = max(worst, abs(float((twice - once).subs({x: xv, s: sv, u: uv}))))
    return worst


@pytest.mark.parametrize("family", LIBRARY)
def test_exponential_map_is_a_one_parameter_subgroup_with_the_generator_as_velocity(family):
    mod = importlib.import_module(f"symtools.codegen.generated.{family}")
    form = teleport_form(family, mod.SPEC, mod.PARAMETER, mod.CHARGE_TEXT)
    assert form.exp_map.chart == "exponential"
    assert _flow_error(form.action, form.exp_map.a_of_t) < 1e-12
    for slot, img in form.action.images.items():  # d/dt ψ(x, a(t)) at t = 0 is the generator v
        x = form.action.symbol(slot)
        velocity = sp.diff(img.xreplace({form.action.parameter: form.exp_map.a_of_t}), T).subs(T, 0)
        for xv in (0.7, -1.3, 2.0):  # against the generated torch generator
            v = getattr(mod, f"generator__{slot}")(torch.tensor([xv], dtype=torch.float64))
            assert float(velocity.subs(x, xv)) == pytest.approx(float(v[0]), abs=1e-14)


def test_negative_control_a_non_group_declaration_gets_only_the_local_chart():
    action = ElementwiseAction.from_spec("x -> x + a*x**2")
    em = exponential_map(action)
    assert em.chart == "local" and "not a one-parameter group" in em.reason
    assert _flow_error(action, em.a_of_t) > 1e-3  # its chart is indeed not a homomorphism


def _lr0_states(name, model_params, grads, steps=3):
    """Run the real torch optimizer of law ``name`` at lr 0 for ``steps`` steps with fixed gradients."""
    params = [p.detach().clone().requires_grad_(True) for p in model_params]
    extra = {"momentum": 0.9} if name in ("momentum", "nesterov") else {}
    opt = optimizer_laws.make_optimizer(name, params, lr=0.0, **extra)
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


CARRY_CASES = ([(n, "rescale") for n in optimizer_laws.CHOICES if state_degrees(n)]
               + [(n, "gl_linear_pair") for n in optimizer_laws.CHOICES
                  if state_degrees(n) and set(state_degrees(n).values()) == {1}])


@pytest.mark.parametrize("name,family", CARRY_CASES)
def test_carried_optimizer_state_equals_a_fresh_run_at_the_teleported_point(name, family):
    """At lr 0 the state is built from one gradient repeated; teleported covariantly it must equal the state a
    run started at the teleported point builds (the gradient there is g / J, or g Gᵀ / G⁻ᵀ g for GL).
    Negative control: the state left as it was differs."""
    activation = "leaky_relu" if family == "rescale" else "identity"
    model = _mlp(activation)
    x, y = _data()
    syms = find_symmetries(model, x[:2])

    def grads_of(m):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad.detach().clone() for p in m.parameters()]

    params, opt = _lr0_states(name, list(model.parameters()), grads_of(model))
    holder = _mlp(activation)
    with torch.no_grad():
        for p, q in zip(holder.parameters(), params):
            p.copy_(q)
    opt_h = optimizer_laws.make_optimizer(name, list(holder.parameters()), lr=0.0,
                                          **({"momentum": 0.9} if name in ("momentum", "nesterov") else {}))
    opt_h.load_state_dict(opt.state_dict())
    before = {k: {e: v.clone() for e, v in st.items() if torch.is_tensor(v)} for k, st in enumerate(opt_h.state.values())}
    r = teleport(holder, (x, y), symmetries=syms, families=(family,), optimizer=opt_h, steps=3, lr=0.1)
    assert r.optimizer_state.startswith("carried covariantly") and r.chosen_step > 0
    _, fresh = _lr0_states(name, list(holder.parameters()), grads_of(holder))
    moved_any = False
    for k, (st, st_fresh) in enumerate(zip(opt_h.state.values(), fresh.state.values())):
        for entry, v in st.items():
            if not torch.is_tensor(v) or v.ndim == 0:
                continue
            torch.testing.assert_close(v, st_fresh[entry], rtol=1e-10, atol=1e-14)
            if (before[k][entry] - st_fresh[entry]).abs().max() > 1e-6 * st_fresh[entry].abs().max():
                moved_any = True
    assert moved_any, "negative control: the untransformed state should differ from the fresh run's"


def test_second_moments_under_gl_are_reset_with_a_warning():
    model = _mlp("identity")
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.warns(UserWarning, match="reset"):
        r = teleport(model, (x, y), families=("gl_linear_pair",), optimizer=opt, steps=2, lr=0.1)
    assert "reset" in r.optimizer_state and len(opt.state) < len(list(model.parameters()))


def test_guarantees_hold_and_the_gradient_gets_steeper():
    model = _mlp()
    x, y = _data()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = teleport(model, (x[:24], y[:24]), held_out=x[24:], steps=8, lr=0.1)
    assert r.families == {"rescale": 22}
    assert r.objective_after > 1.5 * r.objective_before and r.chosen_step > 0
    assert r.loss_change_rel < 1e-12 and r.function_change_rel < 1e-12
    assert r.charge_residual_max <= CHARGE_UNITS
    assert r.grad_norm_after ** 2 == pytest.approx(r.objective_after, rel=1e-12)
    moved = max(float((p.detach() - w0[n]).abs().max()) for n, p in model.named_parameters())
    assert moved > 1e-2 and 0 < r.coordinate_max <= 8 * 0.1 + 1e-9


def test_negative_control_a_non_symmetry_is_refused_and_leaves_the_model_untouched():
    x, y = _data()
    syms = find_symmetries(_mlp("relu"), x[:2])  # rescale groups are symmetries of ReLU, not of tanh
    model = _mlp("tanh")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TeleportError, match="loss changed"):
        teleport(model, (x[:24], y[:24]), symmetries=syms, held_out=x[24:], steps=4, lr=0.1)
    for n, p in model.named_parameters():
        assert torch.equal(p, w0[n])


def test_charge_check_sees_an_action_applied_with_the_wrong_element():
    model = _mlp()
    x, _ = _data()
    params = {n: p.detach() for n, p in model.named_parameters()}
    chart = OrbitChart(find_symmetries(model, x[:2]), ("rescale",), params)
    ts = [torch.full_like(t, 0.3) for t in chart.t]
    rows = []
    chart.move(params, ts, trace=lambda b, bef, aft, a: rows.append(_charge_check(b, bef, aft, a)))
    assert max(r[0] for r in rows) <= CHARGE_UNITS
    wrong = chart.move(params, [t * 1.01 for t in ts])  # moved by a slightly different element
    b = chart.bound[0]
    a = chart.group_parameters(ts)[0]
    assert _charge_check(b, params, wrong, a)[0] > 1e6 * CHARGE_UNITS


def test_batchnorm_cnn_running_statistics_and_eval_function_are_kept_and_scale_is_left_out():
    torch.manual_seed(1)
    model = cnn(3, [4, 6], 5, 8, norm="batch").double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    model.train()
    model(x)  # running statistics that are not the initial ones
    stats = {n: b.clone() for n, b in model.named_buffers()}
    r = teleport(model, (x[:8], y[:8]), families=("rescale", "scale"), held_out=x[8:], steps=4, lr=0.1)
    assert "scale" not in r.families and any("ε" in s for s in r.skipped)
    assert r.loss_change_rel < 1e-12 and r.function_change_rel < 1e-12
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_curvature_objective_moves_the_curvature_the_asked_way():
    x, y = _data()
    lo = teleport(_mlp(), (x, y), objective="curvature_min", steps=5, lr=0.1)
    hi = teleport(_mlp(), (x, y), objective="curvature_max", steps=5, lr=0.1)
    assert -lo.objective_after < -lo.objective_before and hi.objective_after > hi.objective_before
    assert lo.loss_change_rel < 1e-12 and hi.loss_change_rel < 1e-12
    kappa0 = hi.objective_before
    target = teleport(_mlp(), (x, y), objective=f"curvature={2 * kappa0}", steps=10, lr=0.1)
    # −(κ − K)² rose: κ moved towards K = 2κ₀ from κ₀
    assert target.objective_after > target.objective_before == pytest.approx(-kappa0 ** 2, rel=1e-9)
    with pytest.raises(SymtoolsError, match="unknown teleport objective"):
        teleport(_mlp(), (x, y), objective="curvature=soon", steps=1)


def test_two_layer_data_dependent_action_keeps_the_batch_loss_only():
    torch.manual_seed(0)
    model = mlp(16, [32], 5, activation="leaky_relu").double()
    x, y = _data(40)
    r = teleport_two_layer(model, (x[:20], y[:20]), held_out=x[20:], steps=8, lr=0.02)
    assert r.loss_change_rel <= r.loss_bound_rel and r.loss_bound_rel < 1e-8
    assert r.grad_norm_after > r.grad_norm_before
    assert r.function_change_rel > 1e-3  # data-dependent: other inputs see another function (reported)


@pytest.mark.parametrize("activation,batch,match", [("relu", 20, "not invertible"), ("leaky_relu", 34, "must not exceed")])
def test_negative_control_two_layer_action_refuses_what_theorem_4_1_excludes(activation, batch, match):
    model = mlp(16, [32], 5, activation=activation).double()
    x, y = _data(40)
    with pytest.raises(TeleportError, match=match):
        teleport_two_layer(model, (x[:batch], y[:batch]))


def test_invertibility_is_decided_symbolically():
    assert invertible(torch.nn.LeakyReLU(0.2))[0] and invertible(torch.nn.Tanh())[0]
    assert not invertible(torch.nn.ReLU())[0]


def _teleported_run(out, steps=6, resume=False, checkpoint_every=None):
    from symtools.numeric.monitor import Monitor
    from symtools.training_teleport import TeleportCallback

    torch.manual_seed(0)
    model = cnn(3, [4, 6], 5, 8, norm="batch").double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (12,), generator=g))
               for _ in range(6)]
    syms = find_symmetries(model, batches[0][0][:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = Monitor(syms, stride=2)
    tele = TeleportCallback(syms, 2, steps=3, lr=0.1, monitor=mon)
    summary = train(model, opt, batches, steps, out_dir=out, callbacks=[mon, tele], progress=False, resume=resume,
                    checkpoint_every=checkpoint_every)
    return model, summary


def test_training_with_teleports_keeps_the_per_step_law_exact(tmp_path):
    from symtools.numeric.records import read_stream

    _, summary = _teleported_run(tmp_path / "r")
    assert summary["teleports"]["count"] == 3  # after steps 2, 4 and 6
    assert summary["max_rel_residual_discrete"] < 1e-12
    cols, rows = read_stream(tmp_path / "r" / "records", "teleports")
    assert list(rows[:, 0]) == [2, 4, 6] and (rows[:, cols.index("objective_after")]
                                            >= rows[:, cols.index("objective_before")]).all()


def test_a_run_resumed_right_after_a_teleport_ends_where_an_uninterrupted_one_does(tmp_path):
    """Checkpoint at step 4, right after the teleport that follows step 4 (the monitor's predictions were
    rebased): the resumed run's weights and law records equal the uninterrupted run's."""
    from symtools.numeric.records import read_stream

    whole, _ = _teleported_run(tmp_path / "whole")
    _teleported_run(tmp_path / "cut", steps=4, checkpoint_every=4)
    resumed, summary = _teleported_run(tmp_path / "cut", resume=True, checkpoint_every=4)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)
    cols_w, rows_w = read_stream(tmp_path / "whole" / "records", "laws")
    cols_c, rows_c = read_stream(tmp_path / "cut" / "records", "laws")
    assert cols_w == cols_c
    np.testing.assert_array_equal(rows_w[:, 1:], rows_c[:, 1:])  # column 0 is the step
    assert summary["max_rel_residual_discrete"] < 1e-12


def test_cli_teleports_a_checkpoint_and_writes_one_audit_can_read(tmp_path, capsys):
    from symtools.checkpoints import load_checkpoint_file
    from symtools.nn.models import build_model

    torch.manual_seed(0)
    src = tmp_path / "w.pt"
    torch.save(build_model("vgg11_bn", input_size=32, classes=10).state_dict(), src)
    out = tmp_path / "t.pt"
    assert main(["teleport", str(src), "--steps", "1", "--batch", "4", "--out", str(out), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["families"]["rescale"] > 0 and report["loss_change_rel"] <= report["loss_bound_rel"]
    assert math.isfinite(report["grad_norm_after"])
    assert load_checkpoint_file(out).state_dict.keys() == torch.load(src, weights_only=True).keys()
    assert main(["teleport", str(src), "--families", "nonesuch", "--steps", "0", "--batch", "2"]) == 2
    assert "no group of the families nonesuch" in capsys.readouterr().err


def test_gl_teleport_of_a_linear_pair_keeps_the_function_and_moves_the_matrix_charge_as_derived():
    torch.manual_seed(0)
    model = mlp(16, [6], 5, activation="identity").double()
    x, y = _data()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    r = teleport(model, (x[:24], y[:24]), families=("gl_linear_pair",), held_out=x[24:], steps=6, lr=0.1,
                 optimizer=opt)
    assert r.families == {"gl_linear_pair": 1} and r.objective_after > r.objective_before
    assert r.loss_change_rel < 1e-12 and r.function_change_rel < 1e-12 and r.charge_residual_max <= CHARGE_UNITS
    assert r.optimizer_state.startswith("carried")
    moved = (model.fc0.weight.detach() - w0["fc0.weight"]).abs().max()
    assert moved > 1e-2  # a genuinely non-diagonal move: not a rescale (the columns mix)
    G = torch.linalg.lstsq(w0["fc0.weight"].T, model.fc0.weight.detach().T).solution.T
    assert (G - torch.diag(torch.diagonal(G))).abs().max() > 1e-3


def test_negative_control_gl_on_a_pair_with_a_nonlinearity_between_is_not_offered():
    model = mlp(16, [6], 5, activation="relu").double()
    x, y = _data()
    with pytest.raises(SymtoolsError, match="no group of the families gl_linear_pair"):
        teleport(model, (x, y), families=("gl_linear_pair",), steps=1)
