"""The optimizer declared once: the mapping torch optimizer → law, and the declared rules against real torch steps.

* The mapping (:mod:`symtools.numeric.optimizer_laws`) on live optimizers and on their saved state dicts agrees
  case by case (SGD, momentum, Nesterov, maximize, mixed groups, Adam, AdamW, RMSprop, Adagrad, undeclared).
* Every declared update rule (:mod:`symtools.symbolic.optimizers`), evaluated on one element with numpy, equals
  a real torch 2.13 step on random float64 tensors, four steps in a row (the first step's rule where torch
  creates its state). Tolerance 1e-12 relative to the largest entry: both sides are a handful of float64
  operations in a different order, ~1e-16 apart; a wrong term is off by far more (negative control: RMSprop and
  Adagrad declared without their ε, run with ε = 0.05, are off by > 1e-3).
* The audit's hypothesis from a checkpoint's optimizer state uses the same mapping.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import sympy as sp
import torch

from symtools.audit.compare import ADAM_FAMILY, OPTIMIZERS, hyper_from_optimizer
from symtools.errors import SymtoolsError
from symtools.numeric import optimizer_laws as ol
from symtools.symbolic.optimizers import (
    DECLARATIONS,
    EPS,
    GRAD,
    PYTHON_NAMES,
    STATE_SYMBOLS,
    STEP,
    THETA,
    declaration,
    torch_kwargs,
)

F64 = torch.float64
RULE_TOL = 1e-12
O = torch.optim

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _p(n: int = 3) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(n, dtype=F64))]


# ---------------------------------------------------------------------------------------------------------
# the mapping
# ---------------------------------------------------------------------------------------------------------

CASES = {  # name → (factory, expected law, substring of the reason ("" when the law closes))
    "sgd": (lambda: O.SGD(_p(), lr=0.1), "sgd", ""),
    "sgd_dampening_no_momentum": (lambda: O.SGD(_p(), lr=0.1, dampening=0.3), "sgd", ""),
    "momentum": (lambda: O.SGD(_p(), lr=0.1, momentum=0.9, dampening=0.2), "momentum", ""),
    "nesterov": (lambda: O.SGD(_p(), lr=0.1, momentum=0.9, nesterov=True), "nesterov", ""),
    "maximize": (lambda: O.SGD(_p(), lr=0.1, maximize=True), None, "SGD with maximize=True has no derived law"),
    "maximize_one_group": (lambda: O.SGD([{"params": _p()}, {"params": _p(), "maximize": True}], lr=0.1), None,
                           "SGD with maximize=True has no derived law"),
    "mixed_plain_momentum": (lambda: O.SGD([{"params": _p()}, {"params": _p(), "momentum": 0.9}], lr=0.1), None,
                             "param groups mix momentum and plain SGD"),
    "mixed_momentum_nesterov": (lambda: O.SGD([{"params": _p(), "momentum": 0.9},
                                               {"params": _p(), "momentum": 0.9, "nesterov": True}], lr=0.1),
                                "momentum", ""),
    "adam": (lambda: O.Adam(_p()), "adam", "no exact law is derived for Adam:"),
    "adam_decoupled": (lambda: O.Adam(_p(), decoupled_weight_decay=True), "adamw", "no exact law is derived for AdamW"),
    "adam_amsgrad": (lambda: O.Adam(_p(), amsgrad=True), None, "Adam with amsgrad=True has no derived law"),
    "adam_maximize": (lambda: O.Adam(_p(), maximize=True), None, "Adam with maximize=True"),
    "adamw": (lambda: O.AdamW(_p(), weight_decay=0.01), "adamw", "no exact law is derived for AdamW:"),
    "rmsprop": (lambda: O.RMSprop(_p(), weight_decay=0.01), "rmsprop", "no exact law is derived for RMSprop:"),
    "rmsprop_centered": (lambda: O.RMSprop(_p(), centered=True), None, "RMSprop with centered=True has no derived law"),
    "rmsprop_momentum": (lambda: O.RMSprop(_p(), momentum=0.9), None, "RMSprop with momentum=0.9"),
    "adagrad": (lambda: O.Adagrad(_p(), initial_accumulator_value=0.3), "adagrad", "no exact law is derived for Adagrad"),
    "adagrad_lr_decay": (lambda: O.Adagrad(_p(), lr_decay=0.01), None, "Adagrad with lr_decay=0.01 has no derived law"),
    "lbfgs": (lambda: O.LBFGS(_p()), None, "no law is declared for torch.optim.lbfgs.LBFGS"),
}


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("case", list(CASES))
def test_law_of_optimizer(case):
    factory, want, reason = CASES[case]
    opt = factory()
    got, why = ol.law_of_optimizer(opt)
    assert got == want and reason in why, (got, why)
    assert (why == "") == (want is not None and ol.closes(want))
    # the saved state dict, with its class name (what a symtools checkpoint has) and without it
    sd = opt.state_dict()
    assert ol.law_of_state_dict(sd, type(opt).__name__) == (got, why) or case == "lbfgs"
    if case != "lbfgs":
        assert ol.law_of_state_dict(sd)[0] == got
    for pg in opt.param_groups:  # every group has a law iff the whole has one (or the groups only mix)
        own = ol.law_of_group(pg, type(opt).__name__)
        assert own is not None or want is None


def test_a_subclass_has_no_law_and_unknown_state_dicts_say_what_they_hold():
    got, why = ol.law_of_optimizer(MySGD(_p(), lr=0.1))
    assert got is None and "MySGD" in why and "exact classes only" in why
    got, why = ol.law_of_state_dict({"param_groups": [{"lr": 0.1, "rho": 0.9, "params": [0]}]})
    assert got is None and "unknown class" in why and "'rho'" in why
    assert ol.law_of_state_dict({"param_groups": []}) == (None, "the optimizer has no param groups")
    # an older checkpoint's AdamW group without decoupled_weight_decay: the class default decides
    assert ol.law_of_group({"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01}, "AdamW") == "adamw"
    assert ol.law_of_group({"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01}, "adam") == "adam"


def test_choices_are_the_declarations_in_order_and_closing_is_declared():
    assert ol.CHOICES == tuple(DECLARATIONS) == OPTIMIZERS
    assert ol.CHOICES[:5] == ("sgd", "momentum", "nesterov", "adam", "adamw")
    assert {"rmsprop", "adagrad"} <= set(ol.CHOICES)
    assert set(ADAM_FAMILY) == {"adam", "adamw", "rmsprop", "adagrad"}
    assert [n for n in ol.CHOICES if ol.closes(n)] == ["sgd", "momentum", "nesterov"]
    assert ol.torch_class("rmsprop") == "RMSprop" and ol.torch_class("nesterov") == "SGD"
    from symtools.codegen.emit_laws import OPTIMIZERS as EMITTED
    from symtools.codegen.emit_laws import TITLES
    assert EMITTED == ol.CHOICES and set(TITLES) == set(ol.CHOICES)
    assert TITLES["sgd"] == "torch.optim.SGD(lr, weight_decay)"
    assert TITLES["rmsprop"].endswith("the law does not close; the breaking term is measured")


def test_cli_choices_come_from_the_declarations():
    from symtools.cli.main import build_parser

    for command in ("train", "audit"):
        parser = build_parser(load=command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        action = next(a for a in sub._actions if a.dest == "optimizer")
        assert tuple(action.choices) == ol.CHOICES


def test_hyper_of_group():
    h = ol.hyper_of_group(O.SGD(_p(), lr=0.2, momentum=0.9, dampening=0.3, weight_decay=0.01).param_groups[0],
                          "momentum")
    assert set(h) == set(ol.HYPER_NAMES)
    assert (h["lr"], h["weight_decay"], h["momentum"], h["dampening"], h["eps"]) == (0.2, 0.01, 0.9, 0.3, 0.0)
    h = ol.hyper_of_group(O.SGD(_p(), lr=0.2, dampening=0.3).param_groups[0], "sgd")
    assert h["dampening"] == 0.0 and h["momentum"] == 0.0   # plain SGD has neither
    h = ol.hyper_of_group(O.Adam(_p(), lr=1e-3, betas=(0.8, 0.95), eps=1e-6).param_groups[0], "adam")
    assert (h["beta1"], h["beta2"], h["eps"], h["momentum"]) == (0.8, 0.95, 1e-6, 0.0)
    h = ol.hyper_of_group(O.RMSprop(_p(), lr=0.01, alpha=0.9, eps=1e-5, weight_decay=0.1).param_groups[0], "rmsprop")
    assert (h["lr"], h["alpha"], h["eps"], h["weight_decay"]) == (0.01, 0.9, 1e-5, 0.1)
    h = ol.hyper_of_group(O.Adagrad(_p(), lr=0.05, eps=1e-9).param_groups[0], "adagrad")
    assert (h["lr"], h["eps"], h["alpha"]) == (0.05, 1e-9, 0.0)
    assert ol.hyper_of_group({"lr": torch.tensor(0.5)}, "sgd")["lr"] == 0.5   # a tensor lr (torch allows it)
    assert "nesterov" in ol.group_keys("nesterov") and "betas" in ol.group_keys("adam")
    assert ol.decay("adamw", {"lr": 0.1, "weight_decay": 0.5}) == pytest.approx(0.95)
    assert ol.decay("adam", {"lr": 0.1, "weight_decay": 0.5}) == 1.0


def test_state_entries_are_what_torch_keeps():
    assert ol.state_entry("momentum", "b") == "momentum_buffer"
    assert ol.state_entry("adam", "m") == "exp_avg" and ol.state_entry("adamw", sp.Symbol("s")) == "exp_avg_sq"
    assert ol.state_entry("rmsprop", "s") == "square_avg" and ol.state_entry("adagrad", "s") == "sum"
    assert ol.state_entry("adam", "k") == "step"
    with pytest.raises(SymtoolsError, match="keeps no optimizer state 'b'"):
        ol.state_entry("sgd", "b")
    for name in ol.CHOICES:  # after a step, torch's state holds exactly the declared entries (and its step count)
        p = _p()
        opt = ol.make_optimizer(name, p, lr=0.01, **({"momentum": 0.9} if "momentum" in
                                                     declaration(name).python_names else {}))
        p[0].grad = torch.ones_like(p[0])
        opt.step()
        kept = set(opt.state[p[0]]) - {"step"}
        assert kept == set(ol.state_entries(name).values()) - {"step"}, (name, kept)


def test_make_optimizer_checks_what_it_builds():
    assert isinstance(ol.make_optimizer("adagrad", _p(), lr=0.1), O.Adagrad)
    assert ol.make_optimizer("nesterov", _p(), lr=0.1, momentum=0.9).param_groups[0]["nesterov"] is True
    with pytest.raises(SymtoolsError, match="follows sgd, not momentum"):
        ol.make_optimizer("momentum", _p(), lr=0.1)
    with pytest.raises(SymtoolsError, match="has no momentum"):
        ol.make_optimizer("rmsprop", _p(), lr=0.1, momentum=0.9)
    assert torch_kwargs("adam", lr=1e-3, beta1=0.8, beta2=0.9) == {"lr": 1e-3, "betas": (0.8, 0.9)}


# ---------------------------------------------------------------------------------------------------------
# the declared rules are torch's (one element, numpy) — every declaration, RMSprop and Adagrad included
# ---------------------------------------------------------------------------------------------------------

RUNS = {  # law → hyper-parameters by python name; eps large enough that a missing ε shows
    "sgd": {"lr": 0.1, "weight_decay": 0.01},
    "momentum": {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.9, "dampening": 0.3},
    "nesterov": {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.9},
    "adam": {"lr": 0.01, "weight_decay": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 0.05},
    "adamw": {"lr": 0.01, "weight_decay": 0.01, "beta1": 0.8, "beta2": 0.9, "eps": 0.05},
    "rmsprop": {"lr": 0.01, "weight_decay": 0.01, "alpha": 0.9, "eps": 0.05},
    "adagrad": {"lr": 0.1, "weight_decay": 0.01, "eps": 0.05},
}
EXTRA = {"adagrad": {"initial_accumulator_value": 0.3}}   # torch-only: the accumulator's start (any value works)
_SYMBOL = {n: s for s, n in PYTHON_NAMES.items()}


def _evaluate(expr: sp.Expr, values: dict[sp.Symbol, object]) -> np.ndarray:
    syms = sorted(expr.free_symbols, key=str)
    missing = [s for s in syms if s not in values]
    assert not missing, missing
    f = sp.lambdify(syms, expr, "numpy")
    return np.asarray(f(*[values[s] for s in syms]), dtype=np.float64)


def _compare_rules(name: str, decl=None, steps: int = 4) -> float:
    """Worst |declared − torch| / max|torch| over θ' and the new state, ``steps`` steps on random tensors."""
    decl = decl or declaration(name)
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(64, generator=gen, dtype=F64))
    opt = getattr(torch.optim, decl.torch_class)([p], **torch_kwargs(name, **RUNS[name]), **EXTRA.get(name, {}))
    assert ol.law_of_optimizer(opt)[0] == name
    entries = ol.state_entries(name)
    worst = 0.0
    for _ in range(steps):
        p.grad = torch.randn(64, generator=gen, dtype=F64)
        before = opt.state.get(p, {})
        fresh = any(entries[k] not in before for k in decl.state)
        rule = decl.first if fresh else decl.rule
        values = {THETA: p.detach().numpy().copy(), GRAD: p.grad.numpy().copy()}
        for kind, (template, _) in STATE_SYMBOLS.items():
            entry = entries.get(kind)
            values[template] = (0.0 if fresh or entry is None else before[entry].numpy().copy())
        values[STEP] = float(before.get("step", 0)) + 1
        h = ol.hyper_of_group(opt.param_groups[0], name)
        values.update({_SYMBOL[k]: v for k, v in h.items()})
        opt.step()
        pairs = [(rule.theta, p.detach())] + [(rule.state[k], opt.state[p][entries[k]]) for k in rule.state]
        for expr, actual in pairs:
            want = _evaluate(expr, values)
            actual = actual.numpy()
            worst = max(worst, float(np.abs(np.broadcast_to(want, actual.shape) - actual).max() / np.abs(actual).max()))
    return worst


@pytest.mark.parametrize("name", list(RUNS))
def test_declared_rule_is_one_torch_step(name):
    assert set(RUNS) == set(ol.CHOICES)
    assert _compare_rules(name) <= RULE_TOL


@pytest.mark.parametrize("name", ("rmsprop", "adagrad", "adam"))
def test_a_declaration_without_its_epsilon_is_caught(name):
    decl = declaration(name)
    wrong = dataclasses.replace(decl, rule=dataclasses.replace(decl.rule, theta=decl.rule.theta.subs(EPS, 0)),
                                first=dataclasses.replace(decl.first, theta=decl.first.theta.subs(EPS, 0)))
    assert _compare_rules(name, wrong) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# the audit reads a checkpoint's optimizer with the same mapping
# ---------------------------------------------------------------------------------------------------------


def test_audit_hypothesis_uses_the_same_mapping():
    names = ["a", "b"]
    two = lambda: [{"params": _p()}, {"params": _p()}]
    h = hyper_from_optimizer(O.RMSprop(_p(), lr=0.01, weight_decay=1e-3, alpha=0.9).state_dict(), names, "RMSprop")
    assert (h.optimizer, h.lr, h.weight_decay, h.momentum) == ("rmsprop", 0.01, 1e-3, 0.0)
    assert any("alpha 0.9" in n for n in h.notes)
    assert hyper_from_optimizer(O.Adagrad(_p(), lr=0.1).state_dict(), names).optimizer == "adagrad"  # no class name
    assert hyper_from_optimizer(O.Adam(_p(), decoupled_weight_decay=True).state_dict(), names, "Adam").optimizer == "adamw"
    h = hyper_from_optimizer(O.SGD(_p(), lr=0.1, momentum=0.5, dampening=0.1).state_dict(), names, "SGD")
    assert (h.optimizer, h.momentum, h.dampening) == ("momentum", 0.5, 0.1)
    for opt, match in ((O.SGD(_p(), lr=0.1, maximize=True), "maximize=True"),
                       (O.SGD([{"params": _p()}, {"params": _p(), "momentum": 0.9}], lr=0.1), "mix momentum and plain"),
                       (O.RMSprop(_p(), centered=True), "centered=True"),
                       (O.LBFGS(_p()), "no law is declared")):
        with pytest.raises(SymtoolsError, match=match):
            hyper_from_optimizer(opt.state_dict(), names, type(opt).__name__)
    # heavy ball and Nesterov groups: the first group's law; the other group's parameters say so
    opt = O.SGD([{"params": _p(), "momentum": 0.9}, {"params": _p(), "momentum": 0.9, "nesterov": True}], lr=0.1)
    h = hyper_from_optimizer(opt.state_dict(), names, "SGD", steps=2)
    assert h.optimizer == "momentum"
    assert h.for_params(["a"])[1] == ""
    assert "nesterov" in h.for_params(["b"])[1]
    opt = O.SGD(two(), lr=0.1)
    opt.param_groups[1]["lr"] = 0.2
    h = hyper_from_optimizer(opt.state_dict(), names, "SGD", steps=2)
    assert h.for_params(["b"])[0]["lr"] == [0.2, 0.2] and "different" in h.for_params(["a", "b"])[1]


# ---------------------------------------------------------------------------------------------------------
# symtools train builds the declared torch class (a tiny VGG-11 at 32×32, batch 4)
# ---------------------------------------------------------------------------------------------------------

TINY = ["train", "--model", "vgg11", "--input", "32", "--batch", "4", "--quiet", "--checkpoint-every", "0"]


def _cli(argv, capsys) -> tuple[int, str]:
    from symtools.cli.main import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "momentum"], "follows sgd, not momentum"),
    (["--optimizer", "sgd", "--momentum", "0.9"], "the sgd law (torch.optim.SGD(lr, weight_decay)) has no momentum"),
    (["--optimizer", "adagrad", "--momentum", "0.9"], "has no momentum"),
    (["--optimizer", "adam", "--nesterov", "--momentum", "0.9"], "--nesterov does not go with --optimizer adam"),
])
def test_train_refuses_a_law_its_flags_do_not_fit(argv, message, tmp_path, capsys):
    code, err = _cli(TINY + ["--steps", "1", "--out", tmp_path / "r"] + argv, capsys)
    assert code == 2 and message in err and not (tmp_path / "r").exists(), err


def test_train_runs_rmsprop_from_its_declaration(tmp_path, capsys):
    import json

    with pytest.warns(UserWarning, match="measured-only mode: no exact law is derived for RMSprop"):
        code, err = _cli(TINY + ["--steps", "1", "--optimizer", "rmsprop", "--lr", "1e-4", "--out", tmp_path / "r"],
                         capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["optimizer"] == "rmsprop"
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "step_000001.pt", weights_only=True)
    assert ckpt["config"]["optimizer_class"] == "RMSprop"
    assert "square_avg" in next(iter(ckpt["optimizer"]["state"].values()))
    assert any("no exact law is derived for RMSprop" in w for w in summary["monitor_warnings"])
