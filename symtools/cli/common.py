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


def require(module: str, package: str, needed_for: str) -> None:
    """Fail before any work when ``module`` cannot be imported (a broken install: every one is a dependency)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise SymtoolsError(f"{needed_for} needs {package}, which is not installed: pip install {package}") from None


def check_out_dir(path: str, *, force: bool, option: str = "--out", also: str = "") -> bool:
    """Validate an output folder before anything is written; return whether it has to be created.

    A file, or a non-empty folder this invocation did not create, is refused unless ``force`` (the commands
    never delete what they did not create: reusing a folder is the user's explicit choice). ``also`` names
    another way out for the message (e.g. train's ``--resume``).
    """
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        return True
    if not p.is_dir():
        raise SymtoolsError(f"{option} {path} is a file, not a folder: give a new folder")
    try:
        used = any(p.iterdir())
    except OSError as exc:
        raise SymtoolsError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    if used and not force:
        raise SymtoolsError(f"{option} {path} is not empty and this command did not create it: give a new "
                            f"folder{also}, or add --force to reuse it")
    return False


def make_out_dir(path: str, option: str = "--out") -> None:
    """Create the output folder (and its parents) once every option has been validated; one line on failure."""
    from pathlib import Path

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SymtoolsError(f"{option} {path}: cannot create it ({exc.strerror or exc})") from None
