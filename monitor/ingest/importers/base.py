"""What every reader hands back, and the helpers they share.

A step-table reader (trainer_state, JSONL, CSV, Parquet, veRL console) turns a file into a
:class:`RawTable`: records of ``name -> value`` with the line (or row) they came from, plus
the problems it met. Turning records into klmon steps and metrics is the same for every
format and lives in :mod:`monitor.ingest.importers.tables`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Called with the number of bytes (or rows) read so far.
Tick = Callable[[int], None]

#: A clean table as a fast path reads it: name -> float64 column (missing: NaN), all of one
#: length, and per column how many of its NaN were missing cells.
FloatColumns = tuple[dict[str, np.ndarray], dict[str, int]]


@dataclass(frozen=True)
class Problem:
    """A line that was skipped, and why (``line`` None: the problem is not tied to a line).

    ``unit`` names what ``line`` counts: a ``line`` of text, a Parquet ``row``, a
    ``log_history entry``, a ``step`` of a per-token log.
    """

    line: int | None
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}" if self.line is not None else self.reason


@dataclass
class RawRecord:
    """One row of a log: where it was (1-based line or row number) and its flattened keys."""

    line: int
    values: dict[str, Any]
    kind: str = "train"  # train | eval


@dataclass
class RawTable:
    """What a step-table reader found in a file."""

    records: list[RawRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The step column when the format fixes it (trainer_state: "step"); None: look for one.
    step_key: str | None = None
    # how the format gives the step, for the summary ("step:N of each line", ...)
    step_source: str | None = None
    # Columns whose values are text, kept for the klmon export format (status, reject_reason).
    text_columns: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ColumnBatch:
    """One clean batch of a columnar file: its float64 ``columns`` and the missing cells of
    each (``nulls``), as :data:`FloatColumns` holds them, and ``records``: the same rows as
    the row rules read them (``records(offset)``: numbered from ``offset + 1``), for a batch
    that the fast path hands back (repeated steps, a row without values...). Those come from
    the file's own values (the batch is kept until then: a bounded batch, twice): the float64
    columns have lost a NaN's difference from a missing cell, and an integer step's type."""

    columns: dict[str, np.ndarray]
    nulls: dict[str, int]
    records: Callable[[int], RawTable]


# Deepest nesting of objects a row may have (``a/b/c/...``); deeper rows are skipped.
MAX_DEPTH = 16
# Steps are stored as signed 64-bit integers.
MAX_STEP = 2**63 - 1


class TooDeep(ValueError):
    """A row nested deeper than :data:`MAX_DEPTH` levels."""


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8 text (a fast path checks it before handing a file to a parser
    that would take bytes the line readers refuse)."""
    if data.isascii():  # the usual log, told at memory speed
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def float_column(column: Any) -> np.ndarray:
    """A pyarrow column (Array or ChunkedArray) of integers, floats or nulls as float64, null
    as NaN. Read from the arrays' buffers (little-endian, as Arrow stores them): pyarrow's
    own conversions (``to_numpy``, ``to_pandas``, a scalar for ``fill_null``) load pandas,
    a third of a ``klmon import``'s start-up, and a cast loads its compute kernels."""
    import pyarrow as pa

    parts = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        n = len(chunk)
        if chunk.null_count == n:  # all null (a null-typed column has no buffers)
            parts.append(np.full(n, np.nan))
            continue
        t = chunk.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise TypeError(f"float_column takes integers, floats or nulls, not {t}")
        kind = "f" if pa.types.is_floating(t) else "u" if pa.types.is_unsigned_integer(t) else "i"
        dtype = np.dtype(f"<{kind}{t.bit_width // 8}")
        valid, data = chunk.buffers()
        values = np.frombuffer(data, dtype, n, chunk.offset * dtype.itemsize).astype(np.float64)
        if chunk.null_count:  # the validity bitmap's bytes that hold this slice
            first, skip = divmod(chunk.offset, 8)
            bitmap = np.frombuffer(valid, np.uint8, (skip + n + 7) // 8, first)
            bits = np.unpackbits(bitmap, bitorder="little")[skip : skip + n]
            values[bits == 0] = np.nan
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0, np.float64)


def n_rows(columns: Mapping[str, np.ndarray]) -> int:
    """The length of a fast path's columns (0 without any)."""
    return len(next(iter(columns.values()), ()))


def column_rows(columns: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Columns of one length as row dicts of Python values, NaN as None."""
    names = list(columns)
    cells = [[None if v != v else v for v in column.tolist()] for column in columns.values()]
    return [dict(zip(names, row, strict=True)) for row in zip(*cells, strict=True)]


def unique_names(names: Iterable[str]) -> list[str]:
    """Column names made unique: a repeat of ``loss`` is ``loss.2``, then ``loss.3`` (a
    table's columns of one name are all kept)."""
    out: list[str] = []
    for name in names:
        base, n = name, 1
        while name in out:
            n += 1
            name = f"{base}.{n}"
        out.append(name)
    return out


def flatten(obj: Mapping[str, Any], prefix: str = "", _depth: int = 0) -> dict[str, Any]:
    """Nested dicts become ``a/b`` keys (``{"actor": {"kl_loss": 1}}`` -> ``actor/kl_loss``).

    Raises TooDeep beyond MAX_DEPTH levels (a hostile or broken row, never a training log).
    """
    if not prefix and not any(isinstance(v, Mapping) for v in obj.values()):
        return dict(obj)  # the common case: already flat
    if _depth >= MAX_DEPTH:
        raise TooDeep(f"objects nested deeper than {MAX_DEPTH} levels")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/", _depth + 1))
        else:
            out[name] = value
    return out


def loads_line(text: str) -> Any:
    """``json.loads`` for one line of a log, with every failure as a ValueError whose message
    says what is wrong (invalid JSON with its column, nesting too deep for the parser)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise TooDeep("nested too deeply to parse") from None


def line_problem(raw: bytes) -> str | None:
    """Why a raw line cannot be read as text (a NUL byte, not UTF-8), or None."""
    if b"\x00" in raw:
        column = raw.index(b"\x00") + 1
        return f"a NUL byte at column {column} (binary data in a text log)"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start + 1} of the line)"
    return None


_WRAPPED_NUMBER = re.compile(
    r"^(?:np\.\w+|numpy\.\w+|tensor|torch\.tensor|array|float|int)\((?P<num>[^,()]+)(?:,.*)?\)$"
)
_TRUE = {"true", "True", "TRUE"}
_FALSE = {"false", "False", "FALSE"}


class NotNumeric(ValueError):
    """A value that is not a number (text, a list, ...)."""


def to_number(value: Any) -> float | None:
    """A cell as a float; None for missing (None, empty, NaN, +-Infinity).

    Accepts numbers, booleans, numeric strings (``"1e-3"``, ``"NaN"``, ``"inf"``) and the
    wrapped reprs loggers print (``np.float64(0.5)``, ``tensor(0.5)``). Raises NotNumeric for
    anything else.
    """
    if type(value) is float:  # the common case first
        return value if math.isfinite(value) else None
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            f = float(value)
        except OverflowError:  # an integer beyond the float range: as infinite
            return None
        return f if math.isfinite(f) else None
    if isinstance(value, Decimal):  # a Parquet decimal column (Spark, pandas' Decimal)
        f = float(value) if not value.is_snan() else math.nan
        return f if math.isfinite(f) else None
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalar
        try:
            return to_number(value.item())
        except (TypeError, ValueError) as exc:
            raise NotNumeric(repr(value)) from exc
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if s in _TRUE:
            return 1.0
        if s in _FALSE:
            return 0.0
        m = _WRAPPED_NUMBER.match(s)
        if m:
            s = m.group("num").strip()
        try:
            f = float(s)
        except ValueError:
            raise NotNumeric(value) from None
        return f if math.isfinite(f) else None
    raise NotNumeric(repr(value)[:60])


def to_step(value: Any) -> int:
    """A step number: a non-negative integer (``12``, ``12.0``, ``"12"``, a whole decimal);
    ValueError else."""
    shown = _short(value)
    exact = _exact_int(value)
    if exact is None:
        try:
            f = to_number(value)
        except NotNumeric:
            raise ValueError(f"step {shown} is not a number") from None
        if f is None:
            if value is None or str(value).strip() == "":
                raise ValueError("the step is empty")
            raise ValueError(f"step {shown} is not finite")
        # a decimal is checked as it is: 2**53 + 0.5 rounds to a whole float
        if f != int(f) or (isinstance(value, Decimal) and value != value.to_integral_value()):
            raise ValueError(f"step {shown} is not a whole number")
        exact = int(f)
    if exact < 0:
        raise ValueError(f"step {shown} is negative")
    if exact > MAX_STEP:
        raise ValueError(f"step {shown} is out of range (at most 2**63 - 1)")
    return exact


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def _exact_int(value: Any) -> int | None:
    """An integer step read exactly (a float would round 2**63 - 1 up to 2**63)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) < 64 and _INTEGER.fullmatch(value):
        return int(value)
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value) if value.adjusted() < 64 else None
    return None


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, Decimal) else repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def iter_lines(
    fh: BinaryIO, tick: Tick, problems: list[Problem] | None = None
) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each line of a binary file; text None when the line holds a
    NUL byte or is not UTF-8 (with the reason added to ``problems`` when given)."""
    done = 0
    for number, raw in enumerate(fh, start=1):
        done += len(raw)
        if number % 512 == 0:
            tick(done)
        bad = line_problem(raw) if b"\x00" in raw else None
        if bad is None:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad = line_problem(raw)
        if bad is not None:
            if problems is not None:
                problems.append(Problem(number, bad))
            yield number, None
            continue
        if number == 1:
            line = line.lstrip("\ufeff")
        yield number, line
    tick(done)


def text_lines(path: Path, tick: Tick, problems: list[Problem]) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of the file at ``path`` that can be text; the others
    are reported in ``problems`` and skipped."""
    with path.open("rb") as fh:
        for number, line in iter_lines(fh, tick, problems):
            if line is not None:
                yield number, line


def json_lines(path: Path, tick: Tick, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON Lines file; a line that
    is not text or not valid JSON is reported in ``problems`` and skipped."""
    for number, line in text_lines(path, tick, problems):
        text = line.strip()
        if not text:
            continue
        try:
            yield number, loads_line(text)
        except ValueError as exc:
            problems.append(Problem(number, str(exc)))


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
