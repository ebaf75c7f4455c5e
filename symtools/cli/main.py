"""Entry point of the ``symtools`` console script.

Subcommands are data: ``COMMANDS`` maps a name to the module that implements it. Each module
defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``symtools --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from symtools.errors import SymtoolsError

COMMANDS: dict[str, str] = {
    "demo": "symtools.cli.demo",
    "derive": "symtools.cli.derive",
    "symmetries": "symtools.cli.symmetries",
    "check": "symtools.cli.check",
    "train": "symtools.cli.train",
    "plot": "symtools.cli.plot",
    "audit": "symtools.cli.audit",
    "laws": "symtools.cli.laws",
    "teleport": "symtools.cli.teleport",
}

# One-line descriptions, kept here so that --help does not import torch.
SUMMARIES: dict[str, str] = {
    "demo": "run the main demonstration on the bundled defaults",
    "derive": "derive a symmetry's generator, identities, conserved quantity and torch code",
    "symmetries": "list the translation, scale and rescale groups of a model's loss, found from its graph",
    "check": "verify the gradient and Hessian identities of every symmetry group of a model (HVPs)",
    "train": "train a model with the conservation-law monitor (records, checkpoints, summary)",
    "plot": "plot a monitored run: per-layer and per-group charges vs laws and theory, momentum, residuals",
    "audit": "audit a checkpoint: charges per symmetry group, identities, comparison with init and the laws",
    "laws": "count every conservation law of gradient flow at θ (Lie-algebra rank) and compare with the library's charges",
    "teleport": "teleport a checkpoint along its symmetry orbits (steeper descent or a target curvature), checked",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2 (its default code too)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"symtools: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="symtools", description="Symmetries of neural-network losses: derive, check, train, audit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        p = sub.add_parser(name, help=SUMMARIES.get(name, ""), description=SUMMARIES.get(name, ""))
        if load is None or load == name:
            importlib.import_module(COMMANDS[name]).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except SymtoolsError as exc:
        sys.stderr.write(f"symtools {args.command}: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"symtools {args.command}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `symtools derive … | head`: the reader left; not an error of ours
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
