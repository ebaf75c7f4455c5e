#!/usr/bin/env python
"""Benchmark of the symbolic engine: derive + emit torch code for the paper's families and for GL_3.

    python checks/bench_derive.py [--repeats 3] [--doc docs/benchmarks.md] [--no-doc] [--strict]

What is timed (``time.perf_counter``, best of ``--repeats``), each with SymPy's cache cleared first so a
repeat does not reuse the previous one's memoised results:
  * ``paper families``: for translation, scale and rescale, ``derive(library.elementwise(name))`` then
    ``emit`` and ``load_module`` (the emitted source compiled and executed, i.e. usable torch code).
    Target: < 3 s for the three together.
  * ``GL_3 pair``: ``library.matrix('gl_linear_pair').derive()`` (symbolic derivation plus the explicit
    verification at h = 3: curl test on 9 basis generators, ∇Q_E in the span of the generators) then
    ``emit`` and ``load_module``. Target: < 20 s.
Imports (SymPy, torch) are done before timing and reported separately.

Prints a table and replaces the "Symbolic engine" section of ``docs/benchmarks.md`` (creating the file,
with its conventions header, if needed). ``--strict`` exits 1 when a target is missed.
"""

from __future__ import annotations

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Symbolic engine"
FAMILIES = ("translation", "scale", "rescale")
TARGETS = {"paper families (3)": 3.0, "GL_3 pair": 20.0}

HEADER = """# Benchmarks

Speed and memory targets of symtools are measured by the scripts in `checks/` (never by tests), and each
script rewrites its own section of this page. Conventions:

* Every number in a section comes from **one run** of its script, on the machine described in that section
  (`platform.processor()`, `os.cpu_count()`, Python, torch and SymPy versions, and the 1-minute load average
  when the run started, since other work may share the machine). Ratios are taken between numbers of the same
  run; timings from different sections or machines are not comparable.
* Times are wall-clock (`time.perf_counter`), **best of N** repeats (N stated), after warm-up imports.
* A GPU run, when a device is available, is recorded the same way in its own section.
"""


def machine() -> dict[str, str]:
    import sympy

    return benchdoc.machine(threads=False, versions={"sympy": sympy.__version__})


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    from sympy.core.cache import clear_cache

    times = []
    for _ in range(repeats):
        clear_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def imports() -> float:
    """Import SymPy, torch (the emitted modules use it) and the engine; seconds taken (first import only)."""
    t0 = time.perf_counter()
    import sympy  # noqa: F401
    import torch  # noqa: F401

    import symtools.codegen.emit  # noqa: F401
    import symtools.symbolic.derive  # noqa: F401
    import symtools.symbolic.library  # noqa: F401
    return time.perf_counter() - t0


def run(repeats: int) -> list[tuple[str, float, list[float], float | None]]:
    from symtools.codegen.emit import emit, load_module
    from symtools.symbolic import library
    from symtools.symbolic.derive import derive

    def family(name):
        def go():
            d = derive(library.elementwise(name))
            load_module(emit(d), f"bench_{name}")
        return go

    def families():
        for name in FAMILIES:
            family(name)()

    def gl():
        d = library.matrix("gl_linear_pair").derive()
        assert d.charge is not None, d.reason
        load_module(emit(d), "bench_gl")

    rows = []
    for name in FAMILIES:
        best, times = best_of(family(name), repeats)
        rows.append((f"{name} (alone)", best, times, None))
    best, times = best_of(families, repeats)
    rows.append(("paper families (3)", best, times, TARGETS["paper families (3)"]))
    best, times = best_of(gl, repeats)
    rows.append(("GL_3 pair", best, times, TARGETS["GL_3 pair"]))
    return rows


def table(rows, extra, repeats) -> str:
    lines = [f"| what (derive + emit + load, SymPy cache cleared) | best of {repeats} [s] | all runs [s] "
             "| target [s] | met |",
             "|---|---:|---|---:|:---:|"]
    for name, best, times, target in rows:
        runs = ", ".join(f"{t:.3f}" for t in times)
        tgt = "" if target is None else f"{target:g}"
        met = "" if target is None else ("yes" if best < target else "**no**")
        lines.append(f"| {name} | {best:.3f} | {runs} | {tgt} | {met} |")
    for name, t in extra.items():
        lines.append(f"| {name} (once, before timing) | {t:.3f} | | | |")
    return "\n".join(lines)


def section(rows, extra, repeats, info) -> str:
    desc = ", ".join(f"{k} {v}" for k, v in info.items())
    return (f"## {SECTION}\n\n"
            f"`python checks/bench_derive.py` — deriving the paper's three families (translation, scale, rescale) "
            f"and the GL_3 pair (`library.matrix('gl_linear_pair')`, whose charge is verified explicitly at h = 3), "
            f"each followed by emitting its torch module and loading it. The first of the runs also pays SymPy's "
            f"one-time lazy imports (solvers, printers), which clearing the cache does not undo; the best of the "
            f"runs is the steady cost.\n\n"
            f"Machine: {desc}.\n\n{table(rows, extra, repeats)}\n")



def update_doc(path: Path, text: str) -> None:
    benchdoc.update_doc(path, SECTION, text, HEADER)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    extra = {"imports (sympy, torch, engine)": imports()}
    info = machine()
    rows = run(args.repeats)
    text = section(rows, extra, args.repeats, info)
    print(text)
    if not args.no_doc:
        update_doc(args.doc, text)
        print(f"updated section '{SECTION}' of {args.doc}")
    missed = [name for name, best, _, target in rows if target is not None and best >= target]
    if missed:
        print(f"target missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
