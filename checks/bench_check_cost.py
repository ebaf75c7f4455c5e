"""What one ``check`` costs, in HVP-equivalents and in gradients (issue target: a float32 check of VGG-16-BN
at batch 8 costs ≤ 6 HVP-equivalents in all).

Measured in one run, on one batch of the bundled digits at 64×64 (VGG-16-BN, 200 classes as the paper):
the median of ``--repeat`` timings of one gradient (forward + backward, BatchNorm in batch mode), one HVP
from scratch (a first-order graph with ``create_graph=True`` and one second backward: what
``SecondOrder(...).hvp`` costs), and one whole ``check`` (its HVP count reported beside). Ratios are within
the run, so a busy machine slows all three alike.

    python checks/bench_check_cost.py [--dtype float32] [--batch 8] [--repeat 3] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
from symtools.data.loader import make_loader
from symtools.nn.graph import find_symmetries
from symtools.nn.models import build_model
from symtools.numeric.checker import check
from symtools.numeric.evaluation import evaluation_mode
from symtools.numeric.second_order import SecondOrder

SECTION = "Checker cost"


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input, classes=200).to(dtype)
    x, y = next(iter(make_loader("digits", args.batch, image_size=args.input, seed=0, dtype=dtype)))
    found = find_symmetries(model, x[:1])
    info = benchdoc.machine()

    def gradient():
        model.zero_grad(set_to_none=True)
        with evaluation_mode(model, "batch"):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def hvp():
        so = SecondOrder(model, x, y)
        so.hvp({k: torch.ones_like(v) for k, v in so.params.items()})

    reports = []

    def whole():
        reports.append(check(model, x, y, found))

    print(f"[bench] {args.model} {args.dtype} batch {args.batch}, {args.input}×{args.input}: timing "
          f"gradient, HVP, check ({args.repeat}× each)", file=sys.stderr)
    t_g = _median_time(gradient, args.repeat)
    t_h = _median_time(hvp, args.repeat)
    t_c = _median_time(whole, args.repeat)
    rep = reports[-1]
    print(f"gradient {t_g:.2f} s, HVP from scratch {t_h:.2f} s ({t_h / t_g:.2f}×), check {t_c:.2f} s = "
          f"{t_c / t_h:.2f} HVP-equivalents = {t_c / t_g:.1f} gradients ({rep.hvps['verification']} HVPs inside, "
          f"{rep.hvps['per_group_naive']} groups, {rep.verdict})")
    if not args.no_doc:
        lines = [f"## {SECTION}", "",
                 f"`python checks/bench_check_cost.py --dtype {args.dtype} --batch {args.batch}` — {args.model}, "
                 f"{args.input}×{args.input}, 200 classes, one batch of the bundled digits; median of "
                 f"{args.repeat} timings each, ratios within one run. Machine: "
                 + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
                 "| dtype | batch | gradient | HVP from scratch | whole `check` | check in HVP-equivalents | "
                 "check in gradients | HVPs inside | verdict |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|",
                 f"| {args.dtype} | {args.batch} | {t_g:.2f} s | {t_h:.2f} s ({t_h / t_g:.2f}×) | {t_c:.2f} s | "
                 f"**{t_c / t_h:.2f}** | {t_c / t_g:.1f} | {rep.hvps['verification']} | {rep.verdict} |", "",
                 "The check: one first-order graph with the term magnitudes of the round-off bounds, 2 HVPs "
                 "(one per random direction, each testing every group's Hessian identity, with the tangent "
                 "magnitudes of its computation), and the per-group reductions (docs/checker.md § 3, § 6). "
                 "Before this version: 11 HVPs, 34× a gradient, 74 % of it the float64 calibration "
                 "(issue 11's measurement)."]
        benchdoc.update_doc(args.doc, SECTION, "\n".join(lines))
        print(f"updated section '{SECTION}' of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
