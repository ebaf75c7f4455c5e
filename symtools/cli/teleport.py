"""``symtools teleport``: move a checkpoint's weights along its symmetry orbits to a steeper (or flatter) point of
the same loss, check that nothing else moved, and write the teleported checkpoint."""

from __future__ import annotations

import json
import sys

from symtools.cli.common import parse_device
from symtools.errors import SymtoolsError

HELP = "teleport a checkpoint along its symmetry orbits (steeper descent or a target curvature), checked"


def add_arguments(p) -> None:
    from symtools.numeric.teleport import OBJECTIVES

    p.add_argument("checkpoint", metavar="CKPT", help="a training checkpoint of `symtools train`, a state_dict "
                                                      "(.pt, weights_only) or .safetensors of a VGG")
    p.add_argument("--model", default="auto", help="vgg11 … vgg19_bn, or auto (infer from keys and shapes; default)")
    p.add_argument("--data", default="digits", help="'digits' (bundled) or an image folder (default digits)")
    p.add_argument("--batch", type=int, default=32,
                   help="teleport batch size; as many other images check the function (default 32)")
    p.add_argument("--objective", default="grad_norm", help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    p.add_argument("--steps", type=int, default=10, help="ascent steps on the Lie algebra (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="ascent step; each |t| ≤ steps·lr (default 0.05)")
    p.add_argument("--families", default="rescale", help="comma-separated families to move along (default rescale)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="arithmetic of the teleport (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", metavar="FILE", help="write the teleported checkpoint here (same layout as CKPT; a "
                                                 "training checkpoint keeps its optimizer state, carried along)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-' for stdout)")


def _optimizer_from(ckpt, model):
    """The training checkpoint's optimizer rebuilt with its saved state, or (None, why not)."""
    from symtools.numeric.optimizer_laws import CHOICES, make_optimizer

    cfg = ckpt.config or {}
    name = cfg.get("optimizer")
    if ckpt.optimizer is None or name not in CHOICES:
        return None, "no optimizer state in the checkpoint" if ckpt.optimizer is None else f"optimizer {name!r} unknown"
    values = {"lr": cfg.get("lr"), "weight_decay": cfg.get("wd"), "momentum": cfg.get("momentum"),
              "dampening": cfg.get("dampening")}
    try:
        opt = make_optimizer(name, model.parameters(), **{k: v for k, v in values.items() if v is not None})
        opt.load_state_dict(ckpt.optimizer)
    except (SymtoolsError, ValueError, KeyError, TypeError) as exc:
        return None, f"optimizer state not carried: {exc}"
    return opt, ""


def run(args) -> int:
    import torch

    from symtools.audit.loading import build_model_for
    from symtools.checkpoints import load_checkpoint_file
    from symtools.data.loader import make_loader
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.teleport import check_objective, teleport

    if args.batch < 1 or args.steps < 0 or not args.lr > 0:
        raise SymtoolsError("--batch ≥ 1, --steps ≥ 0 and --lr > 0 are needed")
    check_objective(args.objective)
    device = parse_device(args.device)
    ckpt = load_checkpoint_file(args.checkpoint)
    model, arch, notes = build_model_for(ckpt.state_dict, args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else ckpt.dtype
    model = model.to(device=device, dtype=dtype)
    optimizer, why = _optimizer_from(ckpt, model)
    data = make_loader(args.data, 2 * args.batch, image_size=arch.input_size, seed=args.seed)
    if data.classes != arch.classes:
        raise SymtoolsError(f"the model has {arch.classes} classes but --data {args.data} has {data.classes}")
    x, y = data.batch(0)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    symmetries = find_symmetries(model, x[:1])

    def progress(i, n, value):
        if not args.json or args.json != "-":
            print(f"\r  ascent {i}/{n}  objective {value:.6g}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    result = teleport(model, (x[:args.batch], y[:args.batch]), symmetries=symmetries,
                      families=[f.strip() for f in args.families.split(",") if f.strip()], objective=args.objective,
                      steps=args.steps, lr=args.lr, optimizer=optimizer, held_out=x[args.batch:], seed=args.seed,
                      progress=progress)
    out = {"checkpoint": args.checkpoint, "model": arch.name, "notes": notes + ([why] if why else []),
           **result.to_dict()}
    if args.out:
        _write(args.out, ckpt, model, optimizer, out)
        out["written"] = args.out
    if args.json:
        text = json.dumps(out, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.json != "-":
        _print(out)
    return 0


def _write(path: str, ckpt, model, optimizer, result: dict) -> None:
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
        return
    if ckpt.kind == "symtools-checkpoint":
        obj = dict(ckpt.raw)
        obj["model"] = state
        if optimizer is not None:
            obj["optimizer"] = optimizer.state_dict()
        obj["teleport"] = {k: result[k] for k in ("objective", "families", "loss_change_rel", "grad_norm_before",
                                                  "grad_norm_after", "optimizer_state")}
        torch.save(obj, path)
    else:
        torch.save(state, path)


def _print(r: dict) -> None:
    fn = r["function_change_rel"]
    kept = f"ascent step {r['chosen_step']} of {r['steps']} kept"
    if not r["chosen_step"]:
        kept += "; no improvement: weights unchanged"
    groups = ", ".join(f"{k} {v}" for k, v in r["families"].items())
    changes = ", ".join(f"{k} {v:+.4g}" for k, v in r["charge_change"].items())
    bound = r["loss_bound_rel"]
    lines = [
        (f"teleport of {r['checkpoint']} ({r['model']}), objective {r['objective']}, "
         f"{sum(r['families'].values())} groups ({groups})"),
        f"  objective        {r['objective_before']:.6g} → {r['objective_after']:.6g} ({kept})",
        f"  ‖∇L‖             {r['grad_norm_before']:.6g} → {r['grad_norm_after']:.6g}",
        (f"  loss             {r['loss_before']:.9g} → {r['loss_after']:.9g}  (change {r['loss_change_rel']:.2g} "
         f"of it; round-off bound {bound:.2g}): PASS"),
        (f"  function         held-out logits changed by {fn:.2g} of the largest (bound {bound:.2g}): PASS"
         if fn is not None else "  function         not checked (no held-out inputs)"),
        (f"  charges          each group's moved as derived (worst {r['charge_residual_max']:.3g} units of "
         f"float64 round-off): PASS; total change {changes}"),
        (f"  group elements   largest Lie-algebra coordinate |t| = {r['coordinate_max']:.3g} "
         f"(a rescale factor e^t)"),
        f"  optimizer state  {r['optimizer_state']}",
    ]
    lines += [f"  skipped          {s}" for s in r["skipped"][:5]]
    lines += [f"  note             {n}" for n in r["notes"]]
    if r.get("written"):
        lines.append(f"written to {r['written']}")
    print("\n".join(lines))
