"""Count the ATen operations (and host synchronisations) a piece of torch code issues.

:class:`OpCounter` is a ``TorchDispatchMode``: every ATen call that reaches the dispatcher from Python code is
counted once (calls that an op makes internally are not: they run below the mode), which on a GPU is an upper
bound of the kernel launches of eager code. A host synchronisation is a call that hands a device value to
Python (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) or copies a
non-CPU tensor to the CPU. The counts depend on the code path only, not on the machine: benchmarks print them
and tests bound them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.calls`` (ATen calls), ``c.syncs`` (host synchronisations) and
    ``c.by_op`` (a Counter of op names)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.syncs = 0

    @property
    def calls(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.by_op[name] += 1
        if name in SYNC_OPS or _to_host(func, args, kwargs or {}):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU tensor to the CPU."""
    name = str(func)
    if name.startswith("aten._to_copy") and args and isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    if name.startswith("aten.copy_") and len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args[:2]):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False
