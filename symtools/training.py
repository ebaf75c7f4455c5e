"""The training loop: real torch optimizers, checkpoints, append-only records, resume, clean stops.

:func:`train` knows nothing about symmetries; a monitor (or anything else) plugs in as a *callback*.

Step numbering
--------------
``step`` counts completed optimizer updates. Weights ``θ_n`` are the weights after ``n`` updates
(``θ_0`` = the initial weights, checkpoint ``step_000000.pt``). Update ``n`` (``n = 1 … steps``) uses
batch ``n − 1`` of the batch stream: forward and backward at ``θ_{n−1}``, then ``optimizer.step()``
gives ``θ_n``. Record rows carry the step they describe; the ``train`` stream's row ``n`` holds the
loss and accuracy of update ``n`` (computed at ``θ_{n−1}``, as every training log does).

Callback protocol
-----------------
A callback is any object; every method is optional and looked up by name::

    on_start(ctx)            once, before the first update (ctx.step = start step, 0 or the resumed one);
                             create record streams here with ctx.records.stream(...)
    before_step(ctx)         update ctx.step: after loss.backward(), before optimizer.step();
                             parameters are θ_{step−1} and every p.grad is their minibatch gradient
    after_step(ctx)          after optimizer.step() (parameters θ_step, checked finite), before the
                             LR scheduler steps, so optimizer.param_groups still hold this update's lr
    on_checkpoint(ctx)       after a checkpoint of ctx.step was written (records already flushed); in a
                             distributed run only on rank 0, the one that writes
    on_end(ctx) -> dict|None once at the end, also after a divergence or an interrupt (ctx.state says which:
                             "completed" | "interrupted" | "failed"); flush your own files here. A returned
                             dict is merged into summary.json (keys clashing with the loop's own are
                             stored as "<CallbackClass>.<key>")
    status() -> dict         short figures for the progress bar, e.g. {"worst law residual": 3e-9};
                             called only when the bar is drawn

``ctx`` (:class:`TrainContext`) carries ``model``, ``optimizer``, ``scheduler``, ``step``, ``start_step``,
``steps``, ``batch`` (``(x, y)`` on the device), ``loss`` and ``logits`` (detached, of the current update),
``loss_fn`` (``loss_fn(logits, y) -> scalar``, to recompute the loss), ``records`` (the run's
:class:`~symtools.numeric.records.RecordWriter`), ``out_dir``, ``device``, ``config``, ``state``,
``rank`` and ``world_size`` (0 and 1 unless ``torch.distributed`` is initialised).
Streams made on ``ctx.records`` are flushed (fsync) before each checkpoint and truncated to the
checkpoint's step on resume, so a killed run loses at most the rows after its last checkpoint;
callbacks that keep files of their own must handle that in ``on_start`` (``ctx.start_step``).

Run directory
-------------
``out_dir/checkpoints/step_NNNNNN.pt``: a plain dict loadable with ``torch.load(path, weights_only=True)``:
``{"format": "symtools-checkpoint", "version": 1, "step": n, "model": model.state_dict() (CPU tensors,
keys as the model names them), "optimizer": optimizer.state_dict(), "scheduler": ... (if any),
"rng": {"torch": CPU RNG state[, "cuda": [...]]}, "elapsed_s": float, "config": {...}}``.
Written at step 0, every ``checkpoint_every`` steps, at the end, and when interrupted (Ctrl-C).
``out_dir/records/`` (see ``docs/records.md``): stream ``train`` = step, loss, accuracy, lr, time_s.
``out_dir/summary.json``: status, steps, final and running loss/accuracy, wall time, checkpoints,
plus what callbacks return from ``on_end``.

Distributed runs
----------------
When ``torch.distributed`` is initialised (e.g. a ``DistributedDataParallel`` model, each rank feeding its
shard of the global batch), every rank runs the loop and its callbacks; gradients are averaged by DDP
before ``before_step``, so a monitor computes the same numbers on every rank. Only **rank 0 writes**:
records, checkpoints (the wrapped module's ``state_dict``, so keys keep the model's own layout, without
``module.``), ``on_checkpoint`` and ``summary.json``; the other ranks get a ``ctx.records`` that discards
rows. The logged loss and accuracy are averaged over the ranks (with equal shards: those of the global
batch), and a Ctrl-C stops every rank after the same update. All ranks must use the same ``out_dir``
(they read it to resume).

Bad input and stops
-------------------
A non-finite loss, parameter or floating buffer raises :class:`TrainingDiverged` (a ``SymtoolsError``)
naming the first bad tensor and the step, after ``on_end`` and a flush of the records. Ctrl-C stops at
the end of the current update: records are flushed, a checkpoint of the last completed step is
written, ``on_end`` runs and ``KeyboardInterrupt`` is re-raised (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from symtools.checkpoints import unwrap_model as _unwrap
from symtools.errors import SymtoolsError
from symtools.numeric.records import RecordWriter, read_stream
from symtools.training_console import Progress, SigintDeferral
from symtools.training_state import (CHECKPOINT_FORMAT, checkpoint_path, latest_checkpoint, list_checkpoints,
                                     load_checkpoint, plain_config, restore_checkpoint, save_checkpoint)

__all__ = [
    "train", "TrainContext", "TrainingDiverged", "CHECKPOINT_FORMAT",
    "list_checkpoints", "latest_checkpoint", "load_checkpoint", "checkpoint_path",
]

HOOKS = ("on_start", "before_step", "after_step", "on_checkpoint", "on_end", "status")
TRAIN_COLUMNS = ["step", "loss", "accuracy", "lr", "time_s"]
TRAIN_DESCRIPTION = ("one row per update: step n, loss and accuracy of the minibatch of update n (at the weights "
                     "before it), learning rate of param group 0 used by update n, seconds since the run began (all "
                     "segments)")
RUNNING_WINDOW = 50


class TrainingDiverged(SymtoolsError):
    """A non-finite loss, parameter or buffer; ``step`` and ``name`` (the first bad tensor, or "loss") say where."""

    def __init__(self, message: str, *, step: int, name: str):
        super().__init__(message)
        self.step, self.name = step, name


@dataclass
class TrainContext:
    """What callbacks see; the loop updates it in place (see the module docstring)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    records: RecordWriter
    out_dir: Path
    device: torch.device
    config: dict
    steps: int
    start_step: int = 0
    step: int = 0
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: str = "running"
    error: BaseException | None = None
    last_checkpoint: Path | None = None
    rank: int = 0  # torch.distributed rank; only rank 0 writes files
    world_size: int = 1
    extra: dict = field(default_factory=dict)  # free space for callbacks to share values

    def __repr__(self) -> str:
        return (f"TrainContext(step={self.step}, steps={self.steps}, start_step={self.start_step}, state={self.state!r}, "
                f"model={type(self.model).__name__}, optimizer={type(self.optimizer).__name__}, out_dir={str(self.out_dir)!r})")


# ---------------------------------------------------------------------------------------------------
# distributed runs
def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _DiscardedStream:
    """A record stream of a rank that does not write (see "Distributed runs"): rows are dropped."""

    def __init__(self, name: str, columns: Sequence[str]):
        self.name, self.columns, self.width = name, list(columns), len(columns)

    def append(self, row_or_rows: Any) -> int:
        return 0

    def rows(self) -> int:
        return 0

    def flush(self, fsync: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _DiscardedRecords:
    """``ctx.records`` of a rank that does not write: the :class:`RecordWriter` calls, no files."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._streams: dict[str, _DiscardedStream] = {}

    def stream(self, name: str, columns: Sequence[str], description: str = "", meta: dict | None = None):
        return self._streams.setdefault(name, _DiscardedStream(name, columns))

    def __getitem__(self, name: str) -> _DiscardedStream:
        return self._streams[name]

    def __contains__(self, name: str) -> bool:
        return name in self._streams

    @property
    def streams(self) -> dict[str, _DiscardedStream]:
        return dict(self._streams)

    def flush(self, fsync: bool = True) -> None:
        pass

    def truncate_to_step(self, step: float) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# losses, finiteness, summary file
def _loss_fn(loss: str | Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return F.cross_entropy
    if loss == "mse":
        def mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(logits, F.one_hot(y, logits.shape[-1]).to(logits.dtype))
        return mse
    raise SymtoolsError(f"unknown loss {loss!r}: use 'cross_entropy', 'mse' or a callable loss(logits, y)")


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    out = [("parameter", n, p) for n, p in model.named_parameters()]
    out += [("buffer", n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return out


def _first_nonfinite(tensors: Sequence[tuple[str, str, torch.Tensor]]) -> tuple[str, str, str] | None:
    """The first tensor with a nan/inf: ``(kind, name, "k nan, m inf of N")``; one device sync when all are finite."""
    if not tensors:
        return None
    with torch.no_grad():
        sums = torch.stack([t.detach().sum(dtype=torch.float64) for _, _, t in tensors])
        if bool(torch.isfinite(sums).all()):
            return None
        for kind, name, t in tensors:  # the fast check can only flag; find the culprit exactly
            if not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                return kind, name, f"{n_nan} nan, {n_inf} inf of {t.numel()}"
    return None  # float64 sums overflowed but every value is finite


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, default=_json_default, allow_nan=True)
        fh.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# train(): the run as a sequence of named steps
def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike,
    checkpoint_every: int | None = None,
    callbacks: Sequence[Any] = (),
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    progress: bool | None = True,
    resume: bool = False,
    overwrite: bool = False,
    scheduler: Any = None,
    config: dict | None = None,
) -> dict:
    """Train ``model`` for ``steps`` optimizer updates; return the summary (also in ``out_dir/summary.json``).

    ``optimizer``: any ``torch.optim`` optimizer built on ``model.parameters()`` (the model is moved to
    ``device`` in place, so the optimizer keeps its parameters). ``batches``: an endless
    :class:`~symtools.data.BatchStream` (resumes by position: ``batches.iter_from(step)``), or any
    re-iterable of ``(x, y)`` (on resume its first ``step`` batches are skipped). Inputs are moved to
    ``device`` and cast to the model's floating dtype. ``checkpoint_every``: stride in steps
    (``None``/0: only step 0 and the end). ``loss``: ``"cross_entropy"``, ``"mse"`` (on one-hot targets) or
    ``loss(logits, y)``. ``progress``: ``True`` = live bar on a TTY, a line every ~10 % otherwise;
    ``None`` = bar on a TTY only; ``False`` = silent. ``resume``: continue from the latest checkpoint in
    ``out_dir`` (model, optimizer, scheduler, RNG, batch position, records truncated to that step;
    hyper-parameters come from the checkpoint's optimizer state); without a checkpoint it starts afresh.
    ``overwrite``: replace a run already in ``out_dir`` (its ``step_*.pt`` checkpoints are removed and its
    record streams emptied; nothing else there is touched); without it such a folder is refused.
    ``scheduler``: optional LR scheduler, stepped once after every update. ``config``: extra plain
    values stored in checkpoints and the summary (e.g. the command line).
    """
    stride = _checked_counts(steps, checkpoint_every)
    device = _checked_device(device)
    loss_fn = _loss_fn(loss)
    hooks = _Hooks(callbacks)
    folder = _claim_run_folder(Path(out_dir), resume=resume, overwrite=overwrite)
    model.to(device)
    run_config = _run_config(model, optimizer, scheduler, batches, steps, stride, device, loss, config)
    ctx = _new_context(model, optimizer, scheduler, loss_fn, folder, device, run_config, steps)
    elapsed_before = _restore_or_reset(ctx, folder, resume=resume, steps=steps)
    train_stream = ctx.records.stream("train", TRAIN_COLUMNS, TRAIN_DESCRIPTION)
    batch_iter = _batches_from(batches, ctx.start_step)
    progress_bar = Progress(progress if folder.rank == 0 else False, ctx.start_step, steps, hooks.callbacks)
    stats = _RunningStats.resumed(folder.records, ctx.start_step)
    run = _TrainingRun(ctx, hooks, folder, stride, train_stream, progress_bar, stats, _Clock(elapsed_before))
    with SigintDeferral(progress_bar) as sigint:
        return run.run(batch_iter, sigint)


def _checked_counts(steps: int, checkpoint_every: int | None) -> int:
    """Refuse a negative or non-integer ``steps`` / ``checkpoint_every``; hand on the checkpoint stride (0: none)."""
    if not isinstance(steps, int) or steps < 0:
        raise SymtoolsError(f"steps must be a non-negative integer, got {steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 0):
        raise SymtoolsError(f"checkpoint_every must be a non-negative integer, got {checkpoint_every!r}")
    return checkpoint_every or 0


def _checked_device(device: str | torch.device) -> torch.device:
    """The :class:`torch.device`; refuses CUDA where it is not available."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SymtoolsError("device 'cuda' requested but CUDA is not available here: use device 'cpu'")
    return device


class _Hooks:
    """The callbacks' methods by hook name (module docstring, "Callback protocol"): checked and looked up once,
    called in the callbacks' order."""

    def __init__(self, callbacks: Sequence[Any]):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not any(callable(getattr(cb, h, None)) for h in HOOKS):
                raise SymtoolsError(f"callback {cb!r} has none of the methods {', '.join(HOOKS)}")
        self.by_name = {h: [getattr(cb, h) for cb in self.callbacks if callable(getattr(cb, h, None))] for h in HOOKS}
        self.on_end = [(type(cb).__name__, cb.on_end) for cb in self.callbacks if callable(getattr(cb, "on_end", None))]

    def call(self, name: str, ctx: TrainContext) -> None:
        """Every callback's ``name`` hook with ``ctx``."""
        for fn in self.by_name[name]:
            fn(ctx)

    def end(self, ctx: TrainContext, summary: dict, error: BaseException | None) -> None:
        """Every ``on_end``; what they return is merged into ``summary`` (a key clashing with the loop's own as
        ``"<CallbackClass>.<key>"``). When the run already failed (``error``), a failing ``on_end`` is listed
        under ``callback_errors`` and the others still run; otherwise its exception propagates."""
        reserved = set(summary)
        problems = []
        for owner, fn in self.on_end:
            try:
                extra = fn(ctx)
            except Exception as exc:  # keep the other callbacks' flushes and the summary
                if error is None:
                    raise
                problems.append(f"{owner}.on_end failed: {exc!r}")
                continue
            for k, v in (extra or {}).items():
                summary[f"{owner}.{k}" if k in reserved else k] = v
        if problems:
            summary["callback_errors"] = problems


@dataclass
class _RunFolder:
    """The run folder as :func:`_claim_run_folder` found it, and who writes to it."""

    path: Path
    records: Path  # path / "records"
    existing: list[tuple[int, Path]]  # the checkpoints found there, by step
    replace: bool  # a run was there and is being replaced (overwrite=True)
    rank: int  # torch.distributed rank (0 when not distributed); only rank 0 writes
    world: int


def _claim_run_folder(out_dir: Path, *, resume: bool, overwrite: bool) -> _RunFolder:
    """Look at ``out_dir`` (every rank) and refuse a file, or a folder holding a run unless ``resume`` or
    ``overwrite``; then rank 0 creates the folder and deletes a replaced run's checkpoints (its records are
    emptied later, by :func:`_restore_or_reset`). Hands on what was found."""
    rank, world = _rank_and_world()
    existing = list_checkpoints(out_dir)
    records_dir = out_dir / "records"
    if out_dir.exists() and not out_dir.is_dir():
        raise SymtoolsError(f"{out_dir} is a file, not a folder: give a new folder for the run")
    replace = not resume and bool(existing or any(p.stat().st_size for p in records_dir.glob("*.f64")))
    if replace and not overwrite:
        raise SymtoolsError(f"{out_dir} already holds a run: resume it (resume=True / --resume), replace it "
                            f"(overwrite=True / --force) or choose a new directory")
    if world > 1:  # every rank has looked at out_dir before rank 0 writes to it
        torch.distributed.barrier()
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SymtoolsError(f"cannot create the run folder {out_dir}: {exc.strerror}") from None
        if replace:  # only what a run consists of: its checkpoints here, its records below
            for _, old in existing:
                old.unlink()
    return _RunFolder(out_dir, records_dir, existing, replace, rank, world)


def _run_config(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batches: Any, steps: int,
                stride: int, device: torch.device, loss: str | Callable, config: dict | None) -> dict:
    """The plain values stored in every checkpoint and the summary: the loop's settings, the classes, the data's
    ``config``, the torch version, then the caller's ``config`` (which wins on a clash)."""
    return plain_config({
        "steps": steps, "checkpoint_every": stride, "device": str(device),
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss)),
        "model_class": type(_unwrap(model)).__name__, "optimizer_class": type(optimizer).__name__,
        "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
        "data": getattr(batches, "config", None), "torch": torch.__version__,
        **(config or {}),
    })


def _new_context(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: Callable,
                 folder: _RunFolder, device: torch.device, run_config: dict, steps: int) -> TrainContext:
    """The context callbacks see, with the run's record writer (one that discards rows on ranks other than 0)."""
    records = RecordWriter(folder.records) if folder.rank == 0 else _DiscardedRecords(folder.records)
    return TrainContext(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, records=records,
                        out_dir=folder.path, device=device, config=run_config, steps=steps, rank=folder.rank,
                        world_size=folder.world)


def _restore_or_reset(ctx: TrainContext, folder: _RunFolder, *, resume: bool, steps: int) -> float:
    """Resume from the latest checkpoint (model, optimizer, scheduler, RNG; records truncated to its step), or
    empty the records of a run being replaced or resumed without a checkpoint. Sets ``ctx.start_step`` and
    ``ctx.step``; hands on the seconds the run had already taken. The records are closed if this fails."""
    start_step, elapsed_before = 0, 0.0
    try:
        if resume and folder.existing:
            start_step, elapsed_before = restore_checkpoint(ctx, folder.existing[-1], steps)
            ctx.records.truncate_to_step(start_step)
        elif resume or folder.replace:
            ctx.records.truncate_to_step(-math.inf)
    except BaseException:
        ctx.records.close()
        raise
    ctx.start_step = ctx.step = start_step
    return elapsed_before


def _batches_from(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], start_step: int) -> Iterator:
    """The batch stream from batch ``start_step`` on: by position for a BatchStream, else by skipping."""
    if hasattr(batches, "iter_from"):
        return iter(batches.iter_from(start_step))
    return itertools.islice(iter(batches), start_step, None)


class _RunningStats:
    """The last update's loss and accuracy and their means over the last ``RUNNING_WINDOW`` updates."""

    def __init__(self) -> None:
        self.window_loss: collections.deque = collections.deque(maxlen=RUNNING_WINDOW)
        self.window_acc: collections.deque = collections.deque(maxlen=RUNNING_WINDOW)
        self.last = {"loss": math.nan, "accuracy": math.nan}

    @classmethod
    def resumed(cls, records_dir: Path, start_step: int) -> "_RunningStats":
        """Empty for a new run; a resumed run's figures are refilled from its ``train`` stream up to ``start_step``
        (so its summary covers the steps before it too)."""
        stats = cls()
        if start_step > 0:
            rows = read_stream(records_dir, "train")[1]
            for row in rows[rows[:, 0] <= start_step][-RUNNING_WINDOW:]:  # rank 0 may not have truncated yet
                stats.add(float(row[1]), float(row[2]))
        return stats

    def add(self, loss_v: float, acc: float) -> None:
        self.last.update(loss=loss_v, accuracy=acc)
        self.window_loss.append(loss_v)
        self.window_acc.append(acc)

    def means(self) -> tuple[float, float]:
        """(running loss, running accuracy); at least one update has been added."""
        return sum(self.window_loss) / len(self.window_loss), sum(self.window_acc) / len(self.window_acc)

    def summary(self) -> dict:
        """The summary's ``final_*``, ``running_*`` and ``running_window`` entries (nan before any update)."""
        wl, wa = self.window_loss, self.window_acc
        return {"final_loss": self.last["loss"], "final_accuracy": self.last["accuracy"],
                "running_loss": sum(wl) / len(wl) if wl else math.nan,
                "running_accuracy": sum(wa) / len(wa) if wa else math.nan,
                "running_window": len(wl)}


class _Clock:
    """Seconds of this call (``wall``) and of the whole run, earlier segments included (``elapsed``)."""

    def __init__(self, elapsed_before: float):
        self.elapsed_before = elapsed_before
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def wall(self) -> float:
        return time.perf_counter() - self.t0


class _TrainingRun:
    """Runs the updates of one :func:`train` call and closes the run however it ends.

    Keeps its own references to the model, optimizer, scheduler, loss and records (what callbacks do to ``ctx``
    does not redirect the loop) and where the loop is: ``completed`` (the last finished update) and ``phase``
    ("data", "forward", "update", "after" or "boundary": whether a Ctrl-C came between updates, so that the last
    completed step can be checkpointed)."""

    def __init__(self, ctx: TrainContext, hooks: _Hooks, folder: _RunFolder, stride: int, train_stream: Any,
                 progress: Progress, stats: _RunningStats, clock: _Clock):
        self.ctx, self.hooks, self.folder, self.stride = ctx, hooks, folder, stride
        self.train_stream, self.progress, self.stats, self.clock = train_stream, progress, stats, clock
        self.model, self.optimizer, self.scheduler, self.loss_fn = ctx.model, ctx.optimizer, ctx.scheduler, ctx.loss_fn
        self.records, self.device, self.config = ctx.records, ctx.device, ctx.config
        self.steps, self.start_step = ctx.steps, ctx.start_step
        self.input_dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        self.completed = ctx.start_step
        self.phase = "boundary"
        self.stop = False  # distributed runs: some rank was asked to stop (reduced with the loss each update)

    def run(self, batch_iter: Iterator, sigint: SigintDeferral) -> dict:
        """``on_start``, the checkpoint of step 0, every update, then the summary. On an exception the run is
        closed as "failed" or "interrupted" (summary, ``on_end``) and the exception re-raised; the records are
        closed in every case."""
        try:
            self.hooks.call("on_start", self.ctx)
            if self.start_step == 0:
                self.checkpoint(0)
            for step in range(self.start_step + 1, self.steps + 1):
                self.update(step, batch_iter, sigint)
            return self.finish("completed", None)
        except TrainingDiverged as exc:
            exc.args = (f"{exc.args[0]}; records kept in {self.folder.records}"
                        + (f", last checkpoint {self.ctx.last_checkpoint.name}" if self.ctx.last_checkpoint else ""),)
            self.finish("failed", exc)
            raise
        except KeyboardInterrupt as exc:
            self._checkpoint_interrupted()
            self.finish("interrupted", exc)
            raise
        except BaseException as exc:
            self.finish("failed", exc)
            raise
        finally:
            self.records.close()

    def update(self, step: int, batch_iter: Iterator, sigint: SigintDeferral) -> None:
        """Update ``step`` with the hooks around ``optimizer.step()``, then its row, progress and checkpoint;
        raises :class:`TrainingDiverged` on a non-finite loss or weight, ``KeyboardInterrupt`` after the update
        when a stop was asked."""
        ctx = self.ctx
        self.phase = "data"
        x, y = self._next_batch(step, batch_iter)
        ctx.step, ctx.batch = step, (x, y)
        self.phase = "forward"
        loss_t, logits = self._forward_backward(x, y)
        loss_v, acc = self._logged_figures(loss_t, logits, y, sigint)
        if not math.isfinite(loss_v):
            _raise_bad_loss(self.model, x, step, loss_v)
        ctx.loss, ctx.logits = loss_t.detach(), logits.detach()
        self.hooks.call("before_step", ctx)
        lr = float(self.optimizer.param_groups[0].get("lr", math.nan))
        self.phase = "update"
        self.optimizer.step()
        self.phase = "after"
        _raise_if_diverged(self.model, step)
        self.hooks.call("after_step", ctx)
        if self.scheduler is not None:
            self.scheduler.step()
        self._close_update(step, loss_v, acc, lr)
        if (self.stop if self.folder.world > 1 else sigint.requested):
            raise KeyboardInterrupt

    def _next_batch(self, step: int, batch_iter: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` on the device, floating inputs cast to the parameters' dtype."""
        try:
            x, y = next(batch_iter)
        except StopIteration:
            raise SymtoolsError(
                f"the batches ran out before step {step}: pass an endless stream (symtools.data.make_loader) "
                "or fewer steps") from None
        if self.input_dtype is not None and x.is_floating_point():
            x = x.to(device=self.device, dtype=self.input_dtype)
        else:
            x = x.to(self.device)
        y = y.to(self.device)
        return x, y

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward in train mode and backward; hands on the loss and the logits (``p.grad`` holds the gradient)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss_t = self.loss_fn(logits, y)
        loss_t.backward()
        return loss_t, logits

    def _logged_figures(self, loss_t: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                        sigint: SigintDeferral) -> tuple[float, float]:
        """The loss and accuracy logged for this update (nan accuracy unless logits are (N, C, …) with classes on
        axis 1 and ``y`` class indices (N, …): a language model's per-token accuracy). In a distributed run both
        are averaged over the ranks, and ``self.stop`` says whether any rank was asked to stop."""
        loss_v = float(loss_t.detach())
        if logits.ndim >= 2 and y.ndim == logits.ndim - 1 and not y.is_floating_point():
            acc = float((logits.detach().argmax(dim=1) == y).to(torch.float64).mean())
        else:
            acc = math.nan
        if self.folder.world > 1:  # every rank logs the same mean and stops after the same update
            loss_v, acc, self.stop = _mean_over_ranks(loss_v, acc, sigint.requested, self.device)
        return loss_v, acc

    def _close_update(self, step: int, loss_v: float, acc: float, lr: float) -> None:
        """The update's ``train`` row (records flushed without fsync), the running figures and the progress bar;
        then the checkpoint when one is due (every ``stride`` steps and at the last step)."""
        self.stats.add(loss_v, acc)
        self.train_stream.append([step, loss_v, acc, lr, self.clock.elapsed()])
        self.records.flush(fsync=False)
        self.completed = step
        self.phase = "boundary"
        self.progress.update(step, *self.stats.means())
        if step == self.steps or (self.stride and step % self.stride == 0):
            self.checkpoint(step)

    def checkpoint(self, step: int) -> None:
        """Rank 0: flush the records (fsync), write the checkpoint of ``step``, call ``on_checkpoint``."""
        if self.folder.rank != 0:
            return
        self.records.flush(fsync=True)
        save_checkpoint(self.ctx, step, self.clock.elapsed())
        self.hooks.call("on_checkpoint", self.ctx)

    def _checkpoint_interrupted(self) -> None:
        """After a Ctrl-C between updates: checkpoint the last completed step unless that was just written;
        inside an update: say that no checkpoint of it is written."""
        last = self.ctx.last_checkpoint
        if self.phase == "boundary" and (last is None or last != checkpoint_path(self.folder.path, self.completed)):
            self.checkpoint(self.completed)
        elif self.phase != "boundary":
            self.progress.note(f"symtools: interrupted inside step {self.completed + 1}; no checkpoint of it written "
                               f"(last: {last.name if last else 'none'})")

    def finish(self, state: str, error: BaseException | None) -> dict:
        """Close the run as ``state`` ("completed" | "interrupted" | "failed"): progress bar, summary with what
        ``on_end`` returns, records flushed (fsync), ``summary.json`` on rank 0. Hands on the summary."""
        self.ctx.state, self.ctx.error = state, error
        self.progress.close()
        summary = self._summary(state, error)
        self.hooks.end(self.ctx, summary, error)
        summary["records"] = sorted(self.records.streams)
        self.records.flush(fsync=True)
        if self.folder.rank == 0:
            _write_json(self.folder.path / "summary.json", summary)
        return summary

    def _summary(self, state: str, error: BaseException | None) -> dict:
        """The loop's own summary entries (module docstring, "Run directory")."""
        last = self.ctx.last_checkpoint
        return {
            "status": state, "steps": self.completed, "target_steps": self.steps, "start_step": self.start_step,
            **self.stats.summary(),
            "wall_time_s": self.clock.wall(), "total_time_s": self.clock.elapsed(),
            "checkpoints": [p.name for _, p in list_checkpoints(self.folder.path)],
            "last_checkpoint": last.name if last else None,
            "error": str(error) if error is not None and state == "failed" else None,
            "config": self.config,
        }


def _raise_if_diverged(model: torch.nn.Module, step: int) -> None:
    """After ``optimizer.step()``: :class:`TrainingDiverged` naming the first non-finite parameter or buffer."""
    bad = _first_nonfinite(_named_tensors(_unwrap(model)))
    if bad is not None:
        kind, name, what = bad
        raise TrainingDiverged(f"{kind} {name!r} is not finite after step {step} ({what})", step=step, name=name)


def _mean_over_ranks(loss_v: float, acc: float, stop: bool, device: torch.device) -> tuple[float, float, bool]:
    """(mean loss, mean accuracy, any rank asked to stop) over the ranks of the default process group."""
    t = torch.tensor([loss_v, acc, float(stop)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return float(t[0]) / world, float(t[1]) / world, bool(t[2] > 0)


def _raise_bad_loss(model: torch.nn.Module, x: torch.Tensor, step: int, loss_v: float) -> None:
    bad = _first_nonfinite(_named_tensors(model))
    if bad is not None:
        kind, name, what = bad
        raise TrainingDiverged(f"{kind} {name!r} is not finite at the start of step {step} ({what}); loss {loss_v}",
                               step=step, name=name)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise TrainingDiverged(f"the input batch of step {step} holds nan/inf values (loss {loss_v})", step=step, name="input")
    grads = [("gradient of", n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    badg = _first_nonfinite(grads)
    hint = f"; first non-finite gradient: {badg[1]!r} ({badg[2]})" if badg else ""
    raise TrainingDiverged(f"loss is {loss_v} at step {step}{hint}", step=step, name="loss")
