#!/usr/bin/env python
"""Benchmark of the training monitor against issue 15's targets: ATen calls and host syncs per step, overhead
in time against the training step, the memory it keeps, and the exactness of its laws.

    python checks/bench_monitor.py [--steps 4] [--warmup 2] [--device cpu] [--threads N]
                                   [--no-doc] [--strict] [--quick]

1. **Counts** (machine-independent; :class:`symtools.testing.op_count.OpCounter`): VGG-11/16/19-BN, batch 4,
   32×32, 200 classes, ``torch.optim.SGD(lr=0.1, weight_decay=5e-4)`` with momentum 0 and 0.9, the monitor
   with the *flat* reducer in one piece (``symtools.numeric.flat.CPU_CHUNK = 1 << 40``: the device's kernel
   path). ATen calls and host syncs of the training step (``zero_grad`` + forward + loss + backward +
   ``optimizer.step()``) and of the monitor's hooks (``before_step`` + ``after_step``) at step 3 (the first two
   steps change the optimizer's state, on which the law matrices are rebuilt on the host) — the same counts
   are checked at every later step before the stride — and, at the record stride (step 5 here), the hooks'
   syncs and their device→host copies (calls of ``Tensor.cpu``: on the CPU they dispatch nothing, so the
   OpCounter cannot see them). Targets: monitor ≤ 30 % of the training step's calls (VGG-16-BN); the
   monitor's count for VGG-11-BN and VGG-19-BN within 10 % of VGG-16-BN's; 0 syncs off the stride.
2. **Time**: VGG-16-BN, float32, 200 classes, the same SGD, random data, at batch 128 64×64 (target ≤ 3 %)
   and batch 16 32×32 (target ≤ 15 %) on the CPU; batch 128 64×64 (target ≤ 5 %) on a GPU. Every reducer
   (the device's default — "compiled" on a CPU with a C compiler — and, for information, the others: "sites"
   on the CPU, "flat") watches the *same* training run: each has its own
   :class:`~symtools.numeric.monitor.Monitor` (stride 10, no identity checks), called in the order of
   :func:`symtools.training.train`, the order of the monitors alternating from step to step. In each step
   the training step and each monitor's hooks are timed separately; the overhead is their ratio within the
   step (median over the ``--steps`` timed steps, after ``--warmup`` untimed ones; the ratio of the totals
   beside it), so a change of the machine's load between steps cancels.
3. **Memory** (bytes of the tensors the monitor holds between steps, each storage counted once, storages of
   the model and the optimizer left out): per-group float64 state, law matrices and per-column constants,
   the flat reducer's flat buffers (``_plan.sources``), index maps (``_plan.layers.ids``) and scratch
   (``_plan.scratch``), the live reducers' copy of θ for the displacement (``_theta_before``); the peak
   allocated inside the hooks (CPU: ``torch.profiler`` memory events; CUDA: ``max_memory_allocated``); and
   the reference approach of the paper's code (one buffer per parameter per tracked integral).
4. **Checks**: the worst per-step law residual of every run (float32 target ≤ 1e-6), and, in one extra
   untimed step, every term of every group as the flat reducer and each other reducer compute it, compared
   relative to Σ|density| (what was summed; the flat and the compiled reducers multiply in float64, the sites
   one in float32: ≈ 2⁻²⁴).
5. **Floor** (CPU): the time of one read of all parameters (Σ per tensor in float64) next to the training
   step: the monitor must read θ, g (b) before the step and θ after it, so k such passes bound its cost from
   below in any implementation that streams the tensors from memory.

Prints everything and replaces the section "Monitor" ("Monitor, GPU" for ``--device cuda``) of
``docs/benchmarks.md``. ``--strict`` exits 1 when a target is missed; ``--quick`` is a smoke test (VGG-11-BN
and VGG-13-BN counts, one small timed step; never writes the doc, time targets not judged).
"""

from __future__ import annotations

import benchdoc  # checks/benchdoc.py (the scripts run from checks/)
import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Monitor"
HEADER = "# Benchmarks\n\nSpeed and memory targets of symtools, measured by the scripts in `checks/`.\n"
CLASSES = 200
STRIDE = 10                 # the timed runs' record stride (no timed step is a stride step)
COUNT_STRIDE = 5            # the counted runs' stride: steps 3, 4 ordinary, step 5 a stride step
COUNT_STEP = 3              # the counted step: after the two steps that change the optimizer's state
COUNT_BATCH, COUNT_INPUT = 4, 32
ATEN_TARGET = 0.30          # monitor calls / training-step calls (VGG-16-BN)
DEPTH_TARGET = 0.10         # |calls(VGG-11/19-BN) − calls(VGG-16-BN)| / calls(VGG-16-BN)
RESIDUAL_TARGET = 1e-6      # float32 per-step law residual
#: (name, batch, input size, target overhead) per device type
TIME_CONFIGS = {"cpu": [("batch 128, 64×64", 128, 64, 0.03), ("batch 16, 32×32", 16, 32, 0.15)],
                "cuda": [("batch 128, 64×64", 128, 64, 0.05), ("batch 16, 32×32", 16, 32, None)]}
QUICK_CONFIG = [("batch 4, 32×32 (quick)", 4, 32, None)]


# ---------------------------------------------------------------------------------------------- helpers
def _batches(kind: str, batch: int, size: int, count: int, device: torch.device):
    if kind == "digits":
        from symtools.data.loader import make_loader

        stream = make_loader("digits", batch, image_size=size, seed=0)
        out = [stream.batch(i) for i in range(count)]
        return [(x.to(device), y.to(device)) for x, y in out]
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, CLASSES, (batch,), generator=g).to(device)) for _ in range(count)]


def _setup(model_name: str, input_size: int, momentum: float, device: torch.device):
    from symtools.nn.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, input_size=input_size, classes=CLASSES).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4, momentum=momentum)
    return model, opt


def _context(model, opt, tmp: Path, device, steps: int):
    from symtools.numeric.records import RecordWriter
    from symtools.training import TrainContext

    tmp.mkdir(parents=True, exist_ok=True)
    return TrainContext(model=model, optimizer=opt, scheduler=None, loss_fn=torch.nn.functional.cross_entropy,
                        records=RecordWriter(tmp / "records"), out_dir=tmp, device=device, config={}, steps=steps)


def _forward_backward(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits, loss


@contextmanager
def _host_copies(module: str = "symtools.numeric.monitor"):
    """Count the ``Tensor.cpu()`` calls made by ``module`` (device→host copies on a device; on the CPU they
    dispatch no ATen call, so the OpCounter cannot see them). The record writer's own ``.cpu()`` of the rows
    handed to it (already on the host) is not counted."""
    box = [0]
    original = torch.Tensor.cpu

    def counted(self, *a, **k):
        if sys._getframe(1).f_globals.get("__name__") == module:
            box[0] += 1
        return original(self, *a, **k)

    torch.Tensor.cpu = counted
    try:
        yield box
    finally:
        torch.Tensor.cpu = original


def _storages(obj, seen: set, out: list, depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` (dicts, lists, tuples, objects' ``__dict__``), each storage once."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.device.type, st.data_ptr())
        if st.nbytes() and key not in seen:
            seen.add(key)
            out.append(st.nbytes())
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _storages(v, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module, torch.optim.Optimizer)) \
            and type(obj).__module__.startswith("symtools"):
        for v in vars(obj).values():
            _storages(v, seen, out, depth + 1)


def _bytes(obj, seen: set) -> int:
    out: list[int] = []
    _storages(obj, seen, out)
    return sum(out)


STATE_ATTRS = ("_acc", "_cont", "_pred", "_measured_before", "_pending", "_pending_groups")
SKIP_ATTRS = {"_params", "symmetries", "sites", "_plan", "_theta_before", "_laws", "_groups", "_checks",
              "_columns", "_state_dir"}


def memory(monitor, model, opt) -> dict[str, int]:
    """Bytes the monitor keeps between steps, by kind (each storage counted once; the model's and the
    optimizer's own storages are not the monitor's)."""
    seen: set = set()
    for p in model.parameters():
        _storages(p, seen, [])
        if p.grad is not None:
            _storages(p.grad, seen, [])
    for b in model.buffers():
        _storages(b, seen, [])
    for st in opt.state.values():
        _storages(dict(st), seen, [])
    plan = monitor._plan
    out = {"state": sum(_bytes(getattr(monitor, a, None), seen) for a in STATE_ATTRS)}
    # the site reducer builds neither flat buffers nor index maps
    out["flat_buffers"] = _bytes(plan.sources.flat, seen) if plan.sources is not None else 0
    out["staging"] = _bytes(plan.sources, seen) if plan.sources is not None else 0
    out["flat_ids"] = _bytes(plan.layers.ids, seen) if plan.layers is not None else 0
    out["flat_scratch"] = _bytes(plan.scratch, seen)
    out["theta_copy"] = _bytes(monitor._theta_before, seen)
    constants = sum(_bytes(v, seen) for k, v in vars(monitor).items() if k not in SKIP_ATTRS and k not in STATE_ATTRS)
    constants += sum(_bytes(v, seen) for k, v in vars(plan).items() if k not in ("sources", "layers", "scratch"))
    out["constants"] = constants
    out["total"] = sum(out.values())
    return out


def reference_bytes(monitor, model) -> tuple[int, int, int]:
    """(parameters tracked, bytes per integral, integrals per parameter) of the per-parameter-buffer approach."""
    params = dict(model.named_parameters())
    names = sorted({p for s in monitor.sites for p in s.gs.params()})
    per_integral = sum(params[n].numel() * params[n].element_size() for n in names)
    fams = monitor._plan.layout.families
    k = max((len(f.law.CONTINUOUS_STATE) for f in fams.values() if f.law is not None), default=1)
    return sum(params[n].numel() for n in names), per_integral, max(k, 1)


def _peak_cpu_bytes(fn) -> int:
    """Peak of live bytes allocated by ``fn`` on the CPU (torch.profiler memory events, allocations − frees)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for ev in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if ev.name() == "[memory]":
            live += ev.nbytes()
            peak = max(peak, live)
    return peak


def _peak_bytes(fn, device: torch.device) -> int:
    if device.type != "cuda":
        return _peak_cpu_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@contextmanager
def _one_piece():
    """The flat reducer without CPU chunks (the kernel path whose calls are counted)."""
    from symtools.numeric import flat

    old = flat.CPU_CHUNK
    flat.CPU_CHUNK = 1 << 40
    try:
        yield
    finally:
        flat.CPU_CHUNK = old


# ---------------------------------------------------------------------------------------------- 1. counts
def count_config(model_name: str, momentum: float, args, device: torch.device) -> dict:
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.monitor import Monitor
    from symtools.testing.op_count import OpCounter

    model, opt = _setup(model_name, COUNT_INPUT, momentum, device)
    batches = _batches(args.data, COUNT_BATCH, COUNT_INPUT, COUNT_STRIDE, device)
    with _one_piece(), tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(find_symmetries(model, batches[0][0][:1]), stride=COUNT_STRIDE, reducer="flat")
        ctx = _context(model, opt, Path(tmp), device, steps=10 * COUNT_STRIDE)
        monitor.on_start(ctx)
        steps = {}
        for step in range(1, COUNT_STRIDE + 1):
            x, y = batches[step - 1]
            ctx.step, ctx.batch = step, (x, y)
            model.train()
            with OpCounter() as tr:
                logits, loss = _forward_backward(model, opt, x, y)
            ctx.loss, ctx.logits = loss.detach(), logits.detach()
            with _host_copies() as copies, OpCounter() as before:
                monitor.before_step(ctx)
            with OpCounter() as tr_step:
                opt.step()
            with _host_copies() as copies_after, OpCounter() as after:
                monitor.after_step(ctx)
            steps[step] = {"train": tr.calls + tr_step.calls, "train_syncs": tr.syncs + tr_step.syncs,
                           "monitor": before.calls + after.calls, "monitor_syncs": before.syncs + after.syncs,
                           "copies": copies[0] + copies_after[0]}
        ctx.records.close()
    ordinary = [steps[s] for s in range(COUNT_STEP, COUNT_STRIDE)]
    same = all(o == ordinary[0] for o in ordinary)
    return {"model": model_name, "momentum": momentum, **steps[COUNT_STEP], "stable": same,
            "stride": steps[COUNT_STRIDE], "first": [steps[s]["monitor"] for s in range(1, COUNT_STEP)],
            "first_syncs": [steps[s]["monitor_syncs"] for s in range(1, COUNT_STEP)],
            "groups": sum(s.gs.count for s in monitor.sites)}


# ---------------------------------------------------------------------------------------------- 2.–4. time, memory, checks
def _terms(monitors: dict, ctxs: dict, which: str) -> tuple[dict, torch.Tensor]:
    """Every term of every group by each reducer, and Σ|density| of each (flat reducer, absolute monomials)."""
    from symtools.numeric.monitor_plan import term_matrix

    out = {}
    for r, m in monitors.items():
        plan = m._plan
        sources = m._before_sources(ctxs[r]) if which == "before" else m._after_sources()
        out[r] = plan.terms(getattr(plan, which), *sources)
    m = monitors["flat"]
    plan = m._plan
    rows = plan.before_rows if which == "before" else plan.after_rows
    tm = term_matrix(plan.layout, [(f, n, mono, True, fn) for f, n, mono, _, fn in rows], plan.device)
    sources = m._before_sources(ctxs["flat"]) if which == "before" else m._after_sources()
    return out, plan.terms(tm, *sources)


def time_config(config: tuple, momentum: float, reducers: list[str], args, device: torch.device) -> dict:
    from symtools.nn.graph import find_symmetries
    from symtools.numeric.monitor import Monitor

    name, batch, size, target = config
    model, opt = _setup(args.model, size, momentum, device)
    steps = args.steps if batch >= 64 or args.quick else max(args.steps, args.small_steps)
    total = args.warmup + steps
    batches = _batches(args.data, batch, size, total + 1, device)
    symmetries = find_symmetries(model, batches[0][0][:1])
    out = {"config": name, "batch": batch, "input": size, "target": target, "momentum": momentum, "steps": steps,
           "load": _load(),
           "params": sum(p.numel() for p in model.parameters()), "train": [], "reducers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        monitors, ctxs = {}, {}
        for r in reducers:
            monitors[r] = Monitor(symmetries, stride=STRIDE, reducer=r)
            ctxs[r] = _context(model, opt, Path(tmp) / r, device, steps=total + 1)
            monitors[r].on_start(ctxs[r])
        times = {r: [] for r in reducers}
        peaks = {r: 0 for r in reducers}
        check = None
        for step in range(1, total + 2):
            x, y = batches[step - 1]
            order = reducers if step % 2 else reducers[::-1]
            for c in ctxs.values():
                c.step, c.batch = step, (x, y)
            model.train()
            benchdoc.sync(device)
            t0 = time.perf_counter()
            logits, loss = _forward_backward(model, opt, x, y)
            benchdoc.sync(device)
            t1 = time.perf_counter()
            for c in ctxs.values():
                c.loss, c.logits = loss.detach(), logits.detach()
            if step == total + 1:  # one extra, untimed step: the reducers' terms compared, the hooks' peak memory
                if "flat" in monitors and len(monitors) > 1:
                    before, size_b = _terms(monitors, ctxs, "before")
                for r in order:
                    peaks[r] = _peak_bytes(lambda r=r: monitors[r].before_step(ctxs[r]), device)
                opt.step()
                if "flat" in monitors and len(monitors) > 1:
                    after, size_a = _terms(monitors, ctxs, "after")
                    check = {other: max(float(((b["flat"] - b[other]).abs() / s.clamp_min(1e-300)).max())
                                        for b, s in ((before, size_b), (after, size_a)))
                             for other in reducers if other != "flat"}
                for r in order:
                    peaks[r] = max(peaks[r], _peak_bytes(lambda r=r: monitors[r].after_step(ctxs[r]), device))
                break
            mon = {}
            for r in order:
                benchdoc.sync(device)
                a = time.perf_counter()
                monitors[r].before_step(ctxs[r])
                benchdoc.sync(device)
                mon[r] = time.perf_counter() - a
            benchdoc.sync(device)
            t2 = time.perf_counter()
            opt.step()
            benchdoc.sync(device)
            t3 = time.perf_counter()
            for r in order:
                a = time.perf_counter()
                monitors[r].after_step(ctxs[r])
                benchdoc.sync(device)
                mon[r] += time.perf_counter() - a
            for c in ctxs.values():
                c.records.flush(fsync=False)
            if step > args.warmup:
                out["train"].append((t1 - t0) + (t3 - t2))
                for r in reducers:
                    times[r].append(mon[r])
        for c in ctxs.values():
            c.records.close()
        floor = None
        if device.type == "cpu" and not args.quick:
            floor = read_floor(model, opt, device, out["train"], monitors["flat"]._plan if "flat" in monitors else None)
        for r, m in monitors.items():
            n_params, per_integral, k = reference_bytes(m, model)
            out["reducers"][r] = {
                "law": m.kind, "groups": sum(s.gs.count for s in m.sites), "monitor": times[r],
                "ratios": [a / b for a, b in zip(times[r], out["train"])], "worst": m.worst["step"],
                "memory": memory(m, model, opt), "peak": peaks[r], "ref_params": n_params,
                "ref_per_integral": per_integral, "ref_k": k}
    out["check"] = check
    out["floor"] = floor
    out["loss"] = float(loss.detach())
    return out


def read_floor(model, opt, device, train: list[float], plan, repeats: int = 7) -> dict:
    """Best-of-``repeats`` times of streaming passes over the parameters, against the training step: one read of
    θ (a float32 Σ per tensor: each element read once), θ, g and the momentum buffer read once together, one
    float64-accumulated Σ of θ (the monitor's summation precision: torch widens each element), and θ copied into
    a flat float64 vector (the flat reducer's first step per source). ``plan``: a flat reducer's plan, for its
    number of monomials (the float64 passes it makes per step)."""
    params = [p.detach() for p in model.parameters()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()
            if "momentum_buffer" in opt.state.get(p, {})]

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            benchdoc.sync(device)
            t = time.perf_counter()
            fn()
            benchdoc.sync(device)
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        stage = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
        flat = torch.empty(stage.numel(), dtype=torch.float64, device=device)

        def widen():
            torch.cat([p.reshape(-1) for p in params], out=stage)
            flat.copy_(stage)

        out = {"bytes": sum(p.numel() * p.element_size() for p in params),
               "theta": best(lambda: [x.sum() for x in params]),
               "all": best(lambda: [x.sum() for x in params + grads + bufs]),
               "sum64": best(lambda: [x.sum(dtype=torch.float64) for x in params]),
               "cat64": best(widen), "train": statistics.median(train)}
    if plan is not None:
        out["monomials"] = (len(plan.before.monomials) if plan.before else 0) + len(plan.after.monomials)
        out["layers"] = len(plan.layers.ids)
    return out


# ---------------------------------------------------------------------------------------------- the doc
def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def _yes(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def verdicts(counts: list[dict], timed: list[dict], args, device: torch.device) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of issue 15's targets (None: not measured in this run)."""
    out = []
    by = {(c["model"], c["momentum"]): c for c in counts}
    for mom in sorted({c["momentum"] for c in counts}):
        ref = by.get(("vgg16_bn", mom))
        if ref is not None:
            ratio = ref["monitor"] / ref["train"]
            out.append(((f"ATen calls of the monitor per step ≤ {100 * ATEN_TARGET:g} % of the training step's "
                         f"(VGG-16-BN, momentum {mom:g})"),
                        f"{ref['monitor']} / {ref['train']} = {_pct(ratio)}", ratio <= ATEN_TARGET))
        base = ref or next(c for c in counts if c["momentum"] == mom)
        others = [c for c in counts if c["momentum"] == mom]
        if len(others) > 1:
            spread = max(abs(c["monitor"] - base["monitor"]) / base["monitor"] for c in others)
            out.append((f"same count within {100 * DEPTH_TARGET:g} % for every depth (momentum {mom:g})",
                        ", ".join(f"{c['model']} {c['monitor']}" for c in others) + f" (spread {_pct(spread)})",
                        spread <= DEPTH_TARGET and all(c["stable"] for c in others)))
    if counts:
        syncs = max(c["monitor_syncs"] for c in counts)
        stride = {(c["stride"]["monitor_syncs"], c["stride"]["copies"]) for c in counts}
        out.append(("host syncs of the monitor per step: 0 except at the record stride",
                    f"{syncs} per ordinary step (every model and optimizer); at the stride step: "
                    + "; ".join(f"{s} syncs, {k} device→host copies" for s, k in sorted(stride)),
                    syncs == 0))
    default = _default(device)
    for cfg in TIME_CONFIGS.get(device.type, []):
        rows = [t for t in timed if t["config"] == cfg[0]]
        target = cfg[3]
        if target is None:
            continue
        where = "GPU" if device.type == "cuda" else "CPU"
        label = f"{where} overhead ≤ {100 * target:g} % at {cfg[0]} (VGG-16-BN, {default} reducer)"
        if not rows or args.quick:
            out.append((label, "not measured in this run", None))
            continue
        meds = [(t["momentum"], statistics.median(t["reducers"][default]["ratios"])) for t in rows]
        out.append((label, ", ".join(f"momentum {m:g}: {_pct(v)}" for m, v in meds), all(v <= target for _, v in meds)))
    if device.type != "cuda":
        out.append(("GPU overhead ≤ 5 % at batch 128 64×64", ("not measured (no GPU in this run: "
                                                               "`--device cuda` writes section \"Monitor, GPU\")"), None))
    worst = [r["worst"] for t in timed for r in t["reducers"].values() if r["worst"] is not None]
    if worst:
        out.append((f"laws exact: worst per-step law residual ≤ {RESIDUAL_TARGET:g} (float32)",
                    f"{max(worst):.1e}", max(worst) <= RESIDUAL_TARGET))
    return out


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover
        return "n/a"


def _default(device: torch.device) -> str:
    from symtools.numeric.monitor_plan import default_reducer

    return default_reducer(device)


#: What each reducer is, for the text (docs/monitor.md, "The fused core")
DESCRIBE = {"flat": "the device path; on the CPU its scatter-adds are scalar loops",
            "sites": "eager PyTorch over the live tensors, the CPU's default before the compiled one",
            "compiled": "one generated C loop per tensor, each tensor read once per hook"}


def counts_table(counts: list[dict]) -> str:
    lines = [("| model | groups | momentum | training step: ATen calls | syncs | monitor hooks: ATen calls | syncs "
              "| monitor / training | steps 1, 2: monitor calls (syncs) | stride step: monitor calls | syncs "
              "| device→host copies |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in counts:
        first = ", ".join(f"{n} ({s})" for n, s in zip(c["first"], c["first_syncs"]))
        lines.append(f"| {c['model']} | {c['groups']:,} | {c['momentum']:g} | {c['train']} | {c['train_syncs']} "
                     f"| {c['monitor']}{'' if c['stable'] else ' (varies!)'} | {c['monitor_syncs']} "
                     f"| {_pct(c['monitor'] / c['train'])} | {first} | {c['stride']['monitor']} "
                     f"| {c['stride']['monitor_syncs']} | {c['stride']['copies']} |")
    return "\n".join(lines)


def time_table(timed: list[dict], device: torch.device) -> str:
    default = _default(device)
    lines = [("| configuration | momentum | law | reducer | timed steps (load at start) | train step, median [s] "
              "| monitor, median [s] | overhead, median of per-step ratios | overhead, ratio of totals | min–max ratio "
              "| target | met |"),
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|:---:|"]
    for t in timed:
        for r, v in t["reducers"].items():
            med = statistics.median(v["ratios"])
            tot = sum(v["monitor"]) / sum(t["train"])
            judged = r == default and t["target"] is not None
            lines.append(f"| {t['config']} | {t['momentum']:g} | {v['law']} | {r}{' (default)' if r == default else ''} "
                         f"| {t['steps']} ({t['load']}) | {statistics.median(t['train']):.3f} | {statistics.median(v['monitor']):.4f} "
                         f"| {_pct(med)} | {_pct(tot)} | {100 * min(v['ratios']):.1f}–{100 * max(v['ratios']):.1f} % "
                         f"| {_pct(t['target']) if judged else '—'} | {_yes(med <= t['target']) if judged else '—'} |")
    return "\n".join(lines)


MEMORY_ROWS = [
    ("per-group float64 state (accumulated, continuous, pending prediction and terms, rows awaiting the stride)", "state"),
    ("law matrices and per-column constants (term matrices, masks, index columns)", "constants"),
    ("`_plan.sources.flat`: the flat reducer's float64 copies of θ, θ', g, b, d", "flat_buffers"),
    ("`_plan.sources` staging: one float32 vector (flat reducer only)", "staging"),
    ("`_plan.layers.ids`: element → column index maps (flat reducer only)", "flat_ids"),
    ("`_plan.scratch`: the flat reducer's scratch (monomial rows of one chunk, sums)", "flat_scratch"),
    ("`_theta_before`: the live reducers' copy of θ for the displacement Δθ (momentum)", "theta_copy"),
    ("**total kept between steps**", "total"),
]


def memory_table(t: dict) -> str:
    cols = list(t["reducers"])
    first = t["reducers"][cols[0]]
    lines = [f"| memory ({t['config']}, momentum {t['momentum']:g}) | " + " | ".join(f"{r} reducer" for r in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, key in MEMORY_ROWS:
        lines.append(f"| {label} | " + " | ".join(_mb(t["reducers"][r]["memory"][key]) for r in cols) + " |")
    lines.append("| peak allocated inside before_step/after_step | "
                 + " | ".join(_mb(t["reducers"][r]["peak"]) for r in cols) + " |")
    ref = first["ref_per_integral"] * first["ref_k"]
    lines.append(f"| reference (per-parameter buffers): {first['ref_k']} integral(s) × {_mb(first['ref_per_integral'])} "
                 f"| " + " | ".join(_mb(ref) for _ in cols) + " |")
    lines.append("| reference / monitor's per-group state | "
                 + " | ".join(f"{ref / max(t['reducers'][r]['memory']['state'], 1):,.0f}×" for r in cols) + " |")
    return "\n".join(lines)


def _floor(t: dict) -> float:
    """Before the step θ, g (and b) read once (timed together), after it θ read once, and with momentum one more
    read for the displacement (θ_{n-1} kept, or b' re-read)."""
    f = t["floor"]
    return f["all"] + f["theta"] * (2 if t["momentum"] else 1)


def floor_table(timed: list[dict], device: torch.device) -> str:
    rows = [t for t in timed if t.get("floor")]
    if not rows:
        return ""
    default = _default(device)
    lines = [(f"| configuration | momentum | train step, median [s] | one read of θ ({_mb(rows[0]['floor']['bytes'])}) [ms] "
              f"| read bandwidth | θ, g (and b) read once [ms] | read floor [ms] | read floor / train step "
              f"| Σ θ in float64 [ms] | flat plan: monomials per step | float64 floor [ms] | float64 floor / train step "
              f"| θ → flat float64 [ms] | {default} reducer's hooks [ms] | hooks / one read of θ |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in rows:
        f = t["floor"]
        mon = statistics.median(t["reducers"][default]["monitor"])
        m = f.get("monomials")
        f64 = m * f["sum64"] if m else None
        lines.append(f"| {t['config']} | {t['momentum']:g} | {f['train']:.3f} | {1e3 * f['theta']:.1f} "
                     f"| {f['bytes'] / f['theta'] / 1e9:.1f} GB/s | {1e3 * f['all']:.1f} | {1e3 * _floor(t):.1f} "
                     f"| {_pct(_floor(t) / f['train'])} | {1e3 * f['sum64']:.1f} | {m if m else '—'} "
                     f"| {f'{1e3 * f64:.0f}' if f64 else '—'} | {_pct(f64 / f['train']) if f64 else '—'} "
                     f"| {1e3 * f['cat64']:.1f} | {1e3 * mon:.0f} | {mon / f['theta']:.0f}× |")
    return "\n".join(lines)


def reading(counts: list[dict], timed: list[dict], device: torch.device) -> str:
    """What the tables say, in words, from this run's numbers."""
    default = _default(device)
    out = []
    ref = [c for c in counts if c["model"] == "vgg16_bn"]
    if ref:
        st = ref[0]["stride"]
        per = {}
        for c in counts:
            per.setdefault(c["momentum"], set()).add(c["monitor"])
        models = sorted({c["model"] for c in counts})
        out.append("**Counts.** The monitor's ATen calls per ordinary step are "
                   + "; ".join(f"{', '.join(str(n) for n in sorted(v))} with momentum {m:g}" for m, v in per.items())
                   + f" for every model counted ({', '.join(models)}), and it makes no host sync there. "
                   f"A record-stride step costs {st['monitor'] - ref[0]['monitor']} "
                   f"more calls and {st['copies']} device→host copies (the stacked `laws` rows of the stride, and the "
                   f"step's per-group values): each is a sync on a device, none on the CPU. The first two steps cost "
                   f"more (the law matrices are built on the host when the optimizer's state appears).")
    by = {}
    for t in timed:
        by.setdefault(t["config"], []).append(t)
    for name, rows in by.items():
        target = rows[0]["target"]
        meds = {(t["momentum"], r): statistics.median(v["ratios"]) for t in rows for r, v in t["reducers"].items()}
        mine = [v for (m, r), v in meds.items() if r == default]
        others = sorted({r for _, r in meds if r != default})
        text = (f"**{name}.** The {default} reducer costs "
                + ", ".join(f"{_pct(v)} (momentum {m:g})" for (m, r), v in meds.items() if r == default))
        if target is not None:
            text += (f": the {_pct(target)} target is " + ("met." if all(v <= target for v in mine) else "missed."))
        else:
            text += "."
        if others:
            text += (" For information, " + "; ".join(
                f"the {r} reducer ({DESCRIBE.get(r, r)}): "
                + ", ".join(f"{_pct(v)}" for (m, rr), v in meds.items() if rr == r) for r in others) + ".")
        out.append(text)
    big = [t for t in timed if t["batch"] == max(x["batch"] for x in timed) and default in t["reducers"]]
    if default in ("sites", "compiled") and big:
        mem = big[-1]["reducers"][default]["memory"]
        out.append(f"**Memory.** The {default} reducer keeps the per-group state ({_mb(mem['state'])}), the law "
                   f"matrices and per-column constants, and with a continuous theory that reads the displacement "
                   f"(momentum) a copy of θ in the weights' dtype ({_mb(mem['theta_copy'])}) for Δθ = θ_n − θ_(n−1); "
                   f"the flat reducer adds its float64 copies, index maps and scratch (next tables).")
    return "".join(x + "\n\n" for x in out)


def section(counts, timed, verdict, args, info, load_end, device, wall) -> str:
    from symtools.numeric import flat
    from symtools.numeric.groupops import CPU_BLOCK

    desc = ", ".join(f"{k} {v}" for k, v in info.items())
    default = _default(device)
    params = timed[0]["params"] if timed else 0
    cmd = "python checks/bench_monitor.py" + (f" --device {args.device}" if args.device != "cpu" else "") \
        + (f" --steps {args.steps}" if args.steps != 4 else "") \
        + (f" --small-steps {args.small_steps}" if args.small_steps != 16 else "") \
        + (f" --threads {args.threads}" if args.threads else "") + (f" --warmup {args.warmup}" if args.warmup != 2 else "")
    met = [v for v in verdict if v[2] is not None]
    summary = f"{sum(1 for v in met if v[2])} of {len(met)} measured targets met"
    vt = "\n".join(["| target (issue 15) | measured | met |", "|---|---|:---:|"]
                   + [f"| {a} | {b} | {_yes(c)} |" for a, b, c in verdict])
    check = [t for t in timed if t.get("check") is not None]
    checks = ""
    if check:
        checks = ("Reducers agree: in one extra step, every law term and charge of every group by the flat reducer "
                  "(float64 products) and by each other reducer, largest |flat − other| / Σ|density|: "
                  + "; ".join(f"{t['config']}, momentum {t['momentum']:g}: " + ", ".join(
                      f"{r} {v:.1e}" for r, v in t["check"].items()) for t in check)
                  + " (compiled: float64 products too, so only the order of the float64 additions differs: ≈ 1e-14 "
                  "for sums of thousands of terms; sites: float32 products, float64 sums, ≈ 2⁻²⁴ = 6e-8 "
                  "expected).\n\n")
    worst = "; ".join(f"{t['config']}, momentum {t['momentum']:g}: " + ", ".join(
        f"{r} {v['worst']:.1e}" for r, v in t["reducers"].items()) for t in timed)
    floor = floor_table(timed, device)
    floor_text = ""
    if floor:
        floor_text = ("\n\n**The floor on this machine.** Whatever the implementation, the monitor reads θ and g "
                      "(and b) before the step and θ after it, and with momentum the displacement needs one more "
                      f"pass (θ_(n−1) kept, or b' re-read): at least 2 + 1 (SGD) and 3 + 2 (momentum) streaming "
                      f"passes over the {params:,} monitored parameters — the *read floor*, timed as float32 Σ per "
                      "tensor (each element read once). The monitor also sums every density in float64 "
                      "(docs/monitor.md, \"Precision\"). In eager PyTorch (the sites and flat reducers) that costs "
                      "far more than a read: the *float64 floor* is one torch float32 → float64 Σ over θ per distinct "
                      "monomial the flat plan evaluates in a step (each element of each monomial accumulated once in "
                      "float64; the membership layers' extra passes not counted). The compiled reducer widens and "
                      "sums inside its own loop, in the same pass as the read, so only the read floor binds it. Best of 7, right after the timed steps of the same run (same load); the "
                      "float64 Σ is compute-bound, and compute-bound timings on a shared virtual machine vary "
                      "several-fold from run to run, so the float64 floor is the least certain number here:"
                      "\n\n" + floor)
        small = [t for t in timed if t.get("floor") and t["target"] is not None and t["target"] >= 0.1]
        if small:
            tgt = small[0]["target"]
            fl = ", ".join(f"momentum {t['momentum']:g}: read {_pct(_floor(t) / t['floor']['train'])}"
                           + (f", float64 {_pct(t['floor']['monomials'] * t['floor']['sum64'] / t['floor']['train'])}"
                              if t["floor"].get("monomials") else "") for t in small)
            read_ok = all(_floor(t) / t["floor"]["train"] <= tgt for t in small)
            f64_ok = all(t["floor"].get("monomials") and
                         t["floor"]["monomials"] * t["floor"]["sum64"] / t["floor"]["train"] <= tgt for t in small)
            floor_text += (f"\n\nAt {small[0]['config']} the floors are ({fl}) of the training step, against the "
                           f"target {_pct(tgt)}: the read floor is {'below' if read_ok else 'above'} the target, the float64 "
                           f"floor {'below' if f64_ok else 'above'} it. "
                           + ("So on this machine the target is out of reach for eager PyTorch summing every monomial "
                              "in float64 (the sites and flat reducers), but not for one fused loop per tensor (the "
                              "compiled reducer). " if read_ok and not f64_ok else "")
                           + "The training step's work grows with the batch, the monitor's with the parameters only: "
                           "at small batches the ratio tends to (the monitor's passes) / (the training step's), and "
                           "`optimizer.step()` itself makes about as many passes as the read floor (it reads θ, g (b) "
                           "and writes θ (b) once). The last column is the default reducer's hooks in reads of θ.")
    stale = ("\n\nThe section \"Monitor, GPU\" below (if present) was measured before the fused core (issue 15) and "
             "has not been re-run since; its counts and times are those of the old per-site monitor."
             if device.type == "cpu" else "")
    return (f"## {benchdoc.section_title(SECTION, args.device)}\n\n"
            f"`{cmd}` ({wall / 60:.0f} min) — issue 15's targets. **Counts** (machine-independent, "
            f"`symtools.testing.op_count.OpCounter`): VGG-11/16/19-BN, batch {COUNT_BATCH}, {COUNT_INPUT}×{COUNT_INPUT}, "
            f"{CLASSES} classes, SGD lr 0.1 wd 5e-4 with momentum 0 and 0.9; the monitor with the flat reducer in one "
            f"piece (`symtools.numeric.flat.CPU_CHUNK = 1 << 40`, the device path); ATen calls and host syncs of the "
            f"training step (zero_grad + forward + loss + backward + `optimizer.step()`) and of the hooks "
            f"(`before_step` + `after_step`) at step {COUNT_STEP} (steps 1 and 2 change the optimizer's state: the "
            f"law matrices are rebuilt on the host, shown apart; step {COUNT_STEP + 1} was checked to count the same), "
            f"and at a record-stride step (stride {COUNT_STRIDE}): device→host copies are the `Tensor.cpu()` calls of "
            f"the flush, which on the CPU dispatch no ATen call. **Time**: `{args.model}` ({params:,} parameters at "
            f"{timed[0]['input']}×{timed[0]['input']}), float32, {CLASSES} classes, {args.data} data, device {args.device}, the same SGD; every reducer "
            f"(the default on this device, `{default}`, and for information the others) watches the same training run "
            f"with its own monitor (stride {STRIDE}, no identity checks; the monitors' order alternates per step); "
            f"{args.warmup} warm-up steps, then {args.steps} timed steps at batch ≥ 64 and {max(args.steps, args.small_steps)} "
            f"below (the small steps are cheap, and more of them keep the median robust); the overhead is the ratio monitor / training "
            f"step within each step (median over the steps; the ratio of totals beside it). The sites reducer works "
            f"in blocks of {CPU_BLOCK:,} elements (`groupops.CPU_BLOCK`), the flat reducer in chunks of "
            f"{flat.CPU_CHUNK:,} (`flat.CPU_CHUNK`) on the CPU.{stale}\n\n"
            f"Machine: {desc}; load at the end {load_end}.\n\n"
            f"{summary}:\n\n{vt}\n\n{reading(counts, timed, device)}{counts_table(counts)}\n\n"
            f"{time_table(timed, device)}\n\n"
            + "\n\n".join(memory_table(t) for t in timed if t["batch"] == max(x["batch"] for x in timed))
            + f"\n\n{checks}Worst per-step law residual (float32 model, all steps of each run): {worst}."
            f"{floor_text}\n")


def update_doc(path: Path, text: str, device: str = "cpu") -> None:
    benchdoc.update_doc(path, benchdoc.section_title(SECTION, device), text, HEADER)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration (default 4)")
    p.add_argument("--small-steps", type=int, default=16,
                   help="timed steps of the small configurations (batch < 64; default 16: they are cheap, and more "
                        "steps make the median robust to a step slowed by other work on the machine)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--data", choices=("random", "digits"), default="random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--momentum", type=float, nargs="+", default=[0.0, 0.9])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--strict", action="store_true", help="exit 1 when a measured target is missed")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: counts on VGG-11/13-BN, one tiny timed step of VGG-11-BN (momentum 0.9 unless "
                        "--momentum is given); never writes the doc")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.model = "vgg16_bn"
    start = time.perf_counter()
    info = benchdoc.machine(all_loads=True, device=str(device))
    from symtools.numeric import native

    info["C kernels"] = native.describe()
    default = _default(device)
    reducers = [default] + [r for r in ("sites", "flat") if r != default and (r == "flat" or device.type == "cpu")]
    models = ["vgg11_bn", "vgg16_bn", "vgg19_bn"]
    configs = TIME_CONFIGS.get(device.type, TIME_CONFIGS["cuda"])
    if args.quick:
        models, configs = ["vgg11_bn", "vgg13_bn"], QUICK_CONFIG
        if args.momentum == [0.0, 0.9]:
            args.momentum = [0.9]
        args.model, args.steps, args.warmup, args.no_doc = "vgg11_bn", 1, 1, True
    counts = []
    for name in models:
        for mom in args.momentum:
            c = count_config(name, mom, args, device)
            counts.append(c)
            print(f"{name} momentum {mom:g}: training {c['train']} calls ({c['train_syncs']} syncs), monitor "
                  f"{c['monitor']} ({c['monitor_syncs']} syncs), steps 1-2 {c['first']}, stride step "
                  f"{c['stride']}", flush=True)
    timed = []
    for cfg in configs:
        for mom in args.momentum:
            t = time_config(cfg, mom, reducers, args, device)
            timed.append(t)
            print(f"{cfg[0]} momentum {mom:g}: train {[round(x, 3) for x in t['train']]} s, " + "; ".join(
                f"{r} {[round(x, 4) for x in v['monitor']]} s (worst residual {v['worst']})"
                for r, v in t["reducers"].items()) + f"; reducers differ by {t['check']}; floor {t['floor']}",
                flush=True)
    try:
        load_end = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        load_end = "n/a"
    verdict = verdicts(counts, timed, args, device)
    text = section(counts, timed, verdict, args, info, load_end, device, time.perf_counter() - start)
    print(text)
    if not args.no_doc:
        update_doc(args.doc, text, args.device)
        print(f"updated section '{benchdoc.section_title(SECTION, args.device)}' of {args.doc}")
    missed = [v[0] for v in verdict if v[2] is False]
    for m in missed:
        print(f"target missed: {m}", file=sys.stderr)
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
