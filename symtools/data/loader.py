"""Infinite, seeded, random-access batch streams.

The examples of a dataset are laid end to end in an endless sequence of epochs; epoch ``e`` is the
permutation ``torch.randperm(N, generator=torch.Generator().manual_seed(mix(seed, e)))``. Batch ``i``
(0-based) is positions ``[i·B, (i+1)·B)`` of that sequence, so every batch has exactly ``B`` examples
(a batch may straddle two epochs) and batch ``i`` is a pure function of ``(dataset, seed, B, i)``:
a resumed run asks for ``stream.iter_from(step)`` and sees the same data as an uninterrupted one.
The global torch RNG is never touched.
"""

from __future__ import annotations

import os
from typing import Iterator, Protocol

import torch

from symtools.errors import SymtoolsError

__all__ = ["BatchStream", "make_loader", "BatchDataset"]

_MASK = (1 << 63) - 1


class BatchDataset(Protocol):  # what a BatchStream needs from a dataset
    classes: int

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _epoch_seed(seed: int, epoch: int) -> int:
    # splitmix64-style mixing, so (seed, epoch) pairs do not collide the way seed + epoch would
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(epoch) + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


class BatchStream:
    """An endless, reproducible sequence of ``(x, y)`` batches over a dataset (see the module docstring).

    Iterating starts at batch 0; ``iter_from(i)`` starts at batch ``i``; ``batch(i)`` returns one batch;
    ``indices(i)`` the dataset rows of batch ``i``. ``classes``, ``input_shape`` and ``config`` (a plain
    dict describing the stream, stored in checkpoints) come from the dataset and the arguments.
    """

    def __init__(self, dataset: BatchDataset, batch_size: int, seed: int = 0, *, shuffle: bool = True,
                 config: dict | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SymtoolsError(f"batch size must be a positive integer, got {batch_size!r}")
        if len(dataset) == 0:
            raise SymtoolsError("cannot draw batches from an empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.classes = int(dataset.classes)
        self.input_shape = tuple(getattr(dataset, "input_shape", ()))
        self.config = {"batch": batch_size, "seed": self.seed, "shuffle": shuffle, "examples": len(dataset),
                       **(config or {})}
        self._perms: dict[int, torch.Tensor] = {}  # the two most recently used epochs

    def __len__(self) -> int:  # batches per epoch, rounded up (the stream itself is endless)
        return -(-len(self.dataset) // self.batch_size)

    def permutation(self, epoch: int) -> torch.Tensor:
        """Order of the dataset rows in ``epoch`` (int64, length N)."""
        perm = self._perms.pop(epoch, None)
        if perm is None:
            n = len(self.dataset)
            if self.shuffle:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch)))
            else:
                perm = torch.arange(n)
        self._perms[epoch] = perm
        while len(self._perms) > 2:
            self._perms.pop(next(iter(self._perms)))
        return perm

    def indices(self, i: int) -> torch.Tensor:
        if i < 0:
            raise SymtoolsError(f"batch index must be >= 0, got {i}")
        n, b = len(self.dataset), self.batch_size
        start, parts = i * b, []
        while b > 0:
            epoch, offset = divmod(start, n)
            take = min(b, n - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            start += take
            b -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(self.indices(i))

    def iter_from(self, i: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.batch(i)
            i += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def __repr__(self) -> str:
        return f"BatchStream({self.dataset!r}, batch_size={self.batch_size}, seed={self.seed})"


def make_loader(name_or_dir: str | os.PathLike, batch: int, image_size: int = 32, seed: int = 0, *,
                split: str = "train", channels: int = 3, dtype: torch.dtype = torch.float32,
                shuffle: bool = True, seq_len: int = 64) -> BatchStream:
    """A :class:`BatchStream` over ``"digits"`` (the bundled UCI digits), an image folder, or ``"stdlib-text"``.

    ``seed`` fixes both the batch order and, for digits, the train/test split. The result has
    ``.classes`` (10 for digits; the number of class folders otherwise) and ``.input_shape``.
    ``"stdlib-text"`` (:mod:`symtools.data.text`): windows of ``seq_len`` bytes of Python standard-library
    source, ``x`` and ``y`` int64 ``(batch, seq_len)`` with ``y`` shifted by one byte, 256 classes;
    ``image_size``, ``channels`` and ``dtype`` do not apply to it.
    """
    from symtools.data.digits import load_digits
    from symtools.data.folder import load_image_folder

    name = os.fspath(name_or_dir)
    if name == "stdlib-text":
        from symtools.data.text import corpus_info, load_stdlib_text

        text = load_stdlib_text(seq_len=seq_len, split=split)
        info = corpus_info()
        return BatchStream(text, batch, seed, shuffle=shuffle,
                           config={"data": name, "split": text.split, "seq_len": seq_len, "stride": text.stride,
                                   "python": info["python"], "sha256": info["sha256"]})
    if name == "digits":
        ds = load_digits(image_size=image_size, channels=channels, dtype=dtype, split=split if split != "val" else "test",
                         seed=seed)
        config = {"data": "digits", "split": ds.split}
    elif os.path.isdir(os.path.expanduser(name)):
        ds = load_image_folder(name, image_size=image_size, split=split, channels=channels, dtype=dtype)
        config = {"data": os.path.abspath(os.path.expanduser(name)), "split": split}
    else:
        raise SymtoolsError(
            f"unknown data {name!r}: give 'digits' (bundled, no download), an existing image folder "
            "(Tiny-ImageNet style DIR/train/<class>/images/*.JPEG, or DIR/<class>/*.png), or 'stdlib-text' "
            "(byte windows of Python standard-library source, for language models)"
        )
    config.update(image_size=image_size, channels=channels)
    return BatchStream(ds, batch, seed, shuffle=shuffle, config=config)
