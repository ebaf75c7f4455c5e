#!/usr/bin/env python
"""False-verdict campaign of the symmetry checker: every PASS and every FAIL must mean what it says.

    OMP_NUM_THREADS=1 python checks/campaign_verdicts.py [--work out/campaign] [--json FILE] [--quick]
        [--models vgg11_bn vgg16_bn] [--controls ...] [--train-only] [--no-doc | --doc FILE]

1. **Checkpoints.** VGG-11-BN and VGG-16-BN (torchvision layout, 32×32 inputs, 10 classes) trained on the
   bundled digits with the project's loop (:func:`symtools.training.train`, torch.optim.SGD, lr 0.1, weight
   decay 5e-4 coupled as SGD does, training batch 16 as ``symtools demo``, seed 0): one run with plain SGD,
   one with momentum 0.9 at lr 0.01 (the same effective step lr/(1 − β); at lr 0.1 with momentum VGG-11-BN
   does not learn: loss 2.3 after 120 steps), 300 steps, checkpoints at 0, 100, 200, 300. Runs live in
   ``--work`` (one folder ``MODEL-OPT-300steps`` each) and are reused (or resumed) when present, retrained
   when made with other settings. Step 0 is the same for both.
2. **False FAILs.** For each checkpoint (init, sgd@100, sgd@300, momentum@100, momentum@300) × dtype
   {float32, float64} × check batch {8, 32} (``make_loader('digits', B, seed=1)``, first batch): the groups
   ``find_symmetries`` finds, checked with ``check(..., seed=0)``. Every group is a true symmetry of the
   training loss, so any failing group or failing family is a false FAIL; the target is zero. Reported per
   run: verdict, failing families/groups, and the margins max(residual / tolerance) of the gradient (per
   layer) and Hessian (per family) identities.
3. **Negative controls** on the trained SGD checkpoint and at init, both dtypes, batch 8. For each, the
   EXPECTED broken groups follow from the math, not from the checker:

   - ``eval-bn`` (``bn="eval"``): running statistics neither scale nor shift with the layer feeding the
     BatchNorm, so every scale and translation group whose layer ends in a BatchNorm breaks; rescale groups
     (BN affine → next layer) and the softmax translations stay exact.
   - ``tanh-all`` (every ReLU replaced by Tanh, groups found on the ReLU model): tanh(a·z) ≠ a·tanh(z), so
     every rescale group whose path goes through a replaced activation breaks; scale and translation groups
     do not (BatchNorm removes the scale before the activation).
   - ``tanh-3`` (tanh on 3 units of the middle rescale layer only): exactly those 3 rescale groups.
   - ``mse`` (``loss="mse"`` on one-hot targets): MSE is not shift-invariant, so the softmax translations
     (layers ``… → softmax``) break; nothing else.
   - ``wrong-family`` (``modules={"rescale": …}`` with the declared action ``x_out → x_out/a²``, see
     ``checks/injections.py``): ⟨g, v⟩ = −⟨g_out, θ_out⟩ ≠ 0 for every rescale group.
   - ``wrong-3`` (3 groups of the middle rescale layer declared with ``x_out/a²``, as their own family
     ``rescale_wrong``): exactly those 3.
   - ``weight-decay`` (``weight_decay=5e-4`` inside the loss): ∇ gains λθ and H gains λI, so the gradient
     identity gains λ⟨θ, v_k⟩ (translation λΣθ_A, scale λ|θ_A|², rescale λ(|θ_in|² − |θ_out|²)) and the
     Hessian identity gains λ(v_k + K_k θ) (translation λ·1, scale 2λθ_A, rescale 2λ(θ_in, −θ_out)): nonzero
     for every group (the Hessian term even where a bias is still 0 at init).

   A group with no gradient terms at all under the control (Σ|g·v_k| = 0 in float64: a unit dead on the whole
   batch) satisfies every identity trivially and is left out of the expected set ("inert"), except for
   weight decay, whose term does not need g. Compared with what FAILED, group by group (family, group set,
   index) and family by family: ``exactly``, or ``missed k`` / ``extra k``; ``unlisted k`` counts expected
   groups of layers whose failing list the checker truncated (it lists at most ``MAX_LOCATED`` per layer).

Prints a table as it goes, writes ``--json`` and replaces the "False-verdict campaign" section of
docs/benchmarks.md (``--quick``: VGG-11-BN, 20 training steps, checkpoints 0 and 20, batch 8, no doc unless
``--doc``). ``--train-only`` prepares the checkpoints and stops.
"""

from __future__ import annotations

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
import injections

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from symtools.data.loader import make_loader
from symtools.nn.graph import find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.nn.models import build_model
from symtools.numeric import checker, groupops
from symtools.numeric.checker import check
from symtools.numeric.second_order import SecondOrder
from symtools.training import checkpoint_path, latest_checkpoint, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "False-verdict campaign"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPTIMIZERS = {"sgd": 0.0, "momentum": 0.9}
CONTROLS = ("eval-bn", "tanh-all", "tanh-3", "mse", "wrong-family", "wrong-3", "weight-decay")
INPUT, CLASSES, CHECK_SEED, WD = 32, 10, 1, 5e-4


def say(msg: str) -> None:
    print(f"[campaign {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def train_run(name: str, opt: str, steps: int, stride: int, args) -> Path:
    """The run folder of ``name`` trained ``steps`` steps with ``opt``; trained (or resumed) if incomplete,
    retrained if its checkpoints were made with another learning rate or batch."""
    run = Path(args.work) / f"{name}-{opt}-{steps}steps"
    lr = args.lr * (1 - OPTIMIZERS[opt])  # momentum β: lr·(1 − β), the same effective step as plain SGD
    config = {"model": name, "optimizer": opt, "lr": lr, "wd": WD, "batch": args.train_batch}  # opt fixes β
    last = latest_checkpoint(run)
    stale = last is not None and any(load_checkpoint(last)["config"].get(k) != v for k, v in config.items())
    if not stale and checkpoint_path(run, steps).exists():
        return run
    say(f"training {run.name} (batch {args.train_batch}, lr {lr:g}, wd {WD}, momentum {OPTIMIZERS[opt]})"
        + (" (replacing a run with other settings)" if stale else ""))
    batches = make_loader("digits", args.train_batch, image_size=INPUT, seed=0)
    torch.manual_seed(0)
    model = build_model(name, input_size=INPUT, classes=batches.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=WD, momentum=OPTIMIZERS[opt])
    train(model, optimizer, batches, steps, out_dir=run, checkpoint_every=stride, progress=True, resume=not stale,
          overwrite=stale, config=config)
    return run


def checkpoints(name: str, args) -> dict[str, Path]:
    """``{label: checkpoint file}``: init, then OPT@STEP for each optimizer and step."""
    out = {}
    for opt in OPTIMIZERS:
        run = train_run(name, opt, args.steps[-1], args.stride, args)
        out.setdefault("init", checkpoint_path(run, 0))
        out.update({f"{opt}@{n}": checkpoint_path(run, n) for n in args.steps if n})
    return out


def load(name: str, path: Path, dtype: torch.dtype) -> nn.Module:
    model = build_model(name, input_size=INPUT, classes=CLASSES)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model.to(dtype)


def batch(size: int, dtype: torch.dtype):
    return next(iter(make_loader("digits", size, image_size=INPUT, seed=CHECK_SEED, dtype=dtype)))


# ---------------------------------------------------------------------------------------------------------
# reading a report (today's checker; `verdict` and per-family `inconclusive` when the rewrite adds them)


def failed_families(d: dict) -> list[str]:
    """Families whose verdict is FAIL (``verdict`` when the report has it, else not ``pass``)."""
    return [f for f, fd in d["families"].items()
            if (fd["verdict"] == "fail" if "verdict" in fd else not fd["pass"] and not fd.get("inconclusive"))]


def failing_groups(d: dict) -> dict[tuple[str, int], list[int]]:
    """``{(family, set index): failing group indices}`` for the group sets with failures."""
    return {(f, i): list(lr["failing"]) for f, fd in d["families"].items()
            for i, lr in enumerate(fd["layers"]) if lr["failing"]}


def inconclusive_groups(d: dict) -> set[tuple[str, int, int]]:
    """Groups the checker called inconclusive at this precision (ratio in its gray zone, below float64)."""
    return {(f, i, k) for f, fd in d["families"].items() for i, lr in enumerate(fd["layers"])
            for k in lr.get("inconclusive", [])}


def verdict(report, d: dict) -> str:
    return d.get("verdict") or getattr(report, "verdict", None) or ("pass" if d["pass"] else "fail")


def layer_ratios(lr: dict) -> tuple[float, float | None]:
    """A layer's largest residual / tolerance: (gradient, Hessian or None when only the family's is known)."""
    g = lr["gradient_max_ratio"] if "gradient_max_ratio" in lr else lr["gradient_max_rel"] / lr["gradient_tolerance"]
    return g, lr.get("hessian_max_ratio")


def family_hessian_ratio(fd: dict) -> float:
    h = fd["hessian"]
    return h["max_ratio"] if "max_ratio" in h else h["rel_residual"] / h["tolerance"]


def margins(d: dict) -> tuple[float, float]:
    """(max gradient residual / tolerance over layers, max Hessian residual / tolerance): < 1 passes."""
    g = max((layer_ratios(lr)[0] for fd in d["families"].values() for lr in fd["layers"]), default=math.nan)
    h = max((family_hessian_ratio(fd) for fd in d["families"].values()), default=math.nan)
    return g, h


# ---------------------------------------------------------------------------------------------------------
# negative controls


def by_family(symmetries: SymmetryMap) -> dict[str, list]:
    """The group sets of each family in the checker's order (the order of ``layers`` in its report)."""
    out: dict[str, list] = {}
    for gs in symmetries.group_sets:
        out.setdefault(gs.family, []).append(gs)
    return out


def ends_in(model: nn.Module, gs, kind) -> bool:
    target = gs.layer.partition(" → ")[2]
    return isinstance(dict(model.named_modules()).get(target), kind)


def active(model, x, y, symmetries, modules=None, loss="cross_entropy", bn="batch") -> dict[tuple, torch.Tensor]:
    """Per (family, set): which groups have gradient terms (Σ|g·v_k| > 0) under this loss and BN mode."""
    so = SecondOrder(model, x, y, loss=loss, bn=bn, create_graph=False)
    params = {k: p.detach() for k, p in so.params.items()}
    grads = so.grad
    out = {}
    for fam, sets in by_family(symmetries).items():
        module = (modules or {}).get(fam) or groupops.family_module(fam)
        for i, gs in enumerate(sets):
            out[fam, i] = groupops.gradient_terms(module, gs, params, grads)[1] > 0
    return out


def mse_one_hot(outputs, targets):
    return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))


def middle_rescale(symmetries: SymmetryMap) -> tuple[int, object]:
    sets = by_family(symmetries)["rescale"]
    return len(sets) // 2, sets[len(sets) // 2]


def setup_control(control: str, model: nn.Module, x, y, symmetries: SymmetryMap):
    """(model, symmetries, check kwargs, expected {(family, set): indices}, inert count) for one control.
    ``model`` is modified in place where the control changes the network."""
    fams = by_family(symmetries)
    kwargs, modules = {}, None
    structural: dict[tuple[str, int], list[int]] = {}
    if control in ("tanh-3", "wrong-3"):
        i_mid, gs_mid = middle_rescale(symmetries)
        live = active(copy_to(model, torch.float64), x.double(), y, symmetries)["rescale", i_mid]
        alive = live.nonzero().flatten().tolist()
        units = [alive[len(alive) // 4], alive[len(alive) // 2], alive[3 * len(alive) // 4]]
    if control == "eval-bn":
        kwargs["bn"] = "eval"
        structural = {(f, i): list(range(gs.count)) for f in ("scale", "translation") for i, gs in
                      enumerate(fams.get(f, [])) if ends_in(model, gs, _BatchNorm)}
    elif control in ("tanh-all", "tanh-3"):
        targets = ([n for n, m in model.named_modules() if isinstance(m, nn.ReLU)] if control == "tanh-all"
                   else injections.between(model, gs_mid.layer)[:1])
        for n in targets:
            injections.replace_module(model, n, injections.MixedActivation(None if control == "tanh-all" else units))
        structural = {("rescale", i): list(range(gs.count)) if control == "tanh-all" else units
                      for i, gs in enumerate(fams["rescale"])
                      if set(injections.between(model, gs.layer)) & set(targets)}
    elif control == "mse":
        kwargs["loss"] = "mse"
        structural = {("translation", i): list(range(gs.count)) for i, gs in enumerate(fams["translation"])
                      if gs.layer.endswith("→ softmax")}
    elif control == "wrong-family":
        modules = {"rescale": injections.wrong_rescale(1.0)}
        structural = {("rescale", i): list(range(gs.count)) for i, gs in enumerate(fams["rescale"])}
    elif control == "wrong-3":
        modules = {"rescale_wrong": injections.wrong_rescale(1.0, rows=units, count=gs_mid.count)}
        symmetries = SymmetryMap(group_sets=[dataclasses.replace(gs, family="rescale_wrong") if gs is gs_mid
                                             else gs for gs in symmetries.group_sets])
        structural = {("rescale_wrong", 0): units}
    elif control == "weight-decay":
        kwargs["weight_decay"] = WD
        structural = {(f, i): list(range(gs.count)) for f, sets in fams.items() for i, gs in enumerate(sets)}
    else:
        raise ValueError(control)
    if modules:
        kwargs["modules"] = modules
    inert = 0
    if control != "weight-decay":  # groups with no gradient terms satisfy every identity trivially
        live = active(copy_to(model, torch.float64), x.double(), y, symmetries, modules,
                      loss=mse_one_hot if control == "mse" else "cross_entropy", bn=kwargs.get("bn", "batch"))
        for key, idx in structural.items():
            keep = [k for k in idx if bool(live[key][k])]
            inert += len(idx) - len(keep)
            structural[key] = keep
    return model, symmetries, kwargs, {k: v for k, v in structural.items() if v}, inert


def copy_to(model: nn.Module, dtype) -> nn.Module:
    return model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)


def compare(expected: dict, d: dict, predicted: dict | None = None) -> dict:
    """Expected vs failed, per group (family, set, index) and per family. ``predicted`` (lower precisions):
    each group's ratio expected at this precision from the float64 run of the same control (a breaking is the
    same in both; the bound scales with the unit round-off): an expected group predicted at or below the gray
    zone cannot be asked to FAIL here and is counted as ``below limit`` instead of ``missed``."""
    cap = None  # the checker lists every failing group per layer (only hessian.located is capped)
    failed = failing_groups(d)
    exp = {(f, i, k) for (f, i), idx in expected.items() for k in idx}
    got = {(f, i, k) for (f, i), idx in failed.items() for k in idx}
    truncated = {key for key, idx in failed.items() if cap and len(idx) >= cap}
    undecided = {g for g in exp - got if g in inconclusive_groups(d)}  # said so: rerun in float64
    missed = {g for g in exp - got if g[:2] not in truncated} - undecided
    below = {g for g in missed if predicted is not None and predicted.get(g, math.inf) <= checker.GRAY}
    missed -= below
    unlisted = sum(max(0, len(expected.get(key, [])) - len(failed[key])) for key in truncated)
    extra = got - exp
    fam_exp = {f for f, _ in expected}
    fam_got = set(failed_families(d))
    parts = [f"missed {len(missed)}" if missed else "", f"inconclusive {len(undecided)}" if undecided else "",
             f"below limit {len(below)}" if below else "", f"extra {len(extra)}" if extra else "",
             f"unlisted {unlisted}" if unlisted else "",
             f"families missed {sorted(fam_exp - fam_got)}" if fam_exp - fam_got else "",
             f"families extra {sorted(fam_got - fam_exp)}" if fam_got - fam_exp else ""]
    layer = lambda g: f"{g[0]}:{d['families'][g[0]]['layers'][g[1]]['layer']}#{g[2]}"  # noqa: E731
    return {"expected": len(exp), "failed": len(got), "missed": len(missed), "inconclusive": len(undecided),
            "below_limit": len(below),
            "extra": len(extra),
            "unlisted": unlisted, "families_expected": sorted(fam_exp), "families_failed": sorted(fam_got),
            "missed_examples": [layer(g) for g in sorted(missed)[:5]],
            "extra_examples": [layer(g) for g in sorted(extra)[:5]],
            "outcome": ", ".join(p for p in parts if p) or "exactly"}


# ---------------------------------------------------------------------------------------------------------


def positive_run(name, label, path, dtype, size, symmetries) -> dict:
    model = load(name, path, DTYPES[dtype])
    x, y = batch(size, DTYPES[dtype])
    t0 = time.perf_counter()
    report = check(model, x, y, symmetries, dtype=DTYPES[dtype], seed=0)
    d = report.to_dict()
    g, h = margins(d)
    with torch.no_grad():
        p_max = float(torch.softmax(model.eval()(x), -1).max(-1).values.mean())
    groups = sum(len(v) for v in failing_groups(d).values())
    return {"model": name, "checkpoint": label, "dtype": dtype, "batch": size, "verdict": verdict(report, d),
            "failed_families": failed_families(d), "failing_groups": groups,
            "inconclusive": [f for f, fd in d["families"].items()
                             if fd.get("verdict") == "inconclusive" or fd.get("inconclusive")],
            "false_fail": bool(groups or failed_families(d)), "gradient_margin": g, "hessian_margin": h,
            "loss": d["loss"], "mean_max_softmax": p_max, "seconds": time.perf_counter() - t0}


def control_run(name, label, path, dtype, control, symmetries, size) -> dict:
    model = load(name, path, DTYPES[dtype])
    x, y = batch(size, DTYPES[dtype])
    model, syms, kwargs, expected, inert = setup_control(control, model, x, y, symmetries)
    t0 = time.perf_counter()
    report = check(model, x, y, syms, dtype=DTYPES[dtype], seed=0, **kwargs)
    d = report.to_dict()
    predicted = None
    if dtype != "float64":  # each group's ratio predicted here from float64 (same breaking, bound ∝ u)
        ref = check(model, x, y, syms, dtype=torch.float64, seed=0, per_group=True, **kwargs).to_dict()
        shrink = torch.finfo(torch.float64).eps / torch.finfo(DTYPES[dtype]).eps
        predicted = {(f, i, k): max(g, h) * shrink for f, fd in ref["families"].items()
                     for i, lr in enumerate(fd["layers"])
                     for k, (g, h) in enumerate(zip(lr["gradient_ratios"], lr["hessian_ratios"]))}
    out = {"model": name, "checkpoint": label, "dtype": dtype, "batch": size, "control": control,
           "verdict": verdict(report, d), "inert": inert, **compare(expected, d, predicted),
           "seconds": time.perf_counter() - t0}
    return out


def fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2g}"


def tables(positives: list[dict], controls: list[dict]) -> str:
    lines = ["| model | checkpoint | dtype | batch | verdict | false FAIL (families / groups) | grad margin | "
             "Hess margin | loss | mean max p | s |", "|" + "---|" * 11]
    for r in positives:
        lines.append(f"| {r['model']} | {r['checkpoint']} | {r['dtype']} | {r['batch']} | {r['verdict']} | "
                     f"{', '.join(r['failed_families']) or '0'} / {r['failing_groups']} | "
                     f"{fmt(r['gradient_margin'])} | {fmt(r['hessian_margin'])} | {r['loss']:.3g} | "
                     f"{r['mean_max_softmax']:.3f} | {r['seconds']:.0f} |")
    n_false = sum(r["false_fail"] for r in positives)
    lines += ["", f"False FAILs: {n_false} of {len(positives)} checks (target 0). Margins: largest residual / "
              "bound over all groups (gradient identity, Hessian identity); ≤ 1 passes.", ""]
    lines += ["| model | checkpoint | dtype | control | expected groups (inert) | failed groups | families "
              "expected → failed | outcome | s |", "|" + "---|" * 9]
    for r in controls:
        lines.append(f"| {r['model']} | {r['checkpoint']} | {r['dtype']} | {r['control']} | {r['expected']} "
                     f"({r['inert']}) | {r['failed']} | {', '.join(r['families_expected'])} → "
                     f"{', '.join(r['families_failed']) or '—'} | {r['outcome']} | {r['seconds']:.0f} |")
    exact = sum(r["outcome"] == "exactly" for r in controls)
    wrong = sum(bool(r["missed"] or r["extra"] or r["families_expected"] != r["families_failed"]) for r in controls)
    limited = len(controls) - exact - wrong
    lines += ["", f"Negative controls: {exact} of {len(controls)} exactly as predicted, {wrong} with missed or extra "
              f"groups or families, {limited} with every expected group either failing or stated as undecidable "
              f"at this precision: 'below limit' (the breaking, measured in float64, is predicted at ≤ "
              f"{checker.GRAY:g}× the float32 bound: under float32's detection limit, and the check does not "
              f"fail it) or 'inconclusive' (the checker said so)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "out" / "campaign"), help="checkpoint cache (default out/campaign)")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--quick", action="store_true", help="VGG-11-BN, 20 training steps, batch 8 (smoke test)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=CONTROLS)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-only", action="store_true", help="prepare the checkpoints and stop")
    p.add_argument("--doc", default=None, help="markdown file for the results section (default docs/benchmarks.md; "
                                               "none with --quick)")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    args.models = args.models or (["vgg11_bn"] if args.quick else ["vgg11_bn", "vgg16_bn"])
    args.batches = args.batches or ([8] if args.quick else [8, 32])
    args.steps, args.stride = ([0, 20], 20) if args.quick else ([0, 100, 300], 100)
    doc = None if args.no_doc else (args.doc or (None if args.quick else str(ROOT / "docs" / "benchmarks.md")))
    info = benchdoc.machine(all_loads=True)
    t_start = time.perf_counter()

    ckpts = {name: checkpoints(name, args) for name in args.models}
    for name, c in ckpts.items():
        say(f"{name}: checkpoints {', '.join(f'{k}={v}' for k, v in c.items())}")
    if args.train_only:
        return 0
    positives, controls = [], []
    for name in args.models:
        x, _ = batch(1, torch.float64)
        symmetries = find_symmetries(build_model(name, input_size=INPUT, classes=CLASSES).double(), x)
        jobs = [(label, path, dt, b) for label, path in ckpts[name].items() for dt in args.dtypes for b in args.batches]
        for n, (label, path, dt, b) in enumerate(jobs, 1):
            r = positive_run(name, label, path, dt, b, symmetries)
            positives.append(r)
            say(f"{name} {label} {dt} B={b} [{n}/{len(jobs)}]: {r['verdict'].upper()}"
                + (f" FALSE FAIL {r['failed_families']} ({r['failing_groups']} groups)" if r["false_fail"] else "")
                + f", margins grad {fmt(r['gradient_margin'])} Hess {fmt(r['hessian_margin'])} ({r['seconds']:.0f} s)")
        trained = f"sgd@{args.steps[-1]}"
        cjobs = [(label, dt, c) for label in (trained, "init") for dt in args.dtypes for c in args.controls]
        for n, (label, dt, c) in enumerate(cjobs, 1):
            r = control_run(name, label, ckpts[name][label], dt, c, symmetries, min(args.batches))
            controls.append(r)
            say(f"{name} {label} {dt} control {c} [{n}/{len(cjobs)}]: expected {r['expected']} (+{r['inert']} inert), "
                f"failed {r['failed']}: {r['outcome']} ({r['seconds']:.0f} s)")
    text = tables(positives, controls)
    print(text)
    result = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "positives": positives, "controls": controls, "seconds": time.perf_counter() - t_start}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if doc:
        intro = (f"Measured by `checks/campaign_verdicts.py` (models {', '.join(args.models)}, "
                 f"checkpoints {', '.join(ckpts[args.models[0]])}, dtypes {', '.join(args.dtypes)}, check batches "
                 f"{', '.join(map(str, args.batches))}; controls at batch {min(args.batches)}; "
                 f"{result['seconds'] / 60:.0f} min). Every PASS must hold for true symmetries and every FAIL name "
                 f"exactly the groups the math says are broken (see the script's docstring).")
        benchdoc.write_section(doc, SECTION, intro, info, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
