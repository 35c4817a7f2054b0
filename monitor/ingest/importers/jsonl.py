"""JSON Lines step tables: one JSON object per line (or one JSON array of objects).

Arbitrary keys, nested objects flattened to ``a/b``; bare ``NaN``/``Infinity`` are read as
missing. A line that is not a JSON object is reported with its number and skipped.

A clean file (one flat object of numbers per line) is turned into float64 columns at once
(:func:`read_frame`), with the same result; anything else is read line by line.
"""

from __future__ import annotations

import itertools
import operator
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import (
    FloatColumns,
    Problem,
    RawRecord,
    RawTable,
    Tick,
    TooDeep,
    flatten,
    float_column,
    is_utf8,
    json_lines,
)
from monitor.ingest.importers.trainer_state import load_json

#: A file that is one JSON array (after a byte-order mark and blanks), told from its start.
_ARRAY_START = re.compile(rb"[\xef\xbb\xbf \t\r\n]*\[")


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable()
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        try:
            return _read_array(path, tick)
        except InvalidInput:
            pass  # not one JSON array: lines, the first of them bad

    for number, obj in json_lines(path, tick, table.problems):
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {_kind(obj)}, not an object with named values")
            table.records.append(RawRecord(number, flatten(obj)))
        except ValueError as exc:
            table.problems.append(Problem(number, str(exc)))
    return table


def read_frame(path: Path, tick: Tick) -> FloatColumns | None:
    """The file as float64 columns (a missing key or null: NaN) and the missing cells per
    column, when every non-blank line is a flat JSON object of numbers (or numeric text) and
    the file is UTF-8 without NUL bytes; None otherwise."""
    data = path.read_bytes()
    tick(len(data))
    if b"\x00" in data or _ARRAY_START.match(data) or not is_utf8(data):
        return None  # the line reader names each line that is not UTF-8 text
    # (pyarrow and orjson both refuse an escaped lone surrogate: every key is UTF-8 text too)
    parsed = _arrow_columns(data)
    if parsed is not None:
        return parsed
    try:
        lines = data.decode("utf-8").lstrip("\ufeff").split("\n")
        # orjson refuses bare NaN/Infinity and integers past 64 bits: those files take the
        # line reader, which reads them as the rules say
        rows = [orjson.loads(line) for line in lines if line.strip()]
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not rows or not all(type(r) is dict for r in rows):
        return None
    keys = list(dict.fromkeys(itertools.chain.from_iterable(rows)))
    if not keys:  # only empty objects: the line reader says what is missing
        return None
    try:
        columns = _columns(rows, keys)
    except (TypeError, ValueError, OverflowError):
        return None  # text, nested objects, lists: read line by line
    nulls: dict[str, int] = {}
    for k, v in columns.items():
        # a null (or missing key) is NaN; NaN from numeric text ("nan") is not a null
        nulls[k] = sum(r.get(k) is None for r in rows) if np.isnan(v).any() else 0
    return columns, nulls


def _arrow_columns(data: bytes) -> FloatColumns | None:
    """``read_frame``'s result parsed by pyarrow's JSON reader (in C++, several times faster
    than a ``orjson.loads`` per line), when pyarrow is there and reads every column as
    numbers or nulls; None for anything else (text, booleans, lists, objects, bare NaN or
    Infinity, repeated keys), which the line-by-line parse decides as before."""
    try:
        import pyarrow as pa
        import pyarrow.json as pa_json
    except ImportError:
        return None
    try:
        table = pa_json.read_json(pa.BufferReader(data))
    except (pa.ArrowException, ValueError):
        return None
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_null)
    if not table.num_rows or not table.num_columns:
        return None  # only empty objects: the line reader says what is missing
    if not all(any(t(c.type) for t in numeric) for c in table.columns):
        return None
    columns = {
        name: float_column(column)
        for name, column in zip(table.column_names, table.columns, strict=True)
    }
    nulls = {
        name: column.null_count
        for name, column in zip(table.column_names, table.columns, strict=True)
    }
    # pyarrow reads a bare NaN or Infinity as a number (JSON has neither; a huge exponent
    # gives inf too); the rules read them as missing: the line reader decides those files
    if any(np.count_nonzero(~np.isfinite(v)) != nulls[k] for k, v in columns.items()):
        return None  # (a null is NaN here too: more non-finite values than nulls)
    if any(np.signbit(v[v == 0]).any() for v in columns.values()):
        return None  # -0 in a column of floats: pyarrow reads -0.0, JSON's rules the integer 0
    return columns, nulls


def _columns(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, np.ndarray]:
    """float64 columns of ``keys`` (a missing key or null: NaN); raises ValueError or
    TypeError for a cell that is not a number. Rows holding every key (the usual file) are
    converted as one matrix."""
    if all(len(r) == len(keys) for r in rows):
        cells = list(map(operator.itemgetter(*keys), rows)) if len(keys) > 1 else None
        matrix = np.array(
            cells if cells is not None else [[r[keys[0]]] for r in rows], dtype=np.float64
        )
        if matrix.shape != (len(rows), len(keys)):
            raise ValueError("a cell holds a list")
        return {k: np.ascontiguousarray(matrix[:, i]) for i, k in enumerate(keys)}
    out = {}
    for k in keys:
        column = np.array([r.get(k) for r in rows], dtype=np.float64)
        if column.shape != (len(rows),):
            raise ValueError(f"{k}: a cell holds a list")
        out[k] = column
    return out


def _read_array(path: Path, tick: Tick) -> RawTable:
    table = RawTable()
    doc = load_json(path)
    for number, obj in enumerate(doc, start=1):
        if isinstance(obj, dict):
            try:
                table.records.append(RawRecord(number, flatten(obj)))
            except TooDeep as exc:
                table.problems.append(Problem(number, str(exc), "item"))
        else:
            table.problems.append(Problem(number, f"a JSON {_kind(obj)}, not an object", "item"))
    tick(path.stat().st_size)
    return table


def _kind(obj: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number"
    )
