#!/usr/bin/env python
"""Benchmark of the symmetry checker on VGG-16-BN: HVP cost, HVP count, peak memory, and curvlinops.

    python checks/bench_hessian.py [--batches 8 32] [--dtypes float32 float64] [--repeats 3]
                                   [--memory-batch 8] [--device cpu] [--no-curvlinops] [--no-doc] [--strict]

Model: ``vgg16_bn`` for 64×64 inputs and 200 classes (the Neural-Mechanics Tiny-ImageNet variant, 18.1 M
parameters), torchvision initialisation from ``torch.manual_seed(0)``, a batch of N(0, 1) images with uniform
labels, cross-entropy, BatchNorm with batch statistics (:func:`symtools.numeric.evaluation.loss_closure`,
``bn="batch"``: the training loss, no buffer written), dropout off.

1. **HVP vs gradient, same batch, same run.** For each dtype and batch: one gradient
   (:func:`symtools.numeric.hvp.gradient`: forward + backward) and one HVP from scratch
   (:func:`symtools.numeric.hvp.hvp`: forward + backward with ``create_graph`` + second backward) are timed
   alternately ``--repeats`` times; the ratio is taken within each repeat (so a change of the machine's load
   between repeats cancels) and its median reported, with the best time of each. Also timed: an *extra* HVP
   on an already-built first-order graph (:class:`symtools.numeric.second_order.SecondOrder`, with the
   BatchNorm ε leaves), which is what each further Hessian test of the checker costs, and the HVP from scratch
   with PyTorch's own second derivative of convolutions (``_convolution_double_backward``, which
   :mod:`symtools.numeric.conv_hessian` replaces; its ratio to the gradient, median of the repeats). Target:
   HVP ≤ 3× gradient.
2. **HVP count and peak memory, one subprocess each** (peak resident set of the child, ``VmHWM`` of
   ``/proc/self/status``; ``getrusage``'s ``ru_maxrss`` would carry the parent's peak across ``execve``):
   (a) one gradient, (b) one HVP, (c) the whole checker (``find_symmetries`` +
   ``check``: the permuted-batch gradient for the round-off floor, the first-order graph, the reference HVP,
   one HVP per family), at ``--memory-batch``
   in float64. Reported: peak RSS, and the increment over the RSS just before the operation (model, batch,
   imports already resident). The checker's report gives the HVPs it used for all Hessian identities and the
   naive count (one HVP per group) they replace. Targets: ≤ 4 HVPs; checker increment ≤ 3× the gradient's.
3. **curvlinops** (optional, MIT, ``pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einops
   einconv linear_operator opt-einsum tqdm``; never a dependency of symtools): ``HessianLinearOperator`` on
   the same VGG-16-BN in train mode. torch.func refuses BatchNorm's in-place running-statistics update, so the
   BatchNorm layers get ``track_running_stats=False`` (batch statistics, exactly our loss) and dropout is
   switched off. In float64 at the smallest batch: time per matrix-vector product against ours, and the
   relative difference ‖a − b‖/‖b‖ of its H v, of ours, and of central finite differences of the gradient
   (:func:`symtools.numeric.hvp.hvp_finite_difference`, default step ε^(1/3)·‖θ‖/‖v‖) for one random v.

**GPU** (``--device cuda``): the same measurements on the GPU, with TensorFloat-32 off (the checker's own
setting, :func:`symtools.numeric.precision.ieee_float32`), times taken between ``torch.cuda.synchronize()``
calls after one warm-up gradient and HVP, and memory as the CUDA caching allocator's peak of allocated bytes
(``torch.cuda.max_memory_allocated``, one subprocess each) instead of the resident set. Its section is
"Checker (Hessian identities), GPU".

Prints a table and replaces the "Checker (Hessian identities)" section of ``docs/benchmarks.md`` (only
that section). ``--strict`` exits 1 when a target is missed. ``--child KIND`` is internal (one memory
measurement, printed as JSON).
"""

from __future__ import annotations

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Checker (Hessian identities)"
MODEL, INPUT, CLASSES = "vgg16_bn", 64, 200
TARGET_HVPS, TARGET_RATIO, TARGET_MEMORY = 4, 3.0, 3.0
HEADER = "# Benchmarks\n\nSpeed and memory targets of symtools, measured by the scripts in `checks/`.\n"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


DEVICE = torch.device("cpu")  # set by --device


def machine() -> dict[str, str]:
    info = benchdoc.machine(all_loads=True, device=DEVICE.type)
    if DEVICE.type == "cpu":
        info["device"] = "cpu" + (" (no GPU was lent to this run)" if not torch.cuda.is_available() else "")
    else:
        info["device"] = f"{DEVICE} (TF32 off)"
    return info


def setup(dtype: torch.dtype, batch: int, seed: int = 0):
    """(model, params, loss closure, x, y, v): VGG-16-BN, a random batch, a random direction v (unit norm),
    all on :data:`DEVICE` (drawn on the CPU from the same seeds, so every device sees the same numbers)."""
    from symtools.nn.models import build_model
    from symtools.numeric.evaluation import loss_closure, parameter_dict

    torch.manual_seed(seed)
    model = build_model(MODEL, input_size=INPUT, classes=CLASSES).to(dtype).to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, INPUT, INPUT, generator=g, dtype=dtype).to(DEVICE)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(DEVICE)
    params = parameter_dict(model)
    v = {k: torch.randn(p.shape, generator=g, dtype=dtype).to(DEVICE) for k, p in params.items()}
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v.values()))
    v = {k: t / norm for k, t in v.items()}
    return model, params, loss_closure(model, x, y), x, y, v


def timed(fn) -> float:
    """Wall time of ``fn()``; on a GPU between synchronisations, so queued kernels are counted."""
    benchdoc.sync(DEVICE)
    t0 = time.perf_counter()
    fn()
    benchdoc.sync(DEVICE)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- 1. speed
def speed(dtype_name: str, batch: int, repeats: int, forward_mode: bool = False) -> dict:
    """Gradient, HVP from scratch and extra HVP times; with ``forward_mode`` also forward-over-reverse."""
    from torch.func import grad, jvp

    from symtools.numeric.hvp import gradient, hvp, relative_difference
    from symtools.numeric.second_order import SecondOrder

    model, params, f, x, y, v = setup(DTYPES[dtype_name], batch)
    gradient(f, params)  # warm-up (allocator, kernels)
    if DEVICE.type == "cuda":
        hvp(f, params, v)  # and the second-order kernels' first launch (cheap on a GPU)

    def fwd():  # H v = d/dt ∇L(θ + t v): jvp of the gradient (no buffer is written, so torch.func is exact)
        return jvp(grad(f), (params,), (v,))[1]

    def native():  # the same double backward with PyTorch's own second derivative of convolutions
        leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
        return torch.autograd.grad(list(g), list(leaves.values()), grad_outputs=[v[k] for k in leaves])

    grads, hvps, ratios, fwds, fwd_ratios, natives = [], [], [], [], [], []
    for _ in range(repeats):
        tg = timed(lambda: gradient(f, params))
        th = timed(lambda: hvp(f, params, v))
        grads.append(tg)
        hvps.append(th)
        ratios.append(th / tg)
        natives.append(timed(native) / tg)
        if forward_mode:
            tf = timed(fwd)
            fwds.append(tf)
            fwd_ratios.append(tf / tg)
    holder = {}
    t_graph = timed(lambda: holder.setdefault("so", SecondOrder(model, x, y)))
    so = holder["so"]
    extra = [timed(lambda: so.hvp(v)) for _ in range(repeats)]
    out = {"dtype": dtype_name, "batch": batch, "gradient": min(grads), "hvp": min(hvps),
           "ratio": statistics.median(ratios), "ratios": ratios, "graph": t_graph, "extra_hvp": min(extra),
           "extra_ratio": min(extra) / min(grads), "native_ratio": statistics.median(natives)}
    if forward_mode:
        out.update(fwd=min(fwds), fwd_ratio=statistics.median(fwd_ratios),
                   fwd_vs_dbl=relative_difference(fwd(), hvp(f, params, v)))
    return out


# ------------------------------------------------------------------------------------------- 2. memory
def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident, this process).

    ``VmHWM`` rather than ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux preserves ``ru_maxrss`` across
    ``execve``, so a child forked from a large parent starts with the parent's peak (measured here: every child
    reported the parent's 6.2 GiB). ``VmHWM`` belongs to the new address space.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - not Linux


def child(kind: str, dtype_name: str, batch: int) -> dict:
    """One measurement in a fresh process: peak RSS of ``kind`` ∈ {gradient, hvp, check}."""
    from symtools.numeric.hvp import gradient, hvp

    model, params, f, x, y, v = setup(DTYPES[dtype_name], batch)
    gpu = DEVICE.type == "cuda"
    if gpu:  # the allocator's bytes (KiB here, like the resident set), counted from now
        benchdoc.sync(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE) // 1024
        out: dict = {"kind": kind, "dtype": dtype_name, "batch": batch, "rss_before_kb": before,
                     "peak_before_kb": before}
    else:
        before = _status_kb("VmRSS")
        out = {"kind": kind, "dtype": dtype_name, "batch": batch, "rss_before_kb": before,
               "peak_before_kb": _status_kb("VmHWM")}
    t0 = time.perf_counter()
    if kind == "gradient":
        gradient(f, params)
    elif kind == "hvp":
        hvp(f, params, v)
    elif kind == "check":
        from symtools.nn.graph import find_symmetries
        from symtools.numeric.checker import check

        found = find_symmetries(model, x[:1])
        report = check(model, x, y, found)
        out["report"] = {"pass": report.passed, "hvps": report.hvps,
                         "families": {k: {"groups": f.groups, "hvps": f.hessian["hvps"],
                                          "hessian_rel": f.hessian["rel_residual"],
                                          "gradient_max_rel": f.gradient["max_rel_residual"]}
                                      for k, f in report.families.items()},
                         "tolerance": {k: report.tolerance[k] for k in ("gradient", "hessian")}}
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    benchdoc.sync(DEVICE)
    out["seconds"] = time.perf_counter() - t0
    out["peak_kb"] = torch.cuda.max_memory_allocated(DEVICE) // 1024 if gpu else _status_kb("VmHWM")
    out["increment_kb"] = out["peak_kb"] - before
    return out


def memory(dtype_name: str, batch: int) -> dict[str, dict]:
    results = {}
    for kind in ("gradient", "hvp", "check"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-dtype", dtype_name,
               "--child-batch", str(batch), "--device", str(DEVICE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-2000:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {kind}: peak {results[kind]['peak_kb'] / 2**20:.2f} GiB, "
              f"+{results[kind]['increment_kb'] / 2**20:.2f} GiB, {results[kind]['seconds']:.1f} s", flush=True)
    return results


# ------------------------------------------------------------------------------------------- 3. curvlinops
def _kinks(model, f, params) -> list[torch.Tensor]:
    """The state of every kink of the network at ``params``: ReLU input signs and max-pool argmax indices."""
    from torch import nn

    state: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: state.append(a[0].detach() > 0))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    hooks += [m.register_forward_hook(lambda m, a, o: state.append(torch.nn.functional.max_pool2d_with_indices(
        a[0].detach(), m.kernel_size, m.stride)[1])) for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    try:
        with torch.no_grad():
            f(params)
    finally:
        for hk in hooks:
            hk.remove()
    return state


def kink_free_step(model, f, params, v) -> tuple[float, int]:
    """The largest step h = h₀·10⁻ᵏ (h₀ = default_fd_step) with no kink between θ − h v and θ + h v.

    Central differences are only a reference where the loss is smooth on the segment: a ReLU input changing
    sign or a max-pool changing its argmax makes g jump, and the jump divided by 2h swamps H v (measured on
    this model at batch 8: 81 kinks crossed at h₀, error 2e2 relative). Returns (h, kinks crossed at h₀).
    """
    from symtools.numeric.hvp import default_fd_step

    h0 = default_fd_step(params, v)
    first = None
    for k in range(6):
        h = h0 * 10.0 ** (-k)
        plus = _kinks(model, f, {n: p + h * v[n] for n, p in params.items()})
        minus = _kinks(model, f, {n: p - h * v[n] for n, p in params.items()})
        crossed = sum(int((a != b).sum()) for a, b in zip(plus, minus))
        first = crossed if first is None else first
        if crossed == 0:
            return h, first
    raise RuntimeError("no kink-free finite-difference step found")


def curvlinops_compare(batch: int, repeats: int) -> dict | None:
    try:
        import curvlinops
        from curvlinops import HessianLinearOperator
    except ImportError as exc:
        print(f"  curvlinops not available ({exc}); skipped", flush=True)
        return None
    import copy

    from torch import nn

    from symtools.numeric.hvp import default_fd_step, hvp, hvp_finite_difference, relative_difference

    from importlib.metadata import version

    out: dict = {"version": version("curvlinops-for-pytorch"), "batch": batch}
    for dtype_name in ("float32", "float64"):
        model, params, f, x, y, v = setup(DTYPES[dtype_name], batch)
        cl_model = copy.deepcopy(model).train()
        for m in cl_model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # torch.func cannot update running stats in place
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
            elif isinstance(m, nn.Dropout):
                m.eval()
        names = [n for n, _ in cl_model.named_parameters()]
        assert names == list(params), "parameter order differs"
        op = HessianLinearOperator(cl_model, nn.CrossEntropyLoss(), list(cl_model.parameters()), [(x, y)],
                                   check_deterministic=False)
        flat = torch.cat([v[k].flatten() for k in names])

        def unflat(t):
            res, i = {}, 0
            for k in names:
                n = params[k].numel()
                res[k] = t[i:i + n].reshape(params[k].shape)
                i += n
            return res

        holder = {}
        t_cl = min(timed(lambda: holder.__setitem__("cl", unflat(op @ flat))) for _ in range(repeats))
        t_ours = min(timed(lambda: holder.__setitem__("ours", hvp(f, params, v))) for _ in range(repeats))
        row = {"curvlinops_hvp": t_cl, "ours_hvp": t_ours,
               "cl_vs_ours": relative_difference(holder["cl"], holder["ours"])}
        if dtype_name == "float64":
            h, crossed = kink_free_step(model, f, params, v)
            fd = hvp_finite_difference(f, params, v, h=h)
            row.update(fd_step=h, fd_step_default=default_fd_step(params, v), kinks_at_default=crossed,
                       cl_vs_fd=relative_difference(holder["cl"], fd),
                       ours_vs_fd=relative_difference(holder["ours"], fd))
            fd_small = hvp_finite_difference(f, params, v, h=h / 10)  # FD's own error: round-off ∝ 1/h
            row["fd_small_vs_ours"] = relative_difference(fd_small, holder["ours"])
        out[dtype_name] = row
        print(f"  curvlinops {dtype_name}: {row}", flush=True)
    return out


# ------------------------------------------------------------------------------------------- report
def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def gib(kb: float) -> str:
    return f"{kb / 2**20:.2f}"


def section_name() -> str:
    return benchdoc.section_title(SECTION, DEVICE.type)


def section(info, speeds, mem, cl, repeats, memory_batch) -> tuple[str, list[str]]:
    missed = []
    gpu = DEVICE.type == "cuda"
    lines = [f"## {section_name()}", "",
             f"`python checks/bench_hessian.py{' --device cuda' if gpu else ''}` — VGG-16-BN (64×64 inputs, 200 "
             f"classes, 18.1 M parameters), random N(0, 1) batch, cross-entropy, BatchNorm with batch statistics, "
             f"dropout off, {'GPU, TensorFloat-32 off (as the checker runs), times between CUDA synchronisations' if gpu else 'CPU'}. One run; ratios are "
             f"taken within that run (the HVP/gradient ratio within each of {repeats} alternating repeats, median "
             f"reported).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".", "",
             "**One HVP vs one gradient at the same batch** (best of the repeats, milliseconds; target HVP ≤ 3× gradient):",
             "",
             "| dtype | batch | gradient [ms] | HVP from scratch [ms] | HVP / gradient (median; each repeat) "
             "| met | extra HVP on a built graph [ms] | extra / gradient | HVP / gradient with PyTorch's own conv "
             "double backward (median) |",
             "|---|---:|---:|---:|---:|:---:|---:|---:|---:|"]
    for s in speeds:
        met = s["ratio"] <= TARGET_RATIO
        if not met:
            missed.append(f"HVP/gradient {s['ratio']:.2f} at {s['dtype']} batch {s['batch']}")
        lines.append(f"| {s['dtype']} | {s['batch']} | {ms(s['gradient'])} | {ms(s['hvp'])} | {s['ratio']:.2f} "
                     f"({', '.join(f'{r:.2f}' for r in s['ratios'])}) | {'yes' if met else '**no**'} | "
                     f"{ms(s['extra_hvp'])} | {s['extra_ratio']:.2f} | {s['native_ratio']:.2f} |")
    lines += ["", "Operation count of the convolutions (F = their forward pass; docs/checker.md, section 7): a "
              "gradient is F + 2F; an HVP from scratch F + F + 6F = 8F, 2.67× (its first backward skips the weight "
              "gradients' values, which H v does not read); an extra HVP on a built graph 6F, 2×. BatchNorm's second "
              "derivative, ReLU and max-pool masks and kernel launches come on top. The checker builds the "
              "first-order graph once (it needs the gradient anyway) and pays one extra HVP per Hessian test."]
    fwd = [s for s in speeds if "fwd" in s]
    if fwd:
        lines += ["", "For comparison, forward-over-reverse (`torch.func.jvp` of `torch.func.grad` of the same loss, "
                  "no buffer written): " + "; ".join(
                      f"{s['dtype']} batch {s['batch']}: {ms(s['fwd'])} ms, {s['fwd_ratio']:.2f}× a gradient "
                      f"(agrees with double backward to {s['fwd_vs_dbl']:.0e})" for s in fwd) + "."]
    rep = mem["check"]["report"]
    h = rep["hvps"]
    total_hvps = h["verification"] + h["reference"] + h["calibration"]
    naive = rep["hvps"]["per_group_naive"]
    fams = ", ".join(f"{k} {v['groups']:,} groups / {v['hvps']} HVP" for k, v in rep["families"].items())
    met_h = total_hvps <= TARGET_HVPS
    if not met_h:
        missed.append(f"{total_hvps} HVPs")
    ratio_mem = mem["check"]["increment_kb"] / mem["gradient"]["increment_kb"]
    ratio_peak = mem["check"]["peak_kb"] / mem["gradient"]["peak_kb"]
    met_m, met_p = ratio_mem <= TARGET_MEMORY, ratio_peak <= TARGET_MEMORY
    if not met_m:
        missed.append(f"checker memory increment {ratio_mem:.2f}× a gradient's")
    if not met_p:
        missed.append(f"checker peak RSS {ratio_peak:.2f}× a gradient's")
    if gpu:
        mem_what = ("peak of the CUDA caching allocator's allocated bytes, `torch.cuda.max_memory_allocated`; "
                    "increment = peak − bytes allocated just before the operation, with model and batch resident")
        mem_col = "peak allocated [GiB]"
    else:
        mem_what = ("peak resident set `VmHWM` of the child — `ru_maxrss` would inherit the parent's peak across "
                    "`execve`; increment = peak − RSS just before the operation, with model, batch and imports "
                    "resident")
        mem_col = "peak RSS [GiB]"
    lines += ["", f"**HVPs for all Hessian identities** (the checker's own report, float64, batch {memory_batch}): "
              f"{total_hvps} HVPs in all: {h['verification']} tests ({fams}; verdict "
              f"{'PASS' if rep['pass'] else 'FAIL'}) + {h['reference']} reference ‖H u‖ + {h['calibration']} for "
              f"the round-off floor (measured by a permuted-batch gradient instead), instead of {naive:,} (one per "
              f"group). Target ≤ {TARGET_HVPS}: {'yes' if met_h else '**no**'}.", "",
              f"**Peak memory, one subprocess each** (float64, batch {memory_batch}; {mem_what}):", "",
              f"| operation | {mem_col} | peak / gradient's | increment [GiB] | increment / gradient's | time [s] |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind, label in (("gradient", "one gradient"), ("hvp", "one HVP (from scratch)"),
                        ("check", "whole checker (find_symmetries + check)")):
        m = mem[kind]
        lines.append(f"| {label} | {gib(m['peak_kb'])} | {m['peak_kb'] / mem['gradient']['peak_kb']:.2f} | "
                     f"{gib(m['increment_kb'])} | {m['increment_kb'] / mem['gradient']['increment_kb']:.2f} | "
                     f"{m['seconds']:.1f} |")
    lines += ["", f"Checker memory ≤ {TARGET_MEMORY:g}× a gradient's: {'peak allocated' if gpu else 'peak RSS of the process'} "
              f"{ratio_peak:.2f}× ({'yes' if met_p else '**no**'}); increment over the resident model, batch and "
              f"imports {ratio_mem:.2f}× ({'yes' if met_m else '**no**'}). Most of the checker's increment is its "
              f"one second-order graph: the first-order graph kept with `create_graph=True`, with BatchNorm "
              f"evaluated op by op (ε as a differentiable leaf) rather than by the fused kernel; the permuted-batch "
              f"gradient (first order) is released before the main graph is built."]
    if cl is None:
        lines += ["", "curvlinops: not installed in this run (optional; see the script's docstring)."]
    else:
        c32, c64 = cl["float32"], cl["float64"]
        lines += ["", f"**curvlinops {cl['version']} `HessianLinearOperator`** (train mode with "
                  f"`track_running_stats=False`, dropout off; batch {cl['batch']}; best of {repeats}):", "",
                  "| dtype | curvlinops H v [ms] | ours H v [ms] | ‖H v_cl − H v_ours‖/‖H v_ours‖ "
                  "| vs central FD: curvlinops | vs central FD: ours |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| float32 | {ms(c32['curvlinops_hvp'])} | {ms(c32['ours_hvp'])} | {c32['cl_vs_ours']:.1e} | | |",
                  f"| float64 | {ms(c64['curvlinops_hvp'])} | {ms(c64['ours_hvp'])} | {c64['cl_vs_ours']:.1e} | "
                  f"{c64['cl_vs_fd']:.1e} | {c64['ours_vs_fd']:.1e} |", "",
                  f"Central differences (float64) at h = {c64['fd_step']:.1e}, the largest step h₀·10⁻ᵏ with no "
                  f"ReLU sign or max-pool argmax change between θ ± h v (the default h₀ = "
                  f"{c64['fd_step_default']:.1e} crosses {c64['kinks_at_default']} kinks, and each jump of the "
                  f"gradient divided by 2h swamps H v). FD's own error is round-off there: at h/10 it differs from "
                  f"our H v by {c64['fd_small_vs_ours']:.1e} (∝ 1/h).", "",
                  "curvlinops differentiates twice with torch.func, whose second derivatives through train-mode "
                  "BatchNorm are wrong (DESIGN.md, `tests/test_hvp.py`); our double-backward HVP agrees with finite "
                  "differences to their own truncation/round-off level. (Without BatchNorm the two agree to ~1e-16.)"]
    if not gpu:
        lines += ["", "GPU: `python checks/bench_hessian.py --device cuda` records the same measurements on a GPU "
                  "in the section \"Checker (Hessian identities), GPU\" (when a GPU was available to a session).", ""]
    else:
        lines.append("")
    return "\n".join(lines), missed



def update_doc(path: Path, text: str) -> None:
    benchdoc.update_doc(path, section_name(), text, HEADER)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-curvlinops", action="store_true")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--child-batch", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    from symtools.numeric.precision import ieee_float32

    with ieee_float32():  # the checker's setting; no effect on the CPU
        return run(args)


def run(args) -> int:
    if args.child:
        print(json.dumps(child(args.child, args.child_dtype, args.child_batch)))
        return 0
    info = machine()
    mem = memory("float64", args.memory_batch)  # first, while this process is still small
    speeds = []
    for dtype_name in args.dtypes:
        for batch in args.batches:
            s = speed(dtype_name, batch, args.repeats, forward_mode=batch == min(args.batches))
            print(f"  speed {dtype_name} batch {batch}: gradient {s['gradient']:.2f} s, HVP {s['hvp']:.2f} s, "
                  f"ratio {s['ratio']:.2f}, extra HVP {s['extra_hvp']:.2f} s", flush=True)
            speeds.append(s)
    cl = None if args.no_curvlinops else curvlinops_compare(min(args.batches), args.repeats)
    print("raw results:", json.dumps({"speed": speeds, "memory": mem, "curvlinops": cl}, default=float))
    text, missed = section(info, speeds, mem, cl, args.repeats, args.memory_batch)
    print(text)
    if not args.no_doc:
        update_doc(args.doc, text)
        print(f"updated section '{section_name()}' of {args.doc}")
    if missed:
        print(f"target missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
