"""Small helpers shared by the subcommands."""

from __future__ import annotations

from symtools.errors import SymtoolsError


def parse_device(name: str):
    """``--device`` as a ``torch.device``; a one-line error for an unknown name or a missing CUDA device."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SymtoolsError("--device cuda requested but no CUDA device is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SymtoolsError(f"unknown device {name!r}; use cpu or cuda") from None
