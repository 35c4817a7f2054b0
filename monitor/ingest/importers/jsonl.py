"""JSON Lines step tables: one JSON object per line (or one JSON array of objects).

Arbitrary keys, nested objects flattened to ``a/b``; bare ``NaN``/``Infinity`` are read as
missing. A line that is not a JSON object is reported with its number and skipped.
"""

from __future__ import annotations

from pathlib import Path

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
