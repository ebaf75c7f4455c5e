"""Read what a training run recorded, tolerantly: the lr of every update and per-group charges/drives.

A run directory (``symtools.training.train``) holds ``records/`` (streams of float64 rows, ``docs/records.md``),
``checkpoints/step_NNNNNN.pt`` and ``summary.json``. The audit reads:

* the ``train`` stream: ``lr`` of param group 0 for every update (so a schedule is followed exactly);
* per-group quantities of a symmetry family — the charge ``Q`` (alias ``charge``) and the drives of its laws
  (``M1``, ``G``, ``C`` …, named as in ``symtools.codegen.generated.law_*``) — from any stream that declares
  them. A stream belongs to family F when its ``meta["family"]`` is F, or its name is F or starts with
  ``F.``/``F_``/``charges.F``/``groups_F``. Three layouts are understood:

  - **monitor** (:class:`symtools.numeric.monitor.Monitor`, streams ``groups_<family>``): columns
    ``QUANTITY|SITE|k`` with ``meta["sites"] = [[SITE, layer, count], …]``, read by
    :func:`symtools.numeric.record_schema.read_groups` (the grammar's one reader); ``measured`` is the charge Q
    after the step, ``step``/``accumulated``/``continuous`` the monitor's predictions (read as ``Q_step`` …);

  - **long**: columns ``step``, ``group`` and quantity columns, plus either a ``layer`` (or ``set``) column
    indexing ``meta["layers"]`` (labels, or dicts with a ``layer`` key) or a single ``meta["layer"]`` label;
  - **wide**: ``meta["layer"]`` (one group set) or ``meta["layers"]`` (dicts with ``layer`` and ``count``, group
    columns concatenated in that order), and columns ``NAME[k]`` (also ``NAME.k``, ``NAME_k``) per group k.

  Layer labels are the ``GroupSet.layer`` strings of :func:`symtools.nn.graph.find_symmetries`
  (e.g. ``"features.0 → features.3"``); group sets sharing a label (a Linear's columns and its bias) are told
  apart by their order. Streams that fit no layout are listed with the reason.

Anything missing gives "no prediction available" with the reason, never an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from symtools.numeric.record_schema import read_groups
from symtools.numeric.records import list_streams, read_meta, read_stream

__all__ = ["RecordedRun"]

ALIASES = {"charge": "Q", "q": "Q", "measured": "Q", "accumulated": "Q_accumulated", "step": "Q_step",
           "continuous": "Q_continuous"}
_WIDE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9]*)(?:\[(?P<a>\d+)\]|[._](?P<b>\d+))$")
_NON_QUANTITY = {"step", "group", "layer", "set", "layer_index", "set_index", "time_s", "index"}


class RecordedRun:
    """The records of one run directory (or of a ``records`` directory itself), as the audit reads them."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        self.dir = run_dir / "records" if (run_dir / "records").is_dir() else run_dir
        self.streams = list_streams(self.dir)
        self.notes: list[str] = []
        self.summary: dict = {}
        summary = run_dir / "summary.json"
        if summary.is_file():
            try:
                self.summary = json.loads(summary.read_text(encoding="utf-8"))
            except ValueError as exc:
                self.notes.append(f"summary.json is not valid JSON ({exc}); ignored")
        # (family, layer, occurrence) → quantity → step → values (1-D array); occurrence counts the earlier group
        # sets of the stream with the same family and layer label (a Linear's columns and its bias share one)
        self._table: dict[tuple[str, str, int], dict[str, dict[int, np.ndarray]]] = {}
        self._skipped: dict[str, str] = {}
        for name in self.streams:
            if name == "train":
                continue
            try:
                self._ingest(name)
            except Exception as exc:  # a stream we do not understand is reported, never fatal
                self._skipped[name] = f"unreadable ({type(exc).__name__}: {exc})"

    # -- the lr of every update
    def lr_schedule(self, start: int, stop: int) -> list[float] | None:
        """lr of updates ``start+1 … stop`` from the ``train`` stream, or None when any is missing."""
        if "train" not in self.streams:
            return None
        cols, arr = read_stream(self.dir, "train")
        if "lr" not in cols:
            return None
        by_step = {int(r[0]): float(r[cols.index("lr")]) for r in arr}
        lrs = [by_step.get(t) for t in range(start + 1, stop + 1)]
        if any(v is None or not np.isfinite(v) for v in lrs):
            return None
        return lrs  # type: ignore[return-value]

    # -- per-group quantities
    def quantities(self, family: str, layer: str, count: int, occurrence: int = 0) -> dict[str, dict[int, np.ndarray]]:
        """``{quantity: {step: values of the count groups}}`` recorded for one group set (empty if none).

        ``occurrence``: how many earlier group sets (in graph order) have the same family and layer label.
        """
        found = self._table.get((family, layer, occurrence), {})
        return {q: {s: v for s, v in steps.items() if v.shape == (count,)} for q, steps in found.items()}

    def why_not(self, family: str, layer: str) -> str:
        if not self.streams:
            return f"{self.dir} holds no record streams"
        fams = sorted({f for f, _, _ in self._table})
        if family not in fams:
            skipped = "; ".join(f"{k}: {v}" for k, v in list(self._skipped.items())[:3])
            return (f"no stream declares per-group {family} quantities (streams: {', '.join(self.streams)}"
                    + (f"; not understood: {skipped}" if skipped else "") + ")")
        layers = sorted({l for f, l, _ in self._table if f == family})
        return f"the {family} streams cover layers {layers[:4]}{' …' if len(layers) > 4 else ''}, not {layer!r}"

    def describe(self) -> dict:
        return {"directory": str(self.dir), "streams": list(self.streams),
                "families": sorted({f for f, _, _ in self._table}),
                "group_sets": len(self._table), "skipped": dict(self._skipped), "notes": list(self.notes),
                "summary_status": self.summary.get("status")}

    # -- parsing
    def _family_of(self, name: str, meta: dict) -> str | None:
        fam = meta.get("family")
        if isinstance(fam, str) and fam:
            return fam
        m = re.match(r"^(?:(?:charges?|groups)[._])?([A-Za-z][A-Za-z0-9]*)(?:$|[._])", name)
        return m.group(1) if m else None

    def _put(self, family: str, layer: tuple[str, int], quantity: str, step: int, values: np.ndarray) -> None:
        q = ALIASES.get(quantity, quantity)
        self._table.setdefault((family,) + tuple(layer), {}).setdefault(q, {})[int(step)] = np.asarray(values, dtype=np.float64)

    def _ingest(self, name: str) -> None:
        spec = read_meta(self.dir, name)
        meta = spec.get("meta") or {}
        family = self._family_of(name, meta)
        if family is None:
            self._skipped[name] = "no family (meta['family'] or a family-named stream)"
            return
        cols, arr = read_stream(self.dir, name)
        labels = _labels(meta)
        if isinstance(meta.get("sites"), list) and any("|" in c for c in cols):
            self._ingest_sites(name, family, cols, arr, meta)
        elif "group" in cols:
            self._ingest_long(name, family, cols, arr, meta, labels)
        else:
            self._ingest_wide(name, family, cols, arr, meta, labels)

    def _ingest_long(self, name: str, family: str, cols: list[str], arr: np.ndarray, meta: dict,
                     labels: list[tuple[str, int | None]]) -> None:
        layer_col = next((c for c in ("layer", "set", "layer_index", "set_index") if c in cols), None)
        quantities = [c for c in cols if c not in _NON_QUANTITY]
        if not quantities:
            self._skipped[name] = "no quantity columns"
            return
        gi = cols.index("group")
        if layer_col is None:
            if not isinstance(meta.get("layer"), str):
                self._skipped[name] = "long layout without a layer column or meta['layer']"
                return
            keys = np.zeros(len(arr), dtype=np.int64)
            names = _occurrences([meta["layer"]])
        else:
            keys = arr[:, cols.index(layer_col)].astype(np.int64)
            names = _occurrences([lab for lab, _ in labels])
            if not names:
                self._skipped[name] = f"column {layer_col!r} indexes meta['layers'], which is missing"
                return
        steps = arr[:, 0].astype(np.int64)
        groups = arr[:, gi].astype(np.int64)
        for li in np.unique(keys):
            if not 0 <= li < len(names):
                continue
            sel = keys == li
            ust, inv = np.unique(steps[sel], return_inverse=True)
            g = groups[sel]
            if g.size == 0 or g.min() < 0:
                continue
            n = int(g.max()) + 1
            for q in quantities:
                table = np.full((len(ust), n), np.nan)
                table[inv, g] = arr[sel, cols.index(q)]
                for k, st in enumerate(ust):
                    if not np.isnan(table[k]).any():
                        self._put(family, names[li], q, int(st), table[k])

    def _ingest_sites(self, name: str, family: str, cols: list[str], arr: np.ndarray, meta: dict) -> None:
        """The training monitor's layout: columns ``QUANTITY|SITE|k``, ``meta["sites"] = [[SITE, layer, count], …]``."""
        # a stream of unknown origin may hold other columns or entries: those are left out (strict=False)
        sites = read_groups(cols, arr, meta["sites"], family=family, strict=False)
        if not any(s.columns for s in sites):
            self._skipped[name] = "meta['sites'] but no QUANTITY|SITE|k columns"
            return
        keys = _occurrences([s.layer for s in sites])
        for site, layer in zip(sites, keys):
            for q in site.columns:
                block = site.values(q)
                for step, vals in zip(arr[:, 0], block):
                    if not np.isnan(vals).any():
                        self._put(family, layer, q, int(step), vals)

    def _ingest_wide(self, name: str, family: str, cols: list[str], arr: np.ndarray, meta: dict,
                     labels: list[tuple[str, int | None]]) -> None:
        per: dict[str, list[tuple[int, int]]] = {}
        for j, c in enumerate(cols[1:], start=1):
            m = _WIDE.match(c)
            if m:
                per.setdefault(m.group("name"), []).append((int(m.group("a") or m.group("b")), j))
        if not per:
            self._skipped[name] = "no per-group columns (long layout needs a 'group' column; wide: NAME[k])"
            return
        if isinstance(meta.get("layer"), str):
            spans = [((meta["layer"], 0), 0, None)]
        elif labels and all(c is not None for _, c in labels):
            spans, off = [], 0
            for key, (lab, c) in zip(_occurrences([lab for lab, _ in labels]), labels):
                spans.append((key, off, off + int(c)))
                off += int(c)
        else:
            self._skipped[name] = "wide layout needs meta['layer'] or meta['layers'] with counts"
            return
        for q, idx in per.items():
            idx.sort()
            order = [j for _, j in idx]
            for row in arr:
                vals = row[order]
                for lab, a, b in spans:
                    part = vals[a:b]
                    if part.size and not np.isnan(part).any():
                        self._put(family, lab, q, int(row[0]), part)


def _occurrences(labels: list[str]) -> list[tuple[str, int]]:
    """``[(label, how many times it appeared before), …]``: tells apart group sets sharing a layer label."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        out.append((lab, seen.get(lab, 0)))
        seen[lab] = seen.get(lab, 0) + 1
    return out


def _labels(meta: dict) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for item in meta.get("layers") or []:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict):
            lab = item.get("layer") or item.get("name") or item.get("label")
            if isinstance(lab, str):
                c: Any = item.get("count") or item.get("groups")
                out.append((lab, int(c) if isinstance(c, (int, float)) else None))
    return out
