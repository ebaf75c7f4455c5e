"""``symtools plot``: figures of a monitored training run (paper Figs 5, 6, 8–10 style), PNG and PDF."""

from __future__ import annotations

HELP = "plot a monitored run: per-layer and per-group charges vs laws and theory, momentum, residuals"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="run directory written by `symtools train` (e.g. runs/NAME)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the figures (default RUN/plots)")
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="only these families (translation, scale, rescale; default: all the run recorded)")
    p.add_argument("--max-groups", type=int, default=16, metavar="N",
                   help="groups (neurons/channels) drawn per layer in the per-group figures (default 16)")


def run(args) -> int:
    from symtools.cli.common import require
    from symtools.plots import plot_run

    require("matplotlib", "matplotlib", "plotting")

    written, notes = plot_run(args.run, args.out, families=args.families, max_groups=args.max_groups)
    for note in notes:
        print(f"skipped {note}")
    print(f"wrote {len(written)} files:")
    for path in written:
        print(f"  {path}")
    return 0
