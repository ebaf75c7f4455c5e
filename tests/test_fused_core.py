"""The monitor's fused core: derived facts, the flat reduction, the law matrices and the cost of a step.

Tolerances: every comparison below is between two float64 evaluations of the same sums in different orders,
so they agree to round-off relative to the size of what is summed (Σ|density|): 1e-13. The negative controls
change one coefficient or one law and must miss by far more.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import sympy as sp
import torch

from symtools.codegen import emit_facts
from symtools.codegen.generated import law_rescale_momentum, law_scale_sgd, law_translation_nesterov
from symtools.nn.graph import find_symmetries
from symtools.nn.small import cnn
from symtools.numeric import flat as flat_module
from symtools.numeric import native
from symtools.numeric.law_matrices import LawBank, apply_to_basis
from symtools.numeric.monitor import Monitor
from symtools.numeric.records import RecordWriter, read_stream
from symtools.testing.op_count import OpCounter

pytestmark = pytest.mark.usefixtures("one_thread")

#: the reducers compared with the flat one (the compiled one where this machine can build its C)
OTHERS = ("sites", "compiled") if native.available() else ("sites",)


# ---------------------------------------------------------------------------------------------- derived facts
def test_monomials_of_densities():
    x, g, b = sp.symbols("x g_x b_x", real=True)
    assert emit_facts.monomials(-3 * x * g + x**2, "x") == (((1, 1, 0, 0, 0), -3.0), ((2, 0, 0, 0, 0), 1.0))
    assert emit_facts.monomials(b**2, "x") == (((0, 0, 2, 0, 0), 1.0),)
    assert emit_facts.monomials(sp.log(x), "x") is None            # not a polynomial
    assert emit_facts.monomials(x * sp.Symbol("y"), "x") is None   # another slot's variable
    assert emit_facts.monomials(sp.Symbol("lr") * x, "x") is None  # a hyper-parameter in a density


def test_facts_decided_symbolically():
    x, y = sp.symbols("x y", real=True)
    assert emit_facts.charge_factor({"x": 2 * x**2, "y": -2 * y**2}, {"x": x**2, "y": -y**2}) == 2.0
    assert emit_facts.charge_factor({"x": x**2, "y": y**2}, {"x": x**2, "y": -y**2}) is None  # not one number
    assert emit_facts.nonnegative({"x": x**2}) and not emit_facts.nonnegative({"x": x * y})
    assert emit_facts.generator_constant({"x": sp.Integer(1)}, ["x"])
    assert not emit_facts.generator_constant({"x": x}, ["x"])
    Q, G = sp.symbols("Q G", real=True)
    eta = sp.Symbol("eta", positive=True)
    assert emit_facts.linear([{"Q": (1 - eta) ** 2 * Q + eta**2 * G}], [Q, G])
    assert not emit_facts.linear([{"Q": Q * G}], [Q, G])              # negative control: bilinear
    assert not emit_facts.linear([{"Q": Q + 1}], [Q, G])              # negative control: affine


def test_generated_modules_carry_the_facts():
    for law in (law_rescale_momentum, law_scale_sgd, law_translation_nesterov):
        assert law.LINEAR is True and law.CHARGE_FACTOR == 1.0
        assert set(law.MONOMIALS) == set(law.DENSITY)
    assert law_scale_sgd.NONNEGATIVE["Q"] and not law_rescale_momentum.NONNEGATIVE["Q"]


# ---------------------------------------------------------------------------------------------- law matrices
@pytest.mark.parametrize("law", [law_rescale_momentum, law_scale_sgd, law_translation_nesterov])
def test_law_matrix_reproduces_the_generated_step(law):
    g = torch.Generator().manual_seed(0)
    hyper = (0.07, 3e-3, 0.9, 0.2)
    names = list(law.STATE) + list(law.MEASURED)
    A = apply_to_basis(law.step, [law.STATE, law.MEASURED], law.STATE, *hyper)
    x = torch.randn(len(names), 5, generator=g, dtype=torch.float64)
    out = law.step({n: x[i] for i, n in enumerate(law.STATE)},
                   {n: x[len(law.STATE) + i] for i, n in enumerate(law.MEASURED)}, *hyper)
    direct = np.stack([out[n].numpy() for n in law.STATE])
    np.testing.assert_allclose(A @ x.numpy(), direct, rtol=1e-13, atol=1e-15)
    wrong = apply_to_basis(law.step, [law.STATE, law.MEASURED], law.STATE, 0.08, *hyper[1:])
    assert np.abs(wrong @ x.numpy() - direct).max() > 1e-4  # negative control: another learning rate


def test_bank_refuses_a_law_not_certified_linear():
    fake = types.SimpleNamespace(**{k: getattr(law_scale_sgd, k) for k in dir(law_scale_sgd) if k.isupper()})
    fake.LINEAR = False
    with pytest.raises(Exception, match="not certified linear"):
        LawBank({"scale": fake})


# ---------------------------------------------------------------------------------------------- reductions
def _setup(momentum=0.9, dtype=torch.float64, depth=(4, 6)):
    torch.manual_seed(0)
    model = cnn(3, list(depth), 5, 32, norm="batch").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=momentum)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 5, (12,), generator=g)
    return model, opt, x, y


def _ctx(model, opt, tmp_path, x, y):
    return types.SimpleNamespace(model=model, optimizer=opt, records=RecordWriter(tmp_path), out_dir=tmp_path,
                                 start_step=0, steps=50, step=0, config={}, batch=(x, y))


def _step(model, opt, mon, ctx, x, y, step):
    ctx.step = step
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    mon.before_step(ctx)
    opt.step()
    mon.after_step(ctx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_and_site_reducers_give_the_same_terms(tmp_path, dtype):
    """Every reducer, on the same θ, g, b and displacement, for every term of every family."""
    model, opt, x, y = _setup(dtype=dtype)
    mons = {}
    for reducer in ("flat", *OTHERS):
        mons[reducer] = Monitor(find_symmetries(model, x[:1]), stride=2, reducer=reducer)
        mons[reducer].on_start(_ctx(model, opt, tmp_path / reducer, x, y))
    ctx = _ctx(model, opt, tmp_path / "x", x, y)
    for step in (1, 2, 3):
        ctx.step = step
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = {r: m._plan.terms(m._plan.before, *m._before_sources(ctx)) for r, m in mons.items()}
        size_before = _sizes(mons["flat"], "before_rows", mons["flat"]._before_sources(ctx))
        opt.step()
        after = {r: m._plan.terms(m._plan.after, *m._after_sources()) for r, m in mons.items()}
        size_after = _sizes(mons["flat"], "after_rows", mons["flat"]._after_sources())
        for terms, size in ((before, size_before), (after, size_after)):
            # M1 = ⟨g, v⟩ cancels to round-off: compare with Σ|density|, the size of what was summed. The compiled
            # and the flat reducers both multiply in float64 (exact for float32 numbers): 1e-13 in either dtype;
            # the sites reducer multiplies float32 numbers in float32 (2⁻²⁴ each): 1e-6
            for other in OTHERS:
                tol = 1e-6 if other == "sites" and dtype == torch.float32 else 1e-13
                assert float(((terms["flat"] - terms[other]).abs() / size.clamp_min(1e-300)).max()) < tol, other
            assert float(size.max()) > 0
    # negative control: one wrong coefficient in the flat reducer's matrix is seen
    plan = mons["flat"]._plan
    plan.before.W[0] *= -1
    wrong = plan.terms(plan.before, *mons["flat"]._before_sources(ctx))
    assert float((wrong[0] - before["sites"][0]).abs().max()) > 1e-3 * float(before["sites"][0].abs().max())


def _sizes(mon, which, sources):
    """Σ|density| of every term (each monomial's |coefficient|·|monomial|), by the flat reducer."""
    from symtools.numeric.monitor_plan import term_matrix

    plan = mon._plan
    tm = term_matrix(plan.layout, [(f, n, m, True, fn) for f, n, m, _, fn in getattr(plan, which)], plan.device)
    return plan.terms(tm, *sources)


def test_monitor_records_equal_for_every_reducer(tmp_path):
    from symtools.training import train

    streams = {}
    for reducer in ("flat", *OTHERS):
        model, _, x, y = _setup()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9)
        mon = Monitor(find_symmetries(model, x[:1]), stride=2, reducer=reducer)
        summary = train(model, opt, [(x, y)] * 5, 5, out_dir=tmp_path / reducer, callbacks=[mon], progress=False)
        assert summary["max_rel_residual_discrete"] < 1e-12
        streams[reducer] = read_stream(tmp_path / reducer / "records", "laws")
    ca, a = streams["flat"]
    for other in OTHERS:
        cb, b = streams[other]
        assert ca == cb
        res = [j for j, c in enumerate(ca) if "|residual_" in c]
        vals = [j for j in range(1, len(ca)) if j not in res]
        np.testing.assert_allclose(a[:, vals], b[:, vals], rtol=1e-12, atol=1e-14)
        assert (np.isnan(a) == np.isnan(b)).all()


# ---------------------------------------------------------------------------------------------- cost of a step
def _count(tmp_path, depth, momentum, monkeypatch):
    monkeypatch.setattr(flat_module, "CPU_CHUNK", 1 << 40)  # the kernel path: the flat vectors in one piece
    model, opt, x, y = _setup(momentum=momentum, depth=depth)
    mon = Monitor(find_symmetries(model, x[:1]), stride=10, reducer="flat")
    ctx = _ctx(model, opt, tmp_path, x, y)
    mon.on_start(ctx)
    counts = []
    for step in (1, 2, 3):
        ctx.step = step
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with OpCounter() as before:
            mon.before_step(ctx)
        opt.step()
        with OpCounter() as after:
            mon.after_step(ctx)
        counts.append((before.calls + after.calls, before.syncs + after.syncs))
    return counts


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_costs_a_fixed_handful_of_ops_whatever_the_depth(tmp_path, monkeypatch, momentum):
    """Machine-independent: ATen calls of the monitor's hooks per step (flat reducer, no stride step), the same
    for 2 and 4 convolutions, with no host synchronisation. The bound is generous (VGG-16-BN measures ~100,
    docs/benchmarks.md); a per-layer loop would add calls per layer and fail the equality."""
    shallow = _count(tmp_path / "a", (4, 6, 5), momentum, monkeypatch)
    deep = _count(tmp_path / "b", (4, 6, 5, 7, 3), momentum, monkeypatch)
    assert shallow[1:] == deep[1:]
    for calls, syncs in shallow[1:]:
        assert calls <= 150 and syncs == 0
