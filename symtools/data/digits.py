"""The UCI handwritten digits, shipped inside the package (no download, no scikit-learn at run time).

``digits.csv.gz`` (next to this module) is scikit-learn's copy of the UCI "Optical Recognition of
Handwritten Digits" test set: 1797 images, 8×8 pixels with integer values 0..16, labels 0..9.
Licence and citation: ``DIGITS_LICENSE.txt`` (CC BY 4.0 data, BSD-3 distribution).

:func:`load_digits` turns it into network inputs:

1. pixels ``p / 16`` in [0, 1], shaped ``N×1×8×8``;
2. resized to ``image_size × image_size`` with ``F.interpolate(mode="bilinear", align_corners=False)``
   (computed in float64);
3. the channel repeated ``channels`` times (3 for VGG);
4. normalised per channel: ``x = (x − mean_c) / std_c`` with mean and (population) standard deviation
   of channel c over the pixels of the *train* split, for every split;
5. a deterministic, class-stratified split: for each class a permutation drawn from
   ``numpy.random.default_rng(seed)``; the first ``round(test_fraction · n_class)`` go to ``test``.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from symtools.errors import SymtoolsError

__all__ = ["load_digits", "DigitsDataset", "raw_digits", "CLASSES", "DATA_FILE"]

CLASSES = 10
DATA_FILE = "digits.csv.gz"
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("symtools.data").joinpath(DATA_FILE)
    try:
        with ref.open("rb") as fh, gzip.open(fh, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    except FileNotFoundError:
        raise SymtoolsError(
            f"the bundled digits data symtools/data/{DATA_FILE} is missing: reinstall symtools "
            "(its package data includes symtools/data/*)"
        ) from None
    if table.shape != (1797, 65):
        raise SymtoolsError(f"symtools/data/{DATA_FILE} has shape {table.shape}, expected (1797, 65)")
    images = table[:, :64].reshape(-1, 8, 8)
    labels = table[:, 64]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled data as stored: ``(images uint-valued int64 N×8×8 in 0..16, labels int64 N)``, read-only."""
    return _raw()


def _split_indices(labels: np.ndarray, split: str, seed: int, test_fraction: float) -> np.ndarray:
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train if split == "train" else test))


class DigitsDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` ``(x, y)`` with ``classes``, ``mean``, ``std`` and ``indices``.

    ``x``: ``N × channels × image_size × image_size`` (normalised); ``y``: int64 labels 0..9;
    ``indices``: rows of the bundled file this split holds; ``mean``/``std``: the per-channel train
    statistics used for the normalisation (float64 tensors of length ``channels``).
    """

    classes = CLASSES

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor,
                 indices: np.ndarray, split: str, seed: int):
        super().__init__(x, y)
        self.mean, self.std, self.indices, self.split, self.seed = mean, std, indices, split, seed

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices`` (a 1-D int64 tensor), stacked: ``(x[indices], y[indices])``."""
        return self.x[indices], self.y[indices]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, input_shape={self.input_shape}, classes=10)"


def load_digits(image_size: int = 32, channels: int = 3, dtype: torch.dtype = torch.float32, split: str = "train",
                seed: int = 0, test_fraction: float = 0.2) -> DigitsDataset:
    """Load the bundled digits as a :class:`DigitsDataset` (see the module docstring for every step).

    ``image_size``: output side in pixels (8 = as stored, 32 = CIFAR-sized, 64 = Tiny-ImageNet-sized;
    any value ≥ 8); ``channels``: 1 or 3 (the grey value repeated); ``split``: ``"train"``
    (≈80 %: 1438 images), ``"test"`` (≈20 %: 359) or ``"all"`` (1797); ``seed`` chooses
    the split (the same seed always gives the same split). Normalisation always uses the train split
    of the same ``seed``, so train and test share one affine map.
    """
    if split not in SPLITS:
        raise SymtoolsError(f"unknown digits split {split!r}: use one of {', '.join(SPLITS)}")
    if not isinstance(image_size, int) or image_size < 8:
        raise SymtoolsError(f"digits image_size must be an integer >= 8 (the data are 8x8), got {image_size!r}")
    if channels not in (1, 3):
        raise SymtoolsError(f"digits channels must be 1 or 3, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise SymtoolsError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SymtoolsError(f"dtype must be a floating torch dtype, got {dtype!r}")
    images, labels = _raw()

    def prepare(idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images[idx].astype(np.float64) / 16.0).unsqueeze(1)
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return x.expand(-1, channels, -1, -1).contiguous()

    train_idx = _split_indices(labels, "train", seed, test_fraction)
    x_train = prepare(train_idx)
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3), unbiased=False)
    idx = train_idx if split == "train" else _split_indices(labels, split, seed, test_fraction)
    x = x_train if split == "train" else prepare(idx)
    x = ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dtype)
    y = torch.from_numpy(labels[idx].copy())
    return DigitsDataset(x, y, mean=mean, std=std, indices=idx, split=split, seed=seed)
