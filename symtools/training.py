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
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from symtools.checkpoints import load_checkpoint_file
from symtools.checkpoints import unwrap_model as _unwrap
from symtools.errors import SymtoolsError
from symtools.numeric.records import RecordWriter, read_stream

__all__ = [
    "train", "TrainContext", "TrainingDiverged", "CHECKPOINT_FORMAT",
    "list_checkpoints", "latest_checkpoint", "load_checkpoint", "checkpoint_path",
]

CHECKPOINT_FORMAT = "symtools-checkpoint"
_CKPT = re.compile(r"^step_(\d+)\.pt$")
HOOKS = ("on_start", "before_step", "after_step", "on_checkpoint", "on_end", "status")
TRAIN_COLUMNS = ["step", "loss", "accuracy", "lr", "time_s"]
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
# checkpoints
def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of ``out_dir/checkpoints/step_*.pt``, by step."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint of this module as the dict it was saved as (read by the one safe loader,
    :func:`symtools.checkpoints.load_checkpoint_file`: weights only, CRC and nan/inf checked)."""
    ckpt = load_checkpoint_file(path)
    if ckpt.kind != CHECKPOINT_FORMAT:
        raise SymtoolsError(f"{path} is not a symtools training checkpoint (no 'format': '{CHECKPOINT_FORMAT}' "
                            f"entry); resume needs the run's own checkpoints/step_NNNNNN.pt")
    return ckpt.raw


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, collections.OrderedDict):  # a state_dict: keep its _metadata (module versions)
        out = collections.OrderedDict((k, _cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu(v) for v in obj)
    return obj


def _plain(obj: Any, where: str = "config") -> Any:
    """Coerce a config value to types ``torch.load(weights_only=True)`` and JSON both accept."""
    if obj is None:
        return obj
    for kind in (bool, int, float, str):  # exact builtin types (torch.__version__ is a str subclass)
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise SymtoolsError(f"{where} holds a {type(obj).__name__}; checkpoint configs take numbers, strings, lists and dicts")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(ctx: TrainContext, step: int, elapsed: float) -> Path:
    state = {
        "format": CHECKPOINT_FORMAT, "version": 1, "step": int(step),
        "model": _cpu(_unwrap(ctx.model).state_dict()),
        "optimizer": _cpu(ctx.optimizer.state_dict()),
        "rng": _rng_state(ctx.device),
        "elapsed_s": float(elapsed),
        "config": ctx.config,
    }
    if ctx.scheduler is not None:
        state["scheduler"] = _cpu(ctx.scheduler.state_dict())
    path = checkpoint_path(ctx.out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    ctx.last_checkpoint = path
    return path


# ---------------------------------------------------------------------------------------------------
# losses, finiteness, progress
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


class _Progress:
    """stderr progress: a live bar on a TTY; with ``mode=True`` and no TTY, a line every ~10 %."""

    def __init__(self, mode: bool | None, start: int, total: int, callbacks: Sequence[Any]):
        self.stream = sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = mode is not False and tty
        self.lines = mode is True and not tty
        self.start, self.total = start, total
        self.every = max(1, math.ceil(total / 10))
        self.next_line = (start // self.every + 1) * self.every
        self.status = [cb.status for cb in callbacks if callable(getattr(cb, "status", None))]
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.width = 0

    def text(self, step: int, loss: float, acc: float) -> str:
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"step {step}/{self.total} {pct:3.0f}%", f"loss {loss:.4g}"]
        if not math.isnan(acc):
            parts.append(f"acc {100 * acc:.1f}%")
        for fn in self.status:
            for k, v in (fn() or {}).items():
                parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
        dt = time.perf_counter() - self.t0
        if step > self.start and dt > 0:
            parts.append(f"{(step - self.start) / dt:.2f} step/s")
        return " | ".join(parts)

    def update(self, step: int, loss: float, acc: float) -> None:
        if self.live:
            now = time.perf_counter()
            if now - self.last_draw >= 0.1 or step == self.total:
                line = self.text(step, loss, acc)
                self.stream.write("\r" + line.ljust(self.width))
                self.stream.flush()
                self.width, self.last_draw = len(line), now
        elif self.lines and (step >= self.next_line or step == self.total):
            self.stream.write(self.text(step, loss, acc) + "\n")
            self.stream.flush()
            while self.next_line <= step:
                self.next_line += self.every

    def note(self, message: str) -> None:
        if self.live and self.width:
            self.stream.write("\n")
            self.width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


class _SigintDeferral:
    """While active (main thread only), the first Ctrl-C sets a flag checked between updates; a second one aborts."""

    def __init__(self, progress: _Progress):
        self.requested = False
        self.progress = progress
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> "_SigintDeferral":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self.previous = signal.signal(signal.SIGINT, self._handle)
                self.installed = True
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                self.installed = False
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous if callable(self.previous) else signal.default_int_handler)
        self.progress.note("symtools: interrupt: stopping after this step (Ctrl-C again to abort at once)")

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


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
    if not isinstance(steps, int) or steps < 0:
        raise SymtoolsError(f"steps must be a non-negative integer, got {steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 0):
        raise SymtoolsError(f"checkpoint_every must be a non-negative integer, got {checkpoint_every!r}")
    stride = checkpoint_every or 0
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SymtoolsError("device 'cuda' requested but CUDA is not available here: use device 'cpu'")
    loss_fn = _loss_fn(loss)
    callbacks = list(callbacks)
    for cb in callbacks:
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise SymtoolsError(f"callback {cb!r} has none of the methods {', '.join(HOOKS)}")
    hooks = {h: [getattr(cb, h) for cb in callbacks if callable(getattr(cb, h, None))] for h in HOOKS}
    end_hooks = [(type(cb).__name__, cb.on_end) for cb in callbacks if callable(getattr(cb, "on_end", None))]

    out_dir = Path(out_dir)
    rank, world = _rank_and_world()
    existing = list_checkpoints(out_dir)
    records_dir = out_dir / "records"
    if out_dir.exists() and not out_dir.is_dir():
        raise SymtoolsError(f"{out_dir} is a file, not a folder: give a new folder for the run")
    replace = not resume and (existing or any(p.stat().st_size for p in records_dir.glob("*.f64")))
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

    model.to(device)
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    run_config = _plain({
        "steps": steps, "checkpoint_every": stride, "device": str(device),
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss)),
        "model_class": type(_unwrap(model)).__name__, "optimizer_class": type(optimizer).__name__,
        "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
        "data": getattr(batches, "config", None), "torch": torch.__version__,
        **(config or {}),
    })

    records = RecordWriter(records_dir) if rank == 0 else _DiscardedRecords(records_dir)
    ctx = TrainContext(model=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, records=records,
                       out_dir=out_dir, device=device, config=run_config, steps=steps, rank=rank, world_size=world)
    start_step, elapsed_before = 0, 0.0
    try:
        if resume and existing:
            start_step, elapsed_before = _resume(ctx, existing[-1], steps)
            records.truncate_to_step(start_step)
        elif resume or replace:
            records.truncate_to_step(-math.inf)
    except BaseException:
        records.close()
        raise
    ctx.start_step = ctx.step = start_step
    train_stream = records.stream(
        "train", TRAIN_COLUMNS,
        "one row per update: step n, loss and accuracy of the minibatch of update n (at the weights before it), "
        "learning rate of param group 0 used by update n, seconds since the run began (all segments)")

    if hasattr(batches, "iter_from"):
        batch_iter = iter(batches.iter_from(start_step))
    else:
        batch_iter = itertools.islice(iter(batches), start_step, None)

    progress_bar = _Progress(progress if rank == 0 else False, start_step, steps, callbacks)
    window_loss: collections.deque = collections.deque(maxlen=RUNNING_WINDOW)
    window_acc: collections.deque = collections.deque(maxlen=RUNNING_WINDOW)
    last = {"loss": math.nan, "accuracy": math.nan}
    if start_step > 0:  # a resumed run's summary covers the steps before it too
        rows = read_stream(records_dir, "train")[1]
        for row in rows[rows[:, 0] <= start_step][-RUNNING_WINDOW:]:  # rank 0 may not have truncated yet
            window_loss.append(float(row[1]))
            window_acc.append(float(row[2]))
            last.update(loss=float(row[1]), accuracy=float(row[2]))
    t0 = time.perf_counter()
    completed = start_step
    phase = "boundary"
    stop = False  # distributed runs: some rank was asked to stop (reduced with the loss each update)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        records.flush(fsync=True)
        _save_checkpoint(ctx, step, elapsed())
        for fn in hooks["on_checkpoint"]:
            fn(ctx)

    def finish(state: str, error: BaseException | None) -> dict:
        ctx.state, ctx.error = state, error
        progress_bar.close()
        summary: dict[str, Any] = {
            "status": state, "steps": completed, "target_steps": steps, "start_step": start_step,
            "final_loss": last["loss"], "final_accuracy": last["accuracy"],
            "running_loss": sum(window_loss) / len(window_loss) if window_loss else math.nan,
            "running_accuracy": sum(window_acc) / len(window_acc) if window_acc else math.nan,
            "running_window": len(window_loss),
            "wall_time_s": time.perf_counter() - t0, "total_time_s": elapsed(),
            "checkpoints": [p.name for _, p in list_checkpoints(out_dir)],
            "last_checkpoint": ctx.last_checkpoint.name if ctx.last_checkpoint else None,
            "error": str(error) if error is not None and state == "failed" else None,
            "config": run_config,
        }
        reserved = set(summary)
        problems = []
        for owner, fn in end_hooks:
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
        summary["records"] = sorted(records.streams)
        records.flush(fsync=True)
        if rank == 0:
            _write_json(out_dir / "summary.json", summary)
        return summary

    with _SigintDeferral(progress_bar) as sigint:
        try:
            for fn in hooks["on_start"]:
                fn(ctx)
            if start_step == 0:
                checkpoint(0)
            for step in range(start_step + 1, steps + 1):
                phase = "data"
                try:
                    x, y = next(batch_iter)
                except StopIteration:
                    raise SymtoolsError(
                        f"the batches ran out before step {step}: pass an endless stream (symtools.data.make_loader) "
                        "or fewer steps") from None
                if param_dtype is not None and x.is_floating_point():
                    x = x.to(device=device, dtype=param_dtype)
                else:
                    x = x.to(device)
                y = y.to(device)
                ctx.step, ctx.batch = step, (x, y)
                phase = "forward"
                model.train()
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss_t = loss_fn(logits, y)
                loss_t.backward()
                loss_v = float(loss_t.detach())
                if logits.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
                    acc = float((logits.detach().argmax(dim=1) == y).to(torch.float64).mean())
                else:
                    acc = math.nan
                if world > 1:  # every rank logs the same mean and stops after the same update
                    loss_v, acc, stop = _mean_over_ranks(loss_v, acc, sigint.requested, device)
                if not math.isfinite(loss_v):
                    _raise_bad_loss(model, x, step, loss_v)
                ctx.loss, ctx.logits = loss_t.detach(), logits.detach()
                for fn in hooks["before_step"]:
                    fn(ctx)
                lr = float(optimizer.param_groups[0].get("lr", math.nan))
                phase = "update"
                optimizer.step()
                phase = "after"
                bad = _first_nonfinite(_named_tensors(_unwrap(model)))
                if bad is not None:
                    kind, name, what = bad
                    raise TrainingDiverged(f"{kind} {name!r} is not finite after step {step} ({what})",
                                           step=step, name=name)
                for fn in hooks["after_step"]:
                    fn(ctx)
                if scheduler is not None:
                    scheduler.step()
                last.update(loss=loss_v, accuracy=acc)
                window_loss.append(loss_v)
                window_acc.append(acc)
                train_stream.append([step, loss_v, acc, lr, elapsed()])
                records.flush(fsync=False)
                completed = step
                phase = "boundary"
                progress_bar.update(step, sum(window_loss) / len(window_loss), sum(window_acc) / len(window_acc))
                if step == steps or (stride and step % stride == 0):
                    checkpoint(step)
                if (stop if world > 1 else sigint.requested):
                    raise KeyboardInterrupt
            return finish("completed", None)
        except TrainingDiverged as exc:
            exc.args = (f"{exc.args[0]}; records kept in {records_dir}"
                        + (f", last checkpoint {ctx.last_checkpoint.name}" if ctx.last_checkpoint else ""),)
            finish("failed", exc)
            raise
        except KeyboardInterrupt as exc:
            if phase == "boundary" and (ctx.last_checkpoint is None or ctx.last_checkpoint != checkpoint_path(out_dir, completed)):
                checkpoint(completed)
            elif phase != "boundary":
                progress_bar.note(f"symtools: interrupted inside step {completed + 1}; no checkpoint of it written "
                                  f"(last: {ctx.last_checkpoint.name if ctx.last_checkpoint else 'none'})")
            finish("interrupted", exc)
            raise
        except BaseException as exc:
            finish("failed", exc)
            raise
        finally:
            records.close()


def _mean_over_ranks(loss_v: float, acc: float, stop: bool, device: torch.device) -> tuple[float, float, bool]:
    """(mean loss, mean accuracy, any rank asked to stop) over the ranks of the default process group."""
    t = torch.tensor([loss_v, acc, float(stop)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return float(t[0]) / world, float(t[1]) / world, bool(t[2] > 0)


def _resume(ctx: TrainContext, latest: tuple[int, Path], steps: int) -> tuple[int, float]:
    """Load the latest checkpoint into the model, optimizer, scheduler and RNG; return ``(step, elapsed_s)``."""
    ckpt_step, ckpt_path = latest
    ckpt = load_checkpoint(ckpt_path)
    if int(ckpt.get("step", -1)) != ckpt_step:
        raise SymtoolsError(f"{ckpt_path} says step {ckpt.get('step')}, its name says {ckpt_step}")
    if ckpt_step > steps:
        raise SymtoolsError(f"the latest checkpoint of {ctx.out_dir} is at step {ckpt_step}, past steps={steps}")
    try:
        _unwrap(ctx.model).load_state_dict(ckpt["model"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        if ctx.scheduler is not None and "scheduler" in ckpt:
            ctx.scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SymtoolsError(f"cannot resume from {ckpt_path}: it does not fit this model/optimizer: {exc}") from None
    _set_rng_state(ckpt.get("rng", {}), ctx.device)
    ctx.last_checkpoint = ckpt_path
    return ckpt_step, float(ckpt.get("elapsed_s", 0.0))


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
