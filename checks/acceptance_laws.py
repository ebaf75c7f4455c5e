"""Acceptance runs of the conservation-law monitor on real data (issue: broken conservation laws).

1. VGG-16-BN on the bundled digits, SGD η = 0.1, λ = 5e-4, ≥ 200 steps, float32 weights: the exact per-step
   law residual of every group (float64 bookkeeping) and the continuous theory's error beside it.
2. Momentum β ∈ {0.9, 0.99} with λ = 5e-3: the translation sums against the discrete recurrence
   (plots: runs/.../plots/momentum.png).
Writes docs/acceptance.md with the figures measured. Usage: python checks/acceptance_laws.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from symtools.cli.main import main as cli

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, out: Path, args: list[str]) -> dict:
    run_dir = out / name
    t0 = time.perf_counter()
    code = cli(["train", "--data", "digits", "--input", "32", "--out", str(run_dir), "--quiet", *args])
    assert code == 0, f"train {name} failed"
    cli(["plot", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--momentum-steps", type=int, default=300)
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--momentum-model", default="vgg11")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="runs/acceptance")
    a = p.parse_args()
    out = Path(a.out)
    results = {"sgd": run("sgd", out, ["--model", a.model, "--steps", str(a.steps), "--batch", str(a.batch),
                                       "--lr", "0.1", "--wd", "5e-4", "--checkpoint-every", str(a.steps)])}
    for beta in ("0.9", "0.99"):
        results[f"momentum_{beta}"] = run(f"momentum_{beta}", out, [
            "--model", a.momentum_model, "--steps", str(a.momentum_steps), "--batch", str(a.batch), "--lr", "0.1",
            "--wd", "5e-3", "--momentum", beta, "--checkpoint-every", str(a.momentum_steps)])
    lines = ["# Acceptance runs of the conservation-law monitor", "",
             f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f} at the end; command: `python checks/acceptance_laws.py "
             f"--steps {a.steps} --momentum-steps {a.momentum_steps}`. Data: the bundled digits at 32×32. "
             "Weights float32, bookkeeping float64.", "",
             "| run | model | steps | max per-step law residual | accumulated | continuous theory | wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in results.items():
        fmt = lambda v: "—" if v is None else f"{v:.2e}"  # noqa: E731
        lines.append(f"| {name} | {s['config']['model']} | {s['steps']} | {fmt(s['max_rel_residual_discrete'])} | "
                     f"{fmt(s['max_rel_residual_accumulated'])} | {fmt(s['max_rel_residual_continuous'])} | "
                     f"{s['wall_s']:.0f} |")
    lines += ["", "Per family (run `sgd`):", "", "| family | groups | per-step | accumulated | continuous |",
              "|---|---:|---:|---:|---:|"]
    for fam, f in results["sgd"]["families"].items():
        fmt = lambda v: "—" if v is None else f"{v:.2e}"  # noqa: E731
        lines.append(f"| {fam} | {f['groups']} | {fmt(f['max_rel_residual_discrete'])} | "
                     f"{fmt(f['max_rel_residual_accumulated'])} | {fmt(f['max_rel_residual_continuous'])} |")
    lines += ["", f"Figures: `{out}/*/plots/` (momentum oscillation: `{out}/momentum_0.99/plots/momentum.png`).", ""]
    (ROOT / "docs" / "acceptance.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
