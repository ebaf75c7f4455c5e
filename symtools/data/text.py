"""Real text that needs no download: the bytes of Python standard-library source files, for causal LMs.

The corpus is the source of a fixed list of well-known standard-library modules (:data:`MODULES`, sorted; each
is ``NAME.py`` or, where the module is a package, ``NAME/__init__.py``) under ``sysconfig.get_paths()["stdlib"]``
of the running interpreter, concatenated in that order: about 1.3 MB of UTF-8 bytes with CPython 3.11. The
bytes depend on the Python version (``corpus_info()`` gives the files and a SHA-256 of the corpus) but not on
anything else: no randomness, no network.

Tokens are bytes (vocabulary 256, as the bundled Hugging Face configs). Example ``i`` of a
:class:`TextDataset` is the window of ``T + 1`` bytes starting at ``i·stride`` (``stride`` defaults to ``T``:
windows overlap by one byte); ``x`` is its first ``T`` bytes and ``y`` its last ``T`` (the next byte of each
position), both int64 of shape ``(T,)``. ``split``: ``"train"`` is the first 90 % of the corpus, ``"test"``
(or ``"val"``) the last 10 %, ``"all"`` everything.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import torch

from symtools.errors import SymtoolsError

__all__ = ["MODULES", "NAME", "SPLITS", "TextDataset", "corpus_info", "load_stdlib_text", "stdlib_bytes"]

NAME = "stdlib-text"
#: standard-library modules present in every CPython ≥ 3.10 (as a module or a package), in corpus order
MODULES: tuple[str, ...] = tuple(sorted((
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "heapq", "inspect",
    "json", "operator", "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "textwrap",
    "tokenize", "typing", "weakref",
)))
SPLITS = ("train", "test", "val", "all")
TRAIN_FRACTION = 0.9


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files() -> list[Path]:
    root = _stdlib_dir()
    found, missing = [], []
    for name in MODULES:
        for candidate in (root / f"{name}.py", root / name / "__init__.py"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            missing.append(name)
    if missing:
        raise SymtoolsError(f"the standard-library sources of {', '.join(missing)} are not in {root}: this Python "
                            f"ships without its .py files, so the text data set {NAME!r} cannot be built")
    return found


@functools.lru_cache(maxsize=1)
def stdlib_bytes() -> bytes:
    """The corpus: the sources of :data:`MODULES`, concatenated in order (cached)."""
    try:
        return b"".join(f.read_bytes() for f in _files())
    except OSError as exc:
        raise SymtoolsError(f"cannot read the standard-library sources for {NAME!r}: {exc}") from None


def corpus_info() -> dict:
    """Where the corpus comes from: Python version, stdlib folder, files (relative), bytes and SHA-256."""
    data = stdlib_bytes()
    root = _stdlib_dir()
    return {"python": sys.version.split()[0], "stdlib": str(root),
            "files": [os.fspath(f.relative_to(root)) for f in _files()], "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


class TextDataset:
    """Windows of ``seq_len + 1`` bytes at a fixed ``stride`` of a byte string (module docstring).

    The protocol of the image data sets (:class:`symtools.data.loader.BatchDataset`): ``classes`` (256),
    ``len()``, ``batch(indices) -> (x, y)`` with ``x``, ``y`` int64 ``(B, seq_len)``, ``input_shape``
    ``(seq_len,)``.
    """

    classes = 256

    def __init__(self, data: bytes | torch.Tensor, seq_len: int, stride: int | None = None, *, split: str = "all"):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise SymtoolsError(f"seq_len must be a positive integer, got {seq_len!r}")
        stride = seq_len if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise SymtoolsError(f"stride must be a positive integer, got {stride!r}")
        tokens = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if tokens.numel() < seq_len + 1:
            raise SymtoolsError(f"the text has {tokens.numel()} bytes, fewer than one window of seq_len + 1 = "
                                f"{seq_len + 1}")
        self.tokens = tokens
        self.seq_len, self.stride, self.split = seq_len, stride, split
        self._offsets = torch.arange(seq_len + 1)

    @property
    def input_shape(self) -> tuple[int]:
        return (self.seq_len,)

    def __len__(self) -> int:
        return (self.tokens.numel() - self.seq_len - 1) // self.stride + 1

    def window(self, i: int) -> torch.Tensor:
        """The ``seq_len + 1`` bytes of example ``i`` (int64)."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        return self.tokens[i * self.stride: i * self.stride + self.seq_len + 1].long()

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"example indices out of range [0, {len(self)})")
        windows = self.tokens[(idx * self.stride)[:, None] + self._offsets].long()
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.window(i)
        return w[:-1], w[1:]

    def __repr__(self) -> str:
        return (f"TextDataset(split={self.split!r}, n={len(self)}, seq_len={self.seq_len}, stride={self.stride}, "
                f"bytes={self.tokens.numel()}, classes=256)")


def load_stdlib_text(seq_len: int = 64, split: str = "train", stride: int | None = None) -> TextDataset:
    """The standard-library text as a :class:`TextDataset` of ``split`` (module docstring)."""
    if split not in SPLITS:
        raise SymtoolsError(f"unknown split {split!r} of {NAME!r}; use one of {', '.join(SPLITS)}")
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8)
    cut = int(round(TRAIN_FRACTION * data.numel()))
    part = {"train": data[:cut], "test": data[cut:], "val": data[cut:], "all": data}[split]
    return TextDataset(part, seq_len, stride, split="test" if split == "val" else split)
