"""Training loop: learning, checkpoints, bit-identical resume, divergence and interrupt handling, callbacks."""

import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

from symtools.data import make_loader
from symtools.errors import SymtoolsError
from symtools.numeric.records import read_stream
from symtools.training import TrainingDiverged, list_checkpoints, load_checkpoint, train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps them fast on a busy 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(*, bn=True, dropout=0.0, dtype=torch.float32, seed=0):
    """Conv(3→4) [BN] ReLU pool → [dropout] Linear(64→10), for 3×8×8 inputs."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1), *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU(), nn.MaxPool2d(2),
              nn.Flatten(), *([nn.Dropout(dropout)] if dropout else []), nn.Linear(64, 10)]
    return nn.Sequential(*layers).to(dtype)


def digits(batch=32, seed=0, dtype=torch.float32):
    return make_loader("digits", batch, image_size=8, seed=seed, dtype=dtype)


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, **kw})


class Recorder:
    """A callback writing one record stream; counts its hooks."""

    def __init__(self, inject_nan_at=None):
        self.calls = {"on_start": 0, "before_step": 0, "after_step": 0, "on_checkpoint": 0}
        self.inject_nan_at, self.end_state = inject_nan_at, None

    def on_start(self, ctx):
        self.calls["on_start"] += 1
        self.stream = ctx.records.stream("probe", ["step", "weight_sq"], "squared norm of the last layer's weight")
        if ctx.start_step == 0:
            self.stream.append([0, float(ctx.model[-1].weight.detach().double().square().sum())])

    def before_step(self, ctx):
        self.calls["before_step"] += 1
        if ctx.step == self.inject_nan_at:
            with torch.no_grad():
                ctx.model[0].weight[0, 0, 0, 0] = float("nan")

    def after_step(self, ctx):
        self.calls["after_step"] += 1
        self.stream.append([ctx.step, float(ctx.model[-1].weight.detach().double().square().sum())])

    def on_checkpoint(self, ctx):
        self.calls["on_checkpoint"] += 1

    def on_end(self, ctx):
        self.end_state = ctx.state
        return {"probe_rows": self.calls["after_step"]}


def test_loss_decreases_with_sgd_on_digits(tmp_path):
    model = tiny()
    summary = train(model, sgd(model, lr=0.05), digits(), 30, out_dir=tmp_path, progress=False)
    _, rec = read_stream(tmp_path / "records", "train")
    assert rec[:, 0].tolist() == list(range(1, 31))
    assert rec[-5:, 1].mean() < 0.5 * rec[:3, 1].mean(), rec[:, 1]
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert json.loads((tmp_path / "summary.json").read_text())["final_loss"] == pytest.approx(rec[-1, 1])


def test_checkpoints_at_start_stride_end_load_weights_only(tmp_path):
    model, cb = tiny(), Recorder()
    opt = sgd(model)
    train(model, opt, digits(), 10, out_dir=tmp_path, checkpoint_every=4, callbacks=[cb], progress=False,
          config={"model": "tiny", "lr": 0.1})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 4, 8, 10]
    assert cb.calls == {"on_start": 1, "before_step": 10, "after_step": 10, "on_checkpoint": 4}
    for step, path in list_checkpoints(tmp_path):
        ckpt = torch.load(path, weights_only=True)  # the contract: plain tensors, numbers, strings
        assert ckpt["step"] == step and list(ckpt["model"]) == list(model.state_dict())
        assert ckpt["config"]["model"] == "tiny" and ckpt["config"]["data"]["data"] == "digits"
        assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    last = load_checkpoint(tmp_path / "checkpoints" / "step_000010.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(last["model"][k], v)
    assert torch.equal(last["optimizer"]["state"][0]["momentum_buffer"], opt.state[model[0].weight]["momentum_buffer"])
    first = load_checkpoint(tmp_path / "checkpoints" / "step_000000.pt")
    assert first["optimizer"]["state"] == {} and not torch.equal(first["model"]["0.weight"], last["model"]["0.weight"])
    _, probe = read_stream(tmp_path / "records", "probe")
    assert probe[:, 0].tolist() == list(range(11))
    with pytest.raises(SymtoolsError, match="already holds a run"):  # never append to a finished run by accident
        train(model, opt, digits(), 10, out_dir=tmp_path, progress=False)


def _resumable_setup(seed):
    """float64 model with BN, dropout, Nesterov SGD with weight decay and an LR schedule."""
    model = tiny(dropout=0.2, dtype=torch.float64, seed=seed)
    opt = sgd(model, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return model, opt, sched


def _run(out_dir, steps, *, seed=0, resume=False, callbacks=(), global_seed=123):
    model, opt, sched = _resumable_setup(seed)
    torch.manual_seed(global_seed)  # dropout draws from the global RNG; resume must restore it
    train(model, opt, digits(dtype=torch.float64), steps, out_dir=out_dir, checkpoint_every=4, scheduler=sched,
          callbacks=[Recorder(), *callbacks], progress=False, resume=resume)
    return model, opt


def _assert_same_run(a_dir, a, b_dir, b):
    (ma, oa), (mb, ob) = a, b
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(va, vb), k
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"])
    ra, rb = read_stream(a_dir / "records", "train")[1], read_stream(b_dir / "records", "train")[1]
    np.testing.assert_array_equal(ra[:, :4], rb[:, :4])  # step, loss, accuracy, lr (not wall time)
    np.testing.assert_array_equal(read_stream(a_dir / "records", "probe")[1], read_stream(b_dir / "records", "probe")[1])
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a_dir, b_dir))
    assert sb["status"] == "completed" and sb["steps"] == sa["steps"] and sb["start_step"] > 0
    for key in ("final_loss", "final_accuracy", "running_loss", "running_accuracy"):
        assert sa[key] == sb[key], key


@pytest.fixture
def ctrl_c_enabled():
    """A process started in the background (``cmd &``, nohup) inherits SIGINT ignored, and the trainer rightly
    leaves an ignored SIGINT alone; the Ctrl-C tests need Python's default handler, whatever started pytest."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_resume_after_ctrl_c_is_bit_identical(tmp_path, ctrl_c_enabled):
    straight = _run(tmp_path / "a", 12)

    class CtrlC:
        def after_step(self, ctx):
            if ctx.step == 7:
                os.kill(os.getpid(), signal.SIGINT)  # handled after this update completes

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 12, callbacks=[CtrlC()])
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [0, 4, 7]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 7
    assert read_stream(tmp_path / "b" / "records", "train")[1].shape[0] == 7
    # a different initialisation and global seed: everything must come from the checkpoint
    resumed = _run(tmp_path / "b", 12, seed=1, resume=True, global_seed=999)
    _assert_same_run(tmp_path / "a", straight, tmp_path / "b", resumed)
    # negative control: without restoring the RNG the dropout masks, hence the weights, differ
    model, opt, sched = _resumable_setup(1)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_000007.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    torch.manual_seed(999)
    stream = digits(dtype=torch.float64)
    for i in range(7, 12):
        x, y = stream.batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert not torch.equal(model[0].weight, straight[0][0].weight)


def test_resume_after_kill_truncates_records_to_the_checkpoint(tmp_path):
    straight = _run(tmp_path / "a", 12)
    _run(tmp_path / "b", 10)
    # simulate a kill between the checkpoints of step 8 and step 10: no final checkpoint, torn record rows
    (tmp_path / "b" / "checkpoints" / "step_000010.pt").unlink()
    for name in ("train", "probe"):
        with open(tmp_path / "b" / "records" / f"{name}.f64", "ab") as fh:
            fh.write(np.array([11.0, 1.0]).tobytes()[:11])
    resumed = _run(tmp_path / "b", 12, seed=1, resume=True, global_seed=999)
    assert read_stream(tmp_path / "b" / "records", "train")[1][:, 0].tolist() == list(range(1, 13))
    _assert_same_run(tmp_path / "a", straight, tmp_path / "b", resumed)


def test_nan_in_weights_names_parameter_and_step_and_keeps_records(tmp_path):
    model, cb = tiny(), Recorder(inject_nan_at=3)
    with pytest.raises(TrainingDiverged, match=r"parameter '0\.weight' is not finite after step 3") as err:
        train(model, sgd(model), digits(), 10, out_dir=tmp_path, checkpoint_every=100, callbacks=[cb], progress=False)
    assert isinstance(err.value, SymtoolsError) and err.value.step == 3 and err.value.name == "0.weight"
    assert "step_000000.pt" in str(err.value)
    assert cb.end_state == "failed" and cb.calls["after_step"] == 2  # after_step never sees the bad weights
    assert read_stream(tmp_path / "records", "train")[1][:, 0].tolist() == [1, 2]
    assert read_stream(tmp_path / "records", "probe")[1][:, 0].tolist() == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "0.weight" in summary["error"] and summary["probe_rows"] == 2


def test_nan_in_input_is_reported_as_input(tmp_path):
    x, y = digits().batch(0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    batches = [(x, y), (bad, y), (x, y)]
    model = tiny(bn=False)
    with pytest.raises(TrainingDiverged, match="input batch of step 2") as err:
        train(model, sgd(model), batches, 3, out_dir=tmp_path, progress=False)
    assert err.value.step == 2 and err.value.name == "input"
    with pytest.raises(SymtoolsError, match="ran out before step 4"):
        train(tiny(bn=False), sgd(model), [(x, y)] * 3, 5, out_dir=tmp_path / "short", progress=False)


def test_callbacks_see_gradients_before_step_and_updated_weights_after(tmp_path, capsys):
    model = tiny(bn=False)
    lr = 0.05

    class Check:
        def __init__(self):
            self.checked = 0

        def before_step(self, ctx):
            x, y = ctx.batch
            params = list(ctx.model.parameters())
            fresh = torch.autograd.grad(ctx.loss_fn(ctx.model(x), y), params)
            for p, g in zip(params, fresh):
                torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)  # same float32 computation, re-run
            self.before = [(p.detach().clone(), p.grad.clone()) for p in params]
            assert torch.equal(ctx.loss, nn.functional.cross_entropy(ctx.logits, y))

        def after_step(self, ctx):
            for p, (p0, g) in zip(ctx.model.parameters(), self.before):
                assert torch.equal(p.detach(), torch.add(p0, g, alpha=-lr))  # plain SGD: θ' = θ − ηg, bit for bit
            self.checked += 1

        def status(self):
            return {"worst law residual": 3e-9}

        def on_end(self, ctx):
            return {"checked": self.checked, "steps": -1}  # 'steps' clashes with the loop's key

    check = Check()
    summary = train(model, torch.optim.SGD(model.parameters(), lr=lr), digits(), 20, out_dir=tmp_path,
                    callbacks=[check], progress=True)
    assert check.checked == 20 and summary["checked"] == 20
    assert summary["steps"] == 20 and summary["Check.steps"] == -1
    err = capsys.readouterr().err  # not a TTY: a progress line every ~10 %
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert len(lines) == 10 and "worst law residual 3e-09" in lines[-1] and lines[-1].startswith("step 20/20")
    with pytest.raises(SymtoolsError, match="none of the methods"):
        train(model, torch.optim.SGD(model.parameters(), lr=lr), digits(), 1, out_dir=tmp_path / "x",
              callbacks=[object()], progress=False)


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    model = tiny(bn=False)
    train(model, sgd(model), digits(), 2, out_dir=tmp_path, progress=False)
    other = tiny(bn=True)
    with pytest.raises(SymtoolsError, match="does not fit this model"):
        train(other, sgd(other), digits(), 4, out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(SymtoolsError, match="past steps=1"):
        train(model, sgd(model), digits(), 1, out_dir=tmp_path, progress=False, resume=True)
