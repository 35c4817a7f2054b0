"""Which steps keep their drill-down samples as a run grows: every step near the live edge,
fewer further back, always the steps around alerts and the highest-KL steps.

The rule (``SampleRetention``, pure, in ``kept``): with ``last`` the run's latest sampled
step and ``d = last - step``,

- ``d < recent``: kept (the live edge: what the dashboard and a lagging alert engine read);
- further back, in bands that double in width (``recent * 2**(k-1) <= d < recent * 2**k``),
  every ``2**k``-th step is kept: about ``recent / 2`` steps per band, so a run of L steps
  keeps about ``recent * (1 + log2(L / recent) / 2)`` steps;
- always: ``around_alerts`` steps each side of every alert episode's start, fired and peak
  step (``alert_events``), and the ``top_steps`` steps whose samples have the largest
  ``|kl_seq|`` (what a post-mortem report shows first).

A step dropped once is never wanted again (a step kept at stride ``2**k`` is a multiple of
every smaller stride), so compacting often or rarely ends in the same set, and the global
top-KL steps are never dropped. Only ``samples`` rows are deleted: a step's summary row,
histogram and metrics stay.

Where it runs: the live writer compacts a run's samples in the write transaction each time
the run's latest sampled step crosses a multiple of ``recent // 4`` (``due``), so a long run
stays bounded as it trains; ``klmon db compact`` applies it to runs already stored.
Configured by ``monitor.init(sample_retention=...)`` or ``$KLMON_SAMPLE_RETENTION``
(``"recent=100,top=32,around=4"``, or ``"off"`` to keep every step's samples).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from monitor.errors import ConfigError, InvalidInput, StoreError
from monitor.store.database import Database
from monitor.store.engine import sqlite_file

ENV_RETENTION = "KLMON_SAMPLE_RETENTION"
_FIELDS = {"recent": "recent", "top": "top_steps", "around": "around_alerts"}
_DELETE_CHUNK = 500


@dataclass(frozen=True)
class SampleRetention:
    """How many steps keep their samples (see the module doc). ``enabled=False`` keeps all."""

    recent: int = 100
    top_steps: int = 32
    around_alerts: int = 4
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("recent", "top_steps", "around_alerts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(
                    f"sample retention {name} must be an integer >= 0, got {value!r}"
                )
        if self.recent < 1:
            raise InvalidInput("sample retention recent must be at least 1 step")

    @classmethod
    def parse(cls, text: str) -> SampleRetention:
        """``"recent=100,top=32,around=4"`` (any subset; the rest default), ``"on"`` or
        ``"off"``."""
        spec = text.strip().lower()
        if spec in ("off", "none", "keep-all"):
            return cls(enabled=False)
        if spec in ("", "on", "default"):
            return cls()
        values: dict[str, int] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            field = _FIELDS.get(key.strip())
            if not sep or field is None:
                raise ConfigError(
                    f"sample retention {part.strip()!r}: expected key=value with key one of "
                    f"{', '.join(_FIELDS)}, or 'off'"
                )
            try:
                values[field] = int(value)
            except ValueError:
                raise ConfigError(
                    f"sample retention {key.strip()}={value.strip()!r} is not an integer"
                ) from None
        try:
            return cls(**values)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_env(cls) -> SampleRetention:
        """The policy of ``$KLMON_SAMPLE_RETENTION`` (the default when unset)."""
        return cls.parse(os.environ.get(ENV_RETENTION, ""))

    @classmethod
    def coerce(
        cls, value: SampleRetention | Mapping[str, Any] | str | bool | None
    ) -> SampleRetention:
        """A policy from what ``monitor.init`` takes: a policy, its fields as a mapping (the
        spool header), a spec string, False (keep all), True or None (the environment's)."""
        if isinstance(value, SampleRetention):
            return value
        if value is None or value is True:
            return cls.from_env()
        if value is False:
            return cls(enabled=False)
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            return cls(**{k: v for k, v in value.items() if k in cls.__dataclass_fields__})
        raise InvalidInput(
            f"sample_retention must be a SampleRetention, a spec string or a bool, got {value!r}"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def every(self) -> int:
        """Live compaction runs each time the latest sampled step crosses a multiple of this."""
        return max(1, self.recent // 4)

    def due(self, previous_last: int | None, new_last: int) -> bool:
        """Whether the live edge moving from ``previous_last`` to ``new_last`` calls for a
        compaction."""
        if not self.enabled:
            return False
        if previous_last is None:
            return new_last >= self.recent
        return new_last // self.every > previous_last // self.every

    def kept(self, steps: np.ndarray, last: int, protected: Iterable[int] = ()) -> np.ndarray:
        """Boolean mask over ``steps``: which keep their samples when ``last`` is the live
        edge (``protected``: steps kept whatever their age)."""
        steps = np.asarray(steps, dtype=np.int64)
        if not self.enabled:
            return np.ones(steps.shape, dtype=bool)
        d = last - steps
        recent = d < self.recent
        band = np.floor(np.log2(np.maximum(d, self.recent) / self.recent)).astype(np.int64) + 1
        stride = np.left_shift(np.int64(1), np.minimum(band, 62))
        keep = recent | (steps % stride == 0)
        prot = np.fromiter(protected, dtype=np.int64)
        if prot.size:
            keep |= np.isin(steps, prot)
        return keep


@dataclass(frozen=True)
class CompactResult:
    """What compacting one run removed: sample rows, the steps that lost their samples, and
    the payload bytes those rows held (the space a VACUUM can give back)."""

    run_id: int
    steps_kept: int
    steps_removed: int
    rows_removed: int
    bytes_removed: int


def compact_run(
    conn: Connection,
    run_id: int,
    policy: SampleRetention,
    *,
    dry_run: bool = False,
) -> CompactResult:
    """Delete the samples of ``run_id`` that ``policy`` does not keep (inside the caller's
    transaction; ``dry_run`` only counts)."""
    return _compact(conn, run_id, policy, dry_run=dry_run, measure=True)


def _compact(
    conn: Connection, run_id: int, policy: SampleRetention, *, dry_run: bool, measure: bool
) -> CompactResult:
    """``compact_run``; ``measure=False`` (the live writer, which reports nothing) leaves
    out the count and size of what is deleted: a read of every dropped row's length."""
    # One scan of the run's sample rows: its sampled steps, each with its largest |KL|.
    per_step = conn.exec_driver_sql(
        _sql(
            conn,
            "SELECT step, MAX(ABS(kl_seq)) FROM samples WHERE run_id = ? GROUP BY step "
            "ORDER BY step",
        ),
        (run_id,),
    ).all()
    steps = np.array([r[0] for r in per_step], dtype=np.int64)
    if not policy.enabled or steps.size == 0:
        return CompactResult(run_id, int(steps.size), 0, 0, 0)
    largest = np.array([r[1] for r in per_step], dtype=np.float64)  # NULL (no KL): NaN
    protected = [
        *_top_steps(steps, largest, policy.top_steps),
        *_around_alerts(conn, run_id, policy),
    ]
    keep = policy.kept(steps, int(steps[-1]), protected)
    drop = steps[~keep].tolist()
    rows = size = 0
    for i in range(0, len(drop), _DELETE_CHUNK):
        chunk = drop[i : i + _DELETE_CHUNK]
        where = f"run_id = ? AND step IN ({', '.join('?' * len(chunk))})"
        if measure:
            n, b = conn.exec_driver_sql(
                _sql(
                    conn,
                    f"SELECT COUNT(*), SUM({_length(conn)}(payload)) FROM samples WHERE {where}",
                ),
                (run_id, *chunk),
            ).one()
            rows += int(n or 0)
            size += int(b or 0)
        if not dry_run:
            conn.exec_driver_sql(_sql(conn, f"DELETE FROM samples WHERE {where}"), (run_id, *chunk))
    return CompactResult(run_id, int(keep.sum()), len(drop), rows, size)


def compact_live(
    conn: Connection, run_id: int, policy: SampleRetention, new_steps: Iterable[int]
) -> None:
    """The live writer's hook, after it inserted samples at ``new_steps``: compact the run
    when its latest sampled step crossed a multiple of ``policy.every`` (``due``)."""
    new = list(new_steps)
    if not policy.enabled or not new:
        return
    lo, hi = min(new), max(new)
    previous = conn.exec_driver_sql(
        _sql(conn, "SELECT MAX(step) FROM samples WHERE run_id = ? AND step < ?"), (run_id, lo)
    ).scalar()
    if policy.due(None if previous is None else int(previous), hi):
        _compact(conn, run_id, policy, dry_run=False, measure=False)


def compact_samples(
    db: Database,
    policy: SampleRetention,
    *,
    run_ids: Iterable[int] | None = None,
    dry_run: bool = False,
) -> list[CompactResult]:
    """Apply ``policy`` to the stored samples of ``run_ids`` (default every run), one
    transaction per run; ``dry_run`` deletes nothing and reports what would go."""
    with db.begin() as conn:
        ids = (
            [int(r[0]) for r in conn.exec_driver_sql("SELECT id FROM runs ORDER BY id")]
            if run_ids is None
            else [int(r) for r in run_ids]
        )
    out = []
    for run_id in ids:
        with db.begin() as conn:
            out.append(compact_run(conn, run_id, policy, dry_run=dry_run))
    return out


def reclaim_space(db: Database, lock_timeout: float = 30.0) -> tuple[int, int]:
    """Give the space of deleted samples back to the operating system; the bytes on disk of
    what was rewritten, before and after. SQLite rebuilds the database file (``VACUUM``: for
    a moment it needs as much free disk again, and its writers wait), then empties its
    write-ahead log into it. PostgreSQL rewrites the samples table and its TOAST data
    (``VACUUM FULL``: readers and writers of the table wait; a live run's steps wait in its
    spool), and gives up after ``lock_timeout`` seconds if an open transaction holds the
    table. StoreError, with nothing rewritten, when the database stays busy or the user may
    not vacuum the table. Without this, both reuse the space for new rows: SQLite at once,
    PostgreSQL after autovacuum."""
    with db.translate_errors(), db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # VACUUM: no transaction
        if db.is_sqlite:
            path = sqlite_file(db.url)
            before = _files_size(path)
            with _busy_said("another connection writes"):
                conn.exec_driver_sql("VACUUM")
            # the rebuilt file sits in the write-ahead log until a checkpoint: do it now
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return before, _files_size(path)
        size = "SELECT pg_total_relation_size('samples')"
        may = "SELECT pg_has_role(relowner, 'MEMBER') FROM pg_class WHERE oid = 'samples'::regclass"
        if not conn.exec_driver_sql(may).scalar_one():
            raise StoreError(
                f"database {db.safe_url}: only the owner of the samples table (or a superuser) "
                "may rewrite it: run klmon db compact --vacuum as that role"
            )
        before = int(conn.exec_driver_sql(size).scalar_one())
        conn.exec_driver_sql(f"SET lock_timeout = {int(lock_timeout * 1000)}")
        try:
            with _busy_said(f"an open transaction held the samples table for {lock_timeout:g} s"):
                conn.exec_driver_sql("VACUUM FULL samples")
        finally:
            conn.exec_driver_sql("RESET lock_timeout")
        return before, int(conn.exec_driver_sql(size).scalar_one())


def _files_size(path: Path | None) -> int:
    """Bytes on disk of a SQLite database: its file and its write-ahead log."""
    if path is None:  # in memory
        return 0
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


@contextmanager
def _busy_said(why: str) -> Iterator[None]:
    """A database too busy for a VACUUM (SQLite's SQLITE_BUSY, PostgreSQL's lock timeout) is
    a StoreError that says so, not "unavailable"."""
    try:
        yield
    except OperationalError as exc:
        sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
        pg_code = getattr(exc.orig, "sqlstate", None)
        if (sqlite_code is not None and sqlite_code & 0xFF == 5) or pg_code == "55P03":
            raise StoreError(f"nothing rewritten: {why}; try again later") from exc
        raise


def _top_steps(steps: np.ndarray, size: np.ndarray, k: int) -> list[int]:
    """The ``k`` steps of largest |KL| (``size``; NaN, no KL, last), ties to the earlier."""
    if k <= 0:
        return []
    order = np.lexsort((steps, -np.nan_to_num(size, nan=-np.inf)))
    return steps[order[:k]].tolist()


def _around_alerts(conn: Connection, run_id: int, policy: SampleRetention) -> list[int]:
    """Steps within ``around_alerts`` of an alert episode's start, firing or peak."""
    marks = [
        int(v)
        for row in conn.exec_driver_sql(
            _sql(
                conn, "SELECT start_step, fired_step, peak_step FROM alert_events WHERE run_id = ?"
            ),
            (run_id,),
        )
        for v in row
        if v is not None
    ]
    if not marks:
        return []
    around = np.arange(-policy.around_alerts, policy.around_alerts + 1, dtype=np.int64)
    return (np.asarray(marks, dtype=np.int64)[:, None] + around).ravel().tolist()


def _sql(conn: Connection, sql: str) -> str:
    return sql if conn.dialect.name == "sqlite" else sql.replace("?", "%s")


def _length(conn: Connection) -> str:
    return "LENGTH" if conn.dialect.name == "sqlite" else "OCTET_LENGTH"


__all__ = [
    "ENV_RETENTION",
    "CompactResult",
    "SampleRetention",
    "compact_live",
    "compact_run",
    "compact_samples",
    "reclaim_space",
]
