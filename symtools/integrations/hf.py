"""The symmetry monitor as a Hugging Face ``TrainerCallback``: ``attach(trainer, symmetries)``.

What it records and why it hooks the torch optimizer: :mod:`symtools.integrations.driver` and
``docs/integrations/hf.md``. In short:

- set up at ``on_train_begin`` (the Trainer has made its optimizer and scheduler); records in ``out_dir``
  (default ``<args.output_dir>/symtools``): ``records/`` in the usual format, ``summary.json``, ``monitor/``;
- at every save the monitor's state is written into the checkpoint folder
  (``checkpoint-N/symtools_monitor.pt``, loaded back with ``weights_only=True``), and
  ``trainer.train(resume_from_checkpoint=...)`` restores it (records cut back to step N);
- every ``args.logging_steps`` steps ``symtools/law_residual``, ``symtools/charge/<family>`` (and, for AdamW &
  co, ``symtools/breaking_residual``) go through ``trainer.log`` — to ``state.log_history`` and every
  ``report_to`` integration — when the callback knows its trainer (:func:`attach` sets it);
- the Trainer's gradient accumulation, ``max_grad_norm`` clipping, scheduler, its decay / no-decay param groups
  (biases and norm weights without weight decay), fused or foreach optimizers and an fp16 GradScaler's skipped
  steps are all seen as the optimizer applies them.

Without a ``SymmetryMap`` the groups come from ``find_symmetries`` (the ATen-graph walk sees through transformers
models, with HF's (N, T, V) logits' classes on the last axis); it warns when it finds nothing. Pass a map to
follow fewer (e.g. :func:`swiglu_rescale` for Llama-style MLPs).
Needs ``transformers`` and ``accelerate`` (the ``symtools[hf]`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from symtools.errors import SymtoolsError
from symtools.integrations.driver import MonitorDriver, find_or_warn
from symtools.nn.groups import SymmetryMap

try:
    from transformers import TrainerCallback
except ImportError:
    raise SymtoolsError("symtools.integrations.hf needs transformers: pip install 'symtools[hf]' "
                        "(transformers>=4.46, accelerate>=0.26)") from None

__all__ = ["STATE_FILE", "SymmetryMonitorCallback", "attach", "swiglu_rescale"]

STATE_FILE = "symtools_monitor.pt"


class SymmetryMonitorCallback(TrainerCallback):
    """Monitor every symmetry group's charge and conservation law while a ``transformers.Trainer`` trains.

    ``symmetries``: a :class:`~symtools.nn.groups.SymmetryMap` (default: ``find_symmetries`` on the model with
    ``example_input``, or 8 token ids when the model has a ``config.vocab_size``; a warning when it finds
    nothing). ``out_dir``, ``stride``, ``families``: as :class:`~symtools.integrations.lightning.SymmetryMonitor`.
    ``trainer``: the Trainer, for logging through ``trainer.log`` (:func:`attach` sets it).
    ``resume_from``: the checkpoint folder to read the monitor's state from when resuming (default
    ``<output_dir>/checkpoint-<step>``). After training, :attr:`summary` holds what ``summary.json`` holds.
    """

    def __init__(self, symmetries: SymmetryMap | None = None, *, out_dir: str | Path | None = None,
                 stride: int = 10, families: tuple[str, ...] | None = None, example_input: Any = None,
                 reducer: str | None = None, trainer: Any = None, resume_from: str | Path | None = None):
        if stride < 1:
            raise SymtoolsError(f"stride must be at least 1, got {stride}")
        self.symmetries, self.out_dir, self.stride, self.families = symmetries, out_dir, stride, families
        self.example_input, self.reducer, self.trainer, self.resume_from = example_input, reducer, trainer, resume_from
        self.driver: MonitorDriver | None = None
        self.summary: dict | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if model is None or optimizer is None:
            raise SymtoolsError("the Trainer passed no model or optimizer to on_train_begin: cannot monitor")
        symmetries = self.symmetries
        if symmetries is None:
            x = self.example_input
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            if x is None and vocab:
                x = torch.arange(8, device=next(model.parameters()).device).remainder(vocab).unsqueeze(0)
            symmetries = (find_or_warn(model, x, type(model).__name__) if x is not None
                          else _warn_none(type(model).__name__))
        out = Path(self.out_dir) if self.out_dir is not None else Path(args.output_dir) / "symtools"
        saved = None
        if state.global_step:
            folder = Path(self.resume_from) if self.resume_from else Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = folder / STATE_FILE
            if not path.is_file():
                raise SymtoolsError(f"cannot resume the symmetry monitor at step {state.global_step}: {path} is "
                                    f"missing (pass resume_from=<the checkpoint folder>)")
            try:
                saved = torch.load(path, weights_only=True)
            except Exception as exc:
                raise SymtoolsError(f"cannot resume the symmetry monitor: {path} is not readable ({exc})") from None
        driver = MonitorDriver(symmetries, out, stride=self.stride, families=self.families, reducer=self.reducer)
        driver.start(model, optimizer, start_step=state.global_step, steps=state.max_steps, saved=saved)
        self.driver = driver

    def on_step_end(self, args, state, control, **kwargs):
        if self.driver is None:
            return
        before = self.driver.completed
        self.driver.sync(state.global_step)
        step = state.global_step
        if self.trainer is None or step <= before or str(getattr(args.logging_strategy, "value",
                                                                      args.logging_strategy)) != "steps":
            return
        every = args.logging_steps
        if every < 1:  # a ratio of the run
            every = max(int(round(every * state.max_steps)), 1)
        if step % int(every) == 0 or (step == 1 and args.logging_first_step):
            scalars = self.driver.scalars()
            if scalars:
                self.trainer.log(scalars)

    def on_save(self, args, state, control, **kwargs):
        if self.driver is None or self.driver.ctx is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        payload = self.driver.checkpoint(state.global_step)
        if folder.is_dir():
            tmp = folder / (STATE_FILE + ".tmp")
            torch.save(payload, tmp)
            tmp.replace(folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.driver is not None and self.driver.ctx is not None:
            self.summary = self.driver.end("completed")


def attach(trainer: Any, symmetries: SymmetryMap | None = None, **options: Any) -> SymmetryMonitorCallback:
    """Add a :class:`SymmetryMonitorCallback` to ``trainer`` (logging through it); hands the callback on."""
    cb = SymmetryMonitorCallback(symmetries, trainer=trainer, **options)
    trainer.add_callback(cb)
    return cb


def swiglu_rescale(model: torch.nn.Module) -> SymmetryMap:
    """The rescale symmetry of every SwiGLU MLP unit of a Llama-style model (``…mlp.up_proj`` /
    ``…mlp.down_proj``): unit k's up_proj row times a, its down_proj column divided by a, leaves the loss
    unchanged (gate_proj's row does not: SiLU is not homogeneous). Bound with :func:`symtools.nn.graph.bind`;
    one group set per layer, ``count`` = intermediate size. SymtoolsError when the model has no such MLP."""
    from symtools.nn.graph import bind

    names = dict(model.named_parameters())
    sets = []
    for name, p in names.items():
        if not name.endswith("mlp.up_proj.weight"):
            continue
        prefix = name[: -len("up_proj.weight")]
        down = prefix + "down_proj.weight"
        if down not in names or prefix + "up_proj.bias" in names or prefix + "gate_proj.weight" not in names:
            continue
        sets.append(bind(model, "rescale", f"{prefix}up_proj → {prefix}down_proj",
                         {"x_in": [(name, 0)], "x_out": [(down, 1)]}, count=p.shape[0]))
    if not sets:
        raise SymtoolsError(f"{type(model).__name__} has no SwiGLU MLP (…mlp.gate_proj / up_proj / down_proj "
                            f"without biases): bind its symmetries with symtools.nn.graph.bind")
    return SymmetryMap(sets)


def _warn_none(what: str) -> SymmetryMap:
    from symtools.integrations.driver import warn_no_symmetries

    warn_no_symmetries(what, "no example input to trace (pass example_input=… or symmetries=…)")
    return SymmetryMap()
