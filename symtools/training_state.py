"""What a training run keeps on disk to be resumed: checkpoint files, the RNG state, the run's config.

:mod:`symtools.training` writes and reads these; its module docstring ("Run directory") states the checkpoint
format. ``train``'s context (:class:`~symtools.training.TrainContext`) is passed in by the loop; this module
reads ``model``, ``optimizer``, ``scheduler``, ``device``, ``config`` and ``out_dir`` from it and sets
``last_checkpoint``, and never imports the loop.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any

import torch

from symtools.checkpoints import load_checkpoint_file
from symtools.checkpoints import unwrap_model as _unwrap
from symtools.errors import SymtoolsError

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_path", "list_checkpoints", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "restore_checkpoint", "plain_config"]

CHECKPOINT_FORMAT = "symtools-checkpoint"
_CKPT = re.compile(r"^step_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------------------
# where checkpoints live
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


# ---------------------------------------------------------------------------------------------------
# values a weights-only load accepts
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


def plain_config(obj: Any, where: str = "config") -> Any:
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
        return {str(k): plain_config(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_config(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise SymtoolsError(f"{where} holds a {type(obj).__name__}; checkpoint configs take numbers, strings, lists and dicts")


# ---------------------------------------------------------------------------------------------------
# random number generators
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


# ---------------------------------------------------------------------------------------------------
# writing and restoring
def save_checkpoint(ctx: Any, step: int, elapsed: float) -> Path:
    """Write ``checkpoint_path(ctx.out_dir, step)`` atomically (a ``.tmp`` file, fsync, rename); set and return
    ``ctx.last_checkpoint``."""
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


def restore_checkpoint(ctx: Any, latest: tuple[int, Path], steps: int) -> tuple[int, float]:
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
