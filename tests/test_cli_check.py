"""``symtools check``: the command-line contract (docs/commands/check.md).

``symtools check --model M [--input S] [--classes C] [--batch B] [--dtype D] [--device X] [--json]`` prints one
JSON object with ``pass`` (bool) and ``families`` (name → ``groups``, ``gradient``: {``max_rel_residual``,
``pass``, ``max_ratio``}, ``hessian``: {``rel_residual``, ``hvps``, ``pass``, ``max_ratio``}) and ``verdict``, and
exits 0 when every identity holds, 1 when one fails, 3 when a lower precision cannot decide, 4 when no group
was found; an unknown model or a bad option is one line on stderr and exit 2, never a traceback.

Runs use VGG-11-BN on 32×32 inputs, batch 2, 10 classes, float64 (about 6 s of CPU each, one intra-op
thread). The group counts asserted are those of the architecture: one scale group per BN channel, one
translation per BN channel plus one per input column of the last Linear layer plus its whole bias, one
rescale per BN channel and per hidden unit of the classifier.
"""

from __future__ import annotations

import json

import pytest
import torch

from symtools.cli.check import render_table
from symtools.nn.vgg import CONFIGS
from symtools.testing.cli import run_cli

SMALL = ["--input", "32", "--classes", "10", "--batch", "2"]
HIDDEN = 1024  # the classifier's hidden width (symtools.nn.vgg)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


run = run_cli  # symtools.testing.cli: (exit code, stdout, stderr) of an in-process command


def assert_contract(doc: dict) -> None:
    assert isinstance(doc["pass"], bool)
    assert isinstance(doc["families"], dict) and doc["families"]
    for name, f in doc["families"].items():
        assert isinstance(name, str)
        assert isinstance(f["groups"], int) and f["groups"] > 0
        g, h = f["gradient"], f["hessian"]
        assert isinstance(g["max_rel_residual"], float) and isinstance(g["pass"], bool)
        assert isinstance(h["rel_residual"], float) and isinstance(h["hvps"], int) and isinstance(h["pass"], bool)
        assert h["hvps"] >= 1 and g["max_ratio"] >= 0 and h["max_ratio"] >= 0
    assert doc["pass"] == all(f["gradient"]["pass"] and f["hessian"]["pass"] for f in doc["families"].values())
    assert doc["verdict"] in ("pass", "fail", "inconclusive") and doc["pass"] == (doc["verdict"] == "pass")


@pytest.fixture(scope="module")
def passing():
    return run(["check", "--model", "vgg11_bn", *SMALL, "--json"])


def test_json_contract_and_exit_0(passing):
    code, out, err = passing
    assert code == 0, err
    doc = json.loads(out)  # stdout is exactly one JSON object
    assert_contract(doc)
    assert doc["pass"] is True
    channels = sum(c for c in CONFIGS["11"] if c != "M")  # 2752 BN channels
    assert {k: f["groups"] for k, f in doc["families"].items()} == {
        "scale": channels, "translation": channels + HIDDEN + 1, "rescale": channels + 2 * HIDDEN}
    assert all(f["hessian"]["max_ratio"] <= 1 and f["gradient"]["max_ratio"] <= 1 for f in doc["families"].values())
    assert doc["hvps"]["verification"] == 2 and doc["hvps"]["per_group_naive"] == 11329
    tol = doc["tolerance"]
    assert tol["dtype"] == "float64" and tol["relative"] == 4 * 2.0 ** -53 and tol["gray_zone"] == 1
    assert doc["families"]["scale"]["epsilon"]["max_rel_breaking"] > 0  # reported, and removed exactly
    assert doc["model"] == "vgg11_bn" and doc["settings"]["batch"] == 2 and not doc["blocked"]
    assert "Traceback" not in err


def test_table_output(passing):
    doc = json.loads(passing[1])
    table = render_table(doc)
    for name in doc["families"]:
        assert name in table
    assert table.splitlines()[-1].startswith("PASS")
    assert "instead of 11329 one per group" in table


def test_exit_1_on_failure_eval_mode_batchnorm():
    code, out, err = run(["check", "--model", "vgg11_bn", *SMALL, "--bn", "eval", "--json"])
    assert code == 1, err
    doc = json.loads(out)
    assert_contract(doc)
    fam = doc["families"]
    assert doc["pass"] is False
    assert not fam["scale"]["gradient"]["pass"] and not fam["scale"]["hessian"]["pass"]
    assert not fam["translation"]["gradient"]["pass"] and not fam["translation"]["hessian"]["pass"]
    assert fam["rescale"]["gradient"]["pass"] and fam["rescale"]["hessian"]["pass"]
    assert doc["verdict"] == "fail" and doc["hvps"]["verification"] == 2  # a dense failure costs no extra HVP
    for name in ("scale", "translation"):
        assert fam[name]["hessian"]["failing_groups"] > 32 and fam[name]["gradient"]["failing_groups"] > 32
    softmax = [lr for lr in fam["translation"]["layers"] if lr["layer"].endswith("softmax")]
    assert softmax and all(not lr["failing"] for lr in softmax)  # running stats do not touch the logit shift


@pytest.mark.parametrize("argv,needle", [
    (["check", "--model", "vgg12"], "unknown model 'vgg12'"),
    (["check", "--model", "vgg11", "--input", "33"], "multiple of 32"),
    (["check", "--model", "vgg11", "--batch", "0"], "--batch"),
    (["check", "--model", "vgg11", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["check", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["check", "--input", "big"], "invalid int value: 'big'"),
])
def test_exit_2_one_line_no_traceback(argv, needle):
    code, out, err = run(argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_no_groups_exit_4_and_inconclusive_exit_3():
    """A model without symmetry groups is not a PASS: its own line and exit 4 (checked end to end on a Linear
    → tanh → Linear network, which has none); the table's last line names each verdict."""
    import torch.nn as nn

    from symtools.cli.check import EXIT
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.checker import check

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    found = find_symmetries(model, x[:1], loss="mse")
    report = check(model, x, y, found)
    assert report.verdict == "no_groups" and EXIT[report.verdict] == 4 and EXIT["inconclusive"] == 3
    doc = report.to_dict()
    doc.update(model="m", parameters=1, seconds=0.1, blocked=[])
    assert render_table(doc).splitlines()[-1].startswith("NO SYMMETRY GROUPS FOUND")
    doc["verdict"] = "inconclusive"
    assert "rerun with --dtype float64" in render_table(doc).splitlines()[-1]
