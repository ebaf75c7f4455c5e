"""Decisions of the audit and the figures rest on facts derived symbolically, never on random samples (issue 15).

The facts come from code generation (``CHARGE_TEXT``, ``DENSITY_TEXT``, ``NONNEGATIVE``, ``GENERATOR_CONSTANT``,
``LINEAR``: :mod:`symtools.codegen.emit_facts`) and from the optimizer declarations
(:mod:`symtools.symbolic.optimizers`: which optimizer states are running sums of gradients, their torch entries,
which laws are momentum laws). Every fact is checked against a negative control. Where a test evaluates a
generated function it does so on a fixed grid, as a check of the emitted text, not as the decision itself;
equal texts mean the same arithmetic, so those comparisons are exact (``torch.equal``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from symtools import plots
from symtools.audit import compare
from symtools.audit import core as audit_core
from symtools.audit.charges import CHARGE_WORDS, charge_formula, charge_name
from symtools.codegen import emit_laws
from symtools.codegen.emit import emit, load_module
from symtools.errors import SymtoolsError
from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn
from symtools.numeric.law_matrices import LawBank
from symtools.symbolic import library
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.derive import derive
from symtools.symbolic.optimizers import BUF, DECLARATIONS, ETA, GRAD, LAMBDA, MU, TAU, THETA, UpdateRule

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
CHARGED = emit_laws.families()
GRID = torch.linspace(-2.0, 2.0, 9, dtype=F64)  # fixed values, negatives included (a check of the text only)


def gen(name: str) -> types.ModuleType:
    return importlib.import_module(f"symtools.codegen.generated.{name}")


def from_spec(spec: str, name: str = "user") -> types.ModuleType:
    """The module ``symtools derive SPEC --torch FILE`` would write."""
    return load_module(emit(derive(ElementwiseAction.from_spec(spec, name=name))), name)


def copy_without(module: types.ModuleType, *names: str, **values) -> types.ModuleType:
    """A copy of ``module`` without the attributes ``names`` (a module of an older symtools) and with ``values``."""
    out = types.ModuleType(module.__name__)
    out.__dict__.update({k: v for k, v in vars(module).items() if k not in names})
    out.__dict__.update(values)
    return out


# ----------------------------------------------------------------------------------------------- same density
def test_charge_and_law_q_texts_print_identically():
    """The charge's symbols and the law's Q symbols print the same (``x_in**2`` in both), so equal text is a
    usable test of "the same density"; CHARGE_FACTOR = 1 says the same thing, derived separately."""
    assert {"translation", "scale", "rescale", "rescale2"} <= set(CHARGED)
    assert gen("rescale").CHARGE_TEXT == {"x_in": "x_in**2", "x_out": "-x_out**2"}
    for fam in CHARGED:
        text = gen(fam).CHARGE_TEXT
        for opt in emit_laws.OPTIMIZERS:
            law = gen(f"law_{fam}_{opt}")
            assert law.DENSITY_TEXT["Q"] == text, (fam, opt)
            assert compare.same_density(law.DENSITY_TEXT["Q"], text) and law.CHARGE_FACTOR == 1.0


def test_same_density_negative_controls():
    rescale, rescale2 = gen("rescale").CHARGE_TEXT, gen("rescale2").CHARGE_TEXT
    assert not compare.same_density(rescale, rescale2) and not compare.same_density(rescale2, rescale)
    assert not compare.same_density(rescale, gen("law_rescale2_sgd").DENSITY_TEXT["Q"])
    sgd = gen("law_scale_sgd").DENSITY_TEXT
    assert not compare.same_density(sgd["Q"], sgd["G"])                       # x**2 vs g_x**2: other arguments
    assert not compare.same_density(rescale, {"x_in": "x_in**2"})             # a slot missing
    assert not compare.same_density(rescale, None) and not compare.same_density(None, None)  # no text: unknown
    assert compare.same_density({"x": "x", "y": "0"}, {"x": "x"})             # a zero slot may be left out


def test_equal_texts_are_the_same_arithmetic():
    """What the texts claim, checked on the functions (a grid): the charge and the law's Q agree exactly, the
    rescale and rescale2 charges do not."""
    for fam in CHARGED:
        mod, law = gen(fam), gen(f"law_{fam}_sgd")
        for slot, fn in mod.CHARGE_DENSITY.items():
            assert mod.ARGS["charge_density"][slot] == law.ARGS["Q"][slot]
            args = [GRID] * len(mod.ARGS["charge_density"][slot])
            assert torch.equal(fn(*args), law.DENSITY["Q"][slot](*args)), (fam, slot)
    a, b = gen("rescale").CHARGE_DENSITY["x_out"], gen("rescale2").CHARGE_DENSITY["x_out"]
    assert not torch.equal(a(GRID), b(GRID))


def test_audit_reuses_charges_only_for_the_same_text():
    """core._now_snapshot caches a law's Q as the charge where the texts agree, and not otherwise."""
    torch.manual_seed(0)
    model = cnn(3, [4], 3, input_size=8, norm="batch").double()
    sets = list(find_symmetries(model, torch.zeros(1, 3, 8, 8, dtype=F64)).group_sets)
    charges = audit_core._charges(model, sets, None, audit_core._Layout.of(model), None, [], lambda m: None)
    losses = audit_core._Losses(0.0, None, None, None)
    buffers = audit_core._Buffers({}, "", {})
    snap = audit_core._now_snapshot(None, sets, charges, buffers, losses, audit_core._Layout.of(model))
    assert {("Q", id(gs)) for gs in sets} == set(snap.cache)
    # negative control: a module whose charge text differs (here: missing, as from an older symtools)
    old = {fam: copy_without(m, "CHARGE_TEXT") for fam, m in charges.modules.items()}
    charges.modules = old
    snap = audit_core._now_snapshot(None, sets, charges, buffers, losses, audit_core._Layout.of(model))
    assert snap.cache == {}


# ----------------------------------------------------------------------------------------------- non-negative
def test_nonnegative_is_emitted_for_every_term():
    assert gen("law_scale_sgd").NONNEGATIVE == {"Q": True, "M1": False, "G": True}
    assert gen("law_rescale_sgd").NONNEGATIVE["G"] is False   # negative control: g_in² − g_out² is signed
    assert gen("law_translation_sgd").NONNEGATIVE["M1"] is False
    for fam in CHARGED:
        for opt in emit_laws.OPTIMIZERS:
            law = gen(f"law_{fam}_{opt}")
            assert set(law.NONNEGATIVE) == set(law.DENSITY), (fam, opt)
            for term, ok in law.NONNEGATIVE.items():
                values = torch.cat([fn(*[GRID.roll(i) for i in range(len(law.ARGS[term][s]))])
                                    for s, fn in law.DENSITY[term].items()])
                if ok:  # what the text claims holds on the grid …
                    assert bool((values >= 0).all()), (fam, opt, term)
    one = torch.tensor([1.0], dtype=F64)  # … and the signed one is negative somewhere (x_out = g_x_out = 1)
    assert gen("law_rescale_sgd").ARGS["G"]["x_out"] == ("x_out", "g_x_out")
    assert float(gen("law_rescale_sgd").DENSITY["G"]["x_out"](one, one)) == -1.0


def _scale_groups():
    torch.manual_seed(0)
    model = cnn(3, [4], 3, input_size=8, norm="batch").double()
    sets = list(find_symmetries(model, torch.zeros(1, 3, 8, 8, dtype=F64)).group_sets)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    gs = next(g for g in sets if g.family == "scale")
    return gs, compare.Snapshot(0, params, sets)


def test_lower_bound_rests_on_nonnegative(monkeypatch):
    gs, init = _scale_groups()
    hyper = compare.Hyper("sgd", lr=0.1, weight_decay=0.01, steps=2)
    pred = compare._law_prediction(gs, init, hyper, 2, 0)
    q0 = compare.measure(gen("law_scale_sgd"), "Q", gs, init.params)
    assert pred.kind == "lower_bound"
    torch.testing.assert_close(pred.values["Q"], (1 - 0.1 * 0.01) ** 4 * q0, rtol=1e-14, atol=0)
    # negative control: the same law with G not certified ≥ 0 predicts nothing from init alone
    real = compare.law_module
    fake = copy_without(gen("law_scale_sgd"), NONNEGATIVE={"Q": True, "M1": False, "G": False})
    monkeypatch.setattr(compare, "law_module", lambda fam, opt: fake if (fam, opt) == ("scale", "sgd")
                        else real(fam, opt))
    pred = compare._law_prediction(gs, init, hyper, 2, 0)
    assert pred.kind == "none" and "driven by G" in pred.note


# ----------------------------------------------------------------------------------------- generator constant
def test_generator_constant_is_emitted():
    assert gen("translation").GENERATOR_CONSTANT is True
    assert not any(gen(f).GENERATOR_CONSTANT for f in ("scale", "rescale", "rescale2"))
    assert from_spec("x -> x + 2*a; y -> y - a").GENERATOR_CONSTANT is True
    assert from_spec("x -> exp(a)*x; y -> y + a").GENERATOR_CONSTANT is False  # negative control: v_x = x
    assert audit_core._generator_is_constant(gen("translation")) is True
    assert audit_core._generator_is_constant(gen("scale")) is False
    assert audit_core._generator_is_constant(copy_without(gen("translation"), "GENERATOR_CONSTANT")) is None


def test_no_random_probe_decides_anything():
    """No sampling in the modules that decide from generated code (group sampling for display is not a probe)."""
    sources = [*sorted((ROOT / "symtools" / "audit").glob("*.py")), ROOT / "symtools" / "plots.py",
               ROOT / "symtools" / "numeric" / "law_matrices.py"]
    pattern = re.compile(r"\b(randn|rand|randint|randn_like|manual_seed|Generator)\b")
    found = [(p.name, m.group(0)) for p in sources for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


# ----------------------------------------------------------------------------------- laws applied as matrices
def _iterate(law, state, lrs, wd, mom, damp):
    """The law's own functions stepped on explicit numbers, drives 0."""
    zero = {m: 0.0 for m in set(law.MEASURED) | set(law.FIRST_MEASURED)}
    state = law.first_step(state, zero, lrs[0], wd, mom, damp)
    for lr in lrs[1:]:
        state = law.step(state, zero, lr, wd, mom, damp)
    return state


@pytest.mark.parametrize("name", ["law_translation_sgd", "law_translation_momentum", "law_scale_nesterov",
                                  "law_rescale_momentum"])
def test_transfer_matrix_is_the_law_on_the_unit_vectors(name):
    law = gen(name)
    lrs = [0.1, 0.05, 0.05, 0.02]
    m, inputs, outputs = compare.transfer_matrix(law, lrs, 0.01, 0.9, 0.1)
    x0 = {q: torch.tensor([1.5 + i], dtype=F64) for i, q in enumerate(inputs)}
    want = _iterate(law, x0, lrs, 0.01, 0.9, 0.1)
    got = m @ np.array([float(x0[q]) for q in inputs])
    np.testing.assert_allclose(got, [float(want[q]) for q in outputs], rtol=1e-13, atol=1e-15)
    # one later step: the block of the monitor's law bank (one evaluation of the basis for both)
    a, _, _ = compare.transfer_matrix(law, [0.05], 0.01, 0.9, 0.1, from_step_zero=False)
    bank = LawBank({"f": law}).matrices((0.05, 0.01, 0.9, 0.1), first=False)[0]
    np.testing.assert_array_equal(a, bank[:, :len(law.STATE)])


def test_translation_sgd_transfer_is_the_closed_form():
    m, inputs, outputs = compare.transfer_matrix(gen("law_translation_sgd"), [0.1] * 5, 0.01)
    assert inputs == outputs == ("Q",)
    assert m[0, 0] == pytest.approx((1 - 0.1 * 0.01) ** 5, rel=1e-15)


def test_a_law_not_certified_linear_is_refused():
    for fake in (copy_without(gen("law_translation_momentum"), LINEAR=False),
                 copy_without(gen("law_translation_momentum"), "LINEAR")):
        with pytest.raises(SymtoolsError, match="not certified linear"):
            compare.transfer_matrix(fake, [0.1], 0.0, 0.9)


def test_a_law_not_certified_linear_gives_no_prediction(monkeypatch):
    gs, init = _scale_groups()
    hyper = compare.Hyper("sgd", lr=0.1, weight_decay=0.01, steps=2)
    real = compare.law_module
    fake = copy_without(gen("law_scale_sgd"), LINEAR=False)
    monkeypatch.setattr(compare, "law_module", lambda fam, opt: fake if (fam, opt) == ("scale", "sgd")
                        else real(fam, opt))
    pred = compare._law_prediction(gs, init, hyper, 2, 0)
    assert pred.kind == "none" and "not certified linear" in pred.note


# ---------------------------------------------------------------------------------- optimizer-state facts
def test_optimizer_states_from_the_declarations():
    linear = {"sgd": {}, "momentum": {"b": "momentum_buffer"}, "nesterov": {"b": "momentum_buffer"},
              "adam": {"m": "exp_avg"}, "adamw": {"m": "exp_avg"}, "rmsprop": {}, "adagrad": {}}
    for name, states in linear.items():  # second moments (d²) are not linear; AdamW's m and SGD's b are
        assert compare.linear_states(name) == states, name
        # only AdamW's first moment sums gradients alone; Adam's holds λθ (coupled decay), SGD's buffer too
        assert compare.gradient_states(name) == ({"m": "exp_avg"} if name == "adamw" else {}), name
    entries = compare.buffer_entries()
    assert entries[:2] == ("momentum_buffer", "exp_avg")
    assert not {"exp_avg_sq", "square_avg", "sum"} & set(entries)
    assert set(entries) == {e for n in DECLARATIONS for e in compare.linear_states(n).values()}


def test_a_new_declaration_gets_its_facts_without_code(monkeypatch):
    """Heavy ball without weight decay, declared under a new name and a new torch entry: its buffer becomes a
    sum of gradients alone, and the audit reads it under the declared entry."""
    d = GRAD  # d = g: no λθ
    later = MU * BUF + (1 - TAU) * d
    rules = (UpdateRule("hb0", THETA - ETA * d, {"b": d}, (ETA, MU), first=True),
             UpdateRule("hb0", THETA - ETA * later, {"b": later}, (ETA, MU, TAU)))
    decl = dataclasses.replace(DECLARATIONS["momentum"], name="hb0", first=rules[0], rule=rules[1],
                               state={"b": "my_buffer"})
    monkeypatch.setitem(DECLARATIONS, "hb0", decl)
    try:
        assert compare.gradient_states("hb0") == {"b": "my_buffer"} == compare.linear_states("hb0")
        mine, other = {"p": torch.ones(2)}, {"p": torch.zeros(2)}
        assert compare._buffer_for("hb0", {"my_buffer": mine, "momentum_buffer": other}) is mine
    finally:
        compare.gradient_states.cache_clear()
        compare.linear_states.cache_clear()
    assert LAMBDA in DECLARATIONS["momentum"].rule.state["b"].free_symbols  # the declared heavy ball: λθ in b


def test_the_law_buffer_comes_from_state_entries():
    b, m = {"p": torch.ones(1)}, {"p": torch.zeros(1)}
    buffers = {"momentum_buffer": b, "exp_avg": m}
    assert compare._buffer_for("momentum", buffers) is b and compare._buffer_for("nesterov", buffers) is b
    for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad", None):  # laws that read no b_<slot>
        assert compare._buffer_for(name, buffers) is None


# ------------------------------------------------------------------------------------ families and labels
def test_law_families_are_derived_from_the_library(monkeypatch):
    assert emit_laws.families() == tuple(n for n in library.ELEMENTWISE if derive(library.elementwise(n)).charge.exists)
    assert emit_laws.FAMILIES == emit_laws.families()
    extra = {"test_rescale5": ("x_in -> a*x_in; x_out -> x_out/a**5; a > 0", "test"),
             "test_shear": ("x -> x + a*y; y -> y", "negative control: no charge (curl ≠ 0)")}
    monkeypatch.setattr(library, "ELEMENTWISE", {**library.ELEMENTWISE, **extra})
    emit_laws.families.cache_clear()
    try:
        assert emit_laws.families() == CHARGED + ("test_rescale5",)
    finally:
        emit_laws.families.cache_clear()


def test_charge_names_are_written_from_charge_text():
    assert [charge_formula(gen(f).CHARGE_TEXT) for f in ("translation", "scale", "rescale", "rescale2")] == [
        "Σ x", "Σ x²", "Σ x_in² − Σ x_out²", "Σ x_in² − 2·Σ x_out²"]
    assert charge_name("rescale") == "rescale imbalance Σ x_in² − Σ x_out²"
    assert charge_name("rescale2") == "rescale2 charge Σ x_in² − 2·Σ x_out²"  # no words given: still named
    new = from_spec("x_in -> a*x_in; x_out -> x_out/a**4; a > 0", "rescale4")
    assert "rescale4" not in CHARGE_WORDS
    assert charge_name("rescale4", new) == "rescale4 charge Σ x_in² − 4·Σ x_out²"
    assert charge_name("rescale4", copy_without(new, "CHARGE_TEXT")) == "rescale4 charge"  # older module: no formula
    assert charge_name("gl_linear_pair") == "gl_linear_pair charge"  # a matrix family has no elementwise text
    assert charge_formula({"x": "-x**2 + x", "y": "3*y**2"}) == "Σ (-x² + x) + 3·Σ y²"
    assert charge_formula(None) is None
    assert plots.charge_label("rescale") == "Σ x_in² − Σ x_out²"
    assert plots.charge_label("no_such_family") == "charge"


def test_momentum_figure_laws_come_from_the_declarations():
    assert plots.momentum_laws() == tuple(n for n, d in DECLARATIONS.items() if d.law_kind == "momentum")
    assert plots.momentum_laws()[:2] == ("momentum", "nesterov")
    for name in plots.momentum_laws():  # each keeps the buffer its law reads
        assert "b" in compare.linear_states(name)
    assert not {"sgd", "adam", "adamw"} & set(plots.momentum_laws())
