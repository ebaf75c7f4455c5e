"""The VGG or ResNet a checkpoint's keys and shapes imply, and the strict fit of its weights to a model.

Reading files is :mod:`symtools.checkpoints` (the one safe loader of every command); its names are
re-exported here for the audit API. Every failure is a :class:`~symtools.errors.SymtoolsError` (exit code 2
on the command line) with one message that says what is wrong and, where it helps, what to do instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from symtools.checkpoints import (  # noqa: F401
    RESAVE,
    Checkpoint,
    load_checkpoint_file,
    nonfinite_entries,
)
from symtools.errors import SymtoolsError
from symtools.nn.models import MODEL_NAMES
from symtools.nn.resnet import DEPTHS as RESNET_DEPTHS
from symtools.nn.resnet import resnet
from symtools.nn.vgg import CONFIGS, DOWNSAMPLING, vgg

__all__ = [
    "Checkpoint",
    "ResNetArch",
    "VGGArch",
    "build_model_for",
    "describe_resnet",
    "describe_vgg",
    "fit_state_dict",
    "infer_vgg",
    "load_checkpoint_file",
    "nonfinite_entries",
    "optimizer_buffers",
]

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


# ----------------------------------------------------------------------------------------------------------
# ResNet (symtools.nn.resnet, torchvision's layout)

#: input side assumed for a ResNet checkpoint: its weights do not fix it (a global average pool precedes fc)
RESNET_DEFAULT_INPUT = 64

_BN_ENTRY = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_STEM = re.compile(rf"^(conv1\.weight|bn1\.{_BN_ENTRY}|fc\.(weight|bias))$")
_RESNET_BLOCK = re.compile(rf"^layer(\d+)\.(\d+)\.(conv[123]\.weight|bn[123]\.{_BN_ENTRY}|downsample\.0\.weight|"
                           rf"downsample\.1\.{_BN_ENTRY})$")
_RESNET_HINT = re.compile(r"^layer\d+\.\d+\.")


@dataclass(frozen=True)
class ResNetArch:
    """A ResNet of :mod:`symtools.nn.resnet` as implied by a state_dict (fields compatible with :class:`VGGArch`).

    ``input_size`` is not in the weights (the global average pool takes any side ≥ 32): it is
    :data:`RESNET_DEFAULT_INPUT` unless set, and ``input_from_weights`` is False. The head has no hidden layer
    (``hidden`` None); every convolution feeds a BatchNorm (``batch_norm`` True).
    """

    name: str           # "resnet18" | "resnet34" | "resnet50"
    depth: int          # 18 | 34 | 50
    input_size: int
    classes: int
    in_channels: int = 3
    hidden: int | None = None
    batch_norm: bool = True
    input_from_weights: bool = False

    def build(self, device: str | torch.device | None = None) -> nn.Module:
        """The model; on ``device="meta"`` it holds no memory and no initialisation is run (load with assign)."""
        with torch.device(device) if device is not None else _nullcontext():
            return resnet(self.depth, classes=self.classes, in_channels=self.in_channels)


def looks_like_resnet(keys: list[str]) -> bool:
    """Whether the keys have ResNet blocks (``layerL.B.…``) and none of a VGG's ``features.N``/``classifier.N``."""
    return any(_RESNET_HINT.match(k) for k in keys) and not any(_FEATURE_KEY.match(k) or _CLASSIFIER_KEY.match(k)
                                                                for k in keys)


def _resnet_layout(state_dict: Mapping[str, Tensor]) -> tuple[dict[int, set[int]], bool]:
    """``({stage: {block indices}}, bottleneck)`` from the keys; unexpected keys raise."""
    keys = list(state_dict)
    other = [k for k in keys if not (_RESNET_STEM.match(k) or _RESNET_BLOCK.match(k))]
    if other:
        raise SymtoolsError(f"not a ResNet checkpoint of the torchvision layout: unexpected keys {other[:6]}"
                            + (f" (+{len(other) - 6} more)" if len(other) > 6 else "")
                            + ("" if any(_RESNET_HINT.match(k) for k in other) else f"; {_family_hint(other)}"))
    stages: dict[int, set[int]] = {}
    conv3: set[tuple[int, int]] = set()
    for k in keys:
        m = _RESNET_BLOCK.match(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            stages.setdefault(stage, set()).add(block)
            if m.group(3).startswith(("conv3", "bn3")):
                conv3.add((stage, block))
    blocks = {(s, b) for s, bs in stages.items() for b in bs}
    if conv3 and conv3 != blocks:
        plain = sorted(blocks - conv3)[:4]
        raise SymtoolsError(f"cannot infer the ResNet architecture: some blocks have conv3/bn3 (Bottleneck) and "
                            f"others do not ({', '.join(f'layer{s}.{b}' for s, b in plain)} …)")
    return stages, bool(conv3)


def describe_resnet(state_dict: Mapping[str, Tensor]) -> ResNetArch:
    """The ResNet depth (18/34/50), classes and input channels implied by a torchvision-layout state_dict.

    * depth: the number of blocks ``layerL.B`` in each of the stages ``layer1`` … ``layer4`` and whether the
      blocks have a ``conv3`` (Bottleneck) or not (BasicBlock), matched against :data:`symtools.nn.resnet.DEPTHS`;
    * classes: rows of ``fc.weight``; input channels: axis 1 of ``conv1.weight``;
    * input size: not in the weights, :data:`RESNET_DEFAULT_INPUT` (64).

    Shapes are not checked here beyond these: :func:`fit_state_dict` names every mismatch.
    """
    keys = list(state_dict)
    if not any(_RESNET_HINT.match(k) for k in keys):
        raise SymtoolsError(f"not a ResNet checkpoint: {_family_hint(keys)}; symtools reads ResNet-18/34/50 in "
                            f"torchvision's layout (conv1, bn1, layer1 … layer4 of blocks layerL.B.*, fc)")
    stages, bottleneck = _resnet_layout(state_dict)
    kind = "Bottleneck (conv1–conv3)" if bottleneck else "BasicBlock (conv1, conv2)"
    counts = [len(stages.get(s, ())) for s in (1, 2, 3, 4)]
    found = (f"stages {', '.join(f'layer{s}' for s in sorted(stages))} with "
             f"{[len(stages[s]) for s in sorted(stages)]} blocks of {kind}")
    gaps = [f"layer{s}" for s, bs in sorted(stages.items()) if bs != set(range(len(bs)))]
    depth = next((d for d, (k, layers) in RESNET_DEPTHS.items()
                  if sorted(stages) == [1, 2, 3, 4] and not gaps and tuple(counts) == layers
                  and (k == "bottleneck") == bottleneck), None)
    if depth is None:
        known = "; ".join(f"{d}: {'Bottleneck' if k == 'bottleneck' else 'BasicBlock'} {list(layers)}"
                          for d, (k, layers) in RESNET_DEPTHS.items())
        extra = f" (block indices not 0, 1, … in {', '.join(gaps)})" if gaps else ""
        raise SymtoolsError(f"cannot infer the ResNet architecture: found {found}{extra}, which match no ResNet of "
                            f"symtools (stages layer1 … layer4; {known})")
    fc, conv1 = state_dict.get("fc.weight"), state_dict.get("conv1.weight")
    if fc is None or fc.dim() != 2:
        raise SymtoolsError("cannot infer the classes: no 2-D fc.weight (the ResNet's last Linear layer)")
    if conv1 is None or conv1.dim() != 4:
        raise SymtoolsError("cannot infer the input channels: no 4-D conv1.weight (the ResNet's stem convolution)")
    return ResNetArch(name=f"resnet{depth}", depth=depth, input_size=RESNET_DEFAULT_INPUT, classes=int(fc.shape[0]),
                      in_channels=int(conv1.shape[1]))


def _resnet_for_named(state_dict: Mapping[str, Tensor], name: str) -> ResNetArch:
    """For ``--model resnetD``: depth from the name, classes and channels from the file (the key check speaks)."""
    depth = int(name[len("resnet"):])
    try:
        found = describe_resnet(state_dict)
    except SymtoolsError as exc:
        if str(exc).startswith("not a ResNet checkpoint"):
            raise
        fc, conv1 = state_dict.get("fc.weight"), state_dict.get("conv1.weight")
        if fc is None or fc.dim() != 2 or conv1 is None or conv1.dim() != 4:
            raise SymtoolsError(f"{name}: the checkpoint has no fc.weight / conv1.weight to read the classes and "
                                f"input channels from ({exc})") from None
        found = ResNetArch(name, depth, RESNET_DEFAULT_INPUT, int(fc.shape[0]), int(conv1.shape[1]))
    return ResNetArch(name, depth, found.input_size, found.classes, found.in_channels)


_UNKNOWN_LAYOUT = ("symtools reads the VGG family (features.N.* / classifier.N.*) and ResNet-18/34/50 (conv1, bn1, "
                   "layer1 … layer4, fc), both in torchvision's layout; audit other models with the Python API "
                   "symtools.audit.audit_model")


# ----------------------------------------------------------------------------------------------------------
# building and loading


def build_model_for(state_dict: Mapping[str, Tensor], model: str = "auto"
                    ) -> tuple[nn.Module, VGGArch | ResNetArch, list[str]]:
    """A VGG or ResNet with ``state_dict`` loaded (strictly, in the state_dict's floating dtype) and notes on the fit.

    ``model="auto"`` infers everything: a ResNet when the keys have blocks ``layerL.B.*`` (and no VGG keys), see
    :func:`describe_resnet`, else a VGG, see :func:`describe_vgg`. A VGG name (``vgg16_bn`` …) fixes config and
    BatchNorm and takes input size, hidden width and classes from the classifier's shapes; a ResNet name
    (``resnet18`` …) fixes the depth and takes classes and input channels from ``fc.weight`` and ``conv1.weight``.
    A ResNet's input size is not in its weights: 64 is assumed and said in a note. Missing/extra keys and shape
    mismatches are named.
    """
    if model != "auto" and model not in MODEL_NAMES:
        raise SymtoolsError(f"unknown model {model!r}; choose auto or one of {', '.join(MODEL_NAMES)}")
    keys = list(state_dict)
    if model.startswith("resnet") or (model == "auto" and looks_like_resnet(keys)):
        if model == "auto":
            try:
                arch = describe_resnet(state_dict)
            except SymtoolsError as exc:  # keys of a ResNet, but not one symtools builds: say both
                raise SymtoolsError(f"not a VGG checkpoint: {_family_hint(keys)}, but {exc}") from None
        else:
            arch = _resnet_for_named(state_dict, model)
        net = arch.build()
        notes = fit_state_dict(net, state_dict)
        notes.append(f"input size {arch.input_size}×{arch.input_size} assumed: a ResNet's weights do not fix it "
                     f"(a global average pool precedes fc)")
        return net, arch, notes
    if model == "auto":
        try:
            arch = describe_vgg(state_dict)
        except SymtoolsError as exc:
            if str(exc).startswith("not a VGG checkpoint: "):
                raise SymtoolsError(f"not a VGG or ResNet checkpoint: {_family_hint(keys)}; "
                                    f"{_UNKNOWN_LAYOUT}") from None
            raise
    else:
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
