"""``symtools check``: find every symmetry group of a model and verify its gradient and Hessian identities."""

from __future__ import annotations

import json
import sys
import time

from symtools.cli.common import (
    HF_CHECKPOINT_HELP,
    HF_CONFIG_HELP,
    hf_requested,
    parse_device,
)
from symtools.errors import SymtoolsError

HELP = "verify the gradient and Hessian identities of every symmetry group of a model (HVPs)"
DTYPES = ("float32", "float64")


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="model name (vgg11 … vgg19_bn, resnet18/34/50; default vgg16_bn, or with --weights inferred "
                        "from them)")
    p.add_argument("--input", type=int, default=None,
                   help="input image side, a multiple of 32 for VGG, ≥ 32 for ResNet (default 64, or with "
                        "--weights of a VGG inferred from them)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (default 200, or with --weights inferred from them)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--data", default=None, help="'digits' (bundled real images; the default), 'random', or an image "
                                                "folder; for --hf-config/--hf: 'stdlib-text' (the default) or 'random'")
    p.add_argument("--weights", help="state_dict (.pt, weights_only) or .safetensors, or a symtools checkpoint; "
                                     "model, input size and classes are inferred from it; default: Kaiming init")
    p.add_argument("--hf-config", metavar="DIR", help=HF_CONFIG_HELP + " (instead of --model)")
    p.add_argument("--hf", metavar="DIR", help=HF_CHECKPOINT_HELP + " (instead of --model)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence for --hf-config/--hf (default 32)")
    p.add_argument("--dtype", choices=DTYPES, default="float64", help="arithmetic of the check (default float64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--bn", choices=("batch", "eval"), default="batch",
                   help="BatchNorm statistics: batch (training math) or eval (running stats; breaks some identities)")
    p.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy",
                   help="loss evaluated (groups are found assuming cross-entropy, so mse shows what it breaks)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="add wd/2·|θ|² inside the loss (breaks identities)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data batch, the weights and the random signs")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/commands/check.md)")


def _batch(args, dtype):
    import torch

    if args.batch < 1:
        raise SymtoolsError(f"--batch must be at least 1, got {args.batch}")
    if args.data == "random":
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, 3, args.input, args.input, generator=g, dtype=dtype)
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        return x, y
    from symtools.data.loader import make_loader

    stream = make_loader(args.data, args.batch, image_size=args.input, seed=args.seed, dtype=dtype)
    x, y = next(iter(stream))
    if int(y.max()) >= args.classes:
        raise SymtoolsError(f"the data has labels up to {int(y.max())} but the model has {args.classes} classes")
    return x, y



def _model(args):
    """The model to check, with ``args.model``/``input``/``classes`` filled in.

    With ``--weights`` the file is read by the one safe loader (:mod:`symtools.checkpoints`) and, as ``audit``
    does, the architecture, input size and classes are inferred from its keys and shapes unless given; an
    explicit option that contradicts the weights is an error, not a silent override. Without weights: a
    fresh ``--model`` (default vgg16_bn, 64×64, 200 classes) initialised from ``--seed``.
    """
    from symtools.nn.models import build_model

    if not args.weights:
        if args.model == "auto":
            raise SymtoolsError("--model auto infers the model from --weights: give --weights FILE or a model name")
        args.model = args.model or "vgg16_bn"
        args.input = 64 if args.input is None else args.input
        args.classes = 200 if args.classes is None else args.classes
        return build_model(args.model, input_size=args.input, classes=args.classes)
    from symtools.audit.loading import build_model_for
    from symtools.checkpoints import load_checkpoint_file

    ckpt = load_checkpoint_file(args.weights)
    try:
        model, arch, _ = build_model_for(ckpt.state_dict, args.model or "auto")
    except SymtoolsError as exc:
        raise SymtoolsError(f"--weights {args.weights}: {exc}") from None
    fixed = getattr(arch, "input_from_weights", True)  # a ResNet's weights do not fix its input size
    for option, given, found in (("--input", args.input if fixed else None, arch.input_size),
                                 ("--classes", args.classes, arch.classes)):
        if given is not None and given != found:
            raise SymtoolsError(f"{option} {given} does not fit {args.weights}: its weights are for {option} {found} "
                                f"(leave {option} out to take it from the weights)")
    args.model, args.classes = arch.name, arch.classes
    args.input = arch.input_size if fixed or args.input is None else args.input
    return model


def _hf_model_and_batch(args, dtype):
    """``--hf-config``/``--hf``: the causal LM in ``dtype`` (random init from ``--seed``, or the checkpoint's
    weights) and one batch of ``--batch`` sequences of ``--seq-len`` tokens (``--data``: stdlib-text or random)."""
    from symtools.cli.common import check_hf_options, hf_label, hf_model, text_batch

    flag = check_hf_options(args, {"--model": args.model, "--weights": args.weights, "--input": args.input,
                                   "--classes": args.classes})
    if args.loss != "cross_entropy":
        raise SymtoolsError(f"--loss {args.loss} is for image models: a causal LM's loss is the cross-entropy of "
                            f"its (N, V, T) logits against the next tokens")
    model = hf_model(args, dtype, seed=args.seed)
    x, y = text_batch(args.data, args.batch, args.seq_len, args.seed, model.vocab_size)
    args.model = hf_label(model, flag, args.hf_config or args.hf)
    return model, x, y


def run(args) -> int:
    import torch

    from symtools.nn.graph import find_symmetries
    from symtools.numeric.checker import check

    dtype = getattr(torch, args.dtype)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    if hf_requested(args):
        model, x, y = _hf_model_and_batch(args, dtype)
    else:
        args.data = args.data or "digits"
        model = _model(args)
        x, y = _batch(args, dtype)
    model = model.to(device=device, dtype=dtype)
    x, y = x.to(device), y.to(device)
    say = (lambda m: print(f"[check] {m}", file=sys.stderr)) if not args.json else None
    t0 = time.perf_counter()
    if hf_requested(args):
        from symtools.nn.hf import symmetries_or_blocked

        symmetries = symmetries_or_blocked(model, x[:1])
    else:
        symmetries = find_symmetries(model, x[:1])
    report = check(model, x, y, symmetries, loss=args.loss, bn=args.bn, weight_decay=args.weight_decay,
                   seed=args.seed, progress=say)
    elapsed = time.perf_counter() - t0
    out = report.to_dict()
    out.update(model=args.model, parameters=sum(p.numel() for p in model.parameters()), seconds=elapsed,
               device=str(device), blocked=[{"node": b.node, "reason": b.reason} for b in symmetries.blocked])
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(render_table(out))
    return EXIT[report.verdict]


#: exit status per verdict (2 is a bad input, as for every command)
EXIT = {"pass": 0, "fail": 1, "inconclusive": 3, "no_groups": 4}

VERDICT_LINE = {
    "pass": "PASS",
    "fail": "FAIL",
    "inconclusive": "INCONCLUSIVE at this precision (no group fails; some exceed their round-off bound by less "
                    "than the gray zone): rerun with --dtype float64",
    "no_groups": "NO SYMMETRY GROUPS FOUND: nothing was checked (see the notes above for where the graph walk stopped)",
}


def render_table(out: dict) -> str:
    t = out["tolerance"]
    lines = [f"{out['model']}: {out['parameters']:,} parameters, batch {out['settings']['batch']}, {t['dtype']}, "
             f"BN {out['settings']['bn']}, loss {out['settings']['loss']}",
             f"bound per group: {t['safety_factor']:g} × u ({t['unit_roundoff']:.1e}) × the magnitudes of the terms "
             f"each identity sums (× √terms per sum); ratio = |residual| / bound"
             + ("" if t["gray_zone"] == 1 else f", FAIL above {t['gray_zone']:g}, inconclusive in (1, {t['gray_zone']:g}]"),
             f"detection limit: a group is flagged once its residual exceeds its bound, i.e. a relative breaking of "
             f"~{t['relative']:.0e}·√n of its terms' size (n: terms per sum); measured by injecting a breaking into one "
             f"group of VGG-16-BN: docs/benchmarks.md, 'Checker detection limits'",
             f"{'family':<12}{'groups':>8}{'grad max rel':>14}{'ratio':>8}{'Hess max rel':>14}{'ratio':>8}  result"]
    for name, f in out["families"].items():
        lines.append(f"{name:<12}{f['groups']:>8}{f['gradient']['max_rel_residual']:>14.2e}"
                     f"{f['gradient']['max_ratio']:>8.2g}{f['hessian']['rel_residual']:>14.2e}"
                     f"{f['hessian']['max_ratio']:>8.2g}  " + f["verdict"].upper())
        if f.get("kind") == "matrix":  # symtools.numeric.matrix_checks: one h×h identity per group
            algebras = sorted({lr.get("algebra", "") for lr in f["layers"]})
            lines.append(f"{'':<12}matrix family: Lie algebra dimension {f['dimension']} in all "
                         f"({', '.join(algebras)} per group); ratio: largest over each group's algebra coefficients")
        if f.get("epsilon"):
            lines.append(f"{'':<12}BatchNorm ε breaks ⟨g,θ⟩ by up to {f['epsilon']['max_rel_breaking']:.1e} "
                         f"(relative); predicted exactly and removed")
        for kind, key in (("failing", "failing_groups"), ("inconclusive", "inconclusive_groups")):
            n = max(f["gradient"][key], f["hessian"][key])
            bad = [lr for lr in f["layers"] if lr[kind]]
            if not n:
                continue
            lines.append(f"{'':<12}{kind}: {f['gradient'][key]} groups (gradient identity), {f['hessian'][key]} "
                         f"(Hessian identity), in {len(bad)} layers:")
            for lr in bad[:8]:
                shown = ", ".join(f"#{j}" for j in lr[kind][:6])
                lines.append(f"{'':<14}{lr['layer']}: ratio gradient {lr['gradient_max_ratio']:.2g}, Hessian "
                             f"{lr['hessian_max_ratio']:.2g} ({shown}{', …' if len(lr[kind]) > 6 else ''})")
            if len(bad) > 8:
                lines.append(f"{'':<14}… and {len(bad) - 8} more layers (--json lists them all)")
        rough = [lr["layer"] for lr in f["layers"] if lr.get("bound") == "gradient-sized"]
        if rough:
            lines.append(f"{'':<12}note: no term magnitudes for {', '.join(rough[:3])}"
                         f"{' …' if len(rough) > 3 else ''} (layers other than Linear/Conv/BatchNorm/LayerNorm): "
                         f"their bound is gradient-sized, a heuristic")
    h = out["hvps"]
    lines.append(f"HVPs: {h['verification']} in all (one per random direction, every group of every family at once), "
                 f"instead of {h['per_group_naive']} one per group")
    for b in out.get("blocked", []):
        lines.append(f"note: {b['reason']} ({b['node']})")
    lines.append(VERDICT_LINE[out["verdict"]] + f" in {out['seconds']:.1f} s")
    return "\n".join(lines)
