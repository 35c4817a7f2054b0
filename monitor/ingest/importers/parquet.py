"""Parquet step tables (needs pyarrow: ``pip install 'klmon[parquet]'``).

A klmon export carries the run's config and metric meanings in the file's key-value
metadata (key ``klmon``), so an export read back is the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import RawRecord, RawTable, Tick, flatten

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


def read(path: Path, tick: Tick) -> RawTable:
    pq = require_pyarrow(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"{path}: not a Parquet file ({exc})") from exc
    table = RawTable()
    meta = pf.schema_arrow.metadata or {}
    if METADATA_KEY in meta:
        try:
            table.config["klmon_export"] = json.loads(meta[METADATA_KEY])
        except ValueError:
            table.notes.append("the file's klmon metadata is not valid JSON; ignored")
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=65536):
            for row in batch.to_pylist():
                number += 1
                table.records.append(RawRecord(number, flatten(row)))
            tick(number)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"{path}: Parquet data unreadable after row {number} ({exc})") from exc
    return table
