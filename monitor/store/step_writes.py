"""Idempotent bulk writes of step rows and extra metrics: ``write_step_records`` for the
live client and ``klmon sync``, ``write_steps``/``write_metrics`` for importers and tests.
Both step writers go through one path (``_insert_new_steps``) with one conflict check; the
importers' ``write_step_frame`` takes it too, except for a batch whose steps are unique and
none stored (the check's own "all new" case), COPY'd from its columns.

``write_step_records`` writes a batch of step records of one run in ONE transaction: the step
rows (or, for a multi-rank run, the per-rank shards and the merged step), their samples, token
histogram and extra metrics. Everything or nothing, so a replay after a crash can trust what
it finds.

Idempotency: a step already stored with the same payload hash is a duplicate (a no-op); with a
different hash it is a conflict, counted and never overwritten (a row without a hash, on
either side, cannot be told apart: a duplicate; a stored hash of another scheme, the prefix
before ``:``, cannot be compared: the stored values decide). The only overwrite is a
'partial' step of a multi-rank run, re-merged when more of its ranks arrive.

Concurrency: the transaction starts by updating the run's ``last_seen_at``. That write takes
the run's row lock on PostgreSQL and the database write lock on SQLite (and makes pysqlite
begin the transaction there), so concurrent writers of one run are serialised and every read
below it sees their committed rows: two ranks finishing the same step cannot both believe
they were not last.

Counters: every transaction that adds or rewrites step rows also updates the run's counters
(``run_counters.count_written``: n_steps, last_step, the last step of each KL column), so that
listing runs never counts steps.

Speed: rows go through ``_bulk.insert_rows`` (executemany with tuples, or PostgreSQL binary
COPY for large batches of new rows).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Connection

from monitor.errors import InvalidInput, NotFound
from monitor.store import metric_blocks
from monitor.store._bulk import COPY_MIN_ROWS, copy_block, insert_rows, table_block
from monitor.store.database import Database
from monitor.store.domain import StepWriteResult
from monitor.store.drilldown import SAMPLE_COLUMNS, sample_rows
from monitor.store.ledger_rollups import invalidate_ledger_rollups
from monitor.store.locked_fk import fk_checks_held_by_lock
from monitor.store.metric_blocks import MetricWriteResult
from monitor.store.run_counters import count_inserted_columns, count_written
from monitor.store.sample_retention import SampleRetention, compact_live
from monitor.store.series import invalidate_rollups
from monitor.store.tables import (
    METRIC_NAME_MAX,
    STEP_COLUMNS,
    STEP_INT_COLUMNS,
    STEP_QUANTITIES,
)

__all__ = [
    "COPY_MIN_ROWS",
    "IngestResult",
    "MetricWriteResult",
    "StepRecord",
    "write_metric_columns",
    "write_metric_records",
    "write_metrics",
    "write_step_frame",
    "write_step_records",
    "write_steps",
]

_IN_CHUNK = 500
K = TypeVar("K", int, tuple[int, int])
_STEP_DEFAULTS: dict[str, Any] = {"status": "ok", "ranks_seen": 1}


@dataclass(slots=True)
class StepRecord:
    """One logged step of one rank, summarised, ready to store.

    ``values`` are the summary quantities in the order of ``STEP_QUANTITIES`` (single-rank
    runs); ``partials`` the mergeable statistics of ``monitor.divergence.partials`` (multi-rank
    runs). ``status`` is 'ok' or 'rejected' (then ``reject_reason`` says why)."""

    step: int
    wall_time: float
    payload_hash: str | None
    values: tuple[Any, ...] | None = None
    status: str = "ok"
    reject_reason: str | None = None
    rank: int = 0
    partials: dict[str, Any] | None = None
    hist: Sequence[int] | None = None
    samples: Sequence[dict[str, Any]] = ()
    metrics: Sequence[tuple[str, float | None]] = ()
    # Single rank: the stored part of the step's token ledger ({"ids", "counts", "sums":
    # lists; "pos", "neg": masses; "n": tokens}); multi-rank runs carry it in ``partials``.
    ledger: Mapping[str, Any] | None = None
    vocab: Sequence[Sequence[Any]] = ()  # [token_id, text] of ids new to this process


@dataclass
class IngestResult:
    """What a batch did. ``inserted``: new step rows (single rank) or new shards (multi-rank);
    ``duplicates``: exact replays; ``conflicts``: steps refused because a different payload is
    stored; ``partial``/``completed``: multi-rank steps left waiting / merged from all ranks."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    samples: int = 0
    metrics: int = 0

    def add(self, other: IngestResult) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.conflicts.extend(other.conflicts)
        self.partial.extend(other.partial)
        self.completed.extend(other.completed)
        self.samples += other.samples
        self.metrics += other.metrics


def write_step_records(
    db: Database,
    run_id: int,
    records: Sequence[StepRecord],
    *,
    world_size: int = 1,
    seen_at: float | None = None,
    use_copy: bool | None = None,
    retention: SampleRetention | None = None,
) -> IngestResult:
    """Store a batch of step records of one run in one transaction (see the module doc).

    ``seen_at`` moves the run's ``last_seen_at`` forward (never back); ``use_copy``: force or
    forbid PostgreSQL COPY (default: COPY from ``COPY_MIN_ROWS`` new rows); ``retention``:
    drop older samples of the run by that policy when due (``sample_retention.compact_live``),
    in the same transaction."""
    result = IngestResult()
    if not records:
        return result
    seen = seen_at if seen_at is not None else max(r.wall_time for r in records)
    with db.begin() as conn:
        _lock_run(db, conn, run_id, seen)
        if world_size <= 1:
            _write_single(db, conn, run_id, records, result, use_copy)
        else:
            _write_sharded(db, conn, run_id, records, world_size, result)
        insert_rows(
            conn,
            "token_vocab",
            ("run_id", "token_id", "text"),
            [(run_id, int(i), t) for r in records for i, t in r.vocab],
            key=("run_id", "token_id"),
        )
        if retention is not None and result.samples:
            compact_live(conn, run_id, retention, [r.step for r in records if r.samples])
    return result


def _lock_run(db: Database, conn: Connection, run_id: int, seen: float | None) -> None:
    """Take the run's write lock; ``seen`` (when given) moves last_seen_at forward."""
    ph = db.paramstyle
    if seen is None:
        cur = conn.exec_driver_sql(
            f"UPDATE runs SET last_seen_at = last_seen_at WHERE id = {ph}", (run_id,)
        )
    else:
        cur = conn.exec_driver_sql(
            f"UPDATE runs SET last_seen_at = CASE WHEN last_seen_at < {ph} THEN {ph} "
            f"ELSE last_seen_at END WHERE id = {ph}",
            (seen, seen, run_id),
        )
    if cur.rowcount == 0:
        raise NotFound(f"run {run_id} does not exist")


def _existing(
    db: Database,
    conn: Connection,
    table: str,
    columns: str,
    run_id: int,
    steps: Sequence[int],
) -> list[tuple[Any, ...]]:
    """Rows of ``table`` for these steps: one range scan when the steps are dense, else IN
    lists."""
    ph = db.paramstyle
    lo, hi = min(steps), max(steps)
    distinct = sorted(set(steps))
    if hi - lo + 1 <= 4 * len(distinct) + 64:
        return list(
            conn.exec_driver_sql(
                f"SELECT {columns} FROM {table} WHERE run_id = {ph} AND step >= {ph} "
                f"AND step <= {ph}",
                (run_id, lo, hi),
            )
        )
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(distinct), _IN_CHUNK):
        chunk = distinct[i : i + _IN_CHUNK]
        out.extend(
            conn.exec_driver_sql(
                f"SELECT {columns} FROM {table} WHERE run_id = {ph} "
                f"AND step IN ({', '.join([ph] * len(chunk))})",
                (run_id, *chunk),
            )
        )
    return out


# --- single-rank runs -----------------------------------------------------------------------


def _write_single(
    db: Database,
    conn: Connection,
    run_id: int,
    records: Sequence[StepRecord],
    result: IngestResult,
    use_copy: bool | None,
) -> None:
    empty = (None,) * len(STEP_QUANTITIES)
    # tuple + tuple, not a starred display: this runs once per row of the hot path
    rows = [
        (run_id, r.step, r.wall_time, r.status, r.reject_reason, 1, r.payload_hash)
        + (r.values if r.values is not None else empty)
        for r in records
    ]
    inserted, duplicates, conflicts = _insert_new_steps(db, conn, run_id, rows, use_copy)
    result.duplicates += duplicates
    result.conflicts.extend(conflicts)
    if not inserted:
        return
    new = [records[i] for i in inserted]
    result.inserted += len(new)
    hists = [(r.step, r.hist) for r in new if r.hist is not None]
    _upsert_histograms(db, conn, run_id, hists, update=False)
    _insert_ledgers(db, conn, run_id, [(r.step, r.ledger) for r in new if r.ledger is not None])
    result.samples += _insert_samples(db, conn, run_id, [(r.step, r.rank, r.samples) for r in new])
    result.metrics += _insert_metrics(conn, run_id, [(r.step, r.metrics) for r in new])


def _insert_new_steps(
    db: Database,
    conn: Connection,
    run_id: int,
    rows: Sequence[tuple[Any, ...]],
    use_copy: bool | None = None,
    columns: Sequence[str] = STEP_COLUMNS,
    stored: dict[int, str | None] | None = None,
) -> tuple[list[int], int, list[int]]:
    """Insert the rows (``columns`` order: by default all of STEP_COLUMNS; the others are
    left to their defaults) whose step is not stored yet, under the run's lock
    (``_lock_run``). Returns the indexes of the rows inserted, the number of
    duplicates and the conflicting steps: the one idempotency check of the step writers.

    SQLite needs no conflict clause (the lock's UPDATE holds the database write lock and the
    rows were checked under it); PostgreSQL keeps ``ON CONFLICT DO NOTHING``, or uses binary
    COPY for ``COPY_MIN_ROWS`` new rows and more (``use_copy`` forces or forbids it).
    ``stored``: the stored hashes of these steps (``_stored_hashes``), when already read."""
    at_step, at_hash = columns.index("step"), columns.index("payload_hash")
    steps = [int(r[at_step]) for r in rows]
    if stored is None:
        stored = _stored_hashes(db, conn, run_id, steps)
    hashes = [r[at_hash] for r in rows]
    if not stored and len(set(steps)) == len(steps):
        new, duplicates, conflicts = list(range(len(rows))), 0, []  # a new run's rows
    else:
        before = dict(stored)
        new, duplicates, conflicts = _split_new(zip(steps, hashes, strict=True), stored)
        replays = _same_stored_values(db, conn, run_id, rows, columns, before, conflicts)
        duplicates += len(replays)
        conflicts = [s for s in conflicts if s not in replays]
    if not new:
        return new, duplicates, conflicts
    fresh = rows if len(new) == len(rows) else [rows[i] for i in new]
    if db.is_sqlite:
        insert_rows(conn, "steps", columns, fresh)
    else:
        copy = len(fresh) >= COPY_MIN_ROWS if use_copy is None else use_copy
        key = () if copy else ("run_id", "step")
        insert_rows(conn, "steps", columns, fresh, key=key, copy=copy)
    invalidate_rollups(conn, run_id, min(steps) if fresh is rows else min(steps[i] for i in new))
    count_written(conn, db.paramstyle, run_id, fresh, columns=columns)
    return new, duplicates, conflicts


def _stored_hashes(
    db: Database, conn: Connection, run_id: int, steps: Sequence[int]
) -> dict[int, str | None]:
    """Step -> stored payload hash of those of ``steps`` that the run holds."""
    return {
        int(step): h
        for step, h in _existing(db, conn, "steps", "step, payload_hash", run_id, steps)
    }


def _split_new(
    items: Iterable[tuple[K, str | None]], stored: dict[K, str | None]
) -> tuple[list[int], int, list[K]]:
    """The conflict check: which (key, payload hash) items are new (their indexes), how many
    replay a stored row, and the keys stored with a different payload. A replay carries the
    same hash; a missing hash on either side cannot tell, so it counts as a replay. A key
    seen earlier in the batch counts as stored (``stored`` is updated)."""
    new: list[int] = []
    duplicates = 0
    conflicts: list[K] = []
    for i, (key, payload_hash) in enumerate(items):
        if key in stored:
            old = stored[key]
            if old == payload_hash or old is None or payload_hash is None:
                duplicates += 1
            else:
                conflicts.append(key)
            continue
        stored[key] = payload_hash
        new.append(i)
    return new, duplicates, conflicts


def _scheme(payload_hash: str | None) -> str:
    """The scheme of a payload hash: what comes before a ``:`` (none for the original ones,
    a SHA-256 or BLAKE2 hex digest; ``v2`` for ``importers.payload_hashes.quantity_hashes``)."""
    return payload_hash.partition(":")[0] if payload_hash and ":" in payload_hash else ""


def _same_stored_values(
    db: Database,
    conn: Connection,
    run_id: int,
    rows: Sequence[tuple[Any, ...]],
    columns: Sequence[str],
    stored: Mapping[int, str | None],
    conflicts: Sequence[int],
) -> set[int]:
    """The conflicting steps whose stored hash is of another scheme than the row's (two
    digests that cannot be compared: a step imported before its importer changed schemes)
    but whose stored payload, every column but the step and wall time, equals the row's:
    replays. A column the row leaves out counts as its default."""
    if not conflicts:
        return set()
    at_step, at_hash = columns.index("step"), columns.index("payload_hash")
    row_of = {int(r[at_step]): r for r in rows}
    steps = [
        s for s in conflicts if s in stored and _scheme(stored[s]) != _scheme(row_of[s][at_hash])
    ]
    if not steps:
        return set()
    payload = [c for c in STEP_COLUMNS if c not in ("run_id", "step", "wall_time", "payload_hash")]
    index = {c: columns.index(c) for c in payload if c in columns}
    same: set[int] = set()
    for step, *values in _existing(db, conn, "steps", ", ".join(["step", *payload]), run_id, steps):
        row = row_of[int(step)]
        wanted = [row[index[c]] if c in index else _STEP_DEFAULTS.get(c) for c in payload]
        if all(_same_value(a, b) for a, b in zip(values, wanted, strict=True)):
            same.add(int(step))
    return same


def _same_value(stored: Any, value: Any) -> bool:
    if stored is None or value is None:
        return stored is None and value is None
    if isinstance(value, str) or isinstance(stored, str):
        return str(stored) == str(value)
    return float(stored) == float(value)


def write_steps(db: Database, run_id: int, rows: Sequence[Mapping[str, Any]]) -> StepWriteResult:
    """Insert step rows for one run. Each row holds ``step``, ``wall_time`` and any of the
    quantity columns; ``payload_hash`` (optional) decides replay vs conflict. NaN/inf are
    stored as NULL. The run's ``last_seen_at`` is left alone."""
    if not rows:
        return StepWriteResult(0, 0)
    unknown = set().union(*(r.keys() for r in rows)) - set(STEP_COLUMNS)
    if unknown:
        raise InvalidInput(f"step rows have unknown columns: {sorted(unknown)}")
    tuples = []
    for r in rows:
        if r.get("step") is None or r.get("wall_time") is None:
            raise InvalidInput("every step row needs 'step' and 'wall_time'")
        tuples.append(
            tuple(
                run_id if c == "run_id" else _clean(r.get(c, _STEP_DEFAULTS.get(c)))
                for c in STEP_COLUMNS
            )
        )
    with db.begin() as conn:
        _lock_run(db, conn, run_id, None)
        inserted, duplicates, conflicts = _insert_new_steps(
            db, conn, run_id, tuples, use_copy=False
        )
    return StepWriteResult(len(inserted), duplicates, tuple(conflicts))


def write_step_frame(db: Database, run_id: int, frame: Mapping[str, Any]) -> StepWriteResult:
    """``write_steps`` for step rows as columns of one length, name -> array (``step``,
    ``wall_time`` and any of ``STEP_COLUMNS``; NaN or None is NULL; a DataFrame will do):
    the importers' bulk path, a column at a time instead of a dict per row. On PostgreSQL,
    rows of steps none of which is stored go by binary COPY built from the columns
    themselves (no Python tuple per row); the others take ``_insert_new_steps``, the one
    conflict check."""
    unknown = set(frame) - set(STEP_COLUMNS)
    if unknown:
        raise InvalidInput(f"step rows have unknown columns: {sorted(unknown)}")
    if "step" not in frame or "wall_time" not in frame:
        raise InvalidInput("every step row needs 'step' and 'wall_time'")
    names, values, present = _frame_columns(run_id, frame)
    steps = values[names.index("step")]
    n = len(steps)
    if n == 0:
        return StepWriteResult(0, 0)
    with db.begin() as conn:
        _lock_run(db, conn, run_id, None)
        stored = _stored_hashes(db, conn, run_id, steps.tolist())
        block = None
        if not db.is_sqlite and n >= COPY_MIN_ROWS and not stored and len(np.unique(steps)) == n:
            block = table_block("steps", names, values, present)  # None: rows one by one
        if block is not None:
            # the run's row lock, taken above, stands for the run_id key's per-row checks
            with fk_checks_held_by_lock(conn, "steps", "runs"):
                copy_block(conn, "steps", names, block)
            invalidate_rollups(conn, run_id, int(steps.min()))
            at = {c: i for i, c in enumerate(names)}
            wall = values[at["wall_time"]].astype(np.float64)  # a missing one is NaN already
            has_value = {c: _present(present[i], n) for c, i in at.items()}
            count_inserted_columns(conn, db.paramstyle, run_id, steps, wall, has_value)
            return StepWriteResult(n, 0, ())
        columns = [_as_list(v, p) for v, p in zip(values, present, strict=True)]
        rows = list(zip(*columns, strict=True))
        inserted, duplicates, conflicts = _insert_new_steps(
            db, conn, run_id, rows, columns=tuple(names), stored=stored
        )
    return StepWriteResult(len(inserted), duplicates, tuple(conflicts))


def _frame_columns(
    run_id: int, frame: Mapping[str, Any]
) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None]]:
    """The step columns a frame binds (``STEP_COLUMNS`` order; a column it lacks whose
    default is NULL is left out), each as an array and which rows have a value (None: all).
    Integer columns hold int64 (NaN: NULL); text columns str objects (None or NaN: NULL)."""
    n = len(frame["step"])
    uneven = sorted(c for c in STEP_COLUMNS if c in frame and len(frame[c]) != n)
    if uneven:
        raise InvalidInput(f"step columns {uneven} are not as long as 'step' ({n} rows)")
    names: list[str] = []
    values: list[np.ndarray] = []
    present: list[np.ndarray | None] = []
    for c in STEP_COLUMNS:
        mask: np.ndarray | None = None
        if c == "run_id":
            array = np.full(n, run_id, dtype=np.int64)
        elif c not in frame:
            default = _STEP_DEFAULTS.get(c)
            if default is None and c != "payload_hash":
                continue  # NULL: the column's default, not bound on every row
            array = np.full(n, default, dtype=object if isinstance(default, str | None) else None)
            if default is None:
                mask = np.zeros(n, dtype=bool)
        else:
            array = np.asarray(frame[c])
            if array.dtype.kind == "f":
                missing = np.isnan(array)
                if c in STEP_INT_COLUMNS or c == "step":
                    array = np.where(missing, 0, array).astype(np.int64)
                mask = ~missing if missing.any() else None
            elif array.dtype == object:
                mask = np.fromiter(map(_has_value, array), bool, n)
                mask = None if mask.all() else mask
        names.append(c)
        values.append(array)
        present.append(mask)
    return names, values, present


def _has_value(v: Any) -> bool:
    """False for None, NaN and pandas' NA (whose comparison is neither true nor false)."""
    try:
        return v is not None and bool(v == v)
    except TypeError:
        return False


def _present(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if mask is None else mask


def _as_list(array: np.ndarray, mask: np.ndarray | None) -> list[Any]:
    """A column's values as Python objects, None where ``mask`` says NULL."""
    out = array.tolist()
    if mask is not None:
        for i in np.flatnonzero(~mask).tolist():
            out[i] = None
    return out


def write_metrics(
    db: Database, run_id: int, values: Iterable[tuple[int, str, float | None]]
) -> int:
    """Insert (step, name, value) extra metrics; existing (run, step, name) are left alone.
    Returns the values inserted."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for step, name, value in values:
        steps, vals = columns.setdefault(str(name), ([], []))
        steps.append(int(step))
        vals.append(_clean(value))
    if not columns:
        return 0
    return write_metric_columns(
        db, run_id, {n: (np.array(s, np.int64), _floats(v)) for n, (s, v) in columns.items()}
    ).inserted


def write_metric_columns(
    db: Database, run_id: int, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> MetricWriteResult:
    """Insert extra metrics as arrays, ``name -> (steps, values)`` (NaN: no value): the bulk
    path of importers. A value already stored is kept: the same number is counted as a
    replay, another as a conflict (``MetricWriteResult``)."""
    for name in columns:
        if not name or len(name) > METRIC_NAME_MAX:
            raise InvalidInput(
                f"metric name {name[:40]!r}: must be 1 to {METRIC_NAME_MAX} characters"
            )
    with db.begin() as conn:
        _lock_run(db, conn, run_id, None)
        return _store_metrics(conn, run_id, columns)


def _floats(values: Sequence[Any]) -> np.ndarray:
    """Cleaned metric values (floats or None) as float64, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _clean(value: Any) -> Any:
    """NaN/inf become NULL: they mean "no data" and PostgreSQL would store them verbatim."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        return _clean(value.item())
    return value


def _insert_samples(
    db: Database,
    conn: Connection,
    run_id: int,
    groups: Sequence[tuple[int, int, Sequence[dict[str, Any]]]],
) -> int:
    rows = sample_rows(run_id, groups)
    insert_rows(conn, "samples", SAMPLE_COLUMNS, rows)
    return len(rows)


def _insert_metrics(
    conn: Connection,
    run_id: int,
    groups: Sequence[tuple[int, Sequence[tuple[str, float | None]]]],
) -> int:
    """Store the (step, [(name, value)]) groups of records, under the run's lock."""
    columns: dict[str, tuple[list[int], list[Any]]] = {}
    for step, ms in groups:
        for name, value in ms:
            steps, vals = columns.setdefault(str(name), ([], []))
            steps.append(int(step))
            vals.append(_clean(value))
    arrays = {n: (np.array(s, np.int64), _floats(v)) for n, (s, v) in columns.items()}
    return _store_metrics(conn, run_id, arrays).inserted


def _store_metrics(
    conn: Connection, run_id: int, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> MetricWriteResult:
    """The one metric write (``metric_blocks.write``), then the rollups of what is new."""
    result = metric_blocks.write(conn, run_id, columns)
    if result.first_new:
        invalidate_rollups(
            conn,
            run_id,
            min(result.first_new.values()),
            steps=False,
            metric_names=result.first_new,
        )
    return result


def write_metric_records(
    db: Database,
    run_id: int,
    groups: Sequence[tuple[int, Sequence[tuple[str, float | None]]]],
    *,
    seen_at: float | None = None,
) -> int:
    """Extra metrics logged without a step summary; existing (run, step, name) are kept."""
    if not groups:
        return 0
    with db.begin() as conn:
        _lock_run(db, conn, run_id, seen_at)
        return _insert_metrics(conn, run_id, groups)


def _upsert_histograms(
    db: Database,
    conn: Connection,
    run_id: int,
    hists: Sequence[tuple[int, Sequence[int]]],
    *,
    update: bool,
) -> None:
    if not hists:
        return
    ph = db.paramstyle
    action = "DO UPDATE SET counts = excluded.counts" if update else "DO NOTHING"
    conn.exec_driver_sql(
        f"INSERT INTO token_histograms (run_id, step, counts) VALUES ({ph}, {ph}, {ph}) "
        f"ON CONFLICT (run_id, step) {action}",
        [(run_id, step, json.dumps([int(c) for c in counts])) for step, counts in hists],
    )


# --- multi-rank runs ------------------------------------------------------------------------


def _write_sharded(
    db: Database,
    conn: Connection,
    run_id: int,
    records: Sequence[StepRecord],
    world_size: int,
    result: IngestResult,
) -> None:
    ph = db.paramstyle
    steps = [r.step for r in records]
    stored = {
        (int(step), int(rank)): h
        for step, rank, h in _existing(
            db, conn, "step_shards", "step, rank, payload_hash", run_id, steps
        )
    }
    fresh, duplicates, conflicts = _split_new(
        [((r.step, r.rank), r.payload_hash) for r in records], stored
    )
    result.duplicates += duplicates
    result.conflicts.extend(step for step, _ in conflicts)
    if not fresh:
        return
    new = [records[i] for i in fresh]
    insert_rows(
        conn,
        "step_shards",
        ("run_id", "step", "rank", "wall_time", "payload_hash", "partials"),
        [
            (
                run_id,
                r.step,
                r.rank,
                r.wall_time,
                r.payload_hash,
                json.dumps(_shard_partials(r), default=_json_default),
            )
            for r in new
        ],
        key=("run_id", "step", "rank"),
    )
    result.inserted += len(new)
    result.samples += _insert_samples(db, conn, run_id, [(r.step, r.rank, r.samples) for r in new])
    result.metrics += _insert_metrics(
        conn, run_id, [(r.step, r.metrics) for r in new if r.rank == 0]
    )

    affected = sorted({r.step for r in new})
    shards: dict[int, list[tuple[int, float, str | None, Any]]] = {s: [] for s in affected}
    for step, rank, wall, h, partials in _existing(
        db, conn, "step_shards", "step, rank, wall_time, payload_hash, partials", run_id, affected
    ):
        if int(step) in shards:
            shards[int(step)].append((int(rank), float(wall), h, _load_json(partials)))
    current = {
        int(step): (status, ranks_seen)
        for step, status, ranks_seen in _existing(
            db, conn, "steps", "step, status, ranks_seen", run_id, affected
        )
    }
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    rewritten: list[tuple[Any, ...]] = []
    hists: list[tuple[int, Sequence[int]]] = []
    ledgers: list[tuple[int, Mapping[str, Any]]] = []
    for step in affected:
        got = sorted(shards[step])
        row, hist, ledger = _merged_row(run_id, step, got, world_size)
        if hist is not None:
            hists.append((step, hist))
        if ledger is not None:
            ledgers.append((step, ledger))
        if row[3] == "partial":
            result.partial.append(step)
        elif row[3] == "ok":
            result.completed.append(step)
        if step not in current:
            inserts.append(row)
        elif current[step][0] == "partial" or int(current[step][1] or 0) < len(got):
            # A partial step is the one stored row we may overwrite: more ranks arrived.
            updates.append((*row[2:], run_id, step))
            rewritten.append(row)
    insert_rows(conn, "steps", STEP_COLUMNS, inserts, key=("run_id", "step"))
    if updates:
        sets = ", ".join(f"{c} = {ph}" for c in STEP_COLUMNS[2:])
        conn.exec_driver_sql(
            f"UPDATE steps SET {sets} WHERE run_id = {ph} AND step = {ph}", updates
        )
    if inserts or updates:  # rows[1] and updates[-1] are the step
        invalidate_rollups(conn, run_id, min([r[1] for r in inserts] + [u[-1] for u in updates]))
        count_written(conn, ph, run_id, inserts, rewritten)
    _upsert_histograms(db, conn, run_id, hists, update=True)
    _insert_ledgers(db, conn, run_id, ledgers, replace=True)


def _insert_ledgers(
    db: Database,
    conn: Connection,
    run_id: int,
    ledgers: Sequence[tuple[int, Mapping[str, Any]]],
    replace: bool = False,
) -> None:
    """The ledger rows and masses of steps; ``replace``: drop what a step stored before (a
    multi-rank step re-merged when more ranks arrived)."""
    if not ledgers:
        return
    ph = db.paramstyle
    invalidate_ledger_rollups(conn, run_id, min(step for step, _ in ledgers))
    if replace:
        keys = [(run_id, step) for step, _ in ledgers]
        for table in ("token_ledger", "token_ledger_steps"):
            conn.exec_driver_sql(f"DELETE FROM {table} WHERE run_id = {ph} AND step = {ph}", keys)
    rows = [
        (run_id, step, int(i), int(c), float(s))
        for step, d in ledgers
        for i, c, s in zip(d["ids"], d["counts"], d["sums"], strict=True)
    ]
    insert_rows(conn, "token_ledger", ("run_id", "step", "token_id", "count", "lr_sum"), rows)
    insert_rows(
        conn,
        "token_ledger_steps",
        ("run_id", "step", "n_tokens", "pos_mass", "neg_mass"),
        [(run_id, step, int(d["n"]), float(d["pos"]), float(d["neg"])) for step, d in ledgers],
    )


def write_imported_ledgers(
    db: Database,
    run_id: int,
    ledgers: Sequence[tuple[int, Mapping[str, Any]]],
    texts: Sequence[str],
) -> int:
    """Store the token ledgers of imported steps whose ids are positions in ``texts`` (token
    strings of a log): each string becomes the run's id for that text (the smallest stored
    one), or a new id past the run's largest; only the strings of stored rows enter
    ``token_vocab``. A step that has a ledger already keeps it (a re-import changes
    nothing). Returns the steps whose ledger was stored."""
    if not ledgers:
        return 0
    used = sorted({int(i) for _, d in ledgers for i in d["ids"]})
    with db.begin() as conn:
        _lock_run(db, conn, run_id, None)
        known: dict[str, int] = {}
        top = -1
        for tid, text_ in conn.exec_driver_sql(
            f"SELECT token_id, text FROM token_vocab WHERE run_id = {int(run_id)} "
            "ORDER BY token_id DESC"
        ):
            top = max(top, int(tid))
            if text_ is not None:
                known[str(text_)] = int(tid)  # descending: the smallest id wins
        run_ids: dict[int, int] = {}
        new_vocab = []
        for local in used:
            text_ = texts[local]
            if text_ not in known:
                top += 1
                known[text_] = top
                new_vocab.append((run_id, top, text_))
            run_ids[local] = known[text_]
        stored = {
            int(s)
            for (s,) in conn.exec_driver_sql(
                f"SELECT step FROM token_ledger_steps WHERE run_id = {int(run_id)}"
            )
        }
        fresh = []
        for step, d in ledgers:
            if int(step) in stored:
                continue
            order = np.argsort([run_ids[int(i)] for i in d["ids"]], kind="stable")
            fresh.append(
                (
                    int(step),
                    {
                        **d,
                        "ids": [run_ids[int(d["ids"][j])] for j in order],
                        "counts": [d["counts"][j] for j in order],
                        "sums": [d["sums"][j] for j in order],
                    },
                )
            )
        insert_rows(conn, "token_vocab", ("run_id", "token_id", "text"), new_vocab)
        _insert_ledgers(db, conn, run_id, fresh)
    return len(fresh)


def _shard_partials(r: StepRecord) -> dict[str, Any]:
    if r.status == "rejected" or r.partials is None:
        return {"rejected": r.reject_reason or "rejected"}
    return r.partials


def _merged_row(
    run_id: int,
    step: int,
    shards: Sequence[tuple[int, float, str | None, Any]],
    world_size: int,
) -> tuple[tuple[Any, ...], Sequence[int] | None, dict[str, Any] | None]:
    """The steps row (STEP_COLUMNS order) merged from the shards present, its histogram and
    the stored part of its token ledger (cut to the ``ledger_k`` the ranks asked for)."""
    from monitor.divergence import LEDGER_K, merge_partials, top_rows

    rejected = [
        f"rank {rank}: {p.get('rejected')}"
        for rank, _, _, p in shards
        if isinstance(p, dict) and "rejected" in p
    ]
    good = [p for _, _, _, p in shards if not (isinstance(p, dict) and "rejected" in p)]
    values: tuple[Any, ...] = (None,) * len(STEP_QUANTITIES)
    hist = None
    ledger = None
    if good:
        try:
            summary = merge_partials(good)
        except InvalidInput as exc:  # e.g. rewards from some ranks and not from others
            rejected.append(f"the ranks' statistics do not merge: {exc}")
        else:
            d = summary.as_dict()
            values = tuple(_clean(d.get(c)) for c in STEP_QUANTITIES)
            token_hist = getattr(summary, "token_hist", None)
            if token_hist is not None:
                hist = [int(c) for c in np.asarray(token_hist).ravel()]
            if summary.ledger is not None:
                k = max(int(p.get("ledger_k") or LEDGER_K) for p in good)
                top = top_rows(summary.ledger, k)
                ledger = top.as_record(summary.n_tokens)
    if rejected:
        status, reason = "rejected", "; ".join(rejected)
    else:
        status, reason = ("ok" if len(shards) >= world_size else "partial"), None
    digest = hashlib.blake2b(digest_size=16)
    for rank, _, h, _ in shards:
        digest.update(f"{rank}:{h};".encode())
    wall = max(w for _, w, _, _ in shards)
    row = (run_id, step, wall, status, reason, len(shards), digest.hexdigest(), *values)
    return row, hist, ledger


def _load_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
