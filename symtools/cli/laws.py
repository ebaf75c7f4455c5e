"""``symtools laws``: count every independent conservation law of gradient flow of a model at θ, numerically,
and compare the count with the charges of the library's symmetries (docs/commands/laws.md).

Models: ``mlp:IN-H1-…-OUT`` (e.g. ``mlp:4-3-2``), ``cnn:C-c1-…-CLASSES@SIZE`` (3×3 convs, max-pool 2,
e.g. ``cnn:1-2-3@4``), or a built-in name (vgg11 … vgg19_bn, refused above ``--max-parameters``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from symtools.errors import SymtoolsError

HELP = "count every conservation law of gradient flow at θ (Lie-algebra rank) and compare with the library's charges"
ACTIVATIONS = {"linear": "identity", "relu": "relu", "leaky_relu": "leaky_relu"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="mlp:IN-H1-...-OUT (e.g. mlp:4-3-2), cnn:C-c1-...-CLASSES@SIZE (e.g. cnn:1-2-3@4), or vgg11 … "
                        "vgg19 (no BatchNorm)")
    p.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu", help="hidden activation (default relu)")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True, help="biases (default: --bias)")
    p.add_argument("--loss", choices=("any", "cross_entropy"), default="any",
                   help="any loss of the outputs (default), or cross-entropy (softmax sees only logit differences)")
    p.add_argument("--flow", choices=("gradient", "momentum", "both"), default="both",
                   help="gradient flow, heavy-ball flow in phase space, or both (default)")
    p.add_argument("--gamma", type=float, default=1.0, help="friction γ of the heavy-ball flow (default 1)")
    p.add_argument("--inputs", type=int, default=None, help="random inputs (default ⌈8·D/outputs⌉ + 64, at least 4096 up to 500 parameters)")
    p.add_argument("--screen", type=int, default=None,
                   help="inputs screened for fields outside the level-0 span, those found are added (default "
                        "100000; 0: no screening)")
    p.add_argument("--min-gap", type=float, default=None, help="smallest singular-value gap accepted (default 1e6)")
    p.add_argument("--max-levels", type=int, default=6, help="bracket levels computed at most (default 6)")
    p.add_argument("--max-parameters", type=int, default=20_000, help="refuse larger models (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs, velocity and brackets")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys in docs/commands/laws.md)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build(spec: str, activation: str = "relu", bias: bool = True, seed: int = 0):
    """(model in float64, shape of one input, description) for a ``--model`` spec."""
    import torch

    from symtools.nn.small import cnn, mlp

    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    if spec.startswith("mlp:"):
        widths = _widths(spec, spec[4:])
        if len(widths) < 2:
            raise SymtoolsError(f"--model {spec}: an MLP needs at least IN-OUT, e.g. mlp:4-3-2")
        return mlp(widths[0], widths[1:-1], widths[-1], activation=act, bias=bias).double(), (widths[0],), spec
    if spec.startswith("cnn:"):
        m = re.fullmatch(r"cnn:([0-9-]+)@(\d+)", spec)
        if not m:
            raise SymtoolsError(f"--model {spec}: a CNN is cnn:C-c1-...-CLASSES@SIZE, e.g. cnn:1-2-3@4")
        widths, size = _widths(spec, m.group(1)), int(m.group(2))
        if len(widths) < 2:
            raise SymtoolsError(f"--model {spec}: a CNN needs at least C-CLASSES")
        model = cnn(widths[0], widths[1:-1], widths[-1], input_size=size, activation=act, bias=bias)
        return model.double(), (widths[0], size, size), spec
    from symtools.nn.models import MODEL_NAMES, build_model

    if spec not in MODEL_NAMES:
        raise SymtoolsError(f"unknown model {spec!r}: use mlp:IN-H-…-OUT, cnn:C-c-…-CLASSES@SIZE or one of "
                            f"{', '.join(MODEL_NAMES)}")
    model = build_model(spec, input_size=32, classes=10)
    return model.double(), (3, 32, 32), f"{spec} (32×32, 10 classes)"


def _widths(spec: str, text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split("-")]
    except ValueError:
        raise SymtoolsError(f"--model {spec}: widths must be positive integers separated by '-'") from None
    if any(w < 1 for w in widths):
        raise SymtoolsError(f"--model {spec}: widths must be positive")
    return widths


def report(args: argparse.Namespace, progress=None) -> dict:
    from symtools.numeric.conservation_count import (
        MIN_GAP,
        FlatModel,
        compare_with_charges,
        count_laws,
    )

    model, shape, label = build(args.model, args.activation, args.bias, args.seed)
    d = sum(p.numel() for p in model.parameters())
    if d > args.max_parameters:
        raise SymtoolsError(f"{label} has {d:,} parameters, above --max-parameters {args.max_parameters:,}")
    if args.min_gap is not None and args.min_gap <= 1:
        raise SymtoolsError(f"--min-gap must be above 1, got {args.min_gap}")
    if args.inputs is not None and args.inputs < 1:
        raise SymtoolsError(f"--inputs must be at least 1, got {args.inputs}")
    if args.screen is not None and args.screen < 0:
        raise SymtoolsError(f"--screen must be 0 or more, got {args.screen}")
    kw = dict(inputs=args.inputs, screen=args.screen, loss=args.loss, seed=args.seed,
              min_gap=args.min_gap or MIN_GAP, max_levels=args.max_levels, progress=progress)
    flat = FlatModel(model, centered=args.loss == "cross_entropy")
    out: dict = {"model": label, "activation": args.activation, "bias": args.bias, "loss": args.loss,
                 "seed": args.seed, "parameters": d}
    if args.flow in ("gradient", "both"):
        count = count_laws(model, shape, flat=flat, **kw)
        cmp = compare_with_charges(count, flat, shape, args.loss, kw["min_gap"])
        out.update({"rank": count.rank, "laws": count.laws, "explained_by_charges": cmp.explained_by_charges,
                    "unexplained": cmp.unexplained, "levels": count.levels, "gap": count.gap,
                    "gradient_flow": count.as_dict(), "charges": cmp.as_dict()})
    from symtools.numeric.conservation_count.count import DENSE_LIMIT

    if args.flow in ("momentum", "both") and 2 * d > DENSE_LIMIT:
        why = (f"the phase space has 2·{d} dimensions, above the dense limit {DENSE_LIMIT}: the heavy-ball count "
               f"is only implemented with the dense SVD")
        if args.flow == "momentum":
            raise SymtoolsError(why)
        out["momentum"] = {"skipped": why}
    elif args.flow in ("momentum", "both"):
        mom = count_laws(model, shape, flow="momentum", gamma=args.gamma, flat=flat, **kw)
        mcmp = compare_with_charges(mom, flat, shape, args.loss, kw["min_gap"])
        out["momentum"] = {**mom.as_dict(), "library_charges_conserved": mcmp.explained_by_charges,
                           "library_charges": mcmp.charges}
    return out


def format_text(rep: dict) -> str:
    lines = [f"{rep['model']} ({rep['activation']}, {'bias' if rep['bias'] else 'no bias'}, loss {rep['loss']}): "
             f"{rep['parameters']} parameters"]
    if "laws" in rep:
        g, c = rep["gradient_flow"], rep["charges"]
        fams = ", ".join(f"{k} {v['charges']}" for k, v in c["families"].items())
        lines += [f"gradient flow: rank {rep['rank']} of {rep['parameters']} -> {rep['laws']} independent "
                  f"conservation laws",
                  f"  rank per level {g['level_ranks']} ({rep['levels']} bracket level(s) needed, "
                  f"{g['levels_checked']} computed); {g['inputs']} inputs"
                  + (f" + {g['screen_added']} of {g['screened']} screened (largest ratio left "
                     f"{g['screen_max_below']:.1e} <= 1e-9)" if g["screened"] else " (no screening)"),
                  f"  smallest singular-value gap {rep['gap']:.2g} (criterion: >= 1e6 unless --min-gap)",
                  f"  library charges: {c['charges']} ({fams or 'none'}), "
                  f"{rep['explained_by_charges']} functionally independent; "
                  + (f"each gradient orthogonal to every field value (brackets included) up to |cos| "
                     f"{c['max_cosine']:.1e}, and in the law complement up to {c['max_outside']:.1e}"
                     if not c["not_conserved"] else f"NOT all conserved (max |cos| {c['max_cosine']:.1e})"),
                  f"  explained by the library's charges: {rep['explained_by_charges']} of {rep['laws']}"]
        if c["not_conserved"]:
            lines.append(f"  NOT conserved (excluded): {', '.join(c['not_conserved'][:5])}")
        if rep["unexplained"] > 0:
            where = ", ".join(f"{k} {v}" for k, v in c["unexplained_location"].items())
            lines.append(f"  {rep['unexplained']} law(s) no declared symmetry explains; they live on: {where}")
        elif rep["unexplained"] == 0:
            lines.append("  every law is explained by a declared symmetry")
    if "momentum" in rep and "skipped" in rep["momentum"]:
        lines.append(f"heavy-ball flow: skipped ({rep['momentum']['skipped']})")
    elif "momentum" in rep:
        m = rep["momentum"]
        lines.append(f"heavy-ball flow (γ = {m['gamma']}, phase space of dimension {m['dimension']}): rank "
                     f"{m['rank']} -> {m['laws']} conservation laws (levels {m['level_ranks']}, gap {m['gap']:.2g}); "
                     f"library charges conserved: {m['library_charges_conserved']} of {m['library_charges']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    progress = None if args.quiet else (lambda msg: print(f"[laws] {msg}", file=sys.stderr, flush=True))
    rep = report(args, progress)
    print(json.dumps(rep, indent=2, ensure_ascii=False) if args.json else format_text(rep))
    return 0
