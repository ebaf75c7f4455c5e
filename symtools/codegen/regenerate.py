"""Regenerate the torch modules of the built-in symmetry library into ``symtools/codegen/generated``.

Run ``python -m symtools.codegen.regenerate`` after changing the engine, the printer or the library;
``--check`` exits 1 (listing the stale files) instead of writing, which is what the tests use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from symtools.codegen import emit_laws
from symtools.codegen.emit import emit
from symtools.symbolic import library
from symtools.symbolic.derive import derive

GENERATED = Path(__file__).with_name("generated")


def sources() -> dict[str, str]:
    """Module name → source for every built-in symmetry (derived now, not read from disk)."""
    out = {name: emit(derive(library.elementwise(name))) for name in library.ELEMENTWISE}
    out.update({name: emit(library.matrix(name).derive()) for name in library.MATRIX})
    out.update(emit_laws.sources())  # law_<family>_<optimizer>: per-step charge laws under optimizers
    return out


def stale(directory: Path = GENERATED) -> list[str]:
    return [name for name, src in sources().items()
            if not (directory / f"{name}.py").exists() or (directory / f"{name}.py").read_text() != src]


def write(directory: Path = GENERATED) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    srcs = sources()
    for name, src in srcs.items():
        path = directory / f"{name}.py"
        path.write_text(src)
        paths.append(path)
    (directory / "__init__.py").write_text(
        '"""Generated torch modules of the built-in symmetries (see symtools.codegen.regenerate)."""\n\n'
        f"NAMES = {tuple(n for n in srcs if not n.startswith(emit_laws.PREFIX))!r}\n"
        f"LAWS = {tuple(n for n in srcs if n.startswith(emit_laws.PREFIX))!r}\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report modules that differ from a fresh derivation")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            print(f"stale: {GENERATED / (name + '.py')}")
        return 1 if bad else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
