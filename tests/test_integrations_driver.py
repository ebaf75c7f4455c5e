"""symtools.integrations.driver without any trainer package: the monitor driven from the torch optimizer's hooks.

A plain torch loop stands in for a trainer: it accumulates gradients over micro-batches, clips them, sometimes
passes a closure to ``optimizer.step`` (as Lightning does) and sometimes skips the step (as a GradScaler does on
an inf). Model: symtools.nn.small.mlp in float64, so the per-step law closes to float64 round-off: tolerance 1e-12
(measured ~1e-15; the float64 laws' floor in tests/test_monitor.py is 1e-12 too). Negative controls: the same
loop measured before clipping, and a skipped step counted as applied.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symtools.errors import SymtoolsError
from symtools.integrations.driver import MonitorDriver, torch_optimizer
from symtools.nn.graph import find_symmetries
from symtools.nn.small import mlp
from symtools.numeric.records import read_stream

TOL64 = 1e-12


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp(6, [8, 8], 4).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    return model, x, y


def _loop(model, opt, x, y, driver, steps, *, clip=0.05, closure_every=2, skip=(), measure_before_clip=False):
    """Two micro-batches per optimizer step, clipping, a closure on every other step, skipped steps."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for step in range(1, steps + 1):
        def backward():
            opt.zero_grad()
            for part in (slice(0, 32), slice(32, 64)):
                torch.nn.functional.cross_entropy(model(x[part]), y[part]).div(2).backward()
            if measure_before_clip:
                driver._before()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

        if step in skip:               # what GradScaler.step does on an inf: optimizer.step() is not called
            backward()
        elif step % closure_every == 0:
            opt.step(lambda: backward())
        else:
            backward()
            opt.step()
        sched.step()
        driver.sync(step)


def _groups(model):
    """Two param groups: the hidden layers with weight decay, the output layer without. The translation sites lie
    in the no-decay group alone and fc0 → fc1 in the other: each follows its own group's law; fc1 → out spans
    both, and is followed as two parts, each with its own group's λ (said in a warning)."""
    decay = [p for n, p in model.named_parameters() if not n.startswith("out.")]
    no_decay = [p for n, p in model.named_parameters() if n.startswith("out.")]
    return [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]


def _worst(out):
    cols, a = read_stream(out / "records", "laws")
    return a[:, 0], np.nanmax(a[1:, [i for i, c in enumerate(cols) if c.endswith("|residual_step")]], axis=1)


def test_law_closes_through_the_hooks_with_closures_clipping_accumulation_and_a_skipped_step(tmp_path):
    model, x, y = _setup()
    opt = torch.optim.SGD(_groups(model), lr=0.5, momentum=0.9, foreach=True)
    driver = MonitorDriver(find_symmetries(model, x[:2]), tmp_path, stride=2)
    driver.start(model, opt, start_step=0, steps=8)
    _loop(model, opt, x, y, driver, 8, skip={4})
    summary = driver.end()
    steps, worst = _worst(tmp_path)
    assert list(steps) == [0, 1, 2, 3, 5, 6, 7, 8]          # no laws row for the skipped step
    assert worst.max() <= TOL64, worst
    assert read_stream(tmp_path / "records", "optimizer_steps")[1][:, 1].tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    assert summary["optimizer_law"] == "momentum" and summary["steps"] == 8
    mon = driver.monitor
    assert mon.law_sites == set(range(len(mon.sites)))      # every site, the parts of fc1 → out too
    assert sorted(s.gs.layer for s in mon.sites if s.part) == ["fc1 → out [param group 0]", "fc1 → out [param group 1]"]
    assert [w for w in summary["monitor_warnings"] if "fc1 → out" in w and "followed as 2 parts" in w]
    latest = driver.monitor.latest()                         # the monitor's API for a trainer's logger
    assert latest["step"] == 8 and latest["law_residual"] <= TOL64 and set(latest["charges"]) >= {"rescale"}


def test_negative_control_measured_before_clipping_misses(tmp_path, monkeypatch):
    monkeypatch.setattr(MonitorDriver, "_pre_hook", lambda self, opt, args, kwargs: None)
    model, x, y = _setup()
    opt = torch.optim.SGD(_groups(model), lr=0.5, momentum=0.9)
    driver = MonitorDriver(find_symmetries(model, x[:2]), tmp_path)
    driver.start(model, opt, start_step=0, steps=4)
    _loop(model, opt, x, y, driver, 4, closure_every=99, measure_before_clip=True)
    driver.end()
    assert _worst(tmp_path)[1].min() > 1e6 * TOL64


def test_fused_sgd_is_hooked_too(tmp_path):
    model, x, y = _setup()
    opt = torch.optim.SGD(_groups(model), lr=0.5, momentum=0.9, fused=True)  # torch 2.13 has CPU fused SGD
    driver = MonitorDriver(find_symmetries(model, x[:2]), tmp_path)
    driver.start(model, opt, start_step=0, steps=4)
    _loop(model, opt, x, y, driver, 4)
    driver.end()
    assert _worst(tmp_path)[1].max() <= TOL64


def test_unwraps_trainer_optimizers_and_refuses_other_objects():
    model, _, _ = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps .optimizer, Lightning's LightningOptimizer ._optimizer
        def __init__(self, inner, attr):
            setattr(self, attr, inner)

    assert torch_optimizer(Wrapper(Wrapper(opt, "_optimizer"), "optimizer")) is opt
    with pytest.raises(SymtoolsError, match="not a torch.optim.Optimizer"):
        torch_optimizer(object())


def test_resume_from_a_saved_state_continues_the_records(tmp_path):
    def run(out, segments):
        model, x, y = _setup()
        opt = torch.optim.SGD(_groups(model), lr=0.5, momentum=0.9)
        saved, start, ckpt = None, 0, {}
        for end in segments:
            if start:  # a "trainer checkpoint": model and optimizer state, and the driver's dict
                model, x, y = _setup()
                model.load_state_dict(ckpt["model"])
                opt = torch.optim.SGD(_groups(model), lr=0.5, momentum=0.9)
                opt.load_state_dict(ckpt["opt"])
            driver = MonitorDriver(find_symmetries(model, x[:2]), out, stride=2)
            driver.start(model, opt, start_step=start, steps=6, saved=saved)
            for group in opt.param_groups:
                group["lr"] = 0.5 * 0.5 ** (start // 3)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            sched.last_epoch = start
            for step in range(start + 1, end + 1):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                sched.step()
                driver.sync(step)
            saved = driver.checkpoint(end)
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
            driver.end()
            start = end
        return read_stream(out / "records", "laws")[1]

    whole = run(tmp_path / "a", [6])
    resumed = run(tmp_path / "b", [3, 6])
    np.testing.assert_array_equal(whole, resumed)
    assert not math.isnan(whole[-1, 1])


def test_a_foreign_saved_state_is_refused(tmp_path):
    model, x, _ = _setup()
    driver = MonitorDriver(find_symmetries(model, x[:2]), tmp_path)
    with pytest.raises(SymtoolsError, match="cannot resume"):
        driver.start(model, torch.optim.SGD(model.parameters(), lr=0.1), start_step=3, steps=6, saved={"x": 1})


def test_symmetries_of_another_module_are_refused_in_one_line(tmp_path):
    model, x, _ = _setup()
    wrapper = torch.nn.Sequential(model)  # parameters named "0.fc0.weight", …: not the names the map uses
    driver = MonitorDriver(find_symmetries(model, x[:2]), tmp_path)
    with pytest.raises(SymtoolsError, match="module=…"):
        driver.start(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1), start_step=0, steps=2)
