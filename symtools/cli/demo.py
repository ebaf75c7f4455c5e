"""``symtools demo``: the main job on the bundled defaults — the whole journey, end to end.

1. derive the paper's three symmetries (translation, scale, rescale) and two it does not have (the
   nonlinear action x ↦ x/(1 − a·x) and the GL_h charge of a linear pair), print them, write torch modules;
2. train VGG-16-BN on the bundled digits with SGD (η = 0.1, λ = 5e-4) and the monitor, with the
   gradient/Hessian identity checks every ``--check-every`` steps;
3. plot the run (paper-style figures);
4. audit the final checkpoint against the run.
Every stage is the same code as its command (``derive``, ``train``, ``plot``, ``audit``).

Every option is validated before anything is written; a non-empty ``--out`` that this invocation did not
create is refused unless ``--force``, and the demo never deletes anything (a previous demo's run in
``--out`` is replaced by ``train --force``, which touches only the run's checkpoints and records).
"""

from __future__ import annotations

import sys
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
    p.add_argument("--out", default="out/demo", help="folder for everything the demo writes (default: out/demo)")
    p.add_argument("--model", default="vgg16_bn", help="model to train (default vgg16_bn)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--check-every", type=int, default=100, help="identity checks every K steps (default 100)")
    p.add_argument("--audit-batch", type=int, default=32, help="batch of the audit's identity checks (default 32)")
    p.add_argument("--derive-only", action="store_true", help="stop after the derivations")
    p.add_argument("--force", action="store_true",
                   help="reuse a non-empty --out (e.g. a previous demo's): its outputs are replaced")


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _derive(out: Path) -> None:
    from symtools.cli.derive import derive_spec
    from symtools.codegen.emit import emit
    from symtools.symbolic.render import to_text

    for name, spec in DEMO_SPECS.items():
        d = derive_spec(spec)
        print(f"\n[{name}]  {spec}")
        print(to_text(d))
        (out / "torch" / f"{name}.py").write_text(emit(d))


def _validate(args) -> None:
    """Every option the later stages take, checked before the demo writes anything."""
    from symtools.cli.common import check_out_dir, require
    from symtools.nn.models import MODEL_NAMES

    if args.model not in MODEL_NAMES:
        raise SymtoolsError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    for name, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1),
                               ("--check-every", args.check_every, 0), ("--audit-batch", args.audit_batch, 2)):
        if value < least:
            raise SymtoolsError(f"{name} must be at least {least}, got {value}")
    if not args.derive_only:
        require("matplotlib", "matplotlib", "plotting the run and the audit report")
    check_out_dir(args.out, force=args.force)


def run(args) -> int:
    from symtools.cli.common import make_out_dir
    from symtools.cli.main import main as cli

    _validate(args)
    out = Path(args.out)
    make_out_dir(str(out / "torch"))
    started = time.perf_counter()
    _section("1. Derive: symmetry → generator, identities, conserved quantity, torch code")
    _derive(out)
    print(f"\nderived {len(DEMO_SPECS)} symmetries in {time.perf_counter() - started:.1f} s")
    outputs = [("torch modules", out / "torch")]
    audit_code = 0
    if not args.derive_only:
        run_dir = out / "run"
        _section(f"2. Train {args.model} on the bundled digits with the conservation-law monitor")
        code = cli(["train", "--model", args.model, "--data", "digits", "--input", "32", "--steps", str(args.steps),
                    "--batch", str(args.batch), "--lr", "0.1", "--wd", "5e-4", "--stride", "10",
                    "--check-every", str(args.check_every), "--checkpoint-every", str(max(1, args.steps // 2)),
                    "--out", str(run_dir)] + (["--force"] if args.force else []))
        if code:
            return code
        _section("3. Plot the run")
        code = cli(["plot", str(run_dir)])
        if code:
            return code
        _section("4. Audit the final checkpoint against the run")
        from symtools.training import latest_checkpoint

        final = latest_checkpoint(run_dir)
        code = cli(["audit", str(final), "--run", str(run_dir), "--batch", str(args.audit_batch),
                    "--json", str(out / "audit.json"), "--report", str(out / "audit")])
        outputs += [("training run (records, checkpoints, summary.json)", run_dir),
                    ("figures", run_dir / "plots"), ("audit report (open index.html)", out / "audit"),
                    ("audit JSON", out / "audit.json")]
        if code not in (0, 1):
            return code
        audit_code = code
    _section(f"Done in {time.perf_counter() - started:.0f} s. Outputs")
    for what, path in outputs:
        print(f"  {what:<52} {path}")
    if audit_code:  # the outputs are listed either way; a demo whose audit did not pass does not exit 0
        print(f"symtools demo: the final audit did not pass (see {out / 'audit.json'})", file=sys.stderr)
    return audit_code
