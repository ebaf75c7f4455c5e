"""``symtools train``: train a model on real data with the conservation-law monitor attached."""

from __future__ import annotations

import json
import sys

from symtools.cli.common import check_out_dir, make_out_dir, parse_device
from symtools.errors import SymtoolsError

HELP = "train a model with the conservation-law monitor (records, checkpoints, summary)"
OPTIMIZERS = ("sgd", "adam", "adamw")


def add_arguments(p) -> None:
    p.add_argument("--model", default="vgg16_bn", help="model name (vgg11 … vgg19_bn; default vgg16_bn)")
    p.add_argument("--data", default="digits", help="'digits' (bundled UCI digits) or a Tiny-ImageNet-style folder")
    p.add_argument("--input", type=int, default=32, help="image side, a multiple of 32 (default 32)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="torch optimizer (default sgd)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate η (default 0.1)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay λ, coupled as torch.optim.SGD does (default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum β (default 0)")
    p.add_argument("--dampening", type=float, default=0.0, help="momentum dampening τ (default 0)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    p.add_argument("--stride", type=int, default=10, help="record per-group values every STRIDE steps (default 10)")
    p.add_argument("--check-every", type=int, default=0,
                   help="run the gradient/Hessian identity checks every K steps on the live batch (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint stride in steps (default 100)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME; new or empty unless --resume/--force")
    p.add_argument("--force", action="store_true",
                   help="reuse a non-empty --out: a run in it is replaced (its checkpoints and records), other "
                        "files are left alone")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_optimizer(name: str, params, lr: float, wd: float, momentum: float, dampening: float, nesterov: bool):
    import torch

    if lr <= 0:
        raise SymtoolsError(f"--lr must be positive, got {lr}")
    if wd < 0 or momentum < 0 or not 0 <= dampening < 1:
        raise SymtoolsError("--wd and --momentum must be ≥ 0 and --dampening in [0, 1)")
    if name == "sgd":
        if nesterov and (momentum <= 0 or dampening != 0):
            raise SymtoolsError("--nesterov needs --momentum > 0 and --dampening 0")
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=momentum, dampening=dampening,
                               nesterov=nesterov)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=lr, weight_decay=wd)


def run(args) -> int:
    import torch

    from symtools.data.loader import make_loader
    from symtools.nn.graph import find_symmetries
    from symtools.nn.models import build_model
    from symtools.numeric.monitor import Monitor
    from symtools.training import train

    if args.steps < 1:
        raise SymtoolsError(f"--steps must be at least 1, got {args.steps}")
    if args.resume and args.force:
        raise SymtoolsError("--resume continues the run in --out, --force replaces it: give one of them")
    check_out_dir(args.out, force=args.force or args.resume, also=" (or --resume the run in it)")
    device = parse_device(args.device)
    batches = make_loader(args.data, args.batch, image_size=args.input, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, input_size=args.input, classes=batches.classes).to(device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.wd, args.momentum,
                               args.dampening, args.nesterov)
    make_out_dir(args.out)  # every option is valid: only now is anything written
    x0, _ = batches.batch(0)
    symmetries = find_symmetries(model, x0[:1].to(device))
    monitor = Monitor(symmetries, stride=args.stride, check_every=args.check_every, seed=args.seed)
    config = {"model": args.model, "data": args.data, "input": args.input, "classes": batches.classes,
              "batch": args.batch, "optimizer": args.optimizer, "lr": args.lr, "wd": args.wd,
              "momentum": args.momentum, "dampening": args.dampening, "nesterov": args.nesterov,
              "seed": args.seed, "steps": args.steps, "stride": args.stride, "check_every": args.check_every}
    summary = train(model, optimizer, batches, args.steps, device=device, out_dir=args.out,
                    checkpoint_every=args.checkpoint_every, callbacks=[monitor], progress=not args.quiet,
                    resume=args.resume, overwrite=args.force, config=config)
    print(json.dumps({k: summary.get(k) for k in ("steps", "max_rel_residual_discrete",
                                                   "max_rel_residual_continuous", "final_loss")}, default=str),
          file=sys.stderr if args.quiet else sys.stdout)
    print(f"run written to {args.out} (records, checkpoints, summary.json)")
    return 0
