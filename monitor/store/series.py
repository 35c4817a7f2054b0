"""Chart reads that cost about the same for 1k and 10M steps.

A chart is at most a few hundred pixels of x, so the dashboard never needs more than about
one point per pixel. ``read_series`` returns a run's quantities over a step range as either

* the raw step rows, when the range holds few enough steps (``level`` 0), or
* buckets of ``2**level`` consecutive steps (``bucket = step >> level``) with the min, max and
  mean of every quantity, read from the stored rollup tables ``step_rollups`` and
  ``metric_rollups``; the level is the smallest one giving at most ``max_buckets`` buckets.

Min and max per bucket are kept, so a spike of one step in 10M is still drawn at full zoom
out (the max of the downsampled series is the true max).

Rollups are maintained lazily, on read, for *complete* buckets only: a bucket is complete once
the run has a step at least ``COMPLETE_LAG`` steps past its end (multi-rank steps can be
merged slightly out of order). The base level (8 steps) is computed from raw rows, every
higher level from the level below it, so keeping up costs a few rows per read and a first
read of an imported 1M-step run costs one pass over it. What follows the last complete bucket
of the chosen level (the "tail") is read as at most one complete bucket per lower level plus
fewer than ``2**BASE_LEVEL + COMPLETE_LAG`` raw rows: a read touches O(max_buckets + levels)
rows whatever the run length.

The mean of a level above the base is weighted by the buckets' row counts; it is exact unless
a quantity is missing on some rows of a bucket and present on others.

Rollups are a cache of the steps table: deleting them (or a run) is always safe. Writers
call :func:`invalidate_rollups` when they store a step at or below the rolled-up frontier (a
spool replayed late, a multi-rank step completed after its bucket was built): the buckets
from that step on are dropped and rebuilt by the next read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Connection, text

from monitor.errors import InvalidInput
from monitor.store import metric_blocks as blocks
from monitor.store._bulk import COPY_MIN_ROWS, insert_rows
from monitor.store._driver import fetch as _fetch
from monitor.store.database import Database
from monitor.store.tables import STEP_FLOAT_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

BASE_LEVEL = 3
MAX_LEVEL = 30
COMPLETE_LAG = 16
CHUNK_STEPS = 1 << 17  # steps aggregated per statement while catching up
DEFAULT_MAX_BUCKETS = 600
#: Largest step a range may name (JSON numbers are exact up to 2**53).
MAX_STEP = (1 << 53) - 1

__all__ = [
    "BASE_LEVEL",
    "DEFAULT_MAX_BUCKETS",
    "MAX_LEVEL",
    "Series",
    "choose_level",
    "read_histogram_columns",
    "read_metric_rows_after",
    "read_metric_series",
    "read_series",
    "read_step_rows_after",
    "refresh_metric_rollups",
    "refresh_rollups",
    "step_bounds",
]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """Where raw values come from and where their rollups go."""

    raw_table: str
    rollup_table: str
    key: tuple[str, ...]  # key columns in both tables besides step / (level, bucket)
    values: tuple[str, ...]  # raw value columns, in the order ``stats`` packs them
    wall: bool  # the raw table has wall_time
    # The lowest stored rollup level; the levels from BASE_LEVEL below it are computed from
    # the raw values at read time (a metric block holds 2**base_level steps).
    base_level: int = BASE_LEVEL
    # raw values are column blocks (``monitor/store/metric_blocks.py``), not rows
    blocks: bool = False

    def where(self) -> str:
        return " AND ".join(f"{k} = :{k}" for k in self.key)

    def min_step_sql(self, lo: str, hi: str) -> str:
        """The first raw step in [lo, hi] (SQL expressions); for blocks, the first step of
        the first block in that range (blocks are aligned on base buckets)."""
        if self.blocks:
            return (
                f"SELECT MIN(step_min) FROM {self.raw_table} WHERE {self.where()} "
                f"AND block >= ({lo}) / {1 << self.base_level} "
                f"AND block <= ({hi}) / {1 << self.base_level}"
            )
        return (
            f"SELECT MIN(step) FROM {self.raw_table} WHERE {self.where()} "
            f"AND step >= {lo} AND step <= {hi}"
        )

    def bound_sql(self, fn: str) -> str:
        """The last (``fn`` MAX) or first (MIN) raw step: one index lookup."""
        if self.blocks:
            edge, order = ("step_max", "DESC") if fn == "MAX" else ("step_min", "ASC")
            return (
                f"SELECT {edge} FROM {self.raw_table} WHERE {self.where()} "
                f"ORDER BY block {order} LIMIT 1"
            )
        return f"SELECT {fn}(step) FROM {self.raw_table} WHERE {self.where()}"


_ROLLUP_COLUMNS = ("bucket", "n", "step_min", "step_max", "wall_min", "wall_max", "stats")
_STAT_DTYPE = np.dtype("<f8")


_STEPS = _Source("steps", "step_rollups", ("run_id",), STEP_FLOAT_COLUMNS, True)
_METRICS = _Source(
    blocks.TABLE,
    "metric_rollups",
    ("run_id", "name"),
    ("value",),
    False,
    base_level=blocks.BLOCK_LEVEL,
    blocks=True,
)


def _key(run_id: int, name: str | None = None) -> dict[str, Any]:
    key: dict[str, Any] = {"run_id": int(run_id)}
    if name is not None:
        key["name"] = str(name)
    return key


# --------------------------------------------------------------------------- buckets


@dataclass
class _Buckets:
    """Consecutive buckets of one level, sorted by bucket; values are (m, k) arrays."""

    bucket: np.ndarray
    n: np.ndarray
    step_min: np.ndarray
    step_max: np.ndarray
    wall_min: np.ndarray
    wall_max: np.ndarray
    vmin: np.ndarray
    vmax: np.ndarray
    vavg: np.ndarray

    def __len__(self) -> int:
        return len(self.bucket)

    @classmethod
    def empty(cls, k: int) -> _Buckets:
        i, f = np.zeros(0, np.int64), np.zeros(0)
        m = np.zeros((0, k))
        return cls(i, i, i, i, f, f, m, m, m)

    @classmethod
    def from_arrays(cls, head: np.ndarray, stats: np.ndarray) -> _Buckets:
        """From ``head`` (m, 6): bucket, n, step_min, step_max, wall_min, wall_max, and
        ``stats`` (m, k, 3): min, max, mean of each quantity."""
        return cls(
            bucket=head[:, 0].astype(np.int64),
            n=head[:, 1].astype(np.int64),
            step_min=head[:, 2].astype(np.int64),
            step_max=head[:, 3].astype(np.int64),
            wall_min=head[:, 4],
            wall_max=head[:, 5],
            vmin=stats[:, :, 0],
            vmax=stats[:, :, 1],
            vavg=stats[:, :, 2],
        )

    def widen(self, filled: Sequence[int], k: int) -> _Buckets:
        """These buckets of the quantities ``filled`` as buckets of all ``k`` (NaN for the
        others): reductions run over the filled columns only."""
        stats = []
        for v in (self.vmin, self.vmax, self.vavg):
            wide = np.full((len(self), k), np.nan)
            wide[:, list(filled)] = v
            stats.append(wide)
        return _Buckets(*(getattr(self, f) for f in _BUCKET_FIELDS[:6]), *stats)

    def select(self, mask: np.ndarray) -> _Buckets:
        return _Buckets(*(getattr(self, f)[mask] for f in _BUCKET_FIELDS))

    @staticmethod
    def concat(parts: Sequence[_Buckets]) -> _Buckets:
        return _Buckets(*(np.concatenate([getattr(p, f) for p in parts]) for f in _BUCKET_FIELDS))


_BUCKET_FIELDS = (
    "bucket",
    "n",
    "step_min",
    "step_max",
    "wall_min",
    "wall_max",
    "vmin",
    "vmax",
    "vavg",
)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _nan_mean_reduceat(values: np.ndarray, weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    w = np.where(ok, weights, 0.0)
    s = np.add.reduceat(np.where(ok, values, 0.0) * w, starts, axis=0)
    c = np.add.reduceat(w, starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.where(c > 0, c, 1.0), np.nan)


def _aggregate_raw(steps: np.ndarray, wall: np.ndarray, values: np.ndarray, level: int) -> _Buckets:
    """Buckets of ``2**level`` steps from raw rows sorted by step (values: (n, k))."""
    if len(steps) == 0:
        return _Buckets.empty(values.shape[1])
    b = steps >> level
    starts = _group_starts(b)
    ends = np.r_[starts[1:], len(b)] - 1
    ones = np.ones((len(steps), 1))
    with np.errstate(invalid="ignore"):
        return _Buckets(
            bucket=b[starts],
            n=np.diff(np.r_[starts, len(b)]).astype(np.int64),
            step_min=steps[starts],
            step_max=steps[ends],
            wall_min=np.fmin.reduceat(wall, starts),
            wall_max=np.fmax.reduceat(wall, starts),
            vmin=np.fmin.reduceat(values, starts, axis=0),
            vmax=np.fmax.reduceat(values, starts, axis=0),
            vavg=_nan_mean_reduceat(values, ones, starts),
        )


def _aggregate_sql(
    conn: Connection,
    src: _Source,
    key: Mapping[str, Any],
    columns: Sequence[str],
    lo: int,
    hi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Base-level buckets of ``columns`` over the raw rows lo <= step <= hi, aggregated by
    the database (8x fewer values cross the driver than reading the rows): the head
    (m, 6) and the stats (m, len(columns), 3) of ``_Buckets.from_arrays``."""
    wall = "wall_time" if src.wall else "NULL"
    stats = [f"{fn}({v})" for v in columns for fn in ("MIN", "MAX", "AVG")]
    sql = (
        f"SELECT step >> {BASE_LEVEL}, COUNT(*), MIN(step), MAX(step), MIN({wall}), "
        f"MAX({wall}){''.join(', ' + s for s in stats)} FROM {src.raw_table} "
        f"WHERE {src.where()} AND step >= :lo AND step <= :hi "
        f"GROUP BY step >> {BASE_LEVEL} ORDER BY 1"
    )
    k = len(columns)
    arr = _floats(_fetch(conn, sql, {**key, "lo": int(lo), "hi": int(hi)}), 6 + 3 * k)
    return arr[:, :6], arr[:, 6:].reshape(len(arr), k, 3)


def _base_buckets(
    conn: Connection, src: _Source, key: Mapping[str, Any], lo: int, hi: int
) -> _Buckets:
    """Base-level buckets of lo <= step <= hi. PostgreSQL aggregates faster than it ships
    rows; SQLite's aggregates are slower than reading the rows and reducing them in numpy,
    and metric blocks are decoded in numpy on both.

    Only the quantities holding a value in the range are read or aggregated (a run fills a
    few of the ~30; one pass that counts them costs less than the NULLs fetched or the
    aggregates of empty columns); the others are NaN."""
    if src.blocks:
        steps, wall, vals = _read_raw(conn, src, key, src.values, lo, hi)
        return _aggregate_raw(steps, wall, vals, src.base_level)
    counts = _fetch(
        conn,
        f"SELECT {', '.join(f'COUNT({c})' for c in src.values)} FROM {src.raw_table} "
        f"WHERE {src.where()} AND step >= :lo AND step <= :hi",
        {**key, "lo": int(lo), "hi": int(hi)},
    )[0]
    filled = [i for i, c in enumerate(counts) if c]
    names = [src.values[i] for i in filled]
    if conn.dialect.name == "sqlite":
        steps, wall, some = _read_raw(conn, src, key, names, lo, hi)
        return _aggregate_raw(steps, wall, some, src.base_level).widen(filled, len(src.values))
    head, some_stats = _aggregate_sql(conn, src, key, names, lo, hi)
    if len(head) == 0:
        return _Buckets.empty(len(src.values))
    return _Buckets.from_arrays(head, some_stats).widen(filled, len(src.values))


def _combine(children: _Buckets) -> _Buckets:
    """Parent buckets (one level up) from sorted child buckets."""
    if len(children) == 0:
        return children
    p = children.bucket >> 1
    starts = _group_starts(p)
    with np.errstate(invalid="ignore"):
        return _Buckets(
            bucket=p[starts],
            n=np.add.reduceat(children.n, starts),
            step_min=np.minimum.reduceat(children.step_min, starts),
            step_max=np.maximum.reduceat(children.step_max, starts),
            wall_min=np.fmin.reduceat(children.wall_min, starts),
            wall_max=np.fmax.reduceat(children.wall_max, starts),
            vmin=np.fmin.reduceat(children.vmin, starts, axis=0),
            vmax=np.fmax.reduceat(children.vmax, starts, axis=0),
            vavg=_nan_mean_reduceat(children.vavg, children.n[:, None].astype(float), starts),
        )


def last_complete_bucket(max_step: int, level: int) -> int:
    """The last complete bucket of ``level`` (-1 if none) when the run's last step is max_step."""
    return ((max_step - COMPLETE_LAG + 1) >> level) - 1


# --------------------------------------------------------------------------- SQL helpers


def _floats(rows: Sequence[Sequence[Any]], ncols: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, ncols))
    return np.array(rows, dtype=float).reshape(len(rows), ncols)


def _read_raw(
    conn: Connection,
    src: _Source,
    key: Mapping[str, Any],
    columns: Sequence[str],
    lo: int,
    hi: int,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, wall, values[n, k]) of raw rows with lo <= step <= hi, sorted by step."""
    if src.blocks:
        steps, values = blocks.read_values(
            conn, int(key["run_id"]), str(key["name"]), int(lo), int(hi), limit
        )
        return steps, np.full(len(steps), np.nan), values[:, None]
    wall = "wall_time" if src.wall else "NULL"
    sql = (
        f"SELECT step, {wall}, {', '.join(columns)} FROM {src.raw_table} "
        f"WHERE {src.where()} AND step >= :lo AND step <= :hi ORDER BY step"
    )
    params: dict[str, Any] = {**key, "lo": int(lo), "hi": int(hi)}
    if limit is not None:
        sql += " LIMIT :lim"
        params["lim"] = int(limit)
    arr = _floats(_fetch(conn, sql, params), 2 + len(columns))
    return arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2:]


def _to_buckets(rows: Sequence[Sequence[Any]], k: int, pick: Sequence[int] | None) -> _Buckets:
    """Buckets from rows of _ROLLUP_COLUMNS; ``pick``: which packed quantities to keep."""
    if not rows:
        return _Buckets.empty(k if pick is None else len(pick))
    head = np.array([r[:6] for r in rows], dtype=float)
    blobs = [bytes(r[6]) for r in rows]
    width = 3 * k * _STAT_DTYPE.itemsize
    if all(len(b) == width for b in blobs):
        stats = np.frombuffer(b"".join(blobs), dtype=_STAT_DTYPE).reshape(len(rows), k, 3)
    else:  # blobs written before a quantity was appended: NaN for the newer ones
        stats = np.full((len(rows), k, 3), np.nan)
        for i, blob_bytes in enumerate(blobs):
            blob = np.frombuffer(blob_bytes, dtype=_STAT_DTYPE)
            m = min(len(blob) // 3, k)
            stats[i, :m] = blob[: 3 * m].reshape(m, 3)
    if pick is not None:
        stats = stats[:, list(pick)]
    return _Buckets.from_arrays(head, stats)


def _read_buckets(
    conn: Connection,
    src: _Source,
    key: Mapping[str, Any],
    level: int,
    b0: int,
    b1: int,
    pick: Sequence[int] | None = None,
) -> _Buckets:
    sql = (
        f"SELECT {', '.join(_ROLLUP_COLUMNS)} FROM {src.rollup_table} "
        f"WHERE {src.where()} AND level = :level AND bucket >= :b0 AND bucket <= :b1 "
        "ORDER BY bucket"
    )
    rows = _fetch(conn, sql, {**key, "level": level, "b0": int(b0), "b1": int(b1)})
    return _to_buckets(rows, len(src.values), pick)


def _read_bucket_list(
    conn: Connection,
    src: _Source,
    key: Mapping[str, Any],
    wanted: Sequence[tuple[int, int]],
    pick: Sequence[int] | None = None,
) -> list[tuple[int, _Buckets]]:
    """Specific (level, bucket) pairs, in the order asked (missing ones left out)."""
    if not wanted:
        return []
    # One indexed lookup per pair: SQLite does not turn an OR of them into index lookups.
    selects, params = [], dict(key)
    for i, (level, bucket) in enumerate(wanted):
        selects.append(
            f"SELECT level, {', '.join(_ROLLUP_COLUMNS)} FROM {src.rollup_table} "
            f"WHERE {src.where()} AND level = :l{i} AND bucket = :b{i}"
        )
        params[f"l{i}"], params[f"b{i}"] = level, int(bucket)
    rows = _fetch(conn, " UNION ALL ".join(selects), params)
    found = {(int(r[0]), int(r[1])): r[1:] for r in rows}
    out = []
    for level, bucket in wanted:
        r = found.get((level, int(bucket)))
        if r is not None:
            out.append((level, _to_buckets([r], len(src.values), pick)))
    return out


def _insert(conn: Connection, src: _Source, key: Mapping[str, Any], level: int, b: _Buckets) -> int:
    if len(b) == 0:
        return 0
    cols = [*src.key, "level", *_ROLLUP_COLUMNS]
    m = len(b)
    packed = np.ascontiguousarray(np.stack([b.vmin, b.vmax, b.vavg], axis=2), dtype=_STAT_DTYPE)
    width = packed.shape[1] * 3 * _STAT_DTYPE.itemsize
    raw = packed.tobytes()
    blobs = [raw[i * width : (i + 1) * width] for i in range(m)]
    keys = tuple(key[k] for k in src.key)
    rows = [
        (*keys, level, bk, n, s0, s1, _nan_none(w0), _nan_none(w1), blob)
        for bk, n, s0, s1, w0, w1, blob in zip(
            b.bucket.tolist(),
            b.n.tolist(),
            b.step_min.tolist(),
            b.step_max.tolist(),
            b.wall_min.tolist(),
            b.wall_max.tolist(),
            blobs,
            strict=True,
        )
    ]
    insert_rows(
        conn,
        src.rollup_table,
        cols,
        rows,
        key=(*src.key, "level", "bucket"),
        copy=m >= COPY_MIN_ROWS,
    )
    return m


def _nan_none(x: float) -> float | None:
    return None if x != x else x


# --------------------------------------------------------------------------- refresh


@dataclass
class _State:
    """Where a run's rollups stand, from one statement of index lookups."""

    max_step: int | None
    first_step: int | None
    done: dict[int, int]  # level -> last stored bucket
    next_unrolled: int | None  # first raw step after the last stored base bucket
    base: int = BASE_LEVEL  # the source's lowest stored level

    def needs_refresh(self) -> bool:
        if self.max_step is None:
            return False
        if self.next_unrolled is not None and (
            self.next_unrolled >> self.base
        ) <= last_complete_bucket(self.max_step, self.base):
            return True
        for level in range(self.base + 1, MAX_LEVEL + 1):
            child = self.done.get(level - 1)
            if child is None:
                break
            target = min(last_complete_bucket(self.max_step, level), child >> 1)
            if target > self.done.get(level, -1):
                return True
        return False


def _state(conn: Connection, src: _Source, key: Mapping[str, Any]) -> _State:
    """Max and min step, the last stored bucket of every level and the first raw step not
    yet in a base bucket: scalar subqueries, each an index lookup (a GROUP BY over the
    rollups would scan every row of the run)."""
    w, base = src.where(), src.base_level
    levels = list(range(base, MAX_LEVEL + 1))
    unrolled = (
        f"(COALESCE((SELECT MAX(bucket) FROM {src.rollup_table} WHERE {w} "
        f"AND level = {base}), -1) + 1) * {1 << base}"
    )
    subs = [
        f"({src.bound_sql('MAX')})",
        f"({src.bound_sql('MIN')})",
        f"({src.min_step_sql(unrolled, str(MAX_STEP))})",
    ]
    subs += [
        f"(SELECT MAX(bucket) FROM {src.rollup_table} WHERE {w} AND level = {lv})" for lv in levels
    ]
    row = _fetch(conn, f"SELECT {', '.join(subs)}", key)[0]
    as_int = [None if v is None else int(v) for v in row]
    done = {lv: b for lv, b in zip(levels, as_int[3:], strict=True) if b is not None}
    return _State(as_int[0], as_int[1], done, as_int[2], base)


@dataclass
class _RefreshResult:
    max_step: int | None
    done: dict[int, int] = field(default_factory=dict)  # level -> processed-through bucket
    written: int = 0


def _refresh(
    db: Database, src: _Source, key: Mapping[str, Any], state: _State | None = None
) -> _RefreshResult:
    k = len(src.values)
    if state is None:
        with db.begin() as conn:
            state = _state(conn, src, key)
    max_step, done = state.max_step, dict(state.done)
    if max_step is None:
        return _RefreshResult(None)
    result = _RefreshResult(max_step, done)
    base = src.base_level
    base_last = last_complete_bucket(max_step, base)
    first_pass = True
    while first_pass or done.get(base, -1) < base_last:
        first_pass = False
        with db.begin() as conn:
            # Base level from raw rows, one chunk of rows at a time.
            first = done.get(base, -1) + 1
            mem, mem_lo, mem_hi = _Buckets.empty(k), first, first - 1
            if first <= base_last:
                # One chunk of steps, starting at the next stored row (gaps are skipped).
                hi = ((base_last + 1) << base) - 1
                nxt = _fetch(
                    conn, src.min_step_sql(":lo", ":hi"), {**key, "lo": first << base, "hi": hi}
                )[0][0]
                through = base_last
                if nxt is not None:
                    lo = (int(nxt) >> base) << base
                    hi = min(hi, lo + CHUNK_STEPS - 1)
                    through = hi >> base
                    mem = _base_buckets(conn, src, key, lo, hi)
                    result.written += _insert(conn, src, key, base, mem)
                mem_lo, mem_hi = first, through
                done[base] = through
            covered = ((done.get(base, -1) + 1) << base) - 1
            # Each higher level from the one below: this chunk's buckets plus, for the first
            # parent, a child stored by an earlier read.
            for level in range(base + 1, MAX_LEVEL + 1):
                p_first = done.get(level, -1) + 1
                p_last = min(last_complete_bucket(max_step, level), ((covered + 1) >> level) - 1)
                if p_first > p_last:
                    mem, mem_lo, mem_hi = _Buckets.empty(k), p_first, p_first - 1
                    covered = ((done.get(level, -1) + 1) << level) - 1
                    continue
                c_lo, c_hi = 2 * p_first, 2 * p_last + 1
                parts = []
                db_hi = min(c_hi, mem_lo - 1) if mem_lo <= mem_hi else c_hi
                if c_lo <= db_hi:
                    parts.append(_read_buckets(conn, src, key, level - 1, c_lo, db_hi))
                if len(mem):
                    parts.append(
                        mem.select((mem.bucket >= max(c_lo, db_hi + 1)) & (mem.bucket <= c_hi))
                    )
                children = _Buckets.concat(parts) if parts else _Buckets.empty(k)
                parents = _combine(children)
                result.written += _insert(conn, src, key, level, parents)
                mem, mem_lo, mem_hi = parents, p_first, p_last
                done[level] = p_last
                covered = ((p_last + 1) << level) - 1
    result.done = done
    return result


def invalidate_rollups(
    conn: Connection,
    run_id: int,
    from_step: int,
    *,
    steps: bool = True,
    metric_names: Iterable[str] = (),
) -> int:
    """Drop a run's stored buckets that cover ``from_step`` or a later step, for the steps
    table (``steps``) and for the extra metrics ``metric_names``; returns the rows deleted.

    Writers call this in their transaction after storing a step at or below what is rolled
    up already (a late replay from the spool, a partial step of a multi-rank run completed
    after its bucket was built): the bucket would keep the old numbers. Dropping from that
    step on lowers each level's frontier, so the next read rebuilds exactly those buckets.
    An append past the frontier (the usual write) costs one index lookup and deletes nothing.
    """
    deleted = 0
    names = sorted(set(metric_names))
    for src, keys in ((_STEPS, [{}] if steps else []), (_METRICS, [{"name": n} for n in names])):
        if not keys:
            continue
        frontier = _fetch(
            conn,
            f"SELECT MAX(bucket) FROM {src.rollup_table} WHERE run_id = :run_id "
            f"AND level = {src.base_level}",
            {"run_id": run_id},
        )[0][0]
        if frontier is None or ((int(frontier) + 1) << src.base_level) <= from_step:
            continue
        levels = " OR ".join(
            f"(level = {lv} AND bucket >= {from_step >> lv})"
            for lv in range(src.base_level, MAX_LEVEL + 1)
        )
        for key in keys:
            deleted += conn.execute(
                text(f"DELETE FROM {src.rollup_table} WHERE {src.where()} AND ({levels})"),
                {"run_id": run_id, **key},
            ).rowcount
    return deleted


def refresh_rollups(db: Database, run_id: int) -> int:
    """Store the rollups of every complete bucket of a run's steps; returns buckets written.

    Reads call this themselves; an importer or a benchmark may call it to pay the one-time
    cost of a long run up front.
    """
    return _refresh(db, _STEPS, _key(run_id)).written


def refresh_metric_rollups(db: Database, run_id: int, name: str) -> int:
    """Like ``refresh_rollups`` for one extra metric of a run."""
    return _refresh(db, _METRICS, _key(run_id, name)).written


# --------------------------------------------------------------------------- reads


def choose_level(span: int, max_buckets: int = DEFAULT_MAX_BUCKETS) -> int:
    """0 (raw rows) when ``span`` steps fit in ``max_buckets`` points, else the smallest
    stored level with at most ``max_buckets`` buckets over the span (each drawn as two
    points, its min and max)."""
    if max_buckets < 1:
        raise InvalidInput(f"max_buckets must be >= 1, got {max_buckets}")
    if span <= max_buckets:
        return 0
    level = math.ceil(math.log2(span / max_buckets))
    return int(min(max(level, BASE_LEVEL), MAX_LEVEL))


@dataclass(frozen=True)
class Series:
    """A run's quantities over a step range, raw or bucketed.

    ``frame`` (and ``tail``) are float64 DataFrames with the columns ``step`` (first step of
    the bucket, or the step), ``step_end`` (last step the bucket covers), ``n`` (rows in it),
    ``wall_min``, ``wall_max`` and, per quantity ``q``, ``q`` (the mean), ``q__min`` and
    ``q__max``.
    For ``level`` > 0, ``frame`` holds every bucket from the first to the last complete one
    of the range, empty buckets as NaN rows (so x can be given as x0 + i * dx), and ``tail``
    what follows: lower-level buckets and raw rows, in step order. For ``level`` 0, ``frame``
    holds the raw rows and ``tail`` is empty. ``last_step`` is the last step included.
    """

    run_id: int
    columns: tuple[str, ...]
    level: int
    frame: pd.DataFrame
    tail: pd.DataFrame
    first_step: int | None
    last_step: int | None

    @property
    def bucket_size(self) -> int:
        return 1 << self.level if self.level else 1

    @property
    def empty(self) -> bool:
        return self.frame.empty and self.tail.empty

    def combined(self) -> pd.DataFrame:
        """frame and tail as one frame, without the empty buckets."""
        import pandas as pd  # on a read, as in ``_pandas_frame``

        parts = [f for f in (self.frame, self.tail) if not f.empty]
        if not parts:
            return self.frame
        out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return out[out["n"] > 0].reset_index(drop=True)


def _frame_columns(columns: Sequence[str]) -> list[str]:
    out = ["step", "step_end", "n", "wall_min", "wall_max"]
    for c in columns:
        out += [c, f"{c}__min", f"{c}__max"]
    return out


def _frame(
    step: np.ndarray,
    step_end: np.ndarray,
    n: np.ndarray,
    wall_min: np.ndarray,
    wall_max: np.ndarray,
    vavg: np.ndarray,
    vmin: np.ndarray,
    vmax: np.ndarray,
    columns: Sequence[str],
) -> np.ndarray:
    """The frame as one float64 block (steps are exact in float64 up to 2**53): a DataFrame
    from one 2-D array builds ~10x faster than from dozens of columns."""
    m, k = len(step), len(columns)
    arr = np.empty((m, 5 + 3 * k))
    arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4] = step, step_end, n, wall_min, wall_max
    arr[:, 5::3] = vavg
    arr[:, 6::3] = vmin
    arr[:, 7::3] = vmax
    return arr


def _df(arr: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    return _pandas_frame(arr, _frame_columns(columns))


def _pandas_frame(arr: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """A 2-D float block as a DataFrame of ``names``. pandas loads here, on a read: the write
    paths that load this module (``invalidate_rollups``) do without it."""
    import pandas as pd

    return pd.DataFrame(arr, columns=list(names), copy=False)


def _frame_from_buckets(b: _Buckets, columns: Sequence[str], level: int) -> np.ndarray:
    return _frame(
        b.bucket << level if level else b.step_min,
        ((b.bucket + 1) << level) - 1 if level else b.step_max,
        b.n,
        b.wall_min,
        b.wall_max,
        b.vavg,
        b.vmin,
        b.vmax,
        columns,
    )


def _frame_from_raw(
    steps: np.ndarray, wall: np.ndarray, vals: np.ndarray, columns: Sequence[str]
) -> np.ndarray:
    return _frame(steps, steps, np.ones(len(steps)), wall, wall, vals, vals, vals, columns)


def _dense(b: _Buckets, b0: int, b1: int, k: int) -> _Buckets:
    """Every bucket b0..b1, missing ones as empty (n 0, NaN values)."""
    m = b1 - b0 + 1
    if m <= 0:
        return _Buckets.empty(k)
    if len(b) == m:
        return b
    idx = (b.bucket - b0).astype(np.int64)
    out = _Buckets(
        bucket=np.arange(b0, b1 + 1, dtype=np.int64),
        n=np.zeros(m, np.int64),
        step_min=np.zeros(m, np.int64),
        step_max=np.zeros(m, np.int64),
        wall_min=np.full(m, np.nan),
        wall_max=np.full(m, np.nan),
        vmin=np.full((m, k), np.nan),
        vmax=np.full((m, k), np.nan),
        vavg=np.full((m, k), np.nan),
    )
    for f in ("n", "step_min", "step_max", "wall_min", "wall_max", "vmin", "vmax", "vavg"):
        getattr(out, f)[idx] = getattr(b, f)
    return out


def _check_columns(columns: Iterable[str]) -> tuple[str, ...]:
    cols = tuple(dict.fromkeys(columns))
    bad = sorted(set(cols) - set(STEP_FLOAT_COLUMNS))
    if bad:
        raise InvalidInput(f"{bad} are not step quantities (one of {STEP_FLOAT_COLUMNS})")
    if not cols:
        raise InvalidInput("no quantities asked for")
    return cols


def _check_range(start: int | None, end: int | None) -> None:
    for name, v in (("start", start), ("end", end)):
        if v is not None and not (0 <= int(v) <= MAX_STEP):
            raise InvalidInput(f"{name} step {v} is outside 0..{MAX_STEP}")
    if start is not None and end is not None and int(start) > int(end):
        raise InvalidInput(f"start step {start} is after end step {end}")


def step_bounds(db: Database, run_id: int) -> tuple[int | None, int | None]:
    """(first step, last step) of a run, or (None, None); two index lookups."""
    with db.begin() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT MIN(step) FROM steps WHERE run_id = :r), "
                "(SELECT MAX(step) FROM steps WHERE run_id = :r)"
            ),
            {"r": int(run_id)},
        ).one()
    return (None if row[0] is None else int(row[0]), None if row[1] is None else int(row[1]))


@dataclass(frozen=True)
class _SeriesRead:
    """What a chart read asks for: ``columns`` of ``src`` for ``key``, over [start, end],
    in at most about ``max_buckets`` buckets."""

    src: _Source
    key: Mapping[str, Any]
    columns: tuple[str, ...]
    start: int | None
    end: int | None
    max_buckets: int


def _read(db: Database, r: _SeriesRead) -> Series:
    _check_range(r.start, r.end)
    with db.begin() as conn:
        state = _state(conn, r.src, r.key)
        if not state.needs_refresh():
            return _read_in(conn, r, state)
    refreshed = _refresh(db, r.src, r.key, state)
    state = _State(refreshed.max_step, state.first_step, refreshed.done, None, state.base)
    with db.begin() as conn:
        return _read_in(conn, r, state)


def _read_in(conn: Connection, r: _SeriesRead, state: _State) -> Series:
    src, key, columns, start, end = r.src, r.key, r.columns, r.start, r.end
    run_id = int(key["run_id"])
    k = len(columns)
    pick = [src.values.index(c) for c in columns]
    empty = _df(
        _frame_from_raw(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, k)), columns), columns
    )
    if state.max_step is None or state.first_step is None:
        return Series(run_id, columns, 0, empty, empty, None, None)
    max_step, first_step, done = state.max_step, state.first_step, state.done
    lo = first_step if start is None else max(int(start), first_step)
    hi = max_step if end is None else min(int(end), max_step)
    if lo > hi:
        return Series(run_id, columns, 0, empty, empty, first_step, max_step)
    level = choose_level(hi - lo + 1, r.max_buckets)
    if level == 0:
        steps, wall, vals = _read_raw(conn, src, key, columns, lo, hi)
        frame = _df(_frame_from_raw(steps, wall, vals, columns), columns)
        return Series(run_id, columns, 0, frame, empty, first_step, hi)
    if level < src.base_level:
        return _read_below_base(conn, r, level, lo, hi, state)
    b0 = lo >> level
    b1 = min(hi >> level, done.get(level, -1))
    hist = _read_buckets(conn, src, key, level, b0, b1, pick)
    frame = _df(_frame_from_buckets(_dense(hist, b0, b1, k), columns, level), columns)
    # The tail: at most one complete bucket per lower level, then raw rows.
    pos = max((b1 + 1) << level, lo)
    wanted: list[tuple[int, int]] = []
    for lower in range(level - 1, src.base_level - 1, -1):
        size = 1 << lower
        while pos % size == 0 and pos + size - 1 <= hi and (pos >> lower) <= done.get(lower, -1):
            wanted.append((lower, pos >> lower))
            pos += size
    parts = [
        _frame_from_buckets(b, columns, lv)
        for lv, b in _read_bucket_list(conn, src, key, wanted, pick)
    ]
    if pos <= hi:
        steps, wall, vals = _read_raw(conn, src, key, columns, pos, hi)
        parts.append(_frame_from_raw(steps, wall, vals, columns))
    parts = [p for p in parts if len(p)]
    tail = _df(np.vstack(parts), columns) if parts else empty
    return Series(run_id, columns, level, frame, tail, first_step, hi)


def _read_below_base(
    conn: Connection, r: _SeriesRead, level: int, lo: int, hi: int, state: _State
) -> Series:
    """A read at a level below the source's stored rollups (metric blocks hold 128 steps, so
    8- to 64-step buckets are never stored): the buckets from the raw values, at most about
    ``2**level * max_buckets`` of them, then the raw values after the last complete one."""
    columns, k = r.columns, len(r.columns)
    assert state.max_step is not None
    b0 = lo >> level
    b1 = min(hi >> level, last_complete_bucket(state.max_step, level))
    split = max((b1 + 1) << level, b0 << level)
    buckets = _full_block_buckets(conn, r, level, b0, b1) if b1 >= b0 else None
    if buckets is None:
        steps, wall, vals = _read_raw(conn, r.src, r.key, columns, b0 << level, max(hi, split - 1))
        inside = steps < split
        buckets = _aggregate_raw(steps[inside], wall[inside], vals[inside], level)
        after = (steps >= max(split, lo)) & (steps <= hi)
        steps, wall, vals = steps[after], wall[after], vals[after]
    else:
        steps, wall, vals = _read_raw(conn, r.src, r.key, columns, max(split, lo), hi)
    frame = _df(_frame_from_buckets(_dense(buckets, b0, b1, k), columns, level), columns)
    tail = _df(_frame_from_raw(steps, wall, vals, columns), columns)
    return Series(int(r.key["run_id"]), columns, level, frame, tail, state.first_step, hi)


def _full_block_buckets(
    conn: Connection, r: _SeriesRead, level: int, b0: int, b1: int
) -> _Buckets | None:
    """Buckets b0..b1 of ``level`` when the metric blocks under them are all full: each block
    is split into equal buckets with a reshape, no step to decode (None otherwise)."""
    if not r.src.blocks:
        return None
    shift = blocks.BLOCK_LEVEL - level
    first = b0 >> shift
    dense = blocks.full_blocks(conn, int(r.key["run_id"]), str(r.key["name"]), first, b1 >> shift)
    if dense is None:
        return None
    start = b0 - (first << shift)
    v = dense.reshape(-1, 1 << level)[start : start + b1 - b0 + 1]
    bucket = np.arange(b0, b1 + 1, dtype=np.int64)
    ok = ~np.isnan(v)
    count = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.where(ok, v, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
        vmin, vmax = np.fmin.reduce(v, axis=1), np.fmax.reduce(v, axis=1)
    nan = np.full(len(bucket), np.nan)
    return _Buckets(
        bucket=bucket,
        n=np.full(len(bucket), 1 << level, dtype=np.int64),
        step_min=bucket << level,
        step_max=((bucket + 1) << level) - 1,
        wall_min=nan,
        wall_max=nan,
        vmin=vmin[:, None],
        vmax=vmax[:, None],
        vavg=mean[:, None],
    )


def read_series(
    db: Database,
    run_id: int,
    columns: Iterable[str],
    *,
    start: int | None = None,
    end: int | None = None,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> Series:
    """Step quantities of a run over [start, end] (default: all), raw or bucketed so that a
    chart gets at most ``2 * max_buckets`` points per quantity. See ``Series``."""
    cols = _check_columns(columns)
    return _read(db, _SeriesRead(_STEPS, _key(run_id), cols, start, end, max_buckets))


def read_metric_series(
    db: Database,
    run_id: int,
    name: str,
    *,
    start: int | None = None,
    end: int | None = None,
    max_buckets: int = DEFAULT_MAX_BUCKETS,
) -> Series:
    """One extra metric of a run like ``read_series``; its column is ``value``."""
    return _read(db, _SeriesRead(_METRICS, _key(run_id, name), ("value",), start, end, max_buckets))


class SeriesReads:
    """The chart reads of a ``PanelSource`` (``monitor.charts.panel``) on the database
    ``self.db``: the dashboard's data layer and the report's source both inherit them."""

    db: Database

    def series(
        self,
        run_id: int,
        columns: Sequence[str],
        *,
        start: int | None = None,
        end: int | None = None,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> Series:
        return read_series(self.db, run_id, columns, start=start, end=end, max_buckets=max_buckets)

    def metric_series(
        self,
        run_id: int,
        name: str,
        *,
        start: int | None = None,
        end: int | None = None,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> Series:
        return read_metric_series(
            self.db, run_id, name, start=start, end=end, max_buckets=max_buckets
        )


def read_step_rows_after(
    db: Database, run_id: int, after: int, columns: Iterable[str], *, limit: int = 20_000
) -> pd.DataFrame:
    """Raw step rows with step > after (for live updates), at most ``limit``: a float64
    frame with step, wall_time and the columns."""
    cols = _check_columns(columns)
    with db.begin() as conn:
        steps, wall, vals = _read_raw(
            conn, _STEPS, _key(run_id), cols, int(after) + 1, MAX_STEP, limit
        )
    arr = (
        np.column_stack([steps.astype(float), wall, vals])
        if len(steps)
        else np.zeros((0, 2 + len(cols)))
    )
    return _pandas_frame(arr, ["step", "wall_time", *cols])


def read_metric_rows_after(
    db: Database, run_id: int, name: str, after: int, *, limit: int = 20_000
) -> pd.DataFrame:
    """Raw rows of one extra metric with step > after: step, value (float64)."""
    with db.begin() as conn:
        steps, _, vals = _read_raw(
            conn, _METRICS, _key(run_id, name), ("value",), int(after) + 1, MAX_STEP, limit
        )
    arr = np.column_stack([steps.astype(float), vals]) if len(steps) else np.zeros((0, 2))
    return _pandas_frame(arr, ["step", "value"])


def read_histogram_columns(
    db: Database,
    run_id: int,
    *,
    start: int | None = None,
    end: int | None = None,
    max_columns: int = 400,
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, counts[n, bins]) of a run's token histograms, at most ``max_columns`` of them
    evenly spread over the range (every k-th stored histogram), for the heatmap."""
    _check_range(start, end)
    where, params = ["run_id = :r"], {"r": int(run_id)}
    if start is not None:
        where.append("step >= :lo")
        params["lo"] = int(start)
    if end is not None:
        where.append("step <= :hi")
        params["hi"] = int(end)
    cond = " AND ".join(where)
    with db.begin() as conn:
        count = int(
            conn.execute(
                text(f"SELECT COUNT(*) FROM token_histograms WHERE {cond}"), params
            ).scalar()
            or 0
        )
        if count == 0:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.int64)
        stride = max(1, math.ceil(count / max_columns))
        if stride == 1:
            sql = f"SELECT step, counts FROM token_histograms WHERE {cond} ORDER BY step"
        else:
            sql = (
                "SELECT h.step, h.counts FROM token_histograms h JOIN ("
                f"SELECT step, ROW_NUMBER() OVER (ORDER BY step) AS rn FROM token_histograms "
                f"WHERE {cond}) pick ON pick.step = h.step "
                "WHERE h.run_id = :r AND (pick.rn - 1) % :stride = 0 ORDER BY h.step"
            )
            params["stride"] = stride
        rows = _fetch(conn, sql, params)
    steps = np.array([int(r[0]) for r in rows], dtype=np.int64)
    counts = [_int_list_from_json(r[1]) for r in rows]
    width = max((len(c) for c in counts), default=0)
    out = np.zeros((len(counts), width), dtype=np.int64)
    for i, c in enumerate(counts):
        out[i, : len(c)] = c
    return steps, out


def _int_list_from_json(value: Any) -> list[int]:
    if isinstance(value, str):
        import json

        value = json.loads(value)
    return [int(v) for v in value]


# --------------------------------------------------------------------------- many runs

#: A run of at most this many steps gets a sparkline of its raw values (averaged in groups
#: down to ``2 * max_buckets`` points); a longer one, of its coarse buckets.
SPARK_RAW_SPAN = 16 * (1 << BASE_LEVEL)


def read_sparklines(
    db: Database, columns: Mapping[int, str], *, max_buckets: int = 12
) -> dict[int, np.ndarray]:
    """Sparkline values of many runs at once: run id -> float64 array, for ``columns`` (run
    id -> one step column); empty for a run without steps.

    A run of at most ``SPARK_RAW_SPAN`` steps gives its raw values, averaged in consecutive
    groups down to at most ``2 * max_buckets`` points. A longer one gives the mean of each
    complete bucket of the level that splits its steps into at most ``max_buckets``
    (``choose_level``), then its latest value: the steps after the last complete bucket make
    one point, the live edge. Statements: every run's first and last step and latest value
    (index lookups), then one per column and level for the buckets (the mean's 8 bytes of
    each stats blob) or the raw values; whatever the number of runs and their length. A run
    whose buckets of that level are behind has its rollups brought up to date first (the
    write a chart read would make), then is read again."""
    wanted = {int(r): _check_columns([c])[0] for r, c in columns.items()}
    if not wanted:
        return {}
    out = {r: np.empty(0) for r in wanted}
    behind = _read_sparklines(db, wanted, max_buckets, out, final=False)
    for rid in behind:
        refresh_rollups(db, rid)
    if behind:
        _read_sparklines(db, {r: wanted[r] for r in behind}, max_buckets, out, final=True)
    return out


def _read_sparklines(
    db: Database,
    wanted: Mapping[int, str],
    max_buckets: int,
    out: dict[int, np.ndarray],
    *,
    final: bool,
) -> list[int]:
    """Fill ``out`` for the runs of ``wanted``, but those whose buckets are behind (returned)
    unless ``final``."""
    by_column: dict[str, list[int]] = {}
    for rid, col in wanted.items():
        by_column.setdefault(col, []).append(rid)
    behind: list[int] = []
    with db.begin() as conn:
        for col, rids in by_column.items():
            ids = ", ".join(str(r) for r in sorted(rids))
            bounds = _fetch(
                conn,
                "SELECT r.id, (SELECT MIN(step) FROM steps WHERE run_id = r.id), "
                "(SELECT MAX(step) FROM steps WHERE run_id = r.id), "
                f"(SELECT {col} FROM steps WHERE run_id = r.id AND {col} IS NOT NULL "
                f"ORDER BY step DESC LIMIT 1) FROM runs r WHERE r.id IN ({ids})",
                {},
            )
            raw: list[int] = []
            by_level: dict[int, list[tuple[int, int, int, float | None]]] = {}
            for rid, lo, hi, latest in bounds:
                if lo is None:
                    continue
                if hi - lo + 1 <= SPARK_RAW_SPAN:
                    raw.append(int(rid))
                else:
                    level = choose_level(hi - lo + 1, max_buckets)
                    by_level.setdefault(level, []).append((int(rid), int(lo), int(hi), latest))
            if raw:
                out.update(_raw_sparklines(conn, col, raw, 2 * max_buckets))
            for level, runs in by_level.items():
                behind += _bucket_sparklines(conn, col, level, runs, out, final=final)
    return behind


def _raw_sparklines(
    conn: Connection, col: str, run_ids: Sequence[int], points: int
) -> dict[int, np.ndarray]:
    ids = ", ".join(str(r) for r in run_ids)
    rows = _fetch(
        conn, f"SELECT run_id, step, {col} FROM steps WHERE run_id IN ({ids}) ORDER BY 1, 2", {}
    )
    values: dict[int, list[float]] = {}
    for rid, _, v in rows:
        values.setdefault(int(rid), []).append(np.nan if v is None else float(v))
    return {rid: _group_means(np.array(v, dtype=float), points) for rid, v in values.items()}


def _group_means(v: np.ndarray, points: int) -> np.ndarray:
    """``v`` averaged in at most ``points`` consecutive groups (NaN where a group has none)."""
    if len(v) <= points:
        return v
    means = []
    for g in np.array_split(v, points):
        g = g[np.isfinite(g)]
        means.append(float(g.mean()) if len(g) else math.nan)
    return np.array(means)


def _bucket_sparklines(
    conn: Connection,
    col: str,
    level: int,
    runs: Sequence[tuple[int, int, int, float | None]],
    out: dict[int, np.ndarray],
    *,
    final: bool,
) -> list[int]:
    """The complete buckets of ``level`` and the latest value of ``runs`` (id, first step,
    last step, latest value) into ``out``; returns the runs whose buckets are behind, left
    out unless ``final``."""
    at = (3 * _STEPS.values.index(col) + 2) * _STAT_DTYPE.itemsize
    ids = ", ".join(str(r[0]) for r in runs)
    rows = _fetch(
        conn,
        f"SELECT run_id, bucket, n, substr(stats, {at + 1}, {_STAT_DTYPE.itemsize}) "
        f"FROM {_STEPS.rollup_table} WHERE level = {int(level)} AND run_id IN ({ids}) "
        "ORDER BY 1, 2",
        {},
    )
    means: dict[int, list[float]] = {}
    last_bucket: dict[int, int] = {}
    for rid, bucket, n, mean in rows:
        last_bucket[int(rid)] = int(bucket)
        if n:
            means.setdefault(int(rid), []).append(_decode_mean(mean))
    behind = []
    for rid, lo, hi, latest in runs:
        complete = last_complete_bucket(hi, level)
        if complete >= lo >> level and last_bucket.get(rid, -1) < complete:
            behind.append(rid)
            if not final:
                continue
        tail = [] if latest is None else [float(latest)]
        out[rid] = np.array(means.get(rid, []) + tail, dtype=float)
    return behind


def _decode_mean(blob: Any) -> float:
    """A bucket mean cut out of a stats blob; NaN when the blob was written before the
    column was appended (the cut is then short)."""
    raw = bytes(blob) if blob is not None else b""
    if len(raw) < _STAT_DTYPE.itemsize:
        return math.nan
    return float(np.frombuffer(raw, dtype=_STAT_DTYPE, count=1)[0])
