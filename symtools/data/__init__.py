"""Training data that needs no download: the bundled UCI digits, image folders, seeded batch streams.

* :func:`load_digits` — the UCI handwritten digits shipped in this package (``digits.csv.gz``,
  licence in ``DIGITS_LICENSE.txt``), resized to 32×32×3 (or any size ≥ 8), normalised with train statistics.
* :func:`load_image_folder` — a Tiny-ImageNet-style or one-folder-per-class image folder (needs Pillow).
* :func:`make_loader` — ``"digits"`` or a folder → an endless, seeded, random-access :class:`BatchStream`.

See ``docs/data.md``.
"""

from symtools.data.digits import DigitsDataset, load_digits
from symtools.data.folder import ImageFolderDataset, load_image_folder
from symtools.data.loader import BatchStream, make_loader

__all__ = ["load_digits", "DigitsDataset", "load_image_folder", "ImageFolderDataset", "make_loader", "BatchStream"]
