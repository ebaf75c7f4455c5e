"""Shared by the benchmark scripts: replace one ``## SECTION`` of docs/benchmarks.md, leaving the others."""

from __future__ import annotations

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
