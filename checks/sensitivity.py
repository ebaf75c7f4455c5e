#!/usr/bin/env python
"""Detection limit of the symmetry checker: the weakest breaking of ONE group that ``check`` reports.

    OMP_NUM_THREADS=1 python checks/sensitivity.py [--work out/campaign] [--checkpoint sgd@300|init|FILE]
        [--dtypes float64 float32] [--batch 8] [--injections bn-eval tanh wrong-generator] [--refine 4]
        [--full-scan] [--json FILE] [--quick] [--no-doc | --doc FILE]

Model: VGG-16-BN (32×32, 10 classes), the campaign's trained checkpoint (``--work``/vgg16_bn-sgd-300steps,
step 300; init from ``torch.manual_seed(0)`` when absent), check batch ``make_loader('digits', 8, seed=1)``,
``check(..., seed=0)``. One channel ``c`` of the middle conv → BatchNorm layer is chosen: among the channels
whose scale, translation and rescale groups all have gradient terms (not dead on the batch), the one with the
median Σ|g·v| of its scale group. A breaking of strength ``s`` (``checks/injections.py``) is injected:

(a) ``bn-eval``: that BatchNorm's channel ``c`` outputs ``(1 − s)·BN_batch(x)_c + s·BN_eval(x)_c``.
    Breaks the scale and the translation group ``c`` of the conv → BN layer (both are targets).
(b) ``tanh``: the activation after that BatchNorm is ``(1 − s)·relu + s·tanh`` on channel ``c``.
    Breaks the rescale group ``c`` of the BN → next layer set.
(c) ``wrong-generator``: that rescale set is declared as its own family whose action on ``x_out`` is
    ``x_out·a^-(1+s)`` for group ``c`` (generator ``v + s·w``, ``w = (0, −θ_out)``), ``x_out/a`` otherwise.

For each injection and dtype, s is scanned over the decades 1e-1 … 1e-15 from the top until the target is
not reported (``--full-scan``: all decades), then the bracket [first miss, last detection] is bisected on
log s ``--refine`` times. "Detected" means the target group is in its layer's failing list. Reported: the
smallest detected s, the bracket, which identity detected it there (``gradient``: the layer's gradient
ratio is above the fail threshold; ``hessian``: the group's Hessian ratio is; ``both``), the
target's own residual/bound ratios, and over every check of the scan the largest residual/bound ratio among
ALL OTHER groups (each group's own, from ``check(..., per_group=True)``) and the count of other failing
groups; both must stay ≤ 1 / 0.

Prints a table, writes ``--json`` and replaces the "Checker detection limits" section of docs/benchmarks.md.
``--quick``: VGG-11-BN (the campaign's quick checkpoint sgd@20 if cached), decades 1e-1, 1e-5, 1e-9 only, refine 1,
no doc unless ``--doc``.
"""

from __future__ import annotations

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
import injections
from campaign_verdicts import (CHECK_SEED, CLASSES, DTYPES, INPUT, active, batch, by_family, copy_to,
                               fmt, load)

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from symtools.nn.graph import find_symmetries
from symtools.nn.groups import SymmetryMap
from symtools.nn.models import build_model
from symtools.numeric import groupops
from symtools.numeric.checker import check
from symtools.training import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Checker detection limits"
INJECTIONS = ("bn-eval", "tanh", "wrong-generator")
DECADES = [10.0 ** -k for k in range(1, 16)]


def say(msg: str) -> None:
    print(f"[sensitivity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def site(model, symmetries, x, y):
    """(scale set index, translation set index, rescale set index, BN name, channel c) of the middle layer."""
    fams = by_family(symmetries)
    i_sc = len(fams["scale"]) // 2
    gs_sc = fams["scale"][i_sc]
    bn = gs_sc.layer.partition(" → ")[2]
    i_tr = next(i for i, gs in enumerate(fams["translation"]) if gs.layer == gs_sc.layer)
    i_re = next(i for i, gs in enumerate(fams["rescale"]) if gs.layer.partition(" → ")[0] == bn)
    live = active(copy_to(model, torch.float64), x.double(), y, symmetries)
    ok = live["scale", i_sc] & live["translation", i_tr] & live["rescale", i_re]
    so_sizes = _scale_sizes(copy_to(model, torch.float64), x.double(), y, gs_sc)
    cands = ok.nonzero().flatten().tolist()
    cands.sort(key=lambda k: float(so_sizes[k]))
    return i_sc, i_tr, i_re, bn, cands[len(cands) // 2]


def _scale_sizes(model, x, y, gs):
    from symtools.numeric.second_order import SecondOrder
    so = SecondOrder(model, x, y, create_graph=False)
    return groupops.gradient_terms(groupops.family_module("scale"), gs, {k: p.detach() for k, p in so.params.items()},
                                   so.grad)[1]


def inject(kind: str, s: float, model, symmetries, where):
    """(model, symmetries, modules, targets [(family, set index)]) with the breaking of strength s at channel c."""
    i_sc, i_tr, i_re, bn, c = where
    rescale_set = by_family(symmetries)["rescale"][i_re]
    act = injections.between(model, rescale_set.layer)[0]
    if kind == "bn-eval":
        injections.replace_module(model, act, injections.PartialEvalBN(model.get_submodule(bn), c, s))
        return model, symmetries, None, [("scale", i_sc), ("translation", i_tr)]
    if kind == "tanh":
        injections.replace_module(model, act, injections.MixedActivation([c], s))
        return model, symmetries, None, [("rescale", i_re)]
    wrong = SymmetryMap(group_sets=[dataclasses.replace(gs, family="rescale_wrong") if gs is rescale_set else gs
                                    for gs in symmetries.group_sets])
    module = injections.wrong_rescale(s, rows=[c], count=rescale_set.count)
    return model, wrong, {"rescale_wrong": module}, [("rescale_wrong", 0)]


def one_check(args, kind, s, dtype, symmetries, where) -> dict:
    model = load_model(args, DTYPES[dtype])
    x, y = batch(args.batch, DTYPES[dtype])
    model, syms, modules, targets = inject(kind, s, model, symmetries, where)
    c = where[-1]
    t0 = time.perf_counter()
    d = check(model, x, y, syms, dtype=DTYPES[dtype], seed=0, modules=modules, per_group=True).to_dict()
    seconds = time.perf_counter() - t0
    fams = d["families"]
    target_sets = set(targets)
    hit, how, flagged, ratio_g, ratio_h = [], set(), False, 0.0, 0.0
    for f, i in targets:
        lr = fams[f]["layers"][i]
        g, h = lr["gradient_ratios"][c], lr["hessian_ratios"][c]  # this group's own ratios
        flagged |= c in lr["failing"] or c in lr.get("inconclusive", [])
        if c in lr["failing"]:
            hit.append(f)
            how |= {"gradient"} if g > d["tolerance"]["gray_zone"] else set()
            how |= {"hessian"} if h > d["tolerance"]["gray_zone"] else set()
        ratio_g, ratio_h = max(ratio_g, g), max(ratio_h, h)
    others_failing = sum(len([k for k in lr["failing"] if not ((f, i) in target_sets and k == c)])
                         for f, fd in fams.items() for i, lr in enumerate(fd["layers"]))
    other_g = other_h = 0.0  # every other group's own ratios (the target's layer included, the target excluded)
    for f, fd in fams.items():
        for i, lr in enumerate(fd["layers"]):
            skip = c if (f, i) in target_sets else None
            other_g = max([other_g] + [r for k, r in enumerate(lr["gradient_ratios"]) if k != skip])
            other_h = max([other_h] + [r for k, r in enumerate(lr["hessian_ratios"]) if k != skip])
    return {"injection": kind, "dtype": dtype, "s": s, "detected": bool(hit), "flagged": flagged, "families": hit,
            "by": "both" if len(how) == 2 else (how.pop() if how else None), "target_gradient_ratio": ratio_g,
            "target_hessian_ratio": ratio_h, "others_gradient_ratio": other_g, "others_hessian_ratio": other_h,
            "others_failing": others_failing, "seconds": seconds}


def scan(args, kind, dtype, symmetries, where) -> dict:
    runs = []

    def run(s):
        r = one_check(args, kind, s, dtype, symmetries, where)
        runs.append(r)
        say(f"{kind} {dtype} s={s:.3g}: {'DETECTED by ' + str(r['by']) if r['detected'] else 'missed'} "
            f"(target/tol grad {fmt(r['target_gradient_ratio'])} Hess {fmt(r['target_hessian_ratio'])}; others "
            f"{fmt(max(r['others_gradient_ratio'], r['others_hessian_ratio']))}, {r['others_failing']} failing; "
            f"{r['seconds']:.0f} s)")
        return r["detected"]

    hit, miss = None, None
    for s in (DECADES[::4] if args.quick else DECADES):
        if run(s):
            hit = s if hit is None or s < hit else hit
        else:
            miss = s if miss is None else miss
            if not args.full_scan:
                break
    if hit is None and run(1.0):
        hit = 1.0
    if hit is not None and miss is not None and miss < hit:
        lo, hi = math.log10(miss), math.log10(hit)
        for _ in range(args.refine):
            mid = 10 ** ((lo + hi) / 2)
            if run(mid):
                hi = math.log10(mid)
            else:
                lo = math.log10(mid)
        hit, miss = 10 ** hi, 10 ** lo
    at = next((r for r in runs if hit is not None and r["s"] == hit), None)
    return {"injection": kind, "dtype": dtype, "smallest_detected": hit, "largest_missed": miss,
            "by": at["by"] if at else None, "families": at["families"] if at else [],
            "smallest_flagged": min((r["s"] for r in runs if r["flagged"]), default=None),
            # the breakings are linear in s to first order: residual/tolerance = 1 at s / ratio
            "extrapolated_limit": min((r["s"] / max(r["target_gradient_ratio"], r["target_hessian_ratio"])
                                       for r in runs if r["detected"]), default=None),
            "others_max_ratio": max(max(r["others_gradient_ratio"], r["others_hessian_ratio"]) for r in runs),
            "others_failing_max": max(r["others_failing"] for r in runs), "runs": runs}


def load_model(args, dtype):
    if args.checkpoint_file is None:
        torch.manual_seed(0)
        return build_model(args.model, input_size=INPUT, classes=CLASSES).to(dtype)
    return load(args.model, args.checkpoint_file, dtype)


def table(results: list[dict]) -> str:
    lines = ["| injection | dtype | smallest s detected | largest s missed | extrapolated limit | detected by | "
             "families | others: max residual/tol | others failing |", "|" + "---|" * 9]
    for r in results:
        hit = "not at s = 1" if r["smallest_detected"] is None else f"{r['smallest_detected']:.2g}"
        miss = "none ≥ 1e-15" if r["largest_missed"] is None else f"{r['largest_missed']:.2g}"
        lines.append(f"| {r['injection']} | {r['dtype']} | {hit} | {miss} | {fmt(r['extrapolated_limit'])} | "
                     f"{r['by'] or '—'} | {', '.join(r['families']) or '—'} | {fmt(r['others_max_ratio'])} | "
                     f"{r['others_failing_max']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "out" / "campaign"))
    p.add_argument("--checkpoint", default=None, help="sgd@STEPS, momentum@STEPS, init, or a checkpoint file "
                                                      "(default: the campaign's sgd@300, or init when absent)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--injections", nargs="+", default=list(INJECTIONS), choices=INJECTIONS)
    p.add_argument("--refine", type=int, default=4, help="bisection steps on log s (default 4)")
    p.add_argument("--full-scan", action="store_true", help="every decade, not only down to the first miss")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--doc", default=None)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    args.model = args.model or ("vgg11_bn" if args.quick else "vgg16_bn")
    if args.quick and args.refine == 4:
        args.refine = 1
    label = args.checkpoint or ("sgd@20" if args.quick else "sgd@300")
    if label == "init":
        args.checkpoint_file = None
    elif "@" in label:
        opt, steps = label.split("@")
        args.checkpoint_file = checkpoint_path(Path(args.work) / f"{args.model}-{opt}-{steps}steps", int(steps))
        if not args.checkpoint_file.exists():
            say(f"{args.checkpoint_file} not found: using the initial weights")
            label, args.checkpoint_file = "init", None
    else:
        args.checkpoint_file = Path(label)
    doc = None if args.no_doc else (args.doc or (None if args.quick else str(ROOT / "docs" / "benchmarks.md")))
    info = benchdoc.machine(all_loads=True)
    t0 = time.perf_counter()

    x, y = batch(args.batch, torch.float64)
    symmetries = find_symmetries(build_model(args.model, input_size=INPUT, classes=CLASSES).double(), x[:1])
    where = site(load_model(args, torch.float64), symmetries, x, y)
    fams = by_family(symmetries)
    say(f"{args.model} {label}: channel {where[-1]} of {fams['scale'][where[0]].layer} "
        f"(rescale {fams['rescale'][where[2]].layer})")
    results = [scan(args, kind, dt, symmetries, where) for dt in args.dtypes for kind in args.injections]
    text = table(results)
    print(text)
    out = {"machine": info, "model": args.model, "checkpoint": label, "batch": args.batch, "check_seed": CHECK_SEED,
           "channel": where[-1], "layers": {"scale": fams["scale"][where[0]].layer,
                                            "rescale": fams["rescale"][where[2]].layer},
           "results": results, "seconds": time.perf_counter() - t0}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if doc:
        intro = (f"Measured by `checks/sensitivity.py`: {args.model} ({label}), batch {args.batch}, "
                 f"one group broken with strength s at channel {where[-1]} of {out['layers']['scale']} (BN-eval "
                 f"mix: its scale and translation groups) and of {out['layers']['rescale']} (tanh mix, wrong "
                 f"generator: its rescale group); decades 1e-1 … 1e-15 from the top, then {args.refine} bisections "
                 f"on log s ({out['seconds'] / 60:.0f} min). 'others' is over every check of the scan and must "
                 f"stay < 1 and 0.")
        benchdoc.write_section(doc, SECTION, intro, info, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
