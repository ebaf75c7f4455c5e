"""``symtools derive SPEC``: a symmetry's identity, generator, identities, conserved quantity, torch code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from symtools.errors import SymtoolsError

HELP = "derive a symmetry's generator, identities, conserved quantity and torch code"


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC",
                   help="an action such as \"w1 -> a*w1; b1 -> a*b1; w2 -> w2/a\" (group parameter a; "
                        "add '; a > 0' to restrict it), or a built-in name (translation, scale, rescale, "
                        "rescale2, gl_linear_pair, attention_qk, attention_vo, rotation_pair)")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/commands/derive.md)")
    p.add_argument("--latex", action="store_true", help="print the results as a LaTeX aligned block")
    p.add_argument("--torch", metavar="FILE", help="write the generated torch module to FILE")
    p.add_argument("--param", default="a", help="name of the group parameter (default: a)")


def derive_spec(spec: str, param: str = "a"):
    """A derivation for a spec string or a built-in name."""
    from symtools.symbolic import library
    from symtools.symbolic.action import ElementwiseAction
    from symtools.symbolic.derive import derive

    name = spec.strip()
    if "->" not in name and name in library.ELEMENTWISE:
        return derive(library.elementwise(name))
    if "->" not in name and name in library.MATRIX:
        return library.matrix(name).derive()
    if "->" not in name and name.isidentifier():
        raise SymtoolsError(f"{name!r} is neither a declaration ('SLOT -> EXPRESSION; …') nor a built-in "
                            f"({', '.join(library.names())})")
    return derive(ElementwiseAction.from_spec(spec, parameter=param))


def run(args) -> int:
    from symtools.codegen.emit import emit
    from symtools.symbolic.render import to_dict, to_latex, to_text

    d = derive_spec(args.spec, args.param)
    if args.torch:
        path = Path(args.torch)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(emit(d))
        except OSError as exc:
            raise SymtoolsError(f"cannot write {path}: {exc.strerror}") from None
    if args.json:
        out = to_dict(d)
        if args.torch:
            out["torch_module"] = str(args.torch)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(to_latex(d) if args.latex else to_text(d))
    if args.torch:
        print(f"torch module written to {args.torch}", file=sys.stderr)
    return 0
