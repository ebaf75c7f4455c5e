"""Does symmetry teleportation speed up training? The claim of Zhao et al. (NeurIPS 2022), measured here.

Two settings on the bundled digits, each with ``--seeds`` seeds, SGD and heavy-ball momentum 0.9, with and without
teleportation (same seed: same initial weights and the same batches):

* ``mlp``: a LeakyReLU MLP 64 → 64 → 64 → 10 (as in their code), batch 32, lr 0.05, 300 steps; teleports
  along the rescale groups;
* ``two_layer``: a LeakyReLU MLP 64 → 64 → 10 in float64, batch 32, lr 0.05, 300 steps; teleports with the
  data-dependent action of their ICLR 2023 Theorem 4.1 (GL_64 on the hidden layer, exact on the teleport batch
  only: :mod:`symtools.numeric.teleport_nonlinear`);
* ``vgg11_bn``: VGG-11-BN at 32×32, batch 32, lr 0.05, 80 steps; teleports along the rescale groups (BatchNorm
  γ, β against the next convolution's input channels).

Teleport: objective ‖∇L‖² on the step's batch, ``--teleport-steps`` Adam steps of lr ``--teleport-lr`` on the Lie
algebra, before the steps of ``--schedule`` (default 0, 10, 20: a few teleports early in training, like the
schedules of their Fig. 5; teleporting every 20 steps for the whole run diverged at this learning rate in our
trials, since each teleport roughly doubles ‖∇L‖ and the step size is not adapted). Every teleport checks
its guarantees (loss, function on held-out images, charges); the worst figures are reported.

Reported: training loss vs steps and vs wall time (mean over seeds; plots in docs/img/teleport_*.png), the steps
and seconds to reach a target loss (the loss the baseline reaches at 60 % of the run, smoothed over 10 steps), and
the wall time a teleport costs. Results go to docs/benchmarks.md, section "Teleportation".

    python checks/bench_teleport.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine, write_section

from symtools.data.loader import make_loader
from symtools.nn.graph import find_symmetries
from symtools.nn.models import build_model
from symtools.nn.small import mlp
from symtools.numeric.teleport import teleport
from symtools.numeric.teleport_nonlinear import teleport_two_layer

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "mlp": {"steps": 300, "batch": 32, "lr": 0.05, "size": 8, "channels": 1},
    "two_layer": {"steps": 300, "batch": 32, "lr": 0.05, "size": 8, "channels": 1},
    "vgg11_bn": {"steps": 80, "batch": 32, "lr": 0.05, "size": 32, "channels": 3},
}


def _model(setting: str, seed: int):
    torch.manual_seed(seed)
    if setting == "mlp":
        return mlp(64, [64, 64], 10, activation="leaky_relu")
    if setting == "two_layer":
        return mlp(64, [64], 10, activation="leaky_relu").double()
    return build_model("vgg11_bn", input_size=32, classes=10)


def one_run(setting: str, seed: int, momentum: float, schedule: tuple[int, ...], args) -> dict:
    cfg = SETTINGS[setting]
    data = make_loader("digits", cfg["batch"], image_size=cfg["size"], seed=seed, channels=cfg["channels"])
    model = _model(setting, seed)
    flat = setting in ("mlp", "two_layer")
    dtype = next(model.parameters()).dtype
    x0, _ = data.batch(0)
    syms = find_symmetries(model, (x0.flatten(1) if flat else x0)[:1].to(dtype))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=momentum)
    losses, clock, tele_s, worst = [], [], 0.0, {"loss": 0.0, "function": 0.0, "charge": 0.0}
    start = time.perf_counter()
    diverged = None
    for step in range(cfg["steps"]):
        x, y = data.batch(step)
        x = (x.flatten(1) if flat else x).to(dtype)
        if losses and not np.isfinite(losses[-1]):  # diverged: the rest of the run is NaN
            diverged = step
            losses += [float("nan")] * (cfg["steps"] - step)
            clock += [clock[-1]] * (cfg["steps"] - step)
            break
        if step in schedule:
            t0 = time.perf_counter()
            half = x.shape[0] // 2
            if setting == "two_layer":  # data-dependent: the loss on the batch is kept, the function is not
                r = teleport_two_layer(model, (x[:half], y[:half]), steps=args.teleport_steps, lr=args.two_layer_lr)
                opt.state.clear()  # no covariant transform for a data-dependent action: momentum restarts
            else:
                r = teleport(model, (x[:half], y[:half]), symmetries=syms, optimizer=opt, held_out=x[half:],
                             steps=args.teleport_steps, lr=args.teleport_lr, seed=seed + step)
                worst["function"] = max(worst["function"], r.function_change_rel or 0.0)
                worst["charge"] = max(worst["charge"], r.charge_residual_max)
            tele_s += time.perf_counter() - t0
            worst["loss"] = max(worst["loss"], r.loss_change_rel)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        clock.append(time.perf_counter() - start)
    return {"losses": losses, "clock": clock, "teleport_seconds": tele_s, "worst": worst, "diverged": diverged}


def _smooth(v: np.ndarray, w: int = 10) -> np.ndarray:
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i - w + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _reach(losses: np.ndarray, clock: np.ndarray, target: float) -> tuple[float, float]:
    s = _smooth(losses)
    hit = np.nonzero(s <= target)[0]
    return (float(hit[0] + 1), float(clock[hit[0]])) if len(hit) else (float("nan"), float("nan"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--settings", default="mlp,two_layer,vgg11_bn")
    p.add_argument("--schedule", default="0,10,20", help="steps before which to teleport (default 0,10,20)")
    p.add_argument("--teleport-steps", type=int, default=5)
    p.add_argument("--teleport-lr", type=float, default=0.05)
    p.add_argument("--two-layer-lr", type=float, default=0.001,
                   help="ascent step on gl_64 for the data-dependent action (each entry of M moves ≤ steps·lr)")
    p.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    args.schedule = tuple(int(s) for s in args.schedule.split(",") if s.strip())
    info = machine()
    rows, results = [], {}
    for setting in [s for s in args.settings.split(",") if s]:
        for momentum in (0.0, 0.9):
            runs = {"baseline": [], "teleport": []}
            for seed in range(args.seeds):
                for name, schedule in (("baseline", ()), ("teleport", args.schedule)):
                    r = one_run(setting, seed, momentum, schedule, args)
                    runs[name].append(r)
                    print(f"{setting} μ={momentum} seed {seed} {name}: final loss {np.mean(r['losses'][-10:]):.4f} "
                          f"({r['clock'][-1]:.1f} s, teleports {r['teleport_seconds']:.1f} s)", flush=True)
            base = np.array([r["losses"] for r in runs["baseline"]])
            target = float(np.mean([_smooth(b)[int(0.6 * base.shape[1]) - 1] for b in base]))
            key = f"{setting}, momentum {momentum:g}"
            results[key] = {"target": target, "runs": runs}
            for name in ("baseline", "teleport"):
                reach = [_reach(np.array(r["losses"]), np.array(r["clock"]), target) for r in runs[name]]
                steps_to = [a for a, _ in reach]
                secs_to = [b for _, b in reach]
                final = [np.mean(r["losses"][-10:]) for r in runs[name]]
                diverged = sum(r["diverged"] is not None for r in runs[name])
                worst = {k: max(r["worst"][k] for r in runs[name]) for k in ("loss", "function", "charge")}
                rows.append((key, name, target, np.nanmean(steps_to), sum(np.isnan(steps_to)), np.nanmean(secs_to),
                             np.mean(final), np.std(final), np.mean([r["teleport_seconds"] for r in runs[name]]),
                             np.mean([r["clock"][-1] for r in runs[name]]), worst, diverged))
            _plot(setting, momentum, runs, target)
    table = ["| setting | run | target loss | steps to target (mean) | runs that missed | seconds to target | "
             "final loss (mean ± sd) | diverged | teleport s / run | total s / run | worst teleport check (loss, function, charge units) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, name, target, st, miss, secs, fm, fs, ts, tot, w, dv in rows:
        check = ("—" if name != "teleport" else f"{w['loss']:.1e}, batch only" if key.startswith("two_layer")
                 else f"{w['loss']:.1e}, {w['function']:.1e}, {w['charge']:.1f}")
        table.append(f"| {key} | {name} | {target:.4f} | {st:.1f} | {miss}/{args.seeds} | {secs:.2f} | "
                     f"{fm:.4f} ± {fs:.4f} | {dv}/{args.seeds} | {ts:.1f} | {tot:.1f} | {check} |")
    text = "\n".join(table)
    print(text)
    (ROOT / "out").mkdir(exist_ok=True)
    with open(ROOT / "out" / "bench_teleport.json", "w") as f:  # the raw curves (out/ is not tracked)
        json.dump({k: {"target": v["target"], "runs": {n: [{"losses": r["losses"], "clock": r["clock"]} for r in rs]
                                                        for n, rs in v["runs"].items()}}
                   for k, v in results.items()}, f)
    if not args.no_doc:
        intro = (f"`python checks/bench_teleport.py` ({args.seeds} seeds; teleports before steps "
                 f"{', '.join(map(str, args.schedule))}, {args.teleport_steps} ascent steps of lr {args.teleport_lr} on ‖∇L‖², rescale groups). "
                 f"Same seed = same initial weights and batches with and without teleportation. Target: the "
                 f"baseline's mean loss at 60 % of the run (10-step moving average). two_layer: the data-dependent "
                 f"action, ascent step {args.two_layer_lr} on gl_64, momentum buffers cleared at a teleport. Seconds "
                 f"are wall clock on the cores as they were (the load is the one at the start): compare steps, "
                 f"not seconds, between rows. Plots: docs/img/teleport_*.png; findings: docs/commands/teleport.md.")
        write_section(ROOT / "docs" / "benchmarks.md", "Teleportation", intro, info, text)
    return 0


def _plot(setting: str, momentum: float, runs: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, color in (("baseline", "tab:blue"), ("teleport", "tab:red")):
        L = np.array([_smooth(np.array(r["losses"])) for r in runs[name]])
        C = np.array([r["clock"] for r in runs[name]])
        steps = np.arange(1, L.shape[1] + 1)
        axes[0].plot(steps, L.mean(0), color=color, label=name)
        axes[0].fill_between(steps, L.min(0), L.max(0), color=color, alpha=0.15)
        axes[1].plot(C.mean(0), L.mean(0), color=color, label=name)
    for ax, xl in zip(axes, ("step", "wall time (s)")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"{setting}, SGD momentum {momentum:g}: with and without teleportation (min–max over seeds)")
    fig.tight_layout()
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(ROOT / "docs" / "img" / f"teleport_{setting}_m{momentum:g}.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
