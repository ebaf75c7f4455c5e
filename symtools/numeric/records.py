"""Append-only run records: streams of fixed-width float64 rows, readable with numpy alone.

A record directory holds one pair of files per *stream*::

    NAME.f64    raw little-endian float64 values, row-major, no header; rows are appended, never rewritten
    NAME.json   {"format": "symtools-records", "version": 1, "name": NAME, "columns": [...],
                 "width": len(columns), "dtype": "<f8", "description": "...", "meta": {...}}

Column 0 of every stream is ``step``: the number of optimizer updates completed when the row's
values were taken (0 = the initial weights). A reader needs nothing but numpy::

    import json, numpy as np
    spec = json.load(open("records/train.json"))
    a = np.fromfile("records/train.f64", "<f8")
    a = a[: a.size // spec["width"] * spec["width"]].reshape(-1, spec["width"])   # drop a torn last row
    loss = a[:, spec["columns"].index("loss")]

Durability: :meth:`RecordWriter.flush` hands buffered rows to the OS and (by default) fsyncs them, so
a run killed after a flush keeps every row appended before it. A writer opened on an existing
directory first cuts each stream back to its last complete row (a row torn by a kill is dropped);
:meth:`RecordWriter.truncate_to_step` then drops the rows written after a checkpoint, so a resumed
run appends exactly where the checkpoint left off. See ``docs/records.md``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from symtools.errors import SymtoolsError

__all__ = ["RecordWriter", "RecordStream", "read_stream", "read_meta", "list_streams", "FORMAT", "VERSION"]

FORMAT = "symtools-records"
VERSION = 1
DTYPE = "<f8"
_ITEM = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".json", ".f64")):
        raise SymtoolsError(
            f"bad record stream name {name!r}: use letters, digits, '_', '-', '.' (e.g. 'train' or 'layer.features.0')"
        )
    return name


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_spec(directory: Path, name: str) -> dict:
    path = directory / f"{name}.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SymtoolsError(f"no record stream {name!r} in {directory} (missing {path.name})") from None
    except json.JSONDecodeError as exc:
        raise SymtoolsError(f"record stream description {path} is not valid JSON: {exc}") from None
    if spec.get("format") != FORMAT or int(spec.get("width", -1)) != len(spec.get("columns", ())):
        raise SymtoolsError(f"{path} is not a {FORMAT} stream description (format/columns/width mismatch)")
    return spec


def list_streams(directory: str | os.PathLike) -> list[str]:
    """Names of the streams in a record directory (those with a ``NAME.json`` description), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in directory.glob("*.json") if _is_spec(p))


def _is_spec(p: Path) -> bool:
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_meta(directory: str | os.PathLike, name: str) -> dict:
    """The JSON description of one stream (columns, width, description, meta)."""
    return _load_spec(Path(directory), _check_name(name))


def read_stream(directory: str | os.PathLike, name: str, *, mmap: bool = False) -> tuple[list[str], np.ndarray]:
    """Read one stream: ``(columns, array)`` with ``array.shape == (rows, len(columns))``, float64.

    A trailing partial row (a write torn by a kill, or one in progress in another process) is ignored.
    ``mmap=True`` maps the file read-only instead of copying it into memory.
    """
    directory = Path(directory)
    spec = _load_spec(directory, _check_name(name))
    width = int(spec["width"])
    path = directory / f"{name}.f64"
    size = path.stat().st_size if path.exists() else 0
    rows = size // (width * _ITEM)
    if rows == 0:
        return list(spec["columns"]), np.zeros((0, width), dtype=DTYPE)
    if mmap:
        return list(spec["columns"]), np.memmap(path, dtype=DTYPE, mode="r", shape=(rows, width))
    return list(spec["columns"]), np.fromfile(path, dtype=DTYPE, count=rows * width).reshape(rows, width)


class RecordStream:
    """One append-only stream of fixed-width float64 rows; made by :meth:`RecordWriter.stream`."""

    def __init__(self, writer: "RecordWriter", name: str, columns: Sequence[str]):
        self.writer = writer
        self.name = name
        self.columns = list(columns)
        self.width = len(self.columns)
        self.path = writer.directory / f"{name}.f64"
        self._fh = open(self.path, "ab")

    def append(self, row_or_rows: Any) -> int:
        """Append one row (length ``width``) or a 2-D block of rows (``n × width``); returns rows written.

        Accepts sequences of numbers, numpy arrays and torch tensors (any device, any float dtype);
        values are stored as float64.
        """
        if self._fh is None:
            raise SymtoolsError(f"record stream {self.name!r} is closed")
        data = row_or_rows
        if hasattr(data, "detach") and hasattr(data, "cpu"):  # torch tensor, without importing torch here
            data = data.detach().cpu().double().numpy()
        elif isinstance(data, (list, tuple)) and any(hasattr(v, "detach") for v in data):
            data = [float(v) for v in data]
        arr = np.asarray(data, dtype=DTYPE)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.width:
            raise SymtoolsError(
                f"record stream {self.name!r} has {self.width} columns {self.columns[:4]}{'...' if self.width > 4 else ''};"
                f" got values of shape {tuple(np.shape(row_or_rows))}"
            )
        self._fh.write(np.ascontiguousarray(arr).tobytes())
        return arr.shape[0]

    def rows(self) -> int:
        """Complete rows in the stream's file, those appended and not yet flushed included."""
        if self._fh is not None:
            self._fh.flush()
        return (self.path.stat().st_size if self.path.exists() else 0) // (self.width * _ITEM)

    def flush(self, fsync: bool = True) -> None:
        if self._fh is not None:
            self._fh.flush()
            if fsync:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.flush(fsync=True)
            self._fh.close()
            self._fh = None

    def _truncate_rows(self, rows: int) -> None:
        self._fh.flush()
        os.truncate(self.path, rows * self.width * _ITEM)

    def __repr__(self) -> str:
        return f"RecordStream({self.name!r}, columns={self.columns if self.width <= 6 else self.columns[:6] + ['...']})"


class RecordWriter:
    """Writer for a record directory (created if missing); one writer per directory at a time.

    Opening a directory that already holds streams cuts every ``NAME.f64`` back to its last complete
    row, so a stream torn by a kill is consistent again before anything is appended.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._streams: dict[str, RecordStream] = {}
        self._new_entries = True
        for name in list_streams(self.directory):
            spec = _load_spec(self.directory, name)
            path = self.directory / f"{name}.f64"
            if path.exists():
                row_bytes = int(spec["width"]) * _ITEM
                size = path.stat().st_size
                if size % row_bytes:
                    os.truncate(path, size - size % row_bytes)

    # -- streams ---------------------------------------------------------------------------------
    def stream(self, name: str, columns: Sequence[str], description: str = "", meta: dict | None = None) -> RecordStream:
        """Create (or reopen for appending) the stream ``name``; ``columns[0]`` must be ``"step"``.

        Reopening an existing stream requires the same columns; ``description``/``meta`` are updated.
        ``meta`` is any JSON-serialisable dict stored in ``NAME.json`` (e.g. group labels).
        """
        _check_name(name)
        columns = [str(c) for c in columns]
        if not columns or columns[0] != "step":
            raise SymtoolsError(f"the first column of record stream {name!r} must be 'step' (got {columns[:1]})")
        if len(set(columns)) != len(columns):
            raise SymtoolsError(f"record stream {name!r} has repeated column names")
        if name in self._streams:
            st = self._streams[name]
            if st.columns != columns:
                raise SymtoolsError(f"record stream {name!r} is already open with other columns")
            return st
        spec_path = self.directory / f"{name}.json"
        if spec_path.exists():
            old = _load_spec(self.directory, name)
            if list(old["columns"]) != columns:
                raise SymtoolsError(
                    f"record stream {name!r} in {self.directory} has columns {old['columns'][:6]}..., "
                    f"not {columns[:6]}...: use a new run directory or another stream name"
                )
        spec = {"format": FORMAT, "version": VERSION, "name": name, "columns": columns, "width": len(columns),
                "dtype": DTYPE, "description": description, "meta": dict(meta or {})}
        try:
            json.dumps(spec)
        except TypeError as exc:
            raise SymtoolsError(f"meta of record stream {name!r} is not JSON-serialisable: {exc}") from None
        _write_json_atomic(spec_path, spec)
        st = RecordStream(self, name, columns)
        self._streams[name] = st
        self._new_entries = True
        return st

    def __getitem__(self, name: str) -> RecordStream:
        return self._streams[name]

    def __contains__(self, name: str) -> bool:
        return name in self._streams

    @property
    def streams(self) -> dict[str, RecordStream]:
        return dict(self._streams)

    # -- durability and resume -------------------------------------------------------------------
    def flush(self, fsync: bool = True) -> None:
        """Hand every buffered row to the OS; with ``fsync`` (default) also force it to disk."""
        for st in self._streams.values():
            st.flush(fsync=fsync)
        if fsync and self._new_entries and hasattr(os, "O_DIRECTORY"):
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._new_entries = False

    def truncate_to_step(self, step: float) -> dict[str, int]:
        """Drop, in every stream of the directory, the first row whose step exceeds ``step`` and all rows after it.

        Rows are kept in append order, so this restores the records as they stood when the checkpoint
        of ``step`` was written. Returns ``{stream: rows kept}``.
        """
        self.flush(fsync=False)
        kept: dict[str, int] = {}
        for name in list_streams(self.directory):
            cols, arr = read_stream(self.directory, name)
            over = np.flatnonzero(~(arr[:, 0] <= step)) if len(arr) else np.zeros(0, dtype=int)
            rows = int(over[0]) if over.size else len(arr)
            if rows < len(arr):
                if name in self._streams:
                    self._streams[name]._truncate_rows(rows)
                else:
                    os.truncate(self.directory / f"{name}.f64", rows * len(cols) * _ITEM)
            kept[name] = rows
        self.flush(fsync=True)
        return kept

    def close(self) -> None:
        for st in self._streams.values():
            st.close()
        self._streams.clear()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecordWriter({str(self.directory)!r}, streams={sorted(self._streams)})"

