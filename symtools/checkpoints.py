"""The one checkpoint loader of symtools: every command reads weights through :func:`load_checkpoint_file`.

Nothing here runs code from the file. A ``.pt`` file is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only); a ``.safetensors`` file with ``safetensors``.
Before unpickling, a zip-format ``.pt`` has the CRC-32 of every member verified (``zipfile.testzip``):
``torch.load`` itself does not check them, so a flipped byte in tensor data would otherwise load silently.
Non-finite weights or optimizer state are refused (a diverged run).

Accepted layouts (after loading):

* a training checkpoint of :mod:`symtools.training` — ``{"format": "symtools-checkpoint", "model": state_dict,
  "optimizer": …, "step": n, "config": {…}, …}`` (keys exactly as the model names them);
* a plain ``state_dict``, also wrapped as ``{"state_dict": …}``, ``{"model_state_dict": …}`` or
  ``{"model": …}``, keys optionally prefixed by ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile);
* a safetensors file holding such a ``state_dict``.

Every failure is a :class:`~symtools.errors.SymtoolsError` (exit code 2 on the command line) with one
message that says what is wrong and, where it helps, what to do instead. Why one loader: ``train --resume``,
``check --weights`` and ``audit`` had three, with different safety and error guarantees.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from symtools.errors import SymtoolsError

__all__ = ["Checkpoint", "load_checkpoint_file", "nonfinite_entries", "unwrap_model", "RESAVE"]

RESAVE = ("re-save it where it was made, as tensors only: torch.save(model.state_dict(), 'weights.pt') or "
          "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper, else ``model`` itself.

    Only real wrappers are unwrapped: a model that merely has a child called ``module`` is its own model
    (its parameter names start with ``module.``; taking the child would drop its other parameters).
    """
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


@dataclass
class Checkpoint:
    """What was read from one file: the model's ``state_dict`` and, for training checkpoints, the rest."""

    path: str
    format: str                 # "torch" | "safetensors"
    kind: str                   # "symtools-checkpoint" | "state_dict"
    state_dict: dict[str, Tensor]
    optimizer: dict | None = None
    step: int | None = None
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)  # the whole mapping loaded (resume reads rng, scheduler)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (the arithmetic they were trained in, as far as the file says)."""
        for t in self.state_dict.values():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "kind": self.kind, "step": self.step,
                "dtype": str(self.dtype).replace("torch.", ""), "tensors": len(self.state_dict),
                "has_optimizer_state": self.optimizer is not None, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------------------------
# reading files


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= min(_SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{"


def _read_safetensors(path: str) -> tuple[dict[str, Tensor], dict]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a declared dependency
        raise SymtoolsError(f"{path} is a safetensors file but the safetensors package is not installed: "
                            f"pip install safetensors") from None
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = fh.read(n)
    import json

    try:
        spec = json.loads(header)
    except ValueError:
        raise SymtoolsError(f"{path} is corrupted: its safetensors header is not valid JSON") from None
    ends = [int(v["data_offsets"][1]) for k, v in spec.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    if 8 + n + max(ends, default=0) > size:
        raise SymtoolsError(f"{path} is truncated: its header describes {8 + n + max(ends, default=0):,} bytes, "
                            f"the file has {size:,}")
    try:
        out: dict[str, Tensor] = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as exc:  # SafetensorError and friends
        raise SymtoolsError(f"{path} is corrupted: safetensors cannot read it ({str(exc).splitlines()[0][:200]})") from None
    return out, dict(meta)


def _refusal(path: str, exc: Exception) -> SymtoolsError:
    text = str(exc)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    what = f" (it stores an object of {m.group(1)})" if m else ""
    return SymtoolsError(
        f"refusing to load {path}: unpickling it would need arbitrary code{what}, and symtools only loads weights "
        f"(torch.load(weights_only=True)) because a pickle can run anything; {RESAVE}")


def _read_torch(path: str, head: bytes) -> Any:
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except zipfile.BadZipFile:
            raise SymtoolsError(f"{path} is truncated or corrupted: it starts like a PyTorch zip checkpoint but has "
                                f"no readable zip directory (an interrupted save or copy?)") from None
        except (OSError, EOFError, RuntimeError) as exc:
            raise SymtoolsError(f"{path} is corrupted: {exc}") from None
        if bad is not None:
            raise SymtoolsError(f"{path} is corrupted: the CRC-32 of its member {bad!r} does not match its contents "
                                f"(damaged on disk or in transfer); re-copy or re-save it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            if re.search(r"GLOBAL|Unsupported|not an allowed global", text):
                raise _refusal(path, exc) from None
        raise SymtoolsError(f"{path} is corrupted or not a PyTorch checkpoint (unpickling failed: "
                            f"{text.splitlines()[0][:160]})") from None
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise SymtoolsError(f"{path} is truncated or corrupted: torch.load fails with: {first}") from None
    except (EOFError, ValueError, KeyError, IndexError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise SymtoolsError(f"{path} is corrupted or not a PyTorch checkpoint ({type(exc).__name__}: "
                            f"{str(exc)[:160]})") from None


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj) and \
        all(isinstance(v, Tensor) for v in obj.values())


def _strip_prefix(sd: dict[str, Tensor], notes: list[str]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            notes.append(f"stripped the key prefix {prefix!r} (DataParallel / torch.compile wrapper)")
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def nonfinite_entries(tensors: Mapping[str, Any], where: str = "") -> list[str]:
    """``["key: 2 nan, 0 inf of 64", …]`` for every floating tensor (nested in dicts/lists) with nan/inf."""
    out: list[str] = []

    def visit(obj: Any, name: str) -> None:
        if isinstance(obj, Tensor):
            if obj.is_floating_point() or obj.is_complex():
                if obj.is_floating_point() and obj.numel() and bool(torch.isfinite(obj.sum(dtype=torch.float64))):
                    return  # one pass; a nan/inf makes the float64 sum non-finite (the converse is checked below)
                if not bool(torch.isfinite(obj).all()):
                    out.append(f"{name}: {int(torch.isnan(obj).sum())} nan, {int(torch.isinf(obj).sum())} inf "
                               f"of {obj.numel()}")
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                visit(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{name}[{i}]")

    visit(tensors, where)
    return out


def load_checkpoint_file(path: str | os.PathLike) -> Checkpoint:
    """Read ``path`` safely (module docstring); refuse pickles that need code, truncated/corrupt files, nan/inf.

    The result's ``state_dict`` is the model's; ``optimizer``/``step``/``config`` are filled for training
    checkpoints. Raises :class:`SymtoolsError` with one clear message otherwise.
    """
    path = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise SymtoolsError(f"no such file: {path}")
    if p.is_dir():
        raise SymtoolsError(f"{path} is a directory; give a checkpoint file (for a run directory use --run)")
    size = p.stat().st_size
    if size == 0:
        raise SymtoolsError(f"{path} is empty (0 bytes): an interrupted save?")
    with open(path, "rb") as fh:
        head = fh.read(16)
    notes: list[str] = []
    if _is_safetensors(head, size) or path.endswith(".safetensors"):
        if not _is_safetensors(head, size):
            raise SymtoolsError(f"{path} is named .safetensors but its header is not a safetensors header "
                                f"(truncated or corrupted)")
        sd, meta = _read_safetensors(path)
        if not sd:
            raise SymtoolsError(f"{path} holds no tensors")
        ckpt = Checkpoint(path, "safetensors", "state_dict", _strip_prefix(sd, notes), notes=notes)
        step = meta.get("step")
        if step is not None and str(step).isdigit():
            ckpt.step = int(step)
    else:
        obj = _read_torch(path, head)
        ckpt = _from_object(path, obj, notes)
    bad = nonfinite_entries(ckpt.state_dict)
    if bad:
        raise SymtoolsError(f"{path} holds non-finite weights: " + "; ".join(bad[:6])
                            + (f"; … {len(bad) - 6} more tensors" if len(bad) > 6 else "")
                            + " (a diverged run? audit an earlier checkpoint)")
    if ckpt.optimizer is not None:
        bad = nonfinite_entries(ckpt.optimizer.get("state", {}), "optimizer.state")
        if bad:
            raise SymtoolsError(f"{path} holds non-finite optimizer state: " + "; ".join(bad[:4]))
    return ckpt


def _from_object(path: str, obj: Any, notes: list[str]) -> Checkpoint:
    if not isinstance(obj, Mapping):
        raise SymtoolsError(f"{path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict; {RESAVE}")
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
        if not _tensor_dict(sd):
            bad = [k for k, v in sd.items() if not isinstance(v, Tensor)][:5]
            raise SymtoolsError(f"{path}: its 'model' entry is not a state_dict of tensors (non-tensor entries: {bad})")
        opt = obj.get("optimizer")
        step = obj.get("step")
        ours = obj.get("format") == "symtools-checkpoint"  # keys are the model's own: never strip a prefix
        return Checkpoint(path, "torch", "symtools-checkpoint" if ours else "checkpoint",
                          dict(sd) if ours else _strip_prefix(dict(sd), notes),
                          optimizer=opt if isinstance(opt, Mapping) else None,
                          step=int(step) if isinstance(step, int) and not isinstance(step, bool) else None,
                          config=dict(obj.get("config") or {}), notes=notes, raw=dict(obj))
    for key in ("state_dict", "model_state_dict"):
        if key in obj and _tensor_dict(obj[key]):
            notes.append(f"state_dict read from the {key!r} entry")
            opt = obj.get("optimizer") or obj.get("optimizer_state_dict")
            step = obj.get("step", obj.get("global_step"))
            return Checkpoint(path, "torch", "checkpoint", _strip_prefix(dict(obj[key]), notes),
                              optimizer=opt if isinstance(opt, Mapping) else None,
                              step=int(step) if isinstance(step, int) and not isinstance(step, bool) else None,
                              notes=notes)
    if _tensor_dict(obj):
        return Checkpoint(path, "torch", "state_dict", _strip_prefix(dict(obj), notes), notes=notes)
    keys = list(obj)[:8]
    raise SymtoolsError(f"{path} holds no state_dict: a dict with keys {keys} (expected parameter names → tensors, "
                        f"or a training checkpoint with a 'model' entry)")
