"""``symtools train``: train a model on real data with the conservation-law monitor attached."""

from __future__ import annotations

import json
import sys

from symtools.cli.common import (
    HF_CHECKPOINT_HELP,
    HF_CONFIG_HELP,
    check_out_dir,
    hf_requested,
    make_out_dir,
    parse_device,
)
from symtools.errors import SymtoolsError

HELP = "train a model with the conservation-law monitor (records, checkpoints, summary)"


def _choices() -> tuple[str, ...]:
    """The declared optimizer laws (symtools.symbolic.optimizers), in declaration order."""
    from symtools.numeric.optimizer_laws import CHOICES

    return CHOICES


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model name (vgg11 … vgg19_bn, resnet18/34/50; default vgg16_bn)")
    p.add_argument("--hf-config", metavar="DIR", help=HF_CONFIG_HELP + " (instead of --model; trained on stdlib-text)")
    p.add_argument("--hf", metavar="DIR", help=HF_CHECKPOINT_HELP + " (instead of --model: training starts from it)")
    p.add_argument("--data", default=None, help="'digits' (bundled UCI digits; the default) or a Tiny-ImageNet-style "
                                                "folder; for --hf-config/--hf: 'stdlib-text' (the default)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence for --hf-config/--hf (default 64)")
    p.add_argument("--input", type=int, default=32,
                   help="image side, a multiple of 32 for VGG, ≥ 32 for ResNet (default 32)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--optimizer", choices=_choices(), default=None,
                   help="optimizer law, run by its torch class (default: torch.optim.SGD, its law picked by "
                        "--momentum/--nesterov: sgd, momentum or nesterov)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate η (default 0.1)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay λ, coupled as torch.optim.SGD does (default 5e-4)")
    p.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum β of SGD (default 0)")
    p.add_argument("--dampening", type=float, default=0.0, help="momentum dampening τ (default 0)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    p.add_argument("--stride", type=int, default=10, help="record per-group values every STRIDE steps (default 10)")
    p.add_argument("--check-every", type=int, default=0,
                   help="run the gradient/Hessian identity checks every K steps on the live batch (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint stride in steps (default 100)")
    p.add_argument("--monitor-reducer", choices=("auto", "compiled", "sites", "flat"), default="auto",
                   help="how the monitor sums its densities (same sums, different speed; default auto: compiled on "
                        "a CPU with a C compiler, sites on one without, flat on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME; new or empty unless --resume/--force")
    p.add_argument("--force", action="store_true",
                   help="reuse a non-empty --out: a run in it is replaced (its checkpoints and records), other "
                        "files are left alone")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = p.add_argument_group("teleportation (docs/commands/teleport.md)")
    t.add_argument("--teleport-every", type=int, default=0, metavar="N",
                   help="teleport the weights along the symmetry orbits every N steps (0: never)")
    t.add_argument("--teleport-objective", default="grad_norm",
                   help="grad_norm (steeper descent, default), curvature_min, curvature_max or curvature=K (a "
                        "target curvature along the gradient)")
    t.add_argument("--teleport-steps", type=int, default=5, help="ascent steps per teleport (default 5)")
    t.add_argument("--teleport-lr", type=float, default=0.05,
                   help="ascent step on the Lie algebra; each |t| ≤ steps·lr (default 0.05)")
    t.add_argument("--teleport-families", default="rescale",
                   help="comma-separated families to teleport along (default rescale)")


def make_optimizer(name: str | None, params, lr: float, wd: float, momentum: float, dampening: float,
                   nesterov: bool):
    """The torch optimizer of law ``name`` (``torch.optim.<its declared class>``); ``name`` None: torch.optim.SGD
    with the law its flags give (sgd, momentum or nesterov). Bad combinations raise SymtoolsError."""
    from symtools.numeric.optimizer_laws import (
        CHOICES,
        declaration,
        law_of_group,
        torch_class,
    )
    from symtools.numeric.optimizer_laws import make_optimizer as build

    if lr <= 0:
        raise SymtoolsError(f"--lr must be positive, got {lr}")
    if wd < 0 or momentum < 0 or not 0 <= dampening < 1:
        raise SymtoolsError("--wd and --momentum must be ≥ 0 and --dampening in [0, 1)")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise SymtoolsError("--nesterov needs --momentum > 0 and --dampening 0")
    if name is None:
        name = law_of_group({"momentum": momentum, "dampening": dampening, "nesterov": nesterov},
                            torch_class(CHOICES[0]))
    elif nesterov and not declaration(name).flags.get("nesterov"):
        raise SymtoolsError(f"--nesterov does not go with --optimizer {name}")
    values = {"lr": lr, "weight_decay": wd, "momentum": momentum, "dampening": dampening}
    try:
        return build(name, params, **values)
    except SymtoolsError as exc:
        raise SymtoolsError(f"--optimizer {name}: {exc}") from None


def _hf_model_and_data(args):
    """``--hf-config``/``--hf``: the float32 causal LM (random init from ``--seed``, or the checkpoint's weights)
    and the ``stdlib-text`` stream of ``--batch`` sequences of ``--seq-len`` tokens, seeded by ``--seed``."""
    import torch

    from symtools.cli.common import check_hf_options, hf_label, hf_model
    from symtools.data.loader import make_loader

    flag = check_hf_options(args, {"--model": args.model})
    if args.data not in (None, "stdlib-text"):
        raise SymtoolsError(f"--data {args.data}: a causal LM is trained on 'stdlib-text' (the default)")
    if args.seq_len < 1:
        raise SymtoolsError(f"--seq-len must be at least 1, got {args.seq_len}")
    args.data = "stdlib-text"
    batches = make_loader(args.data, args.batch, seed=args.seed, seq_len=args.seq_len)
    model = hf_model(args, torch.float32, seed=args.seed)
    if model.vocab_size < batches.classes:
        raise SymtoolsError(f"the model's vocabulary has {model.vocab_size} tokens, fewer than the 256 byte values "
                            f"of {args.data}")
    args.model = hf_label(model, flag, args.hf_config or args.hf)
    return model, batches


def _check_reducer(reducer: str, device) -> None:
    """Refuse a monitor reducer that cannot run here before anything is built or written."""
    if reducer == "compiled":
        from symtools.numeric import native

        if device.type != "cpu":
            raise SymtoolsError(f"--monitor-reducer compiled runs on the CPU, not on {device}: use flat (or auto)")
        if not native.available():
            raise SymtoolsError(f"--monitor-reducer compiled needs a C compiler ({native.unavailable_reason()}): "
                                "use sites (or auto)")


def run(args) -> int:
    import torch

    from symtools.data.loader import make_loader
    from symtools.nn.graph import find_symmetries
    from symtools.nn.models import build_model
    from symtools.numeric.monitor import Monitor
    from symtools.numeric.optimizer_laws import law_of_optimizer
    from symtools.training import train

    if args.steps < 1:
        raise SymtoolsError(f"--steps must be at least 1, got {args.steps}")
    if args.resume and args.force:
        raise SymtoolsError("--resume continues the run in --out, --force replaces it: give one of them")
    if args.teleport_every < 0 or args.teleport_steps < 0 or not args.teleport_lr > 0:
        raise SymtoolsError("--teleport-every and --teleport-steps must be ≥ 0 and --teleport-lr > 0")
    if args.teleport_every:
        from symtools.numeric.teleport import check_objective

        check_objective(args.teleport_objective)
    check_out_dir(args.out, force=args.force or args.resume, also=" (or --resume the run in it)")
    device = parse_device(args.device)
    _check_reducer(args.monitor_reducer, device)
    if hf_requested(args):
        model, batches = _hf_model_and_data(args)
        model = model.to(device)
    else:
        args.model, args.data = args.model or "vgg16_bn", args.data or "digits"
        batches = make_loader(args.data, args.batch, image_size=args.input, seed=args.seed)
        torch.manual_seed(args.seed)
        model = build_model(args.model, input_size=args.input, classes=batches.classes).to(device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr, args.wd, args.momentum,
                               args.dampening, args.nesterov)
    make_out_dir(args.out)  # every option is valid: only now is anything written
    x0, _ = batches.batch(0)
    if hf_requested(args):
        from symtools.nn.hf import symmetries_or_blocked

        symmetries = symmetries_or_blocked(model, x0[:1].to(device))
    else:
        symmetries = find_symmetries(model, x0[:1].to(device))
    monitor = Monitor(symmetries, stride=args.stride, check_every=args.check_every, seed=args.seed,
                      reducer=None if args.monitor_reducer == "auto" else args.monitor_reducer)
    callbacks = [monitor]
    if args.teleport_every:
        from symtools.training_teleport import TeleportCallback

        callbacks.append(TeleportCallback(symmetries, args.teleport_every, objective=args.teleport_objective,
                                          families=[f.strip() for f in args.teleport_families.split(",") if f.strip()],
                                          steps=args.teleport_steps, lr=args.teleport_lr, monitor=monitor,
                                          seed=args.seed))
    law = law_of_optimizer(optimizer)[0]
    config = {"model": args.model, "data": args.data, "input": args.input, "classes": batches.classes,
              "batch": args.batch, "optimizer": law or args.optimizer, "lr": args.lr, "wd": args.wd,
              "momentum": args.momentum, "dampening": args.dampening, "nesterov": args.nesterov,
              "seed": args.seed, "steps": args.steps, "stride": args.stride, "check_every": args.check_every,
              "teleport_every": args.teleport_every}
    if hf_requested(args):
        import os

        where = {k: (v if v is None or not os.path.exists(v) else os.path.abspath(v))  # a bundled name stays a name
                 for k, v in (("hf_config", args.hf_config), ("hf", args.hf))}
        config.update(where, seq_len=args.seq_len, input=None)
    summary = train(model, optimizer, batches, args.steps, device=device, out_dir=args.out,
                    checkpoint_every=args.checkpoint_every, callbacks=callbacks, progress=not args.quiet,
                    resume=args.resume, overwrite=args.force, config=config)
    print(json.dumps({k: summary.get(k) for k in ("steps", "max_rel_residual_discrete",
                                                   "max_rel_residual_continuous", "final_loss")}, default=str),
          file=sys.stderr if args.quiet else sys.stdout)
    print(f"run written to {args.out} (records, checkpoints, summary.json)")
    return 0
