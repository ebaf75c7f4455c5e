"""The column names of the training monitor's record streams: the one writer and the one reader.

:class:`symtools.numeric.monitor.Monitor` writes three kinds of streams (format: ``docs/records.md``); every
column name of them is made by the ``*_column``/``*_columns`` functions here and read back by the
``parse_*``/``read_*`` functions here, so the grammar lives in this module only.

Grammar (``|`` is the separator; column 0 of every stream is ``step``)::

    laws column        FAMILY "|" INDEX "|" LAYER "|" LAW_QUANTITY          e.g. scale|3|features.0 → features.1|measured
    groups column      GROUP_QUANTITY "|" INDEX "|" K                       e.g. accumulated|3|17
    identities column  FAMILY "|" WHAT                                       e.g. rescale|hessian

    FAMILY   a symmetry family: one or more characters, none of them "|"  (translation, scale, rescale2, …)
    INDEX    the site's number: decimal digits 0-9, no sign (the monitor numbers its sites 0, 1, … in graph order)
    K        a group's number within its site: decimal digits, 0 … count − 1
    LAYER    the site's layer label (``GroupSet.layer``: module names such as ``features.3`` joined by " → ",
             e.g. ``features.0 → features.1``): any characters except "|"; may be empty
    LAW_QUANTITY    one of LAW_COLUMN_QUANTITIES (the writer); a reader accepts any name without "|"
    GROUP_QUANTITY  one of GROUP_QUANTITIES (the writer); a reader accepts any non-empty name without "|"
    WHAT     one of IDENTITY_QUANTITIES

Since FAMILY, INDEX and the quantity hold no "|", a laws column is read as its first two fields, its last
field, and everything in between as LAYER. The writer refuses a "|" in a layer label (so a plain
``name.split("|")`` of today's columns gives four fields); the reader still takes one, as records written
before this module existed may hold it.

A *site* is one family at one layer (one ``GroupSet`` of the model's ``SymmetryMap``): ``(family, index,
layer, count)``, ``count`` its number of groups. Streams:

- ``laws`` (:data:`LAWS_STREAM`): one row per step; per site, in this order, the columns of
  :data:`LAW_COLUMN_QUANTITIES` — ``measured``, ``step``, ``accumulated``, ``continuous`` (sums over the
  site's groups), ``residual_step``, ``residual_accumulated``, ``residual_continuous`` (largest per-group
  relative residual), ``excluded_continuous`` (groups left out of the continuous residual). Meta:
  ``optimizer`` (the law's name: ``sgd``, ``momentum``, ``nesterov`` … or null), ``families``.
- ``groups_<family>`` (:func:`groups_stream`): every ``stride`` steps, quantity-major: for each of
  :data:`GROUP_QUANTITIES`, for each site of the family, for each group k. Meta ``sites = [[index, layer,
  count], …]`` (:func:`groups_meta`).
- ``identities`` (:data:`IDENTITIES_STREAM`): per family, ``family|gradient``, ``family|hessian``,
  ``family|pass``.

The format on disk is exactly the one the monitor wrote before this module existed (``tests/
test_record_schema.py`` reads records written with the old literal strings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from symtools.errors import SymtoolsError

__all__ = [
    "LAWS_STREAM", "MATRIX_LAWS_STREAM", "IDENTITIES_STREAM", "GROUPS_PREFIX", "STEP", "MATRIX_LAW_QUANTITIES",
    "LAW_QUANTITIES", "RESIDUALS", "EXCLUDED", "LAW_COLUMN_QUANTITIES", "GROUP_QUANTITIES", "IDENTITY_QUANTITIES",
    "Site", "LawColumn", "GroupColumn", "IdentityColumn", "LawSeries", "GroupSeries",
    "residual", "groups_stream", "groups_family",
    "law_column", "law_columns", "group_column", "group_columns", "groups_meta", "identity_column",
    "identity_columns", "matrix_law_columns",
    "parse_law_column", "parse_group_column", "parse_identity_column", "parse_sites",
    "read_laws", "read_groups", "worst_residuals",
]

LAWS_STREAM = "laws"
MATRIX_LAWS_STREAM = "matrix_laws"
IDENTITIES_STREAM = "identities"
GROUPS_PREFIX = "groups_"
STEP = "step"  # column 0 of every stream

#: what the monitor records per site and step: the measured charge and the three predictions of it
LAW_QUANTITIES = ("measured", "step", "accumulated", "continuous")
#: the predictions that have a residual (column ``residual_<q>``)
RESIDUALS = ("step", "accumulated", "continuous")
#: groups left out of the continuous residual (per site and step)
EXCLUDED = "excluded_continuous"
#: the columns of one site in the ``laws`` stream, in the order written
LAW_COLUMN_QUANTITIES = LAW_QUANTITIES + tuple(f"residual_{q}" for q in RESIDUALS) + (EXCLUDED,)
#: the per-group quantities of a ``groups_<family>`` stream, in the order written (quantity-major)
GROUP_QUANTITIES = LAW_QUANTITIES
#: the per-family columns of the ``identities`` stream
IDENTITY_QUANTITIES = ("gradient", "hessian", "pass")
#: per matrix set (attention heads) and step: the largest residual of the per-step law with every term measured,
#: and with the gradient identity's terms set to 0 (symtools.numeric.monitor_matrix)
MATRIX_LAW_QUANTITIES = ("max_rel_residual", "max_rel_residual_symmetry")

_DIGITS = re.compile(r"[0-9]+")


def residual(quantity: str) -> str:
    """The laws quantity holding the residual of prediction ``quantity`` (``step`` → ``residual_step``)."""
    if quantity not in RESIDUALS:
        raise SymtoolsError(f"no residual is recorded for {quantity!r}; predictions with one: {', '.join(RESIDUALS)}")
    return f"residual_{quantity}"


def groups_stream(family: str) -> str:
    """Name of the per-group stream of ``family``: ``groups_<family>``."""
    return GROUPS_PREFIX + _field("family", family)


def groups_family(stream: str) -> str | None:
    """The family of a ``groups_<family>`` stream name; None for any other stream."""
    if stream.startswith(GROUPS_PREFIX) and len(stream) > len(GROUPS_PREFIX):
        return stream[len(GROUPS_PREFIX):]
    return None


# ----------------------------------------------------------------------------------------- names
class Site(NamedTuple):
    """One monitored group set: a family at one layer; ``index`` the monitor's site number."""

    family: str
    index: int
    layer: str
    count: int


class LawColumn(NamedTuple):
    family: str
    index: int
    layer: str
    quantity: str


class GroupColumn(NamedTuple):
    quantity: str
    index: int
    k: int


class IdentityColumn(NamedTuple):
    family: str
    what: str


def _field(what: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SymtoolsError(f"record column: {what} must be a string, got {value!r}")
    if "|" in value:
        raise SymtoolsError(f"record column: {what} {value!r} contains '|', the column separator")
    if not value and not empty:
        raise SymtoolsError(f"record column: empty {what}")
    return value


def _number(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SymtoolsError(f"record column: {what} must be a non-negative integer, got {value!r}")
    return int(value)


def _one_of(what: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise SymtoolsError(f"record column: unknown {what} {value!r}; one of {', '.join(allowed)}")
    return value


def law_column(family: str, index: int, layer: str, quantity: str) -> str:
    """``family|index|layer|quantity``: one column of the ``laws`` stream (quantity of LAW_COLUMN_QUANTITIES)."""
    return (f"{_field('family', family)}|{_number('site index', index)}|{_field('layer', layer, empty=True)}|"
            f"{_one_of('laws quantity', quantity, LAW_COLUMN_QUANTITIES)}")


def _sites(sites: Iterable[Sequence]) -> list[Site]:
    out = []
    for s in sites:
        try:
            family, index, layer, count = s
        except (TypeError, ValueError):
            raise SymtoolsError(f"record columns: a site is (family, index, layer, count), got {s!r}") from None
        out.append(Site(family, _number("site index", index), layer, _number("group count", count)))
    indices = [s.index for s in out]
    if len(set(indices)) != len(indices):
        raise SymtoolsError(f"record columns: site indices repeat: {indices}")
    return out


def law_columns(sites: Iterable[Sequence]) -> list[str]:
    """Every column of the ``laws`` stream, ``step`` first, then per site (in the order given) its
    LAW_COLUMN_QUANTITIES. A site is ``(family, index, layer, count)`` (count unused here)."""
    return [STEP] + [law_column(s.family, s.index, s.layer, q) for s in _sites(sites) for q in LAW_COLUMN_QUANTITIES]


def matrix_law_columns(sets: Iterable[tuple[str, int, str]]) -> list[str]:
    """Every column of the ``matrix_laws`` stream: ``step``, then per set ``(family, index, layer)`` its
    MATRIX_LAW_QUANTITIES, named like the ``laws`` stream's columns (``family|index|layer|quantity``)."""
    return [STEP] + [f"{_field('family', f)}|{_number('set index', i)}|{_field('layer', layer, empty=True)}|{q}"
                     for f, i, layer in sets for q in MATRIX_LAW_QUANTITIES]


def group_column(quantity: str, index: int, k: int) -> str:
    """``quantity|index|k``: group k of site ``index`` in a ``groups_<family>`` stream."""
    return f"{_one_of('groups quantity', quantity, GROUP_QUANTITIES)}|{_number('site index', index)}|{_number('group', k)}"


def group_columns(sites: Iterable[Sequence]) -> list[str]:
    """Every column of one family's ``groups_<family>`` stream, ``step`` first, then quantity-major: for each
    of GROUP_QUANTITIES, each site (in the order given), each group 0 … count − 1. All sites of one family."""
    sites = _sites(sites)
    families = sorted({s.family for s in sites})
    if len(families) > 1:
        raise SymtoolsError(f"record columns: a groups stream holds one family, got {', '.join(families)}")
    return [STEP] + [group_column(q, s.index, k) for q in GROUP_QUANTITIES for s in sites for k in range(s.count)]


def groups_meta(sites: Iterable[Sequence]) -> dict:
    """The meta of a ``groups_<family>`` stream: ``{"sites": [[index, layer, count], …]}`` (the sites in order)."""
    return {"sites": [[s.index, _field("layer", s.layer, empty=True), s.count] for s in _sites(sites)]}


def identity_column(family: str, what: str) -> str:
    """``family|what``: one column of the ``identities`` stream (what: gradient, hessian or pass)."""
    return f"{_field('family', family)}|{_one_of('identity quantity', what, IDENTITY_QUANTITIES)}"


def identity_columns(families: Iterable[str]) -> list[str]:
    """Every column of the ``identities`` stream, ``step`` first, then per family (in the order given — the
    monitor gives them sorted) its IDENTITY_QUANTITIES."""
    return [STEP] + [identity_column(f, w) for f in families for w in IDENTITY_QUANTITIES]


# ----------------------------------------------------------------------------------------- parsing
def parse_law_column(name: str) -> LawColumn:
    """The parts of a ``laws`` column ``family|index|layer|quantity``; SymtoolsError if it is not one.

    The quantity is not checked against LAW_COLUMN_QUANTITIES (a reader skips quantities it does not know);
    a "|" inside the layer is taken (first two fields, last field, the rest is the layer)."""
    parts = name.split("|") if isinstance(name, str) else []
    if len(parts) < 4 or not parts[0] or not _DIGITS.fullmatch(parts[1]) or not parts[-1]:
        raise SymtoolsError(f"malformed laws column {name!r}: want family|index|layer|quantity (index a "
                            f"non-negative integer, e.g. 'scale|0|features.0 → features.1|measured')")
    return LawColumn(parts[0], int(parts[1]), "|".join(parts[2:-1]), parts[-1])


def parse_group_column(name: str) -> GroupColumn:
    """The parts of a ``groups_<family>`` column ``quantity|index|k``; SymtoolsError if it is not one."""
    parts = name.split("|") if isinstance(name, str) else []
    if len(parts) != 3 or not parts[0] or not _DIGITS.fullmatch(parts[1]) or not _DIGITS.fullmatch(parts[2]):
        raise SymtoolsError(f"malformed groups column {name!r}: want quantity|index|k (index and k non-negative "
                            f"integers, e.g. 'measured|3|17')")
    return GroupColumn(parts[0], int(parts[1]), int(parts[2]))


def parse_identity_column(name: str) -> IdentityColumn:
    """The parts of an ``identities`` column ``family|what``; SymtoolsError if it is not one."""
    parts = name.split("|") if isinstance(name, str) else []
    if len(parts) != 2 or not parts[0] or parts[1] not in IDENTITY_QUANTITIES:
        raise SymtoolsError(f"malformed identities column {name!r}: want family|what with what one of "
                            f"{', '.join(IDENTITY_QUANTITIES)}")
    return IdentityColumn(parts[0], parts[1])


def parse_sites(sites: Any, *, strict: bool = True) -> list[tuple[int, str, int | None]]:
    """``[(index, layer, count), …]`` from a groups stream's ``meta["sites"]`` (entries ``[index, layer,
    count]``, also ``{"index", "layer", "count"}``; a missing count is None). ``strict=False`` skips malformed
    entries instead of raising."""
    if not isinstance(sites, (list, tuple)):
        if strict:
            raise SymtoolsError(f"groups stream: meta['sites'] must be a list of [index, layer, count], got {sites!r}")
        return []
    out: list[tuple[int, str, int | None]] = []
    for item in sites:
        try:
            if isinstance(item, dict):
                index, layer, count = item.get("index", len(out)), item["layer"], item.get("count")
            else:
                index, layer, count = item[0], item[1], item[2]
            count = int(count) if count not in (None, 0) else None
            out.append((int(index), str(layer), count))
        except (KeyError, IndexError, TypeError, ValueError):
            if strict:
                raise SymtoolsError(f"groups stream: malformed meta['sites'] entry {item!r} "
                                    f"(want [index, layer, count])") from None
    return out


def _check_step_column(columns: Sequence[str], what: str) -> None:
    if not columns or columns[0] != STEP:
        raise SymtoolsError(f"{what} stream: column 0 must be {STEP!r}, got {columns[0] if columns else None!r}")


@dataclass
class LawSeries:
    """One site of a ``laws`` stream: ``values[quantity]`` is that column, one value per row (NaN: none)."""

    family: str
    index: int
    layer: str
    values: dict[str, np.ndarray] = field(default_factory=dict)
    count: int | None = None  # groups in the site, when the reader was told (from a groups stream's meta)

    def has(self, quantity: str) -> bool:
        """Whether the column exists and holds at least one finite value."""
        v = self.values.get(quantity)
        return v is not None and bool(np.isfinite(v).any())


def read_laws(columns: Sequence[str], data: np.ndarray) -> list[LawSeries]:
    """The sites of a ``laws`` stream (``read_stream`` output), ordered by index, each with its columns as
    1-D float64 arrays (views of ``data``). SymtoolsError on a malformed column, or on one site index named
    with two families or layers, or a quantity given twice."""
    _check_step_column(columns, LAWS_STREAM)
    sites: dict[int, LawSeries] = {}
    for j, name in enumerate(columns[1:], start=1):
        col = parse_law_column(name)
        site = sites.setdefault(col.index, LawSeries(col.family, col.index, col.layer))
        if (site.family, site.layer) != (col.family, col.layer):
            raise SymtoolsError(f"laws stream: site {col.index} is named both {site.family}|{site.layer} and "
                                f"{col.family}|{col.layer}")
        if col.quantity in site.values:
            raise SymtoolsError(f"laws stream: column {name!r} appears twice")
        site.values[col.quantity] = np.asarray(data[:, j], dtype=np.float64)
    return sorted(sites.values(), key=lambda s: s.index)


@dataclass
class GroupSeries:
    """One site of a ``groups_<family>`` stream: ``columns[quantity]`` = the column positions of its groups
    0 … count − 1 in ``data`` (a quantity is listed only when every group has its column)."""

    family: str | None
    index: int
    layer: str
    count: int
    columns: dict[str, np.ndarray]
    data: np.ndarray = field(repr=False)

    def has(self, quantity: str) -> bool:
        return quantity in self.columns

    def values(self, quantity: str, groups: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``(rows, groups)`` float64 array of ``quantity`` for the chosen group numbers (default: all)."""
        cols = self.columns[quantity]
        if groups is not None:
            cols = cols[np.asarray(groups, dtype=np.int64)]
        return np.asarray(self.data[:, cols], dtype=np.float64)


def read_groups(columns: Sequence[str], data: np.ndarray, sites: Any, *, family: str | None = None,
                strict: bool = True) -> list[GroupSeries]:
    """The sites of a ``groups_<family>`` stream (``read_stream`` output and its ``meta["sites"]``), in the
    order the meta lists them.

    ``strict`` (the monitor's own streams): SymtoolsError on a malformed column or sites entry, on a column
    of a site the meta does not list, and on a quantity whose columns do not cover groups 0 … count − 1.
    ``strict=False`` (a stream of unknown origin): those columns, entries and quantities are left out.
    A site whose meta gives no count takes the number of its columns (when they are 0 … n − 1)."""
    _check_step_column(columns, "groups")
    listed = parse_sites(sites, strict=strict)
    known = {index for index, _, _ in listed}
    found: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for j, name in enumerate(columns[1:], start=1):
        try:
            col = parse_group_column(name)
        except SymtoolsError:
            if strict:
                raise
            continue
        if col.index not in known:
            if strict:
                raise SymtoolsError(f"groups stream: column {name!r} names site {col.index}, which meta['sites'] "
                                    f"does not list")
            continue
        found.setdefault((col.index, col.quantity), []).append((col.k, j))
    out = []
    for index, layer, count in listed:
        cols: dict[str, np.ndarray] = {}
        n = count
        for (i, quantity), entries in found.items():
            if i != index:
                continue
            entries.sort()
            ks = [k for k, _ in entries]
            want = n if n is not None else len(ks)
            if ks != list(range(want)):
                if strict:
                    raise SymtoolsError(f"groups stream: site {index} ({layer}) has {quantity} columns for groups "
                                        f"{_span(ks)}, want 0 … {want - 1}")
                continue
            n = want
            cols[quantity] = np.array([j for _, j in entries], dtype=np.int64)
        out.append(GroupSeries(family, index, layer, n or 0, cols, data))
    return out


def _span(ks: list[int]) -> str:
    return f"{ks[0]} … {ks[-1]} ({len(ks)} columns)" if ks else "none"


# ----------------------------------------------------------------------------------------- summaries
def worst_residuals(columns: Sequence[str], rows: np.ndarray, step: int, *,
                    families: Iterable[str] | None = None) -> tuple[dict, dict, dict]:
    """The worst residuals recorded in a ``laws`` stream up to ``step``, as the monitor's summary keeps them.

    ``columns, rows``: ``read_stream`` output of ``laws``; only rows with step ≤ ``step`` are read (another
    process may not have cut the stream back yet). ``families``: only these (default: every family of the
    columns). Returns ``(per_family, overall, excluded)``:

    - ``per_family[family] = {"step": r, "accumulated": r, "continuous": r}``: the largest ``residual_<q>``
      of its sites over the rows (None where every value is NaN: no law, no continuous theory);
    - ``overall``: the same keys, the largest over the families (None where no family has one);
    - ``excluded[family]``: the most groups left out of the continuous residual at one step (the sum over the
      family's sites of ``excluded_continuous``, largest over the rows that have a value: step 0 has none);
      a family is absent where no row has a value (no continuous theory).

    With no row at or before ``step`` all three are empty / None: nothing to restore.
    """
    overall: dict[str, float | None] = {q: None for q in RESIDUALS}
    rows = np.asarray(rows)
    if rows.ndim != 2 or not len(rows):
        return {}, overall, {}
    rows = rows[rows[:, 0] <= step]
    if not len(rows):
        return {}, overall, {}
    series = read_laws(columns, rows)
    wanted = None if families is None else set(families)
    per_family: dict[str, dict[str, float | None]] = {}
    excluded: dict[str, int] = {}
    for fam in sorted({s.family for s in series}):
        if wanted is not None and fam not in wanted:
            continue
        sites = [s for s in series if s.family == fam]
        entry: dict[str, float | None] = {}
        for q in RESIDUALS:
            parts = [s.values[residual(q)] for s in sites if residual(q) in s.values]
            vals = np.concatenate(parts) if parts else np.zeros(0)
            vals = vals[~np.isnan(vals)]
            entry[q] = float(vals.max()) if vals.size else None
            if entry[q] is not None:
                overall[q] = entry[q] if overall[q] is None else max(overall[q], entry[q])
        per_family[fam] = entry
        counts = [s.values[EXCLUDED] for s in sites if EXCLUDED in s.values]
        if counts:
            table = np.stack(counts, axis=1)
            counted = ~np.isnan(table).all(axis=1)  # rows with a continuous residual (not step 0)
            if counted.any():
                excluded[fam] = int(np.nansum(table[counted], axis=1).max())
    return per_family, overall, excluded
