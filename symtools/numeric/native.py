"""Build generated C with the machine's C compiler and load it: the monitor's compiled reducer.

The source comes from :mod:`symtools.codegen.emit_c`. It is compiled for this very machine (``-O3
-march=native``, with OpenMP where the compiler has it) into a temporary directory, once per process and
source text, and loaded with :mod:`ctypes` (the directory is removed at exit). Nothing is cached across
processes: a library built with ``-march=native`` must not be loaded on another processor (a home directory
shared across a cluster), and compiling takes well under a second. Loaded into a process that has imported
torch, the kernels' OpenMP is torch's own (the loader reuses the ``libgomp.so.1`` already mapped): one pool
of threads, not two competing for the cores.

:func:`available` says whether a compiler works here (probed once per process). The compiler is ``$CC`` or
the first of ``cc``, ``gcc``, ``clang`` on the path.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from symtools.errors import SymtoolsError

#: Flag sets tried in order: the fastest first; without OpenMP (clang on macOS), without -march=native.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))
#: gnu99, not c99: ISO mode turns off contracting a*b + c into one fused multiply-add; the sums' products of
#: two float32 numbers are exact in double, so contracting them changes no result, only the speed.
COMMON = ("-shared", "-fPIC", "-std=gnu99")

_LOADED: dict[str, ctypes.CDLL] = {}
_FLAGS: dict[str, tuple[str, ...]] = {}  # source → the flags it was built with
_PROBE: dict[str, object] = {}
_DIR: list[Path] = []


def compiler() -> str | None:
    """The C compiler to use, or None."""
    env = os.environ.get("CC")
    if env:
        return shutil.which(env.split()[0])
    return next((path for c in ("cc", "gcc", "clang") if (path := shutil.which(c))), None)


def _workdir() -> Path:
    if not _DIR:
        _DIR.append(Path(tempfile.mkdtemp(prefix="symtools-kernels-")))
        atexit.register(shutil.rmtree, _DIR[0], ignore_errors=True)  # a loaded library may be unlinked
    return _DIR[0]


def _compile(source: str, flags: tuple[str, ...]) -> tuple[Path | None, str]:
    cc = compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc or clang)"
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:20]
    work = _workdir()
    src, lib = work / f"{digest}.c", work / f"{digest}.so"
    src.write_text(source)
    try:
        run = subprocess.run([cc, *flags, *COMMON, str(src), "-o", str(lib), "-lm"], check=False, capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{cc}: {err}"
    if run.returncode != 0:
        return None, (run.stderr.strip().splitlines() or [f"{cc} exited with {run.returncode}"])[-1]
    return lib, ""


def load(source: str) -> ctypes.CDLL:
    """The compiled library of ``source`` (built on first use in this process)."""
    lib = _LOADED.get(source)
    if lib is not None:
        return lib
    reasons = []
    for flags in FLAG_SETS:
        path, why = _compile(source, flags)
        if path is not None:
            lib = _LOADED[source] = ctypes.CDLL(str(path))
            _FLAGS[source] = flags
            if reasons:  # correct, but slower: say so once per library
                warnings.warn(f"symtools: the monitor's C kernels were built with {' '.join(flags)} only, "
                              f"which runs slower ({'; '.join(reasons)})", stacklevel=3)
            return lib
        reasons.append(f"{' '.join(flags)}: {why}")
    raise SymtoolsError("could not build the monitor's C kernels: " + "; ".join(reasons))


def available() -> bool:
    """Whether C kernels can be built here (a tiny one is compiled and called once per process)."""
    if "ok" not in _PROBE:
        try:
            lib = load("int symtools_probe(int x) { return x + 1; }\n")
            _PROBE["ok"] = lib.symtools_probe(41) == 42
        except (SymtoolsError, OSError) as err:
            _PROBE["ok"], _PROBE["why"] = False, str(err)
    return bool(_PROBE["ok"])


def unavailable_reason() -> str:
    available()
    return str(_PROBE.get("why", ""))


def describe() -> str:
    """The compiler and the flags of every library built so far in this process (for benchmark records), or why
    there is none."""
    if not available():
        return f"no C kernels ({unavailable_reason()})"
    flags = sorted({" ".join(f) for f in _FLAGS.values()})
    return f"{compiler()} {' | '.join(flags)}"
