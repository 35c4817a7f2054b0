"""Parquet step tables (needs pyarrow: ``pip install 'klmon[parquet]'``).

A klmon export carries the run's config and metric meanings in the file's key-value
metadata (key ``klmon``), so an export read back is the same run.

Read in batches of about :data:`BATCH_CELLS` cells (rows x columns), each turned into steps and
written before the next is read, so memory stays bounded whatever the number of rows (a few
hundred MB at most; a 20M-row file is not held in memory). A file of numeric columns only
(and not a klmon export) hands each batch over as float64 columns, built without a Python
loop per row (``tables.build_frame``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import (
    ColumnBatch,
    Problem,
    RawRecord,
    RawTable,
    Tick,
    TooDeep,
    flatten,
    float_column,
    unique_names,
)
from monitor.ingest.importers.keys import detect_producer

METADATA_KEY = b"klmon"


def require_pyarrow(path: Path | str, action: str = "reading") -> Any:
    """pyarrow.parquet, or a clear InvalidInput naming the file and the fix."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidInput(
            f"{path}: {action} Parquet needs pyarrow, which is not installed: "
            "pip install 'klmon[parquet]'"
        ) from exc
    return pq


BATCH_CELLS = 200_000
MAX_BATCH_ROWS = 16_384


def read_batches(path: Path, tick: Tick) -> tuple[str, Iterator[RawTable | ColumnBatch]]:
    """The producer (from the schema's column names) and the file's rows, batch by batch;
    the first batch carries the file's klmon metadata and notes."""
    pq = require_pyarrow(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"{path}: not a Parquet file ({exc})") from exc
    columns = _leaf_names(pf.schema_arrow)
    producer = detect_producer(columns)
    rows = max(1, min(MAX_BATCH_ROWS, BATCH_CELLS // max(1, len(columns))))
    return producer, _batches(path, pf, rows, tick)


def _batches(path: Path, pf: Any, rows: int, tick: Tick) -> Iterator[RawTable | ColumnBatch]:
    import pyarrow as pa

    table = RawTable()
    meta = pf.schema_arrow.metadata or {}
    if METADATA_KEY in meta:
        try:
            table.config["klmon_export"] = json.loads(meta[METADATA_KEY])
        except ValueError:
            table.notes.append("the file's klmon metadata is not valid JSON; ignored")
    number = 0
    numeric = (
        METADATA_KEY not in meta
        and bool(pf.schema_arrow.names)
        and all(
            pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in pf.schema_arrow
        )
    )
    names = unique_names(pf.schema_arrow.names)
    if names != pf.schema_arrow.names:  # rare: read by the row path, whose first batch says so
        numeric = False
        renamed = [
            f"{a} as {b}" for a, b in zip(pf.schema_arrow.names, names, strict=True) if a != b
        ]
        table.notes.append(f"columns with a name already used, read as: {', '.join(renamed)}")
    try:
        for batch in pf.iter_batches(batch_size=rows):
            if names != batch.schema.names:  # a repeated name would lose a column
                batch = pa.RecordBatch.from_arrays(batch.columns, names=names)
            if numeric and batch.num_rows and _exact_in_floats(batch):
                columns = {n: float_column(batch.column(i)) for i, n in enumerate(names)}
                nulls = {n: batch.column(i).null_count for i, n in enumerate(names)}
                number += batch.num_rows
                tick(number)
                yield ColumnBatch(columns, nulls, partial(_row_table, batch))
                continue
            yield _row_table(batch, number, table)
            number += batch.num_rows
            tick(number)
            table = RawTable()
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"{path}: Parquet data unreadable after row {number} ({exc})") from exc
    if number == 0:
        yield table


def _row_table(batch: Any, offset: int, table: RawTable | None = None) -> RawTable:
    """The rows of ``batch`` for the row rules, numbered from ``offset + 1`` (added to
    ``table``, which may carry the file's notes)."""
    table = RawTable() if table is None else table
    for number, row in enumerate(_rows(batch), start=offset + 1):
        if row is None:
            table.problems.append(Problem(number, "a text cell is not UTF-8", "row"))
            continue
        try:
            table.records.append(RawRecord(number, flatten(row)))
        except TooDeep as exc:
            table.problems.append(Problem(number, str(exc), "row"))
    return table


def _rows(batch: Any) -> list[dict[str, Any] | None]:
    """The batch's rows as dicts; None for a row with a text cell that is not UTF-8 (found
    one row at a time, only in a batch that holds one)."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        out: list[dict[str, Any] | None] = []
        for i in range(batch.num_rows):
            try:
                out.append(batch.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError:
                out.append(None)
        return out


def _exact_in_floats(batch: Any) -> bool:
    """Every integer of the batch is exact as a float64 (steps beyond 2**53 are read as
    Python integers, row by row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for col in batch.columns:
        if pa.types.is_integer(col.type) and col.null_count < len(col):
            bounds = pc.min_max(col)
            if max(abs(bounds["min"].as_py()), abs(bounds["max"].as_py())) >= 2**53:
                return False
    return True


def _leaf_names(schema: Any) -> list[str]:
    """Column names as the rows flatten them (a struct column ``a`` with ``b``: ``a/b``)."""
    import pyarrow as pa

    out: list[str] = []

    def walk(field: Any, prefix: str) -> None:
        if pa.types.is_struct(field.type):
            for i in range(field.type.num_fields):
                walk(field.type.field(i), f"{prefix}{field.name}/")
        else:
            out.append(prefix + field.name)

    for f in schema:
        walk(f, "")
    return out
