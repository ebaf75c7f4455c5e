"""IEEE float32 on CUDA while identities are checked: TensorFloat-32 off, restored afterwards.

On Ampere and later GPUs PyTorch lets cuDNN convolutions (and, when asked, cuBLAS matrix products) take float32
inputs through TensorFloat-32, whose 10-bit mantissa rounds each product to ~5e-4 relative. A float32 check
under TF32 would measure TF32's round-off, not float32's: its tolerances would be those of a 10-bit format.
:func:`ieee_float32` switches both to IEEE float32 for the duration of a ``with`` block and restores the
caller's settings on exit (also on error). On a CPU-only build the flags exist and nothing changes numerically.

PyTorch ≥ 2.9 has two APIs for these flags and refuses to read the legacy one (``allow_tf32``) after only part
of the new one (``fp32_precision``) was set; the new API is used where it exists and the legacy flags only on
older releases, so the caller's choice is read and written through one API.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _flags() -> list[tuple[str, object, str, object]]:
    """(label, object, attribute, IEEE value) for every flag that selects TF32."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    new = [("cudnn.conv", conv, "fp32_precision"), ("cuda.matmul", torch.backends.cuda.matmul, "fp32_precision")]
    if all(obj is not None and hasattr(obj, attr) for _, obj, attr in new):
        return [(label, obj, attr, "ieee") for label, obj, attr in new]
    return [("cudnn.allow_tf32", torch.backends.cudnn, "allow_tf32", False),
            ("cuda.matmul.allow_tf32", torch.backends.cuda.matmul, "allow_tf32", False)]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with TensorFloat-32 off for convolutions and matrix products; restore the flags after."""
    flags = _flags()
    saved = [(obj, attr, getattr(obj, attr)) for _, obj, attr, _ in flags]
    try:
        for _, obj, attr, value in flags:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def tf32_state() -> dict[str, object]:
    """The current TF32-related flags by name (for reports and tests)."""
    return {label: getattr(obj, attr) for label, obj, attr, _ in _flags()}
