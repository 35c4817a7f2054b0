"""CSV (and TSV) step tables: a header row, then a row per step, arbitrary columns.

The delimiter is sniffed (comma, tab, semicolon); quoted fields may hold commas and line
breaks; empty cells are missing values. A row with the wrong number of fields, a line with a
NUL byte or that is not UTF-8, and a row the csv module cannot parse are reported with their
line number and skipped; the rows around them are read.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from monitor.ingest.importers.base import Problem, RawRecord, RawTable, Tick, iter_lines

_SAMPLE = 64 * 1024


def sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        first = sample.splitlines()[0] if sample else ""
        return max(",\t;", key=first.count)


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable()
    with path.open("rb") as fh:
        sample = fh.read(_SAMPLE).decode("utf-8", errors="replace").lstrip("\ufeff")
        delimiter = sniff_delimiter(sample.replace("\x00", ""))
        fh.seek(0)
        _read_rows(table, csv.reader(_text_lines(fh, tick, table), delimiter=delimiter))
    return table


def _text_lines(fh: BinaryIO, tick: Tick, table: RawTable) -> Iterator[str]:
    """The file's lines as text; a line that cannot be text (NUL, not UTF-8) is reported and
    read as an empty line, which the reader skips, so line numbers stay right."""
    for _number, line in iter_lines(fh, tick, table.problems):
        yield "\n" if line is None else line


def _read_rows(table: RawTable, reader: Any) -> None:
    header: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            table.problems.append(Problem(reader.line_num, f"not readable as CSV ({exc})"))
            continue
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
