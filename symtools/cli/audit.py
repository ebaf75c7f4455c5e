"""``symtools audit``: what a checkpoint's symmetries say about its weights and its training.

Exit codes: 0 nothing flagged and the identities hold; 1 group sets flagged or an identity fails; 2 bad input
(nothing is written then).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from symtools.cli.common import parse_device, require
from symtools.errors import SymtoolsError

HELP = "audit a checkpoint: charges per symmetry group, identities, comparison with init and with the laws"
DTYPES = ("float64", "float32", "weights")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="state_dict (.pt, weights_only) or .safetensors, a symtools "
                                                      "training checkpoint, or a Hugging Face checkpoint folder "
                                                      "(config.json + model.safetensors; needs the 'hf' extra)")
    p.add_argument("--model", default="auto",
                   help="vgg11 … vgg19_bn, resnet18/34/50, or auto (infer from keys and shapes; default)")
    p.add_argument("--init", metavar="CKPT0", help="the initial weights, for 'vs init' and the laws")
    p.add_argument("--run", metavar="RUN", help="a training run directory (runs/NAME): its step-0 checkpoint is the "
                                                "init unless --init is given; its records give lr per step and "
                                                "recorded charges")
    p.add_argument("--data", default=None, help="'digits' (bundled) or an image folder (default digits); for a "
                                                "Hugging Face model 'stdlib-text' (default) or 'random'")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence for a Hugging Face model (default 32)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the identity checks (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data batch and of the checker (default 0)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (schema in docs/commands/audit.md); "
                                                  "'-' prints it instead of the table")
    p.add_argument("--report", metavar="DIR", help="write an HTML report with plots into DIR (replaced atomically)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="arithmetic of the identity checks: float32 (default; each group against its round-off "
                        "bound from the magnitudes of its terms), float64 (bounds 2^29 times tighter, ~2-3× the "
                        "time on a CPU), or the weights' own dtype")
    p.add_argument("--no-identities", action="store_true", help="skip the gradient/Hessian identity checks")
    hp = p.add_argument_group("training hypothesis (instead of, or overriding, what --run/the checkpoint says)")
    hp.add_argument("--optimizer", choices=_choices(),
                    help="optimizer law of the hypothesis (default: sgd, or momentum when --momentum > 0)")
    hp.add_argument("--lr", type=float, help="learning rate (constant)")
    hp.add_argument("--wd", "--weight-decay", dest="wd", type=float, help="weight decay λ (torch: d = g + λθ)")
    hp.add_argument("--momentum", type=float, help="heavy-ball momentum μ (torch SGD)")
    hp.add_argument("--dampening", type=float, default=None, help="SGD dampening τ (default 0)")
    hp.add_argument("--steps", type=int, help="number of updates between --init and CKPT (default: their steps)")



def _choices() -> tuple[str, ...]:
    from symtools.numeric.optimizer_laws import CHOICES

    return CHOICES


def _batch(args, input_size: int, classes: int):
    import torch

    from symtools.data.loader import make_loader

    if args.batch < 2:
        raise SymtoolsError(f"--batch must be at least 2 (BatchNorm statistics and the permuted-batch round-off "
                            f"floor need two samples), got {args.batch}")
    stream = make_loader(args.data, args.batch, image_size=input_size, seed=args.seed, dtype=torch.float32)
    x, y = next(iter(stream))
    if int(y.max()) >= classes:
        raise SymtoolsError(f"the data has labels up to {int(y.max())} but the model has {classes} classes")
    return x, y


def _hyper(args, ckpt, init, names, records, start: int, target: int | None):
    """The training hypothesis: flags first, else the run's/the checkpoint's optimizer state (module docstring)."""
    from symtools.audit.compare import Hyper, hyper_from_optimizer
    from symtools.numeric.optimizer_laws import (
        CHOICES,
        declaration,
        law_of_group,
        torch_class,
    )

    flags = [v is not None for v in (args.lr, args.wd, args.momentum, args.dampening, args.optimizer)]
    steps = args.steps
    if steps is None and target is not None:
        steps = target - start
        if steps < 0:
            raise SymtoolsError(f"the init checkpoint is at step {start}, after the audited one ({target})")
    if any(flags) or args.steps is not None:
        if init is None:
            raise SymtoolsError("a training hypothesis (--lr/--wd/--momentum/--steps) needs the initial weights: "
                                "give --init CKPT0 or --run RUN")
        if steps is None:
            raise SymtoolsError("the number of updates between --init and CKPT is unknown: give --steps")
        if args.lr is None and steps > 0:
            raise SymtoolsError("give --lr (the learning rate of the hypothesis)")
        mom = args.momentum or 0.0
        # default: the law of a torch.optim.SGD param group with these flags (sgd, or momentum when --momentum > 0)
        opt = args.optimizer or law_of_group({"momentum": mom, "dampening": args.dampening or 0.0},
                                             torch_class(CHOICES[0]))
        for flag, value in (("momentum", mom), ("dampening", args.dampening or 0.0)):
            if value and flag not in declaration(opt).python_names:
                having = [n for n in CHOICES if flag in declaration(n).python_names]
                raise SymtoolsError(f"--optimizer {opt} has no {flag}; use --optimizer {' or '.join(having)}")
        hyper = Hyper(optimizer=opt, lr=float(args.lr or 0.0), weight_decay=float(args.wd or 0.0), momentum=mom,
                      dampening=float(args.dampening or 0.0), steps=steps, source="command line")
    else:
        source = None
        for c in (init, ckpt):  # a run's optimizer: hyperparameters are set at construction and kept
            if c is not None and c.optimizer and c.optimizer.get("param_groups"):
                source = c
                break
        if source is None or init is None or steps is None:
            return None
        hyper = hyper_from_optimizer(source.optimizer, names, (source.config or {}).get("optimizer_class"),
                                     steps=steps, source=f"optimizer state of {source.path}")
        if (ckpt.config or {}).get("scheduler_class") and records is None:
            hyper.notes.append("the run used an LR scheduler but no records give the lr per step: the checkpoint's "
                               "lr is used for every step")
    if records is not None and args.lr is None and steps:
        lrs = records.lr_schedule(start, start + steps)
        if lrs is not None:
            hyper.lr_schedule = lrs
            hyper.lr = lrs[0] if lrs else hyper.lr
            hyper.source += " + lr per step from the run's train records"
        else:
            hyper.notes.append("the run's train records do not cover every update: constant lr used")
    return hyper


@dataclass(frozen=True)
class HFArch:
    """The audit's description of a Hugging Face causal LM (the fields of ``VGGArch`` the report reads):
    ``input_size`` is the sequence length, ``classes`` the vocabulary."""

    name: str
    input_size: int
    classes: int
    hidden: int | None
    batch_norm: bool = False


def _is_hf_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _hf_source(ckpt) -> str | None:
    """The ``--hf-config``/``--hf`` a symtools training checkpoint was trained from (``symtools train``), or None."""
    config = (ckpt.config or {}) if ckpt is not None else {}
    return config.get("hf_config") or config.get("hf")


def _hf_folder_checkpoint(path):
    """A Hugging Face checkpoint folder as ``(Checkpoint keyed by the CausalLM's names, the CausalLM)``.

    Half-precision weights are audited in float32 (which holds them exactly): the audit evaluates the loss with
    its inputs cast to the weights' dtype, and float16/bfloat16 cannot hold every token id.
    """
    import torch

    from symtools.checkpoints import Checkpoint
    from symtools.nn.hf import from_checkpoint_dir, weight_files

    model = from_checkpoint_dir(path)
    notes = list(model.notes)
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        model = model.float()
        notes.append(f"{str(dtype).replace('torch.', '')} weights audited in float32 (exactly the same values): "
                     f"token ids do not all fit in {str(dtype).replace('torch.', '')}")
    files, _ = weight_files(path)
    ckpt = Checkpoint(str(path), "safetensors" if files[0].suffix == ".safetensors" else "torch", "state_dict",
                      {k: v.detach() for k, v in model.state_dict().items()}, notes=notes)
    return ckpt, model


def _hf_model(args, ckpt):
    """The audited causal LM: a Hugging Face checkpoint folder (``ckpt`` None), or a checkpoint of ``symtools
    train --hf-config/--hf`` rebuilt from the config it names. Returns ``(ckpt, model, arch, notes)``."""
    from symtools.nn.hf import from_config_dir

    if args.model not in (None, "auto"):
        raise SymtoolsError(f"--model {args.model} names an image model; a Hugging Face model's architecture comes "
                            f"from its config.json (leave --model out)")
    args.data = args.data or "stdlib-text"
    if ckpt is None:
        ckpt, model = _hf_folder_checkpoint(args.checkpoint)
    else:
        source = _hf_source(ckpt)
        model = from_config_dir(source, dtype=ckpt.dtype)
        try:
            model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as exc:
            raise SymtoolsError(f"{args.checkpoint} does not fit the model of {source} it was trained from: "
                                f"{(str(exc).splitlines() or [''])[0][:300]}") from None
    cfg = model.config
    arch = HFArch(type(model.model).__name__, args.seq_len, model.vocab_size,
                  getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None))
    return ckpt, model, arch, []


def prepare(args) -> dict:
    """Everything that can fail on bad input, before any output is written: a dict of audit_model arguments."""
    import torch

    from symtools.audit.loading import build_model_for, load_checkpoint_file
    from symtools.audit.records import RecordedRun
    from symtools.audit.report import check_report_dir

    if args.json and args.json != "-":
        jp = Path(args.json)
        if jp.is_dir():
            raise SymtoolsError(f"--json {jp} is a directory; give a file name")
        if not jp.parent.exists():
            raise SymtoolsError(f"--json {jp}: folder {jp.parent} does not exist")
    if args.report:
        require("matplotlib", "matplotlib", "--report (its plots)")
        check_report_dir(args.report)
    device = parse_device(args.device)
    hf = _is_hf_folder(args.checkpoint)
    ckpt = None if hf else load_checkpoint_file(args.checkpoint)
    hf = hf or bool(_hf_source(ckpt))
    if hf:
        ckpt, model, arch, notes = _hf_model(args, ckpt)
    else:
        args.data = args.data or "digits"
        model, arch, notes = build_model_for(ckpt.state_dict, args.model)
    ckpt.notes.extend(notes)
    run = Path(args.run) if args.run else None
    records = None
    init_path = args.init
    if run is not None:
        if not run.is_dir():
            raise SymtoolsError(f"--run {run}: no such run directory")
        if init_path is None:
            first = run / "checkpoints" / "step_000000.pt"
            if not first.is_file():
                raise SymtoolsError(f"--run {run}: no checkpoints/step_000000.pt to use as init (give --init)")
            init_path = str(first)
        records = RecordedRun(run)
    init = None
    if init_path is not None:
        init = _hf_folder_checkpoint(init_path)[0] if _is_hf_folder(init_path) else load_checkpoint_file(init_path)
        own = dict(model.named_parameters())
        missing = [k for k in own if k not in init.state_dict]
        wrong = [f"{k}: {tuple(init.state_dict[k].shape)} vs {tuple(p.shape)}" for k, p in own.items()
                 if k in init.state_dict and tuple(init.state_dict[k].shape) != tuple(p.shape)]
        if missing or wrong:
            raise SymtoolsError(f"--init {init_path} does not fit the audited {arch.name}: "
                                + (f"missing keys ({len(missing)}): {', '.join(missing[:6])}" if missing else "")
                                + ("; " if missing and wrong else "")
                                + (f"shape mismatches ({len(wrong)}): {', '.join(wrong[:6])}" if wrong else ""))
    start = init.step if init is not None and init.step is not None else 0
    if init is not None and args.steps is None and ckpt.step is None and (args.lr is not None or args.wd is not None):
        raise SymtoolsError(f"{args.checkpoint} does not say its step: give --steps")
    target = ckpt.step if (init is not None and ckpt.step is not None) else None
    names = [n for n, _ in model.named_parameters()]
    hyper = _hyper(args, ckpt, init, names, records, start, target)
    if hf:
        from symtools.cli.common import text_batch

        if args.batch < 2:
            raise SymtoolsError(f"--batch must be at least 2 (the permuted-batch round-off floor needs two "
                                f"samples), got {args.batch}")
        x, y = text_batch(args.data, args.batch, args.seq_len, args.seed, arch.classes)
    else:
        x, y = _batch(args, arch.input_size, arch.classes)
    dtype = {"float64": torch.float64, "float32": torch.float32, "weights": None}[args.dtype]
    model = model.to(device)
    x = x.to(device=device, dtype=next(model.parameters()).dtype) if x.is_floating_point() else x.to(device)
    kwargs = {"model": model, "inputs": x, "targets": y.to(device),
            "checkpoint": ckpt, "init": init, "init_step": start if init is not None else None, "hyper": hyper,
            "records": records, "identities": not args.no_identities, "check_dtype": dtype, "seed": args.seed,
            "info": {"name": arch.name, "input_size": arch.input_size, "classes": arch.classes,
                     "hidden": arch.hidden, "batch_norm": arch.batch_norm, "inferred": args.model == "auto",
                     "data": args.data, "device": str(device)}}
    if hf:  # the graph walk's verdict on a causal LM, or where it stopped (symtools.nn.hf.symmetries_or_blocked)
        from symtools.nn.hf import symmetries_or_blocked

        kwargs["symmetries"] = symmetries_or_blocked(model, x[:1])
    return kwargs


def run(args) -> int:
    import json

    from symtools.audit.core import audit_model
    from symtools.audit.report import render_table, write_html, write_json

    kwargs = prepare(args)
    quiet = args.json == "-"
    say = None if quiet else (lambda m: print(f"[audit] {m}", file=sys.stderr))
    report = audit_model(progress=say, **kwargs)
    if args.report:
        write_html(report, args.report)
    if args.json and args.json != "-":
        write_json(report, args.json)
    if quiet:
        print(json.dumps(report, indent=1))
    else:
        print(render_table(report))
        if args.report:
            print(f"report: {Path(args.report) / 'index.html'}")
    return int(report["exit_code"])
