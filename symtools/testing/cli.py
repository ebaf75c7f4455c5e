"""Run a ``symtools`` command in-process and capture what it prints (for tests and notebooks)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence


def run_cli(argv: Sequence[object]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``symtools ARGV…``; argparse's usage errors give their exit code too."""
    from symtools.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()
