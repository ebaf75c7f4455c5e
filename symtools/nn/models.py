"""Registry of the named models the CLI and the checks build: ``vgg11`` … ``vgg19_bn``, ``resnet18/34/50``.

:data:`BUILDERS` maps each name to a function ``(input_size, classes) -> nn.Module``; :data:`MODEL_NAMES`
is its keys in order (:data:`VGG_NAMES`, then :data:`RESNET_NAMES`). A VGG's first Linear layer depends on the
input size (a multiple of 32); a ResNet ends in a global average pool, so its weights do not depend on the input
size (any side ≥ 32 runs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from symtools.errors import SymtoolsError
from symtools.nn.resnet import DEPTHS as RESNET_DEPTHS
from symtools.nn.resnet import resnet
from symtools.nn.vgg import CONFIGS, vgg

#: smallest input side of a ResNet: the stem and three strided stages leave 1×1 maps at 32×32
RESNET_MIN_INPUT = 32


def _vgg(depth: str, batch_norm: bool, input_size: int, classes: int) -> nn.Module:
    return vgg(depth, batch_norm=batch_norm, input_size=input_size, classes=classes)


def _resnet(depth: int, input_size: int, classes: int) -> nn.Module:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < RESNET_MIN_INPUT:
        raise SymtoolsError(f"input size of resnet{depth} must be an integer ≥ {RESNET_MIN_INPUT} (its global "
                            f"average pool takes any side from there), got {input_size!r}")
    return resnet(depth, classes=classes)


VGG_NAMES: tuple[str, ...] = tuple(f"vgg{d}{suffix}" for d in CONFIGS for suffix in ("", "_bn"))
RESNET_NAMES: tuple[str, ...] = tuple(f"resnet{d}" for d in RESNET_DEPTHS)

BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    **{name: partial(_vgg, name[len("vgg"):].partition("_")[0], name.endswith("_bn")) for name in VGG_NAMES},
    **{name: partial(_resnet, int(name[len("resnet"):])) for name in RESNET_NAMES},
}

MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)


def build_model(name: str, input_size: int = 64, classes: int = 200) -> nn.Module:
    """The model called ``name`` (one of :data:`MODEL_NAMES`) for ``input_size``² RGB images and ``classes`` classes."""
    builder = BUILDERS.get(name) if isinstance(name, str) else None
    if builder is None:
        raise SymtoolsError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return builder(input_size, classes)
