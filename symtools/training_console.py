"""How a training run meets the terminal: the progress bar on stderr and a Ctrl-C that waits for the update.

Used by :func:`symtools.training.train` (module docstring: "Bad input and stops"); nothing here touches the
model or the files of the run.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any, Sequence

__all__ = ["Progress", "SigintDeferral"]


class Progress:
    """stderr progress: a live bar on a TTY; with ``mode=True`` and no TTY, a line every ~10 %."""

    def __init__(self, mode: bool | None, start: int, total: int, callbacks: Sequence[Any]):
        self.stream = sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.live = mode is not False and tty
        self.lines = mode is True and not tty
        self.start, self.total = start, total
        self.every = max(1, math.ceil(total / 10))
        self.next_line = (start // self.every + 1) * self.every
        self.status = [cb.status for cb in callbacks if callable(getattr(cb, "status", None))]
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.width = 0

    def text(self, step: int, loss: float, acc: float) -> str:
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"step {step}/{self.total} {pct:3.0f}%", f"loss {loss:.4g}"]
        if not math.isnan(acc):
            parts.append(f"acc {100 * acc:.1f}%")
        for fn in self.status:
            for k, v in (fn() or {}).items():
                parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
        dt = time.perf_counter() - self.t0
        if step > self.start and dt > 0:
            parts.append(f"{(step - self.start) / dt:.2f} step/s")
        return " | ".join(parts)

    def update(self, step: int, loss: float, acc: float) -> None:
        if self.live:
            now = time.perf_counter()
            if now - self.last_draw >= 0.1 or step == self.total:
                line = self.text(step, loss, acc)
                self.stream.write("\r" + line.ljust(self.width))
                self.stream.flush()
                self.width, self.last_draw = len(line), now
        elif self.lines and (step >= self.next_line or step == self.total):
            self.stream.write(self.text(step, loss, acc) + "\n")
            self.stream.flush()
            while self.next_line <= step:
                self.next_line += self.every

    def note(self, message: str) -> None:
        if self.live and self.width:
            self.stream.write("\n")
            self.width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


class SigintDeferral:
    """While active (main thread only), the first Ctrl-C sets a flag checked between updates; a second one aborts."""

    def __init__(self, progress: Progress):
        self.requested = False
        self.progress = progress
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> "SigintDeferral":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self.previous = signal.signal(signal.SIGINT, self._handle)
                self.installed = True
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                self.installed = False
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous if callable(self.previous) else signal.default_int_handler)
        self.progress.note("symtools: interrupt: stopping after this step (Ctrl-C again to abort at once)")

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
