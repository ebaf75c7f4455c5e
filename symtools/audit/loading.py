"""The VGG architecture a checkpoint's keys and shapes imply, and the strict fit of its weights to a model.

Reading files is :mod:`symtools.checkpoints` (the one safe loader of every command); its names are
re-exported here for the audit API. Every failure is a :class:`~symtools.errors.SymtoolsError` (exit code 2
on the command line) with one message that says what is wrong and, where it helps, what to do instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from symtools.checkpoints import RESAVE, Checkpoint, load_checkpoint_file, nonfinite_entries  # noqa: F401
from symtools.errors import SymtoolsError
from symtools.nn.models import MODEL_NAMES
from symtools.nn.vgg import CONFIGS, DOWNSAMPLING, vgg

__all__ = ["Checkpoint", "VGGArch", "load_checkpoint_file", "infer_vgg", "describe_vgg", "build_model_for",
           "fit_state_dict", "nonfinite_entries", "optimizer_buffers"]

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
