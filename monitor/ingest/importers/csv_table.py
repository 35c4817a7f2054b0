"""CSV (and TSV) step tables: a header row, then a row per step, arbitrary columns.

The delimiter is sniffed (comma, tab, semicolon); quoted fields may hold commas and line
breaks; empty cells are missing values. A row with the wrong number of fields is reported
with its line number and skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import Problem, RawRecord, RawTable, Tick

_SAMPLE = 64 * 1024


def sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        first = sample.splitlines()[0] if sample else ""
        return max(",\t;", key=first.count)


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable()
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            delimiter = sniff_delimiter(fh.read(_SAMPLE))
            fh.seek(0)
            _read_rows(table, csv.reader(_counting(fh, tick), delimiter=delimiter))
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"{path}: not UTF-8 text (byte {exc.start}); expected CSV with a header row"
        ) from exc
    except csv.Error as exc:
        raise InvalidInput(f"{path}: not readable as CSV ({exc})") from exc
    return table


def _counting(fh, tick: Tick) -> Iterator[str]:
    done = 0
    for n, line in enumerate(fh, start=1):
        done += len(line)
        if n % 1024 == 0:
            tick(done)
        yield line
    tick(done)


def _read_rows(table: RawTable, reader) -> None:
    header: list[str] | None = None
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = _names(row)
            continue
        if len(row) != len(header):
            table.problems.append(
                Problem(reader.line_num, f"{len(row)} fields where the header has {len(header)}")
            )
            continue
        table.records.append(RawRecord(reader.line_num, dict(zip(header, row, strict=True))))


def _names(row: list[str]) -> list[str]:
    names: list[str] = []
    for i, cell in enumerate(row):
        name = cell.strip() or f"column_{i + 1}"
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}.{n}"
        names.append(name)
    return names
