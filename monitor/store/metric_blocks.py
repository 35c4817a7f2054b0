"""Extra metrics stored as column blocks: the ``metric_blocks`` table.

One row holds one metric of one run over ``BLOCK_STEPS`` (128) consecutive, aligned steps
(``block = step >> BLOCK_LEVEL``): a bitmap of the steps that have a value (``mask``, 16 bytes,
little-endian bit order) and their values packed in step order (``vals``, little-endian
float64; NaN is a stored NULL, the "no value" a trainer may log). A long row per
(run, step, name) cost ~85 bytes a value with its index; a block costs ~8.5 (128 values, one
key, one index entry), and a chart reads 128x fewer rows.

Why 128 steps: a live writer appends a few steps at a time and rewrites the open block of each
metric it touches, so a block must stay small (1 kB of values); SQLite packs three such rows in
a 4 kB page and PostgreSQL keeps them inline (below its 2 kB TOAST threshold), while an import
writes 1/128 as many rows as values.

Writes are idempotent like the step rows: a value already stored with the same number (or
both NULL) is a replay, a different one a conflict, counted and never overwritten; only new
steps are added to a block. Writers hold the run's lock (``step_writes._lock_run``), so the
read-merge-rewrite of a block never races another writer of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection

from monitor.store._bulk import insert_rows
from monitor.store._driver import fetch

BLOCK_LEVEL = 7
BLOCK_STEPS = 1 << BLOCK_LEVEL
MASK_BYTES = BLOCK_STEPS // 8
TABLE = "metric_blocks"
COLUMNS: tuple[str, ...] = ("run_id", "name", "block", "n", "step_min", "step_max", "mask", "vals")
_VAL = np.dtype("<f8")
#: Relative difference under which a replayed value counts as the stored one (float text
#: round trips of other tools differ in the last bit).
SAME_TOLERANCE = 1e-12
# New blocks from which PostgreSQL gets them by binary COPY (a block is up to 128 values).
_COPY_MIN_BLOCKS = 256
# Metrics whose new steps all fall within this many blocks are looked up in one statement.
_SHARED_SPAN_BLOCKS = 8


@dataclass
class MetricWriteResult:
    """What a metric write did: values ``inserted``, ``duplicates`` (replays of stored values)
    and ``conflicts`` ((step, name) stored with another value, left as stored)."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    #: name -> the lowest step inserted (what the rollups must drop from)
    first_new: dict[str, int] = field(default_factory=dict)


def decode(
    rows: Sequence[Sequence[Any]], *, values: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, step, value) of every value of block rows ``(block, mask, vals)``, in row
    order then step order; NaN for NULL (``values`` False: the steps only, no values)."""
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    blocks = np.fromiter((int(r[0]) for r in rows), np.int64, len(rows))
    masks = np.frombuffer(b"".join(bytes(r[1]) for r in rows), np.uint8)
    if masks.all():  # every block full (a dense series): no bit to look at
        row = np.repeat(np.arange(len(rows)), BLOCK_STEPS)
        steps = ((blocks << BLOCK_LEVEL)[:, None] + np.arange(BLOCK_STEPS)).ravel()
        if not (masks == 0xFF).all():
            at = np.flatnonzero(np.unpackbits(masks, bitorder="little"))
            row, steps = row[at], steps[at]
    else:
        at = np.flatnonzero(np.unpackbits(masks, bitorder="little"))
        row = at >> BLOCK_LEVEL
        steps = (blocks[row] << BLOCK_LEVEL) + (at & (BLOCK_STEPS - 1))
    if not values:
        return row, steps, np.zeros(0)
    vals = np.frombuffer(b"".join(bytes(r[2]) for r in rows), _VAL).astype(np.float64)
    if len(vals) != len(steps):
        raise ValueError("a metric block's values do not match its step bitmap")
    return row, steps, vals


def encode(run_id: int, name: str, steps: np.ndarray, values: np.ndarray) -> list[tuple[Any, ...]]:
    """Block rows (``COLUMNS`` order) of one metric: ``steps`` sorted and unique."""
    if len(steps) == 0:
        return []
    blocks = steps >> BLOCK_LEVEL
    # np.concatenate, not np.r_: this runs for every metric of every live batch
    starts = np.flatnonzero(np.concatenate(([True], blocks[1:] != blocks[:-1])))
    ends = np.concatenate((starts[1:], [len(steps)]))
    bits = np.zeros((len(starts), BLOCK_STEPS), np.uint8)
    bits[np.repeat(np.arange(len(starts)), ends - starts), steps & (BLOCK_STEPS - 1)] = 1
    masks = np.packbits(bits, axis=1, bitorder="little").tobytes()
    raw = np.ascontiguousarray(values, dtype=_VAL).tobytes()
    w = _VAL.itemsize
    return [
        (
            run_id,
            name,
            b,
            e - s,
            s0,
            s1,
            masks[i * MASK_BYTES : (i + 1) * MASK_BYTES],
            raw[s * w : e * w],
        )
        for i, (b, s, e, s0, s1) in enumerate(
            zip(
                blocks[starts].tolist(),
                starts.tolist(),
                ends.tolist(),
                steps[starts].tolist(),
                steps[ends - 1].tolist(),
                strict=True,
            )
        )
    ]


def stored_metric_names(conn: Connection, run_id: int, limit: int = 10_000) -> list[str]:
    """The run's metric names, sorted: one index seek per name (a DISTINCT would visit every
    block of the run)."""
    names: list[str] = []
    sql = f"SELECT MIN(name) FROM {TABLE} WHERE run_id = :r"
    row = fetch(conn, sql, {"r": int(run_id)})
    while row and row[0][0] is not None and len(names) < limit:
        names.append(row[0][0])
        row = fetch(conn, sql + " AND name > :after", {"r": int(run_id), "after": names[-1]})
    return names


def full_blocks(conn: Connection, run_id: int, name: str, b0: int, b1: int) -> np.ndarray | None:
    """The values of blocks b0..b1 of one metric as a (blocks, 128) matrix when every one of
    them is stored and full (a dense series: no bitmap to decode), else None."""
    rows = fetch(
        conn,
        f"SELECT n, vals FROM {TABLE} WHERE run_id = :r AND name = :n "
        "AND block >= :b0 AND block <= :b1 ORDER BY block",
        {"r": int(run_id), "n": name, "b0": int(b0), "b1": int(b1)},
    )
    if len(rows) != b1 - b0 + 1 or any(r[0] != BLOCK_STEPS for r in rows):
        return None
    values = np.frombuffer(b"".join(bytes(r[1]) for r in rows), _VAL).astype(np.float64)
    return values.reshape(len(rows), BLOCK_STEPS)


def read_values(
    conn: Connection,
    run_id: int,
    name: str,
    lo: int,
    hi: int,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric with lo <= step <= hi, sorted; at most ``limit``."""
    b0, b1 = lo >> BLOCK_LEVEL, hi >> BLOCK_LEVEL
    sql = (
        f"SELECT block, mask, vals FROM {TABLE} WHERE run_id = :run_id AND name = :name "
        "AND block >= :b0 AND block <= :b1 ORDER BY block"
    )
    params: dict[str, Any] = {"run_id": int(run_id), "name": name, "b1": int(b1)}
    if limit is None:
        _, steps, values = decode(fetch(conn, sql, {**params, "b0": int(b0)}))
        keep = (steps >= lo) & (steps <= hi)
        return steps[keep], values[keep]
    # Blocks in rounds until ``limit`` values are in hand (a block holds 1 to 128 values).
    got_s: list[np.ndarray] = []
    got_v: list[np.ndarray] = []
    have, per = 0, max(4, limit // BLOCK_STEPS + 2)
    while have < limit and b0 <= b1:
        rows = fetch(conn, sql + " LIMIT :lim", {**params, "b0": int(b0), "lim": per})
        _, steps, values = decode(rows)
        keep = (steps >= lo) & (steps <= hi)
        got_s.append(steps[keep])
        got_v.append(values[keep])
        have += int(keep.sum())
        if len(rows) < per:
            break  # no block after these
        b0 = int(rows[-1][0]) + 1
    if not got_s:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(got_s)[:limit], np.concatenate(got_v)[:limit]


def write(
    conn: Connection,
    run_id: int,
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> MetricWriteResult:
    """Store metric values ``name -> (steps, values)`` (NaN: NULL) of one run, under its lock.

    A step repeated within ``steps`` keeps its first value. New values go into new blocks
    (binary COPY on PostgreSQL for large batches) or are merged into the stored block;
    stored values are never changed (see the module doc)."""
    result = MetricWriteResult()
    fresh: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    prepared: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (raw_steps, raw_values) in columns.items():
        steps_in = np.asarray(raw_steps, dtype=np.int64)
        if len(steps_in) == 0:
            continue
        values_in = np.asarray(raw_values, dtype=np.float64)
        if (steps_in[1:] > steps_in[:-1]).all():  # sorted and unique: a live batch
            prepared[name] = (steps_in, values_in)
            continue
        steps, first = np.unique(steps_in, return_index=True)
        prepared[name] = (steps, values_in[first])
        result.duplicates += len(steps_in) - len(steps)
    stored_rows = _stored_blocks(conn, run_id, prepared)
    for name, (steps, values) in prepared.items():
        stored = stored_rows.get(name, [])
        if stored:
            _, old_steps, old_values = decode(stored)
            at, hit = _find(old_steps, steps)
            if hit.any():
                _count_replays(name, steps[hit], values[hit], old_values[at[hit]], result)
            steps, values = steps[~hit], values[~hit]
            if len(steps) == 0:
                continue
            stored_blocks = np.fromiter((int(r[0]) for r in stored), np.int64, len(stored))
            touched = _find(stored_blocks, steps >> BLOCK_LEVEL)[1]
            if touched.any():
                old_blocks = old_steps >> BLOCK_LEVEL
                keep = _find(np.unique(steps[touched] >> BLOCK_LEVEL), old_blocks)[1]
                merged_s = np.concatenate([old_steps[keep], steps[touched]])
                merged_v = np.concatenate([old_values[keep], values[touched]])
                order = np.argsort(merged_s, kind="stable")
                for row in encode(run_id, name, merged_s[order], merged_v[order]):
                    updates.append((*row[3:], run_id, name, row[2]))
            fresh.extend(encode(run_id, name, steps[~touched], values[~touched]))
        else:
            fresh.extend(encode(run_id, name, steps, values))
        result.inserted += len(steps)
        result.first_new[name] = int(steps[0])
    if updates:
        ph = "?" if conn.dialect.name == "sqlite" else "%s"
        conn.exec_driver_sql(
            f"UPDATE {TABLE} SET n = {ph}, step_min = {ph}, step_max = {ph}, mask = {ph}, "
            f"vals = {ph} WHERE run_id = {ph} AND name = {ph} AND block = {ph}",
            updates,
        )
    insert_rows(conn, TABLE, COLUMNS, fresh, copy=len(fresh) >= _COPY_MIN_BLOCKS)
    return result


def _find(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where, found): the index of each of ``values`` in ``keys`` (sorted, unique) and
    whether it is there (``np.isin`` costs ~10x more on the few values of a live batch)."""
    at = np.searchsorted(keys, values)
    found = at < len(keys)
    found[found] = keys[at[found]] == values[found]
    return at, found


def _stored_blocks(
    conn: Connection, run_id: int, columns: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, list[tuple[Any, ...]]]:
    """The stored blocks that the new steps of each metric fall in, by name: one statement
    for every metric when their steps span a few blocks (a live batch: the same steps for
    ~30 metrics), else one per metric over its own range."""
    if not columns:
        return {}
    spans = {
        n: (int(s[0] >> BLOCK_LEVEL), int(s[-1] >> BLOCK_LEVEL)) for n, (s, _) in columns.items()
    }
    b0, b1 = min(lo for lo, _ in spans.values()), max(hi for _, hi in spans.values())
    out: dict[str, list[tuple[Any, ...]]] = {}
    select = f"SELECT block, mask, vals, name FROM {TABLE} WHERE run_id = :r "
    if b1 - b0 <= _SHARED_SPAN_BLOCKS:
        names = list(columns)
        for i in range(0, len(names), 500):
            chunk = {f"n{j}": n for j, n in enumerate(names[i : i + 500])}
            rows = fetch(
                conn,
                select + f"AND name IN ({', '.join(':' + k for k in chunk)}) "
                "AND block >= :b0 AND block <= :b1 ORDER BY name, block",
                {"r": int(run_id), "b0": b0, "b1": b1, **chunk},
            )
            for row in rows:
                out.setdefault(row[3], []).append(row)
        return out
    for name, (lo, hi) in spans.items():
        out[name] = fetch(
            conn,
            select + "AND name = :n AND block >= :b0 AND block <= :b1 ORDER BY block",
            {"r": int(run_id), "n": name, "b0": lo, "b1": hi},
        )
    return out


def _count_replays(
    name: str, steps: np.ndarray, new: np.ndarray, old: np.ndarray, result: MetricWriteResult
) -> None:
    both_null = np.isnan(new) & np.isnan(old)
    with np.errstate(invalid="ignore"):
        close = np.abs(new - old) <= SAME_TOLERANCE * np.maximum(np.abs(new), np.abs(old))
    same = both_null | close
    result.duplicates += int(same.sum())
    result.conflicts.extend((int(s), name) for s in steps[~same])
