"""Image folders (Tiny-ImageNet style or one folder per class), decoded with Pillow on demand.

Layouts understood (class names are folder names, sorted; labels are their positions):

* Tiny-ImageNet: ``ROOT/train/<class>/images/*.JPEG``; its validation split
  ``ROOT/val/images/*.JPEG`` labelled by ``ROOT/val/val_annotations.txt`` (``file<TAB>class<TAB>...``).
* split folders: ``ROOT/train/<class>/*.png`` (and ``ROOT/val/<class>/*.png`` for ``split="val"``).
* plain: ``ROOT/<class>/*.{png,jpg,jpeg}`` — everything is the ``train`` split.

Files are found recursively under each class folder (extensions .png .jpg .jpeg .bmp .gif .webp, any case).
Each image is converted to RGB (or L for ``channels=1``), resized to ``image_size²`` with bilinear
filtering when its size differs, scaled to [0, 1] and normalised per channel with the mean and
standard deviation of up to ``stats_images`` evenly spaced images of the *train* split.
Decoded images are cached as uint8 in memory when they fit in ``cache_bytes``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from symtools.errors import SymtoolsError

__all__ = ["ImageFolderDataset", "load_image_folder", "scan_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLITS = ("train", "val", "all")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise SymtoolsError(
            "reading an image folder needs Pillow, which is not installed: run 'pip install Pillow' "
            "(or train on the bundled data with '--data digits')"
        ) from None
    return Image


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan_image_folder(root: str | os.PathLike, split: str = "train") -> tuple[list[Path], list[int], list[str]]:
    """Find the images of one split: ``(paths, labels, class_names)``; see the module docstring for layouts."""
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise SymtoolsError(f"unknown image-folder split {split!r}: use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise SymtoolsError(f"data folder {root} does not exist (give 'digits' or a folder of class sub-folders)")
    train_dir = root / "train"
    split_layout = train_dir.is_dir()
    class_root = train_dir if split_layout else root
    classes = [p.name for p in _class_dirs(class_root)]
    if split_layout and not classes:
        raise SymtoolsError(f"{train_dir} has no class sub-folders (expected {train_dir}/<class>/images/*.JPEG)")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []

    def add_class_folders(folder: Path) -> None:
        for d in _class_dirs(folder):
            if d.name not in index:
                raise SymtoolsError(f"class folder {d} has no counterpart in {class_root}")
            found = _images_under(d)
            paths.extend(found)
            labels.extend([index[d.name]] * len(found))

    if split in ("train", "all"):
        add_class_folders(class_root)
    if split in ("val", "all") and split_layout:
        val_dir = root / "val"
        annotations = val_dir / "val_annotations.txt"
        if annotations.is_file():
            for line in annotations.read_text(encoding="utf-8").splitlines():
                parts = line.split("\t")
                if len(parts) < 2 or not parts[0]:
                    continue
                if parts[1] not in index:
                    raise SymtoolsError(f"{annotations}: class {parts[1]!r} of {parts[0]} is not a folder of {train_dir}")
                p = val_dir / "images" / parts[0]
                if p.is_file():
                    paths.append(p)
                    labels.append(index[parts[1]])
        elif val_dir.is_dir():
            add_class_folders(val_dir)
        elif split == "val":
            raise SymtoolsError(f"{root} has no val/ folder (expected val/images + val_annotations.txt or val/<class>/)")
    elif split == "val":
        raise SymtoolsError(f"{root} is a plain class-folder layout with no val split: use split='train'")
    if not paths:
        raise SymtoolsError(
            f"no images found for split {split!r} under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in "
            f"{'train/<class>/[images/]' if split_layout else '<class>/'}); "
            "expected a Tiny-ImageNet-style folder (train/<class>/images/*.JPEG) or one folder per class"
        )
    return paths, labels, classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of one split of an image folder: ``dataset[i] -> (x, y)``, ``dataset.batch(indices)`` stacked.

    ``classes`` (count), ``class_names``, ``paths``, ``labels`` (int64 tensor), ``mean``/``std``
    (float64, per channel), ``input_shape`` = ``(channels, image_size, image_size)``.
    """

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], *, image_size: int,
                 channels: int, dtype: torch.dtype, cache_bytes: int):
        self._Image = _pil()
        self.paths = list(paths)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.class_names = list(class_names)
        self.classes = len(class_names)
        self.image_size, self.channels, self.dtype = image_size, channels, dtype
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.std = torch.ones(channels, dtype=torch.float64)
        n_bytes = len(self.paths) * channels * image_size * image_size
        self._cache = torch.empty((len(self.paths), channels, image_size, image_size), dtype=torch.uint8) \
            if n_bytes <= cache_bytes else None
        self._cached = np.zeros(len(self.paths), dtype=bool)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 ``channels × image_size × image_size`` (resized, not normalised)."""
        if self._cache is not None and self._cached[i]:
            return self._cache[i]
        try:
            with self._Image.open(self.paths[i]) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), self._Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise SymtoolsError(f"cannot read image {self.paths[i]}: {exc}") from None
        t = torch.from_numpy(arr.reshape(self.image_size, self.image_size, self.channels).copy()).permute(2, 0, 1)
        if self._cache is not None:
            self._cache[i] = t
            self._cached[i] = True
        return t

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float64) / 255.0
        x = (x - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        return x.to(self.dtype)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [int(i) for i in indices]
        raw = torch.stack([self.decode(i) for i in idx])
        return self._normalise(raw), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalise(self.decode(int(i))), self.labels[int(i)]

    def set_statistics(self, sample: "ImageFolderDataset", max_images: int) -> None:
        """Per-channel mean/std over up to ``max_images`` evenly spaced images of ``sample`` (the train split)."""
        n = len(sample)
        pick = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(int))
        s = torch.zeros(self.channels, dtype=torch.float64)
        s2 = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for i in pick:
            x = sample.decode(int(i)).to(torch.float64) / 255.0
            s += x.sum(dim=(1, 2))
            s2 += (x * x).sum(dim=(1, 2))
            count += x.shape[1] * x.shape[2]
        mean = s / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt()
        self.mean = mean
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))

    def __repr__(self) -> str:
        return f"ImageFolderDataset(n={len(self)}, classes={self.classes}, input_shape={self.input_shape})"


def load_image_folder(root: str | os.PathLike, image_size: int = 64, split: str = "train", channels: int = 3,
                      dtype: torch.dtype = torch.float32, *, stats_images: int = 2048,
                      cache_bytes: int = 2 << 30) -> ImageFolderDataset:
    """Open one split of an image folder as an :class:`ImageFolderDataset` (normalised with train statistics)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise SymtoolsError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise SymtoolsError(f"channels must be 1 or 3, got {channels!r}")
    _pil()
    paths, labels, names = scan_image_folder(root, split)
    ds = ImageFolderDataset(paths, labels, names, image_size=image_size, channels=channels, dtype=dtype,
                            cache_bytes=cache_bytes)
    if split == "train":
        train = ds
    else:
        tp, tl, _ = scan_image_folder(root, "train")
        train = ImageFolderDataset(tp, tl, names, image_size=image_size, channels=channels, dtype=dtype, cache_bytes=0)
    ds.set_statistics(train, stats_images)
    return ds
