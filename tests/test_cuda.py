"""The GPU path: the same checker, monitor, CLI and audit on a CUDA device, and TensorFloat-32 kept out of checks.

Everything but the first test needs a CUDA device and is skipped without one (CI has none; these ran on a lent
H100, docs/benchmarks.md). Tolerances are the CPU tests': the checker's own (measured round-off floors) for
its verdicts, 1e-12 (float64) and 1e-6 (float32) for the monitor's per-step laws (tests/test_monitor.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from symtools.cli.main import main
from symtools.nn.graph import find_symmetries
from symtools.numeric.checker import check
from symtools.numeric.precision import ieee_float32, tf32_state
from symtools.testing import Architecture, build_network

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
F32, F64 = torch.float32, torch.float64


def _bn_cnn(seed=1, activation="relu"):
    arch = Architecture("cnn", (4, 6), activation, True, "batch", "cross_entropy", in_features=3, classes=5,
                        batch=8, input_size=8)
    return build_network(arch, seed)


def test_check_runs_with_tf32_off_and_restores_the_callers_flags():
    """Inside ``check`` every TF32 flag reads IEEE (the loss records them each time it is evaluated); the
    caller's flags are back afterwards. Negative control: the same loss called outside ``check`` sees them."""
    model, x, y, _ = _bn_cnn()
    seen = []

    def recording_loss(logits, targets):
        seen.append(tf32_state())
        return nn.functional.cross_entropy(logits, targets)

    before = tf32_state()
    with ieee_float32():
        ieee = tf32_state()
    assert ieee != before or all(v in ("ieee", False) for v in before.values())
    found = find_symmetries(model, x[:1])
    check(model, x, y, found, loss=recording_loss)
    assert seen and all(s == ieee for s in seen)
    assert tf32_state() == before
    recording_loss(model(x), y)
    assert seen[-1] == before


# ----------------------------------------------------------------------------------------------------- CUDA
def _families(report):
    return {n: (f.groups, f.passed) for n, f in report.families.items()}


@cuda
@pytest.mark.parametrize("dtype", [F64, F32])
def test_cuda_check_passes_like_the_cpu(dtype):
    model, x, y, _ = _bn_cnn()
    found = find_symmetries(model, x[:1])
    cpu = check(model, x, y, found, dtype=dtype)
    gpu = check(model.cuda(), x.cuda(), y.cuda(), found, dtype=dtype)
    assert cpu.passed and gpu.passed, {n: (f.gradient, f.hessian) for n, f in gpu.families.items()}
    assert _families(cpu) == _families(gpu)
    assert gpu.hvps["verification"] == cpu.hvps["verification"] == len(gpu.families)


@cuda
@pytest.mark.parametrize("dtype", [F64, F32])
def test_cuda_negative_control_tanh_fails_exactly_its_rescale_groups(dtype):
    model, x, y, _ = _bn_cnn()
    found = find_symmetries(model, x[:1])
    model.act0 = nn.Tanh()  # the groups found for ReLU are kept
    report = check(model.cuda(), x.cuda(), y.cuda(), found, dtype=dtype)
    assert not report.passed and not report.families["rescale"].passed
    failing = {lr.layer for lr in report.families["rescale"].layers if lr.failing}
    assert failing == {"norm0 → conv1"}, failing
    assert all(report.families[n].passed for n in report.families if n != "rescale")


@cuda
@pytest.mark.parametrize("dtype,bound", [(F64, 1e-12), (F32, 1e-6)])
def test_cuda_monitor_per_step_laws(tmp_path, dtype, bound):
    from symtools.numeric.monitor import Monitor
    from symtools.training import train

    model, x, _, _ = _bn_cnn(seed=3)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (12,), generator=g))
               for _ in range(6)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3, momentum=0.9)
    mon = Monitor(find_symmetries(model, x[:1].to(dtype)), stride=2)
    summary = train(model, opt, batches, 6, device="cuda", out_dir=tmp_path / "run", callbacks=[mon],
                    progress=False)
    assert summary["status"] == "completed" and next(model.parameters()).is_cuda
    assert summary["max_rel_residual_discrete"] < bound, summary["families"]


@cuda
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_cli_check_vgg(capsys, dtype):
    code = main(["check", "--model", "vgg11_bn", "--input", "32", "--classes", "10", "--batch", "4",
                 "--dtype", dtype, "--device", "cuda", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["pass"] is True
    assert set(out["families"]) == {"translation", "scale", "rescale"}


@cuda
def test_cuda_audit_of_a_cuda_training_run(tmp_path, capsys):
    from symtools.data.loader import make_loader
    from symtools.nn.vgg import vgg
    from symtools.numeric.monitor import Monitor
    from symtools.training import train

    torch.manual_seed(0)
    model = vgg(depth=11, batch_norm=True, input_size=32, classes=10, hidden=64)
    stream = make_loader("digits", 8, image_size=32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-3)
    mon = Monitor(find_symmetries(model, stream.batch(0)[0][:1]), stride=1)
    train(model, opt, stream, 3, device="cuda", out_dir=tmp_path / "run", callbacks=[mon], progress=False)
    report = tmp_path / "audit.json"
    code = main(["audit", str(tmp_path / "run" / "checkpoints" / "step_000003.pt"), "--run", str(tmp_path / "run"),
                 "--batch", "8", "--device", "cuda", "--json", str(report)])
    rep = json.loads(report.read_text())
    assert code == 0 and rep["pass"], rep.get("flagged")
    assert rep["identities"]["pass"]
