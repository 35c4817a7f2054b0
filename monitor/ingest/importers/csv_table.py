"""CSV (and TSV) step tables: a header row, then a row per step, arbitrary columns.

The delimiter is sniffed (comma, tab, semicolon); quoted fields may hold commas and line
breaks; empty cells are missing values. A row with the wrong number of fields, a line with a
NUL byte or that is not UTF-8, and a row the csv module cannot parse are reported with their
line number and skipped; the rows around them are read.

A clean file (numbers only, every row as wide as the header) is parsed at once instead
(:func:`read_frame`: by pyarrow's CSV reader where pyarrow is installed, else by numpy), with
the same result; anything else goes through the csv module row by row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from monitor.ingest.importers.base import (
    FloatColumns,
    Problem,
    RawRecord,
    RawTable,
    Tick,
    float_column,
    is_utf8,
    iter_lines,
    unique_names,
)

_SAMPLE = 64 * 1024
_SNIFF_LINES = 32
_SNIFF_LINE = 1024
_BOM = b"\xef\xbb\xbf"


def sniff_delimiter(sample: str) -> str:
    # The sniffer's regular expressions take time quadratic in a long line (60k characters
    # after a quote: 20 s): it sees the first lines, each cut short, which a header and a
    # few rows decide.
    lines = [line[:_SNIFF_LINE] for line in sample.splitlines()[:_SNIFF_LINES] if line.strip()]
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=",\t;").delimiter
    except csv.Error:
        first = lines[0] if lines else ""
        return max(",\t;", key=first.count)


def read(path: Path, tick: Tick) -> RawTable:
    table = RawTable()
    with path.open("rb") as fh:
        sample = fh.read(_SAMPLE).decode("utf-8", errors="replace").lstrip("\ufeff")
        delimiter = sniff_delimiter(sample.replace("\x00", ""))
        fh.seek(0)
        _read_rows(table, csv.reader(_text_lines(fh, tick, table), delimiter=delimiter))
    return table


# Bytes a clean body is made of (besides the delimiter): numbers, signs, exponents, spaces.
_NUMERIC = b"0123456789.eE+- \r\n"

#: Whether :func:`read_frame` parses with pyarrow where it is installed (tests switch it off
#: to cover numpy's parser, which reads the same values).
ARROW = True


def read_frame(path: Path, tick: Tick) -> FloatColumns | None:
    """The file as float64 columns (missing cells NaN) and the missing cells per column,
    when it is clean: UTF-8 without NUL bytes or quotes, a body of numbers only, and every
    row with as many fields as the header. None otherwise (then :func:`read` reports each
    irregular line)."""
    data = path.read_bytes()
    tick(len(data))
    if b"\x00" in data or b'"' in data:
        return None
    if not is_utf8(data):
        return None
    try:
        text = data[:_SAMPLE].decode("utf-8", errors="strict").lstrip("\ufeff")
    except UnicodeDecodeError:
        return None
    delimiter = sniff_delimiter(text)
    start = 0
    while data.startswith(_BOM, start):  # every one, as the line reader strips them
        start += len(_BOM)
    end = data.find(b"\n", start)
    if end < 0:
        return None
    try:
        cells = next(
            csv.reader([data[start:end].decode("utf-8").rstrip("\r")], delimiter=delimiter)
        )
    except csv.Error:  # a lone carriage return in the header: the row reader reports it
        return None
    if not any(c.strip() for c in cells):
        return None  # a blank first line: the row reader skips it and takes the next one
    header = _names(cells)
    body = data[end + 1 :]
    del data  # the body's copy is what is read from here on: one file in memory, not two
    sep = delimiter.encode()
    if body.translate(None, _NUMERIC + sep) or not body or body.isspace():
        return None
    if b"\r" in body and body.count(b"\r") != body.count(b"\r\n"):
        return None  # a lone carriage return: numpy would end the line there, csv refuses it
    raw = np.frombuffer(body if body.endswith(b"\n") else body + b"\n", np.uint8)
    newlines = np.flatnonzero(raw == 10)
    fields = np.diff(np.r_[0, np.searchsorted(np.flatnonzero(raw == sep[0]), newlines)])
    lengths = np.diff(np.r_[-1, newlines]) - 1
    lengths[lengths > 0] -= raw[newlines[lengths > 0] - 1] == 13  # a line's CR is no field
    if np.any((fields != len(header) - 1) & (lengths > 0)):
        return None  # a row of the wrong width: the row reader says which
    arrow = _arrow_columns(body, delimiter, header) if ARROW and b" " not in body else None
    if arrow is not None:
        return arrow
    try:
        # numpy's parser, in C, reads numbers as Python's float() does (correctly rounded,
        # spaces around them allowed); an empty cell reads as NaN once it holds "nan", a
        # word the body cannot hold otherwise (so every NaN was a missing cell). Anything
        # it refuses (a cell of spaces, a blank line of spaces) is left to the row reader.
        matrix = np.loadtxt(
            io.BytesIO(_fill_empty_cells(body, sep)),
            delimiter=delimiter,
            dtype=np.float64,
            comments=None,
            ndmin=2,
        )
    except ValueError:
        return None
    if matrix.shape[1] != len(header):
        return None
    columns = dict(zip(header, matrix.T.copy(), strict=True))
    return columns, {c: int(np.isnan(v).sum()) for c, v in columns.items()}


def _arrow_columns(body: bytes, delimiter: str, header: list[str]) -> FloatColumns | None:
    """The body parsed by pyarrow's CSV reader (C++, a few times faster than numpy's here),
    every column as float64: its parser rounds as Python's ``float()`` does, ``-0`` stays
    negative, an empty cell is a null (missing: the body holds no word such as ``nan``).
    None without pyarrow, or for a cell it refuses (``1e``, ``--1``; numpy's parser then
    decides); spaces around numbers, which it does not trim, never come here."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pa_csv
    except ImportError:
        return None
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(body),
            read_options=pa_csv.ReadOptions(column_names=header),  # unique (``_names``)
            parse_options=pa_csv.ParseOptions(delimiter=delimiter),
            # malloc's heap, which the rest of the import reuses once the table is freed
            # (pyarrow's own pool keeps it: 30 MB more at the import's peak)
            memory_pool=pa.system_memory_pool(),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.float64()), null_values=[""]
            ),
        )
    except (pa.ArrowException, ValueError):
        return None
    columns = dict(zip(header, table.columns, strict=True))
    return {n: float_column(c) for n, c in columns.items()}, {
        n: c.null_count for n, c in columns.items()
    }


def _fill_empty_cells(body: bytes, sep: bytes) -> bytes:
    """``body`` with ``nan`` in every empty cell: between two delimiters, and a delimiter's
    side at the start or end of a line or of the body."""
    for _ in range(2):  # a run of empty cells: every other one is filled per pass
        body = body.replace(sep + sep, sep + b"nan" + sep)
    body = body.replace(b"\n" + sep, b"\nnan" + sep)
    body = body.replace(sep + b"\r", sep + b"nan\r").replace(sep + b"\n", sep + b"nan\n")
    if body.startswith(sep):
        body = b"nan" + body
    if body.endswith(sep):
        body += b"nan"
    return body


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
    return unique_names(cell.strip() or f"column_{i + 1}" for i, cell in enumerate(row))
