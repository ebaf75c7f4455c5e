"""Shared by the benchmark scripts: the machine description, and replacing one ``## SECTION`` of
docs/benchmarks.md while leaving the others."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

HEADER = "# Benchmarks\n"


def update_doc(path: Path, section: str, text: str, header: str = HEADER) -> None:
    """Write ``text`` (which starts with ``## section``) in place of that section, or append it.

    The file is re-read right before writing, since several scripts write their own sections.
    """
    doc = path.read_text() if path.exists() else header
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text + "\n", doc, count=1)
    else:
        doc = doc.rstrip() + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc.rstrip() + "\n")


def write_section(path: Path, section: str, intro: str, info: dict[str, str], body: str) -> None:
    """``## section``, the ``intro`` paragraph, the machine ``info`` as a list, then ``body`` (tables)."""
    machine_list = "\n".join(f"- {k}: {v}" for k, v in info.items())
    update_doc(Path(path), section, f"## {section}\n\n{intro}\n\n{machine_list}\n\n{body}\n")


def sync(device) -> None:
    """Wait for queued GPU work (timings on a CUDA device are taken between synchronisations)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_title(base: str, device: str) -> str:
    """A benchmark's section: ``base`` for a CPU run, ``base + ", GPU"`` for a CUDA one (both kept)."""
    return base if str(device).startswith("cpu") else f"{base}, GPU"


def machine(*, threads: bool = True, all_loads: bool = False, versions: dict[str, str] | None = None,
            device: str = "cpu") -> dict[str, str]:
    """The machine a benchmark ran on: processor, CPUs, (torch threads), Python, torch, ``versions`` (e.g.
    SymPy's), platform, and the load average (1 min, or 1, 5 and 15 min with ``all_loads``) at the start;
    for a CUDA ``device`` also the GPU, its memory, CUDA and cuDNN versions."""
    import torch

    try:
        loads = os.getloadavg()
        load = ", ".join(f"{v:.2f}" for v in loads) if all_loads else f"{loads[0]:.2f}"
    except OSError:  # pragma: no cover - not on every platform
        load = "n/a"
    info = {"processor": platform.processor() or platform.machine() or "unknown", "cpu_count": str(os.cpu_count())}
    if threads:
        info["torch threads"] = str(torch.get_num_threads())
    info.update({"python": platform.python_version(), "torch": torch.__version__, **(versions or {}),
                 "platform": platform.platform()})
    info["load (1, 5, 15 min) at start" if all_loads else "load (1 min)"] = load
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update({"gpu": f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)",
                     "CUDA": str(torch.version.cuda), "cuDNN": str(torch.backends.cudnn.version())})
    return info
