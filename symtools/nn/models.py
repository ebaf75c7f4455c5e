"""Registry of the named models the CLI and the checks build: ``vgg11`` … ``vgg19_bn``."""

from __future__ import annotations

from torch import nn

from symtools.errors import SymtoolsError
from symtools.nn.vgg import CONFIGS, vgg

MODEL_NAMES: tuple[str, ...] = tuple(f"vgg{d}{suffix}" for d in CONFIGS for suffix in ("", "_bn"))


def build_model(name: str, input_size: int = 64, classes: int = 200) -> nn.Module:
    """The model called ``name`` (one of :data:`MODEL_NAMES`) for ``input_size``² RGB images and ``classes`` classes."""
    if name not in MODEL_NAMES:
        raise SymtoolsError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    depth, _, suffix = name[len("vgg"):].partition("_")
    return vgg(depth, batch_norm=suffix == "bn", input_size=input_size, classes=classes)
