"""Power-of-two rollups of the token ledger, so that a read over a range of a million-step
run costs about what a read over a short one costs.

Two tables, keyed like ``step_rollups`` by (run, level, bucket) with buckets of ``2**level``
consecutive steps (``bucket = step >> level``):

- ``token_ledger_rollup_masses``: a bucket's steps with a ledger, tokens, ``pos_mass`` and
  ``neg_mass``: sums of ``token_ledger_steps``, exact.
- ``token_ledger_rollups``: per bucket, the ``ROLLUP_K`` ids with the largest positive and the
  ``ROLLUP_K`` with the most negative sums of the bucket's stored ledger rows (count, lr_sum,
  and ``n_steps``, the steps that stored the id), so at most ``2 * ROLLUP_K`` rows a bucket.
  The base level (``BASE_LEVEL``) is built from ``token_ledger``, each higher level from the
  level below, trimmed again.

A range is read (:func:`range_pieces`) as raw steps for its unaligned edges and the tail past
the rolled-up frontier, plus the largest stored buckets that fit inside it (at most two per
level). So over a long range an id's ``count``/``lr_sum``/``n_steps`` add the buckets where it
ranked in the bucket's top ``ROLLUP_K`` on its side, plus its raw rows at the edges: the ids
that carry a range's mass are there in full; an id that never ranks in a bucket's top is
under-counted (a lower bound in magnitude). Masses and token counts stay exact. Ranges of at
most ``RAW_MAX_STEPS`` steps are read from the raw rows alone, as before the rollups.

Like ``series.py``, the rollups are a cache built lazily on read, for complete buckets only
(the run has a ledger ``COMPLETE_LAG`` steps past the bucket's end); a writer storing a step
ledger at or below the frontier calls :func:`invalidate_ledger_rollups` in its transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from monitor.store.database import Database
from monitor.store.series import MAX_LEVEL, last_complete_bucket

#: Buckets of the lowest rollup level hold 2**BASE_LEVEL steps.
BASE_LEVEL = 6
#: Ids kept per bucket and side (at most 2 * ROLLUP_K rows a bucket).
ROLLUP_K = 64
#: Ranges of at most this many steps are read from the raw ledger rows alone.
RAW_MAX_STEPS = 1024
#: Base buckets built per statement while catching up.
CHUNK_BUCKETS = 128

ROLLUPS = "token_ledger_rollups"
MASSES = "token_ledger_rollup_masses"


@dataclass(frozen=True)
class Pieces:
    """A step range as raw step ranges (inclusive) and stored buckets ``(level, bucket)``."""

    raw: list[tuple[int, int]]
    buckets: list[tuple[int, int]]

    @classmethod
    def union(cls, parts: list[Pieces]) -> Pieces:
        """The pieces of consecutive ranges, adjacent raw ranges joined (one SQL range)."""
        raw: list[tuple[int, int]] = []
        for a, b in sorted(r for p in parts for r in p.raw):
            if raw and raw[-1][1] + 1 >= a:
                raw[-1] = (raw[-1][0], max(raw[-1][1], b))
            else:
                raw.append((a, b))
        return cls(raw, [b for p in parts for b in p.buckets])


def _frontiers(conn: Connection, run_id: int) -> tuple[int | None, dict[int, int]]:
    """The run's last ledger step and, per level, the last stored bucket."""
    levels = range(BASE_LEVEL, MAX_LEVEL + 1)
    subs = ["(SELECT MAX(step) FROM token_ledger_steps WHERE run_id = :r)"] + [
        f"(SELECT MAX(bucket) FROM {MASSES} WHERE run_id = :r AND level = {lv})" for lv in levels
    ]
    row = conn.execute(text(f"SELECT {', '.join(subs)}"), {"r": run_id}).one()
    done = {lv: int(b) for lv, b in zip(levels, row[1:], strict=True) if b is not None}
    return (None if row[0] is None else int(row[0])), done


def _trimmed(grouped: str) -> str:
    """The rows of ``grouped`` (columns b, token_id, c, s, n) among the ROLLUP_K largest
    positive and the ROLLUP_K most negative ``s`` of their bucket (ties: the smaller id)."""
    return (
        "SELECT b, token_id, c, s, n FROM (SELECT b, token_id, c, s, n, "
        "ROW_NUMBER() OVER (PARTITION BY b ORDER BY s DESC, token_id) AS rp, "
        "ROW_NUMBER() OVER (PARTITION BY b ORDER BY s ASC, token_id) AS rn "
        f"FROM ({grouped}) AS g) AS w "
        f"WHERE (rp <= {ROLLUP_K} AND s > 0) OR (rn <= {ROLLUP_K} AND s < 0)"
    )


def _build(conn: Connection, run_id: int, level: int, first: int, last: int) -> int:
    """Buckets ``first..last`` of ``level``: from the raw rows at the base level, else from
    the stored buckets of the level below; one INSERT ... SELECT per table (grouped, ranked
    and trimmed by the database). The last bucket is stored even if empty, so the frontier
    moves past a gap. Two readers building the same buckets store the same rows: the second
    one's conflict is nothing."""
    p = {"r": run_id, "lv": level, "first": first, "last": last}
    if level == BASE_LEVEL:
        size = 1 << BASE_LEVEL
        where = "WHERE run_id = :r AND step >= :lo AND step <= :hi"
        p.update(lo=first << BASE_LEVEL, hi=((last + 1) << BASE_LEVEL) - 1)
        rows = (
            f"SELECT step / {size} AS b, token_id, SUM(count) AS c, SUM(lr_sum) AS s, "
            f"COUNT(*) AS n FROM token_ledger {where} GROUP BY step / {size}, token_id"
        )
        masses = (
            f"SELECT step / {size} AS b, COUNT(*), SUM(n_tokens), SUM(pos_mass), "
            f"SUM(neg_mass) FROM token_ledger_steps {where} GROUP BY step / {size}"
        )
    else:
        where = "WHERE run_id = :r AND level = :child AND bucket >= :lo AND bucket <= :hi"
        p.update(child=level - 1, lo=2 * first, hi=2 * last + 1)
        rows = (
            "SELECT bucket / 2 AS b, token_id, SUM(count) AS c, SUM(lr_sum) AS s, "
            f"SUM(n_steps) AS n FROM {ROLLUPS} {where} GROUP BY bucket / 2, token_id"
        )
        masses = (
            "SELECT bucket / 2 AS b, SUM(n_steps), SUM(n_tokens), SUM(pos_mass), "
            f"SUM(neg_mass) FROM {MASSES} {where} GROUP BY bucket / 2"
        )
    conn.execute(
        text(
            f"INSERT INTO {ROLLUPS} (run_id, level, bucket, token_id, count, lr_sum, n_steps) "
            f"SELECT :r, :lv, b, token_id, c, s, n FROM ({_trimmed(rows)}) AS t "
            "WHERE 1 = 1 ON CONFLICT DO NOTHING"  # WHERE: SQLite's parser needs it here
        ),
        p,
    )
    written = conn.execute(
        text(
            f"INSERT INTO {MASSES} (run_id, level, bucket, n_steps, n_tokens, pos_mass, "
            f"neg_mass) SELECT :r, :lv, m.* FROM ({masses}) AS m WHERE 1 = 1 "
            "ON CONFLICT DO NOTHING"
        ),
        p,
    ).rowcount
    marker = conn.execute(
        text(f"SELECT 1 FROM {MASSES} WHERE run_id = :r AND level = :lv AND bucket = :last"),
        p,
    ).first()
    if marker is None:
        conn.execute(
            text(
                f"INSERT INTO {MASSES} (run_id, level, bucket, n_steps, n_tokens, pos_mass, "
                "neg_mass) VALUES (:r, :lv, :last, 0, 0, 0.0, 0.0) ON CONFLICT DO NOTHING"
            ),
            p,
        )
        written += 1
    return written


def refresh_ledger_rollups(db: Database, run_id: int) -> int:
    """Store the ledger rollups of every complete bucket of a run; returns buckets written.
    Reads call it themselves; an importer or a benchmark may pay the cost up front."""
    with db.begin() as conn:
        max_step, done = _frontiers(conn, run_id)
    if max_step is None:
        return 0
    written = 0
    base_last = last_complete_bucket(max_step, BASE_LEVEL)
    first = done.get(BASE_LEVEL, -1) + 1
    while first <= base_last:
        with db.begin() as conn:
            nxt = conn.execute(
                text("SELECT MIN(step) FROM token_ledger_steps WHERE run_id = :r AND step >= :s"),
                {"r": run_id, "s": first << BASE_LEVEL},
            ).scalar()
            if nxt is None or (int(nxt) >> BASE_LEVEL) > base_last:
                start = base_last  # no ledger left in complete buckets: mark the frontier
            else:
                start = max(first, int(nxt) >> BASE_LEVEL)
            last = min(base_last, start + CHUNK_BUCKETS - 1)
            written += _build(conn, run_id, BASE_LEVEL, start, last)
        first = last + 1
    done[BASE_LEVEL] = base_last
    for level in range(BASE_LEVEL + 1, MAX_LEVEL + 1):
        child = done.get(level - 1)
        if child is None:
            break
        last = min(last_complete_bucket(max_step, level), ((child + 1) >> 1) - 1)
        first = done.get(level, -1) + 1
        while first <= last:
            with db.begin() as conn:
                nxt = conn.execute(
                    text(
                        f"SELECT MIN(bucket) FROM {MASSES} WHERE run_id = :r AND level = :lv "
                        "AND bucket >= :b AND n_steps > 0"
                    ),
                    {"r": run_id, "lv": level - 1, "b": 2 * first},
                ).scalar()
                start = last if nxt is None else min(last, max(first, int(nxt) >> 1))
                chunk_last = min(last, start + CHUNK_BUCKETS - 1)
                written += _build(conn, run_id, level, start, chunk_last)
            first = chunk_last + 1
        if last >= 0:
            done[level] = max(done.get(level, -1), last)
    return written


def needs_refresh(conn: Connection, run_id: int) -> bool:
    """Whether a complete base bucket is not rolled up yet (one index lookup per level)."""
    max_step, done = _frontiers(conn, run_id)
    if max_step is None:
        return False
    if last_complete_bucket(max_step, BASE_LEVEL) > done.get(BASE_LEVEL, -1):
        return True
    for level in range(BASE_LEVEL + 1, MAX_LEVEL + 1):
        child = done.get(level - 1)
        if child is None:
            return False
        if min(last_complete_bucket(max_step, level), ((child + 1) >> 1) - 1) > done.get(level, -1):
            return True
    return False


def stored_frontiers(conn: Connection, run_id: int) -> dict[int, int]:
    """Per level, the last stored bucket (every bucket up to it is stored)."""
    return _frontiers(conn, run_id)[1]


def ensure_ledger_rollups(db: Database, run_id: int, lo: int, hi: int) -> None:
    """Bring the run's rollups up to date before a read of [lo, hi] that may use them."""
    if hi - lo + 1 <= RAW_MAX_STEPS:
        return
    with db.begin() as conn:
        stale = needs_refresh(conn, run_id)
    if stale:
        refresh_ledger_rollups(db, run_id)


def pieces_sql(
    p: Pieces, raw_cols: str, rollup_cols: str, raw_table: str, rollup_table: str, extra: str = ""
) -> tuple[str, dict[str, int]]:
    """A UNION ALL of the raw rows of ``p.raw`` (``raw_cols`` of ``raw_table``) and the rows
    of its stored buckets (``rollup_cols`` of ``rollup_table``) of run ``:r``, each filtered
    by ``extra`` (an SQL condition, or "")."""
    parts: list[str] = []
    params: dict[str, int] = {}
    cond = f" AND {extra}" if extra else ""
    if p.raw:
        ranges = " OR ".join(f"(step >= :pa{i} AND step <= :pb{i})" for i in range(len(p.raw)))
        for i, (a, b) in enumerate(p.raw):
            params[f"pa{i}"], params[f"pb{i}"] = a, b
        parts.append(f"SELECT {raw_cols} FROM {raw_table} WHERE run_id = :r AND ({ranges}){cond}")
    if p.buckets:
        by_level: dict[int, list[int]] = {}
        for lv, b in p.buckets:
            by_level.setdefault(lv, []).append(b)
        # one SELECT per level: an OR of levels would make SQLite scan every row of the run
        parts += [
            f"SELECT {rollup_cols} FROM {rollup_table} WHERE run_id = :r AND level = {lv} "
            f"AND bucket IN ({', '.join(str(b) for b in bs)}){cond}"
            for lv, bs in sorted(by_level.items())
        ]
    return " UNION ALL ".join(parts), params


def range_pieces(lo: int, hi: int, done: dict[int, int], raw_max: int = RAW_MAX_STEPS) -> Pieces:
    """[lo, hi] as the largest stored buckets that fit inside it plus raw step ranges (the
    unaligned edges and what lies past the frontier); all raw when the range has at most
    ``raw_max`` steps."""
    if hi - lo + 1 <= raw_max or BASE_LEVEL not in done:
        return Pieces([(lo, hi)], [])
    raw: list[tuple[int, int]] = []
    buckets: list[tuple[int, int]] = []
    s = lo
    while s <= hi:
        level = None
        for lv in range(MAX_LEVEL, BASE_LEVEL - 1, -1):
            size = 1 << lv
            if s % size == 0 and s + size - 1 <= hi and (s >> lv) <= done.get(lv, -1):
                level = lv
                break
        if level is None:
            end = min(hi, (s | ((1 << BASE_LEVEL) - 1)))  # to the next base boundary
            if (s >> BASE_LEVEL) > done[BASE_LEVEL]:
                end = hi  # past the frontier: the rest is raw
            if raw and raw[-1][1] == s - 1:
                raw[-1] = (raw[-1][0], end)
            else:
                raw.append((s, end))
            s = end + 1
        else:
            buckets.append((level, s >> level))
            s += 1 << level
    return Pieces(raw, buckets)


def invalidate_ledger_rollups(conn: Connection, run_id: int, from_step: int) -> int:
    """Drop the run's ledger buckets covering ``from_step`` or later (a step ledger stored at
    or below the frontier: a late replay, a multi-rank step re-merged); returns rows deleted.
    An append past the frontier costs one index lookup."""
    frontier = conn.execute(
        text(f"SELECT MAX(bucket) FROM {MASSES} WHERE run_id = :r AND level = {BASE_LEVEL}"),
        {"r": run_id},
    ).scalar()
    if frontier is None or ((int(frontier) + 1) << BASE_LEVEL) <= from_step:
        return 0
    levels = " OR ".join(
        f"(level = {lv} AND bucket >= {from_step >> lv})" for lv in range(BASE_LEVEL, MAX_LEVEL + 1)
    )
    deleted = 0
    for table in (ROLLUPS, MASSES):
        deleted += conn.execute(
            text(f"DELETE FROM {table} WHERE run_id = :r AND ({levels})"), {"r": run_id}
        ).rowcount
    return deleted
