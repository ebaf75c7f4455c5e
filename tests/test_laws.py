"""Per-step charge laws under optimizers: the generated code predicts a REAL torch optimizer to round-off.

For each family (translation, scale, rescale, rescale2) a small network with that symmetry is trained with
torch.optim.SGD in float64 (plain, heavy-ball momentum with dampening 0 and 0.3, Nesterov) on a new random
minibatch every step. The per-group terms are measured with the generated density functions
(``symtools.codegen.generated.law_<family>_<optimizer>``), the generated ``first_step``/``step`` propagates the
tracked state from the initial charge alone, and after every step the prediction is compared with the state
measured on the new parameters and buffers.

Tolerance: LAW_TOL = 1e-12, relative to Σ|density| of the quantity (per group). Both sides are float64 sums of
O(100) products; the prediction accumulates 20 steps of a contracting linear recurrence, so the round-off is
O(20 · 100 · 1e-16) ≈ 2e-13 at worst (measured ≤ 1e-14, see the report). A wrong coefficient, a dropped
measured term or a wrong learning rate changes the prediction at O(η·|g|/|θ|) ≈ 1e-3 … 1e-7 relative.
Negative controls: the wrong lr; M1 omitted for a BatchNorm scale group (where ⟨g, θ⟩ = −2ε∂L/∂ε ≠ 0); the
SGD law applied to an Adam, AdamW, RMSprop or Adagrad run (every declared law that does not close).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from torch import nn

from symtools.codegen.emit_laws import emit_law, table_markdown
from symtools.codegen.emit import load_module
from symtools.nn.groups import GroupSet, TensorSlice
from symtools.nn.small import mlp
from symtools.numeric.bn_epsilon import bn_epsilon_gradients, predicted_scale_breaking
from symtools.numeric.groupops import group_view
from symtools.symbolic import library
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.continuous import characteristic
from symtools.symbolic.derive import derive
from symtools.symbolic.laws import LawError, first_order_breaking, law, quantity, satisfies_law, unroll_first_order
from symtools.numeric import optimizer_laws
from symtools.symbolic.optimizers import ETA, LAMBDA, MU, TAU

F64 = torch.float64
LAW_TOL = 1e-12
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("translation", "scale", "rescale", "rescale2")
SGD_CONFIGS = {  # name → (law module suffix, torch.optim.SGD kwargs beyond lr/weight_decay)
    "sgd": ("sgd", {}),
    "momentum": ("momentum", {"momentum": 0.9}),
    "momentum_damp": ("momentum", {"momentum": 0.8, "dampening": 0.3}),
    "nesterov": ("nesterov", {"momentum": 0.9, "nesterov": True}),
}
OPEN = tuple(n for n in optimizer_laws.CHOICES if not optimizer_laws.closes(n))  # adam, adamw, rmsprop, adagrad


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def law_module(family: str, optimizer: str):
    return importlib.import_module(f"symtools.codegen.generated.law_{family}_{optimizer}")


# ---------------------------------------------------------------------------------------------------------
# networks with the symmetry, groups bound by hand
# ---------------------------------------------------------------------------------------------------------


def network(family: str) -> tuple[nn.Module, list[GroupSet]]:
    """A small MLP with the family's symmetry on its first hidden layer (or its logits), groups bound by hand."""
    torch.manual_seed(0)
    hidden_in = (TensorSlice("fc0.weight", 0), TensorSlice("fc0.bias", 0))
    if family == "scale":        # fc0 → BatchNorm: each channel's (weight row, bias) is a scale group
        model = mlp(5, [7, 6], 3, "relu", norm="batch")
        model.norm0.eps = 1e-3   # ε breaks the scale identity; a larger ε makes the M1 control sharper
        groups = [GroupSet("scale", "fc0", 7, {"x": hidden_in}, epsilon_of="norm0")]
    elif family in ("rescale", "rescale2"):   # ReLU (degree 1) or z² (degree 2) between fc0 and fc1
        model = mlp(5, [7, 6], 3, "relu" if family == "rescale" else "quadratic")
        groups = [GroupSet(family, "fc0", 7, {"x_in": hidden_in, "x_out": (TensorSlice("fc1.weight", 1),)})]
    else:                        # softmax(z + c·1) = softmax(z): the logits' columns and the whole bias
        model = mlp(5, [6], 3, "relu")
        groups = [GroupSet("translation", "out.columns", 6, {"x": (TensorSlice("out.weight", 1),)}),
                  GroupSet("translation", "out.bias", 1, {"x": (TensorSlice("out.bias", None),)})]
    if family == "rescale2":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.6)
    return model.to(F64), groups


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)


def measure(module, name: str, gs: GroupSet, sources: dict[str, dict[str, torch.Tensor]], absolute=False) -> torch.Tensor:
    """Per-group Σ density of ``name``; ``sources`` maps an argument prefix ('', 'g_', 'b_', 'u_', 'd_') to tensors
    by parameter name. ``absolute`` sums |density| instead (the scale of the quantity)."""
    total = torch.zeros(gs.count, dtype=F64)
    for slot, slices in gs.slots.items():
        fn = module.DENSITY[name][slot]
        for i, ts in enumerate(slices):
            args = []
            for arg in module.ARGS[name][slot]:
                prefix = next((p for p in ("g_", "b_", "u_", "d_") if arg.startswith(p) and arg[len(p):] in gs.slots), "")
                other = gs.slots[arg[len(prefix):]][i]
                args.append(group_view(sources[prefix][other.param], other))
            val = fn(*args)
            total += (val.abs() if absolute else val).sum(dim=1)
    return total


# ---------------------------------------------------------------------------------------------------------
# one training run against the generated law
# ---------------------------------------------------------------------------------------------------------


def run(family: str, optimizer: str = "sgd", torch_opt: str = "sgd", kwargs: dict | None = None, lr: float = 0.1,
        wd: float = 0.01, steps: int = 20, law_lr: float | None = None, drop: tuple[str, ...] = (),
        check_epsilon: bool = False) -> list[float]:
    """Train ``steps`` steps, propagate the law, return the worst relative residual after each step."""
    kwargs = kwargs or {}
    model, groups = network(family)
    params = dict(model.named_parameters())
    if torch_opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, **kwargs)
    else:  # any declared optimizer, built from its declaration (torch's defaults for β, ε, ρ …)
        opt = optimizer_laws.make_optimizer(torch_opt, model.parameters(), lr=lr, weight_decay=wd)
    mod = law_module(family, optimizer)
    hyper = dict(lr=law_lr or lr, weight_decay=wd, momentum=kwargs.get("momentum", 0.0),
                 dampening=kwargs.get("dampening", 0.0))
    states, worst = [None] * len(groups), []
    for n in range(steps):
        x, y = batch(n)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        theta = {k: p.detach().clone() for k, p in params.items()}
        src = {"": theta, "g_": {k: p.grad.detach().clone() for k, p in params.items()},
               "b_": {k: opt.state[p].get("momentum_buffer", torch.zeros_like(p)).clone() if p in opt.state
                      else torch.zeros_like(p) for k, p in params.items()}}
        first = n == 0
        names_in = mod.FIRST_MEASURED if first else mod.MEASURED
        before = [{m: measure(mod, m, gs, src) for m in names_in if not m.startswith("U")} for gs in groups]
        if check_epsilon and n < 3:  # the measured M1 of a BatchNorm scale group is the predicted ε term
            pred = predicted_scale_breaking(model, bn_epsilon_gradients(model, x, y))["norm0"]
            got = before[0]["M1"]
            assert float((got - pred).abs().max()) <= 1e-10 * float(pred.abs().max()), (got, pred)
            assert float(pred.abs().min()) > 0
        if first:
            states = [{q: measure(mod, q, gs, src) for q in mod.FIRST_STATE} for gs in groups]
        opt.step()
        new = {"": {k: p.detach().clone() for k, p in params.items()},
               "b_": {k: opt.state[p].get("momentum_buffer", torch.zeros_like(p)).clone() for k, p in params.items()}}
        decay = optimizer_laws.decay(torch_opt, {"lr": lr, "weight_decay": wd})  # θ' = decay·θ − η·u
        src["u_"] = {k: (decay * theta[k] - new[""][k]) / lr for k in params}    # the applied update direction
        resid = 0.0
        for k, gs in enumerate(groups):
            measured = dict(before[k])
            measured.update({m: measure(mod, m, gs, src) for m in names_in if m.startswith("U")})
            for m in drop:
                measured[m] = torch.zeros_like(measured[m])
            states[k] = (mod.first_step if first else mod.step)(states[k], measured, **hyper)
            for q in mod.STATE:
                actual = measure(mod, q, gs, new)
                scale = measure(mod, q, gs, new, absolute=True)
                resid = max(resid, float(((states[k][q] - actual).abs() / scale).max()))
        worst.append(resid)
    return worst


# ---------------------------------------------------------------------------------------------------------
# positive: every family × every SGD configuration, to round-off
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_law_predicts_torch_sgd_to_roundoff(family, config):
    optimizer, kwargs = SGD_CONFIGS[config]
    resid = run(family, optimizer, "sgd", kwargs, check_epsilon=(family == "scale" and config == "sgd"))
    assert max(resid) <= LAW_TOL, resid


@pytest.mark.parametrize("family", ("scale", "rescale"))
@pytest.mark.parametrize("torch_opt", OPEN)
def test_adam_taylor_law_with_measured_breaking_term(family, torch_opt):
    """A preconditioned optimizer's law (Adam, AdamW, RMSprop, Adagrad) is exact once the breaking term
    U1 = ⟨u, v⟩ (u the applied update) is measured."""
    assert max(run(family, torch_opt, torch_opt, lr=0.01)) <= LAW_TOL


# ---------------------------------------------------------------------------------------------------------
# negative controls
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_learning_rate_is_detected(family):
    assert max(run(family, "momentum", "sgd", {"momentum": 0.9}, law_lr=0.1 * 1.001)) > 1e3 * LAW_TOL


def test_dropping_m1_breaks_the_batchnorm_scale_law_only():
    # BatchNorm's ε: ⟨g_A, θ_A⟩ = −2ε∂L/∂ε ≠ 0, so the law without M1 is off by far more than round-off ...
    assert max(run("scale", "sgd", drop=("M1",))) > 1e3 * LAW_TOL
    # ... while for ReLU rescale groups ⟨g, v⟩ = 0 holds to round-off and M1 may be dropped.
    assert max(run("rescale", "sgd", drop=("M1",))) <= LAW_TOL


@pytest.mark.parametrize("family", ("scale", "rescale"))
@pytest.mark.parametrize("torch_opt", OPEN)
def test_sgd_law_fails_on_a_preconditioned_run(family, torch_opt):
    assert max(run(family, "sgd", torch_opt, lr=0.01)) > 1e3 * LAW_TOL


@pytest.mark.parametrize("name", OPEN)
def test_preconditioned_law_is_open_and_its_breaking_term_is_real(name):
    """The law does not close (declared, derived and emitted alike), and on one real step of a ReLU network
    the breaking term U1 = ⟨u, v⟩ is far from 0 while ⟨g, v⟩ (the closing SGD law's M1) is round-off."""
    d = _derivation("rescale")
    lw = law(d, name)
    assert not optimizer_laws.closes(name) and not lw.closed and "U1" in lw.measured_names
    mod, sgd = law_module("rescale", name), law_module("rescale", "sgd")
    assert mod.CLOSED is False and "U1" not in mod.PREDICTED and sgd.CLOSED is True
    model, groups = network("rescale")
    params = dict(model.named_parameters())
    lr, wd = 0.01, 0.01
    opt = optimizer_laws.make_optimizer(name, model.parameters(), lr=lr, weight_decay=wd)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    theta = {k: p.detach().clone() for k, p in params.items()}
    src = {"": theta, "g_": {k: p.grad.detach().clone() for k, p in params.items()}}
    opt.step()
    decay = optimizer_laws.decay(name, {"lr": lr, "weight_decay": wd})
    src["u_"] = {k: (decay * theta[k] - p.detach()) / lr for k, p in params.items()}
    for gs in groups:
        m1 = measure(sgd, "M1", gs, src).abs() / measure(sgd, "M1", gs, src, absolute=True)
        u1 = measure(mod, "U1", gs, src).abs() / measure(mod, "U1", gs, src, absolute=True)
        assert float(m1.max()) <= LAW_TOL, m1       # the identity holds: ⟨g, v⟩ = 0 to round-off
        assert float(u1.max()) > 1e-2, u1           # the preconditioned update breaks it at first order
    assert max(run("rescale", "sgd", steps=3)) <= LAW_TOL   # the closing SGD law on the same network: round-off


# ---------------------------------------------------------------------------------------------------------
# symbolic checks
# ---------------------------------------------------------------------------------------------------------


def _derivation(family):
    return derive(library.elementwise(family))


def test_translation_under_momentum_is_a_damped_oscillator():
    a, _ = law(_derivation("translation"), "momentum").matrix()    # (Q, R)' = A (Q, R) + b·M1, M1 = 0
    z = sp.Symbol("z")
    want = z**2 - (1 + MU - ETA * LAMBDA * (1 - TAU)) * z + MU  # s_{n+1} = (1+μ−ηλ(1−τ)) s_n − μ s_{n−1}
    assert sp.expand(characteristic(a, z) - want) == 0
    assert sp.expand(characteristic(a, z) - (z**2 - (1 + MU - ETA * LAMBDA) * z + MU)) != 0  # τ matters
    roots = sp.solve(characteristic(a.subs(TAU, 0), z), z)
    assert sp.simplify(roots[0] * roots[1] - MU) == 0            # |z|² = μ when the roots are complex
    an, _ = law(_derivation("translation"), "nesterov").matrix()
    assert sp.expand(characteristic(an, z) - (z**2 - (1 + MU - ETA * LAMBDA * (1 + MU * (1 - TAU))) * z
                                               + MU * (1 - ETA * LAMBDA))) == 0


def test_sgd_scale_law_is_appendix_i_eq40():
    lw = law(_derivation("scale"), "sgd")
    n, i = sp.symbols("n i", integer=True, nonnegative=True)
    q0, g = sp.Symbol("Q_0"), sp.Function("G")
    drives = {"G": g, "M1": sp.Function("M1")}
    eq40 = (1 - ETA * LAMBDA) ** (2 * n) * q0 + ETA**2 * sp.Sum((1 - ETA * LAMBDA) ** (2 * (n - 1 - i)) * g(i), (i, 0, n - 1))
    assert satisfies_law(lw, eq40, n, q0, drives, drop=("M1",))[0]
    assert sp.simplify(unroll_first_order(lw, n, i, q0, drives, drop=("M1",)) - eq40) == 0
    slip = (1 - ETA * LAMBDA) ** (2 * n) * q0 + ETA**2 * sp.Sum((1 - ETA * LAMBDA) ** (2 * (n - i)) * g(i), (i, 0, n - 1))
    assert not satisfies_law(lw, slip, n, q0, drives, drop=("M1",))[0]


def test_first_step_is_the_later_step_from_a_zero_buffer_without_dampening():
    lw = law(_derivation("rescale"), "momentum")
    zero = {quantity(k): 0 for k in ("P", "R", "C")}
    for k, e in lw.update.items():
        assert sp.expand(e.xreplace(zero).subs(TAU, 0) - lw.first_update[k]) == 0
    assert any(sp.expand(e.xreplace(zero) - lw.first_update[k]) != 0 for k, e in lw.update.items())
    sgd = law(_derivation("rescale"), "sgd")   # μ = τ = 0: heavy ball is plain SGD
    assert sp.expand(lw.update["Q"].xreplace(zero).subs({MU: 0, TAU: 0}) - sgd.update["Q"]) == 0


def test_adam_breaks_the_identity_at_first_order_and_sgd_does_not():
    d = _derivation("scale")
    for opt in OPEN:
        _, reduces, why = first_order_breaking(d, opt)
        assert not reduces and "not a constant multiple" in why
    for opt in ("sgd", "momentum", "nesterov"):
        assert first_order_breaking(d, opt)[1]


# ---------------------------------------------------------------------------------------------------------
# a declared polynomial charge: x → x/(1 − a x), charge x³ (the terminating Taylor form, emitted and run)
# ---------------------------------------------------------------------------------------------------------


def test_cubic_charge_taylor_law_on_a_real_run():
    d = derive(ElementwiseAction.from_spec("x -> x/(1 - a*x)", name="inverse_shift"))
    assert d.charge.density == {"x": sp.Symbol("x", real=True) ** 3}
    lw = law(d, "sgd")
    assert lw.measured_names == ("M1", "G", "G3")
    with pytest.raises(LawError, match="degree 1 or 2"):
        law(d, "momentum")
    mod = load_module(emit_law(lw), "law_inverse_shift_sgd")
    # L depends on x only through 1/x_k − 1/x_l, which x → x/(1 − a x) shifts by the same −a: invariant.
    torch.manual_seed(0)
    w = torch.randn(6, dtype=F64)
    x = (1.0 + torch.rand(6, dtype=F64)).requires_grad_(True)
    lr, wd = 0.05, 0.02
    opt = torch.optim.SGD([x], lr=lr, weight_decay=wd)
    gs = GroupSet("inverse_shift", "x", 1, {"x": (TensorSlice("x", None),)})
    state = None
    for n in range(20):
        opt.zero_grad()
        r = 1 / x
        loss = ((r - r.mean()) * w).sum() ** 2 + torch.sin(r[0] - r[1])
        loss.backward()
        src = {"": {"x": x.detach().clone()}, "g_": {"x": x.grad.detach().clone()}}
        measured = {m: measure(mod, m, gs, src) for m in mod.MEASURED}
        assert abs(float(measured["M1"])) <= 1e-14 * float(measure(mod, "M1", gs, src, absolute=True))
        state = state or {"Q": measure(mod, "Q", gs, src)}
        opt.step()
        state = mod.step(state, measured, lr, wd)
        new = {"": {"x": x.detach().clone()}}
        resid = float((state["Q"] - measure(mod, "Q", gs, new)).abs() / measure(mod, "Q", gs, new, absolute=True))
        assert resid <= LAW_TOL, (n, resid)


# ---------------------------------------------------------------------------------------------------------
# the continuous theory, as emitted
# ---------------------------------------------------------------------------------------------------------


def test_continuous_sgd_matches_the_exact_law_to_order_eta_lambda_squared():
    """Q_c ← e^{−2ηλ}Q_c + η²G versus Q ← (1−ηλ)²Q + η²G (+M1 term): they differ by n·(ηλ)² relative."""
    exact, cont = law_module("scale", "sgd"), law_module("scale", "sgd")
    lr, wd, n = 0.1, 0.05, 50
    q = torch.tensor([3.0], dtype=F64)
    st, ct = {"Q": q}, cont.continuous_start({"Q": q})
    for k in range(n):
        g = torch.tensor([0.5 + 0.1 * math.sin(k)], dtype=F64)
        st = exact.step(st, {"G": g, "M1": torch.zeros_like(g)}, lr, wd)
        ct = cont.continuous_step(ct, {"G": g}, lr, wd)
    rel = float((ct["Qc"] - st["Q"]).abs() / st["Q"])
    assert 0.1 * n * (lr * wd) ** 2 < rel < 2 * n * (lr * wd) ** 2, rel


@pytest.mark.parametrize("mu,wd", [(0.9, 1e-3), (0.9, 0.0), (0.5, 0.9)])   # under-, over-damped and λ = 0
def test_continuous_momentum_translation_is_the_papers_eq34(mu, wd):
    """Iterating the emitted propagator reproduces eq. (34) at t = n·h in each damping regime."""
    mod = law_module("translation", "momentum")
    lr, tau, q0, n = 0.1, 0.2, 2.0, 40
    h = lr * (1 - tau)
    gamma, omega2 = (1 - mu) / (h * (1 + mu)), 2 * wd / (h * (1 + mu))
    st = mod.continuous_start({"Q": torch.tensor([q0], dtype=F64)})
    for _ in range(n):
        st = mod.continuous_step(st, {}, lr, wd, mu, tau)
    t = n * h
    k2 = gamma**2 - omega2
    if k2 > 0:
        k = math.sqrt(k2)
        want = math.exp(-gamma * t) * (math.cosh(k * t) + gamma / k * math.sinh(k * t)) * q0
    else:
        k = math.sqrt(-k2)
        want = math.exp(-gamma * t) * (math.cos(k * t) + gamma / k * math.sin(k * t)) * q0
    assert abs(float(st["Qc"]) - want) <= 1e-12 * abs(q0)


# ---------------------------------------------------------------------------------------------------------
# the docs table is the generated modules' table
# ---------------------------------------------------------------------------------------------------------


def test_docs_table_is_current():
    text = (ROOT / "docs" / "laws.md").read_text()
    assert table_markdown() in text, "docs/laws.md's table is stale: paste symtools.codegen.emit_laws.table_markdown()"


# ---------------------------------------------------------------------------------------------------------
# the derivation scripts
# ---------------------------------------------------------------------------------------------------------


def test_weight_decay_script_passes_and_its_page_is_current(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "derivations" / "weight_decay.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "weight_decay: PASS" in proc.stdout, proc.stdout + proc.stderr
    page = (tmp_path / "weight_decay.md").read_text()
    for ref in ("eq. (18)", "eq. (19)", "eq. (20)", "eq. (40)", "eq. (41)", "(27)"):
        assert ref in page
    assert (ROOT / "docs" / "derivations" / "weight_decay.md").read_text() == page, \
        "docs/derivations/weight_decay.md is stale: run python derivations/weight_decay.py"


def test_momentum_page_is_committed():
    # derivations/momentum.py takes ~40 s (three driven dsolve calls), so it is not rerun here.
    page = (ROOT / "docs" / "derivations" / "momentum.md").read_text()
    assert "all checks pass" in page and "**MISMATCH**" not in page
    for ref in ("eq. (33)", "eq. (35)", "eq. (36)", "eq. (38)", "appendix H.3"):
        assert ref in page
