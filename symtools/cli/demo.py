"""``symtools demo``: the main job on the bundled defaults.

Derives the paper's three symmetries (translation, scale, rescale) and a symmetry that is not in the
paper (the nonlinear action x ↦ x/(1 − a·x) and the GL_h charge of a linear pair), prints what each implies
and writes their torch modules under ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path

from symtools.errors import SymtoolsError

HELP = "run the main demonstration on the bundled defaults"

# The declarations the demo derives; the first three are the paper's families.
DEMO_SPECS = {
    "translation": "translation",
    "scale": "scale",
    "rescale": "rescale",
    "nonlinear": "x -> x/(1 - a*x)",
    "gl_linear_pair": "gl_linear_pair",
}


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the generated modules (default: out/demo)")


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def run(args) -> int:
    from symtools.cli.derive import derive_spec
    from symtools.codegen.emit import emit
    from symtools.symbolic.render import to_text

    out = Path(args.out)
    try:
        (out / "torch").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SymtoolsError(f"cannot create {out}: {exc.strerror}") from None
    _section("1. Derive: symmetry → generator, identities, conserved quantity, torch code")
    t0 = time.perf_counter()
    written = []
    for name, spec in DEMO_SPECS.items():
        d = derive_spec(spec)
        print(f"\n[{name}]  {spec}")
        print(to_text(d))
        path = out / "torch" / f"{name}.py"
        path.write_text(emit(d))
        written.append(path)
    print(f"\nderived {len(DEMO_SPECS)} symmetries in {time.perf_counter() - t0:.1f} s")
    _section("Outputs")
    for p in written:
        print(f"  {p}")
    return 0
