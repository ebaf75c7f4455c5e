"""symtools.integrations.lightning with the real pytorch-lightning (the ``lightning`` extra).

A small CNN (symtools.nn.small.cnn) on the bundled digits (8×8, one channel), float32, CPU. Tolerance: the per-step
law residual ≤ 1e-6 where the law closes: float32 weights leave ~2⁻²⁴·Σ|terms| ≈ 6e-8 of round-off in a charge per
step (docs/monitor.md, "Precision"; measured here 2e-8 to 4e-8), so 1e-6 is ~20× that.

pytorch_lightning is imported plainly: the README's test install (extra ``lightning``) declares it, and a missing
package must fail, not skip (tests/test_cli_errors.py::test_no_test_skips_for_a_package).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from symtools.data import load_digits
from symtools.integrations.driver import MonitorDriver
from symtools.integrations.lightning import SymmetryMonitor
from symtools.nn.small import cnn
from symtools.numeric.records import read_stream

LAW_TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


class Net(pl.LightningModule):
    """cnn(1, [4, 8], 10, 8) with BatchNorm, a no-decay param group (the norm layers'), a step LR schedule.

    Sites: scale and translation (conv bias) at both convs and translation at the output carry a law; the two
    rescale sites norm → next layer mix a no-decay tensor with a decayed one, so the monitor keeps them
    measured-only (a different weight decay per tensor of one group breaks the derived one-λ law)."""

    def __init__(self, optimizer: str = "momentum", poison_step: int | None = None, lr: float = 0.05):
        super().__init__()
        torch.manual_seed(0)
        self.net = cnn(1, [4, 8], 10, 8, norm="batch")
        self.optimizer_name, self.poison_step, self.lr = optimizer, poison_step, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def on_after_backward(self):  # an inf in one gradient at one step: the GradScaler must skip that step
        if self.poison_step is not None and self.trainer.global_step + 1 == self.poison_step:
            self.net.out.weight.grad[0, 0] = math.inf

    def configure_optimizers(self):  # norm weights and biases without weight decay, as transformers does
        decay = [p for n, p in self.named_parameters() if ".norm" not in n]
        no_decay = [p for n, p in self.named_parameters() if ".norm" in n]
        groups = [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_name == "momentum":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(groups, lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data(batches: int, batch: int = 16):
    ds = load_digits(image_size=8, channels=1)
    return DataLoader(Subset(ds, range(batches * batch)), batch_size=batch, shuffle=False)


def _fp16_with_grad_scaler():
    """Lightning turns precision="16-mixed" into bf16 (no GradScaler) on the CPU; this plugin keeps fp16 autocast
    with torch's real GradScaler on the CPU, so a step with an inf gradient is skipped as on a GPU."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def _fit(tmp: Path, module: Net, monitor, *, steps: int, batches: int = 24, ckpt=None, precision="32-true",
         clip=0.05, callbacks=(), logger=False, **kw):
    if precision == "fp16-scaler":
        kw["plugins"], precision = [_fp16_with_grad_scaler()], None
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=clip, precision=precision,
                         callbacks=[monitor, *callbacks], logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp),
                         enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(batches), ckpt_path=ckpt)
    return trainer


def _worst_step_residual(run: Path) -> tuple[np.ndarray, np.ndarray]:
    cols, a = read_stream(run / "records", "laws")
    idx = [i for i, c in enumerate(cols) if c.endswith("|residual_step")]
    return a[:, 0], np.nanmax(a[1:, idx], axis=1)


def test_momentum_law_closes_with_clipping_accumulation_schedule_and_no_decay_groups(tmp_path):
    run = tmp_path / "sym"
    monitor = SymmetryMonitor(out_dir=run, stride=5)
    from pytorch_lightning.loggers import CSVLogger

    trainer = _fit(tmp_path, Net(), monitor, steps=20, logger=CSVLogger(str(tmp_path), name="csv"),
                   log_every_n_steps=5)
    steps, worst = _worst_step_residual(run)
    assert list(steps) == list(range(21))               # step 0 (initial charges) and one row per optimizer step
    assert worst.max() <= LAW_TOL, worst
    assert monitor.summary["optimizer_law"] == "momentum"
    assert monitor.summary["max_rel_residual_discrete"] <= LAW_TOL
    mon = monitor.driver.monitor
    # every site follows a law: the two norm → next-layer rescale sites, whose γ, β sit in the no-decay group and
    # whose next-layer columns do not, are followed as two parts each (one per param group), and said so
    assert mon.law_sites == set(range(len(mon.sites)))
    assert sum(s.part for s in mon.sites) == 4
    assert sum("followed as 2 parts" in w for w in monitor.summary["monitor_warnings"]) == 2
    applied = read_stream(run / "records", "optimizer_steps")[1]
    assert applied[:, 1].tolist() == [1.0] * 20
    # the lr followed the StepLR schedule (4 changes), so the law read per-step lrs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 5)
    # scalars went through the trainer's logger at its stride
    text = next(Path(tmp_path, "csv").rglob("metrics.csv")).read_text()
    assert "symtools/law_residual" in text and "symtools/charge/rescale" in text
    # the records are the usual ones: `symtools plot` draws them
    from symtools.plots import plot_run

    written, _ = plot_run(run, tmp_path / "plots")
    assert written


class _BeforeClipping(SymmetryMonitor):
    """Negative control: measure at Lightning's on_before_optimizer_step, which runs BEFORE its clipping."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.driver is not None:
            self.driver._before()


def test_negative_control_monitor_fed_the_unclipped_gradient_breaks_the_law(tmp_path, monkeypatch):
    monkeypatch.setattr(MonitorDriver, "_pre_hook", lambda self, opt, args, kwargs: None)
    run = tmp_path / "sym"
    _fit(tmp_path, Net(), _BeforeClipping(out_dir=run, stride=5), steps=6)
    _, worst = _worst_step_residual(run)
    # the scale laws read |g|², which clipping at 0.05 shrinks (norms 0.3 to 2): measured 3e-4 to 5e-3 per step
    assert worst.min() > 100 * LAW_TOL, worst


def test_grad_scaler_skip_is_recorded_as_no_update(tmp_path):
    run = tmp_path / "sym"
    monitor = SymmetryMonitor(out_dir=run, stride=5)
    trainer = _fit(tmp_path, Net(poison_step=3), monitor, steps=8, precision="fp16-scaler")
    applied = read_stream(run / "records", "optimizer_steps")[1]
    assert applied[:, 1].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]   # step 3: inf gradient, GradScaler skipped it
    steps, worst = _worst_step_residual(run)
    assert 3 not in steps and list(steps) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert worst.max() <= LAW_TOL, worst     # the steps around the skip keep the law: no broken law recorded
    assert trainer.global_step == 8


def test_control_without_the_inf_no_step_is_skipped(tmp_path):
    run = tmp_path / "sym"
    _fit(tmp_path, Net(), SymmetryMonitor(out_dir=run), steps=4, precision="fp16-scaler")
    assert read_stream(run / "records", "optimizer_steps")[1][:, 1].tolist() == [1, 1, 1, 1]


def test_adamw_law_does_not_close_and_the_breaking_term_is_recorded(tmp_path):
    run = tmp_path / "sym"
    monitor = SymmetryMonitor(out_dir=run, stride=5)
    _fit(tmp_path, Net("adamw"), monitor, steps=8)
    assert monitor.summary["optimizer_law"] is None
    assert any("measured-only" in w for w in monitor.summary["monitor_warnings"])
    cols, a = read_stream(run / "records", "breaking")
    with_b = a[:, [i for i, c in enumerate(cols) if c.endswith("|residual_with_breaking")]]
    without = a[:, [i for i, c in enumerate(cols) if c.endswith("|residual_without_breaking")]]
    # fed the measured breaking term the law is an identity: float64 round-off (θ, u in float64)
    assert np.nanmax(with_b) <= 1e-12, np.nanmax(with_b)
    # negative control: the same law with U1 = 0 (the cancellation of SGD) misses by far
    assert np.nanmin(np.nanmax(without, axis=1)) > 1e3 * LAW_TOL


def test_resume_from_the_trainers_checkpoint_gives_the_same_records(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    batches = 12  # one epoch = 6 optimizer steps: the checkpoint at step 6 is at an epoch's end
    full = tmp_path / "full"
    _fit(full, Net(), SymmetryMonitor(out_dir=full / "sym", stride=3), steps=12, batches=batches,
         callbacks=[ModelCheckpoint(dirpath=full / "ckpt", every_n_train_steps=6, save_top_k=-1)])
    part = tmp_path / "part"
    _fit(part, Net(), SymmetryMonitor(out_dir=part / "sym", stride=3), steps=6, batches=batches,
         callbacks=[ModelCheckpoint(dirpath=part / "ckpt", every_n_train_steps=6, save_top_k=-1)])
    ckpt = next((part / "ckpt").glob("*step=6*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert any(v.get("format") == "symtools-monitor-state" for v in saved["callbacks"].values())
    _fit(part, Net(), SymmetryMonitor(out_dir=part / "sym", stride=3), steps=12, batches=batches, ckpt=str(ckpt),
         callbacks=[ModelCheckpoint(dirpath=part / "ckpt2", every_n_train_steps=6, save_top_k=-1)])
    for stream in ("laws", "groups_rescale", "optimizer_steps"):
        cols_a, a = read_stream(full / "sym" / "records", stream)
        cols_b, b = read_stream(part / "sym" / "records", stream)
        assert cols_a == cols_b and a.shape == b.shape, stream
        np.testing.assert_array_equal(a, b, err_msg=stream)  # bit-identical: same data, same arithmetic


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "integrations" / "lightning.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/integrations/lightning.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "runs" / "digits" / "symtools" / "records" / "laws.json").is_file()


def test_symmetries_bound_on_the_inner_network(tmp_path):
    from symtools.nn.graph import find_symmetries

    module = Net()
    symmetries = find_symmetries(module.net, torch.zeros(2, 1, 8, 8))   # names "conv0.weight", not "net.conv0…"
    monitor = SymmetryMonitor(symmetries, module="net", out_dir=tmp_path / "sym")
    _fit(tmp_path, module, monitor, steps=4)
    assert _worst_step_residual(tmp_path / "sym")[1].max() <= LAW_TOL
    assert monitor.driver.monitor.law_sites   # the same sites as through the LightningModule
