"""JSON Lines step tables: one JSON object per line (or one JSON array of objects).

Arbitrary keys, nested objects flattened to ``a/b``; bare ``NaN``/``Infinity`` are read as
missing. A line that is not a JSON object is reported with its number and skipped.

A clean file (one flat object of numbers per line) is turned into float64 columns at once
(:func:`read_frame`), with the same result; anything else is read line by line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import (
    Problem,
    RawRecord,
    RawTable,
    Tick,
    TooDeep,
    flatten,
    json_lines,
)
from monitor.ingest.importers.trainer_state import load_json


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


def read_frame(path: Path, tick: Tick) -> tuple[pd.DataFrame, dict[str, int]] | None:
    """The file as float64 columns (a missing key or null: NaN) and the missing cells per
    column, when every non-blank line is a flat JSON object of numbers (or numeric text) and
    the file is UTF-8 without NUL bytes; None otherwise."""
    data = path.read_bytes()
    tick(len(data))
    if b"\x00" in data or data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return None
    try:
        lines = data.decode("utf-8").lstrip("\ufeff").split("\n")
        # orjson refuses bare NaN/Infinity and integers past 64 bits: those files take the
        # line reader, which reads them as the rules say
        rows = [orjson.loads(line) for line in lines if line.strip()]
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not rows or not all(type(r) is dict for r in rows):
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns: dict[str, np.ndarray] = {}
    nulls: dict[str, int] = {}
    for k in keys:
        cells = [r.get(k) for r in rows]
        try:
            columns[k] = np.array(cells, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            return None  # text, nested objects, lists: read line by line
        nulls[k] = cells.count(None)
    try:
        return pd.DataFrame(columns, copy=False), nulls
    except UnicodeError:  # a key with a lone surrogate: the row reader cleans it
        return None


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
