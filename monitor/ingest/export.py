"""The way back out: a run's step table as CSV, JSON Lines or Parquet.

One row per step: ``step, wall_time, status, reject_reason, ranks_seen``, every klmon
quantity, then every extra metric under its name (a metric whose name collides with one of
those columns is written as ``metric:<name>``). ``klmon import`` recognises this layout and
reads it back into an identical run: step columns back into step columns, metrics back into
metrics. A Parquet export also carries the run's config and metric meanings in its
key-value metadata (key ``klmon``); CSV and JSONL hold the table only.

Runs are read in chunks of steps, so exporting a long run does not hold it all in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from monitor import __version__
from monitor.errors import InvalidInput
from monitor.formats import json_safe
from monitor.ingest.importers.keys import KLMON_RESERVED, METRIC_PREFIX
from monitor.ingest.importers.parquet import METADATA_KEY, require_pyarrow
from monitor.store import (
    STEP_INT_COLUMNS,
    STEP_QUANTITIES,
    Database,
    RunInfo,
    metric_names,
    read_metric_info,
    read_metrics_long,
    read_steps,
    resolve_run,
    steps_with_data,
)

EXPORT_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
STEP_TABLE_COLUMNS: tuple[str, ...] = (*KLMON_RESERVED, *STEP_QUANTITIES)
_INT_COLUMNS = ("ranks_seen", *STEP_INT_COLUMNS)
_TEXT_COLUMNS = ("status", "reject_reason")
CHUNK_STEPS = 50_000


@dataclass(frozen=True)
class ExportReport:
    path: str
    format: str
    run: RunInfo
    steps: int
    columns: int
    metrics: int


def export_format(path: str | Path, fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from the file extension."""
    if fmt:
        if fmt not in ("csv", "jsonl", "parquet"):
            raise InvalidInput(f"unknown export format {fmt!r}: use csv, jsonl or parquet")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise InvalidInput(
            f"{path}: cannot tell the export format from {suffix or 'no extension'!r}; "
            "name the file .csv, .jsonl or .parquet (or pass --format)"
        )
    return EXPORT_FORMATS[suffix]


def metric_column(name: str) -> str:
    """The export column of an extra metric (prefixed when it collides with a step column)."""
    if name in STEP_TABLE_COLUMNS or name.startswith(METRIC_PREFIX):
        return METRIC_PREFIX + name
    return name


def export_run(
    db: Database,
    run: RunInfo | str | int,
    path: str | Path,
    *,
    fmt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write a run's step table (every quantity and every extra metric) to ``path``.

    ``run``: a RunInfo, or an id / name / ``project/name``. The file is written next to
    ``path`` and renamed into place, so a failed export leaves no half file.
    """
    info = run if isinstance(run, RunInfo) else resolve_run(db, run)
    fmt = export_format(path, fmt)
    if fmt == "parquet":
        require_pyarrow(path, "writing")
    names = metric_names(db, info.id)
    columns = [*STEP_TABLE_COLUMNS, *(metric_column(n) for n in names)]
    steps = steps_with_data(db, info.id)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    chunks = _chunks(db, info.id, steps, names, columns, progress)
    try:
        if fmt == "csv":
            _write_csv(tmp, columns, chunks)
        elif fmt == "jsonl":
            _write_jsonl(tmp, chunks)
        else:
            _write_parquet(tmp, db, info, columns, names, chunks)
        os.replace(tmp, target)
    except OSError as exc:
        raise InvalidInput(f"{target}: cannot write ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(str(target), fmt, info, len(steps), len(columns), len(names))


def _chunks(
    db: Database,
    run_id: int,
    steps: list[int],
    names: list[str],
    columns: list[str],
    progress: Callable[[int, int], None] | None,
) -> Iterator[pd.DataFrame]:
    renames = {n: metric_column(n) for n in names}
    for start in range(0, len(steps), CHUNK_STEPS):
        chunk = steps[start : start + CHUNK_STEPS]
        lo, hi = chunk[0], chunk[-1]
        frame = pd.DataFrame({"step": pd.Series(chunk, dtype="int64")})
        step_rows = read_steps(db, run_id, start=lo, end=hi)
        frame = frame.merge(step_rows, on="step", how="left")
        frame = frame.merge(_metric_columns(db, run_id, lo, hi, renames), on="step", how="left")
        for c in columns:
            if c not in frame.columns:
                frame[c] = None if c in _TEXT_COLUMNS else math.nan
        frame = frame[columns]
        for c in columns:
            if c in _INT_COLUMNS:
                frame[c] = pd.to_numeric(frame[c]).round().astype("Int64")
            elif c in _TEXT_COLUMNS:
                frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
            elif c != "step":
                frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
        if progress:
            progress(start + len(chunk), len(steps))
        yield frame


def _metric_columns(
    db: Database, run_id: int, lo: int, hi: int, renames: dict[str, str]
) -> pd.DataFrame:
    """The metrics of steps ``lo..hi`` as a ``step`` column plus one column per export
    column name. Names are mapped before pivoting, so a metric called ``step`` (or any
    step column) becomes ``metric:step`` instead of clashing with the step index."""
    long = read_metrics_long(db, run_id, start=lo, end=hi)
    # A metric first logged after the export started has no column: it is left out.
    long = long.assign(column=long["name"].map(renames)).dropna(subset=["column"])
    if long.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    wide = long.pivot(index="step", columns="column", values="value")
    wide.columns.name = None
    return wide.reset_index()


def _write_csv(tmp: Path, columns: list[str], chunks: Iterator[pd.DataFrame]) -> None:
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        pd.DataFrame(columns=columns).to_csv(fh, index=False)
        for frame in chunks:
            frame.to_csv(fh, index=False, header=False, float_format=None)


def _write_jsonl(tmp: Path, chunks: Iterator[pd.DataFrame]) -> None:
    with tmp.open("w", encoding="utf-8") as fh:
        for frame in chunks:
            for record in frame.to_dict(orient="records"):
                fh.write(json.dumps({k: json_safe(v) for k, v in record.items()}, allow_nan=False))
                fh.write("\n")


def _write_parquet(
    tmp: Path,
    db: Database,
    info: RunInfo,
    columns: list[str],
    names: list[str],
    chunks: Iterator[pd.DataFrame],
) -> None:
    import pyarrow as pa

    pq = require_pyarrow(tmp, "writing")
    fields = []
    for c in columns:
        if c == "step" or c in _INT_COLUMNS:
            fields.append(pa.field(c, pa.int64()))
        elif c in _TEXT_COLUMNS:
            fields.append(pa.field(c, pa.string()))
        else:
            fields.append(pa.field(c, pa.float64()))
    meta = {
        "klmon_version": __version__,
        "run": {
            "project": info.project,
            "name": info.name,
            "status": info.status,
            "source": info.source,
            "tags": info.tags,
        },
        "config": info.config,
        "metric_info": [i.as_dict() for i in read_metric_info(db, info.id).values()],
    }
    schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, default=str).encode()})
    with pq.ParquetWriter(str(tmp), schema) as writer:
        for frame in chunks:
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
