"""``symtools check``: find every symmetry group of a model and verify its gradient and Hessian identities."""

from __future__ import annotations

import json
import sys
import time

from symtools.cli.common import parse_device
from symtools.errors import SymtoolsError

HELP = "verify the gradient and Hessian identities of every symmetry group of a model (HVPs)"
DTYPES = ("float32", "float64")


def add_arguments(p) -> None:
    p.add_argument("--model", default="vgg16_bn", help="model name (vgg11 … vgg19_bn; default vgg16_bn)")
    p.add_argument("--input", type=int, default=64, help="input image side, a multiple of 32 (default 64)")
    p.add_argument("--classes", type=int, default=200, help="number of classes (default 200)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--data", default="digits", help="'digits' (bundled real images), 'random', or an image folder")
    p.add_argument("--weights", help="state_dict or symtools checkpoint to load (weights_only); default: Kaiming init")
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



def load_weights(model, path: str) -> None:
    """Load a torchvision-layout state_dict or a symtools checkpoint into ``model`` (safe loading only)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SymtoolsError(f"no such file: {path}") from None
    except Exception as exc:  # unpickling refused, truncated file, …
        raise SymtoolsError(f"cannot load {path} safely ({type(exc).__name__}); save a plain state_dict of "
                            f"tensors with torch.save(model.state_dict(), path)") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise SymtoolsError(f"{path} holds no state_dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SymtoolsError(f"{path} does not fit the model: missing {list(missing)[:4]}, "
                            f"unexpected {list(unexpected)[:4]}")


def run(args) -> int:
    import torch

    from symtools.nn.graph import find_symmetries
    from symtools.nn.models import build_model
    from symtools.numeric.checker import check

    dtype = getattr(torch, args.dtype)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, input_size=args.input, classes=args.classes)
    if args.weights:
        load_weights(model, args.weights)
    model = model.to(device=device, dtype=dtype)
    x, y = _batch(args, dtype)
    x, y = x.to(device), y.to(device)
    say = (lambda m: print(f"[check] {m}", file=sys.stderr)) if not args.json else None
    t0 = time.perf_counter()
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
    return 0 if report.passed else 1


def render_table(out: dict) -> str:
    t = out["tolerance"]
    lines = [f"{out['model']}: {out['parameters']:,} parameters, batch {out['settings']['batch']}, {t['dtype']}, "
             f"BN {out['settings']['bn']}, loss {out['settings']['loss']}",
             f"tolerance: gradient {t['gradient']:.1e}, Hessian {t['hessian']:.1e} "
             f"(= {t['safety_factor']:g} × measured round-off floor or machine ε)",
             f"{'family':<12}{'groups':>8}{'grad max rel':>15}{'Hess rel':>12}{'HVPs':>6}  result"]
    per = t.get("calibration") == "float64"
    if per:
        lines[1] = (f"tolerance: gradient ≤ {t['gradient']:.1e} per layer, Hessian ≤ {t['hessian']:.1e} per family "
                    f"(= {t['safety_factor']:g} × round-off floor measured against float64, or machine ε)")
    if not t.get("gradient_resolved", True):
        where = t.get("unresolved_layers") or []
        if per and where:
            shown = ", ".join(where[:4]) + (f", … ({len(where)} layers)" if len(where) > 4 else "")
            lines.insert(2, f"warning: {t['dtype']} does not resolve the gradient identities of {shown}: their "
                            f"round-off puts the tolerance at ≥ 1, where no relative residual can fail (every other "
                            f"layer is resolved); use --dtype float64 for those")
        else:
            lines.insert(2, f"warning: the round-off floor ({t['gradient_roundoff_floor']:.1e}) puts the gradient "
                            f"tolerance at ≥ 1, where no relative residual can fail: {t['dtype']} does not resolve "
                            f"the gradient identities of this model and batch; use --dtype float64")
    for name, f in out["families"].items():
        lines.append(f"{name:<12}{f['groups']:>8}{f['gradient']['max_rel_residual']:>15.2e}"
                     f"{f['hessian']['rel_residual']:>12.2e}{f['hessian']['hvps']:>6}  "
                     + ("PASS" if f["pass"] else "FAIL"))
        if f.get("epsilon"):
            lines.append(f"{'':<12}BatchNorm ε breaks ⟨g,θ⟩ by up to {f['epsilon']['max_rel_breaking']:.1e} "
                         f"(relative); predicted exactly and removed")
        if not f["gradient"]["pass"]:
            bad = [lr for lr in f["layers"] if lr["failing"]]
            lines.append(f"{'':<12}gradient identity fails for {f['gradient']['failing_groups']} groups in "
                         f"{len(bad)} layers:")
            for lr in bad[:8]:
                shown = ", ".join(f"#{j}" for j in lr["failing"][:6])
                lines.append(f"{'':<14}{lr['layer']}: max rel {lr['gradient_max_rel']:.1e} > tol "
                             f"{lr['gradient_tolerance']:.1e} ({shown}{', …' if len(lr['failing']) > 6 else ''})")
            if len(bad) > 8:
                lines.append(f"{'':<14}… and {len(bad) - 8} more layers (--json lists them all)")
        for item in f["hessian"]["located"][:5]:
            lines.append(f"{'':<12}failing group: {item['layer']} #{item['group']}")
        if len(f["hessian"]["located"]) > 5:
            lines.append(f"{'':<12}… {len(f['hessian']['located']) - 5} more located (--json lists them all)")
    h = out["hvps"]
    floor = ("round-off floor from a permuted-batch gradient (no HVP)" if not per else
             f"+ {h['calibration']} HVPs on {out['settings'].get('calibration_samples') or 4} samples for the "
             f"round-off floors ({t['dtype']} against float64)")
    lines.append(f"HVPs: {h['verification'] + h['reference']} on the batch: {h['verification']} for verification + "
                 f"{h['reference']} reference (size of H), instead of {h['per_group_naive']} one per group; {floor}")
    for b in out.get("blocked", []):
        lines.append(f"note: {b['reason']} ({b['node']})")
    lines.append(("PASS" if out["pass"] else "FAIL") + f" in {out['seconds']:.1f} s")
    return "\n".join(lines)
