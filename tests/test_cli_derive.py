"""The `symtools derive` contract that scripts rely on: JSON keys, sympify-able strings, exit codes."""

import json

import pytest
import sympy as sp

from symtools.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_contract_rescale(capsys):
    code, out, err = run(capsys, "derive", "w1 -> a*w1; b1 -> a*b1; w2 -> w2/a", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("identity", "generator", "gradient_identity", "hessian_identity", "conserved_quantity", "reason"):
        assert key in d
    assert sp.sympify(d["identity"]) == 1
    w1, b1, w2 = sp.symbols("w1 b1 w2")
    assert {k: sp.sympify(v) for k, v in d["generator"].items()} == {"w1": w1, "b1": b1, "w2": -w2}
    q = sum(sp.sympify(v) for v in d["conserved_quantity"].values())
    assert sp.expand(q - (w1**2 + b1**2 - w2**2)) == 0
    sp.sympify(d["gradient_identity"])
    for s in d["hessian_identity"].values():
        sp.sympify(s)
    assert d["reason"] is None


def test_json_no_charge_for_rotation(capsys):
    code, out, _ = run(capsys, "derive", "x -> x*cos(a) - y*sin(a); y -> x*sin(a) + y*cos(a)", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["conserved_quantity"] is None
    assert "not symmetric" in d["reason"]


@pytest.mark.parametrize("spec, fragment", [
    ("w1 -> (a*", "cannot parse"),
    ("x -> q*x", "unknown symbol 'q'"),
    ("x -> 2*x", "depends on the group parameter"),
    ("x -> a", "depends on θ"),
    ("x -> x + a**2", "identically zero"),
    ("x -> a**2*x", "several identity candidates"),
    ("x -> x + exp(a)", "no identity element"),
    ("nonsense", "neither a declaration"),
])
def test_bad_input_one_line_exit_2(capsys, spec, fragment):
    code, out, err = run(capsys, "derive", spec, "--json")
    assert code == 2
    assert out == ""
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_torch_module_written_and_importable(capsys, tmp_path):
    path = tmp_path / "nl.py"
    code, _, err = run(capsys, "derive", "x -> x/(1 - a*x)", "--torch", str(path))
    assert code == 0, err
    from symtools.codegen.emit import load_module

    mod = load_module(path.read_text())
    import torch

    x = torch.tensor([0.5, -2.0], dtype=torch.float64)
    assert torch.equal(mod.generator(x)[0], x**2)
    assert torch.allclose(mod.charge(x), (x**3).sum())


def test_unknown_option_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["derive", "x -> a*x", "--nope"])
    assert exc.value.code == 2
