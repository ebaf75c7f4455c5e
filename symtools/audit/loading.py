"""Safe loading of the checkpoint an audit reads, and the VGG architecture its keys and shapes imply.

Nothing here runs code from the file. A ``.pt`` file is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only); a ``.safetensors`` file with ``safetensors.torch``.
Before unpickling, a zip-format ``.pt`` has the CRC-32 of every member verified (``zipfile.testzip``):
``torch.load`` itself does not check them, so a flipped byte in tensor data would otherwise load silently.

Accepted layouts (after loading):

* a training checkpoint of :mod:`symtools.training` — ``{"model": state_dict, "optimizer": …, "step": n,
  "config": {…}, …}``;
* a plain ``state_dict`` (torchvision layout ``features.N.*`` / ``classifier.N.*`` for VGG), also wrapped as
  ``{"state_dict": …}`` or ``{"model_state_dict": …}``, keys optionally prefixed by ``module.`` (DataParallel);
* a safetensors file holding such a ``state_dict``.

Every failure is a :class:`~symtools.errors.SymtoolsError` (exit code 2 on the command line) with one
message that says what is wrong and, where it helps, what to do instead.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from symtools.errors import SymtoolsError
from symtools.nn.models import MODEL_NAMES
from symtools.nn.vgg import CONFIGS, DOWNSAMPLING, vgg

__all__ = ["Checkpoint", "VGGArch", "load_checkpoint_file", "infer_vgg", "describe_vgg", "build_model_for",
           "fit_state_dict", "nonfinite_entries", "optimizer_buffers"]

RESAVE = ("re-save it where it was made, as tensors only: torch.save(model.state_dict(), 'weights.pt') or "
          "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_CLASSIFIER_KEY = re.compile(r"^classifier\.(\d+)\.(weight|bias)$")

#: key fragments of other model families, for a message that names what the file probably is
_OTHER_FAMILIES = (
    (re.compile(r"^layer\d+\.\d+\.(conv|bn)\d"), "a ResNet"),
    (re.compile(r"denseblock"), "a DenseNet"),
    (re.compile(r"^(encoder\.layers|blocks\.\d+\.attn|transformer\.)"), "a transformer (ViT-like)"),
    (re.compile(r"^Mixed_\d"), "an Inception network"),
    (re.compile(r"^features\.\d+\.(conv|block)\."), "a MobileNet/EfficientNet"),
    (re.compile(r"^(fc\d+|conv\d+|out|norm\d+)\.(weight|bias)$"), "a symtools small MLP/CNN (symtools.nn.small)"),
)


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
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise SymtoolsError(f"{path} is a safetensors file but the safetensors package is not installed") from None
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
        return Checkpoint(path, "torch", "symtools-checkpoint" if obj.get("format") == "symtools-checkpoint"
                          else "checkpoint", _strip_prefix(dict(sd), notes),
                          optimizer=opt if isinstance(opt, Mapping) else None,
                          step=int(step) if isinstance(step, int) and not isinstance(step, bool) else None,
                          config=dict(obj.get("config") or {}), notes=notes)
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


# ----------------------------------------------------------------------------------------------------------
# architecture


@dataclass(frozen=True)
class VGGArch:
    """A VGG of :mod:`symtools.nn.vgg` as implied by a state_dict."""

    name: str           # e.g. "vgg16_bn"
    depth: str          # "11" | "13" | "16" | "19"
    batch_norm: bool
    input_size: int
    classes: int
    hidden: int

    def build(self, device: str | torch.device | None = None) -> nn.Module:
        """The model; on ``device="meta"`` it holds no memory and no initialisation is run (load with assign)."""
        with torch.device(device) if device is not None else _nullcontext():
            return vgg(self.depth, batch_norm=self.batch_norm, input_size=self.input_size, classes=self.classes,
                       hidden=self.hidden)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _family_hint(keys: list[str]) -> str:
    for pattern, family in _OTHER_FAMILIES:
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            return f"its keys look like {family} ({', '.join(hits[:3])})"
    return f"its first keys are {', '.join(keys[:5])}"


def describe_vgg(state_dict: Mapping[str, Tensor]) -> VGGArch:
    """The VGG config (11/13/16/19), BatchNorm, input size, classes and hidden width implied by keys and shapes.

    * convolutions: the 4-D ``features.N.weight`` tensors in order of N; their output channels must be one of
      :data:`symtools.nn.vgg.CONFIGS` (the "M" entries removed); 3 input channels, 3×3 kernels;
    * BatchNorm: 1-D ``features.N.weight`` entries present;
    * input size: ``classifier.0.weight`` has ``512·(s/32)²`` columns, so ``s = 32·sqrt(columns/512)``;
    * hidden width: rows of ``classifier.0.weight``; classes: rows of the last ``classifier.N.weight``.
    """
    keys = list(state_dict)
    feat = [k for k in keys if _FEATURE_KEY.match(k)]
    cls = [k for k in keys if _CLASSIFIER_KEY.match(k)]
    if not feat or not cls:
        raise SymtoolsError(f"not a VGG checkpoint: {_family_hint(keys)}; symtools audit reads the VGG family "
                            f"(torchvision layout features.N.* / classifier.N.*); audit other models with the "
                            f"Python API symtools.audit.audit_model")
    other = [k for k in keys if k not in set(feat) | set(cls)]
    if other:
        raise SymtoolsError(f"not a VGG checkpoint of the torchvision layout: unexpected keys {other[:6]}"
                            + (f" (+{len(other) - 6} more)" if len(other) > 6 else "") + f"; {_family_hint(other)}")
    convs = sorted((int(_FEATURE_KEY.match(k).group(1)), state_dict[k]) for k in feat
                   if k.endswith(".weight") and state_dict[k].dim() == 4)
    if not convs:
        raise SymtoolsError("cannot infer the VGG architecture: no 4-D convolution weights features.N.weight")
    bad = [f"features.{n}.weight {tuple(w.shape)}" for n, w in convs if tuple(w.shape[2:]) != (3, 3)]
    if bad:
        raise SymtoolsError(f"cannot infer the VGG architecture: VGG convolutions are 3×3, got {bad[:3]}")
    if convs[0][1].shape[1] != 3:
        raise SymtoolsError(f"cannot infer the VGG architecture: the first convolution takes "
                            f"{convs[0][1].shape[1]} input channels; symtools' VGG takes RGB (3)")
    channels = tuple(int(w.shape[0]) for _, w in convs)
    depth = next((d for d, cfg in CONFIGS.items() if tuple(c for c in cfg if c != "M") == channels), None)
    if depth is None:
        known = "; ".join(f"{d}: {len([c for c in cfg if c != 'M'])} convs" for d, cfg in CONFIGS.items())
        raise SymtoolsError(f"cannot infer the VGG architecture: {len(channels)} convolutions with output channels "
                            f"{list(channels)} match no VGG config ({known})")
    batch_norm = any(state_dict[k].dim() == 1 and k.endswith(".weight") for k in feat)
    linears = sorted((int(_CLASSIFIER_KEY.match(k).group(1)), state_dict[k]) for k in cls
                     if k.endswith(".weight") and state_dict[k].dim() == 2)
    if not linears or linears[0][0] != 0:
        raise SymtoolsError("cannot infer the input size: no 2-D classifier.0.weight (the first Linear layer)")
    first, last = linears[0][1], linears[-1][1]
    cols = int(first.shape[1])
    c_last = channels[-1]
    side = math.isqrt(cols // c_last) if cols % c_last == 0 else 0
    if side == 0 or side * side * c_last != cols:
        raise SymtoolsError(f"cannot infer the input size: classifier.0.weight has {cols} columns, which is not "
                            f"{c_last}·(s/{DOWNSAMPLING})² for any whole s (a model with an average pool before "
                            f"the classifier, or another head?)")
    name = f"vgg{depth}" + ("_bn" if batch_norm else "")
    return VGGArch(name=name, depth=depth, batch_norm=batch_norm, input_size=side * DOWNSAMPLING,
                   classes=int(last.shape[0]), hidden=int(first.shape[0]))


def infer_vgg(state_dict: Mapping[str, Tensor]) -> tuple[str, int, int]:
    """``(name, input_size, classes)`` of the VGG a state_dict belongs to (see :func:`describe_vgg`)."""
    arch = describe_vgg(state_dict)
    return arch.name, arch.input_size, arch.classes


def build_model_for(state_dict: Mapping[str, Tensor], model: str = "auto") -> tuple[nn.Module, VGGArch, list[str]]:
    """A VGG with ``state_dict`` loaded (strictly, in the state_dict's floating dtype) and notes on the fit.

    ``model="auto"`` infers everything; a name (``vgg16_bn`` …) fixes config and BatchNorm and takes input size,
    hidden width and classes from the classifier's shapes. Missing/extra keys and shape mismatches are named.
    """
    if model == "auto":
        arch = describe_vgg(state_dict)
    else:
        if model not in MODEL_NAMES:
            raise SymtoolsError(f"unknown model {model!r}; choose auto or one of {', '.join(MODEL_NAMES)}")
        depth, _, suffix = model[len("vgg"):].partition("_")
        try:
            found = describe_vgg(state_dict)
            arch = VGGArch(model, depth, suffix == "bn", found.input_size, found.classes, found.hidden)
        except SymtoolsError as exc:
            if "not a VGG checkpoint" in str(exc):
                raise
            arch = _shapes_for_named(state_dict, model, depth, suffix == "bn")
    net = arch.build()  # (on the meta device, init would route through torch._refs and import dynamo: slower)
    notes = fit_state_dict(net, state_dict)
    return net, arch, notes


def _shapes_for_named(sd: Mapping[str, Tensor], name: str, depth: str, bn: bool) -> VGGArch:
    """For ``--model NAME`` when the config cannot be inferred: take the head's shapes, let the key check speak."""
    w0, wl = sd.get("classifier.0.weight"), sd.get("classifier.6.weight")
    if w0 is None or wl is None or w0.dim() != 2 or wl.dim() != 2:
        raise SymtoolsError(f"{name}: the checkpoint has no classifier.0.weight / classifier.6.weight matrices "
                            f"to read the input size and classes from")
    side = math.isqrt(int(w0.shape[1]) // 512)
    if side * side * 512 != int(w0.shape[1]):
        raise SymtoolsError(f"cannot infer the input size: classifier.0.weight has {int(w0.shape[1])} columns, "
                            f"not 512·(s/32)²")
    return VGGArch(name, depth, bn, side * DOWNSAMPLING, int(wl.shape[0]), int(w0.shape[0]))


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load ``state_dict`` into ``model`` strictly, after casting the model to the weights' floating dtype.

    Missing keys, unexpected keys and shape mismatches are all named in one message. A missing
    ``num_batches_tracked`` (old checkpoints) is filled with 0 and noted: it does not enter any loss.
    """
    own = model.state_dict()
    notes: list[str] = []
    sd = dict(state_dict)
    missing = [k for k in own if k not in sd]
    nbt = [k for k in missing if k.endswith("num_batches_tracked")]
    if nbt:
        for k in nbt:
            sd[k] = torch.zeros(own[k].shape, dtype=own[k].dtype)
        notes.append(f"{len(nbt)} num_batches_tracked buffers missing: set to 0 (they do not enter the loss)")
        missing = [k for k in missing if k not in nbt]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:6]) + (" …" if len(items) > 6 else ""))
        raise SymtoolsError(f"the checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    floats = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(floats) > 1:
        notes.append(f"mixed floating dtypes {sorted(str(d) for d in floats)}: the model uses the widest")
    dtype = max(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:  # a model built on the meta device takes the loaded tensors themselves (copies: the file's stay)
        model.load_state_dict({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in sd.items()},
                              strict=True, assign=True)
    else:
        model.to(dtype)
        model.load_state_dict(sd, strict=True)
    model.to(dtype)
    return notes


def optimizer_buffers(optimizer: Mapping | None, names: list[str], shapes: Mapping[str, tuple]) -> tuple[dict, str]:
    """Per-parameter optimizer state by parameter *name*: ``({name: {"momentum_buffer": T, …}}, note)``.

    ``optimizer`` is a ``torch.optim`` ``state_dict``; its integer parameter ids are those of an optimizer built
    on ``model.parameters()`` (ids in the order of ``names``). The mapping is accepted only when the ids cover
    ``0 … len(names)−1`` and every state tensor of per-parameter shape matches its parameter.
    """
    if not optimizer:
        return {}, "no optimizer state in the checkpoint"
    groups = optimizer.get("param_groups") or []
    ids = [i for g in groups for i in g.get("params", [])]
    if sorted(ids) != list(range(len(names))):
        return {}, (f"the optimizer state covers {len(ids)} parameter ids, the model has {len(names)} parameters: "
                    f"cannot tell which buffer belongs to which parameter")
    state = optimizer.get("state") or {}
    out: dict[str, dict] = {}
    for i, name in enumerate(names):
        entry = state.get(i, state.get(str(i)))
        if not entry:
            continue
        for key, t in entry.items():
            if isinstance(t, Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(shapes[name]):
                return {}, (f"optimizer state {key!r} of parameter id {i} has shape {tuple(t.shape)}, but parameter "
                            f"{name} has {tuple(shapes[name])}: the optimizer was not built on model.parameters()")
        out[name] = dict(entry)
    return out, ""
