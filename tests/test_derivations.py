"""The derivation scripts: each runs, passes, writes its page — and a wrong "paper formula" is caught.

The scripts (``derivations/<family>.py``) compare the engine's results with formulas typed in from the paper;
these tests run them as a user would (a subprocess, pages written to a temporary folder so the repository's
docs are not rewritten), check that the committed pages are what the scripts write now, and feed deliberately
wrong formulas through the same comparison code to show that a mismatch is reported and fails the run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

ROOT = Path(__file__).resolve().parents[1]
DERIVATIONS = ROOT / "derivations"
FAMILIES = ("translation", "scale", "rescale")


def common():
    """derivations/_common.py (the comparison functions the scripts use)."""
    if str(DERIVATIONS) not in sys.path:
        sys.path.insert(0, str(DERIVATIONS))
    return importlib.import_module("_common")


def load(name: str):
    """Import derivations/<name>.py as a module (the scripts put their folder on sys.path for _common)."""
    spec = importlib.util.spec_from_file_location(f"derivation_{name}", DERIVATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_script_passes_and_writes_page(family, tmp_path):
    proc = subprocess.run([sys.executable, str(DERIVATIONS / f"{family}.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{family}: PASS" in proc.stdout and "MISMATCH" not in proc.stdout
    page = (tmp_path / f"{family}.md").read_text()
    assert "all checks pass" in page and "**MISMATCH**" not in page
    assert page.count("$$") >= 20  # LaTeX of the results is on the page
    for ref in ("Table 2 row 1", "Table 3 row 2", "eq. (26)", "Theorem 1"):
        assert ref in page
    committed = ROOT / "docs" / "derivations" / f"{family}.md"
    assert committed.exists() and committed.read_text() == page, (
        f"{committed} is stale: run python derivations/{family}.py")


# -- negative controls -------------------------------------------------------------------------------------


def test_comparisons_report_wrong_formulas():
    c = common()
    from symtools.symbolic.forms import GradientForm

    x, y = sp.symbols("x y", real=True)
    assert c.compare({"x": x**2}, {"x": x**2}).ok
    assert not c.compare({"x": x**2}, {"x": 2 * x**2}).ok
    assert not c.compare(sp.diag(x, 1), sp.diag(x, x)).ok
    assert not c.compare({"x": x}, sp.Matrix([x])).ok  # shapes that cannot match are a mismatch, not a crash
    identity = GradientForm({"x": x, "y": -y})
    # Table 3's rescale row differs from the engine's by exactly the gradient identity: accepted with λ = 1 ...
    ok = c.compare_modulo(GradientForm({"y": 2 * y}), GradientForm({"x": x, "y": y}), identity)
    assert ok.ok and "1·" in ok.detail
    # ... but a difference that is not a constant multiple of it is not.
    assert not c.compare_modulo(GradientForm({"y": 2 * y}), GradientForm({"x": x, "y": 3 * y}), identity).ok
    assert not c.compare_modulo(GradientForm({"y": 2 * y}), GradientForm({"x": x * y, "y": y}), identity).ok


def _slip(name):
    """A deliberately wrong paper formula — a plausible slip: a sign, a power, a copied row."""
    from symtools.symbolic.forms import GradientForm, grad_symbol, hv_symbol

    x, x_in, x_out = sp.symbols("x x_in x_out", real=True)
    return {
        # scale's H θ_A + g_A copied into translation's row (translation has no gradient term)
        "translation/hessian_identity": {"x": hv_symbol("x") + grad_symbol("x")},
        # |θ_A|² for ⟨θ_A, 1⟩: the conserved quantity, the charge and the flow law all break
        "translation/conserved": {"x": x**2},
        # sign slip in eq. (6): H θ_A − g_A
        "scale/hessian_identity": {"x": hv_symbol("x") - grad_symbol("x")},
        # Table 3's rescale row with a factor that no multiple of the gradient identity explains
        "rescale/second_order": GradientForm({"x_in": x_in, "x_out": 2 * x_out}),
    }[name]


@pytest.mark.parametrize("case, mismatches", [
    ("translation/hessian_identity", 1),
    ("translation/conserved", 3),
    ("scale/hessian_identity", 1),
    ("rescale/second_order", 1),
])
def test_wrong_paper_formula_fails_the_script(case, mismatches, tmp_path, monkeypatch, capsys):
    family, key = case.split("/")
    module = load(family)
    monkeypatch.setitem(module.PAPER, key, _slip(case))
    assert module.main(["--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{family}: {mismatches} of" in out and "MISMATCH" in out
    page = (tmp_path / f"{family}.md").read_text()
    assert page.count("**MISMATCH**") == mismatches


def test_wrong_gradient_transformation_is_caught(tmp_path, monkeypatch, capsys):
    """Table 2's first row with α² in place of α (the Hessian's factor) must not pass as the gradient's."""
    module = load("rescale")
    a = module.a
    monkeypatch.setitem(module.PAPER, "gradient_transform", sp.diag(a**2, a**2, a**-2, a**-2, 1))
    assert module.main(["--out", str(tmp_path)]) == 1
    assert "MISMATCH  Gradient transformation" in capsys.readouterr().out
