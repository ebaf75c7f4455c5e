"""The symmetry monitor as a PyTorch Lightning callback: ``pl.Trainer(callbacks=[SymmetryMonitor()])``.

What it records and why it hooks the torch optimizer: :mod:`symtools.integrations.driver` and
``docs/integrations/lightning.md``. In short:

- set up at the first training batch (its input is the example the graph walk traces when no ``symmetries``
  are given: ``find_symmetries(pl_module, batch[0])``), records in ``out_dir`` (default
  ``<trainer.default_root_dir>/symtools``): ``records/`` in the usual format, ``summary.json``, ``monitor/``;
- the monitor's state goes into every Lightning checkpoint (``checkpoint["callbacks"][state_key]``) and is
  restored from it (``trainer.fit(..., ckpt_path=...)``); the records are cut back to the checkpoint's step;
- every ``trainer.log_every_n_steps`` optimizer steps ``symtools/law_residual`` (worst per-step law residual
  of the last step), ``symtools/charge/<family>`` (Σ of the measured charges) and, for AdamW & co,
  ``symtools/breaking_residual`` go to every logger of the trainer (``logger.log_metrics``);
- gradient accumulation, clipping (``gradient_clip_val``), schedulers (``lr_scheduler_configs``), per-group
  weight decay and mixed precision are what the optimizer applies, so what the laws read. One optimizer only.

Imports ``pytorch_lightning`` (the ``symtools[lightning]`` extra), else ``lightning.pytorch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from symtools.errors import SymtoolsError
from symtools.integrations.driver import MonitorDriver, find_or_warn
from symtools.nn.groups import SymmetryMap

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError:
        raise SymtoolsError("symtools.integrations.lightning needs PyTorch Lightning: "
                            "pip install 'symtools[lightning]' (pytorch-lightning>=2.2)") from None

__all__ = ["SymmetryMonitor"]


class SymmetryMonitor(pl.Callback):
    """Monitor every symmetry group's charge and conservation law while Lightning trains.

    ``symmetries``: a :class:`~symtools.nn.groups.SymmetryMap` (default: ``find_symmetries`` on the LightningModule
    and the first batch's input; a warning, not an error, when it finds nothing). ``out_dir``: where the records
    go. ``stride``: per-group values every ``stride`` steps. ``families``: only these. ``example_input``: the
    input the graph walk traces (default the first batch's ``batch[0]``, or the module's ``example_input_array``).
    ``log``: send the scalars to the trainer's loggers at its ``log_every_n_steps``. ``module``: the submodule
    (attribute path, e.g. ``"net"``) that ``symmetries`` were bound on, when not the LightningModule itself.
    After ``fit``, :attr:`summary` holds what ``summary.json`` holds.
    """

    def __init__(self, symmetries: SymmetryMap | None = None, *, out_dir: str | Path | None = None,
                 stride: int = 10, families: tuple[str, ...] | None = None, example_input: Any = None,
                 reducer: str | None = None, log: bool = True, module: str | None = None):
        super().__init__()
        if stride < 1:
            raise SymtoolsError(f"stride must be at least 1, got {stride}")
        self.symmetries, self.out_dir, self.stride, self.families = symmetries, out_dir, stride, families
        self.example_input, self.reducer, self.log, self.module = example_input, reducer, log, module
        self.driver: MonitorDriver | None = None
        self._final: dict | None = None
        self.summary: dict | None = None
        self._saved: dict | None = None
        self._trainer = None

    # ------------------------------------------------------------------ set-up at the first batch
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.driver is not None or trainer.global_rank != 0:
            return
        if len(trainer.optimizers) != 1:
            raise SymtoolsError(f"SymmetryMonitor follows one optimizer; this LightningModule configures "
                                f"{len(trainer.optimizers)}")
        self._trainer = trainer
        model = pl_module.get_submodule(self.module) if self.module else pl_module
        symmetries = self.symmetries
        if symmetries is None:
            x = self.example_input
            if x is None:
                x = getattr(pl_module, "example_input_array", None)
            if x is None:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
            symmetries = find_or_warn(model, x, type(model).__name__)
        out = Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "symtools"
        driver = MonitorDriver(symmetries, out, stride=self.stride, families=self.families, reducer=self.reducer)
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        driver.start(model, trainer.optimizers[0], start_step=trainer.global_step, steps=int(steps),
                     saved=self._saved or None)
        self.driver = driver

    # ------------------------------------------------------------------ after every batch
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.driver is None:
            return
        before = self.driver.completed
        self.driver.sync(trainer.global_step)
        step = trainer.global_step
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)
        if self.log and step > before and step % every == 0 and trainer.loggers:
            scalars = self.driver.scalars()
            if scalars:
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        if self.driver is None or self._trainer is None:
            return {}
        if self.driver.ctx is None:  # after the end of training (a checkpoint saved in on_train_end)
            return self._final or {}
        return self.driver.checkpoint(self._trainer.global_step)

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ the end
    def on_train_end(self, trainer, pl_module) -> None:
        self._close("completed")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed")

    def _close(self, state: str) -> None:
        if self.driver is not None and self.driver.ctx is not None:
            if state == "completed" and self._trainer is not None:  # kept for a checkpoint written after this
                self._final = self.driver.checkpoint(self._trainer.global_step)
            self.summary = self.driver.end(state)
