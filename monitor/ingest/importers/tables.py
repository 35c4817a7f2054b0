"""From a reader's records to klmon step rows, extra metrics and metric meanings.

Shared by every step-table format. A row's step comes from its step column (``--step-column``
or ``--map COLUMN=step``; else the first of :data:`STEP_KEYS` the log has; ``epoch`` only as
a last resort and only when every value is a whole number) or, when the log has none, its
position. Which one was used is said in the import summary.
Every numeric source key is kept as an extra metric under its own name; keys whose meaning
is known (or given with ``--map COLUMN=QUANTITY``) also fill klmon's step columns. Rows
for the same step are merged (a trainer_state eval row joins its training row).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.errors import InvalidInput
from monitor.ingest.importers.base import (
    NotNumeric,
    Problem,
    RawRecord,
    RawTable,
    column_rows,
    n_rows,
    to_number,
    to_step,
)
from monitor.ingest.importers.keys import (
    GENERIC,
    METRIC_PREFIX,
    QUANTITY_MEANINGS,
    KeyMeaning,
    base_key,
    detect_producer,
    is_int_quantity,
    lookup,
)
from monitor.ingest.importers.payload_hashes import (
    payload_hash,
    quantity_hashes,
    quantity_hashes_of_rows,
)
from monitor.ingest.text import clean_text
from monitor.store.metric_info import MetricInfo
from monitor.store.tables import METRIC_NAME_MAX

STEP_KEYS: tuple[str, ...] = (
    "step",
    "global_step",
    "train/global_step",
    "trainer/global_step",
    "_step",
    "iteration",
    "iter",
    "update",
    "Step",
    "Iteration",
    "Update",
)
LAST_RESORT_STEP_KEYS: tuple[str, ...] = ("epoch", "train/epoch")
# klmon quantities that are a KL to the reference (what "the columns read as KL" lists).
KL_QUANTITIES: tuple[str, ...] = (
    "kl_mean",
    "kl_std",
    "kl_min",
    "kl_p05",
    "kl_p50",
    "kl_p95",
    "kl_max",
    "kl_p99",
    "k1",
    "k2",
    "k3",
)
# The unit of a KL value by the scale its meaning states.
UNITS: dict[str | None, str] = {
    "token-mean": "nats/token",
    "seq-mean": "nats/token (per-sequence mean)",
    "seq-sum": "nats/sequence",
    None: "unit not stated",
}
TIME_KEYS: tuple[str, ...] = ("wall_time", "_timestamp", "timestamp", "time")
STEP_STATUSES = ("ok", "partial", "rejected")
_NO_STEP_NOTE = (
    "no step column (step, global_step, trainer/global_step, _step, iteration, iter, "
    "update): row order used; name one with --step-column"
)


@dataclass
class CountedNotes:
    """What the notes that count things are made of: rows that repeated a step, and per
    column the cells not stored as numbers (non-numeric ones, ignored; NaN or infinite ones,
    stored as missing). A file read in batches counts per batch; its notes say the sums
    (``merge``, the importer)."""

    repeated_rows: int = 0
    non_numeric: Counter[str] = field(default_factory=Counter)
    non_finite: Counter[str] = field(default_factory=Counter)

    def add(self, other: CountedNotes) -> None:
        self.repeated_rows += other.repeated_rows
        self.non_numeric.update(other.non_numeric)
        self.non_finite.update(other.non_finite)

    def notes(self) -> list[str]:
        """What the summary says about them."""
        notes = []
        if self.repeated_rows:
            notes.append(
                f"{self.repeated_rows} rows repeated a step already seen: the later values kept"
            )
        if self.non_numeric:
            notes.append(f"non-numeric values ignored in: {_most(self.non_numeric)}")
        if self.non_finite:
            notes.append(f"NaN or infinite values stored as missing in: {_most(self.non_finite)}")
        return notes


def _most(counts: Counter[str]) -> str:
    """The five columns with most values, ties by name: the same whether a table was read by
    columns or by rows."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return ", ".join(f"{k} ({n})" for k, n in top)


@dataclass
class Prepared:
    """Everything an import writes, built in memory before the first write."""

    fmt: str
    producer: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    infos: list[MetricInfo] = field(default_factory=list)
    histograms: list[tuple[int, list[int]]] = field(default_factory=list)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # (step, stored token ledger: ids, counts, sums, n, pos, neg) with ids indexing token_texts
    ledgers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what the notes that count things are made of, which a file read in batches sums
    counted: CountedNotes = field(default_factory=CountedNotes)
    # quantity -> the source keys that filled it
    mapping: dict[str, list[str]] = field(default_factory=dict)
    records_read: int = 0
    # the step column and how it was chosen ("--step-column", "detected", ...); None: row order
    step_column: str | None = None
    step_source: str = "row order"
    # the columns read as KL: (column, quantity, estimator, unit)
    kl_read: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    # columns named like a KL that fill nothing (when kl_read is empty)
    kl_candidates: list[str] = field(default_factory=list)
    # The columnar form a clean table is built in (``build_frame``), instead of ``steps`` and
    # ``metrics``: the step rows as columns of one length (step, wall_time, payload_hash,
    # quantities; NaN: none) and each metric's (steps, values).
    step_frame: dict[str, np.ndarray] | None = None
    metric_columns: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def uncounted_notes(self) -> list[str]:
        """``notes`` but those of ``counted``, which a file read in batches says once, with
        the sums of its batches."""
        counted = self.counted.notes()
        return [n for n in self.notes if n not in counted]

    @property
    def n_steps(self) -> int:
        return n_rows(self.step_frame) if self.step_frame is not None else len(self.steps)

    @property
    def n_metrics(self) -> int:
        return len(self.metrics) + sum(len(s) for s, _ in self.metric_columns.values())

    def as_rows(self) -> Prepared:
        """The same content as ``steps`` and ``metrics`` (a columnar one converted)."""
        if self.step_frame is not None:
            self.steps = [
                {k: v for k, v in row.items() if v is not None}
                for row in column_rows(self.step_frame)
            ]
            self.step_frame = None
        for name, (steps, values) in self.metric_columns.items():
            self.metrics.extend(
                zip(steps.tolist(), [name] * len(steps), values.tolist(), strict=True)
            )
        self.metric_columns = {}
        return self

    def kl_lines(self) -> list[str]:
        """What the summary says about KL: the columns read as KL, or why none was."""
        if self.kl_read:
            shown = "; ".join(
                f"{c} -> {q} ({e or 'estimator not stated'}, {u})" for c, q, e, u in self.kl_read
            )
            return [f"KL read from: {shown}"]
        gap = self.mapping.get("rollout_gap")
        if gap:
            return [
                f"no KL to the reference recognised ({', '.join(gap)} read as rollout_gap, the "
                "sampler-vs-trainer gap); if a column is one, name it with --map COLUMN=k1 "
                "(or kl_mean, k3)"
            ]
        if self.kl_candidates:
            c = self.kl_candidates[0]
            return [
                "no KL column recognised, so no KL monitoring for this run; named like KL: "
                + ", ".join(self.kl_candidates[:8])
                + f". If {c} is a KL to the reference, import again with --map {c}=kl_mean "
                f"(a per-sequence sum) or --map {c}=k3 (a per-token mean of k3)"
            ]
        return [
            "no KL column recognised and none named like KL, so no KL monitoring for this "
            "run; name the KL column with --map COLUMN=kl_mean (or k1/k2/k3 per token)"
        ]


def merge(parts: list[Prepared]) -> Prepared:
    """One Prepared from the batches of one file (the in-memory view of a batched read)."""
    out = Prepared(fmt=parts[0].fmt, producer=parts[0].producer)
    for p in parts:
        p.as_rows()
        out.steps.extend(p.steps)
        out.metrics.extend(p.metrics)
        out.problems.extend(p.problems)
        out.records_read += p.records_read
        out.notes.extend(n for n in p.uncounted_notes() if n not in out.notes)
        out.counted.add(p.counted)
        for q, cols in p.mapping.items():
            out.mapping.setdefault(q, []).extend(c for c in cols if c not in out.mapping.get(q, []))
        out.kl_read.extend(k for k in p.kl_read if k not in out.kl_read)
        known = {i.name for i in out.infos}
        out.infos.extend(i for i in p.infos if i.name not in known)
    first = parts[0]
    out.config, out.step_column, out.step_source = (
        first.config,
        first.step_column,
        first.step_source,
    )
    out.kl_candidates = [] if out.kl_read else first.kl_candidates
    out.notes.extend(out.counted.notes())
    return out


def check_map_columns(user_map: dict[str, str | None], columns: set[str], path: object) -> None:
    """Every ``--map`` COLUMN must be a column of the file (a clear error otherwise)."""
    for column, quantity in user_map.items():
        if column in columns:
            continue
        close = difflib.get_close_matches(column, sorted(columns), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        shown = ", ".join(sorted(columns)[:30]) + (" ..." if len(columns) > 30 else "")
        raise InvalidInput(
            f"--map {column}={quantity or '-'}: {path} has no column {column!r}{hint} "
            f"(its columns: {shown})"
        )


def choose_step_column(
    table: RawTable,
    keys: set[str],
    user_map: dict[str, str | None],
    step_column: str | None,
    path: object,
    *,
    row_order: bool = False,
) -> tuple[str | None, str]:
    """The step column and how it was chosen; removes a ``COLUMN=step`` entry from user_map.
    ``row_order``: none is looked for (a later batch of a file whose first had none)."""
    mapped = [c for c, q in user_map.items() if q == "step"]
    if len(mapped) > 1 or (mapped and step_column and mapped[0] != step_column):
        raise InvalidInput(
            "one step column only: "
            + ", ".join(
                [*(f"--map {c}=step" for c in mapped)]
                + ([f"--step-column {step_column}"] if step_column else [])
            )
        )
    for c in mapped:
        del user_map[c]
    given = step_column or (mapped[0] if mapped else None)
    if given is not None:
        check_map_columns({given: "step"}, keys, path)
        how = "--step-column" if step_column else f"--map {given}=step"
        return given, how
    if row_order:
        return None, "row order"
    if table.step_key is not None:
        return table.step_key, table.step_source or "the format's"
    found = next((k for k in STEP_KEYS if k in keys), None)
    if found is not None:
        return found, "detected"
    for k in LAST_RESORT_STEP_KEYS:
        if k in keys and _whole_numbers(table, k):
            return k, "detected, last resort: no other step column"
    return None, "row order"


def _whole_numbers(table: RawTable, key: str) -> bool:
    seen = 0
    for rec in table.records:
        try:
            v = to_number(rec.values.get(key))
        except NotNumeric:
            return False
        if v is not None:
            if v != int(v) or v < 0:
                return False
            seen += 1
    return seen > 0


def build(
    table: RawTable,
    *,
    fmt: str,
    path: object,
    default_wall_time: float,
    user_map: dict[str, str | None] | None = None,
    step_column: str | None = None,
    row_offset: int = 0,
    producer: str | None = None,
    row_order: bool = False,
) -> Prepared:
    """Steps, metrics and meanings from a reader's table.

    ``row_offset``: rows of the same file already built (a columnar file read in batches), so
    that row-order steps continue; ``producer``: fixed by the caller (from a file's schema)
    rather than detected from this table's keys; ``row_order``: the step is the row order,
    as the file's first batch decided (no column is looked for).

    Three phases: merge the rows by step (:func:`_merge_by_step`), say what each column means
    (:func:`_read_columns`), then write the step rows and metrics (:func:`_rows_and_metrics`)
    and what the summary says about them.
    """
    user_map = dict(user_map or {})
    keys = {k for rec in table.records for k in rec.values}
    producer = producer or detect_producer(keys)
    out = Prepared(fmt=fmt, producer=producer, problems=list(table.problems))
    out.notes.extend(table.notes)
    out.records_read = len(table.records)
    klmon = producer == "klmon"
    step_key, out.step_source = choose_step_column(
        table, keys, user_map, step_column, path, row_order=row_order
    )
    out.step_column = step_key
    if step_key is None:
        out.notes.append(_NO_STEP_NOTE)
    merged = _merge_by_step(table, out, step_key, row_offset, klmon=klmon)
    columns = _storable_columns(merged, out.notes)
    check_map_columns(user_map, columns | keys - {step_key}, path)
    read = _read_columns(producer, columns, user_map)
    used = _rows_and_metrics(merged, read, out, klmon=klmon, default_wall_time=default_wall_time)
    out.mapping = {
        q: [c for c, _n in used[q].most_common()] for q in QUANTITY_MEANINGS if q in used
    }
    _say_kl(out, read)
    stored = {name for _s, name, _v in out.metrics}
    out.infos = _infos(out, table, read, stored, klmon=klmon)
    out.config = _config(table, klmon=klmon)
    return out


def build_frame(
    frame: Mapping[str, np.ndarray],
    nulls: Mapping[str, int],
    *,
    fmt: str,
    path: object,
    default_wall_time: float,
    user_map: dict[str, str | None] | None = None,
    step_column: str | None = None,
    row_offset: int = 0,
    producer: str | None = None,
    row_order: bool = False,
) -> Prepared | None:
    """``build`` for a clean table already in float64 columns (a reader's fast path), with
    numpy instead of a Python loop per row; the result holds ``step_frame`` and
    ``metric_columns``. ``nulls``: per column, how many of its NaN were missing cells (the
    others were NaN or infinite in the file, as the summary says).

    None when the table needs the row-by-row rules (the caller then builds it with
    ``build``): a klmon export, a step column with gaps, repeats or fractions, a row without
    any value, a column name too long or repeated once cleaned, or epoch as the step."""
    user_map = dict(user_map or {})
    names = [clean_text(str(c)) for c in frame]
    keys = set(names)
    if len(keys) != len(names) or any(len(n) > METRIC_NAME_MAX for n in names):
        return None
    values = dict(zip(names, frame.values(), strict=True))
    nulls = {clean_text(str(c)): n for c, n in nulls.items()}  # by the names as cleaned
    producer = producer or detect_producer(keys)
    if producer == "klmon":
        return None
    step_key, step_source = choose_step_column(
        RawTable(), keys, user_map, step_column, path, row_order=row_order
    )
    if step_key is None and not row_order and any(k in keys for k in LAST_RESORT_STEP_KEYS):
        return None  # whether epoch holds whole numbers: the row rules decide
    n = n_rows(values)
    out = Prepared(fmt=fmt, producer=producer, records_read=n)
    out.step_column, out.step_source = step_key, step_source
    if step_key is None:
        out.notes.append(_NO_STEP_NOTE)
        steps = np.arange(row_offset, row_offset + n, dtype=np.int64)
    else:
        raw = values.pop(step_key)
        if n and not (np.all(raw >= 0) and np.all(raw < 2**53) and np.all(raw == np.floor(raw))):
            return None
        steps = raw.astype(np.int64)
    finite = {c: np.isfinite(v) for c, v in values.items()}
    if n and (not finite or not np.logical_or.reduce(list(finite.values())).all()):
        return None  # a row without a value (or no value columns): the row rules report it
    order = np.argsort(steps, kind="stable")
    steps = steps[order]
    if n > 1 and not (steps[1:] > steps[:-1]).all():
        return None  # repeated steps: merged row by row
    non_finite = Counter(
        {c: int((~ok).sum()) - nulls.get(c, 0) for c, ok in finite.items() if (~ok).any()}
    )
    for c, v in values.items():
        values[c] = np.where(finite[c], v, np.nan)[order]
    out.counted = CountedNotes(non_finite=+non_finite)
    out.notes.extend(out.counted.notes())
    columns = set(values)
    check_map_columns(user_map, columns | keys - {step_key}, path)
    read = _read_columns(producer, columns, user_map)
    rows: dict[str, Any] = {"step": steps}
    used: dict[str, Counter[str]] = {}
    for quantity, cands in read.candidates.items():
        filled = np.zeros(n, dtype=bool)
        q = np.full(n, np.nan)
        for _prio, column in cands:
            v = values[column]
            take = ~filled & ~np.isnan(v)
            if is_int_quantity(quantity):
                take &= np.abs(v) < 2**31
                v = np.round(v)
            if take.any():
                q[take] = v[take]
                filled |= take
                used.setdefault(quantity, Counter())[column] += int(take.sum())
        if filled.any():
            rows[quantity] = q
    time_key = next((k for k in TIME_KEYS if k in read.names), None)
    wall = values[time_key] if time_key else np.full(n, np.nan)
    wall = np.where(wall > 1e11, wall / 1000.0, wall)
    rows["wall_time"] = np.where((wall > 1e8) & (wall < 1e10), wall, default_wall_time)
    quantities = [q for q in rows if q not in ("step", "wall_time")]
    rows["payload_hash"] = np.array(quantity_hashes({q: rows[q] for q in quantities}, n), object)
    out.step_frame = rows
    for column, v in values.items():
        m = read.meanings.get(column)
        present = ~np.isnan(v)
        if (m is None or m.keep_metric) and present.any():
            out.metric_columns[column] = (steps[present], v[present])
    out.mapping = {
        q: [c for c, _n in used[q].most_common()] for q in QUANTITY_MEANINGS if q in used
    }
    _say_kl(out, read)
    out.infos = _infos(out, RawTable(), read, set(out.metric_columns), klmon=False)
    return out


# 1. coerce values and merge rows by step


@dataclass
class _Coercer:
    """Turns a record's values into numbers (klmon's text columns into text), counting drops."""

    text_cols: set[str]
    names: dict[str, str] = field(default_factory=dict)  # source key -> a name any database stores
    counted: CountedNotes = field(default_factory=CountedNotes)

    def values(self, record: dict[str, Any], step_key: str | None) -> dict[str, Any]:
        """The record's values under storable names, without its step column."""
        values: dict[str, Any] = {}
        for k, v in record.items():
            if k == step_key:
                continue
            name = self.names.get(k)
            if name is None:
                name = self.names[k] = clean_text(k)
            if name in self.text_cols:
                values[name] = None if v is None or str(v).strip() == "" else str(v)
                continue
            try:
                values[name] = to_number(v)
            except NotNumeric:
                self.counted.non_numeric[name] += 1
                continue
            if values[name] is None and v is not None and str(v).strip():
                self.counted.non_finite[name] += 1  # NaN or +-inf: stored as missing, said
        return values


def _merge_by_step(
    table: RawTable, out: Prepared, step_key: str | None, row_offset: int, *, klmon: bool
) -> dict[int, dict[str, Any]]:
    """step -> its values, the later row winning; rows without a step or a value are problems."""
    merged: dict[int, dict[str, Any]] = {}
    coerce = _Coercer({"status", "reject_reason"} if klmon else set())
    unit = (
        "row"
        if out.fmt == "parquet"
        else "log_history entry"
        if out.fmt == "trainer_state"
        else "line"
    )
    for index, rec in enumerate(table.records):
        step = _step_of(rec, step_key, row_offset + index, unit, out.problems)
        if step is None:
            continue
        values = coerce.values(rec.values, step_key)
        if not any(v is not None for v in values.values()):
            what = "only missing values" if values else "no numeric values"
            shown = ", ".join(list(rec.values)[:5])
            out.problems.append(
                Problem(rec.line, f"a row of another kind ({what}; keys: {shown})", unit)
            )
            continue
        slot = merged.setdefault(step, {})
        if any(k in slot and slot[k] != v for k, v in values.items()):
            coerce.counted.repeated_rows += 1
        slot.update(values)
    out.counted = coerce.counted
    out.notes.extend(out.counted.notes())
    return merged


def _step_of(
    rec: RawRecord, step_key: str | None, position: int, unit: str, problems: list[Problem]
) -> int | None:
    """The record's step (its position when there is no step column); None: a problem said."""
    if step_key is None:
        return position
    raw = rec.values.get(step_key)
    if raw is None or raw == "":
        shown = ", ".join(list(rec.values)[:5])
        problems.append(
            Problem(rec.line, f"no {step_key!r} value (a row of another kind? keys: {shown})", unit)
        )
        return None
    try:
        return to_step(raw)
    except (ValueError, NotNumeric) as exc:
        problems.append(Problem(rec.line, f"bad step: {exc}", unit))
        return None


# 2. what each column means


@dataclass
class _Columns:
    """What each stored column means, and which columns may fill each klmon quantity."""

    names: set[str]
    meanings: dict[str, KeyMeaning | None]
    # quantity -> (priority, column) of the columns that may fill it, best first
    candidates: dict[str, list[tuple[int, str]]]


def too_long_names(names: Iterable[str], notes: list[str], what: str) -> set[str]:
    """The ``names`` too long for the database, said in ``notes`` (``what``: "columns",
    "keys"): their values are not stored."""
    too_long = sorted(n for n in names if len(n) > METRIC_NAME_MAX)
    if too_long:
        notes.append(
            f"{len(too_long)} {what} with names over {METRIC_NAME_MAX} characters not stored: "
            f"{too_long[0][:60]}..."
        )
    return set(too_long)


def _storable_columns(merged: dict[int, dict[str, Any]], notes: list[str]) -> set[str]:
    """The merged rows' columns; names too long for the database are dropped (and said)."""
    columns = {k for vals in merged.values() for k in vals}
    too_long = too_long_names(columns, notes, "columns")
    if too_long:
        columns -= too_long
        for vals in merged.values():
            for c in too_long:
                vals.pop(c, None)
    return columns


def _read_columns(producer: str, columns: set[str], user_map: dict[str, str | None]) -> _Columns:
    """Each column's meaning, from the producer's table and then ``--map``."""
    meanings: dict[str, KeyMeaning | None] = {c: lookup(producer, c) for c in columns}
    for column, quantity in user_map.items():
        meanings[column] = _mapped_meaning(column, quantity, meanings.get(column))
    candidates: dict[str, list[tuple[int, str]]] = {}
    for column, m in meanings.items():
        if m is not None and m.quantity is not None:
            candidates.setdefault(m.quantity, []).append((m.priority, column))
    for cands in candidates.values():
        cands.sort()
    return _Columns(columns, meanings, candidates)


def _mapped_meaning(column: str, quantity: str | None, base: KeyMeaning | None) -> KeyMeaning:
    """The meaning ``--map COLUMN=QUANTITY`` gives (``QUANTITY`` None: ``-``, a metric only)."""
    if quantity is None:
        return KeyMeaning(
            None,
            base.estimator if base else None,
            base.scale if base else None,
            f"--map {column}=-: kept only as a metric"
            + (f" ({base.description})" if base and base.description else ""),
        )
    q = QUANTITY_MEANINGS[quantity]
    return KeyMeaning(
        quantity,
        q.estimator,
        q.scale,
        f"mapped with --map {column}={quantity}: {q.description}",
        priority=-10,
    )


# 3. step rows and metrics


def _rows_and_metrics(
    merged: dict[int, dict[str, Any]],
    read: _Columns,
    out: Prepared,
    *,
    klmon: bool,
    default_wall_time: float,
) -> dict[str, Counter[str]]:
    """Fills out.steps and out.metrics; returns quantity -> how often each column filled it."""
    used: dict[str, Counter[str]] = {}
    time_key = next((k for k in TIME_KEYS if k in read.names), None) if not klmon else None
    for step in sorted(merged):
        vals = merged[step]
        row: dict[str, Any] = {"step": step}
        _fill_quantities(row, vals, read.candidates, used)
        extra: dict[str, Any] | Problem | None
        if klmon:
            extra = _klmon_step_columns(step, vals)
            if isinstance(extra, Problem):
                out.problems.append(extra)
                continue
        else:
            extra = {"wall_time": _wall_time(vals.get(time_key), default_wall_time)}
        if extra is not None:
            row.update(extra)
            if klmon:  # a status and a reason too: the JSON scheme
                row["payload_hash"] = payload_hash(row)
            out.steps.append(row)
        out.metrics.extend(_step_metrics(step, vals, read.meanings, klmon=klmon))
    if not klmon:  # numbers only: the columnar scheme, as ``build_frame`` gives
        for row, h in zip(out.steps, quantity_hashes_of_rows(out.steps, used), strict=True):
            row["payload_hash"] = h
    return used


def _fill_quantities(
    row: dict[str, Any],
    vals: dict[str, Any],
    candidates: dict[str, list[tuple[int, str]]],
    used: dict[str, Counter[str]],
) -> None:
    """Each quantity from the best of its columns with a value (counted in ``used``)."""
    for quantity, cands in candidates.items():
        for _prio, column in cands:
            v = vals.get(column)
            if v is not None:
                if is_int_quantity(quantity):
                    if abs(v) >= 2**31:
                        continue  # beyond the column's range: kept as a metric only
                    v = round(v)
                row[quantity] = v
                used.setdefault(quantity, Counter())[column] += 1
                break


def _klmon_step_columns(step: int, vals: dict[str, Any]) -> dict[str, Any] | Problem | None:
    """A klmon export's step-row columns (wall_time, status, ...).

    None: the step has no status, so no step row (its values are still metrics); a Problem:
    the step is skipped, metrics included.
    """
    status = vals.get("status")
    if status is None:
        return None
    if status not in STEP_STATUSES:
        return Problem(step, f"unknown status {status!r}", "step")
    if vals.get("wall_time") is None:
        return Problem(step, "a step row without wall_time", "step")
    columns = {
        "wall_time": vals["wall_time"],
        "status": status,
        "reject_reason": vals.get("reject_reason"),
    }
    if vals.get("ranks_seen") is not None:
        columns["ranks_seen"] = int(vals["ranks_seen"])
    return columns


def _step_metrics(
    step: int, vals: dict[str, Any], meanings: dict[str, KeyMeaning | None], *, klmon: bool
) -> list[tuple[int, str, float]]:
    """The step's values kept as extra metrics (a klmon export's without their prefix)."""
    metrics = []
    for column, v in vals.items():
        m = meanings.get(column)
        if v is None or (m is not None and not m.keep_metric):
            continue
        name = (
            column[len(METRIC_PREFIX) :] if klmon and column.startswith(METRIC_PREFIX) else column
        )
        metrics.append((step, name, v))
    return metrics


def _say_kl(out: Prepared, read: _Columns) -> None:
    """Sets out.kl_read from out.mapping, or out.kl_candidates when no column is read as KL."""
    for q in KL_QUANTITIES:
        for column in out.mapping.get(q, []):
            m = read.meanings[column]
            assert m is not None
            out.kl_read.append((column, q, m.estimator, UNITS.get(m.scale, m.scale or "")))
    if not out.kl_read:
        # a column a producer's table describes (old-vs-new, sampler-vs-trainer) is not one
        out.kl_candidates = sorted(
            c
            for c in read.names
            if _named_like_kl(c)
            and (read.meanings.get(c) is None or read.meanings[c] is GENERIC.get(base_key(c)))
        )


def _infos(
    out: Prepared, table: RawTable, read: _Columns, stored: set[str], *, klmon: bool
) -> list[MetricInfo]:
    """The meaning of each ``stored`` metric (a klmon export's own, else from the columns')."""
    if klmon:
        exported = table.config.get("klmon_export", {}).get("metric_info", [])
        return [MetricInfo(**i) for i in exported if i.get("name") in stored]
    source = out.producer if out.producer not in ("generic", "klmon") else out.fmt
    infos = []
    for column in sorted(stored):
        m = read.meanings.get(column)
        infos.append(
            MetricInfo(
                name=column,
                source=source,
                quantity=m.quantity if m else None,
                estimator=m.estimator if m else None,
                scale=m.scale if m else None,
                description=m.description if m else None,
            )
        )
    return infos


def _config(table: RawTable, *, klmon: bool) -> dict[str, Any]:
    """The run's config: a klmon export's own, else the reader's (without the export block)."""
    if klmon and "config" in table.config.get("klmon_export", {}):
        return dict(table.config["klmon_export"]["config"])
    return {k: v for k, v in table.config.items() if k != "klmon_export"}


def _named_like_kl(column: str) -> bool:
    """``kl``, ``kl_vs_ref``, ``objective/kl``, ``approx_kl``, ``KL``: not ``kl_coef``."""
    words = [w for w in re.split(r"[^a-z0-9]+", column.lower()) if w]
    return any(w in ("kl", "approxkl", "policykl") for w in words) and not any(
        w in ("coef", "coeff", "beta", "ctl", "target") for w in words
    )


def _wall_time(value: float | None, default: float) -> float:
    """A timestamp column in Unix seconds (or milliseconds), else the default."""
    if value is None:
        return default
    if value > 1e11:  # milliseconds
        value = value / 1000.0
    return value if 1e8 < value < 1e10 else default
