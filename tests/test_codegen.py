"""The torch code printed from the derivations: it must agree with autograd, the printer's fixes must give
the expected torch values, and the checked-in generated modules must be exactly what regeneration writes.

Tolerance: CODE_TOL = 1e-12 relative (to 1 + the largest entry compared). Both sides compute the same
closed-form derivative, one from the printed expression and one by autograd through the printed finite
action, in float64: they differ by a few roundings (measured ≤ 4e-16); a wrong sign, factor or slot in
generated code is an O(1) difference.
"""

import importlib
import functools
import math
import shutil
import warnings

import pytest
import sympy as sp
import torch
from hypothesis import given
from sympy.printing.pytorch import TorchPrinter

from symtools.codegen import regenerate
from symtools.codegen.emit import emit, load_module
from symtools.codegen.printer import torch_expr
from symtools.symbolic import library
from symtools.symbolic.action import ElementwiseAction
from symtools.symbolic.derive import derive
from symtools.testing import DrawnAction, derivation, elementwise_actions, generated_module, random_point

CODE_TOL = 1e-12
F64 = torch.float64


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / (1.0 + float(want.abs().max()))


def _grad(out, wrt, **kw):
    """d(sum out)/d wrt, zeros where ``out`` does not depend on ``wrt``."""
    if not out.requires_grad:
        return torch.zeros_like(wrt)
    (g,) = torch.autograd.grad(out.sum(), wrt, allow_unused=True, **kw)
    return torch.zeros_like(wrt) if g is None else g


# --------------------------------------------------------------------------- elementwise: vs autograd
def codegen_errors(module, d, seed=0, shape=(5,)) -> dict[str, float]:
    """Largest relative difference between each generated function family and its autograd reference.

    - GENERATOR[s] vs ∂/∂a ACTION[s] at a = e; GENERATOR_SECOND[s] vs ∂²/∂a². The parameter is a tensor
      shaped like the slot (every element its own a), so d(sum)/da is the elementwise derivative.
    - HESSIAN_COUPLING[s](θ, g) vs ∂/∂θ_s Σ_t ⟨v_t(θ), g_t⟩ (the Jacobian-transpose product Kg).
    - ∇charge vs factor·v (the engine's claim ∇Q = c·v) when a charge exists.
    """
    slots = tuple(module.SLOTS)
    theta = dict(zip(slots, random_point(slots, shape, seed=seed)))
    gen = torch.Generator().manual_seed(seed + 1)
    g = {f"g_{s}": torch.randn(shape, generator=gen, dtype=F64) for s in slots}
    errs = {"generator": 0.0, "generator_second": 0.0, "hessian_coupling": 0.0, "charge": 0.0}
    e = float(sp.sympify(module.IDENTITY))
    for s in slots:
        a = torch.full(shape, e, dtype=F64, requires_grad=True)
        args = [a if n == module.PARAMETER else theta[n] for n in module.ARGS["action"][s]]
        psi = module.ACTION[s](*args)
        assert rel_err(psi.detach(), theta[s]) < CODE_TOL    # ψ(θ, e) = θ
        d1 = _grad(psi, a, create_graph=True)
        d2 = _grad(d1, a)
        own = lambda kind: module.__dict__[kind.upper()][s](*[theta[n] for n in module.ARGS[kind][s]])  # noqa: E731
        errs["generator"] = max(errs["generator"], rel_err(own("generator"), d1.detach()))
        errs["generator_second"] = max(errs["generator_second"], rel_err(own("generator_second"), d2))
    th = {s: t.clone().requires_grad_(True) for s, t in theta.items()}
    pairing = sum((module.generator(*th.values())[i] * g[f"g_{s}"]).sum() for i, s in enumerate(slots))
    for s in slots:
        want = _grad(pairing, th[s], retain_graph=True)
        got = module.HESSIAN_COUPLING[s](*[{**theta, **g}[n] for n in module.ARGS["hessian_coupling"][s]])
        errs["hessian_coupling"] = max(errs["hessian_coupling"], rel_err(got, want))
    if module.HAS_CHARGE:
        factor = float(d.charge.factor)
        v = module.generator(*theta.values())
        th = {s: t.clone().requires_grad_(True) for s, t in theta.items()}
        q = module.charge(*th.values())
        for i, s in enumerate(slots):
            errs["charge"] = max(errs["charge"], rel_err(_grad(q, th[s], retain_graph=True), factor * v[i]))
    return errs


@pytest.mark.parametrize("name", sorted(library.ELEMENTWISE))
def test_builtin_generated_functions_match_autograd(name):
    module = importlib.import_module(f"symtools.codegen.generated.{name}")
    errs = codegen_errors(module, derive(library.elementwise(name)))
    assert max(errs.values()) < CODE_TOL, errs


@pytest.mark.parametrize("spec", [
    "x -> x/(1 - a*x)",
    "x -> x*cos(a) - y*sin(a); y -> x*sin(a) + y*cos(a)",
    "x -> x*cosh(a) + y*sinh(a); y -> y*cosh(a) + x*sinh(a)",
    "x -> 2**a*x",                       # generator log(2)·x: needs the printer's constant fix
    "x -> exp(a)*x; y -> exp(a)*y + a*exp(a)*x",
])
def test_emitted_functions_match_autograd_for_nonlinear_actions(spec):
    d = derive(ElementwiseAction.from_spec(spec))
    errs = codegen_errors(load_module(emit(d)), d)
    assert max(errs.values()) < CODE_TOL, errs


@given(elementwise_actions())
def test_drawn_generated_functions_match_autograd(drawn: DrawnAction):
    errs = codegen_errors(generated_module(drawn.action), derivation(drawn.action), seed=11)
    assert max(errs.values()) < CODE_TOL, (drawn.spec, errs)


def test_a_corrupted_module_is_caught():
    # Negative control for the checker: flip the sign of one generated generator.
    d = derive(library.elementwise("rescale"))
    source = emit(d)
    assert "    return -x_out\n" in source
    bad = load_module(source.replace("    return -x_out\n", "    return x_out\n"))
    errs = codegen_errors(bad, d)
    assert errs["generator"] > 0.1 and errs["charge"] > 0.1
    bad = load_module(source.replace("    return g_x_in\n", "    return 2*g_x_in\n"))
    assert codegen_errors(bad, d)["hessian_coupling"] > 0.1


# ---------------------------------------------------------------------------- matrix modules vs autograd
def finite_action(name):
    """The library's declared finite action ψ_s(θ, G), printed by our printer, as torch callables."""
    ma = library.matrix(name)
    mats, G, _ = ma._symbols({})
    images = ma.action(G, **mats)
    out = {}
    for s, img in images.items():
        src = f"def f(G, {', '.join(mats)}):\n    return {torch_expr(img)}\n"
        ns = {"torch": torch}
        exec(src, ns)
        out[s] = ns["f"]
    return out


MATRIX_SIZES = {"gl_linear_pair": {"U": (4, 3), "V": (3, 2)}, "rotation_pair": {"U": (4, 3), "V": (3, 2)},
                "attention_qk": {"W_Q": (4, 3), "W_K": (4, 3)}, "attention_vo": {"W_V": (4, 3), "W_O": (3, 2)}}


def algebra_element(algebra, h, gen):
    X = torch.randn(h, h, generator=gen, dtype=F64)
    return X - X.mT if algebra == "so" else X


@pytest.mark.parametrize("name", sorted(library.MATRIX))
def test_matrix_generated_functions_match_autograd(name):
    module = importlib.import_module(f"symtools.codegen.generated.{name}")
    d = library.matrix(name).derive()
    gen = torch.Generator().manual_seed(3)
    theta = {s: torch.randn(*shape, generator=gen, dtype=F64) for s, shape in MATRIX_SIZES[name].items()}
    grads = {s: torch.randn(*shape, generator=gen, dtype=F64) for s, shape in MATRIX_SIZES[name].items()}
    X = algebra_element(module.ALGEBRA, 3, gen)
    slots = tuple(module.SLOTS)
    v = module.generator(X, *theta.values())
    # generator(X) = d/da ψ(θ, exp(aX)) at a = 0 (autograd through matrix_exp and the printed finite action)
    acts = finite_action(name)
    for i, s in enumerate(slots):
        tangent = torch.autograd.functional.jacobian(
            lambda a: acts[s](torch.linalg.matrix_exp(a * X), *theta.values()), torch.zeros((), dtype=F64))
        assert rel_err(v[i], tangent) < CODE_TOL, (s, rel_err(v[i], tangent))
    # ⟨M_g, X⟩ = Σ_s ⟨g_s, v_s(X)⟩ (for 'so', only the antisymmetric part of M_g pairs with X)
    M = module.gradient_identity(*theta.values(), *grads.values())
    pairing = sum(float((grads[s] * v[i]).sum()) for i, s in enumerate(slots))
    assert abs(float((M * X).sum()) - pairing) < CODE_TOL * (1 + abs(pairing))
    # K_X g = ∂/∂θ Σ_s ⟨g_s, v_s(X)⟩ with g held fixed
    th = {s: t.clone().requires_grad_(True) for s, t in theta.items()}
    pair = sum((grads[s] * vi).sum() for s, vi in zip(slots, module.generator(X, *th.values())))
    want = torch.autograd.grad(pair, tuple(th.values()))
    zero = tuple(torch.zeros_like(t) for t in theta.values())
    got = module.hessian_identity_residual(X, *theta.values(), *grads.values(), lambda dirs: zero)  # H v = 0 here
    for w, gk in zip(want, got):
        assert rel_err(gk, w) < CODE_TOL
    # Σ_s ⟨θ_s, v_s(X)⟩ = factor · ⟨charge, X⟩ (the normalisation the engine reports)
    if module.HAS_CHARGE:
        Q = module.charge(*theta.values())
        lhs = sum(float((theta[s] * v[i]).sum()) for i, s in enumerate(slots))
        rhs = float(d.charge_factor) * float((Q * X).sum())
        assert abs(lhs - rhs) < CODE_TOL * (1 + abs(lhs))
        assert torch.allclose(Q, Q.mT, rtol=0, atol=1e-13)   # UᵀU − VVᵀ and friends are symmetric
    else:
        assert not hasattr(module, "charge") and "antisymmetric" in module.NO_CHARGE_REASON


# ------------------------------------------------------------------------------------- printer fixes
def run_printed(expr, **values):
    return eval(torch_expr(expr), {"torch": torch, "math": math}, values)


def test_max_and_min_with_a_number():
    x, y = sp.symbols("x y", real=True)
    xt = torch.tensor([-2.0, 0.5, 3.0], dtype=F64, requires_grad=True)
    yt = torch.tensor([1.0, -1.0, 4.0], dtype=F64)
    out = run_printed(sp.Max(x, 0), x=xt)
    assert torch.equal(out, torch.tensor([0.0, 0.5, 3.0], dtype=F64))
    (g,) = torch.autograd.grad(out.sum(), xt)               # stays differentiable: Heaviside-like slope
    assert torch.equal(g, torch.tensor([0.0, 1.0, 1.0], dtype=F64))
    assert torch.equal(run_printed(sp.Min(x, 1, y), x=xt.detach(), y=yt), torch.tensor([-2.0, -1.0, 1.0], dtype=F64))
    assert torch.equal(run_printed(sp.Max(x, y, sp.Rational(1, 2)), x=xt.detach(), y=yt),
                       torch.tensor([1.0, 0.5, 4.0], dtype=F64))
    # negative control: SymPy's own printer writes torch.max(0, x), which torch rejects
    with pytest.raises(TypeError):
        eval(TorchPrinter().doprint(sp.Max(x, 0)), {"torch": torch}, {"x": xt})


def test_heaviside():
    x = sp.Symbol("x", real=True)
    xt = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    assert torch.equal(run_printed(sp.Heaviside(x), x=xt), torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert torch.equal(run_printed(sp.Heaviside(x, 1), x=xt), torch.tensor([0.0, 1.0, 1.0], dtype=F64))
    assert torch.equal(run_printed(sp.Heaviside(x - 1), x=xt), torch.tensor([0.0, 0.0, 1.0], dtype=F64))
    with pytest.raises(TypeError):                          # SymPy's printer passes a float as `values`
        eval(TorchPrinter().doprint(sp.Heaviside(x)), {"torch": torch}, {"x": xt})


def test_explicit_matrix_stays_differentiable():
    x, y = sp.symbols("x y", real=True)
    M = sp.Matrix([[x, 2 * x], [x**2, y], [1, sp.sqrt(2)]])   # numeric entries too
    xt = torch.tensor([1.5, -0.5], dtype=F64, requires_grad=True)   # a batch of two
    yt = torch.tensor([2.0, 3.0], dtype=F64)
    out = run_printed(M, x=xt, y=yt)
    assert out.shape == (2, 3, 2) and out.requires_grad
    expected = torch.stack([torch.tensor([[a, 2 * a], [a * a, b], [1.0, math.sqrt(2)]], dtype=F64)
                            for a, b in zip(xt.tolist(), yt.tolist())])
    assert torch.equal(out.detach(), expected)
    (g,) = torch.autograd.grad(out.sum(), xt)               # d/dx (x + 2x + x²) = 3 + 2x
    assert torch.allclose(g, 3 + 2 * xt.detach(), rtol=0, atol=1e-15)
    # negative control: SymPy's printer builds a constant tensor, which cannot carry x's gradient
    x0 = torch.tensor(1.5, dtype=F64, requires_grad=True)
    try:
        with warnings.catch_warnings():                      # torch warns that it drops the graph
            warnings.simplefilter("ignore", UserWarning)
            stock = eval(TorchPrinter().doprint(sp.Matrix([[x, 2 * x]])), {"torch": torch}, {"x": x0})
    except (TypeError, RuntimeError, ValueError):
        stock = None
    assert stock is None or not stock.requires_grad


def test_transpose_prints_mT_and_works_batched():
    A = sp.MatrixSymbol("A", 3, 2)
    B = sp.MatrixSymbol("B", 2, 3)
    gen = torch.Generator().manual_seed(0)
    At = torch.randn(5, 3, 2, generator=gen, dtype=F64)   # a batch of 5 matrices
    Bt = torch.randn(5, 2, 3, generator=gen, dtype=F64)
    assert torch_expr(A.T) == "A.mT"
    assert torch.equal(run_printed(A.T, A=At), At.transpose(-1, -2))
    got = run_printed(A.T * A - 2 * B * B.T, A=At, B=Bt)
    assert torch.allclose(got, At.transpose(-1, -2) @ At - 2 * Bt @ Bt.transpose(-1, -2), rtol=0, atol=1e-13)
    got = run_printed((A * B).T, A=At, B=Bt)
    assert torch.allclose(got, (At @ Bt).transpose(-1, -2), rtol=0, atol=1e-13)
    with pytest.raises(RuntimeError):                       # SymPy's permute(1, 0) breaks on a batch
        eval(TorchPrinter().doprint(A.T), {"torch": torch}, {"A": At})


def test_irrational_constants_print_as_floats():
    x = sp.Symbol("x", real=True)
    xt = torch.tensor([0.5, 2.0], dtype=F64)
    assert torch.equal(run_printed(sp.sqrt(2) * x, x=xt), math.sqrt(2) * xt)
    assert torch.equal(run_printed(sp.log(2) * x**2, x=xt), math.log(2) * xt**2)
    assert torch.equal(run_printed(sp.Max(x, sp.sqrt(2)), x=xt), torch.tensor([math.sqrt(2), 2.0], dtype=F64))
    with pytest.raises(TypeError):                          # torch.sqrt(2): torch functions take tensors
        eval(TorchPrinter().doprint(sp.sqrt(2) * x), {"torch": torch}, {"x": xt})


# ------------------------------------------------------------------------------------------ regeneration
_SOURCES = regenerate.sources


@functools.cache
def fresh_sources():
    """regenerate.sources() (a fresh derivation of the whole library, ~2 s) computed once for both tests."""
    return _SOURCES()


def test_regenerating_the_library_yields_identical_source(monkeypatch):
    monkeypatch.setattr(regenerate, "sources", fresh_sources)
    assert regenerate.stale() == []
    assert set(fresh_sources()) >= set(library.ELEMENTWISE) | set(library.MATRIX)   # every built-in is covered


def test_stale_detects_a_hand_edit(tmp_path, monkeypatch):
    # Negative control: the staleness check must notice a changed or a missing module.
    monkeypatch.setattr(regenerate, "sources", fresh_sources)
    for f in regenerate.GENERATED.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "scale.py"
    path.write_text(path.read_text().replace("    return x**2", "    return 2*x**2", 1))
    (tmp_path / "translation.py").unlink()
    assert sorted(regenerate.stale(tmp_path)) == ["scale", "translation"]


def test_every_charged_elementwise_family_gets_its_laws_and_facts():
    """The law families are derived from the library (emit_laws.families()), so a new elementwise family with a
    charge gets its law modules by regeneration alone; every elementwise module carries the facts numeric code
    reads instead of probing (GENERATOR_CONSTANT, CHARGE_TEXT: None exactly when there is no charge)."""
    from symtools.codegen import emit_laws
    from symtools.codegen.generated import LAWS, NAMES

    families = emit_laws.families()
    assert set(families) <= set(library.ELEMENTWISE)
    assert set(LAWS) == {emit_laws.module_name(f, o) for f in families for o in emit_laws.OPTIMIZERS}
    for name in library.ELEMENTWISE:
        assert name in NAMES
        module = importlib.import_module(f"symtools.codegen.generated.{name}")
        assert isinstance(module.GENERATOR_CONSTANT, bool)
        assert (module.CHARGE_TEXT is None) == (not module.HAS_CHARGE) == (name not in families)
        if module.HAS_CHARGE:
            assert set(module.CHARGE_TEXT) == set(module.SLOTS)


def test_every_law_module_names_its_own_family_and_optimizer():
    """A law module's FAMILY and OPTIMIZER are the ones in its name (plots and audits read them; a loop variable
    once shadowed the optimizer's name, so sgd modules said OPTIMIZER = 'G')."""
    import importlib

    from symtools.codegen import emit_laws
    from symtools.codegen.generated import LAWS

    assert LAWS
    for name in LAWS:
        m = importlib.import_module(f"symtools.codegen.generated.{name}")
        assert name == emit_laws.module_name(m.FAMILY, m.OPTIMIZER), (name, m.FAMILY, m.OPTIMIZER)
